"""Metrics against closed forms and an independent implementation (scikit-image).

scikit-image filters with reflect padding over the whole image and then averages the SSIM map over
the image cropped by (win_size - 1) / 2 = 5 px; pytorch-msssim uses a "valid" convolution. Both use
the same 11-tap Gaussian (sigma 1.5; skimage truncates at 3.5 sigma -> 11 taps), so the cropped
skimage map equals our map entry for entry (float64: ~1e-15), and the image means agree (to ~1e-6:
pytorch-msssim builds its window in float32); we compare exactly that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_msssim
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mouserecon.metrics import (
    SSIM,
    MaskSpec,
    ViewMetrics,
    foreground_iou,
    masked_mean,
    psnr,
    ssim,
    SsimSettings,
    ssim_map,
    ssim_map_torch,
    summarize,
    view_metrics,
)


def _smooth_images(n: int, h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    """Structured test images in [0, 1]: low-frequency colour fields plus texture."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=dtype), torch.linspace(0, 1, w, dtype=dtype), indexing="ij")
    phases = torch.rand(n, 3, 1, 1, dtype=dtype) * 6
    base = 0.5 + 0.3 * torch.sin(6 * xx + phases) * torch.cos(4 * yy - phases)
    return (base + 0.1 * torch.rand(n, 3, h, w, dtype=dtype)).clamp(0, 1)


def _sk_ssim(x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    """skimage SSIM of one image pair [3, H, W] with the paper's Gaussian settings: (mean, map [H, W, 3])."""
    return structural_similarity(
        x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=2, full=True)


@pytest.mark.parametrize("c", [0.25, 0.1, 0.01])
def test_psnr_constant_offset_closed_form(c):
    gt = torch.full((2, 3, 16, 20), 0.4)
    expected = -10 * math.log10(c**2)
    assert torch.allclose(psnr(gt + c, gt), torch.full((2,), expected, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(psnr(gt - c, gt), torch.full((2,), expected, dtype=torch.float64), atol=1e-4)


def test_psnr_gaussian_noise():
    sigma = 0.05
    gt = torch.full((3, 256, 256), 0.5, dtype=torch.float64)
    pred = gt + sigma * torch.randn_like(gt)  # stays inside [0, 1] (10 sigma)
    # MSE estimates sigma^2 with relative std sqrt(2 / N) = 0.3% -> 0.014 dB
    assert abs(float(psnr(pred, gt)) - (-10 * math.log10(sigma**2))) < 0.05


def test_psnr_identical_is_inf_and_counted():
    x = torch.rand(2, 3, 16, 16)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.isinf(psnr(x, x, mask)).all()
    s = summarize(view_metrics(x[None], x[None], mask[None]))["psnr"]
    assert s.n_inf == 2 and math.isinf(s.mean) and s.n == 2


def test_ssim_identical_is_one():
    x = _smooth_images(2, 32, 40, torch.float32)
    mask = torch.zeros(2, 1, 32, 40, dtype=torch.bool)
    mask[..., 8:24, 10:30] = True
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert torch.allclose(ssim(x, x, mask), torch.ones(2, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 1, 22, 30), atol=1e-5)


def test_ssim_map_mean_equals_pytorch_msssim():
    x = _smooth_images(6, 48, 64, torch.float32)
    y = (x + 0.08 * torch.randn_like(x)).clamp(0, 1)
    ref = pytorch_msssim.ssim(x, y, data_range=1.0, win_size=11, win_sigma=1.5, size_average=False)  # [6]
    assert torch.allclose(masked_mean(ssim_map(x, y), None), ref, atol=1e-6)
    # batch dims [..] are kept: [2, 3, 3, H, W] -> [2, 3]
    assert torch.allclose(ssim(x.reshape(2, 3, 3, 48, 64), y.reshape(2, 3, 3, 48, 64)), ref.reshape(2, 3), atol=1e-6)
    assert SSIM.msssim_kwargs() == {"data_range": 1.0, "win_size": 11, "win_sigma": 1.5, "K": (0.01, 0.03)}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("settings", [SSIM, SsimSettings(win_size=7, win_sigma=1.0)], ids=["11 taps", "7 taps"])
def test_compiled_ssim_map_and_gradient_equal_the_torch_reference(dtype, tol, settings):
    # The CPU goes through csrc/ssim_cpu.cpp (11 taps: fixed at compile time, other windows at run time);
    # the torch matmul implementation in float64 (itself checked against scikit-image below) is the
    # reference. float32 loses ~1.5e-5 to cancellation in var = E[x^2] - mu^2, the torch path as much.
    x = _smooth_images(4, 37, 45).reshape(2, 2, 3, 37, 45).requires_grad_()
    y = (x.detach() + 0.1 * torch.randn_like(x)).clamp(0, 1)
    xd = x.detach().to(dtype).requires_grad_()
    got, ref = ssim_map(xd, y.to(dtype), settings), ssim_map_torch(x, y, settings)
    assert got.dtype == dtype and got.shape == ref.shape == (2, 2, 1, 38 - settings.win_size, 46 - settings.win_size)
    assert (got.double() - ref).abs().max() < tol
    weights = torch.randn_like(ref)
    (grad_got,) = torch.autograd.grad(got, xd, weights.to(dtype))
    (grad_ref,) = torch.autograd.grad(ref, x, weights)
    assert (grad_got.double() - grad_ref).abs().max() < tol * grad_ref.abs().max()


def test_compiled_ssim_gradient_passes_gradcheck():
    x = torch.rand(2, 3, 13, 16, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 3, 13, 16, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ssim_map(t, y), (x,))


def test_ssim_map_gives_the_target_a_gradient_through_torch():
    x, y = torch.rand(2, 3, 16, 16, requires_grad=True), torch.rand(2, 3, 16, 16, requires_grad=True)
    ssim_map(x, y).sum().backward()  # the kernel differentiates pred only: a gt that wants one takes torch
    (grad_y,) = torch.autograd.grad(ssim_map_torch(x, y).sum(), y)
    assert torch.allclose(y.grad, grad_y)


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_ssim_and_psnr_match_skimage(noise):
    x = _smooth_images(2, 40, 52)
    y = (x + noise * torch.randn_like(x)).clamp(0, 1)
    for i in range(2):
        value, smap = _sk_ssim(x[i], y[i])
        r = SSIM.radius
        assert np.abs(smap[r:-r, r:-r].mean(-1) - ssim_map(x[i], y[i])[0].numpy()).max() < 1e-12
        # pytorch-msssim builds its window in float32: ~1e-6 from the float64 reference
        assert abs(float(ssim(x[i], y[i])) - value) < 1e-5
        assert abs(float(psnr(x[i], y[i])) - peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=1)) < 1e-9


def test_masked_ssim_matches_skimage_map_on_composited_images():
    x = _smooth_images(1, 40, 48)[0]
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    mask = torch.zeros(1, 40, 48, dtype=torch.bool)
    mask[:, 3:30, 12:45] = True  # touches the 5-px border band, which has no SSIM centre
    white = lambda t: torch.where(mask, t, torch.ones_like(t))  # noqa: E731
    _, smap = _sk_ssim(white(x), white(y))  # [H, W, 3]
    inside = mask[0].numpy().copy()
    inside[:5], inside[-5:], inside[:, :5], inside[:, -5:] = False, False, False, False
    expected = smap.mean(-1)[inside].mean()
    assert abs(float(ssim(x, y, mask)) - expected) < 1e-12


def test_masked_metrics_ignore_pixels_outside_the_mask():
    gt = _smooth_images(2, 32, 32)
    pred = (gt + 0.05 * torch.randn_like(gt)).clamp(0, 1)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask[..., 10:24, 8:26] = True
    garbage_pred = torch.where(mask, pred, torch.rand_like(pred))
    garbage_gt = torch.where(mask, gt, torch.rand_like(gt))
    for fn in (psnr, ssim):
        assert torch.equal(fn(pred, gt, mask), fn(garbage_pred, garbage_gt, mask))
        assert not torch.allclose(fn(pred, gt), fn(garbage_pred, garbage_gt))


def test_masked_psnr_closed_form():
    gt = torch.full((1, 3, 20, 20), 0.5)
    mask = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 5:15, 2:9] = True
    pred = torch.where(mask, gt + 0.1, gt - 0.4)  # error 0.1 inside, 0.4 outside
    assert abs(float(psnr(pred, gt, mask)) - 20.0) < 1e-4
    fg = mask.double().mean()
    whole = -10 * math.log10(0.01 * fg + 0.16 * (1 - fg))
    assert abs(float(psnr(pred, gt)) - whole) < 1e-4


def test_masked_ssim_is_clamped_to_unit_interval():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    pattern = (0.5 + 0.4 * torch.sin(xx) * torch.sin(yy)).expand(3, 32, 32)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:24] = True
    inverted = 1 - pattern  # anti-correlated structure: raw SSIM < 0
    raw = masked_mean(ssim_map(torch.where(mask, inverted, 1.0), torch.where(mask, pattern, 1.0)), mask[:, 5:-5, 5:-5])
    assert float(raw) < -0.2  # the case really needs the clamp
    assert float(ssim(inverted, pattern, mask)) == 0.0
    assert float(ssim(inverted, pattern)) < 0  # whole-image SSIM is reported unclamped (pytorch-msssim)


def test_iou_closed_form_and_threshold():
    alpha = torch.zeros(1, 10, 10)
    alpha[:, 0:4, 0:5] = 0.9  # 20 px
    alpha[:, 4, 0:5] = 0.5  # exactly the threshold: background
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[:, 2:6, 0:5] = True  # 20 px, overlap rows 2-3 -> 10 px
    assert abs(float(foreground_iou(alpha, mask)) - 10 / 30) < 1e-12
    alpha[:, 4, 0:5] = 0.51  # now foreground: overlap 15, union 30
    assert abs(float(foreground_iou(alpha, mask)) - 15 / 30) < 1e-12


def test_empty_mask_gives_nan_and_flag():
    gt = _smooth_images(2, 24, 24, torch.float32)
    pred = (gt + 0.05).clamp(0, 1)
    mask = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    mask[0, :, 6:18, 6:18] = True
    alpha = torch.zeros(2, 1, 24, 24)
    alpha[0] = mask[0].float()
    m = view_metrics(pred, gt, mask, pred_alpha=alpha)
    assert m.empty_mask.tolist() == [False, True]
    for name in ("psnr_fg", "ssim_fg", "iou"):
        value = getattr(m, name)
        assert torch.isfinite(value[0]) and torch.isnan(value[1]), name
    assert torch.isfinite(m.psnr).all() and torch.isfinite(m.ssim).all()
    alpha[1, :, 0:3, 0:3] = 1.0  # rendered foreground where GT has none: IoU is a real 0
    assert float(view_metrics(pred, gt, mask, pred_alpha=alpha).iou[1]) == 0.0
    s = summarize(ViewMetrics.stack([m, m]))
    assert (s["psnr_fg"].n, s["psnr_fg"].n_nan) == (2, 2)
    assert math.isnan(s["psnr_fg"].per_view_index_mean[1])
    assert s["psnr_fg"].mean == pytest.approx(float(m.psnr_fg[0]))


def test_summarize_statistics():
    values = torch.tensor([[1.0, 10.0, math.nan], [2.0, 20.0, 5.0], [6.0, 30.0, 7.0]], dtype=torch.float64)
    metrics = ViewMetrics(psnr=values, ssim=values, psnr_fg=values, ssim_fg=values, fg_fraction=values,
                          empty_mask=torch.isnan(values))
    s = summarize(metrics)["psnr"]
    finite = [1, 10, 2, 20, 5, 6, 30, 7]
    assert s.mean == pytest.approx(np.mean(finite)) and s.median == pytest.approx(np.median(finite))
    assert (s.n, s.n_nan, s.n_inf) == (8, 1, 0)
    assert s.per_view_index_mean == pytest.approx([3.0, 20.0, 6.0])


def test_view_metrics_rejects_bad_input():
    x = torch.rand(1, 3, 16, 16)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"prediction images must be in \[0, 1\]"):
        view_metrics(x + 0.5, x, mask)
    with pytest.raises(ValueError, match="ground truth"):
        view_metrics(x, torch.full_like(x, math.nan), mask)
    with pytest.raises(ValueError, match="binary"):
        view_metrics(x, x, torch.full((1, 1, 16, 16), 0.7))
    with pytest.raises(AssertionError, match="mask"):
        view_metrics(x, x, mask[..., :8])
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(x[..., :8], x[..., :8])


def test_mask_spec_sources():
    gt = torch.ones(3, 4, 4)
    gt[:, 1, 1] = torch.tensor([0.96, 0.5, 0.99])  # one dark channel: foreground
    gt[:, 2, 2] = 0.96  # near white: background at threshold 0.95
    alpha = torch.zeros(1, 4, 4)
    alpha[0, 0, 0], alpha[0, 3, 3] = 0.6, 0.5
    assert MaskSpec("near_white", 0.95).mask(gt).nonzero().tolist() == [[0, 1, 1]]
    assert MaskSpec().mask(gt, alpha).nonzero().tolist() == [[0, 0, 0]]
    assert MaskSpec().describe() == "alpha>0.5" and MaskSpec("near_white", 0.95).describe() == "min(rgb)<0.95"
    with pytest.raises(ValueError, match="needs the ground-truth alpha"):
        MaskSpec().mask(gt)
    with pytest.raises(ValueError, match="mask source"):
        MaskSpec("luma", 0.5)
