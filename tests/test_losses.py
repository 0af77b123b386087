"""Training losses against closed forms and the shared metrics, masked and not, with real LPIPS/VGG weights."""

from __future__ import annotations

import pytest
import torch

from mouserecon.lpips_weights import build_lpips, imagenet_features
from mouserecon.metrics import lpips_distance, ssim
from mouserecon.losses import LossSection
from mouserecon.losses import L2Loss, Losses, PerceptualLoss, SSIMLoss


def images(b=2, v=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, v, 3, h, w, generator=g)


def test_l2_closed_form_and_mask():
    gt = torch.zeros(1, 1, 3, 8, 8)
    pred = gt + 0.1
    assert L2Loss()(pred, gt, None).item() == pytest.approx(0.01)
    mask = torch.zeros(1, 1, 1, 8, 8)
    mask[..., :4, :] = 1
    pred[..., 4:, :] = 0.9  # outside the mask: ignored when masked
    assert L2Loss()(pred, gt, mask).item() == pytest.approx(0.01)
    assert L2Loss()(pred, gt, None).item() == pytest.approx((0.01 + 0.81) / 2)


def test_ssim_loss_is_one_minus_the_metric():
    pred, gt = images(seed=1), images(seed=2)
    expected = (1 - ssim(pred, gt).clamp(0, 1)).mean()
    torch.testing.assert_close(SSIMLoss()(pred, gt, None), expected)
    assert SSIMLoss()(gt, gt, None).item() == pytest.approx(0.0, abs=1e-6)


def test_weighted_sum_and_gradients():
    pred, gt = images(seed=1).requires_grad_(), images(seed=2)
    terms = Losses(LossSection(l2=1.0, ssim=0.5))(pred, gt)
    assert set(terms) == {"l2", "ssim", "total"}
    torch.testing.assert_close(terms["total"], terms["l2"] + 0.5 * terms["ssim"])
    terms["total"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_silhouette_loss_closed_form_and_never_masked():
    pred, gt = torch.full((1, 1, 3, 4, 4), 0.5), torch.full((1, 1, 3, 4, 4), 0.5)
    gt_alpha = torch.zeros(1, 1, 1, 4, 4)
    gt_alpha[..., :2, :] = 1  # the top half is foreground
    pred_alpha = torch.full_like(gt_alpha, 0.25)
    losses = Losses(LossSection(l2=1.0, ssim=0.0, alpha=2.0))
    # mean of 8 pixels at (0.25 - 1)^2 and 8 at 0.25^2, all pixels even when the image losses are masked
    expected = (8 * 0.75**2 + 8 * 0.25**2) / 16
    for mask in (None, gt_alpha):
        terms = losses(pred, gt, mask, pred_alpha, gt_alpha)
        assert terms["alpha"].item() == pytest.approx(expected)
        assert terms["total"].item() == pytest.approx(2.0 * expected)
    with pytest.raises(AssertionError, match="alpha loss needs"):
        losses(pred, gt)


def test_lpips_loss_equals_the_eval_metric(vgg_torch_home):
    pred, gt = images(b=1, v=2, h=64, w=64, seed=3), images(b=1, v=2, h=64, w=64, seed=4)
    losses = Losses(LossSection(l2=0.0, ssim=0.0, lpips=1.0))
    expected = lpips_distance(build_lpips("vgg"), pred, gt).mean()
    torch.testing.assert_close(losses(pred, gt)["total"], expected, rtol=1e-5, atol=1e-6)


def test_perceptual_loss_uses_real_vgg16_features_and_respects_the_mask(vgg_torch_home):
    loss = PerceptualLoss()
    reference = imagenet_features("vgg")
    for mine, theirs in zip(loss.features.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(mine, theirs)  # ImageNet weights, not a random init
    gt = images(b=1, v=1, h=64, w=64, seed=5)
    assert loss(gt, gt, None).item() == 0.0
    pred = gt.clone()
    pred[..., 32:, :] = 1.0  # change only the lower half
    mask = torch.zeros(1, 1, 1, 64, 64)
    mask[..., :16, :] = 1  # far from the change: deep layers still see it through their receptive field
    assert loss(pred, gt, None).item() > 0
    assert loss(pred, gt, mask).item() < loss(pred, gt, None).item()
