"""Benchmark of the torch render backend against a dense baseline (DESIGN.md §8: a script, not a timed test).

    python -m mouserecon.eval.bench_render [--cases a,b] [--baseline-fraction 0.03125]

Scene: pixel-aligned Gaussians placed as the GS-LRM places them: one per pixel of 5 input views
(the first 5 of 6 cameras on a ring of radius 2.7 at 20 deg elevation, looking at the origin,
fov 49 deg), on the pixel's ray at depth ~2.7 with an isotropic scale of one pixel footprint,
random colours (SH degree 0) and opacities; rendered into all 6 views at the input resolution.

Baseline: gsplat's pure-PyTorch projection (`gsplat.cuda._torch_impl._fully_fused_projection`)
plus a dense compositor that evaluates every visible Gaussian at every pixel (depth-sorted,
cumulative-product transmittance, same alpha rules), autograd for the backward. Its cost is
linear in the number of pixels, so it is timed on a band of image rows (`--baseline-fraction`)
and scaled to the full image; the table says so.

Memory: CPU peak resident set size (ru_maxrss) growth of the process during each measurement,
in MiB. ru_maxrss is a high-water mark: a measurement that does not exceed the previous peak
reports 0, so cases run from the smallest allocation to the largest, and the numbers are an
upper bound on nothing and a lower bound on the extra memory; on CUDA torch's allocator peak.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from mouserecon import render_torch
from mouserecon.cameras import Cameras
from mouserecon.gaussians import Gaussians, rgb_to_sh_dc
from mouserecon.render import render

RADIUS = 2.7


def ring_cameras(num_views: int, size: int, elevation_deg: float = 20.0, fov_deg: float = 49.0) -> Cameras:
    """num_views cameras [V] on a ring of radius 2.7 around +Z, looking at the origin."""
    c2ws = []
    elev = math.radians(elevation_deg)
    for i in range(num_views):
        azim = 2 * math.pi * i / num_views
        centre = RADIUS * torch.tensor([math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)])
        forward = -centre / centre.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        c2w = torch.eye(4)
        c2w[:3, :3] = torch.stack([right, down, forward], -1)
        c2w[:3, 3] = centre
        c2ws.append(c2w)
    focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    intr = torch.tensor([focal, focal, size / 2, size / 2]).expand(num_views, 4)
    return Cameras(torch.stack(c2ws), intr.clone(), size, size)


def pixel_aligned_scene(size: int, num_inputs: int = 5, seed: int = 0) -> tuple[Gaussians, Cameras]:
    """Gaussians [1, num_inputs*size^2] and cameras [1, num_inputs+1] as described in the module doc."""
    gen = torch.Generator().manual_seed(seed)
    cams = ring_cameras(num_inputs + 1, size)
    origins, dirs = cams[:num_inputs].rays()  # [5, H, W, 3]
    n = num_inputs * size * size
    depth = RADIUS + 0.1 * torch.randn(n, 1, generator=gen)
    means = origins.reshape(n, 3) + depth * dirs.reshape(n, 3)
    footprint = depth / cams.intrinsics[0, 0]
    log_scales = torch.log(footprint).expand(n, 3) + 0.1 * torch.randn(n, 3, generator=gen)
    quats = torch.randn(n, 4, generator=gen)
    sh = rgb_to_sh_dc(torch.rand(n, 1, 3, generator=gen))
    opacity_logits = torch.logit(torch.rand(n, generator=gen) * 0.98 + 0.01)
    g = Gaussians(means, sh, log_scales.contiguous(), quats, opacity_logits)
    return Gaussians(**{k: v[None].contiguous() for k, v in vars(g).items()}), cams[None]


# ---- dense baseline ------------------------------------------------------------------------------


def _dense_baseline(g: Gaussians, cams: Cameras, size: int, rows: int):
    """Dense render of the first `rows` image rows of every view: gsplat's torch projection, then every
    visible Gaussian at every pixel. Returns images [V, 3, rows, size]."""
    from gsplat.cuda._torch_impl import _fully_fused_projection

    covars = g.covariances()[0]
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        g.means[0], covars, cams.w2c[0], cams.K[0], size, size
    )
    colors = g.colors[0].clamp_min(0.0)
    opac = g.opacities[0]
    ys, xs = torch.meshgrid(torch.arange(rows) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    pix = torch.stack([xs.flatten(), ys.flatten()], -1)  # [P, 2]
    images = []
    for v in range(len(cams.c2w[0])):
        vis = (radii[v] > 0).all(-1)
        order = torch.argsort(depths[v][vis])
        m2, con, op, col = means2d[v][vis][order], conics[v][vis][order], opac[vis][order], colors[vis][order]
        rows_out = []
        for block in pix.split(256):
            d = block[:, None, :] - m2[None]  # [p, G, 2]
            sigma = 0.5 * (con[:, 0] * d[..., 0] ** 2 + con[:, 2] * d[..., 1] ** 2) + con[:, 1] * d[..., 0] * d[..., 1]
            raw = op * torch.exp(-sigma)
            alpha = torch.where(raw < render_torch.ALPHA_MIN, 0.0, raw.clamp_max(render_torch.ALPHA_MAX))
            t_after = torch.cumprod(1 - alpha, -1)
            t_before = torch.cat([torch.ones_like(t_after[:, :1]), t_after[:, :-1]], -1)
            w = torch.where(t_after > render_torch.T_MIN, alpha * t_before, 0.0)
            t_final = 1 - w.sum(-1, keepdim=True)
            rows_out.append(w @ col + t_final)
        images.append(torch.cat(rows_out).reshape(rows, size, 3).permute(2, 0, 1))
    return torch.stack(images)


# ---- measurement ---------------------------------------------------------------------------------


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _leaves(g: Gaussians) -> Gaussians:
    return Gaussians(**{k: v.detach().clone().requires_grad_(True) for k, v in vars(g).items()})


def _measure(fn, g: Gaussians, backward: bool, repeats: int) -> tuple[float, float]:
    """Best wall time (s) over repeats and maxrss growth (MiB) of fn(g) (+ backward of a weighted sum)."""
    before, best = _maxrss_mib(), float("inf")
    for _ in range(repeats):
        leaves = _leaves(g)
        start = time.perf_counter()
        if backward:
            out = fn(leaves)
            (out * torch.linspace(0, 1, out.numel()).reshape(out.shape)).sum().backward()
        else:
            with torch.no_grad():
                fn(leaves)
        best = min(best, time.perf_counter() - start)
    return best, _maxrss_mib() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="a,b", help="a: 5x128^2 into 6x128^2, b: 5x256^2 into 6x256^2")
    parser.add_argument("--baseline-fraction", type=float, default=1 / 32, help="share of rows the baseline renders")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = {"a": 128, "b": 256}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {open('/proc/loadavg').read().split()[:3]}")
    header = f"{'case':<28}{'method':<34}{'fwd s':>9}{'fwd+bwd s':>11}{'fwd MiB':>9}{'f+b MiB':>9}"
    print(header)
    print("-" * len(header))
    for case in args.cases.split(","):
        size = sizes[case]
        g, cams = pixel_aligned_scene(size)
        label = f"({case}) {g.num} G -> 6x{size}^2"
        rows = max(1, round(size * args.baseline_fraction))
        scale = size / rows
        torch_fn = lambda x: render(x, cams, size, size, backend="torch").images  # noqa: E731
        base_fn = lambda x: _dense_baseline(x, cams, size, rows)  # noqa: E731
        results = {}
        for name, fn, reps, factor in (
            ("torch backend", torch_fn, args.repeats, 1.0),
            (f"dense baseline (x{scale:g} from {rows} rows)", base_fn, 1, scale),
        ):
            fwd, fwd_mem = _measure(fn, g, False, reps)
            both, both_mem = _measure(fn, g, True, reps)
            results[name] = (fwd * factor, both * factor)
            print(f"{label:<28}{name:<34}{fwd * factor:>9.3f}{both * factor:>11.3f}{fwd_mem:>9.0f}{both_mem:>9.0f}")
        (t_fwd, t_both), (b_fwd, b_both) = results.values()
        print(f"{label:<28}{'speed-up (baseline / torch)':<34}{b_fwd / t_fwd:>9.1f}{b_both / t_both:>11.1f}")
    print(f"load after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
