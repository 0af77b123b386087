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


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def reconstruct() -> None:
    """Reconstruct a sample folder of calibrated views into a 3DGS .ply."""
    _not_built("reconstruct", "issue 4")


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


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def view() -> None:
    """Open a .ply in a viser web viewer."""
    _not_built("view", "issue 7")


# ---- synth -------------------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def synth() -> None:
    """Generate synthetic mouse samples (RGBA views + opencv_cameras.json)."""
    _not_built("synth", "issue 2")


if __name__ == "__main__":
    main()
