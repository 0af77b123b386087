"""A fine-tuning run directory: what was run, on what, how it went, and its checkpoints.

```
runs/NAME/
  recipe.yaml        resolved recipe            command.txt   the command line
  versions.json      package versions           manifest.json the data: sample list + hashes
  metrics.jsonl      one JSON object per log/validation event
  curves.png         loss, PSNR, grad norm with the skip threshold, skipped steps
  val/step_XXXXXXX.png   GT | prediction | error grids
  checkpoints/step_XXXXXXX.pt   kept: the last K;  latest: the name of the newest complete one
```
Checkpoints are written to a temp file and renamed, and `latest` is updated (atomically) only after
the rename, so a run killed mid-write never leaves a truncated file that resume would pick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_torch_save, atomic_write_bytes

log = logging.getLogger(__name__)


class RunError(MouseReconError, FileNotFoundError):
    """A run folder lacks what it should hold; the message names the file."""


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("mouserecon", "torch", "torchvision", "gsplat", "numpy", "pytorch-msssim", "lpips"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sample_manifest(sample_dirs: list[Path]) -> dict[str, Any]:
    """Sample list with a hash per sample over its camera file and images (sorted file names)."""
    samples = []
    for d in sample_dirs:
        files = sorted(p for p in Path(d).rglob("*") if p.is_file())
        h = hashlib.sha1()
        for p in files:
            h.update(str(p.relative_to(d)).encode())
            h.update(file_sha1(p).encode())
        samples.append({"path": str(d), "sha1": h.hexdigest(), "files": len(files)})
    digest = hashlib.sha1("".join(s["sha1"] for s in samples).encode()).hexdigest()
    return {"num_samples": len(samples), "sha1": digest, "samples": samples}


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.val_dir = self.root / "val"
        self.metrics_path = self.root / "metrics.jsonl"

    def create(self, recipe: dict, argv: list[str], manifest: dict) -> None:
        for d in (self.root, self.ckpt_dir, self.val_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (self.root / "command.txt").write_text(" ".join(argv) + "\n")
        (self.root / "versions.json").write_text(json.dumps(versions(), indent=1))
        (self.root / "manifest.json").write_text(json.dumps(manifest, indent=1))

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we resume from (they will be redone)."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save_checkpoint(self, state: dict[str, Any], step: int, keep_last: int) -> Path:
        path = self.ckpt_dir / f"step_{step:08d}.pt"
        atomic_torch_save(state, path)
        atomic_write_bytes(self.ckpt_dir / "latest", path.name.encode())
        for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-keep_last]:
            old.unlink()
        return path

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.exists():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        if not path.exists():
            raise RunError(f"{pointer} names {path.name}, which does not exist")
        return path
