"""The device choice, one rule for every command: "auto" is CUDA when available, else the CPU; and
whether this CPU computes bf16 natively."""

from __future__ import annotations

from pathlib import Path

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


# /proc/cpuinfo flags of CPUs with bf16 dot-product instructions (x86: AVX512-BF16, AMX; Arm: BF16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
SLOW_BF16 = ("this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16): torch emulates bf16 matmuls "
             "on it, about 160x slower than fp32 (1.0 vs 160 GFLOP/s on a 2-core AMD EPYC with AVX2); use fp32")


CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_lines(keys: tuple[str, ...], cpuinfo: Path = CPUINFO) -> list[str] | None:
    """The lines of `cpuinfo` (Linux) whose key (before the colon, any case) is one of `keys` (lower case);
    None where the file is unreadable."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    return [line for line in lines if line.split(":")[0].strip().lower() in keys]


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool | None:
    """Whether the CPU's flags (`cpuinfo`) name bf16 instructions; None where the file is unreadable."""
    lines = cpuinfo_lines(("flags", "features"), cpuinfo)
    if lines is None:
        return None
    return any(NATIVE_BF16_FLAGS.intersection(line.split(":", 1)[1].split()) for line in lines)
