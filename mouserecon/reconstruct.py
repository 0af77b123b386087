"""One sample of calibrated views -> a 3DGS .ply: `reconstruct(ReconstructOptions) -> ReconstructResult`.

Steps (each logged with its wall time), all but the first and the last two through `pipeline`:
  1. load the checkpoint (ours or FaceLift's; without one, the bundled demo checkpoint); `method="hull"`
     uses no model: step 3 carves the visual hull of the input masks instead (`pipeline.HullPredictor`);
  2. prepare the scene (`pipeline.prepare`): the input and held-out frames at `resolution` (default the
     model's), the similarity to the model's rig centred on the mouse, and the inputs as the model was
     trained to see them (at its resolution; aimed crops around the mouse for a model trained on crops);
  3. run the GS-LRM once (`pipeline.CheckpointPredictor`) -> 2 token Gaussians + one per input pixel (a
     `hull_depth` model: per foreground input pixel, plus the hull's voxels where they leave the input
     silhouettes uncovered at `resolution`, `baselines.hull_fill`);
  4. drop non-finite Gaussians, prune those with opacity < `min_opacity`; with `refine` N > 0, drop
     those off the input silhouettes, optimise them for N steps against the input views and carve
     again (`pipeline.refine_scene`), log masked PSNR / SSIM and IoU on the input and held-out views
     before and after, and prune again;
  5. write the PLY in model units, or mapped back to the user's frame (`units="input"`, e.g. mm),
     and its sidecar (`sidecar.Sidecar`: `mouse.ply` -> `mouse.json`) recording the similarity, the
     units, the checkpoint, the views, the counts and the timings;
  6. optionally render previews in the model frame (same pictures as rendering the user-frame
     Gaussians with the user's cameras): `inputs.png` and `heldout.png` (top row the views, bottom row
     the renders) and a turntable GIF or MP4. For a model trained on crops every frame is shown
     cropped around its mask (so each needs a visible mouse), the turntable zoomed likewise.

Views: `inputs` are indices into the camera file's frames, in the order given; the default is the
first 5 frames in file order (the Exp C recipe's 5 input views), or all frames if there are fewer.
`heldout` (default: every other frame) are the held-out views of the scores and previews.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from mouserecon.cameras import Cameras, find_camera_file, look_at
from mouserecon.checkpoints import CheckpointInfo, load_checkpoint, resolve_checkpoint
from mouserecon.data import Sample, SampleError
from mouserecon.device import pick_device
from mouserecon.gaussians import Gaussians
from mouserecon.normalize import Similarity
from mouserecon.options import ReconstructError, ReconstructOptions
from mouserecon.pipeline import (HULL_RESOLUTION, CheckpointPredictor, HullPredictor, Prediction, Scene, prepare,
                                 refine_scene, render_views, scene_crops, to_user_frame, view_scores)
from mouserecon.ply import save_ply
from mouserecon.sidecar import UNITS_NOTES, Sidecar

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ReconstructResult:
    """What `reconstruct` wrote and measured.

    gaussians: the written set [N] (CPU float32, in `units`). similarity: user -> model frame
    (x_model = s R x_user + t). inputs / heldout: frame indices. Counts: predicted =
    2 + V*H*W; written = predicted - nonfinite - pruned (pruned: below `min_opacity`, or carved off the
    input silhouettes by refinement). timings: seconds per step.
    """

    ply_path: Path
    sidecar_path: Path
    gaussians: Gaussians
    similarity: Similarity
    units: str
    inputs: tuple[int, ...]
    heldout: tuple[int, ...]
    resolution: int
    num_predicted: int
    num_nonfinite: int
    num_pruned: int
    num_filled: int = 0  # of num_predicted: the hull's Gaussians filling what the model left uncovered
    refine_metrics: dict | None = None  # {"before"|"after": {"inputs"|"heldout": {psnr_fg, ssim_fg, iou}}}
    refine_carved: tuple[int, int] = (0, 0)  # Gaussians off the input silhouettes, dropped before / after refining
    preview_files: tuple[Path, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_written(self) -> int:
        return self.gaussians.num


def reconstruct(options: ReconstructOptions) -> ReconstructResult:
    """Run steps 1-6 of the module docstring; raise a MouseReconError (ReconstructError, SampleError,
    CameraError, CheckpointError, ...) naming the file and the defect for bad inputs."""
    o = options
    timings: dict[str, float] = {}
    checkpoint_path = _check_paths(o)
    device = pick_device(o.device)
    if o.method == "hull":
        info, predictor, resolution = None, HullPredictor(), o.resolution or HULL_RESOLUTION
    else:
        with _timed("loading checkpoint", timings):
            model, info = load_checkpoint(checkpoint_path, device)
        config = info.config
        log.info("checkpoint %s: %s format, d=%d, %d layers, patch %d, %s parameters, step %s", checkpoint_path,
                 info.format, config.d, config.n_layer, config.patch_size, f"{info.n_params:,}", info.step)
        if o.units == "input" and config.sh_degree > 0:
            raise ReconstructError(f"{checkpoint_path}: SH degree {config.sh_degree} Gaussians cannot be mapped to "
                                   "the input frame (view-dependent colour would need rotating); use units 'model'")
        resolution = o.resolution or config.image_size
        predictor = CheckpointPredictor(model, refined=o.refine > 0, resolution=resolution)
    with _timed("loading sample", timings):
        scene = prepare(o.views_dir, o.inputs, o.heldout, resolution, predictor.crop, predictor.input_resolution)
    seen = scene.inputs.cameras.height
    log.info("sample %s: %s, mask from %s; input views %s, held out %s; %s sees them %s at %d px", scene.sample.path,
             f"{resolution}x{resolution}", scene.sample.mask_source, list(scene.input_views),
             list(scene.heldout_views), "the visual hull" if info is None else "the model",
             "as whole frames" if scene.crop is None else f"cropped around the mouse (margin {scene.crop:g})", seen)
    _log_similarity(scene.similarity, scene.world_up)
    with _timed("carving the visual hull" if info is None else "running the model", timings):
        prediction = predictor.predict(scene, device)
    return finish(prediction, scene, o, info, str(device), timings)


def finish(prediction: Prediction, scene: Scene, o: ReconstructOptions, info: CheckpointInfo | None, device: str,
           timings: dict[str, float]) -> ReconstructResult:
    """Steps 4-6 for one scene's prediction: prune, refine, write the PLY, the previews and the sidecar
    (`timings` holds the earlier steps' and gets these)."""
    kept = prediction.gaussians.prune(o.min_opacity)
    log.info("Gaussians: %d predicted (%d of them filled in from the visual hull), %d non-finite dropped, "
             "%d with opacity < %g pruned, %d kept", prediction.num_predicted, prediction.num_filled,
             prediction.num_nonfinite, prediction.gaussians.num - kept.num, o.min_opacity,
             kept.num)
    refine_metrics, refine_carved = None, (0, 0)
    if o.refine:
        with _timed(f"refining ({o.refine} steps)", timings):
            kept, refine_metrics, refine_carved = _refine(kept, scene, o.refine)
        before = kept.num
        kept = kept.prune(o.min_opacity)
        log.info("after refinement: %d Gaussians with opacity < %g pruned, %d kept", before - kept.num,
                 o.min_opacity, kept.num)

    written = kept.to("cpu") if o.units == "model" else to_user_frame(kept, scene.similarity)
    sidecar_path = Sidecar.path_for(o.output)
    with _timed("writing PLY", timings):
        save_ply(o.output, written, comments=(f"mouserecon reconstruct; units {o.units}; sidecar {sidecar_path.name}",))

    preview_files: tuple[Path, ...] = ()
    if o.previews_dir is not None:
        with _timed("rendering previews", timings):
            preview_files = write_previews(o.previews_dir, kept, _shown(scene), scene.num_inputs, o.turntable_frames,
                                           o.turntable_format)
    result = ReconstructResult(
        ply_path=o.output, sidecar_path=sidecar_path, gaussians=written, similarity=scene.similarity, units=o.units,
        inputs=scene.input_views, heldout=scene.heldout_views, resolution=scene.resolution,
        num_predicted=prediction.num_predicted, num_nonfinite=prediction.num_nonfinite + kept.num - written.num,
        num_pruned=prediction.gaussians.num - kept.num, num_filled=prediction.num_filled,
        refine_metrics=refine_metrics, refine_carved=refine_carved,
        preview_files=preview_files, timings=timings,
    )
    _sidecar(result, o, info, scene, device).write(sidecar_path)
    log.info("wrote %s (%d Gaussians, %s units) and %s; total %.1f s", result.ply_path, result.num_written,
             o.units, sidecar_path.name, sum(timings.values()))
    return result


# ---- steps -------------------------------------------------------------------------------------


def _check_paths(o: ReconstructOptions) -> Path | None:
    """Cheap checks before any heavy work -> the checkpoint file (None for the visual hull)."""
    if not o.views_dir.is_dir():
        defect = "not a folder (give the sample folder)" if o.views_dir.exists() else "views folder not found"
        raise ReconstructError(f"{o.views_dir}: {defect}")
    if find_camera_file(o.views_dir) is None:
        raise SampleError(f"{o.views_dir}: not a sample folder (no opencv_cameras.json or transforms.json)")
    if not o.output.parent.is_dir():
        raise ReconstructError(f"{o.output}: output folder {o.output.parent} does not exist")
    if o.previews_dir is not None and not o.previews_dir.parent.is_dir():
        raise ReconstructError(f"{o.previews_dir}: its parent folder does not exist")
    if o.previews_dir is not None and o.turntable_frames and o.turntable_format == "mp4" \
            and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ReconstructError("an MP4 turntable needs the imageio-ffmpeg package (pip install imageio-ffmpeg), "
                               "which is not installed; use the GIF format instead")
    return None if o.method == "hull" else resolve_checkpoint(o.checkpoint)


def _log_similarity(similarity: Similarity, up: Tensor) -> None:
    inverse = similarity.inverse()
    centre = inverse.apply_points(torch.zeros(3, dtype=torch.float64))  # the user-frame point at the origin
    log.info("normalised: centre %s (input units) -> origin, scale %.6g (mean camera distance %.4g input units -> "
             "2.7), up %s -> +Z", _fmt(centre), similarity.scale, 2.7 / similarity.scale, _fmt(up))


def _refine(gaussians: Gaussians, scene: Scene, steps: int) -> tuple[Gaussians, dict, tuple[int, int]]:
    """Refine against the input views (`pipeline.refine_scene`); score the whole input and held-out views
    before and after -> the refined Gaussians, the scores and the counts carved before and after."""
    scores = {"before": view_scores(gaussians, scene)}
    result = refine_scene(gaussians, scene, steps)
    scores["after"] = view_scores(result.gaussians, scene)
    for group, frames in (("inputs", scene.input_views), ("heldout", scene.heldout_views)):
        if frames:
            b, a = scores["before"][group], scores["after"][group]
            log.info("refine: %s views %s: foreground PSNR %.2f -> %.2f dB, SSIM %.4f -> %.4f, IoU %.3f -> %.3f",
                     group, list(frames), b["psnr_fg"], a["psnr_fg"], b["ssim_fg"], a["ssim_fg"], b["iou"], a["iou"])
    return result.gaussians, scores, result.carved


def _sidecar(result: ReconstructResult, o: ReconstructOptions, info, scene: Scene, device: str) -> Sidecar:
    return Sidecar(
        ply=result.ply_path.name, units=result.units, units_note=UNITS_NOTES[result.units],
        similarity_user_to_model=result.similarity.to_dict(),
        similarity_model_to_user=result.similarity.inverse().to_dict(),
        world_up=scene.world_up.tolist(), sample=str(scene.sample.path),
        camera_file=str(find_camera_file(scene.sample.path)),
        input_views=list(result.inputs), heldout_views=list(result.heldout), resolution=result.resolution,
        input_resolution=scene.inputs.cameras.height,
        mask_source=scene.sample.mask_source,
        method=o.method,
        checkpoint=None if info is None else {"path": info.path, "format": info.format, "step": info.step,
                                              "n_params": info.n_params, "config": asdict(info.config)},
        device=device, min_opacity=o.min_opacity,
        refine={"steps": o.refine, "carved": dict(zip(("before", "after"), result.refine_carved)),
                "metrics": result.refine_metrics},
        counts={"predicted": result.num_predicted, "filled": result.num_filled, "nonfinite": result.num_nonfinite,
                "pruned": result.num_pruned, "written": result.num_written},
        previews=[str(p) for p in result.preview_files],
        timings_s={k: round(v, 4) for k, v in result.timings.items()},
    )


def _shown(scene: Scene) -> Sample:
    """Every frame of the scene as the previews show it, model frame: for a crop model each frame cropped
    as the model saw its inputs (aimed at the mouse), else the frames at the scene resolution."""
    return scene.sample if scene.full is None else scene_crops(scene)


# ---- previews ----------------------------------------------------------------------------------


def turntable_cameras(cameras: Cameras, num_frames: int) -> Cameras:
    """Cameras [num_frames] on a circle around +Z, looking at the origin (model frame, world up +Z).

    Distance = the mean distance of `cameras` [V] to the origin; elevation = their mean elevation;
    azimuths start at the first camera's and go round once in equal steps. Intrinsics: the mean
    focal lengths, principal point at the image centre (so the origin projects to the centre).
    """
    assert cameras.c2w.ndim == 3 and num_frames >= 1, f"cameras must be [V], got {tuple(cameras.c2w.shape)}"
    centres = cameras.centers.double()  # [V, 3]
    distance = centres.norm(dim=-1).mean().item()
    elevation = torch.asin(centres[:, 2] / centres.norm(dim=-1)).mean().item()
    if abs(math.degrees(elevation)) > 89.0:
        raise ReconstructError(f"mean camera elevation {math.degrees(elevation):.1f} deg: a turntable around +Z "
                               "is undefined for cameras looking straight down or up")
    start = math.atan2(centres[0, 1].item(), centres[0, 0].item())
    azimuths = start + torch.arange(num_frames, dtype=torch.float64) * (2 * math.pi / num_frames)  # [N]
    eye = distance * torch.stack([math.cos(elevation) * azimuths.cos(), math.cos(elevation) * azimuths.sin(),
                                  torch.full_like(azimuths, math.sin(elevation))], -1)  # [N, 3]
    c2w = look_at(eye, torch.zeros_like(eye))  # [N, 4, 4], world up +Z
    fx, fy = cameras.intrinsics[:, 0].double().mean().item(), cameras.intrinsics[:, 1].double().mean().item()
    intrinsics = torch.tensor([fx, fy, cameras.width / 2, cameras.height / 2], dtype=torch.float64)
    return Cameras(c2w.float(), intrinsics.float().expand(num_frames, 4).clone(), cameras.width, cameras.height)


def write_previews(out_dir: Path, gaussians: Gaussians, shown: Sample, num_inputs: int, turntable_frames: int,
                   turntable_format: str) -> tuple[Path, ...]:
    """Render `gaussians` [N] (model frame) into the frames of `shown` (the input views, then the held-out
    views, cameras in the model frame) and a turntable around the input cameras; write inputs.png,
    heldout.png (when any) and turntable.gif/.mp4 (when frames > 0)."""
    out_dir.mkdir(exist_ok=True)
    files = []
    groups = (("inputs", "input views", range(num_inputs)), ("heldout", "held-out views", range(num_inputs, shown.num_views)))
    for name, label, frames in groups:
        if not frames:
            log.info("previews: no %s", label)
            continue
        renders, _ = render_views(gaussians, shown.cameras[list(frames)], desc=f"rendering {label}")  # [V, 3, H, W]
        truth = shown.images[list(frames)]  # [V, 3, H, W]
        grid = torch.cat([torch.cat(list(truth), -1), torch.cat(list(renders.cpu()), -1)], -2)  # [3, 2H, V*W]
        files.append(out_dir / f"{name}.png")
        iio.imwrite(files[-1], _to_uint8(grid))
    if turntable_frames:
        cameras = turntable_cameras(shown.cameras[:num_inputs], turntable_frames)
        frames, _ = render_views(gaussians, cameras, desc="rendering the turntable")  # [N, 3, H, W]
        files.append(out_dir / f"turntable.{turntable_format}")
        pixels = np.stack([_to_uint8(f) for f in frames.cpu()])  # [N, H, W, 3]
        if turntable_format == "gif":
            iio.imwrite(files[-1], pixels, duration=1000 / 12, loop=0)
        else:
            iio.imwrite(files[-1], pixels, plugin="FFMPEG", fps=12, codec="libx264")
    log.info("previews: %s", ", ".join(str(f) for f in files))
    return tuple(files)


def _to_uint8(image: Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ---- logging -----------------------------------------------------------------------------------


@contextmanager
def _timed(step: str, timings: dict[str, float]):
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start
    log.info("%s ... %.2f s", step, timings[step])


def _fmt(vector: Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in vector.tolist()) + "]"
