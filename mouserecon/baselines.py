"""The visual hull, the naive reconstruction a learned model has to beat (`pipeline.HullPredictor`; the flat
background is `pipeline.FlatPredictor`).

- `visual_hull_gaussians`: carve a voxel grid in the model frame with the input masks (a voxel
  survives when it projects inside every input image, in front of the camera, onto a foreground
  pixel), keep the surface voxels, and colour each by projection: the mean input colour over the
  views in which it is the front-most surviving voxel on its pixel (all views where no view sees it).
  One isotropic, nearly opaque Gaussian per surface voxel.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from mouserecon.cameras import Cameras
from mouserecon.carve import project_to_masks
from mouserecon.gaussians import Gaussians

log = logging.getLogger(__name__)

HULL_GRID = 96  # voxels per side
HULL_BOUND = 1.2  # the grid spans [-bound, bound]^3 in the model frame (cameras 2.7 from the origin)
HULL_OPACITY = 0.95
HULL_SCALE = 0.6  # Gaussian sigma in voxel sizes
# In `eval` the hull sees the same inputs as a model trained on crops: each input view cropped to a
# square around its foreground (this margin) from the full-resolution image (`pipeline.HullPredictor`).
HULL_INPUT_CROP = 0.1


def visual_hull_gaussians(images: Tensor, masks: Tensor, cameras: Cameras, grid: int = HULL_GRID,
                          bound: float = HULL_BOUND) -> Gaussians:
    """images [V, 3, H, W], masks [V, 1, H, W], cameras [V] (model frame) -> Gaussians [M] (M may be 0)."""
    v, _, h, w = images.shape
    assert masks.shape == (v, 1, h, w) and len(cameras) == v, f"masks {tuple(masks.shape)}, {len(cameras)} cameras"
    device, voxel = images.device, 2 * bound / grid
    axis = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) * voxel - bound
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # [P, 3]

    on_foreground, index, depth = project_to_masks(points, masks, cameras)  # [V, P] each
    occupied = on_foreground.all(0).reshape(grid, grid, grid)
    interior = -F.max_pool3d(-occupied[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5
    surface = (occupied & ~interior).reshape(-1)  # [P]
    log.info("visual hull: %d of %d voxels occupied, %d on the surface", int(occupied.sum()), grid**3,
             int(surface.sum()))

    index, depth = index[:, surface], depth[:, surface]  # [V, M]
    nearest = torch.full((v, h * w), float("inf"), device=device).scatter_reduce(1, index, depth, "amin")
    visible = depth <= nearest.gather(1, index) + 1.5 * voxel  # [V, M] front-most on its pixel (within a voxel)
    colours = images.reshape(v, 3, -1).gather(2, index[:, None].expand(-1, 3, -1))  # [V, 3, M]
    weights = torch.where(visible.any(0, keepdim=True), visible.float(), torch.ones_like(depth))  # [V, M]
    rgb = (colours * weights[:, None]).sum(0) / weights.sum(0)  # [3, M]
    m = int(surface.sum())
    return Gaussians.from_activated(
        means=points[surface], colors=rgb.T.contiguous().clamp(0.0, 1.0),
        scales=torch.full((m, 3), HULL_SCALE * voxel, device=device),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0], device=device).expand(m, 4).contiguous(),
        opacities=torch.full((m,), HULL_OPACITY, device=device),
    )
