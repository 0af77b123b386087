"""Sequences in the viewer: `serve_sequence(OUT/)` plays a `reconstruct SAMPLES/ -o OUT/` folder frame by frame.

`Timeline` reads `sequence.json` (see `mouserecon.sequence`) and loads frames lazily, one at a time on
one worker thread, into a small LRU cache: a frame's Gaussians and, when its sample folder (the
sidecar's `sample`, else the index's) still exists, that sample's cameras and images, moved into the
PLY's frame when the sidecar says the PLY is in model units. It runs without a server.

`serve_sequence` starts the viewer of `viewer/app.py` on the first readable frame, whose splats fix the
scene scale and the initial view for the whole sequence (so the picture does not jump), and adds a
Timeline folder: play / pause, frame slider (position in the index), the recording's frame number, fps,
step back / forward. Showing a frame replaces the splats of the one layer (`frame`) and the frustums;
a frame that cannot be read is logged and reported in the GUI (its splats and cameras are not drawn)
and the other frames still show.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mouserecon.cameras import Cameras
from mouserecon.normalize import Similarity
from mouserecon.sequence import SequenceError, read_index
from mouserecon.sidecar import Sidecar, SidecarError
from mouserecon.viewer.app import (
    UP_DIRECTIONS,
    Viewer,
    ViewerError,
    build_scene,
    load_camera_views,
    load_gaussians,
    pick_scene_scale,
    start_server,
)
from mouserecon.viewer.scene import SplatArrays, camera_poses, scaled, splat_arrays

log = logging.getLogger(__name__)

DEFAULT_FPS = 10.0  # when the recording's frame rate is unknown
LAYER = "frame"  # the name of the one layer a sequence draws


# ---- frames, loaded lazily ---------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceFrame:
    """One entry of sequence.json: `frame` is the recording's frame number, the paths are resolved."""

    position: int  # in the index
    frame: int
    ply: Path
    sidecar: Path
    sample: Path | None


@dataclass(frozen=True)
class FrameView:
    """A loaded frame. splats: in the PLY's units (unscaled). cameras [V] in the same frame and
    images (V uint8 [h, w, 3]) or None; note: why there are no cameras (None when there are)."""

    frame: SequenceFrame
    splats: SplatArrays
    cameras: Cameras | None
    images: list[np.ndarray] | None
    note: str | None


class Timeline:
    """The frames of a sequence folder (or its sequence.json), loaded on demand.

    `get(i)` returns the frame at index position i, reading it (on the worker thread) unless it is among
    the `cache_size` most recently used; `preload(i)` starts that read without waiting. `loads` counts
    the PLY reads. Raises ViewerError naming the file: here for a missing or bad index, from `get` for a
    frame's missing or corrupt PLY (a failed read is not cached: the next `get` tries again).
    """

    def __init__(self, path: str | Path, cache_size: int = 8):
        assert cache_size >= 1, f"cache_size must be >= 1, got {cache_size}"
        path = Path(path)
        try:
            index = read_index(path)
        except SequenceError as err:
            raise ViewerError(str(err)) from None
        self.index_path = path / "sequence.json" if path.is_dir() else path
        self.folder = self.index_path.parent
        self.frames = self._frames(index)
        self.fps = _recording_fps(index.get("samples"))
        self.cache_size = cache_size
        self.loads = 0
        self._cache: OrderedDict[int, FrameView] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="frame-loader")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def cached(self) -> list[int]:
        """Positions in the cache, least recently used first."""
        with self._lock:
            return list(self._cache)

    def get(self, position: int) -> FrameView:
        return self._request(position).result()

    def preload(self, position: int) -> None:
        """Start reading a frame in the background; a failure shows when it is asked for."""
        self._request(position)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _frames(self, index: dict) -> list[SequenceFrame]:
        entries = index.get("frames")
        if not isinstance(entries, list) or not entries:
            failed = index.get("failed") or []
            raise ViewerError(f"{self.index_path}: the sequence has no frames ({len(failed)} failed)")
        frames = []
        for i, entry in enumerate(entries):
            try:
                frames.append(SequenceFrame(i, int(entry["frame"]), self.folder / entry["ply"],
                                            self.folder / entry["sidecar"], _sample_path(entry.get("sample"), self.folder)))
            except (TypeError, KeyError, ValueError) as err:
                raise ViewerError(f"{self.index_path}: frames[{i}] is not a frame entry ({err!r})") from None
        return frames

    def _request(self, position: int) -> Future:
        if not 0 <= position < len(self.frames):
            raise IndexError(f"frame position {position} out of range (the sequence has {len(self.frames)} frames)")
        with self._lock:
            if position in self._cache:
                self._cache.move_to_end(position)
                done: Future = Future()
                done.set_result(self._cache[position])
                return done
            if position not in self._pending:
                self._pending[position] = self._pool.submit(self._load_into_cache, position)
            return self._pending[position]

    def _load_into_cache(self, position: int) -> FrameView:
        try:
            view = self._load(self.frames[position])
        except BaseException:
            with self._lock:
                del self._pending[position]
            raise
        with self._lock:
            del self._pending[position]
            self._cache[position] = view
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return view

    def _load(self, frame: SequenceFrame) -> FrameView:
        self.loads += 1
        splats = splat_arrays(load_gaussians(frame.ply))
        sample, sidecar = frame.sample, None
        if frame.sidecar.exists():
            try:
                sidecar = Sidecar.read(frame.sidecar)
                sample = _sample_path(sidecar.sample, self.folder)
            except SidecarError as err:
                log.warning("frame %d: %s; using the index's sample", frame.frame, err)
        if sample is None or not sample.exists():
            note = f"no cameras: sample {sample} not found" if sample is not None else "no cameras: no sample recorded"
            log.info("frame %d: %s", frame.frame, note)
            return FrameView(frame, splats, None, None, note)
        try:
            cameras, images = load_camera_views(sample)
        except ViewerError as err:
            log.warning("frame %d: no cameras (%s)", frame.frame, err)
            return FrameView(frame, splats, None, None, f"no cameras: {err}")
        if sidecar is not None and sidecar.units == "model":  # the PLY is in the normalised rig
            cameras = Similarity.from_dict(sidecar.similarity_user_to_model).apply_cameras(cameras)
        return FrameView(frame, splats, cameras, images, None)


def _sample_path(sample: str | None, folder: Path) -> Path | None:
    """A recorded sample path; a relative one that is not found from here is tried from the sequence folder."""
    if not sample:
        return None
    path = Path(sample)
    return folder / path if not path.is_absolute() and not path.exists() and (folder / path).exists() else path


def _recording_fps(samples: str | None) -> float | None:
    """The frame rate in SAMPLES/recording.json (`prepare`'s manifest), when there is one."""
    manifest = Path(samples) / "recording.json" if samples else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        fps = json.loads(manifest.read_text()).get("fps")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        log.warning("%s: cannot read the recording's fps (%s)", manifest, err)
        return None
    return float(fps) if isinstance(fps, (int, float)) and fps > 0 else None


# ---- the sequence viewer -----------------------------------------------------------------------


@dataclass
class SequenceViewer(Viewer):
    """A `Viewer` showing one frame of `timeline` at a time. position: the index position shown;
    error: why that frame is not drawn (None when it is)."""

    timeline: Timeline | None = None
    position: int = -1
    error: str | None = None
    _frame_lock: threading.RLock = field(default_factory=threading.RLock)
    _playing: threading.Event = field(default_factory=threading.Event)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _player: threading.Thread | None = None

    @property
    def playing(self) -> bool:
        return self._playing.is_set()

    def show_frame(self, position: int) -> FrameView | None:
        """Draw the frame at index position `position` (its splats and cameras) and return it; None when it
        cannot be read (then `error` says why, in the GUI too, and nothing of it is drawn)."""
        timeline, gui = self.timeline, self.gui
        entry = timeline.frames[position]  # IndexError when out of range
        with self._frame_lock:
            self.position = position
            gui["frame"].value = position  # its callback sees `position` already shown
            gui["recording_frame"].value = f"{entry.frame}  ({position + 1} / {len(timeline)})"
            try:
                view = timeline.get(position)
            except ViewerError as err:
                log.error("frame %d: %s", entry.frame, err)
                self.error = str(err)
                gui["frame_status"].content = f"**Cannot show frame {entry.frame}:** {err}"
                with self._lock:
                    self.layers = {}
                    if LAYER in self._splats:
                        self._splats.pop(LAYER).remove()
                self.poses = []
                self.draw_cameras()
                return None
            self.error = None
            self.layers = {LAYER: scaled(view.splats, self.scene_scale)}
            self.poses = camera_poses(view.cameras, self.scene_scale) if view.cameras is not None else []
            self.redraw_splats()
            self.draw_cameras(view.images if view.cameras is not None else None)
            cameras = f"{len(self.poses)} cameras" if view.note is None else view.note
            gui["frame_status"].content = f"{len(view.splats)} Gaussians; {cameras}"
            return view

    def step(self, delta: int) -> FrameView | None:
        """Show the frame `delta` positions on, wrapping around the ends."""
        return self.show_frame((self.position + delta) % len(self.timeline))

    def play(self) -> None:
        """Advance one frame every 1 / fps seconds (the GUI's FPS) until `pause`, looping at the end."""
        self._playing.set()
        self.gui["play"].label = "Pause"
        if self._player is None:
            self._player = threading.Thread(target=self._play_loop, name="sequence-player", daemon=True)
            self._player.start()

    def pause(self) -> None:
        self._playing.clear()
        self.gui["play"].label = "Play"

    def stop(self) -> None:
        self._stopped.set()
        self._playing.clear()
        if self._player is not None:
            self._player.join(timeout=5.0)
        self.timeline.close()
        super().stop()

    def _play_loop(self) -> None:
        while not self._stopped.is_set():
            if not self._playing.wait(timeout=0.2):
                continue
            started = time.monotonic()
            self.step(1)
            self.timeline.preload((self.position + 1) % len(self.timeline))
            period = 1.0 / max(float(self.gui["fps"].value), 0.1)
            self._stopped.wait(max(0.0, period - (time.monotonic() - started)))


def serve_sequence(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    up: str = "+z",
    render_dir: str | Path = ".",
    block: bool = True,
    fps: float | None = None,
    cache_size: int = 8,
) -> SequenceViewer:
    """Open a sequence folder (or its sequence.json) with a timeline; see the module docstring.

    fps: playback rate (default the recording's, from SAMPLES/recording.json, else DEFAULT_FPS).
    Other arguments as `serve_gaussians`. Raises ViewerError naming the file for a missing or bad index
    or when no frame can be read.
    """
    if up not in UP_DIRECTIONS:
        raise ViewerError(f"up direction {up!r} is not one of {', '.join(UP_DIRECTIONS)}")
    if fps is not None and not fps > 0:
        raise ViewerError(f"fps must be > 0, got {fps}")
    timeline = Timeline(path, cache_size)
    first = _first_readable(timeline)
    scene_scale = pick_scene_scale([first.splats])
    server, url = start_server(host, port)
    viewer = SequenceViewer(server, url, scene_scale, {LAYER: scaled(first.splats, scene_scale)}, [],
                            Path(render_dir), timeline=timeline)
    _add_timeline_gui(viewer, fps or timeline.fps or DEFAULT_FPS)
    build_scene(viewer, up, None, camera_gui=True)
    viewer.show_frame(first.frame.position)
    log.info("viewer at %s (%d frames of %s)", viewer.url, len(timeline), timeline.index_path)
    if block:
        viewer.serve_until_interrupted()
    return viewer


def _first_readable(timeline: Timeline) -> FrameView:
    errors = []
    for position in range(len(timeline)):
        try:
            return timeline.get(position)
        except ViewerError as err:
            log.error("%s", err)
            errors.append(str(err))
    timeline.close()
    raise ViewerError(f"{timeline.index_path}: no frame can be read (first: {errors[0]})")


def _add_timeline_gui(viewer: SequenceViewer, fps: float) -> None:
    server, gui, n = viewer.server, viewer.gui, len(viewer.timeline)
    with server.gui.add_folder("Timeline"):
        gui["play"] = server.gui.add_button("Play")
        gui["frame"] = server.gui.add_slider("Frame", min=0, max=n - 1, step=1, initial_value=0, disabled=n == 1)
        gui["recording_frame"] = server.gui.add_text("Recording frame", initial_value="", disabled=True)
        gui["step_back"] = server.gui.add_button("Step back")
        gui["step_forward"] = server.gui.add_button("Step forward")
        gui["fps"] = server.gui.add_number("FPS", initial_value=float(fps), min=0.1, max=1000.0, step=0.1)
        gui["frame_status"] = server.gui.add_markdown("")

    def frame_moved(_) -> None:
        if int(gui["frame"].value) != viewer.position:  # not our own update from show_frame
            viewer.show_frame(int(gui["frame"].value))

    gui["play"].on_click(lambda _: viewer.pause() if viewer.playing else viewer.play())
    gui["frame"].on_update(frame_moved)
    gui["step_back"].on_click(lambda _: viewer.step(-1))
    gui["step_forward"].on_click(lambda _: viewer.step(1))
