"""Signed distance functions of primitives and a smooth-union shape built from them (torch).

Every function takes world points `[P, 3]` and returns distances `[P, n]` (one column per
primitive) in the same length unit as its parameters. Negative inside, positive outside.

`Shape` is a hierarchy used for the synthetic mouse: the primitives of a `Part` (e.g. the four
limbs) are blended with a log-sum-exp smooth minimum of radius `k_inner`, and the parts are
joined in order with a polynomial smooth minimum of radius `k_join` (0 = hard union, used for
the eyes). Both smooth minima are <= the hard minimum, so the shape is a (slightly grown) union.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

CHUNK = 4  # primitives per culling chunk

# ---- primitives ---------------------------------------------------------------------------------


def sd_ellipsoid(points: Tensor, centers: Tensor, rotations: Tensor, radii: Tensor) -> Tensor:
    """Approximate distance to ellipsoids (exact for spheres, at the centre, and outside along the axes).

    points [P, 3]; centers [E, 3]; rotations [E, 3, 3] (columns = local axes in world);
    radii [E, 3] semi-axes along the local axes. Returns [P, E]. Uses the bound
    k0 (k0 - 1) / k1 with k0 = |q / r|, k1 = |q / r^2| (Quilez), which is exact on the surface.
    """
    assert points.ndim == 2 and points.shape[1] == 3, f"points must be [P, 3], got {tuple(points.shape)}"
    n = centers.shape[0]
    # One matmul for all ellipsoids: local = R^T (p - c), laid out [P, E, 3].
    flat = rotations.permute(1, 0, 2).reshape(3, n * 3)  # [3, E*3]
    local = (points @ flat - (centers[:, :, None] * rotations).sum(1).reshape(1, n * 3)).reshape(-1, n, 3)
    k0 = (local / radii).norm(dim=-1)  # [P, E]
    k1 = (local / radii.square()).norm(dim=-1)
    # The bound is 0/0 at the centre, where the true distance is -(smallest semi-axis).
    at_center = k1 < 1e-9 / radii.min(-1).values
    return torch.where(at_center, -radii.min(-1).values, k0 * (k0 - 1.0) / k1.clamp_min(1e-12))


def sd_capsule(points: Tensor, a: Tensor, b: Tensor, radius_a: Tensor, radius_b: Tensor) -> Tensor:
    """Distance to (tapered) capsules: segments a -> b [C, 3] with radius linear from radius_a to radius_b [C].

    Exact for constant radius; for tapered ones the radius is interpolated at the closest
    point of the axis, a close bound when the taper is gentle. Returns [P, C].
    """
    assert points.ndim == 2 and points.shape[1] == 3, f"points must be [P, 3], got {tuple(points.shape)}"
    # Expanded dot products (matmuls) instead of [P, C, 3] temporaries: |p-a|^2, (p-a).ab, |ab|^2.
    ab = b - a  # [C, 3]
    ab2 = ab.square().sum(-1).clamp_min(1e-12)  # [C]
    ap_ab = points @ ab.T - (a * ab).sum(-1)  # [P, C]
    ap2 = points.square().sum(-1, keepdim=True) - 2.0 * points @ a.T + a.square().sum(-1)  # [P, C]
    h = (ap_ab / ab2).clamp(0.0, 1.0)
    axis2 = (ap2 - 2.0 * h * ap_ab + h.square() * ab2).clamp_min(0.0)  # squared distance to the axis point
    return axis2.sqrt() - (radius_a + h * (radius_b - radius_a))


def smooth_min_lse(distances: Tensor, k: float) -> Tensor:
    """Order-independent smooth minimum over the last dim: -k log sum exp(-d / k); <= min, >= min - k log n."""
    if k <= 0:
        return distances.min(-1).values
    return -k * torch.logsumexp(-distances / k, dim=-1)


def smooth_min_poly(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum of two distance fields; <= min(a, b), >= min(a, b) - k / 4."""
    if k <= 0:
        return torch.minimum(a, b)
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return b + h * (a - b) - k * h * (1.0 - h)


def sphere_directions(n: int) -> Tensor:
    """n unit vectors [n, 3] spread evenly over the sphere (a Fibonacci spiral, equal-area rings)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * torch.pi * (3.0 - 5.0 ** 0.5)  # golden angle
    r = (1.0 - z * z).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), z], dim=1).float()


# ---- a hierarchical smooth-union shape ----------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """Primitives blended together, with per-primitive materials.

    Ellipsoids: centers [E, 3], rotations [E, 3, 3], radii [E, 3].
    Capsules: a, b [C, 3], radius_a, radius_b [C].
    Materials, one row per primitive (ellipsoids first, then capsules): dorsal [n, 3] and
    ventral [n, 3] sRGB albedo in [0, 1], up [n, 3] unit vectors (a surface whose normal points
    along -up takes the ventral colour), specular [n] in [0, 1].
    """

    name: str
    k_inner: float
    k_join: float
    centers: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    rotations: Tensor = field(default_factory=lambda: torch.zeros(0, 3, 3))
    radii: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    a: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    b: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    radius_a: Tensor = field(default_factory=lambda: torch.zeros(0))
    radius_b: Tensor = field(default_factory=lambda: torch.zeros(0))
    dorsal: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    ventral: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    up: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    specular: Tensor = field(default_factory=lambda: torch.zeros(0))

    def __post_init__(self) -> None:
        n_e, n_c = self.centers.shape[0], self.a.shape[0]
        assert self.rotations.shape == (n_e, 3, 3) and self.radii.shape == (n_e, 3), f"{self.name}: ellipsoid shapes"
        assert self.b.shape == (n_c, 3) and self.radius_a.shape == self.radius_b.shape == (n_c,), f"{self.name}: capsules"
        n = n_e + n_c
        assert n > 0, f"part {self.name} has no primitives"
        assert self.dorsal.shape == self.ventral.shape == self.up.shape == (n, 3), f"{self.name}: material shapes"
        assert self.specular.shape == (n,), f"{self.name}: specular must be [{n}]"

    def distances(self, points: Tensor) -> Tensor:  # [P, 3] -> [P, n]
        columns = []
        if self.centers.shape[0]:
            columns.append(sd_ellipsoid(points, self.centers, self.rotations, self.radii))
        if self.a.shape[0]:
            columns.append(sd_capsule(points, self.a, self.b, self.radius_a, self.radius_b))
        return torch.cat(columns, dim=1)

    def field(self, points: Tensor) -> Tensor:
        """The part's blended distance [P] at points [P, 3] (smooth minimum over its primitives).

        Primitives are grouped in chunks with a bounding sphere; where a point is far from a
        chunk its exact distances are replaced by the distance to that sphere, a lower bound
        (so the field never overestimates, and is exact wherever it can decide the surface).
        """
        columns = []
        for chunk, center, radius in self._chunks:
            bound = (points - center).norm(dim=-1) - radius  # [P]
            # Margin: a far chunk changes the LSE by < k exp(-6) and the polynomial join not at
            # all; the radius term keeps the sphere itself far from any hit threshold.
            margin = 6.0 * self.k_inner + 2.0 * self.k_join + 0.25 * radius
            near = torch.nonzero(bound < margin).squeeze(1)
            if near.numel() == 0:
                columns.append(bound)
                continue
            column = bound.clone()
            column[near] = smooth_min_lse(chunk.distances(points[near]), self.k_inner)
            columns.append(column)
        return smooth_min_lse(torch.stack(columns, dim=1), self.k_inner)

    @cached_property
    def _chunks(self) -> list[tuple[Part, Tensor, Tensor]]:
        """(sub-part, bounding-sphere centre [3], radius []) for runs of CHUNK consecutive primitives."""
        n_e = self.centers.shape[0]
        centers = torch.cat([self.centers, 0.5 * (self.a + self.b)])  # [n, 3]
        reach = torch.cat([self.radii.max(-1).values,
                           0.5 * (self.b - self.a).norm(dim=-1) + torch.maximum(self.radius_a, self.radius_b)])
        chunks = []
        for start in range(0, centers.shape[0], CHUNK):
            stop = min(start + CHUNK, centers.shape[0])
            e, c = slice(min(start, n_e), min(stop, n_e)), slice(max(start - n_e, 0), max(stop - n_e, 0))
            sub = Part(self.name, self.k_inner, self.k_join, self.centers[e], self.rotations[e], self.radii[e],
                       self.a[c], self.b[c], self.radius_a[c], self.radius_b[c], self.dorsal[start:stop],
                       self.ventral[start:stop], self.up[start:stop], self.specular[start:stop])
            center = centers[start:stop].mean(0)
            radius = ((centers[start:stop] - center).norm(dim=-1) + reach[start:stop]).max()
            chunks.append((sub, center, radius))
        return chunks

    def surface_samples(self, directions: Tensor) -> Tensor:
        """Points [n_e * D + 2 * n_c * D, 3] on the primitives' surfaces along unit directions [D, 3]: each
        ellipsoid's centre + R (radii * d), each capsule's end spheres. Their projections bound the part's
        silhouette to within the directions' spacing (and the blend radii)."""
        points = []
        if self.centers.shape[0]:
            local = self.radii[:, None, :] * directions[None]  # [E, D, 3]
            points.append((self.centers[:, None, :] + local @ self.rotations.transpose(1, 2)).reshape(-1, 3))
        if self.a.shape[0]:
            for end, radius in ((self.a, self.radius_a), (self.b, self.radius_b)):
                points.append((end[:, None, :] + radius[:, None, None] * directions[None]).reshape(-1, 3))
        return torch.cat(points)

    def bounds(self) -> Tensor:  # [2, 3] axis-aligned box (min, max) containing every primitive
        lows, highs = [], []
        if self.centers.shape[0]:
            extent = (self.rotations * self.radii[:, None, :]).norm(dim=-1)  # [E, 3] half-widths of the exact AABB
            lows.append(self.centers - extent)
            highs.append(self.centers + extent)
        if self.a.shape[0]:
            ra, rb = self.radius_a[:, None], self.radius_b[:, None]  # the hull of the two end spheres
            lows.append(torch.minimum(self.a - ra, self.b - rb))
            highs.append(torch.maximum(self.a + ra, self.b + rb))
        return torch.stack([torch.cat(lows).min(0).values, torch.cat(highs).max(0).values])


@dataclass(frozen=True)
class Shape:
    """Parts joined in order: d = smin(...smin(smin(d_0, d_1, k_join_1), d_2, k_join_2)...)."""

    parts: tuple[Part, ...]
    colour_blend: float  # length over which neighbouring primitive colours mix

    def distance(self, points: Tensor) -> Tensor:  # [P, 3] -> [P]
        d = None
        for part in self.parts:
            d_part = part.field(points)
            d = d_part if d is None else smooth_min_poly(d, d_part, part.k_join)
        return d

    def bounds(self) -> Tensor:  # [2, 3], padded by the blend radii (smooth unions grow the shape)
        boxes = torch.stack([p.bounds() for p in self.parts])  # [n_parts, 2, 3]
        pad = max(max(p.k_inner for p in self.parts), max(p.k_join for p in self.parts))
        return torch.stack([boxes[:, 0].min(0).values - pad, boxes[:, 1].max(0).values + pad])

    def surface_samples(self, n_directions: int = 64) -> Tensor:
        """Points [M, 3] on every primitive's surface (`Part.surface_samples` along `sphere_directions`)."""
        directions = sphere_directions(n_directions)
        return torch.cat([p.surface_samples(directions) for p in self.parts])

    def material(self, points: Tensor, normals: Tensor) -> tuple[Tensor, Tensor]:
        """sRGB albedo [P, 3] and specular weight [P] at surface points [P, 3] with unit normals [P, 3]."""
        d = torch.cat([p.distances(points) for p in self.parts], dim=1)  # [P, n]
        weights = torch.softmax(-d / self.colour_blend, dim=1)  # [P, n]
        dorsal = torch.cat([p.dorsal for p in self.parts])  # [n, 3]
        ventral = torch.cat([p.ventral for p in self.parts])
        up = torch.cat([p.up for p in self.parts])
        specular = torch.cat([p.specular for p in self.parts])
        # Ventral where the normal points away from the primitive's up: a soft belly line.
        belly = (-(normals @ up.T) * 2.0 + 0.3).clamp(0.0, 1.0)[..., None]  # [P, n, 1]
        albedo = dorsal[None] * (1.0 - belly) + ventral[None] * belly  # [P, n, 3]
        return (weights[..., None] * albedo).sum(1), weights @ specular
