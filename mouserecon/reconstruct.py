"""One sample of calibrated views -> a 3DGS .ply: `reconstruct(ReconstructOptions) -> ReconstructResult`.

Steps (each logged with its wall time):
  1. load the checkpoint (ours or FaceLift's; without one, the bundled demo checkpoint);
  2. load and validate the sample at the model resolution (`data.load_sample`: centre crop + resize);
  3. normalise the cameras to the model's rig with a similarity fitted to the *input* views
     (`normalize.normalize_cameras`: centre = optical-axes intersection, mean distance 2.7, the
     camera file's `world_up` -> +Z, or +Z when it records none);
  4. a model trained on crops (`input_crop` in its config) gets each input view cropped to a square
     around its foreground from the full-resolution image (`data.crop_to_foreground`), as in training;
     held-out scores use the whole frames of step 2, refinement the crops and the whole frames;
     run the GS-LRM once (no grad; bf16 autocast on CUDA) -> 2 token Gaussians + one per input pixel;
  5. drop non-finite Gaussians, prune those with opacity < `min_opacity`; with `refine` N > 0,
     drop those off the input silhouettes, optimise them for N steps against the input views and
     carve again (`refine.refine_inputs`), log masked PSNR / SSIM and IoU on the input and held-out views
     before and after, and prune again;
  6. write the PLY in model units, or mapped back to the user's frame (`units="input"`, e.g. mm),
     and a sidecar JSON (`mouse.ply` -> `mouse.json`) recording the similarity, the units, the
     checkpoint, the views, the counts and the timings;
  7. optionally render previews through `render.render` in the model frame (same pictures as
     rendering the user-frame Gaussians with the user's cameras): `inputs.png` and `heldout.png`
     (top row the views, bottom row the renders) and a turntable GIF or MP4. For a model trained on
     crops every frame is shown cropped around its mask (so each needs a visible mouse), the
     turntable zoomed likewise.

Views: `views` are indices into the camera file's frames, in the order given; the default is the
first 5 frames in file order (the Exp C recipe's 5 input views), or all frames if there are fewer.
Frames not used as input are the held-out views of the previews.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from mouserecon.errors import MouseReconError
from mouserecon.cameras import Cameras, look_at
from mouserecon.checkpoints import CheckpointInfo, load_checkpoint
from mouserecon.data import Sample, SampleError, crop_to_foreground, find_camera_file, load_sample
from mouserecon.gaussians import Gaussians
from mouserecon.normalize import Similarity, load_world_up, normalize_cameras
from mouserecon.ply import save_ply
from mouserecon.metrics import foreground_iou, psnr, ssim
from mouserecon.refine import RefineError, refine_inputs
from mouserecon.render import render

log = logging.getLogger(__name__)

DEFAULT_INPUT_VIEWS = 5  # Exp C: 5 input views per sample
DEFAULT_MIN_OPACITY = 0.005  # prune Gaussians below this opacity (about 1/255: invisible when rendered)
DEMO_CHECKPOINT = "demo_checkpoint.pt"  # in the mouserecon.assets package (trained in issue 8)
UNITS = ("model", "input")
DEVICES = ("auto", "cpu", "cuda")
TURNTABLE_FORMATS = ("gif", "mp4")
RENDER_BATCH = {"cpu": 1, "cuda": 8}  # views per render() call in previews (the torch backend's memory grows with it)


class ReconstructError(MouseReconError, ValueError):
    """Bad options or inputs for `reconstruct`; the message names the file or option and the defect."""


@dataclass(frozen=True)
class ReconstructOptions:
    """What to reconstruct and how.

    views_dir:     sample folder (`opencv_cameras.json` or `transforms.json` + images).
    output:        the .ply to write; its folder must exist; the sidecar is output.with_suffix(".json").
    checkpoint:    ours or FaceLift's; None = the bundled demo checkpoint.
    device:        "auto" (CUDA when available), "cpu" or "cuda".
    views:         input frame indices in the order given (>= 2, distinct); None = the first 5.
    resolution:    square side in pixels the images are resized to; None = the model's image_size.
    units:         "input" = the user's frame (the camera file's units, e.g. mm); "model" = normalised rig.
    min_opacity:   prune Gaussians with opacity below this (0 keeps all).
    refine:        steps of per-scene refinement against the input views (0 = feed-forward only).
    previews_dir:  where to write preview images; None = no previews.
    turntable_frames / turntable_format: the turntable preview (0 frames = none; "gif" or "mp4").
    """

    views_dir: Path
    output: Path
    checkpoint: Path | None = None
    device: str = "auto"
    views: tuple[int, ...] | None = None
    resolution: int | None = None
    units: str = "input"
    min_opacity: float = DEFAULT_MIN_OPACITY
    refine: int = 0
    previews_dir: Path | None = None
    turntable_frames: int = 36
    turntable_format: str = "gif"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "views_dir", Path(self.views_dir))
        set_(self, "output", Path(self.output))
        if self.checkpoint is not None:
            set_(self, "checkpoint", Path(self.checkpoint))
        if self.previews_dir is not None:
            set_(self, "previews_dir", Path(self.previews_dir))
        if self.device not in DEVICES:
            raise ReconstructError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.units not in UNITS:
            raise ReconstructError(f"units must be one of {UNITS}, got {self.units!r}")
        if self.output.suffix.lower() != ".ply":
            raise ReconstructError(f"{self.output}: the output must be a .ply file")
        if self.views is not None:
            views = tuple(self.views)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in views):
                raise ReconstructError(f"views must be integer frame indices, got {views!r}")
            if len(views) < 2 or len(set(views)) != len(views) or min(views) < 0:
                raise ReconstructError(f"views must be >= 2 distinct non-negative frame indices, got {list(views)}")
            set_(self, "views", views)
        if self.resolution is not None and not (isinstance(self.resolution, int) and self.resolution > 0):
            raise ReconstructError(f"resolution must be a positive integer, got {self.resolution!r}")
        if not (isinstance(self.min_opacity, (int, float)) and 0.0 <= self.min_opacity < 1.0):
            raise ReconstructError(f"min_opacity must be in [0, 1), got {self.min_opacity!r}")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0):
            raise ReconstructError(f"refine must be an integer >= 0 (steps), got {self.refine!r}")
        if not (isinstance(self.turntable_frames, int) and self.turntable_frames >= 0):
            raise ReconstructError(f"turntable_frames must be an integer >= 0, got {self.turntable_frames!r}")
        if self.turntable_format not in TURNTABLE_FORMATS:
            raise ReconstructError(f"turntable_format must be one of {TURNTABLE_FORMATS}, got {self.turntable_format!r}")


@dataclass(frozen=True)
class ReconstructResult:
    """What `reconstruct` wrote and measured.

    gaussians: the written set [N] (CPU float32, in `units`). similarity: user -> model frame
    (x_model = s R x_user + t). views / heldout_views: frame indices. Counts: predicted =
    2 + V*H*W; written = predicted - nonfinite - pruned (pruned: below `min_opacity`, or carved off the
    input silhouettes by refinement). timings: seconds per step.
    """

    ply_path: Path
    sidecar_path: Path
    gaussians: Gaussians
    similarity: Similarity
    units: str
    views: tuple[int, ...]
    heldout_views: tuple[int, ...]
    resolution: int
    numpredicted: int
    num_nonfinite: int
    num_pruned: int
    refine_metrics: dict | None = None  # {"before"|"after": {"inputs"|"heldout": {psnr_fg, ssim_fg, iou}}}
    refine_carved: tuple[int, int] = (0, 0)  # Gaussians off the input silhouettes, dropped before / after refining
    preview_files: tuple[Path, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_written(self) -> int:
        return self.gaussians.num


def reconstruct(options: ReconstructOptions) -> ReconstructResult:
    """Run steps 1-7 of the module docstring; raise ReconstructError / SampleError / CameraError /
    CheckpointError naming the file and the defect for bad inputs."""
    o = options
    timings: dict[str, float] = {}
    camera_file, checkpoint_path = _check_paths(o)
    device = pick_device(o.device)

    with _timed("loading checkpoint", timings):
        model, info = load_checkpoint(checkpoint_path, device)
    config = info.config
    log.info("checkpoint %s: %s format, d=%d, %d layers, patch %d, %s parameters, step %s",
             checkpoint_path, info.format, config.d, config.n_layer, config.patch_size, f"{info.n_params:,}", info.step)
    if o.units == "input" and config.sh_degree > 0:
        raise ReconstructError(f"{checkpoint_path}: SH degree {config.sh_degree} Gaussians cannot be mapped to the "
                               "input frame (view-dependent colour would need rotating); use units 'model'")
    resolution = o.resolution or config.image_size
    if resolution % config.patch_size:
        raise ReconstructError(f"resolution {resolution} is not a multiple of the model's patch size "
                               f"{config.patch_size} ({checkpoint_path})")

    with _timed("loading sample", timings):
        sample = load_sample(camera_file, resolution)  # all frames, [F, 3, R, R]
    views = _input_views(o.views, sample.num_views, camera_file)
    heldout = tuple(i for i in range(sample.num_views) if i not in views)
    log.info("sample %s: %d frames, %s, mask from %s; input views %s, held out %s", sample.path, sample.num_views,
             f"{resolution}x{resolution}", sample.mask_source, list(views), list(heldout))

    up = load_world_up(camera_file)
    if up is None:
        log.info("%s records no world_up: taking +Z as the world up axis", camera_file.name)
        up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    with _timed("normalising cameras", timings):
        _, similarity = normalize_cameras(sample.cameras[list(views)], up=up)
    cameras = similarity.apply_cameras(sample.cameras)  # [F] all frames in the model frame
    _log_similarity(similarity, up)

    inputs, full = sample.select(views), None
    if config.input_crop is not None:
        with _timed("cropping the inputs", timings):
            full = load_sample(camera_file)  # all frames at full resolution, also for the previews
            inputs = crop_to_foreground(full.select(views), resolution, config.input_crop)
        log.info("input views cropped to a square around the mouse (margin %g, as the model was trained), "
                 "from the full-resolution images", config.input_crop)
    input_cameras = similarity.apply_cameras(inputs.cameras)
    with _timed("running the model", timings):
        predicted = predict(model, inputs.images, input_cameras, device)
    numpredicted = predicted.num
    assert numpredicted == config.n_gaussians + len(views) * resolution * resolution, numpredicted

    finite = predicted.drop_nonfinite()
    kept = finite.prune(o.min_opacity)
    log.info("Gaussians: %d predicted, %d non-finite dropped, %d with opacity < %g pruned, %d kept",
             numpredicted, numpredicted - finite.num, finite.num - kept.num, o.min_opacity, kept.num)
    refine_metrics, refine_carved = None, (0, 0)
    if o.refine:
        with _timed(f"refining ({o.refine} steps)", timings):
            crops = None if full is None else replace(inputs, cameras=input_cameras)
            kept, refine_metrics, refine_carved = _refine(kept, sample, cameras.to(device), views, heldout,
                                                          o.refine, crops)
        before = kept.num
        kept = kept.prune(o.min_opacity)
        log.info("after refinement: %d Gaussians with opacity < %g pruned, %d kept", before - kept.num,
                 o.min_opacity, kept.num)

    written = kept if o.units == "model" else _to_user_frame(kept, similarity).drop_nonfinite()  # float32 overflow
    with _timed("writing PLY", timings):
        save_ply(o.output, written, comments=(f"mouserecon reconstruct; units {o.units}; sidecar "
                                              f"{o.output.with_suffix('.json').name}",))

    preview_files: tuple[Path, ...] = ()
    if o.previews_dir is not None:
        with _timed("rendering previews", timings):
            shown, shown_cameras = sample, cameras
            if full is not None:  # a crop model: show every frame the way it saw its inputs
                shown = crop_to_foreground(full, resolution, config.input_crop)
                shown_cameras = similarity.apply_cameras(shown.cameras)
            preview_files = write_previews(o.previews_dir, kept.to(device), shown, shown_cameras, views, heldout,
                                           o.turntable_frames, o.turntable_format)
    result = ReconstructResult(
        ply_path=o.output, sidecar_path=o.output.with_suffix(".json"), gaussians=written, similarity=similarity,
        units=o.units, views=views, heldout_views=heldout, resolution=resolution, numpredicted=numpredicted,
        num_nonfinite=numpredicted - finite.num + kept.num - written.num, num_pruned=finite.num - kept.num,
        refine_metrics=refine_metrics, refine_carved=refine_carved, preview_files=preview_files, timings=timings,
    )
    _write_sidecar(result, o, info, sample, up, str(device))
    log.info("wrote %s (%d Gaussians, %s units) and %s; total %.1f s", result.ply_path, result.num_written,
             o.units, result.sidecar_path.name, sum(timings.values()))
    return result


# ---- steps -------------------------------------------------------------------------------------


def demo_checkpoint() -> Path:
    """The bundled demo checkpoint's path (it may not exist yet)."""
    return Path(str(importlib.resources.files("mouserecon.assets") / DEMO_CHECKPOINT))


def _check_paths(o: ReconstructOptions) -> tuple[Path, Path]:
    """Cheap checks before any heavy work -> (camera file, checkpoint file)."""
    if not o.views_dir.is_dir():
        defect = "not a folder (give the sample folder)" if o.views_dir.exists() else "views folder not found"
        raise ReconstructError(f"{o.views_dir}: {defect}")
    camera_file = find_camera_file(o.views_dir)
    if camera_file is None:
        raise SampleError(f"{o.views_dir}: not a sample folder (no opencv_cameras.json or transforms.json)")
    if not o.output.parent.is_dir():
        raise ReconstructError(f"{o.output}: output folder {o.output.parent} does not exist")
    if o.previews_dir is not None and not o.previews_dir.parent.is_dir():
        raise ReconstructError(f"{o.previews_dir}: its parent folder does not exist")
    if o.previews_dir is not None and o.turntable_frames and o.turntable_format == "mp4" \
            and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ReconstructError("an MP4 turntable needs the imageio-ffmpeg package (pip install imageio-ffmpeg), "
                               "which is not installed; use the GIF format instead")
    checkpoint = o.checkpoint
    if checkpoint is None:
        checkpoint = demo_checkpoint()
        if not checkpoint.is_file():
            raise ReconstructError(
                f"no checkpoint given and the bundled demo checkpoint ({checkpoint}) is not part of this "
                "installation yet; pass --checkpoint with a mouserecon checkpoint (from `mouserecon finetune`) "
                "or a FaceLift GS-LRM checkpoint (e.g. ckpt_0000000000021125.pt)"
            )
        log.info("no checkpoint given: using the bundled demo checkpoint %s", checkpoint)
    elif not checkpoint.is_file():
        raise ReconstructError(f"{checkpoint}: checkpoint file not found")
    return camera_file, checkpoint


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ReconstructError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _input_views(views: tuple[int, ...] | None, num_frames: int, camera_file: Path) -> tuple[int, ...]:
    if views is None:
        return tuple(range(min(DEFAULT_INPUT_VIEWS, num_frames)))
    if max(views) >= num_frames:
        raise ReconstructError(f"{camera_file}: views {list(views)} out of range; the sample has {num_frames} "
                               f"frames (indices 0..{num_frames - 1})")
    return views


def _log_similarity(similarity: Similarity, up: Tensor) -> None:
    inverse = similarity.inverse()
    centre = inverse.apply_points(torch.zeros(3, dtype=torch.float64))  # the user-frame point at the origin
    log.info("normalised: centre %s (input units) -> origin, scale %.6g (mean camera distance %.4g input units -> "
             "2.7), up %s -> +Z", _fmt(centre), similarity.scale, 2.7 / similarity.scale, _fmt(up))


def predict(model, images: Tensor, cameras: Cameras, device: torch.device) -> Gaussians:
    """images [V, 3, H, W], cameras [V] (model frame) -> Gaussians [2 + V*H*W] float32 on `device`."""
    images = images[None].to(device)  # [1, V, 3, H, W]
    cameras = cameras[None].to(device)  # [1, V]
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        gaussians = model(images, cameras)  # [1, n]
    return gaussians[0].to(torch.float32)


def _refine(gaussians: Gaussians, sample: Sample, cameras: Cameras, views: tuple[int, ...], heldout: tuple[int, ...],
            steps: int, crops: Sample | None) -> tuple[Gaussians, dict, tuple[int, int]]:
    """Refine against the input views (and, for a crop model, their crops `crops`, cameras in the model
    frame, as in training); score the whole input and held-out views before and after -> the refined
    Gaussians, the scores and the counts carved before and after."""
    images, masks = sample.images.to(gaussians.device), sample.masks.to(gaussians.device)  # all frames
    scores = {"before": _view_scores(gaussians, images, masks, cameras, views, heldout)}
    whole = replace(sample.select(views), cameras=cameras[list(views)]).to(gaussians.device)
    try:
        result = refine_inputs(gaussians, whole, None if crops is None else crops.to(gaussians.device), steps)
    except RefineError as err:
        raise ReconstructError(f"{sample.path}: {err}") from None
    scores["after"] = _view_scores(result.gaussians, images, masks, cameras, views, heldout)
    for group, frames in (("inputs", views), ("heldout", heldout)):
        if frames:
            b, a = scores["before"][group], scores["after"][group]
            log.info("refine: %s views %s: foreground PSNR %.2f -> %.2f dB, SSIM %.4f -> %.4f, IoU %.3f -> %.3f",
                     group, list(frames), b["psnr_fg"], a["psnr_fg"], b["ssim_fg"], a["ssim_fg"], b["iou"], a["iou"])
    return result.gaussians, scores, result.carved


def _view_scores(gaussians: Gaussians, images: Tensor, masks: Tensor, cameras: Cameras, views: tuple[int, ...],
                 heldout: tuple[int, ...]) -> dict:
    """Mean foreground PSNR / SSIM and IoU over the input and the held-out frames (images [F, 3, H, W])."""
    scores = {}
    for group, frames in (("inputs", views), ("heldout", heldout)):
        if not frames:
            continue
        frames = list(frames)
        with torch.no_grad():
            out = render(gaussians, cameras[frames], cameras.height, cameras.width)
        pred, gt, fg = out.images.clamp(0, 1), images[frames], masks[frames] > 0.5
        scores[group] = {"psnr_fg": psnr(pred, gt, fg).nanmean().item(), "ssim_fg": ssim(pred, gt, fg).nanmean().item(),
                         "iou": foreground_iou(out.alphas, masks[frames]).nanmean().item()}
    return scores


def _to_user_frame(gaussians: Gaussians, similarity: Similarity) -> Gaussians:
    """Model frame -> the user's frame with the inverse similarity (computed in float64)."""
    inverse = similarity.inverse()
    mapped = gaussians.to(device="cpu", dtype=torch.float64).transform(inverse.rotation, inverse.translation,
                                                                       inverse.scale)
    return mapped.to(torch.float32)


def _write_sidecar(result: ReconstructResult, o: ReconstructOptions, info: CheckpointInfo, sample: Sample,
                   up: Tensor, device: str) -> None:
    record = {
        "ply": result.ply_path.name,
        "units": result.units,
        "units_note": ("the camera file's units (e.g. mm)" if result.units == "input"
                       else "the model's normalised frame (object at the origin, cameras ~2.7 away, +Z up)"),
        "similarity_user_to_model": result.similarity.to_dict(),  # x_model = scale * R x_user + t
        "similarity_model_to_user": result.similarity.inverse().to_dict(),
        "world_up": up.tolist(),
        "sample": str(sample.path),
        "camera_file": str(find_camera_file(sample.path)),
        "views": list(result.views),
        "heldout_views": list(result.heldout_views),
        "resolution": result.resolution,
        "mask_source": sample.mask_source,
        "checkpoint": {"path": info.path, "format": info.format, "step": info.step, "n_params": info.n_params,
                       "config": asdict(info.config)},
        "device": device,
        "min_opacity": o.min_opacity,
        "refine": {"steps": o.refine, "carved": dict(zip(("before", "after"), result.refine_carved)),
                   "metrics": result.refine_metrics},
        "counts": {"predicted": result.numpredicted, "nonfinite": result.num_nonfinite,
                   "pruned": result.num_pruned, "written": result.num_written},
        "previews": [str(p) for p in result.preview_files],
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
    }
    tmp = result.sidecar_path.with_name(result.sidecar_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(result.sidecar_path)


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


def write_previews(out_dir: Path, gaussians: Gaussians, sample: Sample, cameras: Cameras, views: tuple[int, ...],
                   heldout: tuple[int, ...], turntable_frames: int, turntable_format: str) -> tuple[Path, ...]:
    """Render `gaussians` [N] (model frame) into the sample's frames (`cameras` [F], model frame) and a
    turntable; write inputs.png, heldout.png (when any) and turntable.gif/.mp4 (when frames > 0)."""
    out_dir.mkdir(exist_ok=True)
    files = []
    for name, label, frames in (("inputs", "input views", views), ("heldout", "held-out views", heldout)):
        if not frames:
            log.info("previews: no %s", label)
            continue
        renders = _render_views(gaussians, cameras[list(frames)], label)  # [V, 3, H, W]
        truth = sample.images[list(frames)]  # [V, 3, H, W]
        grid = torch.cat([torch.cat(list(truth), -1), torch.cat(list(renders), -1)], -2)  # [3, 2H, V*W]
        files.append(out_dir / f"{name}.png")
        iio.imwrite(files[-1], _to_uint8(grid))
    if turntable_frames:
        frames = _render_views(gaussians, turntable_cameras(cameras[list(views)], turntable_frames),
                               "turntable frames")  # [N, 3, H, W]
        files.append(out_dir / f"turntable.{turntable_format}")
        pixels = np.stack([_to_uint8(f) for f in frames])  # [N, H, W, 3]
        if turntable_format == "gif":
            iio.imwrite(files[-1], pixels, duration=1000 / 12, loop=0)
        else:
            iio.imwrite(files[-1], pixels, plugin="FFMPEG", fps=12, codec="libx264")
    log.info("previews: %s", ", ".join(str(f) for f in files))
    return tuple(files)


def _render_views(gaussians: Gaussians, cameras: Cameras, what: str) -> Tensor:
    """Gaussians [N] into cameras [V] -> images [V, 3, H, W] on white, CPU; logs progress."""
    out = []
    batch = RENDER_BATCH[gaussians.device.type]
    start_time = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(cameras), batch):
            chunk = cameras[start:start + batch]
            out.append(render(gaussians, chunk, chunk.height, chunk.width).images.cpu())
            log.info("  rendered %d/%d %s (%.1f s)", start + len(chunk), len(cameras), what,
                     time.perf_counter() - start_time)
    return torch.cat(out)


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
