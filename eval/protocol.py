"""The evaluation protocol: everything that must be equal for two sets of numbers to be comparable.

In the work this tool replaces, models were silently compared on different frames, views and masks.
A `Protocol` pins them down: the data (a SHA-1 over the sample ids and every file of every sample),
the input and held-out views, the resolution, the foreground-mask source, the metric settings, the
LPIPS network, the background and how cameras are normalised. It is written into every report in
full and as a short tag (`Protocol.tag()`, 10 hex digits of the SHA-1 of its canonical JSON), and
`require_same_protocol` refuses, with a message listing every differing field, to put side by side
numbers measured under different protocols. It is a gate, not a warning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mouserecon.errors import MouseReconError
from mouserecon import options
from mouserecon.metrics import MaskSpec, describe_metrics
from mouserecon.options import LPIPS_CHOICES
from mouserecon.rundir import sample_manifest

PROTOCOL_VERSION = 1
# How the model's cameras are made (DESIGN.md §4): a similarity fitted to the input views only, so the
# held-out cameras never influence the reconstruction; `pipeline.prepare` does it for eval and
# reconstruct alike (one code path; a single input view is fitted with the rig's calibration).
NORMALIZATION = "similarity fitted to the input views (optical-axes centre, mean distance 2.7, world_up -> +Z)"
WHITE = (1.0, 1.0, 1.0)


class ProtocolError(MouseReconError, ValueError):
    """A protocol record is malformed (fields, views, LPIPS net, mask)."""


class ProtocolMismatch(MouseReconError, ValueError):
    """Results measured under different protocols were about to be compared; the message lists the fields."""


def parse_mask(spec: str) -> MaskSpec:
    """"alpha" | "alpha:<t>" | "near_white:<t>" -> MaskSpec (`options.parse_mask`: alpha's threshold
    defaults to 0.5)."""
    return MaskSpec(*options.parse_mask(spec))


def mask_string(mask: MaskSpec) -> str:
    """The canonical spec of a MaskSpec, e.g. "alpha:0.5", "near_white:0.95" (inverse of parse_mask)."""
    return f"{mask.source}:{mask.threshold:g}"


def data_sha1(sample_dirs: list[Path]) -> str:
    """SHA-1 over the sample ids (folder names, in order) and each sample's file hashes
    (`train.rundir.sample_manifest`: relative names and contents of every file in the folder)."""
    manifest = sample_manifest([Path(d) for d in sample_dirs])
    listing = [[Path(s["path"]).name, s["sha1"]] for s in manifest["samples"]]
    return hashlib.sha1(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Protocol:
    """What an evaluation measured, exactly. Two results are comparable iff their protocols are equal.

    data_sha1:     `data_sha1(sample folders)`.
    sample_ids:    sample folder names, in evaluation order.
    input_views:   frame indices the model reconstructs from, in the order fed to it.
    heldout_views: frame indices rendered and scored.
    resolution:    square side (px) images are centre-cropped and resized to (`data.load_sample`).
    mask:          foreground mask source, `mask_string(MaskSpec)`, e.g. "alpha:0.5".
    metrics:       `metrics.describe_metrics()`.
    lpips:         "alex", "vgg" or "none".
    background:    RGB the renders are composited on (the ground truth is on white).
    normalization: how cameras are mapped to the model's rig.
    version:       of this protocol definition.
    """

    data_sha1: str
    sample_ids: tuple[str, ...]
    input_views: tuple[int, ...]
    heldout_views: tuple[int, ...]
    resolution: int
    mask: str
    metrics: str = describe_metrics()
    lpips: str = "alex"
    background: tuple[float, float, float] = WHITE
    normalization: str = NORMALIZATION
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise JSON lists to tuples once, here
        for name in ("sample_ids", "input_views", "heldout_views", "background"):
            set_(self, name, tuple(getattr(self, name)))
        if not self.sample_ids:
            raise ProtocolError("a protocol needs at least one sample")
        if not self.input_views or not self.heldout_views:
            raise ProtocolError(f"a protocol needs input and held-out views, got {list(self.input_views)} / "
                             f"{list(self.heldout_views)}")
        overlap = sorted(set(self.input_views) & set(self.heldout_views))
        if overlap:
            raise ProtocolError(f"views {overlap} are both input and held out")
        for name in ("input_views", "heldout_views"):
            views = getattr(self, name)
            if len(set(views)) != len(views) or min(views) < 0:
                raise ProtocolError(f"{name} must be distinct non-negative frame indices, got {list(views)}")
        if self.lpips not in LPIPS_CHOICES:
            raise ProtocolError(f"lpips must be one of {LPIPS_CHOICES}, got {self.lpips!r}")
        parse_mask(self.mask)

    @property
    def mask_spec(self) -> MaskSpec:
        return parse_mask(self.mask)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(record: Mapping, source: str = "<protocol>") -> Protocol:
        """Inverse of `to_dict`; unknown or missing fields are an error naming `source`."""
        names = {f.name for f in fields(Protocol)}
        if set(record) != names:
            raise ProtocolError(f"{source}: protocol fields {sorted(record)} differ from {sorted(names)} "
                             f"(unknown: {sorted(set(record) - names)}, missing: {sorted(names - set(record))})")
        return Protocol(**record)

    def tag(self) -> str:
        """10 hex digits of the SHA-1 of the canonical JSON of `to_dict()`: stable across runs and machines."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(canonical.encode()).hexdigest()[:10]

    def differences(self, other: Protocol) -> list[str]:
        """Names of the fields whose values differ."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _short(value, limit: int = 70) -> str:
    if isinstance(value, tuple) and len(value) > 4 and all(isinstance(v, str) for v in value):
        value = f"{len(value)} samples ({', '.join(value[:2])}, ..., {value[-1]})"
    text = str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def require_same_protocol(protocols: Mapping[str, Protocol]) -> Protocol:
    """The common protocol of `protocols` ({label: Protocol}, e.g. report paths); raises ProtocolMismatch
    listing every differing field with each label's value when they are not all equal."""
    if not protocols:
        raise ProtocolError("no protocols to compare")
    (first_label, first), *rest = protocols.items()
    differing = sorted({name for _, p in rest for name in first.differences(p)},
                       key=[f.name for f in fields(Protocol)].index)
    if not differing:
        return first
    lines = [f"refusing to compare results measured under different protocols; differing fields: "
             f"{', '.join(differing)}"]
    for name in differing:
        lines.append(f"  {name}:")
        for label, protocol in protocols.items():
            lines.append(f"    {label} (tag {protocol.tag()}): {_short(getattr(protocol, name))}")
    raise ProtocolMismatch("\n".join(lines))
