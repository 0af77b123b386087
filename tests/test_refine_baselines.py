"""Test-time refinement and the naive baselines against closed forms and known scenes."""

from __future__ import annotations

import math

import pytest
import torch

import mouserecon.baselines as baselines
from mouserecon.baselines import hull_fill, visual_hull_gaussians
from mouserecon.cameras import Cameras, look_at
from mouserecon.carve import HULL_DEPTH_DILATION, HULL_DEPTH_SAMPLES, carve, dilation_px, hull_depths, project_to_masks
from mouserecon.metrics import psnr
from mouserecon.gaussians import Gaussians
from mouserecon.refine import RefineError, refine
from mouserecon.render import render

SIZE = 48


def ring_cameras(n: int, size: int = SIZE, distance: float = 2.7, hfov_deg: float = 40.0) -> Cameras:
    """n cameras around +Z looking at the origin, alternating 5 and 25 deg elevation."""
    az = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n) + 0.3
    el = torch.tensor([math.radians(5.0 if i % 2 else 25.0) for i in range(n)], dtype=torch.float64)
    eyes = distance * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    f = size / 2 / math.tan(math.radians(hfov_deg) / 2)
    intrinsics = torch.tensor([f, f, size / 2, size / 2], dtype=torch.float64).expand(n, 4)
    return Cameras(look_at(eyes, torch.zeros_like(eyes)).float(), intrinsics.float().clone(), size, size)


def sphere_views(cameras: Cameras, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-cast a sphere at the origin, red where x > 0 and blue where x < 0, on white ->
    images [V, 3, H, W], masks [V, 1, H, W] (pixel-centre hit test)."""
    origins, dirs = cameras.rays()  # [V, H, W, 3]
    b = (origins * dirs).sum(-1)
    disc = b**2 - (origins**2).sum(-1) + radius**2
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    x = (origins + t[..., None] * dirs)[..., 0]
    red, blue = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9])
    colour = torch.where((x > 0)[..., None], red, blue)
    images = torch.where(hit[..., None], colour, torch.ones(3)).permute(0, 3, 1, 2).contiguous()
    return images, hit[:, None].float()


def test_visual_hull_of_a_sphere_is_conservative_tight_and_coloured_by_projection():
    cameras, radius = ring_cameras(6), 0.5
    images, masks = sphere_views(cameras, radius)
    hull = visual_hull_gaussians(images, masks, cameras, grid=64, bound=1.0)
    voxel = 2.0 / 64
    distance = hull.means.norm(dim=-1)
    # Conservative: the carved shape contains the sphere, so its surface voxels lie outside it, up to the
    # discretisation: a surface voxel's empty neighbour is up to sqrt(3) voxels away, and points within
    # about a pixel (0.03 here) of the limb may fall on a background pixel. From 6 views it is not much
    # larger than the sphere.
    assert distance.min() > radius - math.sqrt(3) * voxel - 0.03
    assert distance.max() < 1.35 * radius
    # Coloured by projection: voxels well on the +x side are red, on the -x side blue (except some of the
    # hull's phantom volume beyond the sphere, which projects onto the far side's colour; a wrong pixel
    # lookup would give about half).
    colours, x = hull.colors, hull.means[:, 0]
    assert (colours[x > 0.25, 0] > 0.8).float().mean() > 0.85
    assert (colours[x < -0.25, 2] > 0.8).float().mean() > 0.85
    # Rendered back into the input views, the hull covers the sphere's silhouette.
    out = render(hull, cameras, SIZE, SIZE)
    covered = (out.alphas > 0.5) & (masks > 0.5)
    assert covered.sum() / (masks > 0.5).sum() > 0.97


def test_hull_depths_move_foreground_points_into_the_hull_never_farther_from_the_surface():
    cameras, radius, span = ring_cameras(6), 0.5, 1.8
    _, masks = sphere_views(cameras, radius)
    origins, dirs = (x[0].reshape(-1, 3) for x in cameras[:1].rays())
    hit = masks[0, 0].reshape(-1) > 0.5
    o, d = origins[hit], dirs[hit]
    b = (o * d).sum(-1)
    t_surface = -b - (b**2 - (o**2).sum(-1) + radius**2).sqrt()  # the sphere point each ray sees
    g = torch.Generator().manual_seed(0)
    depths = -b + (torch.rand(len(o), generator=g) * 2 - 1) * 1.5  # around the point nearest the origin
    new, met = hull_depths(o, d, depths, span, masks, cameras, chunk=100)
    assert met.all()
    inside = lambda t: project_to_masks(o + t[:, None] * d, masks, cameras, HULL_DEPTH_DILATION)[0].all(0)
    was_inside = inside(depths)
    assert was_inside.any() and (~was_inside).any(), "the test needs points both inside and outside"
    assert inside(new).all()
    assert torch.equal(new[was_inside], depths[was_inside])  # a point already in the hull stays
    # Along a ray the hull of a sphere is one interval holding the surface point: moving into it brings a
    # point no farther from that point, up to the sampling step.
    step = 2 * span / (HULL_DEPTH_SAMPLES - 1)
    assert ((new - t_surface).abs() <= (depths - t_surface).abs() + step + 1e-5).all()
    assert (new[~was_inside] - t_surface[~was_inside]).abs().mean() < 0.5 * (depths - t_surface)[~was_inside].abs().mean()
    # A ray that misses the hull keeps its depth.
    corner = origins[:1], dirs[:1], torch.tensor([2.7])
    assert not hit[0]
    missed, corner_met = hull_depths(*corner, span, masks, cameras)
    assert not corner_met.any() and torch.equal(missed, corner[2])


def test_visual_hull_of_empty_masks_is_empty():
    cameras = ring_cameras(4)
    images, masks = torch.ones(4, 3, SIZE, SIZE), torch.zeros(4, 1, SIZE, SIZE)
    assert visual_hull_gaussians(images, masks, cameras, grid=16).num == 0


def test_visual_hull_is_the_same_whatever_the_carving_chunk(monkeypatch):
    cameras = ring_cameras(5)
    images, masks = sphere_views(cameras, 0.45)
    whole = visual_hull_gaussians(images, masks, cameras, grid=40, bound=1.0)
    monkeypatch.setattr(baselines, "CARVE_CHUNK", 777)  # not a divisor of 40^3: a short last chunk
    chunked = visual_hull_gaussians(images, masks, cameras, grid=40, bound=1.0)
    assert whole.num > 100
    for name in ("means", "sh", "log_scales", "quats", "opacity_logits"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name


def _uncovered(gaussians: Gaussians, masks: torch.Tensor, cameras: Cameras) -> float:
    """The fraction of the masks' foreground pixels that the Gaussians render with alpha below 0.5."""
    alphas = render(gaussians, cameras, SIZE, SIZE).alphas
    fg = masks > 0.5
    return ((alphas < 0.5) & fg).sum().item() / fg.sum().item()


def test_hull_fill_covers_only_what_the_gaussians_leave_uncovered():
    cameras, radius, grid = ring_cameras(6), 0.5, 48
    images, masks = sphere_views(cameras, radius)
    voxel = 2.0 / grid
    hull = visual_hull_gaussians(images, masks, cameras, grid=grid, bound=1.0)
    # The -x half of the sphere, as opaque Gaussians with view-dependent colour (SH degree 1).
    left = hull.select(hull.means[:, 0] < 0)
    left = Gaussians(left.means, torch.cat([left.sh, torch.zeros(left.num, 3, 3)], 1), left.log_scales, left.quats,
                     left.opacity_logits)
    assert _uncovered(left, masks, cameras) > 0.1
    fill = hull_fill(left, images, masks, cameras, grid=grid, bound=1.0)
    assert fill.sh_degree == 1 and fill.num > 0
    # Filled: the voxels of the +x half (up to a Gaussian's reach across x = 0), coloured by projection (red).
    assert (fill.means[:, 0] > -2 * voxel).all()
    red = fill.colors[fill.means[:, 0] > 0.25]
    assert (red[:, 0] > red[:, 2]).float().mean() > 0.9 and red[:, 0].mean() > 0.75
    both = Gaussians.cat([left, fill])
    assert _uncovered(both, masks, cameras) < 0.03
    # Nothing is added to Gaussians that already cover every silhouette; everything visible to an empty set.
    full = Gaussians(hull.means, hull.sh, hull.log_scales + math.log(1.5), hull.quats, hull.opacity_logits)
    assert _uncovered(full, masks, cameras) == 0.0
    assert hull_fill(full, images, masks, cameras, grid=grid, bound=1.0).num == 0
    none = hull_fill(left.select(torch.zeros(left.num, dtype=torch.bool)), images, masks, cameras, grid=grid, bound=1.0)
    assert 0.8 * hull.num < none.num <= hull.num  # all but those no view sees front-most (the poles)


def blob_scene(seed: int = 0, n: int = 64) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians.from_activated(
        means=(torch.rand(n, 3, generator=g) - 0.5) * 0.8, colors=torch.rand(n, 3, generator=g),
        scales=torch.full((n, 3), 0.06), quats=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).clone(),
        opacities=torch.full((n,), 0.9))


def test_refine_recovers_a_known_scene_and_generalises_to_an_unseen_view():
    cameras = ring_cameras(7)
    truth = blob_scene()
    with torch.no_grad():
        target = render(truth, cameras, SIZE, SIZE)
    images, masks = target.images, (target.alphas > 0.5).float()
    # Start from the truth with scrambled colours and jittered positions.
    g = torch.Generator().manual_seed(1)
    start = Gaussians(means=truth.means + 0.03 * torch.randn(truth.means.shape, generator=g),
                      sh=truth.sh[torch.randperm(truth.num, generator=g)], log_scales=truth.log_scales,
                      quats=truth.quats, opacity_logits=truth.opacity_logits)
    inputs = list(range(6))
    result = refine(start, images[inputs], masks[inputs], cameras[inputs], steps=80)
    assert len(result.losses) == 81 and result.losses[-1] < 0.3 * result.losses[0]
    assert result.gaussians.num == truth.num and not result.gaussians.means.requires_grad
    with torch.no_grad():
        before = render(start, cameras[[6]], SIZE, SIZE).images
        after = render(result.gaussians, cameras[[6]], SIZE, SIZE).images
    fg = masks[[6]] > 0.5
    assert psnr(after, images[[6]], fg).item() > psnr(before, images[[6]], fg).item() + 3.0


def test_refine_zero_steps_is_the_identity_and_bad_shapes_are_refused():
    cameras = ring_cameras(3)
    scene = blob_scene(n=8)
    images, masks = torch.ones(3, 3, SIZE, SIZE), torch.zeros(3, 1, SIZE, SIZE)
    with pytest.raises(RefineError, match=r"view\(s\) \[0, 1, 2\] have an empty foreground mask"):
        refine(scene, images, masks, cameras, steps=1)
    masks[..., 20:30, 20:30] = 1
    result = refine(scene, images, masks, cameras, steps=0)
    assert len(result.losses) == 1 and torch.equal(result.gaussians.means, scene.means)
    with pytest.raises(AssertionError, match="masks"):
        refine(scene, images, masks[:2], cameras, steps=1)
    with pytest.raises(AssertionError, match="cameras do not match"):
        refine(scene, images, masks, cameras[:2], steps=1)


def test_carve_keeps_points_on_every_silhouette_and_drops_the_rest():
    cameras, radius = ring_cameras(6), 0.5
    _, masks = sphere_views(cameras, radius)
    g = torch.Generator().manual_seed(2)
    directions = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=-1)
    inner = directions * 0.45  # inside the sphere: on every silhouette
    outer = directions * 1.0  # twice the radius: beyond the sphere's 6-view hull (< 1.35 r, see above)
    eye = cameras.centers[0]
    near_camera = eye * torch.linspace(0.3, 0.7, 5)[:, None]  # on camera 0's optical axis: only view 0 agrees
    points = torch.cat([inner, outer, near_camera])
    scene = Gaussians.from_activated(points, torch.rand(len(points), 3, generator=g), torch.full((len(points), 3), 0.01),
                                     torch.tensor([1.0, 0, 0, 0]).expand(len(points), 4).clone(),
                                     torch.full((len(points),), 0.9))
    kept = carve(scene, masks, cameras, dilation=0)
    torch.testing.assert_close(kept.means, inner)


def test_carve_dilates_the_masks_by_whole_pixels():
    camera = ring_cameras(1)
    masks = torch.zeros(1, 1, SIZE, SIZE)
    masks[..., 20:28, 20:28] = 1.0  # columns 20..27
    origins, dirs = camera.rays()  # [1, H, W, 3], through pixel centres
    points = origins[0, 24, [27, 29, 30]] + 2.7 * dirs[0, 24, [27, 29, 30]]  # 0, 2 and 3 px right of the mask
    scene = Gaussians.from_activated(points, torch.rand(3, 3), torch.full((3, 3), 0.01),
                                     torch.tensor([1.0, 0, 0, 0]).expand(3, 4).clone(), torch.full((3,), 0.9))
    assert carve(scene, masks, camera, dilation=0).num == 1
    torch.testing.assert_close(carve(scene, masks, camera, dilation=2).means, points[:2])
    assert carve(scene, masks, camera, dilation=3).num == 3
    assert dilation_px(64, 64) == 2 and dilation_px(384, 512) == 16 and dilation_px(16, 16) == 1


def test_refine_carves_floaters_that_reproduce_an_input_view():
    """Copies of the scene pulled toward input camera 0 along its rays look right from camera 0 (they
    cover their originals) but float in the other views; carving drops exactly them, before refining."""
    cameras = ring_cameras(7)
    truth = blob_scene()
    with torch.no_grad():
        target = render(truth, cameras, SIZE, SIZE)
    images, masks = target.images, (target.alphas > 0.5).float()
    eye = cameras.centers[0]
    floaters = Gaussians(means=eye + 0.4 * (truth.means - eye), sh=truth.sh, log_scales=truth.log_scales + math.log(0.4),
                         quats=truth.quats, opacity_logits=truth.opacity_logits)
    inputs = list(range(6))
    silhouettes = (masks[inputs], cameras[inputs])
    start = Gaussians.cat([truth, floaters])
    result = refine(start, images[inputs], masks[inputs], cameras[inputs], steps=0, silhouettes=silhouettes)
    assert result.carved == (floaters.num, 0)
    torch.testing.assert_close(result.gaussians.means, truth.means)
    with pytest.raises(RefineError, match="none of the 128 Gaussians lies on every input silhouette"):
        refine(start, images[inputs], masks[inputs], cameras[inputs], steps=1,
               silhouettes=(torch.zeros_like(masks[inputs]), cameras[inputs]))
