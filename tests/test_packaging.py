"""Packaging promises: light import, README commands in CI, the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light() -> None:
    code = (
        "import sys, modulart; modulart.HookRegistry; modulart.find_ffns; modulart.Operator; "
        "print(sorted({'transformers', 'matplotlib'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve() -> None:
    import modulart as mt

    for name in mt.__all__:
        assert getattr(mt, name) is not None, name
    with pytest.raises(AttributeError):
        _ = mt.no_such_name


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv .+)\n```", text)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    tour, tests = cmds
    assert tour.endswith("modulart tour") and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_cli_version_and_operators(capsys: pytest.CaptureFixture[str]) -> None:
    from modulart.cli import main

    assert main(["version"]) == 0
    assert main(["operators"]) == 0
    assert "emoe" in capsys.readouterr().out.split()  # built-in operators are found without importing them


def test_builtin_operator_found_by_name_in_a_fresh_interpreter() -> None:
    code = "import modulart as mt; print(mt.get_operator('emoe').__name__, mt.available_operators())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("EMoE") and "'emoe'" in out.stdout


@pytest.mark.slow
def test_tour_runs_on_the_real_model() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "modulart", "tour"], capture_output=True, text=True, check=True, timeout=300
    )
    assert "encoder.layer.5" in out.stdout and "model.layers.1.mlp" in out.stdout
    errors = [float(x) for x in re.findall(r"max \|error\| = ([0-9.e+-]+)", out.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-4
    assert "masked rows did not move" in out.stdout  # MIGU step
    changed = re.search(r"changed tensors are: \[(.*)\]", out.stdout)  # KV step: only keys moved
    assert changed and all("intermediate.dense.weight" in t for t in changed.group(1).split(", "))
