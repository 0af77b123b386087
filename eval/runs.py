"""Summarise finetune run folders side by side: gradient-norm statistics, skipped steps, validation.

    mouserecon runs runs/exp_c runs/exp_b ...

Reads each run's `metrics.jsonl` (see `train/loop.py`): the pre-clip gradient norms of the logged
training steps (every step when the recipe logs every step: `--set training.log_every=1`), the
skipped-update count, and the last validation record; `format_rows` makes one row per run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mouserecon.rundir import RunDir, RunError

COLUMNS = ("steps", "logged", "gn_median", "gn_p95", "gn_max", "gn_mean", "skipped", "val_psnr_fg", "val_iou")


def summarize_run(folder: str | Path) -> dict[str, float]:
    """{column: value} for one run folder (NaN where the run logged nothing of that kind)."""
    records = RunDir(folder).read_metrics()
    if not records:
        raise RunError(f"{folder}: no metrics.jsonl records (not a finetune run folder?)")
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    norms = np.array([r["grad_norm"] for r in train], dtype=np.float64)
    finite = norms[np.isfinite(norms)]
    stat = (lambda f: float(f(finite))) if finite.size else (lambda f: math.nan)
    return {
        "steps": max(r["step"] for r in records),
        "logged": len(train),
        "gn_median": stat(np.median),
        "gn_p95": stat(lambda x: np.percentile(x, 95)),
        "gn_max": stat(np.max),
        "gn_mean": stat(np.mean),
        "skipped": max((r["skipped_total"] for r in train), default=0),
        "val_psnr_fg": val[-1]["psnr_masked"] if val else math.nan,
        "val_iou": val[-1]["iou"] if val else math.nan,
    }


def format_rows(summaries: dict[str, dict[str, float]]) -> str:
    width = max(len("run"), *(len(name) for name in summaries))
    lines = [f"{'run':<{width}}" + "".join(f"{c:>12}" for c in COLUMNS)]
    for name, row in summaries.items():
        cells = [f"{row[c]:>12d}" if isinstance(row[c], int) else f"{row[c]:>12.4g}" for c in COLUMNS]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
