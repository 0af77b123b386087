"""A randomised camera rig like the real markerless_mouse_1 rig (millimetres, world +Z up), and its framing.

The real rig (../shared/data/markerless_mouse_1_rig/rig_geometry.txt): 6 cameras 300-333 mm
from the point their optical axes meet, alternating low (elevation 0.7-2.2 deg) and high
(15-18 deg) around the arena, azimuth gaps 53-67 deg (not a uniform ring), horizontal FOV
38.1-38.8 deg on 1152 x 1024 px (fx 1637-1669 px), principal points up to ~8% off centre,
roll within +-2 deg; the axes meet 59.6 mm above the floor, and the mouse (its 18000 COM positions)
is spread around a point 17 mm away from there in xy (ARENA_COM_*).

`sample_rig` draws such a rig around an aim point: cameras sorted by azimuth, alternating
low/high (which comes first is random), every gap drawn from [1 - s, 1 + s] x 360/n deg
(RigConfig.gap_spread s) by rejection so the last gap also lies in range; each camera looks at the
aim point plus a few mm of jitter, with a small roll. Held-out cameras (optional) sit at uniform random
azimuths and elevations in the span of the rig. All cameras are OpenCV (image up = -y).

`sample_framed_rig` (variety broad) frames the mouse as a real rig and `prepare` would: either a full
1152 x 1024 REAL_RIG aimed at the arena point above (0, 0), the mouse where it happens to be, each
view rendered only in a square crop around the mouse's projection ("window": a pixel crop of the
frame, or "perspective": `prepare`'s crop, the camera turned to the mouse), or the classic rig aimed
at the mouse ("aimed").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from mouserecon.cameras import Cameras
from mouserecon.cameras import look_at as look_at_torch
from mouserecon.normalize import rotation_between

# The real recording (rig_geometry.txt, keypoints_markerless_mouse_1.npz `com3d_mm_all_frames`): mean and
# covariance of the mouse's COM in xy relative to the optical axes' meeting point (46.95, 49.18, 59.61).
# The positions fill an ellipse (the arena; 99 % within Mahalanobis radius 2.3, median 1.37) more than a
# Gaussian, so mice are placed uniformly within the radius ARENA_COM_REACH (median 1.48).
SENSOR_PX = (1152, 1024)  # width, height
ARENA_AIM_HEIGHT_MM = 59.61
ARENA_COM_MEAN_MM = (8.21, 14.40)
ARENA_COM_COV_MM2 = ((1241.8, -304.6), (-304.6, 1387.8))
ARENA_COM_REACH = 2.1


@dataclass(frozen=True)
class RigConfig:
    """Ranges (degrees, millimetres) the rig is drawn from."""

    low_elevation_deg: tuple[float, float] = (0.0, 5.0)
    high_elevation_deg: tuple[float, float] = (15.0, 24.0)
    heldout_elevation_deg: tuple[float, float] = (0.0, 30.0)
    distance_mm: tuple[float, float] = (300.0, 330.0)
    hfov_deg: tuple[float, float] = (35.0, 42.0)
    aspect_jitter: float = 0.01  # fy = fx * (1 + U(-a, a))
    principal_jitter: float = 0.05  # cx, cy offset from the centre as a fraction of the image size
    roll_deg: float = 2.0
    look_jitter_mm: float = 6.0  # per-camera offset of the look-at point from the aim point
    gap_spread: float = 1.0 / 6.0  # azimuth gaps within (1 +- spread) x 360 / n

    def __post_init__(self) -> None:
        for name in ("low_elevation_deg", "high_elevation_deg", "heldout_elevation_deg", "distance_mm", "hfov_deg"):
            lo, hi = getattr(self, name)
            assert lo <= hi, f"RigConfig.{name}: empty range {lo}..{hi}"
        assert 0 <= self.gap_spread < 1, "gap_spread must be in [0, 1)"


# The real rig's ranges, a little widened: fx = 576 / tan(hfov / 2) = 1617-1692 px on SENSOR_PX.
REAL_RIG = RigConfig(low_elevation_deg=(0.0, 5.0), high_elevation_deg=(15.0, 25.0), distance_mm=(300.0, 335.0),
                     hfov_deg=(37.6, 39.2), principal_jitter=0.08, look_jitter_mm=5.0, gap_spread=0.125)


def look_at(eye: np.ndarray, target: np.ndarray, roll_deg: float = 0.0) -> np.ndarray:
    """OpenCV c2w [4, 4] for a camera at `eye` looking at `target`, image up towards +Z, then rolled."""
    c2w = look_at_torch(torch.from_numpy(np.asarray(eye, np.float64)),
                        torch.from_numpy(np.asarray(target, np.float64))).numpy()
    right, down = c2w[:3, 0].copy(), c2w[:3, 1].copy()
    r = math.radians(roll_deg)
    c2w[:3, 0], c2w[:3, 1] = math.cos(r) * right + math.sin(r) * down, -math.sin(r) * right + math.cos(r) * down
    return c2w


def sample_azimuths(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """n azimuths (deg, ascending from a random start) whose n gaps all lie in (1 +- spread) x 360 / n."""
    mean = 360.0 / n
    lo, hi = mean * (1 - spread), mean * (1 + spread)
    for _ in range(10_000):
        gaps = rng.uniform(lo, hi, size=n - 1)
        last = 360.0 - gaps.sum()
        if lo <= last <= hi:
            break
    else:
        raise RuntimeError(f"could not draw {n} azimuth gaps in [{lo:.1f}, {hi:.1f}] deg")
    start = rng.uniform(0.0, 360.0)
    return start + np.concatenate([[0.0], np.cumsum(gaps)])


@dataclass(frozen=True)
class RigSample:
    """The drawn rig: cameras [V] (rig views first, then held-out views) and per-camera values."""

    cameras: Cameras
    kind: list[str]  # "low" | "high" | "heldout"
    azimuth_deg: list[float]
    elevation_deg: list[float]
    distance_mm: list[float]
    hfov_deg: list[float]
    roll_deg: list[float]
    aim_point_mm: list[float]

    def record(self) -> dict:
        out = asdict(self)
        out.pop("cameras")
        return out


def sample_rig(rng: np.random.Generator, aim_point: np.ndarray, resolution: int, n_views: int = 6,
               n_heldout: int = 0, config: RigConfig = RigConfig(), height: int | None = None) -> RigSample:
    """Draw n_views rig cameras (alternating low/high) + n_heldout cameras around aim_point [3] (mm).

    Images are `resolution` px wide and `height` px high (None: square); config.hfov_deg is horizontal,
    the principal point jitter a fraction of each side.
    """
    assert n_views >= 2 and n_heldout >= 0, f"need >= 2 rig views, got {n_views}"
    size = np.array([resolution, resolution if height is None else height])
    u = rng.uniform
    azimuths = list(sample_azimuths(rng, n_views, config.gap_spread))
    first_high = rng.uniform() < 0.5
    kinds = ["high" if (i % 2 == 1) != first_high else "low" for i in range(n_views)] + ["heldout"] * n_heldout
    azimuths += list(u(0.0, 360.0, size=n_heldout))
    ranges = {"low": config.low_elevation_deg, "high": config.high_elevation_deg,
              "heldout": config.heldout_elevation_deg}
    c2ws, intrinsics, record = [], [], {k: [] for k in ("elevation_deg", "distance_mm", "hfov_deg", "roll_deg")}
    for kind, azimuth in zip(kinds, azimuths):
        elevation, distance = u(*ranges[kind]), u(*config.distance_mm)
        hfov, roll = u(*config.hfov_deg), u(-config.roll_deg, config.roll_deg)
        az, el = math.radians(azimuth), math.radians(elevation)
        eye = aim_point + distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        target = aim_point + u(-config.look_jitter_mm, config.look_jitter_mm, size=3)
        c2ws.append(look_at(eye, target, roll))
        fx = 0.5 * resolution / math.tan(math.radians(hfov) / 2)
        fy = fx * (1.0 + u(-config.aspect_jitter, config.aspect_jitter))
        cx, cy = size * (0.5 + u(-config.principal_jitter, config.principal_jitter, size=2))
        intrinsics.append([fx, fy, cx, cy])
        for key, value in zip(record, (elevation, distance, hfov, roll)):
            record[key].append(float(value))
    cameras = Cameras(torch.tensor(np.array(c2ws), dtype=torch.float32),
                      torch.tensor(intrinsics, dtype=torch.float32), int(size[0]), int(size[1]))
    return RigSample(cameras=cameras, kind=kinds, azimuth_deg=[float(a % 360.0) for a in azimuths],
                     aim_point_mm=[float(v) for v in aim_point], **record)


# ---- framing (variety broad) --------------------------------------------------------------------

FRAMINGS = ("perspective", "window", "aimed")


@dataclass(frozen=True)
class FramingConfig:
    """How `sample_framed_rig` frames the mouse; margins are per side, fractions of the longer side of the
    mouse's box, as `prepare --margin`."""

    weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # of FRAMINGS
    margin: tuple[float, float] = (0.05, 0.40)
    shift: float = 0.5  # crop offset: up to this fraction of the slack the margin leaves, per axis
    aim_height_mm: tuple[float, float] = (40.0, 80.0)  # where the full rig's axes meet, above (0, 0)
    centre_jitter_mm: float = 5.0  # perspective and aimed: the look-at point around the mouse's centre

    def __post_init__(self) -> None:
        assert len(self.weights) == len(FRAMINGS) and min(self.weights) >= 0 and abs(sum(self.weights) - 1) < 1e-9, \
            f"FramingConfig.weights must be {len(FRAMINGS)} non-negative weights summing to 1, got {self.weights}"
        assert 0 <= self.margin[0] <= self.margin[1], f"FramingConfig.margin: bad range {self.margin}"
        assert 0 <= self.shift <= 1, f"FramingConfig.shift must be in [0, 1], got {self.shift}"


@dataclass(frozen=True)
class Framing:
    """The drawn framing, recorded in synth.json. Per view (crop modes): the full frame's intrinsics
    (fx, fy, cx, cy on SENSOR_PX), the mouse's box area as a fraction of that frame, whether the box lies
    inside the frame (else the crop reaches past the sensor's edge, where the render simply continues),
    and for "window" the crop (left, top, side) in sensor pixels and whether it was grown to contain
    the principal point (the loader rejects cameras whose principal point is outside the image)."""

    mode: str
    margin: float | None = None
    sensor_intrinsics: list[list[float]] | None = None
    box_fraction: list[float] | None = None
    box_inside_sensor: list[bool] | None = None
    windows: list[list[int]] | None = None
    grown: list[bool] | None = None

    def record(self) -> dict:
        return asdict(self)


def sample_framed_rig(rng: np.random.Generator, outline: torch.Tensor, centre: np.ndarray, resolution: int,
                      n_views: int = 6, n_heldout: int = 0, rig: RigConfig = REAL_RIG,
                      config: FramingConfig = FramingConfig()) -> tuple[RigSample, Framing]:
    """Cameras [n_views + n_heldout] of `resolution` px square framing a mouse (variety broad).

    outline: [N, 3] points on the mouse's surface (mm; `Shape.surface_samples`), whose projections bound
    its silhouette; centre: [3] the mouse's centre (mm). The mode is drawn from config.weights:
    "window" and "perspective" draw a full SENSOR_PX `rig` (n_views + n_heldout cameras, held-out ones at
    random azimuths) around the arena point (0, 0, aim height), then crop each view around the mouse's box
    with one margin per sample and a shift per view: "window" cuts the frame (intrinsics: the principal point
    moved, the focal length scaled; the axes still meet at the arena point), "perspective" turns the camera
    to the mouse's centre as `prepare` does (principal point near the middle, the axes meet at the mouse).
    "aimed" is the classic rig (RigConfig()) around the mouse's centre.
    """
    u = rng.uniform
    mode = str(rng.choice(FRAMINGS, p=config.weights))
    jitter = lambda: centre + u(-config.centre_jitter_mm, config.centre_jitter_mm, size=3)
    if mode == "aimed":
        return sample_rig(rng, jitter(), resolution, n_views, n_heldout), Framing(mode)
    aim = np.array([0.0, 0.0, u(*config.aim_height_mm)])
    full = sample_rig(rng, aim, SENSOR_PX[0], n_views, n_heldout, rig, height=SENSOR_PX[1])
    margin = u(*config.margin)
    shifts = u(-config.shift, config.shift, size=(len(full.cameras), 2))
    uv, depth = full.cameras.project(outline[None].expand(len(full.cameras), -1, -1).to(full.cameras.c2w))
    assert (depth > 0).all(), "the mouse is behind a camera"
    lo, hi = uv.min(1).values.double().numpy(), uv.max(1).values.double().numpy()  # [V, 2] the mouse's boxes
    framing = Framing(mode, margin, sensor_intrinsics=full.cameras.intrinsics.double().tolist(),
                      box_fraction=((hi - lo).prod(1) / np.prod(SENSOR_PX)).tolist(),
                      box_inside_sensor=((lo >= 0) & (hi <= np.array(SENSOR_PX))).all(1).tolist())
    if mode == "window":
        cameras, windows, grown = window_crops(full.cameras, lo, hi, margin, shifts, resolution)
        framing = replace(framing, windows=windows, grown=grown)
    else:
        cameras = perspective_crops(full.cameras, outline.double(), jitter(), margin, shifts, resolution)
    return replace(full, cameras=cameras), framing


def window_crops(cameras: Cameras, lo: np.ndarray, hi: np.ndarray, margin: float, shifts: np.ndarray,
                 resolution: int) -> tuple[Cameras, list[list[int]], list[bool]]:
    """Square pixel crops of cameras [V] around boxes lo, hi [V, 2] (px), resized to `resolution`.

    Side = the box's longer side x (1 + 2 margin); the crop's centre is the box's moved by shifts [V, 2]
    (in [-1, 1]) x the slack on each axis. A crop not containing the principal point with a pixel to spare is
    grown (to the smallest square around both, centred on them) so that the loader accepts it. Integer
    windows (left, top, side) may reach past the image. Returns the cameras, windows and grown flags.
    """
    views, windows, grown = [], [], []
    for v in range(len(cameras)):
        extent = hi[v] - lo[v]
        side = extent.max() * (1.0 + 2.0 * margin)
        start = 0.5 * (lo[v] + hi[v]) + shifts[v] * 0.5 * (side - extent) - 0.5 * side  # [2] x0, y0
        principal = cameras.intrinsics[v, 2:].double().numpy()
        low, high = np.minimum(start, principal - 1.0), np.maximum(start + side, principal + 1.0)
        grown.append(bool((high - low).max() > side))
        side = (high - low).max()
        start = 0.5 * (low + high) - 0.5 * side
        left, top = (int(math.floor(x)) for x in start)
        size = max(math.ceil(start[0] + side) - left, math.ceil(start[1] + side) - top)
        windows.append([left, top, size])
        views.append(cameras[v].window(left, top, size, size).resize(resolution, resolution))
    return Cameras.stack(views), windows, grown


def perspective_crops(cameras: Cameras, outline: torch.Tensor, target: np.ndarray, margin: float,
                      shifts: np.ndarray, resolution: int) -> Cameras:
    """Perspective crops of cameras [V] like `prepare`'s (`data.crop_to_foreground`, which also keeps them level
    with world up): each turned about its centre by the smallest rotation to look at target [3],
    square `resolution` px, fx = fy chosen so that the points outline [N, 3] fit with `margin` of the
    half-extent per side, the principal point at the middle moved by shifts [V, 2] (in [-1, 1]) x the slack."""
    c2ws, intrinsics = [], []
    target = torch.as_tensor(target, dtype=torch.float64)
    for v in range(len(cameras)):
        c2w = cameras.c2w[v].double()
        rotation = rotation_between(c2w[:3, 2], target - c2w[:3, 3]) @ c2w[:3, :3]
        local = (outline - c2w[:3, 3]) @ rotation  # [N, 3] in the turned camera
        extent = (local[:, :2] / local[:, 2:]).abs().max().item()
        focal = 0.5 * resolution / (extent * (1.0 + 2.0 * margin))
        principal = 0.5 * resolution + shifts[v] * resolution * margin / (1.0 + 2.0 * margin)
        new = torch.eye(4, dtype=torch.float64)
        new[:3, :3], new[:3, 3] = rotation, c2w[:3, 3]
        c2ws.append(new)
        intrinsics.append([focal, focal, *principal.tolist()])
    return Cameras(torch.stack(c2ws).to(cameras.c2w.dtype), torch.tensor(intrinsics, dtype=cameras.intrinsics.dtype),
                   resolution, resolution)
