"""Cropping views to the mouse (`data.crop_to_foreground`; the model inputs built from it: test_pipeline).

References: plain slices of the source pixels (a window that needs no resampling), the closed-form
window of a drawn rectangle, and the synthetic mouse ray-traced afresh through the cropped
cameras (`synth.render_cameras`): a crop is only right if its cameras see what its pixels show.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mouserecon.cameras import Cameras
from mouserecon.data import Sample, SampleError, crop_to_foreground, load_sample
from mouserecon.metrics import foreground_iou, psnr
from mouserecon.synth.generate import generate_sample, render_cameras


def rectangle_sample(boxes: list[tuple[int, int, int, int]], height: int = 80, width: int = 100) -> Sample:
    """One view per (top, bottom, left, right) foreground box; colours encode the pixel position."""
    v = len(boxes)
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width) / height
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width) / width
    images = torch.stack([rows, cols, (rows + cols) / 2])[None].repeat(v, 1, 1, 1)  # [V, 3, H, W]
    masks = torch.zeros(v, 1, height, width)
    for k, (top, bottom, left, right) in enumerate(boxes):
        masks[k, 0, top:bottom, left:right] = 1.0
    cameras = Cameras(c2w=torch.eye(4).repeat(v, 1, 1), intrinsics=torch.tensor([[90.0, 95.0, 48.0, 41.0]] * v),
                      width=width, height=height)
    return Sample(images, masks, cameras, tuple(Path(f"cam_{k}.png") for k in range(v)), "rect", Path("rect"), "alpha")


def test_window_is_a_slice_of_the_source_when_no_resampling_is_needed():
    # Box rows 20..39, cols 30..69 (40 wide): side 40 * (1 + 2 * 0.25) = 60 around (50, 30) -> x 20..80, y 0..60.
    sample = rectangle_sample([(20, 40, 30, 70)])
    out = crop_to_foreground(sample, resolution=60, margin=0.25)
    torch.testing.assert_close(out.images[0], sample.images[0, :, 0:60, 20:80], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.masks[0], sample.masks[0, :, 0:60, 20:80], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.cameras.intrinsics[0], torch.tensor([90.0, 95.0, 48.0 - 20, 41.0 - 0]))
    assert (out.cameras.width, out.cameras.height) == (60, 60)
    torch.testing.assert_close(out.cameras.c2w, sample.cameras.c2w, rtol=0, atol=0)


def test_window_outside_the_image_is_white_background():
    # Box in the top-left corner, rows 0..9, cols 0..9: side 20 around (5, 5) -> x, y in -5..15.
    sample = rectangle_sample([(0, 10, 0, 10)])
    out = crop_to_foreground(sample, resolution=20, margin=0.5)
    assert (out.images[0, :, :5] == 1).all() and (out.images[0, :, :, :5] == 1).all()
    assert (out.masks[0, :, :5] == 0).all() and (out.masks[0, :, :, :5] == 0).all()
    torch.testing.assert_close(out.images[0, :, 5:, 5:], sample.images[0, :, :15, :15], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.cameras.intrinsics[0], torch.tensor([90.0, 95.0, 48.0 + 5, 41.0 + 5]))


def test_each_view_gets_its_own_window_and_the_foreground_fills_it():
    boxes = [(20, 40, 30, 70), (5, 75, 10, 30)]
    out = crop_to_foreground(rectangle_sample(boxes), resolution=32, margin=0.1)
    for k, (top, bottom, left, right) in enumerate(boxes):
        fg = out.masks[k, 0] > 0.5
        rows, cols = torch.nonzero(fg, as_tuple=True)
        extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
        assert abs(extent - 32 / 1.2) <= 2  # the longer side spans 1 / (1 + 2 * margin) of the crop
    # the second box is tall: its crop is 84 px (70 * 1.2) resampled to 32
    assert out.cameras.intrinsics[1, 0] == pytest.approx(90.0 * 32 / 84)


def test_jitter_grows_and_shifts_the_window_within_its_bounds():
    sample = rectangle_sample([(20, 40, 30, 70)] * 64)
    torch.manual_seed(0)
    out = crop_to_foreground(sample, resolution=40, margin=0.25, jitter=0.2)
    sides = 90.0 * 40 / out.cameras.intrinsics[:, 0]  # crop side in source pixels, from fx
    assert sides.min() >= 60 - 1e-3 and sides.max() <= 60 * 1.2 + 1 and sides.std() > 1
    left = 48.0 - out.cameras.intrinsics[:, 2] * sides / 40  # cx' = (cx - left) * 40 / side
    centre = left + sides / 2
    assert (centre - 50).abs().max() <= 0.2 * sides.max() / 4 + 1 and centre.std() > 0.5


def test_empty_mask_names_the_image():
    sample = rectangle_sample([(20, 40, 30, 70), (0, 0, 0, 0)])
    with pytest.raises(SampleError, match=r"cam_1\.png: empty foreground mask"):
        crop_to_foreground(sample, resolution=32, margin=0.1)


def test_crop_shows_what_its_cameras_see(tmp_path):
    """Crop full-resolution renders of a synthetic mouse; ray-trace the same mouse through the cropped
    cameras at the crop resolution; the two must agree (and disagree once the window is shifted)."""
    folder = generate_sample(7, tmp_path / "mouse", resolution=160, n_views=2)
    crop = crop_to_foreground(load_sample(folder), resolution=40, margin=0.1)

    def traced(cameras: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
        rgba = render_cameras(7, cameras).permute(0, 3, 1, 2)  # [V, 4, h, w]
        alpha = rgba[:, 3:]
        return alpha * rgba[:, :3] + (1 - alpha), alpha

    images, alphas = traced(crop.cameras)
    assert (foreground_iou(alphas, crop.masks) > 0.9).all()
    assert (psnr(images, crop.images, crop.masks > 0.5) > 22).all()  # seen: 23.8, 23.1 (fur is point-sampled)
    # One crop pixel off: seen IoU 0.81, 0.79 and foreground PSNR 15.4, 12.7.
    shifted = replace(crop.cameras, intrinsics=crop.cameras.intrinsics + torch.tensor([0.0, 0.0, 1.0, 0.0]))
    images, alphas = traced(shifted)
    assert (foreground_iou(alphas, crop.masks) < 0.85).all()
    assert (psnr(images, crop.images, crop.masks > 0.5) < 18).all()
