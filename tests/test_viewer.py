"""The viser viewer (viewer/): scene conversion, input errors, shutdown, and a real headless browser.

References: closed-form covariances (scipy's Rotation, not our quaternion code), sigmoid/SH-DC
activations written out here, float16 casts as viser transports them, `Cameras.project` for where a
splat must appear when looking through an input camera, and pixels counted in Chromium screenshots.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.ndimage import binary_dilation
from scipy.spatial.transform import Rotation

from mouserecon.cameras import Cameras, save_opencv_cameras
from mouserecon.cli import main
from mouserecon.gaussians import SH_C0, Gaussians, quat_to_rotmat
from mouserecon.normalize import Similarity
from mouserecon.ply import save_ply
from mouserecon.sidecar import Sidecar
from mouserecon.viewer import app
from mouserecon.viewer.app import ViewerError, load_camera_views, load_layers, serve_gaussians
from mouserecon.viewer.timeline import Timeline, serve_sequence
from mouserecon.viewer.scene import (
    camera_poses,
    choose_scene_scale,
    displayed,
    scaled,
    splat_arrays,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run"]
MAGENTA, CYAN = (1.0, 0.0, 1.0), (0.0, 1.0, 1.0)


# ---- helpers -----------------------------------------------------------------------------------


def blob(centre, radius: float, rgb, n: int = 400, scale: float = 0.004, opacity_logit: float = 3.0) -> Gaussians:
    """n isotropic Gaussians filling a ball (a solid splat of one colour)."""
    gen = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    means = torch.tensor(centre) + direction * radius * torch.rand(n, 1, generator=gen) ** (1 / 3)
    dc = (torch.tensor(rgb) - 0.5) / SH_C0
    return Gaussians(means, dc.expand(n, 1, 3).clone(), torch.full((n, 3), math.log(scale)),
                     torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4).clone(), torch.full((n,), opacity_logit))


def look_at_cameras(eyes, target=(0.0, 0.0, 0.0), size: int = 256, focal: float = 280.0) -> Cameras:
    """OpenCV cameras [V] at `eyes` looking at `target`, world up +Z, principal point central."""
    c2ws = []
    for eye in eyes:
        eye = torch.tensor(eye, dtype=torch.float32)
        z = torch.nn.functional.normalize(torch.tensor(target) - eye, dim=0)
        x = torch.nn.functional.normalize(torch.linalg.cross(z, torch.tensor([0.0, 0.0, 1.0])), dim=0)
        c2w = torch.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, torch.linalg.cross(z, x), z, eye
        c2ws.append(c2w)
    intrinsics = torch.tensor([focal, focal, size / 2, size / 2]).expand(len(eyes), 4).clone()
    return Cameras(torch.stack(c2ws), intrinsics, size, size)


def write_sample(folder: Path, cameras: Cameras) -> Path:
    """A sample folder: opencv_cameras.json and one grey image per camera."""
    (folder / "images").mkdir(parents=True)
    names = [f"images/cam_{i:03d}.png" for i in range(len(cameras))]
    for name in names:
        iio.imwrite(folder / name, np.full((cameras.height, cameras.width, 3), 128, np.uint8))
    save_opencv_cameras(folder / "opencv_cameras.json", cameras, names)
    return folder


def write_sequence(out: Path, frames: dict[int, Gaussians], samples: dict[int, Path] | None = None,
                   units: dict[int, Similarity] | None = None, fps: float | None = None) -> Path:
    """A sequence folder as `reconstruct SAMPLES/ -o OUT/` writes it: mouse_<frame>.ply, a sidecar for each
    frame given a sample (units "model" with the user-to-model similarity when `units` has one) and
    sequence.json; `fps` goes into SAMPLES/recording.json."""
    out.mkdir(parents=True, exist_ok=True)
    samples, units, entries = samples or {}, units or {}, []
    for frame, gaussians in frames.items():
        stem = f"mouse_{frame:06d}"
        save_ply(out / f"{stem}.ply", gaussians)
        if frame in samples:
            to_model = units.get(frame, Similarity.identity())
            Sidecar(ply=f"{stem}.ply", units="model" if frame in units else "input", units_note="",
                    similarity_user_to_model=to_model.to_dict(), similarity_model_to_user=to_model.inverse().to_dict(),
                    world_up=[0.0, 0.0, 1.0], sample=str(samples[frame]), camera_file="", input_views=[],
                    heldout_views=[], resolution=64, input_resolution=64, mask_source="alpha", method="model",
                    checkpoint={}, device="cpu",
                    min_opacity=0.0, refine={}, counts={"written": gaussians.num}, previews=[],
                    timings_s={}).write(out / f"{stem}.json")
        entries.append({"frame": frame, "ply": f"{stem}.ply", "sidecar": f"{stem}.json",
                        "sample": str(samples.get(frame, out / "gone")), "gaussians": gaussians.num, "seconds": 0.1})
    recording = out.parent / "samples"
    if fps is not None:
        recording.mkdir(exist_ok=True)
        (recording / "recording.json").write_text(json.dumps({"fps": fps}))
    (out / "sequence.json").write_text(json.dumps({"format": "mouserecon-sequence", "version": 1,
                                                   "samples": str(recording), "frames": entries, "failed": []}))
    return out


def joined(*parts: Gaussians) -> Gaussians:
    return Gaussians(*(torch.cat([getattr(g, k) for g in parts])
                       for k in ("means", "sh", "log_scales", "quats", "opacity_logits")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def colour_mask(image: np.ndarray, rgb, tol: int = 60) -> np.ndarray:
    """[H, W] True where an RGB(A) uint8 image is within `tol` of `rgb` (floats in [0, 1]) per channel."""
    target = np.round(np.array(rgb) * 255)
    return (np.abs(image[..., :3].astype(np.int32) - target) <= tol).all(-1)


# ---- scene conversion --------------------------------------------------------------------------


def test_splat_arrays_match_closed_forms():
    n = 64
    gen = torch.Generator().manual_seed(0)
    quats = torch.randn(n, 4, generator=gen) * 3  # unnormalised on purpose
    g = Gaussians(torch.randn(n, 3, generator=gen), torch.randn(n, 1, 3, generator=gen),
                  torch.randn(n, 3, generator=gen) - 2, quats, torch.randn(n, generator=gen) * 3)
    arrays = splat_arrays(g)

    # Covariance R diag(s^2) R^T with R from scipy (xyzw order) and s = exp(log_scales).
    rot = Rotation.from_quat(quats[:, [1, 2, 3, 0]].double().numpy()).as_matrix()
    var = np.exp(2 * g.log_scales.double().numpy())
    expected = np.einsum("nij,nj,nkj->nik", rot, var, rot)
    np.testing.assert_allclose(arrays.covariances, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(arrays.covariances, g.covariances().numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(arrays.rgbs, np.clip(0.5 + 0.28209479177 * g.sh[:, 0].numpy(), 0, 1), atol=1e-6)
    np.testing.assert_allclose(arrays.opacities[:, 0], 1 / (1 + np.exp(-g.opacity_logits.numpy())), atol=1e-6)
    np.testing.assert_array_equal(arrays.centers, g.means.numpy())
    assert arrays.opacities.shape == (n, 1) and arrays.covariances.dtype == np.float32


def test_rescaling_keeps_shapes_and_survives_float16():
    normalised = splat_arrays(blob((0.0, 0.0, 0.0), 0.3, MAGENTA, scale=0.005))  # variance 2.5e-5
    millimetres = splat_arrays(blob((0.0, 0.0, 0.0), 30.0, MAGENTA, scale=0.5))  # variance 0.25
    huge = splat_arrays(blob((0.0, 0.0, 0.0), 3e4, MAGENTA, scale=500.0))  # variance 2.5e5 > float16 max
    assert choose_scene_scale([normalised]) == 10.0
    assert choose_scene_scale([millimetres]) == 1.0
    assert choose_scene_scale([huge]) == 0.01
    assert choose_scene_scale([normalised, millimetres]) == 1.0  # one scale for all layers (median)

    s = choose_scene_scale([normalised])
    shown = scaled(normalised, s)
    np.testing.assert_allclose(shown.covariances / s**2, normalised.covariances, rtol=1e-6)
    np.testing.assert_allclose(shown.centers / s, normalised.centers, rtol=1e-6)
    np.testing.assert_array_equal(shown.rgbs, normalised.rgbs)

    # The float16 transport (as viser casts the covariance triangle) loses the thickness of a flat
    # splat of a normalised-scale scene (scales 2, 1.5, 0.2 thousandths) and keeps the rescaled one.
    def thickness_error(cov):  # relative error of the smallest eigenvalue after the float16 round trip
        exact = np.linalg.eigvalsh(cov.astype(np.float64))[0]
        return abs(np.linalg.eigvalsh(cov.astype(np.float16).astype(np.float64))[0] - exact) / exact

    flat = splat_arrays(Gaussians(torch.zeros(1, 3), torch.zeros(1, 1, 3), torch.log(torch.tensor([[2e-3, 1.5e-3, 2e-4]])),
                                  torch.tensor([[0.9, 0.3, -0.2, 0.1]]), torch.zeros(1)))
    assert thickness_error(flat.covariances[0]) > 0.5
    assert thickness_error(scaled(flat, choose_scene_scale([flat])).covariances[0]) < 0.02
    with np.errstate(over="ignore"):  # the overflow is the point
        assert np.isinf(huge.covariances.astype(np.float16)).any()
    assert np.isfinite(scaled(huge, choose_scene_scale([huge])).covariances.astype(np.float16)).all()


def test_opacity_threshold_and_splat_scale():
    g = blob((0.0, 0.0, 0.0), 1.0, CYAN, n=200)
    g = Gaussians(g.means, g.sh, g.log_scales, g.quats, torch.linspace(-4.0, 4.0, 200))
    arrays = splat_arrays(g)
    kept = displayed(arrays, min_opacity=0.5, splat_scale=2.0)
    assert len(kept) == int((torch.linspace(-4.0, 4.0, 200) >= 0).sum()) == 100
    np.testing.assert_allclose(kept.covariances, 4.0 * arrays.covariances[100:], rtol=1e-6)
    np.testing.assert_array_equal(kept.centers, arrays.centers[100:])
    assert len(displayed(arrays, min_opacity=1.0, splat_scale=1.0)) == 0


def test_camera_poses_in_scaled_world():
    cameras = look_at_cameras([(2.7, 0.0, 0.5), (0.0, -2.7, 1.0)], size=256, focal=280.0)
    poses = camera_poses(cameras, scene_scale=10.0)
    for i, pose in enumerate(poses):
        rot = quat_to_rotmat(torch.tensor(pose.wxyz, dtype=torch.float64))
        torch.testing.assert_close(rot, cameras.c2w[i, :3, :3].double(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(pose.position, 10.0 * cameras.c2w[i, :3, 3].numpy(), rtol=1e-6)
        assert pose.fov == pytest.approx(2 * math.atan(128 / 280))
        assert pose.aspect == 1.0


def test_load_camera_views_composites_on_white(tmp_path):
    cameras = look_at_cameras([(2.7, 0.0, 0.5), (0.0, -2.7, 1.0)], size=512, focal=560.0)
    (tmp_path / "images").mkdir()
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[:256, :, :] = (255, 0, 0, 255)  # opaque red top half, transparent (black) bottom half
    for i in range(2):
        iio.imwrite(tmp_path / "images" / f"cam_{i:03d}.png", rgba)
    save_opencv_cameras(tmp_path / "opencv_cameras.json", cameras, [f"images/cam_{i:03d}.png" for i in range(2)])
    loaded, images = load_camera_views(tmp_path)
    assert len(images) == 2 and images[0].shape == (256, 256, 3) and images[0].dtype == np.uint8
    np.testing.assert_array_equal(images[0][10, 10], (255, 0, 0))
    np.testing.assert_array_equal(images[0][200, 10], (255, 255, 255))
    torch.testing.assert_close(loaded.c2w, cameras.c2w, atol=1e-5, rtol=0)
    (tmp_path / "images" / "cam_001.png").unlink()
    with pytest.raises(ViewerError, match="cam_001.png"):
        load_camera_views(tmp_path / "opencv_cameras.json")


# ---- input errors and shutdown -----------------------------------------------------------------


def test_layer_names_and_ply_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_ply(tmp_path / "a" / "mouse.ply", blob((0.0, 0.0, 0.0), 0.3, MAGENTA, n=10))
    save_ply(tmp_path / "b" / "mouse.ply", blob((0.0, 0.0, 0.0), 0.3, CYAN, n=12))
    save_ply(tmp_path / "after.ply", blob((0.0, 0.0, 0.0), 0.3, CYAN, n=12))
    layers = load_layers([tmp_path / "a" / "mouse.ply", tmp_path / "b" / "mouse.ply", tmp_path / "after.ply"])
    assert list(layers) == ["0_mouse", "1_mouse", "after"]
    assert [g.num for g in layers.values()] == [10, 12, 12]

    save_ply(tmp_path / "empty.ply", blob((0.0, 0.0, 0.0), 0.3, CYAN, n=10).select(torch.zeros(10, dtype=torch.bool)))
    (tmp_path / "garbage.ply").write_bytes(b"not a ply at all\n")
    truncated = (tmp_path / "after.ply").read_bytes()[:-7]
    (tmp_path / "truncated.ply").write_bytes(truncated)
    for name, message in [("missing.ply", "not found"), ("empty.ply", "no Gaussians"),
                          ("garbage.ply", "cannot be read"), ("truncated.ply", "cannot be read")]:
        with pytest.raises(ViewerError, match=message) as err:
            load_layers([tmp_path / name])
        assert name in str(err.value)
    with pytest.raises(ViewerError, match="no PLY"):
        load_layers([])


def test_busy_port_and_bad_up_are_clear_errors(tmp_path):
    layers = {"blob": blob((0.0, 0.0, 0.0), 0.3, MAGENTA, n=10)}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ViewerError, match=f"port {port} .* already in use"):
            serve_gaussians(layers, port=port, block=False)
        save_ply(tmp_path / "blob.ply", layers["blob"])
        result = CliRunner().invoke(main, ["view", str(tmp_path / "blob.ply"), "--port", str(port)])
        assert result.exit_code == 1 and f"port {port}" in result.output
    result = CliRunner().invoke(main, ["view", str(tmp_path / "nope.ply")])
    assert result.exit_code == 1 and "nope.ply: PLY file not found" in result.output
    with pytest.raises(ViewerError, match="up direction"):
        serve_gaussians(layers, port=0, up="z", block=False)


def test_ctrl_c_stops_the_server(monkeypatch):
    viewer = serve_gaussians({"blob": blob((0.0, 0.0, 0.0), 0.3, MAGENTA, n=10)}, port=free_port(), block=False)
    port = viewer.port
    socket.create_connection(("127.0.0.1", port), timeout=2).close()  # it is listening

    def interrupt(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(app.time, "sleep", interrupt)
    viewer.serve_until_interrupted()
    monkeypatch.undo()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    app.check_port_free("127.0.0.1", port)  # free again for the next viewer


@pytest.mark.slow  # a fresh interpreter importing torch: ~7 s of CPU
def test_cli_prints_url_and_exits_cleanly_on_sigint(tmp_path):
    save_ply(tmp_path / "blob.ply", blob((0.0, 0.0, 0.0), 0.3, MAGENTA, n=10))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mouserecon.cli", "view", str(tmp_path / "blob.ply"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # the URL is printed once the scene is built and the server listens
            lines.append(line)
            if "mouserecon viewer:" in line:
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
        proc.send_signal(signal.SIGINT)
        output = "".join(lines) + proc.communicate(timeout=20)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output
    assert "Traceback" not in output


# ---- sequences ---------------------------------------------------------------------------------


def test_timeline_loads_lazily_and_evicts_least_recently_used(tmp_path):
    centres = {10: (0.0, 0.0, 0.0), 11: (0.5, 0.0, 0.0), 12: (1.0, 0.0, 0.0), 15: (1.5, 0.0, 0.0)}
    out = write_sequence(tmp_path / "out", {f: blob(c, 0.1, MAGENTA, n=20) for f, c in centres.items()})
    timeline = Timeline(out / "sequence.json", cache_size=2)
    try:
        assert len(timeline) == 4 and timeline.loads == 0 and timeline.fps is None
        assert [f.frame for f in timeline.frames] == [10, 11, 12, 15]
        view = timeline.get(1)
        np.testing.assert_allclose(view.splats.centers.mean(0), blob(centres[11], 0.1, MAGENTA, n=20).means.mean(0),
                                   atol=1e-6)
        assert view.frame.frame == 11 and view.cameras is None and "not found" in view.note
        assert timeline.get(1) is view and timeline.loads == 1  # cached
        timeline.get(0)
        timeline.get(2)
        assert timeline.loads == 3 and timeline.cached == [0, 2]  # 1 was the least recently used
        timeline.get(0)
        assert timeline.loads == 3 and timeline.cached == [2, 0]
        timeline.get(1)
        assert timeline.loads == 4 and timeline.cached == [0, 1]
        timeline.preload(3)
        assert timeline.get(3).frame.frame == 15 and timeline.loads == 5  # one read for preload + get
        with pytest.raises(IndexError):
            timeline.get(4)
    finally:
        timeline.close()


def test_missing_or_bad_index_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ViewerError, match="no sequence index") as err:
        Timeline(tmp_path)
    assert str(tmp_path / "sequence.json") in str(err.value)
    with pytest.raises(ViewerError, match="nowhere"):
        serve_sequence(tmp_path / "nowhere", port=0, block=False)
    (tmp_path / "sequence.json").write_text("{not json")
    with pytest.raises(ViewerError, match="cannot read the sequence index") as err:
        serve_sequence(tmp_path, port=0, block=False)
    assert "sequence.json" in str(err.value)
    (tmp_path / "sequence.json").write_text(json.dumps({"format": "mouserecon-sequence", "frames": [], "failed": [{}]}))
    with pytest.raises(ViewerError, match="no frames"):
        Timeline(tmp_path)
    out = write_sequence(tmp_path / "out", {0: blob((0.0, 0.0, 0.0), 0.1, MAGENTA, n=20)})
    (out / "mouse_000000.ply").unlink()
    with pytest.raises(ViewerError, match="no frame can be read .*mouse_000000.ply: PLY file not found"):
        serve_sequence(out, port=0, block=False)


def test_a_bad_frame_is_reported_and_the_others_still_show(tmp_path, caplog):
    frames = {f: blob((0.1 * f, 0.0, 0.0), 0.1, MAGENTA, n=20 + f) for f in range(4)}
    out = write_sequence(tmp_path / "out", frames)
    (out / "mouse_000001.ply").write_bytes(b"not a ply at all\n")
    (out / "mouse_000002.ply").unlink()
    viewer = serve_sequence(out, port=0, block=False)
    try:
        assert viewer.position == 0 and viewer.error is None and len(viewer.layers["frame"]) == 20
        assert viewer.gui["recording_frame"].value.startswith("0 ") and viewer.gui["fps"].value == 10.0
        with caplog.at_level(logging.ERROR, logger="mouserecon.viewer.timeline"):
            assert viewer.step(1) is None
        assert "mouse_000001.ply: cannot be read" in viewer.error
        assert "mouse_000001.ply" in viewer.gui["frame_status"].content and "mouse_000001.ply" in caplog.text
        assert viewer.layers == {} and "frame" not in viewer._splats  # nothing stale stays drawn
        viewer.gui["layer:frame"].value = False  # toggling the layer of an undrawn frame is harmless
        viewer.gui["layer:frame"].value = True
        assert viewer.show_frame(2) is None and "mouse_000002.ply: PLY file not found" in viewer.error
        assert viewer.show_frame(3).frame.frame == 3 and viewer.error is None
        assert len(viewer.layers["frame"]) == 23 and viewer.gui["frame"].value == 3
        assert viewer.step(1).frame.frame == 0  # wraps around
        viewer.gui["frame"].value = 3  # the slider, as a browser moves it
        assert viewer.position == 3 and len(viewer.layers["frame"]) == 23
    finally:
        viewer.stop()


def test_cameras_scale_and_playback_follow_the_frames(tmp_path):
    cameras = look_at_cameras([(2.7, 0.0, 0.5), (0.0, -2.7, 1.0)], size=32, focal=35.0)
    moved = look_at_cameras([(2.7, 0.5, 0.5), (0.5, -2.7, 1.0), (-2.7, 0.0, 0.5)], size=32, focal=35.0)
    sample_a, sample_b = write_sample(tmp_path / "a", cameras), write_sample(tmp_path / "b", moved)
    double = Similarity(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 2.0)
    frames = {5: blob((0.0, 0.0, 0.0), 0.3, MAGENTA, n=30, scale=0.005),  # tiny splats: drawn x10
              6: blob((0.0, 0.0, 0.0), 30.0, MAGENTA, n=30, scale=0.5),  # would be drawn x1 on its own
              7: blob((0.0, 0.0, 0.0), 0.3, MAGENTA, n=30, scale=0.005)}
    out = write_sequence(tmp_path / "out", frames, samples={5: sample_a, 6: sample_b, 7: tmp_path / "deleted"},
                         units={6: double}, fps=50.0)
    viewer = serve_sequence(out, port=0, block=False)
    try:
        assert viewer.scene_scale == 10.0 and viewer.gui["fps"].value == 50.0  # the recording's fps
        assert len(viewer.poses) == 2 and len(viewer._frustums) == 2
        np.testing.assert_allclose(viewer.poses[1].position, 10.0 * cameras.c2w[1, :3, 3].numpy(), rtol=1e-5)
        viewer.step(1)  # frame 6: other cameras, in model units (x2), same scene scale
        assert viewer.scene_scale == 10.0 and len(viewer._frustums) == 3
        assert viewer.gui["camera_index"].options == ("0", "1", "2")
        np.testing.assert_allclose(viewer.poses[2].position, 20.0 * moved.c2w[2, :3, 3].numpy(), rtol=1e-5)
        np.testing.assert_allclose(viewer.layers["frame"].covariances, 100.0 * splat_arrays(frames[6]).covariances,
                                   rtol=1e-5)
        viewer.look_through(2, clients=[])
        viewer.step(1)  # frame 7: its sample is gone, so no cameras, and no error
        assert viewer.poses == [] and viewer._frustums == [] and viewer.error is None
        assert "not found" in viewer.gui["frame_status"].content and viewer.gui["look_through"].disabled

        viewer.play()  # 50 fps: the next frames come within a second
        deadline = time.monotonic() + 10
        seen = set()
        while len(seen) < 3:
            assert time.monotonic() < deadline, f"playback showed only positions {seen}"
            seen.add(viewer.position)
            time.sleep(0.005)
        viewer.pause()
        assert not viewer.playing and viewer.gui["play"].label == "Play"
        time.sleep(0.1)
        paused_at = viewer.position
        time.sleep(0.2)
        assert viewer.position == paused_at
    finally:
        viewer.stop()


# ---- in a real browser -------------------------------------------------------------------------


def _browser_or_skip():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser driver: Python playwright is not installed (pip install playwright)")
    return sync_playwright


def _open_page(pw, tmp_path: Path, url: str):
    """A 900x600 headless Chromium page (Debian's, with CHROMIUM_FLAGS) at `url`."""
    context = pw.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 900, "height": 600})
    page = context.new_page()
    page.goto(url)
    return page


def _settled_screenshot(page, timeout: float = 45.0) -> np.ndarray:
    """Poll screenshots until three in a row are identical (the splat sort and upload are done)."""
    shots, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        shots = [*shots[-2:], page.screenshot()]
        if len(shots) == 3 and shots[0] == shots[1] == shots[2]:
            return iio.imread(shots[-1])
        time.sleep(0.2)
    raise AssertionError(f"the page did not settle within {timeout:.0f} s")


def test_browser_draws_splats_where_the_cameras_see_them(tmp_path):
    sync_playwright = _browser_or_skip()
    # A normalised-scale scene (tiny splats, so it is drawn x10) with two coloured balls; the cyan
    # one sits above the magenta one along world +Z.
    p_magenta, p_cyan = (0.0, -0.35, -0.15), (0.0, -0.35, 0.25)
    layers = {"magenta": blob(p_magenta, 0.06, MAGENTA), "cyan": blob(p_cyan, 0.06, CYAN)}
    cameras = look_at_cameras([(2.7, 0.0, 0.3), (0.3, -2.7, 0.8)], size=256, focal=280.0)
    viewer = serve_gaussians(layers, cameras, port=free_port(), render_dir=tmp_path, block=False)
    assert viewer.scene_scale == 10.0
    try:
        with sync_playwright() as pw:
            page = _open_page(pw, tmp_path, viewer.url)
            # The server's own record of the browser's websocket (viser's "Connected" label can come and
            # go before a slow page load returns); generous: slow when the CPUs are busy.
            client = viewer.wait_for_client(timeout=90)

            overview = _settled_screenshot(page)
            assert colour_mask(overview, MAGENTA).sum() > 300 and colour_mask(overview, CYAN).sum() > 300

            # Through camera 0 each ball must be centred where Cameras.project puts it (canvas = the
            # camera image scaled by canvas height / image height, principal point central).
            page.get_by_text("Look through camera").click()  # the GUI button; camera 0 is selected
            deadline = time.monotonic() + 20
            while not np.allclose(client.camera.position, viewer.poses[0].position, atol=1e-3):
                assert time.monotonic() < deadline, "the browser camera did not move to camera 0"
                time.sleep(0.05)
            through = _settled_screenshot(page)
            iio.imwrite(tmp_path / "through_cam0.png", through)
            height, width = through.shape[:2]
            uv, _ = cameras[[0]].project(torch.tensor([[p_magenta, p_cyan]]))
            expected = (uv[0] - 128.0) * (height / 256) + torch.tensor([width / 2, height / 2])
            for rgb, (u, v) in zip((MAGENTA, CYAN), expected.tolist()):
                mask = colour_mask(through, rgb)
                assert mask.sum() > 300, f"ball {rgb} not drawn through camera 0"
                rows, cols = np.nonzero(mask)
                assert abs(cols.mean() - u) < 6 and abs(rows.mean() - v) < 6, (cols.mean(), rows.mean(), u, v)
            assert expected[1, 1] < expected[0, 1] - 50  # up is up: cyan (higher z) above magenta

            render = iio.imread(viewer.save_render(client=client))
            assert render.shape[:2] == (client.camera.image_height, client.camera.image_width)
            assert colour_mask(render, MAGENTA).sum() > 300 and colour_mask(render, CYAN).sum() > 300

            page.get_by_text("Save render (PNG)").click()  # the GUI button, as a user would
            page.get_by_text("Render saved").first.wait_for(timeout=30_000)
            assert colour_mask(iio.imread(tmp_path / "render_001.png"), MAGENTA).sum() > 300

            # Negative controls: every opacity is sigmoid(3) = 0.95 < 0.99, so nothing is drawn; a
            # hidden layer is not drawn either. The background colour follows its control.
            viewer.gui["opacity"].value = 0.99
            viewer.gui["background"].value = (0, 0, 0)
            hidden = _settled_screenshot(page)
            assert colour_mask(hidden, MAGENTA).sum() == 0 and colour_mask(hidden, CYAN).sum() == 0
            np.testing.assert_array_equal(hidden[height - 100, width // 2, :3], (0, 0, 0))
            assert overview[height - 100, width // 2, :3].tolist() == [255, 255, 255]
            viewer.gui["opacity"].value = 0.0
            viewer.gui["layer:cyan"].value = False
            one_layer = _settled_screenshot(page)
            assert colour_mask(one_layer, MAGENTA).sum() > 300 and colour_mask(one_layer, CYAN).sum() == 0
            page.context.close()
    finally:
        viewer.stop()


def _gui_boxes(page) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of the overlays drawn over the canvas: the control panel and notifications."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        '.mantine-Paper-root, .mantine-Notification-root'))
        .map(e => e.getBoundingClientRect()).filter(r => r.width > 0 && r.height > 0)
        .map(r => [Math.floor(r.left), Math.floor(r.top), Math.ceil(r.right), Math.ceil(r.bottom)])""")


def test_browser_steps_through_a_sequence_where_a_blob_moves(tmp_path):
    sync_playwright = _browser_or_skip()
    # Every frame: a cyan ball that stays and a magenta one that moves along world +X (normalised scale).
    xs = (-0.3, 0.0, 0.3)
    frames = {100 + i: joined(blob((0.0, 0.4, 0.0), 0.08, CYAN), blob((x, -0.4, 0.0), 0.08, MAGENTA))
              for i, x in enumerate(xs)}
    viewer = serve_sequence(write_sequence(tmp_path / "out", frames), port=free_port(), render_dir=tmp_path,
                            block=False)
    try:
        with sync_playwright() as pw:
            page = _open_page(pw, tmp_path, viewer.url)
            viewer.wait_for_client(timeout=90)
            shots = [_settled_screenshot(page)]
            for position in (1, 2):
                page.get_by_text("Step forward").click()  # the GUI button, as a user would
                deadline = time.monotonic() + 20
                while viewer.position != position:
                    assert time.monotonic() < deadline, f"the step button did not show frame {position}"
                    time.sleep(0.05)
                shots.append(_settled_screenshot(page))
                # The GUI shows the recording's frame number (a read-only text input).
                assert page.locator(f"input[value='{100 + position}  ({position + 1} / 3)']").count() == 1
            boxes = _gui_boxes(page)
            page.context.close()
    finally:
        viewer.stop()

    canvas = np.ones(shots[0].shape[:2], bool)  # compare the 3D view only, not the GUI drawn over it
    for x0, y0, x1, y1 in boxes:
        canvas[max(y0, 0):y1, max(x0, 0):x1] = False
    assert canvas.mean() > 0.4, boxes  # most of the page
    centroids = []
    for i, shot in enumerate(shots):
        iio.imwrite(tmp_path / f"frame_{i}.png", shot)
        magenta, cyan = colour_mask(shot, MAGENTA) & canvas, colour_mask(shot, CYAN) & canvas
        assert magenta.sum() > 200 and cyan.sum() > 200, f"frame {i}: a ball is missing"
        rows, cols = np.nonzero(magenta)
        centroids.append(np.array([cols.mean(), rows.mean()]))
    for a, b in [(0, 1), (1, 2)]:
        changed = (np.abs(shots[a][..., :3].astype(int) - shots[b][..., :3].astype(int)) > 8).any(-1) & canvas
        near = {rgb: binary_dilation(colour_mask(shots[a], rgb) | colour_mask(shots[b], rgb), iterations=4)
                for rgb in (MAGENTA, CYAN)}
        assert (changed & near[MAGENTA]).sum() > 200, f"frames {a} and {b} look the same where the blob moved"
        assert (changed & ~near[MAGENTA] & ~near[CYAN]).sum() <= 20, f"frames {a} and {b} differ away from the balls"
        # The cyan ball stays put; its speckle may differ a little (the browser re-sorts all splats each frame).
        cyan_a, cyan_b = colour_mask(shots[a], CYAN) & canvas, colour_mask(shots[b], CYAN) & canvas
        assert abs(int(cyan_a.sum()) - int(cyan_b.sum())) < 0.1 * cyan_a.sum()
        np.testing.assert_allclose(np.argwhere(cyan_a).mean(0), np.argwhere(cyan_b).mean(0), atol=1.0)
    step_01, step_12 = centroids[1] - centroids[0], centroids[2] - centroids[1]
    assert np.linalg.norm(step_01) > 15 and np.linalg.norm(step_12) > 15, centroids
    assert step_01 @ step_12 > 0.8 * np.linalg.norm(step_01) * np.linalg.norm(step_12), centroids  # one direction
