"""A rig's calibration with lens distortion: `LensCamera`, `Calibration`, the calibration file formats, and
undistortion to pinhole cameras.

A rig calibration is converted once, at the boundary, into `LensCamera`s in our conventions (CONVENTIONS.md):

- extrinsics world-to-camera, OpenCV axes: x_cam = R @ X + t;
- intrinsics K [3, 3] in pixels with the pixel-edge convention (pixel (i, j) has its centre at
  (i + 0.5, j + 0.5)); K[0, 1] is the skew (MATLAB calibrations have one);
- distortion in OpenCV's order (k1, k2, p1, p2, k3), the Brown-Conrady model MATLAB, DANNCE and
  OpenCV share, applied to normalised camera coordinates (x, y) = (X / Z, Y / Z):

      r2 = x^2 + y^2,  radial = 1 + k1 r2 + k2 r2^2 + k3 r2^3
      x_d = x radial + 2 p1 x y + p2 (r2 + 2 x^2)
      y_d = y radial + p1 (r2 + 2 y^2) + 2 p2 x y
      u = fx x_d + skew y_d + cx,  v = fy y_d + cy

Formats (`load_calibration` reads each, a `save_*` function writes each; `Calibration.conversion` records
what the reader did):

- "dannce": DANNCE `label3d_dannce.mat` (MATLAB v5-v7.2): `params`, an (n, 1) cell of 1x1 structs with
  K (3x3, MATLAB's transposed layout [fx 0 0; skew fy 0; cx cy 1]), RDistort (k1 k2 [k3]), TDistort
  (p1 p2), r (3x3, row-vector convention x_cam = X r + t, so R = r^T), t (1x3), and `camnames`, a 1xn
  cell of strings. Principal point 0-based at pixel centres (+0.5 here); units mm; no image size
  (the caller passes it).
- "anipose": Anipose `calibration.toml`: one table per camera (`[cam_0]` ...) with name, size [w, h],
  matrix (OpenCV, principal point at pixel centres: +0.5 here), distortions (1, 2, 4, 5 or 8 values in
  OpenCV's order; any beyond k3 must be 0), rotation (Rodrigues vector; a 3x3 matrix is accepted too),
  translation; `[metadata]` may give units and world_up. Cameras in file order; fisheye ones are not
  supported.
- "opencv": one OpenCV FileStorage file per camera (YAML with `%YAML` / `!!opencv-matrix`, XML, or
  JSON), or a folder of them (one camera per file, sorted by file name): camera_matrix | K,
  distortion_coefficients | dist_coeffs | D (4, 5, 8, 12 or 14 values; any beyond k3 must be 0),
  R | rvec | rotation (3x3, or a Rodrigues vector), T | tvec | translation, image_width + image_height
  or image_size [w, h], name | camera_name (else the file stem), units, world_up. Principal point at
  pixel centres (+0.5 here). A skew in the camera matrix is kept (OpenCV itself ignores it).
- "mouserecon": our `opencv_cameras.json` (DESIGN.md section 4) with the optional per-frame keys
  skew, dist_k1_k2_k3, dist_p1_p2 and camname (else the name is the stem of file_path), and top-level
  units and world_up; already in our conventions.

Every reader checks what it returns (finite values, rotations orthonormal with det +1, positive focal
lengths, principal point inside the image, positive image size, unique names, at least one camera) and
raises `CalibrationError` naming the file, the camera and the defect; it never returns part of a file.

Undistortion resamples each raw frame to a pinhole camera of the same size with the same focal
lengths and principal point and no skew (`LensCamera.pinhole`); `undistort_maps` gives the
per-pixel source coordinates for `cv2.remap`, computed with the forward model above (exact, no
iteration). Points go the other way with `undistort_points` (fixed-point iteration, as OpenCV's).
"""

from __future__ import annotations

import io
import json
import logging
import tomllib
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io
import scipy.io.matlab
import torch

from mouserecon.cameras import Cameras, validate_cameras
from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


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

    def resize(self, width: int, height: int) -> LensCamera:
        """The same camera resampled to `width` x `height` (pixel-edge convention: K rows 0-1 scale by the size
        ratios, skew included); distortion is unchanged (it acts on normalised coordinates)."""
        K = self.K.copy()
        K[0] *= width / self.width
        K[1] *= height / self.height
        return replace(self, width=width, height=height, K=K)

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
    return resample_maps(camera, camera.pinhole())


def resample_maps(camera: LensCamera, target: LensCamera) -> tuple[np.ndarray, np.ndarray]:
    """`cv2.remap` maps (as `undistort_maps`) that resample a raw frame of `camera` to `target`, a pinhole
    camera (no distortion, no skew) at the same centre, any rotation, size and intrinsics: each target
    pixel's ray is turned into `camera`'s frame, distorted and taken through its K.

    Computed by `cv2.initUndistortRectifyMap` (the same distortion model; its rotation argument takes
    target rays to camera rays inverted), in OpenCV's pixel-centre convention. OpenCV ignores a skew in
    the camera matrix, so the skew's term, skew * y_d = skew * (v - cy) / fy, is added to map_x after."""
    assert not target.has_distortion, "the target of a resampling is a pinhole camera"
    assert np.allclose(target.c2w()[:3, 3], camera.c2w()[:3, 3], atol=1e-6 * max(1.0, np.abs(camera.t).max())), \
        "resampling keeps the camera centre"
    K = _to_pixel_centres(camera.K)
    K[0, 1] = 0.0
    rotation = target.R @ camera.R.T  # camera rays -> target rays
    map_x, map_y = cv2.initUndistortRectifyMap(K, camera.dist, rotation, _to_pixel_centres(target.K),
                                               (target.width, target.height), cv2.CV_32FC1)
    if camera.skew:
        map_x += (camera.skew / camera.K[1, 1]) * (map_y - K[1, 2])
    return map_x, map_y


# ---- reading --------------------------------------------------------------------------------------

OPENCV_SUFFIXES = (".json", ".yaml", ".yml", ".xml")  # per-camera OpenCV files (and folders of them)
_MAT_ERRORS = (ValueError, TypeError, OSError, IndexError, zlib.error, scipy.io.matlab.MatReadError)
_DANNCE_FIELDS = ("K", "RDistort", "TDistort", "r", "t")
_ANIPOSE_KEYS = ("name", "size", "matrix", "distortions", "rotation", "translation")
_MOUSERECON_KEYS = ("w", "h", "fx", "fy", "cx", "cy", "w2c")
_OPENCV_ALIASES = {  # what: the keys that may hold it (exactly one per file)
    "camera matrix": ("camera_matrix", "cameraMatrix", "K"),
    "distortion": ("distortion_coefficients", "dist_coeffs", "distCoeffs", "D"),
    "rotation": ("R", "rvec", "rotation"),
    "translation": ("T", "tvec", "translation"),
}
_CENTRES = "principal point +0.5 px (OpenCV pixel centres -> pixel edges)"
_CONVERSIONS = {
    "dannce": "K transposed (MATLAB layout); r transposed (row-vector convention: R = r^T); principal point "
              "+0.5 px (0-based pixel centres -> pixel edges); RDistort (k1 k2 [k3]) and TDistort (p1 p2) -> "
              "(k1, k2, p1, p2, k3)",
    "anipose": f"rotation Rodrigues vector -> R; {_CENTRES}; distortions -> (k1, k2, p1, p2, k3), missing ones 0",
    "opencv": f"rvec (Rodrigues) -> R where given so; {_CENTRES}; distortion -> (k1, k2, p1, p2, k3), missing ones 0",
    "mouserecon": "none (already in our conventions)",
}


def load_calibration(path: str | Path, image_size: tuple[int, int] | None = None) -> Calibration:
    """Read a rig calibration (formats: the module docstring) -> Calibration in our conventions.

    path:       a `.mat` (DANNCE), `.toml` (Anipose), `.json` (ours when its top level has "frames",
                else one OpenCV camera), `.yaml` / `.yml` / `.xml` (one OpenCV camera) file, or a folder of
                per-camera OpenCV files.
    image_size: (width, height) in pixels, used only where the file does not store the size (DANNCE,
                OpenCV files without it); where the file states a size, that is kept (the caller compares
                it with its videos).
    Raises CalibrationError naming the file, the camera and the defect; never returns part of a file.
    """
    path = Path(path)
    if image_size is not None:
        image_size = _size_pair(image_size, path, "the argument", "image_size")
    if path.is_dir():
        files = _opencv_files(path)
        if not files:
            raise CalibrationError(f"{path}: a folder without per-camera OpenCV files "
                                   f"({', '.join(OPENCV_SUFFIXES)})")
        return _opencv_calibration(path, files, [_read_opencv_file(f, image_size) for f in files])
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return _read_dannce(path, image_size)
    if suffix == ".toml":
        return _read_anipose(path)
    if suffix == ".json":
        data = _read_json(path)
        if "frames" in data:
            return _read_mouserecon(path, data)
    if suffix in OPENCV_SUFFIXES:
        return _opencv_calibration(path, [path], [_read_opencv_file(path, image_size)])
    raise CalibrationError(f"{path}: unknown calibration format {suffix!r} (expected .mat, .toml, "
                           f"{', '.join(OPENCV_SUFFIXES)} or a folder of per-camera files)")


def find_calibration(folder: str | Path) -> Path | None:
    """The calibration of a recording folder, or None: `label3d_dannce.mat` (else one `*dannce*.mat`),
    `calibration.toml`, `opencv_cameras.json`, or a `calibration/` folder of per-camera OpenCV files.
    Raises CalibrationError listing them when several are there (then the user passes one)."""
    folder = Path(folder)
    dannce = folder / "label3d_dannce.mat"
    found = [dannce] if dannce.is_file() else sorted(p for p in folder.glob("*dannce*.mat") if p.is_file())
    found += [folder / name for name in ("calibration.toml", "opencv_cameras.json") if (folder / name).is_file()]
    if (folder / "calibration").is_dir() and _opencv_files(folder / "calibration"):
        found.append(folder / "calibration")
    if len(found) > 1:
        raise CalibrationError(f"{folder}: several calibrations ({', '.join(p.name for p in found)}); "
                               "pass the one to use explicitly")
    return found[0] if found else None


def _read_dannce(path: Path, image_size: tuple[int, int] | None) -> Calibration:
    try:
        mat = scipy.io.loadmat(path)  # every variable, so that a truncated file fails here
    except NotImplementedError:
        raise CalibrationError(f"{path}: a MATLAB v7.3 (HDF5) .mat file; only v5 to v7.2 are read: re-save it "
                               "in MATLAB with save(file, '-v7')") from None
    except _MAT_ERRORS as err:
        raise CalibrationError(f"{path}: not a readable MATLAB .mat file, corrupt or truncated "
                               f"({type(err).__name__}: {err})") from None
    missing = [key for key in ("params", "camnames") if key not in mat]
    if missing:
        variables = sorted(key for key in mat if not key.startswith("__"))
        raise CalibrationError(f"{path}: no {' or '.join(missing)} variable (a DANNCE label3d file holds params, a "
                               f"cell of camera structs, and camnames); it has {variables}")
    params, camnames = mat["params"], mat["camnames"]
    if params.size == 0 or (params.dtype != object and params.dtype.names is None):
        raise CalibrationError(f"{path}: 'params' must be a non-empty cell of camera structs, got {params.dtype} "
                               f"{params.shape}")
    if camnames.dtype != object:
        raise CalibrationError(f"{path}: 'camnames' must be a cell of strings, got {camnames.dtype} {camnames.shape}")
    names = [_mat_string(value, path, i) for i, value in enumerate(camnames.reshape(-1))]
    if len(names) != params.size:
        raise CalibrationError(f"{path}: 'params' has {params.size} cameras but 'camnames' {len(names)} names")
    if image_size is None:
        raise CalibrationError(f"{path}: a DANNCE .mat does not store the image size; pass image_size=(width, "
                               "height) (prepare takes it from the videos)")
    cameras, wheres = [], []
    for i, (entry, name) in enumerate(zip(params.reshape(-1), names)):
        where = f"camera {name!r} (params{{{i + 1}}})"
        fields = _mat_struct(entry, path, where)
        K_mat = _floats(fields["K"], path, where, "K", ((3, 3),))
        if K_mat[0, 1] != 0 or K_mat[0, 2] != 0 or K_mat[1, 2] != 0:
            raise CalibrationError(f"{path}: {where} 'K' is not in MATLAB's transposed layout "
                                   f"[fx 0 0; skew fy 0; cx cy 1]: {K_mat.tolist()}")
        radial = _floats(fields["RDistort"], path, where, "RDistort", ((2,), (3,)))
        p1, p2 = _floats(fields["TDistort"], path, where, "TDistort", ((2,),))
        k3 = radial[2] if len(radial) == 3 else 0.0
        cameras.append(LensCamera(name, *image_size, _from_pixel_centres(K_mat.T),
                                  np.array([radial[0], radial[1], p1, p2, k3]),
                                  _floats(fields["r"], path, where, "r", ((3, 3),)).T,
                                  _floats(fields["t"], path, where, "t", ((3,),))))
        wheres.append(where)
    notes = (f"image size {image_size[0]}x{image_size[1]} given by the caller (a DANNCE .mat does not store it)",)
    return _checked(path, "dannce", cameras, wheres, "mm", None, notes)


def _mat_string(value: Any, path: Path, index: int) -> str:
    array = np.asarray(value)
    if array.dtype.kind != "U" or array.size != 1:
        raise CalibrationError(f"{path}: camnames{{{index + 1}}} is not a string, got {array!r}")
    return str(array.reshape(-1)[0])


def _mat_struct(entry: Any, path: Path, where: str) -> dict[str, Any]:
    """A params cell (a 1x1 struct array, or a record of a struct array) -> its DANNCE fields."""
    if isinstance(entry, np.ndarray) and entry.dtype.names is not None and entry.size == 1:
        entry = entry.reshape(-1)[0]
    if not isinstance(entry, np.void) or entry.dtype.names is None:
        raise CalibrationError(f"{path}: {where} is not a struct (expected the fields {list(_DANNCE_FIELDS)})")
    missing = [key for key in _DANNCE_FIELDS if key not in entry.dtype.names]
    if missing:
        raise CalibrationError(f"{path}: {where} is missing the fields {missing}")
    return {key: entry[key] for key in _DANNCE_FIELDS}


def _read_anipose(path: Path) -> Calibration:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise CalibrationError(f"{path}: not valid TOML ({err})") from None
    sections = [(key, value) for key, value in data.items() if isinstance(value, dict) and key != "metadata"]
    if not sections:
        raise CalibrationError(f"{path}: no camera tables ([cam_0], [cam_1], ...)")
    cameras, wheres = [], []
    for key, section in sections:
        where = f"section [{key}]"
        missing = [k for k in _ANIPOSE_KEYS if k not in section]
        if missing:
            raise CalibrationError(f"{path}: {where} is missing {missing}")
        if section.get("fisheye", False):
            raise CalibrationError(f"{path}: {where} is a fisheye camera (fisheye = true): not supported")
        name = _name(section["name"], path, where, "name")
        where = f"section [{key}] (camera {name!r})"
        K = _from_pixel_centres(_floats(section["matrix"], path, where, "matrix", ((3, 3),)))
        cameras.append(LensCamera(name, *_size_pair(section["size"], path, where, "size"), K,
                                  _distortion(section["distortions"], path, where, "distortions", (1, 2, 4, 5, 8)),
                                  _rotation(section["rotation"], path, where, "rotation"),
                                  _floats(section["translation"], path, where, "translation", ((3,),))))
        wheres.append(where)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    units = _units(metadata["units"], path, "[metadata]") if "units" in metadata else None
    up = _world_up(metadata["world_up"], path, "[metadata]") if "world_up" in metadata else None
    return _checked(path, "anipose", cameras, wheres, units, up, _skew_notes(cameras, "matrix"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CalibrationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def _read_mouserecon(path: Path, data: dict[str, Any]) -> Calibration:
    frames = data["frames"]
    if not isinstance(frames, list) or not frames:
        raise CalibrationError(f"{path}: 'frames' must be a non-empty list of cameras")
    cameras, wheres = [], []
    for i, frame in enumerate(frames):
        where = f"frame {i}"
        if not isinstance(frame, dict):
            raise CalibrationError(f"{path}: {where} is not a JSON object")
        missing = [k for k in _MOUSERECON_KEYS if k not in frame]
        if missing:
            raise CalibrationError(f"{path}: {where} is missing {missing}")
        if "camname" in frame:
            name = _name(frame["camname"], path, where, "camname")
        elif isinstance(frame.get("file_path"), str):
            name = Path(frame["file_path"]).stem
        else:
            raise CalibrationError(f"{path}: {where} has neither 'camname' nor 'file_path' to name its camera")
        where = f"frame {i} (camera {name!r})"
        w2c = _floats(frame["w2c"], path, where, "w2c", ((4, 4), (3, 4)))
        if w2c.shape == (4, 4) and not np.array_equal(w2c[3], [0.0, 0.0, 0.0, 1.0]):
            raise CalibrationError(f"{path}: {where} 'w2c' last row is {w2c[3].tolist()}, expected [0, 0, 0, 1]")
        fx, fy, cx, cy, skew = (_number(frame.get(k, 0.0), path, where, k) for k in ("fx", "fy", "cx", "cy", "skew"))
        k1, k2, k3 = _floats(frame.get("dist_k1_k2_k3", [0.0] * 3), path, where, "dist_k1_k2_k3", ((3,),))
        p1, p2 = _floats(frame.get("dist_p1_p2", [0.0] * 2), path, where, "dist_p1_p2", ((2,),))
        cameras.append(LensCamera(name, _positive_int(frame["w"], path, where, "w"),
                                  _positive_int(frame["h"], path, where, "h"),
                                  np.array([[fx, skew, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]),
                                  np.array([k1, k2, p1, p2, k3]), w2c[:3, :3], w2c[:3, 3]))
        wheres.append(where)
    units = _units(data["units"], path, "the top level") if "units" in data else None
    up = _world_up(data["world_up"], path, "the top level") if "world_up" in data else None
    return _checked(path, "mouserecon", cameras, wheres, units, up, ())


def _read_opencv_file(path: Path, image_size: tuple[int, int] | None) -> tuple[LensCamera, str | None, tuple | None]:
    """One per-camera OpenCV file -> (its checked camera, units or None, world_up or None)."""
    data = _read_json(path) if path.suffix.lower() == ".json" else _read_filestorage(path)
    if "frames" in data:
        raise CalibrationError(f"{path}: an opencv_cameras.json (it has 'frames') inside a folder of per-camera "
                               "files; pass it on its own")
    names = [key for key in ("name", "camera_name") if key in data]
    name = _name(data[names[0]], path, "the file", names[0]) if names else path.stem
    where = f"camera {name!r}"
    data = {key: _opencv_matrix(value, path, where, key) for key, value in data.items()}
    found = {}
    for what, aliases in _OPENCV_ALIASES.items():
        present = [key for key in aliases if key in data]
        if len(present) != 1:
            raise CalibrationError(f"{path}: {where} has {'no' if not present else 'more than one'} {what} "
                                   f"(exactly one of {list(aliases)}; found {present})")
        found[what] = present[0]
    K = _floats(data[found["camera matrix"]], path, where, found["camera matrix"], ((3, 3),))
    camera = LensCamera(name, *_opencv_size(data, path, where, image_size), _from_pixel_centres(K),
                        _distortion(data[found["distortion"]], path, where, found["distortion"], (4, 5, 8, 12, 14)),
                        _rotation(data[found["rotation"]], path, where, found["rotation"]),
                        _floats(data[found["translation"]], path, where, found["translation"], ((3,),)))
    _check_camera(path, where, camera)
    units = _units(data["units"], path, "the file") if "units" in data else None
    up = _world_up(data["world_up"], path, "the file") if "world_up" in data else None
    return camera, units, up


def _opencv_calibration(path: Path, files: list[Path],
                        read: list[tuple[LensCamera, str | None, tuple | None]]) -> Calibration:
    """Per-camera OpenCV files (`path` itself or the files of the folder `path`), read and checked each -> one
    Calibration; the files must agree on units and world_up."""
    agreed = []
    for what, values in (("units", [r[1] for r in read]), ("world_up", [r[2] for r in read])):
        stated = sorted({v for v in values if v is not None})
        if len(stated) > 1:
            raise CalibrationError(f"{path}: the camera files disagree on {what}: {stated}")
        agreed.append(stated[0] if stated else None)
    cameras = [r[0] for r in read]
    wheres = [f"camera {c.name!r}" + ("" if file == path else f" ({file.name})") for c, file in zip(cameras, files)]
    return _checked(path, "opencv", cameras, wheres, *agreed, _skew_notes(cameras, "the camera matrix"))


def _read_filestorage(path: Path) -> dict[str, Any]:
    """An OpenCV FileStorage file (YAML with %YAML and !!opencv-matrix, or XML) -> its top level as Python values."""
    try:
        storage = cv2.FileStorage(str(path), cv2.FILE_STORAGE_READ)
    except (cv2.error, SystemError) as err:  # the bindings raise a parse error as SystemError from cv2.error
        reason = str(err.__cause__ or err).strip()
        raise CalibrationError(f"{path}: not a readable OpenCV YAML/XML file ({reason})") from None
    try:
        root = storage.root()
        if not storage.isOpened() or not root.isMap():
            raise CalibrationError(f"{path}: not an OpenCV YAML/XML file with a map of keys at the top level")
        return {key: _node_value(root.getNode(key)) for key in root.keys()}
    finally:
        storage.release()


def _node_value(node: cv2.FileNode) -> Any:
    if node.isMap():
        return {key: _node_value(node.getNode(key)) for key in node.keys()}
    if node.isSeq():
        return [_node_value(node.at(i)) for i in range(node.size())]
    if node.isInt():
        return int(node.real())
    if node.isReal():
        return node.real()
    return node.string() if node.isString() else None


def _opencv_matrix(value: Any, path: Path, where: str, key: str) -> Any:
    """An OpenCV matrix as FileStorage writes it in YAML, XML and JSON ({rows, cols, data} or {sizes, data})
    -> float64 array; any other value unchanged."""
    if not (isinstance(value, dict) and "data" in value and ("rows" in value or "sizes" in value)):
        return value
    shape = (value.get("rows"), value.get("cols")) if "rows" in value else value["sizes"]
    try:
        return np.asarray(value["data"], dtype=np.float64).reshape(shape)
    except (TypeError, ValueError) as err:
        raise CalibrationError(f"{path}: {where} '{key}' is not a valid OpenCV matrix ({err})") from None


def _opencv_size(data: dict[str, Any], path: Path, where: str, image_size: tuple[int, int] | None) -> tuple[int, int]:
    if "image_width" in data or "image_height" in data:
        missing = [key for key in ("image_width", "image_height") if key not in data]
        if missing:
            raise CalibrationError(f"{path}: {where} is missing {missing}")
        return (_positive_int(data["image_width"], path, where, "image_width"),
                _positive_int(data["image_height"], path, where, "image_height"))
    if "image_size" in data:
        return _size_pair(data["image_size"], path, where, "image_size")
    if image_size is None:
        raise CalibrationError(f"{path}: {where} has no image size (image_width and image_height, or image_size "
                               "[w, h]); pass image_size=(width, height)")
    return image_size


def _opencv_files(folder: Path) -> list[Path]:
    """The per-camera files of a folder, sorted by name (hidden files, e.g. atomic-write temp files, skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in OPENCV_SUFFIXES and not p.name.startswith(".") and p.is_file())


# ---- values ---------------------------------------------------------------------------------------


def _floats(value: Any, path: Path, where: str, key: str, shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """`value` as finite float64 of one of `shapes`; a vector shape (n,) also takes a 1 x n row or n x 1 column."""
    try:
        array = np.asarray(value, dtype=np.float64) if not isinstance(value, str) else None
    except (TypeError, ValueError):
        array = None
    if array is None:
        raise CalibrationError(f"{path}: {where} '{key}' is not numeric, got {value!r}")
    for shape in shapes:
        vector = len(shape) == 1 and array.ndim == 2 and 1 in array.shape and array.size == shape[0]
        if array.shape == shape or vector:
            if not np.isfinite(array).all():
                raise CalibrationError(f"{path}: {where} '{key}' has non-finite values (NaN or inf)")
            return array.reshape(shape)
    expected = " or ".join(_shape_text(s) for s in shapes)
    raise CalibrationError(f"{path}: {where} '{key}' has shape {_shape_text(array.shape)}, expected {expected}")


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "a single number"


def _number(value: Any, path: Path, where: str, key: str) -> float:
    if isinstance(value, bool):
        raise CalibrationError(f"{path}: {where} '{key}' must be a number, got {value!r}")
    return float(_floats(value, path, where, key, ((),)))


def _positive_int(value: Any, path: Path, where: str, key: str) -> int:
    number = None if isinstance(value, bool) else _floats(value, path, where, key, ((),))
    if number is None or number != int(number) or number <= 0:
        raise CalibrationError(f"{path}: {where} '{key}' must be a positive integer, got {value!r}")
    return int(number)


def _size_pair(value: Any, path: Path, where: str, key: str) -> tuple[int, int]:
    """(width, height) from a 2-element list or array."""
    size = _floats(value, path, where, key, ((2,),))
    if np.any(size != np.round(size)) or np.any(size <= 0):
        raise CalibrationError(f"{path}: {where} '{key}' must be two positive integers [width, height], got {value!r}")
    return int(size[0]), int(size[1])


def _name(value: Any, path: Path, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CalibrationError(f"{path}: {where} '{key}' must be a string, got {value!r}")
    return str(value)


def _units(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise CalibrationError(f"{path}: {where} 'units' must be a non-empty string, got {value!r}")
    return value


def _world_up(value: Any, path: Path, where: str) -> tuple[float, float, float]:
    up = _floats(value, path, where, "world_up", ((3,),))
    if not np.any(up):
        raise CalibrationError(f"{path}: {where} 'world_up' must be a non-zero 3-vector, got {value!r}")
    return float(up[0]), float(up[1]), float(up[2])


def _distortion(value: Any, path: Path, where: str, key: str, lengths: tuple[int, ...]) -> np.ndarray:  # [5]
    """OpenCV-order coefficients (k1, k2, p1, p2, k3, k4, ...) of one of `lengths` -> (k1, k2, p1, p2, k3),
    missing ones 0; any beyond k3 (rational, thin-prism, tilt models) must be 0."""
    coefficients = _floats(value, path, where, key, tuple((n,) for n in lengths))
    if np.any(coefficients[5:] != 0):
        raise CalibrationError(f"{path}: {where} '{key}' has non-zero coefficients beyond k3 "
                               f"{coefficients[5:].tolist()}: the rational (k4-k6), thin-prism and tilt models "
                               "are not supported")
    return np.concatenate([coefficients[:5], np.zeros(max(0, 5 - len(coefficients)))])


def _rotation(value: Any, path: Path, where: str, key: str) -> np.ndarray:  # [3, 3]
    """A 3x3 rotation matrix as is, or a Rodrigues vector [3] -> its matrix."""
    rotation = _floats(value, path, where, key, ((3, 3), (3,)))
    return cv2.Rodrigues(rotation.reshape(3, 1))[0] if rotation.shape == (3,) else rotation


def _from_pixel_centres(K: np.ndarray) -> np.ndarray:
    """K with the principal point at pixel centres (OpenCV, DANNCE: pixel (i, j) at (i, j)) -> pixel edges (ours)."""
    K = K.copy()
    K[:2, 2] += 0.5
    return K


def _to_pixel_centres(K: np.ndarray) -> np.ndarray:
    K = K.copy()
    K[:2, 2] -= 0.5
    return K


def _skew_notes(cameras: list[LensCamera], key: str) -> tuple[str, ...]:
    return tuple(f"camera {c.name!r}: {key} [0][1] = {c.skew!r} is used as the skew (OpenCV's projectPoints "
                 "ignores it)" for c in cameras if c.skew != 0)


# ---- validation -----------------------------------------------------------------------------------


def _checked(path: Path, format: str, cameras: list[LensCamera], wheres: list[str], units: str | None,
             world_up: tuple[float, float, float] | None, notes: tuple[str, ...]) -> Calibration:
    """Every camera checked -> the Calibration; raises CalibrationError at the first defect."""
    for camera, where in zip(cameras, wheres):
        _check_camera(path, where, camera)
    _check_names(path, cameras, wheres)
    return Calibration(path, format, tuple(cameras), units, world_up, _CONVERSIONS[format], notes)


def _check_camera(path: Path, where: str, camera: LensCamera, atol: float = 1e-4) -> None:
    """Raise unless the camera is usable: finite; R orthonormal with det +1 (to `atol`, as cameras._check_rigid);
    K = [[fx, skew, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0 and (cx, cy) inside the image; size > 0."""
    for key in ("K", "dist", "R", "t"):
        if not np.isfinite(getattr(camera, key)).all():
            raise CalibrationError(f"{path}: {where} {key} has non-finite values (NaN or inf)")
    err = np.abs(camera.R @ camera.R.T - np.eye(3)).max()
    if err > atol:
        raise CalibrationError(f"{path}: {where} rotation is not orthonormal (|R R^T - I| = {err:.2e})")
    det = np.linalg.det(camera.R)
    if det < 0:
        raise CalibrationError(f"{path}: {where} rotation has det {det:+.3f} (a reflection), expected +1")
    K = camera.K
    if K[1, 0] != 0 or K[2, 0] != 0 or K[2, 1] != 0 or K[2, 2] != 1:
        raise CalibrationError(f"{path}: {where} K is not an intrinsic matrix [[fx, skew, cx], [0, fy, cy], "
                               f"[0, 0, 1]]: {K.tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise CalibrationError(f"{path}: {where} focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    size = (camera.width, camera.height)
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in size):
        raise CalibrationError(f"{path}: {where} image size must be positive integers, got "
                               f"{camera.width!r}x{camera.height!r}")
    if not (0 <= K[0, 2] <= camera.width and 0 <= K[1, 2] <= camera.height):
        raise CalibrationError(f"{path}: {where} principal point ({K[0, 2]}, {K[1, 2]}) is outside the "
                               f"{camera.width}x{camera.height} image")


def _check_names(path: Path, cameras: list[LensCamera], wheres: list[str]) -> None:
    if not cameras:
        raise CalibrationError(f"{path}: no cameras")
    seen: dict[str, str] = {}
    for camera, where in zip(cameras, wheres):
        if not camera.name or not camera.name.isprintable():
            raise CalibrationError(f"{path}: {where} has the camera name {camera.name!r}; names must be "
                                   "non-empty printable text")
        if camera.name in seen:
            raise CalibrationError(f"{path}: {seen[camera.name]} and {where} have the same camera name {camera.name!r}")
        seen[camera.name] = where


# ---- writing --------------------------------------------------------------------------------------


def save_dannce_mat(path: str | Path, calibration: Calibration) -> None:
    """Write `calibration` as a DANNCE `label3d_dannce.mat` (MATLAB v5), atomically: `params`, an (n, 1) cell of
    1x1 structs K (transposed, principal point 0-based at pixel centres), RDistort [k1 k2 k3], TDistort
    [p1 p2], r (= R^T), t (1x3), and `camnames`, a 1 x n cell, as DANNCE's own files. The image size is
    not stored (pass it to load_calibration); the units must be mm or unstated."""
    path = Path(path)
    _check_writable(path, calibration)
    if calibration.units not in (None, "mm"):
        raise CalibrationError(f"{path}: DANNCE calibrations are in mm, this one is in {calibration.units!r}")
    cameras = calibration.cameras
    params = np.empty((len(cameras), 1), dtype=object)
    camnames = np.empty((1, len(cameras)), dtype=object)
    for i, camera in enumerate(cameras):
        k1, k2, p1, p2, k3 = camera.dist
        params[i, 0] = {"K": _to_pixel_centres(camera.K).T, "RDistort": np.array([[k1, k2, k3]]),
                        "TDistort": np.array([[p1, p2]]), "r": camera.R.T, "t": camera.t.reshape(1, 3)}
        camnames[0, i] = camera.name
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"params": params, "camnames": camnames}, do_compression=True)
    atomic_write_bytes(path, buffer.getvalue())


def save_anipose_toml(path: str | Path, calibration: Calibration) -> None:
    """Write `calibration` as an Anipose `calibration.toml`, atomically: `[cam_i]` tables (name, size [w, h],
    matrix with the principal point at pixel centres, distortions [k1, k2, p1, p2, k3], rotation as a
    Rodrigues vector, translation) and `[metadata]` with units and world_up when known. A skew goes to
    matrix[0][1], which load_calibration reads back and OpenCV (so aniposelib) ignores."""
    path = Path(path)
    _check_writable(path, calibration)
    _warn_skew(path, calibration)
    lines = []
    for i, camera in enumerate(calibration.cameras):
        K = _to_pixel_centres(camera.K)
        lines += [f"[cam_{i}]", f"name = {json.dumps(camera.name, ensure_ascii=False)}",
                  f"size = [{camera.width}, {camera.height}]",
                  f"matrix = [{', '.join(_toml_floats(row) for row in K)}]",
                  f"distortions = {_toml_floats(camera.dist)}",
                  f"rotation = {_toml_floats(cv2.Rodrigues(camera.R)[0].reshape(3))}",
                  f"translation = {_toml_floats(camera.t)}", ""]
    metadata = ([f"units = {json.dumps(calibration.units, ensure_ascii=False)}"] if calibration.units else []) + (
        [f"world_up = {_toml_floats(calibration.world_up)}"] if calibration.world_up else [])
    if metadata:
        lines += ["[metadata]", *metadata, ""]
    atomic_write_text(path, "\n".join(lines))


def _toml_floats(values: Any) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def save_opencv_yaml(folder: str | Path, calibration: Calibration) -> None:
    """Write `calibration` as a folder of OpenCV FileStorage YAML files, one `<name>.yaml` per camera, each
    atomically: name, image_width, image_height, camera_matrix (principal point at pixel centres; a skew
    in [0][1], which OpenCV ignores), distortion_coefficients [1 x 5] (k1 k2 p1 p2 k3), R [3 x 3], T [3 x 1],
    and units / world_up when known. The folder is created; it must not hold other per-camera files."""
    folder = Path(folder)
    _check_writable(folder, calibration)
    _warn_skew(folder, calibration)
    for camera in calibration.cameras:
        if camera.name.startswith(".") or any(c in camera.name for c in "/\\\0"):
            raise CalibrationError(f"{folder}: camera name {camera.name!r} cannot name a file")
    folder.mkdir(parents=True, exist_ok=True)
    targets = {f"{camera.name}.yaml" for camera in calibration.cameras}
    stale = [p.name for p in _opencv_files(folder) if p.name not in targets]
    if stale:
        raise CalibrationError(f"{folder}: holds other per-camera files {stale}, which would be read as cameras "
                               "too; write to an empty folder")
    for camera in calibration.cameras:
        storage = cv2.FileStorage(f"{camera.name}.yaml", cv2.FILE_STORAGE_WRITE | cv2.FILE_STORAGE_MEMORY)
        storage.write("name", camera.name)
        storage.write("image_width", camera.width)
        storage.write("image_height", camera.height)
        storage.write("camera_matrix", _to_pixel_centres(camera.K))
        storage.write("distortion_coefficients", camera.dist.reshape(1, 5))
        storage.write("R", camera.R)
        storage.write("T", camera.t.reshape(3, 1))
        if calibration.units:
            storage.write("units", calibration.units)
        if calibration.world_up:
            storage.write("world_up", np.array([calibration.world_up], dtype=np.float64))
        atomic_write_text(folder / f"{camera.name}.yaml", storage.releaseAndGetString())


def save_mouserecon_json(path: str | Path, calibration: Calibration) -> None:
    """Write `calibration` as our `opencv_cameras.json` with distortion, atomically: per frame w, h, fx, fy, cx,
    cy (pixel edges), w2c, file_path `images/cam_<i>.png`, camname, skew, dist_k1_k2_k3, dist_p1_p2; at the top
    level units and world_up when known. `cameras.load_opencv_cameras` reads it too (as pinhole cameras)."""
    path = Path(path)
    _check_writable(path, calibration)
    frames = []
    for i, camera in enumerate(calibration.cameras):
        k1, k2, p1, p2, k3 = camera.dist.tolist()
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = camera.R, camera.t
        frames.append({"w": camera.width, "h": camera.height, "fx": float(camera.K[0, 0]), "fy": float(camera.K[1, 1]),
                       "cx": float(camera.K[0, 2]), "cy": float(camera.K[1, 2]), "w2c": w2c.tolist(),
                       "file_path": f"images/cam_{i:03d}.png", "camname": camera.name, "skew": camera.skew,
                       "dist_k1_k2_k3": [k1, k2, k3], "dist_p1_p2": [p1, p2]})
    extra = {"units": calibration.units} if calibration.units else {}
    if calibration.world_up:
        extra["world_up"] = list(calibration.world_up)
    atomic_write_json(path, {**extra, "frames": frames})


def _check_writable(path: Path, calibration: Calibration) -> None:
    wheres = [f"camera {camera.name!r} (index {i})" for i, camera in enumerate(calibration.cameras)]
    for camera, where in zip(calibration.cameras, wheres):
        _check_camera(path, where, camera)
    _check_names(path, list(calibration.cameras), wheres)


def _warn_skew(path: Path, calibration: Calibration) -> None:
    skewed = [camera.name for camera in calibration.cameras if camera.skew != 0]
    if skewed:
        log.warning("%s: cameras %s have a skew, written to the camera matrix [0][1]: mouserecon reads it back, "
                    "OpenCV's projectPoints (and so aniposelib) ignores it", path, skewed)
