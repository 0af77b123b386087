"""Normalisation of a user's rig to the model's rig (CONVENTIONS.md C4) as a recorded similarity.

The pretrained GS-LRM expects the object at the origin, world up +Z and cameras about 2.7 units
away. `normalize_cameras` maps a user's cameras (e.g. in millimetres) there and returns the
`Similarity` it applied; its `inverse()` maps results (points, cameras, Gaussians via
`Gaussians.transform(s.rotation, s.translation, s.scale)`) back to the user's frame.

Up axis: `normalize_cameras` takes the user's world up, default (0, 0, 1) (z-up worlds such as
the markerless_mouse_1 rig, whose json records `"world_up"`: `cameras.load_camera_file(...).world_up`).
When the up axis is unknown, `estimate_up` guesses it from the cameras (image up is -y in
OpenCV); it is never applied implicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mouserecon.cameras import CameraError, Cameras, optical_axes_intersection

MODEL_CAMERA_DISTANCE = 2.7  # FaceLift rig: cameras 2.7 units from the origin


@dataclass(frozen=True, eq=False)
class Similarity:
    """x_model = scale * rotation @ x_user + translation.

    rotation: [3, 3] float64, orthonormal with det +1. translation: [3] float64. scale: > 0.
    """

    rotation: Tensor
    translation: Tensor
    scale: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation", torch.as_tensor(self.rotation, dtype=torch.float64))
        object.__setattr__(self, "translation", torch.as_tensor(self.translation, dtype=torch.float64))
        object.__setattr__(self, "scale", float(self.scale))
        assert self.rotation.shape == (3, 3), f"rotation must be [3, 3], got {tuple(self.rotation.shape)}"
        assert self.translation.shape == (3,), f"translation must be [3], got {tuple(self.translation.shape)}"
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"similarity scale must be finite and > 0, got {self.scale}")
        orthonormal = torch.allclose(self.rotation @ self.rotation.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
        if not (orthonormal and torch.linalg.det(self.rotation) > 0 and torch.isfinite(self.translation).all()):
            raise ValueError(f"not a similarity: rotation {self.rotation.tolist()}, translation "
                             f"{self.translation.tolist()}")

    @staticmethod
    def identity() -> Similarity:
        return Similarity(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1.0)

    def matrix(self) -> Tensor:  # [4, 4] homogeneous, float64
        out = torch.eye(4, dtype=torch.float64)
        out[:3, :3] = self.scale * self.rotation
        out[:3, 3] = self.translation
        return out

    def inverse(self) -> Similarity:
        # x_user = (1/scale) * R^T @ x_model - (1/scale) * R^T @ t
        rot_t = self.rotation.T
        return Similarity(rot_t, -(rot_t @ self.translation) / self.scale, 1.0 / self.scale)

    def apply_points(self, points: Tensor) -> Tensor:
        """points [..., 3] -> [..., 3] (same dtype; computed in float64)."""
        assert points.shape[-1] == 3, f"points must be [..., 3], got {tuple(points.shape)}"
        rot, t = self.rotation.to(points.device), self.translation.to(points.device)
        return (self.scale * points.double() @ rot.T + t).to(points.dtype)

    def apply_c2w(self, c2w: Tensor) -> Tensor:
        """Camera-to-world [..., 4, 4] -> [..., 4, 4]: rotate the camera, move and scale its centre."""
        assert c2w.shape[-2:] == (4, 4), f"c2w must be [..., 4, 4], got {tuple(c2w.shape)}"
        out = c2w.double().clone()
        out[..., :3, :3] = self.rotation.to(c2w.device) @ out[..., :3, :3]
        out[..., :3, 3] = self.apply_points(c2w[..., :3, 3].double())
        return out.to(c2w.dtype)

    def apply_cameras(self, cameras: Cameras) -> Cameras:
        """Same views in the new frame; intrinsics are unchanged (a similarity keeps the images)."""
        return replace(cameras, c2w=self.apply_c2w(cameras.c2w))

    def to_dict(self) -> dict:
        """JSON-ready record: {"rotation": 3x3, "translation": 3, "scale": s} (x_model = s R x_user + t)."""
        return {"rotation": self.rotation.tolist(), "translation": self.translation.tolist(), "scale": self.scale}

    @staticmethod
    def from_dict(record: dict) -> Similarity:
        if set(record) != {"rotation", "translation", "scale"}:
            raise ValueError(f"a similarity record has keys rotation, translation, scale; got {sorted(record)}")
        return Similarity(torch.tensor(record["rotation"], dtype=torch.float64),
                          torch.tensor(record["translation"], dtype=torch.float64), record["scale"])


def rotation_between(source: Tensor, target: Tensor) -> Tensor:
    """The minimal rotation [3, 3] float64 taking direction `source` [3] to direction `target` [3].

    For opposite directions (no unique minimal rotation) it is the half turn about the axis
    perpendicular to `source` that is closest to the least-aligned coordinate axis (deterministic).
    """
    a = torch.nn.functional.normalize(torch.as_tensor(source, dtype=torch.float64), dim=0)
    b = torch.nn.functional.normalize(torch.as_tensor(target, dtype=torch.float64), dim=0)
    cos = float(a @ b)
    if cos < -1.0 + 1e-9:
        helper = torch.zeros(3, dtype=torch.float64)
        helper[a.abs().argmin()] = 1.0
        axis = torch.nn.functional.normalize(torch.linalg.cross(a, helper), dim=0)
        return 2.0 * torch.outer(axis, axis) - torch.eye(3, dtype=torch.float64)
    v = torch.linalg.cross(a, b)
    vx = torch.tensor([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + vx + vx @ vx / (1.0 + cos)


def estimate_up(cameras: Cameras) -> Tensor:
    """Guess the world up direction [3] (float64, unit) as the mean image-up axis (-y) of the cameras.

    Good for rigs of roughly level, un-rolled cameras around an object (e.g. the markerless rig:
    0.9 deg off its recorded world_up); wrong for cameras that look straight down. Prefer a known up.
    """
    assert cameras.c2w.ndim == 3, f"cameras must be [V], got c2w {tuple(cameras.c2w.shape)}"
    mean_up = -cameras.c2w[:, :3, 1].double().mean(0)
    if mean_up.norm() < 1e-6:
        raise CameraError("the cameras' image-up axes cancel out; give the world up axis explicitly")
    return mean_up / mean_up.norm()


def normalize_cameras(
    cameras: Cameras,
    center: Tensor | tuple[float, float, float] | None = None,
    up: Tensor | tuple[float, float, float] = (0.0, 0.0, 1.0),
    target_distance: float = MODEL_CAMERA_DISTANCE,
) -> tuple[Cameras, Similarity]:
    """Map cameras [V] into the model's rig; return (normalised cameras [V], the Similarity used).

    center: [3] user-frame point that becomes the origin; default the least-squares intersection
        of the optical axes. up: [3] user-frame world up that becomes +Z (minimal rotation, so a
        z-up world keeps its azimuths). Scale: uniform, so the mean camera distance to the centre
        becomes `target_distance`. Intrinsics are unchanged.
    """
    assert cameras.c2w.ndim == 3, f"cameras must be [V], got c2w {tuple(cameras.c2w.shape)}"
    if center is None:
        center = optical_axes_intersection(cameras.c2w)
    center = torch.as_tensor(center, dtype=torch.float64)
    assert center.shape == (3,), f"center must be [3], got {tuple(center.shape)}"
    mean_distance = (cameras.centers.double() - center).norm(dim=-1).mean().item()
    if not mean_distance > 0:
        raise CameraError(f"cameras have mean distance {mean_distance} to the centre; cannot scale")
    up = torch.as_tensor(up, dtype=torch.float64)
    assert up.shape == (3,), f"up must be [3], got {tuple(up.shape)}"
    if not (torch.isfinite(up).all() and up.norm() > 0):
        raise CameraError(f"the up axis must be a finite non-zero vector, got {up.tolist()}")
    rotation = rotation_between(up, torch.tensor([0.0, 0.0, 1.0]))
    scale = target_distance / mean_distance
    similarity = Similarity(rotation, -scale * rotation @ center, scale)
    return similarity.apply_cameras(cameras), similarity
