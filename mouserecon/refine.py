"""Test-time refinement: optimise a set of Gaussians against the input views through the renderer.

`refine(gaussians, images, masks, cameras, steps, silhouettes)` runs `steps` Adam steps on every
Gaussian parameter (means, colour SH, log-scales, quaternions, opacity logits) to minimise, over the input
views, L2 + 0.5 (1 - SSIM) on the ground-truth foreground plus the silhouette term L2(rendered
alpha, mask) over all pixels (the training recipe's losses with `masked: true`, `alpha: 1`). The
silhouette term is what keeps the background clean, since the image terms ignore it. After each
step the base (DC) colour is clamped to [0, 1].

With `silhouettes` (the masks and cameras of the whole input frames), the Gaussians whose centre is
off any input silhouette are dropped before the first step and after the last (`carve.carve`): the
image losses cannot see Gaussians that no input view checks, and refinement would spread them into
floaters in novel views. `refine_inputs` is how `eval` and `reconstruct` call it.

Learning rates are per parameter kind, for the model frame (object at the origin, about 1 unit
across, cameras 2.7 away): the 3D Gaussian Splatting paper's rates for a scene of extent ~3, held
constant (refinement runs are short), except colour, 8x faster so that a hundred steps can move a
colour by about half its range, and means and log-scales, 2x faster. Why the geometry rates: on renders
of two mouse meshes through the real rig (256 px, 5 inputs, 3 held-out views), doubling them raised the
held-out silhouette IoU by about 0.02 and whole-image PSNR by 0.6-0.9 dB, for the demo model and the
visual hull alike (the hull's big voxels move and shrink further in 100 steps). The Gaussians' count and
order never change (no densification or pruning during the steps).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mouserecon.errors import MouseReconError
from mouserecon.cameras import Cameras
from mouserecon.carve import carve
from mouserecon.data import Sample
from mouserecon.gaussians import Gaussians, rgb_to_sh_dc
from mouserecon.progress import progress
from mouserecon.render import render
from mouserecon.losses import LossSection
from mouserecon.losses import Losses

log = logging.getLogger(__name__)

LEARNING_RATES = {"means": 1e-3, "sh": 2e-2, "log_scales": 1e-2, "quats": 1e-3, "opacity_logits": 5e-2}
REFINE_LOSS = LossSection(l2=1.0, ssim=0.5, alpha=1.0, masked=True)
DC_RANGE = (rgb_to_sh_dc(torch.tensor(0.0)).item(), rgb_to_sh_dc(torch.tensor(1.0)).item())


@dataclass(frozen=True)
class RefineResult:
    """The refined Gaussians (detached), the loss before every step (`losses[0]`: the start) and the
    counts carved away before and after the steps (0, 0 without silhouettes)."""

    gaussians: Gaussians
    losses: tuple[float, ...]
    seconds: float
    carved: tuple[int, int] = (0, 0)


class RefineError(MouseReconError, ValueError):
    """The inputs cannot be refined against (an input view without foreground)."""


def refine(gaussians: Gaussians, images: Tensor, masks: Tensor, cameras: Cameras, steps: int,
           silhouettes: tuple[Tensor, Cameras] | None = None) -> RefineResult:
    """Optimise gaussians [N] against images [V, 3, H, W] in [0, 1] on white, masks [V, 1, H, W] in
    [0, 1] (the foreground), cameras [V] (same frame and device as the Gaussians) for `steps` steps;
    silhouettes = (masks [W, 1, h, w], cameras [W]) of the whole input frames to carve with, or None."""
    assert steps >= 0, f"steps must be >= 0, got {steps}"
    assert gaussians.means.ndim == 2, f"refine takes one set of Gaussians [N], got means {tuple(gaussians.means.shape)}"
    v, _, h, w = images.shape
    assert masks.shape == (v, 1, h, w), f"masks {tuple(masks.shape)} vs images {tuple(images.shape)}"
    assert len(cameras) == v and (cameras.height, cameras.width) == (h, w), "cameras do not match the images"
    empty = [i for i in range(v) if not (masks[i] > 0.5).any()]
    if empty:
        raise RefineError(f"refine: input view(s) {empty} have an empty foreground mask (is the subject in view?)")
    device = gaussians.device
    num = gaussians.num
    if silhouettes is not None:
        gaussians = carve(gaussians, *silhouettes)
        if gaussians.num == 0:
            raise RefineError(f"refine: none of the {num} Gaussians lies on every input silhouette (do the masks "
                              "and the cameras belong together?)")
    images, masks = images.to(device), masks.to(device, images.dtype)
    params = {f.name: getattr(gaussians, f.name).detach().clone().requires_grad_() for f in fields(Gaussians)}
    optimizer = torch.optim.Adam([{"params": [p], "lr": LEARNING_RATES[name], "name": name} for name, p in params.items()],
                                 eps=1e-15, fused=True)  # one kernel per step: 0.8 -> 0.4 ms of a ~30 ms CPU step
    losses = Losses(REFINE_LOSS).to(device)

    history = []
    start = time.perf_counter()
    bar = progress(total=steps, desc="refine", unit="step")
    for step in range(steps + 1):
        out = render(Gaussians(**params), cameras, h, w)
        terms = losses(out.images, images, masks, out.alphas, masks)
        history.append(terms["total"].item())
        if not torch.isfinite(terms["total"]):
            raise FloatingPointError(f"refinement step {step}: the loss is not finite ({history[-1]})")
        if step == steps:
            break  # the last entry is the loss of the returned Gaussians
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        with torch.no_grad():  # keep the base colour a colour (renders in [0, 1] when the SH degree is 0)
            params["sh"][:, 0].clamp_(DC_RANGE[0], DC_RANGE[1])
        bar.set_postfix(loss=f"{history[-1]:.5f}", refresh=False)
        bar.update(1)
    bar.close()
    if steps:
        log.info("  refine: %d steps, loss %.5f -> %.5f (%.1f s)", steps, history[0], history[-1],
                 time.perf_counter() - start)
    refined = Gaussians(**{name: p.detach() for name, p in params.items()})
    fitted = refined.num
    if silhouettes is not None:
        refined = carve(refined, *silhouettes)
        log.info("  refine: %d Gaussians off the input silhouettes dropped before, %d after", num - fitted,
                 fitted - refined.num)
    return RefineResult(refined, tuple(history), time.perf_counter() - start, (num - fitted, fitted - refined.num))


def refine_inputs(gaussians: Gaussians, whole: Sample, crops: Sample | None, steps: int) -> RefineResult:
    """`refine` a reconstruction against its input views, as it was trained: the whole input frames
    `whole` [V], preceded by the crops [V] a crop model saw (None for a whole-frame model), all in the
    Gaussians' frame and on their device; carved with the whole frames."""
    fit = whole if crops is None else Sample.cat([crops, whole])
    return refine(gaussians, fit.images, fit.masks, fit.cameras, steps, (whole.masks, whole.cameras))
