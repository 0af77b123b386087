"""The one prediction path: a sample and its views -> model inputs -> Gaussians -> renders.

`reconstruct`, `eval` (every predictor), refinement and sequence reconstruction call these steps and
re-implement none of them:

1. `prepare(sample, inputs, heldout, resolution, crop, input_resolution) -> Scene`: the sample's frames
   (input views, then held-out views) at `resolution` (`data.load_sample`: centre crop + resize), mapped to
   the model's rig by a similarity fitted to the input cameras (`normalize.normalize_cameras`: centre = the
   mouse, `data.foreground_center` of the input masks; mean input-camera distance 2.7; the camera file's
   `world_up` -> +Z, +Z when it records none). A single input view cannot place the mouse in 3D, so it is
   centred on the least-squares intersection of the optical axes of every camera of the camera file (the
   rig's calibration, no held-out image). The model sees its inputs at `input_resolution` (its training
   resolution, whatever the scene's: a GS-LRM makes one Gaussian per input pixel, so at 4x its resolution
   it makes 16x as many, each sized for its training pixel, and their faint tails cover the background),
   except where the prediction is to be refined at a larger scene resolution: then it sees them at the
   scene's, up to 1.5x its own side, so that refinement starts from more Gaussians, one per input pixel (its
   silhouette term removes the faint tails; `CheckpointPredictor`).
   With `crop` (the margin of a model trained on crops) each input view is a perspective crop aimed at the
   mouse from the full-resolution image (`data.crop_to_foreground`), as in training.
2. A `Predictor` maps a Scene to a `Prediction`: Gaussians in the model frame or the user's, finite
   (non-finite ones dropped and counted). `CheckpointPredictor` runs a GS-LRM once (no grad; bf16
   autocast on CUDA) on the input images, cameras and masks (a `hull_depth` model places its foreground
   pixels' Gaussians in the masks' visual hull; its background pixels' are left out; and the hull's
   surface voxels fill what it leaves uncovered in the input views at the scene resolution, alpha below 0.5,
   or 0.8 when the prediction is to be refined, `baselines.hull_fill`); `HullPredictor`
   carves the visual hull of the input masks; `FlatPredictor` is no Gaussians at all (the flat
   background); eval adds a predictor that reads .ply files.
3. `refine_scene`: refinement against the whole input frames (preceded by the crops a crop model saw),
   carved with the whole input frames' silhouettes (`refine.refine`).
4. `render_views`: images clamped to [0, 1] and alphas, in batches sized for the device, with a
   progress bar; `to_user_frame` maps model-frame Gaussians back to the camera file's frame.

Units: "model" is the normalised rig (object at the origin, cameras ~2.7 away, +Z up); "input" the
camera file's frame and units (e.g. mm).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from mouserecon.baselines import FILL_ALPHA, HULL_INPUT_CROP, REFINE_FILL_ALPHA, hull_fill, visual_hull_gaussians
from mouserecon.cameras import Cameras, optical_axes_intersection
from mouserecon.data import (Sample, crop_to_foreground, foreground_center, load_sample, read_camera_file,
                             resize_sample)
from mouserecon.gaussians import Gaussians
from mouserecon.metrics import foreground_iou, psnr, ssim
from mouserecon.model import BACKGROUND_LOGIT, GSLRM
from mouserecon.normalize import Similarity, normalize_cameras
from mouserecon.options import DEFAULT_INPUT_VIEWS, ViewsError
from mouserecon.progress import progress
from mouserecon.refine import RefineError, RefineResult, refine_inputs
from mouserecon.render import render

log = logging.getLogger(__name__)

WHITE = (1.0, 1.0, 1.0)
HULL_RESOLUTION = 256  # the hull's default scene side in px (it has no training resolution)
RENDER_BATCH = {"cpu": 1, "cuda": 8}  # views per render() call (the CPU backends' memory grows with it)


def default_views(num_frames: int, inputs: tuple[int, ...] | None,
                  heldout: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inputs, held-out) frame indices for a camera file of `num_frames` frames, unchecked: inputs default
    to the first 5 (all frames when there are fewer), held-out to every frame not an input."""
    inputs = tuple(range(min(DEFAULT_INPUT_VIEWS, num_frames))) if inputs is None else inputs
    return inputs, tuple(i for i in range(num_frames) if i not in inputs) if heldout is None else heldout


def resolve_views(num_frames: int, inputs: tuple[int, ...] | None, heldout: tuple[int, ...] | None,
                  source: Path | str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`default_views`, checked against the camera file `source`: in range, no frame both input and held out."""
    inputs, heldout = default_views(num_frames, inputs, heldout)
    wrong = sorted(v for v in inputs + heldout if v >= num_frames)
    if wrong:
        raise ViewsError(f"{source}: frames {wrong} out of range; the sample has {num_frames} frames "
                         f"(indices 0..{num_frames - 1})")
    both = sorted(set(inputs) & set(heldout))
    if both:
        raise ViewsError(f"{source}: views {both} are both input and held out")
    return inputs, heldout


@dataclass(frozen=True)
class Scene:
    """One sample prepared for a model (step 1 of the module docstring).

    sample:        [I + H] frames at the scene resolution, cameras in the model frame: the I input views,
                   then the H held-out views, in the order given.
    user_cameras:  the same [I + H] cameras in the camera file's frame.
    similarity:    user -> model frame (x_model = s R x_user + t), fitted as the module docstring says.
    world_up:      [3] float64, the user's up axis that became +Z.
    inputs:        [I] what the model sees (crops or the whole input frames), model frame.
    input_views / heldout_views: frame indices into the camera file.
    center:        [3] float64, the camera file's frame: the point that became the origin (the mouse).
    crop:          the crop margin of `inputs`, or None for whole frames.
    full:          [I + H] full-resolution frames, camera file's frame (crop scenes only, for previews).
    """

    sample: Sample
    user_cameras: Cameras
    similarity: Similarity
    world_up: Tensor
    inputs: Sample
    input_views: tuple[int, ...]
    heldout_views: tuple[int, ...]
    center: Tensor
    crop: float | None = None
    full: Sample | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.input_views)

    @property
    def resolution(self) -> int:
        return self.sample.cameras.height

    @property
    def whole(self) -> Sample:
        """[I] the whole input frames at the scene resolution, model frame."""
        return self.sample.select(range(self.num_inputs))

    @property
    def heldout(self) -> Sample:
        """[H] the held-out frames at the scene resolution, model frame."""
        return self.sample.select(range(self.num_inputs, self.sample.num_views))

    def heldout_cameras(self, units: str) -> Cameras:
        """[H] held-out cameras in `units` ("model" or "input")."""
        cameras = self.sample.cameras if units == "model" else self.user_cameras
        return cameras[self.num_inputs:]


def prepare(sample_dir: str | Path, inputs: tuple[int, ...] | None, heldout: tuple[int, ...] | None,
            resolution: int, crop: float | None = None, input_resolution: int | None = None) -> Scene:
    """Step 1 of the module docstring (input_resolution None = `resolution`). Raises SampleError / ViewsError
    naming the file and the defect."""
    camera_file = read_camera_file(sample_dir)  # parsed once, here
    inputs, heldout = resolve_views(len(camera_file.cameras), inputs, heldout, camera_file.path)
    input_resolution = input_resolution or resolution
    views = list(inputs + heldout)
    full = load_sample(camera_file, None, views) if crop is not None else None  # [I + H] at full resolution
    sample = load_sample(camera_file, resolution, views) if full is None else resize_sample(full, resolution)  # [I + H]
    given = sample.select(range(len(inputs)))  # [I] at the scene resolution, camera file's frame
    if len(inputs) >= 2:  # from the full-resolution masks when they are loaded (as MouseDataset does)
        masks = given.masks if full is None else full.masks[:len(inputs)]
        cameras = given.cameras if full is None else full.cameras[:len(inputs)]
        fit, center = given.cameras, foreground_center(cameras, masks, camera_file.path)
    else:
        fit = camera_file.cameras
        center = optical_axes_intersection(fit.c2w)
    up = camera_file.up()
    _, similarity = normalize_cameras(fit, center=center, up=up)
    model_sample = replace(sample, cameras=similarity.apply_cameras(sample.cameras))
    if crop is not None:
        seen = crop_to_foreground(full.select(range(len(inputs))), input_resolution, crop, center, up)
    else:
        seen = given if input_resolution == resolution else load_sample(camera_file, input_resolution, list(inputs))
    seen = replace(seen, cameras=similarity.apply_cameras(seen.cameras))
    return Scene(model_sample, sample.cameras, similarity, up, seen, inputs, heldout, center, crop, full)


# ---- predictors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Gaussians [N] of one scene (finite, on the device), in `units`; `num_predicted` counts the ones the
    predictor made, non-finite included; `num_filled` the hull Gaussians among them (`baselines.hull_fill`)."""

    gaussians: Gaussians
    units: str
    num_predicted: int
    num_filled: int = 0

    @property
    def num_nonfinite(self) -> int:
        return self.num_predicted - self.gaussians.num


def _finite(gaussians: Gaussians, units: str, what: str) -> Prediction:
    finite = gaussians.drop_nonfinite()
    if finite.num < gaussians.num:
        log.warning("%s: %d of %d Gaussians are non-finite and were dropped", what, gaussians.num - finite.num,
                    gaussians.num)
    return Prediction(finite, units, gaussians.num)


class Predictor(ABC):
    """Scene -> Prediction. `crop`: the input crop margin the predictor sees its inputs with (None = whole
    frames); `input_resolution`: the side its inputs must have (None = the scene's); `refinable`: whether
    refinement applies (Gaussians in the model frame to fit)."""

    crop: float | None = None
    input_resolution: int | None = None
    refinable: bool = False

    @abstractmethod
    def predict(self, scene: Scene, device: torch.device) -> Prediction: ...


REFINE_INPUT_GROWTH = 1.5  # a prediction to be refined sees inputs up to this many times the model's side


class CheckpointPredictor(Predictor):
    """A GS-LRM: 2 token Gaussians + one per input pixel, in the model frame. A `hull_depth` model (one that
    takes the input masks as its geometric prior) is filled with the hull (`baselines.hull_fill`, on the
    input views at the scene resolution) unless `fill` is False or there is one input view (whose hull is
    its mask's whole cone, so the front-most voxels would float in front of the mouse). `refined`: the
    prediction is to be refined, so the fill takes the pixels below `baselines.REFINE_FILL_ALPHA` instead, and
    the model sees its inputs at the scene `resolution` where that is above its own side, capped at
    `REFINE_INPUT_GROWTH` times its side (rounded up to its patch). Why: on renders of two mouse meshes at
    256 px (5 sets of 12: two seeds of each through the real rig, one through the FaceLift rig), the demo
    model (128 px) refined from 192 px inputs scored -0.03 to +0.46 dB held-out foreground PSNR against
    128 px ones and -0.04 to +0.64 against 256 px ones (which lost 0.33 dB to 128 px through the FaceLift
    rig), with about half the Gaussians of 256 px; feed-forward, larger inputs cost IoU (faint tails),
    so it keeps its own side. The model card has the numbers."""

    refinable = True

    def __init__(self, model: GSLRM, fill: bool = True, refined: bool = False, resolution: int | None = None):
        self.model = model
        self.crop = model.config.input_crop
        side, patch = model.config.image_size, model.config.patch_size
        if refined and resolution is not None and resolution > side:
            wanted = min(resolution, int(REFINE_INPUT_GROWTH * side))
            side = -(-wanted // patch) * patch  # rounded up to the patch
        self.input_resolution = side
        self.fill = fill and model.config.hull_depth
        self.fill_alpha = REFINE_FILL_ALPHA if refined else FILL_ALPHA

    def predict(self, scene: Scene, device: torch.device) -> Prediction:
        return self.predict_batch([scene], device)[0]

    def predict_batch(self, scenes: list[Scene], device: torch.device) -> list[Prediction]:
        """One forward pass over several scenes with the same number of inputs and input size (a batch of
        sequence frames); each scene's Gaussians are those it gets alone, up to float rounding."""
        shapes = {(s.num_inputs, s.inputs.cameras.height) for s in scenes}
        assert len(shapes) == 1, f"a batch needs one input count and resolution, got {sorted(shapes)}"
        images = torch.stack([s.inputs.images for s in scenes]).to(device)  # [B, I, 3, R, R]
        cameras = Cameras.stack([s.inputs.cameras for s in scenes]).to(device)  # [B, I]
        masks = torch.stack([s.inputs.masks for s in scenes]).to(device)  # [B, I, 1, R, R]
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            batch = self.model(images, cameras, masks).to(torch.float32)  # [B, n]
        predictions = []
        for b, scene in enumerate(scenes):
            gaussians = batch[b]
            r = scene.inputs.cameras.height
            assert gaussians.num == self.model.config.n_gaussians + scene.num_inputs * r * r, gaussians.num
            if self.model.config.hull_depth:  # the background pixels' Gaussians are invisible: leave them out
                gaussians = gaussians.select(gaussians.opacity_logits > BACKGROUND_LOGIT)
            prediction = _finite(gaussians, "model", scene.sample.sample_id)
            if self.fill and scene.num_inputs >= 2:
                seen = seen_at_resolution(scene).to(device)
                filled = hull_fill(prediction.gaussians, seen.images, seen.masks, seen.cameras,
                                   threshold=self.fill_alpha)
                prediction = Prediction(Gaussians.cat([prediction.gaussians, filled]), "model",
                                        prediction.num_predicted + filled.num, filled.num)
            predictions.append(prediction)
        return predictions


class HullPredictor(Predictor):
    """The visual hull of the input masks (`baselines.visual_hull_gaussians`), seen through the same crops
    as the demo model (`baselines.HULL_INPUT_CROP`)."""

    crop = HULL_INPUT_CROP
    refinable = True

    def predict(self, scene: Scene, device: torch.device) -> Prediction:
        seen = scene.inputs.to(device)
        return _finite(visual_hull_gaussians(seen.images, seen.masks, seen.cameras), "model", scene.sample.sample_id)


class FlatPredictor(Predictor):
    """No Gaussians: renders the flat background (alpha 0), what a model that learned only it would show."""

    def predict(self, scene: Scene, device: torch.device) -> Prediction:
        empty = torch.zeros(0, 3, device=device)
        gaussians = Gaussians(means=empty, sh=torch.zeros(0, 1, 3, device=device), log_scales=empty,
                              quats=torch.zeros(0, 4, device=device), opacity_logits=torch.zeros(0, device=device))
        return Prediction(gaussians, "model", 0)


# ---- refinement, rendering, units -----------------------------------------------------------------


def scene_crops(scene: Scene, views: range | None = None) -> Sample:
    """The scene's frames (`views` of its I + H, default all) cropped as its inputs were (aimed at the mouse,
    `scene.crop` margin) at the scene resolution, model frame. Crop scenes only."""
    assert scene.full is not None, "scene_crops needs a crop scene"
    full = scene.full if views is None else scene.full.select(views)
    crops = crop_to_foreground(full, scene.resolution, scene.crop, scene.center, scene.world_up)
    return replace(crops, cameras=scene.similarity.apply_cameras(crops.cameras))


def seen_at_resolution(scene: Scene) -> Sample:
    """[I] the input views as the predictor saw them (crops aimed at the mouse, or whole frames) at the scene
    resolution, model frame."""
    if scene.crop is None:
        return scene.whole
    same = scene.inputs.cameras.height == scene.resolution
    return scene.inputs if same else scene_crops(scene, range(scene.num_inputs))


def refine_scene(gaussians: Gaussians, scene: Scene, steps: int) -> RefineResult:
    """`refine.refine_inputs` for a scene: model-frame Gaussians against the whole input frames, preceded by
    the crops a crop model saw (`scene.crop`, at the scene resolution), carved with the whole input frames."""
    device = gaussians.device
    crops = None if scene.crop is None else seen_at_resolution(scene).to(device)
    try:
        return refine_inputs(gaussians, scene.whole.to(device), crops, steps)
    except RefineError as err:
        raise RefineError(f"{scene.sample.path}: {err}") from None


def render_views(gaussians: Gaussians, cameras: Cameras, background=WHITE,
                 desc: str | None = None) -> tuple[Tensor, Tensor]:
    """Gaussians [N] into cameras [V] (same frame) at the cameras' size -> images [V, 3, H, W] clamped to
    [0, 1] (colours above 1 are legal Gaussians, as in gsplat, but no image shows them), alphas
    [V, 1, H, W], on the Gaussians' device; `RENDER_BATCH` views per call; a progress bar with `desc`."""
    batch = RENDER_BATCH[gaussians.device.type]
    images, alphas = [], []
    starts = range(0, len(cameras), batch)
    with torch.no_grad():
        for start in starts if desc is None else progress(starts, desc=desc, unit_scale=batch, unit="view"):
            chunk = cameras[start:start + batch]
            out = render(gaussians, chunk, chunk.height, chunk.width, background=background)
            images.append(out.images.float().clamp(0, 1))
            alphas.append(out.alphas.float())
    return torch.cat(images), torch.cat(alphas)


def view_scores(gaussians: Gaussians, scene: Scene) -> dict[str, dict[str, float]]:
    """Mean foreground PSNR / SSIM and IoU of model-frame Gaussians over the scene's input and held-out
    frames -> {"inputs"|"heldout": {"psnr_fg", "ssim_fg", "iou"}} (a group without frames is left out)."""
    scores = {}
    sample = scene.sample.to(gaussians.device)
    for group, frames in (("inputs", range(scene.num_inputs)), ("heldout", range(scene.num_inputs, sample.num_views))):
        if not frames:
            continue
        frames = list(frames)
        pred, alphas = render_views(gaussians, sample.cameras[frames])
        gt, masks = sample.images[frames], sample.masks[frames]
        fg = masks > 0.5
        scores[group] = {"psnr_fg": psnr(pred, gt, fg).nanmean().item(), "ssim_fg": ssim(pred, gt, fg).nanmean().item(),
                         "iou": foreground_iou(alphas, masks).nanmean().item()}
    return scores


def to_user_frame(gaussians: Gaussians, similarity: Similarity) -> Gaussians:
    """Model-frame Gaussians -> the camera file's frame with the inverse similarity (float64 maths, float32
    out, CPU; Gaussians that overflow float32 are dropped)."""
    inverse = similarity.inverse()
    mapped = gaussians.to(device="cpu", dtype=torch.float64).transform(inverse.rotation, inverse.translation,
                                                                       inverse.scale)
    return mapped.to(torch.float32).drop_nonfinite()
