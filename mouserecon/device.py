"""The device choice, one rule for every command: "auto" is CUDA when available, else the CPU."""

from __future__ import annotations

import torch

from mouserecon.errors import MouseReconError
from mouserecon.options import DEVICES


class DeviceError(MouseReconError, ValueError):
    """A device was asked for that this machine does not have."""


def pick_device(name: str) -> torch.device:
    """"auto" (CUDA when available, else the CPU), "cpu" or "cuda" -> torch.device; "cuda" without a GPU
    is a DeviceError."""
    if name not in DEVICES:
        raise DeviceError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
