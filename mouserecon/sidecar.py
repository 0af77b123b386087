"""The `reconstruct` sidecar: `mouse.ply` -> `mouse.json`, what the .ply is and how it was made.

One typed record, written and read only here (`Sidecar.write`, `Sidecar.read`); `eval` reads it to
put a .ply in the right frame and to refuse one made under another protocol. JSON keys are the field
names below; a file with unknown or missing keys is an error naming the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_write_json

FORMAT = "mouserecon-sidecar"
FORMAT_VERSION = 2
UNITS_NOTES = {"input": "the camera file's units (e.g. mm)",
               "model": "the model's normalised frame (object at the origin, cameras ~2.7 away, +Z up)"}


class SidecarError(MouseReconError, ValueError):
    """A sidecar file is unreadable or malformed; the message names the file and the defect."""


@dataclass(frozen=True)
class Sidecar:
    """ply: the .ply's file name. units: "input" | "model" (units_note says which frame that is).
    similarity_user_to_model / _model_to_user: `Similarity.to_dict()` records (x_model = s R x_user + t).
    world_up: the user's up axis that became +Z. sample, camera_file: what it was made from.
    input_views / heldout_views: frame indices. resolution: the scene's side in px (held-out scores,
    refinement); input_resolution: the side the model (or hull) saw its inputs at. mask_source: the sample's.
    method: "model" | "hull". checkpoint: {path, format, step, n_params, config}, None for the hull. device.
    min_opacity: the pruning threshold. refine: {steps, carved {before, after}, metrics}.
    counts: {predicted, filled (of predicted: `baselines.hull_fill`), nonfinite, pruned, written}. previews: files written. timings_s: per step."""

    ply: str
    units: str
    units_note: str
    similarity_user_to_model: dict
    similarity_model_to_user: dict
    world_up: list[float]
    sample: str
    camera_file: str
    input_views: list[int]
    heldout_views: list[int]
    resolution: int
    input_resolution: int
    mask_source: str
    method: str
    checkpoint: dict | None
    device: str
    min_opacity: float
    refine: dict
    counts: dict
    previews: list[str]
    timings_s: dict
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @staticmethod
    def path_for(ply: str | Path) -> Path:
        """The sidecar of a .ply: the same path with .json."""
        return Path(ply).with_suffix(".json")

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self))

    @staticmethod
    def read(path: str | Path) -> Sidecar:
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SidecarError(f"{path}: cannot read the sidecar ({err})") from None
        names = {f.name for f in fields(Sidecar)}
        if not isinstance(record, dict) or set(record) != names:
            got = set(record) if isinstance(record, dict) else set()
            raise SidecarError(f"{path}: not a mouserecon reconstruct sidecar (unknown keys {sorted(got - names)}, "
                               f"missing {sorted(names - got)})")
        if (record["format"], record["format_version"]) != (FORMAT, FORMAT_VERSION):
            raise SidecarError(f"{path}: format {record['format']!r} version {record['format_version']!r}; this "
                               f"mouserecon reads {FORMAT!r} version {FORMAT_VERSION}")
        if record["units"] not in UNITS_NOTES:
            raise SidecarError(f"{path}: 'units' must be 'input' or 'model', got {record['units']!r}")
        return Sidecar(**record)
