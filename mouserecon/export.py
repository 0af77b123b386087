"""Exports for splat viewers: `.ply` (our lossless 3DGS PLY), `.compressed.ply`, `.splat`.

- `.ply`: the graphdeco/INRIA layout of CONVENTIONS.md C7, written by `mouserecon.ply.save_ply`.
- `.compressed.ply`: the PlayCanvas/SuperSplat compressed PLY, written by gsply's
  `compress_to_bytes`. Gaussians are put in 3D Morton order first (gsply keeps the order it is
  given), so each `chunk` of 256 has tight min/max bounds: positions 11-10-11 bits of the chunk's
  box, log-scales 11-10-11 bits of the chunk's range (bounds clamped to [-20, 20]), DC colour 8-8-8 bits
  of the chunk's range and opacity 8 bits of [0, 1], rotation "smallest three" 2+10+10+10 bits, and
  higher SH bands (degree 1..3) as uint8 `(f_rest / 8 + 0.5) * 256` (so clipped to [-4, 4]).
- `.splat`: antimatter15/splat, 32 bytes a Gaussian, no header: position 3 x float32, scale
  (activated) 3 x float32, RGBA 4 x uint8 (RGB = DC colour, A = opacity, both * 255 rounded and
  clamped), rotation 4 x uint8 (unit wxyz quaternion * 128 + 128, rounded and clamped). Sorted as
  antimatter15's convert.py does, most important first: descending scale product * opacity. DC
  colour only: higher SH bands are dropped with a warning.

Gaussians with non-finite parameters are dropped with a warning (as `save_ply` does). The viewer
formats cannot hold an empty set, and PLY header comments (e.g. the similarity back to millimetres)
survive only in `.ply`. Every file appears atomically (`mouserecon.files`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_bytes
from mouserecon.gaussians import Gaussians, rotation_activation
from mouserecon.ply import PlyError, load_ply, read_ply_comments, save_ply
from mouserecon.progress import progress

log = logging.getLogger(__name__)

EXPORT_FORMATS = {
    ".ply": "standard 3DGS PLY (graphdeco/INRIA layout, lossless, all SH bands)",
    ".compressed.ply": "PlayCanvas/SuperSplat compressed PLY (quantised in chunks of 256, all SH bands)",
    ".splat": "antimatter15/splat (32 bytes a Gaussian, DC colour only, most important first)",
}

# One antimatter15 .splat record.
SPLAT_DTYPE = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)),
                        ("rgba", "u1", (4,)), ("rotation", "u1", (4,))])
assert SPLAT_DTYPE.itemsize == 32


class ExportError(MouseReconError, ValueError):
    """An export or conversion that cannot be done; the message names the file and the defect."""


def export_format(path: str | Path) -> str:
    """The `EXPORT_FORMATS` key that `path`'s name ends with (case-insensitive), or ExportError."""
    name = Path(path).name.lower()
    for suffix in sorted(EXPORT_FORMATS, key=len, reverse=True):  # ".compressed.ply" before ".ply"
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ExportError(f"{path}: unknown output format; the name must end with one of {list(EXPORT_FORMATS)}")


def export_gaussians(gaussians: Gaussians, path: str | Path, comments: tuple[str, ...] | list[str] = ()) -> None:
    """Write an unbatched set (means [N, 3], ...) in the format its suffix names (`EXPORT_FORMATS`).

    `comments` become PLY header comments in `.ply` (the viewer formats have nowhere to keep them).
    Raises ExportError for an unknown suffix, a missing folder, or no (finite) Gaussians to write in
    a viewer format; `.ply` takes an empty set (see `save_ply`).
    """
    path = Path(path)
    fmt = export_format(path)
    if gaussians.means.ndim != 2:
        raise ValueError(f"{path}: export takes an unbatched set, got means {tuple(gaussians.means.shape)}")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist")
    if fmt == ".ply":
        save_ply(path, gaussians, comments)
        return

    g = gaussians.detach().to(device="cpu", dtype=torch.float32).drop_nonfinite()
    if g.num == 0:
        raise ExportError(f"{path}: no finite Gaussians to write ({gaussians.num} given); "
                          f"{fmt} viewers cannot open an empty file")
    if fmt == ".splat":
        if g.sh_degree > 0:
            log.warning("%s: .splat holds the DC colour only; dropping the SH bands 1..%d", path, g.sh_degree)
        data = splat_bytes(g)
    else:
        data = compressed_ply_bytes(g)
    atomic_write_bytes(path, data)
    log.info("wrote %d Gaussians to %s (%s, %d bytes)", g.num, path, fmt, len(data))


def convert(source: str | Path, output: str | Path, suffix: str | None = None) -> list[Path]:
    """Convert a 3DGS `.ply` (`load_ply`'s input) or a folder of them; return the files written.

    File: `output` is the file to write; its suffix picks the format (`suffix`, if given, must agree).
    Folder (a sequence, `mouse_000123.ply`, ...): every `*.ply` that is not `*.compressed.ply` becomes
    `output / (stem + suffix)` (`suffix` required, a key of `EXPORT_FORMATS`); the folder is created
    if missing and other files (sidecar .json, sequence.json) are skipped. Header comments are kept
    in `.ply` outputs. Raises ExportError (naming the file) for a missing source, an unknown format,
    an input that is not a 3DGS PLY, an output that would overwrite its input, or nothing to write;
    all outputs are checked against the inputs before anything is written.
    """
    source, output = Path(source), Path(output)
    if source.is_dir():
        if suffix is None:
            raise ExportError(f"{source}: converting a folder needs the output format, one of {list(EXPORT_FORMATS)}")
        if suffix not in EXPORT_FORMATS:
            raise ExportError(f"{source}: unknown output format {suffix!r}; expected one of {list(EXPORT_FORMATS)}")
        inputs = sorted(p for p in source.glob("*.ply") if p.is_file() and not p.name.startswith(".")
                        and not p.name.lower().endswith(".compressed.ply"))
        if not inputs:
            raise ExportError(f"{source}: no 3DGS .ply files in the folder")
        if output.exists() and not output.is_dir():
            raise ExportError(f"{output}: exists and is not a folder (a folder source converts into a folder)")
        pairs = [(p, output / f"{p.stem}{suffix}") for p in inputs]
    elif source.is_file():
        fmt = export_format(output)
        if suffix is not None and suffix != fmt:
            raise ExportError(f"{output}: the name says {fmt} but the format {suffix!r} was asked for")
        if source.name.lower().endswith(".compressed.ply") or source.suffix.lower() != ".ply":
            raise ExportError(f"{source}: input must be a standard 3DGS .ply (not {source.name!r})")
        pairs = [(source, output)]
    else:
        raise ExportError(f"{source}: no such file or folder")
    for src, dst in pairs:
        if dst.resolve() == src.resolve():
            raise ExportError(f"{dst}: the output would overwrite its input; choose another name or folder")

    if source.is_dir():
        output.mkdir(parents=True, exist_ok=True)
    for src, dst in progress(pairs, desc="export", unit="file"):
        try:
            gaussians, comments = load_ply(src), read_ply_comments(src)
        except PlyError as e:
            raise ExportError(f"not a 3DGS PLY input: {e}") from e
        export_gaussians(gaussians, dst, comments)
    return [dst for _, dst in pairs]


def splat_order(gaussians: Gaussians) -> Tensor:
    """Indices [N] of an unbatched set, most important first (antimatter15's convert.py order):
    descending scale product * opacity, computed in float64, ties kept in input order."""
    g = gaussians.detach().to(device="cpu", dtype=torch.float64)
    importance = g.scales.prod(-1) * g.opacities  # [N]
    return torch.from_numpy(np.argsort(-importance.numpy(), kind="stable"))


def splat_bytes(gaussians: Gaussians) -> bytes:
    """The antimatter15 `.splat` file of an unbatched, finite set (layout: the module docstring)."""
    g = gaussians.detach().to(device="cpu", dtype=torch.float64).select(splat_order(gaussians))
    records = np.empty(g.num, SPLAT_DTYPE)
    records["position"] = g.means.numpy()  # float32 values held exactly in float64
    records["scale"] = g.scales.numpy()
    records["rgba"] = _round_to_uint8(torch.cat([g.colors, g.opacities[:, None]], -1) * 255)  # [N, 4]
    records["rotation"] = _round_to_uint8(rotation_activation(g.quats) * 128 + 128)  # [N, 4] wxyz
    return records.tobytes()


def morton_order(means: Tensor) -> Tensor:
    """Indices [N] that sort points [N, 3] along a 3D Morton (Z-order) curve over their bounding box
    (2^10 cells an axis, ties kept in input order), so consecutive runs are spatially compact."""
    m = means.detach().to(device="cpu", dtype=torch.float64).numpy()
    lo, hi = m.min(0), m.max(0)
    extent = np.where(hi > lo, hi - lo, 1.0)
    cells = np.clip(np.floor((m - lo) / extent * 1024), 0, 1023).astype(np.int64)  # [N, 3]
    code = _spread_bits(cells[:, 0]) | _spread_bits(cells[:, 1]) << 1 | _spread_bits(cells[:, 2]) << 2
    return torch.from_numpy(np.argsort(code, kind="stable"))


def compressed_ply_bytes(gaussians: Gaussians) -> bytes:
    """The PlayCanvas/SuperSplat `.compressed.ply` of an unbatched, finite, non-empty set, in Morton order."""
    try:  # numba-compiled; imported here so importing this module (and the CLI) stays light
        import gsply
    except ImportError as e:
        raise ExportError(f"writing .compressed.ply needs gsply ({e}); pip install gsply") from e

    g = gaussians.detach().to(device="cpu", dtype=torch.float32).select(morton_order(gaussians.means))
    rest = g.sh[:, 1:, :]  # [N, K-1, 3]; gsply writes f_rest channel-major, as C7
    clipped = int((rest.abs() > 4).sum())
    if clipped:
        log.warning("compressed PLY stores SH coefficients in [-4, 4]; %d of %d clipped", clipped, rest.numel())
    return gsply.compress_to_bytes(
        g.means.numpy(), g.log_scales.numpy(), g.quats.numpy(), g.opacity_logits.numpy(),
        g.sh[:, 0, :].contiguous().numpy(), rest.contiguous().numpy() if g.sh_degree > 0 else None)


def _round_to_uint8(values: Tensor) -> np.ndarray:
    return np.clip(np.rint(values.numpy()), 0, 255).astype(np.uint8)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Put bit i of 10-bit integers at bit 3i (the Morton interleave of one axis)."""
    v = v & 0x3FF
    v = (v | v << 16) & 0x030000FF
    v = (v | v << 8) & 0x0300F00F
    v = (v | v << 4) & 0x030C30C3
    return (v | v << 2) & 0x09249249
