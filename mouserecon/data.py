"""Samples and datasets: multi-view images plus cameras, loaded exactly and resized consistently.

A *sample* is a folder with `opencv_cameras.json` (FaceLift format) or a nerfstudio
`transforms.json`, and one image per frame (`file_path` relative to the camera file's folder).
A *dataset* is a folder of sample folders or a text file listing them.

Images (CONVENTIONS.md C5): float32 in [0, 1], [V, 3, H, W], composited on white,
`rgb = alpha * fg + (1 - alpha)`; masks [V, 1, H, W] are the foreground mask. Decoding is exact:
8-bit values / 255, 16-bit values / 65535 (PNG alpha is straight, not premultiplied); EXIF
orientation is not applied, since calibrations refer to the stored pixel grid. RGBA and
grey+alpha PNGs take the mask from alpha; RGB, grey and JPEG images are taken as already on white
and get a mask from a near-white threshold (background where every channel >= `white_threshold`).
`Sample.mask_source` says which ("alpha" or "threshold:<t>"); one sample never mixes the two.

Resizing to the model resolution: if the requested aspect ratio differs from the image's, the
largest centred window with the requested aspect is cropped first (`Cameras.crop`); then colour
and mask are resampled with antialiased bilinear filtering (`F.interpolate(..., antialias=True,
align_corners=False)`, i.e. the pixel-centre convention of C3) and intrinsics are scaled with
`Cameras.resize`. Resampling the white-composited colour equals compositing the resampled
premultiplied colour, `resize(alpha * fg) + (1 - resize(alpha))`, because the filter is linear with
weights summing to one, so no colour bleeds in from transparent pixels.

Depth maps (optional, for training losses): `depth.npz` in the sample folder, array "depth"
[F, H, W] float32 with one map per frame in camera-file order at the images' size: the camera z of
the surface under each pixel centre, in the camera file's units, 0 where there is none (synthetic
samples have it). Resampled as a masked mean over valid pixels (a pixel that mixes surface and
background becomes 0), scaled by the normalisation like every length.

View order is the order of frames in the camera file (or of `views`, when given); never shuffled.
Every defect raises SampleError naming the file and the defect; no sample is ever substituted.
"""

from __future__ import annotations

import logging
import math
import operator
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
from torch import Tensor
from torch.utils.data import Dataset

from mouserecon.errors import MouseReconError
from mouserecon.cameras import (CAMERA_FILES, CameraError, CameraFile, Cameras, find_camera_file, load_camera_file, look_at,
                                nearest_point_to_lines)
from mouserecon.normalize import Similarity, normalize_cameras, rotation_between

log = logging.getLogger(__name__)

DEPTH_FILE = "depth.npz"  # optional depth maps, see the module docstring
WHITE_THRESHOLD = 0.97

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# PNG IHDR colour type -> (name, has alpha); palette images (type 3) are not supported.
_PNG_COLOUR_TYPES = {0: ("grey", False), 2: ("RGB", False), 4: ("grey+alpha", True), 6: ("RGBA", True)}


class SampleError(MouseReconError, ValueError):
    """A sample or dataset violates the contract; the message names the file and the defect."""


@dataclass(frozen=True)
class Sample:
    """One multi-view sample.

    images:      [V, 3, H, W] float32 in [0, 1], composited on white.
    masks:       [V, 1, H, W] float32 in [0, 1], foreground mask (alpha, or near-white threshold).
    cameras:     Cameras [V] for the (cropped, resized) images.
    image_paths: the V source image files, in view order.
    sample_id:   the sample folder's name.
    path:        the sample folder.
    mask_source: "alpha" or "threshold:<t>".
    depths:      [V, 1, H, W] float32 camera z (0 = unknown), or None when not loaded.
    """

    images: Tensor
    masks: Tensor
    cameras: Cameras
    image_paths: tuple[Path, ...]
    sample_id: str
    path: Path
    mask_source: str
    depths: Tensor | None = None

    def __post_init__(self) -> None:
        v, c, h, w = self.images.shape
        assert c == 3 and self.images.dtype == torch.float32, "images must be [V, 3, H, W] float32"
        assert self.masks.shape == (v, 1, h, w), f"masks {tuple(self.masks.shape)} vs images {(v, c, h, w)}"
        assert self.cameras.batch_shape == (v,), f"cameras {tuple(self.cameras.batch_shape)} for {v} views"
        assert (self.cameras.height, self.cameras.width) == (h, w), "cameras and images differ in size"
        assert len(self.image_paths) == v, f"{len(self.image_paths)} image paths for {v} views"
        assert self.depths is None or self.depths.shape == (v, 1, h, w), f"depths {tuple(self.depths.shape)}"

    @property
    def num_views(self) -> int:
        return self.images.shape[0]

    def to(self, *args, **kwargs) -> Sample:
        return replace(self, images=self.images.to(*args, **kwargs), masks=self.masks.to(*args, **kwargs),
                       cameras=self.cameras.to(*args, **kwargs),
                       depths=None if self.depths is None else self.depths.to(*args, **kwargs))

    @staticmethod
    def cat(samples: Sequence[Sample]) -> Sample:
        """The views of `samples` (same size; all with depth maps or none) one after another, as one
        Sample with the first one's id, path and mask source."""
        with_depth = {s.depths is not None for s in samples}
        assert len(with_depth) == 1, "cannot join samples with and without depth maps"
        return replace(samples[0], images=torch.cat([s.images for s in samples]),
                       masks=torch.cat([s.masks for s in samples]), cameras=Cameras.cat([s.cameras for s in samples]),
                       image_paths=sum((s.image_paths for s in samples), ()),
                       depths=torch.cat([s.depths for s in samples]) if with_depth == {True} else None)

    def select(self, views: Sequence[int]) -> Sample:
        """The given views, in the order given."""
        views = list(views)
        return replace(self, images=self.images[views], masks=self.masks[views], cameras=self.cameras[views],
                       image_paths=tuple(self.image_paths[v] for v in views),
                       depths=None if self.depths is None else self.depths[views])


@dataclass(frozen=True)
class SampleBatch:
    """Samples stacked by `collate`: images [B, V, 3, H, W], masks [B, V, 1, H, W], cameras [B, V],
    depths [B, V, 1, H, W] or None."""

    images: Tensor
    masks: Tensor
    cameras: Cameras
    sample_ids: tuple[str, ...]
    paths: tuple[Path, ...]
    mask_sources: tuple[str, ...]
    depths: Tensor | None = None

    def __post_init__(self) -> None:
        b, v, c, h, w = self.images.shape
        assert c == 3 and self.masks.shape == (b, v, 1, h, w), f"images {(b, v, c, h, w)}, masks {self.masks.shape}"
        assert self.cameras.batch_shape == (b, v), f"cameras {tuple(self.cameras.batch_shape)} for {(b, v)}"
        assert len(self.sample_ids) == len(self.paths) == len(self.mask_sources) == b
        assert self.depths is None or self.depths.shape == (b, v, 1, h, w), f"depths {tuple(self.depths.shape)}"

    def to(self, *args, **kwargs) -> SampleBatch:
        return replace(self, images=self.images.to(*args, **kwargs), masks=self.masks.to(*args, **kwargs),
                       cameras=self.cameras.to(*args, **kwargs),
                       depths=None if self.depths is None else self.depths.to(*args, **kwargs))


def normalize_sample(sample: Sample, fit_views: Sequence[int] | None = None, center=None,
                     up=None) -> tuple[Sample, Similarity]:
    """Map a sample's cameras to the model rig (CONVENTIONS.md C4) -> (sample, user-to-model similarity).

    fit_views: the views the similarity is fitted to (the model's input views, so that held-out
        views never influence the frame); default all. It is applied to every view. One camera has
        no axes intersection to centre on, so a single fit view is fitted with all the sample's
        cameras (the rig's calibration; no held-out image is used).
    up: the user's world up; default the camera file's (`CameraFile.up`: its "world_up", else +Z).
    center: the point to put at the origin (e.g. `foreground_center`, what `MouseDataset` and
        `pipeline.prepare` use); default the least-squares intersection of the optical axes.
    """
    if up is None:
        up = read_camera_file(sample.path).up()
    fit = sample.cameras if fit_views is None or len(fit_views) < 2 else sample.cameras[list(fit_views)]
    try:
        _, similarity = normalize_cameras(fit, center=center, up=up)
    except CameraError as err:
        raise SampleError(f"{sample.path}: cannot normalise the cameras ({err})") from err
    depths = None if sample.depths is None else sample.depths * similarity.scale
    return replace(sample, cameras=similarity.apply_cameras(sample.cameras), depths=depths), similarity


# ---- one sample ------------------------------------------------------------------------------


def read_camera_file(path: str | Path | CameraFile) -> CameraFile:
    """`load_camera_file` with its CameraError as a SampleError (a bad camera file is a bad sample); a
    CameraFile already read is returned as it is."""
    if isinstance(path, CameraFile):
        return path
    try:
        return load_camera_file(path)
    except CameraError as err:
        raise SampleError(str(err)) from err


def load_sample(
    folder: str | Path | CameraFile,
    resolution: int | tuple[int, int] | None = None,
    views: Sequence[int] | None = None,
    white_threshold: float = WHITE_THRESHOLD,
    depth: bool = False,
) -> Sample:
    """Load a sample folder (or its camera file, as a path or already read) -> Sample.

    resolution: None keeps the image size; an int n means (n, n); (H, W) otherwise. A different
        aspect ratio is centre-cropped first (see the module docstring).
    views: indices into the camera file's frames, returned in the order given (at least 2,
        distinct); None takes all frames in file order.
    white_threshold: for images without alpha, pixels with every channel >= this are background.
    depth: also load the depth maps (`DEPTH_FILE`, which must then exist).
    Raises SampleError naming the file and the defect (camera defects included).
    """
    loaded = read_camera_file(folder)
    camera_file, cameras, file_paths, folder = loaded.path, loaded.cameras, loaded.file_paths, loaded.path.parent
    image_paths = _check_image_files(camera_file, folder, file_paths)
    views = _check_views(camera_file, len(file_paths), views)
    target = _target_size(cameras, resolution, camera_file)

    images_t = torch.empty(len(views), 3, cameras.height, cameras.width)  # [V, 3, H, W]
    masks_t = torch.empty(len(views), 1, cameras.height, cameras.width)  # [V, 1, H, W]
    has_alpha = [_read_image(image_paths[i], images_t[k], masks_t[k]) for k, i in enumerate(views)]
    if any(has_alpha) and not all(has_alpha):
        first = has_alpha.index(not has_alpha[0])
        raise SampleError(f"{image_paths[views[first]]}: {'has' if has_alpha[first] else 'has no'} alpha channel, "
                          f"unlike {image_paths[views[0]]}; a sample's images must all have alpha or all lack it")
    mask_source = "alpha" if has_alpha[0] else f"threshold:{white_threshold:g}"
    if not has_alpha[0]:
        masks_t = (images_t < white_threshold).any(1, keepdim=True).float()  # background: all channels >= t
    cameras = cameras[list(views)]
    depths = _read_depth(folder / DEPTH_FILE, len(file_paths), cameras)[views] if depth else None
    images_t, masks_t, cameras, depths = _crop_and_resize(images_t, masks_t, cameras, target, depths)
    log.debug("loaded %s: %d views at %dx%d, mask from %s", folder, len(views), target[1], target[0], mask_source)
    return Sample(images_t, masks_t, cameras, tuple(image_paths[i] for i in views), folder.name, folder, mask_source,
                  depths)


def resize_sample(sample: Sample, resolution: int | tuple[int, int]) -> Sample:
    """A full-resolution sample resized as `load_sample(folder, resolution)` would load it (the same crop and
    filter on the same pixels), without reading the images again."""
    target = _target_size(sample.cameras, resolution, sample.path)
    images, masks, cameras, depths = _crop_and_resize(sample.images, sample.masks, sample.cameras, target,
                                                      sample.depths)
    return replace(sample, images=images, masks=masks, cameras=cameras, depths=depths)


def _read_depth(path: Path, num_frames: int, cameras: Cameras) -> Tensor:
    """`DEPTH_FILE` -> [F, 1, H, W] float32, checked against the camera file's frames."""
    if not path.is_file():
        raise SampleError(f"{path}: depth file missing (depth maps were asked for; `mouserecon synth` writes them)")
    try:
        with np.load(path) as archive:
            depth = torch.from_numpy(np.asarray(archive["depth"], dtype=np.float32))
    except (OSError, ValueError, KeyError) as err:
        raise SampleError(f"{path}: cannot read the depth maps ({err})") from err
    expected = (num_frames, cameras.height, cameras.width)
    if tuple(depth.shape) != expected:
        raise SampleError(f"{path}: depth maps are {tuple(depth.shape)}, expected (frames, H, W) = {expected}")
    if not (torch.isfinite(depth).all() and (depth >= 0).all()):
        raise SampleError(f"{path}: depth maps must be finite and >= 0 (0 = no surface)")
    return depth[:, None]


def _check_image_files(camera_file: Path, folder: Path, file_paths: list[str]) -> list[Path]:
    paths = [folder / p for p in file_paths]
    if len(paths) < 2:
        raise SampleError(f"{camera_file}: one view only; a sample needs at least 2 views")
    seen: dict[Path, int] = {}
    for i, path in enumerate(paths):
        key = path.resolve()
        if key in seen:
            raise SampleError(f"{camera_file}: frames {seen[key]} and {i} use the same image file {path}")
        seen[key] = i
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SampleError(f"{missing[0]}: image file missing (listed in {camera_file}; {len(missing)} missing)")
    return paths


def _check_views(camera_file: Path, num_frames: int, views: Sequence[int] | None) -> list[int]:
    if views is None:
        return list(range(num_frames))
    try:
        views = [operator.index(v) for v in views]  # integers only: no silent truncation of 1.5
    except TypeError:
        raise SampleError(f"{camera_file}: views={list(views)!r} must be integer indices") from None
    if len(views) < 2:
        raise SampleError(f"{camera_file}: views={views} selects one view only; a sample needs at least 2 views")
    if len(set(views)) != len(views) or not all(0 <= v < num_frames for v in views):
        raise SampleError(f"{camera_file}: views={views} must be distinct indices in [0, {num_frames})")
    return views


def _target_size(cameras: Cameras, resolution, camera_file: Path) -> tuple[int, int]:
    """(H, W) to resize to."""
    if resolution is None:
        return cameras.height, cameras.width
    size = (resolution, resolution) if isinstance(resolution, int) else resolution
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size)):
        raise SampleError(f"{camera_file}: resolution must be a positive int or (H, W), got {resolution!r}")
    return tuple(size)


def _crop_and_resize(images: Tensor, masks: Tensor, cameras: Cameras, target: tuple[int, int],
                     depths: Tensor | None = None):
    """Centre-crop to the target aspect, then antialiased bilinear resize; cameras follow."""
    height, width = target
    h, w = images.shape[-2:]
    if w * height != h * width:  # aspect differs: crop the largest centred window with the target aspect
        crop_w, crop_h = (round(h * width / height), h) if w * height > h * width else (w, round(w * height / width))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        images, masks = images[..., top:top + crop_h, left:left + crop_w], masks[..., top:top + crop_h, left:left + crop_w]
        depths = None if depths is None else depths[..., top:top + crop_h, left:left + crop_w]
        cameras = cameras.crop(left, top, crop_w, crop_h)
    if images.shape[-2:] != (height, width):
        images, masks, depths = _resample(images, masks, depths, (height, width))
        cameras = cameras.resize(height, width)
    return images, masks, cameras, depths


def _resample(images: Tensor, masks: Tensor, depths: Tensor | None, size: tuple[int, int]):
    """Antialiased bilinear resize of [V, 3|1|1, h, w] colour, mask and depth (or None) to `size`.

    Depth is a masked mean: the filter runs on (depth * valid, valid) and a pixel keeps depth / valid
    only where every source pixel under its filter had a depth (valid > 0.999), else 0.
    """
    channels = [images, masks] if depths is None else [images, masks, depths * (depths > 0), (depths > 0).float()]
    out = F.interpolate(torch.cat(channels, -3), size=size, mode="bilinear", antialias=True, align_corners=False)
    colour = out[..., :4, :, :].clamp(0.0, 1.0)  # rounding only: the filter weights are non-negative, sum to one
    if depths is not None:
        total, valid = out[..., 4:5, :, :], out[..., 5:6, :, :]
        depths = torch.where(valid > 0.999, total / valid.clamp_min(1e-6), torch.zeros_like(total))
    return colour[..., :3, :, :].contiguous(), colour[..., 3:, :, :].contiguous(), depths


def foreground_center(cameras: Cameras, masks: Tensor, source: str | Path = "<sample>") -> Tensor:
    """The mouse's 3D centre [3] (float64, the cameras' frame): the least-squares point nearest the rays
    through each view's mask centroid (mask-weighted), over the views whose mask (> 0.5) is not empty.

    cameras [V], masks [V, 1, H, W]. This is the point the model's rig is centred on and the input crops
    look at: a rig's optical axes meet where its cameras are aimed (e.g. the arena's centre), not where the
    mouse is. Raises SampleError naming `source` when fewer than 2 views see the foreground or their rays
    are (nearly) parallel.
    """
    v, _, h, w = masks.shape
    assert cameras.batch_shape == (v,) and (cameras.height, cameras.width) == (h, w), \
        f"cameras {tuple(cameras.batch_shape)} {cameras.height}x{cameras.width} for masks {tuple(masks.shape)}"
    weights = masks[:, 0].double() * (masks[:, 0] > 0.5)  # [V, H, W]
    seen = weights.sum((1, 2)) > 0  # [V]
    if int(seen.sum()) < 2:
        raise SampleError(f"{source}: {int(seen.sum())} of {v} views show the foreground; at least 2 are needed to "
                          "place the mouse in 3D")
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    total = weights[seen].sum((1, 2))  # [S]
    u = (weights[seen] * xs).sum((1, 2)) / total  # [S] centroid, pixels
    y = (weights[seen] * ys[:, None]).sum((1, 2)) / total
    fx, fy, cx, cy = cameras.intrinsics[seen].double().unbind(-1)  # [S] each
    c2w = cameras.c2w[seen].double()  # [S, 4, 4]
    d_cam = torch.stack([(u - cx) / fx, (y - cy) / fy, torch.ones_like(u)], -1)  # [S, 3]
    try:
        return nearest_point_to_lines(c2w[:, :3, 3], (c2w[:, :3, :3] @ d_cam[..., None])[..., 0])
    except CameraError as err:
        raise SampleError(f"{source}: cannot place the mouse in 3D from its masks ({err})") from None


def crop_to_foreground(sample: Sample, resolution: int, margin: float, center: Tensor, up: Tensor,
                       jitter: float = 0.0) -> Sample:
    """Aim every view at the mouse: a perspective crop of `resolution` px around its foreground.

    Each view becomes a pinhole camera at the same centre looking at `center` ([3], the sample's frame:
    `foreground_center`), level with the world `up` ([3], e.g. `CameraFile.up()`), with a square image whose
    focal length makes the view's mask (> 0.5) fit with `margin` of its half-extent on each side and whose
    principal point is the image centre. So the crops' optical axes meet at the mouse, as in a rig aimed at
    it, wherever the mouse is in the frame (a window of the frame keeps the rig's axes, which meet where the
    rig is aimed), and no crop is rolled. A view within 6 deg of looking along `up` has no level turn: it is
    turned by the smallest rotation. Colour and mask are resampled from the full-resolution images: each
    crop pixel averages k x k bilinear samples of its footprint (k = the shrink factor, rounded up; white and
    mask 0 outside), depth likewise over pixels that all have depth, converted to the new camera's z.
    jitter > 0 (training augmentation) shrinks the focal length by a random factor in [1, 1 + jitter] and
    moves the principal point by up to jitter / 4 of the side (torch's global RNG). Raises SampleError
    naming the image when a view's mask is empty.
    """
    if margin < 0 or jitter < 0:
        raise ValueError(f"margin and jitter must be >= 0, got {margin}, {jitter}")
    assert center.shape == (3,), f"center must be [3], got {tuple(center.shape)}"
    views = [_aimed_crop(sample, v, resolution, margin, center.double(), torch.as_tensor(up, dtype=torch.float64),
                         jitter) for v in range(sample.num_views)]
    images, masks, depths, c2w, intrinsics = (list(part) for part in zip(*views))
    cameras = Cameras(torch.stack(c2w).to(sample.cameras.c2w.dtype),
                      torch.stack(intrinsics).to(sample.cameras.intrinsics.dtype), width=resolution, height=resolution)
    return replace(sample, images=torch.stack(images), masks=torch.stack(masks), cameras=cameras,
                   depths=None if sample.depths is None else torch.stack(depths))


MAX_SUPERSAMPLING = 8  # samples per crop pixel side; a crop shrinking its source more than this is still fine


def _aimed_crop(sample: Sample, v: int, side: int, margin: float, center: Tensor, up: Tensor, jitter: float):
    """View v of `crop_to_foreground` -> (image [3, s, s], mask [1, s, s], depth [1, s, s] or None, c2w [4, 4],
    intrinsics [4]), float64 cameras."""
    rows, cols = torch.nonzero(sample.masks[v, 0] > 0.5, as_tuple=True)
    if rows.numel() == 0:
        raise SampleError(f"{sample.image_paths[v]}: empty foreground mask; cannot crop to the mouse")
    camera = sample.cameras[v]
    c2w = camera.c2w.double()
    forward = F.normalize(center - c2w[:3, 3], dim=0)
    if torch.linalg.cross(forward, F.normalize(up, dim=0)).norm() > math.sin(math.radians(6.0)):
        rotation = look_at(c2w[:3, 3], center, up)[:3, :3]  # the new camera-to-world rotation, level
    else:
        rotation = rotation_between(c2w[:3, 2], forward) @ c2w[:3, :3]
    to_new = c2w[:3, :3].T @ rotation  # source-camera coordinates of the new camera's axes
    fx, fy, cx, cy = camera.intrinsics.double().tolist()
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # of each pixel
    x = (cols.double()[:, None] + corners[:, 0]).reshape(-1)  # [4P] the foreground pixels' corners
    y = (rows.double()[:, None] + corners[:, 1]).reshape(-1)
    rays = torch.stack([(x - cx) / fx, (y - cy) / fy, torch.ones_like(x)], -1) @ to_new  # [4P, 3] new camera
    extent = (rays[:, :2] / rays[:, 2:]).abs().max()  # the mask's half-extent in the aimed view, focal lengths
    grow, shift = 1.0, torch.zeros(2, dtype=torch.float64)
    if jitter > 0:
        grow = 1.0 + jitter * float(torch.rand(()))
        shift = (torch.rand(2).double() * 2.0 - 1.0) * (jitter / 4.0)
    focal = float(0.5 * side / (extent * (1.0 + 2.0 * margin) * grow))
    principal = 0.5 * side + shift * side  # [2]
    k = min(MAX_SUPERSAMPLING, max(1, math.ceil(min(fx, fy) / focal - 1e-6)))
    px = (torch.arange(side * k, dtype=torch.float64) + 0.5) / k  # sub-pixel sample positions, crop pixels
    q = torch.stack(torch.broadcast_tensors((px[None, :] - principal[0]) / focal, (px[:, None] - principal[1]) / focal,
                                            torch.ones(side * k, side * k, dtype=torch.float64)), -1)  # [sk, sk, 3]
    r = q @ to_new.T  # [sk, sk, 3] each sample's ray in the source camera
    grid = torch.stack([(fx * r[..., 0] / r[..., 2] + cx) / camera.width,
                        (fy * r[..., 1] / r[..., 2] + cy) / camera.height], -1) * 2.0 - 1.0  # align_corners=False
    grid = torch.where(r[..., 2:] > 0, grid, torch.full_like(grid, 2.0))  # behind the source camera: outside
    depth = None if sample.depths is None else sample.depths[v:v + 1]
    channels = [sample.images[v:v + 1] - 1.0, sample.masks[v:v + 1]]
    if depth is not None:  # camera z of the source -> the new camera's z (the point t r has new z t)
        channels += [depth * (depth > 0), (depth > 0).to(depth.dtype)]
    out = F.grid_sample(torch.cat(channels, 1), grid[None].float(), mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # [1, C, sk, sk]
    if depth is not None:  # per sample: t = z / r_z, then averaged like the colours
        out[:, 4:5] = out[:, 4:5] / r[..., 2][None, None].float()
    out = F.avg_pool2d(out, k)[0] if k > 1 else out[0]  # [C, s, s]
    colour, alpha = (out[:3] + 1.0).clamp(0.0, 1.0), out[3:4].clamp(0.0, 1.0)
    if depth is not None:
        total, valid = out[4:5], out[5:6]
        depth = torch.where(valid > 0.999, total / valid.clamp_min(1e-6), torch.zeros_like(total))
    new_c2w = torch.eye(4, dtype=torch.float64)
    new_c2w[:3, :3], new_c2w[:3, 3] = rotation, c2w[:3, 3]
    intrinsics = torch.tensor([focal, focal, float(principal[0]), float(principal[1])], dtype=torch.float64)
    return colour, alpha, depth, new_c2w, intrinsics


# ---- one image -------------------------------------------------------------------------------


def _read_image(path: Path, rgb_out: Tensor, alpha_out: Tensor) -> bool:
    """Decode one image exactly into rgb_out [3, H, W] (on white) and alpha_out [1, H, W].

    Returns whether the image has alpha; alpha_out is left untouched when it has none.
    """
    height, width = rgb_out.shape[-2:]
    data = path.read_bytes()
    if data.startswith(_PNG_SIGNATURE):
        _check_png_header(path, data, width, height)
    elif not data.startswith(_JPEG_SIGNATURE):
        raise SampleError(f"{path}: unsupported image format (not PNG or JPEG)")
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (pinned <0.30)
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            raw = torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                              mode=torchvision.io.ImageReadMode.UNCHANGED)  # [C, H, W]
    except RuntimeError as err:
        raise SampleError(f"{path}: corrupt or unreadable image ({str(err).splitlines()[0]})") from None
    channels, h, w = raw.shape
    if (w, h) != (width, height):
        raise SampleError(f"{path}: image is {w}x{h} but the camera file declares {width}x{height}")
    if data.startswith(_JPEG_SIGNATURE) and channels not in (1, 3):
        raise SampleError(f"{path}: unsupported JPEG mode ({channels} channels, e.g. CMYK); use RGB or grey")
    values = raw.to(torch.float32).div_(65535.0 if raw.dtype == torch.uint16 else 255.0)  # exact: [C, H, W]
    colour = values[:3] if channels >= 3 else values[:1].expand(3, h, w)
    if channels in (1, 3):
        rgb_out.copy_(colour)
        return False
    alpha = values[-1:]  # straight alpha: composite on white, rgb = alpha * fg + (1 - alpha) (C5)
    torch.mul(alpha, colour, out=rgb_out).add_(1.0 - alpha)
    alpha_out.copy_(alpha)
    return True


def _check_png_header(path: Path, data: bytes, width: int, height: int) -> None:
    """Validate the PNG IHDR (size, bit depth, colour type) before decoding."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise SampleError(f"{path}: corrupt PNG (no IHDR header)")
    w, h, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    if colour_type not in _PNG_COLOUR_TYPES:
        kind = "palette" if colour_type == 3 else f"colour type {colour_type}"
        raise SampleError(f"{path}: unsupported PNG mode ({kind}); use RGB, RGBA, grey or grey+alpha")
    if depth not in (8, 16) and not (colour_type == 0 and depth in (1, 2, 4)):
        raise SampleError(f"{path}: unsupported PNG bit depth {depth} for {_PNG_COLOUR_TYPES[colour_type][0]}")
    if (w, h) != (width, height):
        raise SampleError(f"{path}: image is {w}x{h} but the camera file declares {width}x{height}")
    pos = 8
    while pos + 8 <= len(data):  # ancillary chunks before the image data
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            break
        if kind == b"tRNS":  # a transparency key the decoder would drop: refuse rather than lose it
            raise SampleError(f"{path}: unsupported PNG mode (transparency key, tRNS); save with an alpha channel")
        pos += 12 + length


# ---- datasets --------------------------------------------------------------------------------


def find_samples(source: str | Path) -> list[Path]:
    """Sample folders of a dataset, in a stable order.

    source: a sample folder (a one-sample dataset); a folder whose subfolders are samples (sorted
    by name; hidden folders skipped; every other subfolder must be a sample); or a text file with
    one sample folder per line (relative to the list file's folder; blank lines and lines starting
    with '#' ignored; order kept). Checks only that each folder has a camera file.
    """
    source = Path(source)
    if source.is_file():
        samples = []
        for number, line in enumerate(source.read_text().splitlines(), start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            folder = source.parent / entry
            if find_camera_file(folder) is None:
                defect = "missing folder" if not folder.is_dir() else f"no {' or '.join(CAMERA_FILES)}"
                raise SampleError(f"{source}: line {number}: {folder}: {defect}")
            samples.append(folder)
    elif source.is_dir():
        if find_camera_file(source) is not None:
            return [source]
        subfolders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        not_samples = [p.name for p in subfolders if find_camera_file(p) is None]
        if not_samples:
            raise SampleError(f"{source}: subfolders without {' or '.join(CAMERA_FILES)}: {not_samples}")
        samples = subfolders
    else:
        raise SampleError(f"{source}: dataset not found (expected a folder of samples or a list file)")
    if not samples:
        raise SampleError(f"{source}: no samples")
    return samples


class MouseDataset(Dataset):
    """A torch Dataset of Samples (see `find_samples` for `source`).

    `__getitem__` returns a Sample; use `collate` as the DataLoader's `collate_fn` to get a
    SampleBatch. Resolution and views are fixed at construction. A bad sample raises SampleError
    with its path when it is loaded; it is never replaced by another. With `crop` (a margin) a
    sample of V views has 2V: each view cropped around its foreground (`crop_to_foreground`, from the
    full-resolution image), then the V whole frames resized, so that a loss can see the space
    around the mouse too. With `depth` every sample also carries its depth maps (`DEPTH_FILE`).
    """

    def __init__(self, source: str | Path, resolution: int | tuple[int, int] | None = None,
                 views: Sequence[int] | None = None, white_threshold: float = WHITE_THRESHOLD,
                 normalize: bool = False, fit_views: Sequence[int] | None = None, crop: float | None = None,
                 crop_jitter: float = 0.0, depth: bool = False) -> None:
        self.source = Path(source)
        self.depth = depth
        self.crop = crop  # margin: crop each view around its foreground (crop_to_foreground); None = whole frame
        self.crop_jitter = crop_jitter
        if crop is not None and not isinstance(resolution, int):
            raise SampleError(f"{source}: cropping to the foreground needs a square resolution, got {resolution!r}")
        self.normalize = normalize  # map each sample's cameras to the model rig (normalize_sample)
        self.fit_views = fit_views  # ... with the similarity fitted to these views (default all)
        self.sample_dirs = find_samples(self.source)
        self.resolution = resolution
        self.views = None if views is None else tuple(views)
        self.white_threshold = white_threshold

    def __len__(self) -> int:
        return len(self.sample_dirs)

    def __getitem__(self, index: int) -> Sample:
        return self.load(index, augment=True)

    def load(self, index: int, augment: bool) -> Sample:
        """Sample `index`; augment=False leaves out the random crop jitter (validation)."""
        camera_file = read_camera_file(self.sample_dirs[index])  # parsed once: images, up axis
        if self.crop is None:
            sample = load_sample(camera_file, self.resolution, self.views, self.white_threshold, self.depth)
            center = self._center(sample) if self.normalize else None
        else:  # 2V views: the V crops, then the V whole frames
            full = load_sample(camera_file, None, self.views, self.white_threshold, self.depth)
            center = self._center(full)
            crops = crop_to_foreground(full, self.resolution, self.crop, center, camera_file.up(),
                                       jitter=self.crop_jitter if augment else 0.0)
            sample = Sample.cat([crops, resize_sample(full, self.resolution)])
        return normalize_sample(sample, self.fit_views, center, camera_file.up())[0] if self.normalize else sample

    def _center(self, sample: Sample) -> Tensor:
        """The mouse's centre from the fit views' masks (`foreground_center`), as `pipeline.prepare` finds it
        from the input views; a single fit view cannot place it, so then all views."""
        fit = sample if self.fit_views is None or len(self.fit_views) < 2 else sample.select(self.fit_views)
        return foreground_center(fit.cameras, fit.masks, sample.path)


def collate(samples: Sequence[Sample]) -> SampleBatch:
    """Stack samples with equal view count and size -> SampleBatch ([B, V, ...], cameras [B, V])."""
    shapes = {(s.images.shape, s.cameras.width, s.cameras.height) for s in samples}
    if len(shapes) != 1:
        listing = ", ".join(f"{s.path} {tuple(s.images.shape)}" for s in samples)
        raise SampleError(f"cannot batch samples of different view counts or sizes: {listing}")
    with_depth = [s.depths is not None for s in samples]
    if any(with_depth) and not all(with_depth):
        raise SampleError(f"cannot batch samples with and without depth maps: {samples[with_depth.index(False)].path} "
                          f"has none, {samples[with_depth.index(True)].path} has")
    return SampleBatch(
        images=torch.stack([s.images for s in samples]),  # [B, V, 3, H, W]
        masks=torch.stack([s.masks for s in samples]),  # [B, V, 1, H, W]
        cameras=Cameras.stack([s.cameras for s in samples]),  # [B, V]
        sample_ids=tuple(s.sample_id for s in samples),
        paths=tuple(s.path for s in samples),
        mask_sources=tuple(s.mask_source for s in samples),
        depths=torch.stack([s.depths for s in samples]) if all(with_depth) else None,  # [B, V, 1, H, W]
    )
