"""The `mouserecon` command line: thin wrappers, options -> config -> one library call.

Library modules are imported inside each command so that `mouserecon --help` stays fast and
needs no CUDA, gsplat kernels, browser or network.
"""

from __future__ import annotations

import logging
import sys

import click


def _not_built(name: str, issue: str) -> None:
    click.echo(f"mouserecon {name}: not built yet ({issue}).", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Multi-view 3D Gaussian reconstruction of mice with a fine-tuned GS-LRM."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


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
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .ply to write.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Ours or FaceLift's; default: the bundled demo.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Default: auto (CUDA when available).")
@click.option("--views", callback=_view_list, help="Input frame indices, e.g. 0,1,2,3,4 (default: the first 5).")
@click.option("--resolution", type=int, help="Square image side for the model (default: the model's).")
@click.option("--units", type=click.Choice(["input", "model"]),
              help="input (default): the camera file's frame and units (e.g. mm); model: the normalised rig.")
@click.option("--min-opacity", type=float, help="Prune Gaussians below this opacity (default 0.005).")
@click.option("--previews", "previews_dir", type=click.Path(file_okay=False),
              help="Write inputs.png, heldout.png and a turntable here.")
@click.option("--turntable", "turntable_frames", type=int, help="Turntable frames with --previews (default 36; 0: none).")
@click.option("--turntable-format", type=click.Choice(["gif", "mp4"]), help="Default gif; mp4 needs imageio-ffmpeg.")
def reconstruct(views_dir: str, output: str, **given) -> None:
    """Reconstruct a sample folder of calibrated views (VIEWS) into a 3DGS .ply plus a sidecar .json."""
    from mouserecon.cameras import CameraError
    from mouserecon.checkpoints import CheckpointError
    from mouserecon.data import SampleError
    from mouserecon.reconstruct import ReconstructError, ReconstructOptions
    from mouserecon.reconstruct import reconstruct as run

    # Progress goes to stdout (plain lines); warnings and errors to stderr with their level.
    package_log = logging.getLogger("mouserecon")
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    verbose = click.get_current_context().find_root().params.get("verbose")
    level, propagate = package_log.level, package_log.propagate
    package_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    package_log.propagate = False
    package_log.addHandler(progress)
    package_log.addHandler(problems)
    try:
        # Defaults live in ReconstructOptions only: pass what was given.
        options = ReconstructOptions(views_dir, output, **{k: v for k, v in given.items() if v is not None})
        result = run(options)
    except (ReconstructError, SampleError, CameraError, CheckpointError) as err:
        raise click.ClickException(str(err)) from None
    finally:
        package_log.removeHandler(progress)
        package_log.removeHandler(problems)
        package_log.propagate = propagate
        package_log.setLevel(level)
    click.echo(f"{result.ply_path}: {result.num_written} Gaussians ({result.units} units); {result.sidecar_path}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--d-head", type=int, default=None, help="Attention head width (FaceLift checkpoints with d != 1024).")
def info(checkpoint: str, d_head: int | None) -> None:
    """Show what a checkpoint (ours or FaceLift's) holds: format, config, parameters, step, recipe."""
    from mouserecon.checkpoints import CheckpointError, describe_checkpoint

    try:
        click.echo(describe_checkpoint(checkpoint, d_head=d_head))
    except CheckpointError as err:
        raise click.ClickException(str(err)) from None


# ---- finetune ----------------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def finetune() -> None:
    """Fine-tune a GS-LRM with the stable Exp C recipe."""
    _not_built("finetune", "issue 5")


# ---- eval --------------------------------------------------------------------------------------


@main.command(name="eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def eval_() -> None:
    """Held-out PSNR / SSIM / LPIPS under an explicit protocol."""
    _not_built("eval", "issue 6")


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
def view(plys, camera_file, sample_dir, host, port, up, render_dir) -> None:
    """Open PLY files (one toggleable layer each) in a viser web viewer; Ctrl-C stops it."""
    from mouserecon.viewer.app import ViewerError, serve

    if camera_file is not None and sample_dir is not None:
        raise click.UsageError("give --cameras or --sample, not both")
    try:
        viewer = serve(list(plys), sample=camera_file or sample_dir, host=host, port=port, up=up,
                       render_dir=render_dir, block=False)
    except ViewerError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"mouserecon viewer: {viewer.url}  (Ctrl-C to stop)")
    viewer.serve_until_interrupted()


# ---- synth -------------------------------------------------------------------------------------


@main.command()
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("-n", "--n", "n", default=1, show_default=True, type=click.IntRange(min=1), help="Number of samples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the first sample (then +1 each).")
@click.option("--resolution", default=256, show_default=True, type=click.IntRange(min=8), help="Image size (px).")
@click.option("--views", default=6, show_default=True, type=click.IntRange(min=2), help="Rig views per sample.")
@click.option("--heldout", default=0, show_default=True, type=click.IntRange(min=0), help="Extra held-out views.")
@click.option("--units", default="mm", show_default=True, type=click.Choice(["mm", "normalized"]),
              help="Write the rig in millimetres or normalised to the model's rig.")
def synth(out_dir: str, n: int, seed: int, resolution: int, views: int, heldout: int, units: str) -> None:
    """Generate synthetic mouse samples (RGBA views + opencv_cameras.json + synth.json)."""
    from mouserecon.synth import generate_dataset

    generate_dataset(out_dir, n, seed, resolution=resolution, n_views=views, n_heldout=heldout, units=units)


if __name__ == "__main__":
    main()
