"""Compiled CPU compositing for the "cpp" backend of `mouserecon.render`.

Projection, SH colours and tile binning are those of `mouserecon.render_torch` (plain autograd);
only the per-pixel compositing and its backward run in C++ (`csrc/rasterize_cpu.cpp`, shipped as
package data), with the same rules and constants as `render_torch.composite`. Each pixel walks its
tile's depth-sorted list (in practice: each Gaussian visits the tile's pixels inside its alpha > 1/255
ellipse) and stops on its own; the forward saves the final transmittance and the
position of the last composited Gaussian per pixel, and the backward walks back from there
(the 3DGS scheme). Results are deterministic and independent of the number of threads.

The extension is compiled at first use with `torch.utils.cpp_extension.load` (needs a C++
compiler and ninja; about a minute on a 2-core machine) into TORCH_EXTENSIONS_DIR, or torch's
default cache (~/.cache/torch_extensions), and reused from there.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from mouserecon import render_torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "rasterize_cpu.cpp"
TILE_SIZE = 16  # px; binning cost falls with tile size and each Gaussian only visits its own ellipse


class ExtensionBuildError(RuntimeError):
    """The C++ extension could not be compiled or loaded."""


def _drop_no_cuda_runtime(record: logging.LogRecord) -> bool:
    """Logger filter: drops torch's "No CUDA runtime is found, using CUDA_HOME=..." (and only it).

    torch/utils/cpp_extension.py logs it with `logger.warning` from `_find_cuda_home()`, which runs once
    when the module is imported, on any machine with a CUDA toolkit but no GPU; torch's own handler on the
    "torch" logger prints it to stderr whatever the user's logging setup. It is irrelevant to our CPU-only
    kernel, so it is kept as a debug line of ours; every other record of that logger passes.
    """
    if str(record.msg).startswith("No CUDA runtime is found"):
        log.debug("torch.utils.cpp_extension: %s", record.getMessage())
        return False
    return True


@functools.cache
def _load() -> ModuleType | ExtensionBuildError:
    # The filter is on that one logger and only for the import, where the message is logged; build
    # errors (ExtensionBuildError below, the warning of `available`) are untouched.
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    torch_log.addFilter(_drop_no_cuda_runtime)
    try:
        from torch.utils.cpp_extension import load
    finally:
        torch_log.removeFilter(_drop_no_cuda_runtime)

    try:
        return load(name="mouserecon_rasterize_cpu", sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except (RuntimeError, OSError, ImportError) as err:  # compiler/ninja missing, compile or link error
        lines = [line for line in str(err).splitlines() if "error" in line.lower()] or str(err).splitlines()[-3:]
        return ExtensionBuildError(f"building {SOURCE} failed: " + " | ".join(lines[:5]))


def extension() -> ModuleType:
    """The compiled module (built on first call); raises ExtensionBuildError if it cannot be built."""
    ext = _load()
    if isinstance(ext, ExtensionBuildError):
        raise ext
    return ext


@functools.cache
def available() -> bool:
    """True if the extension builds; otherwise logs one warning with the compiler's complaint."""
    ext = _load()
    if isinstance(ext, ExtensionBuildError):
        log.warning("C++ render backend unavailable, rendering on the CPU with the slower torch backend: %s", ext)
        return False
    return True


def _rules() -> tuple[float, float, float]:
    return render_torch.ALPHA_MIN, render_torch.ALPHA_MAX, render_torch.T_MIN


class _CompositeCpp(torch.autograd.Function):
    """params [I*N, 6] (mean x, mean y, conic xx, xy, yy, log opacity), colors [I*N, D] ->
    fg [I, D, H, W] = sum_i c_i alpha_i T_i and final transmittance [I, 1, H, W]."""

    @staticmethod
    def forward(ctx, params: Tensor, colors: Tensor, offsets: Tensor, slot_gauss: Tensor, grid: tuple[int, ...]):
        params, colors = params.contiguous(), colors.contiguous()
        fg, trans, last = extension().composite_forward(params, colors, offsets, slot_gauss, *grid, *_rules())
        ctx.grid = grid
        ctx.save_for_backward(params, colors, offsets, slot_gauss, trans, last)
        ctx.mark_non_differentiable(last)
        return fg, trans, last

    @staticmethod
    def backward(ctx, grad_fg: Tensor, grad_trans: Tensor, _grad_last: Tensor):
        params, colors, offsets, slot_gauss, trans, last = ctx.saved_tensors
        grad_params, grad_colors = extension().composite_backward(
            params, colors, offsets, slot_gauss, trans, last, grad_fg.contiguous(), grad_trans.contiguous(),
            *ctx.grid, *_rules(),
        )
        return grad_params, grad_colors, None, None, None


def composite(
    means2d: Tensor,  # [I, N, 2] px
    conics: Tensor,  # [I, N, 3]
    log_opacities: Tensor,  # [I, N]
    colors: Tensor,  # [I, N, D]
    depths: Tensor,  # [I, N]
    radii: Tensor,  # [I, N, 2] int, 0 = culled
    width: int,
    height: int,
    tile_size: int = TILE_SIZE,
) -> tuple[Tensor, Tensor]:
    """`render_torch.composite` in C++: fg [I, D, H, W] (no background) and transmittance [I, 1, H, W].

    CPU tensors, float32 or float64; differentiable w.r.t. means2d, conics, log_opacities, colors.
    """
    num_images, n = depths.shape
    assert means2d.shape == (num_images, n, 2) and conics.shape == (num_images, n, 3), (means2d.shape, conics.shape)
    assert log_opacities.shape == (num_images, n) and colors.shape[:2] == (num_images, n), colors.shape
    if means2d.device.type != "cpu":
        raise ValueError(f"the cpp backend renders CPU tensors only, got {means2d.device}")
    # chunk=1: the tile lists without padding; tile t owns slots first_chunk[t] ... + num_chunks[t] - 1.
    tiles = render_torch._bin_tiles(means2d.detach(), radii, depths.detach(), tile_size, width, height, chunk=1)
    offsets = torch.cat([tiles.first_chunk, tiles.first_chunk.new_tensor([int(tiles.num_chunks.sum())])])
    params = torch.cat([means2d, conics, log_opacities[..., None]], -1).reshape(num_images * n, 6)
    grid = (num_images, height, width, tile_size, tiles.tiles_x)
    colors = colors.reshape(num_images * n, colors.shape[-1])
    fg, trans, _ = _CompositeCpp.apply(params, colors, offsets, tiles.slot_gauss, grid)
    return fg, trans
