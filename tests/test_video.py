"""Frame sources: frame-accurate decoding (with seeks), chunked DANNCE videos, image sequences, name matching,
and clear errors for truncated videos and recordings whose cameras disagree."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest

from mouserecon.video import (SEEK_GAP, ChunkedVideoSource, VideoError, VideoSource, check_sources, match_sources,
                              open_source, videos_folder)

W, H = 96, 64


def frame_image(index: int) -> np.ndarray:
    """A frame whose index can be read back through H.264: 8 bars, each black or white by one bit."""
    image = np.full((H, W, 3), 128, np.uint8)
    for bit in range(8):
        image[:, bit * 12:(bit + 1) * 12] = 255 if (index >> bit) & 1 else 0
    return image


def read_index(image: np.ndarray) -> int:
    bars = image[H // 2, 6::12, 1][:8].astype(int)
    return sum(1 << bit for bit, value in enumerate(bars) if value > 128)


def write_video(path: Path, frames: range, fps: int = 100, gop: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"g": str(gop), "crf": "10"}
        for i, index in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(index), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_frame_accurate_reads_with_and_without_seeks(tmp_path):
    source = VideoSource(write_video(tmp_path / "cam.mp4", range(200)))
    assert (source.num_frames, source.fps, source.size) == (200, 100.0, (W, H))
    wanted = [0, 1, 2, 13, 30, 31, 30 + SEEK_GAP + 7, 150, 199]  # sequential steps, short gaps and long seeks
    got = list(source.read(wanted))
    assert [i for i, _ in got] == wanted
    assert [read_index(image) for _, image in got] == wanted


def test_chunked_dannce_videos_are_chained(tmp_path):
    folder = tmp_path / "videos" / "Camera1"
    write_video(folder / "0.mp4", range(0, 40))
    write_video(folder / "40.mp4", range(40, 70))
    source = open_source(folder)
    assert isinstance(source, ChunkedVideoSource) and source.num_frames == 70
    wanted = [5, 39, 40, 41, 69]
    assert [read_index(image) for _, image in source.read(wanted)] == wanted
    (folder / "40.mp4").rename(folder / "45.mp4")
    with pytest.raises(VideoError, match=r"45.mp4: chunk starts at frame 45, expected 40"):
        open_source(folder)


def test_image_sequences(tmp_path):
    folder = tmp_path / "cam1"
    folder.mkdir()
    for i in range(5):
        PIL.Image.fromarray(frame_image(i)).save(folder / f"img_{i:04d}.png")
    source = open_source(folder)
    assert (source.num_frames, source.fps) == (5, None)
    assert [read_index(image) for _, image in source.read([1, 4])] == [1, 4]


def test_truncated_and_unreadable_videos_are_refused(tmp_path):
    good = write_video(tmp_path / "good.mp4", range(60))
    data = good.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"cut.mp4: (unreadable|truncated)"):
        VideoSource(cut)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoError, match=r"junk.mp4: unreadable video"):
        VideoSource(junk)


def test_cameras_must_agree_on_frames_and_fps(tmp_path):
    a = VideoSource(write_video(tmp_path / "a.mp4", range(30)))
    b = VideoSource(write_video(tmp_path / "b.mp4", range(31)))
    c = VideoSource(write_video(tmp_path / "c.mp4", range(30), fps=50))
    assert check_sources({"a": a, "a2": a}) == (30, 100.0)
    with pytest.raises(VideoError, match=r"different frame counts.*a.mp4: 30.*b.mp4: 31"):
        check_sources({"a": a, "b": b})
    with pytest.raises(VideoError, match=r"different frame rates.*c.mp4: 50"):
        check_sources({"a": a, "c": c})


def test_matching_by_name(tmp_path):
    dannce = tmp_path / "dannce"
    for name in ("Camera1", "Camera2"):
        write_video(dannce / "videos" / name / "0.mp4", range(3))
    assert match_sources(dannce, ["Camera1", "Camera2"]) == {
        "Camera1": dannce / "videos" / "Camera1", "Camera2": dannce / "videos" / "Camera2"}

    anipose = tmp_path / "anipose"
    for name in ("cam1", "cam10", "cam2"):
        write_video(anipose / "videos-raw" / f"vid-{name}.mp4", range(3))
    found = match_sources(anipose, ["cam1", "cam2", "cam10"])
    assert {k: v.name for k, v in found.items()} == {"cam1": "vid-cam1.mp4", "cam2": "vid-cam2.mp4",
                                                     "cam10": "vid-cam10.mp4"}
    with pytest.raises(VideoError, match=r"camera 'cam3' matches nothing.*Unclaimed: \['videos-raw/vid-cam10.mp4'\]"):
        match_sources(anipose, ["cam1", "cam2", "cam3"])
    write_video(anipose / "extra" / "cam1_copy.mp4", range(3))
    with pytest.raises(VideoError, match=r"camera 'cam1' matches \['extra/cam1_copy.mp4', 'videos-raw/vid-cam1.mp4'\]"):
        match_sources(anipose, ["cam1", "cam2", "cam10"])
    assert match_sources(anipose, ["cam1", "cam2"], exclude=[anipose / "extra"])["cam1"].name == "vid-cam1.mp4"


def test_every_video_needs_a_camera(tmp_path):
    recording = tmp_path / "rec"
    for name in ("Camera1", "Camera2", "Camera3"):
        write_video(recording / "videos" / name / "0.mp4", range(3))
    write_video(recording / "background" / "Camera1.mp4", range(3))  # outside videos/: not a camera video
    assert videos_folder(recording) == recording / "videos"
    assert len(match_sources(videos_folder(recording), ["Camera1", "Camera2", "Camera3"], require_all=True)) == 3
    with pytest.raises(VideoError, match=r"\['Camera3/0.mp4'\] belong to no camera of the calibration"):
        match_sources(videos_folder(recording), ["Camera1", "Camera2"], require_all=True)
