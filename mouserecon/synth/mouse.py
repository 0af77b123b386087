"""A procedural mouse: random anatomy, pose and coat -> a smooth-union SDF `Shape` (millimetres).

World: +Z up, ground plane z = 0, the mouse stands on it (its lowest point touches z = 0).
The mouse is built for a reference nose-to-rump length of ~87 mm with the hips above the local
origin and heading +x, then scaled to the drawn body length, turned to a random heading and
moved to its drawn spot on the floor.

Two styles of parameters, one builder (a spine, then the body's primitives on it, legs solved to
their paw targets, a tail lying on the floor):
- "classic" (`sample_params`, varieties rig and wide): poses "walk" (four paws on the ground,
  small stride), "rear" (body pitched 35-70 deg, forepaws held in front of the chest), "turn"
  (spine and head bent to one side), "hunch" (compact, head low); COATS, each with per-sample
  brightness and tint; placed within 15 mm of the arena point (0, 0).
- "broad" (`sample_broad_params`, variety broad): BROAD_POSES, families with continuous
  parameters — "walk", "run" (stretched, long strides, 80-100 mm nose to tail base), "sniff" (head
  raised), "rear" (standing on the hind feet, body pitched 60-86 deg, rump on the floor, forepaws
  in front of the chest or on a wall), "groom" (sitting, forepaws at the face), "turn" (bent over
  three joints, 30-180 deg between rump and head), "lie" (belly on the floor, legs folded); a
  lumbar joint between rump and hips, the body's lowest point `seat_mm` above the floor, tails
  70-100 mm lying in curves; BROAD_COATS (C57BL/6 black about half the time) with glossy fur and
  pink skin (ears, paws, tail); placed where the real markerless_mouse_1 mouse was
  (`rig.ARENA_COM_*`, relative to the point the rig's optical axes meet, above (0, 0)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from mouserecon.synth.rig import ARENA_COM_COV_MM2, ARENA_COM_MEAN_MM, ARENA_COM_REACH
from mouserecon.synth.sdf import Part, Shape
from mouserecon.synth.trace import TraceConfig, one_thread, sphere_trace

REFERENCE_LENGTH_MM = 87.0
STYLES = ("classic", "broad")
POSES = ("walk", "rear", "turn", "hunch")
POSE_WEIGHTS = (0.4, 0.2, 0.25, 0.15)
BROAD_POSES = {"walk": 0.18, "run": 0.1, "sniff": 0.14, "rear": 0.2, "groom": 0.1, "turn": 0.16, "lie": 0.12}
FOREPAWS = ("ground", "chest", "wall", "face")
REAR_MAX_HEIGHT_MM = 89.0  # where the broad style's forepaws are (see _forelegs)

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

# Broad style, same layout; ears, tail and paws are further mixed towards SKIN_PINK by MouseParams.pink.
# Per coat: (weight, (lo, hi) fur brightness, (lo, hi) pink, (lo, hi) fur gloss).
BROAD_COATS = {
    "black": ((0.035, 0.032, 0.030), (0.055, 0.05, 0.047), (0.30, 0.22, 0.22), (0.30, 0.24, 0.23),
              (0.45, 0.34, 0.33), (0.01, 0.01, 0.01)),
    "white": COATS["white"],
    "agouti": COATS["agouti"],
    "brown": COATS["brown"],
    "grey": COATS["grey"],
    "cream": ((0.80, 0.70, 0.55), (0.88, 0.80, 0.68), (0.92, 0.70, 0.66), (0.88, 0.72, 0.66),
              (0.95, 0.72, 0.68), (0.01, 0.01, 0.01)),
}
BROAD_COAT_DRAWS = {
    "black": (0.5, (0.7, 1.5), (0.35, 0.85), (0.03, 0.12)),
    "white": (0.2, (0.88, 1.04), (0.6, 1.0), (0.02, 0.06)),
    "agouti": (0.15, (0.6, 1.4), (0.2, 0.6), (0.03, 0.1)),
    "brown": (0.05, (0.6, 1.4), (0.25, 0.7), (0.04, 0.12)),
    "grey": (0.05, (0.6, 1.3), (0.25, 0.7), (0.03, 0.1)),
    "cream": (0.05, (0.85, 1.1), (0.5, 0.9), (0.02, 0.07)),
}
SKIN_PINK = (0.90, 0.58, 0.56)


@dataclass(frozen=True)
class MouseParams:
    """Everything drawn for one mouse (angles in degrees, lengths in mm); recorded in synth.json.

    The fields from `style` on were added with the broad style; their defaults leave a classic mouse as it
    was (every float default is the neutral value of the arithmetic it enters). Lengths inside the mouse
    (strides, seat, hind offsets) are at the 87 mm reference size; pose names are POSES (classic) or
    BROAD_POSES (broad), coats COATS or BROAD_COATS.
    """

    pose: str
    body_length_mm: float
    heading_deg: float
    position_mm: tuple[float, float]
    spine_pitch_deg: float  # hips -> chest, up from horizontal
    chest_pitch_deg: float  # extra pitch of chest -> neck
    spine_yaw_deg: tuple[float, float]  # turn of the hips segment and bend at the chest (same sign: curled)
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
    style: str = "classic"  # STYLES
    lumbar_yaw_deg: float = 0.0  # broad: bend between the rump (tail base, hind legs) and the hips segment
    lumbar_pitch_deg: float = 0.0  # broad: the rump pitched this much less than the hips segment
    stretch: float = 1.0  # broad: spine segment and torso lengths relative to the reference
    seat_mm: float = 0.0  # broad: height of the body's (torso, head, ears) lowest point above the floor
    hind_forward_mm: float = 0.0  # hind heels ahead of the hip joints (sitting, rearing)
    hind_spread_mm: float = 3.0  # hind heels out from the hip joints, sideways
    forepaws: str = "ground"  # broad: FOREPAWS (classic: "chest" when rearing, else "ground")
    fore_reach: float = 0.0  # broad "wall": shoulder-to-wrist distance / arm length
    fore_angle_deg: float = 0.0  # broad "wall": elevation of the reach, from the horizontal
    tail_wave_freq: float = 1.3  # rad per segment of the tail's sinusoidal wiggle
    tail_wave_phase: float = 0.0
    tail_sag: float = 2.0  # tail segments per e-fold of its height above the floor, from the rump on
    pink: float = 0.0  # broad: ears, tail and paws mixed this much towards SKIN_PINK
    gloss: float = 0.0  # broad: specular weight of the fur

    def __post_init__(self) -> None:
        poses, coats = (POSES, COATS) if self.style == "classic" else (tuple(BROAD_POSES), BROAD_COATS)
        for name, value, allowed in (("style", self.style, STYLES), ("pose", self.pose, poses),
                                     ("coat", self.coat, tuple(coats)), ("forepaws", self.forepaws, FOREPAWS)):
            if value not in allowed:
                raise ValueError(f"MouseParams.{name} must be one of {allowed} (style {self.style!r}), got {value!r}")


def sample_params(rng: np.random.Generator) -> MouseParams:
    """A classic-style mouse (varieties rig and wide; the synthetic recordings' key poses)."""
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


# ---- the broad style's pose families ------------------------------------------------------------


def _stance(base: MouseParams, pitch, chest, elevation, stretch, seat, strides, **rest) -> MouseParams:
    """`base` with the pose fields every family sets; `elevation` is the head's absolute pitch (deg)."""
    return replace(base, spine_pitch_deg=pitch, chest_pitch_deg=chest, head_pitch_deg=elevation - pitch - chest,
                   stretch=stretch, seat_mm=seat, strides=tuple(float(s) for s in strides), **rest)


def _walk(base, u, rng):
    return _stance(base, u(-4, 8), u(-5, 8), u(-25, 15), u(0.9, 0.98), u(4, 9), u(-7, 7, size=4),
                   spine_yaw_deg=(u(-10, 10), u(-12, 12)), head_yaw_deg=u(-30, 30), lumbar_yaw_deg=u(-8, 8),
                   lumbar_pitch_deg=u(-5, 5), hind_spread_mm=u(2, 4))


def _run(base, u, rng):
    amplitude, phase = u(7, 13), u(0, 2 * math.pi)  # a bound: fore pair and hind pair half a cycle apart
    gait = amplitude * np.sin(phase + np.array([0.0, 0.4, math.pi, math.pi + 0.4])) + np.array([4.0, 4.0, -2.0, -2.0])
    return _stance(base, u(-4, 4), u(-4, 4), u(-12, 8), u(0.98, 1.0), u(5, 9), gait,
                   spine_yaw_deg=(u(-5, 5), u(-6, 6)), head_yaw_deg=u(-10, 10), lumbar_yaw_deg=u(-4, 4),
                   lumbar_pitch_deg=u(-3, 3), hind_spread_mm=u(2, 4))


def _sniff(base, u, rng):
    return _stance(base, u(0, 10), u(0, 15), u(15, 55), u(0.9, 1.0), u(4, 8), u(-4, 4, size=4),
                   spine_yaw_deg=(u(-8, 8), u(-10, 10)), head_yaw_deg=u(-35, 35), lumbar_yaw_deg=u(-6, 6),
                   lumbar_pitch_deg=u(-5, 5), hind_spread_mm=u(2, 4))


def _rear(base, u, rng):
    """Standing on the hind feet, rump on the floor, spine pitched 60-86 deg; a big mouse's pitch is lowered
    (bisection, the height grows with it) where it would stand taller than REAR_MAX_HEIGHT_MM (`_height`)."""
    pitch, chest, elevation, wall = u(60, 86), u(-6, 2), u(-15, 45), rng.uniform() < 0.5
    pose = _stance(base, pitch, chest, elevation, u(0.9, 1.0), u(0.5, 4), u(-3, 3, size=4),
                   spine_yaw_deg=(u(-10, 10), u(-10, 10)), head_yaw_deg=u(-35, 35), lumbar_yaw_deg=u(-8, 8),
                   lumbar_pitch_deg=u(25, 45), hind_forward_mm=u(2, 8), hind_spread_mm=u(2, 5),
                   forepaws="wall" if wall else "chest", fore_reach=u(0.7, 0.95), fore_angle_deg=u(-10, 50))
    pitched = lambda q: replace(pose, spine_pitch_deg=q, head_pitch_deg=elevation - q - chest)
    lo, hi = 45.0, pitch
    if _height(pose) <= REAR_MAX_HEIGHT_MM:
        return pose
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _height(pitched(mid)) < REAR_MAX_HEIGHT_MM else (lo, mid)
    return pitched(lo)


def _groom(base, u, rng):
    return _stance(base, u(35, 60), u(0, 15), u(-65, -25), u(0.85, 0.95), u(0.3, 3), u(-2, 2, size=4),
                   spine_yaw_deg=(u(-6, 6), u(-8, 8)), head_yaw_deg=u(-20, 20), lumbar_yaw_deg=u(-6, 6),
                   lumbar_pitch_deg=u(15, 35), hind_forward_mm=u(6, 12), hind_spread_mm=u(3, 6), forepaws="face")


def _turn(base, u, rng):
    bend, side = u(30, 180), float(rng.choice([-1.0, 1.0]))
    share = u(0.2, 0.4), u(0.3, 0.5), u(0.2, 0.4)  # lumbar, chest, neck; normalised to the whole bend
    lumbar, chest, neck = (side * bend * s / sum(share) for s in share)
    return _stance(base, u(-4, 8), u(-5, 8), u(-25, 20), u(0.88, 0.98), u(4, 9), u(-6, 6, size=4),
                   spine_yaw_deg=(u(-5, 5), chest), head_yaw_deg=neck, lumbar_yaw_deg=lumbar,
                   lumbar_pitch_deg=u(-5, 5), hind_spread_mm=u(2, 4))


def _lie(base, u, rng):
    strides = np.concatenate([u(2, 9, size=2), u(-2, 4, size=2)])
    return _stance(base, u(-3, 3), u(-6, 3), u(-8, 15), u(0.9, 1.0), u(0.0, 0.4), strides,
                   spine_yaw_deg=(u(-6, 6), u(-10, 10)), head_yaw_deg=u(-30, 30), lumbar_yaw_deg=u(-8, 8),
                   lumbar_pitch_deg=u(-3, 3), hind_forward_mm=u(4, 10), hind_spread_mm=u(6, 9))


_FAMILIES = {"walk": _walk, "run": _run, "sniff": _sniff, "rear": _rear, "groom": _groom, "turn": _turn, "lie": _lie}


def sample_broad_params(rng: np.random.Generator, family: str | None = None) -> MouseParams:
    """A broad-style mouse: a pose family (BROAD_POSES weights, or `family`), a size, a coat, a spot, the pose.

    Body length 85-101 mm (the stretched, straight mouse measures about 0.97 of it from nose to tail base),
    tail 70-100 mm, position uniform within the Mahalanobis radius ARENA_COM_REACH of the real mouse's
    positions (mm, relative to the point the rig's axes meet, above (0, 0)).
    """
    if family is not None and family not in _FAMILIES:
        raise ValueError(f"family must be one of {tuple(_FAMILIES)}, got {family!r}")
    u = rng.uniform
    pose = family or str(rng.choice(list(BROAD_POSES), p=list(BROAD_POSES.values())))
    length = u(85, 101)
    angle, radius = u(0, 2 * math.pi), ARENA_COM_REACH * math.sqrt(u())
    spot = np.array(ARENA_COM_MEAN_MM) + np.linalg.cholesky(np.array(ARENA_COM_COV_MM2)) @ (
        radius * np.array([math.cos(angle), math.sin(angle)]))
    coat = str(rng.choice(list(BROAD_COAT_DRAWS), p=[d[0] for d in BROAD_COAT_DRAWS.values()]))
    _, brightness, pink, gloss = BROAD_COAT_DRAWS[coat]
    lifted = rng.uniform() < 0.12
    base = MouseParams(
        pose=pose, body_length_mm=length, heading_deg=u(0, 360), position_mm=tuple(spot.tolist()),
        spine_pitch_deg=0.0, chest_pitch_deg=0.0, spine_yaw_deg=(0.0, 0.0), head_yaw_deg=0.0, head_pitch_deg=0.0,
        girth=u(0.85, 1.2), head_scale=u(0.9, 1.1), ear_scale=u(0.85, 1.25), leg_scale=u(0.9, 1.1),
        tail_length=u(70, 100) / length, tail_curvature=u(-0.25, 0.25), tail_wiggle=u(0.0, 0.5),
        tail_wave_freq=u(0.3, 1.6), tail_wave_phase=u(0, 2 * math.pi), tail_sag=u(1.0, 1.6),
        tail_lift=float(lifted) * u(0.3, 1.0),
        strides=(0.0, 0.0, 0.0, 0.0), coat=coat, brightness=u(*brightness), tint=tuple(u(0.95, 1.05, size=3).tolist()),
        pink=u(*pink), gloss=u(*gloss), style="broad",
    )
    return _FAMILIES[pose](base, u, rng)


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

    def z_range(self) -> tuple[float, float]:
        """Lowest and highest z of the primitives (exact: ellipsoid centres -+ the half-height of their box)."""
        lows, highs = [], []
        for c, r, radii, *_ in self.ellipsoids:
            half = np.linalg.norm(r[2] * radii)
            lows.append(c[2] - half)
            highs.append(c[2] + half)
        for a, b, ra, rb, *_ in self.capsules:
            lows.append(min(a[2] - ra, b[2] - rb))
            highs.append(max(a[2] + ra, b[2] + rb))
        return min(lows), max(highs)

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


# ---- the spine: hips -> chest -> neck -> head, plus the rump (tail base) ------------------------


@dataclass(frozen=True)
class _Spine:
    """Joint positions [3] and frames [3, 3] (columns forward, left, up) at the reference size (mm).

    hip_axis: direction of the hips ellipsoid; hind_heading / fore_heading: horizontal unit vectors the
    hind and fore legs stand along; tail_angle: the tail's first heading on the floor (rad).
    """

    hips: np.ndarray
    chest: np.ndarray
    neck: np.ndarray
    head: np.ndarray
    hip_frame: np.ndarray
    chest_frame: np.ndarray
    head_frame: np.ndarray
    hip_axis: np.ndarray
    d2: np.ndarray
    d3: np.ndarray
    tail_base: np.ndarray
    tail_angle: float
    hind_heading: np.ndarray
    fore_heading: np.ndarray

    @property
    def snout_dir(self) -> np.ndarray:  # [3] the snout points 18 deg below the head's axis
        return self.head_frame @ _direction(0.0, -18.0)

    def raised(self, dz: float) -> _Spine:
        up = np.array([0.0, 0.0, dz])
        return replace(self, hips=self.hips + up, chest=self.chest + up, neck=self.neck + up, head=self.head + up,
                       tail_base=self.tail_base + up)


def _classic_spine(p: MouseParams) -> _Spine:
    g, hs = p.girth, p.head_scale
    d1 = _direction(p.spine_yaw_deg[0], p.spine_pitch_deg)
    d2 = _direction(sum(p.spine_yaw_deg), p.spine_pitch_deg + p.chest_pitch_deg)
    hip_frame = _frame(d1)
    hips = np.array([0.0, 0.0, 17.0 * g])
    chest = hips + 24.0 * d1
    neck = chest + 14.0 * d2
    d3 = _direction(sum(p.spine_yaw_deg) + p.head_yaw_deg,
                    p.spine_pitch_deg + p.chest_pitch_deg + p.head_pitch_deg)
    heading = _direction(p.spine_yaw_deg[0], 0.0)
    return _Spine(hips=hips, chest=chest, neck=neck, head=neck + 9.0 * hs * d3, hip_frame=hip_frame,
                  chest_frame=_frame(d2), head_frame=_frame(d3), hip_axis=d1, d2=d2, d3=d3,
                  tail_base=hips - 19.0 * d1 + 3.0 * hip_frame[:, 2], tail_angle=math.atan2(-d1[1], -d1[0]),
                  hind_heading=heading, fore_heading=heading)


def _broad_spine(p: MouseParams) -> _Spine:
    """Like the classic spine plus a lumbar joint (rump vs hips segment) and stretched segments; frames use the
    body's own dorsal direction (valid at any pitch); the hips at z = 0 (`build_mouse` raises them to the seat)."""
    yaw0, yaw1 = p.spine_yaw_deg
    pitch, st = p.spine_pitch_deg, p.stretch
    angles = {"rump": (yaw0 - p.lumbar_yaw_deg, pitch - p.lumbar_pitch_deg),
              "axis": (yaw0 - 0.5 * p.lumbar_yaw_deg, pitch - 0.5 * p.lumbar_pitch_deg),
              "d1": (yaw0, pitch), "d2": (yaw0 + yaw1, pitch + p.chest_pitch_deg),
              "d3": (yaw0 + yaw1 + p.head_yaw_deg, pitch + p.chest_pitch_deg + p.head_pitch_deg)}
    d = {k: _direction(*a) for k, a in angles.items()}
    f = {k: _frame(d[k], _direction(y, q + 90.0)) for k, (y, q) in angles.items()}
    hips = np.zeros(3)
    chest = hips + 24.0 * st * d["d1"]
    neck = chest + 14.0 * st * d["d2"]
    return _Spine(hips=hips, chest=chest, neck=neck, head=neck + 9.0 * p.head_scale * d["d3"],
                  hip_frame=f["axis"], chest_frame=f["d2"], head_frame=f["d3"], hip_axis=d["axis"], d2=d["d2"],
                  d3=d["d3"], tail_base=hips - 19.0 * st * d["rump"] + 3.0 * f["rump"][:, 2],
                  tail_angle=math.atan2(-d["rump"][1], -d["rump"][0]),
                  hind_heading=_direction(angles["rump"][0], 0.0), fore_heading=_direction(angles["d2"][0], 0.0))


# ---- colours, body, legs, tail ------------------------------------------------------------------


def _colours(p: MouseParams) -> tuple[np.ndarray, ...]:
    """sRGB albedos (dorsal, ventral, ears, tail, paws, eyes) [3] each; broad: skin mixed towards pink."""
    table = COATS if p.style == "classic" else BROAD_COATS
    fur = [np.clip(np.array(c) * p.brightness * np.array(p.tint), 0, 1) for c in table[p.coat]]
    if p.style == "classic":
        return tuple(fur)
    skin = np.clip(np.array(SKIN_PINK) * np.array(p.tint), 0, 1)
    for i in (2, 3, 4):
        fur[i] = (1.0 - p.pink) * fur[i] + p.pink * skin
    return tuple(fur)


def _body(s: _Spine, p: MouseParams, colours) -> tuple[_Builder, _Builder, _Builder]:
    """Torso (hips, chest, neck, head, snout), ears and eyes (nose, eyes) on the spine."""
    dorsal, ventral, ear_c, _, paw_c, eye_c = colours
    g, hs, st = p.girth, p.head_scale, p.stretch
    fur = 0.05 + p.gloss
    torso, ears, eyes = _Builder(), _Builder(), _Builder()
    snout_dir = s.snout_dir
    snout_frame = _frame(snout_dir, s.head_frame[:, 2])
    torso.ellipsoid(s.hips, s.hip_frame, np.array([22.0 * st, 14.5 * g, 12.5 * g]), dorsal, ventral, specular=fur)
    torso.ellipsoid(s.chest, s.chest_frame, np.array([17.0 * st, 11.5 * g, 11.0 * g]), dorsal, ventral, specular=fur)
    torso.ellipsoid(s.neck + 2.0 * s.d2, s.chest_frame, np.array([9.0, 8.5 * g, 8.5 * g]), dorsal, ventral,
                    specular=fur)
    torso.ellipsoid(s.head, s.head_frame, hs * np.array([12.0, 8.5, 8.0]), dorsal, ventral, specular=fur)
    torso.ellipsoid(s.head + hs * 10.0 * snout_dir, snout_frame, hs * np.array([8.5, 4.8, 4.4]), dorsal, ventral,
                    specular=fur)
    nose = s.head + hs * 18.0 * snout_dir
    eyes.ellipsoid(nose, snout_frame, hs * np.array([1.6, 1.7, 1.5]), paw_c, specular=0.3)

    # Eyes (glossy) and ears (thin discs facing forward-outward, on top of the head).
    for side in (1.0, -1.0):
        lateral, up = s.head_frame[:, 1] * side, s.head_frame[:, 2]
        eye = s.head + hs * (5.0 * s.d3 + 6.0 * lateral + 2.8 * up)
        eyes.ellipsoid(eye, s.head_frame, hs * np.array([2.0, 1.9, 1.9]), eye_c, specular=0.5)
        ear_normal = 0.75 * s.d3 + 0.55 * lateral - 0.1 * up
        ear_frame = _frame(ear_normal, up)
        ear = s.head + hs * (-2.5 * s.d3 + 6.0 * lateral + 11.0 * up)
        ears.ellipsoid(ear, ear_frame, p.ear_scale * np.array([1.0, 7.0, 8.0]), ear_c, ear_c, up, specular=0.05)
    return torso, ears, eyes


def _forepaw_targets(s: _Spine, p: MouseParams, side: float, shoulder: np.ndarray, left: np.ndarray, i: int):
    """(wrist, finger, elbow pole) [3] each of the fore leg on `side` (+1 left); see FOREPAWS."""
    ls, cf, heading = p.leg_scale, s.chest_frame, s.fore_heading
    mode = ("chest" if p.pose == "rear" else "ground") if p.style == "classic" else p.forepaws
    up = np.array([0.0, 0.0, 1.0])
    pole = -heading - 0.3 * cf[:, 2]
    if mode == "chest":  # held in front of the chest (broad: elbows hanging down)
        wrist = shoulder + 6.0 * s.d2 - 11.0 * cf[:, 2] + 1.5 * side * cf[:, 1]
        return wrist, wrist + 4.0 * s.d2 - 1.5 * cf[:, 2], pole if p.style == "classic" else -up - 0.3 * heading
    if mode == "wall":  # flat on a vertical wall ahead, fingers up, elbows down and out
        a = math.radians(p.fore_angle_deg)
        reach = p.fore_reach * 22.0 * ls * (math.cos(a) * heading + math.sin(a) * up)
        wrist = shoulder + reach + 1.5 * side * cf[:, 1]
        return wrist, wrist + 4.0 * ls * up, -up + 0.5 * side * cf[:, 1]
    if mode == "face":  # beside and under the snout, elbows down
        hf, hs = s.head_frame, p.head_scale
        snout = s.head + hs * 10.0 * s.snout_dir
        wrist = snout + hs * (2.5 * side * hf[:, 1] - 4.0 * hf[:, 2])
        return wrist, wrist + 3.0 * hs * s.d3, -up - 0.5 * heading
    if p.style == "classic":
        wrist = shoulder + p.strides[i] * heading + 2.0 * side * left
        wrist[2] = 1.8
        finger = wrist + 5.5 * ls * heading + 0.8 * side * left
        finger[2] = 1.1
        return wrist, finger, pole
    # Broad: a paw out of reach steps in under the shoulder; one that cannot reach the floor at all hangs.
    offset, reach, drop = p.strides[i] * heading + 2.0 * side * left, 0.97 * 22.0 * ls, shoulder[2] - 1.8
    if drop >= reach:
        wrist = shoulder - reach * up
        return wrist, wrist + 5.5 * ls * heading, 0.5 * up - heading
    offset = offset * min(1.0, math.sqrt(reach ** 2 - drop ** 2) / max(np.linalg.norm(offset), 1e-9))
    wrist = np.array([shoulder[0] + offset[0], shoulder[1] + offset[1], 1.8])
    finger = wrist + 5.5 * ls * heading + 0.8 * side * left
    finger[2] = 1.1
    return wrist, finger, 0.5 * up - heading  # elbows back and up


def _limb_joint(p: MouseParams, root: np.ndarray, target: np.ndarray, bone: float, pole: np.ndarray,
                radius: float) -> np.ndarray:
    """The knee or elbow [3] of a limb of two `bone`-long segments, bending towards `pole`; in the broad style a
    joint that would sink into the floor (below its capsule's `radius`) bends straight up instead."""
    joint = _two_bone(root, target, bone, bone, pole)
    if p.style == "broad" and joint[2] < radius:
        joint = _two_bone(root, target, bone, bone, np.array([0.0, 0.0, 1.0]))
    return joint


def _legs(s: _Spine, p: MouseParams, colours) -> _Builder:
    """Hind legs (hip -> knee, bending forward -> heel on the ground -> toes) and fore legs (shoulder -> elbow
    -> wrist -> paw), two-bone chains solved to their paw targets; per side: thigh, shin, foot, upper arm,
    forearm, paw."""
    dorsal, _, _, _, paw_c, _ = colours
    g, ls, st = p.girth, p.leg_scale, p.stretch
    fur = 0.03 + p.gloss
    limbs = _Builder()
    hind_left, fore_left = np.cross([0.0, 0.0, 1.0], s.hind_heading), np.cross([0.0, 0.0, 1.0], s.fore_heading)
    for i, side in enumerate((1.0, -1.0)):
        hip_joint = s.hips - 8.0 * st * s.hip_axis + 8.0 * g * side * s.hip_frame[:, 1] - 3.0 * s.hip_frame[:, 2]
        heel = (hip_joint + (p.strides[2 + i] - 4.0 + p.hind_forward_mm) * s.hind_heading
                + p.hind_spread_mm * side * hind_left)
        heel[2] = 1.4
        knee = _limb_joint(p, hip_joint, heel, 15.0 * ls, s.hind_heading + 0.2 * side * hind_left, 3.2)
        limbs.capsule(hip_joint, knee, 5.5 * g, 3.2, dorsal, specular=fur)
        limbs.capsule(knee, heel, 3.0, 1.5, dorsal, specular=fur)
        limbs.capsule(heel, heel + 13.0 * ls * (s.hind_heading + 0.15 * side * hind_left), 1.6, 1.3, paw_c)
        shoulder = s.chest + 3.0 * st * s.d2 + 6.0 * g * side * s.chest_frame[:, 1] - 5.0 * s.chest_frame[:, 2]
        wrist, finger, pole = _forepaw_targets(s, p, side, shoulder, fore_left, i)
        elbow = _limb_joint(p, shoulder, wrist, 11.0 * ls, pole, 2.4)
        limbs.capsule(shoulder, elbow, 4.0 * g, 2.4, dorsal, specular=fur)
        limbs.capsule(elbow, wrist, 2.2, 1.5, dorsal, specular=fur)
        limbs.capsule(wrist, finger, 1.5, 1.2, paw_c)
    return limbs


def _tail(s: _Spine, p: MouseParams, colour: np.ndarray) -> _Builder:
    """A tapered chain of 14 capsules from the rump, sagging to the ground and curving on it."""
    tail = _Builder()
    n_seg, length = 14, p.tail_length * REFERENCE_LENGTH_MM
    base, angle = s.tail_base, s.tail_angle
    radii = np.linspace(3.2, 0.7, n_seg + 1)
    point = base.copy()
    specular = 0.03 if p.style == "classic" else 0.06  # broad: bare skin, a little glossier than fur
    for j in range(n_seg):
        angle += p.tail_curvature + p.tail_wiggle * math.sin(p.tail_wave_freq * j + p.tail_wave_phase)
        step = np.array([math.cos(angle), math.sin(angle), 0.0]) * length / n_seg
        nxt = point + step
        rest = radii[j + 1] + p.tail_lift * (base[2] - radii[j + 1]) * (1 - j / n_seg) * 0.8
        nxt[2] = rest + (base[2] - rest) * math.exp(-(j + 1) / p.tail_sag)
        tail.capsule(point, nxt, radii[j], radii[j + 1], colour, specular=specular)
        point = nxt
    return tail


def _builders(p: MouseParams) -> tuple[_Builder, ...]:
    """The primitives of `p` at the reference size: torso, limbs, tail, ears, eyes."""
    colours = _colours(p)
    if p.style == "classic":
        spine = _classic_spine(p)
    else:  # rest the body's lowest point seat_mm above the floor; the legs then reach down to it
        spine = _broad_spine(p)
        spine = spine.raised(p.seat_mm - min(b.z_range()[0] for b in _body(spine, p, colours)))
    torso, ears, eyes = _body(spine, p, colours)
    return torso, _legs(spine, p, colours), _tail(spine, p, colours[3]), ears, eyes


def _height(p: MouseParams) -> float:
    """Height (mm, at the drawn size) of the primitives' box from its lowest to its highest point."""
    ranges = np.array([b.z_range() for b in _builders(p)])  # [5, 2]
    return (ranges[:, 1].max() - ranges[:, 0].min()) * p.body_length_mm / REFERENCE_LENGTH_MM


def build_mouse(params: MouseParams) -> Shape:
    """The mouse of `params` as a Shape in world millimetres (+Z up, standing on z = 0).

    Parts in order: torso, limbs (12 capsules), tail, ears (2 ellipsoids), eyes (nose and eyes).
    """
    torso, limbs, tail, ears, eyes = _builders(params)
    parts = [torso.part("torso", 4.0, 0.0), limbs.part("limbs", 1.0, 3.0), tail.part("tail", 0.0, 2.5),
             ears.part("ears", 0.0, 1.2), eyes.part("eyes", 0.0, 0.0)]
    shape = Shape(parts=tuple(parts), colour_blend=0.3)
    return _place(shape, params)


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
