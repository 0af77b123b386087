"""Aiming views at the mouse (`data.foreground_center`, `data.crop_to_foreground`; the model inputs built
from them: test_pipeline).

References: plain slices of the source pixels (a crop whose camera needs no turn and no resampling),
closed-form projections of a known 3D point, and the synthetic mouse ray-traced afresh through the
cropped cameras (`synth.render_cameras`): a crop is only right if its cameras see what its pixels show,
wherever the rig was aimed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mouserecon.cameras import Cameras, look_at
from mouserecon.data import Sample, SampleError, crop_to_foreground, foreground_center, load_sample
from mouserecon.metrics import foreground_iou, psnr
from mouserecon.synth.generate import generate_sample, render_cameras

ON_AXIS = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # on the optical axis of an identity camera
IMAGE_UP = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)  # so that the identity camera is level
Z_UP = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)


def rectangle_sample(boxes: list[tuple[int, int, int, int]], height: int = 80, width: int = 100,
                     intrinsics=(100.0, 100.0, 50.0, 40.0)) -> Sample:
    """One identity-pose view per (top, bottom, left, right) foreground box; colours encode the pixel position."""
    v = len(boxes)
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width) / height
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width) / width
    images = torch.stack([rows, cols, (rows + cols) / 2])[None].repeat(v, 1, 1, 1)  # [V, 3, H, W]
    masks = torch.zeros(v, 1, height, width)
    for k, (top, bottom, left, right) in enumerate(boxes):
        masks[k, 0, top:bottom, left:right] = 1.0
    cameras = Cameras(c2w=torch.eye(4).repeat(v, 1, 1), intrinsics=torch.tensor([intrinsics] * v),
                      width=width, height=height)
    return Sample(images, masks, cameras, tuple(Path(f"cam_{k}.png") for k in range(v)), "rect", Path("rect"), "alpha")


def test_an_untuned_crop_at_the_source_focal_is_a_slice_of_the_source():
    # Box rows 30..49, cols 35..64 around the principal point (50, 40): extent 15 px = 0.15 focal lengths;
    # side 60 with margin 0.5 -> focal 0.5 * 60 / (0.15 * 2) = 100, the source's: the window x 20..80, y 10..70.
    sample = rectangle_sample([(30, 50, 35, 65)])
    out = crop_to_foreground(sample, resolution=60, margin=0.5, center=ON_AXIS, up=IMAGE_UP)
    torch.testing.assert_close(out.images[0], sample.images[0, :, 10:70, 20:80], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.masks[0], sample.masks[0, :, 10:70, 20:80], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.cameras.intrinsics[0], torch.tensor([100.0, 100.0, 30.0, 30.0]))
    torch.testing.assert_close(out.cameras.c2w, sample.cameras.c2w, rtol=0, atol=1e-6)
    assert (out.cameras.width, out.cameras.height) == (60, 60)


def test_crop_outside_the_image_is_white_background():
    # Principal point (5, 5), box rows/cols 0..9: extent 5 px; side 20, margin 0.5 -> focal 100, window -5..15.
    sample = rectangle_sample([(0, 10, 0, 10)], intrinsics=(100.0, 100.0, 5.0, 5.0))
    out = crop_to_foreground(sample, resolution=20, margin=0.5, center=ON_AXIS, up=IMAGE_UP)
    assert (out.images[0, :, :5] > 1 - 1e-5).all() and (out.images[0, :, :, :5] > 1 - 1e-5).all()
    assert (out.masks[0, :, :5] < 1e-5).all() and (out.masks[0, :, :, :5] < 1e-5).all()
    torch.testing.assert_close(out.images[0, :, 5:, 5:], sample.images[0, :, :15, :15], rtol=0, atol=1e-5)


def ring_cameras(target: torch.Tensor, size: int = 200, focal: float = 250.0, views: int = 5) -> Cameras:
    """`views` cameras 300 mm from the origin at 15 deg elevation, looking at `target` [3] (mm)."""
    az = torch.arange(views, dtype=torch.float64) * (2 * math.pi / views)
    el = math.radians(15.0)
    eyes = 300.0 * torch.stack([math.cos(el) * az.cos(), math.cos(el) * az.sin(),
                                torch.full_like(az, math.sin(el))], -1)
    c2w = look_at(eyes, target.double().expand_as(eyes))
    intrinsics = torch.tensor([focal, focal, size / 2, size / 2], dtype=torch.float64).expand(views, 4)
    return Cameras(c2w.float(), intrinsics.float().contiguous(), width=size, height=size)


def point_masks(cameras: Cameras, point: torch.Tensor, half: int = 2) -> torch.Tensor:
    """[V, 1, H, W] masks: a (2 half + 1)^2 square on the pixel `point` [3] projects into."""
    uv, _ = cameras.project(point.float().expand(len(cameras), 1, 3))  # [V, 1, 2]
    masks = torch.zeros(len(cameras), 1, cameras.height, cameras.width)
    for k, (u, v) in enumerate(uv[:, 0].floor().long().tolist()):
        masks[k, 0, v - half:v + half + 1, u - half:u + half + 1] = 1.0
    return masks


def test_foreground_center_finds_the_mouse_not_where_the_rig_is_aimed():
    mouse = torch.tensor([60.0, -40.0, 20.0], dtype=torch.float64)
    cameras = ring_cameras(torch.zeros(3))  # aimed at the arena's centre, 75 mm from the mouse
    center = foreground_center(cameras, point_masks(cameras, mouse))
    # the square's centroid is the centre of the pixel the point falls in: within 0.5 px = 0.6 mm at 300 mm
    assert (center - mouse).norm() < 1.0


def test_foreground_center_needs_two_views_that_see_the_mouse():
    cameras = ring_cameras(torch.zeros(3), views=3)
    masks = point_masks(cameras, torch.zeros(3))
    masks[1:] = 0.0
    with pytest.raises(SampleError, match=r"where: 1 of 3 views show the foreground"):
        foreground_center(cameras, masks, "where")


def test_crops_are_aimed_at_the_centre_and_the_mask_fills_them():
    mouse = torch.tensor([60.0, -40.0, 20.0], dtype=torch.float64)
    cameras = ring_cameras(torch.zeros(3))
    masks = point_masks(cameras, mouse, half=12)
    sample = Sample(torch.ones(5, 3, 200, 200), masks, cameras, tuple(Path(f"c{k}.png") for k in range(5)), "s",
                    Path("s"), "alpha")
    out = crop_to_foreground(sample, resolution=32, margin=0.1, center=mouse, up=Z_UP)
    torch.testing.assert_close(out.cameras.c2w[:, 2, 0], torch.zeros(5), rtol=0, atol=1e-6)  # level: x horizontal
    uv, depth = out.cameras.project(mouse.float().expand(5, 1, 3))
    torch.testing.assert_close(uv[:, 0], torch.full((5, 2), 16.0), rtol=0, atol=1e-3)  # on each crop's axis
    torch.testing.assert_close(out.cameras.centers, cameras.centers)  # turned about their centres
    for k in range(5):
        rows, cols = torch.nonzero(out.masks[k, 0] > 0.5, as_tuple=True)
        extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
        assert 32 / 1.2 - 3 <= extent <= 32 / 1.2 + 1  # the box spans 1 / (1 + 2 margin) of the crop (turned: a bit less)


def test_jitter_shrinks_the_focal_and_shifts_the_principal_point_within_bounds():
    sample = rectangle_sample([(30, 50, 35, 65)] * 64)
    torch.manual_seed(0)
    out = crop_to_foreground(sample, resolution=60, margin=0.5, center=ON_AXIS, up=IMAGE_UP, jitter=0.2)
    focal = out.cameras.intrinsics[:, 0]
    assert focal.max() <= 100.0 + 1e-3 and focal.min() >= 100.0 / 1.2 - 1e-3 and focal.std() > 1
    shift = out.cameras.intrinsics[:, 2:] - 30.0  # principal point offset, px
    assert shift.abs().max() <= 0.2 / 4 * 60 + 1e-3 and shift.std() > 0.5


def test_empty_mask_names_the_image():
    sample = rectangle_sample([(30, 50, 35, 65), (0, 0, 0, 0)])
    with pytest.raises(SampleError, match=r"cam_1\.png: empty foreground mask"):
        crop_to_foreground(sample, resolution=32, margin=0.1, center=ON_AXIS, up=IMAGE_UP)


def traced(seed: int, cameras: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    rgba = render_cameras(seed, cameras).permute(0, 3, 1, 2)  # [V, 4, h, w]
    alpha = rgba[:, 3:]
    return alpha * rgba[:, :3] + (1 - alpha), alpha


def test_crop_shows_what_its_cameras_see(tmp_path):
    """Crop full-resolution renders of a synthetic mouse; ray-trace the same mouse through the cropped
    cameras at the crop resolution; the two must agree (and disagree once the crop is shifted)."""
    sample = load_sample(generate_sample(7, tmp_path / "mouse", resolution=160, n_views=3))
    crop = crop_to_foreground(sample, resolution=40, margin=0.1, center=foreground_center(sample.cameras, sample.masks),
                              up=Z_UP)
    images, alphas = traced(7, crop.cameras)
    assert (foreground_iou(alphas, crop.masks) > 0.9).all()
    assert (psnr(images, crop.images, crop.masks > 0.5) > 22).all()
    shifted = replace(crop.cameras, intrinsics=crop.cameras.intrinsics + torch.tensor([0.0, 0.0, 1.0, 0.0]))
    images, alphas = traced(7, shifted)
    assert (foreground_iou(alphas, crop.masks) < 0.85).all()
    assert (psnr(images, crop.images, crop.masks > 0.5) < 18).all()


def test_where_the_rig_is_aimed_does_not_change_the_crops(tmp_path):
    """The same cameras turned to look 50 mm away from the mouse (it then sits off-centre in wider frames,
    as in a rig aimed at the arena's centre) give the same centre and the same aimed crops."""
    sample = load_sample(generate_sample(7, tmp_path / "mouse", resolution=160, n_views=3))
    center = foreground_center(sample.cameras, sample.masks)
    elsewhere = center + torch.tensor([50.0, -30.0, 0.0], dtype=torch.float64)
    c2w = look_at(sample.cameras.centers.double(), elsewhere.expand(3, 3))
    wide = Cameras(c2w.float(), sample.cameras.intrinsics * torch.tensor([1.0, 1.0, 2.0, 2.0]), width=320, height=320)
    images, alphas = traced(7, wide)
    off = replace(sample, images=images.contiguous(), masks=alphas.contiguous(), cameras=wide)
    centre_off = foreground_center(off.cameras, off.masks)
    assert (centre_off - center).norm() < 1.5  # mm; the mouse is ~90 mm long
    a = crop_to_foreground(sample, resolution=40, margin=0.1, center=center, up=Z_UP)
    b = crop_to_foreground(off, resolution=40, margin=0.1, center=centre_off, up=Z_UP)
    turn = a.cameras.c2w[:, :3, :3].transpose(1, 2) @ b.cameras.c2w[:, :3, :3]  # [V, 3, 3] between the two crops
    angle = torch.rad2deg(torch.arccos(((turn.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert (angle < 0.5).all()  # the same aimed camera, up to the centre's 1.5 mm
    assert ((a.cameras.intrinsics[:, 0] / b.cameras.intrinsics[:, 0] - 1).abs() < 0.03).all()
    assert (foreground_iou(a.masks, b.masks) > 0.9).all()
    # two resamplings of a point-sampled fur texture at 40 px (seen: 23.2, 20.1, 20.2 dB)
    assert (psnr(a.images, b.images, a.masks > 0.5) > 19).all()
