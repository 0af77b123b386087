"""`mouserecon eval`: score checkpoints, baselines or .ply files on held-out views under one explicit protocol.

`evaluate(EvalOptions) -> Report`:
  1. resolve the protocol (`eval.protocol.Protocol`): samples (`data.find_samples`, ids must be
     unique), input views (default the first 5 frames), held-out views (default every other frame
     of the first sample), resolution (default the first checkpoint's image size), mask source,
     metric settings, LPIPS net; every checkpoint is opened first, so a bad one fails before any work.
     With no checkpoint, .ply or baseline given, the bundled demo checkpoint is evaluated (logged);
  2. per model, per sample, through the one prediction path (`pipeline`, the same as `reconstruct`):
     `pipeline.prepare` the sample for the model (input and held-out frames, the similarity fitted to
     the input views, crops for a model trained on crops), predict (a `pipeline.Predictor`: a
     checkpoint, the "hull" or "flat" baseline, or `PlyPredictor` for .ply files), drop non-finite
     Gaussians (nothing is pruned), and render the held-out views;
     - with `refine` N > 0, every checkpoint and the hull are also scored refined (`pipeline.refine_scene`,
       model name suffix "+refineN");
     - .ply: in the frame its `reconstruct` sidecar records (the camera file's frame without one). A
       sidecar that names another sample, or input views, a resolution or a normalisation other than the
       protocol's, is refused (a .ply made from a held-out view would score its own input);
  3. metrics per held-out view (`metrics.view_metrics`: whole and foreground PSNR / SSIM / LPIPS, IoU
     of the rendered alpha); renders saved as float32 .npz (exact) and 8-bit PNG (to look at);
  4. the report (`eval.report`): summary.json, per_view.csv, labelled comparison grids of the worst,
     median and best samples (by the first model's mean foreground PSNR) and a text table.

.ply mapping (`--ply P`): P is a .ply file (the dataset must hold one sample) or a folder holding
`<sample_id>.ply` for every sample. Model names are the checkpoint / .ply file or folder stems
(see `_model_list` for colliding stems); baselines are named "flat" and "hull".
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from mouserecon.checkpoints import load_checkpoint, resolve_checkpoint
from mouserecon.data import Sample, find_samples, read_camera_file
from mouserecon.eval.protocol import Protocol, data_sha1, mask_string, parse_mask
from mouserecon.eval.report import GRID_LABELS, ModelResult, Report, grid_samples, write_report
from mouserecon.figures import comparison_grid, save_image
from mouserecon.device import pick_device
from mouserecon.metrics import ViewMetrics, lpips_model, view_metrics
from mouserecon.normalize import Similarity
from mouserecon.options import EvalError, EvalOptions
from mouserecon.pipeline import CheckpointPredictor, FlatPredictor, HullPredictor, Prediction, Predictor, Scene, \
    default_views, prepare, refine_scene, render_views
from mouserecon.ply import load_ply
from mouserecon.sidecar import Sidecar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Model:
    name: str
    kind: str  # "checkpoint" | "ply" | "baseline"
    source: str  # the checkpoint or .ply path, or the baseline's name
    refine: int = 0  # refinement steps after the prediction (checkpoints and the hull)


class PlyPredictor(Predictor):
    """A .ply per sample (`files`: {sample id: path}) in the frame its `reconstruct` sidecar records."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def predict(self, scene: Scene, device: torch.device) -> Prediction:
        path = self.files[scene.sample.sample_id]
        units = ply_units(path, scene.sample.sample_id, scene.input_views, scene.resolution, scene.similarity)
        gaussians = load_ply(path).to(device)
        return Prediction(gaussians, units, gaussians.num)  # load_ply drops non-finite rows itself


def ply_units(path: Path, sample_id: str, inputs: tuple[int, ...], resolution: int,
              similarity: Similarity | None) -> str:
    """The units of a .ply ("input" without a sidecar) after checking its sidecar against the protocol: the
    sample, the input views in order, the resolution and (when given) the normalisation must be the same."""
    sidecar_path = Sidecar.path_for(path)
    if not sidecar_path.is_file():
        log.info("%s: no sidecar %s: taking the .ply to be in the camera file's frame; its input views cannot "
                 "be checked against the protocol", path, sidecar_path.name)
        return "input"
    sidecar = Sidecar.read(sidecar_path)
    made_from = Path(sidecar.sample).name
    if made_from != sample_id:
        raise EvalError(f"{path}: its sidecar {sidecar_path.name} says it was made from sample {made_from!r}, "
                        f"not {sample_id!r}")
    if tuple(sidecar.input_views) != tuple(inputs):
        raise EvalError(f"{path}: made from views {sidecar.input_views} (sidecar {sidecar_path.name}), but the "
                        f"protocol's input views are {list(inputs)}")
    if sidecar.resolution != resolution:
        raise EvalError(f"{path}: made from {sidecar.resolution} px inputs (sidecar {sidecar_path.name}), but the "
                        f"protocol's resolution is {resolution} px")
    recorded = Similarity.from_dict(sidecar.similarity_user_to_model)
    if sidecar.units == "model" and similarity is not None and not _same(recorded, similarity):
        raise EvalError(f"{path}: its sidecar {sidecar_path.name} records another normalisation of the cameras "
                        f"(scale {recorded.scale:.6g}) than the protocol's (scale {similarity.scale:.6g})")
    return sidecar.units


def _same(a: Similarity, b: Similarity) -> bool:
    return torch.allclose(a.matrix(), b.matrix(), rtol=1e-9, atol=1e-9)


def evaluate(options: EvalOptions) -> Report:
    """Run steps 1-4 of the module docstring; returns the Report (already written to `options.out`).

    Raises a MouseReconError naming the file and the defect (EvalError for options, .ply mapping and the
    protocol; SampleError / CameraError for data; CheckpointError; LpipsWeightsMissing; ...); options,
    checkpoints, .ply files and the first sample are checked before the first render.
    """
    o = options
    if (o.out / "summary.json").exists():
        raise EvalError(f"{o.out}: already holds a report (summary.json); choose another --out or remove it")
    if not (o.checkpoints or o.plys or o.baselines):
        o = replace(o, checkpoints=(resolve_checkpoint(None),))
        log.info("no --checkpoint, --ply or --baseline given: evaluating the bundled demo checkpoint")
    sample_dirs = find_samples(o.data)
    ids = [d.name for d in sample_dirs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise EvalError(f"{o.data}: sample ids (folder names) must be unique, repeated: {duplicates}")
    device = pick_device(o.device)
    models = _model_list(o)
    resolution = _check_checkpoints(o, models)
    inputs, heldout = default_views(len(read_camera_file(sample_dirs[0]).cameras), o.inputs, o.heldout)
    try:
        protocol = Protocol(data_sha1=data_sha1(sample_dirs), sample_ids=tuple(ids), input_views=inputs,
                            heldout_views=heldout, resolution=resolution, mask=mask_string(parse_mask(o.mask)),
                            lpips=o.lpips)
    except ValueError as err:
        raise EvalError(f"bad protocol: {err}") from None
    # Fail now, not after hours of work: views out of range, no alpha for an alpha mask (first sample),
    # a missing or mismatched .ply.
    _ground_truth(prepare(sample_dirs[0], inputs, heldout, resolution).heldout, protocol)
    for model in models:
        if model.kind == "ply":
            for sample_id, path in _ply_files(Path(model.source), ids).items():
                ply_units(path, sample_id, inputs, resolution, None)
    log.info("protocol %s: %d samples, inputs %s, held out %s, %d px, mask %s, LPIPS %s, device %s",
             protocol.tag(), len(ids), list(inputs), list(heldout), resolution, protocol.mask, o.lpips, device)
    lpips_net = None if o.lpips == "none" else lpips_model(o.lpips, device)

    (o.out / "renders").mkdir(parents=True, exist_ok=True)
    results = []
    for model in models:
        metrics = _evaluate_model(model, sample_dirs, protocol, device, lpips_net, o.out / "renders" / model.name)
        source = model.source + (f" + refine {model.refine}" if model.refine else "")
        results.append(ModelResult.from_metrics(model.name, model.kind, source, metrics))
        summary = results[-1].summary
        log.info("%s: foreground PSNR %.2f dB, SSIM %.4f, IoU %.3f (means over %d samples x %d views)", model.name,
                 summary["psnr_fg"].mean, summary["ssim_fg"].mean, summary["iou"].mean, len(ids), len(heldout))
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
    models = [_Model(name, kind, str(path)) for name, (kind, path) in zip(names, given)]
    models += [_Model(name, "baseline", name) for name in o.baselines]
    taken = [m.name for m in models]
    if len(set(taken)) != len(taken):
        raise EvalError(f"model names collide: {taken} (rename a file called like a baseline)")
    if o.refine:
        models += [replace(m, name=f"{m.name}+refine{o.refine}", refine=o.refine) for m in models
                   if m.kind == "checkpoint" or m.source == "hull"]
    return models


def _check_checkpoints(o: EvalOptions, models: list[_Model]) -> int:
    """Open every checkpoint (strict load on the CPU) -> the protocol resolution."""
    resolution = o.resolution
    for model in models:
        if model.kind != "checkpoint" or model.refine:
            continue
        if not Path(model.source).is_file():
            raise EvalError(f"{model.source}: checkpoint file not found")
        _, info = load_checkpoint(model.source, "cpu")
        resolution = resolution or info.config.image_size
        if resolution % info.config.patch_size:
            raise EvalError(f"{model.source}: resolution {resolution} is not a multiple of the model's patch size "
                            f"{info.config.patch_size}")
    if resolution is None:
        raise EvalError("give the resolution (--resolution) when evaluating no checkpoint")
    return resolution


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


def _predictor(model: _Model, protocol: Protocol, device: torch.device) -> Predictor:
    if model.kind == "checkpoint":
        return CheckpointPredictor(load_checkpoint(model.source, device)[0], refined=model.refine > 0,
                                   resolution=protocol.resolution)
    if model.kind == "ply":
        return PlyPredictor(_ply_files(Path(model.source), list(protocol.sample_ids)))
    return {"flat": FlatPredictor, "hull": HullPredictor}[model.source]()


# ---- one model -----------------------------------------------------------------------------------


def _evaluate_model(model: _Model, sample_dirs: list[Path], protocol: Protocol, device: torch.device,
                    lpips_net, render_dir: Path) -> ViewMetrics:
    """Metrics [S, V] of one model over every sample; saves its renders into `render_dir`."""
    render_dir.mkdir()
    predictor = _predictor(model, protocol, device)
    per_sample = []
    start = time.perf_counter()
    for k, sample_dir in enumerate(sample_dirs):
        scene = prepare(sample_dir, protocol.input_views, protocol.heldout_views, protocol.resolution, predictor.crop,
                        predictor.input_resolution)
        prediction = predictor.predict(scene, device)
        gaussians = prediction.gaussians
        if model.refine:
            gaussians = refine_scene(gaussians, scene, model.refine).gaussians
        images, alphas = render_views(gaussians, scene.heldout_cameras(prediction.units), protocol.background)
        gt, mask = _ground_truth(scene.heldout, protocol)  # [H, 3, R, R], [H, 1, R, R]
        assert images.shape == gt.shape and alphas.shape == mask.shape, (images.shape, gt.shape, alphas.shape)
        # view_metrics checks the renders are in [0, 1] (to 1e-4: compositing rounding) and scores them clamped.
        metrics = view_metrics(images, gt.to(device), mask.to(device), alphas, lpips_net)
        per_sample.append(ViewMetrics(**{name: v.cpu() for name, v in metrics.as_dict().items()}))
        _save_renders(render_dir, scene.sample.sample_id, protocol.heldout_views, images.cpu(), alphas.cpu())
        log.info("%s: sample %d/%d %s: PSNR %s dB (foreground %s), IoU %s (%.1f s)", model.name, k + 1,
                 len(sample_dirs), scene.sample.sample_id, _fmt(metrics.psnr), _fmt(metrics.psnr_fg),
                 _fmt(metrics.iou, 3), time.perf_counter() - start)
    return ViewMetrics.stack(per_sample)


def _ground_truth(heldout: Sample, protocol: Protocol) -> tuple[Tensor, Tensor]:
    """The held-out frames [H] -> GT images [H, 3, R, R] and boolean foreground masks [H, 1, R, R] per the
    protocol's mask."""
    gt, spec = heldout.images, protocol.mask_spec
    if spec.source == "alpha" and heldout.mask_source != "alpha":
        raise EvalError(f"{heldout.path}: the images have no alpha channel (mask from {heldout.mask_source}), so "
                        "the protocol's alpha mask is unavailable; use --mask near_white:<t> for RGB data")
    return gt, spec.mask(gt, heldout.masks if spec.source == "alpha" else None)


def _save_renders(folder: Path, sample_id: str, views: tuple[int, ...], images: Tensor, alphas: Tensor) -> None:
    """<sample>.npz (float32 images [H, 3, R, R], alphas [H, 1, R, R], views [H]) and <sample>_view<k>.png."""
    np.savez(folder / f"{sample_id}.npz", images=images.numpy(), alphas=alphas.numpy(), views=np.array(views))
    for view, image in zip(views, images):
        iio.imwrite(folder / f"{sample_id}_view{view}.png",
                    (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def _write_grids(out: Path, protocol: Protocol, sample_dirs: list[Path], results: list[ModelResult]) -> dict:
    """GT | model | error for every model, rows = held-out views, for the worst / median / best samples;
    columns and rows labelled (`figures.comparison_grid`)."""
    chosen = grid_samples(results[0].metrics.psnr_fg, protocol.sample_ids)
    if not chosen:
        log.warning("no comparison grids: every held-out foreground mask of every sample is empty")
        return {}
    (out / "grids").mkdir(exist_ok=True)
    grids = {}
    for label in GRID_LABELS:
        if label not in chosen:
            continue
        index, value = chosen[label]
        heldout = prepare(sample_dirs[index], protocol.input_views, protocol.heldout_views, protocol.resolution).heldout
        gt, _ = _ground_truth(heldout, protocol)
        sample_id = heldout.sample_id
        preds = [torch.from_numpy(np.load(out / "renders" / r.name / f"{sample_id}.npz")["images"]) for r in results]
        path = out / "grids" / f"{label}_{sample_id}.png"
        rows = [f"{sample_id} view {v}" for v in protocol.heldout_views]
        save_image(path, comparison_grid(gt, preds, model_names=[r.name for r in results], row_labels=rows))
        grids[label] = {"sample": sample_id, "file": str(path.relative_to(out)), "psnr_fg_mean": value}
    return grids


def _fmt(values: Tensor | None, digits: int = 2) -> str:
    if values is None:
        return "-"
    return "/".join(f"{v:.{digits}f}" for v in values.tolist())
