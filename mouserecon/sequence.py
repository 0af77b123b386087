"""Whole recordings: `reconstruct SAMPLES/ -o OUT/` -> one .ply + sidecar per frame and a `sequence.json` index.

```
OUT/
  mouse_000123.ply, mouse_000123.json   one frame: the standard 3DGS PLY and its sidecar, named by the
                                        recording's frame index (sequence players order them by name)
  sequence.json                         frames (index, sample, files, Gaussians, seconds), failures with
                                        their errors, the model, the settings, throughput
```
Every frame goes through the same steps as a single `reconstruct` (`pipeline.prepare`, the GS-LRM, then
`reconstruct.finish`: prune, refine, write), so a frame's Gaussians are those a single run gives (up to
float rounding of the batched forward pass). Throughput: samples are prepared by DataLoader workers while
the model runs, `batch_size` frames go through the model in one forward pass, and writing happens in a
thread. Frame index: the `recording_frame` that `prepare` records in the camera file, else the digits at
the end of the sample folder's name, else its position in the list.

Resumable: a frame whose PLY and sidecar exist (both are written atomically, the sidecar last) and whose
sidecar records this model and these settings is skipped; one made by another model or with other
settings is refused unless `overwrite`. A frame that fails (a bad sample) is recorded in sequence.json
with its error and the others go on; `SequenceResult.failed` tells the caller (the CLI exits 1).

Under torchrun (WORLD_SIZE > 1) the frames are sharded: rank r takes every WORLD_SIZE-th frame from r, on
GPU LOCAL_RANK when CUDA is there; each rank writes its own frames and a partial index, and rank 0 merges
them into sequence.json after a barrier (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from mouserecon.cameras import find_camera_file
from mouserecon.checkpoints import load_checkpoint, resolve_checkpoint
from mouserecon.data import find_samples
from mouserecon.device import pick_device
from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_json
from mouserecon.options import ReconstructOptions, SequenceOptions
from mouserecon.pipeline import CheckpointPredictor, Scene, prepare
from mouserecon.progress import progress
from mouserecon.reconstruct import finish
from mouserecon.rundir import file_sha1
from mouserecon.sidecar import Sidecar, SidecarError

log = logging.getLogger(__name__)

INDEX = "sequence.json"
INDEX_FORMAT = "mouserecon-sequence"
INDEX_VERSION = 1
PREFIX = "mouse_"


class SequenceError(MouseReconError, ValueError):
    """A sequence folder or its inputs cannot be used; the message names the file and the defect."""


@dataclass(frozen=True)
class Frame:
    index: int  # the recording's frame index
    sample: Path

    @property
    def stem(self) -> str:
        return f"{PREFIX}{self.index:06d}"


@dataclass(frozen=True)
class SequenceResult:
    out: Path
    written: list[int]  # frames reconstructed by this process
    resumed: list[int]  # frames already complete, skipped
    failed: list[dict]  # {"frame", "sample", "error"}
    seconds: float
    index: Path | None  # sequence.json (rank 0), None on other ranks


def frame_index(sample: Path, position: int) -> int:
    """The recording frame of a sample: `recording_frame` in its camera file, else the folder name's final
    digits, else `position`."""
    camera_file = find_camera_file(sample)
    if camera_file is not None:
        try:
            recorded = json.loads(camera_file.read_text()).get("recording_frame")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            recorded = None  # a broken camera file fails, with its error, when the frame is reconstructed
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
            return recorded
    digits = re.search(r"(\d+)$", sample.name)
    return int(digits.group(1)) if digits else position


def sequence_frames(source: Path) -> list[Frame]:
    """The frames of a folder of samples or a list file, ordered by frame index; indices must be distinct."""
    frames = sorted((Frame(frame_index(s, i), s) for i, s in enumerate(find_samples(source))), key=lambda f: f.index)
    seen: dict[int, Path] = {}
    for frame in frames:
        if frame.index in seen:
            raise SequenceError(f"{source}: samples {seen[frame.index]} and {frame.sample} are both frame {frame.index}")
        seen[frame.index] = frame.sample
    return frames


class _Scenes(Dataset):
    """Frame -> (frame, Scene or the error that made it fail), prepared in DataLoader workers."""

    def __init__(self, frames: list[Frame], options: SequenceOptions, resolution: int, predictor: CheckpointPredictor):
        self.frames, self.options, self.resolution = frames, options, resolution
        self.crop, self.input_resolution = predictor.crop, predictor.input_resolution

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> tuple[Frame, Scene | str]:
        frame = self.frames[i]
        try:
            return frame, prepare(frame.sample, self.options.inputs, self.options.heldout, self.resolution, self.crop,
                                  self.input_resolution)
        except MouseReconError as err:  # a bad sample: recorded, the others go on
            return frame, str(err)


def _keep_as_is(batch: list) -> list:
    return batch


def reconstruct_sequence(options: SequenceOptions) -> SequenceResult:
    """Reconstruct every frame of `options.samples` into `options.out` (see the module docstring)."""
    started = time.perf_counter()
    o = options
    frames = sequence_frames(o.samples)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = _rank_device(o.device, world)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    checkpoint = resolve_checkpoint(o.checkpoint)
    model, info = load_checkpoint(checkpoint, device)
    resolution = o.resolution or info.config.image_size
    predictor = CheckpointPredictor(model, refined=o.refine > 0, resolution=resolution)
    model_record = {"path": str(checkpoint), "sha1": file_sha1(checkpoint), "format": info.format,
                    "step": info.step, "n_params": info.n_params}
    o.out.mkdir(parents=True, exist_ok=True)
    mine = frames[rank::world]
    resumed = [f.index for f in mine if _complete(f, o, info, resolution)]
    todo = [f for f in mine if f.index not in set(resumed)]
    log.info("sequence: %d frames (%d on this rank), %d already complete, %d to reconstruct", len(frames), len(mine),
             len(resumed), len(todo))
    written, failed = _run(todo, o, predictor, info, str(device), resolution, device)
    seconds = time.perf_counter() - started
    partial = o.out / f".{INDEX}.rank{rank}"
    atomic_write_json(partial, {"written": written, "failed": failed, "seconds": seconds})
    if world > 1:
        dist.barrier()
    index = None
    if rank == 0:
        index = o.out / INDEX
        atomic_write_json(index, _index(frames, o, model_record, resolution, world))
    if world > 1:
        dist.barrier()  # rank 0 has read every partial index
    partial.unlink()
    return SequenceResult(o.out, written, resumed, failed, seconds, index)


def _rank_device(choice: str, world: int) -> torch.device:
    device = pick_device(choice)
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def _frame_options(frame: Frame, o: SequenceOptions) -> ReconstructOptions:
    return ReconstructOptions(frame.sample, o.out / f"{frame.stem}.ply", o.checkpoint, o.device, o.inputs, o.heldout,
                              o.resolution, o.units, o.min_opacity, o.refine)


def _complete(frame: Frame, o: SequenceOptions, info, resolution: int) -> bool:
    """Whether the frame's PLY and sidecar exist and record this model and settings (then it is skipped).
    Files of another model or other settings raise SequenceError unless `overwrite`."""
    ply = o.out / f"{frame.stem}.ply"
    sidecar_path = Sidecar.path_for(ply)
    if not sidecar_path.exists():
        return False
    try:
        sidecar = Sidecar.read(sidecar_path)
    except SidecarError:
        if o.overwrite:
            return False
        raise
    ours = {"format": info.format, "step": info.step, "n_params": info.n_params}
    theirs = {k: sidecar.checkpoint.get(k) for k in ours}
    settings = {"units": o.units, "min_opacity": o.min_opacity, "refine": o.refine, "resolution": resolution,
                "sample": str(frame.sample.resolve())}
    recorded = {"units": sidecar.units, "min_opacity": sidecar.min_opacity, "refine": sidecar.refine["steps"],
                "resolution": sidecar.resolution, "sample": str(Path(sidecar.sample).resolve())}
    if o.inputs is not None:
        settings["inputs"], recorded["inputs"] = list(o.inputs), sidecar.input_views
    if theirs == ours and settings == recorded and ply.exists():
        return True
    if o.overwrite:
        return False
    differs = [f"{k}: {recorded[k]!r} (wanted {settings[k]!r})" for k in settings if recorded[k] != settings[k]]
    if theirs != ours:
        differs.insert(0, f"model {theirs} (this one {ours})")
    if not ply.exists():
        differs.append(f"{ply.name} is missing")
    raise SequenceError(f"{sidecar_path}: made by another model or with other settings ({'; '.join(differs)}); "
                        "pass --overwrite to redo it, or use another output folder")


def _run(todo: list[Frame], o: SequenceOptions, predictor: CheckpointPredictor, info, device_name: str,
         resolution: int, device: torch.device) -> tuple[list[int], list[dict]]:
    written: list[int] = []
    failed: list[dict] = []
    if not todo:
        return written, failed
    workers = o.workers if o.workers is not None else (min(4, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0)
    loader = DataLoader(_Scenes(todo, o, resolution, predictor), batch_size=o.batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_keep_as_is, multiprocessing_context="spawn" if workers else None)
    pending: list[Future] = []
    bar = progress(total=len(todo), desc="reconstruct", unit="frame")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sequence-write") as writer:
        for batch in loader:
            good = [(frame, scene) for frame, scene in batch if not isinstance(scene, str)]
            for frame, error in batch:
                if isinstance(error, str):
                    failed.append({"frame": frame.index, "sample": str(frame.sample), "error": error})
                    log.warning("frame %d (%s) failed: %s", frame.index, frame.sample, error)
            if good:
                start = time.perf_counter()
                predictions = predictor.predict_batch([scene for _, scene in good], device)
                seconds = (time.perf_counter() - start) / len(good)
                for (frame, scene), prediction in zip(good, predictions):
                    pending.append(writer.submit(_finish, frame, prediction, scene, o, info, device_name,
                                                 {"running the model (batch share)": seconds}))
            while len(pending) > 2 * o.batch_size:
                _collect(pending.pop(0), written, failed)
            bar.update(len(batch))
        for future in pending:
            _collect(future, written, failed)
    bar.close()
    return written, failed


def _finish(frame: Frame, prediction, scene: Scene, o: SequenceOptions, info, device_name: str,
            timings: dict) -> tuple[Frame, str | None]:
    """`reconstruct.finish` for one frame -> (frame, None), or (frame, the error) when it fails on bad input
    (e.g. refinement on an empty mask); the other frames go on."""
    try:
        finish(prediction, scene, _frame_options(frame, o), info, device_name, timings)
    except MouseReconError as err:
        return frame, str(err)
    return frame, None


def _collect(future: Future, written: list[int], failed: list[dict]) -> None:
    frame, error = future.result()
    if error is None:
        written.append(frame.index)
    else:
        failed.append({"frame": frame.index, "sample": str(frame.sample), "error": error})
        log.warning("frame %d (%s) failed: %s", frame.index, frame.sample, error)


def _index(frames: list[Frame], o: SequenceOptions, model: dict, resolution: int, world: int) -> dict:
    """sequence.json from the frames' sidecars and every rank's partial index."""
    failed, seconds = [], []
    for rank in range(world):
        part = json.loads((o.out / f".{INDEX}.rank{rank}").read_text())
        failed += part["failed"]
        seconds.append(part["seconds"])
    entries = []
    for frame in frames:
        sidecar_path = o.out / f"{frame.stem}.json"
        if not sidecar_path.exists():
            continue
        sidecar = Sidecar.read(sidecar_path)
        entries.append({"frame": frame.index, "sample": str(frame.sample), "ply": f"{frame.stem}.ply",
                        "sidecar": sidecar_path.name, "gaussians": sidecar.counts["written"],
                        "seconds": round(sum(sidecar.timings_s.values()), 4)})
    done = {e["frame"] for e in entries}
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "samples": str(o.samples), "model": model,
            "units": o.units, "resolution": resolution, "min_opacity": o.min_opacity, "refine": o.refine,
            "frames": entries, "failed": sorted((f for f in failed if f["frame"] not in done), key=lambda f: f["frame"]),
            "ranks": world, "seconds_per_rank": [round(s, 3) for s in seconds]}


def read_index(path: Path) -> dict:
    """A sequence folder's (or file's) sequence.json, checked. Raises SequenceError naming the file."""
    path = Path(path)
    index = path / INDEX if path.is_dir() else path
    try:
        record = json.loads(index.read_text())
    except FileNotFoundError:
        raise SequenceError(f"{index}: no sequence index (a folder written by `reconstruct SAMPLES/ -o OUT/`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SequenceError(f"{index}: cannot read the sequence index ({err})") from None
    if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
        raise SequenceError(f"{index}: not a mouserecon sequence index")
    return record

