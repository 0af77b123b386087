"""GS-LRM: golden FaceLift outputs, an independent reference on non-square views, Gaussian order."""

from __future__ import annotations

import logging
import math
import platform
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mouserecon.cameras import Cameras
from mouserecon.checkpoints import load_checkpoint
from mouserecon.device import cpu_has_native_bf16
from mouserecon.carve import HULL_DEPTH_DILATION, project_to_masks
from mouserecon import render_cpp
from mouserecon.model import (ATTENTION_SOURCE, BACKGROUND_LOGIT, FUSED_HEAD_WIDTHS, GSLRM, PRESETS, ModelConfig,
                              _fused_kernel, _on_threads, attention, chunked_attention, forward_flops, fused_attention,
                              patch_major, posed_images)

ATOL = RTOL = 1e-5  # the golden README's recommendation (fp32 op-order noise is ~2e-6)


def _golden_files(shared_dir):
    files = sorted((shared_dir / "golden").glob("gslrm_golden_*.pt"))
    assert files, f"no gslrm_golden_*.pt in {shared_dir / 'golden'}"
    return [(path, torch.load(path, weights_only=True)) for path in files]


def _golden_model(golden, tmp_path, clip_xyz=False):
    """The golden FaceLift-format checkpoint written to a file and read through our loader."""
    mcfg = golden["config"]["model"]
    assert mcfg["hard_pixelalign"] and mcfg["use_custom_plucker"] and not mcfg["add_refsrc_marker"]
    path = tmp_path / "facelift_ckpt.pt"
    torch.save(golden["checkpoint"], path)
    model, info = load_checkpoint(path, d_head=mcfg["transformer"]["d_head"])
    assert info.format == "facelift" and info.config.n_layer == mcfg["transformer"]["n_layer"]
    if clip_xyz:
        clipped = GSLRM(replace(model.config, clip_xyz=True))
        clipped.load_state_dict(model.state_dict())
        model = clipped.eval()
    return model


def _golden_cameras(inputs):
    h, w = inputs["image"].shape[-2:]
    return Cameras(inputs["c2w"], inputs["fxfycxcy"], width=w, height=h)


def test_golden_facelift_outputs(shared_dir, tmp_path):
    """Every golden file (A here; B with non-square 48x40 views when present) through our loader."""
    for path, golden in _golden_files(shared_dir):
        inputs, ref = golden["inputs"], golden["outputs"]
        cameras = _golden_cameras(inputs)
        torch.testing.assert_close(posed_images(inputs["image"], cameras), golden["intermediates"]["posed_images"],
                                   atol=ATOL, rtol=RTOL, msg=lambda m: f"{path.name} posed_images: {m}")
        for clip, key in ((False, "inference_true"), (True, "inference_false")):
            model = _golden_model(golden, tmp_path, clip_xyz=clip)
            with torch.no_grad():
                out = model(inputs["image"], cameras)
            expected = ref[key]
            pairs = {"xyz": out.means, "features": out.sh, "scaling": out.log_scales, "rotation": out.quats,
                     "opacity": out.opacity_logits[..., None]}
            for name, actual in pairs.items():
                torch.testing.assert_close(actual, expected[name], atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"{path.name} {key} {name}: {m}")


def _cross(a, b):
    return torch.linalg.cross(a, b, dim=-1)


def test_convention_gaussian_order(shared_dir, tmp_path):
    """C8: token Gaussians first, then patch-major pixels. Read patch-major, every pixel Gaussian lies on
    its own pixel's ray (golden outputs and ours); read in raster order, it does not."""
    for path, golden in _golden_files(shared_dir):
        inputs = golden["inputs"]
        b, v, _, h, w = inputs["image"].shape
        p = golden["config"]["model"]["image_tokenizer"]["patch_size"]
        ng = golden["config"]["model"]["gaussians"]["n_gaussians"]
        dirs = golden["intermediates"]["posed_images"][:, :, 3:6].permute(0, 1, 3, 4, 2)  # [b, v, h, w, 3]
        origins = inputs["c2w"][:, :, None, None, :3, 3]  # [b, v, 1, 1, 3]
        model = _golden_model(golden, tmp_path)
        with torch.no_grad():
            ours = model(inputs["image"], _golden_cameras(inputs)).means
        for xyz in (golden["outputs"]["inference_true"]["xyz"], ours):
            pix = xyz[:, ng:]  # [b, v*h*w, 3]
            patch_major = pix.reshape(b, v, h // p, w // p, p, p, 3).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, v, h, w, 3)
            raster = pix.reshape(b, v, h, w, 3)
            on_ray = _cross(patch_major - origins, dirs).norm(dim=-1)
            off_ray = _cross(raster - origins, dirs).norm(dim=-1)
            assert on_ray.max() < 1e-5, f"{path.name}: patch-major xyz off its ray by {on_ray.max():.2e}"
            assert off_ray.mean() > 0.1, f"{path.name}: raster order unexpectedly lies on the rays"


# ---- an independent reference, written from the golden README maths -------------------------------


def _reference_forward(state, cfg, images, c2w, fxfycxcy):
    """Straight from ../shared/golden/README.md: explicit pixel grids, F.unfold patches, manual softmax
    attention, explicit index arithmetic for the patch-major order. Returns dict of FaceLift outputs."""
    b, v, _, h, w = images.shape
    p, ng, d, nh = cfg.patch_size, cfg.n_gaussians, cfg.d, cfg.d // cfg.d_head
    k_sh = (cfg.sh_degree + 1) ** 2
    # rays through pixel centres, normalised in camera and again in world
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")  # [h, w]
    fx, fy, cx, cy = (fxfycxcy[..., i, None, None] for i in range(4))  # [b, v, 1, 1]
    d_cam = torch.stack([(xs - cx) / fx, (ys - cy) / fy, torch.ones(b, v, h, w)], -1)  # [b, v, h, w, 3]
    d_cam = d_cam / d_cam.norm(dim=-1, keepdim=True)
    ray_d = torch.einsum("bvij,bvhwj->bvhwi", c2w[:, :, :3, :3], d_cam)
    ray_d = ray_d / ray_d.norm(dim=-1, keepdim=True)  # [b, v, h, w, 3]
    ray_o = c2w[:, :, None, None, :3, 3].expand_as(ray_d)  # [b, v, h, w, 3]
    t0 = (-ray_o * ray_d).sum(-1, keepdim=True)
    posed = torch.cat([images.permute(0, 1, 3, 4, 2) * 2 - 1, ray_d, ray_o + t0 * ray_d], -1)  # [b, v, h, w, 9]
    # patches: F.unfold gives features (c, ph, pw); reorder to (ph, pw, c)
    cols = F.unfold(posed.permute(0, 1, 4, 2, 3).reshape(b * v, 9, h, w), p, stride=p)  # [bv, 9*p*p, P]
    cols = cols.reshape(b * v, 9, p * p, -1).permute(0, 3, 2, 1).reshape(b, -1, p * p * 9)  # [b, v*P, p*p*9]

    def ln(x, weight):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * weight

    x = torch.cat([state["gaussian_tokens"].expand(b, -1, -1), cols @ state["patch_embed.weight"].T], 1)
    x = ln(x, state["input_norm.weight"])
    for i in range(cfg.n_layer):
        s = {k.split(".", 2)[2]: t for k, t in state.items() if k.startswith(f"blocks.{i}.")}
        q, k, vv = (ln(x, s["norm1.weight"]) @ s["qkv.weight"].T).split(d, -1)
        q, k, vv = (t.reshape(b, -1, nh, cfg.d_head).transpose(1, 2) for t in (q, k, vv))  # [b, nh, n, dh]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(cfg.d_head), -1) @ vv
        x = x + att.transpose(1, 2).reshape(b, -1, d) @ s["proj.weight"].T
        hidden = ln(x, s["norm2.weight"]) @ s["mlp_in.weight"].T
        x = x + 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))) @ s["mlp_out.weight"].T
    raw_tok = ln(x[:, :ng], state["token_head_norm.weight"]) @ state["token_head.weight"].T
    raw_pix = ln(x[:, ng:], state["pixel_head_norm.weight"]) @ state["pixel_head.weight"].T
    raw = torch.cat([raw_tok, raw_pix.reshape(b, v * h * w, -1)], 1)  # [b, N, G]
    # where each pixel Gaussian sits: n = ng + ((((v*Hp + hp)*Wp + wp)*p + ph)*p + pw)
    m = torch.arange(v * h * w)
    pw, ph = m % p, (m // p) % p
    wp, hp = (m // (p * p)) % (w // p), (m // (p * p * (w // p))) % (h // p)
    view = m // (h * w)
    y, xcol = hp * p + ph, wp * p + pw
    o_n, d_n = ray_o[:, view, y, xcol], ray_d[:, view, y, xcol]  # [b, v*h*w, 3]
    sig = torch.sigmoid(raw[:, ng:, :3].mean(-1, keepdim=True))
    xyz_pix = o_n + ((2 * sig - 1) * 1.8 + (-o_n * d_n).sum(-1, keepdim=True)) * d_n
    return {
        "xyz": torch.cat([raw[:, :ng, :3], xyz_pix], 1),
        "features": raw[..., 3:3 + 3 * k_sh].reshape(b, -1, k_sh, 3),
        "scaling": (raw[..., 3 + 3 * k_sh:6 + 3 * k_sh] - 2.3).clamp(max=-1.2),
        "rotation": raw[..., 6 + 3 * k_sh:10 + 3 * k_sh],
        "opacity": raw[..., 10 + 3 * k_sh] - 2.0,
    }


def _orbit_cameras(b, v, h, w, generator):
    """Look-at cameras on a 2.7 sphere, world up +Z, fy = 1.03 fx, cx != cy."""
    az = torch.rand(b, v, generator=generator) * 2 * math.pi
    el = (torch.rand(b, v, generator=generator) - 0.3) * 1.2
    eye = 2.7 * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)  # [b, v, 3]
    fwd = F.normalize(-eye, dim=-1)
    right = F.normalize(torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0]).expand_as(fwd), dim=-1), dim=-1)
    down = torch.linalg.cross(fwd, right, dim=-1)
    c2w = torch.eye(4).repeat(b, v, 1, 1)
    c2w[..., :3, :3] = torch.stack([right, down, fwd], -1)
    c2w[..., :3, 3] = eye
    fx = 1.07 * w
    intr = torch.tensor([fx, 1.03 * fx, 0.45 * w, 0.55 * h]).expand(b, v, 4).clone()
    return Cameras(c2w, intr, width=w, height=h)


def _perturbed(model, generator):
    """Random weights where every parameter matters (LayerNorm weights away from 1, large heads)."""
    with torch.no_grad():
        for name, t in model.named_parameters():
            std = 0.2 if "norm" in name else 0.15 if "head" in name else 0.05
            t.add_(torch.randn(t.shape, generator=generator) * std)
    return model.eval()


def test_matches_independent_reference_non_square():
    g = torch.Generator().manual_seed(7)
    cfg = ModelConfig(d=48, d_head=16, n_layer=3, patch_size=8, image_size=48, sh_degree=1)
    model = _perturbed(GSLRM(cfg), g)
    b, v, h, w = 2, 6, 48, 40
    images = torch.rand(b, v, 3, h, w, generator=g)
    cameras = _orbit_cameras(b, v, h, w, g)
    with torch.no_grad():
        out = model(images, cameras)
        ref = _reference_forward(dict(model.state_dict()), cfg, images, cameras.c2w, cameras.intrinsics)
    assert out.means.shape == (b, 2 + v * h * w, 3) and out.sh.shape == (b, 2 + v * h * w, 4, 3)
    assert (ref["scaling"] == -1.2).float().mean() > 0.02, "the scale clamp must fire for this test to mean much"
    for name, actual in {"xyz": out.means, "features": out.sh, "scaling": out.log_scales,
                         "rotation": out.quats, "opacity": out.opacity_logits}.items():
        torch.testing.assert_close(actual, ref[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def test_clip_xyz_clamps_only_pixel_gaussians():
    g = torch.Generator().manual_seed(3)
    cfg = replace(PRESETS["tiny"], clip_xyz=True)
    model = _perturbed(GSLRM(cfg), g)
    with torch.no_grad():
        model.gaussian_tokens.mul_(50)  # push token xyz far outside [-1, 1]
        images = torch.rand(1, 2, 3, 16, 24, generator=g)
        clipped = model(images, _orbit_cameras(1, 2, 16, 24, g))
    assert clipped.means[:, 2:].abs().max() <= 1.0
    assert clipped.means[:, :2].abs().max() > 1.0, "token Gaussians are never clamped"


def test_pixel_color_skip_adds_each_pixels_own_colour():
    g = torch.Generator().manual_seed(4)
    plain_cfg = replace(PRESETS["tiny"], sh_degree=1)
    plain = _perturbed(GSLRM(plain_cfg), g)
    skip = GSLRM(replace(plain_cfg, pixel_color_skip=True))
    skip.load_state_dict(plain.state_dict())
    b, v, h, w, p = 1, 2, 16, 24, plain_cfg.patch_size
    images = torch.rand(b, v, 3, h, w, generator=g)
    cameras = _orbit_cameras(b, v, h, w, g)
    with torch.no_grad():
        a, c = plain(images, cameras), skip(images, cameras)
    delta = c.sh - a.sh  # [b, n, 4, 3]
    assert delta[:, :2].abs().max() == 0 and delta[:, :, 1:].abs().max() == 0  # tokens and higher SH untouched
    # Gaussian 2 + k of the pixel part is pixel (row, col) of view vi in patch-major order, by hand:
    for k in (0, 5, 64, 64 + 17, 2 * h * w - 1):
        vi, rest = divmod(k, h * w)
        patch, inner = divmod(rest, p * p)
        row = (patch // (w // p)) * p + inner // p
        col = (patch % (w // p)) * p + inner % p
        expected = (images[0, vi, :, row, col] - 0.5) / 0.28209479177387814  # rgb -> SH DC
        torch.testing.assert_close(delta[0, 2 + k, 0], expected, atol=1e-5, rtol=1e-5)
    assert not PRESETS["facelift"].pixel_color_skip and PRESETS["demo"].pixel_color_skip


def test_hull_depth_places_foreground_pixels_in_the_masks_hull_and_hides_the_background():
    g = torch.Generator().manual_seed(6)
    plain = _perturbed(GSLRM(PRESETS["tiny"]), g)
    hulled = GSLRM(replace(PRESETS["tiny"], hull_depth=True)).eval()
    hulled.load_state_dict(plain.state_dict())
    b, v, h, w, ng = 1, 4, 32, 32, PRESETS["tiny"].n_gaussians
    images = torch.rand(b, v, 3, h, w, generator=g)
    cameras = _orbit_cameras(b, v, h, w, g)
    origins, dirs = cameras.rays()  # [b, v, h, w, 3]
    along = (origins * dirs).sum(-1)
    masks = (along**2 - (origins**2).sum(-1) + 0.6**2 > 0).float()[:, :, None]  # a sphere of radius 0.6
    with pytest.raises(ValueError, match="needs input masks"):
        hulled(images, cameras)
    with torch.no_grad():
        a, c = plain(images, cameras, masks), hulled(images, cameras, masks)
    foreground = patch_major(masks.permute(0, 1, 3, 4, 2), 8)[0, :, 0] > 0.5  # [v*h*w], the Gaussians' order
    torch.testing.assert_close(c.means[0, :ng], a.means[0, :ng])  # token Gaussians untouched
    torch.testing.assert_close(c.opacity_logits[0, :ng], a.opacity_logits[0, :ng])
    assert (c.opacity_logits[0, ng:][~foreground] == BACKGROUND_LOGIT).all()
    torch.testing.assert_close(c.opacity_logits[0, ng:][foreground], a.opacity_logits[0, ng:][foreground])
    torch.testing.assert_close(c.means[0, ng:][~foreground], a.means[0, ng:][~foreground])
    # Every foreground pixel's Gaussian is on its own ray, inside the hull; those the network already put
    # there stay where it put them.
    ray_o, ray_d = (patch_major(x, 8)[0][foreground] for x in (origins, dirs))
    offset = c.means[0, ng:][foreground] - ray_o
    torch.testing.assert_close(torch.linalg.cross(offset, ray_d, dim=-1), torch.zeros_like(offset), atol=1e-5, rtol=0)
    inside = lambda m: project_to_masks(m, masks[0], cameras[0], HULL_DEPTH_DILATION)[0].all(0)
    assert inside(c.means[0, ng:][foreground]).all()
    kept = inside(a.means[0, ng:][foreground])
    assert kept.any() and (~kept).any(), "the test needs pixels both inside and outside the hull"
    torch.testing.assert_close(c.means[0, ng:][foreground][kept], a.means[0, ng:][foreground][kept])
    # The gradient passes straight through a move: a loss linear in the depths (the positions along their
    # rays) has the same gradient in both models.
    for model in (plain, hulled):
        model.zero_grad()
        (model(images, cameras, masks).means[0, ng:][foreground] * ray_d).sum().backward()
    assert plain.pixel_head.weight.grad.abs().max() > 0
    torch.testing.assert_close(hulled.pixel_head.weight.grad, plain.pixel_head.weight.grad)


def test_scale_bias_shifts_log_scales_below_the_clamp():
    g = torch.Generator().manual_seed(5)
    cfg = PRESETS["tiny"]
    base = _perturbed(GSLRM(cfg), g)
    shifted = GSLRM(replace(cfg, scale_bias=cfg.scale_bias + 1.5))
    shifted.load_state_dict(base.state_dict())
    images, cameras = torch.rand(1, 2, 3, 16, 16, generator=g), _orbit_cameras(1, 2, 16, 16, g)
    with torch.no_grad():
        a, b = base(images, cameras).log_scales, shifted(images, cameras).log_scales
    free = a < -1.2  # unclamped in the base model: exactly 1.5 lower in the shifted one
    assert free.float().mean() > 0.5
    torch.testing.assert_close(b[free], a[free] - 1.5)
    assert PRESETS["facelift"].scale_bias == 2.3 and PRESETS["demo"].scale_bias == 3.9


def test_forward_flops_matches_torch_flop_counter():
    cfg = PRESETS["tiny"]
    model = GSLRM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 3, 32, 48, generator=g)
    # The math backend runs attention as counted matmuls (the fused CPU kernel is not counted).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(images, _orbit_cameras(1, 3, 32, 48, g))
    rays = 2 * 9 * 3 * 32 * 48  # Cameras.rays() rotates each pixel's direction: 3x3 @ 3
    assert counter.get_total_flops() == forward_flops(cfg, views=3, height=32, width=48) + rays


def test_grad_checkpoint_gives_same_gradients():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 2, 3, 16, 16, generator=g)
    cameras = _orbit_cameras(1, 2, 16, 16, g)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = GSLRM(replace(PRESETS["tiny"], grad_checkpoint=flag)).train()
        out = model(images, cameras)
        (out.means.square().sum() + out.sh.sum() + out.opacity_logits.sum()).backward()
        grads.append([t.grad.clone() for t in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_presets_and_shapes():
    with torch.device("meta"):
        assert GSLRM(PRESETS["facelift"]).num_parameters() == 303_565_824  # golden README, FaceLift's yaml
        small = GSLRM(PRESETS["small"])
    assert 1e6 < small.num_parameters() < 1e7
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="multiple of d_head"):
        ModelConfig(d=50, d_head=16, n_layer=1, patch_size=8, image_size=64)
    model = GSLRM(PRESETS["tiny"]).eval()
    cams = _orbit_cameras(1, 2, 16, 16, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="cameras are 16x16, images 24x16"):
        model(torch.rand(1, 2, 3, 16, 24), cams)
    odd = _orbit_cameras(1, 2, 12, 16, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="multiple of the patch size"):
        model(torch.rand(1, 2, 3, 12, 16), odd)


def test_bf16_autocast_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    model = GSLRM(PRESETS["tiny"]).eval()
    images = torch.rand(1, 2, 3, 16, 16, generator=g)
    cameras = _orbit_cameras(1, 2, 16, 16, g)
    with torch.no_grad():
        ref = model(images, cameras)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images, cameras)
    assert low.means.dtype == torch.float32, "pixel alignment stays fp32 under autocast"
    torch.testing.assert_close(low.means.float(), ref.means, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(low.opacity_logits.float(), ref.opacity_logits, atol=5e-2, rtol=5e-2)


# ---- attention: the CPU bf16 path --------------------------------------------------------------


def _exact_attention(q, k, v):
    """softmax(q k^T / sqrt(dh)) v in float64 on the (bf16-rounded) inputs: [b, nh, n_q, dh]."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def test_chunked_attention_matches_exact_softmax():
    """bf16 inputs, dh 32 (1/sqrt(dh) is not a power of two), ragged last chunks, n_q != n_k. Stated
    tolerance: max error 2^-6 and mean error 2^-10 for outputs of magnitude <= 1 (bf16 spacing at 1 is
    2^-7); row-max logits ~2.6 here. Torch's bf16 SDPA is the yardstick for the mean."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 150, 32, generator=g).bfloat16() for _ in range(3))
    ref = _exact_attention(q, k, v)
    sdpa_mean = (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().mean()
    for chunk in (64, 7):
        out = chunked_attention(q, k, v, chunk=chunk)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        err = (out.double() - ref).abs()
        assert err.max() < 2**-6 and err.mean() < 2**-10, f"chunk {chunk}: max {err.max():.2e} mean {err.mean():.2e}"
        assert err.mean() < 4 * sdpa_mean, f"chunk {chunk}: mean {err.mean():.2e} vs bf16 SDPA {sdpa_mean:.2e}"
    few = chunked_attention(q[:, :, :40], k, v)  # 40 queries over 150 keys
    torch.testing.assert_close(few.double(), ref[:, :, :40], atol=2**-6, rtol=0)
    with pytest.raises(AssertionError, match="needs k, v"):
        chunked_attention(q, k[..., :16], v)


def test_chunked_attention_shares_heads_between_threads():
    """Heads shared out between two threads give the one-thread result bit for bit (every head done
    once), also under inference mode; torch's thread count comes back, also when a job fails."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 3, 70, 16, generator=g).bfloat16() for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = chunked_attention(q, k, v)
        torch.set_num_threads(2)
        with torch.inference_mode():
            shared = chunked_attention(q, k, v)
        assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            _on_threads([lambda: None, lambda: 1 / 0, lambda: None])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(shared, alone)


@pytest.fixture
def fused_kernel():
    """The fused bf16 attention kernel, or a skip where this CPU or compiler cannot run it."""
    if _fused_kernel() is None:
        pytest.skip("the fused attention kernel needs a CPU with AVX512-BF16 and a C++ compiler (see the log)")


def _qkv(b, nh, n, dh, g, spread=1.0):
    """q, k, v [b, nh, n, dh] bf16 as views of one [b, n, 3, nh, dh] tensor (the model's layout: rows
    3 nh dh apart); q scaled by `spread` (larger logits)."""
    qkv = torch.randn(b, n, 3, nh, dh, generator=g).bfloat16().permute(2, 0, 3, 1, 4)
    return (qkv[0] * spread).bfloat16(), qkv[1], qkv[2]


@pytest.mark.parametrize("dh", FUSED_HEAD_WIDTHS)
def test_fused_attention_matches_exact_softmax(fused_kernel, dh):
    """Against float64 softmax attention of the same bf16 inputs, with the tolerance of the chunked test
    (max 2^-6, mean 2^-10, mean <= 4x torch's bf16 SDPA): 150 queries (a short last block of 6 and of
    96) over 150 keys (a short last key block of 64, masked), over exactly 64 keys and over one key;
    logits with row maxima ~2.6 and ~20 (spread 8: exp(20) overflows bf16's and fp16's sums unless the
    maxima are subtracted), and keys whose scores rise along the sequence, so that the running
    maximum changes in every block (the online softmax's rescaling)."""
    g = torch.Generator().manual_seed(20 + dh)
    q, k, v = _qkv(2, 3, 150, dh, g)
    rising = k * torch.linspace(0.1, 3.0, 150).view(1, 1, 150, 1).bfloat16()
    cases = {"random": (q, k, v), "spread 8": (q * 8, k, v), "rising scores": (q.abs(), rising.abs(), v),
             "64 keys": (q, k[:, :, :64], v[:, :, :64]), "one key": (q, k[:, :, :1], v[:, :, :1])}
    for name, (qc, kc, vc) in cases.items():
        ref = _exact_attention(qc, kc, vc)
        out = fused_attention(qc, kc, vc)
        assert out.dtype == torch.bfloat16 and out.shape == qc.shape
        err = (out.double() - ref).abs()
        sdpa_mean = (F.scaled_dot_product_attention(qc, kc, vc).double() - ref).abs().mean()
        assert err.max() < 2**-6 and err.mean() < 2**-10, f"{name}: max {err.max():.2e} mean {err.mean():.2e}"
        assert err.mean() <= 4 * sdpa_mean + 1e-6, f"{name}: mean {err.mean():.2e} vs bf16 SDPA {sdpa_mean:.2e}"
    assert out.transpose(1, 2).is_contiguous(), "out is laid out [b, n, nh, dh] for the block's reshape"
    few = fused_attention(q[:, :, :40].contiguous(), k, v)  # 40 queries over 150 keys, another layout
    torch.testing.assert_close(few.double(), _exact_attention(q[:, :, :40], k, v), atol=2**-6, rtol=0)


def test_fused_attention_is_independent_of_threads(fused_kernel):
    """Two threads give the one-thread result bit for bit (each output row is one thread's work)."""
    q, k, v = _qkv(1, 4, 300, 64, torch.Generator().manual_seed(21))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = fused_attention(q, k, v)
        torch.set_num_threads(2)
        shared = fused_attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(shared, alone)


def test_bf16_cpu_attention_takes_the_fused_kernel_or_the_chunked_path(monkeypatch, caplog):
    """bf16 CPU inference: the fused kernel where it runs, for the head widths it is compiled for;
    chunked matmuls for other widths and, with one warning, where the kernel does not build."""
    q, k, v = _qkv(1, 2, 40, 32, torch.Generator().manual_seed(22))
    with torch.no_grad():
        if _fused_kernel() is not None:
            assert torch.equal(attention(q, k, v), fused_attention(q, k, v))
        odd = [t[..., :24] for t in (q, k, v)]
        assert torch.equal(attention(*odd), chunked_attention(*odd))
        monkeypatch.setattr(render_cpp, "build", lambda source: render_cpp.ExtensionBuildError(f"building {source.name} failed: no g++"))
        _fused_kernel.cache_clear()
        try:
            with caplog.at_level(logging.WARNING, logger="mouserecon.model"):
                assert torch.equal(attention(q, k, v), chunked_attention(q, k, v))
                attention(q, k, v)
            warnings = [r.getMessage() for r in caplog.records if r.name == "mouserecon.model"]
            assert len(warnings) == 1 and "attention_cpu.cpp failed: no g++" in warnings[0]
            with pytest.raises(RuntimeError, match="AVX512-BF16 kernel"):
                fused_attention(q, k, v)
        finally:
            _fused_kernel.cache_clear()


def test_attention_uses_sdpa_except_bf16_cpu_inference(monkeypatch):
    """SDPA (flash attention, with a backward) for fp32 and whenever autograd records; our own paths
    only for bf16 CPU inference. Gradients flow through the bf16 path that records."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *args: calls.append(args[0].dtype) or sdpa(*args))
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        attention(q, k, v)
        assert calls == [torch.float32]
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert calls == [torch.float32], "bf16 CPU inference must take the fused or the chunked path"
    q_grad = q.bfloat16().requires_grad_()
    attention(q_grad, k.bfloat16(), v.bfloat16()).float().sum().backward()
    assert calls == [torch.float32, torch.bfloat16] and q_grad.grad is not None and q_grad.grad.abs().sum() > 0


def test_bf16_small_preset_close_to_fp32():
    """The small preset (6 blocks, dh 32, 130 tokens: chunks of 128 and 2 queries) in bf16 autocast against fp32.
    Stated tolerance per output: max error <= 3 % and mean error <= 0.4 % of the largest fp32 magnitude
    (seeds 8-12 measured 0.5-2.0 % and 0.07-0.21 %). The chunked CPU path (no grad) is as close as
    torch's bf16 SDPA (grad on; measured mean-error ratio 0.98-1.01)."""
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(8)
    model = _perturbed(GSLRM(PRESETS["small"]), g)
    images, cameras = torch.rand(1, 2, 3, 64, 64, generator=g), _orbit_cameras(1, 2, 64, 64, g)
    with torch.no_grad():
        ref = model(images, cameras)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            chunked = model(images, cameras)
        sdpa = model(images, cameras)  # autograd records: the SDPA path
    for name in ("means", "sh", "log_scales", "quats", "opacity_logits"):
        expected, scale = getattr(ref, name), getattr(ref, name).abs().max()
        err = (getattr(chunked, name).float() - expected).abs()
        sdpa_err = (getattr(sdpa, name).detach().float() - expected).abs()
        assert err.max() <= 0.03 * scale and err.mean() <= 0.004 * scale, \
            f"{name}: max {err.max():.3e} mean {err.mean():.3e} vs largest |fp32| {scale:.2f}"
        assert err.mean() <= 1.1 * sdpa_err.mean(), f"{name}: mean {err.mean():.3e} vs bf16 SDPA {sdpa_err.mean():.3e}"


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path):
    """x86 flags with and without AVX512-BF16 / AMX, Arm features with and without BF16, no file."""
    def flags(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return cpu_has_native_bf16(path)

    two_cpus = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
    assert flags(two_cpus) is False
    assert flags("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n") is True
    assert flags("processor\t: 0\nflags\t\t: avx2 amx_bf16\n") is True
    assert flags("processor\t: 0\nFeatures\t: fp asimd sve\n") is False
    assert flags("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n") is True
    assert flags("model name\t: bf16 avx512_bf16 in a name is not a flag\n") is False
    assert cpu_has_native_bf16(tmp_path / "missing") is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
                    reason="the kernel's AVX512-BF16 build is x86; the flags come from Linux's /proc/cpuinfo")
def test_cpu_bf16_flags_agree_with_the_fused_kernels_build():
    """/proc/cpuinfo's answer against the attention kernel's build, whose AVX512-BF16 code exists where
    -march=native (the compiler's own reading of the host CPU) targets it."""
    ext = render_cpp.build(ATTENTION_SOURCE)
    if isinstance(ext, render_cpp.ExtensionBuildError):
        pytest.skip(f"the attention kernel does not build here: {ext}")
    assert cpu_has_native_bf16() == ext.supported()
