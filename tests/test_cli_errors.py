"""The ``modulart`` command never prints a traceback for a user error.

Every CLI row of the catalogue runs ``main(argv)`` in-process: one line ``modulart: error: ...`` on
stderr, the documented exit status, no traceback, and no file changed. A few run as a real
subprocess (``python -m modulart``) to check what a shell sees. A bug (a non-modulart exception)
keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

import modulart.cli as cli
from error_catalogue import CLI_PENDING, CLI_ROWS, CliRow, Ctx, assert_unchanged, shared_ctx, snapshot
from modulart.cli import EXIT_CODES, main
from modulart.core.errors import ConfigError, IncompatibleArtifactError, UnsupportedModuleError


@pytest.fixture(scope="session")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    return shared_ctx(tmp_path_factory.mktemp)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("modulart: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


RUN = [r for r in CLI_ROWS if r.id not in CLI_PENDING]

# how the Python API names an argument (``overwrite=True``, ``max_shard_size = 'x'``, ``EMoEConfig.top_k``):
# never in a command-line error, which names the flag (``--overwrite``, ``--max-shard-size``, ``--top-k``)
PYTHON_NAMES = re.compile(
    r"=True|\b[a-z]+_[a-z_]+ ?=|\b(?:LayerPlan|EMoEConfig|IntrospectOptions)\.|\b(?:top_k|num_experts)\b"
)


@pytest.mark.parametrize("row", RUN, ids=[r.id for r in RUN])
def test_cli_row(ctx: Ctx, row: CliRow, capsys: pytest.CaptureFixture[str]) -> None:
    argv = row.argv(ctx)
    before = snapshot(ctx, None)
    code = main(argv)
    out = capsys.readouterr()
    line = _one_error_line(out.err)
    assert code == row.code, f"{row.id}: exit {code}, expected {row.code}: {line}"
    assert code in EXIT_CODES
    assert row.match in line, f"{row.id}: {line!r} lacks {row.match!r}"
    advice = line.split("Register an adapter")[0]  # the adapter advice is Python code, by design
    assert not PYTHON_NAMES.search(advice), f"{row.id}: names a Python argument, not a flag: {line!r}"
    assert "modulart: error" not in out.out
    assert_unchanged(before, snapshot(ctx, None))


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["inspect", "{moe}", "--budget-mb", "-1"], 2, "--budget-mb: must be a finite number > 0, got '-1'"),
        (["grow", "{ckpt}", "{user}", "--factor", "2", "--overwrite"], 2, "notes.txt"),
    ],
)
def test_cli_in_a_subprocess(ctx: Ctx, argv: list[str], code: int, fragment: str) -> None:
    args = [a.format(moe=ctx.moe_ckpt, ckpt=ctx.ckpt, user=ctx.user) for a in argv]
    before = snapshot(ctx, None)
    run = subprocess.run([sys.executable, "-m", "modulart", *args], capture_output=True, text=True, timeout=120)
    line = _one_error_line(run.stderr)
    assert run.returncode == code, line
    assert fragment in line
    assert_unchanged(before, snapshot(ctx, None))


def test_a_bug_keeps_its_traceback_and_exits_1(
    ctx: Ctx, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import modulart.introspect.cli as icli

    def broken(*args: object, **kwargs: object) -> int:
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(icli, "run_inspect", broken)
    assert main(["inspect", str(ctx.moe_ckpt)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith("modulart: internal error (a bug")


def test_ctrl_c_exits_130_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import modulart.stacking.cli as scli

    def interrupted(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(scli, "run_grow", interrupted)
    assert main(["grow", "a", "b", "--factor", "2"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "modulart: interrupted"


def test_exit_code_table() -> None:
    from modulart.core.errors import (
        ArtifactNotFoundError,
        NonFiniteError,
        OutOfRangeError,
        SelectorError,
        UnknownArtifactOperatorError,
        UnsafePathError,
    )

    usage = [
        ConfigError("x"),
        SelectorError("x"),
        OutOfRangeError("x"),
        ArtifactNotFoundError("x"),
        cli.UsageError("x"),
    ]
    runtime = [
        IncompatibleArtifactError("x"),
        UnknownArtifactOperatorError("x"),  # an artefact naming an unknown operator: a bad file
        UnsafePathError("x"),  # raised by readers (outputs are checked up front as UsageError)
        UnsupportedModuleError("x"),
        NonFiniteError("x"),
        RuntimeError("x"),
    ]
    assert [cli.exit_code(e) for e in usage] == [2] * len(usage)
    assert [cli.exit_code(e) for e in runtime] == [1] * len(runtime)
    assert cli.exit_code(KeyboardInterrupt()) == 130
    assert set(EXIT_CODES) == {0, 1, 2, 130}
    assert {r.code for r in CLI_ROWS} == {1, 2}  # every failure status is exercised
    assert EXIT_CODES[1].startswith("runtime failure") and EXIT_CODES[2].startswith("usage error")


@pytest.mark.parametrize(
    ("kind", "text", "ok"),
    [
        (cli.positive_number, "0.5", True),
        (cli.positive_number, "0", False),
        (cli.positive_number, "inf", False),
        (cli.positive_number, "nan", False),
        (cli.positive_number, "x", False),
        (cli.positive_int, "1", True),
        (cli.positive_int, "0", False),
        (cli.positive_int, "1.5", False),
        (cli.nonnegative_int, "0", True),
        (cli.nonnegative_int, "-1", False),
    ],
)
def test_argument_types(kind: object, text: str, ok: bool) -> None:
    assert callable(kind)
    if ok:
        kind(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_inspect_overwrite_keeps_other_files_and_the_refusal_names_the_flag(
    ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ctx.dir("own-out")
    (out / "mine.txt").write_text("keep me\n")
    assert main(["inspect", str(ctx.moe_ckpt), "--out", str(out), "--no-plots", "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "pass --overwrite" in line and "overwrite=True" not in line
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    code = main(["inspect", str(ctx.moe_ckpt), "--out", str(out), "--no-plots", "--no-progress", "--overwrite"])
    assert code == 0
    assert (out / "mine.txt").read_text() == "keep me\n" and (out / "report.json").is_file()
