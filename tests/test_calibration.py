"""Calibration formats (DANNCE, Anipose, OpenCV, ours), checked against the DANNCE rig's own 2D labels, the
team's independent conversion of it, OpenCV's projectPoints / initUndistortRectifyMap, and bad files."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from mouserecon.calibration import (
    Calibration,
    CalibrationError,
    LensCamera,
    find_calibration,
    load_calibration,
    save_anipose_toml,
    save_dannce_mat,
    save_mouserecon_json,
    resample_maps,
    save_opencv_yaml,
    undistort_maps,
)

RIG = "data/markerless_mouse_1_rig"
SIZE = (1152, 1024)  # the rig's video size; the .mat does not store it
LABELLED_POINTS = 6 * 1715  # finite 2D labels over the 6 cameras (SOURCE.txt: n=1715 per camera)


@pytest.fixture(scope="module")
def rig(shared_dir) -> Path:
    return shared_dir / RIG


@pytest.fixture(scope="module")
def dannce(rig) -> Calibration:
    return load_calibration(rig / "label3d_dannce.mat", image_size=SIZE)


@pytest.fixture(scope="module")
def labels(rig) -> tuple[np.ndarray, np.ndarray]:
    """3D labels [F, 22, 3] (mm, some NaN) and their 2D labels [F, V, 22, 2] in the raw (distorted) images,
    0-based pixel centres, as DANNCE stores them."""
    keypoints = np.load(rig / "keypoints_markerless_mouse_1.npz")
    return keypoints["labeled_kp3d_mm"], keypoints["labeled_kp2d_px_distorted"]


def reprojection_error(calibration: Calibration, labels) -> float:
    """Max |project(X) - 0.5 - label| (px) over every finite label of every camera."""
    points, pixels = labels
    errors = []
    for v, camera in enumerate(calibration.cameras):
        projected, _ = camera.project(points)  # [F, 22, 2] pixel edges
        error = np.abs(projected - 0.5 - pixels[:, v])
        errors.append(error[np.isfinite(error).all(-1)])
    errors = np.concatenate(errors)
    assert len(errors) == LABELLED_POINTS
    return float(errors.max())


def assert_same_cameras(a: Calibration, b: Calibration, rtol: float = 1e-9) -> None:
    assert a.names == b.names
    for x, y in zip(a.cameras, b.cameras):
        assert (x.width, x.height) == (y.width, y.height)
        for key in ("K", "dist", "R", "t"):
            np.testing.assert_allclose(getattr(x, key), getattr(y, key), rtol=rtol, atol=1e-12,
                                       err_msg=f"{x.name} {key}")


def points_in_view(camera: LensCamera, n: int, rng: np.random.Generator, margin: float = 1.0):
    """World points [n, 3] 200-400 mm deep whose pinhole projections are uniform over the image
    (`margin` px from the border), with those projections [n, 2]."""
    pinhole = camera.pinhole()
    uv = rng.uniform([margin, margin], [camera.width - margin, camera.height - margin], (n, 2))
    depth = rng.uniform(200.0, 400.0, n)
    xy = (uv - pinhole.K[:2, 2]) / np.diag(pinhole.K)[:2]
    in_camera = np.concatenate([xy * depth[:, None], depth[:, None]], 1)
    return (in_camera - camera.t) @ camera.R, uv  # X = R^T (x_cam - t)


def expect_error(path: Path, *fragments: str, image_size=None) -> str:
    with pytest.raises(CalibrationError) as info:
        load_calibration(path, image_size=image_size)
    message = str(info.value)
    for fragment in (str(path), *fragments):
        assert fragment in message, message
    return message


# ---- DANNCE: the real rig -----------------------------------------------------------------------


def test_dannce_reproduces_the_labels(dannce, labels):
    assert dannce.format == "dannce" and dannce.units == "mm" and dannce.world_up is None
    assert dannce.names == [f"Camera{i}" for i in range(1, 7)]
    assert all((c.width, c.height) == SIZE for c in dannce.cameras)
    assert "transposed" in dannce.conversion and "+0.5" in dannce.conversion
    assert reprojection_error(dannce, labels) < 1e-3  # measured 6.8e-5 px (the labels are float32)


def test_dannce_matches_the_teams_json(dannce, rig):
    team = load_calibration(rig / "opencv_cameras_native_1152x1024.json")
    assert team.format == "mouserecon" and team.units == "mm" and team.world_up == (0.0, 0.0, 1.0)
    assert_same_cameras(dannce, team)


def test_dannce_needs_the_image_size(rig):
    expect_error(rig / "label3d_dannce.mat", "does not store the image size", "image_size")


# ---- round trips ----------------------------------------------------------------------------------

WRITERS = {
    "dannce": (save_dannce_mat, "label3d_dannce.mat"),
    "anipose": (save_anipose_toml, "calibration.toml"),
    "opencv": (save_opencv_yaml, "calibration"),
    "mouserecon": (save_mouserecon_json, "opencv_cameras.json"),
}


@pytest.mark.parametrize("format", WRITERS)
def test_round_trip(format, dannce, labels, tmp_path):
    save, name = WRITERS[format]
    calibration = dannce if format == "dannce" else replace(dannce, world_up=(0.0, 0.0, 1.0))
    save(tmp_path / name, calibration)
    assert find_calibration(tmp_path) == tmp_path / name
    back = load_calibration(tmp_path / name, image_size=SIZE)
    assert (back.format, back.units, back.world_up) == (format, "mm", calibration.world_up)
    assert_same_cameras(back, dannce)
    assert reprojection_error(back, labels) < 1e-3


def test_dannce_writer_keeps_the_real_layout(dannce, rig, tmp_path):
    """The written .mat has the real file's layout and, field by field, its numbers."""
    save_dannce_mat(tmp_path / "label3d_dannce.mat", dannce)
    real = scipy.io.loadmat(rig / "label3d_dannce.mat")
    ours = scipy.io.loadmat(tmp_path / "label3d_dannce.mat")
    assert ours["params"].shape == real["params"].shape == (6, 1)
    assert ours["camnames"].shape == real["camnames"].shape == (1, 6)
    for i in range(6):
        assert ours["camnames"][0, i].tolist() == real["camnames"][0, i].tolist()
        a, b = ours["params"][i, 0], real["params"][i, 0]
        assert a.shape == b.shape == (1, 1) and set(a.dtype.names) == set(b.dtype.names)
        for key in b.dtype.names:
            np.testing.assert_allclose(a[key][0, 0], b[key][0, 0], rtol=1e-12, atol=1e-9, err_msg=key)


def test_opencv_yaml_is_opencvs(dannce, tmp_path):
    """OpenCV itself reads the YAML we write: camera matrix with the principal point at pixel centres."""
    save_opencv_yaml(tmp_path, dannce)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"Camera{i}.yaml" for i in range(1, 7)]
    storage = cv2.FileStorage(str(tmp_path / "Camera2.yaml"), cv2.FILE_STORAGE_READ)
    camera = dannce.cameras[1]
    np.testing.assert_array_equal(storage.getNode("camera_matrix").mat()[:2, 2], camera.K[:2, 2] - 0.5)
    np.testing.assert_array_equal(storage.getNode("T").mat().ravel(), camera.t)
    assert storage.getNode("image_width").real() == SIZE[0]
    storage.release()


@pytest.mark.parametrize("suffix", [".json", ".xml"])
def test_opencv_filestorage_json_and_xml(dannce, tmp_path, suffix):
    """A camera written by cv2.FileStorage as JSON or XML with the other key names (K, D of 8, rvec, tvec,
    image_size) reads back as the same camera."""
    camera = dannce.cameras[3]
    storage = cv2.FileStorage(f"cam{suffix}", cv2.FILE_STORAGE_WRITE | cv2.FILE_STORAGE_MEMORY)
    storage.write("camera_name", "side")
    storage.write("image_size", np.array([camera.width, camera.height]))
    K = camera.K.copy()
    K[:2, 2] -= 0.5
    storage.write("K", K)
    storage.write("D", np.concatenate([camera.dist, np.zeros(3)]).reshape(8, 1))
    storage.write("rvec", cv2.Rodrigues(camera.R)[0])
    storage.write("tvec", camera.t.reshape(1, 3))
    (tmp_path / f"side{suffix}").write_text(storage.releaseAndGetString())
    back = load_calibration(tmp_path / f"side{suffix}")
    assert back.format == "opencv" and back.names == ["side"] and back.units is None
    assert_same_cameras(back, Calibration(Path("x"), "dannce", (replace(camera, name="side"),)))
    assert any("skew" in note for note in back.notes)  # OpenCV would ignore our skew; recorded


ANIPOSE = """\
[cam_0]
name = "A"
size = [640, 480]
matrix = [[800.0, 0.0, 319.5], [0.0, 810.0, 239.5], [0.0, 0.0, 1.0]]
distortions = [-0.2, 0.05, 0.001, -0.002, 0.01]
rotation = [0.1, -0.2, 0.05]
translation = [10.0, -5.0, 500.0]

[cam_1]
name = "B"
size = [640, 480]
matrix = [[820.0, 0.0, 330.0], [0.0, 815.0, 250.0], [0.0, 0.0, 1.0]]
distortions = [0.1, -0.03, 0.0, 0.0, 0.0]
rotation = [0.0, 1.5707963267948966, 0.0]
translation = [0.0, 0.0, 400.0]

[metadata]
adjusted = true
error = 0.4
"""


def test_anipose_by_hand(tmp_path):
    """A hand-written Anipose file: OpenCV's projectPoints (pixel centres) + 0.5 is our projection."""
    path = tmp_path / "calibration.toml"
    path.write_text(ANIPOSE)
    calibration = load_calibration(path)
    assert calibration.format == "anipose" and calibration.names == ["A", "B"] and calibration.units is None
    a, b = calibration.cameras
    assert (a.width, a.height) == (640, 480) and a.K[0, 2] == 320.0 and a.K[1, 2] == 240.0
    np.testing.assert_allclose(b.R, [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], atol=1e-15)  # 90 degrees about y
    np.testing.assert_array_equal(a.dist, [-0.2, 0.05, 0.001, -0.002, 0.01])
    points = np.array([[20.0, 30.0, 40.0], [-60.0, 25.0, -10.0], [80.0, -70.0, 5.0]])
    for camera, section in zip(calibration.cameras, ("cam_0", "cam_1")):
        table = tomllib.loads(ANIPOSE)[section]
        expected, _ = cv2.projectPoints(points, np.array(table["rotation"]), np.array(table["translation"]),
                                        np.array(table["matrix"]), np.array(table["distortions"]))
        projected, depth = camera.project(points)
        assert (depth > 0).all()
        np.testing.assert_allclose(projected, expected.reshape(-1, 2) + 0.5, rtol=0, atol=1e-9)


# ---- undistortion ---------------------------------------------------------------------------------


def bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """image [H, W] sampled at xy [N, 2] (OpenCV pixel-centre coordinates), float64 bilinear."""
    x0, y0 = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
    fx, fy = xy[:, 0] - x0, xy[:, 1] - y0
    image = image.astype(np.float64)
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def test_undistort_maps_send_pinhole_pixels_to_distorted_ones(dannce):
    rng = np.random.default_rng(0)
    for camera in dannce.cameras:
        map_x, map_y = undistort_maps(camera)
        assert map_x.shape == map_y.shape == (camera.height, camera.width) and map_x.dtype == np.float32
        points, _ = points_in_view(camera, 500, rng)
        pinhole, _ = camera.pinhole().project(points)
        distorted, _ = camera.project(points)
        source = np.stack([bilinear(map_x, pinhole - 0.5), bilinear(map_y, pinhole - 0.5)], -1)
        assert np.abs(source - (distorted - 0.5)).max() < 0.01


def test_undistort_maps_equal_the_forward_model_at_every_pixel(dannce):
    """The maps (cv2.initUndistortRectifyMap plus our skew term) equal the distortion model of
    LensCamera.distort / to_pixels evaluated at every pinhole pixel centre, skew included."""
    for camera in dannce.cameras:
        target = camera.pinhole()
        u, v = np.meshgrid(np.arange(camera.width) + 0.5, np.arange(camera.height) + 0.5)
        xy = np.stack([(u - target.K[0, 2]) / target.K[0, 0], (v - target.K[1, 2]) / target.K[1, 1]], -1)
        expected = camera.to_pixels(camera.distort(xy)) - 0.5
        map_x, map_y = undistort_maps(camera)
        assert np.abs(map_x - expected[..., 0]).max() < 0.01
        assert np.abs(map_y - expected[..., 1]).max() < 0.01


def test_resample_maps_to_a_turned_crop_camera(dannce):
    """A pinhole camera turned about the lens camera's centre, with its own size and focal length (a
    perspective crop): the map sends the crop's projection of a 3D point to the raw distorted one."""
    rng = np.random.default_rng(2)
    camera = dannce.cameras[4]
    points, _ = points_in_view(camera, 3000, rng)
    c2w = camera.c2w()
    angle = np.deg2rad(8.0)
    turn = np.array([[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]])
    rotation = c2w[:3, :3] @ turn  # camera-to-world of the crop: turned 8 deg about the camera's y axis
    K = np.array([[2500.0, 0.0, 192.0], [0.0, 2500.0, 192.0], [0.0, 0.0, 1.0]])
    crop = LensCamera("crop", 384, 384, K, np.zeros(5), rotation.T, -rotation.T @ c2w[:3, 3])
    in_crop, _ = crop.project(points)
    inside = (in_crop > 1).all(-1) & (in_crop < 383).all(-1)
    assert inside.sum() > 50
    map_x, map_y = resample_maps(camera, crop)
    source = np.stack([bilinear(map_x, in_crop[inside] - 0.5), bilinear(map_y, in_crop[inside] - 0.5)], -1)
    distorted, _ = camera.project(points[inside])
    assert np.abs(source - (distorted - 0.5)).max() < 0.01


def test_undistort_points_inverts_project(dannce):
    rng = np.random.default_rng(1)
    for camera in dannce.cameras:
        points, _ = points_in_view(camera, 1000, rng, margin=0.0)
        in_camera = points @ camera.R.T + camera.t
        pixels, _ = camera.project(points)
        xy = camera.undistort_points(pixels)
        assert np.abs(xy - in_camera[:, :2] / in_camera[:, 2:]).max() < 1e-8


# ---- bad files ------------------------------------------------------------------------------------

TOML_DEFECTS = {  # name: (replace this, with this, fragments the message must hold)
    "not orthonormal": ("rotation = [0.1, -0.2, 0.05]",
                        "rotation = [[1.0, 0.0, 0.0], [0.0, 1.1, 0.0], [0.0, 0.0, 1.0]]",
                        ("[cam_0]", "'A'", "not orthonormal", "|R R^T - I| = 2.10e-01")),
    "reflection": ("rotation = [0.1, -0.2, 0.05]", "rotation = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]",
                   ("[cam_0]", "det -1.000")),
    "missing keys": ('matrix = [[820.0, 0.0, 330.0], [0.0, 815.0, 250.0], [0.0, 0.0, 1.0]]\n'
                     'distortions = [0.1, -0.03, 0.0, 0.0, 0.0]\nrotation = [0.0, 1.5707963267948966, 0.0]\n'
                     'translation = [0.0, 0.0, 400.0]\n', 'rotation = [0.0, 1.5707963267948966, 0.0]\n',
                     ("[cam_1]", "is missing ['matrix', 'distortions', 'translation']")),
    "syntax": ('name = "B"', 'name = "B', ("not valid TOML", "line 10")),
    "matrix shape": ("[0.0, 810.0, 239.5], [0.0, 0.0, 1.0]]", "[0.0, 810.0, 239.5]]",
                     ("[cam_0]", "'matrix' has shape 2x3, expected 3x3")),
    "translation shape": ("[0.0, 0.0, 400.0]", "[0.0, 400.0]", ("[cam_1]", "'translation' has shape 2")),
    "duplicate names": ('name = "B"', 'name = "A"', ("[cam_0]", "[cam_1]", "same camera name 'A'")),
    "rational model": ("[0.1, -0.03, 0.0, 0.0, 0.0]", "[0.1, -0.03, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0]",
                       ("[cam_1]", "'distortions'", "rational")),
    "non-finite": ("[10.0, -5.0, 500.0]", "[10.0, nan, 500.0]", ("[cam_0]", "'translation'", "non-finite")),
    "focal length": ("[[820.0, 0.0, 330.0]", "[[-820.0, 0.0, 330.0]", ("[cam_1]", "focal lengths must be positive")),
    "principal point": ("330.0], [0.0, 815.0, 250.0]", "330.0], [0.0, 815.0, 2500.0]",
                        ("[cam_1]", "principal point", "outside the 640x480 image")),
    "image size": ("size = [640, 480]\nmatrix = [[820.0", "size = [640, 0]\nmatrix = [[820.0",
                   ("[cam_1]", "'size' must be two positive integers")),
    "fisheye": ('name = "B"', 'name = "B"\nfisheye = true', ("[cam_1]", "fisheye")),
}


@pytest.mark.parametrize("defect", TOML_DEFECTS)
def test_bad_anipose(defect, tmp_path):
    old, new, fragments = TOML_DEFECTS[defect]
    assert old in ANIPOSE
    path = tmp_path / "calibration.toml"
    path.write_text(ANIPOSE.replace(old, new, 1))
    expect_error(path, *fragments)


def test_bad_mouserecon_json(rig, tmp_path):
    data = json.loads((rig / "opencv_cameras_native_1152x1024.json").read_text())
    path = tmp_path / "opencv_cameras.json"
    bent = json.loads(json.dumps(data))
    bent["frames"][2]["w2c"][0][0] *= 1.01
    path.write_text(json.dumps(bent))
    expect_error(path, "frame 2 (camera 'Camera3')", "not orthonormal")
    short = json.loads(json.dumps(data))
    short["frames"][1]["w2c"] = [row[:3] for row in short["frames"][1]["w2c"][:3]]
    path.write_text(json.dumps(short))
    expect_error(path, "frame 1 (camera 'Camera2')", "'w2c' has shape 3x3, expected 4x4 or 3x4")
    del short["frames"][1]["fx"], short["frames"][1]["w"]
    path.write_text(json.dumps(short))
    expect_error(path, "frame 1", "missing ['w', 'fx']")
    path.write_text(json.dumps(data)[:-20])
    expect_error(path, "not valid JSON")


OPENCV_YAML = """\
%YAML:1.0
---
name: A
image_width: 640
image_height: 480
camera_matrix: !!opencv-matrix
   rows: 3
   cols: 3
   dt: d
   data: [ 800., 0., 319.5, 0., 810., 239.5, 0., 0., 1. ]
distortion_coefficients: !!opencv-matrix
   rows: 1
   cols: 5
   dt: d
   data: [ -0.2, 0.05, 0.001, -0.002, 0.01 ]
rvec: [ 0.1, -0.2, 0.05 ]
tvec: [ 10., -5., 500. ]
"""


def test_opencv_yaml_by_hand(tmp_path):
    """A hand-written OpenCV YAML camera is the Anipose file's cam_0 (same numbers, same conventions)."""
    (tmp_path / "A.yaml").write_text(OPENCV_YAML)
    (tmp_path / "calibration.toml").write_text(ANIPOSE)
    yaml = load_calibration(tmp_path / "A.yaml")
    assert yaml.format == "opencv" and yaml.names == ["A"]
    anipose = load_calibration(tmp_path / "calibration.toml")
    assert_same_cameras(yaml, replace(anipose, cameras=anipose.cameras[:1]), rtol=1e-15)


OPENCV_DEFECTS = {  # name: (replace this, with this, fragments the message must hold)
    "matrix shape": ("rows: 3\n   cols: 3\n   dt: d\n   data: [ 800., 0., 319.5, 0., 810., 239.5, 0., 0., 1. ]",
                     "rows: 2\n   cols: 3\n   dt: d\n   data: [ 800., 0., 319.5, 0., 810., 239.5 ]",
                     ("camera 'A'", "'camera_matrix' has shape 2x3, expected 3x3")),
    "matrix data": ("rows: 3\n   cols: 3", "rows: 2\n   cols: 3",
                    ("camera 'A'", "'camera_matrix' is not a valid OpenCV matrix")),
    "two distortions": ("rvec:", "D: [ 0.1, 0.2, 0.0, 0.0 ]\nrvec:",
                        ("camera 'A'", "more than one distortion", "'distortion_coefficients', 'D'")),
    "no translation": ("tvec:", "position:", ("camera 'A'", "no translation", "'tvec'")),
    "no height": ("image_height: 480\n", "", ("camera 'A'", "missing ['image_height']")),
    "rational": ("cols: 5\n   dt: d\n   data: [ -0.2, 0.05, 0.001, -0.002, 0.01 ]",
                 "cols: 8\n   dt: d\n   data: [ -0.2, 0.05, 0.001, -0.002, 0.01, 0.3, 0., 0. ]",
                 ("'distortion_coefficients'", "rational (k4-k6)", "not supported")),
    "distortion length": ("cols: 5\n   dt: d\n   data: [ -0.2, 0.05, 0.001, -0.002, 0.01 ]",
                          "cols: 3\n   dt: d\n   data: [ -0.2, 0.05, 0.001 ]",
                          ("'distortion_coefficients' has shape 1x3, expected 4 or 5 or 8",)),
    "syntax": ("name: A", "name: [A", ("not a readable OpenCV YAML/XML file",)),
    "not orthonormal": ("rvec: [ 0.1, -0.2, 0.05 ]", "R: [ [ 1., 0., 0. ], [ 0., 1., 0. ], [ 0., 0.5, 1. ] ]",
                        ("camera 'A'", "not orthonormal")),
}


@pytest.mark.parametrize("defect", OPENCV_DEFECTS)
def test_bad_opencv_yaml(defect, tmp_path):
    old, new, fragments = OPENCV_DEFECTS[defect]
    assert old in OPENCV_YAML
    path = tmp_path / "A.yaml"
    path.write_text(OPENCV_YAML.replace(old, new, 1))
    expect_error(path, *fragments)


def test_bad_opencv_folder(tmp_path):
    for name in ("A.yaml", "B.yaml"):  # both files name their camera A
        (tmp_path / name).write_text(OPENCV_YAML)
    expect_error(tmp_path, "camera 'A' (A.yaml) and camera 'A' (B.yaml) have the same camera name 'A'")
    (tmp_path / "B.yaml").write_text(OPENCV_YAML.replace("name: A", "name: B\nunits: m"))
    (tmp_path / "A.yaml").write_text(OPENCV_YAML.replace("name: A", "name: A\nunits: mm"))
    expect_error(tmp_path, "disagree on units")
    (tmp_path / "A.yaml").write_text(OPENCV_YAML.replace("image_width: 640\nimage_height: 480\n", ""))
    expect_error(tmp_path / "A.yaml", "has no image size", "image_size")
    assert load_calibration(tmp_path / "A.yaml", image_size=(640, 480)).cameras[0].width == 640


def test_bad_mat_files(dannce, rig, tmp_path):
    real = (rig / "label3d_dannce.mat").read_bytes()
    path = tmp_path / "label3d_dannce.mat"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(path, "not a readable MATLAB .mat file", image_size=SIZE)
    path.write_bytes(real[: len(real) // 2])
    expect_error(path, "not a readable MATLAB .mat file, corrupt or truncated", image_size=SIZE)
    path.write_bytes(real[:100])
    expect_error(path, "corrupt or truncated", image_size=SIZE)
    scipy.io.savemat(path, {"camnames": np.array([["Camera1"]], dtype=object)})
    expect_error(path, "no params variable", "['camnames']", image_size=SIZE)

    def write(**changes):
        save_dannce_mat(path, dannce)
        mat = scipy.io.loadmat(path)
        for key, value in changes.items():
            mat["params"][1, 0][key][0, 0] = value
        scipy.io.savemat(path, {"params": mat["params"], "camnames": mat["camnames"]})

    write(K=np.ones((2, 3)))
    expect_error(path, "camera 'Camera2' (params{2})", "'K' has shape 2x3, expected 3x3", image_size=SIZE)
    write(K=dannce.cameras[1].K)  # not transposed
    expect_error(path, "camera 'Camera2' (params{2})", "transposed layout", image_size=SIZE)
    write(r=2 * dannce.cameras[1].R.T)
    expect_error(path, "camera 'Camera2' (params{2})", "rotation is not orthonormal", image_size=SIZE)
    write(RDistort=np.zeros((1, 4)))
    expect_error(path, "'RDistort' has shape 1x4, expected 2 or 3", image_size=SIZE)


def test_find_calibration(dannce, tmp_path):
    assert find_calibration(tmp_path) is None
    save_anipose_toml(tmp_path / "calibration.toml", dannce)
    assert find_calibration(tmp_path) == tmp_path / "calibration.toml"
    save_mouserecon_json(tmp_path / "opencv_cameras.json", dannce)
    with pytest.raises(CalibrationError) as info:
        find_calibration(tmp_path)
    assert str(tmp_path) in str(info.value) and "calibration.toml, opencv_cameras.json" in str(info.value)


def test_writers_refuse_bad_calibrations(dannce, tmp_path):
    twins = replace(dannce, cameras=(dannce.cameras[0], dannce.cameras[0]))
    with pytest.raises(CalibrationError, match="same camera name 'Camera1'"):
        save_anipose_toml(tmp_path / "calibration.toml", twins)
    with pytest.raises(CalibrationError, match="in mm"):
        save_dannce_mat(tmp_path / "label3d_dannce.mat", replace(dannce, units="m"))
    (tmp_path / "cams").mkdir()
    (tmp_path / "cams" / "old.yaml").write_text("%YAML:1.0\n")
    with pytest.raises(CalibrationError, match="other per-camera files"):
        save_opencv_yaml(tmp_path / "cams", dannce)
    assert not list(tmp_path.glob("*.toml")) and not list(tmp_path.glob("*.mat"))
