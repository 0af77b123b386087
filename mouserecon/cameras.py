"""Pinhole cameras in the OpenCV convention (see CONVENTIONS.md).

`Cameras` holds camera-to-world matrices and pixel intrinsics for a set of views that share
one image size. Conversions to and from file formats happen only at the boundary functions
of this module (`load_camera_file`, which reads either format with its `world_up`;
`load_opencv_cameras`, `save_opencv_cameras`, `load_nerfstudio_transforms`), and every camera set
they return has passed `validate_cameras`. Normalisation to the model's
rig lives in `mouserecon.normalize`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import PIL.Image
import torch
from torch import Tensor

from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_json

log = logging.getLogger(__name__)


class CameraError(MouseReconError, ValueError):
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
        return Cameras._join(torch.stack, cameras, dim)

    @staticmethod
    def cat(cameras: list[Cameras], dim: int = 0) -> Cameras:
        return Cameras._join(torch.cat, cameras, dim)

    @staticmethod
    def _join(join, cameras: list[Cameras], dim: int) -> Cameras:
        sizes = {(c.width, c.height) for c in cameras}
        if len(sizes) != 1:
            raise CameraError(f"cannot join cameras with different image sizes {sorted(sizes)}")
        return Cameras(
            c2w=join([c.c2w for c in cameras], dim),
            intrinsics=join([c.intrinsics for c in cameras], dim),
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
        return self.window(left, top, width, height)

    def window(self, left: int, top: int, width: int, height: int) -> Cameras:
        """Intrinsics for the window [top:top+height, left:left+width], which may reach outside the
        image (the part outside is padding, e.g. a crop around an object near the border)."""
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


def look_at(eyes: Tensor, targets: Tensor, up=(0.0, 0.0, 1.0)) -> Tensor:
    """OpenCV c2w [..., 4, 4] for cameras at `eyes` [..., 3] looking at `targets` [..., 3], no roll:
    +z towards the target, +x = forward x up (right), +y = forward x right (image down)."""
    forward = torch.nn.functional.normalize(targets - eyes, dim=-1)
    up = torch.as_tensor(up, dtype=eyes.dtype, device=eyes.device).expand_as(forward)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up, dim=-1), dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    c2w = torch.eye(4, dtype=eyes.dtype, device=eyes.device).repeat(*eyes.shape[:-1], 1, 1)
    c2w[..., :3, :3] = torch.stack([right, down, forward], -1)
    c2w[..., :3, 3] = eyes
    return c2w


# ---- file readers and writer ------------------------------------------------------------------

# Per-frame keys that describe lens effects `Cameras` does not model (FaceLift-format rigs from
# MATLAB/OpenCV calibrations, nerfstudio OPENCV camera models). Accepted, ignored, warned about.
_IGNORED_LENS_KEYS = ("skew", "dist_k1_k2_k3", "dist_p1_p2", "k1", "k2", "k3", "k4", "p1", "p2")
_warned_lens_keys: set[str] = set()  # warn once per process, not once per sample of a dataset


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CameraError(f"{path}: camera file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CameraError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise CameraError(f"{path}: expected a JSON object with a non-empty list under 'frames'")
    return meta


def _number(value, path: Path, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CameraError(f"{path}: {where} '{key}' must be a number, got {value!r}")
    return float(value)


def _size(value, path: Path, where: str, key: str) -> int:
    number = _number(value, path, where, key)
    if number != int(number) or number <= 0:
        raise CameraError(f"{path}: {where} '{key}' must be a positive integer, got {value!r}")
    return int(number)


def _matrix(value, path: Path, where: str, key: str) -> Tensor:
    """A 4x4 (or 3x4, completed with 0 0 0 1) float64 matrix from nested JSON lists."""
    try:
        matrix = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise CameraError(f"{path}: {where} '{key}' is not a numeric matrix ({err})") from None
    if matrix.shape == (3, 4):
        matrix = torch.cat([matrix, matrix.new_tensor([[0.0, 0.0, 0.0, 1.0]])])
    if matrix.shape != (4, 4):
        raise CameraError(f"{path}: {where} '{key}' has shape {tuple(matrix.shape)}, expected 4x4")
    return matrix


def _matrix_or_number(value, path: Path, key: str) -> Tensor:
    try:
        return torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise CameraError(f"{path}: '{key}' must be a number or a list of numbers ({err})") from None


def _warn_ignored_lens_keys(frames: list[dict], path: Path) -> None:
    nonzero = [key for key in _IGNORED_LENS_KEYS if key not in _warned_lens_keys and any(
        _matrix_or_number(f[key], path, key).abs().max().item() > 0 for f in frames if key in f)]
    if nonzero:
        _warned_lens_keys.update(nonzero)
        log.warning("%s: non-zero %s ignored: mouserecon models pinhole cameras only, so use undistorted "
                    "images (warned once per process)", path, ", ".join(nonzero))


def _check_unique(file_paths: list[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(file_paths):
        if name in seen:
            raise CameraError(f"{path}: frames {seen[name]} and {i} have the same file_path {name!r}")
        seen[name] = i


def _one_size(sizes: list[tuple[int, int]], path: Path) -> tuple[int, int]:
    if len(set(sizes)) != 1:
        raise CameraError(f"{path}: frames have different image sizes {sorted(set(sizes))}; one size per sample")
    return sizes[0]


CAMERA_FILES = ("opencv_cameras.json", "transforms.json")  # a sample folder's camera file, looked for in this order


@dataclass(frozen=True)
class CameraFile:
    """A sample's camera file, read once.

    path:       the file (`opencv_cameras.json` or nerfstudio `transforms.json`).
    cameras:    Cameras [F] in the file's frame and units, frames in file order.
    file_paths: the F image paths as written (relative to the file's folder).
    world_up:   [3] float64, the optional top-level "world_up" (either format), or None when absent.
    """

    path: Path
    cameras: Cameras
    file_paths: tuple[str, ...]
    world_up: Tensor | None

    def up(self) -> Tensor:
        """The user's world up [3] float64: `world_up`, or +Z when the file records none."""
        if self.world_up is None:
            log.debug("%s records no world_up: taking +Z", self.path)
            return torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        return self.world_up


def find_camera_file(folder: str | Path) -> Path | None:
    """The camera file of a sample folder (`CAMERA_FILES` in order), or None."""
    for name in CAMERA_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_camera_file(path: str | Path) -> CameraFile:
    """A camera file, or a sample folder holding one -> CameraFile. The format follows the file name
    (`opencv_cameras*` FaceLift's, `transforms*` nerfstudio's), else the first frame's keys ("w2c" or
    "transform_matrix"). Raises CameraError naming the file and the defect."""
    path = Path(path)
    if not path.is_file():
        found = find_camera_file(path)
        if found is None:
            raise CameraError(f"{path}: not a sample folder (no {' or '.join(CAMERA_FILES)})")
        path = found
    meta = _read_json(path)
    opencv = path.name.startswith("opencv_cameras") or (
        not path.name.startswith("transforms") and isinstance(meta["frames"][0], dict) and "w2c" in meta["frames"][0])
    parse = _opencv_cameras if opencv else _nerfstudio_transforms
    cameras, file_paths = parse(meta, path)
    return CameraFile(path, cameras, tuple(file_paths), _world_up(meta, path))


def _world_up(meta: dict, path: Path) -> Tensor | None:
    if "world_up" not in meta:
        return None
    up = torch.tensor(meta["world_up"], dtype=torch.float64) if _is_vector(meta["world_up"]) else None
    if up is None or not torch.isfinite(up).all() or up.norm() == 0:
        raise CameraError(f"{path}: 'world_up' must be a non-zero 3-vector, got {meta['world_up']!r}")
    return up


def _is_vector(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def load_opencv_cameras(path: str | Path) -> tuple[Cameras, list[str]]:
    """Read a FaceLift `opencv_cameras.json` -> (Cameras [V] float32, file_paths [V]).

    Format: {"frames": [{"w", "h", "fx", "fy", "cx", "cy", "w2c" (4x4 OpenCV world-to-camera),
    "file_path"}, ...]}; intrinsics in pixels, pixel-edge convention. All frames share one image
    size; file_paths are unique. Extra keys are allowed; non-zero skew/distortion keys are
    ignored with a warning. Raises CameraError naming the file, the frame and the defect.
    """
    path = Path(path)
    return _opencv_cameras(_read_json(path), path)


def _opencv_cameras(meta: dict, path: Path) -> tuple[Cameras, list[str]]:
    frames = meta["frames"]
    c2ws, intrinsics, files, sizes = [], [], [], []
    for i, frame in enumerate(frames):
        where = f"frame {i}"
        if not isinstance(frame, dict):
            raise CameraError(f"{path}: {where} is not a JSON object")
        missing = [k for k in ("w", "h", "fx", "fy", "cx", "cy", "w2c", "file_path") if k not in frame]
        if missing:
            raise CameraError(f"{path}: {where} is missing {missing}")
        w2c = _matrix(frame["w2c"], path, where, "w2c")
        _check_rigid(w2c, path, i, "w2c")
        c2ws.append(torch.linalg.inv(w2c))
        intrinsics.append(torch.tensor([_number(frame[k], path, where, k) for k in ("fx", "fy", "cx", "cy")]))
        files.append(str(frame["file_path"]))
        sizes.append((_size(frame["w"], path, where, "w"), _size(frame["h"], path, where, "h")))
    width, height = _one_size(sizes, path)
    _check_unique(files, path)
    _warn_ignored_lens_keys(frames, path)
    cameras = Cameras(torch.stack(c2ws).float(), torch.stack(intrinsics).float(), width, height)
    validate_cameras(cameras, path)
    return cameras, files


def save_opencv_cameras(path: str | Path, cameras: Cameras, file_paths: list[str], **extra) -> None:
    """Write cameras [V] as FaceLift `opencv_cameras.json` (w2c on disk), atomically.

    `extra` goes to the top level (e.g. world_up=[0, 0, 1], normalization=similarity.to_dict()).
    """
    assert cameras.c2w.ndim == 3 and len(file_paths) == len(cameras), "cameras must be [V] with one file each"
    _check_unique(list(file_paths), Path(path))
    w2c = torch.linalg.inv(cameras.c2w.double())
    frames = []
    for i, file_path in enumerate(file_paths):
        fx, fy, cx, cy = cameras.intrinsics[i].double().tolist()
        frames.append({"w": cameras.width, "h": cameras.height, "fx": fx, "fy": fy, "cx": cx, "cy": cy,
                       "w2c": w2c[i].tolist(), "file_path": file_path})
    atomic_write_json(path, {**extra, "frames": frames})


# OpenGL camera axes (+x right, +y up, +z backward) -> OpenCV (+x right, +y down, +z forward).
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def load_nerfstudio_transforms(
    path: str | Path, width: int | None = None, height: int | None = None
) -> tuple[Cameras, list[str]]:
    """Read a nerfstudio / NeRF-synthetic `transforms.json` -> (Cameras [V] float32, file_paths [V]).

    Poses: `transform_matrix` is an OpenGL camera-to-world; converted by flipping the camera y and z
    axes. Intrinsics: `fl_x`, `fl_y`, `cx`, `cy` (pixels, pixel-edge convention, as nerfstudio), or
    NeRF-synthetic `camera_angle_x` [, `camera_angle_y`] with the principal point at the image centre.
    Each key may be per frame or global (top level); per frame wins. Image size: `w`, `h` keys, else
    the `width`/`height` arguments, else read from the first frame's image. `file_path` is returned
    as written, with ".png" appended when it has no suffix (the NeRF-synthetic convention).
    Raises CameraError naming the file, the frame and the defect.
    """
    path = Path(path)
    return _nerfstudio_transforms(_read_json(path), path, width, height)


def _nerfstudio_transforms(meta: dict, path: Path, width: int | None = None,
                           height: int | None = None) -> tuple[Cameras, list[str]]:
    if meta.get("camera_model", "OPENCV") not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE"):
        raise CameraError(f"{path}: camera_model {meta['camera_model']!r} is not a pinhole model")
    c2ws, intrinsics, files, sizes = [], [], [], []
    for i, frame in enumerate(meta["frames"]):
        where = f"frame {i}"
        if not isinstance(frame, dict):
            raise CameraError(f"{path}: {where} is not a JSON object")
        merged = {**{k: v for k, v in meta.items() if k != "frames"}, **frame}
        missing = [k for k in ("transform_matrix", "file_path") if k not in frame]
        if missing:
            raise CameraError(f"{path}: {where} is missing {missing}")
        c2w_gl = _matrix(frame["transform_matrix"], path, where, "transform_matrix")
        _check_rigid(c2w_gl, path, i, "transform_matrix")
        c2ws.append(c2w_gl @ _GL_TO_CV)
        file_path = str(frame["file_path"])
        files.append(file_path if Path(file_path).suffix else file_path + ".png")
        if width is None and height is None and "w" not in merged and "h" not in merged:
            width, height = _image_size(path, where, files[-1])  # the first frame's image, once
        w, h = _nerfstudio_size(merged, path, where, width, height)
        sizes.append((w, h))
        intrinsics.append(_nerfstudio_intrinsics(merged, path, where, w, h))
    width, height = _one_size(sizes, path)
    _check_unique(files, path)
    _warn_ignored_lens_keys([meta, *meta["frames"]], path)
    cameras = Cameras(torch.stack(c2ws).float(), torch.stack(intrinsics).float(), width, height)
    validate_cameras(cameras, path)
    return cameras, files


def _nerfstudio_size(merged: dict, path: Path, where: str, width, height) -> tuple[int, int]:
    if "w" in merged or "h" in merged:
        if "w" not in merged or "h" not in merged:
            raise CameraError(f"{path}: {where} gives only one of 'w', 'h'")
        size = (_size(merged["w"], path, where, "w"), _size(merged["h"], path, where, "h"))
        if width is not None and (width, height) != size:
            raise CameraError(f"{path}: {where} declares {size[0]}x{size[1]} but {width}x{height} was passed")
        return size
    if width is None or height is None:
        raise CameraError(f"{path}: {where} has no 'w'/'h' and only one of width, height was passed")
    return width, height


def _image_size(path: Path, where: str, file_path: str) -> tuple[int, int]:
    image = path.parent / file_path
    try:
        with PIL.Image.open(image) as img:  # reads the header only
            return img.size
    except OSError as err:  # missing, unreadable or not an image
        raise CameraError(
            f"{path}: {where} has no 'w'/'h' and its image {image} cannot give the size ({err}); "
            "pass width and height"
        ) from None


def _nerfstudio_intrinsics(merged: dict, path: Path, where: str, w: int, h: int) -> Tensor:
    """(fx, fy, cx, cy) [4] float64 from explicit focal lengths or NeRF-synthetic field-of-view angles."""
    if "fl_x" in merged:
        fx = _number(merged["fl_x"], path, where, "fl_x")
        fy = _number(merged.get("fl_y", merged["fl_x"]), path, where, "fl_y")
    elif "camera_angle_x" in merged:
        fx = 0.5 * w / math.tan(0.5 * _number(merged["camera_angle_x"], path, where, "camera_angle_x"))
        fy = fx
        if "camera_angle_y" in merged:
            fy = 0.5 * h / math.tan(0.5 * _number(merged["camera_angle_y"], path, where, "camera_angle_y"))
    else:
        raise CameraError(f"{path}: {where} has neither 'fl_x' nor 'camera_angle_x' (no focal length)")
    cx = _number(merged.get("cx", 0.5 * w), path, where, "cx")
    cy = _number(merged.get("cy", 0.5 * h), path, where, "cy")
    return torch.tensor([fx, fy, cx, cy], dtype=torch.float64)


# ---- validation ------------------------------------------------------------------------------


def _check_rigid(matrix: Tensor, path, frame: int, name: str, atol: float = 1e-4) -> None:
    """Raise unless `matrix` [4, 4] is finite, rotation orthonormal with det +1, last row 0 0 0 1."""
    if not torch.isfinite(matrix).all():
        raise CameraError(f"{path}: frame {frame} {name} has non-finite values (NaN or inf)")
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
    point inside the image, and (for V >= 2) that the cameras look at a common region: each
    camera must see, within its field of view, the point where the other cameras' optical axes
    meet (leave-one-out, so one camera that looks away cannot hide among good ones).
    """
    assert cameras.c2w.ndim == 3, f"validate a [V] set of cameras, got c2w {tuple(cameras.c2w.shape)}"
    for i in range(len(cameras)):
        _check_rigid(cameras.c2w[i], source, i, "c2w")
        fx, fy, cx, cy = cameras.intrinsics[i].tolist()
        if not all(math.isfinite(v) for v in (fx, fy, cx, cy)):
            raise CameraError(f"{source}: frame {i} intrinsics are not finite: {[fx, fy, cx, cy]}")
        if fx <= 0 or fy <= 0:
            raise CameraError(f"{source}: frame {i} focal lengths must be positive, got fx={fx}, fy={fy}")
        if not (0 < cx < cameras.width and 0 < cy < cameras.height):
            raise CameraError(f"{source}: frame {i} principal point ({cx}, {cy}) is outside the "
                              f"{cameras.width}x{cameras.height} image")
    if len(cameras) >= 2:
        _check_common_region(cameras, source)


def optical_axes_intersection(c2w: Tensor) -> Tensor:
    """Least-squares point [3] (float64) closest to all optical axes (+z lines) of c2w [V, 4, 4], V >= 2."""
    assert c2w.ndim == 3 and c2w.shape[1:] == (4, 4), f"c2w must be [V, 4, 4], got {tuple(c2w.shape)}"
    try:
        return nearest_point_to_lines(c2w[:, :3, 3], c2w[:, :3, 2])
    except CameraError:
        raise CameraError("optical axes are (nearly) parallel; their intersection is undefined") from None


def nearest_point_to_lines(origins: Tensor, dirs: Tensor) -> Tensor:
    """Least-squares point [3] (float64) closest to the lines origins [V, 3] + t dirs [V, 3], V >= 2.
    Raises CameraError when the lines are (nearly) parallel."""
    assert origins.ndim == 2 and origins.shape[1] == 3 and dirs.shape == origins.shape, \
        f"origins {tuple(origins.shape)}, dirs {tuple(dirs.shape)}: need [V, 3] each"
    origins, dirs = origins.double(), torch.nn.functional.normalize(dirs.double(), dim=-1)
    proj = torch.eye(3, dtype=torch.float64) - dirs[:, :, None] * dirs[:, None, :]  # [V, 3, 3] onto each normal plane
    lhs, rhs = proj.sum(0), (proj @ origins[:, :, None]).sum(0)[:, 0]
    if torch.linalg.cond(lhs).item() > 1e8:
        raise CameraError("the lines are (nearly) parallel; their nearest point is undefined")
    return torch.linalg.solve(lhs, rhs)


def _check_common_region(cameras: Cameras, source) -> None:
    c2w = cameras.c2w.double()
    num = len(cameras)
    angles = []  # [V] degrees between each optical axis and the direction to the others' meeting point
    for i in range(num):
        others = [j for j in range(num) if j != i] if num >= 3 else list(range(num))
        try:
            point = optical_axes_intersection(c2w[others])
        except CameraError as err:
            raise CameraError(f"{source}: the cameras do not look at a common region ({err})") from None
        to_point = point - c2w[i, :3, 3]
        cos = (c2w[i, :3, 2] @ to_point / to_point.norm().clamp_min(1e-12)).clamp(-1.0, 1.0)
        angles.append(math.degrees(math.acos(cos.item())))
    # Blame the worst camera: with one bad camera, its leave-one-out point is clean, so it stands out.
    worst = max(range(num), key=angles.__getitem__)
    fx, fy = cameras.intrinsics[worst, :2].tolist()
    half_diagonal_fov = math.degrees(math.atan(0.5 * math.hypot(cameras.width / fx, cameras.height / fy)))
    if angles[worst] > half_diagonal_fov:
        raise CameraError(
            f"{source}: frame {worst} looks away from the region the other cameras look at "
            f"({angles[worst]:.0f} deg off its optical axis; its half field of view is {half_diagonal_fov:.0f} deg)"
        )
