"""The import rule (DESIGN.md §2): `mouserecon/` is the core; `train/`, `eval/` and `viewer/` are apps over it.

The core never imports an app, and no app imports another, so library code (metrics, losses, figures,
run records, the prediction pipeline) lives in the core where every app can use it. The exceptions are
the two composition roots: `mouserecon/cli.py`, which dispatches each command to its app, and
`eval/gpu_check.py`, the one-run GPU check that exercises every app (fine-tuning included) on a GPU
machine. Checked on the source (every `import` statement, at any depth), not by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPS = {"train": "mouserecon.train", "eval": "mouserecon.eval", "viewer": "mouserecon.viewer"}
COMPOSITION_ROOT = ROOT / "mouserecon" / "cli.py"
GPU_CHECK = ROOT / "eval" / "gpu_check.py"  # exercises every app in one run on a GPU machine


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the project uses absolute imports)"
            modules.add(node.module)
            if node.module == "mouserecon":  # from mouserecon import eval
                modules |= {f"mouserecon.{alias.name}" for alias in node.names}
    return modules


def offending(folder: Path, forbidden: list[str], skip: tuple[Path, ...] = ()) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        if path in skip:
            continue
        for module in sorted(imported_modules(path)):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(folder)} imports {module}")
    return found


def test_the_core_imports_no_app():
    assert offending(ROOT / "mouserecon", list(APPS.values()), skip=(COMPOSITION_ROOT,)) == []


def test_no_app_imports_another_app():
    for folder, package in APPS.items():
        others = [p for p in APPS.values() if p != package]
        assert offending(ROOT / folder, others, skip=(GPU_CHECK,)) == [], folder


def test_the_rule_catches_an_offending_import(tmp_path):
    (tmp_path / "core.py").write_text("import os\n\ndef f():\n    from mouserecon.eval.metrics import psnr\n")
    (tmp_path / "clean.py").write_text("from mouserecon.metrics import psnr\nfrom mouserecon import data\n")
    (tmp_path / "sneaky.py").write_text("from mouserecon import viewer\n")
    assert offending(tmp_path, list(APPS.values())) == ["core.py imports mouserecon.eval.metrics",
                                                         "sneaky.py imports mouserecon.viewer"]
