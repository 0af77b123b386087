"""Mesh mice (eval/mesh_mice.py, eval/mammal.py): the rasteriser against closed forms (a sphere's silhouette
area and nearest depth, a tilted plane's perspective depth, exact sample counts of triangles), skinning
against hand-computed poses, written samples against the projection of their mesh, and (when the
MAMMAL_mouse data is here) the real mesh fitted to the labelled frames."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mouserecon.cameras import Cameras, look_at
from mouserecon.data import load_sample
from mouserecon.eval import mammal
from mouserecon.eval import mesh_mice as mm
from mouserecon.normalize import Similarity
from mouserecon.synth.trace import Light

MAMMAL = Path(os.environ.get("MOUSERECON_MAMMAL", "/work/.mirror/anl13+MAMMAL_mouse/repo"))


def icosphere(level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit icosphere: vertices [N, 3] float64 on the sphere, faces [F, 3] (each face split in 4 per level)."""
    t = (1.0 + 5.0 ** 0.5) / 2.0
    verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
             (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11),
             (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = [np.array(v, float) / np.linalg.norm(v) for v in verts]
    for _ in range(level):
        middle: dict[tuple[int, int], int] = {}

        def mid(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in middle:
                p = verts[a] + verts[b]
                verts.append(p / np.linalg.norm(p))
                middle[key] = len(verts) - 1
            return middle[key]
        faces = [f for a, b, c in faces for f in
                 ((a, mid(a, b), mid(c, a)), (b, mid(b, c), mid(a, b)), (c, mid(c, a), mid(b, c)),
                  (mid(a, b), mid(b, c), mid(c, a)))]
    return torch.tensor(np.array(verts)), torch.tensor(faces)


def _pixels_to_camera(pixels: list[tuple[float, float]], z: float, f: float) -> torch.Tensor:
    """Camera points [P, 3] at depth z that project to the given pixel positions (fx = fy = f, cx = cy = 0)."""
    uv = torch.tensor(pixels, dtype=torch.float64)
    return torch.cat([uv / f * z, torch.full((len(pixels), 1), z, dtype=torch.float64)], 1)


# ---- rasteriser -------------------------------------------------------------------------------


def test_sphere_silhouette_area_and_nearest_depth_closed_form():
    # A sphere of radius r centred on the optical axis at depth z projects to a disc of area
    # pi f^2 r^2 / (z^2 - r^2) px. The level-5 icosphere's inscribed polyhedron loses < 0.1 % of that and
    # pixel-centre sampling of a disc of radius ~82 px adds ~0.1 %: we allow 0.5 %.
    sphere, faces = icosphere(5)
    # Turn it so that vertex 0 faces the camera: the centre pixel's ray then hits that vertex, at z - r.
    rot = torch.from_numpy(_rotation_taking(sphere[0].numpy(), np.array([0.0, 0.0, -1.0])))
    r, z, f, size = 2.0, 10.0, 400.0, 256
    points = sphere @ rot.T * r + torch.tensor([0.0, 0.0, z], dtype=torch.float64)
    centre = size // 2 + 0.5  # the principal point at the centre of pixel (128, 128) (pixel-edge convention)
    frag = mm.rasterize(points, faces, torch.tensor([f, f, centre, centre]), size, size)
    area = (frag.face >= 0).sum().item()
    expected = math.pi * f ** 2 * r ** 2 / (z ** 2 - r ** 2)
    assert abs(area / expected - 1.0) < 5e-3, (area, expected)
    assert frag.depth[size // 2, size // 2].item() == pytest.approx(z - r, abs=1e-9)
    assert ((frag.depth > 0) == (frag.face >= 0)).all()
    covered = frag.depth[frag.face >= 0]
    assert covered.min() >= z - r - 1e-9 and covered.max() <= z  # the near half only


def _rotation_taking(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A rotation matrix taking unit vector a to unit vector b (Rodrigues about a x b)."""
    v, c = np.cross(a, b), float(a @ b)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def test_tilted_plane_depth_and_barycentrics_are_perspective_correct():
    # Plane z = 4 + 0.5 x + 0.25 y (camera frame). The ray through pixel (u, v) with x_n = (u - cx) / f,
    # y_n = (v - cy) / f meets it at depth t = 4 / (1 - 0.5 x_n - 0.25 y_n), at the point t (x_n, y_n, 1).
    f, cx, cy, size = 100.0, 40.0, 30.0, 80
    corners = torch.tensor([[-1.5, -1.0], [1.5, -1.0], [1.5, 1.2], [-1.5, 1.2]], dtype=torch.float64)
    points = torch.cat([corners, (4 + 0.5 * corners[:, :1] + 0.25 * corners[:, 1:])], 1)  # [4, 3]
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    frag = mm.rasterize(points, faces, torch.tensor([f, f, cx, cy]), size, size)
    hit = frag.face >= 0
    assert hit.sum() > 0.3 * size * size
    rows, cols = torch.nonzero(hit, as_tuple=True)
    x_n, y_n = (cols.double() + 0.5 - cx) / f, (rows.double() + 0.5 - cy) / f
    depth = 4.0 / (1.0 - 0.5 * x_n - 0.25 * y_n)
    torch.testing.assert_close(frag.depth[hit], depth, rtol=1e-10, atol=1e-10)
    interpolated = (points[faces[frag.face[hit]]] * frag.bary[hit][:, :, None]).sum(1)  # [P, 3]
    torch.testing.assert_close(interpolated, torch.stack([depth * x_n, depth * y_n, depth], 1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("legs", [1, 7, 30])
@pytest.mark.parametrize("winding", [(0, 1, 2), (0, 2, 1)])
def test_single_triangle_covers_exactly_the_pixel_centres_inside(legs, winding):
    # Right triangle with corner (10.1, 5.1) and legs L along +x and +y: pixel (10 + a, 5 + b) has its centre
    # inside iff a, b >= 0 and (a + 0.4) + (b + 0.4) <= L, i.e. a + b <= L - 1: L (L + 1) / 2 pixels.
    f, z = 50.0, 3.0
    points = _pixels_to_camera([(10.1, 5.1), (10.1 + legs, 5.1), (10.1, 5.1 + legs)], z, f)
    frag = mm.rasterize(points, torch.tensor([winding]), torch.tensor([f, f, 0.0, 0.0]), 64, 64)
    rows, cols = torch.nonzero(frag.face >= 0, as_tuple=True)
    assert len(rows) == legs * (legs + 1) // 2
    a, b = cols - 10, rows - 5
    assert (a >= 0).all() and (b >= 0).all() and (a + b <= legs - 1).all()
    torch.testing.assert_close(frag.bary[rows, cols].sum(-1), torch.ones(len(rows), dtype=torch.float64))
    torch.testing.assert_close(frag.depth[rows, cols], torch.full((len(rows),), z, dtype=torch.float64))


def test_shared_edges_leave_no_gap_and_chunks_do_not_matter():
    # A square split along its diagonal, which passes exactly through pixel centres: every centre of the
    # 20 x 20 pixels inside is covered once (ties go to one face), in one chunk or in many.
    f, z = 50.0, 2.0
    points = _pixels_to_camera([(10.0, 10.0), (30.0, 10.0), (30.0, 30.0), (10.0, 30.0)], z, f)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    whole = mm.rasterize(points, faces, torch.tensor([f, f, 0.0, 0.0]), 48, 48)
    chunked = mm.rasterize(points, faces, torch.tensor([f, f, 0.0, 0.0]), 48, 48, chunk=7)
    assert (whole.face >= 0).sum() == 400 and (whole.face[10:30, 10:30] >= 0).all()
    assert torch.equal(whole.face, chunked.face) and torch.equal(whole.depth, chunked.depth)


def test_vertices_behind_the_camera_are_an_error():
    points = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, -0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not in front of the camera"):
        mm.rasterize(points, torch.tensor([[0, 1, 2]]), torch.tensor([10.0, 10.0, 5.0, 5.0]), 10, 10)


# ---- skinning ---------------------------------------------------------------------------------


def _chain() -> mammal.SkinnedMesh:
    """Joints root (0, 0, 0) -> elbow (1, 0, 0) -> wrist (2, 0, 0); vertices a = (2, 0, 0) on the elbow,
    b = (1.5, 0, 0) half root half elbow, c = (3, 0, 0) on the wrist."""
    vertices = torch.tensor([[2.0, 0, 0], [1.5, 0, 0], [3.0, 0, 0]], dtype=torch.float64)
    weights = torch.tensor([[0.0, 1, 0], [0.5, 0.5, 0], [0, 0, 1]], dtype=torch.float64)
    joints = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]], dtype=torch.float64)
    return mammal.SkinnedMesh(vertices, torch.tensor([[0, 1, 2]]), weights, joints, torch.tensor([-1, 0, 1]),
                          ("root", "elbow", "wrist"))


def test_skinning_a_90_degree_turn_by_hand():
    chain = _chain()
    rest = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    vertices, joints = mammal.skin(chain, rest)
    torch.testing.assert_close(vertices, chain.vertices)
    turn = rest.clone()
    turn[1] = mammal.euler(90.0, 0.0)  # the elbow turns +90 deg about +z: (x, y) -> (-y, x) about (1, 0)
    vertices, joints = mammal.skin(chain, turn)
    torch.testing.assert_close(vertices, torch.tensor([[1.0, 1, 0], [1.25, 0.25, 0], [1, 2, 0]], dtype=torch.float64))
    torch.testing.assert_close(joints, torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float64))
    # And the root too: everything turns once more about the origin; b blends the root's image of it, (0, 1.5),
    # with the elbow's, the turned (1, 0.5) = (-0.5, 1).
    turn[0] = mammal.euler(90.0, 0.0)
    vertices, joints = mammal.skin(chain, turn)
    torch.testing.assert_close(vertices, torch.tensor([[-1.0, 1, 0], [-0.25, 1.25, 0], [-2, 1, 0]],
                                                      dtype=torch.float64))
    torch.testing.assert_close(joints[2], torch.tensor([-1.0, 1, 0], dtype=torch.float64))


def test_rotation_conventions():
    # euler: yaw turns the snout (-y) to the mouse's left (+x); pitch raises it; axis_angle and rot_z agree.
    snout = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(mammal.euler(90.0, 0.0) @ snout, torch.tensor([1.0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(mammal.euler(0.0, 90.0) @ snout, torch.tensor([0.0, 0, 1], dtype=torch.float64))
    angle = torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(mammal.axis_angle(torch.tensor([0.0, 0.0, 0.7], dtype=torch.float64)),
                               mammal.rot_z(angle))
    random = mammal.axis_angle(torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    torch.testing.assert_close(random @ random.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    torch.testing.assert_close(torch.linalg.det(random), torch.ones(5, dtype=torch.float64))


def test_classify_by_the_rules():
    names = ["EarL", "EarR", "Snout", "SpineF", "SpineM", "Tail(base)", "Tail(mid)", "Tail(end)", "ForepawL",
             "WristL", "ElbowL", "ShoulderL", "ForepawR", "WristR", "ElbowR", "ShoulderR", "HindpawL", "AnkleL",
             "KneeL", "HindpawR", "AnkleR", "KneeR"]
    k = np.full((22, 3), 50.0)  # paws far from the snout unless set
    at = lambda name, xyz: k.__setitem__(names.index(name), xyz)
    for name, xyz in (("Tail(base)", (0, 0, 5)), ("SpineM", (30, 0, 20)), ("SpineF", (50, 0, 20)),
                      ("Snout", (75, 0, 10)), ("ForepawL", (60, 10, 1)), ("ForepawR", (60, -10, 1))):
        at(name, xyz)
    assert mammal.classify(k, names) == "walk"
    at("Snout", (50, 25, 10))  # the head turned 90 deg to the left
    assert mammal.classify(k, names) == "turn"
    at("ForepawR", (52, 20, 10))  # a forepaw at the snout
    assert mammal.classify(k, names) == "groom"
    at("Snout", (55, 0, 80))
    assert mammal.classify(k, names) == "rear"


# ---- samples ----------------------------------------------------------------------------------


def _toy_rig() -> mm.Rig:
    """Six 1152 x 1024 cameras (f = 1660 px) 300 mm around (0, 0, 20) mm, low and high in turn."""
    az = torch.deg2rad(torch.arange(6, dtype=torch.float64) * 60.0 + 10.0)
    el = torch.deg2rad(torch.tensor([2.0, 18.0] * 3, dtype=torch.float64))
    aim = torch.tensor([0.0, 0.0, 20.0], dtype=torch.float64)
    eyes = aim + 300.0 * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], 1)
    k = torch.tensor([1660.0, 1660.0, 576.0, 512.0], dtype=torch.float64)
    cameras = Cameras(look_at(eyes, aim.expand(6, 3)).float(), k.float().expand(6, 4).clone(), 1152, 1024)
    empty = np.zeros((0, 22, 3))
    return mm.Rig("real", cameras, Similarity.identity(), k, np.zeros((1, 3)), empty, np.zeros(0), [])


@pytest.mark.parametrize("crop", ["window", "perspective"])
def test_written_sample_loads_and_its_masks_match_the_mesh_projection(tmp_path, crop):
    sphere, faces = icosphere(3)
    vertices = sphere * torch.tensor([40.0, 15.0, 12.0], dtype=torch.float64) + torch.tensor([8.0, -6.0, 12.0])
    rig = _toy_rig()
    held = mm.heldout_cameras(np.random.default_rng(3), vertices.mean(0), rig)
    framed = mm.frame_views(vertices, Cameras.cat([rig.cameras, held]), crop, 64, 0.1)
    assert framed is not None
    cameras, windows = framed
    assert (windows is None) == (crop == "perspective")
    albedo = torch.full_like(vertices, 0.3)
    rgba, depth = mm.render_views(vertices, faces, albedo, torch.full((len(vertices),), 0.2, dtype=torch.float64),
                                  cameras, Light(shadow=0.0))
    folder = mm.write_sample(tmp_path / "sample", rgba, depth, cameras, {"crop": crop}, {"world_up": [0, 0, 1]})
    sample = load_sample(folder, depth=True)
    assert sample.num_views == 8 and sample.mask_source == "alpha"
    uv, z = sample.cameras.to(torch.float64).project(vertices[None].expand(8, -1, -1))  # [8, N, 2], [8, N]
    for v in range(8):
        rows, cols = torch.nonzero(sample.masks[v, 0] > 0, as_tuple=True)
        # Coverage is sampled 3 x 3 per pixel: the mask's box lies within a pixel of the vertices' box.
        box = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float64)
        expected = torch.cat([uv[v].amin(0), uv[v].amax(0)])
        assert (box - expected).abs().max() <= 1.0, (v, box, expected)
        on = sample.depths[v, 0] > 0
        assert on.any() and (sample.masks[v, 0][on] > 0).all()
        assert z[v].min() - 1e-3 <= sample.depths[v, 0][on].min() and sample.depths[v, 0][on].max() <= z[v].max()
    raw = iio.imread(folder / "images" / "cam_006.png")
    assert (raw[raw[..., 3] == 0][:, :3] == 255).all()


def test_facelift_similarity_is_fitted_exactly_or_refused():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 300.0
    origin, scale = torch.tensor([59.672, 51.517, 107.099], dtype=torch.float64), 2.7 / 307.785
    similarity = mm._fit_similarity(centres, (centres - origin) * scale, "test")
    assert similarity.scale == pytest.approx(scale, rel=1e-12)
    torch.testing.assert_close(similarity.translation, -origin * scale)
    moved = (centres - origin) * scale
    moved[2, 0] += 0.05
    with pytest.raises(mm.MeshMiceError, match="not a scaled, shifted copy"):
        mm._fit_similarity(centres, moved, "test")


def _fake_mammal(root: Path, faces: str = "0 1 2\n") -> Path:
    """A three-vertex, two-joint MAMMAL_mouse checkout layout."""
    txt = root / "mouse_model" / "mouse_txt"
    txt.mkdir(parents=True)
    (txt / "vertices.txt").write_text("0 0 0\n1 0 0\n0 1 0\n")
    (txt / "faces_vert.txt").write_text(faces)
    (txt / "skinning_weights.txt").write_text("0 0 1.0\n1 1 0.5\n0 1 0.5\n1 2 1.0\n")
    (txt / "t_pose_joints.txt").write_text("0 0 0\n1 0 0\n")
    (txt / "parents.txt").write_text("-1\n0\n")
    (txt / "joint_names.txt").write_text("root\nbone\n")
    mapper = [{"keypoint": k, "type": "J" if k % 2 else "V", "ids": [k % 2]} for k in range(22)]
    (root / "mouse_model" / "keypoint22_mapper.json").write_text(json.dumps({"mapper": mapper}))
    return root


def test_load_mammal_reads_a_checkout_and_names_a_bad_table(tmp_path):
    mesh = mammal.load_mammal(_fake_mammal(tmp_path / "good"))
    assert mesh.vertices.shape == (3, 3) and mesh.names == ("root", "bone") and len(mesh.keypoints) == 22
    torch.testing.assert_close(mesh.weights, torch.tensor([[1.0, 0], [0.5, 0.5], [0, 1]], dtype=torch.float64))
    with pytest.raises(mammal.MeshMiceError, match="faces_vert.txt indexes vertices"):
        mammal.load_mammal(_fake_mammal(tmp_path / "bad", faces="0 1 5\n"))
    with pytest.raises(mammal.MeshMiceError, match="not a MAMMAL_mouse checkout"):
        mammal.load_mammal(tmp_path)


@pytest.mark.slow
def test_the_real_mammal_mesh_fits_the_labels_and_makes_samples(shared_dir, tmp_path):
    if not (MAMMAL / "HEAD").is_file() and not (MAMMAL / mammal.MAMMAL_FILES[0]).is_file():
        pytest.skip(f"MAMMAL_mouse data not found at {MAMMAL} (set MOUSERECON_MAMMAL to a checkout or its git repo)")
    mesh = mammal.load_mammal(MAMMAL)
    assert (len(mesh.vertices), len(mesh.faces), len(mesh.joints)) == (14522, 28800, 140)
    rig = mm.load_rig(shared_dir / "data" / "markerless_mouse_1_rig", "real")
    families = [mammal.classify(k, rig.names) for k in rig.labels]
    picked = [families.index(f) for f in ("walk", "turn", "rear", "groom")]
    poses = mammal.fit_labeled_poses(mesh, rig.labels[picked], rig.frames[picked], rig.names)
    assert [p.family for p in poses] == ["walk", "turn", "rear", "groom"]
    assert all(p.rmse_mm < 8.0 for p in poses) and 110.0 < poses[0].scale_mm < 145.0
    rear, _ = mammal.skin(mesh, poses[2].rotations)
    body = mesh.weights[:, mesh.index(mammal.TAIL)].sum(1) < 0.5
    world = mm.place(rear * poses[2].scale_mm, body, 30.0, np.array([50.0, 60.0]))
    assert world[:, 2].min() == pytest.approx(0.0, abs=1e-9) and world[:, 2].max() > 60.0  # up on its hind legs
    folder = mm.generate_sample(mesh, mm.mammal_poser(mesh, poses), rig, tmp_path / "sample", seed=0, family="rear", resolution=48)
    sample = load_sample(folder)
    assert sample.num_views == 8 and (sample.masks.flatten(1).amax(1) > 0.99).all()
    record = json.loads((folder / mm.RECORD_FILE).read_text())
    assert record["pose"]["family"] == "rear" and record["height_mm"] > 60.0
