"""Samples and datasets (mouserecon/data.py) against independent references.

References: the arrays the fixtures write (PNG is lossless), a minimal PNG decoder written here
from the PNG specification (zlib + scanline unfiltering), Pillow (8-bit PNG/JPEG decoding and its
antialiased bilinear resize), closed-form intrinsics, and geometric projection.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from mouserecon.cameras import Cameras, save_opencv_cameras
from mouserecon.data import MouseDataset, Sample, SampleError, collate, find_samples, load_sample, normalize_sample

# ---- independent PNG codec (from the PNG specification) ------------------------------------------

_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type


def write_png(path: Path, array: np.ndarray) -> None:
    """Write [H, W, C] uint8/uint16 as a PNG (filter 0 on every row)."""
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    rows = array.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPE[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def decode_png(path: Path) -> np.ndarray:
    """Decode a non-interlaced 8/16-bit grey/GA/RGB/RGBA PNG -> [H, W, C] uint8/uint16."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    assert interlace == 0 and depth in (8, 16)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    bpp = channels * depth // 8
    stride = width * bpp
    raw = zlib.decompress(idat)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1)
        if kind == 0:  # None
            cur = row.copy()
        elif kind == 1:  # Sub: running sum per byte lane, mod 256
            cur = np.cumsum(row.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = row + prev
        else:  # Average (3) or Paeth (4), byte by byte
            rec, up, filt = bytearray(stride), prev.tolist(), row.tolist()
            for x in range(stride):
                a = rec[x - bpp] if x >= bpp else 0
                b = up[x]
                if kind == 3:
                    rec[x] = (filt[x] + (a + b) // 2) & 255
                    continue
                c = up[x - bpp] if x >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                rec[x] = (filt[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(rec), np.uint8)
        out[y], prev = cur, cur
    values = out.view(">u2") if depth == 16 else out
    return values.reshape(height, width, channels).astype(np.uint16 if depth == 16 else np.uint8)


def composite(values: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 4] integers -> (rgb [3, H, W] on white, alpha [1, H, W]) in float32 (C5)."""
    v = values.astype(np.float32) / np.float32(scale)
    fg, alpha = v[..., :3], v[..., 3:]
    return (alpha * fg + (1 - alpha)).transpose(2, 0, 1), alpha.transpose(2, 0, 1)


# ---- fixtures: tiny samples on a ring of cameras ---------------------------------------------------


def ring_cameras(n: int, width: int, height: int, radius: float = 2.7, elevation_deg: float = 20.0) -> Cameras:
    """n OpenCV cameras on a ring around +Z, all looking at the origin."""
    c2ws = []
    for i in range(n):
        az, el = 2 * math.pi * i / n + 0.3, math.radians(elevation_deg)
        centre = radius * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        forward = -centre / centre.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        c2w = torch.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, centre
        c2ws.append(c2w)
    intrinsics = torch.tensor([1.1 * width, 1.1 * width, width / 2, height / 2]).expand(n, 4)
    return Cameras(torch.stack(c2ws), intrinsics.clone(), width, height)


def make_sample(folder: Path, images: list[np.ndarray], ext: str = ".png", cameras: Cameras | None = None) -> Path:
    """Write images ([H, W, C] uint8 via imageio, uint16 via write_png) and opencv_cameras.json."""
    (folder / "images").mkdir(parents=True)
    height, width = images[0].shape[:2]
    cameras = cameras if cameras is not None else ring_cameras(len(images), width, height)
    names = [f"images/cam_{i:03d}{ext}" for i in range(len(images))]
    for name, image in zip(names, images):
        if image.dtype == np.uint16:
            write_png(folder / name, image)
        else:
            iio.imwrite(folder / name, image[..., 0] if image.shape[-1] == 1 else image, **(
                {"quality": 90} if ext == ".jpg" else {}))
    save_opencv_cameras(folder / "opencv_cameras.json", cameras, names)
    return folder


def random_images(n: int, channels: int, dtype=np.uint8, size=(12, 16), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    return [rng.integers(0, top + 1, (*size, channels), dtype=np.int64).astype(dtype) for _ in range(n)]


# ---- the FaceLift sample: 16-bit RGBA, exact ------------------------------------------------------


def test_facelift_sample_loads_exactly(shared_dir):
    folder = shared_dir / "data" / "facelift_human_sample_000"
    sample = load_sample(folder)
    assert sample.images.shape == (32, 3, 512, 512) and sample.masks.shape == (32, 1, 512, 512)
    assert sample.images.dtype == torch.float32 and sample.mask_source == "alpha"
    assert [p.name for p in sample.image_paths] == [f"cam_{i:03d}.png" for i in range(32)]  # JSON order
    for view in (0, 9, 24):  # independent decode of the raw uint16 and the composite in numpy
        raw = decode_png(sample.image_paths[view])
        assert raw.dtype == np.uint16 and raw.shape == (512, 512, 4)
        rgb, alpha = composite(raw, 65535.0)
        np.testing.assert_array_equal(sample.masks[view].numpy(), alpha)
        np.testing.assert_array_equal(sample.images[view].numpy(), rgb)  # same float32 operations: bit-exact
    # All 32 views: Pillow reads these files as 8-bit (the high byte of each 16-bit value).
    alpha16 = torch.round(sample.masks[:, 0] * 65535).to(torch.int64).numpy()
    for view, path in enumerate(sample.image_paths):
        with PIL.Image.open(path) as image:
            pillow = np.asarray(image)
        np.testing.assert_array_equal(alpha16[view] >> 8, pillow[..., 3])
        rgb8, _ = composite(pillow, 255.0)
        assert np.abs(sample.images[view].numpy() - rgb8).max() < 2 / 255


# ---- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,dtype", [(4, np.uint8), (4, np.uint16), (2, np.uint8), (2, np.uint16)])
def test_alpha_formats_exact(tmp_path, channels, dtype):
    images = random_images(3, channels, dtype)
    sample = load_sample(make_sample(tmp_path / "s", images))
    scale = float(np.iinfo(dtype).max)
    assert sample.mask_source == "alpha"
    for view, image in enumerate(images):
        rgba = image if channels == 4 else image[..., [0, 0, 0, 1]]  # grey+alpha -> grey replicated
        rgb, alpha = composite(rgba, scale)
        np.testing.assert_array_equal(sample.masks[view].numpy(), alpha)
        np.testing.assert_array_equal(sample.images[view].numpy(), rgb)


@pytest.mark.parametrize("channels,dtype", [(3, np.uint8), (3, np.uint16), (1, np.uint8), (1, np.uint16)])
def test_opaque_formats_exact_with_threshold_mask(tmp_path, channels, dtype):
    images = random_images(3, channels, dtype)
    scale = float(np.iinfo(dtype).max)
    for image in images:  # a white background region so the threshold has something to find
        image[:4] = np.iinfo(dtype).max
    sample = load_sample(make_sample(tmp_path / "s", images), white_threshold=0.9)
    assert sample.mask_source == "threshold:0.9"
    for view, image in enumerate(images):
        expected = np.broadcast_to(image.astype(np.float32) / np.float32(scale), (*image.shape[:2], 3))
        np.testing.assert_array_equal(sample.images[view].numpy(), expected.transpose(2, 0, 1))
        background = (expected >= 0.9).all(-1)
        np.testing.assert_array_equal(sample.masks[view, 0].numpy(), (~background).astype(np.float32))
        assert sample.masks[view, 0, :4].sum() == 0


def test_one_bit_grey_png(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(2, 3))
    bits = random_images(2, 1, seed=3)
    for view, image in enumerate(bits):
        PIL.Image.fromarray(image[..., 0] > 127).save(folder / "images" / f"cam_{view:03d}.png")
    sample = load_sample(folder)
    for view, image in enumerate(bits):
        expected = np.broadcast_to((image[..., 0] > 127).astype(np.float32), (3, *image.shape[:2]))
        np.testing.assert_array_equal(sample.images[view].numpy(), expected)


def test_jpeg_matches_pillow(tmp_path):
    images = random_images(2, 3, size=(16, 24))
    sample = load_sample(make_sample(tmp_path / "s", images, ext=".jpg"))
    assert sample.mask_source == "threshold:0.97"
    for view, path in enumerate(sample.image_paths):
        with PIL.Image.open(path) as image:
            reference = np.asarray(image).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        # Two libjpeg builds may round the inverse DCT differently by one level.
        assert np.abs(sample.images[view].numpy() - reference).max() <= 1 / 255 + 1e-7


def test_convention_white_composite(tmp_path):
    """C5: rgb = alpha * fg + (1 - alpha), straight alpha, background white."""
    pixel = np.array([[[255, 0, 0, 255], [255, 0, 0, 51], [0, 0, 0, 0], [0, 255, 0, 102]]], np.uint8)
    images = [np.repeat(pixel, 2, axis=0)] * 2  # [2, 4, 4]
    sample = load_sample(make_sample(tmp_path / "s", images))
    a = np.float32(51) / np.float32(255)
    b = np.float32(102) / np.float32(255)
    expected_rgb = np.array([[1, 0, 0], [1, 1 - a, 1 - a], [1, 1, 1], [1 - b, 1, 1 - b]], np.float32)
    np.testing.assert_allclose(sample.images[0, :, 0].numpy().T, expected_rgb, atol=1e-7)
    np.testing.assert_allclose(sample.masks[0, 0, 0].numpy(), [1, a, 0, b], atol=1e-7)


# ---- resize and crop -----------------------------------------------------------------------------


def pillow_resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, h, w] float32 -> [C, H, W] with Pillow's antialiased bilinear filter, one channel at a time."""
    return np.stack([np.asarray(PIL.Image.fromarray(c, mode="F").resize((width, height), PIL.Image.BILINEAR))
                     for c in array])


def test_resize_intrinsics_closed_form_and_pixels(tmp_path):
    images = random_images(3, 4, size=(24, 32))
    folder = make_sample(tmp_path / "s", images)
    frames = json.loads((folder / "opencv_cameras.json").read_text())["frames"]
    sample = load_sample(folder, resolution=(9, 12))  # same 3:4 aspect, no crop
    assert sample.images.shape == (3, 3, 9, 12) and (sample.cameras.height, sample.cameras.width) == (9, 12)
    for view, frame in enumerate(frames):
        expected = [frame["fx"] * 12 / 32, frame["fy"] * 9 / 24, frame["cx"] * 12 / 32, frame["cy"] * 9 / 24]
        torch.testing.assert_close(sample.cameras.intrinsics[view], torch.tensor(expected), rtol=1e-6, atol=1e-5)
        rgb, alpha = composite(images[view], 255.0)
        np.testing.assert_allclose(sample.images[view].numpy(), pillow_resize(rgb, 9, 12), atol=2e-5)
        np.testing.assert_allclose(sample.masks[view].numpy(), pillow_resize(alpha, 9, 12), atol=2e-5)


def test_crop_to_aspect_then_resize(tmp_path):
    images = random_images(2, 3, size=(20, 32))
    folder = make_sample(tmp_path / "s", images)
    frames = json.loads((folder / "opencv_cameras.json").read_text())["frames"]
    sample = load_sample(folder, resolution=10)  # square from 32x20: centred 20x20 window at left = 6
    for view, frame in enumerate(frames):
        expected = [frame["fx"] / 2, frame["fy"] / 2, (frame["cx"] - 6) / 2, frame["cy"] / 2]
        torch.testing.assert_close(sample.cameras.intrinsics[view], torch.tensor(expected), rtol=1e-6, atol=1e-5)
        crop = images[view][:, 6:26].astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        np.testing.assert_allclose(sample.images[view].numpy(), pillow_resize(crop, 10, 10), atol=2e-5)


def blob_images(cameras: Cameras, point: torch.Tensor, sigma_px: float) -> list[np.ndarray]:
    """16-bit RGBA images whose alpha is a Gaussian blob centred on the projection of `point` [3].

    A Gaussian sampled at pixel centres (C3) has its sampled centroid at its centre to ~1e-12 px.
    """
    uv, _ = cameras.project(point.expand(len(cameras), 1, 3))  # [V, 1, 2]
    xs = np.arange(cameras.width) + 0.5
    ys = np.arange(cameras.height) + 0.5
    images = []
    for u, v in uv[:, 0].tolist():
        alpha = np.exp(-((xs[None, :] - u) ** 2 + (ys[:, None] - v) ** 2) / (2 * sigma_px**2))
        image = np.zeros((cameras.height, cameras.width, 4), np.uint16)
        image[..., 3] = np.round(alpha * 65535)
        images.append(image)
    return images


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of pixel centres [2] (u, v) of a [H, W] mask."""
    h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([(mask * xs).sum(), (mask * ys).sum()]) / mask.sum()


@pytest.mark.parametrize("resolution", [None, (32, 32), (40, 60), (150, 225)])
def test_projection_consistent_after_resize(tmp_path, resolution):
    """A 3D point's projection with the resized cameras lands on its (resampled) image."""
    cameras = ring_cameras(3, 120, 80)
    point = torch.tensor([0.15, -0.1, 0.2])
    folder = make_sample(tmp_path / "s", blob_images(cameras, point, sigma_px=4.0), cameras=cameras)
    sample = load_sample(folder, resolution=resolution)
    uv, _ = sample.cameras.project(point.expand(3, 1, 3))
    for view in range(3):
        err = (centroid(sample.masks[view, 0]) - uv[view, 0]).abs().max().item()
        assert err < 0.005, f"view {view}: centroid off the projection by {err:.4f} px"


def test_lego_loads_at_256(shared_dir):
    folder = shared_dir / "data" / "nerf_synthetic_lego_8views" / "res512"
    sample = load_sample(folder, resolution=256)
    assert sample.images.shape == (8, 3, 256, 256) and sample.mask_source == "alpha"
    frames = json.loads((folder / "opencv_cameras.json").read_text())["frames"]
    for view, frame in enumerate(frames):
        expected = torch.tensor([frame[k] / 2 for k in ("fx", "fy", "cx", "cy")])
        torch.testing.assert_close(sample.cameras.intrinsics[view], expected)
    uv, _ = sample.cameras.project(torch.zeros(8, 1, 3))
    torch.testing.assert_close(uv[:, 0], torch.full((8, 2), 128.0), atol=1e-3, rtol=0)
    for view in (0, 5):  # Pillow decode + numpy composite + Pillow antialiased bilinear resize
        with PIL.Image.open(sample.image_paths[view]) as image:
            rgb, alpha = composite(np.asarray(image), 255.0)
        np.testing.assert_allclose(sample.images[view].numpy(), pillow_resize(rgb, 256, 256), atol=2e-5)
        np.testing.assert_allclose(sample.masks[view].numpy(), pillow_resize(alpha, 256, 256), atol=2e-5)


def test_views_subset_keeps_given_order(tmp_path):
    images = random_images(4, 4)
    full = load_sample(make_sample(tmp_path / "s", images))
    sub = load_sample(tmp_path / "s", views=[3, 0, 2])
    assert [p.name for p in sub.image_paths] == ["cam_003.png", "cam_000.png", "cam_002.png"]
    torch.testing.assert_close(sub.images, full.images[[3, 0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(sub.cameras.c2w, full.cameras.c2w[[3, 0, 2]], rtol=0, atol=0)


def test_nerfstudio_transforms_sample(tmp_path):
    images = random_images(3, 4)
    opencv = load_sample(make_sample(tmp_path / "a", images))
    ns = tmp_path / "b"
    ns.mkdir()
    (ns / "images").symlink_to(tmp_path / "a" / "images")
    cams = opencv.cameras
    frames = [{"file_path": f"images/cam_{i:03d}.png",  # OpenGL c2w: camera y and z axes flipped
               "transform_matrix": (cams.c2w[i].double() @ torch.diag(torch.tensor([1.0, -1, -1, 1],
                                                                                   dtype=torch.float64))).tolist()}
              for i in range(3)]
    fx, fy, cx, cy = cams.intrinsics[0].tolist()
    (ns / "transforms.json").write_text(json.dumps(
        {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": cams.width, "h": cams.height, "frames": frames}))
    sample = load_sample(ns)
    torch.testing.assert_close(sample.cameras.c2w, cams.c2w, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample.images, opencv.images, rtol=0, atol=0)


# ---- malformed samples ---------------------------------------------------------------------------


def _raises(match: str, call, *names):
    with pytest.raises(SampleError, match=match) as info:
        call()
    for name in names:
        assert str(name) in str(info.value), f"{name} not in: {info.value}"
    return info.value


def test_missing_image(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(3, 4))
    (folder / "images" / "cam_001.png").unlink()
    _raises("image file missing", lambda: load_sample(folder), folder / "images" / "cam_001.png")


def test_wrong_image_size(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(3, 4))
    iio.imwrite(folder / "images" / "cam_002.png", random_images(1, 4, size=(12, 15))[0])
    _raises("is 15x12 but the camera file declares 16x12", lambda: load_sample(folder),
            folder / "images" / "cam_002.png")
    iio.imwrite(folder / "images" / "cam_002.jpg", random_images(1, 3, size=(13, 16))[0])
    frames = json.loads((folder / "opencv_cameras.json").read_text())
    frames["frames"][2]["file_path"] = "images/cam_002.jpg"
    (folder / "opencv_cameras.json").write_text(json.dumps(frames))
    _raises("is 16x13 but the camera file declares 16x12", lambda: load_sample(folder),
            folder / "images" / "cam_002.jpg")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_corrupt_png(tmp_path, keep):
    folder = make_sample(tmp_path / "s", random_images(3, 4, size=(32, 32)))
    path = folder / "images" / "cam_001.png"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _raises("corrupt or unreadable", lambda: load_sample(folder), path)


def test_unsupported_modes(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(2, 3))
    path = folder / "images" / "cam_000.png"
    buffer = io.BytesIO()
    PIL.Image.fromarray(random_images(1, 3)[0]).convert("P").save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    _raises("unsupported PNG mode \\(palette\\)", lambda: load_sample(folder), path)
    PIL.Image.fromarray(random_images(1, 3)[0]).save(path, "PNG", transparency=(0, 0, 0))
    _raises("unsupported PNG mode \\(transparency key", lambda: load_sample(folder), path)
    path.write_bytes(b"GIF89a" + bytes(64))
    _raises("unsupported image format", lambda: load_sample(folder), path)
    PIL.Image.fromarray(random_images(1, 3)[0]).convert("CMYK").save(path, "JPEG")
    _raises("unsupported JPEG mode", lambda: load_sample(folder), path)


def test_mixed_alpha_is_an_error(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(3, 4))
    iio.imwrite(folder / "images" / "cam_001.png", random_images(1, 3)[0])
    _raises("has no alpha channel", lambda: load_sample(folder), folder / "images" / "cam_001.png")


def test_one_view_only(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(2, 4))
    _raises("one view only", lambda: load_sample(folder, views=[1]), folder / "opencv_cameras.json")
    meta = json.loads((folder / "opencv_cameras.json").read_text())
    meta["frames"] = meta["frames"][:1]
    (folder / "opencv_cameras.json").write_text(json.dumps(meta))
    _raises("one view only", lambda: load_sample(folder), folder / "opencv_cameras.json")


def test_duplicate_file_names(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(3, 4))
    meta = json.loads((folder / "opencv_cameras.json").read_text())
    meta["frames"][2]["file_path"] = meta["frames"][0]["file_path"]
    (folder / "opencv_cameras.json").write_text(json.dumps(meta))
    _raises("same", lambda: load_sample(folder), folder / "opencv_cameras.json", "images/cam_000.png")
    meta["frames"][2]["file_path"] = "images/../images/cam_000.png"  # the same file, spelled differently
    (folder / "opencv_cameras.json").write_text(json.dumps(meta))
    _raises("same image file", lambda: load_sample(folder), folder / "opencv_cameras.json")


def test_bad_views_and_resolution(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(3, 4))
    _raises("distinct indices", lambda: load_sample(folder, views=[0, 0]), folder / "opencv_cameras.json")
    _raises("distinct indices", lambda: load_sample(folder, views=[0, 3]), folder / "opencv_cameras.json")
    _raises("integer indices", lambda: load_sample(folder, views=[0, 1.5]), folder / "opencv_cameras.json")
    _raises("resolution", lambda: load_sample(folder, resolution=(0, 4)), folder / "opencv_cameras.json")
    _raises("resolution", lambda: load_sample(folder, resolution=64.0), folder / "opencv_cameras.json")
    _raises("not a sample folder", lambda: load_sample(tmp_path), tmp_path)


def test_camera_defect_is_a_sample_error(tmp_path):
    folder = make_sample(tmp_path / "s", random_images(3, 4))
    (folder / "opencv_cameras.json").write_text('{"frames": [')
    _raises("JSON", lambda: load_sample(folder), folder / "opencv_cameras.json")


# ---- datasets ------------------------------------------------------------------------------------


def make_dataset(root: Path, names: list[str], size=(12, 16)) -> None:
    for seed, name in enumerate(names):
        make_sample(root / name, random_images(3, 4, size=size, seed=seed))


def test_dataset_over_folder_sorted_and_collated(tmp_path):
    make_dataset(tmp_path / "data", ["b", "c", "a"])
    dataset = MouseDataset(tmp_path / "data", resolution=(6, 8), views=[2, 0])
    assert [p.name for p in dataset.sample_dirs] == ["a", "b", "c"]
    first = dataset[0]
    assert isinstance(first, Sample) and first.sample_id == "a" and first.images.shape == (2, 3, 6, 8)
    torch.testing.assert_close(dataset[0].images, first.images, rtol=0, atol=0)  # deterministic
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert batch.images.shape == (3, 2, 3, 6, 8) and batch.masks.shape == (3, 2, 1, 6, 8)
    assert batch.cameras.c2w.shape == (3, 2, 4, 4) and batch.cameras.intrinsics.shape == (3, 2, 4)
    assert batch.sample_ids == ("a", "b", "c")
    torch.testing.assert_close(batch.images[1], dataset[1].images, rtol=0, atol=0)
    torch.testing.assert_close(batch.cameras.c2w[2], dataset[2].cameras.c2w, rtol=0, atol=0)


def test_dataset_over_list_file(tmp_path):
    make_dataset(tmp_path / "data", ["x", "y", "z"])
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("# training split\n../data/z\n\n   ../data/x  \n# ../data/y\n")
    dataset = MouseDataset(listing)
    assert [p.name for p in dataset.sample_dirs] == ["z", "x"]  # file order kept
    assert [dataset[i].sample_id for i in range(len(dataset))] == ["z", "x"]
    assert find_samples(tmp_path / "data" / "y") == [tmp_path / "data" / "y"]  # one sample folder


def test_list_file_pointing_at_missing_folder(tmp_path):
    make_dataset(tmp_path / "data", ["x"])
    listing = tmp_path / "train.txt"
    listing.write_text("data/x\ndata/gone\n")
    _raises("line 2: .*missing folder", lambda: MouseDataset(listing), listing, tmp_path / "data" / "gone")


def test_dataset_folder_defects(tmp_path):
    make_dataset(tmp_path / "data", ["a"])
    (tmp_path / "data" / "notes").mkdir()
    _raises("subfolders without", lambda: find_samples(tmp_path / "data"), tmp_path / "data", "notes")
    _raises("dataset not found", lambda: find_samples(tmp_path / "nothing"), tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    _raises("no samples", lambda: find_samples(tmp_path / "empty"), tmp_path / "empty")


def test_bad_sample_raises_with_its_path_never_substituted(tmp_path):
    make_dataset(tmp_path / "data", ["a", "b", "c"])
    (tmp_path / "data" / "b" / "images" / "cam_000.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    dataset = MouseDataset(tmp_path / "data")
    assert dataset[0].sample_id == "a" and dataset[2].sample_id == "c"
    _raises("corrupt", lambda: dataset[1], tmp_path / "data" / "b" / "images" / "cam_000.png")
    with pytest.raises(SampleError, match="corrupt"):
        list(DataLoader(dataset, batch_size=3, collate_fn=collate))


def test_collate_rejects_mismatched_samples(tmp_path):
    make_sample(tmp_path / "a", random_images(3, 4))
    make_sample(tmp_path / "b", random_images(2, 4))
    _raises("different view counts", lambda: collate([load_sample(tmp_path / "a"), load_sample(tmp_path / "b")]),
            tmp_path / "a", tmp_path / "b")


def test_normalize_sample_uses_recorded_world_up(tmp_path):
    # A ring in millimetres whose world is y-up, recorded as such in the camera file: after
    # normalisation the mean distance is 2.7, the ring centre is the origin and the recorded up is +Z.
    ring = ring_cameras(4, 16, 12, radius=300.0)
    to_y_up = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # z-up -> y-up world
    shifted = to_y_up @ ring.c2w
    shifted[:, :3, 3] += torch.tensor([10.0, -20.0, 5.0])
    cams = Cameras(shifted, ring.intrinsics, ring.width, ring.height)
    folder = make_sample(tmp_path / "s", random_images(4, 4, size=(12, 16)), cameras=cams)
    meta = json.loads((folder / "opencv_cameras.json").read_text())
    meta["world_up"] = [0.0, 1.0, 0.0]
    (folder / "opencv_cameras.json").write_text(json.dumps(meta))

    sample, similarity = normalize_sample(load_sample(folder))
    assert sample.cameras.centers.norm(dim=-1).mean().item() == pytest.approx(2.7, rel=1e-5)
    assert similarity.apply_points(torch.tensor([[10.0, -20.0, 5.0]], dtype=torch.float64)).abs().max() < 1e-4
    up_model = similarity.rotation @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(up_model, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6)
    # images are untouched, only cameras move
    assert torch.equal(sample.images, load_sample(folder).images)


def test_normalize_sample_with_one_fit_view_uses_the_whole_rig(tmp_path):
    # One camera has no axes intersection: the similarity is fitted to every camera of the sample
    # (the ring centre goes to the origin), while two fit views fit those two only.
    ring = ring_cameras(4, 16, 12, radius=300.0)
    shifted = ring.c2w.clone()
    shifted[:, :3, 3] += torch.tensor([10.0, -20.0, 5.0])
    folder = make_sample(tmp_path / "s", random_images(4, 4, size=(12, 16)),
                         cameras=Cameras(shifted, ring.intrinsics, ring.width, ring.height))
    sample = load_sample(folder)
    one, similarity = normalize_sample(sample, fit_views=[2])
    _, all_views = normalize_sample(sample)
    assert torch.equal(similarity.translation, all_views.translation) and similarity.scale == all_views.scale
    assert similarity.apply_points(torch.tensor([[10.0, -20.0, 5.0]], dtype=torch.float64)).abs().max() < 1e-4
    two, _ = normalize_sample(sample, fit_views=[0, 1])
    assert two.cameras[[0, 1]].centers.norm(dim=-1).mean().item() == pytest.approx(2.7, rel=1e-5)
