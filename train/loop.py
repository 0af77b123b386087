"""`finetune`: the Exp C training loop, single process or under torchrun (DDP).

One step: fixed input views -> model -> Gaussians -> render the target views -> weighted losses
-> backward -> global grad norm (pre-clip) -> skip rule (same decision on every rank) -> clip ->
AdamW step -> schedule. Everything needed to continue exactly (model, optimiser, scheduler, grad
scaler, step, RNG) is in each checkpoint; the data order is a function of the step.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from mouserecon.device import SLOW_BF16, cpu_has_native_bf16
from mouserecon.errors import MouseReconError
from mouserecon.options import DEFAULT_DEVICE
from mouserecon.checkpoints import load_checkpoint, load_training_state, training_checkpoint
from mouserecon.data import MouseDataset, collate
from mouserecon.figures import comparison_grid, plot_training_curves, save_image
from mouserecon.metrics import foreground_iou, psnr
from mouserecon.model import GSLRM, ModelConfig
from mouserecon.progress import progress
from mouserecon.render import render
from mouserecon.train import distributed
from mouserecon.train.config import DataSection, Recipe
from mouserecon.losses import Losses
from mouserecon.train.optim import make_optimizer, make_scheduler, should_skip
from mouserecon.rundir import RunDir, sample_manifest

log = logging.getLogger(__name__)


class TrainingError(MouseReconError, RuntimeError):
    """Training cannot continue (too many consecutive bad steps, nothing to train on, ...)."""


@dataclass(frozen=True)
class FinetuneOptions:
    data: Path  # folder of samples or a list file
    out: Path  # run directory
    recipe: Recipe
    pretrained: Path | None = None  # FaceLift or mouserecon checkpoint; None = from scratch
    resume: bool = False
    device: str = DEFAULT_DEVICE
    progress: bool = True
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this invocation

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"stop_after must be positive, got {self.stop_after}")


def _autocast(recipe: Recipe, device: torch.device):
    bf16 = recipe.training.precision == "bf16" or (recipe.training.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _rng_state() -> dict:
    """RNG states as tensors and plain data, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def split_samples(dataset: MouseDataset, val_samples: int) -> tuple[list[int], list[int]]:
    """Train / validation indices: the last `val_samples` of the sorted list are held out."""
    n = len(dataset)
    if n <= val_samples:
        raise TrainingError(f"{n} samples but {val_samples} are held out for validation; nothing to train on")
    return list(range(n - val_samples)), list(range(n - val_samples, n))


def target_indices(d: DataSection) -> list[int]:
    """Views rendered for the losses. With data.crop a sample holds the V crops, then the V whole frames
    (MouseDataset): the target views are rendered both ways, the crops for detail and the whole frames
    so that Gaussians off the mouse (which project outside every tight crop) are seen and penalised."""
    targets = list(d.target_views)
    return targets + [d.views_per_sample + t for t in targets] if d.crop else targets


def step_batch(model, batch, recipe: Recipe, losses: Losses, device: torch.device):
    """Forward one batch: predict from the input views, render the target views, weighted losses."""
    d = recipe.data
    images = batch.images.to(device)  # [b, v, 3, h, w]
    masks = batch.masks.to(device)  # [b, v, 1, h, w]
    cameras = batch.cameras.to(device)  # [b, v]
    inputs, targets = list(d.input_views), target_indices(d)
    with _autocast(recipe, device):
        gaussians = model(images[:, inputs], cameras[:, inputs], masks[:, inputs])
    gaussians = gaussians.to(torch.float32)
    want_depth = recipe.loss.depth > 0
    out = render(gaussians, cameras[:, targets], images.shape[-2], images.shape[-1], render_depth=want_depth)
    gt_depth = batch.depths[:, targets].to(device) if want_depth else None
    terms = losses(out.images, images[:, targets], masks[:, targets] if recipe.loss.masked else None,
                   out.alphas, masks[:, targets], out.depths, gt_depth)
    return terms, out


def finetune(opts: FinetuneOptions) -> Path | None:
    """Run (or resume) fine-tuning; returns the last checkpoint written (None on ranks other than 0)."""
    recipe = opts.recipe
    info = distributed.setup(opts.device)
    try:
        return _finetune(opts, recipe, info)
    finally:
        distributed.teardown(info)


def _build_model(opts: FinetuneOptions, recipe: Recipe, device) -> GSLRM:
    if opts.pretrained is not None:
        model, ckpt_info = load_checkpoint(opts.pretrained, device="cpu")
        log.info("starting from %s (%s checkpoint, step %s)", opts.pretrained, ckpt_info.format, ckpt_info.step)
    else:
        # The nominal resolution of a model trained from scratch is the one it is trained at.
        model = GSLRM(ModelConfig.preset(recipe.model.preset, image_size=recipe.data.resolution))
        log.info("starting from scratch: preset %s at %d px", recipe.model.preset, recipe.data.resolution)
    # The model records what it is trained to see (reconstruct and eval feed it exactly that): its inputs'
    # side (data.resolution, also for a pretrained model trained at another) and crop margin.
    hull_depth = model.config.hull_depth if recipe.model.hull_depth is None else recipe.model.hull_depth
    model.config = replace(model.config, grad_checkpoint=recipe.model.grad_checkpoint and device.type == "cuda",
                           input_crop=recipe.data.input_crop, image_size=recipe.data.resolution,
                           hull_depth=hull_depth)
    return model.to(device)


def _restore(path: Path, model, optimizer, scheduler, scaler, info: distributed.DistInfo) -> tuple[int, int]:
    """Load a training checkpoint in place -> (step, skipped_total); RNG state of this rank included."""
    state = load_training_state(path)
    if len(state.rng) != info.world_size:
        raise TrainingError(f"{path} was written by {len(state.rng)} process(es); resume it with as many "
                            f"(this run has {info.world_size}) so the data order continues exactly")
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    scaler.load_state_dict(state.scaler)
    _set_rng_state(state.rng[info.rank])
    return state.step, state.skipped_total


def _finetune(opts: FinetuneOptions, recipe: Recipe, info: distributed.DistInfo) -> Path | None:
    run = RunDir(opts.out)
    device = info.device
    t = recipe.training
    if t.precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        log.warning("training.precision bf16: %s", SLOW_BF16)
    dataset = MouseDataset(opts.data, resolution=recipe.data.resolution,
                           views=range(recipe.data.views_per_sample), normalize=True,
                           fit_views=recipe.data.input_views,  # the frame eval and reconstruct use
                           crop=recipe.data.input_crop,
                           crop_jitter=recipe.data.crop_jitter,
                           depth=recipe.loss.depth > 0)
    train_ids, val_ids = split_samples(dataset, recipe.data.val_samples)

    torch.manual_seed(t.seed)
    model = _build_model(opts, recipe, device)
    optimizer = make_optimizer(model, recipe.optim)
    scheduler = make_scheduler(optimizer, t.steps, recipe.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling; kept for resume
    losses = Losses(recipe.loss).to(device)
    start_step, skipped_total, consecutive = 0, 0, 0

    latest = run.latest_checkpoint() if opts.resume else None
    if opts.resume and latest is None:
        raise TrainingError(f"--resume: no checkpoint in {run.ckpt_dir}")
    if latest is not None:
        start_step, skipped_total = _restore(latest, model, optimizer, scheduler, scaler, info)
        if info.is_main:
            run.truncate_metrics(start_step)
            log.info("resumed from %s at step %d", latest, start_step)
    elif info.is_main:
        if run.latest_checkpoint() is not None:
            raise TrainingError(f"{run.root} already holds a run; pass --resume or choose another --out")
        run.create(recipe.to_dict(), sys.argv, sample_manifest([dataset.sample_dirs[i] for i in range(len(dataset))]))

    ddp_model = DistributedDataParallel(model) if info.enabled else model
    val_batch = collate([dataset.load(i, augment=False) for i in val_ids]) if val_ids else None
    if info.is_main and val_batch is not None and start_step == 0:
        validate(model, val_batch, recipe, losses, device, run, 0)
    end_step = t.steps if opts.stop_after is None else min(t.steps, start_step + opts.stop_after)
    progress = _progress(opts, info, start_step, t.steps)
    last_path = latest
    for step in range(start_step, end_step):
        ids = distributed.batch_indices(step, len(train_ids), recipe.data.batch_size, info, t.seed)
        batch = collate([dataset[train_ids[i]] for i in ids])
        tic = time.perf_counter()
        model.train()
        terms, _ = step_batch(ddp_model, batch, recipe, losses, device)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["total"]).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        skip = distributed.any_rank(should_skip(grad_norm, recipe.optim), info)
        if skip:
            skipped_total, consecutive = skipped_total + 1, consecutive + 1
            log.warning("step %d: skipped update (pre-clip grad norm %.3g > %.3g or not finite)",
                        step, float(grad_norm), recipe.optim.skip_threshold)
            if consecutive >= recipe.optim.max_consecutive_skips:
                raise TrainingError(f"{consecutive} consecutive steps skipped at step {step}: the run has diverged; "
                                    "lower optim.lr or check the data")
        else:
            consecutive = 0
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        done = step + 1
        if info.is_main and (done % t.log_every == 0 or done == t.steps):
            record = {"kind": "train", "step": done, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "skipped": skip, "skipped_total": skipped_total, "sec_per_step": time.perf_counter() - tic,
                      **{k: float(v.detach()) for k, v in terms.items()}, "loss": float(terms["total"].detach())}
            run.log_metrics(record)
        if progress is not None:
            progress.set_postfix(loss=f"{float(terms['total'].detach()):.4f}", skipped=skipped_total)
            progress.update(1)
        if info.is_main and val_batch is not None and (done % t.val_every == 0 or done == t.steps):
            validate(model, val_batch, recipe, losses, device, run, done)
        if done % t.ckpt_every == 0 or done == end_step:
            rng = _gather_rng(info)
            if info.is_main:
                state = training_checkpoint(model, recipe.to_dict(), done, optimizer, scheduler, scaler, skipped_total,
                                            rng)
                last_path = run.save_checkpoint(state, done, t.keep_last)
                plot_training_curves(run.read_metrics(), recipe.optim.skip_threshold, run.root / "curves.png")
    if progress is not None:
        progress.close()
    return last_path


def _gather_rng(info: distributed.DistInfo) -> list[dict]:
    state = _rng_state()
    if not info.enabled:
        return [state]
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _progress(opts, info, start, total):
    if not (opts.progress and info.is_main):
        return None
    return progress(total=total, initial=start, desc="finetune", unit="step")


def white_collapse(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, white: float = 0.9) -> bool:
    """True when the prediction is near-white (every channel >= `white`) on >= 80% of the foreground
    while the ground truth is near-white on < 50% of it: predictions converging to the background.

    pred, gt [..., 3, h, w]; mask [..., 1, h, w] ground-truth foreground.
    """
    fg = mask[..., 0, :, :] > 0.5  # [..., h, w]
    if not fg.any():
        return False
    pred_white = (pred >= white).all(-3)[fg].float().mean()
    gt_white = (gt >= white).all(-3)[fg].float().mean()
    return bool(pred_white >= 0.8 and gt_white < 0.5)


@torch.no_grad()
def validate(model, batch, recipe: Recipe, losses: Losses, device, run: RunDir, step: int) -> dict:
    """Render the validation samples' target views; log whole/masked PSNR and IoU; warn on white collapse."""
    model.eval()
    terms, out = step_batch(model, batch, recipe, losses, device)
    targets = target_indices(recipe.data)
    if recipe.data.crop:  # score the whole frames, as eval does
        targets = targets[len(targets) // 2:]
        out = replace(out, images=out.images[:, -len(targets):], alphas=out.alphas[:, -len(targets):])
    gt = batch.images[:, targets].to(device)  # [b, v, 3, h, w]
    mask = batch.masks[:, targets].to(device)  # [b, v, 1, h, w]
    record = {
        "kind": "val", "step": step, "loss": float(terms["total"]),
        "psnr": float(psnr(out.images, gt).mean()),
        "psnr_masked": float(psnr(out.images, gt, mask).nanmean()),
        "iou": float(foreground_iou(out.alphas, mask).nanmean()),
    }
    record["white_collapse"] = white_collapse(out.images, gt, mask)
    if record["white_collapse"]:
        log.warning("step %d: white collapse: the prediction is near-white on most of the mouse "
                    "(the known failure of naive fine-tuning; see DESIGN.md §1)", step)
    run.log_metrics(record)
    grid = comparison_grid(gt[0], [out.images[0].clamp(0, 1)])
    save_image(run.val_dir / f"step_{step:08d}.png", grid)
    log.info("val step %d: PSNR %.2f dB (masked %.2f dB), IoU %.3f", step, record["psnr"], record["psnr_masked"],
             record["iou"])
    return record
