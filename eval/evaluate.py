"""`mouserecon eval`: score checkpoints or .ply files on held-out views under one explicit protocol.

`evaluate(EvalOptions) -> Report`:
  1. resolve the protocol (`eval.protocol.Protocol`): samples (`data.find_samples`, ids must be
     unique), input views (default the first 5 frames), held-out views (default every other frame
     of the first sample), resolution (default the first checkpoint's image size), mask source,
     metric settings, LPIPS net; every checkpoint is opened first, so a bad one fails before any work;
  2. per model, per sample: load the sample's protocol views (`data.load_sample`: centre crop +
     resize), then
     - checkpoint: map the cameras to the model rig with the similarity fitted to the input views
       (`data.normalize_sample`, as `reconstruct` does), predict from the input views
       (`reconstruct.predict`; a model trained on crops, `input_crop`, gets each input view cropped
       around its foreground from the full-resolution image, `data.load_model_inputs`), drop
       non-finite Gaussians (nothing is pruned), render the held-out views;
     - baseline "hull": Gaussians from the visual hull of the input masks (`baselines`), in the same
       normalised frame, from the same crops (margin `baselines.HULL_INPUT_CROP`); baseline "flat":
       the flat background image (white, alpha 0), nothing rendered;
     - with `refine` N > 0, every checkpoint and the hull are also scored refined: N steps of
       `refine.refine_inputs` against the input views and their masks (model name suffix "+refineN"):
       with crops, against both the crops and the whole input frames, as in training; carved with the
       whole input frames' masks before and after (`carve.carve`);
     - .ply: render it with the sample's own cameras (the camera file's frame, e.g. mm), or, when its
       `reconstruct` sidecar says "units": "model", with the cameras mapped by the sidecar's recorded
       similarity. A sidecar that names another sample, or input views or a resolution other than the
       protocol's, is refused (a .ply made from a held-out view would score its own input);
  3. metrics per held-out view (`metrics.view_metrics`: whole and foreground PSNR / SSIM / LPIPS, IoU
     of the rendered alpha); renders saved as float32 .npz (exact) and 8-bit PNG (to look at);
  4. the report (`eval.report`): summary.json, per_view.csv, comparison grids of the worst, median
     and best samples (by the first model's mean foreground PSNR) and a text table.

.ply mapping (`--ply P`): P is a .ply file (the dataset must hold one sample) or a folder holding
`<sample_id>.ply` for every sample. Model names are the checkpoint / .ply file or folder stems
(see `_model_list` for colliding stems); baselines are named "flat" and "hull".
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from mouserecon.errors import MouseReconError
from mouserecon.baselines import HULL_INPUT_CROP, flat_prediction, visual_hull_gaussians
from mouserecon.cameras import CameraError, Cameras, load_nerfstudio_transforms, load_opencv_cameras
from mouserecon.checkpoints import load_checkpoint
from mouserecon.data import CAMERA_FILES, Sample, SampleError, find_camera_file, find_samples, load_model_inputs, \
    load_sample, normalize_sample
from mouserecon.figures import comparison_grid, save_image
from mouserecon.metrics import ViewMetrics, lpips_model, view_metrics
from mouserecon.eval.protocol import LPIPS_CHOICES, Protocol, data_sha1, mask_string, parse_mask
from mouserecon.eval.report import GRID_LABELS, ModelResult, Report, grid_samples, write_report
from mouserecon.normalize import Similarity
from mouserecon.ply import load_ply
from mouserecon.reconstruct import DEFAULT_INPUT_VIEWS, pick_device, predict
from mouserecon.refine import RefineError, refine_inputs
from mouserecon.render import render

log = logging.getLogger(__name__)

BASELINES = ("flat", "hull")


class EvalError(MouseReconError, ValueError):
    """Bad options or inputs for `evaluate`; the message names the file or option and the defect."""


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and under which protocol.

    data:        dataset (folder of samples, one sample folder, or a list file; `data.find_samples`).
    checkpoints: model checkpoints (ours or FaceLift's), evaluated by reconstructing from `inputs`.
    plys:        .ply files or folders of `<sample_id>.ply` (see the module docstring).
    baselines:   naive baselines to score too: "flat" and/or "hull" (see the module docstring).
    refine:      N > 0 also scores every checkpoint and the hull after N refinement steps.
    out:         report folder (created; must not already hold a summary.json).
    inputs:      input frame indices, in the order fed to the model; None = the first 5.
    heldout:     held-out frame indices; None = every frame of the first sample not in `inputs`.
    resolution:  square side in px; None = the first checkpoint's image size (required without checkpoints).
    lpips:       "alex", "vgg" or "none".
    mask:        "alpha", "alpha:<t>" or "near_white:<t>" (`protocol.parse_mask`).
    device:      "auto", "cpu" or "cuda".
    """

    data: Path
    checkpoints: tuple[Path, ...] = ()
    plys: tuple[Path, ...] = ()
    baselines: tuple[str, ...] = ()
    refine: int = 0
    out: Path = Path("report")
    inputs: tuple[int, ...] | None = None
    heldout: tuple[int, ...] | None = None
    resolution: int | None = None
    lpips: str = "alex"
    mask: str = "alpha"
    device: str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "data", Path(self.data))
        set_(self, "out", Path(self.out))
        set_(self, "checkpoints", tuple(Path(p) for p in self.checkpoints))
        set_(self, "plys", tuple(Path(p) for p in self.plys))
        set_(self, "baselines", tuple(self.baselines))
        if not self.checkpoints and not self.plys and not self.baselines:
            raise EvalError("nothing to evaluate: give at least one checkpoint, .ply or baseline")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown or len(set(self.baselines)) != len(self.baselines):
            raise EvalError(f"baselines must be distinct names from {BASELINES}, got {list(self.baselines)}")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0):
            raise EvalError(f"refine must be an integer >= 0, got {self.refine!r}")
        for name in ("inputs", "heldout"):
            views = getattr(self, name)
            if views is not None:
                views = tuple(views)
                if not views or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in views):
                    raise EvalError(f"{name} must be non-negative integer frame indices, got {views!r}")
                set_(self, name, views)
        if self.resolution is not None and not (isinstance(self.resolution, int) and self.resolution > 0):
            raise EvalError(f"resolution must be a positive integer, got {self.resolution!r}")
        if self.lpips not in LPIPS_CHOICES:
            raise EvalError(f"lpips must be one of {LPIPS_CHOICES}, got {self.lpips!r}")
        try:
            parse_mask(self.mask)
        except ValueError as err:
            raise EvalError(str(err)) from None
        if self.device not in ("auto", "cpu", "cuda"):
            raise EvalError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class _Model:
    name: str
    kind: str  # "checkpoint" | "ply" | "baseline"
    path: Path  # for a baseline: its name
    refine: int = 0  # refinement steps after the prediction (checkpoints and the hull)


def evaluate(options: EvalOptions) -> Report:
    """Run steps 1-4 of the module docstring; returns the Report (already written to `options.out`).

    Raises EvalError (options, .ply mapping, protocol), SampleError / CameraError (data), CheckpointError,
    PlyError, LpipsWeightsMissing or ReconstructError (device), each naming the file and the defect;
    options, checkpoints, .ply files and the first sample are checked before the first render.
    """
    o = options
    if (o.out / "summary.json").exists():
        raise EvalError(f"{o.out}: already holds a report (summary.json); choose another --out or remove it")
    sample_dirs = find_samples(o.data)
    ids = [d.name for d in sample_dirs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise EvalError(f"{o.data}: sample ids (folder names) must be unique, repeated: {duplicates}")
    device = pick_device(o.device)
    models = _model_list(o)
    resolution = _check_checkpoints(o, models)
    inputs = o.inputs or tuple(range(DEFAULT_INPUT_VIEWS))
    heldout = o.heldout or tuple(i for i in range(_frame_count(sample_dirs[0])) if i not in inputs)
    try:
        protocol = Protocol(data_sha1=data_sha1(sample_dirs), sample_ids=tuple(ids), input_views=inputs,
                            heldout_views=heldout, resolution=resolution, mask=mask_string(parse_mask(o.mask)),
                            lpips=o.lpips)
    except ValueError as err:
        raise EvalError(f"bad protocol: {err}") from None
    # Fail now, not after hours of work: views out of range, no alpha for an alpha mask (first sample),
    # a missing or mismatched .ply.
    _ground_truth(load_sample(sample_dirs[0], resolution, list(inputs) + list(heldout)), protocol)
    for model in models:
        if model.kind == "ply":
            for sample_id, path in _ply_files(model.path, ids).items():
                _ply_similarity(path, sample_id, protocol)
    log.info("protocol %s: %d samples, inputs %s, held out %s, %d px, mask %s, LPIPS %s, device %s",
             protocol.tag(), len(ids), list(inputs), list(heldout), resolution, protocol.mask, o.lpips, device)
    lpips_net = None if o.lpips == "none" else lpips_model(o.lpips, device)

    (o.out / "renders").mkdir(parents=True, exist_ok=True)
    results = []
    for model in models:
        metrics = _evaluate_model(model, sample_dirs, protocol, device, lpips_net, o.out / "renders" / model.name)
        source = str(model.path) + (f" + refine {model.refine}" if model.refine else "")
        results.append(ModelResult.from_metrics(model.name, model.kind, source, metrics))
    grids = _write_grids(o.out, protocol, sample_dirs, results)
    return write_report(o.out, protocol, tuple(results), grids, device=str(device))


# ---- protocol and models -----------------------------------------------------------------------


def _model_list(o: EvalOptions) -> list[_Model]:
    """Models named by their file stems; where stems collide (runs/a/.../step_1.pt, runs/b/.../step_1.pt),
    by the shortest tail of their paths that tells them apart, joined with "-" (a-checkpoints-step_1)."""
    given = [("checkpoint", p) for p in o.checkpoints] + [("ply", p) for p in o.plys]
    resolved = [p.resolve() for _, p in given]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise EvalError(f"given more than once: {twice}")
    parts = [p.with_suffix("").parts if kind == "checkpoint" or p.suffix.lower() == ".ply" else p.parts
             for p, (kind, _) in zip(resolved, given)]
    names = []
    for k in range(1, max((len(x) for x in parts), default=0) + 1):
        names = ["-".join(x[-k:]) for x in parts]
        if len(set(names)) == len(names):
            break
    for name, (_, path) in zip(names, given):
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
            raise EvalError(f"{path}: model name {name!r} (from the file name) may only hold letters, digits "
                            "and . _ + -; rename the file")
    models = [_Model(name, kind, path) for name, (kind, path) in zip(names, given)]
    models += [_Model(name, "baseline", Path(name)) for name in o.baselines]
    taken = [m.name for m in models]
    if len(set(taken)) != len(taken):
        raise EvalError(f"model names collide: {taken} (rename a file called like a baseline)")
    if o.refine:
        models += [replace(m, name=f"{m.name}+refine{o.refine}", refine=o.refine) for m in models
                   if m.kind == "checkpoint" or m.name == "hull"]
    return models


def _check_checkpoints(o: EvalOptions, models: list[_Model]) -> int:
    """Open every checkpoint (strict load on the CPU) -> the protocol resolution."""
    resolution = o.resolution
    for model in models:
        if model.kind != "checkpoint":
            continue
        if not model.path.is_file():
            raise EvalError(f"{model.path}: checkpoint file not found")
        _, info = load_checkpoint(model.path, "cpu")
        resolution = resolution or info.config.image_size
        if resolution % info.config.patch_size:
            raise EvalError(f"{model.path}: resolution {resolution} is not a multiple of the model's patch size "
                            f"{info.config.patch_size}")
    if resolution is None:
        raise EvalError("give the resolution (--resolution) when evaluating no checkpoint")
    return resolution


def _frame_count(sample_dir: Path) -> int:
    camera_file = find_camera_file(sample_dir)
    loader = load_opencv_cameras if camera_file.name == CAMERA_FILES[0] else load_nerfstudio_transforms
    try:
        return len(loader(camera_file)[1])
    except CameraError as err:
        raise SampleError(str(err)) from err


def _ply_files(path: Path, sample_ids: list[str]) -> dict[str, Path]:
    """{sample id: .ply} for a --ply argument (a file for a one-sample dataset, or a folder)."""
    if path.is_file():
        if path.suffix.lower() != ".ply":
            raise EvalError(f"{path}: not a .ply file")
        if len(sample_ids) != 1:
            raise EvalError(f"{path}: a single .ply needs a one-sample dataset, this one has {len(sample_ids)}; "
                            "give a folder holding <sample_id>.ply for every sample")
        return {sample_ids[0]: path}
    if not path.is_dir():
        raise EvalError(f"{path}: .ply file or folder not found")
    files = {i: path / f"{i}.ply" for i in sample_ids}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise EvalError(f"{path}: no .ply for {len(missing)} of {len(files)} samples, e.g. {missing[:3]}")
    return files


# ---- one model -----------------------------------------------------------------------------------


def _evaluate_model(model: _Model, sample_dirs: list[Path], protocol: Protocol, device: torch.device,
                    lpips_net, render_dir: Path) -> ViewMetrics:
    """Metrics [S, V] of one model over every sample; saves its renders into `render_dir`."""
    render_dir.mkdir()
    network = load_checkpoint(model.path, device)[0] if model.kind == "checkpoint" else None
    plys = _ply_files(model.path, list(protocol.sample_ids)) if model.kind == "ply" else None
    views = list(protocol.input_views) + list(protocol.heldout_views)
    per_sample = []
    start = time.perf_counter()
    for k, sample_dir in enumerate(sample_dirs):
        sample = load_sample(sample_dir, protocol.resolution, views)  # [I + H] frames, protocol order
        if model.kind == "ply":
            images, alphas = _render_ply(plys[sample.sample_id], sample, protocol, device)
        elif model.name == "flat":
            images, alphas = flat_prediction(len(protocol.heldout_views), protocol.resolution, protocol.resolution,
                                             torch.tensor(protocol.background, device=device))
        else:
            images, alphas = _render_prediction(model, network, sample, protocol, device)
        gt, mask = _ground_truth(sample, protocol)  # [H, 3, R, R], [H, 1, R, R]
        assert images.shape == gt.shape and alphas.shape == mask.shape, (images.shape, gt.shape, alphas.shape)
        # view_metrics checks the renders are in [0, 1] (to 1e-4: compositing rounding) and scores them clamped.
        metrics = view_metrics(images, gt.to(device), mask.to(device), alphas, lpips_net)
        per_sample.append(ViewMetrics(**{name: v.cpu() for name, v in metrics.as_dict().items()}))
        _save_renders(render_dir, sample.sample_id, protocol.heldout_views, images.clamp(0, 1).cpu(), alphas.cpu())
        log.info("%s: sample %d/%d %s: PSNR %s dB (foreground %s), IoU %s (%.1f s)", model.name, k + 1,
                 len(sample_dirs), sample.sample_id, _fmt(metrics.psnr), _fmt(metrics.psnr_fg), _fmt(metrics.iou, 3),
                 time.perf_counter() - start)
    return ViewMetrics.stack(per_sample)


def _render_prediction(model: _Model, network, sample: Sample, protocol: Protocol,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    """Reconstruct from the input views (the checkpoint `network`, or the hull when it is None), refine when
    the model says so, and render the held-out views -> images [H, 3, R, R], alphas [H, 1, R, R]."""
    n_in = len(protocol.input_views)
    normalized, similarity = normalize_sample(sample, fit_views=range(n_in))  # fitted to the inputs only
    cameras = normalized.cameras  # [I + H]
    whole = normalized.select(range(n_in))  # the whole input frames, model frame
    # The inputs as the model was trained to see them; the hull gets the same crops as the demo model.
    crop = network.config.input_crop if network is not None else HULL_INPUT_CROP
    inputs = whole
    if crop is not None:
        inputs = load_model_inputs(sample.path, protocol.input_views, protocol.resolution, crop)
        inputs = replace(inputs, cameras=similarity.apply_cameras(inputs.cameras))
    seen = inputs.to(device)
    if network is not None:
        gaussians = predict(network, seen.images, seen.cameras, device)
    else:
        gaussians = visual_hull_gaussians(seen.images, seen.masks, seen.cameras)
    finite = gaussians.drop_nonfinite()
    if finite.num < gaussians.num:
        log.warning("%s: %d of %d predicted Gaussians are non-finite and were dropped", sample.sample_id,
                    gaussians.num - finite.num, gaussians.num)
    if model.refine:
        try:
            finite = refine_inputs(finite, whole.to(device), None if crop is None else seen, model.refine).gaussians
        except RefineError as err:
            raise EvalError(f"{sample.path}: {err}") from None
    return _render(finite, cameras[n_in:], protocol, device)


def _ply_similarity(path: Path, sample_id: str, protocol: Protocol) -> Similarity | None:
    """The frame of a .ply from its `reconstruct` sidecar: None = the camera file's frame, else the
    user-to-model similarity its cameras need. Refuses a sidecar naming another sample, other input views
    (or another order) or another resolution: the .ply was then made under another protocol."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"{sidecar}: not valid JSON ({err})") from None
    made_from = Path(record.get("sample", "")).name
    if made_from != sample_id:
        raise EvalError(f"{path}: its sidecar {sidecar.name} says it was made from sample {made_from!r}, "
                        f"not {sample_id!r}")
    if record.get("views") != list(protocol.input_views):
        raise EvalError(f"{path}: made from views {record.get('views')} (sidecar {sidecar.name}), but the "
                        f"protocol's input views are {list(protocol.input_views)}")
    if record.get("resolution") != protocol.resolution:
        raise EvalError(f"{path}: made from {record.get('resolution')} px inputs (sidecar {sidecar.name}), but the "
                        f"protocol's resolution is {protocol.resolution} px")
    if record.get("units") == "model":
        return Similarity.from_dict(record["similarity_user_to_model"])
    if record.get("units") != "input":
        raise EvalError(f"{sidecar}: 'units' must be 'input' or 'model', got {record.get('units')!r}")
    return None


def _render_ply(path: Path, sample: Sample, protocol: Protocol, device: torch.device) -> tuple[Tensor, Tensor]:
    """Render a .ply into the sample's held-out views (frame from its sidecar, see the module docstring)."""
    cameras = sample.cameras[len(protocol.input_views):]  # [H], the camera file's frame
    similarity = _ply_similarity(path, sample.sample_id, protocol)
    if similarity is not None:
        cameras = similarity.apply_cameras(cameras)
    elif not path.with_suffix(".json").is_file():
        log.info("%s: no sidecar %s: taking the .ply to be in the camera file's frame; its input views cannot "
                 "be checked against the protocol", path, path.with_suffix(".json").name)
    return _render(load_ply(path), cameras, protocol, device)


def _render(gaussians, cameras: Cameras, protocol: Protocol, device: torch.device) -> tuple[Tensor, Tensor]:
    """Gaussians [N] into cameras [H] -> images [H, 3, R, R] clamped to [0, 1] (colours above 1 are
    legal Gaussians, as in gsplat, but no image shows them), alphas [H, 1, R, R], on `device`.
    One view per call on the CPU (the torch backend's memory grows with the batch)."""
    gaussians = gaussians.to(device)
    step = 1 if device.type == "cpu" else len(cameras)
    images, alphas = [], []
    with torch.no_grad():
        for i in range(0, len(cameras), step):
            out = render(gaussians, cameras[i:i + step], protocol.resolution, protocol.resolution,
                         background=protocol.background)
            images.append(out.images.float().clamp(0, 1))  # what an 8-bit image of the render shows
            alphas.append(out.alphas.float())
    return torch.cat(images), torch.cat(alphas)


def _ground_truth(sample: Sample, protocol: Protocol) -> tuple[Tensor, Tensor]:
    """Held-out GT images [H, 3, R, R] and boolean foreground masks [H, 1, R, R] per the protocol's mask."""
    n_in = len(protocol.input_views)
    gt = sample.images[n_in:]
    spec = protocol.mask_spec
    if spec.source == "alpha" and sample.mask_source != "alpha":
        raise EvalError(f"{sample.path}: the images have no alpha channel (mask from {sample.mask_source}), so "
                        "the protocol's alpha mask is unavailable; use --mask near_white:<t> for RGB data")
    return gt, spec.mask(gt, sample.masks[n_in:] if spec.source == "alpha" else None)


def _save_renders(folder: Path, sample_id: str, views: tuple[int, ...], images: Tensor, alphas: Tensor) -> None:
    """<sample>.npz (float32 images [H, 3, R, R], alphas [H, 1, R, R], views [H]) and <sample>_view<k>.png."""
    np.savez(folder / f"{sample_id}.npz", images=images.numpy(), alphas=alphas.numpy(), views=np.array(views))
    for view, image in zip(views, images):
        iio.imwrite(folder / f"{sample_id}_view{view}.png",
                    (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def _write_grids(out: Path, protocol: Protocol, sample_dirs: list[Path], results: list[ModelResult]) -> dict:
    """GT | model | error for every model, rows = held-out views, for the worst / median / best samples."""
    chosen = grid_samples(results[0].metrics.psnr_fg, protocol.sample_ids)
    if not chosen:
        log.warning("no comparison grids: every held-out foreground mask of every sample is empty")
        return {}
    (out / "grids").mkdir(exist_ok=True)
    views = list(protocol.input_views) + list(protocol.heldout_views)
    grids = {}
    for label in GRID_LABELS:
        if label not in chosen:
            continue
        index, value = chosen[label]
        sample = load_sample(sample_dirs[index], protocol.resolution, views)
        gt, _ = _ground_truth(sample, protocol)
        preds = [torch.from_numpy(np.load(out / "renders" / r.name / f"{sample.sample_id}.npz")["images"])
                 for r in results]
        path = out / "grids" / f"{label}_{sample.sample_id}.png"
        save_image(path, comparison_grid(gt, preds))
        grids[label] = {"sample": sample.sample_id, "file": str(path.relative_to(out)), "psnr_fg_mean": value}
    return grids


def _fmt(values: Tensor | None, digits: int = 2) -> str:
    if values is None:
        return "-"
    return "/".join(f"{v:.{digits}f}" for v in values.tolist())
