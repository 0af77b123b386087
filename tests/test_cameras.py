"""Cameras: conventions C1-C4, file formats, validation, normalisation.

References: the real markerless_mouse_1 rig and its rig_geometry.txt, the FaceLift human sample,
the NeRF-synthetic lego views (all in ../shared, made by others), and closed-form cases.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mouserecon import cameras as cameras_module
from mouserecon.cameras import (
    CameraError,
    Cameras,
    load_camera_file,
    load_nerfstudio_transforms,
    load_opencv_cameras,
    optical_axes_intersection,
    save_opencv_cameras,
    validate_cameras,
)
from mouserecon.normalize import (
    Similarity,
    estimate_up,
    normalize_cameras,
    rotation_between,
)

RIG = "markerless_mouse_1_rig"
NATIVE = f"{RIG}/opencv_cameras_native_1152x1024.json"
M5 = f"{RIG}/opencv_cameras_m5_facelift_fork_512.json"
FACELIFT = "facelift_human_sample_000/opencv_cameras.json"
LEGO = "nerf_synthetic_lego_8views"


# ---- helpers (independent of the module under test) ------------------------------------------


def look_at_c2w(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV camera-to-world [4, 4] float64 at `eye` looking at `target`, image up ~ world `up`."""
    eye, target, up = (torch.tensor(v, dtype=torch.float64) for v in (eye, target, up))
    z = torch.nn.functional.normalize(target - eye, dim=0)  # forward
    x = torch.nn.functional.normalize(torch.linalg.cross(z, up), dim=0)  # right
    y = torch.linalg.cross(z, x)  # down
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w


def ring_rig(num: int = 6, radius: float = 3.0, size: int = 64) -> Cameras:
    """`num` cameras on a tilted ring around the origin, all looking at it."""
    c2ws = []
    for k in range(num):
        azim, elev = 2 * math.pi * k / num + 0.3, math.radians(10 + 3 * k)
        eye = radius * torch.tensor([math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)])
        c2ws.append(look_at_c2w(eye.tolist()))
    intrinsics = torch.tensor([[size * 1.2, size * 1.1, size / 2, size / 2]] * num, dtype=torch.float64)
    return Cameras(torch.stack(c2ws).float(), intrinsics.float(), size, size)


def write_frames(path, frames, **top) -> None:
    path.write_text(json.dumps({**top, "frames": frames}))


def parse_rig_geometry(text: str) -> tuple[list[float], dict[int, dict[str, float]]]:
    """Aim point (mm) and the per-camera table 'relative to the optical-axis intersection point'."""
    aim = re.search(r"Least-squares intersection of the 6 optical axes \(mm\): \[([^\]]+)\]", text)
    block = text.split("Geometry relative to the optical-axis intersection point")[1].split("\n\n")[0]
    lines = block.strip().splitlines()
    header = lines[1].split()
    table = {}
    for line in lines[2:]:
        values = line.split("[")[0].split()
        table[int(values[0])] = {name: float(v) for name, v in zip(header[1:], values[1:])}
    return [float(v) for v in aim.group(1).split(",")], table


# ---- conventions (CONVENTIONS.md C1-C4) --------------------------------------------------------


def test_convention_opencv_axes():
    cam = Cameras(torch.eye(4)[None], torch.tensor([[100.0, 120.0, 32.0, 24.0]]), 64, 48)
    uv, depth = cam.project(torch.tensor([[[0.0, 0.0, 3.0], [1.0, 0.0, 3.0], [0.0, 1.0, 3.0]]]))
    assert torch.allclose(uv[0, 0], torch.tensor([32.0, 24.0]))  # +z forward -> principal point
    assert torch.allclose(uv[0, 1], torch.tensor([32.0 + 100.0 / 3, 24.0]))  # +x -> right
    assert torch.allclose(uv[0, 2], torch.tensor([32.0, 24.0 + 120.0 / 3]))  # +y -> down
    assert (depth > 0).all()
    # The central ray is the camera's +z axis.
    _, dirs = Cameras(torch.eye(4)[None], torch.tensor([[10.0, 10.0, 1.0, 1.0]]), 2, 2).rays()
    assert torch.allclose(dirs[0].mean((0, 1)) / dirs[0].mean((0, 1)).norm(), torch.tensor([0.0, 0.0, 1.0]))


def test_convention_w2c_on_disk(tmp_path):
    c2w = torch.stack([look_at_c2w((3.0, 1.0, 2.0)), look_at_c2w((-2.0, 2.5, 1.0), target=(0.1, 0.0, 0.2))])
    cams = Cameras(c2w.float(), torch.tensor([[50.0, 50.0, 32.0, 32.0]] * 2), 64, 64)
    save_opencv_cameras(tmp_path / "cams.json", cams, ["images/a.png", "images/b.png"], world_up=[0, 0, 1])
    raw = json.loads((tmp_path / "cams.json").read_text())
    assert raw["world_up"] == [0, 0, 1]
    for i, frame in enumerate(raw["frames"]):
        rot, t = c2w[i, :3, :3], c2w[i, :3, 3]
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3], w2c[:3, 3] = rot.T, -rot.T @ t  # closed-form inverse of a rigid transform
        assert torch.allclose(torch.tensor(frame["w2c"], dtype=torch.float64), w2c, atol=1e-6)
        assert (frame["w"], frame["h"], frame["fx"], frame["cx"]) == (64, 64, 50.0, 32.0)


def test_nerfstudio_lego_matches_opencv(shared_dir):
    lego = shared_dir / "data" / LEGO
    # SOURCE.txt: originals are 800x800 (fx = 1111.11 @ 800); res512 is a downscale to 512 px.
    assert "fx=1111.11 @800" in (lego / "SOURCE.txt").read_text()
    cams, files = load_nerfstudio_transforms(lego / "transforms_train_original.json", width=800, height=800)
    assert (cams.width, cams.height, len(cams)) == (800, 800, 100)
    assert torch.allclose(cams.intrinsics[0], torch.tensor([1111.111, 1111.111, 400.0, 400.0]), atol=1e-2)
    small = cams.resize(512, 512)
    ref_raw = json.loads((lego / "res512" / "opencv_cameras.json").read_text())
    for frame in ref_raw["frames"]:
        k = files.index(frame["source_file"])
        w2c = torch.tensor(frame["w2c"], dtype=torch.float64)
        assert torch.allclose(torch.linalg.inv(small.c2w[k].double()), w2c, atol=2e-6), frame["source_file"]
        ref_intr = torch.tensor([frame["fx"], frame["fy"], frame["cx"], frame["cy"]])
        assert torch.allclose(small.intrinsics[k], ref_intr, atol=1e-3)
        assert (frame["w"], frame["h"]) == (512, 512)
    # Projecting the origin (the object, looked at by every camera) lands at the image centre.
    uv, depth = cams.project(torch.zeros(len(cams), 1, 3))
    assert torch.allclose(uv, torch.full_like(uv, 400.0), atol=0.05) and (depth > 0).all()
    ref, _ = load_opencv_cameras(lego / "res512" / "opencv_cameras.json")
    uv, _ = ref.project(torch.zeros(len(ref), 1, 3))
    assert torch.allclose(uv, torch.full_like(uv, 256.0), atol=0.05)


def test_convention_pixel_centres():
    c2w = look_at_c2w((2.0, -1.0, 1.5))[None].float()
    fx, fy, cx, cy = 40.0, 44.0, 15.0, 11.0
    cam = Cameras(c2w, torch.tensor([[fx, fy, cx, cy]]), 32, 24)
    origins, dirs = cam.rays()  # [1, 24, 32, 3]
    assert origins.shape == dirs.shape == (1, 24, 32, 3)
    # Closed form: pixel (i, j) -> camera direction ((i + 0.5 - cx) / fx, (j + 0.5 - cy) / fy, 1).
    for i, j in [(0, 0), (31, 0), (5, 17), (31, 23)]:
        d_cam = torch.tensor([(i + 0.5 - cx) / fx, (j + 0.5 - cy) / fy, 1.0], dtype=torch.float64)
        expected = c2w[0, :3, :3].double() @ (d_cam / d_cam.norm())
        assert torch.allclose(dirs[0, j, i].double(), expected, atol=1e-6)
        uv, _ = cam.project((origins[0, j, i] + 2.0 * dirs[0, j, i])[None, None])
        assert torch.allclose(uv[0, 0], torch.tensor([i + 0.5, j + 0.5]), atol=1e-4)
    # Resize 2x down: small pixel (0, 0) covers big pixels [0, 2)^2, its centre is big (1.0, 1.0).
    small = cam.resize(12, 16)
    o, d = small.rays()
    uv, _ = cam.project((o[0, 0, 0] + 2.0 * d[0, 0, 0])[None, None])
    assert torch.allclose(uv[0, 0], torch.tensor([1.0, 1.0]), atol=1e-4)
    assert torch.allclose(small.intrinsics, torch.tensor([[fx / 2, fy / 2, cx / 2, cy / 2]]))
    # Resize 2x up: big pixel (3, 1) covers small [1.5, 2) x [0.5, 1), its centre is small (1.75, 0.75).
    big = cam.resize(48, 64)
    o, d = big.rays()
    uv, _ = cam.project((o[0, 1, 3] + 2.0 * d[0, 1, 3])[None, None])
    assert torch.allclose(uv[0, 0], torch.tensor([1.75, 0.75]), atol=1e-4)


def test_convention_normalised_rig():
    # A y-up millimetre rig like the real one: six cameras 300-330 mm from an aim point, elevations
    # 1-20 deg, all looking at the aim point (closed form: the optical axes meet exactly there).
    aim, up = torch.tensor([40.0, 20.0, 60.0], dtype=torch.float64), (0.0, 1.0, 0.0)
    radii = torch.tensor([300.0, 330.0, 310.0, 305.0, 325.0, 315.0], dtype=torch.float64)
    elev = torch.deg2rad(torch.tensor([2.0, 18.0, 4.0, 1.0, 20.0, 15.0], dtype=torch.float64))
    azim = torch.deg2rad(torch.tensor([0.0, 55.0, 120.0, 180.0, 235.0, 300.0], dtype=torch.float64))
    offsets = torch.stack([elev.cos() * azim.cos(), elev.sin(), elev.cos() * azim.sin()], -1) * radii[:, None]
    c2w = torch.stack([look_at_c2w((aim + o).tolist(), aim.tolist(), up) for o in offsets])
    cams = Cameras(c2w.float(), torch.tensor([[1600.0, 1600.0, 576.0, 512.0]] * 6), 1152, 1024)
    normalised, sim = normalize_cameras(cams, up=up)
    assert torch.allclose(sim.apply_points(aim), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    dist = normalised.centers.double().norm(dim=-1)
    assert torch.allclose(dist, radii * 2.7 / radii.mean(), atol=1e-5)  # uniform scale, mean 2.7
    assert torch.allclose(torch.asin(normalised.centers.double()[:, 2] / dist), elev, atol=1e-6)  # up -> +Z
    assert torch.allclose(-normalised.c2w[:, 2, 1].double(), elev.cos(), atol=1e-6)  # image up tilts to +Z
    assert torch.allclose(sim.inverse().apply_c2w(normalised.c2w.double()), c2w, atol=1e-4)


# ---- reference data ----------------------------------------------------------------------------


def test_real_rig_normalises_to_its_documented_geometry(shared_dir):
    path = shared_dir / "data" / NATIVE
    aim, table = parse_rig_geometry((shared_dir / "data" / RIG / "rig_geometry.txt").read_text())
    cams, files = load_opencv_cameras(path)
    assert (len(cams), cams.width, cams.height) == (6, 1152, 1024) and len(set(files)) == 6
    up = load_camera_file(path).world_up
    assert up.tolist() == json.loads(path.read_text())["world_up"]
    normalised, sim = normalize_cameras(cams, up=up)
    assert normalised.centers.norm(dim=-1).mean().item() == pytest.approx(2.7, abs=1e-5)
    assert torch.allclose(sim.rotation @ up, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(optical_axes_intersection(normalised.c2w), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    # The origin of the model frame is the documented aim point (given to 0.01 mm).
    back_origin = sim.inverse().apply_points(torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(back_origin, torch.tensor(aim, dtype=torch.float64), atol=0.02)
    # Distances, elevations and azimuths about the aim point, z-up, as tabulated.
    pos = normalised.centers.double()
    dist = pos.norm(dim=-1)
    for k, row in table.items():
        assert dist[k].item() / sim.scale == pytest.approx(row["dist"], abs=0.01)
        assert math.degrees(math.asin(pos[k, 2] / dist[k])) == pytest.approx(row["elev"], abs=0.06)
        assert math.degrees(math.atan2(pos[k, 1], pos[k, 0])) == pytest.approx(row["azim"], abs=0.06)
    assert sim.scale == pytest.approx(2.7 / np.mean([row["dist"] for row in table.values()]), rel=1e-4)
    # Mapping back reproduces the input cameras (through a JSON record of the transform).
    recorded = Similarity.from_dict(json.loads(json.dumps(sim.to_dict())))
    back = recorded.inverse().apply_cameras(normalised)
    assert torch.allclose(back.c2w[:, :3, :3], cams.c2w[:, :3, :3], atol=1e-6)
    assert torch.allclose(back.c2w[:, :3, 3], cams.c2w[:, :3, 3], atol=1e-3)  # mm
    assert torch.equal(back.intrinsics, cams.intrinsics)
    # The same rig expressed y-up: told its up, it normalises to the same distances and elevations.
    z_to_y = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=torch.float64)  # z -> y, y -> -z
    y_up_rig = Similarity(z_to_y, torch.tensor([5.0, -3.0, 7.0]), 1.0).apply_cameras(cams)
    from_y_up, _ = normalize_cameras(y_up_rig, up=z_to_y @ up)
    elevations = [torch.asin(c[:, 2] / c.norm(dim=-1)) for c in (normalised.centers, from_y_up.centers)]
    assert torch.allclose(elevations[0], elevations[1], atol=1e-5)
    assert torch.allclose(from_y_up.centers.norm(dim=-1), normalised.centers.norm(dim=-1), atol=1e-5)


def test_real_rig_matches_facelift_fork_m5(shared_dir):
    """SOURCE.txt: m5 = (X_mm - camera centroid) * 2.7/307.785, rotations unchanged."""
    source = (shared_dir / "data" / RIG / "SOURCE.txt").read_text()
    centroid = [float(v) for v in re.search(r"origin = camera centroid \[([^\]]+)\] mm", source).group(1).split(",")]
    mean_dist = float(re.search(r"scale 2\.7/([0-9.]+)", source).group(1))
    native, _ = load_opencv_cameras(shared_dir / "data" / NATIVE)
    m5, _ = load_opencv_cameras(shared_dir / "data" / M5)
    centres = native.centers.double()
    assert torch.allclose(centres.mean(0), torch.tensor(centroid, dtype=torch.float64), atol=1e-3)
    assert (centres - centres.mean(0)).norm(dim=-1).mean().item() == pytest.approx(mean_dist, abs=1e-3)
    scale = 2.7 / mean_dist
    fork = Similarity(torch.eye(3), -scale * torch.tensor(centroid, dtype=torch.float64), scale)
    assert torch.allclose(fork.apply_c2w(native.c2w.double()), m5.c2w.double(), atol=1e-5)
    # Our normalisation differs from the fork's only by origin and scale: same rotations,
    # pairwise camera distances in the ratio of the two scales.
    ours, sim = normalize_cameras(native)
    assert torch.allclose(ours.c2w[:, :3, :3], m5.c2w[:, :3, :3], atol=1e-6)
    ratio = torch.cdist(ours.centers.double(), ours.centers.double()) / torch.cdist(m5.centers.double(),
                                                                                   m5.centers.double()).clamp_min(1e-9)
    off_diagonal = ratio[~torch.eye(6, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, sim.scale / scale), rtol=1e-5)
    # The fork's origin is not the aim point; rig_geometry.txt gives the axes' intersection in m5 units.
    aim_m5 = re.search(r"optical-axis intersection in M5 units: \[([^\]]+)\]",
                       (shared_dir / "data" / RIG / "rig_geometry.txt").read_text()).group(1)
    expected = torch.tensor([float(v) for v in aim_m5.split(",")], dtype=torch.float64)
    assert torch.allclose(optical_axes_intersection(m5.c2w), expected, atol=1e-3)


def test_facelift_sample_is_the_model_rig(shared_dir):
    path = shared_dir / "data" / FACELIFT
    cams, files = load_opencv_cameras(path)
    assert len(cams) == 32 and files[0] == "images/cam_000.png"
    assert torch.allclose(cams.centers.norm(dim=-1), torch.full((32,), 2.7), atol=1e-5)
    uv, depth = cams.project(torch.zeros(32, 1, 3))
    assert torch.allclose(uv, torch.full_like(uv, 256.0), atol=0.01)
    assert torch.allclose(depth, torch.full_like(depth, 2.7), atol=1e-5)
    # Camera centres equal Blender's recorded camera locations (elevation 20 deg).
    blender = torch.tensor([f["blender_camera_location"] for f in json.loads(path.read_text())["frames"]])
    assert torch.allclose(cams.centers, blender, atol=1e-5)
    assert torch.allclose(cams.centers[:, 2], torch.full((32,), 2.7 * math.sin(math.radians(20))), atol=1e-5)
    validate_cameras(cams, path)
    # It already is the model rig (C4): normalising it is the identity.
    same, sim = normalize_cameras(cams)
    assert sim.scale == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(sim.rotation, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(sim.translation, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(same.c2w, cams.c2w, atol=1e-5)
    # The documented rig read through C1 (z-up, cam_000 at +x looking at the origin): world +Z
    # appears up (smaller v) in every view, and in cam_000 world +y appears to the right.
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.3], [0.0, 0.3, 0.0]]).expand(len(cams), 3, 3)
    uv, _ = cams.project(points)
    assert (uv[:, 1, 1] < uv[:, 0, 1] - 20).all()
    assert uv[0, 2, 0] > uv[0, 0, 0] + 20


def test_lens_keys_warn_once(shared_dir, caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(cameras_module, "_warned_lens_keys", set())
    with caplog.at_level(logging.WARNING, logger="mouserecon.cameras"):
        load_opencv_cameras(shared_dir / "data" / NATIVE)
        load_opencv_cameras(shared_dir / "data" / NATIVE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skew" in warnings[0] and "dist_k1_k2_k3" in warnings[0]
    # Zero skew/distortion is not worth a warning.
    frames = json.loads((shared_dir / "data" / NATIVE).read_text())["frames"]
    for f in frames:
        f["skew"], f["dist_k1_k2_k3"], f["dist_p1_p2"] = 0.0, [0.0, 0.0, 0.0], [0.0, 0.0]
    write_frames(tmp_path / "zero.json", frames)
    monkeypatch.setattr(cameras_module, "_warned_lens_keys", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mouserecon.cameras"):
        load_opencv_cameras(tmp_path / "zero.json")
    assert not caplog.records


# ---- nerfstudio reader on synthetic files --------------------------------------------------------


def _gl_frames(c2w_cv: torch.Tensor) -> list[dict]:
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    return [{"file_path": f"images/frame_{k:05d}.png", "transform_matrix": (c2w.double() @ flip).tolist()}
            for k, c2w in enumerate(c2w_cv)]


def test_nerfstudio_intrinsics_per_frame_and_image_size(tmp_path):
    rig = ring_rig(num=4, size=40)
    frames = _gl_frames(rig.c2w)
    for k, frame in enumerate(frames):
        frame.update(fl_x=50.0 + k, fl_y=52.0 + k, cx=19.0, cy=21.0)  # per-frame intrinsics
    (tmp_path / "images").mkdir()
    iio.imwrite(tmp_path / "images" / "frame_00000.png", np.zeros((30, 40, 3), np.uint8))  # h=30, w=40
    write_frames(tmp_path / "transforms.json", frames, camera_model="OPENCV", k1=0.0, k2=0.0, p1=0.0, p2=0.0)
    cams, files = load_nerfstudio_transforms(tmp_path / "transforms.json")
    assert (cams.width, cams.height) == (40, 30) and files[0] == "images/frame_00000.png"
    assert torch.allclose(cams.intrinsics[:, 0], torch.tensor([50.0, 51.0, 52.0, 53.0]))
    assert torch.allclose(cams.intrinsics[:, 1:], torch.tensor([[52.0, 19.0, 21.0], [53, 19, 21], [54, 19, 21],
                                                                [55, 19, 21]]))
    assert torch.allclose(cams.c2w, rig.c2w, atol=1e-6)
    # Global intrinsics and explicit w/h keys.
    write_frames(tmp_path / "global.json", _gl_frames(rig.c2w), fl_x=60.0, fl_y=60.0, cx=20.0, cy=15.0, w=40, h=30)
    cams, _ = load_nerfstudio_transforms(tmp_path / "global.json")
    assert torch.allclose(cams.intrinsics, torch.tensor([[60.0, 60.0, 20.0, 15.0]] * 4))
    with pytest.raises(CameraError, match=r"global\.json: frame 0 declares 40x30 but 64x64 was passed"):
        load_nerfstudio_transforms(tmp_path / "global.json", width=64, height=64)


@pytest.mark.parametrize("defect, edit, message", [
    ("no focal", lambda meta: meta.pop("camera_angle_x"), r"frame 0 has neither 'fl_x' nor 'camera_angle_x'"),
    ("no pose", lambda meta: meta["frames"][2].pop("transform_matrix"), r"frame 2 is missing \['transform_matrix'\]"),
    ("fisheye", lambda meta: meta.update(camera_model="OPENCV_FISHEYE"), r"'OPENCV_FISHEYE' is not a pinhole"),
    ("no size", lambda meta: None, r"frame 0 has no 'w'/'h' and its image .*frame_00000\.png cannot give the size"),
    ("bad matrix", lambda meta: meta["frames"][1].update(transform_matrix=[[1, 0], [0, 1]]),
     r"frame 1 'transform_matrix' has shape \(2, 2\)"),
])
def test_nerfstudio_malformed(tmp_path, defect, edit, message):
    meta = {"camera_angle_x": 0.7, "frames": _gl_frames(ring_rig().c2w)}
    edit(meta)
    path = tmp_path / "transforms.json"
    path.write_text(json.dumps(meta))
    width = None if defect == "no size" else 64
    with pytest.raises(CameraError, match=re.escape(str(path)) + ".*" + message):
        load_nerfstudio_transforms(path, width=width, height=width)


# ---- malformed FaceLift camera files -----------------------------------------------------------


def _good_frames() -> list[dict]:
    rig = ring_rig()
    w2c = torch.linalg.inv(rig.c2w.double())
    return [{"w": 64, "h": 64, "fx": 70.0, "fy": 70.0, "cx": 32.0, "cy": 32.0, "w2c": w2c[k].tolist(),
             "file_path": f"images/cam_{k:03d}.png"} for k in range(len(rig))]


def _set_w2c(frames, k, fn):
    frames[k]["w2c"] = fn(torch.tensor(frames[k]["w2c"], dtype=torch.float64)).tolist()


def _rotate_about_camera_y(w2c: torch.Tensor, degrees: float) -> torch.Tensor:
    """Turn the camera in place about its own y axis (w2c' = R_y^T-like left product keeps the centre)."""
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
    c2w = torch.linalg.inv(w2c)
    c2w[:3, :3] = c2w[:3, :3] @ rot
    return torch.linalg.inv(c2w)


def _edit_nan(frames):
    frames[3]["w2c"][1][2] = float("nan")


def _edit_shear(frames):
    _set_w2c(frames, 3, lambda m: m @ torch.diag(torch.tensor([1.0, 1.1, 1.0, 1.0], dtype=torch.float64)))


def _edit_reflect(frames):
    _set_w2c(frames, 3, lambda m: torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64)) @ m)


MALFORMED = {
    "nan": (_edit_nan, r"frame 3 w2c has non-finite values"),
    "non-orthonormal": (_edit_shear, r"frame 3 w2c rotation is not orthonormal"),
    "reflection": (_edit_reflect, r"frame 3 w2c rotation has det -1.000 \(a reflection\)"),
    "negative focal": (lambda f: f[1].update(fx=-70.0), r"frame 1 focal lengths must be positive"),
    "principal point": (lambda f: f[4].update(cx=80.0), r"frame 4 principal point \(80.0, 32.0\) is outside"),
    "missing key": (lambda f: f[2].pop("fy"), r"frame 2 is missing \['fy'\]"),
    "not a number": (lambda f: f[2].update(fx="70"), r"frame 2 'fx' must be a number"),
    "sizes differ": (lambda f: f[5].update(w=128), r"frames have different image sizes"),
    "duplicate": (lambda f: f[4].update(file_path="images/cam_001.png"),
                  r"frames 1 and 4 have the same file_path 'images/cam_001.png'"),
    "looks sideways": (lambda f: _set_w2c(f, 2, lambda m: _rotate_about_camera_y(m, 90.0)),
                       r"frame 2 looks away from the region the other cameras look at"),
}


def test_good_frames_load(tmp_path):
    write_frames(tmp_path / "ok.json", _good_frames())
    cams, files = load_opencv_cameras(tmp_path / "ok.json")
    assert len(cams) == 6 and files[5] == "images/cam_005.png"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_opencv_cameras(tmp_path, name):
    edit, message = MALFORMED[name]
    frames = _good_frames()
    edit(frames)
    path = tmp_path / f"{name.replace(' ', '_')}.json"
    write_frames(path, frames)
    with pytest.raises(CameraError, match=re.escape(str(path)) + ": " + message):
        load_opencv_cameras(path)


def test_truncated_and_missing_json(tmp_path):
    path = tmp_path / "truncated.json"
    text = json.dumps({"frames": _good_frames()})
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CameraError, match=re.escape(str(path)) + ": not valid JSON"):
        load_opencv_cameras(path)
    with pytest.raises(CameraError, match="nothing.json: camera file not found"):
        load_opencv_cameras(tmp_path / "nothing.json")
    (tmp_path / "empty.json").write_text(json.dumps({"frames": []}))
    with pytest.raises(CameraError, match="empty.json: expected a JSON object with a non-empty list"):
        load_opencv_cameras(tmp_path / "empty.json")


def test_real_rig_camera_looking_away(shared_dir, tmp_path):
    """One of six real cameras turned 180 deg: its optical axis (a line) is unchanged, it must still fail."""
    meta = json.loads((shared_dir / "data" / NATIVE).read_text())
    for k in range(6):
        bad = copy.deepcopy(meta)
        bad["frames"][k]["w2c"] = _rotate_about_camera_y(torch.tensor(bad["frames"][k]["w2c"],
                                                                       dtype=torch.float64), 180.0).tolist()
        path = tmp_path / f"rig_cam{k}_turned.json"
        path.write_text(json.dumps(bad))
        message = f": frame {k} looks away .*" + r"\(1[78][0-9] deg off its optical axis"
        with pytest.raises(CameraError, match=re.escape(str(path)) + message):
            load_opencv_cameras(path)


def test_common_region_is_robust_to_one_outlier():
    good = ring_rig()
    c2w = good.c2w.clone()
    # Camera 0 aimed 33 deg away from the object, just outside its 31.7 deg half diagonal field of
    # view. Its own axis would pull an all-camera intersection to 28.5 deg off; the other five don't.
    c2w[0] = look_at_c2w(c2w[0, :3, 3].tolist(), target=(0.0, 0.0, 1.8)).float()
    with pytest.raises(CameraError, match=r"<cameras>: frame 0 looks away .*\(33 deg off its optical axis; "
                                          r"its half field of view is 32 deg\)"):
        validate_cameras(Cameras(c2w, good.intrinsics, good.width, good.height))
    # A slightly off-centre aim (inside the field of view) is fine.
    c2w[0] = look_at_c2w(c2w[0, :3, 3].tolist(), target=(0.0, 0.0, 0.4)).float()
    validate_cameras(Cameras(c2w, good.intrinsics, good.width, good.height), "rig")
    # Two cameras looking at each other's backs share no region.
    pair = torch.stack([look_at_c2w((3.0, 0, 0), target=(6.0, 0, 0.5)), look_at_c2w((-3.0, 0, 0), (-6.0, 0.5, 0))])
    with pytest.raises(CameraError, match="pair: frame [01] looks away"):
        validate_cameras(Cameras(pair.float(), good.intrinsics[:2], 64, 64), "pair")


# ---- round trips and closed forms --------------------------------------------------------------


def test_opencv_json_round_trip(tmp_path):
    rig = ring_rig()
    files = [f"images/cam_{k:03d}.png" for k in range(len(rig))]
    save_opencv_cameras(tmp_path / "cams.json", rig, files, id="rig", world_up=[0.0, 0.0, 1.0])
    cams, read_files = load_opencv_cameras(tmp_path / "cams.json")
    assert read_files == files and (cams.width, cams.height) == (rig.width, rig.height)
    assert torch.allclose(cams.c2w, rig.c2w, atol=1e-6) and torch.equal(cams.intrinsics, rig.intrinsics)
    assert load_camera_file(tmp_path / "cams.json").world_up.tolist() == [0.0, 0.0, 1.0]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(CameraError, match="same file_path"):
        save_opencv_cameras(tmp_path / "dup.json", rig, ["a.png"] * len(rig))
    assert not (tmp_path / "dup.json").exists()


def test_similarity_inverse_and_record():
    rot = rotation_between(torch.tensor([0.3, -0.5, 0.8]), torch.tensor([0.0, 0.0, 1.0]))
    sim = Similarity(rot, torch.tensor([1.0, -2.0, 0.5]), 0.01)
    points = torch.randn(10, 3, dtype=torch.float64) * 100
    assert torch.allclose(sim.inverse().apply_points(sim.apply_points(points)), points, atol=1e-10)
    assert torch.allclose(sim.inverse().matrix(), torch.linalg.inv(sim.matrix()), atol=1e-12)
    homogeneous = torch.cat([points, torch.ones(10, 1, dtype=torch.float64)], -1)
    assert torch.allclose(sim.apply_points(points), (homogeneous @ sim.matrix().T)[:, :3], atol=1e-12)
    record = Similarity.from_dict(json.loads(json.dumps(sim.to_dict())))
    assert torch.equal(record.rotation, sim.rotation) and torch.equal(record.translation, sim.translation)
    assert record.scale == sim.scale
    with pytest.raises(ValueError, match="keys rotation, translation, scale"):
        Similarity.from_dict({**sim.to_dict(), "shear": 0})
    with pytest.raises(ValueError, match="not a similarity"):
        Similarity.from_dict({**sim.to_dict(), "rotation": (2 * rot).tolist()})
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        Similarity.from_dict({**sim.to_dict(), "scale": -1.0})
    # Cameras move with the points: a point keeps its pixel.
    rig = ring_rig()
    world = torch.randn(len(rig), 5, 3) * 0.3
    uv, depth = rig.project(world)
    uv2, depth2 = sim.apply_cameras(rig).project(sim.apply_points(world))
    assert torch.allclose(uv, uv2, atol=1e-3) and torch.allclose(depth * sim.scale, depth2, rtol=1e-4)


def test_rotation_between_and_up():
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for up in ([0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 2.0, -3.0], [0.0, 0.0, -1.0], [1e-12, 0.0, -1.0]):
        rot = rotation_between(torch.tensor(up), z)
        assert torch.allclose(rot @ rot.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
        assert torch.linalg.det(rot).item() == pytest.approx(1.0)
        assert torch.allclose(rot @ torch.nn.functional.normalize(torch.tensor(up, dtype=torch.float64), dim=0), z,
                              atol=1e-9)
    # Minimal: the rotation axis is perpendicular to both directions (y-up -> z-up is about x).
    assert torch.allclose(rotation_between(torch.tensor([0.0, 1.0, 0.0]), z) @ torch.tensor([1.0, 0, 0]).double(),
                          torch.tensor([1.0, 0, 0]).double())
    # A y-up rig normalised with up=+y ends z-up: image up (-y camera) points to +Z.
    rig = ring_rig()
    to_y_up = Similarity(rotation_between(z, torch.tensor([0.0, 1.0, 0.0])), torch.zeros(3), 1.0)
    y_up_rig = to_y_up.apply_cameras(rig)
    normalised, _ = normalize_cameras(y_up_rig, up=(0.0, 1.0, 0.0))
    assert (-normalised.c2w[:, 2, 1] > 0.9).all()
    assert torch.allclose(estimate_up(y_up_rig), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=0.2)


def test_estimate_up_on_real_rig(shared_dir):
    path = shared_dir / "data" / NATIVE
    cams, _ = load_opencv_cameras(path)
    angle = math.degrees(math.acos(estimate_up(cams) @ load_camera_file(path).world_up))
    assert angle < 2.0


def test_normalise_with_given_centre():
    rig = ring_rig()
    centre = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64)
    normalised, sim = normalize_cameras(rig, center=centre, target_distance=1.5)
    assert torch.allclose(sim.apply_points(centre), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert normalised.centers.double().norm(dim=-1).mean().item() == pytest.approx(1.5, abs=1e-5)


def test_crop_and_resize_compose():
    rig = ring_rig(num=2, size=64)
    fx, fy, cx, cy = rig.intrinsics[0].tolist()
    cropped = rig.crop(left=10, top=6, width=40, height=48)
    assert torch.allclose(cropped.intrinsics[0], torch.tensor([fx, fy, cx - 10, cy - 6]))
    # A crop's rays are the full image's rays at the cropped pixels.
    full_o, full_d = rig.rays()
    crop_o, crop_d = cropped.rays()
    assert torch.allclose(crop_d, full_d[:, 6:54, 10:50], atol=1e-6) and torch.equal(crop_o, full_o[:, 6:54, 10:50])
    # crop then resize: (fx * s, fy * t, (cx - left) * s, (cy - top) * t).
    both = cropped.resize(height=24, width=80)
    s, t = 80 / 40, 24 / 48
    assert (both.width, both.height) == (80, 24)
    assert torch.allclose(both.intrinsics[1], torch.tensor([fx * s, fy * t, (cx - 10) * s, (cy - 6) * t]))
    # resize then crop at the scaled offset equals crop then resize.
    other = rig.resize(height=32, width=128).crop(left=20, top=3, width=80, height=24)
    assert torch.allclose(other.intrinsics, both.intrinsics)
    with pytest.raises(CameraError, match="outside the 64x64 image"):
        rig.crop(left=30, top=0, width=40, height=10)
