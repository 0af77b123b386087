"""Synthetic rig recordings: file layout and formats (decoded independently with PyAV), the lens
distortion against an independent trace through the raw camera, the videos against the noise-free
render, motion, the empty clip, and determinism."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from mouserecon.calibration import Calibration, LensCamera, load_calibration
from mouserecon.synth.mouse import MouseParams, build_mouse
from mouserecon.synth.recording import RecordingRenderer, generate_recording, plan_recording
from mouserecon.synth.trace import TraceConfig, one_thread, ray_box, sphere_trace

RIG_SIZE = (1152, 1024)
SCALE, NUM_FRAMES, EMPTY_FRAMES, SEED = 0.25, 5, 3, 3
NOISE, CRF = 1.5 / 255, 18
FAST_TRACE = TraceConfig(n_steps=48, shadow_steps=12)  # ~1.5x faster; grazing rays miss a little more often


@pytest.fixture(scope="module")
def calibration(shared_dir) -> Calibration:
    return load_calibration(shared_dir / "data" / "markerless_mouse_1_rig" / "label3d_dannce.mat", image_size=RIG_SIZE)


@pytest.fixture(scope="module")
def recording(calibration, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recording") / "rec"
    return generate_recording(out, calibration, NUM_FRAMES, seed=SEED, scale=SCALE, empty_clip_frames=EMPTY_FRAMES,
                              crf=CRF, noise_sigma=NOISE, trace=FAST_TRACE)


@pytest.fixture(scope="module")
def renderer(calibration) -> RecordingRenderer:
    """The recording's scene, re-drawn from the same arguments (noise-free renders)."""
    return RecordingRenderer(plan_recording(calibration, NUM_FRAMES, seed=SEED, scale=SCALE,
                                            empty_clip_frames=EMPTY_FRAMES, noise_sigma=NOISE, trace=FAST_TRACE))


@pytest.fixture(scope="module")
def record(recording) -> dict:
    return json.loads((recording / "ground_truth" / "recording.json").read_text())


def decode_video(path: Path, format: str = "rgb24") -> tuple[np.ndarray, list[int], Fraction, Fraction]:
    """All frames [F, H, W, 3] uint8 (or yuv420p planes [F, H * 3 / 2, W]), their pts, the stream's time base
    and average rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        frames, pts = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format=format))
            pts.append(frame.pts)
        return np.stack(frames), pts, stream.time_base, stream.average_rate


def masks(recording: Path, name: str) -> np.ndarray:  # [F, H, W] uint8
    with np.load(recording / "ground_truth" / f"masks_{name}.npz") as data:
        return data["masks"]


def centroid(weights: np.ndarray) -> np.ndarray:
    """Weighted centroid (x, y) of an image [H, W] in pixel-edge coordinates."""
    v, u = np.mgrid[:weights.shape[0], :weights.shape[1]]
    return np.array([(weights * (u + 0.5)).sum(), (weights * (v + 0.5)).sum()]) / weights.sum()


def mouse_of(record: dict, frame: int) -> MouseParams:
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record["mice"][frame].items()}
    return MouseParams(**values)


def test_layout_sizes_and_frame_counts(recording, record, calibration):
    width, height = 288, 256
    names = calibration.names
    scaled = load_calibration(recording / "label3d_dannce.mat", image_size=(width, height))
    assert scaled.names == names == record["cameras"] and record["image_size"] == [width, height]
    point = np.array([[55.16, 63.58, 20.82], [0.0, 150.0, 0.0]])  # the mean mouse COM and a floor point, mm
    for raw, small in zip(calibration.cameras, scaled.cameras):
        np.testing.assert_allclose(small.dist, raw.dist)
        np.testing.assert_allclose(small.project(point)[0], raw.project(point)[0] * [width / 1152, height / 1024],
                                   atol=1e-6)
    for name in names:
        frames, pts, time_base, rate = decode_video(recording / "videos" / name / "0.mp4")
        assert frames.shape == (NUM_FRAMES, height, width, 3)
        assert pts == list(range(NUM_FRAMES)) and time_base == Fraction(1, 100) and rate == 100
        empty, pts, _, rate = decode_video(recording / "background" / f"{name}.mp4")
        assert empty.shape == (EMPTY_FRAMES, height, width, 3) and pts == list(range(EMPTY_FRAMES)) and rate == 100
        mask = masks(recording, name)
        assert mask.shape == (NUM_FRAMES, height, width) and mask.dtype == np.uint8 and mask.max() == 255
    assert len(record["mice"]) == len(record["mouse_center_mm"]) == len(record["flicker_gains"]) == NUM_FRAMES
    assert record["seed"] == SEED and record["fps"] == 100.0 and record["encoder"]["codec"] == "libx264"
    assert record["noise_sigma"] == NOISE and record["encoder"]["crf"] == CRF


def coverage(shape, camera: LensCamera, distorted: bool, near: np.ndarray, trace: TraceConfig, s: int = 2) -> np.ndarray:
    """Fraction [H, W] of s x s sub-pixel rays per pixel that hit the mouse, traced straight through `camera`
    (each sub-pixel undistorted with the lens model, or the lens ignored), at the pixels `near` [H, W] marks."""
    v, u = np.nonzero(near)
    sub = (np.arange(s) + 0.5) / s
    pixels = np.stack(np.broadcast_arrays(u[:, None, None] + sub[None, None, :], v[:, None, None] + sub[None, :, None]),
                      -1).reshape(-1, 2)  # [N * s * s, 2]
    if distorted:
        xy = camera.undistort_points(pixels)
    else:
        xy = (pixels - camera.K[:2, 2]) / np.diag(camera.K)[:2]
    dirs = np.concatenate([xy, np.ones((len(xy), 1))], 1) @ camera.R  # camera -> world: R^T d
    dirs = torch.tensor(dirs / np.linalg.norm(dirs, axis=1, keepdims=True), dtype=torch.float32)
    origins = torch.tensor(camera.c2w()[:3, 3], dtype=torch.float32).expand_as(dirs)
    t_near, t_far = ray_box(origins, dirs, shape.bounds())
    eps = torch.full((len(dirs),), trace.hit_px / (s * camera.K[0, 0]))
    with one_thread():
        _, hit, _ = sphere_trace(shape, origins, dirs, t_near, t_far, eps, trace)
    out = np.zeros(near.shape)
    out[v, u] = hit.numpy().reshape(-1, s * s).mean(1)
    return out


def test_distortion_matches_the_lens_model(recording, record):
    """The ground-truth coverage agrees with rays traced through the raw pixels with the calibration's lens model,
    to a small fraction of how far the lens moves the mouse (so a skipped or reversed distortion fails)."""
    scaled = load_calibration(recording / "label3d_dannce.mat", image_size=tuple(record["image_size"]))
    frame = NUM_FRAMES - 1
    shape = build_mouse(mouse_of(record, frame))
    trace = TraceConfig(**record["trace"])
    errors, moved, nears, lenses = [], [], [], []
    for camera in scaled.cameras:
        truth = masks(recording, camera.name)[frame] / 255.0
        ys, xs = np.nonzero(truth)
        near = np.zeros(truth.shape, bool)
        near[max(0, ys.min() - 4):ys.max() + 5, max(0, xs.min() - 4):xs.max() + 5] = True
        lens = coverage(shape, camera, True, near, trace)
        iou = ((truth > 0.5) & (lens > 0.5)).sum() / ((truth > 0.5) | (lens > 0.5)).sum()
        assert iou > 0.95, (camera.name, iou)
        errors.append(np.linalg.norm(centroid(truth) - centroid(lens)))
        # roughly how far the lens moved this silhouette: its pixels' positions in the undistorted image
        undistorted = camera.undistort_points(np.stack([xs + 0.5, ys + 0.5], -1)) * np.diag(camera.K)[:2] + camera.K[:2, 2]
        weights = truth[ys, xs, None]
        moved.append(np.linalg.norm(centroid(truth) - (weights * undistorted).sum(0) / weights.sum()))
        nears.append(near)
        lenses.append(lens)
    assert max(errors) < 0.15, errors  # px at 288 x 256
    most = int(np.argmax(moved))  # near the image centre the lens moves the mouse by ~1 px at most at this scale
    pinhole = coverage(shape, scaled.cameras[most], False, nears[most], trace)  # as if the lens were ignored
    lens_shift = np.linalg.norm(centroid(lenses[most]) - centroid(pinhole))
    assert lens_shift > 0.5 and errors[most] < 0.2 * lens_shift, (errors, moved, lens_shift)


def test_videos_match_the_noise_free_render(recording, record, renderer):
    frame = NUM_FRAMES - 1  # a P-frame: the encoder predicted the moving mouse
    rendered = renderer.render(frame)
    np.testing.assert_allclose(rendered.mouse_center_mm, record["mouse_center_mm"][frame], atol=1e-9)
    for i, name in enumerate(record["cameras"]):
        truth = masks(recording, name)[frame]
        np.testing.assert_array_equal(np.rint(rendered.alphas[i] * 255), truth)
        video = decode_video(recording / "videos" / name / "0.mp4")[0][frame]
        error = np.abs(video / 255.0 - rendered.images[i]) * 255  # [H, W, 3] in 8-bit levels
        inside = cv2.erode((truth == 255).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # not its edges
        assert error[inside].mean() < 4.0 and error.mean() < 3.0, name


def test_the_mouse_moves_and_every_camera_sees_it(recording, record):
    shifts = []
    for name in record["cameras"]:
        mask = masks(recording, name).astype(np.float64)
        assert (mask > 128).sum((1, 2)).min() > 200, name  # a mouse of a few thousand pixels at 288 x 256
        shifts.append(np.linalg.norm(centroid(mask[-1]) - centroid(mask[0])))
    assert min(shifts) > 0.5 and np.mean(shifts) > 2.0, shifts
    walked = np.linalg.norm(np.diff(np.array([m["position_mm"] for m in record["mice"]]), axis=0), axis=1)
    assert (walked * record["fps"]).max() < 300.0  # mm/s


def test_the_empty_clip_has_no_mouse(recording, record, renderer):
    empty = renderer.render_background(0)  # [V, H, W, 3], noise-free
    for i, name in enumerate(record["cameras"]):
        truth = masks(recording, name)[0] > 128
        clip = decode_video(recording / "background" / f"{name}.mp4")[0][0] / 255.0
        video = decode_video(recording / "videos" / name / "0.mp4")[0][0] / 255.0
        assert np.abs(clip - empty[i])[truth].mean() * 255 < 4.0, name  # the arena where the mouse was
        assert np.abs(video - empty[i])[truth].mean() * 255 > 10.0, name  # the mouse is not the arena


def test_same_seed_same_frames(calibration, tmp_path):
    trace = TraceConfig(n_steps=32, shadow_steps=8, supersample=1)
    runs = [generate_recording(tmp_path / name, calibration, 2, seed=7, scale=0.125, empty_clip_frames=2, trace=trace)
            for name in ("a", "b")]
    for name in calibration.names:
        for video in (Path("videos") / name / "0.mp4", Path("background") / f"{name}.mp4"):
            a, b = (decode_video(r / video, format="yuv420p")[0] for r in runs)
            assert a.shape == (2, 128 * 3 // 2, 144)
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(masks(runs[0], name), masks(runs[1], name))
    records = [json.loads((r / "ground_truth" / "recording.json").read_text()) for r in runs]
    assert records[0] == records[1]


@pytest.mark.slow  # two fresh interpreters importing torch: ~4 s
def test_worker_processes_write_the_same_files(calibration, tmp_path):
    trace = TraceConfig(n_steps=32, shadow_steps=8, supersample=1)
    runs = [generate_recording(tmp_path / str(workers), calibration, 1, seed=5, scale=0.125, empty_clip_frames=1,
                               trace=trace, workers=workers) for workers in (1, 2)]
    for name in calibration.names:
        for video in (Path("videos") / name / "0.mp4", Path("background") / f"{name}.mp4"):
            assert (runs[0] / video).read_bytes() == (runs[1] / video).read_bytes()
        np.testing.assert_array_equal(masks(runs[0], name), masks(runs[1], name))


def test_refuses_a_non_empty_folder(calibration, tmp_path):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "something").write_text("x")
    with pytest.raises(FileExistsError):
        generate_recording(tmp_path / "rec", calibration, 1)
