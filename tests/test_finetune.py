"""`finetune` on CPU with the tiny preset and synthetic mice: learning, exact resume, atomic
checkpoints, the skip rule, and DDP (gloo) equivalence with one process on the same global batch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mouserecon.train import loop as train_loop
from mouserecon.train.config import load_recipe
from mouserecon.train.loop import FinetuneOptions, TrainingError, finetune
from mouserecon.rundir import RunDir

TINY = ["model.preset=tiny", "data.resolution=32", "data.val_samples=2", "optim.warmup_steps=5",
        "training.log_every=1", "training.val_every=1000", "training.ckpt_every=1000"]


@pytest.fixture(scope="module")
def mice(synth_mice) -> Path:
    return synth_mice


def run(mice: Path, out: Path, overrides: list[str], **kwargs) -> Path:
    recipe = load_recipe("exp_c", TINY + overrides)
    return finetune(FinetuneOptions(data=mice, out=out, recipe=recipe, device="cpu", progress=False, **kwargs))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_loss_goes_down_and_heldout_psnr_goes_up(mice, tmp_path):
    last = run(mice, tmp_path / "run", ["training.steps=40", "optim.lr=2e-3", "training.val_every=40"])
    records = RunDir(tmp_path / "run").read_metrics()
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert len(train) == 40 and [r["step"] for r in val] == [0, 40]
    first, final = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert final < 0.7 * first, (first, final)
    # Whole-image held-out PSNR rises. (Foreground PSNR needs far longer runs: 40 steps from scratch
    # mostly learn the white background; the demo model's card reports masked metrics.)
    assert val[1]["psnr"] > val[0]["psnr"] + 1.0, val
    # The run directory is complete.
    root = tmp_path / "run"
    for name in ("recipe.yaml", "command.txt", "versions.json", "manifest.json", "curves.png", "checkpoints/latest"):
        assert (root / name).is_file(), name
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and len(manifest["samples"][0]["sha1"]) == 40
    assert sorted(p.name for p in (root / "val").iterdir()) == ["step_00000000.png", "step_00000040.png"]
    # The checkpoint is a mouserecon model checkpoint: it loads where reconstruct loads models.
    from mouserecon.checkpoints import load_checkpoint

    model, info = load_checkpoint(last)
    assert info.step == 40 and info.config.d == 64 and info.recipe["name"] == "exp_c"


def test_white_collapse_detector():
    gt = torch.full((2, 3, 16, 16), 1.0)
    mask = torch.zeros(2, 1, 16, 16)
    gt[..., 4:12, 4:12], mask[..., 4:12, 4:12] = 0.3, 1.0  # a dark mouse on white
    assert train_loop.white_collapse(torch.ones_like(gt), gt, mask)  # everything white
    assert not train_loop.white_collapse(gt, gt, mask)  # perfect
    nearly = torch.ones_like(gt)
    nearly[..., 4:12, 4:9] = 0.3  # 5 of 8 columns right: 37.5% white on the mouse
    assert not train_loop.white_collapse(nearly, gt, mask)
    white_mouse = torch.ones_like(gt)  # a white mouse predicted white is not a collapse
    assert not train_loop.white_collapse(white_mouse, white_mouse, mask)
    assert not train_loop.white_collapse(gt, gt, torch.zeros_like(mask))


def test_resume_is_exact(mice, tmp_path):
    common = ["training.steps=6", "training.ckpt_every=1000"]
    straight = run(mice, tmp_path / "straight", common)
    half = run(mice, tmp_path / "halves", common, stop_after=3)
    assert half.name == "step_00000003.pt"
    with pytest.raises(TrainingError, match="already holds a run"):
        run(mice, tmp_path / "halves", common)
    resumed = run(mice, tmp_path / "halves", common, resume=True)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight, weights_only=True)["optimizer"]["state"]
    sb = torch.load(resumed, weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # the metrics log has each step once
    steps = [r["step"] for r in RunDir(tmp_path / "halves").read_metrics() if r["kind"] == "train"]
    assert steps == list(range(1, 7))


def test_killed_checkpoint_write_is_never_resumed(mice, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(mice, out, ["training.steps=4", "training.ckpt_every=2"], stop_after=2)
    good = RunDir(out).latest_checkpoint()
    real_save = torch.save

    def killed_save(obj, f):  # write part of the file, then die as a SIGKILL would
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", killed_save)
    with pytest.raises(KeyboardInterrupt):
        run(mice, out, ["training.steps=4", "training.ckpt_every=2"], resume=True)
    monkeypatch.undo()
    assert RunDir(out).latest_checkpoint() == good
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt")) == [good.name]
    torch.load(good, weights_only=True)  # complete
    last = run(mice, out, ["training.steps=4", "training.ckpt_every=2"], resume=True)
    assert last.name == "step_00000004.pt"


def test_skip_rule_leaves_weights_unchanged(mice, tmp_path, monkeypatch):
    real = train_loop.step_batch
    calls = {"n": 0}

    def exploding(model, batch, recipe, losses, device):
        terms, out = real(model, batch, recipe, losses, device)
        calls["n"] += 1
        if model.training and calls["n"] == 3:  # the third training step: a huge gradient
            terms = {**terms, "total": terms["total"] * 1e9}
        return terms, out

    monkeypatch.setattr(train_loop, "step_batch", exploding)
    out = tmp_path / "run"
    run(mice, out, ["training.steps=3", "training.ckpt_every=1", "training.keep_last=5",
                    "data.val_samples=0"])
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    before, after = weights(ckpts[1]), weights(ckpts[2])
    assert all(torch.equal(before[k], after[k]) for k in before)
    records = [r for r in RunDir(out).read_metrics() if r["kind"] == "train"]
    assert [r["skipped"] for r in records] == [False, False, True]
    assert records[-1]["grad_norm"] > 25 and records[-1]["skipped_total"] == 1


def test_consecutive_skips_stop_the_run(mice, tmp_path, monkeypatch):
    real = train_loop.step_batch

    def nan_loss(model, batch, recipe, losses, device):
        terms, out = real(model, batch, recipe, losses, device)
        return {**terms, "total": terms["total"] * float("nan")}, out

    monkeypatch.setattr(train_loop, "step_batch", nan_loss)
    with pytest.raises(TrainingError, match="3 consecutive steps skipped"):
        run(mice, tmp_path / "run", ["training.steps=10", "optim.max_consecutive_skips=3", "data.val_samples=0"])


# finetune under torchrun with a huge gradient injected on rank 1 only, at its second step.
DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from mouserecon.train import loop
    from mouserecon.train.config import load_recipe
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    overrides = sys.argv[3:]
    real = loop.step_batch
    calls = {"n": 0}
    def step_batch(model, batch, recipe, losses, device):
        terms, rendered = real(model, batch, recipe, losses, device)
        calls["n"] += 1
        if model.training and os.environ.get("RANK") == "1" and calls["n"] == 2:
            terms = {**terms, "total": terms["total"] * 1e9}
        return terms, rendered
    loop.step_batch = step_batch
    loop.finetune(loop.FinetuneOptions(data=data, out=out, recipe=load_recipe("exp_c", overrides),
                                       device="cpu", progress=False))
""")


def _torchrun(nproc: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_ddp_matches_single_process_and_skips_on_every_rank(mice, tmp_path):
    common = TINY + ["training.steps=3", "training.ckpt_every=1", "training.keep_last=5", "data.val_samples=0"]
    # The real command line under torchrun: 2 ranks x batch 1 vs 1 process x batch 2.
    for nproc, batch, name in ((2, 1, "ddp"), (1, 2, "single")):
        sets = [a for kv in [*common, f"data.batch_size={batch}"] for a in ("--set", kv)]
        _torchrun(nproc, ["-m", "mouserecon.cli", "finetune", str(mice), "--out", str(tmp_path / name),
                          "--device", "cpu", *sets])
    ddp = weights(tmp_path / "ddp/checkpoints/step_00000003.pt")
    single = weights(tmp_path / "single/checkpoints/step_00000003.pt")
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(ddp[k], weights(tmp_path / "ddp/checkpoints/step_00000001.pt")[k]) for k in ddp)

    # A huge gradient on rank 1 alone makes both ranks skip step 2: weights after step 2 equal those after step 1.
    script = tmp_path / "ddp_inject.py"
    script.write_text(DDP_SCRIPT)
    _torchrun(2, [str(script), str(mice), str(tmp_path / "inject"), *common, "data.batch_size=1"])
    one = weights(tmp_path / "inject/checkpoints/step_00000001.pt")
    two = weights(tmp_path / "inject/checkpoints/step_00000002.pt")
    assert all(torch.equal(one[k], two[k]) for k in one)
    records = [r for r in RunDir(tmp_path / "inject").read_metrics() if r["kind"] == "train"]
    assert [r["skipped"] for r in records] == [False, True, False]


def test_starts_from_pretrained_checkpoint(mice, tmp_path):
    from mouserecon.checkpoints import save_checkpoint
    from mouserecon.model import GSLRM, ModelConfig

    torch.manual_seed(7)
    pretrained = GSLRM(ModelConfig.preset("tiny"))
    save_checkpoint(tmp_path / "pre.pt", pretrained, step=123)
    # lr so small that one step leaves the weights where they started
    last = run(mice, tmp_path / "run", ["training.steps=1", "optim.lr=1e-20", "data.val_samples=0"],
               pretrained=tmp_path / "pre.pt")
    after = weights(last)
    for k, v in pretrained.state_dict().items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-12, msg=k)
    # the tiny preset's nominal side is 64; trained at 32 (TINY), it records 32: what reconstruct feeds it
    from mouserecon.checkpoints import load_checkpoint

    assert pretrained.config.image_size == 64 and load_checkpoint(last)[1].config.image_size == 32


def test_crop_recipe_trains_on_crops_and_whole_frames_and_records_it_in_the_model(mice, tmp_path, monkeypatch):
    from mouserecon.checkpoints import load_checkpoint

    seen = []
    render = train_loop.render

    def recording(gaussians, cameras, height, width, **kwargs):
        seen.append(cameras.intrinsics[0])  # [V, 4] every rendered view of the first sample
        return render(gaussians, cameras, height, width, **kwargs)

    monkeypatch.setattr(train_loop, "render", recording)
    whole = run(mice, tmp_path / "whole", ["training.steps=1", "data.val_samples=0"])
    crop = run(mice, tmp_path / "crop", ["training.steps=1", "data.val_samples=0", "data.crop=true",
                                         "data.crop_margin=0.2", "data.crop_jitter=0.1"])
    assert load_checkpoint(whole)[1].config.input_crop is None
    assert load_checkpoint(crop)[1].config.input_crop == 0.2
    # exp_c renders 6 target views; with crops each twice: zoomed-in crops (larger fx), then the whole frames
    assert len(seen[0]) == 6 and len(seen[1]) == 12
    torch.testing.assert_close(seen[1][6:], seen[0])
    # the crops are aimed at the mouse: principal point at the crop's centre, moved by at most jitter / 4
    side = 32  # data.resolution in TINY
    offset = (seen[1][:6, 2:] - side / 2).abs()
    assert offset.max() <= 0.1 / 4 * side + 1e-3 and not torch.allclose(seen[1][:6], seen[0])


def test_training_checkpoint_reads_back_as_written_and_a_model_only_file_is_refused(mice, tmp_path):
    from mouserecon.checkpoints import CheckpointError, load_checkpoint, load_training_state, save_checkpoint

    last = run(mice, tmp_path / "run", ["training.steps=2"])
    raw = torch.load(last, weights_only=True)  # the file as torch wrote it, read without our reader
    state = load_training_state(last)
    assert (state.step, state.skipped_total, len(state.rng)) == (raw["step"], raw["skipped_total"], 1) == (2, 0, 1)
    assert all(torch.equal(state.model[k], raw["model"][k]) for k in raw["model"])
    assert state.optimizer["param_groups"] == raw["optimizer"]["param_groups"]
    assert state.scheduler == raw["scheduler"] and torch.equal(state.rng[0]["torch"], raw["rng"][0]["torch"])
    model_only = tmp_path / "model.pt"
    save_checkpoint(model_only, load_checkpoint(last)[0])
    with pytest.raises(CheckpointError, match=r"model.pt: not a mouserecon training checkpoint .*missing \['optimizer'"):
        load_training_state(model_only)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(mice, tmp_path, monkeypatch, caplog, native):
    """training.precision bf16 on the CPU: one warning naming the slowdown where the CPU lacks bf16, none
    where it has it."""
    monkeypatch.setattr(train_loop, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger=train_loop.__name__):
        run(mice, tmp_path / "run", ["training.steps=1", "training.precision=bf16", "data.val_samples=0"])
    warned = [r.getMessage() for r in caplog.records if "bf16 instructions" in r.getMessage()]
    assert len(warned) == (0 if native else 1), warned
