"""`mouserecon prepare` on a synthetic rig recording (the real markerless_mouse_1 calibration with its lens
distortion, H.264 videos, ground-truth masks): samples that every command takes, masks checked against the
truth and against each other in 3D, resume (also after kill -9), user masks, and bad recordings refused
with nothing written and the recording untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from mouserecon.calibration import CalibrationError, load_calibration, save_anipose_toml, save_dannce_mat
from mouserecon.cameras import load_camera_file
from mouserecon.cli import main
from mouserecon.data import load_sample
from mouserecon.masks import hull_consistency
from mouserecon.options import PrepareOptions
from mouserecon.prepare import MANIFEST, PrepareError, frame_dir_name, parse_frames, prepare_recording
from mouserecon.video import VideoError

RIG = Path("data") / "markerless_mouse_1_rig"  # in the shared folder (the `shared_dir` fixture)
NUM_FRAMES = 12
SIDE = 96


@pytest.fixture(scope="module")
def recording(tmp_path_factory, shared_dir) -> Path:
    """12 frames of a mouse walking, the real rig at a quarter of its resolution (288 x 256)."""
    from mouserecon.synth.recording import generate_recording

    calibration = load_calibration(shared_dir / RIG / "label3d_dannce.mat", image_size=(1152, 1024))
    return generate_recording(tmp_path_factory.mktemp("rec") / "recording", calibration, NUM_FRAMES, seed=1,
                              scale=0.25)


@pytest.fixture(scope="module")
def prepared(recording, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "samples"
    prepare_recording(PrepareOptions(recording, out, background=recording / "background", side=SIDE))
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def frame_outputs(out: Path) -> dict[str, str]:
    """Every sample file's hash (the manifest records timings and is left out)."""
    return {k: v for k, v in tree_digest(out).items() if k.startswith("frame_")}


def ground_truth_view(recording: Path, sample: Path, frame: int, view: int, name: str) -> np.ndarray:
    """The true mask as the prepared view's camera (read from its opencv_cameras.json) sees it: each pixel's ray
    taken to the raw image through the calibration's lens (`LensCamera.project`, distortion included) and the
    raw ground truth sampled there. Independent of prepare's resampling maps."""
    lens = load_calibration(recording / "label3d_dannce.mat", image_size=(288, 256)).cameras[view]
    raw = np.load(recording / "ground_truth" / f"masks_{name}.npz")["masks"][frame].astype(np.float32) / 255.0
    origins, dirs = load_camera_file(sample).cameras[view].rays()
    uv, depth = lens.project((origins + 100.0 * dirs).double().numpy())
    assert (depth > 0).all()
    uv = (uv - 0.5).astype(np.float32)  # cv2's pixel-centre convention
    return cv2.remap(raw, uv[..., 0], uv[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def test_prepared_samples_match_the_ground_truth_and_each_other(recording, prepared):
    manifest = json.loads((prepared / MANIFEST).read_text())
    assert manifest["complete"] is True
    assert manifest["frames"]["written"] == list(range(NUM_FRAMES)) and manifest["frames"]["skipped"] == []
    assert manifest["calibration"]["format"] == "dannce" and manifest["fps"] == 100.0
    names = manifest["calibration"]["cameras"]
    ious = []
    for frame in range(NUM_FRAMES):
        sample = load_sample(prepared / frame_dir_name(frame))
        assert sample.images.shape == (6, 3, SIDE, SIDE) and sample.mask_source == "alpha"
        for view, name in enumerate(names):
            truth = ground_truth_view(recording, prepared / frame_dir_name(frame), frame, view, name) > 0.5
            mask = sample.masks[view, 0].numpy() > 0.5
            ious.append((truth & mask).sum() / (truth | mask).sum())
        # The crops' cameras agree with each other in 3D: the hull of all six crops explains every crop.
        coverage = hull_consistency(sample.masks[:, 0].numpy(), sample.cameras).coverage
        assert coverage.min() > 0.9, coverage
    assert np.mean(ious) > 0.85 and np.min(ious) > 0.7, (np.mean(ious), np.min(ious))


def test_every_command_takes_prepared_samples(prepared, tmp_path):
    runner = CliRunner()
    ply = tmp_path / "mouse.ply"
    result = runner.invoke(main, ["reconstruct", str(prepared / frame_dir_name(0)), "-o", str(ply)])
    assert result.exit_code == 0, result.output
    assert ply.stat().st_size > 1000
    listing = tmp_path / "two.txt"
    listing.write_text(f"{prepared / frame_dir_name(0)}\n{prepared / frame_dir_name(5)}\n")
    result = runner.invoke(main, ["eval", str(listing), "--inputs", "0,1,2,3,4", "--heldout", "5", "--lpips", "none",
                                  "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "summary.json").is_file()


def test_resume_skips_complete_frames_and_equals_a_fresh_run(recording, prepared, tmp_path):
    out = tmp_path / "samples"
    options = dict(background=recording / "background", side=SIDE)
    first = prepare_recording(PrepareOptions(recording, out, frames="0:4", **options))
    assert first.written == [0, 1, 2, 3]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("frame_*/images/*.png")}
    second = prepare_recording(PrepareOptions(recording, out, **options))
    assert second.resumed == [0, 1, 2, 3] and second.written == list(range(4, NUM_FRAMES))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert frame_outputs(out) == frame_outputs(prepared)
    with pytest.raises(PrepareError, match=r"prepared from .* with .*'side': 96.*use another output folder"):
        prepare_recording(PrepareOptions(recording, out, background=recording / "background", side=128))


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(recording, prepared, tmp_path, kill_mid_run):
    out = tmp_path / "samples"
    command = [sys.executable, "-m", "mouserecon.cli", "prepare", str(recording), "-o", str(out),
               "--background", str(recording / "background"), "--side", str(SIDE)]
    kill_mid_run(command, lambda: len(list(out.glob("frame_*"))), NUM_FRAMES)
    assert json.loads((out / MANIFEST).read_text())["complete"] is False
    subprocess.run(command, check=True, capture_output=True)
    assert frame_outputs(out) == frame_outputs(prepared)
    assert not list(out.glob(".*partial"))


def test_user_masks_are_used_as_given(recording, tmp_path):
    masks = tmp_path / "masks"
    names = load_calibration(recording / "label3d_dannce.mat", image_size=(288, 256)).names
    for name in names:
        (masks / name).mkdir(parents=True)
        for i, mask in enumerate(np.load(recording / "ground_truth" / f"masks_{name}.npz")["masks"][:3]):
            PIL.Image.fromarray(mask).save(masks / name / f"{i:06d}.png")
    # a mask folder must cover every frame of the videos
    with pytest.raises(PrepareError, match=r"masks have 3 frames"):
        prepare_recording(PrepareOptions(recording, tmp_path / "bad", masks=str(masks), side=SIDE))
    assert not (tmp_path / "bad").exists()
    for name in names:
        for i, mask in enumerate(np.load(recording / "ground_truth" / f"masks_{name}.npz")["masks"]):
            PIL.Image.fromarray(mask).save(masks / name / f"{i:06d}.png")
    out = tmp_path / "samples"
    prepare_recording(PrepareOptions(recording, out, frames="2", masks=str(masks), side=SIDE))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["masks"]["method"] == "user" and manifest["frames"]["written"] == [2]
    sample = load_sample(out / frame_dir_name(2))
    for view, name in enumerate(names):
        truth = ground_truth_view(recording, out / frame_dir_name(2), 2, view, name) > 0.5
        mask = sample.masks[view, 0].numpy() > 0.5
        assert (truth & mask).sum() / (truth | mask).sum() > 0.93  # binarised before resampling: edge pixels


def test_whole_frames_keep_the_undistorted_pinhole_camera(recording, tmp_path):
    out = tmp_path / "samples"
    prepare_recording(PrepareOptions(recording, out, frames="0", crop="none", background=recording / "background"))
    cameras = load_camera_file(out / frame_dir_name(0)).cameras
    expected = load_calibration(recording / "label3d_dannce.mat", image_size=(288, 256)).pinhole_cameras()
    assert (cameras.width, cameras.height) == (288, 256)
    np.testing.assert_allclose(cameras.intrinsics.numpy(), expected.intrinsics.numpy(), rtol=1e-6)
    np.testing.assert_allclose(cameras.c2w.numpy(), expected.c2w.numpy(), atol=1e-4)


def test_frame_selection():
    assert list(parse_frames("2:9:3", 20)) == [2, 5, 8]
    assert list(parse_frames("5", 20)) == [5] and list(parse_frames(":3", 20)) == [0, 1, 2]
    assert list(parse_frames("18:", 20)) == [18, 19] and list(parse_frames(None, 3)) == [0, 1, 2]
    for bad in ("a:b", "1:2:0", "1:2:3:4"):
        with pytest.raises(PrepareError, match="--frames"):
            parse_frames(bad, 20)


# ---- bad recordings: a clear error naming the file and the defect, nothing written, recording untouched ----


def variant(recording: Path, tmp_path: Path) -> Path:
    """A copy of the recording (videos linked, not copied) to break."""
    copy = tmp_path / "broken"
    shutil.copytree(recording, copy, symlinks=False, ignore=shutil.ignore_patterns("ground_truth"),
                    copy_function=os.link)
    return copy


def rewrite_video(original: Path, path: Path, frames: int, fps: int) -> None:
    """Replace `path` by the first `frames` frames of the `original` video, re-encoded at `fps`."""
    with av.open(str(original)) as source:
        images = [f.to_ndarray(format="rgb24") for f in source.decode(video=0)][:frames]
    path.unlink()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = images[0].shape[:2]
        stream.pix_fmt, stream.time_base = "yuv420p", Fraction(1, fps)
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def expect_refusal(recording: Path, tmp_path: Path, error, match: str, **options) -> None:
    before = tree_digest(recording)
    out = tmp_path / "samples"
    with pytest.raises(error, match=match):
        prepare_recording(PrepareOptions(recording, out, side=SIDE, **options))
    assert not out.exists(), "nothing may be written for a recording that is refused"
    assert tree_digest(recording) == before


def test_a_calibration_with_fewer_cameras_than_videos(recording, tmp_path):
    broken = variant(recording, tmp_path)
    calibration = load_calibration(broken / "label3d_dannce.mat", image_size=(288, 256))
    (broken / "label3d_dannce.mat").unlink()
    save_dannce_mat(broken / "label3d_dannce.mat", replace(calibration, cameras=calibration.cameras[:5]))
    expect_refusal(broken, tmp_path, VideoError, r"videos: \['Camera6/0.mp4'\] belong to no camera of the calibration")


def test_camera_names_that_match_no_video(recording, tmp_path):
    broken = variant(recording, tmp_path)
    (broken / "videos" / "Camera2").rename(broken / "videos" / "CamB")
    expect_refusal(broken, tmp_path, VideoError, r"camera 'Camera2' matches nothing.*Unclaimed: \['CamB/0.mp4'\]")


def test_videos_of_different_lengths_or_rates(recording, tmp_path):
    broken = variant(recording, tmp_path)
    original, video = recording / "videos" / "Camera3" / "0.mp4", broken / "videos" / "Camera3" / "0.mp4"
    rewrite_video(original, video, NUM_FRAMES - 2, 100)
    expect_refusal(broken, tmp_path, VideoError, r"different frame counts.*Camera3/0.mp4: 10")
    rewrite_video(original, video, NUM_FRAMES, 50)
    expect_refusal(broken, tmp_path, VideoError, r"different frame rates.*Camera3/0.mp4: 50")


def test_a_truncated_video(recording, tmp_path):
    broken = variant(recording, tmp_path)
    video = broken / "videos" / "Camera4" / "0.mp4"
    data = video.read_bytes()
    video.unlink()
    video.write_bytes(data[: len(data) * 2 // 3])
    expect_refusal(broken, tmp_path, VideoError, r"Camera4/0.mp4: (unreadable|truncated)")


def test_bad_calibration_files(recording, tmp_path, shared_dir):
    broken = variant(recording, tmp_path)
    (broken / "label3d_dannce.mat").unlink()
    (broken / "label3d_dannce.mat").write_bytes(os.urandom(4000))
    expect_refusal(broken, tmp_path, CalibrationError, r"label3d_dannce.mat")

    toml = tmp_path / "calibration.toml"
    toml.write_text('[cam_0]\nname = "Camera1"\nsize = [288, 256]\nmatrix = [[400.0, 0.0, 144.0], '
                    '[0.0, 400.0, 128.0], [0.0, 0.0, 1.0]]\n')
    expect_refusal(broken, tmp_path, CalibrationError, r"calibration.toml.*cam_0.*(distortions|rotation|translation)",
                   calibration=toml)

    rig = json.loads((shared_dir / RIG / "opencv_cameras_native_1152x1024.json").read_text())
    rig["frames"][2]["w2c"][0][:3] = [2.0 * v for v in rig["frames"][2]["w2c"][0][:3]]
    bad_json = tmp_path / "opencv_cameras.json"
    bad_json.write_text(json.dumps(rig))
    expect_refusal(broken, tmp_path, CalibrationError, r"opencv_cameras.json.*Camera3.*not orthonormal",
                   calibration=bad_json)


def test_one_empty_arena_frame_per_camera(recording, tmp_path):
    frames = tmp_path / "empty_arena"
    frames.mkdir()
    names = load_calibration(recording / "label3d_dannce.mat", image_size=(288, 256)).names
    for name in names[:-1]:
        with av.open(str(recording / "background" / f"{name}.mp4")) as clip:
            PIL.Image.fromarray(next(clip.decode(video=0)).to_ndarray(format="rgb24")).save(frames / f"{name}.png")
    expect_refusal(recording, tmp_path, VideoError, r"empty_arena: cannot match.*camera 'Camera6' matches nothing",
                   background=frames)
    with av.open(str(recording / "background" / f"{names[-1]}.mp4")) as clip:
        PIL.Image.fromarray(next(clip.decode(video=0)).to_ndarray(format="rgb24")).save(frames / f"{names[-1]}.png")
    out = tmp_path / "samples"
    result = prepare_recording(PrepareOptions(recording, out, frames="0:12:4", background=frames, side=SIDE))
    assert result.written == [0, 4, 8]
    sample = load_sample(out / frame_dir_name(4))
    ious = []
    for view, name in enumerate(names):
        truth = ground_truth_view(recording, out / frame_dir_name(4), 4, view, name) > 0.5
        mask = sample.masks[view, 0].numpy() > 0.5
        ious.append((truth & mask).sum() / (truth | mask).sum())
    assert min(ious) > 0.7, ious


def test_user_mask_videos(recording, tmp_path):
    """Masks as one H.264 video per camera (what a SAM2 run over a whole video gives), named after the camera."""
    masks = tmp_path / "mask_videos"
    names = load_calibration(recording / "label3d_dannce.mat", image_size=(288, 256)).names
    for name in names:
        truth = np.load(recording / "ground_truth" / f"masks_{name}.npz")["masks"]
        masks.mkdir(exist_ok=True)
        with av.open(str(masks / f"{name}_mask.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=100)
            stream.height, stream.width = truth.shape[1:]
            stream.pix_fmt, stream.time_base = "yuv420p", Fraction(1, 100)
            for i, mask in enumerate(truth):
                frame = av.VideoFrame.from_ndarray(np.repeat(mask[..., None], 3, -1), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    out = tmp_path / "samples"
    prepare_recording(PrepareOptions(recording, out, frames="7", masks=str(masks), side=SIDE))
    sample = load_sample(out / frame_dir_name(7))
    for view, name in enumerate(names):
        truth = ground_truth_view(recording, out / frame_dir_name(7), 7, view, name) > 0.5
        mask = sample.masks[view, 0].numpy() > 0.5
        assert (truth & mask).sum() / (truth | mask).sum() > 0.9


def test_a_median_background_that_holds_the_mouse_is_not_trusted(recording, tmp_path):
    """12 frames (0.12 s): the mouse hardly moves, so the temporal median holds it. Masks against it are wrong in
    every view alike (the 3D check cannot see that); the frames are skipped with the reason, not written."""
    out = tmp_path / "samples"
    result = prepare_recording(PrepareOptions(recording, out, side=SIDE))
    manifest = json.loads((out / MANIFEST).read_text())
    unreliable = [s for s in manifest["frames"]["skipped"] if "median background is unreliable" in s["reason"]]
    assert len(unreliable) >= NUM_FRAMES // 2 and len(result.written) + len(result.skipped) == NUM_FRAMES
    assert "--background" in unreliable[0]["reason"]


def test_an_anipose_layout_gives_the_same_samples(recording, prepared, tmp_path):
    """The same recording as Anipose keeps it (calibration.toml, videos-raw/vid-<camera>.mp4): same frames out."""
    anipose = tmp_path / "anipose"
    (anipose / "videos-raw").mkdir(parents=True)
    calibration = load_calibration(recording / "label3d_dannce.mat", image_size=(288, 256))
    save_anipose_toml(anipose / "calibration.toml", calibration)
    for name in calibration.names:
        os.link(recording / "videos" / name / "0.mp4", anipose / "videos-raw" / f"vid-{name}.mp4")
    out = tmp_path / "samples"
    result = prepare_recording(PrepareOptions(anipose, out, frames="3:5", background=recording / "background",
                                              side=SIDE))
    assert result.written == [3, 4]
    assert json.loads((out / MANIFEST).read_text())["calibration"]["format"] == "anipose"
    for frame in (3, 4):
        ours, theirs = load_sample(out / frame_dir_name(frame)), load_sample(prepared / frame_dir_name(frame))
        torch.testing.assert_close(ours.cameras.c2w, theirs.cameras.c2w, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.cameras.intrinsics, theirs.cameras.intrinsics, atol=1e-3, rtol=1e-6)
        assert (ours.images - theirs.images).abs().max() < 2 / 255
