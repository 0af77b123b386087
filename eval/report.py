"""Evaluation reports: what `mouserecon eval` writes, and the protocol-gated comparison of reports.

```
report/
  summary.json   protocol_tag, protocol (in full), per model: kind, source, and per metric mean,
                 median, n, n_nan, n_inf, per-view-index means; grids; device; versions
  per_view.csv   model, sample, view, every metric (full float precision; inf / nan spelled out)
  table.txt      the one-screen text table (`Report.table()`)
  grids/{worst,median,best}_<sample>.png   rows = held-out views; GT | model | error | model | error ...
  renders/<model>/<sample>.npz             float32 images [H, 3, R, R], alphas [H, 1, R, R], views [H]
  renders/<model>/<sample>_view<k>.png     8-bit PNG of each render (to look at; the .npz is exact)
```
JSON numbers: inf and NaN are written as Python's json writes them (Infinity, NaN), never as null,
so an infinite PSNR (a render identical to the ground truth) stays visible.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from torch import Tensor

from mouserecon.metrics import MetricSummary, ViewMetrics, summarize
from mouserecon.eval.protocol import Protocol, require_same_protocol
from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_json, atomic_write_text
from mouserecon.rundir import versions

GRID_LABELS = ("worst", "median", "best")


class ReportError(MouseReconError, ValueError):
    """A report folder or summary.json is missing or malformed; the message names the file."""


# Table columns: (metric, header, format). Metrics a report lacks (LPIPS with --lpips none) are left out.
COLUMNS = (("psnr", "PSNR", ".2f"), ("psnr_fg", "PSNR_fg", ".2f"), ("ssim", "SSIM", ".4f"),
           ("ssim_fg", "SSIM_fg", ".4f"), ("lpips", "LPIPS", ".4f"), ("lpips_fg", "LPIPS_fg", ".4f"),
           ("iou", "IoU", ".4f"))


@dataclass(frozen=True)
class ModelResult:
    """One evaluated model: metrics [S, V] (samples in protocol order x held-out views) and their summary."""

    name: str
    kind: str  # "checkpoint" or "ply"
    source: str
    metrics: ViewMetrics
    summary: dict[str, MetricSummary]

    @staticmethod
    def from_metrics(name: str, kind: str, source: str, metrics: ViewMetrics) -> ModelResult:
        return ModelResult(name, kind, source, metrics, summarize(metrics))


@dataclass(frozen=True)
class Summary:
    """summary.json: the one record of a report that `compare` reads; written and read only here.

    protocol_tag / protocol: `Protocol.tag()` and `Protocol.to_dict()`. models: {name: {"kind", "source",
    "n_samples", "n_views", "metrics": {metric: {mean, median, n, n_nan, n_inf, per_view_index_mean}}}}.
    grids: {"worst"|"median"|"best": {"sample", "file", "psnr_fg_mean"}}; grid_columns: their column titles.
    device, versions, created (UTC, ISO 8601).
    """

    protocol_tag: str
    protocol: dict
    models: dict
    grids: dict
    grid_columns: list[str]
    device: str
    versions: dict
    created: str

    def write(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @staticmethod
    def read(path: str | Path) -> tuple[Summary, Protocol]:
        """A report folder or its summary.json -> (Summary, its Protocol); unknown or missing keys, or a
        protocol_tag that does not match the protocol, are a ReportError naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "summary.json"
        if not path.is_file():
            raise ReportError(f"{path}: no summary.json (not a `mouserecon eval` report)")
        try:
            record = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportError(f"{path}: not valid JSON ({err})") from None
        names = [f.name for f in fields(Summary)]
        got = set(record) if isinstance(record, dict) else set()
        missing, unknown = [k for k in names if k not in got], sorted(got - set(names))
        if missing or unknown:
            raise ReportError(f"{path}: missing {missing[0]!r} (not a `mouserecon eval` summary)" if missing else
                              f"{path}: unknown keys {unknown} (not a `mouserecon eval` summary)")
        summary = Summary(**record)
        protocol = Protocol.from_dict(summary.protocol, source=str(path))
        if protocol.tag() != summary.protocol_tag:
            raise ReportError(f"{path}: protocol_tag {summary.protocol_tag} does not match its protocol "
                              f"(tag {protocol.tag()}): the file was edited or written by another protocol version")
        return summary, protocol


@dataclass(frozen=True)
class Report:
    """A written report: its folder, protocol, models and the text table."""

    out_dir: Path
    protocol: Protocol
    models: tuple[ModelResult, ...]
    summary: Summary

    def table(self) -> str:
        return format_table(self.summary)


def grid_samples(psnr_fg: Tensor, sample_ids: tuple[str, ...]) -> dict[str, tuple[int, float]]:
    """{"worst" | "median" | "best": (sample index, mean foreground PSNR)} from psnr_fg [S, V].

    Samples are ranked by their mean over held-out views (NaN views left out; samples with no
    finite-or-inf value are skipped); the median is the lower middle. Labels may share a sample.
    """
    assert psnr_fg.shape[0] == len(sample_ids), f"psnr_fg {tuple(psnr_fg.shape)} for {len(sample_ids)} samples"
    values = psnr_fg.double().numpy()
    means = [(float(row[~np.isnan(row)].mean()), i) for i, row in enumerate(values) if (~np.isnan(row)).any()]
    if not means:
        return {}
    ranked = sorted(means)
    picks = {"worst": ranked[0], "median": ranked[(len(ranked) - 1) // 2], "best": ranked[-1]}
    return {label: (index, value) for label, (value, index) in picks.items()}


def write_report(out: Path, protocol: Protocol, models: tuple[ModelResult, ...], grids: dict, device: str) -> Report:
    """Write summary.json, per_view.csv and table.txt into `out` (renders and grids are already there)."""
    summary = Summary(
        protocol_tag=protocol.tag(),
        protocol=protocol.to_dict(),
        models={m.name: {"kind": m.kind, "source": m.source, "n_samples": len(protocol.sample_ids),
                         "n_views": len(protocol.heldout_views),
                         "metrics": {name: _summary_record(s, protocol.heldout_views) for name, s in m.summary.items()}}
                for m in models},
        grids=grids,
        grid_columns=["GT"] + [c for m in models for c in (m.name, f"{m.name} error")],
        device=device,
        versions=versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    summary.write(out / "summary.json")
    _write_per_view_csv(out / "per_view.csv", protocol, models)
    report = Report(out, protocol, models, summary)
    atomic_write_text(out / "table.txt", report.table() + "\n")
    return report


def _summary_record(s: MetricSummary, views: tuple[int, ...]) -> dict:
    record = asdict(s)
    record["per_view_index_mean"] = {str(v): x for v, x in zip(views, s.per_view_index_mean)}
    return record


def _write_per_view_csv(path: Path, protocol: Protocol, models: tuple[ModelResult, ...]) -> None:
    names = list(models[0].metrics.as_dict())
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["model", "sample", "view", *names])
    for m in models:
        values = {k: v.tolist() for k, v in m.metrics.as_dict().items()}  # [S][V]
        for s, sample_id in enumerate(protocol.sample_ids):
            for v, view in enumerate(protocol.heldout_views):
                writer.writerow([m.name, sample_id, view, *(_csv_value(values[k][s][v]) for k in names)])
    atomic_write_text(path, rows.getvalue())


def _csv_value(x) -> str:
    return str(int(x)) if isinstance(x, bool) else repr(float(x))  # repr: shortest exact round trip


# ---- the text table and comparisons --------------------------------------------------------------


def format_table(*summaries: Summary, labels: tuple[str, ...] | None = None) -> str:
    """The one-screen table of one or more summaries (which must share one protocol):
    a protocol line, then per model its means and medians over all held-out views.
    labels: a prefix per summary for the model names (comparisons of several reports)."""
    protocol = Protocol.from_dict(summaries[0].protocol)
    rows = []
    for k, summary in enumerate(summaries):
        for name, model in summary.models.items():
            rows.append((f"{labels[k]}/{name}" if labels else name, model["metrics"]))
    present = [c for c in COLUMNS if any(c[0] in metrics for _, metrics in rows)]
    width = max(12, *(len(name) for name, _ in rows))
    ids = protocol.sample_ids
    lines = [f"protocol {protocol.tag()}: {len(ids)} sample{'s' * (len(ids) != 1)} (data {protocol.data_sha1[:8]}), "
             f"inputs {list(protocol.input_views)}, held out {list(protocol.heldout_views)}, {protocol.resolution} px, "
             f"mask {protocol.mask}, LPIPS {protocol.lpips}",
             f"{'model':<{width}}  {'':<6}" + "".join(f"{h:>10}" for _, h, _ in present) + f"{'views':>7}"]
    notes = []
    for name, metrics in rows:
        for stat in ("mean", "median"):
            cells = "".join(f"{_cell(metrics.get(m, {}).get(stat), fmt):>10}" for m, _, fmt in present)
            count = f"{metrics['psnr']['n'] + metrics['psnr']['n_nan']:>7}" if stat == "mean" else ""
            lines.append(f"{name if stat == 'mean' else '':<{width}}  {stat:<6}{cells}{count}")
        for metric, _, _ in present:
            if metric in metrics and metrics[metric]["n_nan"]:
                notes.append(f"{name}: {metric} left out {metrics[metric]['n_nan']} view(s) with an empty mask")
    return "\n".join(lines + notes)


def _cell(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, fmt)


def compare_reports(paths: list[str | Path]) -> str:
    """The comparison table of several reports; raises ProtocolMismatch (listing the differing fields)
    unless they all share one protocol. Models are labelled <report folder>/<model>."""
    if len(paths) < 2:
        raise ReportError("comparing needs at least two reports")
    folders = [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    loaded = [Summary.read(p) for p in paths]
    labels = tuple(folder.name for folder in folders)
    if len(set(labels)) != len(labels):
        labels = tuple(str(folder) for folder in folders)
    require_same_protocol({label: protocol for label, (_, protocol) in zip(labels, loaded)})
    return format_table(*(summary for summary, _ in loaded), labels=labels)
