"""Run a benchmark script in its ``--quick`` setting and check the JSON keys every benchmark writes.

The smoke tests never look at timing values (the machines are noisy); they check that the script runs,
writes the conventional keys, and that its targets are ratios it measured.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMMON_KEYS = ("benchmark", "setting", "threads", "torch", "ratios", "targets", "met", "curves", "notes")


def run_quick(name: str, tmp_path: Path, *extra: str, timeout: float = 300) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py --quick --out <tmp_path>/<name>.json [extra]``; return its checked JSON."""
    out = tmp_path / f"{name}.json"
    script = ROOT / "benchmarks" / f"{name}.py"
    cmd = [sys.executable, str(script), "--quick", "--out", str(out), *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=timeout)
    result: dict[str, Any] = json.loads(out.read_text())
    for key in COMMON_KEYS:
        assert key in result, key
    assert set(result["targets"]) <= set(result["ratios"]), "every target names a measured ratio"
    assert set(result["met"]) == set(result["targets"]) | set(result.get("targets_min", {}))
    assert all(isinstance(n, str) for n in result["notes"])
    if result["curves"] and importlib.util.find_spec("matplotlib") is not None:
        assert out.with_name(out.stem + "_curves.png").is_file(), "curves measured but not drawn"
    return result
