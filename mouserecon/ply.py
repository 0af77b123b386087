"""3DGS PLY files in the graphdeco/INRIA layout (CONVENTIONS.md C7).

On disk: binary little-endian, one `vertex` element, every property float32, in the order
`x y z nx ny nz f_dc_0..2 f_rest_0..f_rest_{3(K-1)-1} opacity scale_0..2 rot_0..3`. `f_rest` is
channel-major (the K-1 red coefficients, then green, then blue), normals are zero and every value is
pre-activation (log scales, opacity logits, raw wxyz quaternions), exactly the `Gaussians` fields.

Reading is strict: the required properties must be float32 (double files are refused rather than
rounded), the SH degree follows from the number of `f_rest_*` properties (0, 9, 24 or 45), and any
other defect is an error naming the file. Extra scalar properties of any PLY type (normals, `red green
blue` uchar, ...) are parsed and ignored; list properties and other elements are refused.
An empty set (`element vertex 0`) is a valid file and round-trips.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from numpy.lib import recfunctions

from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_bytes
from mouserecon.gaussians import Gaussians

log = logging.getLogger(__name__)

# PLY scalar type names (both spellings of the spec) -> little-endian numpy dtypes.
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}
_REST_COUNT_TO_DEGREE = {0: 0, 9: 1, 24: 2, 45: 3}
_MAX_HEADER_LINES = 10_000
_MAX_LINE_BYTES = 4096


class PlyError(MouseReconError, ValueError):
    """A PLY file that is not a readable 3DGS file; the message names the file and the defect."""


def property_names(sh_degree: int) -> list[str]:
    """The vertex property names we write for `sh_degree` 0..3, in file order."""
    assert 0 <= sh_degree <= 3, f"sh_degree must be 0..3, got {sh_degree}"
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(n_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def save_ply(path: str | Path, gaussians: Gaussians, comments: tuple[str, ...] | list[str] = ()) -> int:
    """Write an unbatched set (means [N, 3], ...) as a 3DGS PLY; return the number written.

    Values are cast to float32 first; Gaussians with any non-finite parameter (after the cast) are
    dropped with a warning and never written. `comments` become `comment ...` header lines (single
    lines of ASCII, e.g. the similarity transform back to millimetres). The file appears atomically
    (written to a temporary file in the same folder, then renamed), so a reader never sees half a file.
    """
    path = Path(path)
    if gaussians.means.ndim != 2:
        raise ValueError(f"{path}: save_ply takes an unbatched set, got means {tuple(gaussians.means.shape)}")
    for comment in comments:
        if not comment.isascii() or "\n" in comment or "\r" in comment:
            raise ValueError(f"{path}: PLY comment must be one line of ASCII, got {comment!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")

    total = gaussians.num
    g = gaussians.detach().to(device="cpu", dtype=torch.float32).drop_nonfinite()
    n, k = g.num, g.sh.shape[-2]
    rest = g.sh[:, 1:, :].transpose(1, 2).reshape(n, 3 * (k - 1))  # [N, 3(K-1)] channel-major
    table = torch.cat([
        g.means, torch.zeros(n, 3), g.sh[:, 0, :], rest,
        g.opacity_logits[:, None], g.log_scales, g.quats,
    ], dim=1)  # [N, P] in file order
    names = property_names(g.sh_degree)
    assert table.shape == (n, len(names))

    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments),
              f"element vertex {n}", *(f"property float {name}" for name in names), "end_header"]
    payload = table.numpy().astype("<f4", copy=False).tobytes()

    atomic_write_bytes(path, ("\n".join(header) + "\n").encode("ascii") + payload)
    log.info("wrote %d Gaussians (SH degree %d) to %s%s", n, g.sh_degree, path,
             f"; {total - n} non-finite dropped" if n < total else "")
    return n


def read_ply_comments(path: str | Path) -> list[str]:
    """The `comment` lines of a PLY header, without the keyword."""
    return _read_header(Path(path))[0]


def load_ply(path: str | Path) -> Gaussians:
    """Read a 3DGS PLY into an unbatched float32 CPU `Gaussians` (bit-exact values, file order kept).

    Raises PlyError naming the file and the defect for: not a PLY, ASCII or big-endian data, other
    elements than `vertex`, list properties, missing or duplicate properties, required properties not
    float32, an `f_rest` count other than 0/9/24/45, truncated or trailing data. Normals are optional.
    """
    path = Path(path)
    comments, count, props, data_offset = _read_header(path)
    names = [name for name, _ in props]
    rest = [name for name in names if name.startswith("f_rest_")]
    if len(rest) not in _REST_COUNT_TO_DEGREE:
        raise PlyError(f"{path}: {len(rest)} f_rest properties; expected 0, 9, 24 or 45 (SH degree 0..3)")
    degree = _REST_COUNT_TO_DEGREE[len(rest)]
    required = [name for name in property_names(degree) if name not in ("nx", "ny", "nz")]
    missing = [name for name in required if name not in names]
    if missing:
        raise PlyError(f"{path}: missing vertex properties {missing}")
    types = dict(props)
    not_float = [f"{name} ({types[name]})" for name in required if _PLY_TYPES[types[name]] != "<f4"]
    if not_float:
        raise PlyError(f"{path}: properties must be float32, got {not_float}; convert the file to float32")

    dtype = np.dtype([(name, _PLY_TYPES[t]) for name, t in props])
    expected = count * dtype.itemsize
    size = path.stat().st_size - data_offset
    if size < expected:
        raise PlyError(f"{path}: truncated: {count} vertices need {expected} bytes of data, found {size}")
    if size > expected:
        raise PlyError(f"{path}: {size - expected} unexpected bytes after the {count} vertices")
    with path.open("rb") as f:
        f.seek(data_offset)
        records = np.fromfile(f, dtype=dtype, count=count)
    ignored = [name for name in names if name not in required]
    if ignored:
        log.debug("%s: ignoring vertex properties %s", path, ignored)

    table = torch.from_numpy(recfunctions.structured_to_unstructured(records[required]))
    table = table.reshape(count, len(required))  # [N, P] in our file order, without normals
    k = (degree + 1) ** 2
    n_rest = 3 * (k - 1)
    dc, rest_flat, tail = table[:, 3:6], table[:, 6:6 + n_rest], table[:, 6 + n_rest:]
    sh = torch.cat([dc[:, None, :], rest_flat.reshape(count, 3, k - 1).transpose(1, 2)], dim=1)
    gaussians = Gaussians(means=table[:, 0:3].contiguous(), sh=sh.contiguous(),
                          log_scales=tail[:, 1:4].contiguous(), quats=tail[:, 4:8].contiguous(),
                          opacity_logits=tail[:, 0].contiguous())
    bad = int((~gaussians.finite_mask()).sum())
    if bad:
        log.warning("%s: %d of %d Gaussians have non-finite parameters", path, bad, count)
    return gaussians


def _read_header(path: Path) -> tuple[list[str], int, list[tuple[str, str]], int]:
    """Parse a binary little-endian PLY header: (comments, vertex count, [(name, type)], data offset)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    comments: list[str] = []
    count: int | None = None
    props: list[tuple[str, str]] = []
    format_seen = False
    with path.open("rb") as f:
        magic = f.readline(16)
        if not magic:
            raise PlyError(f"{path}: empty file (0 bytes), not a PLY")
        if magic.rstrip(b"\r\n") != b"ply":
            raise PlyError(f"{path}: not a PLY file (first line {magic[:20]!r}, expected 'ply')")
        for line_no in range(2, _MAX_HEADER_LINES):
            raw = f.readline(_MAX_LINE_BYTES)
            if not raw.endswith(b"\n"):
                if len(raw) == _MAX_LINE_BYTES:
                    raise PlyError(f"{path}: header line {line_no} is longer than {_MAX_LINE_BYTES} bytes")
                raise PlyError(f"{path}: header ends without 'end_header' (truncated file?)")
            try:
                line = raw.decode("ascii").rstrip("\r\n")
            except UnicodeDecodeError:
                raise PlyError(f"{path}: header line {line_no} is not ASCII") from None
            words = line.split()
            if not words or words[0] == "obj_info":
                continue
            if words[0] == "comment":
                comments.append(line.partition("comment")[2].strip())
            elif words[0] == "end_header":
                break
            elif words[0] == "format":
                format_seen = True
                if words[1:] != ["binary_little_endian", "1.0"]:
                    raise PlyError(f"{path}: format {' '.join(words[1:])!r} not supported; "
                                   "3DGS PLY must be 'binary_little_endian 1.0'")
            elif words[0] == "element":
                if len(words) != 3 or words[1] != "vertex" or count is not None:
                    raise PlyError(f"{path}: line {line_no} {line!r}: only a single 'vertex' element "
                                   "is supported (compressed or mesh PLY?)")
                if not words[2].isdigit():
                    raise PlyError(f"{path}: line {line_no}: bad vertex count {words[2]!r}")
                count = int(words[2])
            elif words[0] == "property":
                if count is None:
                    raise PlyError(f"{path}: line {line_no}: property before 'element vertex'")
                if words[1] == "list":
                    raise PlyError(f"{path}: line {line_no}: list property {line!r} not supported")
                if len(words) != 3 or words[1] not in _PLY_TYPES:
                    raise PlyError(f"{path}: line {line_no}: bad property line {line!r}")
                if words[2] in dict(props):
                    raise PlyError(f"{path}: duplicate property {words[2]!r}")
                props.append((words[2], words[1]))
            else:
                raise PlyError(f"{path}: line {line_no}: unknown header keyword {words[0]!r}")
        else:
            raise PlyError(f"{path}: no 'end_header' in the first {_MAX_HEADER_LINES} lines")
        data_offset = f.tell()
    if not format_seen:
        raise PlyError(f"{path}: no 'format' line in the header")
    if count is None:
        raise PlyError(f"{path}: no 'element vertex' in the header")
    return comments, count, props, data_offset
