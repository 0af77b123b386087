"""Evaluation samples rendered from meshes made by others (MAMMAL_mouse, dm_control's virtual rodent), not
from our synthetic generator.

`python -m mouserecon.eval.mesh_mice --mammal PATH|--rodent PATH -o OUT/ [--n 12] [--resolution 256]
[--rig real|facelift] [--crop window|perspective] [--seed 0] [--sheet SHEET.png]` writes N sample folders
(DESIGN.md section 4): `images/cam_000.png ...` (8-bit RGBA, alpha = coverage, white where alpha is 0),
`opencv_cameras.json` (`world_up`; for the FaceLift rig also `normalization`), `depth.npz` (camera z at each
pixel centre, 0 off the mouse, as `mouserecon.data.DEPTH_FILE`) and `mesh_mouse.json` (mesh source, seed, pose, coat, light,
position, crops). Frames 0-5 are the 6 cameras of the real markerless_mouse_1 rig, frames 6-7 two held-out
cameras at random azimuths, 0-30 deg elevation, ~300 mm from the mouse, aimed within 5 mm of its centre.

Mesh and poses: `mouserecon.eval.mammal` (MAMMAL_mouse read at run time, posed by linear-blend skinning,
fitted to the 81 labelled frames; a sample takes a fit of one pose family, turned a little more), or with
`--rodent` `mouserecon.eval.rodent` (a rat's skinned mesh from dm_control, scaled to a mouse's body length,
in poses of the same families drawn by our own joint rotations, not fitted to data). Each
sample's mouse is the fitted size times up to `SCALE_JITTER` more or less. World: the rig's, mm, +Z up; the
mouse's lowest point on the floor z = 0, its body (tail excluded) centred over a recorded position of the
mouse (`com3d_mm_all_frames`), random heading.

Looks: a coat (`COATS`: black glossy most often, white, agouti; ears, tail, paws and nose told apart by their
skinning weights), a key light from above plus ambient (`draw_light`), shaded by
`mouserecon.synth.trace.shade` (Lambert + Blinn-Phong + sky ambient; no shadows) after our z-buffer
rasteriser (`rasterize`, vectorised over triangles and samples, 3 x 3 samples per pixel for the alpha edge).

Rigs (`load_rig`, ../shared/data/markerless_mouse_1_rig); a placement is redrawn until every rig view sees
the whole mouse inside its frame and the cameras pass `validate_cameras`:
- `real`: the 1152x1024 calibration (mm, pinhole; distortion ignored), views cropped around the mouse.
  `--crop window` (default): a square pixel window of each frame around the projected mesh (tail included)
  with `DEFAULT_CROP_MARGIN` of its longer side on each side, resized to `resolution`: principal point
  shifted, focal scaled, axes unchanged. Our camera files need the principal point inside the image, which
  a window far from the frame centre misses, so this mode only keeps positions near where the rig looks.
  `--crop perspective`: `synth.rig.perspective_crops`, like `prepare`'s crops (each camera turned about
  its centre to look at the mouse, principal point at the image centre), valid anywhere.
- `facelift`: the FaceLift-fork "M5" cameras (frame x' = s (x_mm - c), fx = fy = 549 at 512 px), whole
  frames resized to `resolution`; the mouse is mapped by the same similarity, fitted from the two camera
  files' centres and recorded as `normalization` (x_model = s R x_mm + t, R = I).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from mouserecon.cameras import CameraError, Cameras, load_camera_file, look_at, save_opencv_cameras, validate_cameras
from mouserecon.data import DEPTH_FILE, load_sample
from mouserecon.errors import MouseReconError
from mouserecon.eval import rodent
from mouserecon.eval.mammal import (FAMILIES, TAIL, LabeledPose, MeshMiceError, SkinnedMesh, draw_pose,
                                    fit_labeled_poses, load_mammal, rot_z, skin)
from mouserecon.normalize import Similarity
from mouserecon.options import DEFAULT_CROP_MARGIN
from mouserecon.progress import progress
from mouserecon.synth.generate import save_depth
from mouserecon.synth.rig import perspective_crops
from mouserecon.synth.trace import Light, one_thread, shade

log = logging.getLogger(__name__)

RIG_FILES = {"real": "opencv_cameras_native_1152x1024.json", "facelift": "opencv_cameras_m5_facelift_fork_512.json"}
KEYPOINTS_FILE = "keypoints_markerless_mouse_1.npz"
CROPS = {"real": ("window", "perspective"), "facelift": ("frame",)}  # the first is the default
RIG_VIEWS, HELDOUT_VIEWS = tuple(range(6)), (6, 7)
HELDOUT_DISTANCE_MM = (285.0, 315.0)
NEAR = 1e-6  # camera z below which a vertex is an error (the rasteriser does not clip)
POSITION_TRIES = 2000
RECORD_FILE = "mesh_mouse.json"
SCALE_JITTER = 0.05  # each sample's mouse is the fitted size times U(1 - j, 1 + j)


# ---- rasterising ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fragments:
    """The nearest surface at each sample (pixel centre) of an H x W grid.

    face [H, W] int64 (-1: none), bary [H, W, 3] float64 perspective-correct barycentric weights of the
    face's vertices (0 where none), depth [H, W] float64 camera z (0 where none).
    """

    face: Tensor
    bary: Tensor
    depth: Tensor


def rasterize(points: Tensor, faces: Tensor, intrinsics: Tensor, height: int, width: int,
              chunk: int = 1 << 20) -> Fragments:
    """Z-buffer rasterisation of a triangle mesh seen by one pinhole camera.

    points [N, 3]: vertices in camera coordinates (OpenCV: +z forward), all with z > NEAR (no clipping:
    a vertex at or behind the camera is an error). faces [F, 3] int64. intrinsics [4] (fx, fy, cx, cy),
    pixel (i, j) sampled at its centre (i + 0.5, j + 0.5) (CONVENTIONS.md C3). A sample is covered by a
    triangle when its three edge functions are >= 0 (either winding, no culling); the nearest camera z
    wins (1/z interpolated linearly in screen space). Vectorised over triangles and samples: every sample
    of each triangle's bounding box is tested, `chunk` samples at a time (whole triangles per chunk).
    """
    assert points.ndim == 2 and points.shape[1] == 3, f"points must be [N, 3], got {tuple(points.shape)}"
    assert faces.ndim == 2 and faces.shape[1] == 3, f"faces must be [F, 3], got {tuple(faces.shape)}"
    points = points.double()
    if not bool((points[:, 2] > NEAR).all()):
        raise ValueError(f"{int((points[:, 2] <= NEAR).sum())} vertices are not in front of the camera "
                         f"(z <= {NEAR}); the rasteriser does not clip")
    fx, fy, cx, cy = intrinsics.double().tolist()
    z = points[:, 2]
    uv = torch.stack([fx * points[:, 0] / z + cx, fy * points[:, 1] / z + cy], -1)  # [N, 2] pixels
    tri = uv[faces]  # [F, 3, 2]
    # Edge function of the edge opposite vertex k (from a to b): cross(b - a, p - a), over twice the area.
    a, b = tri[:, [1, 2, 0]], tri[:, [2, 0, 1]]  # [F, 3, 2]
    area2 = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - \
            (tri[:, 1, 1] - tri[:, 0, 1]) * (tri[:, 2, 0] - tri[:, 0, 0])  # [F]
    coef_x, coef_y = -(b[..., 1] - a[..., 1]), b[..., 0] - a[..., 0]  # [F, 3]
    coef_c = -(coef_x * a[..., 0] + coef_y * a[..., 1])
    coefs = torch.stack([coef_x, coef_y, coef_c], -1) / area2[:, None, None]  # [F, 3, 3]
    lo = torch.ceil(tri.amin(1) - 0.5).clamp_min(0).long()  # [F, 2] first sample column, row
    hi = torch.minimum(torch.floor(tri.amax(1) - 0.5).long(), torch.tensor([width - 1, height - 1]))
    extent = (hi - lo + 1).clamp_min(0)  # [F, 2]
    live = (extent.amin(1) > 0) & (area2.abs() > 1e-12)
    pieces = _candidates(torch.nonzero(live).squeeze(1), lo, coefs, extent, width, chunk)
    ids, pixel, weights = (torch.cat(parts) for parts in zip(*pieces)) if pieces else (
        torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0, 3, dtype=torch.float64))
    return _zbuffer(ids, pixel, weights, z[faces], height, width)


def _candidates(ids: Tensor, lo: Tensor, coefs: Tensor, extent: Tensor, width: int, chunk: int) -> list:
    """Covered samples of triangles `ids`, testing every sample of each one's box, about `chunk` at a time
    -> [(face [C], pixel [C] = row * width + col, screen-space barycentrics [C, 3]), ...], one per chunk."""
    counts = extent[ids, 0] * extent[ids, 1]
    ends, out, start = torch.cumsum(counts, 0), [], 0
    while start < len(ids):  # chunks of whole triangles
        stop = max(start + 1, int(torch.searchsorted(ends, ends[start] - counts[start] + chunk, right=True)))
        part, n = ids[start:stop], counts[start:stop]
        owner = torch.repeat_interleave(part, n)  # [C] candidate -> face
        local = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        col = lo[owner, 0] + local % extent[owner, 0]
        row = lo[owner, 1] + local // extent[owner, 0]
        c = coefs[owner]  # [C, 3, 3]
        w = c[..., 0] * (col + 0.5)[:, None] + c[..., 1] * (row + 0.5)[:, None] + c[..., 2]  # [C, 3]
        inside = (w >= 0).all(-1)
        out.append((owner[inside], (row * width + col)[inside], w[inside]))
        start = stop
    return out


def _zbuffer(ids: Tensor, pixel: Tensor, weights: Tensor, face_z: Tensor, height: int, width: int) -> Fragments:
    """Keep the nearest of the candidates (face ids [C], pixel [C], screen barycentrics [C, 3]) at each sample;
    face_z [F, 3] the faces' vertex camera z."""
    tri_z = face_z[ids]  # [C, 3]
    inv_z = (weights / tri_z).sum(-1)  # 1/z is affine in screen space
    z = 1.0 / inv_z
    nearest = torch.full((height * width,), math.inf, dtype=torch.float64).scatter_reduce_(0, pixel, z, "amin")
    win = z == nearest[pixel]
    # Exact depth ties: the higher face index wins, so each sample gets one face.
    face = torch.full((height * width,), -1, dtype=torch.int64).scatter_reduce_(0, pixel[win], ids[win], "amax")
    win &= ids == face[pixel]
    depth = torch.zeros(height * width, dtype=torch.float64)
    bary = torch.zeros(height * width, 3, dtype=torch.float64)
    depth[pixel[win]] = z[win]
    bary[pixel[win]] = weights[win] / tri_z[win] / inv_z[win, None]  # perspective-correct
    return Fragments(face.reshape(height, width), bary.reshape(height, width, 3), depth.reshape(height, width))


# ---- coats and shading ------------------------------------------------------------------------

# sRGB albedos (dorsal fur, ventral fur, ears, tail, paws, nose), specular strength and Blinn-Phong shininess.
# Chosen for this module, not taken from the synthetic generator's table, so the two do not share a look.
COATS = {
    "black": ((0.040, 0.036, 0.034), (0.075, 0.066, 0.062), (0.30, 0.22, 0.22), (0.27, 0.21, 0.20),
              (0.58, 0.43, 0.41), (0.45, 0.30, 0.30), 0.40, 45.0),
    "white": ((0.91, 0.89, 0.84), (0.94, 0.92, 0.88), (0.95, 0.70, 0.68), (0.93, 0.74, 0.70),
              (0.96, 0.72, 0.68), (0.96, 0.66, 0.64), 0.10, 15.0),
    "agouti": ((0.34, 0.26, 0.17), (0.68, 0.60, 0.48), (0.55, 0.42, 0.38), (0.46, 0.37, 0.33),
               (0.78, 0.58, 0.52), (0.70, 0.50, 0.46), 0.12, 15.0),
}
COAT_WEIGHTS = {"black": 0.6, "white": 0.2, "agouti": 0.2}
# MAMMAL_mouse's skin parts by the joints that carry them (names start with these): ears, tail, paws (digits
# included), nose, in COATS' order (`rodent.PARTS` names the virtual rodent's).
PARTS = {"ears": ("ear_",), "tail": ("tail_",), "paws": ("hind_paw", "fore_paw"), "nose": ("snout",)}


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals [N, 3] of a mesh (orientation as the faces' winding)."""
    v0, v1, v2 = vertices[faces].unbind(1)  # [F, 3] each
    face_normals = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)  # [F, 3], length = twice the area
    normals = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), face_normals.repeat_interleave(3, 0))
    return torch.nn.functional.normalize(normals, dim=-1)


def paint(mesh: SkinnedMesh, coat: str, rng: np.random.Generator,
          parts: dict[str, tuple[str, ...]] = PARTS) -> tuple[Tensor, Tensor, float]:
    """Per-vertex sRGB albedo [N, 3] and specular strength [N] of `coat`, and its shininess.

    Fur blends from dorsal to ventral with the rest-pose normal; a vertex belongs to a part (`parts`) by
    the summed skinning weight of the part's joints; fur gets a +-6 % per-vertex mottle and the whole coat a
    brightness in [0.9, 1.1].
    """
    dorsal, ventral, *part_colours, specular, shininess = COATS[coat]
    t = lambda c: torch.tensor(c, dtype=torch.float64)
    belly = ((0.2 - vertex_normals(mesh.vertices, mesh.faces)[:, 2]) / 0.6).clamp(0.0, 1.0)[:, None]  # [N, 1]
    albedo = t(dorsal) * (1 - belly) + t(ventral) * belly
    albedo = albedo * torch.from_numpy(rng.uniform(0.94, 1.06, size=(len(albedo), 1)))
    spec = torch.full((len(albedo),), specular, dtype=torch.float64)
    for (part, prefixes), colour in zip(parts.items(), part_colours):
        joints = [j for j, name in enumerate(mesh.names) if name.startswith(prefixes)]
        share = mesh.weights[:, joints].sum(1).clamp(0.0, 1.0)[:, None]  # [N, 1]
        albedo = albedo * (1 - share) + t(colour) * share
        spec = spec * (1 - share[:, 0]) + 0.15 * share[:, 0]  # skin: a soft sheen
    return (albedo * rng.uniform(0.9, 1.1)).clamp(0.0, 1.0), spec, shininess


def draw_light(rng: np.random.Generator, shininess: float) -> Light:
    """A key light from above (elevation 45-85 deg, any azimuth), key 0.8-1.2, ambient 0.2-0.35, no shadow."""
    az, el = math.radians(rng.uniform(0.0, 360.0)), math.radians(rng.uniform(45.0, 85.0))
    key, ambient = rng.uniform(0.8, 1.2), rng.uniform(0.2, 0.35)
    return Light(direction=(math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)),
                 key=(key,) * 3, ambient=(ambient,) * 3, shadow=0.0, shininess=shininess)


@dataclass(frozen=True)
class _Painted:
    """`trace.shade`'s material source: albedo [P, 3] and specular [P] already interpolated at the samples."""

    albedo: Tensor
    specular: Tensor

    def material(self, points: Tensor, normals: Tensor) -> tuple[Tensor, Tensor]:
        return self.albedo, self.specular


def render_views(vertices: Tensor, faces: Tensor, albedo: Tensor, specular: Tensor, cameras: Cameras, light: Light,
                 supersample: int = 3) -> tuple[Tensor, Tensor]:
    """Render a mesh (world vertices [N, 3], faces [F, 3], per-vertex albedo [N, 3], specular [N]) from
    cameras [V] -> (RGBA [V, H, W, 4] float32, straight alpha = covered fraction of the supersample x
    supersample sub-pixel samples, colour their mean, white where alpha is 0; depth [V, H, W] float32, the
    camera z at each pixel centre, 0 off the mesh). supersample must be odd (a sample at the pixel centre).
    Shading: `trace.shade` with normals turned towards the camera (open parts such as ears look the same
    from both sides). Runs with one torch thread (`one_thread`): measured on the shared 2-core machine, a
    256 px sample took ~3 s wall (1.6 s CPU) so, 15-30 s wall (7-12 s CPU) with torch's default two threads."""
    assert supersample % 2 == 1, f"supersample must be odd, got {supersample}"
    with one_thread():
        return _render_views(vertices, faces, albedo, specular, cameras, light, supersample)


def _render_views(vertices: Tensor, faces: Tensor, albedo: Tensor, specular: Tensor, cameras: Cameras, light: Light,
                  supersample: int) -> tuple[Tensor, Tensor]:
    s, height, width = supersample, cameras.height, cameras.width
    fine = cameras.resize(height * s, width * s)
    normals = vertex_normals(vertices, faces)
    rgba, depth = torch.ones(len(cameras), height, width, 4), torch.zeros(len(cameras), height, width)
    for v in range(len(cameras)):
        c2w = cameras.c2w[v].double()
        frag = rasterize((vertices - c2w[:3, 3]) @ c2w[:3, :3], faces, fine.intrinsics[v], height * s, width * s)
        hit = frag.face >= 0  # [Hs, Ws]
        corners, weights = faces[frag.face[hit]], frag.bary[hit][:, :, None]  # [P, 3], [P, 3, 1]
        at = lambda values: (values[corners] * weights).sum(1)
        points = at(vertices)
        view_dirs = torch.nn.functional.normalize(points - c2w[:3, 3], dim=-1)
        n = torch.nn.functional.normalize(at(normals), dim=-1)
        n = torch.where((n * view_dirs).sum(-1, keepdim=True) > 0, -n, n)
        colour = shade(_Painted(at(albedo), at(specular[:, None])[:, 0]), points, n, view_dirs, light,
                       torch.ones(len(points), dtype=torch.float64))
        covered = hit.double().reshape(height, s, width, s).mean((1, 3))  # [H, W]
        sums = torch.zeros(height * s, width * s, 3, dtype=torch.float64)
        sums[hit] = colour
        mean = sums.reshape(height, s, width, s, 3).sum((1, 3)) / (covered * s * s).clamp_min(1e-12)[..., None]
        rgba[v, ..., :3] = torch.where(covered[..., None] > 0, mean, torch.ones_like(mean)).float()
        rgba[v, ..., 3] = covered.float()
        depth[v] = frag.depth[s // 2::s, s // 2::s].float()
    return rgba, depth


# ---- the rig, placement and crops -------------------------------------------------------------


@dataclass(frozen=True)
class Rig:
    """One of the markerless_mouse_1 rigs (`RIG_FILES`) and the recorded mouse.

    kind: "real" or "facelift". cameras: Cameras [6] in the rig's frame (mm, or the FaceLift frame).
    to_frame: Similarity mm -> the rig's frame (identity for "real"). heldout_intrinsics: [4] (fx, fy, cx,
    cy) of a held-out camera at the rig's image size. com_mm [T, 3]: the mouse's recorded positions.
    labels [B, 22, 3] mm, frames [B] and names (22): the labelled keypoints.
    """

    kind: str
    cameras: Cameras
    to_frame: Similarity
    heldout_intrinsics: Tensor
    com_mm: np.ndarray
    labels: np.ndarray
    frames: np.ndarray
    names: list[str]


def _fit_similarity(source: Tensor, target: Tensor, where: str) -> Similarity:
    """The scale + translation (no rotation) taking points source [V, 3] to target [V, 3]; raises unless exact."""
    src, dst = source.double(), target.double()
    a, b = src - src.mean(0), dst - dst.mean(0)
    scale = float((a * b).sum() / a.square().sum())
    similarity = Similarity(torch.eye(3, dtype=torch.float64), dst.mean(0) - scale * src.mean(0), scale)
    residual = (similarity.apply_points(src) - dst).norm(dim=-1).max().item()
    if not residual < 1e-3 * b.norm(dim=-1).mean().item():
        raise MeshMiceError(f"{where}: the FaceLift cameras are not a scaled, shifted copy of the real rig "
                            f"(residual {residual:.3g})")
    return similarity


def load_rig(rig_dir: str | Path, kind: str) -> Rig:
    """Read the rig folder (`RIG_FILES`, `KEYPOINTS_FILE`) for `kind` ("real" or "facelift")."""
    rig_dir = Path(rig_dir)
    if kind not in RIG_FILES:
        raise MeshMiceError(f"--rig must be one of {sorted(RIG_FILES)}, got {kind!r}")
    for name in (*RIG_FILES.values(), KEYPOINTS_FILE):
        if not (rig_dir / name).is_file():
            raise MeshMiceError(f"{rig_dir / name}: rig file missing (the markerless_mouse_1 rig folder is needed)")
    real = load_camera_file(rig_dir / RIG_FILES["real"]).cameras
    cameras, to_frame = real, Similarity.identity()
    fx, fy = real.intrinsics[:, :2].double().mean(0).tolist()
    heldout = torch.tensor([fx, fy, real.width / 2, real.height / 2], dtype=torch.float64)
    if kind == "facelift":
        cameras = load_camera_file(rig_dir / RIG_FILES["facelift"]).cameras
        if not torch.allclose(cameras.c2w[:, :3, :3].double(), real.c2w[:, :3, :3].double(), atol=1e-4):
            raise MeshMiceError(f"{rig_dir / RIG_FILES['facelift']}: rotations differ from the real rig's")
        to_frame = _fit_similarity(real.centers, cameras.centers, str(rig_dir / RIG_FILES["facelift"]))
        heldout = cameras.intrinsics[0].double()
    with np.load(rig_dir / KEYPOINTS_FILE) as data:
        missing = {"names22", "labeled_frames", "labeled_kp3d_mm", "com3d_mm_all_frames"} - set(data.files)
        if missing:
            raise MeshMiceError(f"{rig_dir / KEYPOINTS_FILE}: missing arrays {sorted(missing)}")
        labels, frames = data["labeled_kp3d_mm"].astype(np.float64), data["labeled_frames"]
        names, com = [str(n) for n in data["names22"]], data["com3d_mm_all_frames"].astype(np.float64)
    return Rig(kind, cameras, to_frame, heldout, com[np.isfinite(com).all(1)], labels, frames, names)


def place(vertices: Tensor, body: Tensor, heading_deg: float, xy: np.ndarray) -> Tensor:
    """Posed vertices [N, 3] (mm, model axes) -> world [N, 3] mm: the snout turned to `heading_deg`
    (from +X towards +Y), the body's (`body` [N] bool: not the tail) box centred over xy [2], the
    lowest vertex on the floor z = 0."""
    turn = rot_z(torch.tensor(math.radians(heading_deg) + math.pi / 2, dtype=torch.float64))  # -y -> heading
    world = vertices @ turn.T
    centre = (world[body].amin(0) + world[body].amax(0)) / 2
    shift = torch.tensor([xy[0] - centre[0], xy[1] - centre[1], -world[:, 2].min()], dtype=torch.float64)
    return world + shift


def heldout_cameras(rng: np.random.Generator, centre_mm: Tensor, rig: Rig) -> Cameras:
    """Two cameras [2] in the rig's frame at random azimuths, 0-30 deg elevation, `HELDOUT_DISTANCE_MM` from
    the mouse's centre [3] (mm), aimed within 5 mm of it, with the rig's held-out intrinsics."""
    eyes, targets = [], []
    for _ in HELDOUT_VIEWS:
        az, el = math.radians(rng.uniform(0.0, 360.0)), math.radians(rng.uniform(0.0, 30.0))
        direction = torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        eyes.append(centre_mm + rng.uniform(*HELDOUT_DISTANCE_MM) * direction.double())
        targets.append(centre_mm + torch.from_numpy(rng.uniform(-5.0, 5.0, size=3)))
    c2w = rig.to_frame.apply_c2w(look_at(torch.stack(eyes), torch.stack(targets)))
    k = rig.heldout_intrinsics
    return Cameras(c2w.float(), k.float().expand(len(HELDOUT_VIEWS), 4).clone(), rig.cameras.width, rig.cameras.height)


def window_crops(cameras: Cameras, vertices: Tensor, resolution: int, margin: float) -> tuple[Cameras, list]:
    """Square pixel windows of each view's frame around the projected vertices [N, 3] -> (Cameras [V] at
    resolution x resolution, windows [(left, top, side)] px): side = the projections' box's longer side x
    (1 + 2 margin), rounded up, centred on the box; intrinsics shifted and scaled (`Cameras.window`,
    `resize`), axes unchanged."""
    uv, _ = cameras.to(torch.float64).project(vertices[None].expand(len(cameras), -1, -1))  # [V, N, 2]
    lo, hi = uv.amin(1).floor(), uv.amax(1).ceil()  # [V, 2] pixel edges around the projections
    views, windows = [], []
    for v in range(len(cameras)):
        side = math.ceil(float((hi[v] - lo[v]).max()) * (1.0 + 2.0 * margin))
        left, top = (round(float(c) - side / 2.0) for c in (lo[v] + hi[v]) / 2.0)
        views.append(cameras[v].window(left, top, side, side).resize(resolution, resolution))
        windows.append((left, top, side))
    return Cameras.stack(views), windows


def frame_views(vertices: Tensor, cameras: Cameras, crop: str, resolution: int,
                margin: float) -> tuple[Cameras, list | None] | None:
    """The sample's cameras for a mouse at vertices [N, 3] (the rig's frame) seen by cameras [V] (rig views
    first, at the rig's image size) -> (Cameras [V] at resolution, windows or None), or None when this
    placement does not make a valid sample: a rig view that does not see the whole mouse in its frame, a
    window that misses its principal point, or cameras `validate_cameras` rejects."""
    uv, z = cameras[list(RIG_VIEWS)].to(torch.float64).project(vertices[None].expand(len(RIG_VIEWS), -1, -1))
    size = torch.tensor([cameras.width, cameras.height], dtype=torch.float64)
    if not bool(((z > 0) & (uv >= 0).all(-1) & (uv <= size).all(-1)).all()):
        return None
    windows = None
    if crop == "window":
        out, windows = window_crops(cameras, vertices, resolution, margin)
    elif crop == "perspective":
        centre = (vertices.amin(0) + vertices.amax(0)) / 2  # `prepare`'s crop model, aimed at the mesh's box centre
        out = perspective_crops(cameras, vertices.double(), centre.double().numpy(), margin,
                                np.zeros((len(cameras), 2)), resolution)
    else:  # "frame": whole frames
        out = cameras.resize(resolution, resolution)
    try:  # among others: each principal point inside its image, every view sees where the others look
        validate_cameras(out)
    except CameraError:
        return None
    return out, windows


# ---- samples ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poser:
    """How a mesh gets its samples' poses. draw(family, rng) -> (rotations [J, 3, 3] as `mammal.skin` takes
    them, the pose's record); scale_mm: mm per model unit (before `SCALE_JITTER`); tail: the joints that
    carry the tail (left out of the body's box that `place` centres); parts: its skin parts for `paint`."""

    draw: Callable[[str, np.random.Generator], tuple[Tensor, dict]]
    scale_mm: float
    tail: tuple[str, ...]
    parts: dict[str, tuple[str, ...]]


def mammal_poser(mesh: SkinnedMesh, poses: list[LabeledPose]) -> Poser:
    """MAMMAL_mouse posed by its fits to the labelled frames (`mammal.draw_pose`), at the fitted size."""
    return Poser(lambda family, rng: draw_pose(mesh, poses, family, rng), poses[0].scale_mm, TAIL + ("tail_9_end",),
                 PARTS)


def rodent_poser(mesh: SkinnedMesh) -> Poser:
    """The virtual rodent posed by `rodent.draw_pose`, scaled to `rodent.BODY_MM` snout to tail base."""
    return Poser(lambda family, rng: rodent.draw_pose(mesh, family, rng), rodent.scale_mm(mesh), rodent.TAIL,
                 rodent.PARTS)


def generate_sample(mesh: SkinnedMesh, poser: Poser, rig: Rig, out_dir: str | Path, seed: int,
                    family: str, resolution: int = 256, crop: str | None = None,
                    margin: float = DEFAULT_CROP_MARGIN, supersample: int = 3) -> Path:
    """Draw pose, size, coat, light, position and held-out cameras from `seed`, render, write `out_dir`.

    family: one of `FAMILIES`. crop: one of CROPS[rig.kind] (None: the first). The mouse is placed at
    recorded positions (`Rig.com_mm`; rearing where the recorded centre was >= 35 mm high, else below
    25 mm) with a random heading until `frame_views` accepts the views (at most POSITION_TRIES draws).
    The folder must not exist or be empty; it is written under a temporary name and renamed.
    """
    crop = CROPS[rig.kind][0] if crop is None else crop
    if crop not in CROPS[rig.kind]:
        raise MeshMiceError(f"--crop for the {rig.kind} rig must be one of {CROPS[rig.kind]}, got {crop!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MeshMiceError(f"{out_dir}: output folder exists and is not empty")
    rng = np.random.default_rng(seed)
    rotations, pose_record = poser.draw(family, rng)
    scale = poser.scale_mm * rng.uniform(1.0 - SCALE_JITTER, 1.0 + SCALE_JITTER)
    posed = skin(mesh, rotations)[0] * scale  # [N, 3] mm, model axes
    coat = str(rng.choice(list(COAT_WEIGHTS), p=list(COAT_WEIGHTS.values())))
    albedo, specular, shininess = paint(mesh, coat, rng, poser.parts)
    light = draw_light(rng, shininess)
    body = mesh.weights[:, mesh.index(poser.tail)].sum(1) < 0.5
    high = rig.com_mm[:, 2] >= 35.0
    positions = rig.com_mm[high if family == "rear" else rig.com_mm[:, 2] < 25.0]
    for attempt in range(1, POSITION_TRIES + 1):
        index, heading = int(rng.integers(len(positions))), float(rng.uniform(0.0, 360.0))
        world = place(posed, body, heading, positions[index, :2])
        centre = (world[body].amin(0) + world[body].amax(0)) / 2
        full = Cameras.cat([rig.cameras, heldout_cameras(rng, centre, rig)])
        vertices = rig.to_frame.apply_points(world)
        framed = frame_views(vertices, full, crop, resolution, margin)
        if framed is not None:
            break
    else:
        raise MeshMiceError(f"no valid placement in {POSITION_TRIES} draws (seed {seed}, {family}, {crop} crops)")
    cameras, windows = framed
    rgba, depth = render_views(vertices, mesh.faces, albedo, specular, cameras, light, supersample)
    record = {
        "generator": "mouserecon.eval.mesh_mice", "seed": seed, "rig": rig.kind, "crop": crop, "margin": margin,
        "resolution": resolution, "supersample": supersample, "rig_views": list(RIG_VIEWS),
        "heldout_views": list(HELDOUT_VIEWS), "units": "mm" if rig.kind == "real" else "model",
        "mesh": mesh.source, "pose": pose_record, "mm_per_unit": scale, "coat": coat, "light": asdict(light),
        "heading_deg": heading, "position_mm": positions[index].tolist(), "placement_draws": attempt,
        "mouse_centre_mm": centre.tolist(), "height_mm": float(world[:, 2].max()), "windows": windows,
    }
    extra = {"world_up": [0.0, 0.0, 1.0]}
    if rig.kind == "facelift":
        extra["normalization"] = rig.to_frame.to_dict()
    return write_sample(out_dir, rgba, depth, cameras, record, extra)


def write_sample(out_dir: Path, rgba: Tensor, depth: Tensor, cameras: Cameras, record: dict, extra: dict) -> Path:
    """Write RGBA [V, H, W, 4], depth [V, H, W] and cameras [V] as a sample folder (+ RECORD_FILE), atomically
    (a temporary folder renamed at the end)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    files = [f"images/cam_{i:03d}.png" for i in range(len(cameras))]
    for name, image in zip(files, (rgba * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()):
        iio.imwrite(tmp / name, image)
    save_opencv_cameras(tmp / "opencv_cameras.json", cameras, files, **extra)
    save_depth(tmp / DEPTH_FILE, depth)
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def generate_dataset(mesh_kind: str, mesh_path: str | Path, rig_dir: str | Path, out_dir: str | Path, n: int,
                     rig: str = "real", resolution: int = 256, seed: int = 0, crop: str | None = None) -> list[Path]:
    """Write n samples `out_dir/sample_00000 ...` of the mesh `mesh_kind` ("mammal": MAMMAL_mouse fitted to
    the labelled frames first; "rodent": dm_control's virtual rodent) read from mesh_path: sample i has seed
    seed + i and pose family FAMILIES[i % 5] (so any 5 in a row cover them all)."""
    if n < 1 or resolution < 8:
        raise MeshMiceError(f"need --n >= 1 and --resolution >= 8, got {n}, {resolution}")
    loaded = load_rig(rig_dir, rig)
    if mesh_kind == "mammal":
        mesh = load_mammal(mesh_path)
        poses = fit_labeled_poses(mesh, loaded.labels, loaded.frames, loaded.names)
        rmse = np.array([p.rmse_mm for p in poses])
        log.info("fitted the mesh to %d labelled frames: %.1f mm per unit, keypoint RMSE median %.1f mm (max %.1f)",
                 len(poses), poses[0].scale_mm, np.median(rmse), rmse.max())
        poser = mammal_poser(mesh, poses)
    elif mesh_kind == "rodent":
        mesh = rodent.load_rodent(mesh_path)
        poser = rodent_poser(mesh)
    else:
        raise MeshMiceError(f"unknown mesh {mesh_kind!r}: mammal or rodent")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = [generate_sample(mesh, poser, loaded, out_dir / f"sample_{i:05d}", seed + i, FAMILIES[i % len(FAMILIES)],
                               resolution, crop) for i in progress(range(n), desc="mesh mice", unit="sample")]
    log.info("wrote %d samples to %s", n, out_dir)
    return folders


def contact_sheet(sample_dirs: list[Path], path: str | Path, tile: int = 128) -> Path:
    """A PNG with one row per sample (its views left to right, `tile` px each, held-out views after a gap)
    labelled with the folder name, pose family, labelled frame, coat and height, for checking by eye."""
    from PIL import Image, ImageDraw, ImageFont

    rows = []
    for folder in sample_dirs:
        sample = load_sample(folder, tile)
        record = json.loads((Path(folder) / RECORD_FILE).read_text())
        views = (sample.images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)  # [V, t, t, 3]
        gap = np.full((tile, tile // 4, 3), 255, np.uint8)
        strip = np.concatenate([*views[:len(RIG_VIEWS)], gap, *views[len(RIG_VIEWS):]], 1)
        label = Image.new("RGB", (170, tile), "white")
        text = (f"{Path(folder).name}\n{record['pose']['family']} {record['pose'].get('labelled_frame', '')}\n"
                f"{record['coat']}, {record['height_mm']:.0f} mm tall\n{record['rig']} / {record['crop']}")
        ImageDraw.Draw(label).multiline_text((4, 4), text, fill="black", font=ImageFont.load_default(size=12))
        rows.append(np.concatenate([np.asarray(label), strip], 1))
    iio.imwrite(path, np.concatenate(rows, 0))
    return Path(path)


def default_rig_dir() -> Path:
    """$MOUSERECON_SHARED/data/markerless_mouse_1_rig, else ../shared/data/... beside this checkout."""
    shared = os.environ.get("MOUSERECON_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")
    return Path(shared).resolve() / "data" / "markerless_mouse_1_rig"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mesh = parser.add_mutually_exclusive_group(required=True)
    mesh.add_argument("--mammal", help="MAMMAL_mouse checkout or its bare git repository")
    mesh.add_argument("--rodent", help="dm_control checkout or its bare git repository (the virtual rodent)")
    parser.add_argument("-o", "--out", required=True, help="output folder (sample_00000 ... inside)")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rig", choices=sorted(RIG_FILES), default="real")
    parser.add_argument("--crop", default=None, help="real rig: window (default) or perspective")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rig-dir", default=None, help="markerless_mouse_1 rig folder (default: see default_rig_dir)")
    parser.add_argument("--sheet", default=None, help="also write a contact sheet PNG of the samples here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kind, path = ("mammal", args.mammal) if args.mammal else ("rodent", args.rodent)
        folders = generate_dataset(kind, path, args.rig_dir or default_rig_dir(), args.out, args.n, args.rig,
                                   args.resolution, args.seed, args.crop)
        if args.sheet:
            log.info("contact sheet: %s", contact_sheet(folders, args.sheet))
    except MouseReconError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
