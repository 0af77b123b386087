"""Atomic file writes, the one implementation every writer uses (PLY, checkpoints, sidecars, reports, ...).

Atomic write: the data goes to a hidden temp file beside the target (same file system), is flushed
and fsynced, then renamed over the target, so a reader (or a resume after kill -9) sees the old file
or the new one, never a partial one. The temp file is opened with "x" (the umask applies, unlike
tempfile.mkstemp's 0600) and removed if anything fails.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch



def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a binary temp file beside `path`, then rename it to `path` (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, record: Any) -> None:
    """JSON with indent 1; inf and NaN spelled as Python's json writes them (Infinity, NaN)."""
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
