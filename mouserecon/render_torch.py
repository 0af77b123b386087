"""Pure-PyTorch 3D Gaussian rasterizer (the CPU backend of `mouserecon.render`).

Semantics follow gsplat 1.5.3 `rasterization(..., rasterize_mode="classic")` exactly:

- EWA projection: camera-space covariance through the perspective Jacobian (with gsplat's
  clamp of x/z, y/z to 1.3x the field of view), plus a 0.3 px^2 low-pass on the diagonal.
  Culled: depth <= near (0.01) or >= far (1e10), det <= 0, opacity < 1/255, or a bounding box
  entirely outside the image. The bounding box half-size is ceil(extend * sqrt(cov2d_ii)) with
  extend = min(3.33, sqrt(2 ln(255 opacity))), which contains every pixel with alpha >= 1/255.
- Colours: real SH of degree 0..3 evaluated along the unit direction camera centre -> mean,
  plus 0.5, clamped at 0.
- Per pixel (centre at +0.5), front to back in camera depth:
  alpha = min(0.999, opacity * exp(-sigma)); skipped if alpha < 1/255; a Gaussian whose
  inclusion would bring the transmittance T to <= 1e-4 is not composited and the pixel stops.
  Output colour = sum_i c_i alpha_i T_i (+ T * background, added by the caller), alpha = 1 - T.
  NOTE: gsplat 1.5.3 clamps alpha at 0.999 (RasterizeToPixels3DGSFwd.cu); the original 3DGS
  and DESIGN.md say 0.99. We follow gsplat so both backends agree: see `ALPHA_MAX`.

Algorithm: Gaussians are binned into square tiles (default 4x4 px) by their bounding box and
each tile's list is sorted by depth. Compositing walks all tiles' lists together in depth chunks
of `chunk` Gaussians (default 64): a Python loop over chunks, never over Gaussians or pixels. A
tile leaves the loop once every pixel in it has stopped; small tiles waste little work on pixels
a Gaussian does not reach and stop early. Inside a chunk, log(alpha) of every Gaussian at every
pixel is one matrix product (the quadratic form expanded into a 6-term polynomial in
tile-centred pixel coordinates), the transmittance is a cumulative product and the colours
accumulate by a batched matrix product. The backward pass is hand-derived (`_Composite`): it
recomputes alphas chunk by chunk from back to front, carrying the colour "behind" each Gaussian
exactly as the 3DGS backward does, and returns gradients for the screen-space means, conics,
log-opacities and colours. Projection and SH are plain autograd, so gradients reach means,
scales, quats, SH and opacity logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mouserecon.gaussians import quat_to_rotmat

EPS2D = 0.3  # px^2 added to the 2D covariance diagonal (gsplat eps2d, classic mode)
NEAR_PLANE = 0.01
FAR_PLANE = 1e10
ALPHA_MAX = 0.999  # gsplat 1.5.3 CUDA kernels: min(0.999f, opac * exp(-sigma))
ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4  # compositing stops before T would fall to <= T_MIN
EXTEND = 3.33  # bounding box half-size in standard deviations (gsplat)
_NEG = -1.0e4  # exponent of padding entries: exp() underflows to exactly 0


# ---- projection --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """Per-view screen-space Gaussians; leading dims [..., V, N] (V views, N Gaussians).

    means2d [..., V, N, 2] px; covars2d [..., V, N, 2, 2] px^2 (low-pass included);
    conics [..., V, N, 3] (inverse covariance xx, xy, yy); depths [..., V, N] camera z;
    radii [..., V, N, 2] int32 bounding-box half-size in px, 0 where culled.
    """

    means2d: Tensor
    covars2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor


def project_gaussians(
    means: Tensor,  # [..., N, 3] world
    quats: Tensor,  # [..., N, 4] wxyz, unnormalised
    scales: Tensor,  # [..., N, 3]
    w2c: Tensor,  # [..., V, 4, 4] world-to-camera, OpenCV axes
    intrinsics: Tensor,  # [..., V, 4] fx, fy, cx, cy in px
    width: int,
    height: int,
    opacities: Tensor | None = None,  # [..., N]; tightens radii and culls opacity < 1/255
) -> Projection:
    """EWA projection of 3D Gaussians into V pinhole views (gsplat `fully_fused_projection`).

    Without `opacities` the radii are those of gsplat's `_fully_fused_projection` (3.33 sigma);
    with them, those of gsplat's CUDA kernel (opacity-aware extent, low-opacity culling).
    Differentiable w.r.t. means, quats, scales and the cameras (plain autograd).
    """
    batch = means.shape[:-2]
    assert means.shape[-1] == 3 and quats.shape == (*means.shape[:-1], 4), (means.shape, quats.shape)
    assert scales.shape == means.shape and w2c.shape[-2:] == (4, 4), (scales.shape, w2c.shape)
    assert w2c.shape[:-3] == batch and intrinsics.shape == (*w2c.shape[:-2], 4), (w2c.shape, intrinsics.shape)
    rot = w2c[..., :3, :3]  # [..., V, 3, 3]
    means_c = torch.einsum("...vij,...nj->...vni", rot, means) + w2c[..., None, :3, 3]  # [..., V, N, 3]
    x, y, z = means_c.unbind(-1)
    in_depth = (z > NEAR_PLANE) & (z < FAR_PLANE)
    inv_z = 1.0 / torch.where(in_depth, z, torch.ones_like(z))  # culled Gaussians stay finite (grads too)

    fx, fy, cx, cy = (t[..., None] for t in intrinsics.unbind(-1))  # [..., V, 1]
    lim_x = (0.15 * width + cx) / fx, (1.15 * width - cx) / fx  # gsplat: 1.3x the field of view
    lim_y = (0.15 * height + cy) / fy, (1.15 * height - cy) / fy
    ux = torch.minimum(torch.maximum(x * inv_z, -lim_x[0]), lim_x[1])  # clamped tx / z
    uy = torch.minimum(torch.maximum(y * inv_z, -lim_y[0]), lim_y[1])
    # Rows of J W (perspective Jacobian times the camera rotation), [..., V, N, 3].
    w0, w1, w2 = (rot[..., None, i, :] for i in range(3))  # [..., V, 1, 3]
    row_x = (fx * inv_z)[..., None] * (w0 - ux[..., None] * w2)
    row_y = (fy * inv_z)[..., None] * (w1 - uy[..., None] * w2)
    # Times R S: the 2D covariance is (J W R S)(J W R S)^T, symmetric positive semi-definite.
    rs = (quat_to_rotmat(quats) * scales[..., None, :])[..., None, :, :, :]  # [..., 1, N, 3, 3]
    half_x = (row_x[..., :, None] * rs).sum(-2)  # [..., V, N, 3]
    half_y = (row_y[..., :, None] * rs).sum(-2)
    a = (half_x * half_x).sum(-1) + EPS2D
    b = (half_x * half_y).sum(-1)
    c = (half_y * half_y).sum(-1) + EPS2D
    covars2d = torch.stack([a, b, b, c], -1).reshape(*a.shape, 2, 2)
    det = a * c - b * b
    inv_det = 1.0 / torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c * inv_det, -b * inv_det, a * inv_det], -1)  # [..., V, N, 3]
    means2d = torch.stack([fx * x * inv_z + cx, fy * y * inv_z + cy], -1)  # [..., V, N, 2]

    with torch.no_grad():
        valid = in_depth & (det > 0)
        extend = torch.full_like(z, EXTEND)
        if opacities is not None:
            opac = opacities[..., None, :].expand_as(z)
            valid &= opac >= ALPHA_MIN
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_MIN) / ALPHA_MIN)))
        radii = torch.ceil(extend[..., None] * torch.sqrt(torch.stack([a, c], -1)))  # [..., V, N, 2]
        inside = ((means2d + radii > 0) & (means2d - radii < means2d.new_tensor([width, height]))).all(-1)
        radii = torch.where((valid & inside)[..., None], radii, torch.zeros_like(radii)).int()
    return Projection(means2d, covars2d, conics, z, radii)


# ---- colours -----------------------------------------------------------------------------------

_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
       -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def sh_basis(dirs: Tensor, degree: int) -> Tensor:
    """Real spherical-harmonic basis [..., (degree+1)^2] at unit directions [..., 3] (3DGS order)."""
    assert 0 <= degree <= 3 and dirs.shape[-1] == 3, (degree, dirs.shape)
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [_C2[0] * x * y, _C2[1] * y * z, _C2[2] * (2 * zz - xx - yy), _C2[3] * x * z, _C2[4] * (xx - yy)]
    if degree >= 3:
        out += [
            _C3[0] * y * (3 * xx - yy), _C3[1] * x * y * z, _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy), _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy), _C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, -1)


def sh_colors(sh: Tensor, means: Tensor, centers: Tensor) -> Tensor:
    """RGB [..., V, N, 3] of SH coefficients sh [..., N, K, 3] seen from camera centres [..., V, 3].

    colour = max(0, 0.5 + sum_k Y_k(normalise(mean - centre)) sh_k) as gsplat. Degree 0 needs no
    direction and returns [..., 1, N, 3] (broadcastable over views).
    """
    degree = math.isqrt(sh.shape[-2]) - 1
    if degree == 0:
        return (0.28209479177387814 * sh[..., None, :, 0, :] + 0.5).clamp_min(0.0)
    dirs = F.normalize(means[..., None, :, :] - centers[..., :, None, :], dim=-1)  # [..., V, N, 3]
    basis = sh_basis(dirs, degree)  # [..., V, N, K]
    return ((basis[..., None] * sh[..., None, :, :, :]).sum(-2) + 0.5).clamp_min(0.0)


# ---- tiling ------------------------------------------------------------------------------------


@dataclass
class _Tiles:
    """Depth-sorted Gaussian lists of all tiles, cut into chunks of `chunk` slots.

    Tiles are numbered t = local_tile * I + image (local_tile = row * tiles_x + column). Tile t owns
    the chunks first_chunk[t] ... first_chunk[t] + num_chunks[t] - 1; its k-th Gaussian from the
    front sits in slot first_chunk[t] * chunk + k. Empty slots point at the padding index I * N.
    """

    slot_gauss: Tensor  # [S] flattened image-Gaussian index (image * N + n) per slot
    chunk_centre: Tensor  # [S / chunk, 2] px centre of the tile owning each chunk
    first_chunk: Tensor  # [T]
    num_chunks: Tensor  # [T]
    chunk: int
    tiles_x: int
    tiles_y: int
    tile_size: int


@torch.no_grad()
def _bin_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, width: int, height: int, chunk: int
) -> _Tiles:
    """means2d [I, N, 2], radii [I, N, 2], depths [I, N] -> per-tile depth-sorted lists."""
    num_images, n = depths.shape
    device = depths.device
    tiles_x, tiles_y = -(-width // tile_size), -(-height // tile_size)
    num_tiles = num_images * tiles_x * tiles_y
    vis = (radii > 0).all(-1).flatten().nonzero()[:, 0]  # [G] visible image-Gaussians
    # Visit Gaussians image by image, front to back, so a stable sort by tile keeps depth order.
    vis = vis[torch.sort(depths.flatten()[vis], stable=True).indices]
    vis = vis[torch.sort((vis // n).int(), stable=True).indices]
    centre, rad = means2d.reshape(-1, 2)[vis], radii.reshape(-1, 2)[vis]
    limit = torch.tensor([tiles_x, tiles_y], device=device, dtype=torch.int32)
    lo = torch.floor((centre - rad) / tile_size).int().clamp_(min=0).minimum(limit)  # [G, 2]
    hi = torch.ceil((centre + rad) / tile_size).int().clamp_(min=0).minimum(limit)
    span = hi - lo
    per_gauss = span[:, 0] * span[:, 1]
    # One entry per (Gaussian, tile) pair; repeat_interleave streams values without gathers.
    rep = lambda t: torch.repeat_interleave(t, per_gauss)  # noqa: E731
    span_x = rep(span[:, 0])
    local = torch.arange(int(per_gauss.sum()), device=device, dtype=torch.int32) - rep(torch.cumsum(per_gauss, 0, dtype=torch.int32) - per_gauss)
    dy = torch.div(local, span_x, rounding_mode="floor")
    key = rep(lo[:, 1] * tiles_x + lo[:, 0]) + dy * tiles_x + (local - dy * span_x)  # local tile index
    key_dtype = torch.int16 if tiles_x * tiles_y < 2**15 else torch.int32  # int16 sorts by radix, fast
    key, perm = torch.sort(key.to(key_dtype), stable=True)
    gauss = rep(vis).index_select(0, perm)
    tile = key.long() * num_images + torch.div(gauss, n, rounding_mode="floor")
    counts = torch.bincount(tile, minlength=num_tiles)
    num_chunks = -(-counts // chunk)
    first_chunk = torch.cumsum(num_chunks, 0) - num_chunks
    total = int(num_chunks.sum())
    rank = torch.arange(len(tile), device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, tile)
    slot_gauss = torch.full((total * chunk,), num_images * n, device=device, dtype=torch.long)
    slot_gauss[first_chunk.index_select(0, tile) * chunk + rank] = gauss
    chunk_tile = torch.repeat_interleave(torch.arange(num_tiles, device=device), num_chunks) // num_images
    chunk_centre = torch.stack([chunk_tile % tiles_x, chunk_tile // tiles_x], -1) * tile_size + 0.5 * tile_size
    return _Tiles(slot_gauss, chunk_centre.to(means2d.dtype), first_chunk, num_chunks, chunk, tiles_x, tiles_y, tile_size)


def _pixel_basis(tile_size: int, dtype, device) -> Tensor:
    """[P, 6] monomials (x^2, xy, y^2, x, y, 1) of the pixel centres relative to the tile centre."""
    r = torch.arange(tile_size, dtype=dtype, device=device) + 0.5 - 0.5 * tile_size
    y, x = torch.meshgrid(r, r, indexing="ij")
    x, y = x.flatten(), y.flatten()
    return torch.stack([x * x, x * y, y * y, x, y, torch.ones_like(x)], -1)


# ---- compositing -------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What the compositing loop needs besides the differentiable per-Gaussian tensors."""

    tiles: _Tiles
    basis: Tensor  # [P, 6]
    max_elems: int  # bound on (tiles in flight) * chunk * P per step (memory)
    done0: Tensor  # [T, P] bool, True for padding pixels outside the image


def _exponent_coefs(params: Tensor, centre: Tensor) -> Tensor:
    """log(alpha) = log(opacity) - sigma as a polynomial in tile-centred pixel coordinates.

    params [S, C, 6] = (mean x, mean y, conic xx, xy, yy, log opacity), centre [S, 1, 2] ->
    coefs [S, C, 6] of (x^2, xy, y^2, x, y, 1). Centring at the tile keeps the terms small, so
    float32 loses little to cancellation.
    """
    mx, my = (params[..., :2] - centre).unbind(-1)
    a, b, c, log_opac = params[..., 2:].unbind(-1)
    gx, gy = a * mx + b * my, b * mx + c * my
    return torch.stack([-0.5 * a, -b, -0.5 * c, gx, gy, log_opac - 0.5 * (gx * mx + gy * my)], -1)


def _exponent_coefs_vjp(params: Tensor, centre: Tensor, grad: Tensor) -> Tensor:
    """Vector-Jacobian product of `_exponent_coefs`: grad [S, C, 6] w.r.t. coefs -> w.r.t. params."""
    mx, my = (params[..., :2] - centre).unbind(-1)
    a, b, c, _ = params[..., 2:].unbind(-1)
    gx, gy = a * mx + b * my, b * mx + c * my
    v0, v1, v2, v3, v4, v5 = grad.unbind(-1)
    return torch.stack([
        v3 * a + v4 * b - v5 * gx,
        v3 * b + v4 * c - v5 * gy,
        -0.5 * v0 + v3 * mx - 0.5 * v5 * mx * mx,
        -v1 + v3 * my + v4 * mx - v5 * mx * my,
        -0.5 * v2 + v4 * my - 0.5 * v5 * my * my,
        v5,
    ], -1)


def _alphas(coefs: Tensor, basis: Tensor) -> Tensor:
    """alpha [A, C, P] = min(0.999, opacity exp(-sigma)), 0 below 1/255, from coefs [A, C, 6]."""
    num_tiles, chunk, _ = coefs.shape
    raw = torch.mm(coefs.reshape(-1, 6), basis.T).exp_().reshape(num_tiles, chunk, basis.shape[0])
    # threshold keeps raw > 1/255 where gsplat keeps >= 1/255: they differ only at exact equality.
    return F.threshold_(raw, ALPHA_MIN, 0.0).clamp_max_(ALPHA_MAX)


def _transmittance(alpha: Tensor, t_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """T before and after each Gaussian and the "not composited" mask, all [A, C, P].

    t_in [A, P] is the transmittance before the chunk (0 for pixels that already stopped). T only
    decreases, so the rejected Gaussians (T after <= T_MIN) are a suffix of the chunk.
    """
    num_tiles, chunk, num_pix = alpha.shape
    trans = alpha.new_empty(num_tiles, chunk + 1, num_pix)
    trans[:, 0] = t_in
    torch.sub(alpha.new_ones(()), alpha, out=trans[:, 1:])
    trans.cumprod_(1)
    t_after = trans[:, 1:]
    return trans[:, :-1], t_after, t_after <= T_MIN


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of projected Gaussians into tiles.

    Inputs: params [I*N, 6] (mean x, mean y, conic xx, xy, yy, log opacity), colors [I*N, D], plan.
    Outputs: fg [T, D, P] = sum_i c_i alpha_i T_i and final transmittance [T, P] per tile pixel.
    """

    @staticmethod
    def forward(ctx, params: Tensor, colors: Tensor, plan: _Plan):
        tiles, basis = plan.tiles, plan.basis
        num_tiles, num_pix = plan.done0.shape
        chunk, dim = tiles.chunk, colors.shape[1]
        pad = params.new_tensor([[0, 0, 0, 0, 0, _NEG]])  # empty slots: alpha = exp(-1e4) = 0
        params_pad = torch.cat([params, pad]).index_select(0, tiles.slot_gauss).reshape(-1, chunk, 6)
        coefs_pad = _exponent_coefs(params_pad, tiles.chunk_centre[:, None])  # [S/C, C, 6]
        colors_pad = torch.cat([colors, colors.new_zeros(1, dim)]).index_select(0, tiles.slot_gauss)
        colors_pad = colors_pad.reshape(-1, chunk, dim).transpose(1, 2).contiguous()  # [S/C, D, C]
        fg = colors.new_zeros(num_tiles, dim, num_pix)
        trans = colors.new_ones(num_tiles, num_pix)
        done = plan.done0.clone()
        group = max(1, plan.max_elems // (chunk * num_pix))
        saved = []  # per step: (tiles [A], chunks [A], T before the chunk [A, P])
        for step in range(int(tiles.num_chunks.max()) if num_tiles else 0):
            active = ((tiles.num_chunks > step) & ~done.all(-1)).nonzero()[:, 0]
            if len(active) == 0:
                break
            for sel in active.split(group):
                blocks = tiles.first_chunk[sel] + step
                done_sel = done.index_select(0, sel)
                t_in = trans.index_select(0, sel).masked_fill_(done_sel, 0.0)  # [A, P]
                alpha = _alphas(coefs_pad.index_select(0, blocks), basis)  # [A, C, P]
                t_before, t_after, rejected = _transmittance(alpha, t_in)
                weights = alpha.mul_(t_before).masked_fill_(rejected, 0.0)
                # sel holds distinct tiles: read-add-write is exact and faster than index_add_.
                fg.index_copy_(0, sel, torch.baddbmm(fg.index_select(0, sel), colors_pad.index_select(0, blocks), weights))
                num_rejected = rejected.sum(1)  # [A, P]
                # T after the last composited Gaussian = T before the first rejected one.
                first_rejected = (chunk - num_rejected).clamp_max_(chunk - 1)[:, None]
                t_out = torch.where(num_rejected > 0, t_before.gather(1, first_rejected)[:, 0], t_after[:, -1])
                trans.index_copy_(0, sel, torch.where(done_sel, trans.index_select(0, sel), t_out))
                done.index_copy_(0, sel, done_sel | (num_rejected > 0))
                saved.append((sel, blocks, t_in))
        ctx.plan, ctx.saved, ctx.num_params = plan, saved, len(params)
        ctx.save_for_backward(params_pad, coefs_pad, colors_pad, trans)
        return fg, trans

    @staticmethod
    def backward(ctx, grad_fg: Tensor, grad_trans: Tensor):
        params_pad, coefs_pad, colors_pad, trans = ctx.saved_tensors
        plan, grad_fg = ctx.plan, grad_fg.contiguous()
        grad_coefs, grad_colors = torch.zeros_like(coefs_pad), torch.zeros_like(colors_pad)
        # behind [T, P]: sum_{j behind} q_j w_j + T_final dL/dT_final with q_j = <dL/dfg, c_j>,
        # accumulated back to front (the 3DGS "buffer"); dL/dalpha_i = q_i T_i - behind_i / (1 - alpha_i).
        behind = grad_trans * trans
        for sel, blocks, t_in in reversed(ctx.saved):
            colors = colors_pad.index_select(0, blocks)  # [A, D, C]
            alpha = _alphas(coefs_pad.index_select(0, blocks), plan.basis)
            t_before, _, rejected = _transmittance(alpha, t_in)
            weights = (alpha * t_before).masked_fill_(rejected, 0.0)
            g = grad_fg.index_select(0, sel)  # [A, D, P]
            grad_colors.index_copy_(0, blocks, torch.bmm(g, weights.transpose(1, 2)))
            q = torch.bmm(colors.transpose(1, 2), g)  # [A, C, P]
            cum = (q * weights).cumsum_(1)
            total = behind.index_select(0, sel) + cum[:, -1]  # [A, P]
            behind.index_copy_(0, sel, total)
            tail = torch.sub(total[:, None], cum).div_(1.0 - alpha)
            grad_alpha = q.mul_(t_before).sub_(tail)
            # d alpha / d log(alpha) = alpha where alpha is neither clamped nor thresholded.
            grad_log = grad_alpha.mul_(alpha.masked_fill_(alpha >= ALPHA_MAX, 0.0)).masked_fill_(rejected, 0.0)
            grad = torch.mm(grad_log.reshape(-1, grad_log.shape[-1]), plan.basis)
            grad_coefs.index_copy_(0, blocks, grad.reshape(len(blocks), -1, 6))
        grad_params_pad = _exponent_coefs_vjp(params_pad, plan.tiles.chunk_centre[:, None], grad_coefs)
        slot_gauss, num = plan.tiles.slot_gauss, ctx.num_params
        grad_params = grad_params_pad.new_zeros(num + 1, 6).index_add_(0, slot_gauss, grad_params_pad.reshape(-1, 6))
        grad_colors = grad_colors.transpose(1, 2).reshape(-1, grad_colors.shape[1])
        grad_colors = grad_colors.new_zeros(num + 1, grad_colors.shape[1]).index_add_(0, slot_gauss, grad_colors)
        return grad_params[:num], grad_colors[:num], None


def composite(
    means2d: Tensor,  # [I, N, 2] px
    conics: Tensor,  # [I, N, 3]
    log_opacities: Tensor,  # [I, N]
    colors: Tensor,  # [I, N, D]
    depths: Tensor,  # [I, N]
    radii: Tensor,  # [I, N, 2] int, 0 = culled
    width: int,
    height: int,
    tile_size: int = 4,
    chunk: int = 64,
    max_elems: int = 1 << 23,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite projected Gaussians into I images of height x width.

    Returns fg [I, D, H, W] (sum_i c_i alpha_i T_i, no background) and transmittance [I, 1, H, W].
    A compositing step holds about 4 tensors of max_elems elements (bytes: 16 * max_elems for float32).
    """
    num_images, n = depths.shape
    assert means2d.shape == (num_images, n, 2) and conics.shape == (num_images, n, 3), (means2d.shape, conics.shape)
    assert log_opacities.shape == (num_images, n) and colors.shape[:2] == (num_images, n), colors.shape
    tiles = _bin_tiles(means2d.detach(), radii, depths.detach(), tile_size, width, height, chunk)
    ts = tile_size
    # Pixels of the padded tile grid outside the image never need compositing.
    ys = torch.arange(tiles.tiles_y * ts, device=depths.device)[:, None] < height
    xs = torch.arange(tiles.tiles_x * ts, device=depths.device)[None, :] < width
    outside = ~(ys & xs).reshape(tiles.tiles_y, ts, tiles.tiles_x, ts).permute(0, 2, 1, 3).reshape(-1, 1, ts * ts)
    done0 = outside.expand(-1, num_images, -1).reshape(-1, ts * ts)  # [T, P], T = local tile * I + image
    plan = _Plan(tiles, _pixel_basis(ts, means2d.dtype, means2d.device), max_elems, done0)
    params = torch.cat([means2d, conics, log_opacities[..., None]], -1).reshape(num_images * n, 6)
    fg, trans = _Composite.apply(params, colors.reshape(num_images * n, colors.shape[-1]), plan)  # [T, D, P], [T, P]

    def to_image(t: Tensor) -> Tensor:  # [T, D, P] -> [I, D, H, W]
        t = t.reshape(tiles.tiles_y, tiles.tiles_x, num_images, -1, ts, ts).permute(2, 3, 0, 4, 1, 5)
        return t.reshape(num_images, -1, tiles.tiles_y * ts, tiles.tiles_x * ts)[..., :height, :width]

    return to_image(fg), to_image(trans[:, None])
