"""`mouserecon prepare`: a rig's raw recording (videos + calibration) -> one sample folder per frame.

```
SAMPLES/
  recording.json            the manifest: sources and hashes, calibration and its conversion, fps,
                            frames written / skipped (and why), mask method, per-camera statistics
  background_<camera>.png   the background each camera's masks were computed against (--masks background)
  frame_000123/             one ordinary sample (DESIGN.md section 4), named by the recording's frame index
    images/cam_000.png ...  RGBA: undistorted pixels, alpha = the mouse's mask, cropped and resized
    opencv_cameras.json     the undistorted pinhole cameras of the crops (calibration units, world_up)
    prepare.json            this frame's per-camera mask area, 3D consistency and crop window
```
Per frame: decode every camera's frame (a reader thread beside the main one), mask it on the raw
image (`masks`), undistort colour and mask to the calibration's pinhole camera (`calibration`,
`cv2.remap`), check the masks against each other in 3D (`masks.hull_consistency`), crop a square
around each view's mask (margin as the recipes' `data.crop_margin`) and resize it, then write the
folder under a temporary name and rename it (a writer thread). A frame whose folder exists is
complete and is skipped, so an interrupted run resumes. A frame where a camera sees no mouse or whose
masks disagree in 3D is not written; it is listed in the manifest with the reason. The recording is
only read.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from mouserecon import masks as masking
from mouserecon.calibration import (Calibration, LensCamera, find_calibration, load_calibration, resample_maps,
                                    undistort_maps)
from mouserecon.cameras import Cameras, save_opencv_cameras
from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_json
from mouserecon.normalize import rotation_between
from mouserecon.options import PrepareOptions
from mouserecon.progress import progress
from mouserecon.rundir import file_sha1, versions
from mouserecon.video import (VIDEO_SUFFIXES, FrameSource, candidate_sources, check_sources, match_sources, open_source,
                              probe_size, videos_folder)

log = logging.getLogger(__name__)

MANIFEST = "recording.json"
FRAME_RECORD = "prepare.json"
MANIFEST_FORMAT = "mouserecon-recording"
MANIFEST_VERSION = 1
BACKGROUND_SAMPLES = 50  # frames sampled across the range for the temporal-median background
# A median background is the floor only where the mouse covers a pixel in under half the sampled frames. Where
# the sampled frames show foreground at least this often, the mouse stayed there, the median may hold it, and a
# mask there may be missing the mouse or show its ghost (consistently in every view, so the 3D check cannot tell).
UNRELIABLE_SEEN = 0.25
UNRELIABLE_OVERLAP = 0.25  # a frame is skipped when more than this share of a view's mask lies there
CONSISTENCY_SIDE = 256  # masks are checked against each other at this longer side (px)
STAGES = ("background", "decode", "mask", "undistort", "check", "crop", "write")


class PrepareError(MouseReconError, ValueError):
    """A recording or an output folder that prepare cannot use; the message names the file and the defect."""


def frame_dir_name(index: int) -> str:
    return f"frame_{index:06d}"


@dataclass
class _Camera:
    """One camera of the rig: its calibration, frames, undistortion maps and masker."""

    @property
    def name(self) -> str:
        return self.lens.name

    lens: LensCamera
    source: FrameSource
    maps: tuple[np.ndarray, np.ndarray]  # cv2.remap maps (fixed point) raw -> the undistorted pinhole camera
    check: LensCamera  # the undistorted pinhole camera at CONSISTENCY_SIDE, where masks are compared
    check_maps: tuple[np.ndarray, np.ndarray]  # raw -> `check`
    masks: FrameSource | None = None  # user-given mask frames
    clip: FrameSource | None = None  # an empty-arena clip or frame
    foreground: masking.Foreground | None = None
    unreliable: np.ndarray | None = None  # [H, W] bool: a median background there may hold the mouse


@dataclass
class _Timings:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, start: float) -> None:
        with self.lock:
            self.seconds[stage] += time.perf_counter() - start


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    written: list[int]  # frames written by this run
    resumed: list[int]  # frames already complete in `out`, skipped
    skipped: list[dict]  # {"frame", "reason"} for frames that were not written
    seconds: dict[str, float]  # time per stage (summed over threads); wall clock of the frame loop ("frames")
    #                            and of everything ("total")


def prepare_recording(options: PrepareOptions) -> PrepareResult:
    """Prepare `options.recording` into `options.out` (see the module docstring). Everything about the
    recording is checked before anything is written; raises PrepareError / CalibrationError / VideoError /
    MaskError naming the file and the defect."""
    started = time.perf_counter()
    recording = options.recording
    if not recording.is_dir():
        raise PrepareError(f"{recording}: recording folder not found")
    calibration, cameras = _open_rig(options)
    num_frames, fps = check_sources({c.name: c.source for c in cameras})
    fps = fps if fps is not None else options.fps
    frames = _frame_range(options.frames, num_frames, recording)
    calibration.pinhole_cameras()  # validated as a rig: the cameras look at a common region
    settings = _settings(options)
    out = options.out
    previous = _check_out(out, recording, settings)
    timings = _Timings()
    if options.masks == "background":  # decodes sampled frames of every video: before anything is written
        _fit_backgrounds(cameras, num_frames, timings)
    out.mkdir(parents=True, exist_ok=True)
    for camera in cameras:
        if camera.foreground is not None:
            cv2.imwrite(str(out / f"background_{camera.name}.png"), camera.foreground.background[..., ::-1])
    for stale in out.glob(".frame_*.partial"):  # a run killed while writing a frame
        shutil.rmtree(stale)
    resumed = [i for i in frames if (out / frame_dir_name(i)).is_dir()]
    todo = [i for i in frames if i not in set(resumed)]
    record = functools.partial(_manifest, options, calibration, cameras, num_frames, fps, frames, out, previous,
                               settings)
    # Written first (complete: false), so that a run killed at any point is recognised and resumed.
    manifest = record(skipped=[], seconds={}, complete=False, cache=(previous or {}).get("hashes", {}))
    atomic_write_json(out / MANIFEST, manifest)
    loop_started = time.perf_counter()
    skipped = _run(cameras, calibration, todo, options, out, timings)
    now = time.perf_counter()
    seconds = {**timings.seconds, "frames": now - loop_started, "total": now - started}
    written = [i for i in todo if i not in {s["frame"] for s in skipped}]
    atomic_write_json(out / MANIFEST, record(skipped=skipped, seconds=seconds, complete=True, cache=manifest["hashes"]))
    log.info("prepared %d frames into %s (%d already there, %d skipped) in %.1f s", len(written), out,
             len(resumed), len(skipped), seconds["total"])
    return PrepareResult(out, written, resumed, skipped, seconds)


# ---- checks before anything is written ------------------------------------------------------------


def _open_rig(options: PrepareOptions) -> tuple[Calibration, list[_Camera]]:
    recording = options.recording
    path = options.calibration or find_calibration(recording)
    if path is None:
        raise PrepareError(f"{recording}: no calibration file found (label3d_dannce.mat, calibration.toml, "
                           "opencv_cameras.json or a calibration/ folder); pass --calibration")
    exclude = [options.out, *([options.background] if options.background else []),
               *([Path(options.masks)] if options.masks != "background" else [])]
    videos = videos_folder(recording)
    candidates = candidate_sources(videos, exclude)
    if not candidates:
        raise PrepareError(f"{videos}: no videos or image folders ({', '.join(VIDEO_SUFFIXES)}, or folders of images)")
    # DANNCE files do not store the image size: the first video's is taken, and every video is checked below.
    calibration = load_calibration(path, image_size=probe_size(candidates[0]))
    paths = match_sources(videos, calibration.names, exclude=exclude, require_all=True)
    cameras = []
    for lens in calibration.cameras:
        source = open_source(paths[lens.name])
        if source.size != (lens.width, lens.height):
            raise PrepareError(f"{source.path}: frames are {source.size[0]}x{source.size[1]} but {calibration.path} "
                               f"calibrates camera {lens.name!r} at {lens.width}x{lens.height}")
        check = _scaled_pinhole(lens, CONSISTENCY_SIDE / max(lens.width, lens.height))
        cameras.append(_Camera(lens, source, cv2.convertMaps(*undistort_maps(lens), cv2.CV_16SC2), check,
                               cv2.convertMaps(*resample_maps(lens, check), cv2.CV_16SC2)))
    if options.background is not None:
        clips = match_sources(options.background, calibration.names, single_images=True)
        for camera in cameras:
            camera.clip = open_source(clips[camera.name])
            if camera.clip.size != camera.source.size:
                raise PrepareError(f"{camera.clip.path}: the empty arena is {camera.clip.size[0]}x{camera.clip.size[1]}, "
                                   f"the video {camera.source.path} {camera.source.size[0]}x{camera.source.size[1]}")
    if options.masks != "background":
        mask_paths = match_sources(options.masks, calibration.names)
        for camera in cameras:
            camera.masks = open_source(mask_paths[camera.name])
            if camera.masks.num_frames != camera.source.num_frames or camera.masks.size != camera.source.size:
                raise PrepareError(
                    f"{camera.masks.path}: masks have {camera.masks.num_frames} frames of {camera.masks.size}, "
                    f"the video {camera.source.path} {camera.source.num_frames} of {camera.source.size}")
    return calibration, cameras


def _scaled_pinhole(lens: LensCamera, scale: float) -> LensCamera:
    """`lens.pinhole()` resampled by `scale`."""
    return lens.pinhole().resize(max(1, round(lens.width * scale)), max(1, round(lens.height * scale)))


def _cameras(lenses: list[LensCamera]) -> Cameras:
    """Pinhole LensCameras of one size -> our Cameras [V]."""
    return Cameras(torch.tensor(np.stack([c.c2w() for c in lenses]), dtype=torch.float32),
                   torch.tensor([[c.K[0, 0], c.K[1, 1], c.K[0, 2], c.K[1, 2]] for c in lenses], dtype=torch.float32),
                   lenses[0].width, lenses[0].height)


def parse_frames(spec: str | None, num_frames: int) -> range:
    """"START:STOP:STEP" (Python slice semantics, parts optional) or "N" (one frame) -> frame indices."""
    if spec is None:
        return range(num_frames)
    parts = spec.split(":")
    try:
        values = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise PrepareError(f"--frames must be START:STOP:STEP or N (integers), got {spec!r}") from None
    if len(values) == 1 and values[0] is not None:
        values = [values[0], values[0] + 1]
    if len(values) not in (2, 3) or (len(values) == 3 and values[2] is not None and values[2] <= 0):
        raise PrepareError(f"--frames must be START:STOP:STEP with STEP > 0, or N, got {spec!r}")
    return range(num_frames)[slice(*values)]


def _frame_range(spec: str | None, num_frames: int, recording: Path) -> list[int]:
    frames = list(parse_frames(spec, num_frames))
    if not frames:
        raise PrepareError(f"{recording}: --frames {spec!r} selects no frame of the {num_frames} recorded")
    return frames


def _settings(options: PrepareOptions) -> dict:
    """What determines a frame's output; a resume must use the same."""
    return {"masks": "background" if options.masks == "background" else "user",
            "background": None if options.background is None else str(options.background),
            "crop": options.crop, "side": options.side, "margin": options.margin,
            "min_consistency": options.min_consistency}


def _check_out(out: Path, recording: Path, settings: dict) -> dict | None:
    """The previous manifest of `out` if it prepared the same recording with the same settings (a resume);
    raises PrepareError if `out` holds anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    manifest = out / MANIFEST
    if not manifest.is_file():
        if any(out.iterdir()):
            raise PrepareError(f"{out}: folder is not empty and holds no {MANIFEST}; choose an empty or new folder")
        return None
    try:
        previous = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise PrepareError(f"{manifest}: not valid JSON ({err}); remove it to start over") from None
    if previous.get("format") != MANIFEST_FORMAT:
        raise PrepareError(f"{manifest}: not a mouserecon prepare manifest")
    if Path(previous["recording"]).resolve() != recording.resolve() or previous["settings"] != settings:
        raise PrepareError(f"{out}: prepared from {previous['recording']} with {previous['settings']}, not "
                           f"{recording} with {settings}; use another output folder")
    return previous


# ---- masks ---------------------------------------------------------------------------------------


def background_frames(num_frames: int) -> list[int]:
    """The frames a background is fitted on: BACKGROUND_SAMPLES spread evenly over the whole recording (not
    just the frames asked for, so a frame's mask does not depend on --frames and a resume matches)."""
    return np.unique(np.linspace(0, num_frames - 1, min(BACKGROUND_SAMPLES, num_frames)).round()).astype(int).tolist()


def _fit_backgrounds(cameras: list[_Camera], num_frames: int, timings: _Timings) -> None:
    """Each camera's background (the median of its empty-arena clip or frame if given, else of
    `background_frames`) and its threshold, chosen from `background_frames`."""
    sampled = background_frames(num_frames)
    for camera in progress(cameras, desc="background", unit="camera"):
        start = time.perf_counter()
        sample_frames = [rgb for _, rgb in camera.source.read(sampled)]
        if camera.clip is not None:
            empty = [rgb for _, rgb in camera.clip.read(background_frames(camera.clip.num_frames))]
            background = masking.median_background(empty)
        else:
            if len(sampled) < 10:
                log.warning("%s: background from the median of only %d frames; pass --background with an "
                            "empty-arena clip", camera.name, len(sampled))
            background = masking.median_background(sample_frames)
        camera.foreground = masking.fit_foreground(background, sample_frames, camera.name)
        if camera.clip is None:
            seen = np.mean([camera.foreground.alpha(rgb) > 0.5 for rgb in sample_frames], axis=0)
            camera.unreliable = seen >= UNRELIABLE_SEEN
            share = float(camera.unreliable.mean())
            if share > 0:
                log.warning("%s: the median background is unreliable on %.2f %% of the image (foreground in >= %d %% of "
                            "the sampled frames: the mouse stayed there); frames whose masks lie there are skipped. "
                            "An empty-arena clip (--background) avoids this", camera.name, 100 * share,
                            round(100 * UNRELIABLE_SEEN))
        timings.add("background", start)


# ---- the frame loop ---------------------------------------------------------------------------------


def _read_frames(cameras: list[_Camera], todo: list[int], timings: _Timings,
                 ) -> Iterator[tuple[int, list[np.ndarray], list[np.ndarray] | None]]:
    """(frame, raw RGB per camera, user mask frames per camera or None), decoded in a thread."""
    streams = [camera.source.read(todo) for camera in cameras]
    mask_streams = [camera.masks.read(todo) for camera in cameras] if cameras[0].masks else None
    items: queue.Queue = queue.Queue(maxsize=4)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        """Queue `item` unless the consumer has stopped (it raised, or was closed); False then."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for index in todo:
                start = time.perf_counter()
                rgb = [_next(stream, index) for stream in streams]
                user = [_next(stream, index) for stream in mask_streams] if mask_streams else None
                timings.add("decode", start)
                if not put((index, rgb, user)):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)
        finally:
            for stream in [*streams, *(mask_streams or [])]:
                stream.close()  # closes the video files

    thread = threading.Thread(target=produce, name="prepare-decode", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _next(stream: Iterator[tuple[int, np.ndarray]], index: int) -> np.ndarray:
    got, frame = next(stream)
    assert got == index, f"decoder yielded frame {got}, expected {index}"
    return frame


def _run(cameras: list[_Camera], calibration: Calibration, todo: list[int], options: PrepareOptions, out: Path,
         timings: _Timings) -> list[dict]:
    """Process and write the frames `todo`: decoding in a thread, views masked and cropped by two workers,
    frames written by two more (PNG encoding releases the GIL). Returns the skipped frames."""
    skipped: list[dict] = []
    pending: list[Future] = []
    with (ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare-view") as views,
          ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare-write") as writer):
        for index, rgb, user in progress(_read_frames(cameras, todo, timings), total=len(todo), desc="prepare",
                                         unit="frame"):
            frame = _process(index, rgb, user, cameras, options, timings, views)
            if isinstance(frame, str):
                skipped.append({"frame": index, "reason": frame})
                log.warning("frame %d skipped: %s", index, frame)
                continue
            pending.append(writer.submit(_write_frame, out, index, frame, calibration, timings))
            while len(pending) > 4:
                pending.pop(0).result()
        for future in pending:
            future.result()
    return skipped


@dataclass
class _Frame:
    images: list[np.ndarray]  # RGBA uint8 per view
    cameras: Cameras
    record: dict


def _process(index: int, rgb: list[np.ndarray], user: list[np.ndarray] | None, cameras: list[_Camera],
             options: PrepareOptions, timings: _Timings, pool: ThreadPoolExecutor) -> _Frame | str:
    """One frame -> its views, or the reason it is skipped. Views are masked in `pool` (cv2 and numpy
    release the GIL)."""

    def mask(v: int) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        camera = cameras[v]
        raw = masking.mask_from_frame(user[v]) if user is not None else camera.foreground.alpha(rgb[v])
        timings.add("mask", start)
        start = time.perf_counter()
        small = cv2.remap(raw, *camera.check_maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        timings.add("undistort", start)
        return raw, small

    raw_alpha, alphas = zip(*pool.map(mask, range(len(cameras))))
    start = time.perf_counter()
    stats = [masking.mask_statistics(a) for a in alphas]
    empty = [c.name for c, s in zip(cameras, stats) if s["area_fraction"] < masking.MIN_AREA_FRACTION]
    if empty:
        timings.add("check", start)
        return f"no mouse seen by {', '.join(empty)} (mask area below {masking.MIN_AREA_FRACTION:.1e} of the image)"
    overlaps = [float((a > 0.5)[c.unreliable].sum() / max(1, (a > 0.5).sum())) if c.unreliable is not None else 0.0
                for a, c in zip(raw_alpha, cameras)]
    doubtful = [f"{c.name} {v:.0%}" for c, v in zip(cameras, overlaps) if v > UNRELIABLE_OVERLAP]
    if doubtful:
        timings.add("check", start)
        return (f"masks lie where the median background is unreliable (the mouse stayed there): {', '.join(doubtful)} "
                "of the mask; pass --background with an empty-arena clip")
    consistency = masking.hull_consistency(np.stack(alphas), _cameras([c.check for c in cameras]),
                                           side=CONSISTENCY_SIDE)
    timings.add("check", start)
    bad = [f"{c.name} {v:.2f}" for c, v in zip(cameras, consistency.coverage) if v < options.min_consistency]
    if bad:
        return (f"masks disagree in 3D: coverage by the visual hull of all views below "
                f"{options.min_consistency}: {', '.join(bad)}")

    def crop(v: int) -> tuple[LensCamera, np.ndarray]:
        start = time.perf_counter()
        camera = cameras[v]
        target = (camera.lens.pinhole() if options.crop == "none" else
                  crop_camera(camera.lens, consistency.centre, alphas[v], camera.check, options.side, options.margin))
        image = _resample(rgb[v], raw_alpha[v], camera, target, options.crop == "none")
        timings.add("crop", start)
        return target, image

    targets, images = zip(*pool.map(crop, range(len(cameras))))
    record = {"frame": index, "cameras": [c.name for c in cameras],
              "mask_area_fraction": [s["area_fraction"] for s in stats],
              "mask_components": [s["components"] for s in stats],
              "consistency": [float(v) for v in consistency.coverage],
              "centre": consistency.centre.tolist()}
    return _Frame(list(images), _cameras(list(targets)), record)


def crop_camera(lens: LensCamera, centre: np.ndarray, alpha: np.ndarray, pinhole: LensCamera, side: int,
                margin: float) -> LensCamera:
    """The crop of one view as a pinhole camera: `lens` turned (about its centre, by the smallest rotation) to
    look at the mouse's 3D `centre`, focal length chosen so that the mask (`alpha`, undistorted to `pinhole`,
    the lens's pinhole camera at any size) fits the `side` x `side` image with `margin` of its half-extent on
    each side, principal point at the image centre. A perspective crop: unlike a window of the frame, its
    optical axis goes through the mouse, so the views' axes meet at the mouse (the normalisation centre) and
    no principal point lands outside the crop."""
    c2w = lens.c2w()
    forward = centre - c2w[:3, 3]
    turn = rotation_between(torch.tensor(c2w[:3, 2]), torch.tensor(forward)).numpy()
    rotation = turn @ c2w[:3, :3]  # new camera-to-world rotation
    rows = np.flatnonzero((alpha > 0.5).any(1))
    cols = np.flatnonzero((alpha > 0.5).any(0))
    corners = np.array([[x, y, 1.0] for x in (cols[0], cols[-1] + 1) for y in (rows[0], rows[-1] + 1)])
    rays = corners @ np.linalg.inv(pinhole.K).T @ c2w[:3, :3].T @ rotation  # corner rays in the new camera
    extent = np.abs(rays[:, :2] / rays[:, 2:3]).max()  # a rectangle's image under a rotation: a quadrilateral
    focal = 0.5 * side / (extent * (1.0 + 2.0 * margin))
    K = np.array([[focal, 0.0, 0.5 * side], [0.0, focal, 0.5 * side], [0.0, 0.0, 1.0]])
    return LensCamera(lens.name, side, side, K, np.zeros(5), rotation.T, -rotation.T @ c2w[:3, 3])


def _resample(frame: np.ndarray, alpha: np.ndarray, camera: _Camera, target: LensCamera, whole: bool) -> np.ndarray:
    """RGBA uint8 of `target` resampled from the raw frame and raw alpha (bilinear; outside the raw image:
    white, alpha 0). A crop that shrinks the image by 2x or more samples a pyramid level of the raw frame."""
    if whole:
        maps = camera.maps
        level = 0
    else:
        level = max(0, int(np.floor(np.log2(camera.lens.K[0, 0] / target.K[0, 0]))))
        map_x, map_y = resample_maps(camera.lens, target)
        if level:
            map_x, map_y = (map_x + 0.5) / 2 ** level - 0.5, (map_y + 0.5) / 2 ** level - 0.5
            for _ in range(level):
                frame, alpha = cv2.pyrDown(frame), cv2.pyrDown(alpha)
        maps = cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)
    out = np.empty((target.height, target.width, 4), np.uint8)
    out[..., :3] = cv2.remap(frame, *maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=(255, 255, 255))
    out[..., 3] = np.round(cv2.remap(alpha, *maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                     borderValue=0) * 255.0).astype(np.uint8)
    return out


def _write_frame(out: Path, index: int, frame: _Frame, calibration: Calibration, timings: _Timings) -> None:
    start = time.perf_counter()
    final = out / frame_dir_name(index)
    tmp = out / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    files = [f"images/cam_{v:03d}.png" for v in range(len(frame.images))]
    for name, image in zip(files, frame.images):
        if not cv2.imwrite(str(tmp / name), cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise PrepareError(f"{tmp / name}: could not write the image")
    extra = {"world_up": list(calibration.world_up or (0.0, 0.0, 1.0)), "camnames": frame.record["cameras"],
             "recording_frame": index}
    if calibration.units:
        extra["units"] = calibration.units
    save_opencv_cameras(tmp / "opencv_cameras.json", frame.cameras, files, **extra)
    atomic_write_json(tmp / FRAME_RECORD, frame.record)
    tmp.rename(final)
    timings.add("write", start)


# ---- the manifest ------------------------------------------------------------------------------------


def _manifest(options: PrepareOptions, calibration: Calibration, cameras: list[_Camera], num_frames: int,
              fps: float | None, frames: list[int], out: Path, previous: dict | None, settings: dict, *,
              skipped: list[dict], seconds: dict, complete: bool, cache: dict) -> dict:
    """recording.json; `cache`: earlier file hashes by path (reused while size and mtime are unchanged)."""
    written = sorted(int(p.name.split("_")[1]) for p in out.glob("frame_*") if p.is_dir())
    records = [json.loads((out / frame_dir_name(i) / FRAME_RECORD).read_text()) for i in written]
    skipped_now = {s["frame"] for s in skipped}
    earlier = [s for s in (previous or {}).get("frames", {}).get("skipped", [])
               if s["frame"] not in skipped_now and s["frame"] not in written]
    seen: dict = {}
    per_camera = {}
    for v, camera in enumerate(cameras):
        areas = [r["mask_area_fraction"][v] for r in records]
        coverage = [r["consistency"][v] for r in records]
        entry = {"source": camera.source.describe(),
                 "mask_area_fraction": _summary(areas), "consistency": _summary(coverage)}
        if camera.foreground is not None:
            entry["mask_model"] = camera.foreground.stats
        per_camera[camera.name] = entry
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "complete": complete,
        "recording": str(options.recording.resolve()),
        "calibration": {"path": str(calibration.path), "format": calibration.format,
                        "sha1": _hash(calibration.path, cache, seen), "conversion": calibration.conversion,
                        "units": calibration.units, "cameras": calibration.names,
                        "undistortion": "each frame resampled (cv2.remap, bilinear) to the pinhole camera with "
                                        "the calibration's fx, fy, cx, cy, no skew, no distortion"},
        "sources": {c.name: {**c.source.describe(), "sha1": _hash(c.source.path, cache, seen)} for c in cameras},
        "fps": fps, "num_frames": num_frames,
        "settings": settings,
        "frames": {"requested": options.frames, "selected": len(frames), "written": written,
                   "skipped": sorted([*earlier, *skipped], key=lambda s: s["frame"])},
        "masks": {"method": settings["masks"],
                  "background": ("empty-arena clips " + str(options.background)) if options.background else
                  (f"temporal median of frames {background_frames(num_frames)}"
                   if settings["masks"] == "background" else None),
                  "user_masks": None if settings["masks"] == "background" else str(options.masks)},
        "cameras": per_camera,
        "hashes": seen,
        "seconds": seconds,
        "versions": versions(),
    }


def _hash(path: Path, cache: dict, seen: dict) -> str | list[str]:
    """sha1 of a file (or of each file of a folder), reusing the previous manifest's value (`cache`) when the
    file's size and modification time are unchanged; every file hashed is recorded in `seen`."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digests = []
    for f in files:
        stat = f.stat()
        key, stamp = str(f.resolve()), [stat.st_size, stat.st_mtime_ns]
        if cache.get(key, {}).get("stamp") == stamp:
            digest = cache[key]["sha1"]
        else:
            digest = file_sha1(f)
        seen[key] = {"stamp": stamp, "sha1": digest}
        digests.append(digest)
    return digests[0] if path.is_file() else digests


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "min": float(array.min()), "max": float(array.max())}

