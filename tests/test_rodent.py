"""The virtual rodent mesh source (eval/rodent.py): MuJoCo's skin format read back from bytes we write by its
documented layout, the bone tree from MJCF nesting, the frame change, the tail fitted to the floor, and (when
a dm_control checkout or mirror is here) the real mesh posed and rendered as samples."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mouserecon.data import load_sample
from mouserecon.eval import mammal, rodent
from mouserecon.eval import mesh_mice as mm

DM_CONTROL = Path(os.environ.get("MOUSERECON_DM_CONTROL", "/work/.mirror/google-deepmind+dm_control/repo"))


def _skin_bytes(vertices, faces, bones) -> bytes:
    """MuJoCo's binary skin: header, vertices, (no) texcoords, faces, then per bone name[40], bindpos[3],
    bindquat[4], count, vertex ids, weights."""
    out = struct.pack("<4i", len(vertices), 0, len(faces), len(bones))
    out += np.asarray(vertices, "<f4").tobytes() + np.asarray(faces, "<i4").tobytes()
    for name, pos, ids, weights in bones:
        out += name.encode().ljust(40, b"\0") + np.asarray([*pos, 1, 0, 0, 0], "<f4").tobytes()
        out += struct.pack("<i", len(ids)) + np.asarray(ids, "<i4").tobytes() + np.asarray(weights, "<f4").tobytes()
    return out


VERTICES = [[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]]
BONES = [("root", (0.0, 0.0, 0.0), [0, 1], [1.0, 0.5]), ("arm", (0.1, 0.0, 0.0), [1, 2], [0.5, 1.0])]
XML = '<mujoco><worldbody><body name="root"><body name="spacer"><body name="arm"/></body></body></worldbody></mujoco>'


def test_read_skin_parses_the_documented_layout_and_names_defects():
    data = _skin_bytes(VERTICES, [[0, 1, 2]], BONES)
    vertices, faces, names, bind, weights = rodent.read_skin(data, "test.skn")
    np.testing.assert_allclose(vertices, VERTICES, atol=1e-7)
    assert faces.tolist() == [[0, 1, 2]] and names == ["root", "arm"]
    np.testing.assert_allclose(bind, [[0, 0, 0], [0.1, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(weights, [[1, 0], [0.5, 0.5], [0, 1]])
    with pytest.raises(rodent.MeshMiceError, match="test.skn: truncated"):
        rodent.read_skin(data[:-4], "test.skn")
    with pytest.raises(rodent.MeshMiceError, match="4 bytes after the last bone"):
        rodent.read_skin(data + b"\0" * 4, "test.skn")
    with pytest.raises(rodent.MeshMiceError, match="faces index vertices 0..3"):
        rodent.read_skin(_skin_bytes(VERTICES, [[0, 1, 3]], BONES), "test.skn")
    light = [BONES[0], ("arm", (0.1, 0.0, 0.0), [1, 2], [0.2, 1.0])]
    with pytest.raises(rodent.MeshMiceError, match="vertex 1 sum to 0.700"):
        rodent.read_skin(_skin_bytes(VERTICES, [[0, 1, 2]], light), "test.skn")


def test_body_parents_skips_bodies_without_skin_and_wants_parents_first():
    assert rodent.body_parents(XML, ["root", "arm"], "r.xml") == [-1, 0]
    with pytest.raises(rodent.MeshMiceError, match="every bone after its parent"):
        rodent.body_parents(XML, ["arm", "root"], "r.xml")
    with pytest.raises(rodent.MeshMiceError, match=r"no bodies named \['hand'\]"):
        rodent.body_parents(XML, ["root", "hand"], "r.xml")


def test_load_rodent_reads_a_checkout_into_the_mammal_frame(tmp_path):
    skin_path, xml_path = (tmp_path / name for name in rodent.RODENT_FILES)
    skin_path.parent.mkdir(parents=True)
    skin_path.write_bytes(_skin_bytes(VERTICES, [[0, 1, 2]], BONES))
    xml_path.write_text(XML)
    mesh = rodent.load_rodent(tmp_path)
    # the skin's x forward, y left -> MAMMAL's -y forward, +x left
    torch.testing.assert_close(mesh.vertices, torch.tensor([[0, 0, 0], [0, -0.1, 0], [0.1, 0, 0]],
                                                           dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(mesh.joints[1], torch.tensor([0, -0.1, 0], dtype=torch.float64), atol=1e-7, rtol=0)
    assert mesh.parents.tolist() == [-1, 0] and mesh.names == ("root", "arm")
    with pytest.raises(rodent.MeshMiceError, match="not a dm_control checkout"):
        rodent.load_rodent(tmp_path / "nothing")


def _tailed_body() -> mammal.SkinnedMesh:
    """A torso joint at the origin with a flat 'body' of vertices at z = -0.02 under it, and the tail's 30
    joints going back (+y) and down from (0, 0.05, 0) to the floor level; one vertex on each tail joint."""
    names = ("torso",) + rodent.TAIL
    tail = torch.tensor([[0.0, 0.05 + 0.01 * k, -0.002 * min(k, 12)] for k in range(30)], dtype=torch.float64)
    joints = torch.cat([torch.zeros(1, 3, dtype=torch.float64), tail])
    body = torch.tensor([[x, y, -0.02] for x in (-0.02, 0.02) for y in (-0.05, 0.04)], dtype=torch.float64)
    vertices = torch.cat([body, tail])
    weights = torch.zeros(len(vertices), len(names), dtype=torch.float64)
    weights[:4, 0] = 1.0
    weights[torch.arange(4, 34), torch.arange(1, 31)] = 1.0
    parents = torch.tensor([-1, 0] + list(range(1, 30)))
    return mammal.SkinnedMesh(vertices, torch.zeros(0, 3, dtype=torch.int64), weights, joints, parents, names)


@pytest.mark.parametrize("body_pitch", [0.0, 30.0, 60.0])
def test_the_tail_is_brought_down_to_the_floor(body_pitch):
    mesh = _tailed_body()
    rotations = torch.eye(3, dtype=torch.float64).repeat(len(mesh.joints), 1, 1)
    rotations[0] = mammal.euler(0.0, body_pitch)  # the body reared up about the torso, its tail swung
    rotations[1] = mammal.euler(0.0, -body_pitch)  # back out behind (as draw_pose does), off the floor level
    z = mammal.skin(mesh, rotations)[0][:, 2]
    before = float(z[4:].min() - z[:4].min())
    rodent._tail_to_floor(mesh, rotations)
    z = mammal.skin(mesh, rotations)[0][:, 2]
    assert abs(float(z[4:].min() - z[:4].min())) < 1e-6, f"started {before:.4f} off the floor"


@pytest.mark.slow
def test_the_real_rodent_poses_and_makes_samples(shared_dir, tmp_path):
    if not (DM_CONTROL / "HEAD").is_file() and not (DM_CONTROL / rodent.RODENT_FILES[0]).is_file():
        pytest.skip(f"dm_control not found at {DM_CONTROL} (set MOUSERECON_DM_CONTROL to a checkout or its git repo)")
    mesh = rodent.load_rodent(DM_CONTROL)
    assert (len(mesh.vertices), len(mesh.faces), len(mesh.joints)) == (6880, 10752, 65)
    scale = rodent.scale_mm(mesh)
    tail = mesh.weights[:, mesh.index(rodent.TAIL)].sum(1) >= 0.5
    heights = {}
    for family in mammal.FAMILIES:
        rotations, record = rodent.draw_pose(mesh, family, np.random.default_rng(3))
        posed, joints = mammal.skin(mesh, rotations)
        posed, joints = posed * scale, joints * scale
        # rigid bones: a joint stays as far from its parent as at rest (`mammal.euler` is float32-exact only)
        rest = mesh.joints * scale
        p = mesh.parents[1:]
        torch.testing.assert_close((joints[1:] - joints[p]).norm(dim=1), (rest[1:] - rest[p]).norm(dim=1),
                                   rtol=1e-5, atol=1e-5)
        assert abs(float(posed[tail, 2].min() - posed[~tail, 2].min())) < 0.01  # the tail lies on the floor
        heights[family] = float(posed[:, 2].max() - posed[:, 2].min())
    assert 35.0 < heights["rest"] < 60.0 and 60.0 < heights["rear"] < 100.0 and heights["groom"] > heights["rest"]
    rig = mm.load_rig(shared_dir / "data" / "markerless_mouse_1_rig", "real")
    folder = mm.generate_sample(mesh, mm.rodent_poser(mesh), rig, tmp_path / "sample", seed=0, family="rear",
                                resolution=48)
    sample = load_sample(folder)
    assert sample.num_views == 8 and (sample.masks.flatten(1).amax(1) > 0.99).all()
    record = json.loads((folder / mm.RECORD_FILE).read_text())
    assert record["pose"]["family"] == "rear" and record["mesh"]["files"] == list(rodent.RODENT_FILES)
