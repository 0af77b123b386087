"""A procedural mouse: random anatomy, pose and coat -> a smooth-union SDF `Shape` (millimetres).

World: +Z up, ground plane z = 0, the mouse stands on it (its lowest point touches z = 0).
The mouse is built for a reference nose-to-rump length of ~87 mm with the hips above the local
origin and heading +x, then scaled to the drawn body length, turned to a random heading and
moved to a random spot near the arena point (0, 0).

Poses: "walk" (four paws on the ground, small stride), "rear" (body pitched up on the hind
legs, forepaws held in front of the chest), "turn" (spine and head bent to one side, a curled
body), "hunch" (compact, head low). Coats: black, agouti, white (albino: pink ears, tail and
paws, red eyes), plus brown and grey, each with per-sample brightness and tint variation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mouserecon.synth.sdf import Part, Shape
from mouserecon.synth.trace import TraceConfig, one_thread, sphere_trace

REFERENCE_LENGTH_MM = 87.0
POSES = ("walk", "rear", "turn", "hunch")
POSE_WEIGHTS = (0.4, 0.2, 0.25, 0.15)

# sRGB albedos: body dorsal, body ventral, ears, tail, paws, eyes.
COATS = {
    "black": ((0.05, 0.045, 0.042), (0.08, 0.07, 0.065), (0.25, 0.18, 0.18), (0.22, 0.17, 0.16),
              (0.50, 0.37, 0.36), (0.01, 0.01, 0.01)),
    "agouti": ((0.38, 0.29, 0.19), (0.72, 0.64, 0.52), (0.58, 0.44, 0.40), (0.48, 0.38, 0.34),
               (0.80, 0.60, 0.54), (0.01, 0.01, 0.01)),
    "white": ((0.93, 0.91, 0.86), (0.95, 0.93, 0.89), (0.96, 0.72, 0.70), (0.93, 0.74, 0.70),
              (0.97, 0.72, 0.69), (0.55, 0.06, 0.08)),
    "brown": ((0.24, 0.15, 0.09), (0.36, 0.25, 0.17), (0.45, 0.32, 0.30), (0.40, 0.30, 0.27),
              (0.72, 0.52, 0.48), (0.01, 0.01, 0.01)),
    "grey": ((0.45, 0.44, 0.43), (0.62, 0.61, 0.59), (0.60, 0.48, 0.47), (0.55, 0.46, 0.44),
             (0.80, 0.62, 0.58), (0.01, 0.01, 0.01)),
}
COAT_WEIGHTS = {"black": 0.3, "agouti": 0.3, "white": 0.25, "brown": 0.075, "grey": 0.075}


@dataclass(frozen=True)
class MouseParams:
    """Everything drawn for one mouse (angles in degrees, lengths in mm); recorded in synth.json."""

    pose: str
    body_length_mm: float
    heading_deg: float
    position_mm: tuple[float, float]
    spine_pitch_deg: float  # hips -> chest, up from horizontal
    chest_pitch_deg: float  # extra pitch of chest -> neck
    spine_yaw_deg: tuple[float, float]  # bend at the hips and at the chest (same sign: curled)
    head_yaw_deg: float
    head_pitch_deg: float
    girth: float
    head_scale: float
    ear_scale: float
    leg_scale: float
    tail_length: float  # relative to the body length
    tail_curvature: float  # rad per tail segment
    tail_wiggle: float
    tail_lift: float  # 0 = resting on the ground after the base, 1 = held clear
    strides: tuple[float, float, float, float]  # fore-left, fore-right, hind-left, hind-right (mm)
    coat: str
    brightness: float
    tint: tuple[float, float, float]


def sample_params(rng: np.random.Generator) -> MouseParams:
    u = rng.uniform
    pose = str(rng.choice(POSES, p=POSE_WEIGHTS))
    pitch = {"walk": u(-6, 8), "rear": u(35, 70), "turn": u(-6, 8), "hunch": u(4, 16)}[pose]
    chest = {"walk": u(-5, 8), "rear": u(-5, 15), "turn": u(-5, 8), "hunch": u(-18, -5)}[pose]
    if pose == "turn":
        side = rng.choice([-1.0, 1.0])
        yaw = (side * u(20, 45), side * u(20, 45))
    else:
        yaw = (u(-12, 12), u(-12, 12))
    coat = str(rng.choice(list(COAT_WEIGHTS), p=list(COAT_WEIGHTS.values())))
    return MouseParams(
        pose=pose, body_length_mm=u(70, 100), heading_deg=u(0, 360), position_mm=(u(-15, 15), u(-15, 15)),
        spine_pitch_deg=pitch, chest_pitch_deg=chest, spine_yaw_deg=yaw,
        head_yaw_deg=u(-35, 35), head_pitch_deg=u(-30, 25) if pose != "hunch" else u(-40, -10),
        girth=u(0.85, 1.2), head_scale=u(0.9, 1.1), ear_scale=u(0.85, 1.25), leg_scale=u(0.9, 1.1),
        tail_length=u(0.8, 1.15), tail_curvature=u(-0.25, 0.25), tail_wiggle=u(0.0, 0.25),
        tail_lift=float(rng.uniform() < 0.15) * u(0.3, 1.0),
        strides=tuple(u(-7, 7, size=4).tolist()), coat=coat,
        brightness=u(0.8, 1.2) if coat != "white" else u(0.92, 1.04), tint=tuple(u(0.96, 1.04, size=3).tolist()),
    )


# ---- small geometry helpers (numpy, float64) ----------------------------------------------------


def _direction(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    return np.array([math.cos(p) * math.cos(y), math.cos(p) * math.sin(y), math.sin(p)])


def _frame(forward: np.ndarray, up_hint=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Rotation [3, 3] with columns (forward, left, up), up as close to up_hint as possible."""
    x = forward / np.linalg.norm(forward)
    z = np.asarray(up_hint, dtype=float) - np.dot(up_hint, x) * x
    z /= np.linalg.norm(z)
    return np.stack([x, np.cross(z, x), z], axis=1)


def _two_bone(root: np.ndarray, target: np.ndarray, l1: float, l2: float, pole: np.ndarray) -> np.ndarray:
    """Joint position of a two-segment limb root -> joint -> target bending towards `pole`."""
    span = target - root
    d = min(np.linalg.norm(span), 0.98 * (l1 + l2))
    u = span / np.linalg.norm(span)
    along = (l1 * l1 - l2 * l2 + d * d) / (2 * d)
    across = math.sqrt(max(l1 * l1 - along * along, 0.0))
    v = pole - np.dot(pole, u) * u
    v /= np.linalg.norm(v)
    return root + along * u + across * v


class _Builder:
    """Collects ellipsoids and capsules with materials for one part."""

    def __init__(self) -> None:
        self.ellipsoids, self.capsules = [], []

    def ellipsoid(self, center, rotation, radii, dorsal, ventral=None, up=None, specular=0.05):
        up = rotation[:, 2] if up is None else up
        self.ellipsoids.append((center, rotation, radii, dorsal, dorsal if ventral is None else ventral, up, specular))

    def capsule(self, a, b, ra, rb, colour, specular=0.03):
        self.capsules.append((a, b, ra, rb, colour, colour, (0.0, 0.0, 1.0), specular))

    def part(self, name: str, k_inner: float, k_join: float) -> Part:
        t = lambda rows, i: torch.tensor(np.array([r[i] for r in rows], dtype=np.float64), dtype=torch.float32)
        kw = {}
        if self.ellipsoids:
            e = self.ellipsoids
            kw.update(centers=t(e, 0), rotations=t(e, 1), radii=t(e, 2))
        if self.capsules:
            c = self.capsules
            kw.update(a=t(c, 0), b=t(c, 1), radius_a=t(c, 2), radius_b=t(c, 3))
        rows = [(r[-4], r[-3], r[-2], r[-1]) for r in self.ellipsoids + self.capsules]
        return Part(name=name, k_inner=k_inner, k_join=k_join, dorsal=t(rows, 0), ventral=t(rows, 1),
                    up=t(rows, 2), specular=t(rows, 3), **kw)


def build_mouse(params: MouseParams) -> Shape:
    """The mouse of `params` as a Shape in world millimetres (+Z up, standing on z = 0)."""
    p = params
    dorsal, ventral, ear_c, tail_c, paw_c, eye_c = (
        np.clip(np.array(c) * p.brightness * np.array(p.tint), 0, 1) for c in COATS[p.coat]
    )
    g, hs, ls = p.girth, p.head_scale, p.leg_scale
    torso, limbs, ears, tail, eyes = _Builder(), _Builder(), _Builder(), _Builder(), _Builder()

    # Spine: hips -> chest -> neck -> head, each segment turned by its yaw/pitch.
    d1 = _direction(p.spine_yaw_deg[0], p.spine_pitch_deg)
    d2 = _direction(sum(p.spine_yaw_deg), p.spine_pitch_deg + p.chest_pitch_deg)
    hip_frame, chest_frame = _frame(d1), _frame(d2)
    hips = np.array([0.0, 0.0, 17.0 * g])
    chest = hips + 24.0 * d1
    neck = chest + 14.0 * d2
    d3 = _direction(sum(p.spine_yaw_deg) + p.head_yaw_deg,
                    p.spine_pitch_deg + p.chest_pitch_deg + p.head_pitch_deg)
    head_frame = _frame(d3)
    head = neck + 9.0 * hs * d3
    snout_dir = head_frame @ _direction(0.0, -18.0)
    snout_frame = _frame(snout_dir, head_frame[:, 2])

    torso.ellipsoid(hips, hip_frame, np.array([22.0, 14.5 * g, 12.5 * g]), dorsal, ventral)
    torso.ellipsoid(chest, chest_frame, np.array([17.0, 11.5 * g, 11.0 * g]), dorsal, ventral)
    torso.ellipsoid(neck + 2.0 * d2, chest_frame, np.array([9.0, 8.5 * g, 8.5 * g]), dorsal, ventral)
    torso.ellipsoid(head, head_frame, hs * np.array([12.0, 8.5, 8.0]), dorsal, ventral)
    torso.ellipsoid(head + hs * 10.0 * snout_dir, snout_frame, hs * np.array([8.5, 4.8, 4.4]), dorsal, ventral)
    nose = head + hs * 18.0 * snout_dir
    eyes.ellipsoid(nose, snout_frame, hs * np.array([1.6, 1.7, 1.5]), paw_c, specular=0.3)

    # Eyes (glossy) and ears (thin discs facing forward-outward, on top of the head).
    for side in (1.0, -1.0):
        lateral, up = head_frame[:, 1] * side, head_frame[:, 2]
        eye = head + hs * (5.0 * d3 + 6.0 * lateral + 2.8 * up)
        eyes.ellipsoid(eye, head_frame, hs * np.array([2.0, 1.9, 1.9]), eye_c, specular=0.5)
        ear_normal = 0.75 * d3 + 0.55 * lateral - 0.1 * up
        ear_frame = _frame(ear_normal, up)
        ear = head + hs * (-2.5 * d3 + 6.0 * lateral + 11.0 * up)
        ears.ellipsoid(ear, ear_frame, p.ear_scale * np.array([1.0, 7.0, 8.0]), ear_c, ear_c, up, specular=0.05)

    # Legs: two-bone chains solved to paw targets; the heading on the ground is the hips' yaw.
    heading = _direction(p.spine_yaw_deg[0], 0.0)
    left = np.cross([0.0, 0.0, 1.0], heading)
    for i, side in enumerate((1.0, -1.0)):
        # Hind leg: hip -> knee (bends forward) -> heel on the ground -> toes.
        hip_joint = hips - 8.0 * d1 + 8.0 * g * side * hip_frame[:, 1] - 3.0 * hip_frame[:, 2]
        heel = hip_joint + (p.strides[2 + i] - 4.0) * heading + 3.0 * side * left
        heel[2] = 1.4
        knee = _two_bone(hip_joint, heel, 15.0 * ls, 15.0 * ls, heading + 0.2 * side * left)
        limbs.capsule(hip_joint, knee, 5.5 * g, 3.2, dorsal)
        limbs.capsule(knee, heel, 3.0, 1.5, dorsal)
        limbs.capsule(heel, heel + 13.0 * ls * (heading + 0.15 * side * left), 1.6, 1.3, paw_c)
        # Foreleg: shoulder -> elbow (bends back) -> wrist -> paw.
        shoulder = chest + 3.0 * d2 + 6.0 * g * side * chest_frame[:, 1] - 5.0 * chest_frame[:, 2]
        if p.pose == "rear":
            wrist = shoulder + 6.0 * d2 - 11.0 * chest_frame[:, 2] + 1.5 * side * chest_frame[:, 1]
            finger = wrist + 4.0 * d2 - 1.5 * chest_frame[:, 2]
        else:
            wrist = shoulder + p.strides[i] * heading + 2.0 * side * left
            wrist[2] = 1.8
            finger = wrist + 5.5 * ls * heading + 0.8 * side * left
            finger[2] = 1.1
        elbow = _two_bone(shoulder, wrist, 11.0 * ls, 11.0 * ls, -heading - 0.3 * chest_frame[:, 2])
        limbs.capsule(shoulder, elbow, 4.0 * g, 2.4, dorsal)
        limbs.capsule(elbow, wrist, 2.2, 1.5, dorsal)
        limbs.capsule(wrist, finger, 1.5, 1.2, paw_c)

    # Tail: a tapered chain from the rump, sagging to the ground and curving on it.
    n_seg, length = 14, p.tail_length * REFERENCE_LENGTH_MM
    base = hips - 19.0 * d1 + 3.0 * hip_frame[:, 2]
    angle = math.atan2(-d1[1], -d1[0])
    radii = np.linspace(3.2, 0.7, n_seg + 1)
    point = base.copy()
    for j in range(n_seg):
        angle += p.tail_curvature + p.tail_wiggle * math.sin(1.3 * j)
        step = np.array([math.cos(angle), math.sin(angle), 0.0]) * length / n_seg
        nxt = point + step
        rest = radii[j + 1] + p.tail_lift * (base[2] - radii[j + 1]) * (1 - j / n_seg) * 0.8
        nxt[2] = rest + (base[2] - rest) * math.exp(-(j + 1) / 2.0)
        tail.capsule(point, nxt, radii[j], radii[j + 1], tail_c)
        point = nxt

    parts = [torso.part("torso", 4.0, 0.0), limbs.part("limbs", 1.0, 3.0), tail.part("tail", 0.0, 2.5),
             ears.part("ears", 0.0, 1.2), eyes.part("eyes", 0.0, 0.0)]
    shape = Shape(parts=tuple(parts), colour_blend=0.3)
    return _place(shape, p)


def _place(shape: Shape, p: MouseParams) -> Shape:
    """Drop onto z = 0, scale to the body length, turn to the heading, move to the position."""
    lift = -_lowest_point(shape)
    scale = p.body_length_mm / REFERENCE_LENGTH_MM
    yaw = math.radians(p.heading_deg)
    rot = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])
    offset = torch.tensor([p.position_mm[0], p.position_mm[1], 0.0])
    move = lambda x: (scale * (x + torch.tensor([0.0, 0.0, lift]))) @ rot.T + offset
    parts = []
    for q in shape.parts:
        parts.append(Part(
            name=q.name, k_inner=q.k_inner * scale, k_join=q.k_join * scale,
            centers=move(q.centers), rotations=rot @ q.rotations, radii=q.radii * scale,
            a=move(q.a), b=move(q.b), radius_a=q.radius_a * scale, radius_b=q.radius_b * scale,
            dorsal=q.dorsal, ventral=q.ventral, up=q.up @ rot.T, specular=q.specular,
        ))
    return Shape(parts=tuple(parts), colour_blend=shape.colour_blend * scale)


def _lowest_point(shape: Shape) -> float:
    """Height of the lowest surface point, found with vertical rays traced upwards.

    The smooth unions grow the shape below the primitives where parts meet (e.g. at the
    paws), so the primitives' boxes alone would leave the mouse sunk into the ground. The rays
    start under each primitive's lowest point on a 7 x 7 grid of +-2 mm (a full grid under the
    mouse costs seconds).
    """
    feet = []
    for part in shape.parts:
        if part.centers.shape[0]:
            feet.append(part.centers[:, :2])
        if part.a.shape[0]:
            low_a = (part.a[:, 2] - part.radius_a < part.b[:, 2] - part.radius_b)[:, None]
            feet.append(torch.where(low_a, part.a, part.b)[:, :2])
    offsets = torch.cartesian_prod(torch.linspace(-2.0, 2.0, 7), torch.linspace(-2.0, 2.0, 7))  # [49, 2]
    xy = (torch.cat(feet)[:, None, :] + offsets[None]).reshape(-1, 2)  # [n * 49, 2]
    box = shape.bounds()
    origins = torch.cat([xy, torch.full_like(xy[:, :1], box[0, 2].item() - 1.0)], dim=1)
    dirs = torch.zeros_like(origins)
    dirs[:, 2] = 1.0
    n, height = origins.shape[0], (box[1, 2] - box[0, 2]).item() + 1.0
    with one_thread():
        t, hit, _ = sphere_trace(shape, origins, dirs, torch.zeros(n), torch.full((n,), height),
                                 torch.full((n,), 1e-5), TraceConfig(n_steps=64))
    assert hit.any(), "no vertical ray hit the mouse"
    return (box[0, 2] - 1.0 + t[hit].min()).item()
