"""Conversions from mouserecon containers to what viser draws (the viewer adapter).

Everything here is plain numpy/torch and runs without a server or a browser, so it is unit-tested
directly. Conventions at this boundary:

- Splats: viser's `add_gaussian_splats` takes centres [N, 3], full covariances [N, 3, 3], rgb [N, 3]
  in [0, 1] and opacities [N, 1] in [0, 1]. Covariances travel to the browser as float16, whose
  smallest normal number is ~6.1e-5, so a scene whose Gaussians are tiny (a normalised-rig mouse
  with ~0.005-unit splats has variances ~2.5e-5) loses its shapes. The viewer therefore draws the
  world multiplied by one `scene_scale` (a power of ten): centres and camera positions by s,
  covariances by s^2. Rotations, colours and opacities are unchanged, so the picture is the same.
- Cameras: viser frustums and client cameras use OpenCV axes like `Cameras.c2w`, with a vertical
  field of view in radians; the principal point is assumed central (viser cannot shift it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import viser.transforms as vtf

from mouserecon.cameras import Cameras
from mouserecon.gaussians import Gaussians

# Float16 keeps ~3 significant digits only above its smallest normal (6.1e-5); we want the typical
# (median) variance comfortably above that and the largest far below its maximum (65504).
MIN_MEDIAN_VARIANCE = 1e-3
MAX_MEDIAN_VARIANCE = 1e2


@dataclass(frozen=True)
class SplatArrays:
    """Activated Gaussians as float32 numpy arrays in viser's layout.

    centers: [N, 3]; covariances: [N, 3, 3]; rgbs: [N, 3] in [0, 1]; opacities: [N, 1] in [0, 1].
    """

    centers: np.ndarray
    covariances: np.ndarray
    rgbs: np.ndarray
    opacities: np.ndarray

    def __post_init__(self) -> None:
        n = self.centers.shape[0]
        assert self.centers.shape == (n, 3), f"centers {self.centers.shape}"
        assert self.covariances.shape == (n, 3, 3), f"covariances {self.covariances.shape}"
        assert self.rgbs.shape == (n, 3), f"rgbs {self.rgbs.shape}"
        assert self.opacities.shape == (n, 1), f"opacities {self.opacities.shape}"

    def __len__(self) -> int:
        return self.centers.shape[0]


def splat_arrays(gaussians: Gaussians) -> SplatArrays:
    """Activate an unbatched set of Gaussians [N] into viser's arrays (colour from the SH DC term)."""
    assert gaussians.means.ndim == 2, f"expected an unbatched set [N, 3], got {tuple(gaussians.means.shape)}"
    g = gaussians.detach().to(device="cpu", dtype=torch.float64)
    return SplatArrays(
        centers=g.means.numpy().astype(np.float32),
        covariances=g.covariances().numpy().astype(np.float32),
        rgbs=g.colors.clamp(0.0, 1.0).numpy().astype(np.float32),
        opacities=g.opacities[:, None].numpy().astype(np.float32),
    )


def choose_scene_scale(layers: list[SplatArrays]) -> float:
    """Power of ten s that puts the median per-Gaussian variance (trace / 3) of all layers in
    [MIN_MEDIAN_VARIANCE, MAX_MEDIAN_VARIANCE] once covariances are multiplied by s^2; 1.0 when it
    already is (e.g. a millimetre-scale mouse) or when no Gaussian has a positive variance."""
    variances = np.concatenate([np.trace(a.covariances, axis1=1, axis2=2) / 3.0 for a in layers])
    variances = variances[np.isfinite(variances) & (variances > 0)]
    if variances.size == 0:
        return 1.0
    median = float(np.median(variances))
    if median < MIN_MEDIAN_VARIANCE:
        return 10.0 ** math.ceil(0.5 * math.log10(MIN_MEDIAN_VARIANCE / median))
    if median > MAX_MEDIAN_VARIANCE:
        return 10.0 ** -math.ceil(0.5 * math.log10(median / MAX_MEDIAN_VARIANCE))
    return 1.0


def scaled(arrays: SplatArrays, scene_scale: float) -> SplatArrays:
    """The same splats in a world multiplied by `scene_scale` (centres x s, covariances x s^2)."""
    return SplatArrays(
        centers=(arrays.centers * scene_scale).astype(np.float32),
        covariances=(arrays.covariances * scene_scale**2).astype(np.float32),
        rgbs=arrays.rgbs,
        opacities=arrays.opacities,
    )


def displayed(arrays: SplatArrays, min_opacity: float, splat_scale: float) -> SplatArrays:
    """What the GUI asks to draw: Gaussians with opacity >= min_opacity, each widened by splat_scale
    (covariance x splat_scale^2, centres unchanged)."""
    assert splat_scale > 0, f"splat_scale must be positive, got {splat_scale}"
    keep = arrays.opacities[:, 0] >= min_opacity
    return SplatArrays(
        centers=arrays.centers[keep],
        covariances=(arrays.covariances[keep] * splat_scale**2).astype(np.float32),
        rgbs=arrays.rgbs[keep],
        opacities=arrays.opacities[keep],
    )


def robust_bounds(arrays: list[SplatArrays]) -> tuple[np.ndarray, float]:
    """(centre [3], radius) of the bulk of all splats: the median centre and the 95th-percentile
    distance from it, so a few stray Gaussians do not push the initial camera far away."""
    centers = np.concatenate([a.centers for a in arrays]).astype(np.float64)
    centers = centers[np.isfinite(centers).all(-1)]
    if len(centers) == 0:
        return np.zeros(3), 1.0
    centre = np.median(centers, axis=0)
    radius = float(np.percentile(np.linalg.norm(centers - centre, axis=-1), 95))
    return centre, radius if radius > 0 else 1.0


@dataclass(frozen=True)
class CameraPose:
    """One input camera as viser wants it: OpenCV-axes orientation, position (in the scaled
    world), vertical FOV in radians and aspect = width / height."""

    wxyz: np.ndarray  # [4]
    position: np.ndarray  # [3]
    fov: float
    aspect: float


def camera_poses(cameras: Cameras, scene_scale: float) -> list[CameraPose]:
    """Poses of cameras [V] in the world multiplied by `scene_scale`."""
    assert cameras.c2w.ndim == 3, f"expected cameras [V], got c2w {tuple(cameras.c2w.shape)}"
    c2w = cameras.c2w.double().numpy()
    poses = []
    for i in range(len(cameras)):
        fy = float(cameras.intrinsics[i, 1])
        poses.append(CameraPose(
            wxyz=vtf.SO3.from_matrix(c2w[i, :3, :3]).wxyz,
            position=c2w[i, :3, 3] * scene_scale,
            fov=2.0 * math.atan(0.5 * cameras.height / fy),
            aspect=cameras.width / cameras.height,
        ))
    return poses
