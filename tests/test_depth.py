"""Depth maps: the tracer's depth against ray-sphere intersections, synthetic depth files against the
mouse's own SDF, depth through loading / cropping / normalising against depth traced afresh or
recomputed from back-projected points, the depth loss in closed form, and finetune with it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mouserecon.cameras import Cameras
from mouserecon.data import DEPTH_FILE, SampleError, crop_to_foreground, foreground_center, load_sample, normalize_sample
from mouserecon.normalize import Similarity
from mouserecon.synth.generate import add_depth, draw_mouse, generate_sample
from mouserecon.synth.mouse import build_mouse
from mouserecon.synth.rig import look_at
from mouserecon.synth.sdf import Part, Shape
from mouserecon.synth.trace import render_depth
from mouserecon.train.config import load_recipe
from mouserecon.losses import depth_l1
from mouserecon.train.loop import FinetuneOptions, finetune
from mouserecon.rundir import RunDir


def _sphere(center, radius) -> Shape:
    part = Part(name="sphere", k_inner=0.0, k_join=0.0, centers=torch.tensor([center]), rotations=torch.eye(3)[None],
                radii=torch.full((1, 3), radius), dorsal=torch.full((1, 3), 0.6), ventral=torch.full((1, 3), 0.6),
                up=torch.tensor([[0.0, 0.0, 1.0]]), specular=torch.zeros(1))
    return Shape(parts=(part,), colour_blend=0.1)


def _points(cameras: Cameras, depth: torch.Tensor) -> torch.Tensor:
    """Back-project depth [V, H, W] (camera z) through the pixel centres -> world points [V, H, W, 3]."""
    origins, dirs = cameras.rays()
    forward = cameras.c2w[:, None, None, :3, 2]
    return origins + (depth / (dirs * forward).sum(-1))[..., None] * dirs


def test_traced_depth_is_the_camera_z_of_the_ray_sphere_intersection():
    center, radius, size = np.array([3.0, -2.0, 1.0]), 1.2, 48
    eyes = [np.array([3.0, -12.0, 1.0]), np.array([12.0, -6.0, 4.0])]
    c2w = torch.tensor(np.array([look_at(e, center, roll_deg=r) for e, r in zip(eyes, (0.0, 7.0))]), dtype=torch.float32)
    cameras = Cameras(c2w, torch.tensor([[60.0, 60.0, 23.0, 25.5], [55.0, 56.0, 24.0, 22.0]]), size, size)
    depth = render_depth(_sphere(tuple(center.tolist()), radius), cameras)
    origins, dirs = (x.double() for x in cameras.rays())
    oc = torch.tensor(center) - origins
    along = (oc * dirs).sum(-1)
    miss2 = (oc * oc).sum(-1) - along**2  # squared distance of the ray to the centre
    t = along - (radius**2 - miss2).clamp_min(0).sqrt()
    z = t * (dirs * cameras.c2w[:, None, None, :3, 2].double()).sum(-1)
    hits = miss2 < radius**2
    clear = miss2 < (radius * 0.98) ** 2  # away from the silhouette, where the hit threshold decides
    assert torch.equal(depth[clear] > 0, torch.ones_like(depth[clear], dtype=torch.bool))
    assert (depth[~hits] == 0).all()
    # The tracer stops within hit_px / f * t of the surface, i.e. that / cos(incidence) along the ray:
    # under 1e-3 of the depth where the ray meets the sphere at less than ~65 degrees.
    inner = miss2 < (radius * 0.9) ** 2
    torch.testing.assert_close(depth[inner].double(), z[inner], rtol=1e-3, atol=0)
    # `where` traces only the pixels asked for and leaves the rest 0.
    where = torch.zeros_like(hits)
    where[0, 20:30, 20:30] = True
    part = render_depth(_sphere(tuple(center.tolist()), radius), cameras, where=where)
    assert torch.equal(part[where], depth[where]) and (part[~where] == 0).all()


def test_synthetic_depth_lies_on_the_mouse_and_add_depth_rewrites_it(tmp_path):
    folder = generate_sample(11, tmp_path / "mm", resolution=64, n_views=3, n_heldout=1, variety="wide")
    depth = torch.from_numpy(np.load(folder / DEPTH_FILE)["depth"])
    sample = load_sample(folder)
    assert depth.shape == (4, 64, 64) and depth.dtype == torch.float32
    assert ((depth > 0) <= (sample.masks[:, 0] > 0)).all(), "depth only where the image shows the mouse"
    assert (depth > 0).float().mean(dim=(1, 2)).min() > 0.005
    params, _, _ = draw_mouse(11, "wide")
    points = _points(sample.cameras, depth)[depth > 0]
    surface = build_mouse(params).distance(points.float()).abs()
    # Within the tracer's hit threshold (0.02 of a pixel's footprint at that depth; ~0.08 mm here, a
    # pixel being ~4 mm): a wrong axis, unit or pixel offset would be off by millimetres.
    focal = sample.cameras.intrinsics[:, None, None, :2].min(-1).values.expand_as(depth)[depth > 0]
    assert (surface <= 1.5 * 0.02 * depth[depth > 0] / focal).all(), surface.max()
    # Normalised units: the same mouse, depths scaled by the similarity (camera z scales with lengths).
    normalised = generate_sample(11, tmp_path / "norm", resolution=64, n_views=3, n_heldout=1, variety="wide",
                                 units="model")
    scale = Similarity.from_dict(json.loads((normalised / "opencv_cameras.json").read_text())["normalization"]).scale
    torch.testing.assert_close(torch.from_numpy(np.load(normalised / DEPTH_FILE)["depth"]), depth * scale,
                               rtol=1e-4, atol=1e-6)
    # add_depth recomputes the file from synth.json and the images (for samples written without one).
    for f in (folder, normalised):
        reference = np.load(f / DEPTH_FILE)["depth"]
        (f / DEPTH_FILE).unlink()
        add_depth(f)
        np.testing.assert_allclose(np.load(f / DEPTH_FILE)["depth"], reference, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mouse(tmp_path_factory):
    return generate_sample(7, tmp_path_factory.mktemp("depth") / "mouse", resolution=160, n_views=2)


def test_depth_follows_crops_and_matches_a_fresh_trace(mouse):
    full = load_sample(mouse, depth=True)
    torch.testing.assert_close(full.depths[:, 0], torch.from_numpy(np.load(mouse / DEPTH_FILE)["depth"]))
    crop = crop_to_foreground(full, resolution=48, margin=0.1, center=foreground_center(full.cameras, full.masks),
                              up=torch.tensor([0.0, 0.0, 1.0]))
    params, _, _ = draw_mouse(7, "rig")
    traced = render_depth(build_mouse(params), crop.cameras)  # [V, h, w], the cropped cameras' own rays
    both = (crop.depths[:, 0] > 0) & (traced > 0)
    assert both.float().mean() > 0.05  # seen: 0.08 (a crop pixel has depth where all its samples do)
    error = (crop.depths[:, 0] - traced)[both].abs() / traced[both]
    assert error.median() < 2e-3 and error.quantile(0.9) < 2e-2, (error.median(), error.quantile(0.9))
    # Where the crop shows no mouse there is no depth; resized whole frames keep the same rule.
    assert (crop.depths[crop.masks == 0] == 0).all()
    small = load_sample(mouse, resolution=40, depth=True)
    assert small.depths.shape == (2, 1, 40, 40) and (small.depths[small.masks == 0] == 0).all()
    selected = full.select([1])
    torch.testing.assert_close(selected.depths, full.depths[1:])


def test_normalising_scales_depth_to_the_camera_z_of_the_moved_points(mouse):
    sample = load_sample(mouse, depth=True)
    normalised, similarity = normalize_sample(sample)
    valid = sample.depths[:, 0] > 0
    points = similarity.apply_points(_points(sample.cameras, sample.depths[:, 0]).double())  # model frame
    w2c = torch.linalg.inv(normalised.cameras.c2w.double())[:, None, None]  # [V, 1, 1, 4, 4]
    z = (w2c[..., 2, :3] * points).sum(-1) + w2c[..., 2, 3]
    torch.testing.assert_close(normalised.depths[:, 0][valid].double(), z[valid], rtol=1e-5, atol=1e-6)


def test_depth_file_defects_name_the_file(mouse, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(mouse, folder)
    assert load_sample(folder).depths is None  # not asked for: not read
    np.savez_compressed(folder / DEPTH_FILE, depth=np.zeros((2, 10, 10), np.float32))
    with pytest.raises(SampleError, match=r"depth\.npz: depth maps are \(2, 10, 10\), expected"):
        load_sample(folder, depth=True)
    np.savez_compressed(folder / DEPTH_FILE, depth=np.full((2, 160, 160), -1.0, np.float32))
    with pytest.raises(SampleError, match=r"depth\.npz: depth maps must be finite and >= 0"):
        load_sample(folder, depth=True)
    (folder / DEPTH_FILE).unlink()
    with pytest.raises(SampleError, match=r"depth\.npz: depth file missing"):
        load_sample(folder, depth=True)


def test_depth_l1_closed_form():
    gt = torch.zeros(2, 1, 4, 4)
    gt[0, 0, :2] = 3.0  # image 0: 8 pixels with a surface
    pred = gt + 0.25
    alpha = torch.ones_like(gt)
    alpha[0, 0, 0, :2] = 0.4  # 2 of them rendered too transparent to count
    pred[0, 0, 0, :2] = 100.0
    # image 0: mean |0.25| over 6 pixels; image 1: no surface, contributes 0
    torch.testing.assert_close(depth_l1(pred, gt, alpha), torch.tensor(0.125))
    pred.requires_grad_(True)
    depth_l1(pred, gt, alpha).backward()
    assert pred.grad[0, 0, 0, :2].abs().sum() == 0 and pred.grad[0, 0, 1].abs().sum() > 0


def test_finetune_with_the_depth_loss(synth_mice, tmp_path):
    recipe = load_recipe("exp_c", ["model.preset=tiny", "data.resolution=32", "data.val_samples=0",
                                   "training.steps=2", "training.log_every=1", "loss.depth=0.5",
                                   "data.crop=true", "data.crop_margin=0.2"])
    finetune(FinetuneOptions(data=synth_mice, out=tmp_path / "run", recipe=recipe, device="cpu", progress=False))
    train = [r for r in RunDir(tmp_path / "run").read_metrics() if r["kind"] == "train"]
    assert len(train) == 2 and all(0 < r["depth"] < 5 for r in train)
    # Without depth files the run fails at load time, naming the file.
    bare = tmp_path / "bare"
    shutil.copytree(synth_mice, bare)
    for f in bare.glob(f"*/{DEPTH_FILE}"):
        f.unlink()
    with pytest.raises(SampleError, match=r"depth\.npz: depth file missing"):
        finetune(FinetuneOptions(data=bare, out=tmp_path / "run2", recipe=recipe, device="cpu", progress=False))
