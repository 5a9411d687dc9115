"""modulart.introspect report, figures, CLI and tour step."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

import modulart as mt
import modulart.introspect as mi
from introspect_models import per_expert_keys, save_sharded, tiny_mistral, tiny_mixtral, upcycle
from modulart.core.errors import IncompatibleArtifactError
from modulart.introspect.cli import add_inspect_parser, run_inspect

IDS = {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))}


def _last_layer_differs() -> torch.nn.Module:
    """Upcycled experts in layers 0-3, independent random experts in the last layer."""
    model = upcycle(tiny_mixtral(layers=5), noise=0.2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for e in mt.find_moes(model)[-1].experts():
            e.set(**{k: torch.randn(getattr(e, k).shape, generator=g) * 0.2 for k in ("gate", "up", "down")})
    return model


def test_the_last_layer_outlier_is_flagged_and_uniform_depth_is_not() -> None:
    rep = mi.report(_last_layer_differs(), IDS, progress=False, reorder_neurons=32)
    chk = rep.meta["outliers"]["s1.act"]
    assert chk["outlier"] and chk["last"] < 0.1 < 0.9 < chk["mean_others"]
    assert "last layer is an outlier in s1.act" in rep.table()
    assert rep.meta["outliers"]["d1"]["outlier"]  # the outputs diversify too
    uniform = mi.report(upcycle(tiny_mixtral(layers=5), noise=0.2), progress=False, reorder_neurons=None)
    assert not any(c["outlier"] for c in uniform.meta["outliers"].values())
    assert "S3 tau" not in uniform.meta["columns"]


def test_outlier_check_on_constructed_series() -> None:
    assert mi.outlier_check([0.30, 0.31, 0.29, 0.30, 0.05])["outlier"]
    assert not mi.outlier_check([0.30, 0.31, 0.29, 0.30, 0.28])["outlier"]
    assert not mi.outlier_check([0.3, 0.9])["outlier"]  # too few layers to judge
    assert mi.outlier_check([0.5, 0.4, 0.3, 0.2, 0.2])["slope"] == pytest.approx(-0.1)


def test_report_rows_match_the_individual_analyses() -> None:
    dense = tiny_mistral()
    model = upcycle(tiny_mixtral(), noise=0.5, dense=dense)
    rep = mi.report(model, IDS, dense=dense, progress=False)
    w = mi.weights(model, dense=dense, progress=False)
    r = mi.routing(model, IDS)
    s1 = w.expert_similarity("up")
    assert torch.allclose(rep.arrays["s1.up"], s1.values)
    assert [row["S1 up"] for row in rep.rows] == pytest.approx(s1.expert_mean().tolist())
    assert [row["S1 up-F"] for row in rep.rows] == pytest.approx(s1.dense_mean().tolist())
    assert torch.equal(rep.arrays["d2.counts"], r.norm_score_counts())
    assert torch.allclose(rep.arrays["d3.ratio"], r.activation_ratio())
    assert rep.members == ["e0", "e1", "e2", "e3", "F"]
    assert rep.meta["s3_method"] == "assignment"


def test_save_load_round_trip_and_atomicity(tmp_path: Path) -> None:
    rep = mi.report(tiny_mixtral(), IDS, progress=False, reorder_neurons=16)
    out = rep.save(tmp_path / "rep")
    back = mi.Report.load(out)
    assert back.layers == rep.layers and back.members == rep.members
    assert back.arrays.keys() == rep.arrays.keys()
    assert all(torch.equal(back.arrays[k], rep.arrays[k]) for k in rep.arrays)
    assert back.table() == rep.table()
    with pytest.raises(IncompatibleArtifactError, match=r"no report\.json"):
        mi.Report.load(tmp_path)


def test_figures_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rep = mi.report(tiny_mixtral(layers=2), IDS, progress=False, reorder_neurons=None)
    files = rep.plot(tmp_path / "figs")
    names = sorted(p.name for p in files)
    assert names == sorted(
        [
            "s1_grid.png",
            "s2_grid.png",
            "s4_gate_vs_experts.png",
            "pca_experts.png",
            "depth_trends.png",
            "d1_output_similarity.png",
            "d2_rank_counts.png",
            "d4_routing_map.png",
        ]
    )
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    assert not [p for p in (tmp_path / "figs").iterdir() if p.name.startswith(".")]  # no temp files left


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modulart")
    add_inspect_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_inspect_prints_the_table_and_writes_report_and_figures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    dense = tiny_mistral()
    model = upcycle(tiny_mixtral(), noise=0.1, dense=dense)
    ckpt = save_sharded(per_expert_keys(model, "mixtral"), tmp_path / "ckpt")
    dense.save_pretrained(tmp_path / "dense")
    lines: list[str] = []
    args = _parser().parse_args(
        ["inspect", str(ckpt), "--out", str(tmp_path / "out"), "--dense", str(tmp_path / "dense"), "--layers", "0-1"]
    )
    assert run_inspect(args, lines.append) == 0
    text = "\n".join(lines)
    assert "S1 act-F" in text and "they look upcycled" in text
    rep = mi.Report.load(tmp_path / "out")
    assert rep.layers == [0, 1] and rep.members[-1] == "F"
    assert rep.rows[0]["S1 act-F"] > 0.95
    assert (tmp_path / "out" / "s1_grid.png").is_file() and "figure:" in text


def test_cli_inspect_refuses_a_broken_checkpoint_before_writing(tmp_path: Path) -> None:
    tensors = per_expert_keys(tiny_mixtral(), "qwen")
    gone = "model.layers.0.mlp.experts.1.down_proj.weight"
    ckpt = save_sharded({k: v for k, v in tensors.items() if k != gone}, tmp_path / "ckpt")
    args = _parser().parse_args(["inspect", str(ckpt), "--out", str(tmp_path / "out")])
    with pytest.raises(IncompatibleArtifactError, match=r"experts\.1\.\(w2 / down_proj\)"):
        run_inspect(args, print)
    assert not (tmp_path / "out").exists()
    good = save_sharded(tensors, tmp_path / "good")
    args = _parser().parse_args(["inspect", str(good), "--out", str(tmp_path / "out"), "--layers", "7"])
    with pytest.raises(mt.SelectorError):
        run_inspect(args, print)
    with pytest.raises(ValueError, match="inputs= needs a live model"):
        mi.report(good, IDS)
    lines: list[str] = []
    assert run_inspect(_parser().parse_args(["inspect", str(tmp_path / "nope")]), lines.append) == 2
    assert "not a checkpoint directory" in lines[0] and not (tmp_path / "out").exists()


def _tour(tmp_path: Path, plots: bool) -> tuple[dict[str, Any], str]:
    from modulart.introspect.demo import introspect_tour_step
    from modulart.tour import load_minilm
    from modulart.tour import tiny_mixtral as tour_mixtral

    bert, tok = load_minilm()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    lines: list[str] = []
    numbers = introspect_tour_step(bert, tok, tour_mixtral(), lines.append, tmp_path / "intro", plots=plots)
    # the EMoE conversion was removed: the model is what it was, with no hooks left
    assert all(torch.equal(v, before[k]) for k, v in bert.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in bert.modules())
    return numbers, "\n".join(lines)


def test_introspect_tour_step(tmp_path: Path) -> None:
    numbers, text = _tour(tmp_path, plots=False)
    assert str(tmp_path / "intro" / "mixtral") in text and str(tmp_path / "intro" / "minilm_emoe") in text
    assert numbers["minilm_emoe"]["layers"] == [4, 5] and numbers["mixtral"]["layers"] == [0, 1]
    assert all(0.9 < v <= 1 for v in numbers["minilm_emoe"]["d3_active"])
    assert all(-1 <= v <= 1 for v in numbers["minilm_emoe"]["d2_spearman"])
    assert numbers["minilm_emoe"]["d2_chance"] == [0.25, 0.25]
    assert mi.Report.load(tmp_path / "intro" / "minilm_emoe").members == [f"e{i}" for i in range(16)]


@pytest.mark.slow
def test_introspect_tour_step_writes_its_figures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    numbers, text = _tour(tmp_path, plots=True)
    assert len(numbers["figures"]) == 16 and all(Path(f).is_file() for f in numbers["figures"])
    assert "16 figures" not in text and "8 figures written to" in text


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "plain_moe"])
def test_report_runs_on_every_family(name: str, tmp_path: Path) -> None:
    from families import build

    fam = build(name)
    inputs = fam.inputs if name != "plain_moe" else fam.inputs["ids"]
    rep = mi.report(fam.model, inputs, progress=False, reorder_neurons=8)
    assert rep.layers == [m.layer for m in mt.find_moes(fam.model)]
    for row in rep.rows:
        for col in ("S2 act", "S4 R act", "D1 angular", "D2 spearman", "D3 active", "S3 tau"):
            assert torch.isfinite(torch.tensor(row[col])), (col, row)
    assert mi.Report.load(rep.save(tmp_path / name)).table() == rep.table()
