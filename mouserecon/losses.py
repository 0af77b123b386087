"""Losses for training and refinement: small modules, each returning a scalar; `Losses` weights and sums them.

Every term is computed per image, optionally restricted to the ground-truth foreground, and then
averaged over images, so a batch split across DDP ranks averages to the same loss as one process.
Losses that need pretrained weights (LPIPS, VGG perceptual) are built, and their weights located,
when `Losses` is constructed: a missing file fails at start-up, not mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mouserecon.errors import RecipeError
from mouserecon.metrics import lpips_distance, lpips_model, masked_mean, ssim


@dataclass(frozen=True)
class LossSection:
    """Loss weights (a recipe's `loss` section; refinement uses its own)."""

    l2: float = 1.0
    ssim: float = 0.5
    lpips: float = 0.0
    perceptual: float = 0.0  # VGG19 feature loss (FaceLift's "perceptual")
    alpha: float = 0.0  # silhouette: L2 between the rendered alpha and the ground-truth mask, all pixels
    depth: float = 0.0  # L1 between rendered and ground-truth depth (needs the samples' depth.npz)
    masked: bool = False  # restrict the image losses to the ground-truth foreground

    def __post_init__(self) -> None:
        weights = (self.l2, self.ssim, self.lpips, self.perceptual, self.alpha, self.depth)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights[:4]):
            raise RecipeError(f"loss weights must be >= 0 with at least one image loss > 0, got {weights}")


class L2Loss(nn.Module):
    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor | None) -> Tensor:
        return masked_mean((pred - gt) ** 2, mask).mean()


class SSIMLoss(nn.Module):
    """1 - SSIM, with SSIM (masked or not) clamped to [0, 1] (DESIGN.md §1)."""

    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor | None) -> Tensor:
        return (1 - ssim(pred, gt, mask).clamp(0, 1)).mean()


class LPIPSLoss(nn.Module):
    """LPIPS-vgg (as FaceLift's lpips loss), the same function `eval` reports."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        self.model = lpips_model(net).requires_grad_(False)

    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor | None) -> Tensor:
        return lpips_distance(self.model, pred, gt, mask).mean()


class PerceptualLoss(nn.Module):
    """VGG feature L1 loss (FaceLift's "perceptual"), on torchvision VGG16 ImageNet features."""

    LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)

    def __init__(self):
        super().__init__()
        from mouserecon.lpips_weights import imagenet_features

        self.features = imagenet_features("vgg")[: self.LAYERS[-1] + 1]  # real ImageNet weights, frozen
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[:, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[:, None, None])

    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor | None) -> Tensor:
        x = (torch.cat([pred, gt]).reshape(-1, *pred.shape[-3:]) - self.mean) / self.std  # [2n, 3, h, w]
        n = x.shape[0] // 2
        total = pred.new_zeros(())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.LAYERS:
                diff = (x[:n] - x[n:]).abs().mean(1, keepdim=True)  # [n, 1, h', w']
                m = None if mask is None else nn.functional.interpolate(
                    mask.reshape(-1, *mask.shape[-3:]), size=diff.shape[-2:], mode="area")
                total = total + self.WEIGHTS[self.LAYERS.index(i)] * masked_mean(diff, m).mean()
        return total


def depth_l1(pred: Tensor, gt: Tensor, pred_alpha: Tensor, min_alpha: float = 0.5) -> Tensor:
    """Mean |pred - gt| depth [..., 1, h, w] over the pixels where the ground truth has a surface (gt > 0)
    and the render is mostly opaque (pred_alpha > min_alpha, not differentiated): the rendered depth
    is sum(w z) / alpha, which is unstable where alpha is small, and coverage is the alpha loss's job.
    Averaged per image like the other losses; an image with no such pixel contributes 0."""
    weight = ((gt > 0) & (pred_alpha.detach() > min_alpha)).to(pred.dtype)
    per_image = ((pred - gt).abs() * weight).flatten(-3).sum(-1) / weight.flatten(-3).sum(-1).clamp_min(1.0)
    return per_image.mean()


class Losses(nn.Module):
    """Weighted sum of the recipe's losses. Returns {"l2": .., "ssim": .., ..., "total": ..}."""

    def __init__(self, cfg: LossSection):
        super().__init__()
        self.weights = {k: w for k, w in (("l2", cfg.l2), ("ssim", cfg.ssim), ("lpips", cfg.lpips),
                                          ("perceptual", cfg.perceptual)) if w > 0}
        builders = {"l2": L2Loss, "ssim": SSIMLoss, "lpips": LPIPSLoss, "perceptual": PerceptualLoss}
        self.terms = nn.ModuleDict({k: builders[k]() for k in self.weights})

        self.alpha_weight = cfg.alpha
        self.depth_weight = cfg.depth

    def forward(self, pred: Tensor, gt: Tensor, mask: Tensor | None = None, pred_alpha: Tensor | None = None,
                gt_alpha: Tensor | None = None, pred_depth: Tensor | None = None,
                gt_depth: Tensor | None = None) -> dict[str, Tensor]:
        """pred, gt [..., 3, h, w] in [0, 1]; mask [..., 1, h, w] or None (whole image).

        pred_alpha, gt_alpha [..., 1, h, w]: needed when the recipe weights the silhouette (alpha) loss;
        it is never masked (the background is where it matters).
        pred_depth, gt_depth [..., 1, h, w]: needed when the recipe weights the depth loss (`depth_l1`).
        """
        assert pred.shape == gt.shape, f"pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}"
        out = {k: term(pred, gt, mask) for k, term in self.terms.items()}
        weights = dict(self.weights)
        if self.alpha_weight > 0:
            assert pred_alpha is not None and gt_alpha is not None, "the alpha loss needs pred_alpha and gt_alpha"
            assert pred_alpha.shape == gt_alpha.shape, f"{tuple(pred_alpha.shape)} vs {tuple(gt_alpha.shape)}"
            out["alpha"], weights["alpha"] = ((pred_alpha - gt_alpha) ** 2).mean(), self.alpha_weight
        if self.depth_weight > 0:
            assert pred_depth is not None and gt_depth is not None, "the depth loss needs pred_depth and gt_depth"
            assert pred_alpha is not None, "the depth loss needs pred_alpha"
            out["depth"], weights["depth"] = depth_l1(pred_depth, gt_depth, pred_alpha), self.depth_weight
        out["total"] = sum(weights[k] * v for k, v in out.items())
        return out
