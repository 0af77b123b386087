"""Pinhole cameras in the OpenCV convention (see CONVENTIONS.md).

`Cameras` holds camera-to-world matrices and pixel intrinsics for a set of views that share
one image size. Conversions to and from file formats happen only at the boundary functions
of this module (`load_opencv_cameras`, `save_opencv_cameras`, `load_nerfstudio_transforms`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor


class CameraError(ValueError):
    """A camera file or camera set violates the contract; the message names file, frame, defect."""


@dataclass(frozen=True)
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    c2w:        [..., 4, 4] camera-to-world, OpenCV axes (+x right, +y down, +z forward).
    intrinsics: [..., 4] (fx, fy, cx, cy) in pixels; pixel (i, j) has its centre at (i + 0.5, j + 0.5).
    width, height: image size in pixels the intrinsics refer to.
    """

    c2w: Tensor
    intrinsics: Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        assert self.c2w.shape[-2:] == (4, 4), f"c2w must be [..., 4, 4], got {tuple(self.c2w.shape)}"
        assert self.intrinsics.shape[-1] == 4, f"intrinsics must be [..., 4], got {tuple(self.intrinsics.shape)}"
        assert self.c2w.shape[:-2] == self.intrinsics.shape[:-1], (
            f"batch shapes differ: c2w {tuple(self.c2w.shape)} vs intrinsics {tuple(self.intrinsics.shape)}"
        )
        assert self.width > 0 and self.height > 0, f"bad image size {self.width}x{self.height}"

    # ---- views -------------------------------------------------------------------------------
    @property
    def batch_shape(self) -> torch.Size:
        return self.c2w.shape[:-2]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index) -> Cameras:
        """Index the leading batch dimensions (e.g. `cams[[0, 1, 2]]` selects views)."""
        return replace(self, c2w=self.c2w[index], intrinsics=self.intrinsics[index])

    def to(self, *args, **kwargs) -> Cameras:
        return replace(self, c2w=self.c2w.to(*args, **kwargs), intrinsics=self.intrinsics.to(*args, **kwargs))

    @staticmethod
    def stack(cameras: list[Cameras], dim: int = 0) -> Cameras:
        sizes = {(c.width, c.height) for c in cameras}
        if len(sizes) != 1:
            raise CameraError(f"cannot stack cameras with different image sizes {sorted(sizes)}")
        return Cameras(
            c2w=torch.stack([c.c2w for c in cameras], dim),
            intrinsics=torch.stack([c.intrinsics for c in cameras], dim),
            width=cameras[0].width,
            height=cameras[0].height,
        )

    # ---- derived quantities ------------------------------------------------------------------
    @property
    def w2c(self) -> Tensor:  # [..., 4, 4]
        return torch.linalg.inv(self.c2w)

    @property
    def centers(self) -> Tensor:  # [..., 3] camera positions in world
        return self.c2w[..., :3, 3]

    @property
    def K(self) -> Tensor:  # [..., 3, 3]
        fx, fy, cx, cy = self.intrinsics.unbind(-1)
        zero, one = torch.zeros_like(fx), torch.ones_like(fx)
        rows = [torch.stack(r, -1) for r in ((fx, zero, cx), (zero, fy, cy), (zero, zero, one))]
        return torch.stack(rows, -2)

    def resize(self, height: int, width: int) -> Cameras:
        """Intrinsics for the same view resampled to `height x width` (pixel-edge convention)."""
        sx, sy = width / self.width, height / self.height
        scale = self.intrinsics.new_tensor([sx, sy, sx, sy])
        return replace(self, intrinsics=self.intrinsics * scale, width=width, height=height)

    def crop(self, left: int, top: int, width: int, height: int) -> Cameras:
        """Intrinsics for the sub-image [top:top+height, left:left+width]."""
        if left < 0 or top < 0 or left + width > self.width or top + height > self.height:
            raise CameraError(
                f"crop ({left}, {top}, {width}x{height}) outside the {self.width}x{self.height} image"
            )
        shift = self.intrinsics.new_tensor([0.0, 0.0, left, top])
        return replace(self, intrinsics=self.intrinsics - shift, width=width, height=height)

    def rays(self) -> tuple[Tensor, Tensor]:
        """World rays through every pixel centre.

        Returns origins [..., H, W, 3] and unit directions [..., H, W, 3], row-major pixels.
        """
        dtype, device = self.c2w.dtype, self.c2w.device
        ys = torch.arange(self.height, dtype=dtype, device=device) + 0.5
        xs = torch.arange(self.width, dtype=dtype, device=device) + 0.5
        fx, fy, cx, cy = (t[..., None, None] for t in self.intrinsics.unbind(-1))  # [..., 1, 1]
        x_cam = (xs[None, :] - cx) / fx  # [..., 1, W]
        y_cam = (ys[:, None] - cy) / fy  # [..., H, 1]
        x_cam, y_cam = torch.broadcast_tensors(x_cam, y_cam)  # [..., H, W]
        d_cam = torch.stack([x_cam, y_cam, torch.ones_like(x_cam)], -1)  # [..., H, W, 3]
        d_cam = torch.nn.functional.normalize(d_cam, dim=-1)
        rot = self.c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
        dirs = torch.nn.functional.normalize((rot @ d_cam[..., None])[..., 0], dim=-1)
        origins = self.centers[..., None, None, :].expand_as(dirs)
        return origins, dirs

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points [..., P, 3] (batch as the cameras) to pixels [..., P, 2] and depth [..., P]."""
        w2c = self.w2c
        cam = (w2c[..., None, :3, :3] @ points[..., None])[..., 0] + w2c[..., None, :3, 3]
        depth = cam[..., 2]
        fx, fy, cx, cy = (t[..., None] for t in self.intrinsics.unbind(-1))
        uv = torch.stack([fx * cam[..., 0] / depth + cx, fy * cam[..., 1] / depth + cy], -1)
        return uv, depth


# ---- FaceLift opencv_cameras.json ------------------------------------------------------------


def load_opencv_cameras(path: str | Path) -> tuple[Cameras, list[str]]:
    """Read a FaceLift `opencv_cameras.json` (w2c on disk) -> (Cameras [V], file_paths).

    All frames must share one image size. Extra per-frame keys are allowed and ignored.
    Raises CameraError naming the file, the frame and the defect.
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CameraError(f"{path}: camera file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CameraError(f"{path}: not valid JSON ({err})") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise CameraError(f"{path}: expected a non-empty list under 'frames'")
    c2ws, intrinsics, files, sizes = [], [], [], set()
    for i, frame in enumerate(frames):
        missing = [k for k in ("w", "h", "fx", "fy", "cx", "cy", "w2c", "file_path") if k not in frame]
        if missing:
            raise CameraError(f"{path}: frame {i} is missing {missing}")
        w2c = torch.tensor(frame["w2c"], dtype=torch.float64)
        if w2c.shape != (4, 4):
            raise CameraError(f"{path}: frame {i} w2c has shape {tuple(w2c.shape)}, expected 4x4")
        _check_rigid(w2c, path, i, "w2c")
        c2ws.append(torch.linalg.inv(w2c))
        intrinsics.append(torch.tensor([frame[k] for k in ("fx", "fy", "cx", "cy")], dtype=torch.float64))
        files.append(str(frame["file_path"]))
        sizes.add((int(frame["w"]), int(frame["h"])))
    if len(sizes) != 1:
        raise CameraError(f"{path}: frames have different image sizes {sorted(sizes)}; one size per sample")
    (width, height), = sizes
    cameras = Cameras(torch.stack(c2ws).float(), torch.stack(intrinsics).float(), width, height)
    validate_cameras(cameras, path)
    return cameras, files


def save_opencv_cameras(path: str | Path, cameras: Cameras, file_paths: list[str], **extra) -> None:
    """Write cameras [V] as FaceLift `opencv_cameras.json` (atomically). `extra` goes to the top level."""
    assert cameras.c2w.ndim == 3 and len(file_paths) == len(cameras), "cameras must be [V] with one file each"
    w2c = torch.linalg.inv(cameras.c2w.double())
    frames = []
    for i, file_path in enumerate(file_paths):
        fx, fy, cx, cy = cameras.intrinsics[i].double().tolist()
        frames.append({"w": cameras.width, "h": cameras.height, "fx": fx, "fy": fy, "cx": cx, "cy": cy,
                       "w2c": w2c[i].tolist(), "file_path": file_path})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**extra, "frames": frames}, indent=1))
    tmp.replace(path)


# ---- validation ------------------------------------------------------------------------------


def _check_rigid(matrix: Tensor, path, frame: int, name: str, atol: float = 1e-4) -> None:
    """Raise unless `matrix` [4, 4] is finite, rotation orthonormal with det +1, last row 0 0 0 1."""
    if not torch.isfinite(matrix).all():
        raise CameraError(f"{path}: frame {frame} {name} has non-finite values")
    rot = matrix[:3, :3].double()
    err = (rot @ rot.T - torch.eye(3, dtype=rot.dtype)).abs().max().item()
    if err > atol:
        raise CameraError(f"{path}: frame {frame} {name} rotation is not orthonormal (|R R^T - I| = {err:.2e})")
    det = torch.linalg.det(rot).item()
    if det < 0:
        raise CameraError(f"{path}: frame {frame} {name} rotation has det {det:+.3f} (a reflection), expected +1")
    if not torch.allclose(matrix[3].double(), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)):
        raise CameraError(f"{path}: frame {frame} {name} last row is {matrix[3].tolist()}, expected [0, 0, 0, 1]")


def validate_cameras(cameras: Cameras, source: str | Path = "<cameras>") -> None:
    """Check every camera of a [V] set; raise CameraError naming `source`, the frame and the defect.

    Checks: finite values, orthonormal rotations with det +1, positive focal lengths, principal
    point inside the image, and that the cameras look at a common region (each optical axis
    passes in front of its camera near the least-squares intersection of all axes).
    """
    assert cameras.c2w.ndim == 3, "validate a [V] set of cameras"
    for i in range(len(cameras)):
        _check_rigid(cameras.c2w[i], source, i, "c2w")
        fx, fy, cx, cy = cameras.intrinsics[i].tolist()
        if not all(math.isfinite(v) for v in (fx, fy, cx, cy)):
            raise CameraError(f"{source}: frame {i} intrinsics are not finite: {[fx, fy, cx, cy]}")
        if fx <= 0 or fy <= 0:
            raise CameraError(f"{source}: frame {i} focal lengths must be positive, got fx={fx}, fy={fy}")
        if not (0 < cx < cameras.width and 0 < cy < cameras.height):
            raise CameraError(
                f"{source}: frame {i} principal point ({cx}, {cy}) is outside the {cameras.width}x{cameras.height} image"
            )
    if len(cameras) >= 2:
        _check_common_region(cameras, source)


def optical_axes_intersection(c2w: Tensor) -> Tensor:
    """Least-squares point [3] closest to all optical axes (+z of each camera) of c2w [V, 4, 4]."""
    c2w = c2w.double()
    origins, dirs = c2w[:, :3, 3], torch.nn.functional.normalize(c2w[:, :3, 2], dim=-1)
    proj = torch.eye(3, dtype=c2w.dtype) - dirs[:, :, None] * dirs[:, None, :]  # [V, 3, 3]
    lhs, rhs = proj.sum(0), (proj @ origins[:, :, None]).sum(0)[:, 0]
    if torch.linalg.matrix_rank(lhs).item() < 3:
        raise CameraError("optical axes are parallel; their intersection is undefined")
    return torch.linalg.solve(lhs, rhs)


def _check_common_region(cameras: Cameras, source) -> None:
    try:
        point = optical_axes_intersection(cameras.c2w)
    except CameraError as err:
        raise CameraError(f"{source}: the cameras do not look at a common region ({err})") from None
    c2w = cameras.c2w.double()
    to_point = point - c2w[:, :3, 3]  # [V, 3]
    dist = to_point.norm(dim=-1)
    forward = c2w[:, :3, 2]
    cos = (forward * to_point).sum(-1) / dist.clamp_min(1e-12)
    for i in range(len(cameras)):
        # The common point must be in front of every camera and within its field of view.
        half_fov = math.atan(0.5 * max(cameras.width / cameras.intrinsics[i, 0].item(),
                                       cameras.height / cameras.intrinsics[i, 1].item()))
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cos[i].item()))))
        if angle > math.degrees(half_fov) * 1.5:
            raise CameraError(
                f"{source}: frame {i} looks away from the region the other cameras share "
                f"({angle:.0f} deg off its optical axis)"
            )
