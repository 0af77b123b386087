"""Sequences: `reconstruct SAMPLES/ -o OUT/` gives each frame the Gaussians a single reconstruct gives,
resumes (also after kill -9), refuses files of another model, records a corrupt frame and goes on, and shards
across torchrun ranks with outputs equal, byte for byte, to one process's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mouserecon.cli import main
from mouserecon.options import ReconstructOptions, SequenceOptions
from mouserecon.ply import load_ply
from mouserecon.reconstruct import reconstruct
from mouserecon.sequence import INDEX, SequenceError, read_index, reconstruct_sequence

NUM = 6


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """Six synthetic mice as a sequence: sample_00000 ... sample_00005 (frame index from the name)."""
    from mouserecon.synth.generate import generate_dataset

    root = tmp_path_factory.mktemp("sequence") / "samples"
    generate_dataset(root, n=NUM, seed=40, resolution=64, units="mm")
    return root


def ply_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("mouse_*.ply"))}


def test_frames_equal_single_reconstructs_and_the_index_lists_them(samples, tiny_checkpoint, tmp_path):
    out = tmp_path / "seq"
    result = reconstruct_sequence(SequenceOptions(samples, out, tiny_checkpoint, "cpu", batch_size=4, workers=0))
    assert result.written == list(range(NUM)) and result.failed == [] and result.resumed == []
    index = read_index(out)
    assert [f["frame"] for f in index["frames"]] == list(range(NUM))
    assert index["model"]["path"] == str(tiny_checkpoint) and index["failed"] == []
    for frame in (0, 5):  # batches of 4 and 2
        single = tmp_path / f"single_{frame}.ply"
        reconstruct(ReconstructOptions(samples / f"sample_{frame:05d}", single, tiny_checkpoint, "cpu"))
        a, b = load_ply(single), load_ply(out / f"mouse_{frame:06d}.ply")
        assert a.num == b.num
        for name in ("means", "sh", "log_scales", "quats", "opacity_logits"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-5)


def test_rerun_skips_complete_frames_and_refuses_another_models_files(samples, tiny_checkpoint, tmp_path):
    out = tmp_path / "seq"
    reconstruct_sequence(SequenceOptions(samples, out, tiny_checkpoint, "cpu", batch_size=2, workers=0))
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("mouse_*")}
    again = reconstruct_sequence(SequenceOptions(samples, out, tiny_checkpoint, "cpu", workers=0))
    assert again.resumed == list(range(NUM)) and again.written == []
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    with pytest.raises(SequenceError, match=r"mouse_000000.json: made by another model.*model \{.*'step': None"):
        reconstruct_sequence(SequenceOptions(samples, out, None, "cpu", workers=0))  # the demo model
    with pytest.raises(SequenceError, match=r"min_opacity: 0.005 \(wanted 0.1\)"):
        reconstruct_sequence(SequenceOptions(samples, out, tiny_checkpoint, "cpu", min_opacity=0.1, workers=0))
    redo = reconstruct_sequence(SequenceOptions(samples, out, tiny_checkpoint, "cpu", min_opacity=0.1, workers=0,
                                                overwrite=True))
    assert redo.written == list(range(NUM))
    assert read_index(out)["min_opacity"] == 0.1


def test_a_corrupt_frame_is_recorded_and_the_others_are_written(samples, tiny_checkpoint, tmp_path):
    broken = tmp_path / "samples"
    shutil.copytree(samples, broken)
    (broken / "sample_00003" / "images" / "cam_002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "seq"
    result = CliRunner().invoke(main, ["reconstruct", str(broken), "-o", str(out), "--checkpoint",
                                       str(tiny_checkpoint), "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 1, result.output
    index = read_index(out)
    assert [f["frame"] for f in index["frames"]] == [0, 1, 2, 4, 5]
    (failure,) = index["failed"]
    assert failure["frame"] == 3 and "cam_002.png" in failure["error"]


def test_missing_index_and_bad_options(samples, tiny_checkpoint, tmp_path):
    with pytest.raises(SequenceError, match=r"sequence.json: no sequence index"):
        read_index(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["reconstruct", str(samples), "-o", str(tmp_path / "x.ply")])
    assert result.exit_code != 0 and "into a folder, not one .ply" in result.output
    result = runner.invoke(main, ["reconstruct", str(samples / "sample_00000"), "-o", str(tmp_path / "x.ply"),
                                  "--batch-size", "2"])
    assert result.exit_code != 0 and "only for several samples" in result.output


def _command(samples: Path, out: Path, checkpoint: Path) -> list[str]:
    return ["-m", "mouserecon.cli", "reconstruct", str(samples), "-o", str(out), "--checkpoint", str(checkpoint),
            "--device", "cpu", "--batch-size", "1", "--workers", "0"]


@pytest.mark.slow
def test_torchrun_shards_equal_one_process_byte_for_byte(samples, tiny_checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *_command(samples, tmp_path / "single", tiny_checkpoint)], env=env, check=True,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *_command(samples, tmp_path / "ranks", tiny_checkpoint)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ply_bytes(tmp_path / "ranks") == ply_bytes(tmp_path / "single") and len(ply_bytes(tmp_path / "single")) == NUM
    index = read_index(tmp_path / "ranks")
    assert index["ranks"] == 2 and [f["frame"] for f in index["frames"]] == list(range(NUM))
    assert not list((tmp_path / "ranks").glob(f".{INDEX}.rank*"))


def test_kill_9_then_rerun_equals_an_uninterrupted_run(samples, tiny_checkpoint, tmp_path, kill_mid_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *_command(samples, tmp_path / "whole", tiny_checkpoint)], env=env, check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    kill_mid_run([sys.executable, *_command(samples, out, tiny_checkpoint)], lambda: len(list(out.glob("mouse_*.json"))),
                 NUM, env)
    subprocess.run([sys.executable, *_command(samples, out, tiny_checkpoint)], env=env, check=True, capture_output=True)
    assert ply_bytes(out) == ply_bytes(tmp_path / "whole")
    listed = [[(f["frame"], f["ply"], f["gaussians"]) for f in read_index(o)["frames"]] for o in (out, tmp_path / "whole")]
    assert listed[0] == listed[1] and len(listed[0]) == NUM
