"""A rig's calibration with lens distortion: `LensCamera`, `Calibration`, and undistortion to pinhole cameras.

A rig calibration (DANNCE, Anipose, OpenCV, or our `opencv_cameras.json` with distortion keys) is
converted once, at the boundary, into `LensCamera`s in our conventions (CONVENTIONS.md):

- extrinsics world-to-camera, OpenCV axes: x_cam = R @ X + t;
- intrinsics K [3, 3] in pixels with the pixel-edge convention (pixel (i, j) has its centre at
  (i + 0.5, j + 0.5)); K[0, 1] is the skew (MATLAB calibrations have one);
- distortion in OpenCV's order (k1, k2, p1, p2, k3), the Brown-Conrady model MATLAB, DANNCE and
  OpenCV share, applied to normalised camera coordinates (x, y) = (X / Z, Y / Z):

      r2 = x^2 + y^2,  radial = 1 + k1 r2 + k2 r2^2 + k3 r2^3
      x_d = x radial + 2 p1 x y + p2 (r2 + 2 x^2)
      y_d = y radial + p1 (r2 + 2 y^2) + 2 p2 x y
      u = fx x_d + skew y_d + cx,  v = fy y_d + cy

Undistortion resamples each raw frame to a pinhole camera of the same size with the same focal
lengths and principal point and no skew (`LensCamera.pinhole`); `undistort_maps` gives the
per-pixel source coordinates for `cv2.remap`, computed with the forward model above (exact, no
iteration). Points go the other way with `undistort_points` (fixed-point iteration, as OpenCV's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mouserecon.cameras import Cameras, validate_cameras
from mouserecon.errors import MouseReconError


class CalibrationError(MouseReconError, ValueError):
    """A calibration file cannot be used; the message names the file, the camera and the defect."""


@dataclass(frozen=True, eq=False)
class LensCamera:
    """One calibrated camera with lens distortion (see the module docstring for every convention).

    name:   the camera's name in the calibration (e.g. "Camera1"), used to match it to its video.
    width, height: the raw image size in pixels.
    K:      [3, 3] float64 intrinsics, pixel-edge convention, K[0, 1] = skew.
    dist:   [5] float64 (k1, k2, p1, p2, k3).
    R, t:   [3, 3], [3] float64 world-to-camera.
    """

    name: str
    width: int
    height: int
    K: np.ndarray
    dist: np.ndarray
    R: np.ndarray
    t: np.ndarray

    def __post_init__(self) -> None:
        for key, shape in (("K", (3, 3)), ("dist", (5,)), ("R", (3, 3)), ("t", (3,))):
            value = np.asarray(getattr(self, key), dtype=np.float64)
            assert value.shape == shape, f"{key} must be {shape}, got {value.shape}"
            object.__setattr__(self, key, value)

    @property
    def skew(self) -> float:
        return float(self.K[0, 1])

    @property
    def has_distortion(self) -> bool:
        return bool(np.any(self.dist != 0) or self.skew != 0)

    def distort(self, xy: np.ndarray) -> np.ndarray:
        """Normalised undistorted coordinates [..., 2] -> normalised distorted coordinates [..., 2]."""
        k1, k2, p1, p2, k3 = self.dist
        x, y = xy[..., 0], xy[..., 1]
        r2 = x * x + y * y
        radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
        xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
        yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
        return np.stack([xd, yd], -1)

    def to_pixels(self, xy_distorted: np.ndarray) -> np.ndarray:
        """Normalised distorted coordinates [..., 2] -> pixels [..., 2] through K (with skew)."""
        x, y = xy_distorted[..., 0], xy_distorted[..., 1]
        K = self.K
        return np.stack([K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2]], -1)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [..., 3] -> distorted raw-image pixels [..., 2] (pixel-edge convention) and depth [...]."""
        cam = np.asarray(points, dtype=np.float64) @ self.R.T + self.t
        depth = cam[..., 2]
        return self.to_pixels(self.distort(cam[..., :2] / depth[..., None])), depth

    def undistort_points(self, pixels: np.ndarray, iterations: int = 20) -> np.ndarray:
        """Raw-image pixels [..., 2] -> normalised undistorted coordinates [..., 2] (fixed-point iteration;
        exact to ~1e-9 for the mild distortion of real rigs inside the image)."""
        K = self.K
        yd = (pixels[..., 1] - K[1, 2]) / K[1, 1]
        xd = (pixels[..., 0] - K[0, 2] - K[0, 1] * yd) / K[0, 0]
        distorted = np.stack([xd, yd], -1)
        xy = distorted.copy()
        for _ in range(iterations):
            xy = xy + (distorted - self.distort(xy))
        return xy

    def pinhole(self) -> LensCamera:
        """The undistorted pinhole camera frames are resampled to: same size, fx, fy, cx, cy and pose; no
        skew, no distortion."""
        K = self.K.copy()
        K[0, 1] = 0.0
        return replace(self, K=K, dist=np.zeros(5))

    def c2w(self) -> np.ndarray:  # [4, 4]
        out = np.eye(4)
        out[:3, :3] = self.R.T
        out[:3, 3] = -self.R.T @ self.t
        return out


@dataclass(frozen=True)
class Calibration:
    """A rig's cameras as read from one calibration file.

    path:       the file read.
    format:     "dannce", "anipose", "opencv" (OpenCV JSON/YAML per camera) or "mouserecon"
                (`opencv_cameras.json`, optionally with distortion keys).
    cameras:    the LensCameras in file order.
    units:      length unit of the translations as the file states or implies ("mm" for DANNCE).
    world_up:   [3] world up as the file records it, or None (the caller then takes +Z).
    conversion: what the importer did to reach our conventions, in words (recorded in recording.json).
    """

    path: Path
    format: str
    cameras: tuple[LensCamera, ...]
    units: str | None = None
    world_up: tuple[float, float, float] | None = None
    conversion: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cameras]

    def pinhole_cameras(self) -> Cameras:
        """The undistorted pinhole cameras [V] (float32, our `Cameras`), validated."""
        pinholes = [c.pinhole() for c in self.cameras]
        sizes = {(c.width, c.height) for c in pinholes}
        if len(sizes) != 1:
            raise CalibrationError(f"{self.path}: cameras have different image sizes {sorted(sizes)}; "
                                   "mouserecon needs one size per rig")
        c2w = torch.tensor(np.stack([c.c2w() for c in pinholes]), dtype=torch.float32)
        intrinsics = torch.tensor([[c.K[0, 0], c.K[1, 1], c.K[0, 2], c.K[1, 2]] for c in pinholes],
                                  dtype=torch.float32)
        cameras = Cameras(c2w, intrinsics, pinholes[0].width, pinholes[0].height)
        validate_cameras(cameras, self.path)
        return cameras


def undistort_maps(camera: LensCamera) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates for `cv2.remap(raw, map_x, map_y, ...)` that resample a raw frame of `camera` to
    `camera.pinhole()`: map_x, map_y [H, W] float32 in OpenCV's pixel-centre convention (raw pixel
    (i, j) at (i, j)), i.e. our pixel-edge coordinates minus 0.5."""
    target = camera.pinhole()
    u = np.arange(camera.width, dtype=np.float64) + 0.5
    v = np.arange(camera.height, dtype=np.float64) + 0.5
    uu, vv = np.meshgrid(u, v)
    xy = np.stack([(uu - target.K[0, 2]) / target.K[0, 0], (vv - target.K[1, 2]) / target.K[1, 1]], -1)
    source = camera.to_pixels(camera.distort(xy)) - 0.5
    return source[..., 0].astype(np.float32), source[..., 1].astype(np.float32)
