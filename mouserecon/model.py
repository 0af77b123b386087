"""GS-LRM: posed images -> 3D Gaussians, numerically identical to FaceLift's GS-LRM.

The model only models: no loss, rendering or file I/O (see `checkpoints.py` for loading FaceLift
weights). Dimension names: b batch, v views, h w image, p patch, n Gaussians, d width.

Pipeline (see ../shared/golden/README.md for the reference maths):
  posed images [b, v, 9, h, w] = (2 rgb - 1, ray direction, ray point nearest the origin)
  -> patchify (hp wp) tokens with features (ph pw c) -> bias-free linear -> prepend n_gaussians
  learned tokens -> input LayerNorm -> pre-norm transformer blocks (SDPA, GELU MLP x4)
  -> token head (LN + linear) and pixel head (LN + linear to p*p Gaussians per patch token)
  -> split [3, 3K, 3, 4, 1]; log-scale = (s - 2.3) clamped at max -1.2; opacity logit = o - 2;
  pixel Gaussians placed on their pixel's ray at depth (2 sigmoid(mean xyz) - 1) * 1.8 - o.d.

Output order (CONVENTIONS.md C8): the token Gaussians first, then patch-major
(view, patch row, patch column, row in patch, column in patch).

Precision: the model runs in the dtype of its parameters; bf16 autocast is the caller's choice
(`with torch.autocast("cuda", torch.bfloat16): model(...)`). Ray geometry and the pixel alignment
stay in fp32 because they are computed from the fp32 cameras outside any matmul. Attention is
SDPA (flash attention on CUDA), except bf16 inference on a CPU (`attention`).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mouserecon import render_cpp
from mouserecon.cameras import Cameras
from mouserecon.carve import MASK_THRESHOLD, hull_depths
from mouserecon.gaussians import Gaussians, rgb_to_sh_dc

log = logging.getLogger(__name__)

LN_EPS = 1e-5
SCALE_BIAS, SCALE_MAX = 2.3, -1.2  # log_scales = (s - 2.3).clamp(max=-1.2)
OPACITY_BIAS = 2.0  # opacity_logits = o - 2
DEPTH_RANGE = 1.8  # pixel depth = (2 sigmoid(.) - 1) * 1.8 + t0
BACKGROUND_LOGIT = -30.0  # hull_depth: a background pixel's Gaussian (opacity 1e-13, below any render cut-off)
# Queries per step of the CPU bf16 attention: one head's [128, n] bf16 scores (5.2 MB at n = 20k
# tokens, per thread) stay in the last-level cache from q k^T through the softmax to p v. Of 32,
# 64, 128 and 256 on the 2-core EPYC, 128 and 256 were fastest; 32 pays per-op overheads.
CPU_ATTENTION_CHUNK = 128
ATTENTION_SOURCE = Path(__file__).parent / "csrc" / "attention_cpu.cpp"
FUSED_HEAD_WIDTHS = (16, 32, 64, 128)  # the head widths the fused kernel is compiled for


@dataclass(frozen=True)
class ModelConfig:
    """GS-LRM architecture. `image_size` is the nominal (training) resolution; the model accepts
    any H, W that are multiples of `patch_size`. `grad_checkpoint` recomputes each block in the
    backward pass (training memory only; no numerical effect)."""

    d: int
    d_head: int
    n_layer: int
    patch_size: int
    image_size: int
    in_channels: int = 9
    n_gaussians: int = 2
    sh_degree: int = 0
    clip_xyz: bool = False  # clamp pixel-aligned xyz to [-1, 1]; never active in FaceLift's shipped config
    # Not in FaceLift: a pixel Gaussian's base (DC) colour = its input pixel's colour + the predicted
    # value, so a model trained from scratch reproduces its input views from the first step and has
    # to learn only where the pixels go (depth, size, opacity). The `demo` preset uses it.
    pixel_color_skip: bool = False
    scale_bias: float = SCALE_BIAS  # log_scales = (raw - scale_bias).clamp(max=SCALE_MAX); FaceLift: 2.3
    # Not an architecture knob but how the model was trained to see its inputs: None = whole frames
    # resized; a number = each view cropped to a square around its foreground with this margin
    # (`data.crop_to_foreground`). reconstruct and eval prepare the input views the same way.
    input_crop: float | None = None
    # Not in FaceLift: the input masks as a geometric prior (`forward`'s masks). A foreground pixel's
    # Gaussian is moved along its ray into the visual hull of the input masks (`carve.hull_depths`), a
    # background pixel's is made invisible (opacity logit BACKGROUND_LOGIT). Why: on real mouse shapes a
    # pixel-aligned model's depths are wrong, so its views' Gaussians land in offset copies of the mouse
    # (issue 18); the hull contains the surface point each foreground ray sees.
    hull_depth: bool = False
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.d % self.d_head:
            raise ValueError(f"d={self.d} is not a multiple of d_head={self.d_head}")
        if self.in_channels != 9:
            raise ValueError(f"in_channels must be 9 (rgb, ray direction, nearest point), got {self.in_channels}")
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"sh_degree must be 0..3, got {self.sh_degree}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.input_crop is not None and not self.input_crop >= 0:
            raise ValueError(f"input_crop must be None or a margin >= 0, got {self.input_crop}")
        if min(self.d, self.n_layer, self.patch_size, self.n_gaussians) < 1:
            raise ValueError(f"non-positive size in {self}")

    @property
    def n_sh(self) -> int:  # K = (deg + 1)^2
        return (self.sh_degree + 1) ** 2

    @property
    def gaussian_channels(self) -> int:  # G = xyz 3 + sh 3K + scale 3 + quat 4 + opacity 1
        return 11 + 3 * self.n_sh

    @staticmethod
    def preset(name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # FaceLift's configs/gslrm.yaml: 303.6 M parameters.
    "facelift": ModelConfig(d=1024, d_head=64, n_layer=24, patch_size=8, image_size=512),
    # Trains on a 2-core CPU in hours at 128 px: 5.1 M parameters, ~22 GFLOP per 5-view forward.
    "small": ModelConfig(d=256, d_head=32, n_layer=6, patch_size=8, image_size=128),
    # The bundled demo model (assets/DEMO_MODEL.md): `small` at 64 px with the pixel colour skip.
    # Its Gaussians start at about a pixel's size (sigma exp(-3.9) = 0.02; a 64 px pixel spans ~0.03
    # at the rig's distance 2.7) instead of FaceLift's ~3 px, so the first renders are not blurred.
    "demo": ModelConfig(d=256, d_head=32, n_layer=6, patch_size=8, image_size=64, pixel_color_skip=True,
                        scale_bias=3.9),
    # For tests: runs in milliseconds.
    "tiny": ModelConfig(d=64, d_head=16, n_layer=2, patch_size=8, image_size=64),
}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)). No biases anywhere."""

    def __init__(self, d: int, d_head: int):
        super().__init__()
        self.d_head = d_head
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS, bias=False)
        self.mlp_in = nn.Linear(d, 4 * d, bias=False)
        self.mlp_out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [b, n, d] -> [b, n, d]
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x))  # [b, n, 3d]; q = [0, d), k = [d, 2d), v = [2d, 3d)
        qkv = qkv.view(b, n, 3, d // self.d_head, self.d_head).permute(2, 0, 3, 1, 4)  # [3, b, nh, n, dh]
        att = attention(qkv[0], qkv[1], qkv[2])  # [b, nh, n, dh]
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))  # [b, n, d]
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x))))  # [b, n, d]


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full (unmasked) attention softmax(q k^T / sqrt(dh)) v, per batch item and head.

    q, k, v [b, nh, n, dh] -> [b, nh, n, dh], any strides. F.scaled_dot_product_attention (flash
    attention on CUDA, with its backward) except for bf16 on a CPU when autograd is not recording:
    torch's CPU flash kernel does its bf16 blocks through MKL's bf16 gemm, which on our AMD EPYC
    takes MKL's generic path (perf: mkl_blas_def_xgemm_bf16bf16f32 -> an fp32 sgemm kernel), well
    below oneDNN's bf16 matmuls (issue #19; `eval/bench_model.py --breakdown` times attention).
    There `fused_attention` (our AVX512-BF16 kernel) runs where the CPU has those instructions, and
    `chunked_attention` (the same maths with oneDNN matmuls) elsewhere.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not _records_grad(q, k, v):
        if q.shape[-1] in FUSED_HEAD_WIDTHS and _fused_kernel() is not None:
            return fused_attention(q, k, v)
        return chunked_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


@functools.cache
def _fused_kernel() -> ModuleType | None:
    """The compiled `csrc/attention_cpu.cpp`, or None (logged once) where it does not build or the CPU
    has no AVX512-BF16 instructions."""
    ext = render_cpp.build(ATTENTION_SOURCE)
    if isinstance(ext, render_cpp.ExtensionBuildError):
        log.warning("fused bf16 attention unavailable, using oneDNN matmuls per chunk instead: %s", ext)
        return None
    if not ext.supported():
        log.info("this CPU has no AVX512-BF16 instructions: bf16 attention runs as oneDNN matmuls per chunk")
        return None
    return ext


def fused_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`attention` in one pass per block of queries (csrc/attention_cpu.cpp: online softmax, scores in
    registers, bf16 products with fp32 sums; the probabilities rounded to bf16 before p v, as torch's
    flash kernels do). q [b, nh, n_q, dh], k and v [b, nh, n_k, dh], bf16 on a CPU with AVX512-BF16,
    dh in FUSED_HEAD_WIDTHS -> [b, nh, n_q, dh] bf16, laid out as [b, n_q, nh, dh] (so that
    `out.transpose(1, 2).reshape(b, n_q, nh * dh)` is a view). Inference only (no backward)."""
    ext = _fused_kernel()
    if ext is None:
        raise RuntimeError("fused_attention needs the AVX512-BF16 kernel, which this machine cannot run (see the log)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(2) != v.stride(2):
        k, v = k.contiguous(), v.contiguous()
    b, nh, n_q, dh = q.shape
    out = q.new_empty(b, n_q, nh, dh).transpose(1, 2)
    ext.attention(q, k, v, out)
    return out


def _records_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, chunk: int = CPU_ATTENTION_CHUNK) -> Tensor:
    """`attention` one head and `chunk` queries at a time, in bf16 matmuls with fp32 accumulation.

    q [b, nh, n_q, dh], k and v [b, nh, n_k, dh] (bf16 on a CPU) -> [b, nh, n_q, dh] in q's dtype.
    Per step: scores [chunk, n_k] = q k^T / sqrt(dh) (the scale applied to the fp32 accumulator,
    then rounded to q's dtype), softmax (torch's CPU softmax of a bf16 tensor takes max, exp and sum
    in fp32), then p v (fp32 accumulation). The one rounding SDPA's flash kernel does not make is
    the scores' to bf16 before the softmax (relative 2^-9). Memory: one score block per thread, no
    [n, n] matrix. Heads are shared out between threads (`_on_threads`). For inference only:
    autograd through it would keep every score block.
    """
    b, nh, n_q, dh = q.shape
    assert k.shape == v.shape == (b, nh, k.shape[2], dh), \
        f"q [b, nh, n_q, dh] needs k, v [b, nh, n_k, dh]: got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    out = q.new_empty(b, nh, n_q, dh)

    def one_head(i: int, h: int) -> None:
        k_t, v_h = k[i, h].t(), v[i, h]  # [dh, n_k], [n_k, dh]
        for start in range(0, n_q, chunk):
            q_c = q[i, h, start : start + chunk]  # [c, dh]
            scores = torch.addmm(q_c.new_empty(()), q_c, k_t, beta=0, alpha=dh**-0.5)  # [c, n_k]
            torch.mm(torch.softmax(scores, -1), v_h, out=out[i, h, start : start + chunk])  # [c, dh]

    _on_threads([functools.partial(one_head, i, h) for i, h in itertools.product(range(b), range(nh))])
    return out


def _on_threads(jobs: list[Callable[[], None]]) -> None:
    """Run `jobs` on torch.get_num_threads() Python threads, whose torch ops are single-threaded, each
    taking the next job as it finishes one. One coarse split instead of a fork-join
    inside every small op, which stalls whenever another process holds one of the cores (a shared
    CPU); torch ops release the GIL. While it runs, torch's thread count is 1 process-wide (new
    threads take their count from it), so torch work on other Python threads runs single-threaded."""
    threads = torch.get_num_threads()
    if threads == 1 or len(jobs) == 1:
        for job in jobs:
            job()
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # thread-local: carried over

    def run(job: Callable[[], None]) -> None:
        with torch.set_grad_enabled(grad), torch.inference_mode(inference):
            job()

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
            list(pool.map(run, jobs))  # re-raises a job's exception
    finally:
        torch.set_num_threads(threads)


def patch_major(x: Tensor, p: int) -> Tensor:
    """[b, v, h, w, c] raster pixels -> [b, v*h*w, c] in patch-major order (v, hp, wp, ph, pw)."""
    b, v, h, w, c = x.shape
    x = x.reshape(b, v, h // p, p, w // p, p, c)  # [b, v, hp, ph, wp, pw, c]
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, v * h * w, c)  # [b, v*hp*wp*ph*pw, c]


def posed_images(images: Tensor, cameras: Cameras) -> Tensor:
    """Network input [b, v, 9, h, w]: (2 rgb - 1, unit ray direction, ray point nearest the origin).

    images [b, v, 3, h, w] in [0, 1]; cameras [b, v] with the images' width and height.
    """
    _check_inputs(images, cameras)
    return _posed(images, *cameras.rays())


def _check_inputs(images: Tensor, cameras: Cameras) -> None:
    assert images.ndim == 5 and images.shape[2] == 3, f"images must be [b, v, 3, h, w], got {tuple(images.shape)}"
    b, v, _, h, w = images.shape
    assert cameras.batch_shape == (b, v), f"cameras {tuple(cameras.batch_shape)} vs images {(b, v)}"
    assert (cameras.height, cameras.width) == (h, w), f"cameras are {cameras.width}x{cameras.height}, images {w}x{h}"


def _posed(images: Tensor, origins: Tensor, dirs: Tensor) -> Tensor:
    """images [b, v, 3, h, w], ray origins and unit directions [b, v, h, w, 3] -> [b, v, 9, h, w]."""
    t0 = (-origins * dirs).sum(-1, keepdim=True)  # [b, v, h, w, 1] ray parameter of the point nearest the origin
    nearest = origins + t0 * dirs  # [b, v, h, w, 3]
    geometry = torch.cat([dirs, nearest], -1).permute(0, 1, 4, 2, 3)  # [b, v, 6, h, w]
    return torch.cat([images * 2 - 1, geometry.to(images.dtype)], 2)  # [b, v, 9, h, w]


class GSLRM(nn.Module):
    """images [b, v, 3, h, w] in [0, 1] + cameras [b, v] -> Gaussians [b, n], n = n_gaussians + v*h*w."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.gaussian_tokens = nn.Parameter(torch.empty(c.n_gaussians, c.d))
        self.patch_embed = nn.Linear(c.patch_size**2 * c.in_channels, c.d, bias=False)
        self.input_norm = nn.LayerNorm(c.d, eps=LN_EPS, bias=False)
        self.blocks = nn.ModuleList(Block(c.d, c.d_head) for _ in range(c.n_layer))
        self.token_head_norm = nn.LayerNorm(c.d, eps=LN_EPS, bias=False)
        self.token_head = nn.Linear(c.d, c.gaussian_channels, bias=False)
        self.pixel_head_norm = nn.LayerNorm(c.d, eps=LN_EPS, bias=False)
        self.pixel_head = nn.Linear(c.d, c.patch_size**2 * c.gaussian_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """FaceLift's initialisation: linears N(0, 0.02), tokens trunc-normal 0.02, LayerNorms 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        nn.init.trunc_normal_(self.gaussian_tokens, std=0.02)

    def forward(self, images: Tensor, cameras: Cameras, masks: Tensor | None = None) -> Gaussians:
        """masks [b, v, 1, h, w] of the inputs: needed (and used) only by a `hull_depth` model."""
        c, p = self.config, self.config.patch_size
        _check_inputs(images, cameras)
        if c.hull_depth and (masks is None or masks.shape[:2] != images.shape[:2] or masks.shape[2:] != (1, *images.shape[3:])):
            raise ValueError(f"a hull_depth model needs input masks [b, v, 1, h, w] like its images "
                             f"{tuple(images.shape)}, got {None if masks is None else tuple(masks.shape)}")
        b, v, _, h, w = images.shape
        assert h % p == 0 and w % p == 0, f"image size {w}x{h} is not a multiple of the patch size {p}"
        origins, dirs = cameras.rays()  # [b, v, h, w, 3] each
        posed = _posed(images, origins, dirs)  # [b, v, 9, h, w]

        tokens = posed.reshape(b, v, c.in_channels, h // p, p, w // p, p)  # [b, v, c, hp, ph, wp, pw]
        tokens = tokens.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, v * (h // p) * (w // p), -1)  # [b, v*P, p*p*c]
        x = torch.cat([self.gaussian_tokens.expand(b, -1, -1), self.patch_embed(tokens)], 1)  # [b, ng + v*P, d]
        x = self.input_norm(x)
        for block in self.blocks:
            if c.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)  # [b, ng + v*P, d]

        gauss_tok, img_tok = x.split([c.n_gaussians, x.shape[1] - c.n_gaussians], 1)
        raw_tok = self.token_head(self.token_head_norm(gauss_tok))  # [b, ng, G]
        raw_pix = self.pixel_head(self.pixel_head_norm(img_tok))  # [b, v*P, p*p*G]
        raw_pix = raw_pix.reshape(b, v * h * w, c.gaussian_channels)  # [b, v*h*w, G], patch-major
        raw = torch.cat([raw_tok, raw_pix], 1)  # [b, n, G]
        xyz, sh, scales, quats, opacity = raw.split([3, 3 * c.n_sh, 3, 4, 1], -1)
        sh = sh.reshape(b, -1, c.n_sh, 3)  # [b, n, K, 3]; sh[n, k, c] = raw[n, 3 + 3k + c]
        if c.pixel_color_skip:
            pixel_rgb = patch_major(images.permute(0, 1, 3, 4, 2), p)  # [b, v*h*w, 3], the Gaussians' order
            ng = c.n_gaussians
            dc = torch.cat([sh[:, :ng, 0], sh[:, ng:, 0] + rgb_to_sh_dc(pixel_rgb).to(sh.dtype)], 1)  # [b, n, 3]
            sh = torch.cat([dc[:, :, None], sh[:, :, 1:]], 2)

        # Pixel Gaussians sit on their own pixel's ray; the token Gaussians keep their raw xyz.
        origins, dirs = patch_major(origins, p), patch_major(dirs, p)  # [b, v*h*w, 3] each
        t0 = (-origins * dirs).sum(-1, keepdim=True)  # [b, v*h*w, 1]
        depth = (2 * torch.sigmoid(xyz[:, c.n_gaussians:].mean(-1, keepdim=True)) - 1) * DEPTH_RANGE + t0
        opacity = opacity[..., 0] - OPACITY_BIAS  # [b, n]
        if c.hull_depth:
            depth, opacity = _into_hull(depth, opacity, origins, dirs, masks, cameras, p)
        xyz_pix = origins + depth * dirs  # [b, v*h*w, 3]
        if c.clip_xyz:
            xyz_pix = xyz_pix.clamp(-1.0, 1.0)
        return Gaussians(
            means=torch.cat([xyz[:, : c.n_gaussians].to(xyz_pix.dtype), xyz_pix], 1),  # [b, n, 3]
            sh=sh,  # [b, n, K, 3]
            log_scales=(scales - c.scale_bias).clamp(max=SCALE_MAX),  # [b, n, 3]
            quats=quats,  # [b, n, 4] wxyz, unnormalised
            opacity_logits=opacity,  # [b, n]
        )

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())


def _into_hull(depth: Tensor, opacity: Tensor, origins: Tensor, dirs: Tensor, masks: Tensor, cameras: Cameras,
               p: int) -> tuple[Tensor, Tensor]:
    """`ModelConfig.hull_depth`: pixel depths [b, v*h*w, 1] and all opacity logits [b, n] (token Gaussians
    first), rays [b, v*h*w, 3] patch-major, input masks [b, v, 1, h, w] and cameras [b, v]. The gradient
    passes straight through a move (d placed / d predicted = 1): the network learns where inside the hull
    the surface is from the renders of Gaussians the hull placed, not only from those already inside."""
    foreground = patch_major(masks.permute(0, 1, 3, 4, 2), p)[..., 0] >= MASK_THRESHOLD  # [b, v*h*w]
    placed = depth.detach().clone()
    with torch.no_grad():
        for i in range(len(depth)):
            rays = foreground[i].nonzero()[:, 0]
            placed[i, rays, 0] = hull_depths(origins[i, rays].float(), dirs[i, rays].float(),
                                             placed[i, rays, 0].float(), DEPTH_RANGE, masks[i].float(),
                                             cameras[i])[0].to(depth.dtype)
    depth = depth + (placed - depth.detach())
    background = F.pad(~foreground, (opacity.shape[1] - foreground.shape[1], 0))  # token Gaussians: not pixels
    return depth, opacity.masked_fill(background, BACKGROUND_LOGIT)


def forward_flops(config: ModelConfig, views: int, height: int, width: int) -> int:
    """Analytic FLOPs (2 per multiply-add) of one forward pass for one item: linears + attention."""
    c, p = config, config.patch_size
    pixels = views * height * width
    patches = pixels // p**2
    n = c.n_gaussians + patches
    per_block = 2 * n * (3 * c.d * c.d + c.d * c.d + 8 * c.d * c.d) + 2 * 2 * n * n * c.d  # linears + QK^T, AV
    heads = 2 * c.n_gaussians * c.d * c.gaussian_channels + 2 * patches * c.d * p**2 * c.gaussian_channels
    return 2 * patches * p**2 * c.in_channels * c.d + c.n_layer * per_block + heads

