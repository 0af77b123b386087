"""The one prediction path (`pipeline`): what reconstruct and eval share, checked against references.

References: `data.load_sample` / `data.crop_to_foreground` (the inputs), `normalize.normalize_cameras`
on hand-picked cameras (the frame), the camera file itself (world_up in either format), the renderer on
an empty scene (the flat baseline), and the two commands against each other: eval's Gaussians are the
.ply reconstruct writes, bit for bit. A model trained with the 1-view `baseline` recipe goes through both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reconstruct import write_sample

from mouserecon.baselines import FILL_ALPHA, HULL_OPACITY, REFINE_FILL_ALPHA
from mouserecon.cameras import load_opencv_cameras, optical_axes_intersection
from mouserecon.checkpoints import demo_checkpoint, load_checkpoint
from mouserecon.data import crop_to_foreground, foreground_center, load_sample
from mouserecon.eval import evaluate as evaluate_module
from mouserecon.eval.evaluate import evaluate
from mouserecon.normalize import normalize_cameras
from mouserecon.options import EvalOptions, ReconstructOptions, ViewsError
from mouserecon.pipeline import CheckpointPredictor, FlatPredictor, prepare, render_views, seen_at_resolution
from mouserecon.ply import load_ply
from mouserecon.reconstruct import reconstruct
from mouserecon.train.config import load_recipe
from mouserecon.train.loop import FinetuneOptions, finetune

GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def mm_sample(tmp_path_factory) -> Path:
    return write_sample(tmp_path_factory.mktemp("pipeline") / "mouse_mm")


def as_transforms_json(sample: Path, out: Path) -> Path:
    """The same sample as a nerfstudio transforms.json (OpenGL c2w, fl_x ...), world_up kept."""
    shutil.copytree(sample / "images", out / "images")
    record = json.loads((sample / "opencv_cameras.json").read_text())
    frames = [{"file_path": f["file_path"], "transform_matrix": (np.linalg.inv(f["w2c"]) @ GL_FROM_CV).tolist(),
               "fl_x": f["fx"], "fl_y": f["fy"], "cx": f["cx"], "cy": f["cy"], "w": f["w"], "h": f["h"]}
              for f in record["frames"]]
    (out / "transforms.json").write_text(json.dumps({"world_up": record["world_up"], "frames": frames}))
    return out


# ---- prepare --------------------------------------------------------------------------------------


def test_prepare_gives_the_model_the_frames_or_the_crops_in_the_frame_centred_on_the_mouse(mm_sample):
    inputs, heldout = (3, 0), (5,)
    whole = prepare(mm_sample, inputs, heldout, 32)
    reference = load_sample(mm_sample, 32, [3, 0, 5])
    torch.testing.assert_close(whole.sample.images, reference.images, rtol=0, atol=0)
    torch.testing.assert_close(whole.inputs.images, reference.images[:2], rtol=0, atol=0)
    center = foreground_center(reference.cameras[:2], reference.masks[:2])  # from the input masks only
    _, similarity = normalize_cameras(reference.cameras[:2], center=center, up=torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(whole.similarity.matrix(), similarity.matrix(), rtol=0, atol=1e-12)
    torch.testing.assert_close(whole.center, center, rtol=0, atol=0)
    torch.testing.assert_close(whole.sample.cameras.c2w, similarity.apply_cameras(reference.cameras).c2w)
    torch.testing.assert_close(whole.user_cameras.c2w, reference.cameras.c2w, rtol=0, atol=0)
    assert whole.heldout.image_paths == (reference.image_paths[2],) and whole.full is None

    cropped = prepare(mm_sample, (2,), None, 32, crop=0.1)  # a single input view is allowed
    full = load_sample(mm_sample)
    rig_center = optical_axes_intersection(full.cameras.c2w)  # one view cannot place the mouse: the rig's aim
    crops = crop_to_foreground(full, 32, 0.1, rig_center, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(cropped.inputs.images, crops.images[2:3], rtol=0, atol=0)
    torch.testing.assert_close(cropped.inputs.cameras.intrinsics, crops.cameras.intrinsics[2:3])
    assert cropped.heldout_views == (0, 1, 3, 4, 5) and cropped.full.images.shape[-1] == 64


def test_the_model_sees_its_inputs_at_its_own_resolution_whatever_the_scene_resolution(mm_sample):
    scene = prepare(mm_sample, (0, 1, 2), (4,), 32, input_resolution=16)
    reference = load_sample(mm_sample, 16, [0, 1, 2])
    torch.testing.assert_close(scene.inputs.images, reference.images, rtol=0, atol=0)
    torch.testing.assert_close(scene.inputs.cameras.c2w, scene.similarity.apply_cameras(reference.cameras).c2w)
    assert scene.sample.images.shape[-1] == 32 and scene.whole.images.shape[-1] == 32
    cropped = prepare(mm_sample, (0, 1, 2), (4,), 32, crop=0.1, input_resolution=16)
    assert cropped.inputs.images.shape == (3, 3, 16, 16) and cropped.sample.images.shape[-1] == 32


def test_one_input_view_is_normalised_with_the_whole_rig(mm_sample):
    """One camera has no axes intersection to centre on: the rig's calibration (every camera) is used."""
    cameras, _ = load_opencv_cameras(mm_sample / "opencv_cameras.json")
    _, rig = normalize_cameras(cameras, up=torch.tensor([0.0, 1.0, 0.0]))
    for heldout in (None, (1,), (4, 5)):  # whatever the held-out views, the same frame
        scene = prepare(mm_sample, (2,), heldout, 32)
        torch.testing.assert_close(scene.similarity.matrix(), rig.matrix(), rtol=0, atol=1e-12)


def test_world_up_is_read_from_either_camera_file_format(mm_sample, tmp_path):
    nerfstudio = as_transforms_json(mm_sample, tmp_path / "ns")
    a, b = prepare(mm_sample, None, None, 32), prepare(nerfstudio, None, None, 32)
    assert a.world_up.tolist() == b.world_up.tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(a.similarity.matrix(), b.similarity.matrix(), rtol=0, atol=1e-6)  # float32 files
    torch.testing.assert_close(a.sample.images, b.sample.images, rtol=0, atol=0)


def test_views_out_of_range_or_both_input_and_heldout_name_the_camera_file(mm_sample):
    with pytest.raises(ViewsError, match=r"opencv_cameras.json: frames \[6, 9\] out of range; the sample has 6"):
        prepare(mm_sample, (0, 9), (6,), 32)
    with pytest.raises(ViewsError, match=r"opencv_cameras.json: views \[1\] are both input and held out"):
        prepare(mm_sample, (0, 1), (1,), 32)
    with pytest.raises(ViewsError, match="distinct"):
        ReconstructOptions(mm_sample, "m.ply", inputs=(0, 0))


# ---- predictors -----------------------------------------------------------------------------------


def test_flat_predictor_renders_the_background_with_no_alpha(mm_sample):
    scene = prepare(mm_sample, None, None, 16)
    prediction = FlatPredictor().predict(scene, torch.device("cpu"))
    assert prediction.gaussians.num == prediction.num_predicted == 0 and prediction.units == "model"
    images, alphas = render_views(prediction.gaussians, scene.heldout_cameras("model"), (1.0, 0.5, 0.0))
    assert images.shape == (1, 3, 16, 16) and not alphas.any()
    assert torch.equal(images, torch.tensor([1.0, 0.5, 0.0]).reshape(1, 3, 1, 1).expand(1, 3, 16, 16))


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_eval_scores_exactly_the_gaussians_reconstruct_writes(which, mm_sample, synth_mice, tiny_checkpoint,
                                                             tmp_path, monkeypatch):
    """Same sample, views and model: eval renders the Gaussians of reconstruct's .ply (units model, nothing
    pruned), bit for bit; for the demo model (trained on crops) through its crops."""
    sample, checkpoint, resolution = ((mm_sample, tiny_checkpoint, 32) if which == "tiny"
                                      else (sorted(synth_mice.iterdir())[0], demo_checkpoint(), 64))
    inputs, heldout = (4, 0, 2, 1, 3), (5,)
    written = reconstruct(ReconstructOptions(sample, tmp_path / "m.ply", checkpoint, inputs=inputs, heldout=heldout,
                                             resolution=resolution, units="model", min_opacity=0.0))
    rendered = []

    def spy(gaussians, cameras, *args, **kwargs):
        rendered.append(gaussians)
        return render_views(gaussians, cameras, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "render_views", spy)
    evaluate(EvalOptions(sample, (checkpoint,), inputs=inputs, heldout=heldout, resolution=resolution, lpips="none",
                         out=tmp_path / "report"))
    (scored,) = rendered
    ply = load_ply(written.ply_path)
    model, _ = load_checkpoint(checkpoint)
    predictor = CheckpointPredictor(model)
    # One Gaussian per input pixel (a hull_depth model: per foreground input pixel, and the hull's fill) + the
    # token Gaussians.
    seen = prepare(sample, inputs, heldout, resolution, predictor.crop, predictor.input_resolution).inputs
    pixels = int((seen.masks >= 0.5).sum()) if model.config.hull_depth else seen.masks.numel()
    assert (written.num_filled > 0) == model.config.hull_depth
    assert scored.num == ply.num == written.num_predicted == model.config.n_gaussians + pixels + written.num_filled
    for name in ("means", "sh", "log_scales", "quats", "opacity_logits"):
        assert torch.equal(getattr(scored, name), getattr(ply, name)), name
    assert (predictor.crop is None) == (which == "tiny")


def test_the_hull_fills_what_a_hull_depth_model_leaves_uncovered_in_its_input_views(synth_mice):
    """The demo model (hull_depth) with and without the fill: the same model Gaussians first, then opaque
    hull voxels, fewer uncovered foreground pixels in the input views at the scene resolution (where the
    fill looks) and in the held-out views (which it never sees)."""
    model, _ = load_checkpoint(demo_checkpoint())
    assert model.config.hull_depth
    plain, filled = CheckpointPredictor(model, fill=False), CheckpointPredictor(model)
    scene = prepare(sorted(synth_mice.iterdir())[0], (0, 1, 2, 3, 4), (5,), 128, plain.crop, plain.input_resolution)
    a, b = plain.predict(scene, torch.device("cpu")), filled.predict(scene, torch.device("cpu"))
    assert a.num_filled == 0 and b.num_filled > 0 and b.num_predicted == a.num_predicted + b.num_filled
    n = a.gaussians.num
    for name in ("means", "sh", "log_scales", "quats", "opacity_logits"):
        assert torch.equal(getattr(b.gaussians, name)[:n], getattr(a.gaussians, name)), name
    torch.testing.assert_close(b.gaussians.opacities[n:], torch.full((b.num_filled,), HULL_OPACITY))

    def uncovered(prediction, views, below=FILL_ALPHA):
        _, alphas = render_views(prediction.gaussians, views.cameras)
        fg = views.masks > 0.5
        return ((alphas < below) & fg).sum().item() / fg.sum().item()

    seen = seen_at_resolution(scene)
    assert seen.cameras.height == 128 and uncovered(b, seen) < 0.5 * uncovered(a, seen)
    assert uncovered(b, scene.heldout) < uncovered(a, scene.heldout)
    # To be refined: the pixels below REFINE_FILL_ALPHA are filled as well, so its voxels include the others.
    c = CheckpointPredictor(model, refined=True).predict(scene, torch.device("cpu"))
    assert torch.equal(c.gaussians.means[:n], a.gaussians.means) and c.num_filled > b.num_filled
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(b.gaussians.means[n:], c.gaussians.means[n:], compute_mode=exact).amin(1).max() == 0
    assert uncovered(c, seen, REFINE_FILL_ALPHA) < 0.5 * uncovered(b, seen, REFINE_FILL_ALPHA)
    # One input view: its hull is the mask's cone, whose front-most voxels are not the mouse; no fill.
    one = prepare(scene.sample.path, (0,), (5,), 128, plain.crop, plain.input_resolution)
    assert filled.predict(one, torch.device("cpu")).num_filled == 0


# ---- a 1-view model (the shipped `baseline` recipe) -------------------------------------------------


def test_a_baseline_recipe_model_reconstructs_and_evaluates(synth_mice, vgg_torch_home, tmp_path):
    recipe = load_recipe("baseline", ["model.preset=tiny", "data.resolution=32", "data.val_samples=1",
                                      "optim.warmup_steps=1", "training.steps=2", "training.val_every=1000"])
    assert recipe.data.input_views == (0,) and recipe.loss.lpips > 0 and recipe.loss.perceptual > 0
    checkpoint = finetune(FinetuneOptions(data=synth_mice, out=tmp_path / "run", recipe=recipe, device="cpu",
                                          progress=False))
    sample = sorted(synth_mice.iterdir())[0]
    result = reconstruct(ReconstructOptions(sample, tmp_path / "one.ply", checkpoint, inputs=(0,), min_opacity=0.0,
                                            refine=2))
    assert result.inputs == (0,) and result.heldout == (1, 2, 3, 4, 5)
    assert result.num_predicted == 2 + 32 * 32
    report = evaluate(EvalOptions(sample, (checkpoint,), inputs=(0,), heldout=(5,), lpips="none", refine=2,
                                  out=tmp_path / "report"))
    assert [m.name for m in report.models] == ["step_00000002", "step_00000002+refine2"]
    assert all(np.isfinite(m.summary["psnr"].mean) for m in report.models)
