"""Compiled CPU rasterizer for the "cpp" backend of `mouserecon.render`.

The EWA projection (`project_gaussians`: `render_torch.project_gaussians`' maths, with a hand-derived
backward), tile binning, the per-pixel compositing and its backward run in C++ (`csrc/rasterize_cpu.cpp`,
shipped as package data), with the same rules and constants as `render_torch`; SH colours are
`render_torch.sh_colors` (plain autograd). The projection, forward and backward, is one vectorised loop
per view over each block of Gaussians. Binning keeps a Gaussian only on the
tiles of its bounding box that its alpha > 1/255 ellipse reaches, in per-tile depth-sorted lists;
each Gaussian then visits the rows of the tile its ellipse reaches, all pixels of a row (or the half
that holds its columns) at once in vector registers. The forward saves the final transmittance and the position of the last composited
Gaussian per pixel, and the backward walks back from there (the 3DGS scheme). Results (projection
included) are deterministic and independent of the number of threads (`torch.get_num_threads()` of them are used:
torch's own OpenMP threads where the kernel is built with OPENMP_FLAG).

The extension is compiled at first use with `torch.utils.cpp_extension.load` (needs a C++ compiler
and ninja; about a minute on a 2-core machine) into TORCH_EXTENSIONS_DIR, or torch's default cache
(~/.cache/torch_extensions), and reused from there. It is compiled for the host's vector unit
(-march=native, or -mcpu=native, whichever the compiler accepts; none if neither), so the build's
name carries a digest of the source, the flags and the host CPU: a changed source, or a cache shared
with a different CPU, gets a build of its own.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import subprocess
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from mouserecon import render_torch
from mouserecon.device import cpuinfo_lines

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "rasterize_cpu.cpp"
TILE_SIZE = 16  # px: one row of a tile is one 512-bit vector of float32
TILE_SIZES = (4, 8, 16, 32)  # the tile sizes the kernel is compiled for
NATIVE_FLAGS = (("-march=native",), ("-mcpu=native",))  # tried in order, the first the compiler takes
# FP operations may be assumed not to trap, and sqrt not to set errno (results are unchanged; nothing reads
# errno): without them GCC keeps the kernel's selects as branches, and a sqrt as a call for negative input,
# so those loops stay scalar.
OPTIONAL_FLAGS = ("-fno-trapping-math", "-fno-math-errno")
# Where torch runs its threads on OpenMP, the kernel's threads are torch's own (an OpenMP parallel region
# in the same runtime): threads of our own would compete for the cores with torch's, which spin-wait for
# a while after each torch op. Compiled and linked with it where the compiler builds an OpenMP program.
OPENMP_FLAG = "-fopenmp"
_OPENMP_PROGRAM = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


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


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported with the filter above on the one logger, for the import only
    (where the message is logged); build errors are untouched."""
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    torch_log.addFilter(_drop_no_cuda_runtime)
    try:
        from torch.utils import cpp_extension
    finally:
        torch_log.removeFilter(_drop_no_cuda_runtime)
    return cpp_extension


def _accepts(compiler: str, flags: tuple[str, ...], program: str | None = None) -> bool:
    """Whether `compiler` compiles a test program with `flags` (a missing compiler counts as no); with
    `program`, whether it compiles and links that one."""
    step = [] if program else ["-c"]
    try:
        done = subprocess.run([compiler, *flags, "-x", "c++", *step, "-", "-o", os.devnull],
                              input=program or "int f() { return 0; }\n", capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("probing %s %s: %s", compiler, " ".join(flags), err)
        return False
    if done.returncode != 0:
        log.debug("%s rejects %s: %s", compiler, " ".join(flags), done.stderr.strip()[-300:])
    return done.returncode == 0


@functools.cache
def compile_flags(compiler: str | None = None) -> tuple[str, ...]:
    """-O3, then each of OPTIONAL_FLAGS and the first of NATIVE_FLAGS that `compiler` (default: the one
    torch builds with) takes, and OPENMP_FLAG if torch's threads are OpenMP ones and the compiler builds an
    OpenMP program: a compiler without them builds slower, portable code (std::thread) instead of failing."""
    compiler = compiler or _cpp_extension().get_cxx_compiler()
    optional = tuple(flag for flag in OPTIONAL_FLAGS if _accepts(compiler, (flag,)))
    native = next((flags for flags in NATIVE_FLAGS if _accepts(compiler, flags)), ())
    openmp = (OPENMP_FLAG,) if torch_uses_openmp() and _accepts(compiler, (OPENMP_FLAG,), _OPENMP_PROGRAM) else ()
    return ("-O3", *optional, *native, *openmp)


def torch_uses_openmp() -> bool:
    """Whether torch's intra-op threads are OpenMP's (its "ATen parallel backend")."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _host_cpu() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the platform's name."""
    picked = sorted(set(cpuinfo_lines(("model name", "flags", "cpu implementer", "cpu part", "features")) or []))
    return "\n".join(picked) or f"{platform.machine()} {platform.processor()}"


def build_name(source: bytes, flags: tuple[str, ...], stem: str = SOURCE.stem) -> str:
    """The extension's name (and build folder): `stem` and a digest of the source, the flags and, for
    native flags, the host CPU, so that none of them can change under a cached build."""
    native = any(flag in group for group in NATIVE_FLAGS for flag in flags)
    digest = hashlib.sha256(source + "\0".join(flags).encode() + (_host_cpu().encode() if native else b""))
    return f"mouserecon_{stem}_{digest.hexdigest()[:16]}"


@functools.cache
def build(source: Path) -> ModuleType | ExtensionBuildError:
    """The extension compiled from the C++ file `source` with `compile_flags()` (built on first call, then
    loaded from the cache), or the error that stopped its build. The project's other kernels
    (`csrc/attention_cpu.cpp`, `csrc/ssim_cpu.cpp`) are built this way too."""
    cpp_extension = _cpp_extension()
    try:
        flags = compile_flags()
        name = build_name(source.read_bytes(), flags, source.stem)
        ldflags = [OPENMP_FLAG] if OPENMP_FLAG in flags else []
        return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=list(flags), extra_ldflags=ldflags,
                                  verbose=False)
    except (RuntimeError, OSError, ImportError) as err:  # compiler/ninja missing, compile or link error
        lines = [line for line in str(err).splitlines() if "error" in line.lower()] or str(err).splitlines()[-3:]
        return ExtensionBuildError(f"building {source} failed: " + " | ".join(lines[:5]))


def _load() -> ModuleType | ExtensionBuildError:
    return build(SOURCE)


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


class Bins(NamedTuple):
    """Per-tile depth-sorted lists of image-Gaussians (rows of params [I*N, 6]). Tile t = image * tiles per
    image + tile row * tiles_x + tile column owns slots offsets[t] .. offsets[t + 1] - 1, front to back;
    slot s holds Gaussian slot_gauss[s]. Gaussian g's slots, in tile order, are
    gauss_slots[gauss_offsets[g] .. gauss_offsets[g + 1] - 1]. Slot s's Gaussian reaches (alpha > 1/255)
    rows slot_span[s, 0] .. slot_span[s, 1] - 1 and columns slot_span[s, 2] .. slot_span[s, 3] - 1 of the
    tile, at most (the compositing tests each pixel)."""

    offsets: Tensor  # [T + 1] int64
    slot_gauss: Tensor  # [S] int32
    gauss_slots: Tensor  # [S] int32
    gauss_offsets: Tensor  # [I*N + 1] int64
    slot_span: Tensor  # [S, 4] uint8


def bin_tiles(params: Tensor, depths: Tensor, radii: Tensor, grid: tuple[int, int, int, int]) -> Bins:
    """params [I*N, 6] (mean x, mean y, conic xx, xy, yy, log opacity), depths [I*N], radii [I*N, 2]
    (0 = culled), grid (I, height, width, tile_size) -> the tiles' lists (see `Bins`)."""
    return Bins(*extension().bin_tiles(params.detach().contiguous(), depths.detach().to(params.dtype).contiguous(),
                                       radii.to(torch.int32).contiguous(), *grid, render_torch.ALPHA_MIN))


class _JoinColumns(torch.autograd.Function):
    """Tables [M, k_i] -> [M, sum k_i] (torch.cat along the last dimension), in the extension: torch's copy
    moves one element at a time for rows of 2, 3 and 1 floats (0.75 ms of a 30 ms refine step)."""

    @staticmethod
    def forward(ctx, *parts: Tensor):
        ctx.widths = [p.shape[1] for p in parts]
        return extension().join_columns([p.contiguous() for p in parts])

    @staticmethod
    def backward(ctx, grad: Tensor):
        return tuple(extension().split_columns(grad.contiguous(), ctx.widths))


class _CompositeCpp(torch.autograd.Function):
    """params [I*N, 6] (mean x, mean y, conic xx, xy, yy, log opacity), colors [I*N, D] ->
    fg [I, D, H, W] = sum_i c_i alpha_i T_i and final transmittance [I, 1, H, W]."""

    @staticmethod
    def forward(ctx, params: Tensor, colors: Tensor, bins: Bins, grid: tuple[int, int, int, int]):
        params, colors = params.contiguous(), colors.contiguous()
        fg, trans, last = extension().composite_forward(params, colors, bins.offsets, bins.slot_gauss, bins.slot_span,
                                                        *grid, *_rules())
        ctx.grid, ctx.bins = grid, bins
        ctx.save_for_backward(params, colors, trans, last)
        return fg, trans

    @staticmethod
    def backward(ctx, grad_fg: Tensor, grad_trans: Tensor):
        params, colors, trans, last = ctx.saved_tensors
        grad_params, grad_colors = extension().composite_backward(
            params, colors, *ctx.bins, trans, last, grad_fg.contiguous(), grad_trans.contiguous(), *ctx.grid, *_rules(),
        )
        return grad_params, grad_colors, None, None


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
    tile_size: one of TILE_SIZES (px); results do not depend on it beyond rounding.
    """
    num_images, n = depths.shape
    assert means2d.shape == (num_images, n, 2) and conics.shape == (num_images, n, 3), (means2d.shape, conics.shape)
    assert log_opacities.shape == (num_images, n) and colors.shape[:2] == (num_images, n), colors.shape
    assert radii.shape == (num_images, n, 2), radii.shape
    if means2d.device.type != "cpu":
        raise ValueError(f"the cpp backend renders CPU tensors only, got {means2d.device}")
    if tile_size not in TILE_SIZES:
        raise ValueError(f"tile_size must be one of {TILE_SIZES}, got {tile_size}")
    grid = (num_images, height, width, tile_size)
    m = num_images * n
    params = _JoinColumns.apply(means2d.reshape(m, 2), conics.reshape(m, 3), log_opacities.reshape(m, 1))
    bins = bin_tiles(params, depths.reshape(num_images * n), radii.reshape(num_images * n, 2), grid)
    return _CompositeCpp.apply(params, colors.reshape(num_images * n, colors.shape[-1]), bins, grid)


def _projection_rules() -> tuple[float, float, float]:
    return render_torch.NEAR_PLANE, render_torch.FAR_PLANE, render_torch.EPS2D


class _ProjectCpp(torch.autograd.Function):
    """means [B, N, 3], quats [B, N, 4], scales [B, N, 3], w2c [B, V, 4, 4], intrinsics [B, V, 4], opacities
    [B, N] or None -> means2d [B, V, N, 2], covars2d [B, V, N, 2, 2], conics [B, V, N, 3], depths [B, V, N],
    radii [B, V, N, 2] int32 (not differentiable). Differentiable w.r.t. means, quats, scales only (once: no
    double backward); the backward recomputes the projection's intermediates from the saved inputs."""

    @staticmethod
    def forward(ctx, means: Tensor, quats: Tensor, scales: Tensor, w2c: Tensor, intrinsics: Tensor,
                opacities: Tensor | None, width: int, height: int):
        means2d, covars2d, conics, depths, radii = extension().project_forward(
            means, quats, scales, w2c, intrinsics, opacities, width, height, *_projection_rules(),
            render_torch.EXTEND, render_torch.ALPHA_MIN,
        )
        ctx.size = (width, height)
        ctx.save_for_backward(means, quats, scales, w2c, intrinsics)
        ctx.mark_non_differentiable(radii)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a tensor of zeros
        return means2d, covars2d, conics, depths, radii

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: create_graph=True raises, never silently
    def backward(ctx, grad_means2d: Tensor | None, grad_covars2d: Tensor | None, grad_conics: Tensor | None,
                 grad_depths: Tensor | None, _grad_radii):
        means, quats, scales, w2c, intrinsics = ctx.saved_tensors
        # The kernel reads the gradients through their strides (those of means2d and conics are slices of the
        # compositing's); an empty tensor stands for an unused output's.
        upstream = (grad_means2d, grad_covars2d, grad_conics, grad_depths)
        grads = (means.new_empty(0) if g is None else g for g in upstream)
        grad_means, grad_quats, grad_scales = extension().project_backward(
            means, quats, scales, w2c, intrinsics, *grads, *ctx.size, *_projection_rules(),
        )
        return grad_means, grad_quats, grad_scales, None, None, None, None, None


def project_gaussians(
    means: Tensor,  # [..., N, 3] world
    quats: Tensor,  # [..., N, 4] wxyz, unnormalised
    scales: Tensor,  # [..., N, 3]
    w2c: Tensor,  # [..., V, 4, 4] world-to-camera, OpenCV axes
    intrinsics: Tensor,  # [..., V, 4] fx, fy, cx, cy in px
    width: int,
    height: int,
    opacities: Tensor | None = None,  # [..., N]; tightens radii and culls opacity < 1/255
) -> render_torch.Projection:
    """`render_torch.project_gaussians` in C++: the same outputs (`render_torch.Projection`, leading dims
    [..., V, N]) from the same maths, with an analytic backward.

    CPU tensors of one floating dtype. Differentiable w.r.t. means, quats and scales (all five float
    outputs, covars2d included); opacities only set the radii (no gradient, as in render_torch). If w2c or
    intrinsics require grad, this calls `render_torch.project_gaussians` instead (plain autograd, which
    also differentiates the cameras).
    """
    batch = means.shape[:-2]
    assert means.shape[-1] == 3 and quats.shape == (*means.shape[:-1], 4), (means.shape, quats.shape)
    assert scales.shape == means.shape and w2c.shape[-2:] == (4, 4), (scales.shape, w2c.shape)
    assert w2c.shape[:-3] == batch and intrinsics.shape == (*w2c.shape[:-2], 4), (w2c.shape, intrinsics.shape)
    assert opacities is None or opacities.shape == means.shape[:-1], (opacities.shape, means.shape)
    if w2c.requires_grad or intrinsics.requires_grad:
        return render_torch.project_gaussians(means, quats, scales, w2c, intrinsics, width, height, opacities)
    tensors = [means, quats, scales, w2c, intrinsics] + ([] if opacities is None else [opacities])
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"the cpp backend projects CPU tensors only, got {[str(t.device) for t in tensors]}")
    if any(t.dtype != means.dtype for t in tensors) or not means.is_floating_point():
        raise ValueError(f"project_gaussians: inputs must share one floating dtype, got {[t.dtype for t in tensors]}")
    n, num_views, num_batch = means.shape[-2], w2c.shape[-3], math.prod(batch)
    flat = lambda t, *shape: t.reshape(num_batch, *shape).contiguous()  # noqa: E731  [..., *shape] -> [B, *shape]
    outputs = _ProjectCpp.apply(
        flat(means, n, 3), flat(quats, n, 4), flat(scales, n, 3), flat(w2c, num_views, 4, 4),
        flat(intrinsics, num_views, 4), None if opacities is None else flat(opacities.detach(), n), width, height,
    )
    means2d, covars2d, conics, depths, radii = (t.reshape(*batch, *t.shape[1:]) for t in outputs)
    return render_torch.Projection(means2d, covars2d, conics, depths, radii)
