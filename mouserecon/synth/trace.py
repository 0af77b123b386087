"""Sphere tracing and shading of an SDF scene into RGBA images (torch, CPU-friendly).

The scene is anything with `distance(points [P, 3]) -> [P]`, `bounds() -> [2, 3]` and
`material(points [P, 3], normals [P, 3]) -> (albedo [P, 3] sRGB, specular [P])`, e.g.
`sdf.Shape`. Rays go through sub-pixel centres of a `supersample x supersample` grid per pixel;
alpha is the fraction of sub-pixels whose ray hits the surface (coverage) and the colour is the
mean over those sub-pixels (straight, not premultiplied). Background: alpha 0, colour white.
Shading is done in linear light: ambient sky term + one directional key light with a soft
self-shadow + a Blinn-Phong highlight, then encoded back to sRGB (see `shade`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mouserecon.cameras import Cameras


class Scene(Protocol):
    def distance(self, points: Tensor) -> Tensor: ...

    def bounds(self) -> Tensor: ...

    def material(self, points: Tensor, normals: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Light:
    """direction: unit vector towards the key light (world); colours are linear RGB multipliers."""

    direction: tuple[float, float, float] = (0.3, -0.4, 0.87)
    key: tuple[float, float, float] = (0.9, 0.9, 0.9)
    ambient: tuple[float, float, float] = (0.3, 0.3, 0.3)
    shadow: float = 0.8  # 0 = no self-shadow, 1 = full shadow
    shininess: float = 24.0
    energy_conserving: bool = False  # the highlight model of `shade` (False: varieties rig and wide)


@dataclass(frozen=True)
class TraceConfig:
    supersample: int = 2  # sub-pixels per pixel along each axis
    n_steps: int = 96  # fixed sphere-tracing iteration budget
    hit_px: float = 0.02  # hit threshold as a fraction of the sub-pixel footprint at that depth
    step_scale: float = 0.9  # < 1 because the ellipsoid distance is only approximately 1-Lipschitz
    shadow_steps: int = 24
    shadow_softness: float = 8.0  # larger = harder shadow edges


@contextmanager
def one_thread():
    """Run torch ops with one intra-op thread, restoring the previous count afterwards.

    The tracer issues thousands of small ops; on a shared 2-core box two OpenMP threads made a
    64 px sample take 20 s of CPU instead of 1.5 s. Parallelise over samples instead.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ray_box(origins: Tensor, dirs: Tensor, box: Tensor) -> tuple[Tensor, Tensor]:
    """Entry and exit distances [P] of rays [P, 3] through an axis-aligned box [2, 3]; miss <=> exit <= entry."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (box[0] - origins) * inv, (box[1] - origins) * inv
    near = torch.minimum(t0, t1).max(-1).values.clamp_min(0.0)
    far = torch.maximum(t0, t1).min(-1).values
    return near, far


def sphere_trace(scene: Scene, origins: Tensor, dirs: Tensor, t_near: Tensor, t_far: Tensor,
                 eps_per_t: Tensor, config: TraceConfig) -> tuple[Tensor, Tensor, Tensor]:
    """March rays [P, 3] from t_near to t_far [P] for at most config.n_steps steps.

    Returns t [P], hit [P] (bool; distance fell below eps_per_t * t) and closest [P], the
    smallest distance / t seen along the ray (the half-angle of the thinnest cone around the
    ray that touches the surface; 0 for hits). Finished rays leave the working set, so later
    iterations only pay for rays still marching.
    """
    t = t_near.clone()
    hit = torch.zeros_like(t, dtype=torch.bool)
    closest = torch.full_like(t, float("inf"))
    live = torch.nonzero(t_far > t_near).squeeze(1)  # [L]
    for _ in range(config.n_steps):
        if live.numel() == 0:
            break
        t_live = t[live]
        d = scene.distance(origins[live] + t_live[:, None] * dirs[live])  # [L]
        ratio = d / t_live.clamp_min(1e-12)
        done_hit = ratio < eps_per_t[live]
        closest[live] = torch.minimum(closest[live], ratio.clamp_min(0.0))
        t_live = t_live + config.step_scale * d * (~done_hit)
        t[live] = t_live
        hit[live] = done_hit
        live = live[~done_hit & (t_live < t_far[live])]
    closest[hit] = 0.0
    return t, hit, closest


def normals_at(scene: Scene, points: Tensor, h: float) -> Tensor:
    """Unit normals [P, 3] from a tetrahedral finite difference of the distance with step h."""
    k = points.new_tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]])  # [4, 3]
    d = scene.distance((points[:, None, :] + h * k[None]).reshape(-1, 3)).reshape(-1, 4)  # [P, 4]
    return torch.nn.functional.normalize(d @ k, dim=-1)


def soft_shadow(scene: Scene, points: Tensor, to_light: Tensor, start: float, end: float,
                config: TraceConfig) -> Tensor:
    """Visibility [P] in [0, 1] of a directional light from surface points [P, 3] (penumbra estimate k d / t)."""
    t = torch.full(points.shape[:1], start, dtype=points.dtype)
    visibility = torch.ones_like(t)
    step_cap = (end - start) / config.shadow_steps * 4.0
    for _ in range(config.shadow_steps):
        d = scene.distance(points + t[:, None] * to_light)
        visibility = torch.minimum(visibility, (config.shadow_softness * d / t).clamp(0.0, 1.0))
        t = t + d.clamp(0.05 * start, step_cap)
    return visibility


def shade(scene: Scene, points: Tensor, normals: Tensor, view_dirs: Tensor, light: Light,
          visibility: Tensor) -> Tensor:
    """sRGB colour [P, 3] in [0, 1] of surface points [P, 3] seen along view_dirs [P, 3].

    Linear radiance = albedo^2.2 (ambient sky + key max(n.l, 0) visibility) + key highlight, with
    h = normalise(l - view_dir), ks the material's specular weight and s = light.shininess. The key is
    the irradiance over pi (a white Lambertian surface facing the light reflects `key`), so the
    highlight of a BRDF f is pi f key (n.l). energy_conserving=False: highlight = ks (n.h)^s visibility
    (unnormalised, no cosine). True: the Blinn-Phong BRDF ks c(s) / pi (n.h)^s with
    c(s) = (s + 2)(s + 4) / (8 (s + 2^(-s/2))), which makes its directional albedo exactly ks at normal
    incidence and less at any other (the commoner (s + 8) / 8 overshoots by up to 7.5 %); so
    highlight = ks c(s) (n.h)^s max(n.l, 0) visibility, and the diffuse is weighted by (1 - ks): the surface
    reflects at most what it receives (peak ks c(s) key at n = h = l).
    """
    albedo, specular = scene.material(points, normals)  # [P, 3], [P]
    linear = albedo.clamp(0.0, 1.0) ** 2.2
    to_light = normals.new_tensor(light.direction)
    lambert = (normals @ to_light).clamp_min(0.0) * visibility  # [P]
    sky = 0.75 + 0.25 * normals[:, 2]  # brighter from above, like a lit room
    half = torch.nn.functional.normalize(to_light[None] - view_dirs, dim=-1)
    lobe = (normals * half).sum(-1).clamp_min(0.0) ** light.shininess  # [P]
    if light.energy_conserving:
        highlight = specular * blinn_phong_norm(light.shininess) * lobe * lambert
        linear = linear * (1.0 - specular)[:, None]
    else:
        highlight = specular * lobe * visibility
    key, ambient = normals.new_tensor(light.key), normals.new_tensor(light.ambient)
    radiance = linear * (ambient[None] * sky[:, None] + key[None] * lambert[:, None]) + highlight[:, None] * key
    return radiance.clamp(0.0, 1.0) ** (1.0 / 2.2)


def blinn_phong_norm(shininess: float) -> float:
    """c(s) of `shade`: pi / (hemispherical integral of (n.h)^s cos(theta_v) at normal incidence), closed form."""
    s = shininess
    return (s + 2.0) * (s + 4.0) / (8.0 * (s + 2.0 ** (-s / 2.0)))


def _shade_hits(scene: Scene, origins: Tensor, dirs: Tensor, t: Tensor, light: Light, size: float,
                config: TraceConfig) -> Tensor:
    """Colour [P, 3] of rays [P, 3] that hit the surface at t [P]; size = scene diagonal (step scales)."""
    points = origins + t[:, None] * dirs
    normals = normals_at(scene, points, h=1e-3 * size)
    visibility = torch.ones_like(t)
    if light.shadow > 0:
        to_light = points.new_tensor(light.direction)[None].expand_as(points)
        raw = soft_shadow(scene, points + normals * 4e-3 * size, to_light, 2e-3 * size, size, config)
        visibility = 1.0 - light.shadow * (1.0 - raw)
    return shade(scene, points, normals, dirs, light, visibility)


def _trace_rays(scene: Scene, cameras: Cameras, box: Tensor, config: TraceConfig,
                where: Tensor | None = None) -> tuple[Tensor, ...]:
    """Rays through the pixel centres of cameras [V] (every pixel, or those `where` [V, H, W] marks, in
    row-major order), traced: origins, dirs [R, 3], t, hit, closest [R]."""
    origins, dirs = cameras.rays()  # [V, H, W, 3]
    focal = cameras.intrinsics[:, :2].min(-1).values[:, None, None].expand(origins.shape[:-1])  # [V, H, W]
    if where is None:
        origins, dirs, focal = origins.reshape(-1, 3), dirs.reshape(-1, 3), focal.reshape(-1)
    else:
        assert where.shape == origins.shape[:-1], f"where {tuple(where.shape)} vs pixels {tuple(origins.shape[:-1])}"
        origins, dirs, focal = origins[where], dirs[where], focal[where]
    t_near, t_far = ray_box(origins, dirs, box)
    return (origins, dirs, *sphere_trace(scene, origins, dirs, t_near, t_far, config.hit_px / focal, config))


def render_rgba(scene: Scene, cameras: Cameras, light: Light, config: TraceConfig = TraceConfig()) -> Tensor:
    """Render cameras [V] -> RGBA [V, H, W, 4] float32 in [0, 1] (straight alpha, white where alpha is 0).

    Runs under `one_thread()`.

    Coarse to fine: one ray per pixel first; pixels whose 3x3 neighbourhood is all hits are
    fully covered and shaded once; pixels near the silhouette (a neighbour hit, or the ray passed
    within a pixel of the surface) are re-traced with supersample^2 sub-pixel rays, alpha being
    the fraction that hit. Pixels far from the mouse stay background.
    """
    assert cameras.c2w.ndim == 3, "render a [V] set of cameras"
    with one_thread():
        return _render(scene, cameras, light, config)


def render_depth(scene: Scene, cameras: Cameras, config: TraceConfig = TraceConfig(),
                 where: Tensor | None = None) -> Tensor:
    """Depth maps of cameras [V] -> [V, H, W] float32: the camera z (OpenCV, along the optical axis) of
    the surface point hit by the ray through each pixel centre, 0 where that ray misses.

    One ray per pixel, no shading; silhouette pixels whose centre ray misses are 0 although the
    mouse covers part of them (see `render_rgba` for the coverage). where [V, H, W] bool: trace only
    these pixels (e.g. near a known silhouette), the others are 0. Runs under `one_thread()`.
    """
    assert cameras.c2w.ndim == 3, "render a [V] set of cameras"
    shape = (len(cameras), cameras.height, cameras.width)
    pick = torch.ones(shape, dtype=torch.bool) if where is None else where
    with one_thread():
        _, dirs, t, hit, _ = _trace_rays(scene, cameras, scene.bounds(), config, pick)
        forward = cameras.c2w[:, None, None, :3, 2].expand(*shape, 3)[pick].to(dirs.dtype)  # optical axes [P, 3]
        depth = torch.zeros(shape)
        depth[pick] = torch.where(hit, t * (dirs * forward).sum(-1), torch.zeros_like(t)).float()
        return depth


def _render(scene: Scene, cameras: Cameras, light: Light, config: TraceConfig) -> Tensor:
    s, n_views, height, width = config.supersample, len(cameras), cameras.height, cameras.width
    box = scene.bounds()
    size = (box[1] - box[0]).norm().item()
    origins, dirs, t, hit, closest = _trace_rays(scene, cameras, box, config)
    pixel_angle = (1.0 / cameras.intrinsics[:, :2].min(-1).values)[:, None, None]  # [V, 1, 1]
    hit_img = hit.reshape(n_views, 1, height, width).float()
    near = (hit_img[:, 0] > 0) | (closest.reshape(n_views, height, width) < pixel_angle)
    pool = lambda x: torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    interior = -pool(-hit_img)[:, 0] > 0  # all 3x3 neighbours hit  [V, H, W]
    edge = (pool(near[:, None].float())[:, 0] > 0) & ~interior

    rgb = torch.ones(n_views, height, width, 3)
    alpha = interior.float()
    inner = torch.nonzero(interior.reshape(-1)).squeeze(1)
    if inner.numel():
        rgb.view(-1, 3)[inner] = _shade_hits(scene, origins[inner], dirs[inner], t[inner], light, size, config)

    v, y, x = torch.nonzero(edge, as_tuple=True)  # [E] each
    if v.numel():
        fine = cameras.resize(height * s, width * s)
        f_origins, f_dirs = fine.rays()  # [V, Hs, Ws, 3]
        sub = torch.arange(s)
        ys = (y[:, None, None] * s + sub[None, :, None]).expand(-1, s, s)  # [E, s, s]
        xs = (x[:, None, None] * s + sub[None, None, :]).expand(-1, s, s)
        vs = v[:, None, None].expand(-1, s, s)
        e_origins, e_dirs = f_origins[vs, ys, xs].reshape(-1, 3), f_dirs[vs, ys, xs].reshape(-1, 3)  # [E*s*s, 3]
        focal = fine.intrinsics[:, :2].min(-1).values[vs].reshape(-1)
        t_near, t_far = ray_box(e_origins, e_dirs, box)
        e_t, e_hit, _ = sphere_trace(scene, e_origins, e_dirs, t_near, t_far, config.hit_px / focal, config)
        colour = torch.ones_like(e_origins)
        idx = torch.nonzero(e_hit).squeeze(1)
        if idx.numel():
            colour[idx] = _shade_hits(scene, e_origins[idx], e_dirs[idx], e_t[idx], light, size, config)
        weight = e_hit.float().reshape(-1, s * s, 1)
        covered = weight.sum(1)  # [E, 1]
        mean = (colour.reshape(-1, s * s, 3) * weight).sum(1) / covered.clamp_min(1.0)
        rgb[v, y, x] = torch.where(covered > 0, mean, torch.ones_like(mean))
        alpha[v, y, x] = covered[:, 0] / (s * s)
    return torch.cat([rgb, alpha[..., None]], dim=-1).float()
