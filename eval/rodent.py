"""dm_control's virtual rodent as a second, independent mesh for the mesh mice: not MAMMAL, not our generator.

Mesh: the skin of DeepMind's virtual rodent (github.com/google-deepmind/dm_control, Apache 2.0:
`dm_control/locomotion/walkers/assets/rodent_walker_skin.skn`, 6880 vertices, 10752 faces, 65 bones, and
`rodent.xml` for the bones' tree), a rat modelled for Merel et al. 2020, "Deep neuroethology of a virtual
rodent"; read at run time from a checkout or its bare git repository (`load_rodent`), never copied here.
A rat is not a mouse: `mesh_mice` scales it to `BODY_MM` from snout to tail base, which leaves its head,
ears and tail in a rat's proportions (a shorter tail than a mouse's, small ears). That is the point of it
here: a body shape that neither the model's training (MAMMAL mesh mice, our SDF mice) nor the hull's
tuning has seen.

Skin file (MuJoCo's binary skin format): int32 nvert, ntexcoord, nface, nbone; float32 vertices [nvert, 3];
float32 texcoords [ntexcoord, 2]; int32 faces [nface, 3]; then per bone: a 40-byte NUL-padded name, float32
bind position [3] and bind quaternion [4], int32 count, int32 vertex ids [count], float32 weights [count].
Frame: x forward (snout), y left, z up, metres; `load_rodent` turns it into MAMMAL's model frame (+x left,
-y forward, +z up) so that `mesh_mice.place` and `mammal.euler` apply unchanged. A bone's joint is its bind
position (the body's origin; a few of the XML's joints sit up to 5 mm from it, which only moves where a
pose bends).

Poses (`draw_pose`, the families of `mammal.FAMILIES`): our own joint rotations, drawn at random, not fitted
to data: "rest" the bind pose (standing on four legs), "walk" legs swung in a trot, "turn" the spine and
neck bent to one side by 40-150 deg in all (a curled mouse at the top of the range), "rear" the body
pitched up 50-80 deg on its hind legs with the forelimbs raised, "groom" sitting up 35-55 deg, head bowed,
forepaws to the face. Every family also crouches (the rat's bind pose stands tall), curves the tail on the
floor, turns each spine, neck and tail joint by up to 5 deg more, and then pitches the tail at its base
until it rests on the floor (`_tail_to_floor`).
"""

from __future__ import annotations

import hashlib
import math
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mouserecon.eval.mammal import MeshMiceError, SkinnedMesh, euler, repo_reader, skin

ASSETS = "dm_control/locomotion/walkers/assets/"
RODENT_FILES = (ASSETS + "rodent_walker_skin.skn", ASSETS + "rodent.xml")
BODY_MM = 90.0  # snout tip to tail base after scaling (an adult mouse: 80-100 mm)
SPINE = tuple(f"vertebra_{i}" for i in range(1, 7))  # torso -> pelvis
NECK = ("vertebra_cervical_5", "vertebra_cervical_4", "vertebra_cervical_3", "vertebra_cervical_2",
        "vertebra_cervical_1", "vertebra_axis", "vertebra_atlant")
TAIL = tuple(f"vertebra_C{i}" for i in range(1, 31))
TAIL_BASE = "vertebra_C1"
# Skin parts for `mesh_mice.paint` (as its PARTS): no ear or nose bones, so the ears and nose wear fur.
PARTS = {"ears": (), "tail": ("vertebra_C",), "paws": ("hand_", "finger_", "foot_", "toe_"), "nose": ()}
_NAME_BYTES = 40


def read_skin(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """A MuJoCo skin file's bytes -> (vertices [N, 3], faces [F, 3], bone names [J], bind positions [J, 3],
    weights [N, J]); raises MeshMiceError naming `where` and the defect."""
    def take(offset: int, dtype, count: int) -> tuple[np.ndarray, int]:
        size = np.dtype(dtype).itemsize * count
        if offset + size > len(data):
            raise MeshMiceError(f"{where}: truncated skin file ({len(data)} bytes, needs more than {offset + size})")
        return np.frombuffer(data, dtype, count, offset), offset + size

    header, at = take(0, "<i4", 4)
    nvert, ntex, nface, nbone = (int(x) for x in header)
    if min(nvert, nface, nbone) < 1 or ntex < 0:
        raise MeshMiceError(f"{where}: skin header says {nvert} vertices, {nface} faces, {nbone} bones")
    vertices, at = take(at, "<f4", 3 * nvert)
    _, at = take(at, "<f4", 2 * ntex)
    faces, at = take(at, "<i4", 3 * nface)
    names, bind, weights = [], np.zeros((nbone, 3)), np.zeros((nvert, nbone))
    for j in range(nbone):
        name, at = take(at, "u1", _NAME_BYTES)
        names.append(name.tobytes().split(b"\0")[0].decode())
        pose, at = take(at, "<f4", 7)
        bind[j] = pose[:3]
        (count,), at = take(at, "<i4", 1)
        ids, at = take(at, "<i4", int(count))
        w, at = take(at, "<f4", int(count))
        if count and (ids.min() < 0 or ids.max() >= nvert):
            raise MeshMiceError(f"{where}: bone {names[-1]!r} weights vertex ids outside 0..{nvert - 1}")
        weights[ids, j] += w
    if at != len(data):
        raise MeshMiceError(f"{where}: {len(data) - at} bytes after the last bone")
    faces = faces.reshape(-1, 3).astype(np.int64)
    if faces.min() < 0 or faces.max() >= nvert:
        raise MeshMiceError(f"{where}: faces index vertices {faces.min()}..{faces.max()}, have {nvert}")
    sums = weights.sum(1)
    if np.abs(sums - 1.0).max() > 0.01:
        k = int(np.abs(sums - 1.0).argmax())
        raise MeshMiceError(f"{where}: the skinning weights of vertex {k} sum to {sums[k]:.3f}, expected 1")
    return vertices.reshape(-1, 3).astype(np.float64), faces, names, bind, weights / sums[:, None]


def body_parents(xml_text: str, names: list[str], where: str) -> list[int]:
    """Each bone's parent index (-1 for the root) from the MJCF body tree; bones must be bodies, listed
    parents first, with one root."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as err:
        raise MeshMiceError(f"{where}: not XML ({err})") from None
    parent_of = {}

    def walk(element, parent: str | None) -> None:
        for child in element:
            name = child.get("name") if child.tag == "body" else None
            if name is not None:
                parent_of[name] = parent
            walk(child, name if name is not None else parent)
    walk(root, None)
    missing = [n for n in names if n not in parent_of]
    if missing:
        raise MeshMiceError(f"{where}: no bodies named {missing[:5]} for the skin's bones")
    index = {n: j for j, n in enumerate(names)}
    parents = []
    for j, name in enumerate(names):
        p = parent_of[name]
        while p is not None and p not in index:  # a body without skin between two bones
            p = parent_of[p]
        parents.append(-1 if p is None else index[p])
    if parents[0] != -1 or not all(0 <= p < j for j, p in enumerate(parents) if j):
        raise MeshMiceError(f"{where}: the skin must list its root bone first and every bone after its parent")
    return parents


def load_rodent(path: str | Path) -> SkinnedMesh:
    """Read the virtual rodent (module docstring) from a dm_control checkout or bare repository -> SkinnedMesh
    in MAMMAL's model frame, metres, no keypoints."""
    path = Path(path)
    read, commit = repo_reader(path, RODENT_FILES[0], "dm_control")
    skin_bytes, xml_bytes = (read(name) for name in RODENT_FILES)
    vertices, faces, names, bind, weights = read_skin(skin_bytes, f"{path}: {RODENT_FILES[0]}")
    parents = body_parents(xml_bytes.decode(), names, f"{path}: {RODENT_FILES[1]}")
    to_model = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # x fwd -> -y
    f64 = lambda a: torch.as_tensor(a, dtype=torch.float64)
    source = {"path": str(path), "git_commit": commit, "files": list(RODENT_FILES),
              "files_sha1": hashlib.sha1(skin_bytes + xml_bytes).hexdigest()}
    return SkinnedMesh(f64(vertices) @ to_model.T, torch.as_tensor(faces), f64(weights), f64(bind) @ to_model.T,
                       torch.tensor(parents), tuple(names), (), source)


def scale_mm(mesh: SkinnedMesh) -> float:
    """mm per model unit that make the rest pose `BODY_MM` long from snout tip to tail base (along -y)."""
    snout = float(mesh.vertices[:, 1].min())  # the most forward (-y) vertex
    base = float(mesh.joints[mesh.index([TAIL_BASE])[0], 1])
    return BODY_MM / (base - snout)


def _tail_to_floor(mesh: SkinnedMesh, rotations: Tensor) -> float:
    """Pitch the tail at its base (and back at TAIL[12], where the bind pose's tail meets the floor, so its
    lying part keeps its slope) until its lowest point is level with the rest of the body's: bisection on the
    pitch, in place; returns the pitch (deg, > 0 raises the tail). The posed tail otherwise hangs below the
    feet or floats, since the body's pose moved the pelvis."""
    base, lying = mesh.index([TAIL_BASE, TAIL[12]])
    tail = mesh.weights[:, mesh.index(TAIL)].sum(1) >= 0.5
    start_base, start_lying = rotations[base].clone(), rotations[lying].clone()

    def gap(pitch: float) -> float:
        # a backward bone's tip falls as `euler`'s pitch (for a forward one) rises
        rotations[base], rotations[lying] = start_base @ euler(0.0, -pitch), euler(0.0, pitch) @ start_lying
        z = skin(mesh, rotations)[0][:, 2]
        return float(z[tail].min() - z[~tail].min())
    lo, hi = -80.0, 80.0
    if gap(lo) > 0.0:  # the tail clears the floor even hanging steepest
        return lo
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gap(mid) > 0.0 else (mid, hi)
    gap(hi)
    return hi


def draw_pose(mesh: SkinnedMesh, family: str, rng: np.random.Generator) -> tuple[Tensor, dict]:
    """Rotations [J, 3, 3] (as `mammal.forward_kinematics`) of one pose of `family` and its record (the drawn
    angles, deg). See the module docstring for what each family does."""
    rotations = torch.eye(3, dtype=torch.float64).repeat(len(mesh.joints), 1, 1)
    drawn: dict[str, list[float]] = {}

    def turn(names, yaw: float, pitch: float) -> None:  # every joint of `names` by the same yaw, pitch
        for j, name in zip(mesh.index(names), names):
            rotations[j] = rotations[j] @ euler(yaw, pitch)
            drawn[name] = [round(a + b, 3) for a, b in zip(drawn.get(name, [0.0, 0.0]), (yaw, pitch))]

    u = lambda lo, hi: float(rng.uniform(lo, hi))
    side = 1.0 if rng.random() < 0.5 else -1.0
    # A mouse stands lower than the rat's bind pose: every family crouches, thighs forward, shins and forearms
    # back, feet and hands flat again.
    for thigh, shin, foot, a, b in (("upper_leg_", "lower_leg_", "foot_", u(15.0, 30.0), u(25.0, 45.0)),
                                    ("upper_arm_", "lower_arm_", "hand_", -u(5.0, 15.0), -u(10.0, 25.0))):
        turn([thigh + "L", thigh + "R"], 0.0, a)
        turn([shin + "L", shin + "R"], 0.0, -b)
        turn([foot + "L", foot + "R"], 0.0, b - a)
    if family == "walk":
        swing = u(10.0, 30.0)
        turn(["upper_leg_L", "scapula_R"], 0.0, swing)
        turn(["upper_leg_R", "scapula_L"], 0.0, -swing)
        turn(NECK[:1], u(-15.0, 15.0), u(-10.0, 15.0))
    elif family == "turn":
        bend = side * u(40.0, 150.0)
        turn(SPINE, -0.6 * bend / len(SPINE), u(-3.0, 3.0))  # the hind body swings round to the same side
        turn(NECK[:5], 0.4 * bend / 5, u(-3.0, 3.0))
    elif family in ("rear", "groom"):
        up = u(40.0, 65.0) if family == "rear" else u(20.0, 35.0)
        turn(["torso"], u(-10.0, 10.0), up)  # the root: the whole body nose up about the chest
        turn(["upper_leg_L", "upper_leg_R"], 0.0, -up * u(0.7, 1.0))  # hind legs back under the body
        turn([TAIL_BASE], 0.0, -up)  # the tail back out behind (`_tail_to_floor` sets its slope)
        if family == "rear":
            turn(NECK[:1], u(-20.0, 20.0), -u(10.0, 35.0))
            turn(["scapula_L", "scapula_R"], 0.0, u(-10.0, 30.0))  # forelimbs off the floor
        else:
            turn(NECK[:1], u(-10.0, 10.0), -u(30.0, 50.0))  # head bowed
            turn(["upper_arm_L", "upper_arm_R"], 0.0, u(20.0, 45.0))  # forepaws up to the face
            turn(["lower_arm_L", "lower_arm_R"], 0.0, u(20.0, 50.0))
    elif family != "rest":
        raise MeshMiceError(f"unknown pose family {family!r}")
    curve = u(-90.0, 90.0)  # the tail's floor-lying part curved by this much in all, as a smooth arc or an S
    wave = 1.0 if rng.random() < 0.5 else -1.0
    lying = TAIL[12:]
    for k, name in enumerate(lying):
        shape = 1.0 if wave > 0 else math.cos(math.pi * k / (len(lying) - 1))
        turn([name], curve * shape / len(lying), 0.0)
    for name in SPINE + NECK + TAIL:
        turn([name], u(-5.0, 5.0), u(-5.0, 5.0))
    turn([TAIL[12]], 0.0, -sum(drawn.get(n, [0.0, 0.0])[1] for n in ("torso",) + SPINE + ("pelvis",) + TAIL[:12]))
    floor_pitch = _tail_to_floor(mesh, rotations)
    return rotations, {"family": family, "generator": "mouserecon.eval.rodent.draw_pose", "yaw_pitch_deg": drawn,
                       "tail_to_floor_pitch_deg": round(floor_pitch, 3)}
