"""Gaussians container: activations (CONVENTIONS.md C6), covariances, similarity transform, set operations.

References: closed forms written here with numpy, scipy's Rotation (xyzw quaternions), and Monte Carlo
samples of the Gaussian pushed through the similarity.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from mouserecon.gaussians import Gaussians, _rotmat_to_quat


def random_gaussians(n: int, sh_degree: int = 0, dtype=torch.float64) -> Gaussians:
    k = (sh_degree + 1) ** 2
    return Gaussians(
        means=torch.randn(n, 3, dtype=dtype),
        sh=torch.randn(n, k, 3, dtype=dtype),
        log_scales=torch.randn(n, 3, dtype=dtype) * 0.5 - 2.0,
        quats=torch.randn(n, 4, dtype=dtype) * 3.0,  # deliberately not unit length
        opacity_logits=torch.randn(n, dtype=dtype) * 2.0,
    )


def scipy_rotmats(quats_wxyz: torch.Tensor) -> np.ndarray:
    """[N, 3, 3] from wxyz quaternions, through scipy (which takes xyzw and normalises)."""
    q = quats_wxyz.numpy()
    return Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()


def test_convention_activations():
    g = random_gaussians(50)
    c0 = 1.0 / (2.0 * math.sqrt(math.pi))  # real SH Y_0^0, computed independently
    sh_dc = g.sh[:, 0, :].numpy()
    np.testing.assert_allclose(g.colors.numpy(), 0.5 + c0 * sh_dc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g.opacities.numpy(), 1.0 / (1.0 + np.exp(-g.opacity_logits.numpy())),
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(g.scales.numpy(), np.exp(g.log_scales.numpy()), rtol=1e-12, atol=0)
    np.testing.assert_allclose(g.rotations.numpy(), scipy_rotmats(g.quats), rtol=0, atol=1e-12)
    # A quaternion and its negative (and any positive multiple) are the same rotation.
    np.testing.assert_allclose(Gaussians(g.means, g.sh, g.log_scales, -0.1 * g.quats, g.opacity_logits)
                               .rotations.numpy(), g.rotations.numpy(), atol=1e-12)
    # 90 degrees about +z, wxyz = (cos 45, 0, 0, sin 45): x -> y.
    quarter = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]], dtype=torch.float64)
    rot = Gaussians(g.means[:1], g.sh[:1], g.log_scales[:1], quarter, g.opacity_logits[:1]).rotations[0]
    np.testing.assert_allclose(rot.numpy() @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_covariances_match_independent_construction():
    g = random_gaussians(40)
    rot = scipy_rotmats(g.quats)
    var = np.exp(2 * g.log_scales.numpy())
    expected = np.einsum("nij,nj,nkj->nik", rot, var, rot)
    np.testing.assert_allclose(g.covariances().numpy(), expected, rtol=1e-10, atol=1e-14)
    # Eigenvalues are the squared scales, whatever the rotation.
    eig = np.linalg.eigvalsh(g.covariances().numpy())
    np.testing.assert_allclose(eig, np.sort(var, axis=1), rtol=1e-9)


def test_from_activated_inverts_the_activations():
    n = 30
    means, colors = torch.randn(n, 3, dtype=torch.float64), torch.rand(n, 3, dtype=torch.float64)
    scales = torch.rand(n, 3, dtype=torch.float64) + 0.01
    quats, opacities = torch.randn(n, 4, dtype=torch.float64), torch.rand(n, dtype=torch.float64) * 0.98 + 0.01
    g = Gaussians.from_activated(means, colors, scales, quats, opacities, sh_degree=2)
    assert g.sh.shape == (n, 9, 3) and g.sh_degree == 2
    assert torch.equal(g.sh[:, 1:], torch.zeros(n, 8, 3, dtype=torch.float64))
    torch.testing.assert_close(g.colors, colors, rtol=0, atol=1e-12)
    torch.testing.assert_close(g.scales, scales, rtol=1e-12, atol=0)
    torch.testing.assert_close(g.opacities, opacities, rtol=1e-12, atol=1e-12)
    assert torch.equal(g.means, means) and torch.equal(g.quats, quats)


# Rotations hitting every branch of the matrix -> quaternion conversion (trace largest, then each diagonal).
SPECIAL_ROTATIONS = [
    Rotation.identity(),
    Rotation.from_rotvec([math.pi * 0.999, 0, 0]),
    Rotation.from_rotvec([0, math.pi, 0]),
    Rotation.from_rotvec([0, 0, math.pi * 0.97]),
    Rotation.from_rotvec([0.3, -2.0, 1.1]),
]


@pytest.mark.parametrize("rot", SPECIAL_ROTATIONS, ids=range(len(SPECIAL_ROTATIONS)))
def test_rotmat_to_quat_matches_scipy(rot):
    q = _rotmat_to_quat(torch.tensor(rot.as_matrix()))
    x, y, z, w = rot.as_quat()
    expected = torch.tensor([w, x, y, z], dtype=torch.float64)
    sign = 1.0 if float(q @ expected) > 0 else -1.0  # q and -q are the same rotation
    torch.testing.assert_close(q * sign, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rot", SPECIAL_ROTATIONS, ids=range(len(SPECIAL_ROTATIONS)))
def test_transform_is_a_similarity_of_the_gaussian(rot):
    g = random_gaussians(20)
    r = torch.tensor(rot.as_matrix())
    t = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s = 37.5
    out = g.transform(r, t, s)
    np.testing.assert_allclose(out.means.numpy(), s * g.means.numpy() @ rot.as_matrix().T + t.numpy(), atol=1e-12)
    expected_cov = s**2 * np.einsum("ij,njk,lk->nil", rot.as_matrix(), g.covariances().numpy(), rot.as_matrix())
    np.testing.assert_allclose(out.covariances().numpy(), expected_cov, rtol=1e-9, atol=1e-12)
    # Colours and opacities are untouched.
    assert torch.equal(out.sh, g.sh) and torch.equal(out.opacity_logits, g.opacity_logits)


def test_transform_moves_sampled_points():
    """Points drawn from a Gaussian and pushed through x -> s R x + t follow the transformed Gaussian."""
    g = random_gaussians(1)
    rot = Rotation.from_rotvec([0.4, 1.2, -0.7]).as_matrix()
    t, s = np.array([3.0, -2.0, 1.0]), 0.25
    rng = np.random.default_rng(0)
    points = rng.multivariate_normal(g.means[0].numpy(), g.covariances()[0].numpy(), size=200_000)
    moved = s * points @ rot.T + t
    out = g.transform(torch.tensor(rot), torch.tensor(t), s)
    cov = out.covariances()[0].numpy()
    np.testing.assert_allclose(moved.mean(0), out.means[0].numpy(), atol=4 * np.sqrt(cov.diagonal().max() / 2e5))
    # Sample covariance of 2e5 points: relative error ~ sqrt(2 / 2e5) ~ 0.3 %, so 2 % of the largest variance.
    np.testing.assert_allclose(np.cov(moved.T), cov, rtol=0, atol=0.02 * cov.diagonal().max())


def test_transform_rejects_bad_similarities():
    g = random_gaussians(3)
    t = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="rotation"):
        g.transform(torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)), t, 1.0)  # reflection
    with pytest.raises(ValueError, match="rotation"):
        g.transform(2 * torch.eye(3, dtype=torch.float64), t, 1.0)
    with pytest.raises(ValueError, match="scale"):
        g.transform(torch.eye(3, dtype=torch.float64), t, -1.0)
    with pytest.raises(ValueError, match="translation"):
        g.transform(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, float("nan"), 0.0]), 1.0)
    with pytest.raises(ValueError, match="SH"):
        random_gaussians(3, sh_degree=1).transform(torch.eye(3, dtype=torch.float64), t, 1.0)


def test_prune_by_opacity_and_size():
    log_scales = torch.log(torch.tensor([[0.1, 0.1, 0.1], [0.1, 2.0, 0.1], [0.5, 0.5, 0.5], [0.1, 0.1, 0.1]]))
    opacity = torch.tensor([0.9, 0.9, 0.9, 0.001])
    g = Gaussians(torch.arange(12.0).reshape(4, 3), torch.zeros(4, 1, 3), log_scales,
                  torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1), torch.logit(opacity))
    assert g.prune(min_opacity=0.005).means[:, 0].tolist() == [0.0, 3.0, 6.0]
    assert g.prune(max_scale=1.0).means[:, 0].tolist() == [0.0, 6.0, 9.0]
    assert g.prune(min_opacity=0.005, max_scale=0.3).means[:, 0].tolist() == [0.0]
    assert g.prune().num == 4


def test_select_cat_and_batch_indexing():
    a, b = random_gaussians(5), random_gaussians(3)
    both = Gaussians.cat([a, b])
    assert both.num == 8 and torch.equal(both.means, torch.cat([a.means, b.means]))
    assert torch.equal(both.sh, torch.cat([a.sh, b.sh]))
    picked = both.select(torch.tensor([7, 0]))
    assert torch.equal(picked.quats, torch.stack([b.quats[2], a.quats[0]]))
    mask = torch.tensor([True, False, False, False, False, False, True, False])
    assert torch.equal(both.select(mask).opacity_logits, torch.stack([a.opacity_logits[0], b.opacity_logits[1]]))
    with pytest.raises(ValueError, match="SH degrees"):
        Gaussians.cat([a, random_gaussians(2, sh_degree=1)])
    with pytest.raises(ValueError, match="empty"):
        Gaussians.cat([])
    batched = Gaussians.cat([Gaussians(*(torch.stack([getattr(a, f)] * 2) for f in
                                         ("means", "sh", "log_scales", "quats", "opacity_logits")))] * 2)
    assert batched.means.shape == (2, 10, 3) and batched[1].num == 10
    with pytest.raises(AssertionError):
        batched.select(torch.tensor([0]))


def test_shapes_are_checked():
    g = random_gaussians(4)
    with pytest.raises(AssertionError, match="K must be"):
        Gaussians(g.means, torch.zeros(4, 5, 3, dtype=torch.float64), g.log_scales, g.quats, g.opacity_logits)
    with pytest.raises(AssertionError, match="quats"):
        Gaussians(g.means, g.sh, g.log_scales, g.quats[:, :3], g.opacity_logits)
    with pytest.raises(AssertionError, match="floating"):
        Gaussians(g.means, g.sh, g.log_scales, g.quats, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("field", ["means", "sh", "log_scales", "quats", "opacity_logits"])
def test_drop_nonfinite(field, caplog):
    g = random_gaussians(6, sh_degree=1)
    bad = getattr(g, field).clone()
    bad[1] = float("nan")
    bad[4].view(-1)[-1] = float("-inf")  # a single non-finite entry is enough
    g = Gaussians(**{**{f: getattr(g, f) for f in ("means", "sh", "log_scales", "quats", "opacity_logits")},
                     field: bad})
    with caplog.at_level(logging.WARNING, logger="mouserecon.gaussians"):
        kept = g.drop_nonfinite()
    assert torch.equal(kept.means, g.means[[0, 2, 3, 5]])
    assert [r.getMessage() for r in caplog.records] == ["dropping 2 of 6 Gaussians with non-finite parameters"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mouserecon.gaussians"):
        assert kept.drop_nonfinite().num == 4
    assert caplog.records == []
