"""Pictures people would rather look at than read: comparison grids and training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def error_heatmap(pred: Tensor, gt: Tensor, max_error: float = 0.5) -> Tensor:
    """Per-pixel RGB error |pred - gt| (mean over channels) as a colour map [..., 3, H, W] in [0, 1].

    Black = no error, through red and yellow to white at `max_error` and above.
    """
    err = ((pred - gt).abs().mean(-3, keepdim=True) / max_error).clamp(0, 1)  # [..., 1, H, W]
    return torch.cat([(3 * err).clamp(0, 1), (3 * err - 1).clamp(0, 1), (3 * err - 2).clamp(0, 1)], -3)


def comparison_grid(gt: Tensor, preds: list[Tensor], with_error: bool = True) -> np.ndarray:
    """One row per view: GT | pred_1 [| error_1] | pred_2 [| error_2] ...

    gt: [V, 3, H, W] in [0, 1]; preds: list of [V, 3, H, W]. Returns uint8 [V*H, C*W, 3].
    """
    assert gt.ndim == 4 and gt.shape[1] == 3, f"gt must be [V, 3, H, W], got {tuple(gt.shape)}"
    columns = [gt]
    for pred in preds:
        assert pred.shape == gt.shape, f"prediction {tuple(pred.shape)} vs gt {tuple(gt.shape)}"
        columns.append(pred)
        if with_error:
            columns.append(error_heatmap(pred, gt))
    grid = torch.cat(columns, dim=-1)  # [V, 3, H, C*W]
    grid = torch.cat(list(grid), dim=-2)  # [3, V*H, C*W]
    return (grid.permute(1, 2, 0).clamp(0, 1).detach().cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_image(path: str | Path, image: np.ndarray) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, image)


def plot_training_curves(records: list[dict[str, Any]], skip_threshold: float, path: str | Path) -> None:
    """Loss, validation PSNR (whole and masked), grad norm with the skip threshold, and skipped steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    if val:
        vs = [r["step"] for r in val]
        axes[1].plot(vs, [r["psnr"] for r in val], "o-", label="whole image")
        axes[1].plot(vs, [r["psnr_masked"] for r in val], "o-", label="foreground (masked)")
        axes[1].legend()
    axes[1].set(title="validation PSNR (dB)", xlabel="step")
    axes[2].plot(steps, [r["grad_norm"] for r in train], lw=1, label="pre-clip grad norm")
    axes[2].axhline(skip_threshold, color="r", ls="--", label=f"skip threshold {skip_threshold:g}")
    axes[2].set(title="gradient norm", xlabel="step", yscale="log")
    axes[2].legend()
    axes[3].plot(steps, [r["skipped_total"] for r in train], lw=1)
    axes[3].set(title="skipped steps (cumulative)", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
