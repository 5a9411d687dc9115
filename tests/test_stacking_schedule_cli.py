"""modulart.stacking: the growth-timing guideline and the ``grow`` command line."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hst
from safetensors.torch import load_file

import modulart.stacking as st
from families import build
from modulart.core.errors import ConfigError
from modulart.stacking.cli import add_grow_parser, run_grow


# --- schedule -----------------------------------------------------------------------------------
def test_paper_example_7b() -> None:
    with pytest.warns(UserWarning, match="beyond the fitted range"):
        s = st.gstack_schedule(n_params=7e9, n_tokens=2e12, tokens_per_step=2**21)
    assert s.growth_tokens == pytest.approx(11.11e9, rel=1e-3)
    assert s.growth_factor == 4 and s.extrapolated
    assert s.small_steps == math.ceil(s.growth_tokens / 2**21)
    assert s.compute_flops == pytest.approx(8.4e22)
    assert (s.grown_lr.warmup_steps, s.grown_lr.peak, s.grown_lr.final) == (3000, 3e-4, 3e-5)
    assert (s.small_lr.peak, s.small_lr.final) == (1e-3, 1e-4) and s.grown_lr.optimizer_state == "reset"


def test_no_warning_inside_fitted_range() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = st.gstack_schedule(n_params=410e6, n_tokens=7e10)
    assert not s.extrapolated and s.small_steps is None


@given(n=hst.floats(1e7, 3e9), d1=hst.floats(1e9, 1e11), ratio=hst.floats(1.5, 100))
def test_growth_timing_falls_with_compute_at_fixed_n(n: float, d1: float, ratio: float) -> None:
    # log10(d) = 0.88 log10 N + 163.27 / log10(6 N D) - 5.74: at fixed N, d falls as D grows
    assert st.growth_tokens(n, d1 * ratio) < st.growth_tokens(n, d1)
    want = 10 ** (0.88 * math.log10(n) + 163.27 / math.log10(6 * n * d1) - 5.74)
    assert st.growth_tokens(n, d1) == pytest.approx(want, rel=1e-12)


def test_schedule_errors() -> None:
    with pytest.raises(ConfigError, match="n_params = -1"):
        st.gstack_schedule(-1, 1e9)
    with pytest.raises(ConfigError, match="tokens_per_step = 0"):
        st.gstack_schedule(1e8, 1e9, 0)
    r = st.LRRecipe(warmup_steps=10, peak=1e-3, final=1e-4)
    assert r.lr_at(9, 100) == pytest.approx(1e-3) and r.lr_at(100, 100) == pytest.approx(1e-4)
    assert r.lr_at(10, 100) > r.lr_at(50, 100) > r.lr_at(90, 100)


# --- CLI ----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modulart")
    add_grow_parser(parser.add_subparsers(dest="command"))
    return parser


def _ckpt(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = build("gpt2").model
    d = tmp_path / "small"
    model.save_pretrained(d)
    return model, d


def test_cli_factor_and_plan(tmp_path: Path) -> None:
    model, src = _ckpt(tmp_path)
    lines: list[str] = []
    args = _parser().parse_args(["grow", str(src), str(tmp_path / "big"), "--factor", "2", "--no-progress"])
    assert run_grow(args, lines.append) == 0
    assert "0-1,0-1 (2 -> 4 layers)" in lines[0] and "transformer.h" in lines[0]
    got = load_file(str(tmp_path / "big" / "model.safetensors"))
    want = st.grow(model, 2).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((tmp_path / "big" / "config.json").read_text())["n_layer"] == 4
    args = _parser().parse_args(
        ["grow", str(src), str(tmp_path / "p"), "--plan", "0-1,1", "--operator", "zero", "--no-progress"]
    )
    assert run_grow(args, lines.append) == 0
    got = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert not got["transformer.h.2.attn.c_proj.weight"].any() and not got["transformer.h.2.mlp.c_proj.bias"].any()
    assert torch.equal(got["transformer.h.2.attn.c_attn.weight"], got["transformer.h.1.attn.c_attn.weight"])


def test_cli_bad_plan_reports_and_writes_nothing(tmp_path: Path) -> None:
    _, src = _ckpt(tmp_path)
    lines: list[str] = []
    args = _parser().parse_args(["grow", str(src), str(tmp_path / "big"), "--plan", "0-2", "--no-progress"])
    assert run_grow(args, lines.append) == 2
    assert "--plan '0-2': position 2 names layer 2: the source model has 2 layers" in lines[-1]
    assert not (tmp_path / "big").exists()
    with pytest.raises(SystemExit):
        _parser().parse_args(["grow", "a", "b", "--factor", "2", "--plan", "0-1"])


def test_cli_pth_source(tmp_path: Path) -> None:
    model = build("plain").model
    torch.save({"model": model.state_dict()}, tmp_path / "lit.pth")
    args = _parser().parse_args(["grow", str(tmp_path / "lit.pth"), str(tmp_path / "out"), "--dus", "1"])
    assert run_grow(args, print) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["blocks.2.attn.in_proj_weight"], model.blocks[1].attn.in_proj_weight)
    assert len({k.split(".")[1] for k in got if k.startswith("blocks.")}) == 4


@pytest.mark.slow
def test_checkpoint_benchmark_quick(tmp_path: Path) -> None:
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "growth_checkpoint.py"
    work, result = tmp_path / "work", tmp_path / "result.json"  # never the repository's committed results
    work.mkdir()
    out = subprocess.run(
        [sys.executable, str(bench), "--quick", "--no-mergekit", "--workdir", str(work), "--out", str(result)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RSS above the interpreter baseline" in out.stdout and ": OK;" in out.stdout
    assert list(work.iterdir()) == []  # the synthetic checkpoint is deleted
    assert result.is_file()
    import json

    rec = json.loads(result.read_text())
    for key in ("benchmark", "setting", "threads", "torch", "median_seconds", "ratios", "targets", "met", "curves"):
        assert key in rec, key
    assert {"results", "summary", "dims"} <= set(rec)  # the earlier keys stay
    assert set(rec["targets"]) <= set(rec["ratios"]) and set(rec["met"]) == set(rec["targets"])
    (grow,) = rec["curves"]
    assert grow["name"] == "grow_checkpoint" and len(grow["x"]) == 4 and isinstance(grow["exponent"], float)
    assert all(isinstance(n, str) for n in rec["notes"])
