"""Synthetic mouse: SDF primitives vs closed forms, the sphere tracer vs analytic projections,
rig statistics vs the stated ranges (recomputed from the camera matrices), sample files, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mouserecon.cameras import Cameras, load_opencv_cameras, optical_axes_intersection, validate_cameras
from mouserecon.cli import main
from mouserecon.normalize import Similarity
from mouserecon.synth import generate_sample
from mouserecon.synth.generate import mouse_center
from mouserecon.synth.mouse import build_mouse, sample_params
from mouserecon.synth.rig import look_at, sample_rig
from mouserecon.synth.sdf import Part, Shape, sd_capsule, sd_ellipsoid, smooth_min_lse, smooth_min_poly
from mouserecon.synth.trace import Light, TraceConfig, render_rgba

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo_mouse"


def _random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


# ---- primitives -----------------------------------------------------------------------------------


def test_sphere_and_ellipsoid_distances_closed_form():
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(500, 3, generator=gen, dtype=torch.float64) * 5
    center, radius = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64), 2.5
    sphere = sd_ellipsoid(points, center, _random_rotation(gen)[None], torch.full((1, 3), radius, dtype=torch.float64))
    torch.testing.assert_close(sphere[:, 0], (points - center).norm(dim=-1) - radius)

    rot, radii = _random_rotation(gen), torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    for axis in range(3):  # outside, along each principal axis, the distance is exact: |t| - r_axis
        t = torch.cat([torch.linspace(-9, -radii[axis].item(), 20), torch.linspace(radii[axis].item(), 9, 20)]).double()
        on_axis = center + t[:, None] * rot[:, axis][None]
        d = sd_ellipsoid(on_axis, center, rot[None], radii[None])[:, 0]
        torch.testing.assert_close(d, t.abs() - radii[axis])
    at_center = sd_ellipsoid(center, center, rot[None], radii[None])
    torch.testing.assert_close(at_center, torch.tensor([[-1.0]], dtype=torch.float64))
    # Sign agrees with the implicit function |R^T (p - c) / r| < 1 everywhere.
    local = (points - center) @ rot / radii
    d = sd_ellipsoid(points, center, rot[None], radii[None])[:, 0]
    assert torch.equal(d < 0, local.norm(dim=-1) < 1)


def test_capsule_distance_matches_dense_segment():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([[3.0, 1.0, -2.0]], dtype=torch.float64)
    points = torch.randn(400, 3, generator=gen, dtype=torch.float64) * 4
    segment = a + torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None] * (b - a)  # [S, 3]
    reference = torch.cdist(points, segment).min(dim=1).values - 0.7
    r = torch.tensor([0.7], dtype=torch.float64)
    torch.testing.assert_close(sd_capsule(points, a, b, r, r)[:, 0], reference, atol=1e-4, rtol=0)
    # Tapered: beside the midpoint the radius is the mean of the end radii.
    normal = torch.linalg.cross(b - a, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))
    probe = 0.5 * (a + b) + 5.0 * normal / normal.norm()
    d = sd_capsule(probe, a, b, torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(d[0, 0], torch.tensor(5.0 - 1.5, dtype=torch.float64))


def test_smooth_unions_bound_the_hard_union():
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(1000, 5, generator=gen) * 3
    hard = d.min(-1).values
    lse = smooth_min_lse(d, 0.5)
    assert (lse <= hard + 1e-6).all() and (lse >= hard - 0.5 * math.log(5) - 1e-6).all()
    poly = smooth_min_poly(d[:, 0], d[:, 1], 0.8)
    pair = torch.minimum(d[:, 0], d[:, 1])
    assert (poly <= pair + 1e-6).all() and (poly >= pair - 0.8 / 4 - 1e-6).all()
    far = (d[:, 0] - d[:, 1]).abs() > 0.8  # beyond the blend radius the union is exact
    torch.testing.assert_close(poly[far], pair[far])


# ---- sphere tracer --------------------------------------------------------------------------------


def _sphere_scene(center, radius) -> Shape:
    part = Part(name="sphere", k_inner=0.0, k_join=0.0, centers=torch.tensor([center]), rotations=torch.eye(3)[None],
                radii=torch.full((1, 3), radius), dorsal=torch.full((1, 3), 0.6), ventral=torch.full((1, 3), 0.6),
                up=torch.tensor([[0.0, 0.0, 1.0]]), specular=torch.zeros(1))
    return Shape(parts=(part,), colour_blend=0.1)


def _analytic_coverage(cameras: Cameras, center, radius, n_sub: int = 8) -> torch.Tensor:
    """Fraction [V, H, W] of n_sub^2 sub-pixel rays whose angle to the centre is below asin(r / D)."""
    fine = cameras.resize(cameras.height * n_sub, cameras.width * n_sub)
    origins, dirs = fine.rays()
    to_center = torch.tensor(center) - origins
    cos = (dirs * to_center).sum(-1) / to_center.norm(dim=-1)
    inside = (cos > torch.cos(torch.asin(radius / to_center.norm(dim=-1)))).float()
    v, h, w = len(cameras), cameras.height, cameras.width
    return inside.reshape(v, h, n_sub, w, n_sub).mean(dim=(2, 4))


def test_sphere_silhouette_matches_analytic_projection():
    center, radius, size = (3.0, -2.0, 1.0), 1.2, 64
    eye_on, eye_off = np.array([3.0, -12.0, 1.0]), np.array([12.0, -6.0, 4.0])
    c2w = [look_at(eye_on, np.array(center)), look_at(eye_off, np.array(center) + np.array([0.0, 1.5, 0.6]))]
    fx = 70.0
    cameras = Cameras(torch.tensor(np.array(c2w), dtype=torch.float32),
                      torch.tensor([[fx, fx, 31.0, 33.5], [fx, fx * 1.01, 30.0, 30.0]]), size, size)
    light = Light(direction=(0.0, -1.0, 0.0), key=(0.8, 0.8, 0.8), ambient=(0.2, 0.2, 0.2), shadow=0.0)
    rgba = render_rgba(_sphere_scene(center, radius), cameras, light, TraceConfig(supersample=4))
    alpha = rgba[..., 3]
    assert rgba.shape == (2, size, size, 4) and alpha.min() >= 0 and alpha.max() <= 1
    assert ((alpha > 0) & (alpha < 1)).any(), "silhouette edges must be anti-aliased"
    reference = _analytic_coverage(cameras, center, radius)
    for v in range(2):
        area, ref_area = alpha[v].sum().item(), reference[v].sum().item()
        assert abs(area - ref_area) < 0.015 * ref_area, (v, area, ref_area)
        assert (alpha[v] - reference[v]).abs().mean() < 0.01
        grid_y, grid_x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        centroid = torch.stack([(alpha[v] * grid_x).sum(), (alpha[v] * grid_y).sum()]) / alpha[v].sum()
        ref_centroid = torch.stack([(reference[v] * grid_x).sum(), (reference[v] * grid_y).sum()]) / reference[v].sum()
        assert (centroid - ref_centroid).norm() < 0.05
        background = reference[v] == 0
        assert (alpha[v][background] == 0).all() and (rgba[v][background][:, :3] == 1).all()
    # On-axis view: a circle of radius f tan(asin(r / D)) centred on the projected centre.
    uv, _ = cameras[:1].project(torch.tensor([[center]]))
    distance = float(np.linalg.norm(eye_on - np.array(center)))
    assert abs(alpha[0].sum().item() - math.pi * (fx * math.tan(math.asin(radius / distance))) ** 2) < 0.015 * alpha[0].sum()
    grid_y, grid_x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centroid = torch.stack([(alpha[0] * grid_x).sum(), (alpha[0] * grid_y).sum()]) / alpha[0].sum()
    assert (centroid - uv[0, 0]).norm() < 0.05
    # Lambert + ambient at the pixel facing the camera, lit from the camera (normal = light, n_z = 0).
    px = uv[0, 0].floor().long()
    expected = (0.6 ** 2.2 * (0.2 * 0.75 + 0.8)) ** (1 / 2.2)
    torch.testing.assert_close(rgba[0, px[1], px[0], :3], torch.full((3,), expected), atol=0.01, rtol=0)


# ---- the mouse and the rig ------------------------------------------------------------------------


def test_mouse_stands_on_the_ground_and_has_its_parts():
    for seed in range(3):
        params = sample_params(np.random.default_rng(seed))
        shape = build_mouse(params)
        assert [p.name for p in shape.parts] == ["torso", "limbs", "tail", "ears", "eyes"]
        assert shape.parts[1].a.shape[0] == 12 and shape.parts[3].centers.shape[0] == 2
        box = shape.bounds()
        xy = torch.cartesian_prod(torch.linspace(box[0, 0].item(), box[1, 0].item(), 300),
                                  torch.linspace(box[0, 1].item(), box[1, 1].item(), 300))  # [N, 2]
        plane = lambda z: shape.distance(torch.cat([xy, torch.full_like(xy[:, :1], z)], 1))
        scale = params.body_length_mm / 87.0
        assert plane(-0.15 * scale).min() > 0, "the mouse sinks below z = 0"
        assert plane(0.3 * scale).min() < 0, "the mouse floats above the ground"
        # The tail reaches far from the torso: the whole shape is longer than the body alone.
        axes = [torch.linspace(box[0, i].item(), box[1, i].item(), n) for i, n in enumerate((50, 50, 25))]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        inside = grid[shape.distance(grid) < 0]
        extent = (inside[:, :2].max(0).values - inside[:, :2].min(0).values).norm()
        assert extent > 0.9 * params.body_length_mm


def _elevation_azimuth(centers: np.ndarray, aim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rel = centers - aim
    dist = np.linalg.norm(rel, axis=1)
    return np.degrees(np.arcsin(rel[:, 2] / dist)), np.degrees(np.arctan2(rel[:, 1], rel[:, 0])) % 360, dist


def test_rig_statistics_within_the_real_rig_ranges():
    for seed in range(150):
        rng = np.random.default_rng(seed)
        aim = rng.uniform(-20, 20, size=3) + np.array([0.0, 0.0, 20.0])
        rig = sample_rig(rng, aim, 256, n_views=6, n_heldout=2)
        cams = rig.cameras
        validate_cameras(cams[:6], f"seed {seed}")
        c2w = cams.c2w.double().numpy()
        elevation, azimuth, dist = _elevation_azimuth(c2w[:6, :3, 3], aim)
        low = [k == "low" for k in rig.kind[:6]]
        assert sum(low) == 3 and rig.kind[6:] == ["heldout", "heldout"]
        assert all(low[i] != low[i + 1] for i in range(5)), "low and high cameras alternate around the ring"
        assert ((elevation[low] >= -1e-6) & (elevation[low] <= 5 + 1e-6)).all()
        high = ~np.array(low)
        assert ((elevation[high] >= 15 - 1e-6) & (elevation[high] <= 24 + 1e-6)).all()
        ring = np.sort(azimuth)
        gaps = np.diff(np.append(ring, ring[0] + 360))
        assert ((gaps > 50 - 1e-6) & (gaps < 70 + 1e-6)).all(), gaps
        assert ((dist >= 300 - 1e-3) & (dist <= 330 + 1e-3)).all()
        fx = cams.intrinsics[:, 0].double().numpy()
        hfov = np.degrees(2 * np.arctan(128 / fx))
        assert ((hfov > 35 - 1e-3) & (hfov < 42 + 1e-3)).all()
        # Roll: the image x axis stays within 2 deg of the horizontal plane.
        assert (np.abs(c2w[:, 2, 0]) <= math.sin(math.radians(2.0)) + 1e-6).all()
        # Every camera looks near the aim point: the optical axes meet within a few mm of it.
        meet = optical_axes_intersection(cams.c2w[:6]).numpy()
        assert np.linalg.norm(meet - aim) < 12.0
    # Not a uniform ring: the gaps vary from rig to rig.
    assert np.ptp(gaps) > 1.0


def test_mouse_projects_inside_every_image():
    for seed in range(6):
        rng = np.random.default_rng(seed)
        shape = build_mouse(sample_params(rng))
        center = mouse_center(shape)
        rig = sample_rig(rng, center + rng.uniform(-5, 5, size=3), 256, n_heldout=1)
        corners = torch.cartesian_prod(*shape.parts[0].bounds().T)  # torso box corners [8, 3]
        points = torch.cat([torch.tensor(center, dtype=torch.float32)[None], corners])
        uv, depth = rig.cameras.project(points[None].expand(len(rig.cameras), -1, -1))
        assert (depth > 200).all()
        assert ((uv > 0) & (uv < 256)).all(), f"seed {seed}: mouse leaves the image"


# ---- samples on disk ------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generate_sample_is_deterministic_and_loads_back(tmp_path):
    a = generate_sample(7, tmp_path / "a", resolution=40, n_heldout=1)
    b = generate_sample(7, tmp_path / "b", resolution=40, n_heldout=1)
    c = generate_sample(8, tmp_path / "c", resolution=40, n_heldout=1)
    assert _files(a) == _files(b)
    assert _files(a)["images/cam_000.png"] != _files(c)["images/cam_000.png"]
    cameras, files = load_opencv_cameras(a / "opencv_cameras.json")
    assert len(cameras) == 7 and files == [f"images/cam_{i:03d}.png" for i in range(7)]
    record = json.loads((a / "synth.json").read_text())
    assert record["seed"] == 7 and record["rig_views"] == list(range(6)) and record["heldout_views"] == [6]
    for name in files:
        image = iio.imread(a / name)
        assert image.shape == (cameras.height, cameras.width, 4) and image.dtype == np.uint8
        alpha = image[..., 3]
        assert (alpha == 255).any() and (alpha == 0).any()
        assert (image[alpha == 0][:, :3] == 255).all(), "background is white"
    distances = (cameras.centers.double() - torch.tensor(record["rig"]["aim_point_mm"], dtype=torch.float64)).norm(dim=-1)
    assert ((distances > 300 - 1e-3) & (distances < 330 + 1e-3)).all(), "units are millimetres"


def test_wide_variety_draws_from_its_wider_ranges_and_keeps_the_rig_variety(tmp_path):
    from mouserecon.synth.generate import WIDE_RIG

    rig = json.loads((generate_sample(7, tmp_path / "rig", resolution=24) / "synth.json").read_text())
    again = json.loads((generate_sample(7, tmp_path / "rig2", resolution=24, variety="rig") / "synth.json").read_text())
    assert rig == again and rig["variety"] == "rig"  # the default is the rig variety, seed for seed
    seen = {"distance": [], "hfov": [], "brightness": [], "tint": []}
    for seed in range(6):
        record = json.loads((generate_sample(seed, tmp_path / f"w{seed}", resolution=24, variety="wide")
                             / "synth.json").read_text())
        assert record["variety"] == "wide"
        seen["distance"] += record["rig"]["distance_mm"]
        seen["hfov"] += record["rig"]["hfov_deg"]
        seen["brightness"].append(record["mouse"]["brightness"])
        seen["tint"] += record["mouse"]["tint"]
    lo, hi = WIDE_RIG.distance_mm
    assert lo <= min(seen["distance"]) and max(seen["distance"]) <= hi
    assert min(seen["distance"]) < 300 or max(seen["distance"]) > 330  # beyond the real rig's 300-330 mm
    assert WIDE_RIG.hfov_deg[0] <= min(seen["hfov"]) and max(seen["hfov"]) <= WIDE_RIG.hfov_deg[1]
    assert min(seen["tint"]) < 0.96 or max(seen["tint"]) > 1.04  # beyond the rig variety's +-4 %
    with pytest.raises(ValueError, match="variety must be one of"):
        generate_sample(0, tmp_path / "bad", resolution=16, variety="cartoon")


def test_normalized_units_are_the_mm_rig_under_the_recorded_similarity(tmp_path):
    mm = generate_sample(3, tmp_path / "mm", resolution=32, n_heldout=1)
    norm = generate_sample(3, tmp_path / "norm", resolution=32, n_heldout=1, units="model")
    assert _files(mm)["images/cam_003.png"] == _files(norm)["images/cam_003.png"]
    cams_mm, _ = load_opencv_cameras(mm / "opencv_cameras.json")
    cams_norm, _ = load_opencv_cameras(norm / "opencv_cameras.json")
    meta = json.loads((norm / "opencv_cameras.json").read_text())
    assert meta["world_up"] == [0.0, 0.0, 1.0]
    similarity = Similarity.from_dict(meta["normalization"])
    # Independent check of the contract: axes meet at the origin, mean rig distance 2.7, +Z kept up.
    assert optical_axes_intersection(cams_norm.c2w[:6]).norm() < 1e-3
    assert abs(cams_norm.centers[:6].norm(dim=-1).mean().item() - 2.7) < 1e-4
    torch.testing.assert_close(similarity.rotation, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)
    back = similarity.inverse().apply_cameras(cams_norm)
    torch.testing.assert_close(back.c2w, cams_mm.c2w, atol=2e-3, rtol=1e-5)


def test_generate_sample_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="units"):
        generate_sample(0, tmp_path / "x", resolution=16, units="inch")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        generate_sample(0, tmp_path / "full", resolution=16)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_demo_sample_is_committed_with_six_256px_views():
    cameras, files = load_opencv_cameras(DEMO / "opencv_cameras.json")
    assert len(cameras) == 6 and cameras.width == cameras.height == 256
    assert json.loads((DEMO / "synth.json").read_text())["resolution"] == 256
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 500_000, f"demo sample is {total} bytes"
    for name in files:
        alpha = iio.imread(DEMO / name)[..., 3]
        assert alpha.shape == (256, 256) and (alpha > 0).sum() > 500, name
        border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
        assert (border == 0).all(), f"{name}: the mouse touches the image border"


def test_cli_synth_smoke(tmp_path):
    result = CliRunner().invoke(main, ["synth", "-o", str(tmp_path / "out"), "-n", "2", "--seed", "4",
                                       "--resolution", "24", "--num-heldout", "1", "--units", "model"])
    assert result.exit_code == 0, result.output
    for i in range(2):
        cameras, files = load_opencv_cameras(tmp_path / "out" / f"sample_{i:05d}" / "opencv_cameras.json")
        assert len(cameras) == 7 and cameras.width == 24
    assert json.loads((tmp_path / "out" / "sample_00001" / "synth.json").read_text())["seed"] == 5
