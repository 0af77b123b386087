"""The offline GPU check (eval/gpu_check.py) and its preparation step (eval/gpu_prepare.py), on the CPU:
the dependency list the wheel folder is made from (nothing downloaded), and the dry run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from mouserecon.eval import gpu_check, gpu_prepare


def test_wheel_list_is_the_runtime_closure_minus_torch_and_what_the_check_never_imports(tmp_path):
    reqs = gpu_prepare.wheel_requirements()
    pins = {Requirement(r).name: str(Requirement(r).specifier) for r in reqs}
    assert len(pins) == len(reqs) and reqs == sorted(reqs)
    # pinned to what is installed here (what the tests ran with)
    assert all(spec == f"=={version(name)}" for name, spec in pins.items())
    # the project's dependencies, their own (gsplat -> jaxtyping -> wadler-lindig, rich -> markdown-it-py -> mdurl;
    # matplotlib -> ...), pytest with its own, and the build backend
    for name in ("numpy", "gsplat", "packaging", "ninja", "jaxtyping", "wadler-lindig", "rich", "markdown-it-py",
                 "mdurl", "pygments", "pytorch-msssim", "click", "imageio", "pillow", "pyyaml",
                 "matplotlib", "contourpy", "kiwisolver", "fonttools", "python-dateutil", "six", "tqdm", "pytest",
                 "pluggy", "iniconfig", "setuptools"):
        assert name in pins, name
    # preinstalled there with torch, or never imported by the check
    for name in ("torch", "torchvision", "triton", "sympy", "networkx", "jinja2", "filelock", "fsspec",
                 "typing-extensions", "viser", "opencv-python-headless", "av", "gsply", "playwright", "scikit-image",
                 "lpips", "scipy"):
        assert name not in pins, name
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in pins)
    # markers are evaluated for Python 3.12 on Linux: no Windows-only or pre-3.11 backports
    assert not {"colorama", "exceptiongroup", "tomli"} & set(pins)
    # the list follows pyproject.toml: a dependency removed there disappears, an unknown dropped name is refused
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch", "click>=8", "tqdm"]\n')
    assert gpu_prepare.wheel_requirements(pyproject, dropped={}, extra=()) == [f"click=={version('click')}",
                                                                               f"tqdm=={version('tqdm')}"]
    with pytest.raises(ValueError, match="not dependencies"):
        gpu_prepare.wheel_requirements(pyproject, dropped={"viser": "viewer"})
    # the module names the check looks for are those of the dropped distributions
    assert len(gpu_check.DROPPED_MODULES) == len(gpu_prepare.DROPPED)


def test_only_wheels_the_gpu_image_lacks_travel_and_the_install_keeps_what_a_machine_has():
    pins = ["gsplat==1.5.3", "numpy==2.4.6", "plyfile==1.1.5", "setuptools==84.2.1", "tqdm==4.70.1"]
    # numpy, tqdm and setuptools are on the image, but the build backend's wheel travels all the same
    assert gpu_prepare.wheels_to_fetch(pins) == ["gsplat==1.5.3", "plyfile==1.1.5", "setuptools==84.2.1"]
    assert gpu_prepare.wheels_to_fetch(pins, on_image=frozenset()) == pins
    assert gpu_prepare.ON_IMAGE <= {Requirement(r).name for r in gpu_prepare.wheel_requirements()} | {"ninja"}
    machine = {"numpy": "2.5.2", "tqdm": "4.70.1", "setuptools": "80.0"}
    missing, kept = gpu_check.split_requirements(pins, installed=machine.get)
    assert missing == ["gsplat==1.5.3", "plyfile==1.1.5"]
    assert kept == {"numpy": "installed 2.5.2, pinned 2.4.6", "setuptools": "installed 80.0, pinned 84.2.1"}
    # on this Python, everything the check needs is installed (the tests ran with it)
    assert gpu_check.split_requirements(gpu_prepare.wheel_requirements())[0] == []


@pytest.mark.slow
def test_dry_run_runs_every_stage_that_needs_no_cuda_and_reports_the_rest_skipped(tmp_path):
    gpu_prepare.prepare_data(tmp_path / "data", samples=3, resolution=64)
    out = tmp_path / "out" / "gpu_check.json"
    cmd = [sys.executable, "-m", "mouserecon.eval.gpu_check", "--dry-run", "--no-install", "--data",
           str(tmp_path / "data"), "--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    report = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert report["format"] == gpu_check.FORMAT and report["dry_run"] and report["ok"]
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    assert report["install"]["status"] == "ok"
    for name in ("gsplat_compile", "cuda_tests"):
        assert stages[name]["status"] == "skipped" and gpu_check.NO_CUDA in stages[name]["reason"], stages[name]
    for name in ("environment", "render_compare", "model_forward", "finetune", "reconstruct", "sequence"):
        assert stages[name]["status"] == "ok", (name, stages[name])
        assert stages[name]["imported_dropped"] == [], name
    for name in ("render_compare", "model_forward", "finetune", "reconstruct", "sequence"):
        assert stages[name]["cuda"] == f"skipped: {gpu_check.NO_CUDA}"
    assert stages["environment"]["data"]["samples"] == 3
    # the comparison code ran on a real pair of backends (torch vs cpp agree closely on the CPU)
    tiny = stages["render_compare"]["scenes"]["tiny"]
    assert tiny["images"]["max_abs"] < 1e-4 and tiny["worst_cosine"] > 0.999, tiny
    assert stages["model_forward"]["facelift_params"] > 300e6 and stages["model_forward"]["best_s"] > 0
    finetune = stages["finetune"]
    assert finetune["skipped_steps"] == [2] and all(finetune["checks"].values()), finetune
    assert stages["reconstruct"]["runs"]["tiny_random"]["counts"]["written"] > 0
    assert stages["sequence"]["runs"]["tiny_random"]["frames"] == 3
    assert "1 skipped" in stages["cuda_tests"]["summary"], stages["cuda_tests"]
    # the summary table names every stage; each stage left its log beside the report
    for name in ["install", *gpu_check.STAGES]:
        assert name in done.stdout
        assert name == "install" or (out.parent / "gpu_check_logs" / f"{name}.log").is_file()
