"""3DGS PLY I/O (CONVENTIONS.md C7).

References: the raw bytes parsed here with numpy/struct, plyfile (an independent PLY reader and
writer, used in tests only), gsply (a second 3DGS reader and writer) and gsplat's own exporter.
"""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
import torch

from mouserecon.gaussians import Gaussians
from mouserecon.ply import PlyError, load_ply, read_ply_comments, save_ply

FIELDS = ("means", "sh", "log_scales", "quats", "opacity_logits")
# float32 values that a lossy path would change: -0, the smallest subnormal, the extremes, an odd mantissa.
SPECIAL = torch.tensor([-0.0, 1e-45, -3.4028235e38, 3.4028235e38, 1.0000001, -1e-30])


def inria_names(sh_degree: int) -> list[str]:
    """The graphdeco/INRIA vertex property order, written out independently of mouserecon.ply."""
    n_rest = {0: 0, 1: 9, 2: 24, 3: 45}[sh_degree]
    return ("x y z nx ny nz f_dc_0 f_dc_1 f_dc_2".split() + [f"f_rest_{i}" for i in range(n_rest)]
            + "opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3".split())


def random_gaussians(n: int, sh_degree: int) -> Gaussians:
    k = (sh_degree + 1) ** 2
    g = Gaussians(torch.randn(n, 3) * 10, torch.randn(n, k, 3), torch.randn(n, 3) - 3,
                  torch.randn(n, 4), torch.randn(n) * 4)
    if n >= len(SPECIAL):
        for f in FIELDS:
            getattr(g, f).view(n, -1)[: len(SPECIAL), 0] = SPECIAL
    return g


def assert_bit_equal(a: Gaussians, b: Gaussians) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape, f
        assert torch.equal(x.contiguous().view(torch.int32), y.contiguous().view(torch.int32)), f


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_round_trip_bit_exact(tmp_path, sh_degree):
    g = random_gaussians(257, sh_degree)
    path = tmp_path / "g.ply"
    assert save_ply(path, g) == 257
    back = load_ply(path)
    assert back.sh_degree == sh_degree
    assert_bit_equal(back, g)
    assert [p.name for p in tmp_path.iterdir()] == ["g.ply"]  # no temporary file left behind


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_round_trip_empty_set(tmp_path, sh_degree):
    g = random_gaussians(0, sh_degree)
    save_ply(tmp_path / "empty.ply", g)
    back = load_ply(tmp_path / "empty.ply")
    assert back.num == 0 and back.sh_degree == sh_degree
    assert_bit_equal(back, g)


def test_convention_header_and_order(tmp_path):
    n = 2
    sh = (torch.arange(n * 4 * 3, dtype=torch.float32) + 100).reshape(n, 4, 3)  # SH degree 1, K = 4
    g = Gaussians(means=torch.tensor([[1.5, 2.0, 3.0], [4.0, 5.0, 6.0]]), sh=sh,
                  log_scales=torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]),
                  quats=torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.4]]),
                  opacity_logits=torch.tensor([7.0, -8.0]))
    path = tmp_path / "g.ply"
    save_ply(path, g, comments=["mouserecon units=mm"])
    expected_header = "\n".join([
        "ply",
        "format binary_little_endian 1.0",
        "comment mouserecon units=mm",
        "element vertex 2",
        "property float x", "property float y", "property float z",
        "property float nx", "property float ny", "property float nz",
        "property float f_dc_0", "property float f_dc_1", "property float f_dc_2",
        *(f"property float f_rest_{i}" for i in range(9)),
        "property float opacity",
        "property float scale_0", "property float scale_1", "property float scale_2",
        "property float rot_0", "property float rot_1", "property float rot_2", "property float rot_3",
        "end_header",
    ]) + "\n"
    raw = path.read_bytes()
    assert raw[: len(expected_header)] == expected_header.encode("ascii")
    body = raw[len(expected_header):]
    assert len(body) == n * 26 * 4
    assert body[:4] == b"\x00\x00\xc0\x3f"  # 1.5 as little-endian IEEE float32
    rows = np.frombuffer(body, dtype="<f4").reshape(n, 26)
    for i in range(n):
        s = sh[i].numpy()  # [K, 3]
        expected = [*g.means[i].tolist(), 0.0, 0.0, 0.0, *s[0],
                    s[1, 0], s[2, 0], s[3, 0],  # f_rest_0..2: red, SH coefficients 1..3
                    s[1, 1], s[2, 1], s[3, 1],  # f_rest_3..5: green
                    s[1, 2], s[2, 2], s[3, 2],  # f_rest_6..8: blue
                    float(g.opacity_logits[i]), *g.log_scales[i].tolist(), *g.quats[i].tolist()]
        np.testing.assert_array_equal(rows[i], np.array(expected, dtype=np.float32))
    assert read_ply_comments(path) == ["mouserecon units=mm"]


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_plyfile_reads_our_file(tmp_path, sh_degree):
    plyfile = pytest.importorskip("plyfile")
    g = random_gaussians(40, sh_degree)
    save_ply(tmp_path / "g.ply", g, comments=["hello"])
    ply = plyfile.PlyData.read(str(tmp_path / "g.ply"))
    assert ply.byte_order == "<" and not ply.text and ply.comments == ["hello"]
    assert [e.name for e in ply.elements] == ["vertex"]
    v = ply["vertex"].data
    assert list(v.dtype.names) == inria_names(sh_degree)
    assert all(v.dtype[name] == np.dtype("<f4") for name in v.dtype.names)
    table = np.stack([v[name] for name in v.dtype.names], axis=1)  # [N, P]
    k = (sh_degree + 1) ** 2
    rest = g.sh[:, 1:, :].numpy().transpose(0, 2, 1).reshape(40, -1)  # [N, 3(K-1)] channel-major
    expected = np.concatenate([g.means.numpy(), np.zeros((40, 3), np.float32), g.sh[:, 0].numpy(), rest,
                               g.opacity_logits.numpy()[:, None], g.log_scales.numpy(), g.quats.numpy()], 1)
    assert table.shape == (40, 17 + 3 * (k - 1))
    np.testing.assert_array_equal(table.view(np.int32), expected.view(np.int32))


def test_load_file_written_by_plyfile_with_extra_properties(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    n, names = 5, inria_names(2)
    rng = np.random.default_rng(1)
    values = {name: rng.standard_normal(n).astype(np.float32) for name in names}
    # Another tool's layout: colours as uchar after the normals, a double and a short at the end.
    layout = names[:6] + ["red", "green", "blue"] + names[6:] + ["confidence", "label"]
    types = {"red": "u1", "green": "u1", "blue": "u1", "confidence": "<f8", "label": "<i2"}
    arr = np.empty(n, dtype=[(name, types.get(name, "<f4")) for name in layout])
    for name in names:
        arr[name] = values[name]
    arr["red"], arr["green"], arr["blue"] = 255, 7, 0
    arr["confidence"], arr["label"] = np.pi, -3
    path = tmp_path / "other.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(arr, "vertex")], byte_order="<").write(str(path))
    g = load_ply(path)
    assert g.num == n and g.sh_degree == 2
    col = lambda prefix, count: np.stack([values[f"{prefix}{i}"] for i in range(count)], 1)  # noqa: E731
    np.testing.assert_array_equal(g.means.numpy(), np.stack([values["x"], values["y"], values["z"]], 1))
    np.testing.assert_array_equal(g.sh[:, 0].numpy(), col("f_dc_", 3))
    np.testing.assert_array_equal(g.sh[:, 1:].numpy(), col("f_rest_", 24).reshape(n, 3, 8).transpose(0, 2, 1))
    np.testing.assert_array_equal(g.opacity_logits.numpy(), values["opacity"])
    np.testing.assert_array_equal(g.log_scales.numpy(), col("scale_", 3))
    np.testing.assert_array_equal(g.quats.numpy(), col("rot_", 4))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"text": True}, "ascii"),
    ({"byte_order": ">"}, "big_endian"),
])
def test_plyfile_ascii_and_big_endian_refused(tmp_path, kwargs, match):
    plyfile = pytest.importorskip("plyfile")
    arr = np.zeros(3, dtype=[(name, "f4") for name in inria_names(0)])
    path = tmp_path / "g.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(arr, "vertex")], **kwargs).write(str(path))
    with pytest.raises(PlyError, match=match) as err:
        load_ply(path)
    assert str(path) in str(err.value)


def test_plyfile_double_refused(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    arr = np.zeros(3, dtype=[(name, "<f8" if name in ("x", "rot_3") else "<f4") for name in inria_names(0)])
    path = tmp_path / "g.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(arr, "vertex")], byte_order="<").write(str(path))
    with pytest.raises(PlyError, match=r"float32, got \['x \(double\)', 'rot_3 \(double\)'\]"):
        load_ply(path)


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_gsply_agrees(tmp_path, sh_degree):
    gsply = pytest.importorskip("gsply")
    g = random_gaussians(33, sh_degree)
    save_ply(tmp_path / "ours.ply", g)
    data = gsply.plyread(tmp_path / "ours.ply")  # PLY values as stored: log scales, logits, raw quats
    for ours, theirs in [(g.means, data.means), (g.log_scales, data.scales), (g.quats, data.quats),
                         (g.opacity_logits, data.opacities), (g.sh[:, 0], data.sh0), (g.sh[:, 1:], data.shN)]:
        theirs = np.ascontiguousarray(theirs)
        assert theirs.dtype == np.float32 and theirs.shape == tuple(ours.shape)
        np.testing.assert_array_equal(theirs.view(np.int32), ours.numpy().view(np.int32))
    # And the other way: gsply writes, we read.
    gsply.plywrite(tmp_path / "theirs.ply", g.means.numpy(), g.log_scales.numpy(), g.quats.numpy(),
                   g.opacity_logits.numpy(), g.sh[:, 0].numpy(), g.sh[:, 1:].numpy())
    assert_bit_equal(load_ply(tmp_path / "theirs.ply"), g)


def test_gsplat_exporter_agrees(tmp_path):
    """gsplat's CPU-only exporter writes the same layout without normals; bytes and values agree."""
    exporter = pytest.importorskip("gsplat.exporter")
    g = random_gaussians(50, 3)
    exporter.export_splats(means=g.means, scales=g.log_scales, quats=g.quats, opacities=g.opacity_logits,
                           sh0=g.sh[:, :1], shN=g.sh[:, 1:], format="ply", save_to=str(tmp_path / "gsplat.ply"))
    assert_bit_equal(load_ply(tmp_path / "gsplat.ply"), g)
    save_ply(tmp_path / "ours.ply", g)
    ours, theirs = ((tmp_path / name).read_bytes().partition(b"end_header\n")[2] for name in ("ours.ply", "gsplat.ply"))
    ours_rows = np.frombuffer(ours, "<f4").reshape(50, 62)
    theirs_rows = np.frombuffer(theirs, "<f4").reshape(50, 59)
    np.testing.assert_array_equal(np.delete(ours_rows, [3, 4, 5], axis=1).view(np.int32), theirs_rows.view(np.int32))


def test_nonfinite_gaussians_are_dropped_with_a_log_record(tmp_path, caplog):
    g = random_gaussians(6, 1)
    g.means[1, 2] = float("nan")
    g.sh[3, 2, 1] = float("inf")
    big = g.to(torch.float64)
    big.log_scales[4, 0] = 1e39  # finite in float64, inf once stored as float32
    path = tmp_path / "g.ply"
    with caplog.at_level(logging.INFO, logger="mouserecon"):
        assert save_ply(path, big) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert "dropping 3 of 6 Gaussians with non-finite parameters" in messages
    assert any(str(path) in m and "3 non-finite dropped" in m for m in messages)
    assert_bit_equal(load_ply(path), g.select(torch.tensor([0, 2, 5])))


def test_save_casts_to_float32_and_keeps_order(tmp_path):
    g = random_gaussians(20, 0).to(torch.float64)
    save_ply(tmp_path / "g.ply", g)
    assert_bit_equal(load_ply(tmp_path / "g.ply"), g.to(torch.float32))


def test_save_rejects_batched_and_bad_comments(tmp_path):
    g = random_gaussians(4, 0)
    batched = Gaussians(*(torch.stack([getattr(g, f)] * 2) for f in FIELDS))
    with pytest.raises(ValueError, match="unbatched"):
        save_ply(tmp_path / "b.ply", batched)
    with pytest.raises(ValueError, match="one line"):
        save_ply(tmp_path / "c.ply", g, comments=["two\nlines"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_ply(tmp_path / "missing" / "g.ply", g)
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "g.ply"
    save_ply(path, random_gaussians(10, 0))
    before = path.read_bytes()
    (tmp_path / "plain").write_bytes(b"")  # the temporary file must not leave its own mode on the result
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").unlink()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("mouserecon.files.os.fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_ply(path, random_gaussians(99, 3))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.ply"]


def _valid_bytes(tmp_path) -> bytes:
    save_ply(tmp_path / "valid.ply", random_gaussians(3, 1))
    return (tmp_path / "valid.ply").read_bytes()


MALFORMED = {  # name: (mutation of a valid degree-1 file with 3 Gaussians, expected message)
    "zero_bytes": (lambda b: b"", "empty file"),
    "not_ply": (lambda b: b"\x89PNG\r\n\x1a\n" + b[8:], "not a PLY"),
    "ascii": (lambda b: b.replace(b"binary_little_endian", b"ascii"), "ascii"),
    "big_endian": (lambda b: b.replace(b"binary_little_endian", b"binary_big_endian"), "big_endian"),
    "no_format": (lambda b: b.replace(b"format binary_little_endian 1.0\n", b""), "no 'format'"),
    "missing_opacity": (lambda b: b.replace(b"float opacity", b"float opacitx"), r"missing .*\['opacity'\]"),
    "double": (lambda b: b.replace(b"property float y\n", b"property double y\n"), r"y \(double\)"),
    "truncated": (lambda b: b[:-5], "truncated"),
    "trailing": (lambda b: b + b"\0\0\0\0", "unexpected bytes"),
    "rest_count": (lambda b: b.replace(b"float f_rest_8", b"float g_rest_8"), "8 f_rest"),
    "list_property": (lambda b: b.replace(b"end_header", b"property list uchar int idx\nend_header"), "list property"),
    "second_element": (lambda b: b.replace(b"end_header", b"element face 0\nend_header"), "single 'vertex'"),
    "compressed": (lambda b: b.replace(b"element vertex", b"element chunk 1\nelement vertex"), "single 'vertex'"),
    "no_end_header": (lambda b: b.partition(b"end_header")[0], "without 'end_header'"),
    "long_line": (lambda b: b.replace(b"format", b"comment " + b"a" * 5000 + b"\nformat"), "longer than"),
    "bad_count": (lambda b: b.replace(b"element vertex 3", b"element vertex -3"), "bad vertex count"),
    "bad_type": (lambda b: b.replace(b"float x", b"half x"), "bad property line"),
    "duplicate": (lambda b: b.replace(b"float y", b"float x"), "duplicate property 'x'"),
    "binary_header": (lambda b: b.replace(b"comment", b"\xff\xfe").replace(b"end_header", b"\xffend"), "not ASCII"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_files_fail_clearly(tmp_path, name):
    mutate, match = MALFORMED[name]
    original = _valid_bytes(tmp_path)
    broken = mutate(original)
    assert broken != original
    path = tmp_path / f"{name}.ply"
    path.write_bytes(broken)
    with pytest.raises(PlyError, match=match) as err:
        load_ply(path)
    assert str(path) in str(err.value)


def test_nonfinite_values_in_a_foreign_file_are_read_and_reported(tmp_path, caplog):
    plyfile = pytest.importorskip("plyfile")
    arr = np.zeros(4, dtype=[(name, "<f4") for name in inria_names(0)])
    arr["scale_1"][2] = np.nan
    path = tmp_path / "nan.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(arr, "vertex")], byte_order="<").write(str(path))
    with caplog.at_level(logging.WARNING, logger="mouserecon.ply"):
        g = load_ply(path)
    assert g.num == 4 and torch.isnan(g.log_scales[2, 1])
    assert [r.getMessage() for r in caplog.records] == [f"{path}: 1 of 4 Gaussians have non-finite parameters"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_ply(tmp_path / "nope.ply")


def test_header_line_endings_and_byte_layout_are_what_struct_sees(tmp_path):
    """One Gaussian decoded field by field with struct (no numpy), as a viewer would."""
    g = random_gaussians(1, 0)
    save_ply(tmp_path / "one.ply", g)
    raw = (tmp_path / "one.ply").read_bytes()
    assert b"\r" not in raw.partition(b"end_header\n")[0]
    values = struct.unpack("<17f", raw.partition(b"end_header\n")[2])
    assert values[:3] == tuple(g.means[0].tolist()) and values[3:6] == (0.0, 0.0, 0.0)
    assert values[6:9] == tuple(g.sh[0, 0].tolist()) and values[9] == float(g.opacity_logits[0])
    assert values[10:13] == tuple(g.log_scales[0].tolist()) and values[13:] == tuple(g.quats[0].tolist())
