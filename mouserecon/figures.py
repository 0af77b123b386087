"""Pictures people would rather look at than read: comparison grids and training curves.

- `error_heatmap(pred, gt, max_error)`: |pred - gt| as a black -> red -> yellow -> white colour map.
- `comparison_grid(gt, preds, ...)`: uint8 image, one row per view: GT | pred_1 | error_1 | pred_2 | error_2 ...
  Plain (no labels) it is the bare concatenation of the tiles, which training validation relies on. With
  `model_names` and/or `row_labels` it gains a white header band (column titles, colour bar for the error
  scale) and a left band (row labels), and its tiles are upscaled by an integer nearest-neighbour factor so
  the text fits; `grid_layout(H, W)` gives those sizes so callers (and tests) can locate the tiles.
- `plot_training_curves(...)`: loss, validation PSNR, grad norm and skipped steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


# Labelled grids: tiles are scaled up to at least this size, text is drawn at a fixed pixel size.
LABEL_MIN_TILE_W = 96
LABEL_MIN_TILE_H = 32
LABEL_FONT_PX = 12
LABEL_LINE_PX = 15  # line pitch for LABEL_FONT_PX
LABEL_PAD_PX = 3
LABEL_LEFT_PX = 128  # width of the row-label band
_ELLIPSIS = "\u2026"


@dataclass(frozen=True)
class GridLayout:
    """Geometry of a labelled `comparison_grid` with tiles of H x W input pixels.

    The tiles occupy `image[header:, left:]`, each tile `scale*H x scale*W`, and equal the plain grid
    upscaled with nearest neighbour (`np.repeat` by `scale` along both axes).
    """

    scale: int  # integer nearest-neighbour upscaling of every tile
    header: int  # height (px) of the white band above the tiles: 2 text lines (or title + colour bar)
    left: int  # width (px) of the white band left of the tiles: row labels
    tile_h: int  # scale * H
    tile_w: int  # scale * W


def grid_layout(height: int, width: int) -> GridLayout:
    """Band sizes and tile scale of a labelled grid of H x W tiles; independent of the label text.

    scale = max(1, ceil(96 / W), ceil(32 / H)); header = 2 * 15 + 2 * 3 = 36 px; left = 128 px.
    Text longer than its room is wrapped at spaces and cut with an ellipsis, never enlarging the bands.
    """
    scale = max(1, math.ceil(LABEL_MIN_TILE_W / width), math.ceil(LABEL_MIN_TILE_H / height))
    header = 2 * LABEL_LINE_PX + 2 * LABEL_PAD_PX
    return GridLayout(scale, header, LABEL_LEFT_PX, scale * height, scale * width)


def _fit_lines(text: str, font: Any, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap of `text` into at most `max_lines` lines of at most `width` px; cut with an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:  # break words wider than a line
            cut = len(current) - 1
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = " ".join(lines[max_lines - 1 :])
        while last and font.getlength(last + _ELLIPSIS) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + _ELLIPSIS]
    return lines


def _colour_bar(width: int, height: int, max_error: float) -> np.ndarray:
    """uint8 [height, width, 3] ramp of `error_heatmap` from 0 (left) to max_error (right), black frame."""
    ramp = torch.linspace(0, max_error, width).expand(3, height, width)
    bar = error_heatmap(ramp, torch.zeros_like(ramp), max_error)  # [3, height, width]
    bar = (bar.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    bar[[0, -1]] = 0
    bar[:, [0, -1]] = 0
    return bar


def _label_grid(
    tiles: np.ndarray, height: int, width: int, titles: list[str], is_error: list[bool], row_labels: list[str],
    max_error: float,
) -> np.ndarray:
    """Add header and left bands (see `grid_layout`) to the plain grid `tiles` [V*H, C*W, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    lay = grid_layout(height, width)
    tiles = np.repeat(np.repeat(tiles, lay.scale, axis=0), lay.scale, axis=1)
    canvas = np.full((lay.header + tiles.shape[0], lay.left + tiles.shape[1], 3), 255, np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=LABEL_FONT_PX)
    pad, line = LABEL_PAD_PX, LABEL_LINE_PX
    room = lay.tile_w - 2 * pad
    for c, (title, err) in enumerate(zip(titles, is_error)):
        x0 = lay.left + c * lay.tile_w
        lines = _fit_lines(title, font, room, 1 if err else 2)
        for i, text in enumerate(lines):
            draw.text((x0 + lay.tile_w / 2, pad + i * line + line / 2), text, fill=(0, 0, 0), font=font, anchor="mm")
        if err:
            bar = _colour_bar(room, line - 5, max_error)
            image.paste(Image.fromarray(bar), (x0 + pad, pad + line + 2))
    for r, label in enumerate(row_labels):
        y0 = lay.header + r * lay.tile_h
        max_lines = max(1, (lay.tile_h - 2 * pad) // line)
        lines = _fit_lines(label, font, lay.left - 2 * pad, max_lines)
        top = y0 + (lay.tile_h - len(lines) * line) / 2
        for i, text in enumerate(lines):
            draw.text((pad, top + i * line + line / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    canvas = np.asarray(image).copy()
    canvas[lay.header :, lay.left :] = tiles  # tiles exactly as the plain grid, whatever the text did
    return canvas


def comparison_grid(
    gt: Tensor,
    preds: list[Tensor],
    with_error: bool = True,
    *,
    model_names: list[str] | None = None,
    row_labels: list[str] | None = None,
    max_error: float = 0.5,
) -> np.ndarray:
    """One row per view: GT | pred_1 [| error_1] | pred_2 [| error_2] ...

    gt: [V, 3, H, W] in [0, 1]; preds: list of [V, 3, H, W]; errors are `error_heatmap(pred, gt, max_error)`.
    Without labels returns the plain grid, uint8 [V*H, C*W, 3] (C = 1 + len(preds) * (2 if with_error else 1)).

    With `model_names` (len(preds), same order) and/or `row_labels` (V, same order as the views, e.g.
    "mouse_003 view 5"), returns uint8 [header + V*s*H, left + C*s*W, 3] where `grid_layout(H, W)` gives
    s (scale), header and left: a white header band titles each column ("GT", the model name, "|err| 0-<max>"
    over a colour bar of the error scale), a white left band labels each row; missing names default to
    "pred i" / "view i". The tile region `[header:, left:]` is the plain grid upscaled s times (nearest).
    """
    assert gt.ndim == 4 and gt.shape[1] == 3, f"gt must be [V, 3, H, W], got {tuple(gt.shape)}"
    if model_names is not None and len(model_names) != len(preds):
        raise ValueError(f"model_names has {len(model_names)} names for {len(preds)} predictions")
    if row_labels is not None and len(row_labels) != gt.shape[0]:
        raise ValueError(f"row_labels has {len(row_labels)} labels for {gt.shape[0]} views")
    columns = [gt]
    for pred in preds:
        assert pred.shape == gt.shape, f"prediction {tuple(pred.shape)} vs gt {tuple(gt.shape)}"
        columns.append(pred)
        if with_error:
            columns.append(error_heatmap(pred, gt, max_error))
    grid = torch.cat(columns, dim=-1)  # [V, 3, H, C*W]
    grid = torch.cat(list(grid), dim=-2)  # [3, V*H, C*W]
    plain = (grid.permute(1, 2, 0).clamp(0, 1).detach().cpu().numpy() * 255 + 0.5).astype(np.uint8)
    if model_names is None and row_labels is None:
        return plain
    names = list(model_names) if model_names is not None else [f"pred {i + 1}" for i in range(len(preds))]
    rows = list(row_labels) if row_labels is not None else [f"view {v}" for v in range(gt.shape[0])]
    titles, is_error = ["GT"], [False]
    for name in names:
        titles.append(str(name))
        is_error.append(False)
        if with_error:
            titles.append(f"|err| 0-{max_error:g}")
            is_error.append(True)
    return _label_grid(plain, gt.shape[-2], gt.shape[-1], titles, is_error, [str(r) for r in rows], max_error)


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
