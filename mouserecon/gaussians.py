"""3D Gaussians in pre-activation parameter space (see CONVENTIONS.md).

Activations are the named functions below; nothing else in the project re-derives them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SH_C0 = 0.28209479177387814  # real spherical harmonic Y_0^0 = 1 / (2 sqrt(pi))


def sh_dc_to_rgb(sh_dc: Tensor) -> Tensor:
    return 0.5 + SH_C0 * sh_dc


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / SH_C0


def opacity_activation(opacity_logits: Tensor) -> Tensor:
    return torch.sigmoid(opacity_logits)


def opacity_inverse(opacity: Tensor) -> Tensor:
    return torch.logit(opacity)


def scale_activation(log_scales: Tensor) -> Tensor:
    return torch.exp(log_scales)


def rotation_activation(quats: Tensor) -> Tensor:
    """Unit quaternions, wxyz."""
    return torch.nn.functional.normalize(quats, dim=-1)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from (unnormalised) wxyz quaternions [..., 4]."""
    w, x, y, z = rotation_activation(quats).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(*quats.shape[:-1], 3, 3)


@dataclass(frozen=True)
class Gaussians:
    """A set (or batch of sets) of 3D Gaussians, leading batch dims `...` shared by all fields.

    means:          [..., N, 3] world positions.
    sh:             [..., N, K, 3] spherical-harmonic colour coefficients, K = (deg + 1)^2, DC first.
    log_scales:     [..., N, 3] scale = exp(log_scales).
    quats:          [..., N, 4] rotation, wxyz, unnormalised.
    opacity_logits: [..., N] opacity = sigmoid(opacity_logits).
    """

    means: Tensor
    sh: Tensor
    log_scales: Tensor
    quats: Tensor
    opacity_logits: Tensor

    def __post_init__(self) -> None:
        for f in fields(self):
            t = getattr(self, f.name)
            assert isinstance(t, Tensor) and t.is_floating_point(), f"{f.name} must be a floating-point tensor"
            assert t.device == self.means.device, f"{f.name} is on {t.device}, means on {self.means.device}"
        batch_n = self.means.shape[:-1]
        assert self.means.shape[-1] == 3, f"means must be [..., N, 3], got {tuple(self.means.shape)}"
        assert self.sh.shape[:-2] == batch_n and self.sh.shape[-1] == 3, f"sh {tuple(self.sh.shape)}"
        k = self.sh.shape[-2]
        assert math.isqrt(k) ** 2 == k and 1 <= k <= 16, f"sh has K={k}; K must be (deg+1)^2 for deg 0..3"
        assert self.log_scales.shape == (*batch_n, 3), f"log_scales {tuple(self.log_scales.shape)}"
        assert self.quats.shape == (*batch_n, 4), f"quats {tuple(self.quats.shape)}"
        assert self.opacity_logits.shape == batch_n, f"opacity_logits {tuple(self.opacity_logits.shape)}"

    @classmethod
    def from_activated(cls, means: Tensor, colors: Tensor, scales: Tensor, quats: Tensor,
                       opacities: Tensor, sh_degree: int = 0) -> Gaussians:
        """Build from activated values: means [..., N, 3], colors [..., N, 3] (DC colour, 0.5 = grey),
        scales [..., N, 3] > 0, quats [..., N, 4] wxyz, opacities [..., N] in (0, 1).

        Higher SH coefficients (sh_degree > 0) are zero, i.e. the colour is view-independent.
        """
        assert 0 <= sh_degree <= 3, f"sh_degree must be 0..3, got {sh_degree}"
        assert colors.shape == means.shape, f"colors {tuple(colors.shape)} vs means {tuple(means.shape)}"
        sh = torch.zeros(*means.shape[:-1], (sh_degree + 1) ** 2, 3, dtype=colors.dtype, device=colors.device)
        sh[..., 0, :] = rgb_to_sh_dc(colors)
        return cls(means=means, sh=sh, log_scales=torch.log(scales), quats=quats,
                   opacity_logits=opacity_inverse(opacities))

    # ---- activated views ---------------------------------------------------------------------
    @property
    def sh_degree(self) -> int:
        return math.isqrt(self.sh.shape[-2]) - 1

    @property
    def num(self) -> int:
        return self.means.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def colors(self) -> Tensor:  # [..., N, 3] view-independent (DC) colour
        return sh_dc_to_rgb(self.sh[..., 0, :])

    @property
    def opacities(self) -> Tensor:  # [..., N]
        return opacity_activation(self.opacity_logits)

    @property
    def scales(self) -> Tensor:  # [..., N, 3]
        return scale_activation(self.log_scales)

    @property
    def rotations(self) -> Tensor:  # [..., N, 3, 3]
        return quat_to_rotmat(self.quats)

    def covariances(self) -> Tensor:
        """World covariances [..., N, 3, 3] = R S S R^T."""
        rs = self.rotations * self.scales[..., None, :]
        return rs @ rs.transpose(-1, -2)

    # ---- container operations ----------------------------------------------------------------
    def _map(self, fn) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> Gaussians:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Gaussians:
        return self._map(Tensor.detach)

    def __getitem__(self, index) -> Gaussians:
        """Index the leading batch dimension (use `select` to pick Gaussians)."""
        assert self.means.ndim >= 3, "index a batched Gaussians; use select() for a single set"
        return self._map(lambda t: t[index])

    def select(self, mask_or_index: Tensor) -> Gaussians:
        """Pick Gaussians of an unbatched set [N] by boolean mask [N] or indices."""
        assert self.means.ndim == 2, "select() works on an unbatched set"
        return self._map(lambda t: t[mask_or_index])

    @staticmethod
    def cat(parts: list[Gaussians]) -> Gaussians:
        """Concatenate along N; SH degrees and batch shapes must match."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of Gaussians")
        degrees = {p.sh_degree for p in parts}
        if len(degrees) != 1:
            raise ValueError(f"cannot concatenate Gaussians with SH degrees {sorted(degrees)}")
        return Gaussians(**{
            f.name: torch.cat([getattr(p, f.name) for p in parts], dim=parts[0].means.ndim - 2)
            for f in fields(Gaussians)
        })

    def finite_mask(self) -> Tensor:
        """[..., N] True where every parameter of the Gaussian is finite."""
        flat = [self.means, self.sh.flatten(-2), self.log_scales, self.quats, self.opacity_logits[..., None]]
        return torch.cat([torch.isfinite(t) for t in flat], -1).all(-1)

    def drop_nonfinite(self) -> Gaussians:
        """Remove Gaussians with any non-finite parameter, logging how many."""
        keep = self.finite_mask()
        dropped = int((~keep).sum())
        if not dropped:
            return self
        log.warning("dropping %d of %d Gaussians with non-finite parameters", dropped, self.num)
        return self.select(keep)

    def prune(self, min_opacity: float = 0.0, max_scale: float | None = None) -> Gaussians:
        """Keep Gaussians of an unbatched set with opacity >= min_opacity and largest scale <= max_scale."""
        keep = self.opacities >= min_opacity
        if max_scale is not None:
            keep &= self.scales.amax(-1) <= max_scale
        return self.select(keep)

    def transform(self, rotation: Tensor, translation: Tensor, scale: float) -> Gaussians:
        """Apply the similarity x -> scale * R x + t: rotation [3, 3] (det +1), translation [3], scale > 0.

        Means move, quaternions are pre-multiplied by R's, log-scales shift by log(scale), so every
        covariance becomes scale^2 R Sigma R^T. SH degree 0 only (higher bands would need rotating).
        Used to map a reconstruction back to the user's frame (e.g. millimetres).
        """
        if self.sh_degree > 0:
            raise ValueError("transforming view-dependent SH (degree > 0) is not supported")
        assert rotation.shape == (3, 3) and translation.shape == (3,), \
            f"rotation must be [3, 3] and translation [3], got {tuple(rotation.shape)}, {tuple(translation.shape)}"
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"similarity scale must be finite and > 0, got {scale}")
        if not torch.isfinite(translation).all():
            raise ValueError(f"similarity translation must be finite, got {translation.tolist()}")
        r64 = rotation.detach().double().cpu()
        if not (torch.allclose(r64 @ r64.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
                and torch.det(r64) > 0):
            raise ValueError(f"not a rotation matrix (orthonormal, det +1):\n{rotation}")
        means = scale * self.means @ rotation.to(self.means).T + translation.to(self.means)
        q_r = _rotmat_to_quat(r64).to(self.quats)  # from the float64 matrix, for accuracy
        quats = _quat_multiply(q_r.expand_as(self.quats), self.quats)
        return replace(self, means=means, quats=quats, log_scales=self.log_scales + math.log(scale))


def _quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of wxyz quaternions [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], -1)


def _rotmat_to_quat(rot: Tensor) -> Tensor:
    """wxyz unit quaternion [4] of a rotation matrix [3, 3] (Shepperd's method)."""
    r = rot.double()
    trace = r.trace()
    candidates = torch.stack([trace, r[0, 0], r[1, 1], r[2, 2]])
    i = int(candidates.argmax())
    if i == 0:
        s = torch.sqrt(1 + trace) * 2
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif i == 1:
        s = torch.sqrt(1 + r[0, 0] - r[1, 1] - r[2, 2]) * 2
        q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif i == 2:
        s = torch.sqrt(1 + r[1, 1] - r[0, 0] - r[2, 2]) * 2
        q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = torch.sqrt(1 + r[2, 2] - r[0, 0] - r[1, 1]) * 2
        q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    return torch.stack(q).to(rot.dtype)
