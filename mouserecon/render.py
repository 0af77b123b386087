"""Render 3D Gaussians into calibrated views: one `render()`, three backends (DESIGN.md §6).

- "gsplat": `gsplat.rasterization` (CUDA only, classic mode), imported lazily; our cameras are
  converted here (viewmats = w2c, Ks from intrinsics), the only place that knows gsplat's API.
- "torch": `mouserecon.render_torch`, pure PyTorch, differentiable, runs on the CPU.
- "cpp": the torch backend's maths with the projection (when the cameras need no gradient) and the
  compositing compiled in C++ (`mouserecon.render_cpp`, built at first use), the torch backend's SH
  colours; CPU only, many times faster.
- "auto": gsplat for CUDA tensors; on the CPU cpp, or torch (after one logged warning) when the
  C++ extension cannot be built.

All follow gsplat 1.5.3 classic semantics (see `mouserecon.render_torch` for the rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mouserecon import render_cpp, render_torch
from mouserecon.cameras import Cameras
from mouserecon.gaussians import Gaussians

BACKENDS = ("auto", "gsplat", "torch", "cpp")


@dataclass(frozen=True)
class RenderOutput:
    """images [B, V, 3, H, W] (background composited), alphas [B, V, 1, H, W] = 1 - final
    transmittance, depths [B, V, 1, H, W] expected camera z (sum_i w_i z_i / alpha; 0 where
    alpha = 0) or None. Unbatched calls return the same without the B dimension."""

    images: Tensor
    alphas: Tensor
    depths: Tensor | None


def render(
    gaussians: Gaussians,
    cameras: Cameras,
    height: int,
    width: int,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    backend: str = "auto",
    render_depth: bool = False,
) -> RenderOutput:
    """Render a batch of Gaussian sets, each into its own views.

    gaussians: batched [B, N] with cameras [B, V], or unbatched [N] with cameras [V] (then the
        outputs have no B dimension).
    cameras: intrinsics refer to (cameras.height, cameras.width); a different (height, width)
        renders the same views resampled (`Cameras.resize`, pixel-edge convention).
    background: RGB in [0, 1], a sequence of 3 floats or a tensor broadcastable to [B, V, 3];
        composited as image = foreground + T * background.
    backend: "auto" (gsplat on CUDA tensors; cpp on the CPU, torch if cpp cannot be built), "gsplat",
        "torch" or "cpp" (raises `render_cpp.ExtensionBuildError` if the extension cannot be built).
    Cameras are cast to the Gaussians' dtype and device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown render backend {backend!r}; choose one of {BACKENDS}")
    unbatched = gaussians.means.ndim == 2
    if unbatched:
        if cameras.c2w.ndim != 3:
            raise ValueError(f"unbatched Gaussians [N] need cameras [V], got c2w {tuple(cameras.c2w.shape)}")
        gaussians = Gaussians(**{k: v[None] for k, v in vars(gaussians).items()})
        cameras = cameras[None]
    elif gaussians.means.ndim != 3 or cameras.c2w.ndim != 4 or cameras.c2w.shape[0] != gaussians.means.shape[0]:
        raise ValueError(
            f"batched Gaussians [B, N] need cameras [B, V]; got means {tuple(gaussians.means.shape)}, "
            f"c2w {tuple(cameras.c2w.shape)}"
        )
    if (height, width) != (cameras.height, cameras.width):
        cameras = cameras.resize(height, width)
    means = gaussians.means
    cameras = cameras.to(dtype=means.dtype, device=means.device)
    num_batch, num_views = cameras.c2w.shape[:2]
    bg = torch.as_tensor(background, dtype=means.dtype, device=means.device)
    target = (num_batch, num_views, 3)
    if bg.ndim > 3 or bg.shape[-1:] != (3,) or any(s not in (1, t) for s, t in zip(reversed(bg.shape), reversed(target))):
        raise ValueError(f"background must be RGB broadcastable to [B, V, 3] = {list(target)}, got {list(bg.shape)}")
    bg = bg.expand(target)  # [B, V, 3]

    if backend == "auto":
        backend = "gsplat" if means.is_cuda else ("cpp" if render_cpp.available() else "torch")
    if backend == "gsplat":
        images, alphas, depths = _render_gsplat(gaussians, cameras, height, width, bg, render_depth)
    else:
        composite = render_cpp.composite if backend == "cpp" else render_torch.composite
        images, alphas, depths = _render_tiles(gaussians, cameras, height, width, bg, render_depth, composite)
    assert images.shape == (num_batch, num_views, 3, height, width), images.shape
    out = RenderOutput(images, alphas, depths)
    if unbatched:
        out = RenderOutput(images[0], alphas[0], None if depths is None else depths[0])
    return out


def _render_tiles(g: Gaussians, cams: Cameras, height: int, width: int, bg: Tensor, render_depth: bool, composite):
    """The torch and cpp backends: projection (render_cpp's when `composite` is render_cpp.composite,
    else render_torch's), render_torch colours, then `composite`."""
    num_batch, num_views = cams.c2w.shape[:2]
    n = g.num
    opacities = g.opacities  # [B, N]
    project = render_cpp.project_gaussians if composite is render_cpp.composite else render_torch.project_gaussians
    proj = project(
        g.means, g.quats, g.scales, cams.w2c, cams.intrinsics, width, height, opacities.detach()
    )  # [B, V, N, ...]
    colors = render_torch.sh_colors(g.sh, g.means, cams.centers).expand(num_batch, num_views, n, 3)
    if render_depth:
        colors = torch.cat([colors, proj.depths[..., None]], -1)  # depth rides along as a 4th channel
    images = num_batch * num_views
    log_opac = torch.nn.functional.logsigmoid(g.opacity_logits)[:, None].expand(num_batch, num_views, n)
    fg, trans = composite(
        proj.means2d.reshape(images, n, 2),
        proj.conics.reshape(images, n, 3),
        log_opac.reshape(images, n),
        colors.reshape(images, n, colors.shape[-1]),
        proj.depths.reshape(images, n),
        proj.radii.reshape(images, n, 2),
        width,
        height,
    )  # [I, D, H, W], [I, 1, H, W]
    fg = fg.reshape(num_batch, num_views, -1, height, width)
    trans = trans.reshape(num_batch, num_views, 1, height, width)
    rgb = fg[:, :, :3] + trans * bg[..., None, None]
    alphas = 1.0 - trans
    depths = fg[:, :, 3:] / alphas.clamp_min(1e-10) if render_depth else None
    return rgb, alphas, depths


def _render_gsplat(g: Gaussians, cams: Cameras, height: int, width: int, bg: Tensor, render_depth: bool):
    if not g.means.is_cuda:
        raise ValueError("the gsplat backend renders CUDA tensors only; use backend='torch' on the CPU")
    if g.means.dtype != torch.float32:
        raise ValueError(f"the gsplat backend needs float32 Gaussians, got {g.means.dtype}")
    from gsplat import rasterization  # lazy: gsplat JIT-compiles CUDA code on first use

    renders, alphas, _ = rasterization(
        means=g.means,  # [B, N, 3]
        quats=g.quats,  # [B, N, 4] wxyz, normalised inside gsplat
        scales=g.scales,  # [B, N, 3]
        opacities=g.opacities,  # [B, N]
        colors=g.sh,  # [B, N, K, 3]
        viewmats=cams.w2c,  # [B, V, 4, 4]
        Ks=cams.K,  # [B, V, 3, 3]
        width=width,
        height=height,
        near_plane=render_torch.NEAR_PLANE,
        far_plane=render_torch.FAR_PLANE,
        eps2d=render_torch.EPS2D,
        sh_degree=g.sh_degree,
        render_mode="RGB+ED" if render_depth else "RGB",
        rasterize_mode="classic",
        packed=True,
    )  # [B, V, H, W, 3 or 4], [B, V, H, W, 1]
    # The background is composited here, as gsplat's kernel would (colour + T * bg): gsplat 1.5.3's packed
    # path refuses any `backgrounds` (rasterize_to_pixels asserts its shape against packed means2d's empty
    # leading dims), seen on an H200.
    renders = renders.permute(0, 1, 4, 2, 3)
    alphas = alphas.permute(0, 1, 4, 2, 3)
    depths = renders[:, :, 3:] if render_depth else None
    return renders[:, :, :3] + (1.0 - alphas) * bg[..., None, None], alphas, depths
