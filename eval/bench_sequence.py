"""Benchmark of sequence reconstruction (DESIGN.md §8: a script that prints numbers, not a timed test).

    python -m mouserecon.eval.bench_sequence SAMPLES [--checkpoint CKPT] [--batch-sizes 1,2,4,8] [--workers 0,1]

SAMPLES: a folder of prepared samples (what `mouserecon prepare` writes). Each setting runs
`reconstruct SAMPLES/ -o <temp>/` end to end (read and prepare each sample, the model, prune, write the
PLY and sidecar, the index) with the given checkpoint (default: the bundled demo model) on the CPU and
prints frames per second of the whole run (model loading included, once per run).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mouserecon.options import SequenceOptions
from mouserecon.sequence import reconstruct_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--workers", default="0,1")  # on 2 CPU cores a worker competes with the model
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"cpu cores: {os.cpu_count()}; samples: {args.samples}")
    for workers in (int(w) for w in args.workers.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            with tempfile.TemporaryDirectory(prefix="bench_sequence_") as tmp:
                start = time.perf_counter()
                result = reconstruct_sequence(SequenceOptions(args.samples, Path(tmp) / "out", args.checkpoint,
                                                              args.device, batch_size=batch, workers=workers))
                seconds = time.perf_counter() - start
            frames = len(result.written)
            print(f"batch {batch}, workers {workers}: {frames} frames in {seconds:.1f} s = {frames / seconds:.2f} "
                  f"frames/s ({len(result.failed)} failed)")


if __name__ == "__main__":
    main()
