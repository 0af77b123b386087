"""Benchmark one GS-LRM reconstruction (images + cameras -> Gaussians) on this machine.

    python -m mouserecon.eval.bench_model [--preset facelift] [--resolution 512] [--num-views 5]
                                          [--dtype fp32 --dtype bf16] [--device cpu] [--warmup 0]
                                          [--layers N] [--breakdown]

Random weights. For each dtype, a fresh process builds the model and times one forward pass
(after `--warmup` untimed passes). It reports the time per reconstruction, the peak memory (the
process's peak resident set; on CUDA also the peak allocated GPU memory), the model's FLOP/s
(analytic `forward_flops` / wall time) and utilisation = model FLOP/s / this machine's best
linear-layer matmul FLOP/s at that dtype (F.linear [2048, 1024] x [1024, 2048], measured before
and after the model runs; the better of the two, as other jobs share the CPU). bf16 means
`torch.autocast(device, torch.bfloat16)` around the forward, with fp32 weights; on a CPU its
attention is `mouserecon.model.attention`'s fused AVX512-BF16 kernel where the CPU has those
instructions (compiled before the timed pass), else oneDNN matmuls per chunk of queries.

--breakdown times every linear layer, LayerNorm and attention call of the timed pass (forward
hooks and a wrapper around `mouserecon.model.attention`; on CUDA each call synchronises the
device) and reports each part's seconds, share of the pass, GFLOP/s and utilisation; "other" is
the rest (GELU, residual adds, autocast casts, patchify, ray geometry, head activations).
--layers N builds the preset with N blocks instead: a quick proxy, the blocks' time is linear in N.

On x86 CPUs torch runs fp32 matmuls through MKL and bf16 ones through oneDNN, so the two rates
come from different libraries. bf16 on a CPU without native bf16 instructions (e.g. AVX2 only)
runs matmuls 10-100x slower than fp32 (160x measured on an AVX2 AMD EPYC; the benchmark warns
there); use it there only with a small preset.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import queue
import resource
import time
from dataclasses import replace
from unittest import mock

import torch
from torch import nn

import mouserecon.model
from mouserecon.cameras import Cameras, look_at
from mouserecon.device import SLOW_BF16, cpu_has_native_bf16
from mouserecon.model import GSLRM, ModelConfig, forward_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("attention", "linear", "layernorm")  # timed by --breakdown; "other" is the rest of the pass


def ring_cameras(views: int, size: int) -> Cameras:
    """`views` cameras [1, v] on a 2.7 circle at 20 deg elevation looking at the origin (OpenCV axes)."""
    az, el = torch.arange(views) * (2 * math.pi / views), math.radians(20)
    eyes = 2.7 * torch.stack([math.cos(el) * az.cos(), math.cos(el) * az.sin(), torch.full_like(az, math.sin(el))], -1)
    c2w = look_at(eyes, torch.zeros_like(eyes))[None]  # [1, v, 4, 4]
    focal = 548.9937744 / 512 * size  # FaceLift's ratio
    intrinsics = torch.tensor([focal, focal, size / 2, size / 2]).expand(1, views, 4)
    return Cameras(c2w, intrinsics.clone(), width=size, height=size)


def matmul_flops_per_s(dtype: torch.dtype, device: str, n: int = 1024, repeats: int = 5) -> float:
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


class Breakdown:
    """Seconds and FLOPs per part (PARTS) of the forward passes run inside `attached(model)`.

    FLOPs come from the shapes of each call: a linear 2 * rows * in * out, attention
    4 * b * nh * n_q * n_k * dh (q k^T and p v); LayerNorm is not counted (as in `forward_flops`).
    """

    def __init__(self, device: str):
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.flops = dict.fromkeys(PARTS, 0)
        self._start = 0.0

    def _tic(self, *_) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def _toc(self, part: str, flops: int) -> None:
        _sync(self.device)
        self.seconds[part] += time.perf_counter() - self._start
        self.flops[part] += flops

    @contextlib.contextmanager
    def attached(self, model: nn.Module):
        attention = mouserecon.model.attention

        def timed_attention(q, k, v):  # [b, nh, n, dh] each
            self._tic()
            out = attention(q, k, v)
            self._toc("attention", 4 * q.numel() * k.shape[-2])
            return out

        handles = []
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                handles.append(module.register_forward_pre_hook(self._tic))
                handles.append(module.register_forward_hook(self._module_toc))
        try:
            with mock.patch.object(mouserecon.model, "attention", timed_attention):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def _module_toc(self, module: nn.Module, inputs: tuple, _output) -> None:
        if isinstance(module, nn.Linear):
            self._toc("linear", 2 * inputs[0].numel() * module.out_features)
        else:
            self._toc("layernorm", 0)


def _run_one(config: ModelConfig, views: int, size: int, dtype_name: str, device: str, warmup: int,
             breakdown: bool, queue) -> None:
    """Child process: one model, timed forward pass(es); puts a result dict on `queue`."""
    dtype = DTYPES[dtype_name]
    if device == "cpu" and dtype == torch.bfloat16:
        mouserecon.model._fused_kernel()  # compiled (or loaded from the cache) outside the timed pass
    peak_before = matmul_flops_per_s(dtype, device)
    model = GSLRM(config).to(device).eval()
    images = torch.rand(1, views, 3, size, size, device=device)
    cameras = ring_cameras(views, size).to(device)
    parts = Breakdown(device)
    timing = parts.attached(model) if breakdown else contextlib.nullcontext()
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype != torch.float32):
        for _ in range(warmup):
            model(images, cameras)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with timing:
            _sync(device)
            start = time.perf_counter()
            gaussians = model(images, cameras)
            _sync(device)
            wall = time.perf_counter() - start
    assert torch.isfinite(gaussians.means).all()
    peak_flops = max(peak_before, matmul_flops_per_s(dtype, device))  # the machine is shared: best of both
    flops = forward_flops(config, views, size, size)
    if breakdown:
        counted = parts.flops["linear"] + parts.flops["attention"]
        assert counted == flops, f"forward_flops {flops} != {counted} counted from the calls' shapes"
    queue.put({"dtype": dtype_name, "wall_s": wall, "peak_rss_gib": _peak_rss_gib(), "model_tflop": flops / 1e12,
               "model_tflops_per_s": flops / wall / 1e12, "matmul_tflops_per_s": peak_flops / 1e12,
               "utilisation": flops / wall / peak_flops, "n_gaussians": gaussians.num,
               "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
               "parts": {p: (parts.seconds[p], parts.flops[p]) for p in PARTS} if breakdown else None})


def _report(result: dict) -> None:
    cuda = f", CUDA peak {result['cuda_peak_gib']:.2f} GiB" if result["cuda_peak_gib"] is not None else ""
    print(f"{result['dtype']}: wall {result['wall_s']:.2f} s, peak RSS {result['peak_rss_gib']:.2f} GiB{cuda}, "
          f"{result['n_gaussians']:,} Gaussians, {result['model_tflop']:.3f} TFLOP -> "
          f"{result['model_tflops_per_s'] * 1e3:.1f} GFLOP/s; matmul {result['matmul_tflops_per_s'] * 1e3:.1f} GFLOP/s; "
          f"utilisation {result['utilisation']:.2f}")
    if result["parts"] is None:
        return
    wall, rate = result["wall_s"], result["matmul_tflops_per_s"] * 1e12
    rows = dict(result["parts"])
    rows["other"] = (wall - sum(seconds for seconds, _ in rows.values()), 0)
    for part, (seconds, flops) in rows.items():
        speed = f"{flops / seconds / 1e9:8.1f} GFLOP/s  utilisation {flops / seconds / rate:.2f}" if flops else ""
        print(f"  {part:<9} {seconds:8.2f} s  {seconds / wall:4.0%}  {speed}")


def _result_of(child, results, dtype_name: str) -> dict:
    while True:
        try:
            return results.get(timeout=5)
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the {dtype_name} run exited with code {child.exitcode} without a result") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="facelift")
    parser.add_argument("--resolution", type=int, default=None, help="square image size (default: the preset's)")
    parser.add_argument("--num-views", type=int, default=5)
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default: fp32 and bf16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=0, help="untimed forward passes first")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the preset's)")
    parser.add_argument("--breakdown", action="store_true", help="time attention, linears and LayerNorms")
    args = parser.parse_args(argv)
    config = ModelConfig.preset(args.preset)
    if args.layers is not None:
        config = replace(config, n_layer=args.layers)
    size = args.resolution or config.image_size
    print(f"preset {args.preset}: d={config.d} d_head={config.d_head} layers={config.n_layer} patch={config.patch_size}; "
          f"{args.num_views} views at {size}x{size}, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    context = multiprocessing.get_context("spawn")
    for dtype_name in args.dtype or ["fp32", "bf16"]:
        if dtype_name == "bf16" and args.device == "cpu" and cpu_has_native_bf16() is False:
            print(f"warning: {SLOW_BF16}", flush=True)
        queue = context.Queue()
        child = context.Process(target=_run_one, args=(config, args.num_views, size, dtype_name, args.device,
                                                        args.warmup, args.breakdown, queue))
        child.start()
        result = _result_of(child, queue, dtype_name)
        child.join()
        _report(result)
        print(f"load average after {dtype_name}: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
