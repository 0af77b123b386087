"""Checkpoints: FaceLift's format (key map, dropped loss keys, strict errors), ours (round trip), safety."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mouserecon.cameras import Cameras
from mouserecon.checkpoints import (
    CheckpointError,
    describe_checkpoint,
    load_checkpoint,
    model_checkpoint,
    save_checkpoint,
)
from mouserecon.cli import main
from mouserecon.model import GSLRM, PRESETS, ModelConfig

# VGG19 conv shapes of FaceLift's perceptual loss, as listed in ../shared/golden/README.md.
VGG_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256)] + [(256, 256)] * 3 + [(256, 512)] + [(512, 512)] * 7


def facelift_shapes(d=1024, n_layer=24, p=8, c=9, ng=2, sh=0) -> dict[str, tuple[int, ...]]:
    """FaceLift's GS-LRM state-dict keys and shapes, written from the golden README's table."""
    g = 11 + 3 * (sh + 1) ** 2
    shapes = {"gaussian_position_embeddings": (ng, d), "patch_embedder.1.weight": (d, p * p * c),
              "input_layer_norm.weight": (d,)}
    for i in range(n_layer):
        shapes |= {f"transformer_layers.{i}.norm1.weight": (d,), f"transformer_layers.{i}.norm2.weight": (d,),
                   f"transformer_layers.{i}.attn.to_qkv.weight": (3 * d, d),
                   f"transformer_layers.{i}.attn.fc.weight": (d, d),
                   f"transformer_layers.{i}.mlp.mlp.0.weight": (4 * d, d),
                   f"transformer_layers.{i}.mlp.mlp.2.weight": (d, 4 * d)}
    return shapes | {"gaussian_upsampler.layernorm.weight": (d,), "gaussian_upsampler.linear.weight": (g, d),
                     "pixel_gaussian_decoder.0.weight": (d,), "pixel_gaussian_decoder.1.weight": (p * p * g, d)}


def vgg_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i, (cin, cout) in enumerate(VGG_CHANNELS, start=1):
        prefix = f"loss_calculator.perceptual_loss_module.net.conv{i}"
        shapes |= {f"{prefix}.weight": (cout, cin, 3, 3), f"{prefix}.bias": (cout,)}
    return shapes


def facelift_checkpoint(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """A FaceLift-style checkpoint whose tensors are views of one random buffer (so torch.save writes
    that buffer once, not 1.2 GB), with optimizer / scheduler / step entries beside the model."""
    biggest = max(torch.Size(s).numel() for s in shapes.values())
    buffer = torch.randn(biggest + len(shapes), generator=torch.Generator().manual_seed(seed))
    # each key starts at its own offset, so a mis-mapped key reads different numbers
    state = {k: buffer[i:i + torch.Size(s).numel()].view(s) for i, (k, s) in enumerate(shapes.items())}
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4, "params": [0, 1]}]},
            "lr_scheduler": {"last_epoch": 21125, "_step_count": 21126}, "fwdbwd_pass_step": 21125,
            "param_update_step": 21125}


def test_facelift_preset_checkpoint_loads(tmp_path, caplog):
    shapes = facelift_shapes()
    ckpt = facelift_checkpoint(shapes | vgg_shapes())
    assert len(vgg_shapes()) == 32 and sum(torch.Size(s).numel() for s in vgg_shapes().values()) == 20_024_384
    path = tmp_path / "ckpt_0000000000021125.pt"
    torch.save(ckpt, path)
    with caplog.at_level(logging.INFO, logger="mouserecon.checkpoints"):
        model, info = load_checkpoint(path)
    assert info.format == "facelift" and info.step == 21125
    assert info.config == PRESETS["facelift"]
    assert info.n_params == model.num_parameters() == 303_565_824
    assert len(info.dropped_keys) == 32
    assert [r.message for r in caplog.records if "dropped 32 loss_calculator.* keys" in r.message]
    ours = model.state_dict()
    for facelift_key, our_key in [("transformer_layers.17.attn.fc.weight", "blocks.17.proj.weight"),
                                  ("transformer_layers.3.mlp.mlp.2.weight", "blocks.3.mlp_out.weight"),
                                  ("pixel_gaussian_decoder.1.weight", "pixel_head.weight"),
                                  ("gaussian_position_embeddings", "gaussian_tokens")]:
        assert torch.equal(ours[our_key], ckpt["model"][facelift_key]), our_key
    # parameters are fresh tensors, not views of the shared buffer
    assert len({t.untyped_storage().data_ptr() for t in model.parameters()}) == len(list(model.parameters()))
    del model, ours

    renamed = dict(ckpt["model"])
    renamed["transformer_layers.7.attn.proj.weight"] = renamed.pop("transformer_layers.7.attn.fc.weight")
    torch.save({**ckpt, "model": renamed}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['transformer_layers\.7\.attn\.fc\.weight'\]"
                                              r".*unknown keys \['transformer_layers\.7\.attn\.proj\.weight'\]"):
        load_checkpoint(path)

    missing = {k: v for k, v in ckpt["model"].items() if k != "pixel_gaussian_decoder.0.weight"}
    torch.save({**ckpt, "model": missing}, path)
    with pytest.raises(CheckpointError, match=r"ckpt_0000000000021125\.pt.*missing keys \['pixel_gaussian_decoder\.0\.weight'\]"):
        load_checkpoint(path)


def test_module_prefix_wrong_shape_and_d_head(tmp_path):
    shapes = facelift_shapes(d=64, n_layer=2)
    ckpt = facelift_checkpoint(shapes)
    path = tmp_path / "ddp.pt"
    torch.save({**ckpt, "model": {f"module.{k}": v for k, v in ckpt["model"].items()}}, path)
    with pytest.raises(CheckpointError, match="d_head cannot be inferred"):
        load_checkpoint(path)
    model, info = load_checkpoint(path, d_head=16)
    assert (info.config.d, info.config.d_head, info.config.n_layer) == (64, 16, 2)
    assert torch.equal(model.blocks[1].qkv.weight, ckpt["model"]["transformer_layers.1.attn.to_qkv.weight"])
    with pytest.raises(CheckpointError, match="does not fit preset 'facelift'"):
        load_checkpoint(path, preset="facelift")
    with pytest.raises(CheckpointError, match=r"'d_head': \(32, 16\)"):
        load_checkpoint(path, preset="tiny", d_head=32)
    model, info = load_checkpoint(path, preset="tiny")
    assert info.config == PRESETS["tiny"]

    bad = facelift_checkpoint(shapes | {"transformer_layers.1.mlp.mlp.0.weight": (128, 64)})
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"wrong shapes \['transformer_layers\.1\.mlp\.mlp\.0\.weight: \(128, 64\)"):
        load_checkpoint(path, d_head=16)

    marker = facelift_checkpoint(facelift_shapes(d=64, n_layer=1) | {"view_type_embeddings": (2, 64)})
    torch.save(marker, path)
    with pytest.raises(CheckpointError, match="add_refsrc_marker"):
        load_checkpoint(path, d_head=16)


class _Payload:
    """Unpickling this calls open(marker, 'w'): arbitrary code a weights-only loader must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_arbitrary_pickle_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    ckpt = facelift_checkpoint(facelift_shapes(d=64, n_layer=1))
    torch.save({**ckpt, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load.*Unsupported global: GLOBAL io\.open"):
        load_checkpoint(path, d_head=16)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a torch\.save zip archive"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt: not a mouserecon or FaceLift checkpoint"):
        load_checkpoint(other)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GSLRM(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for t in model.parameters():
            t.add_(torch.randn_like(t) * 0.1)
    return model


def _inputs():
    """Three cameras on a circle of radius 2.7 looking at the origin (OpenCV axes), and random images."""
    c2w = torch.eye(4).repeat(1, 3, 1, 1)
    for i, angle in enumerate(torch.tensor([0.0, 2.0, 4.0])):
        eye = 2.7 * torch.stack([angle.cos(), angle.sin(), torch.tensor(0.0)])
        fwd = -eye / 2.7
        right = torch.stack([-angle.sin(), angle.cos(), torch.tensor(0.0)])
        c2w[0, i, :3, :3] = torch.stack([right, torch.linalg.cross(fwd, right), fwd], -1)
        c2w[0, i, :3, 3] = eye
    intrinsics = torch.tensor([[[26.0, 27.0, 12.0, 8.0]] * 3])
    images = torch.rand(1, 3, 3, 16, 24, generator=torch.Generator().manual_seed(5))
    return images, Cameras(c2w, intrinsics, width=24, height=16)


def test_our_format_round_trip(tmp_path):
    model = _tiny_model()
    path = tmp_path / "tiny.pt"
    recipe = {"name": "exp_c", "lr": 1e-4, "views": [0, 1, 2]}
    save_checkpoint(path, model, recipe=recipe, step=1234, metrics={"psnr": 21.5})
    save_checkpoint(path, model, recipe=recipe, step=1234, metrics={"psnr": 21.5})  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt"], "no temp files left behind"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "mouserecon" and raw["format_version"] == 1 and raw["model_config"]["d"] == 64
    loaded, info = load_checkpoint(path)
    assert (info.format, info.step, info.recipe, info.metrics) == ("mouserecon", 1234, recipe, {"psnr": 21.5})
    assert info.config == model.config and set(info.versions) == {"mouserecon", "torch", "python"}
    assert load_checkpoint(path, preset="tiny", d_head=16)[1].config == PRESETS["tiny"]
    with pytest.raises(CheckpointError, match=r"disagrees with the request.*'d': \(64, 1024\)"):
        load_checkpoint(path, preset="facelift")
    images, cameras = _inputs()
    with torch.no_grad():
        a, b = model(images, cameras), loaded(images, cameras)
    for name in ("means", "sh", "log_scales", "quats", "opacity_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_trainer_keys_beside_our_payload(tmp_path):
    """A trainer saves model_checkpoint(...) plus its own state; the file still loads as a model."""
    model = _tiny_model(2)
    path = tmp_path / "step_00000010.pt"
    torch.save({**model_checkpoint(model, recipe={"name": "exp_c"}, step=10),
                "optimizer": {"state": {}, "param_groups": []}, "rng": [torch.get_rng_state()]}, path)
    loaded, info = load_checkpoint(path)
    assert info.step == 10 and info.recipe == {"name": "exp_c"}
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name


def test_fp16_storage_loads_into_fp32(tmp_path):
    model = _tiny_model(1)
    save_checkpoint(tmp_path / "fp32.pt", model)
    save_checkpoint(tmp_path / "fp16.pt", model, fp16=True)
    assert (tmp_path / "fp16.pt").stat().st_size < 0.6 * (tmp_path / "fp32.pt").stat().st_size
    loaded, info = load_checkpoint(tmp_path / "fp16.pt")
    assert info.storage_dtypes == ("float16",)
    for name, t in loaded.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, model.state_dict()[name].half().float()), name


def test_our_format_errors(tmp_path):
    model = _tiny_model()
    path = tmp_path / "tiny.pt"
    with pytest.raises(CheckpointError, match="recipe must be plain JSON-like"):
        save_checkpoint(path, model, recipe={"optimizer": object()})
    save_checkpoint(path, model)
    raw = torch.load(path, weights_only=True)
    for change, message in [({"format_version": 2}, "format_version 2"),
                            ({"model_config": {**raw["model_config"], "dropout": 0.1}}, r"unknown keys \['dropout'\]"),
                            ({"model": {**raw["model"], "extra.weight": torch.zeros(1)}}, r"unknown keys \['extra\.weight'\]")]:
        torch.save({**raw, **change}, path)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_describe_and_cli_info(tmp_path):
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, _tiny_model(), recipe={"name": "exp_c"}, step=77)
    text = describe_checkpoint(path)
    n = _tiny_model().num_parameters()
    assert "format       mouserecon" in text and f"{n:,}" in text and "step         77" in text
    assert '"name": "exp_c"' in text and "d=64" in text and "d_head=16" in text
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == text
    facelift = tmp_path / "facelift.pt"
    torch.save(facelift_checkpoint(facelift_shapes(d=64, n_layer=1) | vgg_shapes()), facelift)
    result = CliRunner().invoke(main, ["info", str(facelift)])
    assert result.exit_code != 0 and "d_head cannot be inferred" in result.output
    result = CliRunner().invoke(main, ["info", str(facelift), "--d-head", "16"])
    assert result.exit_code == 0, result.output
    assert "format       facelift" in result.output and "dropped      32 loss_calculator.* keys" in result.output
    assert "step         21125" in result.output


def test_export_drops_training_state_and_stores_fp16(tmp_path):
    torch.manual_seed(3)
    model = GSLRM(ModelConfig.preset("tiny"))
    training = {**model_checkpoint(model, recipe={"name": "r"}, step=7, metrics={"psnr": 1.5}),
                "optimizer": {"state": {0: {"exp_avg": torch.ones(1000, 100)}}}}
    source = tmp_path / "step_7.pt"
    torch.save(training, source)
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(main, ["export", str(source), "-o", str(out), "--fp16"])
    assert result.exit_code == 0, result.output
    stored = torch.load(out, weights_only=True)
    assert "optimizer" not in stored and stored["step"] == 7 and stored["recipe"] == {"name": "r"}
    assert {v.dtype for v in stored["model"].values()} == {torch.float16}
    loaded, info = load_checkpoint(out)
    assert info.metrics == {"psnr": 1.5}
    for name, value in model.state_dict().items():  # fp32 weights, rounded once to fp16
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float(), rtol=0, atol=0)
    refused = CliRunner().invoke(main, ["export", str(out), "-o", str(out)])
    assert refused.exit_code == 1 and "refusing to overwrite" in refused.output
