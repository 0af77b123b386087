"""Benchmark of the torch and cpp render backends against a dense baseline and peers (DESIGN.md §8: a
script, not a timed test).

    python -m mouserecon.eval.bench_render [--cases a,b] [--baseline-rows 2] [--repeats 3] [--peers DIR]
                                           [--refine-steps 100]

Scene: pixel-aligned Gaussians placed as the GS-LRM places them: one per pixel of 5 input views
(the first 5 of 6 cameras on a ring of radius 2.7 at 20 deg elevation, looking at the origin,
fov 49 deg), on the pixel's ray at depth ~2.7 with an isotropic scale of one pixel footprint,
random colours (SH degree 0) and opacities; rendered into all 6 views at the input resolution.

Baseline: gsplat's pure-PyTorch projection (`gsplat.cuda._torch_impl._fully_fused_projection`)
plus a dense compositor that evaluates every visible Gaussian at every pixel (depth-sorted,
cumulative-product transmittance, same alpha rules), autograd for the backward. Its cost is
linear in the number of pixels, so it is timed on the first `--baseline-rows` image rows
and scaled to the full image (x size / rows); the table says so.

Memory: each measurement runs in a freshly forked process; the column is that process's peak
resident set size (ru_maxrss) minus its resident size when it started (which holds the scene), in
MiB: the peak extra CPU memory of the render (tensors, autograd graph and allocator slack).
Time: best wall-clock time over --repeats runs (baseline: one run).

Refinement (issue #19's target: `--refine 100` at 64 px in at most 3 s): the shipped model's reconstruction
of the demo sample (`reconstruct assets/demo_mouse --resolution 64`, pruned as it prunes), refined for
--refine-steps steps as `reconstruct --refine` does (`pipeline.refine_scene`: 5 crops and 5 whole input
frames of 64 x 64); best
wall-clock time over --repeats runs, and the step's loss before and after. --refine-steps 0 skips it.

Peers. taichi-splatting is timed on the same scene when `--peers DIR` (or $MOUSERECON_BENCH_PEERS)
names a folder it is installed in (`pip install --target DIR --no-deps taichi-splatting==0.13.0 taichi
tensordict beartype dill pyvers`, never touching torch), on taichi's CPU backend; otherwise, or when it
cannot render on the CPU, its row says "not available" and why (0.13.0 compiles CUDA helpers at import
and its rasterizer uses ti.block.shared_array, which taichi's CPU backend lacks). OpenSplat (AGPL, a
C++ application, not vendored) is not run here; its numbers, as measured side by side in issue #19 on
a 2-core machine (best of 3; projection + compositing; our rows are the cpp backend before issue #19's
rewrite), are quoted below and printed with the results:

    case                      ours cpp      ours torch     OpenSplat CPU (1 thread)  taichi-splatting 0.13 CPU
    (a) fwd / fwd+bwd s       0.45 / 0.88   1.56 / 2.23    0.68 / 1.26               0.74 / 1.65
    (b) fwd / fwd+bwd s       1.92 / 3.85   5.77 / 12.17   2.92 / 5.32               2.99 / 5.47
    (a) compositing only, ONE thread each (best of 2):  ours cpp 0.71 / 0.99, OpenSplat 0.48 / 0.77
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from mouserecon import render_cpp, render_torch
from mouserecon.cameras import Cameras, look_at
from mouserecon.gaussians import Gaussians, rgb_to_sh_dc
from mouserecon.render import render

RADIUS = 2.7
SIZES = {"a": 128, "b": 256}


def ring_cameras(num_views: int, size: int, elevation_deg: float = 20.0, fov_deg: float = 49.0) -> Cameras:
    """num_views cameras [V] on a ring of radius 2.7 around +Z, looking at the origin."""
    elev, azim = math.radians(elevation_deg), torch.arange(num_views) * (2 * math.pi / num_views)
    eyes = RADIUS * torch.stack([math.cos(elev) * azim.cos(), math.cos(elev) * azim.sin(),
                                 torch.full_like(azim, math.sin(elev))], -1)  # [V, 3]
    focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    intr = torch.tensor([focal, focal, size / 2, size / 2]).expand(num_views, 4)
    return Cameras(look_at(eyes, torch.zeros_like(eyes)), intr.clone(), size, size)


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


def _dense_block(pix, m2, con, op, col):
    """Composite every Gaussian (depth-sorted) at pixels pix [p, 2] -> rgb [p, 3] on white."""
    d = pix[:, None, :] - m2[None]  # [p, G, 2]
    sigma = 0.5 * (con[:, 0] * d[..., 0] ** 2 + con[:, 2] * d[..., 1] ** 2) + con[:, 1] * d[..., 0] * d[..., 1]
    raw = op * torch.exp(-sigma)
    alpha = torch.where(raw < render_torch.ALPHA_MIN, 0.0, raw.clamp_max(render_torch.ALPHA_MAX))
    t_after = torch.cumprod(1 - alpha, -1)
    t_before = torch.cat([torch.ones_like(t_after[:, :1]), t_after[:, :-1]], -1)
    w = torch.where(t_after > render_torch.T_MIN, alpha * t_before, 0.0)
    return w @ col + (1 - w.sum(-1, keepdim=True))


def _dense_baseline(g: Gaussians, cams: Cameras, size: int, rows: int, block: int = 64):
    """Dense render of the first `rows` image rows of every view: gsplat's torch projection, then every
    visible Gaussian at every pixel, `block` pixels at a time (checkpointed so memory stays bounded;
    the backward recomputes each block). Returns images [V, 3, rows, size]."""
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
        args = means2d[v][vis][order], conics[v][vis][order], opac[vis][order], colors[vis][order]
        out = [checkpoint(_dense_block, p, *args, use_reentrant=False) for p in pix.split(block)]
        images.append(torch.cat(out).reshape(rows, size, 3).permute(2, 0, 1))
    return torch.stack(images)


# ---- measurement ---------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _leaves(g: Gaussians) -> Gaussians:
    return Gaussians(**{k: v.detach().clone().requires_grad_(True) for k, v in vars(g).items()})


def _taichi_splatting(g: Gaussians, cams: Cameras, size: int):
    """fn(leaves) -> images [V, H, W, 3] rendering with taichi-splatting (importable from the peers folder
    `_measure` puts on the child's PYTHONPATH), view by view (its renderer takes one camera), on taichi's CPU
    backend with torch's thread count."""
    import taichi
    taichi.init(arch=taichi.cpu, cpu_max_num_threads=torch.get_num_threads(), log_level=taichi.WARN)
    try:
        import taichi_splatting
        from taichi_splatting.perspective import CameraParams
    except Exception as err:  # re-raised with the context the table row shows
        raise RuntimeError(f"import taichi_splatting failed ({type(err).__name__}: {err}); 0.13.0 JIT-compiles "
                           "its CUDA helpers (cuda_lib) at import") from err

    views = [CameraParams(T_image_camera=cams.K[0, v], T_camera_world=cams.w2c[0, v], near_plane=render_torch.NEAR_PLANE,
                          far_plane=render_torch.FAR_PLANE, image_size=(size, size)) for v in range(cams.c2w.shape[1])]

    def fn(x: Gaussians):
        gaussians = taichi_splatting.Gaussians3D(
            position=x.means[0], log_scaling=x.log_scales[0], rotation=x.quats[0],
            alpha_logit=x.opacity_logits[0][:, None], feature=x.colors[0].clamp_min(0.0), batch_size=(x.num,))
        return torch.stack([taichi_splatting.render_gaussians(gaussians, view).image for view in views])

    return fn


def _measure_here(case: str, method: str, backward: bool, repeats: int, rows: int) -> dict:
    """Best wall time (s) over repeats and peak RSS growth (MiB) of this process."""
    size = SIZES[case]
    g, cams = pixel_aligned_scene(size)
    if method == "taichi-splatting":
        fn = _taichi_splatting(g, cams, size)
    elif method in ("torch", "cpp"):
        if method == "cpp":
            render_cpp.extension()  # compile (or load from the cache) outside the timed region
        fn = lambda x: render(x, cams, size, size, backend=method).images  # noqa: E731
    else:
        fn = lambda x: _dense_baseline(x, cams, size, rows)  # noqa: E731
    start_rss, best = _rss_mib(), float("inf")
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
        del leaves
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": best, "mib": peak - start_rss, "gaussians": g.num}


def _measure(case: str, method: str, backward: bool, repeats: int, rows: int, peers: str = "") -> dict:
    """Run one measurement in a fresh Python process so its peak memory is its own; `peers` (a pip --target
    folder) goes first on that process's PYTHONPATH."""
    cmd = [sys.executable, "-m", "mouserecon.eval.bench_render", "--_child",
           json.dumps([case, method, backward, repeats, rows])]
    env = dict(os.environ)
    if peers:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (peers, env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peer_row(label: str, case: str, repeats: int, peers: str | None) -> str:
    """The taichi-splatting row of a case: its times, or "not available" and why."""
    name = "taichi-splatting 0.13 (taichi CPU)"
    if not peers:
        return f"{label:<26}{name:<36}not available: no --peers folder (or $MOUSERECON_BENCH_PEERS) given"
    try:
        fwd, both = (_measure(case, "taichi-splatting", backward, repeats, 0, peers) for backward in (False, True))
    except subprocess.CalledProcessError as err:
        lines = [line for line in err.stderr.strip().splitlines() if line.strip()]
        return f"{label:<26}{name:<36}not available from {peers}: {lines[-1] if lines else f'exit {err.returncode}'}"
    return f"{label:<26}{name:<36}{fwd['seconds']:>8.2f}{both['seconds']:>11.2f}{fwd['mib']:>9.0f}{both['mib']:>9.0f}"


ISSUE_19 = """peers as measured side by side in issue #19 (2-core machine, best of 3; "ours" = cpp before its rewrite):
  (a) fwd / fwd+bwd s: ours cpp 0.45 / 0.88, OpenSplat CPU (1 thread) 0.68 / 1.26, taichi-splatting 0.13 CPU 0.74 / 1.65
  (b) fwd / fwd+bwd s: ours cpp 1.92 / 3.85, OpenSplat CPU (1 thread) 2.92 / 5.32, taichi-splatting 0.13 CPU 2.99 / 5.47
  (a) compositing only, one thread each, fwd / fwd+bwd s: ours cpp 0.71 / 0.99, OpenSplat 0.48 / 0.77"""


def _refine_row(steps: int, repeats: int) -> str:
    """The refinement benchmark (module docstring) as one line."""
    from mouserecon.checkpoints import demo_checkpoint, load_checkpoint
    from mouserecon.options import DEFAULT_MIN_OPACITY
    from mouserecon.pipeline import CheckpointPredictor, prepare, refine_scene

    demo = Path(str(importlib.resources.files("mouserecon.assets") / "demo_mouse"))
    model, _ = load_checkpoint(demo_checkpoint())
    predictor = CheckpointPredictor(model, refined=True)
    scene = prepare(demo, None, None, 64, predictor.crop, predictor.input_resolution)
    gaussians = predictor.predict(scene, torch.device("cpu")).gaussians.prune(DEFAULT_MIN_OPACITY)  # as reconstruct
    refine_scene(gaussians, scene, 2)  # builds the extension, warms the allocator
    runs = [refine_scene(gaussians, scene, steps) for _ in range(repeats)]
    best = min(run.seconds for run in runs)
    return (f"refine {steps} steps, 64 px, demo sample + shipped model ({gaussians.num} Gaussians, 10 views): "
            f"best {best:.2f} s of {repeats} ({1e3 * best / max(steps, 1):.1f} ms/step), loss "
            f"{runs[0].losses[0]:.5f} -> {runs[0].losses[-1]:.5f}; target 3 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="a,b", help="a: 5x128^2 into 6x128^2, b: 5x256^2 into 6x256^2")
    parser.add_argument("--baseline-rows", type=int, default=2, help="image rows the dense baseline renders")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default=os.environ.get("MOUSERECON_BENCH_PEERS"),
                        help="folder with taichi-splatting installed (pip install --target); default $MOUSERECON_BENCH_PEERS")
    parser.add_argument("--refine-steps", type=int, default=100, help="refinement benchmark steps (0: skip it)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(_measure_here(*json.loads(args._child))))
        return
    load = lambda: " ".join(open("/proc/loadavg").read().split()[:3])  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load()}")
    probe = torch.randn(10_000_000)
    start = time.perf_counter()
    torch.exp(probe)
    print(f"machine speed probe: torch.exp on 1e7 float32 takes {1e3 * (time.perf_counter() - start):.0f} ms")
    header = f"{'case':<26}{'method':<36}{'fwd s':>8}{'fwd+bwd s':>11}{'fwd MiB':>9}{'f+b MiB':>9}"
    print(header)
    print("-" * len(header))
    for case in args.cases.split(","):
        size, rows = SIZES[case], args.baseline_rows
        times = {}
        for method, repeats, factor in (("torch", args.repeats, 1.0), ("cpp", args.repeats, 1.0), ("dense", 1, size / rows)):
            fwd = _measure(case, method, False, repeats, rows)
            both = _measure(case, method, True, repeats, rows)
            times[method] = (fwd["seconds"] * factor, both["seconds"] * factor)
            name = f"{method} backend" if method != "dense" else f"dense baseline (x{factor:g} from {rows} rows)"
            label = f"({case}) {fwd['gaussians']} G -> 6x{size}^2"
            print(f"{label:<26}{name:<36}{times[method][0]:>8.2f}{times[method][1]:>11.2f}"
                  f"{fwd['mib']:>9.0f}{both['mib']:>9.0f}", flush=True)
        ratio = [b / t for b, t in zip(times["dense"], times["torch"])]
        print(f"{'':<26}{'speed-up (baseline / torch)':<36}{ratio[0]:>8.1f}{ratio[1]:>11.1f}", flush=True)
        ratio = [t / c for t, c in zip(times["torch"], times["cpp"])]
        print(f"{'':<26}{'speed-up (torch / cpp)':<36}{ratio[0]:>8.1f}{ratio[1]:>11.1f}", flush=True)
        print(_peer_row(label, case, args.repeats, args.peers), flush=True)
    if args.refine_steps:
        print(_refine_row(args.refine_steps, args.repeats), flush=True)
    print(ISSUE_19)
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
