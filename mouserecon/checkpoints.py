"""GS-LRM checkpoints: our self-describing format and FaceLift's, both loaded strictly.

Our format (a `torch.save` dict, readable with `weights_only=True`):
    {"format": "mouserecon", "format_version": 1, "model_config": asdict(ModelConfig),
     "model": state_dict (fp32, or fp16 storage), "recipe": dict | None, "step": int | None,
     "versions": {"mouserecon", "torch", "python"}, "metrics": dict (optional)}
A training checkpoint (`finetune`'s `runs/NAME/checkpoints/step_*.pt`) is ours plus the state to
continue exactly: {"optimizer", "scheduler", "scaler" (state dicts), "skipped_total": int, "rng": one
RNG record per rank}; `training_checkpoint` writes it and `load_training_state` reads it back.
FaceLift's format (`utils_train.checkpoint_job`):
    {"model": state_dict, "optimizer", "lr_scheduler", "fwdbwd_pass_step", "param_update_step"}
Its state dict is renamed through `FACELIFT_KEY_MAP`; `loss_calculator.*` keys (the VGG
perceptual-loss network, not part of the model) are dropped with a log line; a DDP `module.`
prefix is stripped; any other unknown, missing or mis-shaped key is an error listing them.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import pickle
import platform
import re
import zipfile
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor

from mouserecon.errors import MouseReconError
from mouserecon.files import atomic_torch_save
from mouserecon.model import GSLRM, ModelConfig

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "mouserecon", 1
DEMO_CHECKPOINT = "demo_checkpoint.pt"  # in the mouserecon.assets package (the demo model, assets/DEMO_MODEL.md)
DROPPED_PREFIX = "loss_calculator."  # FaceLift's loss networks (VGG19 perceptual loss) live in its state dict

# FaceLift state-dict key -> ours; "{i}" is a transformer block index. Complete: every FaceLift
# GS-LRM key (configs/gslrm.yaml, add_refsrc_marker False) has exactly one entry.
FACELIFT_KEY_MAP = {
    "gaussian_position_embeddings": "gaussian_tokens",
    "patch_embedder.1.weight": "patch_embed.weight",
    "input_layer_norm.weight": "input_norm.weight",
    "transformer_layers.{i}.norm1.weight": "blocks.{i}.norm1.weight",
    "transformer_layers.{i}.attn.to_qkv.weight": "blocks.{i}.qkv.weight",
    "transformer_layers.{i}.attn.fc.weight": "blocks.{i}.proj.weight",
    "transformer_layers.{i}.norm2.weight": "blocks.{i}.norm2.weight",
    "transformer_layers.{i}.mlp.mlp.0.weight": "blocks.{i}.mlp_in.weight",
    "transformer_layers.{i}.mlp.mlp.2.weight": "blocks.{i}.mlp_out.weight",
    "gaussian_upsampler.layernorm.weight": "token_head_norm.weight",
    "gaussian_upsampler.linear.weight": "token_head.weight",
    "pixel_gaussian_decoder.0.weight": "pixel_head_norm.weight",
    "pixel_gaussian_decoder.1.weight": "pixel_head.weight",
}
_FACELIFT_PATTERNS = [(re.compile("^" + re.escape(a).replace(r"\{i\}", r"(\d+)") + "$"), b) for a, b in FACELIFT_KEY_MAP.items()]
_OURS_TO_FACELIFT = [(re.compile("^" + re.escape(b).replace(r"\{i\}", r"(\d+)") + "$"), a) for a, b in FACELIFT_KEY_MAP.items()]


class CheckpointError(MouseReconError, ValueError):
    """A checkpoint file is unreadable or does not match the model; the message names file and defect."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    format: str  # "mouserecon" or "facelift"
    config: ModelConfig
    n_params: int
    storage_dtypes: tuple[str, ...]
    step: int | None = None
    recipe: dict | None = None
    versions: dict | None = None
    metrics: dict | None = None
    dropped_keys: tuple[str, ...] = ()


# ---- saving ------------------------------------------------------------------------------------


def model_checkpoint(
    model: GSLRM,
    recipe: dict | None = None,
    step: int | None = None,
    metrics: dict | None = None,
    fp16: bool = False,
) -> dict:
    """Our checkpoint dict for `model` (CPU tensors). A trainer may add its own top-level keys
    (optimizer, scheduler, ...) before saving; the loader ignores keys it does not use.

    `recipe` and `metrics` must be plain JSON-like data so the file loads with weights_only=True.
    """
    for name, value in (("recipe", recipe), ("metrics", metrics)):
        try:
            json.dumps(value, allow_nan=True)
        except TypeError as err:
            raise CheckpointError(f"{name} must be plain JSON-like data ({err})") from None
    state = {k: (v.half() if fp16 else v).detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": asdict(model.config),
        "model": state,
        "recipe": recipe,
        "step": step,
        "versions": {"mouserecon": version("mouserecon"), "torch": str(torch.__version__), "python": platform.python_version()},
    }
    if metrics is not None:
        payload["metrics"] = metrics
    return payload


def save_checkpoint(
    path: str | Path,
    model: GSLRM,
    recipe: dict | None = None,
    step: int | None = None,
    metrics: dict | None = None,
    fp16: bool = False,
) -> None:
    """Write `model_checkpoint(...)` to `path` atomically (temp file + rename). `fp16` halves the size."""
    atomic_torch_save(model_checkpoint(model, recipe=recipe, step=step, metrics=metrics, fp16=fp16), Path(path))


def demo_checkpoint() -> Path:
    """The bundled demo checkpoint's path (it may not exist yet)."""
    return Path(str(importlib.resources.files("mouserecon.assets") / DEMO_CHECKPOINT))


def resolve_checkpoint(checkpoint: Path | None) -> Path:
    """`checkpoint`, or the bundled demo checkpoint when None (logged); a missing file is a CheckpointError."""
    if checkpoint is None:
        checkpoint = demo_checkpoint()
        if not checkpoint.is_file():
            raise CheckpointError(
                f"no checkpoint given and the bundled demo checkpoint ({checkpoint}) is not part of this "
                "installation yet; pass --checkpoint with a mouserecon checkpoint (from `mouserecon finetune`) "
                "or a FaceLift GS-LRM checkpoint (e.g. ckpt_0000000000021125.pt)"
            )
        log.info("no checkpoint given: using the bundled demo checkpoint %s", checkpoint)
    elif not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    return checkpoint


TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "skipped_total", "rng")


@dataclass(frozen=True)
class TrainingState:
    """What a training checkpoint holds beyond the model: enough to continue the run exactly.

    model: our state dict (fp32). optimizer / scheduler / scaler: their state dicts. step: optimizer
    steps done. skipped_total: updates skipped so far. rng: one `{"torch", "python", "numpy", "cuda"}`
    record per rank of the run that wrote it (ranks must match on resume).
    """

    model: dict[str, Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict
    step: int
    skipped_total: int
    rng: list


def training_checkpoint(model: GSLRM, recipe: dict, step: int, optimizer, scheduler, scaler, skipped_total: int,
                        rng: list) -> dict:
    """Our model checkpoint (`model_checkpoint`) plus the training state (see `TrainingState`)."""
    return {**model_checkpoint(model, recipe=recipe, step=step), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "skipped_total": skipped_total,
            "rng": rng}


def load_training_state(path: str | Path) -> TrainingState:
    """Read a training checkpoint written by `training_checkpoint` -> TrainingState; a model-only or FaceLift
    checkpoint, or one missing training keys, is a CheckpointError that names them."""
    obj = _read(path)
    missing = [k for k in (*TRAINING_KEYS, "model", "step") if k not in obj]
    if obj.get("format") != FORMAT or missing:
        raise CheckpointError(f"{path}: not a mouserecon training checkpoint (format {obj.get('format')!r}, "
                              f"missing {missing}); resume needs the run's own checkpoints/step_*.pt")
    return TrainingState(model=obj["model"], optimizer=obj["optimizer"], scheduler=obj["scheduler"],
                         scaler=obj["scaler"], step=obj["step"], skipped_total=obj["skipped_total"], rng=obj["rng"])


# ---- loading -----------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    d_head: int | None = None,
    preset: str | None = None,
    image_size: int | None = None,
) -> tuple[GSLRM, CheckpointInfo]:
    """Read a checkpoint (ours or FaceLift's) -> (fp32 GSLRM in eval mode on `device`, info).

    For FaceLift checkpoints the architecture is inferred from the weight shapes except `d_head`
    (not inferable: pass it, or `preset`; 64 is assumed for d=1024) and the nominal `image_size`
    (default 512, FaceLift's). With `preset`, the weights must have that preset's shapes. Our
    files describe themselves; d_head / preset / image_size, if given, must agree with them.
    """
    obj = _read(path)
    return model_from_checkpoint(obj, str(path), device, d_head=d_head, preset=preset, image_size=image_size)


def model_from_checkpoint(
    obj: dict,
    source: str,
    device: str | torch.device = "cpu",
    d_head: int | None = None,
    preset: str | None = None,
    image_size: int | None = None,
) -> tuple[GSLRM, CheckpointInfo]:
    """As `load_checkpoint`, for a checkpoint dict already in memory; `source` names it in errors."""
    info, state = _parse(obj, source, d_head, preset, image_size)
    with torch.device("meta"):
        model = GSLRM(info.config)
    # copy=True: fresh parameters, never aliasing the (memory-mapped, possibly shared) file storage.
    state = {k: v.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)  # keys and shapes were checked in _parse
    return model.eval(), info


def describe_checkpoint(path: str | Path, d_head: int | None = None) -> str:
    """Human-readable summary for `mouserecon info`: format, config, parameters, step, recipe, versions."""
    info, _ = _parse(_read(path), str(path), d_head, None, None)
    lines = [
        f"checkpoint   {info.path}",
        f"format       {info.format}",
        "config       " + ", ".join(f"{f.name}={getattr(info.config, f.name)}" for f in fields(info.config)),
        f"parameters   {info.n_params:,} (stored as {', '.join(info.storage_dtypes)})",
        f"step         {info.step if info.step is not None else '-'}",
        f"recipe       {json.dumps(info.recipe, sort_keys=True) if info.recipe is not None else '-'}",
        f"versions     {json.dumps(info.versions, sort_keys=True) if info.versions else '-'}",
    ]
    if info.metrics:
        lines.append(f"metrics      {json.dumps(info.metrics, sort_keys=True)}")
    dropped = f"{len(info.dropped_keys)} {DROPPED_PREFIX}* keys (loss network)" if info.dropped_keys else "none"
    lines.append(f"dropped      {dropped}")
    return "\n".join(lines)


def _read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch.save zip archive (truncated, corrupt, or a legacy-format file)")
    try:
        # mmap: FaceLift files also hold the optimizer state (2x the weights), which is never read.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        reason = re.findall(r"Unsupported global: GLOBAL \S+", str(err)) or [str(err)]
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"(weights_only=True): {reason[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(obj).__name__}")
    return obj


def _parse(obj: dict, source: str, d_head: int | None, preset: str | None, image_size: int | None):
    """-> (CheckpointInfo, state dict in our key names), validated against the config's shapes."""
    if obj.get("format") == FORMAT:
        info, state = _parse_ours(obj, source)
        asked = {"d_head": d_head, "image_size": image_size}
        if preset:  # the architecture must match; grad_checkpoint is a training-time switch
            asked |= {k: v for k, v in asdict(ModelConfig.preset(preset)).items() if k != "grad_checkpoint"}
        clash = {k: (getattr(info.config, k), v) for k, v in asked.items() if v is not None and getattr(info.config, k) != v}
        if clash:
            raise CheckpointError(f"{source}: the file's model_config disagrees with the request: (file, asked) = {clash}")
    elif "format" not in obj and isinstance(obj.get("model"), dict):
        info, state = _parse_facelift(obj, source, d_head, preset, image_size)
    else:
        raise CheckpointError(
            f"{source}: not a mouserecon or FaceLift checkpoint (top-level keys {sorted(map(str, obj))}; "
            f"expected 'format': 'mouserecon' or a FaceLift 'model' state dict)"
        )
    rename = (lambda k: _map_key(k, _OURS_TO_FACELIFT) or k) if info.format == "facelift" else (lambda k: k)
    _check_state(state, info.config, source, rename)
    return info, state


def _parse_ours(obj: dict, source: str) -> tuple[CheckpointInfo, dict[str, Tensor]]:
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {obj.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    known = {f.name for f in fields(ModelConfig)}
    raw_config = obj.get("model_config")
    if not isinstance(raw_config, dict) or set(raw_config) - known:
        unknown = sorted(set(raw_config) - known) if isinstance(raw_config, dict) else raw_config
        raise CheckpointError(f"{source}: bad model_config, unknown keys {unknown}")
    try:
        config = ModelConfig(**raw_config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: bad model_config ({err})") from None
    state = _strip_module_prefix(obj["model"])
    info = CheckpointInfo(
        path=source, format=FORMAT, config=config, n_params=_numel(state), storage_dtypes=_dtypes(state),
        step=obj.get("step"), recipe=obj.get("recipe"), versions=obj.get("versions"), metrics=obj.get("metrics"),
    )
    return info, state


def _parse_facelift(obj, source, d_head, preset, image_size) -> tuple[CheckpointInfo, dict[str, Tensor]]:
    state = _strip_module_prefix(obj["model"])
    dropped = tuple(k for k in state if k.startswith(DROPPED_PREFIX))
    if dropped:
        log.info("%s: dropped %d %s* keys (%s parameters): FaceLift's VGG perceptual-loss network, not part of the model",
                 source, len(dropped), DROPPED_PREFIX, f"{sum(state[k].numel() for k in dropped):,}")
    # Unmappable keys keep their FaceLift name, so _check_state reports them as unknown.
    ours = {_map_key(k, _FACELIFT_PATTERNS) or k: v for k, v in state.items() if k not in dropped}
    config = _infer_facelift_config(ours, source, d_head, preset, image_size)
    step = obj.get("param_update_step")
    info = CheckpointInfo(
        path=source, format="facelift", config=config, n_params=_numel(ours), storage_dtypes=_dtypes(ours),
        step=int(step) if step is not None else None, dropped_keys=dropped,
    )
    return info, ours


def _map_key(key: str, patterns) -> str | None:
    for pattern, target in patterns:
        match = pattern.match(key)
        if match:
            return target.format(i=match.group(1)) if match.groups() else target
    return None


def _infer_facelift_config(state, source, d_head, preset, image_size) -> ModelConfig:
    """Architecture from the weight shapes (our key names); d_head and image_size are not in them."""
    needed = ["gaussian_tokens", "patch_embed.weight", "token_head.weight"]
    missing = [_map_key(k, _OURS_TO_FACELIFT) for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing}; cannot infer the architecture")
    n_gaussians, d = state["gaussian_tokens"].shape
    patch = round((state["patch_embed.weight"].shape[1] / 9) ** 0.5)
    n_sh = (state["token_head.weight"].shape[0] - 11) / 3
    sh_degree = round(n_sh**0.5) - 1
    n_layer = 1 + max((int(k.split(".")[1]) for k in state if re.match(r"blocks\.\d+\.", k)), default=-1)
    if preset is not None:
        config = ModelConfig.preset(preset)
        if image_size is not None:
            config = ModelConfig.preset(preset, image_size=image_size)
        inferred = {"d": d, "n_layer": n_layer, "patch_size": patch, "sh_degree": sh_degree, "n_gaussians": n_gaussians}
        if d_head is not None:
            inferred["d_head"] = d_head
        wrong = {k: (v, getattr(config, k)) for k, v in inferred.items() if getattr(config, k) != v}
        if wrong:
            raise CheckpointError(f"{source}: checkpoint does not fit preset {preset!r}: (checkpoint, preset) = {wrong}")
        return config
    if d_head is None:
        if d != 1024:
            raise CheckpointError(
                f"{source}: d_head cannot be inferred from the weight shapes (d={d}); pass d_head (or a preset)"
            )
        d_head = 64  # FaceLift's configs/gslrm.yaml
    try:
        return ModelConfig(d=d, d_head=d_head, n_layer=n_layer, patch_size=patch, n_gaussians=n_gaussians,
                           sh_degree=sh_degree, image_size=image_size or 512)
    except ValueError as err:
        raise CheckpointError(f"{source}: inferred architecture is invalid ({err})") from None


def _check_state(state: dict[str, Tensor], config: ModelConfig, source: str, rename) -> None:
    """Raise listing every missing, unknown and mis-shaped key (named by `rename`, the file's own names)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GSLRM(config).state_dict().items()}
    not_tensor = sorted(rename(k) for k, v in state.items() if not isinstance(v, Tensor))
    missing = sorted(rename(k) for k in set(expected) - set(state))
    unknown = sorted(rename(k) for k in set(state) - set(expected))
    shapes = sorted(f"{rename(k)}: {tuple(state[k].shape)} != {tuple(expected[k])}"
                    for k in set(expected) & set(state) if isinstance(state[k], Tensor) and state[k].shape != expected[k])
    problems = [f"{name} {items}" for name, items in
                (("missing keys", missing), ("unknown keys", unknown), ("wrong shapes", shapes), ("not tensors", not_tensor))
                if items]
    if any(k.startswith("view_type_embeddings") for k in unknown):
        problems.append("(view_type_embeddings means FaceLift's add_refsrc_marker=True, which is not supported)")
    if problems:
        raise CheckpointError(f"{source}: state dict does not match the model: " + "; ".join(problems))


def _strip_module_prefix(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _numel(state: dict[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values() if isinstance(v, Tensor))


def _dtypes(state: dict[str, Tensor]) -> tuple[str, ...]:
    return tuple(sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if isinstance(v, Tensor)}))
