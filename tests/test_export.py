"""Viewer exports (mouserecon.export): `.splat`, `.compressed.ply`, and folder conversion.

References, independent of the writers: a `.splat` decoder written here from antimatter15's
published 32-byte layout, and a compressed-PLY decoder written here from PlayCanvas's reader
(splat-transform `decompress-ply.ts`), cross-checked against gsply's own reader. Tolerances come
from the formats' bit depths and the chunk bounds stored in the file.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mouserecon.errors import MouseReconError
from mouserecon.export import EXPORT_FORMATS, ExportError, convert, export_gaussians, morton_order
from mouserecon.gaussians import Gaussians
from mouserecon.ply import load_ply, read_ply_comments, save_ply

C0 = 0.28209479177387814
# antimatter15/splat: per Gaussian, no header.
SPLAT = np.dtype([("xyz", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])
_PLY_NUMPY = {"float": "<f4", "uint": "<u4", "uchar": "u1"}


def random_gaussians(n: int, sh_degree: int = 0, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2
    sh = torch.randn(n, k, 3, generator=gen) * 0.7
    sh[:, 0] = torch.randn(n, 3, generator=gen) * 1.5  # some DC colours outside [0, 1]
    return Gaussians(torch.randn(n, 3, generator=gen) * 10, sh.clamp(-3.9, 3.9),
                     torch.randn(n, 3, generator=gen) - 3, torch.randn(n, 4, generator=gen),
                     torch.randn(n, generator=gen) * 3)


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def unit(q):
    q = np.asarray(q, np.float64)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


# ---- independent decoders ----------------------------------------------------------------------

def read_splat(path):
    data = path.read_bytes()
    assert len(data) % 32 == 0, f"{len(data)} bytes is not a whole number of 32-byte records"
    return np.frombuffer(data, SPLAT)


def read_compressed_ply(path):
    """{element: structured array} of a binary little-endian PLY with scalar properties."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    elements = []
    for line in lines[2:-1]:
        words = line.split()
        if words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            elements[-1][2].append((words[2], _PLY_NUMPY[words[1]]))
    out, offset = {}, end
    for name, count, props in elements:
        out[name] = np.frombuffer(data, np.dtype(props), count, offset)
        offset += count * out[name].dtype.itemsize
    assert offset == len(data), "trailing bytes"
    return out


def decode_compressed(path):
    """PlayCanvas's decoding: lerp of unorm fields within each chunk of 256, smallest-three rotation."""
    el = read_compressed_ply(path)
    chunk, vertex = el["chunk"], el["vertex"]
    n = len(vertex)
    assert len(chunk) == -(-n // 256)
    ci = np.arange(n) // 256

    def unorm(v, shift, bits):
        return ((v.astype(np.int64) >> shift) & ((1 << bits) - 1)) / ((1 << bits) - 1)

    def lerp3(packed, lo, hi):
        t = np.stack([unorm(packed, 21, 11), unorm(packed, 11, 10), unorm(packed, 0, 11)], -1)
        lo = np.stack([chunk[k][ci] for k in lo], -1).astype(np.float64)
        hi = np.stack([chunk[k][ci] for k in hi], -1).astype(np.float64)
        return lo * (1 - t) + hi * t

    means = lerp3(vertex["packed_position"], ["min_x", "min_y", "min_z"], ["max_x", "max_y", "max_z"])
    log_scales = lerp3(vertex["packed_scale"], ["min_scale_x", "min_scale_y", "min_scale_z"],
                       ["max_scale_x", "max_scale_y", "max_scale_z"])
    col = vertex["packed_color"]
    t = np.stack([unorm(col, 24, 8), unorm(col, 16, 8), unorm(col, 8, 8)], -1)
    lo = np.stack([chunk[k][ci] for k in ("min_r", "min_g", "min_b")], -1).astype(np.float64)
    hi = np.stack([chunk[k][ci] for k in ("max_r", "max_g", "max_b")], -1).astype(np.float64)
    rgb = lo * (1 - t) + hi * t
    alpha = unorm(col, 0, 8)
    rot = vertex["packed_rotation"]
    abc = np.stack([(unorm(rot, s, 10) - 0.5) / (np.sqrt(2) * 0.5) for s in (20, 10, 0)], -1)
    largest = np.sqrt(np.maximum(0, 1 - (abc ** 2).sum(-1)))
    which = rot.astype(np.int64) >> 30
    quats = np.empty((n, 4))
    for w in range(4):
        rows = which == w
        quats[rows] = np.insert(abc[rows], w, largest[rows], axis=1)
    sh_rest = None
    if "sh" in el:
        raw = np.stack([el["sh"][f"f_rest_{i}"] for i in range(len(el["sh"].dtype.names))], -1).astype(np.float64)
        nrm = np.where(raw == 0, 0, np.where(raw == 255, 1, (raw + 0.5) / 256))
        sh_rest = ((nrm - 0.5) * 8).reshape(n, 3, -1).transpose(0, 2, 1)  # channel-major f_rest -> [N, K-1, 3]
    return dict(chunk=chunk, means=means, log_scales=log_scales, rgb=rgb, alpha=alpha, quats=quats,
                sh_rest=sh_rest)


def file_order(rec, g):
    """Which Gaussian of `g` each .splat record is, by its (exact float32) position."""
    means = g.means.numpy()
    index = {means[i].tobytes(): i for i in range(len(means))}
    assert len(index) == len(means), "positions must be unique"
    return np.array([index[xyz.tobytes()] for xyz in rec["xyz"]])


# ---- .splat --------------------------------------------------------------------------------------

def test_formats_and_error_type():
    assert set(EXPORT_FORMATS) == {".ply", ".compressed.ply", ".splat"}
    assert issubclass(ExportError, MouseReconError) and issubclass(ExportError, ValueError)


def test_splat_round_trip(tmp_path):
    g = random_gaussians(1000)
    export_gaussians(g, tmp_path / "m.splat")
    rec = read_splat(tmp_path / "m.splat")
    assert len(rec) == 1000 and [p.name for p in tmp_path.iterdir()] == ["m.splat"]

    order = file_order(rec, g)
    assert sorted(order) == list(range(1000))
    np.testing.assert_array_equal(rec["xyz"], g.means.numpy()[order])

    log_scales = g.log_scales.numpy().astype(np.float64)[order]
    np.testing.assert_allclose(rec["scale"], np.exp(log_scales), rtol=2 ** -23)

    # Most important first: descending exp(sum log-scales) * sigmoid(opacity), as antimatter15's convert.py.
    importance = np.exp(log_scales.sum(-1)) * sigmoid(g.opacity_logits.numpy()[order])
    assert np.all(np.diff(importance) <= 0)

    rgb = np.clip(0.5 + C0 * g.sh[:, 0].numpy().astype(np.float64)[order], 0, 1)
    alpha = sigmoid(g.opacity_logits.numpy()[order])
    colour_err = np.abs(rec["rgba"] / 255 - np.concatenate([rgb, alpha[:, None]], 1)).max()
    assert colour_err <= 0.5 / 255 + 1e-9  # rounded to the nearest 1/255

    q_file = unit((rec["rot"].astype(np.float64) - 128) / 128)  # antimatter15's viewer decoding
    q_true = unit(g.quats.numpy()[order])
    dots = np.abs((q_file * q_true).sum(-1))
    assert dots.min() > 0.9995  # 8-bit components: at most 0.5/128 off each


def test_splat_drops_higher_sh_bands_with_warning(tmp_path, caplog):
    g = random_gaussians(50, sh_degree=2)
    with caplog.at_level(logging.WARNING, logger="mouserecon.export"):
        export_gaussians(g, tmp_path / "m.splat")
    assert "DC colour only" in caplog.text and "1..2" in caplog.text
    rec = read_splat(tmp_path / "m.splat")
    dc_rgb = np.clip(0.5 + C0 * g.sh[:, 0].numpy().astype(np.float64), 0, 1)[file_order(rec, g)]
    assert len(rec) == 50 and np.abs(rec["rgba"][:, :3] / 255 - dc_rgb).max() <= 0.5 / 255 + 1e-9


def test_nonfinite_gaussians_are_dropped(tmp_path):
    g = random_gaussians(10)
    g.log_scales[3, 1] = float("nan")
    g.means[7, 0] = float("inf")
    export_gaussians(g, tmp_path / "m.splat")
    export_gaussians(g, tmp_path / "m.compressed.ply")
    assert len(read_splat(tmp_path / "m.splat")) == 8
    assert len(decode_compressed(tmp_path / "m.compressed.ply")["means"]) == 8


# ---- .compressed.ply ----------------------------------------------------------------------------

@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_compressed_ply_round_trip(tmp_path, sh_degree):
    n = 1000  # 3 full chunks and one of 232
    g = random_gaussians(n, sh_degree)
    path = tmp_path / "m.compressed.ply"
    export_gaussians(g, path)
    d = decode_compressed(path)

    order = morton_order(g.means).numpy()
    assert sorted(order) == list(range(n))
    o = g.select(torch.from_numpy(order))  # the original, in file order
    means, log_scales = o.means.numpy(), o.log_scales.numpy()
    rgb = (0.5 + C0 * o.sh[:, 0].numpy().astype(np.float64))
    chunk, ci = d["chunk"], np.arange(n) // 256

    # Chunk bounds are the chunk's own min/max, so each value is quantised within its chunk's range.
    for c in range(len(chunk)):
        rows = slice(256 * c, 256 * (c + 1))
        np.testing.assert_array_equal([chunk[k][c] for k in ("min_x", "min_y", "min_z")], means[rows].min(0))
        np.testing.assert_array_equal([chunk[k][c] for k in ("max_x", "max_y", "max_z")], means[rows].max(0))
        np.testing.assert_array_equal([chunk[k][c] for k in ("min_scale_x", "min_scale_y", "min_scale_z")],
                                      log_scales[rows].min(0))
        np.testing.assert_allclose([chunk[k][c] for k in ("max_r", "max_g", "max_b")], rgb[rows].max(0), rtol=1e-6)

    def check(decoded, original, lo_keys, hi_keys, levels):
        span = np.stack([chunk[h][ci] - chunk[lo][ci] for lo, h in zip(lo_keys, hi_keys)], -1).astype(np.float64)
        bound = span / (2 * np.array(levels)) * 1.001 + 1e-6  # half a quantisation step of the chunk's range
        err = np.abs(decoded - original)
        assert np.all(err <= bound), (err / bound).max()
        return (err / (span / np.array(levels) + 1e-30)).max()  # in quantisation steps

    steps_pos = check(d["means"], means, ["min_x", "min_y", "min_z"], ["max_x", "max_y", "max_z"], [2047, 1023, 2047])
    check(d["log_scales"], log_scales, ["min_scale_x", "min_scale_y", "min_scale_z"],
          ["max_scale_x", "max_scale_y", "max_scale_z"], [2047, 1023, 2047])
    check(d["rgb"], rgb, ["min_r", "min_g", "min_b"], ["max_r", "max_g", "max_b"], [255, 255, 255])
    assert steps_pos <= 0.5 + 1e-3
    assert np.abs(d["alpha"] - sigmoid(o.opacity_logits.numpy())).max() <= 0.5 / 255 + 1e-6
    dots = np.abs((unit(d["quats"]) * unit(o.quats.numpy())).sum(-1))
    assert dots.min() > 1 - 1e-5  # 10-bit smallest three: under ~0.003 rad
    if sh_degree:
        assert d["sh_rest"].shape == (n, (sh_degree + 1) ** 2 - 1, 3)
        assert np.abs(d["sh_rest"] - o.sh[:, 1:].numpy()).max() <= 1 / 64 + 1e-6  # 8 bits over [-4, 4]
    else:
        assert d["sh_rest"] is None

    # Morton order keeps chunks compact: a chunk's box is a fraction of the whole set's.
    extent = means.max(0) - means.min(0)
    boxes = [np.prod((means[256 * c:256 * (c + 1)].max(0) - means[256 * c:256 * (c + 1)].min(0)) / extent)
             for c in range(len(chunk))]
    assert np.mean(boxes) < 0.5

    # gsply's reader (another implementation) decodes the same values.
    gsply = pytest.importorskip("gsply")
    theirs = gsply.plyread(path)
    np.testing.assert_allclose(theirs.means, d["means"], atol=1e-5)
    np.testing.assert_allclose(theirs.scales, d["log_scales"], atol=1e-5)
    np.testing.assert_allclose(0.5 + C0 * theirs.sh0, d["rgb"], atol=1e-5)
    np.testing.assert_allclose(np.abs((unit(theirs.quats) * unit(d["quats"])).sum(-1)), 1, atol=1e-6)
    if sh_degree:
        np.testing.assert_allclose(theirs.shN, d["sh_rest"], atol=1e-6)


def test_compressed_ply_degenerate_chunks(tmp_path):
    """Identical scales and colours (zero ranges) and a last chunk of one Gaussian decode exactly."""
    n = 257
    g = Gaussians.from_activated(torch.randn(n, 3), torch.full((n, 3), 0.5), torch.full((n, 3), 0.01),
                                 torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), torch.full((n,), 0.9))
    export_gaussians(g, tmp_path / "m.compressed.ply")
    d = decode_compressed(tmp_path / "m.compressed.ply")
    np.testing.assert_allclose(d["log_scales"], np.log(0.01), atol=1e-6)
    np.testing.assert_allclose(d["rgb"], 0.5, atol=1e-6)
    np.testing.assert_allclose(d["quats"], [[1, 0, 0, 0]] * n, atol=1e-3)
    order = morton_order(g.means).numpy()
    np.testing.assert_array_equal(d["means"][256], g.means.numpy()[order[256]])


# ---- conversion ---------------------------------------------------------------------------------

def write_sequence(folder, sizes):
    folder.mkdir()
    frames = []
    for i, n in enumerate(sizes):
        g = random_gaussians(n, sh_degree=1, seed=i)
        save_ply(folder / f"mouse_{i:06d}.ply", g, comments=[f"frame {i}"])
        (folder / f"mouse_{i:06d}.json").write_text("{}")
        frames.append(g)
    (folder / "sequence.json").write_text("{}")
    (folder / "mouse_000009.compressed.ply").write_bytes(b"an earlier export, not an input")
    return frames


@pytest.mark.parametrize("suffix", [".splat", ".compressed.ply", ".ply"])
def test_convert_folder(tmp_path, suffix):
    sizes = [300, 120, 77]
    frames = write_sequence(tmp_path / "seq", sizes)
    out = tmp_path / "out" / "viewer"
    written = convert(tmp_path / "seq", out, suffix=suffix)
    names = [f"mouse_{i:06d}{suffix}" for i in range(3)]
    assert written == [out / name for name in names]
    assert sorted(p.name for p in out.iterdir()) == names
    for i, (path, g) in enumerate(zip(written, frames)):
        if suffix == ".splat":
            assert len(read_splat(path)) == g.num
        elif suffix == ".compressed.ply":
            d = decode_compressed(path)
            assert d["means"].shape == (g.num, 3) and d["sh_rest"].shape == (g.num, 3, 3)  # SH degree 1 kept
        else:
            back = load_ply(path)
            assert torch.equal(back.means, g.means) and torch.equal(back.sh, g.sh)
            assert read_ply_comments(path) == [f"frame {i}"]


def test_convert_file(tmp_path):
    save_ply(tmp_path / "m.ply", random_gaussians(40))
    assert convert(tmp_path / "m.ply", tmp_path / "m.splat") == [tmp_path / "m.splat"]
    assert len(read_splat(tmp_path / "m.splat")) == 40


def test_convert_errors(tmp_path):
    g = random_gaussians(20)
    save_ply(tmp_path / "m.ply", g)
    with pytest.raises(ExportError, match=r"m\.obj: unknown output format"):
        convert(tmp_path / "m.ply", tmp_path / "m.obj")
    with pytest.raises(ExportError, match="unknown output format"):
        export_gaussians(g, tmp_path / "m.ply.gz")
    with pytest.raises(ExportError, match="overwrite its input"):
        convert(tmp_path / "m.ply", tmp_path / "m.ply")
    with pytest.raises(ExportError, match="overwrite its input"):
        convert(tmp_path, tmp_path, suffix=".ply")
    with pytest.raises(ExportError, match="needs the output format"):
        convert(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="unknown output format"):
        convert(tmp_path, tmp_path / "out", suffix=".obj")
    with pytest.raises(ExportError, match="no such file or folder"):
        convert(tmp_path / "missing.ply", tmp_path / "m.splat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no 3DGS .ply files"):
        convert(tmp_path / "empty", tmp_path / "out", suffix=".splat")
    (tmp_path / "m.compressed.ply").write_bytes(b"x")
    with pytest.raises(ExportError, match="must be a standard 3DGS .ply"):
        convert(tmp_path / "m.compressed.ply", tmp_path / "n.splat")
    (tmp_path / "bad.ply").write_bytes(b"not a ply at all\n")
    with pytest.raises(ExportError, match=r"not a 3DGS PLY input: .*bad\.ply: not a PLY file"):
        convert(tmp_path / "bad.ply", tmp_path / "bad.splat")
    with pytest.raises(ExportError, match="folder .* does not exist"):
        export_gaussians(g, tmp_path / "nowhere" / "m.splat")
    assert not (tmp_path / "out").exists() and not (tmp_path / "bad.splat").exists()


@pytest.mark.parametrize("suffix", [".splat", ".compressed.ply"])
def test_empty_set_is_refused_by_viewer_formats(tmp_path, suffix):
    empty = random_gaussians(0)
    with pytest.raises(ExportError, match=r"no finite Gaussians to write \(0 given\)"):
        export_gaussians(empty, tmp_path / f"m{suffix}")
    assert list(tmp_path.iterdir()) == []
    export_gaussians(empty, tmp_path / "m.ply")  # the lossless PLY holds an empty set
    assert load_ply(tmp_path / "m.ply").num == 0
