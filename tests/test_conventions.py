"""CONVENTIONS.md names, for each convention, the test that enforces it: those tests must exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_convention_names_an_existing_test():
    text = (ROOT / "CONVENTIONS.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| C\d+ \|", line)]
    assert len(rows) >= 8
    for row in rows:
        refs = re.findall(r"`(tests/\w+\.py)::(\w+)`|`::(\w+)`", row)
        assert refs, f"convention row names no test: {row[:60]}"
        current = None
        for path, name, same_file in refs:
            current = path or current
            functions = {n.name for n in ast.walk(ast.parse((ROOT / current).read_text()))
                         if isinstance(n, ast.FunctionDef)}
            assert (name or same_file) in functions, f"{current}::{name or same_file} (from {row[:12]})"
