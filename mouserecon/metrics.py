"""Image metrics shared by training validation, the training losses and `mouserecon eval`.

Images are float in [0, 1], `[..., 3, H, W]`; masks `[..., 1, H, W]`, bool or float weights in [0, 1]
(1 = foreground, from the ground truth). Every per-view function returns one value per image, `[...]`.

Definitions (the protocol records `describe_metrics()`):
- PSNR = -10 log10(MSE), data range 1. Bit-identical images give +inf, reported as inf, never capped:
  in an evaluation of renders it means GT was compared with itself, which must stay visible.
- SSIM: Gaussian window 11, sigma 1.5, K = (0.01, 0.03), data range 1 (`SSIM`, also the training
  loss's setting); whole-image SSIM is pytorch-msssim's `ssim` per image (mean over the "valid"
  positions where the window fits, i.e. a border of `SSIM.radius` px is not a centre).
- Foreground ("_fg") twins, because ~95-98% of each image is white background (DESIGN.md §1): both
  images are composited onto white outside the mask (`rgb * m + 1 - m`), then the per-pixel squared
  error / SSIM map / LPIPS spatial map is averaged over mask pixels only. Compositing makes them
  exactly independent of pixels outside the mask (LPIPS' receptive field is ~200 px, SSIM's 11 px),
  averaging over the mask keeps the background from diluting them, and the mask comes from the
  ground truth, so every model is scored on the same pixels; silhouette errors are `iou`'s job.
  Masked SSIM averages the map over mask pixels at least `SSIM.radius` px inside the image and is
  clamped to [0, 1] (DESIGN.md §1). Masked PSNR uses the MSE over mask pixels (x 3 channels).
- An empty mask gives NaN and `empty_mask = True` for every "_fg" metric, never 0 or inf.
- IoU = |rendered alpha > 0.5  and  GT mask| / |union|; NaN when both are empty.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np
import pytorch_msssim
import torch
from torch import Tensor

from mouserecon import render_cpp
from mouserecon.lpips_weights import build_lpips

if TYPE_CHECKING:  # lpips (and the scipy it imports) loads only when an LPIPS net is built
    import lpips

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5  # rendered alpha above this is foreground
SSIM_SOURCE = Path(__file__).parent / "csrc" / "ssim_cpu.cpp"


@dataclass(frozen=True)
class SsimSettings:
    """The one SSIM configuration used by validation, `eval` and the training SSIM loss."""

    data_range: float = 1.0
    win_size: int = 11
    win_sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03

    @property
    def radius(self) -> int:
        return self.win_size // 2

    @property
    def constants(self) -> tuple[float, float]:
        """SSIM's stabilisers (c1, c2) = ((k1 L)^2, (k2 L)^2), L the data range."""
        return (self.k1 * self.data_range) ** 2, (self.k2 * self.data_range) ** 2

    def msssim_kwargs(self) -> dict:
        """Keyword arguments for `pytorch_msssim.ssim` / `SSIM` (add `size_average`)."""
        return {"data_range": self.data_range, "win_size": self.win_size, "win_sigma": self.win_sigma,
                "K": (self.k1, self.k2)}


SSIM = SsimSettings()


@dataclass(frozen=True)
class MaskSpec:
    """Where the foreground mask comes from; part of the evaluation protocol.

    source "alpha": foreground = GT alpha > threshold (0.5 unless stated).
    source "near_white": foreground = some channel of the GT RGB < threshold, i.e. background is
    a pixel whose three channels are all >= threshold (state it, e.g. 0.95 = 242/255; white fur
    is then background, so prefer alpha whenever the data has it).
    """

    source: Literal["alpha", "near_white"] = "alpha"
    threshold: float = 0.5

    def __post_init__(self):
        if self.source not in ("alpha", "near_white"):
            raise ValueError(f"mask source must be 'alpha' or 'near_white', got {self.source!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1), got {self.threshold}")

    def describe(self) -> str:
        return f"alpha>{self.threshold:g}" if self.source == "alpha" else f"min(rgb)<{self.threshold:g}"

    def mask(self, gt: Tensor, gt_alpha: Tensor | None = None) -> Tensor:
        """Boolean foreground mask [..., 1, H, W] from gt [..., 3, H, W] (and gt_alpha [..., 1, H, W])."""
        if self.source == "alpha":
            if gt_alpha is None:
                raise ValueError("mask source 'alpha' needs the ground-truth alpha (RGB-only data: use near_white)")
            assert gt_alpha.shape == (*gt.shape[:-3], 1, *gt.shape[-2:]), f"alpha {tuple(gt_alpha.shape)}"
            return gt_alpha > self.threshold
        return gt.amin(dim=-3, keepdim=True) < self.threshold


def describe_metrics() -> str:
    """One line naming every metric setting, for the evaluation protocol."""
    return (f"psnr(range=1,inf_if_identical) ssim(win={SSIM.win_size},sigma={SSIM.win_sigma},K=({SSIM.k1},"
            f"{SSIM.k2}),range={SSIM.data_range}) fg=composite_white+mask_mean,ssim_fg_clamp01 "
            f"iou(alpha>{IOU_THRESHOLD})")


def _check_pair(pred: Tensor, gt: Tensor, mask: Tensor | None) -> None:
    assert pred.shape == gt.shape and pred.shape[-3] == 3, f"pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}"
    if mask is not None:
        assert mask.shape == (*pred.shape[:-3], 1, *pred.shape[-2:]), (
            f"mask {tuple(mask.shape)} must be [..., 1, H, W] for images {tuple(pred.shape)}")


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of values [..., C, h, w] over channels and mask pixels -> [...].

    mask [..., 1, h, w] (bool, or float weights in [0, 1]) or None for all pixels. NaN where the mask
    is empty. Differentiable in `values`.
    """
    if mask is None:
        return values.mean(dim=(-3, -2, -1))
    assert mask.shape == (*values.shape[:-3], 1, *values.shape[-2:]), (
        f"mask {tuple(mask.shape)} does not match values {tuple(values.shape)}")
    weights = mask.to(values.dtype)
    num = (values * weights).sum(dim=(-3, -2, -1))
    den = weights.sum(dim=(-3, -2, -1)) * values.shape[-3]
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(values.dtype).tiny), torch.nan)


def composite_white(images: Tensor, mask: Tensor) -> Tensor:
    """images [..., 3, H, W] over white outside mask [..., 1, H, W]: rgb * m + (1 - m)."""
    m = mask.to(images.dtype)
    return images * m + (1 - m)


def psnr(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """PSNR in dB [...] (data range 1), over the whole image or the mask pixels; +inf if identical."""
    _check_pair(pred, gt, mask)
    mse = masked_mean((pred.double() - gt.double()) ** 2, mask)
    return torch.where(mse == 0, math.inf, -10 * torch.log10(mse))


def _gaussian_window(settings: SsimSettings, device, dtype) -> Tensor:
    # float64 then cast: for float64 inputs the map then equals scikit-image's to ~1e-15 (pytorch-msssim
    # builds it in float32, which moves SSIM by up to ~3e-6).
    coords = torch.arange(settings.win_size, dtype=torch.float64) - settings.win_size // 2
    g = torch.exp(-(coords**2) / (2 * settings.win_sigma**2))
    return (g / g.sum()).to(device=device, dtype=dtype)  # [win]


def _valid_filter_matrix(window: Tensor, n: int) -> Tensor:
    """The "valid" 1-D filter by `window` [k] of a length-n signal as a matrix [n - k + 1, n] (row j holds the
    window at columns j..j + k - 1): on the CPU a matmul is several times faster than a 3-group conv2d."""
    k = window.numel()
    columns = torch.arange(n - k + 1, device=window.device)[:, None] + torch.arange(k, device=window.device)
    matrix = torch.zeros(n - k + 1, n, device=window.device, dtype=window.dtype)
    return matrix.scatter_(1, columns, window.expand(n - k + 1, k))


def _check_ssim_size(images: Tensor, settings: SsimSettings) -> None:
    h, w = images.shape[-2:]
    if min(h, w) < settings.win_size:
        raise ValueError(f"SSIM needs images of at least {settings.win_size} px, got {h}x{w}")


def ssim_map(pred: Tensor, gt: Tensor, settings: SsimSettings = SSIM) -> Tensor:
    """Channel-mean SSIM map [..., 1, H - 2r, W - 2r] at the "valid" centres (r = settings.radius).

    Entry (i, j) belongs to pixel (i + r, j + r). Its mean equals `pytorch_msssim.ssim` per image.
    Differentiable in pred (and in gt, through the torch implementation). CPU float tensors whose gt needs
    no gradient go through the compiled kernel (`csrc/ssim_cpu.cpp`: the blurs as 11-tap filters, an
    analytic backward; several times faster than the matmuls), everything else through `ssim_map_torch`.
    """
    _check_pair(pred, gt, None)
    _check_ssim_size(pred, settings)
    h, w = pred.shape[-2:]
    if not _compiled_ssim_takes(pred, gt):
        return ssim_map_torch(pred, gt, settings)
    window = _gaussian_window(settings, pred.device, pred.dtype)
    planes = _SsimCpp.apply(pred.reshape(-1, h, w).contiguous(), gt.reshape(-1, h, w).contiguous(), window,
                            *settings.constants)
    smap = planes.reshape(-1, 3, *planes.shape[-2:]).mean(dim=1, keepdim=True)
    return smap.reshape(*pred.shape[:-3], 1, *smap.shape[-2:])


def ssim_map_torch(pred: Tensor, gt: Tensor, settings: SsimSettings = SSIM) -> Tensor:
    """`ssim_map` in plain torch (any device and dtype, autograd for both images): the reference."""
    h, w = pred.shape[-2:]
    batch = pred.shape[:-3]
    x, y = pred.reshape(-1, 3, h, w), gt.reshape(-1, 3, h, w)  # [n, 3, H, W]
    g = _gaussian_window(settings, x.device, x.dtype)
    rows, cols = _valid_filter_matrix(g, h), _valid_filter_matrix(g, w)  # [h', H], [w', W]

    def blur(t: Tensor) -> Tensor:  # separable "valid" Gaussian filter, per channel, as two matmuls
        return rows @ t @ cols.T

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = settings.constants
    ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * ((2 * cov + c2) / (var_x + var_y + c2))
    return ssim.mean(dim=1, keepdim=True).reshape(*batch, 1, *ssim.shape[-2:])  # [..., 1, h', w']


@functools.cache
def ssim_kernel() -> ModuleType | None:
    """The compiled `csrc/ssim_cpu.cpp` (built at first use, as the renderer's kernel), or None, logged once,
    where it does not build (SSIM then runs as `ssim_map_torch`)."""
    ext = render_cpp.build(SSIM_SOURCE)
    if isinstance(ext, render_cpp.ExtensionBuildError):
        log.warning("compiled SSIM unavailable, computing SSIM with torch matmuls instead: %s", ext)
        return None
    return ext


def _compiled_ssim_takes(pred: Tensor, gt: Tensor) -> bool:
    """Whether `ssim_map` runs the compiled kernel: CPU, one float dtype, no gradient wanted for gt."""
    if pred.device.type != "cpu" or gt.device.type != "cpu" or pred.dtype != gt.dtype:
        return False
    if pred.dtype not in (torch.float32, torch.float64) or (torch.is_grad_enabled() and gt.requires_grad):
        return False
    return ssim_kernel() is not None


class _SsimCpp(torch.autograd.Function):
    """x, y [P, H, W] (planes), window [k] -> per-plane SSIM map [P, H - k + 1, W - k + 1]; gradient for x."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, window: Tensor, c1: float, c2: float) -> Tensor:
        smap, stats = ssim_kernel().ssim_forward(x, y, window, c1, c2)
        ctx.save_for_backward(x, y, window, stats)
        ctx.constants = (c1, c2)
        return smap

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, y, window, stats = ctx.saved_tensors
        grad_x = ssim_kernel().ssim_backward(x, y, window, stats, grad.contiguous(), *ctx.constants)
        return grad_x, None, None, None, None


def ssim(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """SSIM [...]: whole image (pytorch-msssim, unclamped) or masked (composited, map mean, clamped)."""
    _check_pair(pred, gt, mask)
    _check_ssim_size(pred, SSIM)
    if mask is None:
        h, w = pred.shape[-2:]
        flat = pytorch_msssim.ssim(pred.reshape(-1, 3, h, w), gt.reshape(-1, 3, h, w), size_average=False,
                                   **SSIM.msssim_kwargs())  # [n]
        return flat.reshape(pred.shape[:-3])
    r = SSIM.radius
    smap = ssim_map(composite_white(pred, mask), composite_white(gt, mask))
    return masked_mean(smap, mask[..., r:-r, r:-r]).clamp(0, 1)


def lpips_model(net: str = "alex", device: torch.device | str = "cpu") -> lpips.LPIPS:
    """The LPIPS v0.1 network with real ImageNet backbone weights (see `lpips_weights`)."""
    return build_lpips(net, device)


def lpips_distance(model: lpips.LPIPS, pred: Tensor, gt: Tensor, mask: Tensor | None = None,
                   chunk: int = 8) -> Tensor:
    """LPIPS [...]: the standard whole-image value, or with a mask the spatial map (lpips
    `spatial=True`) of the white-composited images averaged over mask pixels. `chunk` images per pass."""
    _check_pair(pred, gt, mask)
    h, w = pred.shape[-2:]
    if mask is not None:
        pred, gt = composite_white(pred, mask), composite_white(gt, mask)
    x, y = pred.reshape(-1, 3, h, w), gt.reshape(-1, 3, h, w)  # [n, 3, H, W]
    spatial = mask is not None
    was_spatial = model.spatial
    model.spatial = spatial  # lpips reads this flag in forward; restored below
    try:
        out = torch.cat([model(x[i:i + chunk], y[i:i + chunk], normalize=True) for i in range(0, len(x), chunk)])
    finally:
        model.spatial = was_spatial
    if spatial:  # out [n, 1, H, W]
        return masked_mean(out.reshape(*pred.shape[:-3], 1, h, w), mask)
    return out.reshape(pred.shape[:-3])  # from [n, 1, 1, 1]


def foreground_iou(alpha: Tensor, mask: Tensor, threshold: float = IOU_THRESHOLD) -> Tensor:
    """IoU [...] of rendered alpha [..., 1, H, W] > threshold vs the GT mask [..., 1, H, W]; NaN if both empty."""
    assert alpha.shape == mask.shape and alpha.shape[-3] == 1, f"alpha {tuple(alpha.shape)} vs mask {tuple(mask.shape)}"
    a, m = alpha > threshold, mask > 0.5
    inter = (a & m).sum(dim=(-3, -2, -1)).double()
    union = (a | m).sum(dim=(-3, -2, -1)).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.nan)


@dataclass(frozen=True)
class ViewMetrics:
    """Metrics of a batch of views; every field has the batch shape [...] (e.g. [S, V]), float64.

    psnr/ssim/lpips: whole image. *_fg: foreground only (NaN where `empty_mask`). iou: rendered
    alpha vs GT mask. fg_fraction: share of pixels in the mask. lpips*/iou are None when not computed.
    """

    psnr: Tensor
    ssim: Tensor
    psnr_fg: Tensor
    ssim_fg: Tensor
    fg_fraction: Tensor
    empty_mask: Tensor  # bool
    iou: Tensor | None = None
    lpips: Tensor | None = None
    lpips_fg: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def stack(items: list[ViewMetrics], dim: int = 0) -> ViewMetrics:
        """Stack per-sample results (each [V]) into one [S, V]; all must have the same fields."""
        names = [set(m.as_dict()) for m in items]
        if any(n != names[0] for n in names):
            raise ValueError(f"cannot stack ViewMetrics with different fields: {names}")
        return ViewMetrics(**{k: torch.stack([getattr(m, k) for m in items], dim) for k in names[0]})


@torch.no_grad()
def view_metrics(pred: Tensor, gt: Tensor, mask: Tensor, pred_alpha: Tensor | None = None,
                 lpips_net: lpips.LPIPS | None = None) -> ViewMetrics:
    """All metrics of rendered views vs ground truth.

    pred, gt [..., 3, H, W] in [0, 1] (checked, 1e-4 tolerance, then clamped); mask [..., 1, H, W]
    GT foreground (bool or {0, 1}); pred_alpha [..., 1, H, W] rendered alpha for IoU; lpips_net from
    `lpips_model` (None: no LPIPS).
    """
    _check_pair(pred, gt, mask)
    for name, t in (("prediction", pred), ("ground truth", gt)):
        lo, hi = float(t.min()), float(t.max())
        if not (lo >= -1e-4 and hi <= 1 + 1e-4):  # also catches NaN
            raise ValueError(f"{name} images must be in [0, 1], got values in [{lo}, {hi}]")
    pred, gt = pred.clamp(0, 1), gt.clamp(0, 1)
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("the foreground mask must be binary (bool or 0/1); threshold soft alpha with MaskSpec")
    mask = mask.bool()
    fg = mask.double().mean(dim=(-3, -2, -1))
    out = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "psnr_fg": psnr(pred, gt, mask),
           "ssim_fg": ssim(pred, gt, mask), "fg_fraction": fg, "empty_mask": fg == 0}
    if pred_alpha is not None:
        out["iou"] = foreground_iou(pred_alpha, mask)
    if lpips_net is not None:
        out["lpips"] = lpips_distance(lpips_net, pred, gt)
        out["lpips_fg"] = lpips_distance(lpips_net, pred, gt, mask)
    return ViewMetrics(**{k: v if v.dtype == torch.bool else v.double() for k, v in out.items()})


@dataclass(frozen=True)
class MetricSummary:
    """Summary of one metric over [S, V] views. NaN views (empty masks) are left out of mean and
    median and counted in n_nan; +inf PSNRs are kept (the mean is then inf) and counted in n_inf."""

    mean: float
    median: float
    n: int  # views that entered mean and median
    n_nan: int
    n_inf: int
    per_view_index_mean: list[float]  # [V]: mean over samples of each held-out view index


def summarize(metrics: ViewMetrics) -> dict[str, MetricSummary]:
    """{metric name: MetricSummary} for every float field of `metrics` (tensors [S, V])."""
    out = {}
    for name, t in metrics.as_dict().items():
        if t.dtype == torch.bool:
            continue
        assert t.ndim == 2, f"{name}: summarize expects [S, V], got {tuple(t.shape)}"
        a = t.detach().cpu().double().numpy()
        valid = ~np.isnan(a)
        per_view = [float(col[ok].mean()) if ok.any() else math.nan for col, ok in zip(a.T, valid.T)]
        out[name] = MetricSummary(
            mean=float(a[valid].mean()) if valid.any() else math.nan,
            median=float(np.median(a[valid])) if valid.any() else math.nan,
            n=int(valid.sum()), n_nan=int((~valid).sum()), n_inf=int(np.isinf(a).sum()),
            per_view_index_mean=per_view,
        )
    return out
