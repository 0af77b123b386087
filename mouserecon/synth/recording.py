"""Synthetic rig recordings with ground truth, for testing `mouserecon prepare` (DESIGN.md section 10).

`generate_recording` writes what a real rig writes, plus the truth behind it:

    <out_dir>/
      label3d_dannce.mat                  the rig's calibration (lens distortion included), cameras scaled
      videos/<CameraName>/0.mp4           one H.264 video per camera, F frames at `fps`, frame i has pts i
      background/<CameraName>.mp4         an empty-arena clip (same light, flicker and noise, no mouse)
      ground_truth/masks_<CameraName>.npz "masks": uint8 [F, H, W], the mouse's coverage of each raw
                                          (distorted) pixel, 0-255
      ground_truth/recording.json         seed, per-frame mouse parameters and centre, light, arena,
                                          flicker gains, noise, encoder settings, camera names

Scene (mm, world +Z up, floor z = 0): one synthetic mouse (`mouserecon.synth.mouse`) walking over a
textured floor inside a low cylindrical wall, a table outside it and a distant room backdrop, lit by
one overhead light. The identity (size, build, coat) is fixed per recording; the pose is interpolated
between key poses drawn with `sample_params` every `key_pose_interval_s` (more often in short
recordings, so that five keys span the recording, but at most every MIN_KEY_INTERVAL_S; the first
four keys are walk, rear, turn and hunch in a random order, so a 200-frame recording at 100 fps
shows all four), with the pose label switching half-way; the hips follow a smooth random path of
sinusoids around the mean mouse position of the real rig, heading along its tangent, at a walking
speed that slows while the mouse rears or hunches; the paws step with the distance walked.

Rendering, per frame and camera: the arena is shaded analytically (ray-plane and ray-cylinder) in
the pinhole camera of the calibrated one (`LensCamera.pinhole`), over a canvas large enough to cover
the raw image after distortion; a soft blob shadow of the mouse darkens the floor; the mouse is
sphere-traced only inside a window around its projected bounding box and composited over the arena
in linear light with its coverage alpha (the wall, if it is in front, occludes it). One `cv2.remap`
per camera, whose map is computed once from `LensCamera.undistort_points` at every raw pixel
centre, distorts canvas colour and alpha to the raw image (the alpha becomes the ground truth). Then a
global per-frame light flicker gain, sRGB encoding, Gaussian sensor noise, 8 bits, and H.264.

Determinism: a seed gives identical decoded frames. The scene is drawn from `default_rng(seed)`, the
noise of each frame from `default_rng([seed, clip, frame])` (so any number of worker processes writes
the same files), and libx264 runs single-threaded with mbtree off: with mbtree on, x264
(core 165, via PyAV 18) gives different output for the same input when several encoders run in one
process, for widths that are not a multiple of 128.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import shutil
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from mouserecon.calibration import Calibration, LensCamera, save_dannce_mat
from mouserecon.cameras import Cameras
from mouserecon.progress import progress
from mouserecon.synth.generate import mouse_center
from mouserecon.synth.mouse import POSES, MouseParams, build_mouse, sample_params
from mouserecon.synth.rig import look_at as rig_look_at
from mouserecon.synth.rig import sample_azimuths
from mouserecon.synth.trace import Light, TraceConfig, render_rgba

log = logging.getLogger(__name__)

RECORDING_JSON = "recording.json"
MEAN_MOUSE_XY_MM = (55.16, 63.58)  # mean COM of the real markerless_mouse_1 recording (rig_geometry.txt)
GAMMA = 2.2  # the tracer's sRGB approximation
X264_PARAMS = "threads=1:mbtree=0:scenecut=0"  # see the module docstring (determinism)
PRESET = "medium"

# Fields of MouseParams that belong to the animal, fixed over a recording; the path sets heading and
# position; every other field is the pose, interpolated between key poses.
IDENTITY_FIELDS = ("body_length_mm", "girth", "head_scale", "ear_scale", "leg_scale", "tail_length", "coat",
                   "brightness", "tint")
PATH_FIELDS = ("heading_deg", "position_mm")
POSE_SPEED = {"walk": 1.0, "turn": 0.6, "hunch": 0.25, "rear": 0.1}  # fraction of the walking speed
MIN_KEY_INTERVAL_S = 0.1  # poses change no faster than this, even in short recordings
MAX_TURN_DEG_S = 540.0  # heading follows the path tangent at most this fast

FLOOR_PALETTES = {"white": 0.3, "grey": 0.2, "beige": 0.25, "dark": 0.25}
GRAIN_TEXEL_MM = 1.0
GRAIN_SIZE = 1024  # texels per side of the tiled grain image (period 1024 mm, wider than any arena)

FLOOR, OUTER_WALL, INNER_WALL, TABLE, ROOM = range(5)  # what a ray hits first


@dataclass(frozen=True)
class Arena:
    """The static scene around the mouse (mm, world +Z up, floor z = 0), shaded analytically.

    centre_mm:        the wall's axis on the floor.
    wall_radius_mm, wall_height_mm: a thin vertical cylindrical wall standing on the floor; it is
                      low enough that no camera's view of the floor within `clear_radius_mm` of the
                      centre passes through it.
    clear_radius_mm:  radius around the centre that every camera sees over the wall.
    room_radius_mm:   a vertical cylinder (the room) that ends every ray not stopped before; the floor
                      outside the wall (the table) reaches it.
    floor_palette:    the colour family drawn for the floor (FLOOR_PALETTES).
    floor_rgb, table_rgb, wall_rgb, room_rgb: sRGB albedos in [0, 1].
    mottle:           rows (kx, ky [rad/mm], phase [rad], amplitude) of the floor's low-frequency mottling,
                      a relative albedo change sum(a sin(kx x + ky y + phase)).
    grain:            relative amplitude of the fine grain, a fixed noise image (seed `grain_seed`,
                      GRAIN_TEXEL_MM per texel, unit std) sampled by world xy.
    """

    centre_mm: tuple[float, float]
    wall_radius_mm: float
    wall_height_mm: float
    clear_radius_mm: float
    room_radius_mm: float
    floor_palette: str
    floor_rgb: tuple[float, float, float]
    table_rgb: tuple[float, float, float]
    wall_rgb: tuple[float, float, float]
    room_rgb: tuple[float, float, float]
    mottle: tuple[tuple[float, float, float, float], ...]
    grain: float
    grain_seed: int


@dataclass(frozen=True)
class RecordingPlan:
    """Everything drawn for one recording; rendering it is deterministic.

    calibration:  the rig, already scaled to the recording's image size.
    mice:         per-frame mouse parameters [F] (as `build_mouse` takes them).
    gains, background_gains: per-frame global light gains [F], [E] (flicker), multiplying linear light.
    noise_sigma:  std of the per-pixel sensor noise, in units of the 8-bit range (sigma * 255 levels).
    key_frames:   the frames whose pose was drawn (the others are interpolated).
    """

    seed: int
    fps: float
    scale: float
    calibration: Calibration
    light: Light
    arena: Arena
    mice: tuple[MouseParams, ...]
    gains: np.ndarray
    background_gains: np.ndarray
    noise_sigma: float
    key_frames: tuple[int, ...]
    trace: TraceConfig


# ---- drawing ----------------------------------------------------------------------------------------


def synthetic_rig(seed: int, image_size: tuple[int, int] = (1152, 1024)) -> Calibration:
    """A drawn rig calibration like the real markerless_mouse_1 rig (for demos without a calibration file):
    6 cameras alternating low (0-5 deg) and high (15-24 deg), 300-330 mm from a point 20 mm above the
    floor at the mean mouse position, azimuth gaps of 50-70 deg, horizontal field of view 37-40 deg,
    principal points up to 4 % off centre, barrel distortion k1 in [-0.2, -0.1], k2 in [0, 0.3], small
    tangential terms and skew; mm, +Z up, floor z = 0."""
    rng = np.random.default_rng([seed, 7])
    width, height = image_size
    aim = np.array([*MEAN_MOUSE_XY_MM, 20.0])
    azimuths = sample_azimuths(rng, 6, 1.0 / 6.0)
    first_high = rng.uniform() < 0.5
    cameras = []
    for i, azimuth in enumerate(azimuths):
        high = (i % 2 == 1) != first_high
        elevation = math.radians(rng.uniform(15.0, 24.0) if high else rng.uniform(0.0, 5.0))
        distance, az = rng.uniform(300.0, 330.0), math.radians(azimuth)
        eye = aim + distance * np.array([math.cos(elevation) * math.cos(az), math.cos(elevation) * math.sin(az),
                                         math.sin(elevation)])
        c2w = rig_look_at(eye, aim + rng.uniform(-6.0, 6.0, size=3), rng.uniform(-2.0, 2.0))
        fx = 0.5 * width / math.tan(math.radians(rng.uniform(37.0, 40.0)) / 2)
        K = np.array([[fx, rng.uniform(-6.0, 6.0), width * rng.uniform(0.46, 0.54)],
                      [0.0, fx * rng.uniform(0.995, 1.005), height * rng.uniform(0.46, 0.54)], [0.0, 0.0, 1.0]])
        dist = np.array([rng.uniform(-0.2, -0.1), rng.uniform(0.0, 0.3), *rng.uniform(-0.002, 0.002, size=2), 0.0])
        R = c2w[:3, :3].T
        cameras.append(LensCamera(f"Camera{i + 1}", width, height, K, dist, R, -R @ c2w[:3, 3]))
    return Calibration(Path(f"<synthetic rig, seed {seed}>"), "synthetic", tuple(cameras), units="mm",
                       world_up=(0.0, 0.0, 1.0), conversion="drawn by mouserecon.synth.recording.synthetic_rig")


def scale_calibration(calibration: Calibration, scale: float) -> Calibration:
    """The rig resampled by `scale`: image sizes rounded to even numbers (yuv420p), K rows 0-1 scaled by
    the exact size ratios (pixel-edge convention); distortion is unchanged (normalised coordinates)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    cameras = [camera.resize(*(max(2, 2 * round(n * scale / 2)) for n in (camera.width, camera.height)))
               for camera in calibration.cameras]
    note = f"synthetic recording: cameras scaled by {scale} from {calibration.path}"
    return replace(calibration, cameras=tuple(cameras), notes=calibration.notes + (note,))


def sample_light(rng: np.random.Generator) -> Light:
    """An overhead key light (elevation 50-85 deg) whose ambient + key on the floor stays below ~1 (no clipping
    of white floors), slightly warm or cool."""
    u = rng.uniform
    az, el = math.radians(u(0, 360)), math.radians(u(50, 85))
    direction = (math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el))
    total, ambient_share = u(0.8, 1.0), u(0.2, 0.45)
    warm = u(-0.05, 0.05)
    tint = np.array([1 + warm, 1.0, 1 - warm])
    key = total * (1 - ambient_share) / direction[2] * tint
    return Light(direction=direction, key=tuple(key.tolist()), ambient=tuple((total * ambient_share * tint).tolist()),
                 shadow=u(0.4, 0.8), shininess=u(12, 40))


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float = 0.03) -> tuple[float, float, float]:
    return tuple((rng.uniform(lo, hi) * rng.uniform(1 - tint, 1 + tint, size=3)).clip(0, 1).tolist())


def _floor_colour(rng: np.random.Generator, palette: str) -> tuple[float, float, float]:
    if palette == "white":
        return _grey(rng, 0.8, 0.95, 0.02)
    if palette == "grey":
        return _grey(rng, 0.4, 0.7)
    if palette == "beige":
        return tuple((np.array([0.86, 0.76, 0.58]) * rng.uniform(0.8, 1.05) * rng.uniform(0.95, 1.05, size=3))
                     .clip(0, 1).tolist())
    return _grey(rng, 0.05, 0.2, 0.1)


def wall_height_limit(cameras: list[LensCamera], centre: np.ndarray, wall_radius: float, clear_radius: float) -> float:
    """The highest wall (mm) over which every camera sees the whole floor disc of `clear_radius` around
    `centre` [2]: the lowest height at which a sight line from a camera to that disc's rim crosses
    the wall (floor points are the lowest targets, so the rest of the mouse is seen too)."""
    angles = np.linspace(0, 2 * math.pi, 360, endpoint=False)
    rim = centre + clear_radius * np.stack([np.cos(angles), np.sin(angles)], -1)  # [A, 2]
    lowest = math.inf
    for camera in cameras:
        eye = camera.c2w()[:3, 3]
        offset, span = eye[:2] - centre, rim - eye[:2]  # [2], [A, 2]
        a, b = (span ** 2).sum(-1), 2 * span @ offset
        c = offset @ offset - wall_radius ** 2
        assert c > 0, f"{camera.name} is inside the wall (radius {wall_radius:.0f} mm)"
        s = (-b - np.sqrt(b * b - 4 * a * c)) / (2 * a)  # entry into the wall's cylinder along eye -> rim
        lowest = min(lowest, float((eye[2] * (1 - s)).min()))
    return lowest


def sample_arena(rng: np.random.Generator, cameras: list[LensCamera], clear_radius: float) -> Arena:
    """A walled arena around the real rig's mean mouse position that every camera sees over."""
    u = rng.uniform
    centre = np.array(MEAN_MOUSE_XY_MM)
    nearest = min(np.linalg.norm(c.c2w()[:2, 3] - centre) for c in cameras)
    wall_radius = min(u(170, 220), nearest - 30.0)
    height = min(u(20, 60), 0.9 * wall_height_limit(cameras, centre, wall_radius, clear_radius))
    palette = str(rng.choice(list(FLOOR_PALETTES), p=list(FLOOR_PALETTES.values())))
    n_mottle = 6
    k = 2 * math.pi / u(20, 160, size=n_mottle)  # wavelengths 20-160 mm
    theta = u(0, 2 * math.pi, size=n_mottle)
    amplitude = u(0.3, 1.0, size=n_mottle)
    amplitude *= u(0.04, 0.18) / amplitude.sum()
    mottle = tuple((float(k[i] * math.cos(theta[i])), float(k[i] * math.sin(theta[i])), float(u(0, 2 * math.pi)),
                    float(amplitude[i])) for i in range(n_mottle))
    return Arena(centre_mm=tuple(centre.tolist()), wall_radius_mm=float(wall_radius), wall_height_mm=float(height),
                 clear_radius_mm=float(clear_radius), room_radius_mm=float(u(700, 1000)), floor_palette=palette,
                 floor_rgb=_floor_colour(rng, palette), table_rgb=_grey(rng, 0.05, 0.5),
                 wall_rgb=_floor_colour(rng, str(rng.choice(list(FLOOR_PALETTES)))), room_rgb=_grey(rng, 0.02, 0.35),
                 mottle=mottle, grain=float(u(0.03, 0.1)), grain_seed=int(rng.integers(2 ** 31)))


def _key_poses(rng: np.random.Generator, n_keys: int) -> list[MouseParams]:
    """n_keys poses of one animal: the first four cover every pose label in random order, later ones are free."""
    labels = list(rng.permutation(POSES))
    keys = []
    for j in range(n_keys):
        params = sample_params(rng)
        while j < len(labels) and params.pose != labels[j]:
            params = sample_params(rng)
        keys.append(params)
    identity = {name: getattr(keys[0], name) for name in IDENTITY_FIELDS}
    return [replace(k, **identity) for k in keys]


def _blend(a: MouseParams, b: MouseParams, w: float) -> MouseParams:
    """Pose fields interpolated linearly with weight w in [0, 1] (label switches at 0.5); others from a."""
    values = {}
    for f in fields(MouseParams):
        if f.name in IDENTITY_FIELDS or f.name in PATH_FIELDS:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, str):
            values[f.name] = y if w >= 0.5 else x
        elif isinstance(x, tuple):
            values[f.name] = tuple(float(p + (q - p) * w) for p, q in zip(x, y))
        else:
            values[f.name] = float(x + (y - x) * w)
    return replace(a, **values)


def _path(rng: np.random.Generator, n: int = 3):
    """A smooth closed-form path P(u) (mm), sums of n sinusoids per axis, around the mean mouse position and inside a
    disc of radius 35-60 mm: returns position(u) -> [N, 2], tangent(u) = dP/du -> [N, 2], and the rms speed and a
    bound of the peak speed per unit u."""
    radius = rng.uniform(35, 60)
    freq = rng.uniform(0.08, 0.35, size=(2, n))  # cycles per unit u
    phase = rng.uniform(0, 2 * math.pi, size=(2, n))
    amp = rng.uniform(0.3, 1.0, size=(2, n))
    amp *= radius / math.sqrt(2) / amp.sum(1, keepdims=True)  # |x|, |y| <= radius / sqrt(2)
    centre = np.array(MEAN_MOUSE_XY_MM)
    omega = 2 * math.pi * freq

    def position(u: np.ndarray) -> np.ndarray:
        return centre + (amp[None] * np.sin(omega[None] * u[:, None, None] + phase[None])).sum(-1)

    def tangent(u: np.ndarray) -> np.ndarray:
        return (amp[None] * omega[None] * np.cos(omega[None] * u[:, None, None] + phase[None])).sum(-1)

    rms = math.sqrt(((amp * omega) ** 2).sum() / 2)
    peak = float(np.linalg.norm((amp * omega).sum(1)))
    return position, tangent, rms, peak


def _motion(rng: np.random.Generator, num_frames: int, fps: float, key_interval_s: float):
    """Per-frame mouse parameters and the key frames (see the module docstring)."""
    shortest = max(1, round(MIN_KEY_INTERVAL_S * fps))
    interval = max(shortest, min(round(key_interval_s * fps), math.ceil((num_frames - 1) / 4)))
    key_frames = list(range(0, num_frames + interval - 1, interval))  # the last at or after the last frame
    keys = _key_poses(rng, len(key_frames))
    position, tangent, rms, peak = _path(rng)
    walk_speed = rng.uniform(100, 200)  # mm/s, rms at full walking pace
    rate = min(walk_speed / rms, 300.0 / peak)  # path units per second; peak speed <= 300 mm/s

    poses, factors = [], []
    for i in range(num_frames):
        j = min(i // interval, len(keys) - 2) if len(keys) > 1 else 0
        s = (i - key_frames[j]) / interval if len(keys) > 1 else 0.0
        w = 0.5 - 0.5 * math.cos(math.pi * s)  # smooth in, smooth out
        b = keys[min(j + 1, len(keys) - 1)]
        poses.append(_blend(keys[j], b, w))
        factors.append(POSE_SPEED[keys[j].pose] * (1 - w) + POSE_SPEED[b.pose] * w)
    u = rng.uniform(0, 100) + np.concatenate([[0.0], np.cumsum(factors[:-1])]) * rate / fps
    xy, direction = position(u), tangent(u)

    walked = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    speed = np.gradient(walked) * fps if num_frames > 1 else np.zeros(1)
    stride_length = 0.55 * keys[0].body_length_mm
    step_offsets = np.array([0.0, math.pi, math.pi, 0.0])  # trot: diagonal pairs in phase
    max_turn = MAX_TURN_DEG_S / fps
    heading = math.degrees(math.atan2(direction[0, 1], direction[0, 0]))
    mice = []
    for i, pose in enumerate(poses):
        target = math.degrees(math.atan2(direction[i, 1], direction[i, 0]))
        heading += float(np.clip((target - heading + 180.0) % 360.0 - 180.0, -max_turn, max_turn))
        gait = 5.0 * min(1.0, speed[i] / 150.0) * np.sin(2 * math.pi * walked[i] / stride_length + step_offsets)
        strides = np.clip(0.4 * np.array(pose.strides) + gait, -9.0, 9.0)
        mice.append(replace(pose, heading_deg=float(heading % 360.0), position_mm=tuple(xy[i].tolist()),
                            strides=tuple(strides.tolist())))
    return mice, key_frames


def _flicker(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    """Global light gains [n] around 1: a slow drift and an aliased mains beat (each 0.5-2 %) plus jitter."""
    t = np.arange(n) / fps
    u = rng.uniform
    gains = (1.0 + u(0.005, 0.02) * np.sin(2 * math.pi * u(0.3, 2.0) * t + u(0, 2 * math.pi))
             + u(0.005, 0.02) * np.sin(2 * math.pi * u(3.0, 12.0) * t + u(0, 2 * math.pi))
             + u(0.002, 0.008) * rng.standard_normal(n))
    return gains.clip(0.9, 1.1)


def plan_recording(calibration: Calibration, num_frames: int, seed: int = 0, fps: float = 100.0, scale: float = 1.0,
                   empty_clip_frames: int = 10, key_pose_interval_s: float = 0.6, noise_sigma: float | None = None,
                   trace: TraceConfig = TraceConfig()) -> RecordingPlan:
    """Draw everything of a recording from `seed` (see `generate_recording` for the arguments)."""
    if num_frames < 1 or empty_clip_frames < 1:
        raise ValueError(f"need at least one frame and one empty-clip frame, got {num_frames}, {empty_clip_frames}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    calibration = scale_calibration(calibration, scale)
    rng = np.random.default_rng(seed)  # the scene first, so it does not depend on the recording's length
    light = sample_light(rng)
    arena = sample_arena(rng, list(calibration.cameras), clear_radius=95.0)
    sigma = float(rng.uniform(1.0, 3.0) / 255.0)
    sigma = sigma if noise_sigma is None else float(noise_sigma)
    mice, key_frames = _motion(rng, num_frames, fps, key_pose_interval_s)
    return RecordingPlan(seed=seed, fps=float(fps), scale=float(scale), calibration=calibration, light=light,
                         arena=arena, mice=tuple(mice), gains=_flicker(rng, num_frames, fps),
                         background_gains=_flicker(rng, empty_clip_frames, fps), noise_sigma=sigma,
                         key_frames=tuple(key_frames), trace=trace)


# ---- the arena, analytically --------------------------------------------------------------------------


def grain_image(seed: int) -> np.ndarray:
    """The tiled fine-grain texture [GRAIN_SIZE, GRAIN_SIZE] float32, unit std, ~2 mm blobs."""
    noise = np.random.default_rng(seed).standard_normal((GRAIN_SIZE, GRAIN_SIZE)).astype(np.float32)
    pad = 4  # blur a periodically padded copy so the texture stays seamless
    noise = cv2.GaussianBlur(np.pad(noise, pad, mode="wrap"), (0, 0), 1.0)[pad:-pad, pad:-pad]
    return np.ascontiguousarray(noise / noise.std())


def _sample_tiled(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples [P] of a periodic image [N, N] at texel coordinates xy [P, 2] (x along columns)."""
    n = image.shape[0]
    base = np.floor(xy)
    fx, fy = (xy - base).T
    x0, y0 = (base.astype(np.int64) % n).T
    x1, y1 = (x0 + 1) % n, (y0 + 1) % n
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _cylinder(origins: np.ndarray, dirs: np.ndarray, centre: np.ndarray, radius: float):
    """Ray parameters (entry, exit) [P] of rays [P, 3] through the vertical cylinder; NaN where they miss."""
    o = origins[:, :2] - centre
    d = dirs[:, :2]
    a = np.maximum((d * d).sum(-1), 1e-12)
    b = 2 * (o * d).sum(-1)
    c = (o * o).sum(-1) - radius ** 2
    root = np.sqrt(np.where(b * b - 4 * a * c >= 0, b * b - 4 * a * c, np.nan))
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def trace_arena(arena: Arena, origins: np.ndarray, dirs: np.ndarray):
    """First hits of rays [P, 3] (float64, cameras outside the wall, inside the room) -> kind [P] (FLOOR,
    OUTER_WALL, INNER_WALL, TABLE, ROOM), points [P, 3] and unit normals [P, 3]."""
    centre = np.array(arena.centre_mm)
    t1, t2 = _cylinder(origins, dirs, centre, arena.wall_radius_mm)
    _, t_room = _cylinder(origins, dirs, centre, arena.room_radius_mm)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(dirs[:, 2] < 0, -origins[:, 2] / dirs[:, 2], np.inf)
    z1, z2 = origins[:, 2] + t1 * dirs[:, 2], origins[:, 2] + t2 * dirs[:, 2]
    on_wall = lambda z: (z >= 0) & (z <= arena.wall_height_mm)  # NaN (a miss) compares False
    outer = (t1 > 0) & on_wall(z1)
    floor = ~outer & (t_floor >= t1) & (t_floor <= t2)
    inner = ~outer & ~floor & on_wall(z2)
    table = ~outer & ~floor & ~inner & (t_floor < t_room)
    kind = np.full(len(origins), ROOM, dtype=np.int8)
    t = t_room.copy()
    for mask, k, tk in ((outer, OUTER_WALL, t1), (floor, FLOOR, t_floor), (inner, INNER_WALL, t2),
                        (table, TABLE, t_floor)):
        kind[mask], t[mask] = k, tk[mask]
    points = origins + t[:, None] * dirs
    radial = np.zeros_like(points)
    radial[:, :2] = points[:, :2] - centre
    radial /= np.maximum(np.linalg.norm(radial, axis=-1, keepdims=True), 1e-9)
    normals = np.where((kind == INNER_WALL)[:, None] | (kind == ROOM)[:, None], -radial, radial)
    normals[(kind == FLOOR) | (kind == TABLE)] = (0.0, 0.0, 1.0)
    return kind, points, normals


def shade_arena(arena: Arena, light: Light, kind: np.ndarray, points: np.ndarray, normals: np.ndarray,
                grain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear radiance of arena hits [P] split into the ambient and the key-light part, each [P, 3] float32
    (the mouse's blob shadow scales them per frame). Lambertian, as `trace.shade` (sky term, no highlight)."""
    x, y = points[:, 0], points[:, 1]
    mottle = sum(a * np.sin(kx * x + ky * y + phase) for kx, ky, phase, a in arena.mottle)
    albedo = np.empty_like(points)
    for k, rgb in ((FLOOR, arena.floor_rgb), (TABLE, arena.table_rgb), (OUTER_WALL, arena.wall_rgb),
                   (INNER_WALL, arena.wall_rgb), (ROOM, arena.room_rgb)):
        albedo[kind == k] = rgb
    grains = _sample_tiled(grain, (points[:, :2] - np.array(arena.centre_mm)) / GRAIN_TEXEL_MM)
    floor, table, wall = kind == FLOOR, kind == TABLE, (kind == OUTER_WALL) | (kind == INNER_WALL)
    albedo[floor] *= ((1 + mottle) * (1 + arena.grain * grains))[floor, None]
    albedo[table] *= (1 + 0.5 * mottle)[table, None]
    albedo[wall] *= (0.85 + 0.15 * points[wall, 2:3] / max(arena.wall_height_mm, 1e-6))
    angle = np.arctan2(y - arena.centre_mm[1], x - arena.centre_mm[0])
    albedo[kind == ROOM] *= (1 + 0.15 * np.sin(3 * angle))[kind == ROOM, None]  # uneven room light
    linear = albedo.clip(0, 1) ** GAMMA
    sky = 0.75 + 0.25 * normals[:, 2]
    lambert = (normals @ np.array(light.direction)).clip(0, None)
    ambient = linear * np.array(light.ambient)[None] * sky[:, None]
    key = linear * np.array(light.key)[None] * lambert[:, None]
    return ambient.astype(np.float32), key.astype(np.float32)


# ---- rendering --------------------------------------------------------------------------------------


@dataclass
class _View:
    """One camera's precomputed canvas: the pinhole camera over it, the arena's radiance parts, floor xy,
    the wall's occlusion, and the remap from canvas to the raw image."""

    canvas: Cameras  # [1], pinhole, over the canvas
    ambient: np.ndarray  # [Hc, Wc, 3] float32 linear
    key: np.ndarray  # [Hc, Wc, 3]
    floor_xy: np.ndarray  # [Hc, Wc, 2] float32, NaN off the floor inside the wall
    occluded: np.ndarray  # [Hc, Wc] float32, 1 where the outer wall hides the arena's inside
    map_x: np.ndarray  # [H, W] float32, canvas coordinates in OpenCV's pixel-centre convention
    map_y: np.ndarray


def distortion_map(camera: LensCamera) -> tuple[np.ndarray, np.ndarray]:
    """For every raw pixel centre of `camera` (distorted), its position in `camera.pinhole()`'s image:
    x, y [H, W] float64 in our pixel-edge convention (may lie outside the image)."""
    u = np.arange(camera.width, dtype=np.float64) + 0.5
    v = np.arange(camera.height, dtype=np.float64) + 0.5
    pixels = np.stack(np.meshgrid(u, v), -1)  # [H, W, 2]
    xy = camera.undistort_points(pixels)
    K = camera.pinhole().K
    return K[0, 0] * xy[..., 0] + K[0, 2], K[1, 1] * xy[..., 1] + K[1, 2]


@dataclass(frozen=True)
class RenderedFrame:
    """One noise-free frame of every camera.

    images:          sRGB [V, H, W, 3] float32 in [0, 1], as the cameras see it before sensor noise.
    alphas:          the mouse's coverage [V, H, W] float32 in [0, 1] of each raw (distorted) pixel.
    mouse_center_mm: [3] float64, the centre of the mouse's torso box (`generate.mouse_center`), or None.
    """

    images: np.ndarray
    alphas: np.ndarray
    mouse_center_mm: np.ndarray | None


class RecordingRenderer:
    """Renders a plan's frames noise-free (the arena and the remaps are computed once, at construction)."""

    def __init__(self, plan: RecordingPlan) -> None:
        self.plan = plan
        pinholes = plan.calibration.pinhole_cameras()
        grain = grain_image(plan.arena.grain_seed)
        self.views = [self._view(camera, pinholes[i:i + 1], grain) for i, camera in enumerate(plan.calibration.cameras)]

    def _view(self, camera: LensCamera, pinhole: Cameras, grain: np.ndarray) -> _View:
        px, py = distortion_map(camera)
        left, top = math.floor(px.min()) - 2, math.floor(py.min()) - 2
        width, height = math.ceil(px.max()) + 2 - left, math.ceil(py.max()) + 2 - top
        canvas = pinhole.window(left, top, width, height)
        origins, dirs = (r.reshape(-1, 3).numpy() for r in canvas.to(torch.float64).rays())
        kind, points, normals = trace_arena(self.plan.arena, origins, dirs)
        ambient, key = shade_arena(self.plan.arena, self.plan.light, kind, points, normals, grain)
        floor_xy = np.where((kind == FLOOR)[:, None], points[:, :2], np.nan).astype(np.float32)
        shape = (height, width)
        return _View(canvas=canvas, ambient=ambient.reshape(*shape, 3), key=key.reshape(*shape, 3),
                     floor_xy=floor_xy.reshape(*shape, 2), occluded=(kind == OUTER_WALL).astype(np.float32).reshape(shape),
                     map_x=(px - 0.5 - left).astype(np.float32), map_y=(py - 0.5 - top).astype(np.float32))

    def render(self, frame: int) -> RenderedFrame:
        """Frame `frame` of the recording, noise-free (flicker included)."""
        return self._render(self.plan.mice[frame], float(self.plan.gains[frame]))

    def render_background(self, frame: int) -> np.ndarray:
        """Frame `frame` of the empty-arena clip -> sRGB [V, H, W, 3] float32 in [0, 1], noise-free."""
        return self._render(None, float(self.plan.background_gains[frame])).images

    def _render(self, params: MouseParams | None, gain: float) -> RenderedFrame:
        shape = build_mouse(params) if params is not None else None
        centre = mouse_center(shape) if shape is not None else None
        alphas = [np.zeros(view.occluded.shape, np.float32) for view in self.views]  # [Hc, Wc] each
        if shape is None:
            linears = [view.ambient + view.key for view in self.views]  # [Hc, Wc, 3] each
        else:
            linears = [self._shadowed(view, params, centre) for view in self.views]
            self._composite(shape, linears, alphas)
        images, coverage = [], []
        for view, linear, alpha in zip(self.views, linears, alphas):
            raw = cv2.remap(linear, view.map_x, view.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            images.append(np.clip(raw * gain, 0.0, 1.0) ** (1.0 / GAMMA))
            coverage.append(cv2.remap(alpha, view.map_x, view.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT))
        return RenderedFrame(images=np.stack(images).astype(np.float32), alphas=np.stack(coverage).clip(0.0, 1.0),
                             mouse_center_mm=centre)

    def _shadowed(self, view: _View, params: MouseParams, centre: np.ndarray) -> np.ndarray:
        """The arena's radiance [Hc, Wc, 3] with the mouse's blob shadow: the key light dimmed by an elliptical
        Gaussian (along the heading) around the mouse's centre [3] projected along the light onto the
        floor, the ambient by a tighter one right under it. Only the floor inside the wall darkens."""
        light = np.array(self.plan.light.direction)
        cast = centre[:2] - centre[2] * light[:2] / light[2]
        along, across = 0.35 * params.body_length_mm, 0.2 * params.body_length_mm * params.girth
        reach = 3.0 * along + float(np.linalg.norm(cast - centre[:2]))
        corners = torch.tensor([[centre[0] + sx * reach, centre[1] + sy * reach, 0.0]
                                for sx in (-1, 1) for sy in (-1, 1)], dtype=torch.float32)
        uv = view.canvas.project(corners[None])[0][0]  # [4, 2]
        x0, y0, x1, y1 = _clip_box(uv, view.occluded.shape, margin=0)
        linear = view.ambient + view.key
        if x1 <= x0 or y1 <= y0:
            return linear
        heading = math.radians(params.heading_deg)
        rot = np.array([[math.cos(heading), math.sin(heading)], [-math.sin(heading), math.cos(heading)]])
        xy = view.floor_xy[y0:y1, x0:x1].astype(np.float64)  # [h, w, 2]

        def blob(at: np.ndarray, sa: float, sb: float) -> np.ndarray:  # [h, w], 0 off the floor
            local = (xy - at) @ rot.T  # along, across the heading
            return np.nan_to_num(np.exp(-0.5 * ((local[..., 0] / sa) ** 2 + (local[..., 1] / sb) ** 2)))

        key_dim = 1.0 - 0.85 * self.plan.light.shadow * blob(cast, along, across)
        ambient_dim = 1.0 - 0.35 * blob(centre[:2], 0.8 * along, 0.8 * across)
        linear[y0:y1, x0:x1] = (view.ambient[y0:y1, x0:x1] * ambient_dim[..., None]
                                + view.key[y0:y1, x0:x1] * key_dim[..., None])
        return linear

    def _composite(self, shape, linears: list[np.ndarray], alphas: list[np.ndarray]) -> None:
        """Trace the mouse in one window per camera around its projected box (one batched trace: all windows
        take the largest box's size); composite it into each linear [Hc, Wc, 3] and write its coverage
        (hidden where the outer wall is in front) into each alpha [Hc, Wc], in place."""
        box = shape.bounds()  # [2, 3]
        corners = torch.stack([torch.stack([box[i, 0], box[j, 1], box[k, 2]])
                               for i in (0, 1) for j in (0, 1) for k in (0, 1)])  # [8, 3]
        boxes = [_clip_box(view.canvas.project(corners[None])[0][0], view.occluded.shape, margin=2)
                 for view in self.views]
        seen = [i for i, (x0, y0, x1, y1) in enumerate(boxes) if x1 > x0 and y1 > y0]
        if not seen:
            return
        width = max(boxes[i][2] - boxes[i][0] for i in seen)
        height = max(boxes[i][3] - boxes[i][1] for i in seen)
        windows = Cameras.cat([self.views[i].canvas.window(boxes[i][0], boxes[i][1], width, height) for i in seen])
        rgba = render_rgba(shape, windows, self.plan.light, self.plan.trace).numpy()  # [S, height, width, 4]
        for k, i in enumerate(seen):
            x0, y0 = boxes[i][:2]
            h, w = alphas[i].shape
            x1, y1 = min(w, x0 + width), min(h, y0 + height)
            patch = rgba[k, :y1 - y0, :x1 - x0]
            a = patch[..., 3] * (1.0 - self.views[i].occluded[y0:y1, x0:x1])
            under = linears[i][y0:y1, x0:x1]
            linears[i][y0:y1, x0:x1] = a[..., None] * patch[..., :3] ** GAMMA + (1.0 - a[..., None]) * under
            alphas[i][y0:y1, x0:x1] = a


def _clip_box(uv: torch.Tensor, shape: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) around points uv [N, 2] plus a margin, clipped to an image of `shape` (h, w)."""
    lo, hi = uv.min(0).values.tolist(), uv.max(0).values.tolist()
    h, w = shape
    return (max(0, math.floor(lo[0]) - margin), max(0, math.floor(lo[1]) - margin),
            min(w, math.ceil(hi[0]) + margin), min(h, math.ceil(hi[1]) + margin))


# ---- writing ------------------------------------------------------------------------------------------


def rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
    """sRGB uint8 [H, W, 3] (H, W even) -> yuv420p planes stacked [H * 3 / 2, W] uint8: BT.601, limited range,
    chroma averaged over 2 x 2 pixels (done here, not by swscale, so the encoder input is exact)."""
    x = image.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    cb = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    cr = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    h, w = y.shape
    half = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean((1, 3)).reshape(h // 4, w)
    return np.clip(np.rint(np.concatenate([y, half(cb), half(cr)])), 0, 255).astype(np.uint8)


class VideoWriter:
    """An H.264 (libx264, yuv420p, BT.601 limited range) .mp4 written frame by frame; frame i has pts i in
    a 1 / fps time base, keyframes exactly every `gop` frames."""

    def __init__(self, path: Path, width: int, height: int, fps: float, crf: int, gop: int) -> None:
        rate = Fraction(fps).limit_denominator(1001 * 1000)
        self.container = av.open(str(path), "w", options={"video_track_timescale": str(rate.numerator)}
                                 if rate.denominator == 1 else {})
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.time_base = 1 / rate
        context = self.stream.codec_context
        context.thread_count = 1
        context.colorspace = context.color_primaries = context.color_trc = 6  # SMPTE 170M (BT.601)
        context.color_range = 1  # limited ("MPEG")
        self.stream.options = {"crf": str(crf), "preset": PRESET,
                               "x264-params": f"keyint={gop}:min-keyint={gop}:{X264_PARAMS}"}
        self.frames = 0

    def write(self, image: np.ndarray) -> None:  # [H, W, 3] uint8 sRGB
        frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p")
        frame.pts = self.frames
        self.frames += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


class MaskWriter:
    """Ground-truth masks uint8 [F, H, W] streamed into an .npz holding one array "masks", the file
    `np.savez_compressed(path, masks=...)` writes, without holding all frames in memory."""

    def __init__(self, path: Path, num_frames: int, height: int, width: int) -> None:
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)
        self.file = self.zip.open("masks.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (num_frames, height, width)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, mask: np.ndarray) -> None:  # [H, W] uint8
        self.file.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())

    def close(self) -> None:
        self.file.close()
        self.zip.close()


def _noisy(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """sRGB float [..., 3] in [0, 1] + Gaussian noise of std sigma -> uint8."""
    noise = rng.standard_normal(images.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(np.rint((images + noise) * 255.0), 0, 255).astype(np.uint8)


def _camera_frames(renderer: RecordingRenderer, frame: int, background: bool):
    """What the cameras record at `frame` of the recording (or of the empty clip): uint8 images [V, H, W, 3], the
    uint8 masks [V, H, W] (None for the clip) and the mouse centre [3] (or None). The noise is seeded by
    (seed, clip, frame), so the output does not depend on which process renders which frame."""
    plan = renderer.plan
    rng = np.random.default_rng([plan.seed, 2 if background else 1, frame])
    if background:
        return _noisy(renderer.render_background(frame), plan.noise_sigma, rng), None, None
    rendered = renderer.render(frame)
    masks = np.rint(rendered.alphas * 255.0).astype(np.uint8)
    return _noisy(rendered.images, plan.noise_sigma, rng), masks, rendered.mouse_center_mm


_WORKER: dict = {}  # the renderer of a worker process


def _start_worker(plan: RecordingPlan) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _WORKER["renderer"] = RecordingRenderer(plan)


def _worker_frames(item: tuple[int, bool]):
    return _camera_frames(_WORKER["renderer"], *item)


def _rendered(plan: RecordingPlan, items: list[tuple[int, bool]], workers: int):
    """_camera_frames of every (frame, background) item, in order, rendered here or by `workers` processes."""
    if workers == 1:
        renderer = RecordingRenderer(plan)
        yield from (_camera_frames(renderer, *item) for item in items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(plan,))
    try:
        yield from pool.map(_worker_frames, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def generate_recording(out_dir: str | Path, calibration: Calibration, num_frames: int, seed: int = 0,
                       fps: float = 100.0, scale: float = 1.0, empty_clip_frames: int = 10, crf: int = 20,
                       gop: int = 50, key_pose_interval_s: float = 0.6, noise_sigma: float | None = None,
                       trace: TraceConfig = TraceConfig(), workers: int = 1) -> Path:
    """Write a synthetic rig recording with ground truth into `out_dir` (layout: the module docstring).

    calibration:         the rig (e.g. `load_calibration` of the real label3d_dannce.mat, mm, +Z up, floor z = 0).
    num_frames, fps:     length and rate of every camera's video.
    scale:               image scale (0.25: 288 x 256 for the 1152 x 1024 rig); sizes are rounded to even.
    empty_clip_frames:   frames of the empty-arena clip per camera.
    crf, gop:            libx264 quality (18-23 look clean) and keyframe interval.
    key_pose_interval_s: time between drawn key poses (shorter in short recordings, see the module docstring).
    noise_sigma:         sensor noise std in units of the 8-bit range (None: drawn, 1/255-3/255).
    trace:               the mouse's sphere tracing (supersampling of its coverage alpha).
    workers:             processes rendering frames (the tracer is single-threaded; a full-size frame takes
                         ~20 s on one core); the files do not depend on it. Workers are spawned, so a
                         script passing workers > 1 needs the `if __name__ == "__main__":` guard.

    Everything is drawn from `seed`; the same arguments give identical decoded frames. The folder must
    not exist or be empty (FileExistsError otherwise); it is written as `<out_dir>.partial` and renamed.
    Returns out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output folder exists and is not empty")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    plan = plan_recording(calibration, num_frames, seed, fps, scale, empty_clip_frames, key_pose_interval_s,
                          noise_sigma, trace)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("videos", "background", "ground_truth"):
        (tmp / sub).mkdir(parents=True)
    save_dannce_mat(tmp / "label3d_dannce.mat", plan.calibration)
    cameras = plan.calibration.cameras
    width, height = cameras[0].width, cameras[0].height

    videos, masks, backgrounds = [], [], []
    for camera in cameras:
        (tmp / "videos" / camera.name).mkdir()
        videos.append(VideoWriter(tmp / "videos" / camera.name / "0.mp4", width, height, fps, crf, gop))
        masks.append(MaskWriter(tmp / "ground_truth" / f"masks_{camera.name}.npz", num_frames, height, width))
        backgrounds.append(VideoWriter(tmp / "background" / f"{camera.name}.mp4", width, height, fps, crf, gop))
    items = [(frame, False) for frame in range(num_frames)] + [(frame, True) for frame in range(empty_clip_frames)]
    centres = []
    outputs = _rendered(plan, items, min(workers, len(items)))
    try:
        for (_, background), (images, alphas, centre) in zip(items, progress(outputs, total=len(items),
                                                                              desc="recording", unit="frame")):
            if background:
                for image, video in zip(images, backgrounds):
                    video.write(image)
                continue
            for image, alpha, video, mask in zip(images, alphas, videos, masks):
                video.write(image)
                mask.write(alpha)
            centres.append(centre.tolist())
    finally:
        outputs.close()  # stops the worker processes if writing failed
    for writer in videos + masks + backgrounds:
        writer.close()

    record = {
        "generator": "mouserecon.synth.recording", "seed": seed, "num_frames": num_frames, "fps": plan.fps,
        "scale": plan.scale, "image_size": [width, height], "cameras": plan.calibration.names,
        "calibration_source": str(calibration.path), "units": "mm", "world_up": [0.0, 0.0, 1.0],
        "mice": [asdict(m) for m in plan.mice], "mouse_center_mm": centres, "key_frames": list(plan.key_frames),
        "key_pose_interval_s": key_pose_interval_s, "light": asdict(plan.light), "arena": asdict(plan.arena),
        "flicker_gains": plan.gains.tolist(), "background_flicker_gains": plan.background_gains.tolist(),
        "noise_sigma": plan.noise_sigma, "noise_sigma_8bit": plan.noise_sigma * 255.0,
        "encoder": {"codec": "libx264", "pix_fmt": "yuv420p", "colour": "BT.601 limited range", "crf": crf,
                    "gop": gop, "preset": PRESET, "x264_params": X264_PARAMS, "container": "mp4",
                    "pts": "frame index, time base 1/fps"},
        "trace": asdict(trace),
        "mask_encoding": "uint8 round(255 * coverage) of each raw (distorted) pixel, key 'masks' [F, H, W]",
    }
    (tmp / "ground_truth" / RECORDING_JSON).write_text(json.dumps(record, indent=1))
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    log.info("wrote a %d-frame synthetic recording of %d cameras (%dx%d) to %s", num_frames, len(cameras),
             width, height, out_dir)
    return out_dir
