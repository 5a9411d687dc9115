"""Every script in examples/ runs, checks what it shows and says how to run it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max |" in out.stdout  # each example checks a recomputation and prints its error


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_docstring_says_how_to_run_it(script: Path) -> None:
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc, f"{script.name} has no module docstring"
    assert f"Run: python examples/{script.name}" in doc


def test_readme_links_existing_examples() -> None:
    links = re.findall(r"\]\((examples/[^)]*)\)", (ROOT / "README.md").read_text())
    assert "examples/" in links and len(links) > 1
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to examples that do not exist: {missing}"
