"""The MAMMAL_mouse articulated mouse: reading the mesh, posing it, and fitting it to the labelled frames.

Mesh: MAMMAL_mouse (github.com/anl13/MAMMAL_mouse, `mouse_model/`: 14522 vertices, 28800 faces, 140 joints
with rest positions and parents, skinning weights, a map of the 22 DANNCE keypoints), itself extracted from
the Bolanos et al. 2021 virtual C57BL/6 mouse; read at run time from a checkout or its bare git repository
(`load_mammal`), never copied here. Model frame: +x the mouse's left, -y forward (snout), +z up (dorsal).
Posed by our linear-blend skinning (`forward_kinematics`, `skin`: each joint turns its subtree about its
rest position).

Poses (`FAMILIES`): "rest" is MAMMAL's template pose (legs splayed); walk, turn, rear and groom come from
the real mouse: the mesh is fitted to the recording's 81 labelled frames (`fit_labeled_poses`: one scale,
per-frame heading, translation and joint rotations under a pose prior), each frame gets a family from its
labels (`classify`), and a sample takes a fit of its family with its spine, neck and tail turned up to 5 deg
more (`draw_pose`). `mouserecon.eval.mesh_mice` places, paints and renders the posed mesh.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mouserecon.errors import MouseReconError
from mouserecon.synth.trace import one_thread


class MeshMiceError(MouseReconError, ValueError):
    """Bad mesh data, rig files or options; the message names the file or option and the defect."""


# ---- the mesh ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkinnedMesh:
    """A rest-pose mesh with a joint tree.

    vertices [N, 3] float64 (model units), faces [F, 3] int64, weights [N, J] float64 (rows sum to 1),
    joints [J, 3] float64 rest positions, parents [J] int64 (-1 for the root, parents[j] < j),
    names: J joint names. keypoints: for each of the 22 DANNCE keypoints (`names22` order), ("V", vertex
    ids) or ("J", joint ids) whose mean it is; empty when unknown. source: where it was read (for records).
    """

    vertices: Tensor
    faces: Tensor
    weights: Tensor
    joints: Tensor
    parents: Tensor
    names: tuple[str, ...]
    keypoints: tuple[tuple[str, tuple[int, ...]], ...] = ()
    source: dict | None = None

    def index(self, names) -> list[int]:
        missing = [n for n in names if n not in self.names]
        if missing:
            raise MeshMiceError(f"{(self.source or {}).get('path', 'the mesh')}: no joints named {missing}")
        return [self.names.index(n) for n in names]


MAMMAL_FILES = tuple(f"mouse_model/mouse_txt/{n}.txt" for n in (
    "vertices", "faces_vert", "skinning_weights", "t_pose_joints", "parents", "joint_names")) + (
    "mouse_model/keypoint22_mapper.json",)


def repo_reader(path: Path, probe: str, label: str):
    """(name -> bytes of that file of a repository, its git commit or None), for a checkout or a bare git
    repository (e.g. a mirror). probe: a file any checkout has; label: the repository's name, for errors."""
    if (path / probe).is_file():
        return (lambda name: (path / name).read_bytes()), None
    if not ((path / "HEAD").is_file() and (path / "objects").is_dir()):
        raise MeshMiceError(f"{path}: not a {label} checkout (no {probe}) nor its bare git repository")

    def show(name: str) -> bytes:
        run = subprocess.run(["git", "--git-dir", str(path), "show", f"HEAD:{name}"], capture_output=True)
        if run.returncode:
            raise MeshMiceError(f"{path}: cannot read {name} from the git repository "
                                f"({run.stderr.decode(errors='replace').strip()})")
        return run.stdout
    head = subprocess.run(["git", "--git-dir", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return show, head.stdout.strip() or None


def _table(text: str, name: str, path: Path, columns: int, dtype) -> np.ndarray:
    try:
        table = np.loadtxt(text.splitlines(), dtype=dtype, ndmin=2)
    except ValueError as err:
        raise MeshMiceError(f"{path}: {name} is not a numeric table ({err})") from None
    if table.shape[1] != columns:
        raise MeshMiceError(f"{path}: {name} has {table.shape[1]} columns, expected {columns}")
    return table


def _keypoint_map(text: str, path: Path, n: int, j: int) -> tuple:
    try:
        entries = sorted((e for e in json.loads(text)["mapper"] if e["keypoint"] < 22), key=lambda e: e["keypoint"])
        mapped = tuple((e["type"], tuple(int(i) for i in e["ids"])) for e in entries)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MeshMiceError(f"{path}: keypoint22_mapper.json is not a list of {{keypoint, type, ids}} "
                            f"({err})") from None
    in_range = lambda kind, ids: ids and min(ids) >= 0 and max(ids) < {"V": n, "J": j}.get(kind, 0)
    if [e["keypoint"] for e in entries] != list(range(22)) or not all(in_range(*m) for m in mapped):
        raise MeshMiceError(f"{path}: keypoint22_mapper.json must map keypoints 0-21 to vertex (V) or joint (J) "
                            "ids in range")
    return mapped


def load_mammal(path: str | Path) -> SkinnedMesh:
    """Read MAMMAL_mouse's articulated mouse (see the module docstring) -> SkinnedMesh; checks every table."""
    path = Path(path)
    read, commit = repo_reader(path, MAMMAL_FILES[0], "MAMMAL_mouse")
    texts = {Path(name).stem: read(name).decode() for name in MAMMAL_FILES}
    vertices = _table(texts["vertices"], "vertices.txt", path, 3, np.float64)
    faces = _table(texts["faces_vert"], "faces_vert.txt", path, 3, np.int64)
    triples = _table(texts["skinning_weights"], "skinning_weights.txt", path, 3, np.float64)  # joint, vertex, w
    joints = _table(texts["t_pose_joints"], "t_pose_joints.txt", path, 3, np.float64)
    parents = _table(texts["parents"], "parents.txt", path, 1, np.int64)[:, 0]
    names = tuple(texts["joint_names"].split())
    n, j = len(vertices), len(joints)
    if len(parents) != j or len(names) != j or len(set(names)) != j:
        raise MeshMiceError(f"{path}: {j} joints but {len(parents)} parents and {len(names)} names (unique needed)")
    if parents[0] != -1 or not all(0 <= parents[k] < k for k in range(1, j)):
        raise MeshMiceError(f"{path}: parents.txt must list the root first (-1) and every parent before its child")
    if faces.min() < 0 or faces.max() >= n:
        raise MeshMiceError(f"{path}: faces_vert.txt indexes vertices {faces.min()}..{faces.max()}, have {n}")
    joint_ids, vertex_ids = triples[:, 0].astype(np.int64), triples[:, 1].astype(np.int64)
    if joint_ids.min() < 0 or joint_ids.max() >= j or vertex_ids.min() < 0 or vertex_ids.max() >= n:
        raise MeshMiceError(f"{path}: skinning_weights.txt indexes a joint or vertex out of range")
    weights = np.zeros((n, j))
    np.add.at(weights, (vertex_ids, joint_ids), triples[:, 2])
    error = np.abs(weights.sum(1) - 1.0)
    if error.max() > 0.01:
        raise MeshMiceError(f"{path}: the skinning weights of vertex {int(error.argmax())} sum to "
                            f"{weights.sum(1)[error.argmax()]:.3f}, expected 1")
    digest = hashlib.sha1("".join(texts[k] for k in sorted(texts)).encode()).hexdigest()
    source = {"path": str(path), "git_commit": commit, "files_sha1": digest, "files": list(MAMMAL_FILES)}
    f64 = lambda a: torch.as_tensor(a, dtype=torch.float64)
    return SkinnedMesh(f64(vertices), torch.as_tensor(faces), f64(weights / weights.sum(1, keepdims=True)), f64(joints),
                       torch.as_tensor(parents), names, _keypoint_map(texts["keypoint22_mapper"], path, n, j), source)


def forward_kinematics(joints: Tensor, parents: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
    """Rest joints [J, 3], parents [J] (-1 = root, parents[j] < j) and rotations [..., J, 3, 3] (each about
    its joint's rest position, rest-frame axes) -> each joint's transform T_j(x) = linear_j x + offset_j of
    rest points: linear [..., J, 3, 3], offset [..., J, 3]. T_j(x) = T_parent(J_j + R_j (x - J_j)), the
    root's parent being the identity. Differentiable."""
    num = len(joints)
    assert rotations.shape[-3:] == (num, 3, 3), f"rotations must be [..., {num}, 3, 3], got {tuple(rotations.shape)}"
    local = joints - (rotations @ joints[:, :, None])[..., 0]  # [..., J, 3]
    linear, offset = [], []
    for j in range(num):
        p = int(parents[j])
        if p < 0:
            linear.append(rotations[..., j, :, :])
            offset.append(local[..., j, :])
        else:
            linear.append(linear[p] @ rotations[..., j, :, :])
            offset.append((linear[p] @ local[..., j, :, None])[..., 0] + offset[p])
    return torch.stack(linear, -3), torch.stack(offset, -2)


def skin(mesh: SkinnedMesh, rotations: Tensor) -> tuple[Tensor, Tensor]:
    """Linear-blend skinning: rotations [J, 3, 3] (as `forward_kinematics`) -> (posed vertices [N, 3],
    posed joints [J, 3]); a vertex goes to sum_j w_j T_j(v). Identity rotations give the rest pose."""
    linear, offset = forward_kinematics(mesh.joints, mesh.parents, rotations.to(torch.float64))
    blended = torch.einsum("nj,jab->nab", mesh.weights, linear)  # [N, 3, 3]
    vertices = (blended @ mesh.vertices[:, :, None])[:, :, 0] + mesh.weights @ offset
    return vertices, (linear @ mesh.joints[:, :, None])[:, :, 0] + offset


# ---- poses ------------------------------------------------------------------------------------

FAMILIES = ("rest", "walk", "turn", "rear", "groom")
SPINE = ("lumbar_vertebrae_2", "lumbar_vertebrae_3", "thoracic_vertebrae_0", "thoracic_vertebrae_1",
         "thoracic_vertebrae_2")
NECK = ("cervical_vertebrae_0", "cervical_vertebrae_1", "skull")
TAIL = tuple(f"tail_{i}" for i in range(10))
LIMBS = tuple(f"{bone}_{side}" for side in "lr" for bone in (
    "perlvis", "femur", "tibia", "hind_paw", "scapula", "humerus", "ulna", "fore_paw"))
FIT_JOINTS = ("root", "lumbar_vertebrae_1", "lumbar_vertebrae_0") + SPINE + NECK + TAIL + LIMBS
# The labels' "Tail(end)" sits ~62 mm along the tail from its base (median over the 81 frames), where the
# mesh has its tail_7 joint at ~125 mm/unit, not at the mesh's tip (~91 mm) where MAMMAL's map puts it;
# fitting it to the tip curls the tail up.
TAIL_END = (7, "tail_7")
FIT_STEPS = 300
POSE_PRIOR = 1.0  # mm^2 of keypoint error per rad^2 of joint rotation
SCALE_PRIOR_MM = 125.0


def euler(yaw_deg: float, pitch_deg: float) -> Tensor:
    """Rotation [3, 3] float64 in the model frame: pitch about -x (a forward bone's tip rises), then yaw about
    +z (a forward bone turns to the mouse's left)."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    about_z = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    about_x = torch.tensor([[1, 0, 0], [0, math.cos(pitch), math.sin(pitch)], [0, -math.sin(pitch), math.cos(pitch)]])
    return (about_z @ about_x).double()


def axis_angle(vectors: Tensor) -> Tensor:
    """Rotation vectors [..., 3] (axis * angle, rad) -> rotations [..., 3, 3] (Rodrigues; smooth at 0)."""
    angle = (vectors.square().sum(-1, keepdim=True) + 1e-12).sqrt()[..., None]  # [..., 1, 1]
    x, y, z = (vectors / angle[..., 0]).unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*vectors.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=vectors.dtype).expand_as(cross)
    return eye + angle.sin() * cross + (1.0 - angle.cos()) * cross @ cross


def rot_z(angle: Tensor) -> Tensor:
    """Rotations [..., 3, 3] about +z by angle [...] (rad)."""
    c, s, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], -1).reshape(*angle.shape, 3, 3)


def mesh_keypoints(mesh: SkinnedMesh, linear: Tensor, offset: Tensor) -> Tensor:
    """The 22 mapped keypoints [..., 22, 3] (model units) of a pose given as `forward_kinematics` output."""
    joints = (linear @ mesh.joints[:, :, None])[..., 0] + offset  # [..., J, 3]
    points = []
    for kind, ids in mesh.keypoints:
        ids = list(ids)
        if kind == "J":
            points.append(joints[..., ids, :].mean(-2))
        else:  # skin just these vertices
            w = mesh.weights[ids]  # [k, J]
            blended = torch.einsum("kj,...jab->...kab", w, linear)  # [..., k, 3, 3]
            moved = (blended @ mesh.vertices[ids, :, None])[..., 0] + w @ offset
            points.append(moved.mean(-2))
    return torch.stack(points, -2)


def keypoint_mesh(mesh: SkinnedMesh) -> tuple[SkinnedMesh, Tensor]:
    """The part of `mesh` its keypoints depend on -> (a SkinnedMesh of just the keypoints' vertices and the
    joints that move them, with their ancestors, keypoints re-indexed; the kept joints' ids [K] in `mesh`)."""
    vertex_ids = sorted({i for kind, ids in mesh.keypoints if kind == "V" for i in ids})
    needed = {i for kind, ids in mesh.keypoints if kind == "J" for i in ids}
    needed |= set(torch.nonzero(mesh.weights[vertex_ids].sum(0) > 0).squeeze(1).tolist())
    for j in list(needed):
        while j >= 0:
            needed.add(j)
            j = int(mesh.parents[j])
    kept = sorted(needed)
    joint_at, vertex_at = {j: k for k, j in enumerate(kept)}, {v: k for k, v in enumerate(vertex_ids)}
    parents = torch.tensor([joint_at.get(int(mesh.parents[j]), -1) for j in kept])
    keypoints = tuple((kind, tuple((joint_at if kind == "J" else vertex_at)[i] for i in ids))
                      for kind, ids in mesh.keypoints)
    weights = mesh.weights[vertex_ids][:, kept]
    small = SkinnedMesh(mesh.vertices[vertex_ids], torch.empty(0, 3, dtype=torch.int64),
                        weights / weights.sum(1, keepdim=True), mesh.joints[kept], parents,
                        tuple(mesh.names[j] for j in kept), keypoints, mesh.source)
    return small, torch.tensor(kept)


@dataclass(frozen=True)
class LabeledPose:
    """The mesh fitted to one labelled frame: its video frame, pose family (`classify`), joint rotations
    [J, 3, 3], mm per model unit, the fit's keypoint RMS error (mm) and the labelled keypoints used."""

    frame: int
    family: str
    rotations: Tensor
    scale_mm: float
    rmse_mm: float
    keypoints_used: int


def classify(labels: np.ndarray, names: list[str]) -> str:
    """The pose family of one frame's 22 labelled keypoints [22, 3] (mm, z up; NaN = unlabelled): "rear"
    (snout >= 45 mm high), "groom" (a forepaw within 13 mm of the snout), "turn" (body axis bent >= 40 deg:
    tail base -> mid spine against front spine -> snout, seen from above), else "walk"."""
    k = {n: labels[i] for i, n in enumerate(names)}
    if k["Snout"][2] >= 45.0:
        return "rear"
    paws = [np.linalg.norm(k[p] - k["Snout"]) for p in ("ForepawL", "ForepawR")]
    if np.nanmin(paws + [np.inf]) <= 13.0:
        return "groom"
    back, front = (k["SpineM"] - k["Tail(base)"])[:2], (k["Snout"] - k["SpineF"])[:2]
    bend = math.degrees(abs(math.atan2(back[0] * front[1] - back[1] * front[0], back @ front)))
    return "turn" if bend >= 40.0 else "walk"


def fit_labeled_poses(mesh: SkinnedMesh, labels: np.ndarray, frames: np.ndarray, names: list[str],
                      steps: int = FIT_STEPS) -> list[LabeledPose]:
    """Fit the mesh to labelled frames of one mouse (keypoints [B, 22, 3] mm, NaN = unlabelled), all at once.

    Unknowns: one scale (mm per unit) for all frames; per frame a heading (about +z), a translation and the
    rotation vectors of `FIT_JOINTS` (root included, so the body may tilt, but every rotation pays
    `POSE_PRIOR`). Loss = mean squared keypoint error (mm^2) + POSE_PRIOR * sum |rotation vector|^2, the
    "Tail(end)" label fitted to `TAIL_END`'s joint. Adam, `steps` steps, from the rest pose at the heading
    tail base -> front spine. Runs with one torch thread (`one_thread`: many small ops).
    """
    if len(mesh.keypoints) != 22:
        raise MeshMiceError("the mesh has no keypoint map; cannot fit it to labelled keypoints")
    tail_end = list(mesh.keypoints)
    tail_end[TAIL_END[0]] = ("J", tuple(mesh.index([TAIL_END[1]])))
    small, kept = keypoint_mesh(replace(mesh, keypoints=tuple(tail_end)))
    b = len(labels)
    target = torch.as_tensor(np.nan_to_num(labels), dtype=torch.float64)  # [B, 22, 3]
    valid = torch.as_tensor(np.isfinite(labels).all(-1))  # [B, 22]
    if bool((valid.sum(1) < 6).any()):
        raise MeshMiceError(f"frame {int(frames[int(torch.argmin(valid.sum(1)))])} has fewer than 6 labelled keypoints")
    mesh.index(FIT_JOINTS)  # all must exist; those no keypoint depends on (the tail past tail_7) stay at rest
    fit_ids = torch.tensor(small.index([n for n in FIT_JOINTS if n in small.names]))
    back = target[:, names.index("SpineF"), :2] - target[:, names.index("Tail(base)"), :2]
    yaw = (torch.atan2(back[:, 1], back[:, 0]) + math.pi / 2).requires_grad_()  # model forward is -y
    shift = (target[:, names.index("SpineM")] * torch.tensor([1.0, 1.0, 0.0])).requires_grad_()
    log_scale = torch.tensor(math.log(SCALE_PRIOR_MM), dtype=torch.float64, requires_grad=True)
    vectors = torch.zeros(b, len(fit_ids), 3, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [vectors, yaw], "lr": 0.03}, {"params": [shift], "lr": 1.0},
                                  {"params": [log_scale], "lr": 0.01}])
    eye = torch.eye(3, dtype=torch.float64).repeat(b, len(small.joints), 1, 1)
    with one_thread():
        for _ in range(steps):
            error = _keypoint_error(small, eye, fit_ids, vectors, yaw, shift, log_scale, target)  # [B, 22]
            loss = (error * valid).sum(1) / valid.sum(1) + POSE_PRIOR * vectors.square().sum((1, 2))
            optimiser.zero_grad()
            loss.sum().backward()
            optimiser.step()
    with torch.no_grad():
        rmse = ((_keypoint_error(small, eye, fit_ids, vectors, yaw, shift, log_scale, target) * valid).sum(1) /
                valid.sum(1)).sqrt()
        rotations = torch.eye(3, dtype=torch.float64).repeat(b, len(mesh.joints), 1, 1)
        rotations[:, kept[fit_ids]] = axis_angle(vectors)
    scale = float(log_scale.detach().exp())
    return [LabeledPose(int(frames[i]), classify(labels[i], names), rotations[i], scale, float(rmse[i]),
                        int(valid[i].sum())) for i in range(b)]


def _keypoint_error(mesh, eye, fit_ids, vectors, yaw, shift, log_scale, target) -> Tensor:
    """Squared distances [B, 22] (mm^2) between the posed, placed mesh keypoints and the labels."""
    linear, offset = forward_kinematics(mesh.joints, mesh.parents, eye.index_copy(1, fit_ids, axis_angle(vectors)))
    model = mesh_keypoints(mesh, linear, offset)  # [B, 22, 3]
    world = log_scale.exp() * (model @ rot_z(yaw).transpose(-1, -2)) + shift[:, None]
    return (world - target).square().sum(-1)


def draw_pose(mesh: SkinnedMesh, poses: list[LabeledPose], family: str,
              rng: np.random.Generator) -> tuple[Tensor, dict]:
    """Rotations [J, 3, 3] of one pose of `family` and its record: "rest" is the mesh's rest pose; the others
    a labelled frame's fit (`poses`, drawn among those `classify` put in the family) with every spine,
    neck and tail joint turned by up to 5 deg more (yaw and pitch), so no two samples repeat a pose."""
    if family == "rest":
        return torch.eye(3, dtype=torch.float64).repeat(len(mesh.joints), 1, 1), {"family": family}
    pool = [p for p in poses if p.family == family]
    if not pool:
        raise MeshMiceError(f"no labelled frame has the pose family {family!r} (families: {FAMILIES})")
    fitted = pool[int(rng.integers(len(pool)))]
    rotations = fitted.rotations.clone()
    extra = {}
    for j, name in zip(mesh.index(SPINE + NECK + TAIL), SPINE + NECK + TAIL):
        extra[name] = (float(rng.uniform(-5.0, 5.0)), float(rng.uniform(-5.0, 5.0)))
        rotations[j] = rotations[j] @ euler(*extra[name])
    return rotations, {"family": family, "labelled_frame": fitted.frame, "fit_rmse_mm": fitted.rmse_mm,
                       "fit_keypoints": fitted.keypoints_used, "extra_yaw_pitch_deg": extra}
