"""A recording's frames per camera: videos (PyAV, frame-accurate) or image sequences, matched to cameras by name.

A camera's frames come from one of:
- a video file (`.mp4 .avi .mov .mkv`), decoded with PyAV; frame k is the frame whose timestamp is
  k / fps after the stream's start (timestamps, not decode order, so seeking is frame-accurate);
- a folder of videos named by their first frame (DANNCE's `videos/Camera1/0.mp4, 3000.mp4, ...`),
  chained into one source; the chunks must be contiguous;
- a folder of images (`.png .jpg .jpeg .tif .tiff`), frame k the k-th in name order; no fps.

`match_sources(folder, names)` finds each camera's source by name (in `videos_folder(recording)`: its
`videos/` or `videos-raw/` folder, else the recording folder): a path below `folder` whose
folder or file name contains the camera name as a token (case-insensitive; "cam1" matches
`vid-cam1.mp4` and `cam1/` but not `cam10.mp4`). Every camera must match exactly one source and
the error lists what did not match. A video is probed when opened: its packets are counted without
decoding, so a truncated or unreadable file is refused before anything is written.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL.Image

from mouserecon.errors import MouseReconError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SEEK_GAP = 64  # frames: a larger forward gap between wanted frames seeks instead of decoding through


class VideoError(MouseReconError, ValueError):
    """A camera's frames cannot be read; the message names the file and the defect."""


class FrameSource(ABC):
    """The frames of one camera. `num_frames`, `fps` (None for image sequences), `size` (w, h)."""

    path: Path
    num_frames: int
    fps: float | None
    size: tuple[int, int]

    @abstractmethod
    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index, RGB uint8 [H, W, 3]) for the increasing frame indices, in order."""

    def describe(self) -> dict:
        return {"path": str(self.path), "frames": self.num_frames, "fps": self.fps, "size": list(self.size)}


class VideoSource(FrameSource):
    def __init__(self, path: str | Path, first_frame: int = 0):
        self.path = Path(path)
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise VideoError(f"{self.path}: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                if not rate:
                    raise VideoError(f"{self.path}: the video stream has no frame rate")
                self._rate = Fraction(rate)
                self._time_base = stream.time_base
                self._start = stream.start_time or 0
                self.size = (stream.codec_context.width, stream.codec_context.height)
                declared = stream.frames
                counted = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.error.FFmpegError as err:
            raise VideoError(f"{self.path}: unreadable video ({err})") from None
        if counted == 0:
            raise VideoError(f"{self.path}: the video holds no frames")
        if declared and declared != counted:
            raise VideoError(f"{self.path}: truncated or damaged: the header declares {declared} frames "
                             f"but {counted} are stored")
        self.num_frames = counted
        self.fps = float(self._rate)
        self.first_frame = first_frame

    def _index(self, pts: int) -> int:
        return round((pts - self._start) * self._time_base * self._rate)

    def _pts(self, index: int) -> int:
        return self._start + int(Fraction(index) / self._rate / self._time_base)

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        wanted = [i - self.first_frame for i in indices]
        if not wanted:
            return
        if wanted != sorted(set(wanted)) or wanted[0] < 0 or wanted[-1] >= self.num_frames:
            raise ValueError(f"{self.path}: frame indices must increase within [0, {self.num_frames}), got "
                             f"{indices[0]}..{indices[-1]}")
        position, k = 0, 0  # index of the next frame the decoder yields (no seek yet); wanted[k] is being read
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                frames = None
                for k, target in enumerate(wanted):
                    if frames is None or target - position > SEEK_GAP:
                        container.seek(self._pts(target), stream=stream, backward=True)
                        frames = container.decode(stream)
                    for frame in frames:
                        if frame.pts is None:
                            raise VideoError(f"{self.path}: a decoded frame has no timestamp; re-encode the video")
                        position = self._index(frame.pts) + 1
                        if position - 1 == target:
                            yield target + self.first_frame, frame.to_ndarray(format="rgb24")
                            break
                        if position - 1 > target:
                            raise VideoError(f"{self.path}: frame {target + self.first_frame} is missing "
                                             f"(the decoder went from before it to {position - 1 + self.first_frame})")
                    else:
                        raise VideoError(f"{self.path}: frame {target + self.first_frame} could not be decoded "
                                         f"(stream ended; {self.num_frames} packets)")
        except av.error.FFmpegError as err:
            raise VideoError(f"{self.path}: decoding failed near frame {wanted[k] + self.first_frame} ({err})") from None


class ChunkedVideoSource(FrameSource):
    """DANNCE's split videos: `Camera1/0.mp4, 3000.mp4, ...`, each named by its first frame."""

    def __init__(self, folder: Path, files: list[Path]):
        self.path = folder
        self.chunks = [VideoSource(f, int(f.stem)) for f in sorted(files, key=lambda f: int(f.stem))]
        expected = 0
        for chunk in self.chunks:
            if chunk.first_frame != expected:
                raise VideoError(f"{chunk.path}: chunk starts at frame {chunk.first_frame}, expected {expected} "
                                 "(the previous chunks end there)")
            expected += chunk.num_frames
        rates = {c.fps for c in self.chunks}
        sizes = {c.size for c in self.chunks}
        if len(rates) != 1 or len(sizes) != 1:
            raise VideoError(f"{folder}: chunks differ in fps {sorted(rates)} or size {sorted(sizes)}")
        self.num_frames, self.fps, self.size = expected, rates.pop(), sizes.pop()

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        for chunk in self.chunks:
            mine = [i for i in indices if chunk.first_frame <= i < chunk.first_frame + chunk.num_frames]
            yield from chunk.read(mine)

    def describe(self) -> dict:
        return {**super().describe(), "chunks": [str(c.path) for c in self.chunks]}


class ImageSequenceSource(FrameSource):
    def __init__(self, folder: Path, files: list[Path]):
        self.path, self.files, self.fps = folder, sorted(files), None
        self.num_frames = len(self.files)
        try:
            with PIL.Image.open(self.files[0]) as image:
                self.size = image.size
        except OSError as err:
            raise VideoError(f"{self.files[0]}: unreadable image ({err})") from None

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        for index in indices:
            path = self.files[index]
            try:
                with PIL.Image.open(path) as image:
                    rgb = np.asarray(image.convert("RGB"))
            except OSError as err:
                raise VideoError(f"{path}: unreadable image ({err})") from None
            if (rgb.shape[1], rgb.shape[0]) != self.size:
                raise VideoError(f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]}, the sequence's first image "
                                 f"{self.size[0]}x{self.size[1]}")
            yield index, rgb


def _has_token(text: str, name: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])", text.lower()) is not None


def candidate_sources(folder: str | Path, exclude: Sequence[Path] = (), single_images: bool = False) -> list[Path]:
    """Video files, and folders that hold images, below `folder` (hidden paths and paths under `exclude`
    skipped), in name order; with `single_images`, image files too (e.g. one empty-arena frame per camera)."""
    folder = Path(folder)
    excluded = [Path(e).resolve() for e in exclude]
    found = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        resolved = path.resolve()
        if any(resolved == e or e in resolved.parents for e in excluded):
            continue
        if path.is_file() and (path.suffix.lower() in VIDEO_SUFFIXES or
                               (single_images and path.suffix.lower() in IMAGE_SUFFIXES)):
            found.append(path)
        elif path.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir() if f.is_file()):
            found.append(path)
    return found


def probe_size(path: Path) -> tuple[int, int]:
    """(width, height) of a source's frames from its header only (no packet counting, no decoding)."""
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file() and
                                                  f.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)
    if not files:
        raise VideoError(f"{path}: no videos or images")
    first = files[0]
    try:
        if first.suffix.lower() in IMAGE_SUFFIXES:
            with PIL.Image.open(first) as image:
                return image.size
        with av.open(str(first)) as container:
            if not container.streams.video:
                raise VideoError(f"{first}: no video stream")
            context = container.streams.video[0].codec_context
            return context.width, context.height
    except (OSError, av.error.FFmpegError) as err:
        raise VideoError(f"{first}: unreadable ({err})") from None


def open_source(path: Path) -> FrameSource:
    """The FrameSource for a video file, a folder of numbered video chunks, a folder of images, or one image."""
    if path.is_file():
        return ImageSequenceSource(path, [path]) if path.suffix.lower() in IMAGE_SUFFIXES else VideoSource(path)
    videos = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES]
    if videos:
        if len(videos) == 1:
            return VideoSource(videos[0])
        if not all(f.stem.isdigit() for f in videos):
            raise VideoError(f"{path}: several videos {sorted(f.name for f in videos)}; chunks must be named by "
                             "their first frame (0.mp4, 3000.mp4, ...)")
        return ChunkedVideoSource(path, videos)
    images = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise VideoError(f"{path}: no videos or images")
    return ImageSequenceSource(path, images)


def match_sources(folder: str | Path, names: Sequence[str], exclude: Sequence[Path] = (),
                  require_all: bool = False, single_images: bool = False) -> dict[str, Path]:
    """Each camera name -> the one video or image folder below `folder` named after it (see the module
    docstring). Paths under `exclude` (e.g. a background-clip folder) are not considered. Raises
    VideoError listing the cameras that match nothing or several, and the sources no camera claimed;
    with `require_all`, also when a source is claimed by no camera (more videos than cameras)."""
    folder = Path(folder)
    candidates = candidate_sources(folder, exclude, single_images)
    matches: dict[str, list[Path]] = {}
    for name in names:
        hits = [c for c in candidates if _has_token(str(c.relative_to(folder)), name)]
        # A folder named after the camera claims the videos inside it (DANNCE: videos/Camera1/0.mp4).
        folders = [h for h in hits if h.is_dir() or _has_token(h.parent.name, name)]
        if folders:
            hits = sorted({h if h.is_dir() else h.parent for h in folders})
        matches[name] = hits
    problems = [f"camera {n!r} matches {'nothing' if not h else [str(p.relative_to(folder)) for p in h]}"
                for n, h in matches.items() if len(h) != 1]
    claimed = {h[0] for h in matches.values() if len(h) == 1}
    spare = [str(c.relative_to(folder)) for c in candidates
             if c not in claimed and not any(c.is_relative_to(p) or p.is_relative_to(c) for p in claimed)]
    if problems:
        raise VideoError(f"{folder}: cannot match cameras to videos: {'; '.join(problems)}. "
                         f"Unclaimed: {spare or 'none'}. Name each camera's video or folder after the camera.")
    if require_all and spare:
        raise VideoError(f"{folder}: {spare} belong to no camera of the calibration (its cameras: {list(names)}); "
                         "a calibration must cover every video")
    return {n: h[0] for n, h in matches.items()}


def videos_folder(recording: str | Path) -> Path:
    """Where a recording's camera videos are looked for: its `videos/` (DANNCE) or `videos-raw/` (Anipose)
    folder when it has one, else the recording folder itself."""
    recording = Path(recording)
    for name in ("videos", "videos-raw"):
        if (recording / name).is_dir():
            return recording / name
    return recording


def check_sources(sources: dict[str, FrameSource]) -> tuple[int, float | None]:
    """All cameras must have the same frame count and fps; returns them. Raises VideoError naming the files."""
    counts = {n: s.num_frames for n, s in sources.items()}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{sources[n].path}: {c}" for n, c in counts.items())
        raise VideoError(f"cameras have different frame counts ({listing}); trim them to the same synchronised frames")
    rates = {n: s.fps for n, s in sources.items()}
    if len(set(rates.values())) != 1:
        listing = ", ".join(f"{sources[n].path}: {r}" for n, r in rates.items())
        raise VideoError(f"cameras have different frame rates ({listing})")
    return next(iter(counts.values())), next(iter(rates.values()))
