"""`mouserecon reconstruct`: CLI and Python API end to end with a tiny checkpoint.

References: PLY files are read with plyfile (an independent reader); the mapping back to the
user's frame is checked against the similarity inverted in numpy and against the user's own
camera matrices (each pixel's Gaussian projects back onto that pixel); the turntable cameras
against closed forms; preview grids against the source PNGs and an independent render path
(user-frame PLY + the user's cameras). Samples are written here by hand (a y-up world in mm),
or the demo sample assets/demo_mouse when present.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import plyfile
import pytest
import torch
from click.testing import CliRunner

from mouserecon.cameras import Cameras, load_opencv_cameras
from mouserecon.checkpoints import demo_checkpoint, save_checkpoint
from mouserecon.cli import main
from mouserecon.data import crop_to_foreground, foreground_center, load_sample
from mouserecon.device import DeviceError
from mouserecon.model import GSLRM, ModelConfig
from mouserecon.pipeline import CheckpointPredictor
from mouserecon.ply import load_ply, property_names
from mouserecon.reconstruct import ReconstructError, ReconstructOptions, reconstruct, turntable_cameras
from mouserecon.render import render

DEMO_SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "demo_mouse"
PATCH = 8


# ---- fixtures ----------------------------------------------------------------------------------


def look_at_w2c(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera [4, 4]: +z towards target, +y down (against `up`)."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return np.linalg.inv(c2w)


def write_sample(folder: Path, n: int = 6, size: int = 64) -> Path:
    """A y-up world in mm: n cameras 300 mm from (40, -15, 25), elevations 5 / 20 deg alternating,
    fx != fy, off-centre principal point; RGBA images of a coloured disc."""
    (folder / "images").mkdir(parents=True)
    centre, up = np.array([40.0, -15.0, 25.0]), np.array([0.0, 1.0, 0.0])
    rng = np.random.default_rng(1)
    frames = []
    for i in range(n):
        az, el = math.radians(20 + 360 * i / n), math.radians(5 if i % 2 else 20)
        eye = centre + 300 * np.array([math.cos(el) * math.cos(az), math.sin(el), math.cos(el) * math.sin(az)])
        s = size / 64
        frames.append({"w": size, "h": size, "fx": 90.0 * s, "fy": 95.0 * s, "cx": 31.0 * s, "cy": 33.5 * s,
                       "w2c": look_at_w2c(eye, centre, up).tolist(), "file_path": f"images/cam_{i:03d}.png"})
        yy, xx = np.mgrid[:size, :size] + 0.5
        alpha = np.clip(size / 4 - np.hypot(xx - size / 2, yy - size / 2), 0, 1)  # [H, W] antialiased disc
        rgb = rng.uniform(0.1, 0.9, 3) * (1 - 0.3 * yy / size)[..., None]  # [H, W, 3]
        rgba = np.concatenate([rgb, alpha[..., None]], -1)
        iio.imwrite(folder / frames[-1]["file_path"], (rgba * 255).round().astype(np.uint8))
    (folder / "opencv_cameras.json").write_text(json.dumps({"world_up": up.tolist(), "frames": frames}))
    return folder


@pytest.fixture(scope="module")
def mm_sample(tmp_path_factory) -> Path:
    return write_sample(tmp_path_factory.mktemp("sample") / "mouse_mm")


@pytest.fixture(scope="module")
def demo_sample(tmp_path_factory) -> Path:
    """The shipped demo sample (6 views); a hand-written 6-view stand-in until it is committed."""
    if (DEMO_SAMPLE / "opencv_cameras.json").is_file():
        return DEMO_SAMPLE
    return write_sample(tmp_path_factory.mktemp("demo") / "demo_stand_in")


def read_ply(path: Path, sh_degree: int = 0) -> np.ndarray:
    """Vertex records via plyfile, checking the 3DGS layout (float32, C7 order)."""
    data = plyfile.PlyData.read(str(path))
    assert [e.name for e in data.elements] == ["vertex"]
    vertex = data["vertex"]
    assert [p.name for p in vertex.properties] == property_names(sh_degree)
    assert all(p.val_dtype in ("f4", "float32", "float") for p in vertex.properties)
    return vertex.data


def columns(records: np.ndarray, *names: str) -> np.ndarray:
    return np.stack([records[name].astype(np.float64) for name in names], -1)


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """[N, 4] wxyz (unnormalised) -> [N, 3, 3]."""
    w, x, y, z = (q / np.linalg.norm(q, axis=-1, keepdims=True)).T
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)


def covariances(records: np.ndarray) -> np.ndarray:
    rot = quat_to_matrix(columns(records, "rot_0", "rot_1", "rot_2", "rot_3"))
    scale = np.exp(columns(records, "scale_0", "scale_1", "scale_2"))
    rs = rot * scale[:, None, :]
    return rs @ rs.transpose(0, 2, 1)


# ---- end to end ----------------------------------------------------------------------------------


def test_cli_demo_sample_writes_ply_sidecar_and_previews(demo_sample, tiny_checkpoint, tmp_path):
    out = tmp_path / "mouse.ply"
    result = CliRunner().invoke(main, [
        "reconstruct", str(demo_sample), "-o", str(out), "--checkpoint", str(tiny_checkpoint),
        "--resolution", "32", "--previews", str(tmp_path / "previews"), "--turntable", "2",
    ])
    assert result.exit_code == 0, result.output
    for step in ("loading checkpoint ...", "loading sample ...", "normalised: centre", "running the model ...",
                 "rendering previews ..."):
        assert step in result.stdout
    records = read_ply(out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    num_frames = len(json.loads((demo_sample / "opencv_cameras.json").read_text())["frames"])
    assert sidecar["input_views"] == [0, 1, 2, 3, 4] and sidecar["heldout_views"] == list(range(5, num_frames))
    # Token Gaussians + one per input pixel; this checkpoint's opacities are all > 0.05, so the
    # default threshold (0.005) prunes none (pruning counts: test_python_api_matches_cli_...).
    expected = 2 + 5 * 32 * 32
    assert len(records) == expected
    assert sidecar["counts"] == {"predicted": expected, "filled": 0, "nonfinite": 0, "pruned": 0, "written": expected}
    assert sidecar["units"] == "input" and set(sidecar["similarity_user_to_model"]) == {"rotation", "translation", "scale"}

    inputs = iio.imread(tmp_path / "previews" / "inputs.png")
    assert inputs.shape == (64, 5 * 32, 3)
    if num_frames > 5:
        assert iio.imread(tmp_path / "previews" / "heldout.png").shape == (64, (num_frames - 5) * 32, 3)
    assert iio.imread(tmp_path / "previews" / "turntable.gif", index=None).shape == (2, 32, 32, 3)


def test_python_api_matches_cli_and_prunes_by_opacity(mm_sample, tiny_checkpoint, tmp_path):
    cli_out = tmp_path / "cli.ply"
    run = CliRunner().invoke(main, ["reconstruct", str(mm_sample), "-o", str(cli_out), "--checkpoint",
                                    str(tiny_checkpoint), "--resolution", "32", "--min-opacity", "0"])
    assert run.exit_code == 0, run.output
    full = read_ply(cli_out)
    assert len(full) == 2 + 5 * 32 * 32  # nothing pruned at 0

    api = reconstruct(ReconstructOptions(mm_sample, tmp_path / "api.ply", tiny_checkpoint, resolution=32,
                                         min_opacity=0.0))
    assert api.num_written == len(full)
    np.testing.assert_array_equal(columns(read_ply(api.ply_path), *property_names(0)), columns(full, *property_names(0)))

    opacity = 1 / (1 + np.exp(-full["opacity"].astype(np.float64)))
    assert opacity.min() > 0.05  # the premise of the exact count in the CLI test
    threshold = float(np.median(opacity))  # prune about half
    pruned = reconstruct(ReconstructOptions(mm_sample, tmp_path / "pruned.ply", tiny_checkpoint, resolution=32,
                                            min_opacity=threshold))
    kept = read_ply(pruned.ply_path)
    assert pruned.num_pruned == int((opacity < threshold).sum()) > 0
    np.testing.assert_array_equal(columns(kept, *property_names(0)),
                                  columns(full[opacity >= threshold], *property_names(0)))


def test_units_input_maps_back_with_the_inverse_similarity(mm_sample, tiny_checkpoint, tmp_path):
    views = (4, 0, 2, 5, 1)  # a non-default order
    size = 32
    model = reconstruct(ReconstructOptions(mm_sample, tmp_path / "model.ply", tiny_checkpoint, inputs=views,
                                           resolution=size, units="model", min_opacity=0.0))
    user = reconstruct(ReconstructOptions(mm_sample, tmp_path / "user.ply", tiny_checkpoint, inputs=views,
                                          resolution=size, units="input", min_opacity=0.0))
    a, b = read_ply(model.ply_path), read_ply(user.ply_path)
    record = json.loads(user.sidecar_path.read_text())["similarity_user_to_model"]
    rot, t, s = np.array(record["rotation"]), np.array(record["translation"]), record["scale"]

    # The similarity normalises the input rig: world up (+y here) -> +Z, mean camera distance 2.7.
    w2c = np.array([f["w2c"] for f in json.loads((mm_sample / "opencv_cameras.json").read_text())["frames"]])
    centres = np.linalg.inv(w2c)[:, :3, 3]  # [F, 3] mm
    np.testing.assert_allclose(rot @ [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], atol=1e-12)
    model_centres = s * centres[list(views)] @ rot.T + t
    assert np.linalg.norm(model_centres, axis=-1).mean() == pytest.approx(2.7, rel=1e-6)  # float32 cameras

    # Means: x_user = R^T (x_model - t) / s; covariances: R^T Sigma R / s^2.
    xyz_a, xyz_b = columns(a, "x", "y", "z"), columns(b, "x", "y", "z")
    np.testing.assert_allclose(xyz_b, (xyz_a - t) @ rot / s, atol=1e-4 * 300, rtol=1e-5)
    np.testing.assert_allclose(covariances(b), rot.T @ covariances(a) @ rot / s**2, rtol=1e-3,
                               atol=1e-6 * covariances(b).max())
    np.testing.assert_array_equal(columns(b, "opacity", "f_dc_0", "f_dc_1", "f_dc_2"),
                                  columns(a, "opacity", "f_dc_0", "f_dc_1", "f_dc_2"))

    # Each pixel's Gaussian (patch-major order after the 2 token Gaussians) projects onto that
    # pixel's centre with the user's own camera, scaled to the resolution.
    rows, cols = np.mgrid[:size, :size]
    order = ((rows // PATCH) * (size // PATCH) + cols // PATCH) * PATCH**2 + (rows % PATCH) * PATCH + cols % PATCH
    frames = json.loads((mm_sample / "opencv_cameras.json").read_text())["frames"]
    for k, frame in enumerate(views):
        f = frames[frame]
        ratio = size / f["w"]
        points = xyz_b[2 + k * size * size + order.ravel()]  # [H*W, 3] raster order, mm
        cam = points @ w2c[frame][:3, :3].T + w2c[frame][:3, 3]
        assert (cam[:, 2] > 0).all()
        u = f["fx"] * ratio * cam[:, 0] / cam[:, 2] + f["cx"] * ratio
        v = f["fy"] * ratio * cam[:, 1] / cam[:, 2] + f["cy"] * ratio
        np.testing.assert_allclose(u, cols.ravel() + 0.5, atol=2e-3)
        np.testing.assert_allclose(v, rows.ravel() + 0.5, atol=2e-3)


def test_previews_show_the_sample_and_match_a_user_frame_render(tmp_path, tiny_checkpoint):
    size = 32
    sample = write_sample(tmp_path / "s3", n=3, size=size)
    out = reconstruct(ReconstructOptions(sample, tmp_path / "m.ply", tiny_checkpoint, inputs=(0, 1), resolution=size,
                                         previews_dir=tmp_path / "previews", turntable_frames=0))
    assert [p.name for p in out.preview_files] == ["inputs.png", "heldout.png"]
    cameras, files = load_opencv_cameras(sample / "opencv_cameras.json")
    user_frame = load_ply(out.ply_path)
    for grid_file, frames in (("inputs.png", [0, 1]), ("heldout.png", [2])):
        grid = iio.imread(tmp_path / "previews" / grid_file).astype(np.float64) / 255  # [2H, V*W, 3]
        assert grid.shape == (2 * size, len(frames) * size, 3)
        rgba = np.concatenate([iio.imread(sample / files[i]) for i in frames], 1) / 255  # [H, V*W, 4]
        on_white = rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:]
        np.testing.assert_allclose(grid[:size], on_white, atol=0.5 / 255 + 1e-9)
        renders = render(user_frame, cameras[frames], size, size).images  # [V, 3, H, W] in mm
        expected = torch.cat(list(renders), -1).permute(1, 2, 0).numpy()  # [H, V*W, 3]
        np.testing.assert_allclose(grid[size:], expected, atol=1.5 / 255)


def test_nonfinite_gaussians_are_dropped_and_counted(mm_sample, tmp_path):
    torch.manual_seed(0)
    model = GSLRM(ModelConfig.preset("tiny", image_size=32))
    channels = model.config.gaussian_channels
    with torch.no_grad():  # NaN opacity for the first pixel of every patch: rows j*G + c of the pixel head
        model.pixel_head.weight[channels - 1] = float("nan")
    checkpoint = tmp_path / "nan.pt"
    save_checkpoint(checkpoint, model)
    out = reconstruct(ReconstructOptions(mm_sample, tmp_path / "m.ply", checkpoint, resolution=32))
    patches = 5 * (32 // PATCH) ** 2
    records = read_ply(out.ply_path)
    assert out.num_nonfinite == patches and len(records) == 2 + 5 * 32 * 32 - patches
    assert np.isfinite(columns(records, *property_names(0))).all()


# ---- turntable -----------------------------------------------------------------------------------


def test_turntable_cameras_closed_form():
    # Two input cameras in the model frame at different distances and elevations.
    eyes = np.array([[2.0, 1.0, 0.8], [-1.5, 2.2, 1.6]])
    w2c = np.stack([look_at_w2c(e, np.zeros(3), np.array([0.0, 0.0, 1.0])) for e in eyes])
    inputs = Cameras(torch.tensor(np.linalg.inv(w2c), dtype=torch.float32),
                     torch.tensor([[60.0, 64.0, 30.0, 34.0], [70.0, 66.0, 33.0, 31.0]]), 64, 48)
    n = 7
    cams = turntable_cameras(inputs, n)
    assert cams.batch_shape == (n,) and (cams.width, cams.height) == (64, 48)
    distance = np.linalg.norm(eyes, axis=-1).mean()
    elevation = np.arcsin(eyes[:, 2] / np.linalg.norm(eyes, axis=-1)).mean()
    c2w = cams.c2w.double().numpy()
    centres = c2w[:, :3, 3]
    np.testing.assert_allclose(np.linalg.norm(centres, axis=-1), distance, rtol=1e-6)
    np.testing.assert_allclose(centres[:, 2], distance * np.sin(elevation), rtol=1e-6)
    azimuths = np.unwrap(np.arctan2(centres[:, 1], centres[:, 0]))
    np.testing.assert_allclose(np.diff(azimuths), 2 * np.pi / n, rtol=1e-6)
    assert azimuths[0] == pytest.approx(math.atan2(1.0, 2.0), abs=1e-6)  # starts at the first camera
    rot = c2w[:, :3, :3]
    np.testing.assert_allclose(rot.transpose(0, 2, 1) @ rot, np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
    assert np.abs(rot[:, 2, 0]).max() < 1e-6  # camera x is horizontal: no roll
    assert (rot[:, 2, 1] < 0).all()  # image down points down the world: +Z is up on screen
    # The origin projects to the image centre, in front of every camera.
    fx, fy, cx, cy = cams.intrinsics.double().numpy().T
    origin_cam = np.einsum("nji,nj->ni", rot, -centres)  # R^T (0 - c)
    assert (origin_cam[:, 2] > 0).all()
    np.testing.assert_allclose(fx * origin_cam[:, 0] / origin_cam[:, 2] + cx, 32.0, atol=1e-4)
    np.testing.assert_allclose(fy * origin_cam[:, 1] / origin_cam[:, 2] + cy, 24.0, atol=1e-4)
    np.testing.assert_allclose(fx, 65.0, rtol=1e-6)
    np.testing.assert_allclose(fy, 65.0, rtol=1e-6)


# ---- bad inputs ----------------------------------------------------------------------------------


def _invoke(*args: str):
    return CliRunner().invoke(main, ["reconstruct", *args])


def test_bad_inputs_are_clear_errors(mm_sample, tiny_checkpoint, tmp_path):
    ckpt, out = str(tiny_checkpoint), str(tmp_path / "m.ply")
    not_sample = tmp_path / "empty"
    not_sample.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (["nowhere", "-o", out, "--checkpoint", ckpt], ["nowhere", "views folder not found"]),
        ([str(not_sample), "-o", out, "--checkpoint", ckpt], ["empty", "not a sample folder"]),
        ([str(mm_sample), "-o", out, "--checkpoint", ckpt, "--inputs", "0,1,9"], ["opencv_cameras.json", "out of range", "6 frames"]),
        ([str(mm_sample), "-o", out, "--checkpoint", ckpt, "--inputs", "0,0"], ["distinct"]),
        ([str(mm_sample), "-o", out, "--checkpoint", ckpt, "--inputs", "0,a"], ["comma-separated"]),
        ([str(mm_sample), "-o", str(tmp_path / "no" / "m.ply"), "--checkpoint", ckpt], ["output folder", "does not exist"]),
        ([str(mm_sample), "-o", str(tmp_path / "m.obj"), "--checkpoint", ckpt], ["m.obj", ".ply"]),
        ([str(mm_sample), "-o", out, "--checkpoint", str(tmp_path / "none.pt")], ["none.pt", "not found"]),
        ([str(mm_sample), "-o", out, "--checkpoint", str(garbage)], ["garbage.pt", "torch"]),
        ([str(mm_sample), "-o", out, "--checkpoint", ckpt, "--min-opacity", "1.5"], ["min_opacity", "[0, 1)"]),
    ]
    for args, words in cases:
        result = _invoke(*args)
        # 1: ClickException, 2: usage error; never an uncaught exception with a traceback.
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), (args, result.output)
        for word in words:
            assert word in result.output, (args, result.output)
    assert not (tmp_path / "m.ply").exists()


def test_without_checkpoint_uses_the_bundled_demo_model(demo_sample, tmp_path):
    result = _invoke(str(demo_sample), "-o", str(tmp_path / "m.ply"))
    assert result.exit_code == 0, result.output
    assert "using the bundled demo checkpoint" in result.output
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert Path(sidecar["checkpoint"]["path"]) == demo_checkpoint()
    assert sidecar["resolution"] == sidecar["checkpoint"]["config"]["image_size"]
    assert sidecar["counts"]["written"] > 100


def test_refine_improves_the_input_views_and_records_before_and_after(demo_sample, tiny_checkpoint, tmp_path):
    out = tmp_path / "refined.ply"
    result = _invoke(str(demo_sample), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--resolution", "32",
                     "--refine", "15")
    assert result.exit_code == 0, result.output
    assert "refine: inputs views [0, 1, 2, 3, 4]: foreground PSNR" in result.output
    record = json.loads(out.with_suffix(".json").read_text())["refine"]
    assert record["steps"] == 15
    before, after = record["metrics"]["before"], record["metrics"]["after"]
    assert set(before) == set(after) == {"inputs", "heldout"}
    # An untrained model's prediction, optimised against the input views: they must get much closer.
    assert after["inputs"]["psnr_fg"] > before["inputs"]["psnr_fg"] + 1.0
    assert after["inputs"]["iou"] > before["inputs"]["iou"]
    # Refinement carved: every written Gaussian's centre projects (camera file, input units) onto the
    # foreground of every input view's 32 px mask dilated by 1 px (1/32 of the side).
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert record["carved"]["before"] > 0 and sidecar["counts"]["pruned"] >= sum(record["carved"].values())
    xyz = columns(read_ply(out), "x", "y", "z")
    sample = load_sample(demo_sample, 32)
    dilated = torch.nn.functional.max_pool2d(sample.masks, 3, stride=1, padding=1)[:, 0].numpy()
    for view in range(5):
        w2c, (fx, fy, cx, cy) = sample.cameras.w2c[view].double().numpy(), sample.cameras.intrinsics[view].tolist()
        cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
        u, v = fx * cam[:, 0] / cam[:, 2] + cx, fy * cam[:, 1] / cam[:, 2] + cy
        assert (cam[:, 2] > 0).all() and (u >= 0).all() and (u < 32).all() and (v >= 0).all() and (v < 32).all()
        assert (dilated[view][np.floor(v).astype(int), np.floor(u).astype(int)] >= 0.5).all(), view


def test_broken_sample_names_the_file(tmp_path, tiny_checkpoint):
    sample = write_sample(tmp_path / "broken", n=3, size=32)
    (sample / "images" / "cam_001.png").unlink()
    result = _invoke(str(sample), "-o", str(tmp_path / "m.ply"), "--checkpoint", str(tiny_checkpoint))
    assert result.exit_code == 1 and "cam_001.png" in result.output and "missing" in result.output


def test_higher_sh_degree_cannot_be_mapped_to_the_input_frame(mm_sample, tmp_path):
    checkpoint = tmp_path / "sh1.pt"
    save_checkpoint(checkpoint, GSLRM(ModelConfig.preset("tiny", sh_degree=1, image_size=32)))
    with pytest.raises(ReconstructError, match="SH degree 1.*units 'model'"):
        reconstruct(ReconstructOptions(mm_sample, tmp_path / "m.ply", checkpoint, resolution=32))
    out = reconstruct(ReconstructOptions(mm_sample, tmp_path / "m.ply", checkpoint, resolution=32, units="model"))
    assert len(read_ply(out.ply_path, sh_degree=1)) == 2 + 5 * 32 * 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(mm_sample, tiny_checkpoint, tmp_path):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        reconstruct(ReconstructOptions(mm_sample, tmp_path / "m.ply", tiny_checkpoint, device="cuda"))


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is not None, reason="imageio-ffmpeg is installed")
def test_mp4_without_imageio_ffmpeg_is_refused_before_any_work(mm_sample, tiny_checkpoint, tmp_path):
    options = ReconstructOptions(mm_sample, tmp_path / "m.ply", tiny_checkpoint, previews_dir=tmp_path / "p",
                                 turntable_format="mp4")
    with pytest.raises(ReconstructError, match="imageio-ffmpeg"):
        reconstruct(options)
    assert not (tmp_path / "m.ply").exists()


def test_a_model_trained_on_crops_sees_each_input_cropped_around_the_mouse(mm_sample, tmp_path):
    """Each pixel Gaussian of a crop model, projected with the user's full-frame camera, lands on the PNG
    pixels its crop pixel shows, and the crops cover the whole mask; the previews show those crops."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "crop.pt"
    save_checkpoint(checkpoint, GSLRM(ModelConfig.preset("tiny", input_crop=0.1, image_size=32)))
    size, views = 32, (1, 3)
    result = reconstruct(ReconstructOptions(mm_sample, tmp_path / "m.ply", checkpoint, inputs=views, resolution=size,
                                            units="input", min_opacity=0.0, previews_dir=tmp_path / "previews",
                                            turntable_frames=2))
    assert json.loads(result.sidecar_path.read_text())["checkpoint"]["config"]["input_crop"] == 0.1
    full = load_sample(mm_sample)
    center = foreground_center(full.cameras[list(views)], full.masks[list(views)])
    cropped = crop_to_foreground(full.select(views), size, 0.1, center, torch.tensor([0.0, 1.0, 0.0]))
    crops = cropped.images
    shown = iio.imread(tmp_path / "previews" / "inputs.png")[:size]  # top row: the input views
    expected = (torch.cat(list(crops), -1).permute(1, 2, 0) * 255).round().numpy()
    assert np.abs(shown.astype(np.float64) - expected).max() <= 1
    xyz = columns(read_ply(result.ply_path), "x", "y", "z")
    rows, cols = np.mgrid[:size, :size]
    order = ((rows // PATCH) * (size // PATCH) + cols // PATCH) * PATCH**2 + (rows % PATCH) * PATCH + cols % PATCH
    frames = json.loads((mm_sample / "opencv_cameras.json").read_text())["frames"]
    for k, frame in enumerate(views):
        f, w2c = frames[frame], np.array(frames[frame]["w2c"])
        rgba = iio.imread(mm_sample / f["file_path"]).astype(np.float64) / 255.0
        cam = xyz[2 + k * size * size + order.ravel()] @ w2c[:3, :3].T + w2c[:3, 3]
        u = f["fx"] * cam[:, 0] / cam[:, 2] + f["cx"]  # [size * size], row-major crop pixels
        v = f["fy"] * cam[:, 1] / cam[:, 2] + f["cy"]
        fg_rows, fg_cols = np.nonzero(rgba[..., 3] >= 0.5)
        assert u.min() < fg_cols.min() and u.max() > fg_cols.max() + 1  # the crop covers the mask, with margin
        assert v.min() < fg_rows.min() and v.max() > fg_rows.max() + 1
        inside = (u > 0) & (u < f["w"] - 1) & (v > 0) & (v < f["h"] - 1)
        png = rgba[np.clip(v, 0, f["h"] - 1).astype(int), np.clip(u, 0, f["w"] - 1).astype(int), 3]
        seen = cropped.masks[k, 0].numpy().ravel() > 0.5
        # a crop pixel shows the mouse where the PNG pixel under its Gaussian does (edges aside)
        agree = (seen[inside] == (png[inside] >= 0.5)).mean()
        assert agree > 0.95, agree


@pytest.mark.parametrize("resolution, refine, side", [(40, 1, 40), (64, 1, 48), (64, 0, 32), (16, 1, 32)])
def test_a_model_to_be_refined_sees_its_inputs_at_the_scene_resolution_when_that_is_larger(
        demo_sample, tiny_checkpoint, tmp_path, resolution, refine, side):
    """The 32 px tiny model: refined at 40 px it predicts from 40 px inputs, at 64 px from 48 px ones (1.5x its
    side); feed-forward and below its own side it keeps 32 px."""
    out = tmp_path / "m.ply"
    result = _invoke(str(demo_sample), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--resolution",
                     str(resolution), "--refine", str(refine))
    assert result.exit_code == 0, result.output
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["input_resolution"] == side
    tiny = ModelConfig.preset("tiny")
    assert sidecar["counts"]["predicted"] == tiny.n_gaussians + 5 * side * side


def test_a_prediction_to_be_refined_rounds_the_scene_side_up_to_the_model_patch_within_the_cap():
    model = GSLRM(ModelConfig.preset("tiny", image_size=32))  # patch 8, so at most 48 px
    assert CheckpointPredictor(model, refined=True, resolution=42).input_resolution == 48
    assert CheckpointPredictor(model, refined=True, resolution=40).input_resolution == 40
    assert CheckpointPredictor(model, refined=True, resolution=1000).input_resolution == 48
    assert CheckpointPredictor(model, refined=True).input_resolution == 32
    model = GSLRM(ModelConfig.preset("tiny", image_size=40))  # 1.5 x 40 = 60, up to the patch: 64
    assert CheckpointPredictor(model, refined=True, resolution=256).input_resolution == 64


def test_a_crop_model_refines_against_its_crops_and_the_whole_frames(mm_sample, tmp_path, monkeypatch):
    from mouserecon import refine as refine_module

    torch.manual_seed(0)
    checkpoint = tmp_path / "crop.pt"
    save_checkpoint(checkpoint, GSLRM(ModelConfig.preset("tiny", input_crop=0.1, image_size=32)))
    seen = []
    refine = refine_module.refine

    def recording(gaussians, images, masks, cameras, steps, silhouettes):
        seen.append((images, cameras, silhouettes))
        return refine(gaussians, images, masks, cameras, steps, silhouettes)

    monkeypatch.setattr(refine_module, "refine", recording)
    size, views = 32, (1, 3)
    result = reconstruct(ReconstructOptions(mm_sample, tmp_path / "m.ply", checkpoint, inputs=views, resolution=size,
                                            refine=1))
    (images, cameras, (carve_masks, carve_cameras)), = seen
    # the 2 crops the model saw, then the 2 whole frames, each with its own camera in the model frame
    full = load_sample(mm_sample).select(views)
    center = foreground_center(full.cameras, full.masks)
    crops = crop_to_foreground(full, size, 0.1, center, torch.tensor([0.0, 1.0, 0.0]))
    whole = load_sample(mm_sample, size).select(views)
    torch.testing.assert_close(images, torch.cat([crops.images, whole.images]))
    expected = result.similarity.apply_cameras(Cameras.cat([crops.cameras, whole.cameras]))
    torch.testing.assert_close(cameras.intrinsics, expected.intrinsics)
    torch.testing.assert_close(cameras.c2w, expected.c2w)
    # carved with the whole input frames only
    torch.testing.assert_close(carve_masks, whole.masks)
    torch.testing.assert_close(carve_cameras.intrinsics, expected.intrinsics[2:])
    torch.testing.assert_close(carve_cameras.c2w, expected.c2w[2:])


# ---- the visual hull (no model) ------------------------------------------------------------------


def test_method_hull_writes_the_hull_of_the_input_masks_and_refines_it(demo_sample, tmp_path):
    """`--method hull`: no checkpoint; every Gaussian centre projects onto every input view's PNG mask
    (dilated by a voxel's footprint); the sidecar says what made it; refinement improves the inputs."""
    out = tmp_path / "hull.ply"
    result = _invoke(str(demo_sample), "-o", str(out), "--method", "hull", "--resolution", "64", "--refine", "10")
    assert result.exit_code == 0, result.output
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["method"] == "hull" and sidecar["checkpoint"] is None and sidecar["resolution"] == 64
    after, before = sidecar["refine"]["metrics"]["after"]["inputs"], sidecar["refine"]["metrics"]["before"]["inputs"]
    assert after["psnr_fg"] > before["psnr_fg"] and sidecar["counts"]["written"] > 100
    xyz = columns(read_ply(out), "x", "y", "z")  # input units (mm)
    sample = load_sample(demo_sample)  # full resolution, the camera file's frame
    dilated = torch.nn.functional.max_pool2d(sample.masks, 9, stride=1, padding=4)[:, 0].numpy()
    for view in range(5):
        w2c, (fx, fy, cx, cy) = sample.cameras.w2c[view].double().numpy(), sample.cameras.intrinsics[view].tolist()
        cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
        u, v = fx * cam[:, 0] / cam[:, 2] + cx, fy * cam[:, 1] / cam[:, 2] + cy
        h, w = dilated[view].shape
        assert (cam[:, 2] > 0).all() and (u >= 0).all() and (u < w).all() and (v >= 0).all() and (v < h).all()
        assert (dilated[view][np.floor(v).astype(int), np.floor(u).astype(int)] >= 0.5).mean() > 0.99, view


def test_method_hull_takes_no_checkpoint(demo_sample, tiny_checkpoint, tmp_path):
    result = _invoke(str(demo_sample), "-o", str(tmp_path / "h.ply"), "--method", "hull", "--checkpoint",
                     str(tiny_checkpoint))
    assert result.exit_code != 0 and "the visual hull uses no checkpoint" in result.output
