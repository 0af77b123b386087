"""Optimiser, learning-rate schedule and the bad-step rule of the Exp C recipe."""

from __future__ import annotations

import math

import torch
from torch import nn

from mouserecon.train.config import OptimSection


def make_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of >= 2 dims only (matrices, embeddings), as FaceLift."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, total_steps: int, cfg: OptimSection) -> float:
    """Multiplier of the base lr for optimiser step `step` (0-based): linear warm-up, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def should_skip(grad_norm: torch.Tensor, cfg: OptimSection) -> bool:
    """True when the pre-clip global grad norm is non-finite or above grad_clip * skip_factor.

    Under DDP the gradients are already all-reduced when this is called, so every rank sees
    the same norm and takes the same decision.
    """
    norm = float(grad_norm)
    return not math.isfinite(norm) or norm > cfg.skip_threshold
