"""Benchmark one GS-LRM reconstruction (images + cameras -> Gaussians) on this machine.

    python -m mouserecon.eval.bench_model [--preset facelift] [--resolution 512] [--num-views 5]
                                          [--dtype fp32 --dtype bf16] [--device cpu]

Random weights. For each dtype, a fresh process builds the model and times one forward pass
(after `--warmup` untimed passes) and reports its peak resident memory. bf16 means
`torch.autocast(device, torch.bfloat16)` around the forward, with fp32 weights. Utilisation =
(analytic model FLOPs / wall time) / (this machine's best linear-layer matmul FLOP/s at that dtype, measured
before and after the model runs; the better of the two, as other jobs share the CPU).
bf16 on a CPU without native bf16 instructions (e.g. AVX2 only) runs matmuls 10-100x slower than
fp32; use it there only with a small preset.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import time

import torch

from mouserecon.cameras import Cameras, look_at
from mouserecon.model import GSLRM, ModelConfig, forward_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ring_cameras(views: int, size: int) -> Cameras:
    """`views` cameras [1, v] on a 2.7 circle at 20 deg elevation looking at the origin (OpenCV axes)."""
    az, el = torch.arange(views) * (2 * math.pi / views), math.radians(20)
    eyes = 2.7 * torch.stack([math.cos(el) * az.cos(), math.cos(el) * az.sin(), torch.full_like(az, math.sin(el))], -1)
    c2w = look_at(eyes, torch.zeros_like(eyes))[None]  # [1, v, 4, 4]
    focal = 548.9937744 / 512 * size  # FaceLift's ratio
    intrinsics = torch.tensor([focal, focal, size / 2, size / 2]).expand(1, views, 4)
    return Cameras(c2w, intrinsics.clone(), width=size, height=size)


def matmul_flops_per_s(dtype: torch.dtype, device: str, n: int = 1024, repeats: int = 3) -> float:
    """Best of `repeats` of F.linear([2n, n], [2n, n]) at `dtype`: the kernel the model's linears use."""
    x = torch.randn(2 * n, n, device=device).to(dtype)
    w = torch.randn(2 * n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # first call warms up
        _sync(device)
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * (2 * n) * n * (2 * n) / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _run_one(config: ModelConfig, views: int, size: int, dtype_name: str, device: str, warmup: int, queue) -> None:
    """Child process: one model, timed forward pass(es); puts a result dict on `queue`."""
    dtype = DTYPES[dtype_name]
    peak_before = matmul_flops_per_s(dtype, device)
    model = GSLRM(config).to(device).eval()
    images = torch.rand(1, views, 3, size, size, device=device)
    cameras = ring_cameras(views, size).to(device)
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype != torch.float32):
        for _ in range(warmup):
            model(images, cameras)
        _sync(device)
        start = time.perf_counter()
        gaussians = model(images, cameras)
        _sync(device)
        wall = time.perf_counter() - start
    assert torch.isfinite(gaussians.means).all()
    peak_flops = max(peak_before, matmul_flops_per_s(dtype, device))  # the machine is shared: best of both
    flops = forward_flops(config, views, size, size)
    queue.put({"dtype": dtype_name, "wall_s": wall, "peak_rss_gib": _peak_rss_gib(), "model_tflop": flops / 1e12,
               "model_tflops_per_s": flops / wall / 1e12, "matmul_tflops_per_s": peak_flops / 1e12,
               "utilisation": flops / wall / peak_flops, "n_gaussians": gaussians.num})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="facelift")
    parser.add_argument("--resolution", type=int, default=None, help="square image size (default: the preset's)")
    parser.add_argument("--num-views", type=int, default=5)
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default: fp32 and bf16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=0, help="untimed forward passes first")
    args = parser.parse_args(argv)
    config = ModelConfig.preset(args.preset)
    size = args.resolution or config.image_size
    print(f"preset {args.preset}: d={config.d} d_head={config.d_head} layers={config.n_layer} patch={config.patch_size}; "
          f"{args.num_views} views at {size}x{size}, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    context = multiprocessing.get_context("spawn")
    for dtype_name in args.dtype or ["fp32", "bf16"]:
        queue = context.Queue()
        child = context.Process(target=_run_one, args=(config, args.num_views, size, dtype_name, args.device, args.warmup, queue))
        child.start()
        result = queue.get()
        child.join()
        print(f"{result['dtype']}: wall {result['wall_s']:.2f} s, peak RSS {result['peak_rss_gib']:.2f} GiB, "
              f"{result['n_gaussians']:,} Gaussians, {result['model_tflop']:.3f} TFLOP -> "
              f"{result['model_tflops_per_s'] * 1e3:.1f} GFLOP/s; matmul {result['matmul_tflops_per_s'] * 1e3:.1f} GFLOP/s; "
              f"utilisation {result['utilisation']:.2f}")
        print(f"load average after {dtype_name}: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
