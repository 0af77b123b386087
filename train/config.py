"""Recipes: frozen dataclasses loaded from small YAML files, unknown keys rejected.

A recipe file may name a `base` recipe it is a delta of. Defaults live only in the dataclasses
below; the shipped `exp_c.yaml` spells the Exp C knobs out so the recipe reads on one screen.
Command-line overrides use dotted keys: `training.steps=100`, `optim.lr=2e-5`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mouserecon.errors import RecipeError
from mouserecon.losses import LossSection


@dataclass(frozen=True)
class ModelSection:
    preset: str = "facelift"  # a preset of mouserecon.model; overridden by --pretrained's own config
    grad_checkpoint: bool = True  # per-block activation checkpointing (used on CUDA only)
    hull_depth: bool | None = None  # ModelConfig.hull_depth; None = the pretrained model's (False from scratch)


@dataclass(frozen=True)
class DataSection:
    views_per_sample: int = 6
    input_views: tuple[int, ...] = (0, 1, 2, 3, 4)  # fixed order: camera order in the sample
    target_views: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    resolution: int = 512
    batch_size: int = 1  # per rank
    val_samples: int = 8  # taken from the end of the sorted sample list, never trained on
    # The model sees every input view cropped to a square around its foreground, margin crop_margin,
    # from the full-resolution image (data.crop_to_foreground); the targets are rendered both cropped and
    # whole (loop.target_indices). The model records it (input_crop) so that reconstruct and eval crop
    # their inputs the same way. crop_jitter: random growth/shift of the crops (training only).
    crop: bool = False
    crop_margin: float = 0.1
    crop_jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("input_views", "target_views"):
            views = getattr(self, name)
            if not views or len(set(views)) != len(views) or not all(0 <= v < self.views_per_sample for v in views):
                raise RecipeError(f"data.{name}={list(views)}: need distinct indices in [0, {self.views_per_sample})")
        if self.resolution <= 0 or self.batch_size <= 0 or self.val_samples < 0:
            raise RecipeError("data.resolution and data.batch_size must be positive, data.val_samples >= 0")
        if self.crop_margin < 0 or self.crop_jitter < 0:
            raise RecipeError(f"data.crop_margin and data.crop_jitter must be >= 0, got {self.crop_margin}, "
                              f"{self.crop_jitter}")

    @property
    def input_crop(self) -> float | None:
        """The crop margin the model is trained with (ModelConfig.input_crop); None = whole frames."""
        return self.crop_margin if self.crop else None


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # on parameters with >= 2 dims only
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 0.5
    skip_factor: float = 50.0  # skip the update when the pre-clip norm > grad_clip * skip_factor
    max_consecutive_skips: int = 50

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.grad_clip <= 0 or self.skip_factor <= 0 or self.warmup_steps < 0:
            raise RecipeError("optim.lr, grad_clip and skip_factor must be positive, warmup_steps >= 0")

    @property
    def skip_threshold(self) -> float:
        return self.grad_clip * self.skip_factor


@dataclass(frozen=True)
class TrainingSection:
    steps: int = 10_000
    seed: int = 0
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    log_every: int = 10
    val_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise RecipeError(f"training.precision={self.precision!r}: expected auto, bf16 or fp32")
        if min(self.steps, self.log_every, self.val_every, self.ckpt_every, self.keep_last) <= 0:
            raise RecipeError("training.steps, log_every, val_every, ckpt_every and keep_last must be positive")


@dataclass(frozen=True)
class Recipe:
    name: str = "exp_c"
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES_DIR = resources.files("mouserecon.train") / "recipes"


def available_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in RECIPES_DIR.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a shipped recipe by name (`exp_c`) or a YAML file, then apply `key=value` overrides."""
    raw = _read_with_bases(name_or_path, seen=())
    raw["name"] = Path(name_or_path).stem
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r}: expected section.key=value")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return from_dict(raw, source=str(name_or_path))


def _read_with_bases(name_or_path, seen) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        if str(name_or_path) not in available_recipes():
            raise RecipeError(f"unknown recipe {name_or_path!r}; shipped recipes: {available_recipes()}")
        text, source = (RECIPES_DIR / f"{name_or_path}.yaml").read_text(), f"recipe {name_or_path}"
    else:
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        text, source = path.read_text(), str(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: invalid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if base in seen:
        raise RecipeError(f"{source}: recipe bases form a cycle through {base!r}")
    return _merge(_read_with_bases(base, (*seen, base)), raw)


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for key, value in delta.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _to_float(value, where: str) -> float:
    # YAML 1.1 reads "1e-5" (no dot) as a string; accept any spelling float() accepts.
    try:
        return float(value)
    except ValueError:
        raise RecipeError(f"{where}={value!r} is not a number") from None


def from_dict(raw: dict[str, Any], source: str = "<dict>", cls: type = Recipe) -> Any:
    """Build a (nested) frozen dataclass from a mapping, rejecting unknown keys and converting tuples."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {unknown} in {cls.__name__}; known: {sorted(known)}")
    kwargs = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: {key} must be a mapping")
            kwargs[key] = from_dict(value, f"{source}: {key}", hint)
        elif typing.get_origin(hint) is tuple:
            if not isinstance(value, (list, tuple)):
                raise RecipeError(f"{source}: {key} must be a list, got {value!r}")
            kwargs[key] = tuple(value)
        elif hint is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            kwargs[key] = _to_float(value, f"{source}: {key}")
        elif isinstance(hint, type) and not isinstance(value, hint):
            raise RecipeError(f"{source}: {key}={value!r} should be {hint.__name__}")
        else:
            kwargs[key] = value
    return cls(**kwargs)
