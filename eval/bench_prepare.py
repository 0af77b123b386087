"""Benchmark of `mouserecon prepare` (DESIGN.md §8: a script that prints numbers, not a timed test).

    python -m mouserecon.eval.bench_prepare --calibration label3d_dannce.mat [--frames 20] [--recording DIR]

Makes a synthetic recording through the given rig calibration at full resolution (6 cameras at
1152x1024 for the markerless_mouse_1 rig, H.264), into --recording DIR (kept, and reused when DIR
exists) or a temp folder; prepares every frame (background from the recording's empty-arena clips
when it has them, crops of 512 px) into a temp folder, and prints frames per second of the frame loop
(all views of a frame) and the time per stage: decode, mask, undistort, check (3D consistency), crop,
write. Stage times are summed over the threads (decoding, two view workers and two writers run beside
the main thread), so they add up to more than the wall clock. The background fit (decoding the sampled
frames and the median) is a one-off per run and is reported apart.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mouserecon.calibration import load_calibration
from mouserecon.options import PrepareOptions
from mouserecon.prepare import STAGES, prepare_recording
from mouserecon.synth.recording import generate_recording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=Path, help="Rig calibration to render through (with --recording: unused).")
    parser.add_argument("--image-size", default="1152x1024", help="The rig's image size (DANNCE files lack it).")
    parser.add_argument("--frames", type=int, default=20, help="Frames of the synthetic recording.")
    parser.add_argument("--recording", type=Path, help="Where the recording is kept (reused when it exists).")
    parser.add_argument("--side", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        recording = args.recording or Path(tmp) / "recording"
        if not recording.exists():
            if args.calibration is None:
                parser.error("pass --calibration (a rig calibration to render through) or --recording")
            width, height = (int(v) for v in args.image_size.split("x"))
            calibration = load_calibration(args.calibration, image_size=(width, height))
            start = time.perf_counter()
            generate_recording(recording, calibration, args.frames, seed=0, workers=os.cpu_count())
            print(f"generated {args.frames} frames in {time.perf_counter() - start:.1f} s: {recording}")
        clips = recording / "background"  # the synthetic recording's empty-arena clips: every frame is written
        result = prepare_recording(PrepareOptions(recording, Path(tmp) / "samples", side=args.side,
                                                  background=clips if clips.is_dir() else None))
    frames = len(result.written) + len(result.skipped)
    s = result.seconds
    print(f"cpu cores: {os.cpu_count()}; frames prepared: {len(result.written)}, skipped: {len(result.skipped)}")
    print(f"frame loop: {s['frames']:.2f} s wall = {frames / s['frames']:.2f} frames/s (all views of a frame)")
    print(f"background fit (once per run): {s['background']:.2f} s")
    print("per frame, summed over threads (ms): " + ", ".join(
        f"{stage} {1000 * s[stage] / frames:.1f}" for stage in STAGES if stage != "background"))
    print(f"total wall clock: {s['total']:.2f} s")


if __name__ == "__main__":
    main()
