"""Mask quality of `prepare`'s background subtraction against a synthetic recording's ground truth.

    python -m mouserecon.eval.mask_quality RECORDING [RECORDING ...] [--frames START:STOP:STEP]

RECORDING is what `mouserecon synth-recording` writes (videos, empty-arena clips `background/` and
`ground_truth/masks_<camera>.npz`). For each camera, the masks of the raw frames are computed the way
`prepare --masks background` computes them, with the background taken two ways: the temporal median of
the frames `prepare` samples (no clip), and the median of the empty-arena clip (`--background`). Printed:
IoU of mask > 0.5 against ground truth > 0.5, per camera mean and worst frame, and over all cameras.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mouserecon import masks
from mouserecon.prepare import background_frames, parse_frames
from mouserecon.video import match_sources, open_source, videos_folder


def camera_ious(recording: Path, name: str, frames: list[int]) -> dict[str, np.ndarray]:
    """IoU per frame [F] for each background kind ("median", "clip") of one camera."""
    source = open_source(match_sources(videos_folder(recording), [name])[name])
    truth = np.load(recording / "ground_truth" / f"masks_{name}.npz")["masks"]
    sampled = [rgb for _, rgb in source.read(background_frames(source.num_frames))]
    clip = open_source(match_sources(recording / "background", [name])[name])
    backgrounds = {"median": masks.median_background(sampled),
                   "clip": masks.median_background([rgb for _, rgb in clip.read(range(clip.num_frames))])}
    models = {kind: masks.fit_foreground(bg, sampled, name) for kind, bg in backgrounds.items()}
    ious = {kind: [] for kind in models}
    for index, rgb in source.read(frames):
        true = truth[index] > 127
        for kind, model in models.items():
            mask = model.alpha(rgb) > 0.5
            ious[kind].append((mask & true).sum() / max(1, (mask | true).sum()))
    return {kind: np.asarray(values) for kind, values in ious.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recordings", nargs="+", type=Path)
    parser.add_argument("--frames", help="START:STOP:STEP of the frames scored (default: all)")
    args = parser.parse_args()
    for recording in args.recordings:
        truth_record = json.loads((recording / "ground_truth" / "recording.json").read_text())
        names = truth_record["cameras"]
        frames = list(parse_frames(args.frames, truth_record["num_frames"]))
        print(f"{recording}: {len(frames)} frames, seed {truth_record['seed']}")
        totals = {"median": [], "clip": []}
        for name in names:
            ious = camera_ious(recording, name, frames)
            print(f"  {name}: " + "; ".join(f"{kind} mean {v.mean():.3f} worst {v.min():.3f}" for kind, v in ious.items()))
            for kind, values in ious.items():
                totals[kind].append(values)
        print("  all cameras: " + "; ".join(
            f"{kind} mean {np.concatenate(v).mean():.3f} worst {np.concatenate(v).min():.3f}" for kind, v in totals.items()))


if __name__ == "__main__":
    main()
