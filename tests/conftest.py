"""Shared fixtures. Reference data made by others lives in ../shared (never copied here)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# gsplat JIT-compiles CUDA on first use; keep any such attempt out of the user's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="mouserecon-torch-ext-"))

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
