"""Silhouette carving: the input masks as a hard constraint on where Gaussians may lie.

A point on the mouse projects onto the foreground of every input view (the visual-hull condition).
`project_to_masks` tests points against masks; `visual_hull_gaussians` (baselines) carves a voxel
grid with it, `carve` drops the Gaussians of a reconstruction whose centre fails it, which
refinement does before its first step and after its last (`refine.refine`), and `hull_depths` moves
points along their rays into the hull (a `hull_depth` model's pixel Gaussians, `model.ModelConfig`).

Why before refinement: a pixel-aligned model leaves most of its Gaussians off the silhouettes (the
demo model: 18,900 of 20,482, nearly transparent, away from the mouse); the image losses barely
see them, and refinement grows them into floaters in novel views (the demo model on 8 evaluation
mice, 100 steps: held-out whole-image PSNR 21.0 dB refined as is, 29.0 dB carved first). The masks
are dilated by `dilation_px` so that calibration error and Gaussians on the rim survive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mouserecon.cameras import Cameras
from mouserecon.gaussians import Gaussians

MASK_THRESHOLD = 0.5  # a mask value at or above this is foreground
DILATION_FRACTION = 1 / 32  # carve's mask dilation, as a fraction of the image's longer side (2 px at 64 px)


def dilation_px(height: int, width: int) -> int:
    """carve's default mask dilation in pixels for an image of this size (at least 1)."""
    return max(1, round(DILATION_FRACTION * max(height, width)))


def project_to_masks(points: Tensor, masks: Tensor, cameras: Cameras,
                     dilation: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """points [P, 3], masks [V, 1, H, W] in [0, 1], cameras [V] (same frame) ->
    on_foreground [V, P] (in front of the camera, inside the image, on a pixel whose mask, dilated by
    `dilation` px, is >= MASK_THRESHOLD), flat pixel index y * W + x [V, P] (clamped into the image),
    depth [V, P]. Pixel (x, y) covers [x, x + 1) x [y, y + 1)."""
    v, _, h, w = masks.shape
    assert len(cameras) == v and points.ndim == 2, f"{len(cameras)} cameras, masks {tuple(masks.shape)}"
    if dilation > 0:
        masks = F.max_pool2d(masks, 2 * dilation + 1, stride=1, padding=dilation)
    uv, depth = cameras.to(device=points.device, dtype=points.dtype).project(points.expand(v, -1, -1))
    pixel = uv.floor().long()
    inside = (depth > 0) & (pixel[..., 0] >= 0) & (pixel[..., 0] < w) & (pixel[..., 1] >= 0) & (pixel[..., 1] < h)
    index = pixel[..., 1].clamp(0, h - 1) * w + pixel[..., 0].clamp(0, w - 1)
    foreground = masks.reshape(v, -1).gather(1, index) >= MASK_THRESHOLD
    return inside & foreground, index, depth


def carve(gaussians: Gaussians, masks: Tensor, cameras: Cameras, dilation: int | None = None) -> Gaussians:
    """Keep the Gaussians [N] whose centre is on the foreground of every view (masks [V, 1, H, W] of the
    whole input frames, cameras [V], the Gaussians' frame); dilation None = `dilation_px` of the masks."""
    if dilation is None:
        dilation = dilation_px(*masks.shape[-2:])
    on_foreground, _, _ = project_to_masks(gaussians.means, masks.to(gaussians.means), cameras, dilation)
    return gaussians.select(on_foreground.all(0))


HULL_DEPTH_SAMPLES = 192  # points tested along each ray's depth range
HULL_DEPTH_DILATION = 1  # px; the masks' dilation for the hull test


def hull_depths(origins: Tensor, dirs: Tensor, depths: Tensor, span: float, masks: Tensor, cameras: Cameras,
                chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Move each ray's point into the visual hull of masks [V, 1, H, W] / cameras [V]: rays origins, unit
    dirs [R, 3], depths [R] (the point origin + depth dir) -> new depths [R] and inside [R] (whether the ray
    meets the hull within depth +- span; rays that do not keep their depth). A point already in the hull
    stays; one outside moves to the nearest of HULL_DEPTH_SAMPLES depths in [depth - span, depth + span]
    inside it. The hull contains the true surface point of a foreground ray, so the move never takes a
    point farther from it (up to the sampling step) when the ray crosses the hull once."""
    steps = torch.linspace(-span, span, HULL_DEPTH_SAMPLES, device=depths.device, dtype=depths.dtype)
    out, met = depths.clone(), torch.zeros_like(depths, dtype=torch.bool)
    for start in range(0, len(depths), chunk):
        o, d, t = origins[start:start + chunk], dirs[start:start + chunk], depths[start:start + chunk]
        ts = torch.cat([t[:, None], t[:, None] + steps], 1)  # [r, 1 + S], the point itself first
        points = o[:, None] + ts[..., None] * d[:, None]  # [r, 1 + S, 3]
        inside, _, _ = project_to_masks(points.reshape(-1, 3), masks, cameras, HULL_DEPTH_DILATION)
        inside = inside.all(0).reshape(ts.shape)
        distance = torch.where(inside, (ts - t[:, None]).abs(), torch.full_like(ts, float("inf")))
        best = distance.argmin(1)
        out[start:start + chunk] = torch.where(inside.any(1), ts.gather(1, best[:, None])[:, 0], t)
        met[start:start + chunk] = inside.any(1)
    return out, met
