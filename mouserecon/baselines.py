"""The visual hull, the naive reconstruction a learned model has to beat (`pipeline.HullPredictor`; the flat
background is `pipeline.FlatPredictor`), and the hull as the filler of what a model leaves uncovered.

- `visual_hull_gaussians`: carve a voxel grid in the model frame with the input masks (a voxel
  survives when it projects inside every input image, in front of the camera, onto a foreground
  pixel), keep the surface voxels, and colour each by projection: the mean input colour over the
  views in which it is the front-most surviving voxel on its pixel (all views where no view sees it).
  One isotropic, nearly opaque Gaussian per surface voxel.
- `hull_fill`: the surface voxels of a finer hull (`FILL_GRID`) that some input view sees front-most on a
  pixel that given Gaussians render with alpha below `FILL_ALPHA` there, as the same Gaussians. Why: the
  demo model sees 128 px crops, in which tails, feet and ears are one or two pixels wide, and leaves them
  nearly transparent; scored at 256 px on renders of a real mouse mesh, 4.3 % of the held-out foreground
  rendered with alpha below 0.5 (the hull's: 0.85 %), two thirds of the squared error it had over the hull.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mouserecon.cameras import Cameras
from mouserecon.carve import project_to_masks
from mouserecon.gaussians import Gaussians
from mouserecon.render import render

log = logging.getLogger(__name__)

HULL_GRID = 96  # voxels per side
HULL_BOUND = 1.2  # the grid spans [-bound, bound]^3 in the model frame (cameras 2.7 from the origin)
HULL_OPACITY = 0.95
HULL_SCALE = 0.6  # Gaussian sigma in voxel sizes
# In `eval` the hull sees the same inputs as a model trained on crops: each input view cropped to a
# square around its foreground (this margin) from the full-resolution image (`pipeline.HullPredictor`).
HULL_INPUT_CROP = 0.1
FILL_GRID = 160  # hull_fill's voxels per side (a 2.8 mm voxel of the 96 grid is a mouse tail's width)
FILL_ALPHA = 0.5  # hull_fill: a pixel is uncovered below this alpha (the IoU's foreground threshold)
# ... when the Gaussians are to be refined: the silhouette loss trims what the hull adds off the mouse, while
# the model's faint Gaussians gain coverage slowly (median opacity ~0.03), so more is filled (model card).
REFINE_FILL_ALPHA = 0.8
CARVE_CHUNK = 1 << 20  # grid points per carving step


@dataclass(frozen=True)
class _Surface:
    """The surface voxels [M] of a carved hull: centres [M, 3], colours [M, 3], flat pixel index [V, M]
    and visibility [V, M] (front-most on that pixel, within a voxel) in each view; voxel: the size."""

    points: Tensor
    colours: Tensor
    index: Tensor
    visible: Tensor
    voxel: float


def _carve(images: Tensor, masks: Tensor, cameras: Cameras, grid: int, bound: float) -> _Surface:
    v, _, h, w = images.shape
    assert masks.shape == (v, 1, h, w) and len(cameras) == v, f"masks {tuple(masks.shape)}, {len(cameras)} cameras"
    device, voxel = images.device, 2 * bound / grid
    axis = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) * voxel - bound

    def centres(flat: Tensor) -> Tensor:  # flat voxel indices (i * grid + j) * grid + k -> centres [P, 3]
        return axis[torch.stack([flat // grid**2, flat // grid % grid, flat % grid], -1)]

    occupied = torch.zeros(grid**3, dtype=torch.bool, device=device)
    for start in range(0, grid**3, CARVE_CHUNK):  # view by view on the survivors: most points leave at the first
        flat = torch.arange(start, min(start + CARVE_CHUNK, grid**3), device=device)
        points = centres(flat)
        for i in range(v):
            on_foreground = project_to_masks(points, masks[i:i + 1], cameras[i:i + 1])[0][0]
            flat, points = flat[on_foreground], points[on_foreground]
        occupied[flat] = True
    occupied = occupied.reshape(grid, grid, grid)
    interior = -F.max_pool3d(-occupied[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5
    surface = (occupied & ~interior).reshape(-1).nonzero()[:, 0]  # [M]
    log.info("visual hull: %d of %d voxels occupied, %d on the surface", int(occupied.sum()), grid**3, len(surface))

    points = centres(surface)  # [M, 3]
    _, index, depth = project_to_masks(points, masks, cameras)  # [V, M] each
    nearest = torch.full((v, h * w), float("inf"), device=device).scatter_reduce(1, index, depth, "amin")
    visible = depth <= nearest.gather(1, index) + 1.5 * voxel  # [V, M]
    colours = images.reshape(v, 3, -1).gather(2, index[:, None].expand(-1, 3, -1))  # [V, 3, M]
    weights = torch.where(visible.any(0, keepdim=True), visible.float(), torch.ones_like(depth))  # [V, M]
    rgb = ((colours * weights[:, None]).sum(0) / weights.sum(0)).T.clamp(0.0, 1.0)  # [M, 3]
    return _Surface(points, rgb, index, visible, voxel)


def _gaussians(surface: _Surface, keep: Tensor | None = None, sh_degree: int = 0) -> Gaussians:
    points, colours = surface.points, surface.colours
    if keep is not None:
        points, colours = points[keep], colours[keep]
    m, device = len(points), points.device
    return Gaussians.from_activated(
        means=points, colors=colours.contiguous(), scales=torch.full((m, 3), HULL_SCALE * surface.voxel, device=device),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0], device=device).expand(m, 4).contiguous(),
        opacities=torch.full((m,), HULL_OPACITY, device=device), sh_degree=sh_degree)


def visual_hull_gaussians(images: Tensor, masks: Tensor, cameras: Cameras, grid: int = HULL_GRID,
                          bound: float = HULL_BOUND) -> Gaussians:
    """images [V, 3, H, W], masks [V, 1, H, W], cameras [V] (model frame) -> Gaussians [M] (M may be 0)."""
    return _gaussians(_carve(images, masks, cameras, grid, bound))


def hull_fill(gaussians: Gaussians, images: Tensor, masks: Tensor, cameras: Cameras, grid: int = FILL_GRID,
              bound: float = HULL_BOUND, threshold: float = FILL_ALPHA) -> Gaussians:
    """The hull Gaussians [K] that fill what `gaussians` [N] leave uncovered in the input views (images
    [V, 3, H, W], masks [V, 1, H, W], cameras [V], all in the Gaussians' frame): the surface voxels that some
    view sees front-most on a pixel where the Gaussians render with alpha below `threshold`; with the
    Gaussians' SH degree (higher coefficients zero)."""
    surface = _carve(images, masks, cameras, grid, bound)
    with torch.no_grad():
        alphas = torch.cat([render(gaussians, cameras[i:i + 1], cameras.height, cameras.width).alphas.float()
                            for i in range(len(cameras))])  # [V, 1, H, W]
    uncovered = alphas.reshape(len(cameras), -1).gather(1, surface.index) < threshold  # [V, M]
    keep = (uncovered & surface.visible).any(0)
    log.info("hull fill: %d of %d surface voxels", int(keep.sum()), len(keep))
    return _gaussians(surface, keep, gaussians.sh_degree)
