"""A randomised camera rig like the real markerless_mouse_1 rig (millimetres, world +Z up).

The real rig (../shared/data/markerless_mouse_1_rig/rig_geometry.txt): 6 cameras 300-333 mm
from the point their optical axes meet, alternating low (elevation 0.7-2.2 deg) and high
(15-18 deg) around the arena, azimuth gaps 53-67 deg (not a uniform ring), horizontal FOV
38.1-38.8 deg, principal points up to ~8% off centre, roll within +-2 deg.

`sample_rig` draws such a rig around an aim point: cameras sorted by azimuth, alternating
low/high (which comes first is random), every gap drawn from [5/6, 7/6] x 360/n deg (for n = 6:
50-70 deg) by rejection so the last gap also lies in range; each camera looks at the aim point
plus a few mm of jitter, with a small roll. Held-out cameras (optional) sit at uniform random
azimuths and elevations in the span of the rig. All cameras are OpenCV (image up = -y).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mouserecon.cameras import Cameras
from mouserecon.cameras import look_at as look_at_torch


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
               n_heldout: int = 0, config: RigConfig = RigConfig()) -> RigSample:
    """Draw n_views rig cameras (alternating low/high) + n_heldout cameras around aim_point [3] (mm)."""
    assert n_views >= 2 and n_heldout >= 0, f"need >= 2 rig views, got {n_views}"
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
        cx, cy = resolution * (0.5 + u(-config.principal_jitter, config.principal_jitter, size=2))
        intrinsics.append([fx, fy, cx, cy])
        for key, value in zip(record, (elevation, distance, hfov, roll)):
            record[key].append(float(value))
    cameras = Cameras(torch.tensor(np.array(c2ws), dtype=torch.float32),
                      torch.tensor(intrinsics, dtype=torch.float32), resolution, resolution)
    return RigSample(cameras=cameras, kind=kinds, azimuth_deg=[float(a % 360.0) for a in azimuths],
                     aim_point_mm=[float(v) for v in aim_point], **record)
