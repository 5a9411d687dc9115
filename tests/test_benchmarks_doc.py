"""docs/benchmarks.md is generated from the committed results, and the operator comparison runs end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load(ROOT / "scripts" / "gen_benchmarks_doc.py", "gen_benchmarks_doc")


def test_docs_benchmarks_md_matches_the_committed_results(gen: ModuleType) -> None:
    expected = gen.render(ROOT / "benchmarks" / "results")
    actual = (ROOT / "docs" / "benchmarks.md").read_text()
    assert actual == expected, "docs/benchmarks.md is stale: run python scripts/gen_benchmarks_doc.py"


def test_the_comparison_is_committed_with_five_seeds_and_every_operator(gen: ModuleType) -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "compare_operators.json").read_text())
    assert not data["quick"] and data["seeds"] >= 5
    assert set(data["continual"]["methods"]) == {"full", "migu", "kv_keys", "kv_values", "emoe"}
    assert {"full", "migu", "kv_keys", "kv_values", "emoe", "patcher"} <= set(data["editing"]["editors"])
    for setting in ("continual", "editing", "growth"):
        assert len(data[setting]["runs"]) == data["seeds"]
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    claims = data["continual"]["claims"] + data["growth"]["claims"]
    for claim in claims:  # each claim's verdict and interval are stated on the page
        assert claim["claim"] in doc
        assert gen.CLAIM_TEXT[claim["verdict"]] in doc
        assert gen.bracket(claim["interval"], 4) in doc
    assert data["command"] in doc and data["date"] in doc


def test_a_result_without_provenance_is_refused(gen: ModuleType, tmp_path: Path) -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "compare_operators.json").read_text())
    (tmp_path / "compare_operators.json").write_text(json.dumps(data | {"date": ""}))
    with pytest.raises(gen.ProvenanceError, match="date"):
        gen.render(tmp_path)
    (tmp_path / "compare_operators.json").unlink()
    (tmp_path / "provenance.json").write_text(json.dumps({"growth_pretrain_quick.json": {"command": "x"}}))
    with pytest.raises(gen.ProvenanceError, match="not in"):
        gen.render(tmp_path)
    (tmp_path / "growth_pretrain_quick.json").write_text(json.dumps({"benchmark": "growth_pretrain"}))
    with pytest.raises(gen.ProvenanceError, match="lacks"):
        gen.render(tmp_path)
    (tmp_path / "growth_pretrain_quick.json").write_text(json.dumps({"benchmark": "nothing"}))
    with pytest.raises(gen.ProvenanceError, match="'nothing'"):
        gen.render(tmp_path)
    (tmp_path / "provenance.json").unlink()  # an unrecorded file is not shown
    assert "growth_pretrain" not in gen.render(tmp_path)


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return _load(ROOT / "benchmarks" / "compare_operators.py", "compare_operators")


def test_interval_is_the_student_t_interval(compare: ModuleType) -> None:
    iv = compare.interval([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302652729911275, sd = 1
    assert iv["n"] == 3 and iv["mean"] == 2.0
    assert math.isclose(iv["half_width"], 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)
    assert compare.interval([5.0])["half_width"] is None
    assert compare.verdict(compare.interval([1.0, 1.1, 1.2]), "positive") == "supported"
    assert compare.verdict(compare.interval([1.0, 1.1, 1.2]), "negative") == "reversed"
    assert compare.verdict(compare.interval([-1.0, 0.5, 1.0]), "positive") == "within noise"


@pytest.mark.slow
def test_compare_operators_quick_runs_end_to_end(compare: ModuleType, gen: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "compare_operators_quick.json"
    assert compare.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] and data["seeds"] == 2
    for setting in ("continual", "editing", "growth"):
        assert len(data[setting]["runs"]) == 2
    assert "Quick (CI) size" not in gen.render(tmp_path)
    text = gen.render(tmp_path, include_quick=True)
    for name in ("full", "migu", "kv_keys", "kv_values", "emoe", "patcher"):
        assert f"`{name}`" in text
    assert "Quick (CI) size" in text


@pytest.fixture(scope="module")
def scaling() -> ModuleType:
    return _load(ROOT / "benchmarks" / "_scaling.py", "_scaling")


def test_power_law_fit_recovers_the_exponent(scaling: ModuleType) -> None:
    xs = [1.0, 2.0, 4.0, 8.0, 16.0]
    a, b, r2 = scaling.fit_power_law(xs, [3.0 * x**1.5 for x in xs])
    assert math.isclose(a, 3.0, rel_tol=1e-9) and math.isclose(b, 1.5, rel_tol=1e-9) and math.isclose(r2, 1.0)
    _, flat, _ = scaling.fit_power_law(xs, [2.0] * 5)  # flat memory: exponent 0
    assert abs(flat) < 1e-12
    for bad_x, bad_y in (([1.0], [1.0]), ([1.0, 1.0], [1.0, 2.0]), ([0.0, 1.0], [1.0, 2.0]), ([1.0, 2.0], [1.0])):
        with pytest.raises(ValueError):
            scaling.fit_power_law(bad_x, bad_y)


def test_a_performance_result_renders_its_ratios_targets_and_curves(
    gen: ModuleType, scaling: ModuleType, tmp_path: Path
) -> None:
    c = scaling.curve("ratio vs tokens", "tokens", "sparse / dense", [512, 1024, 2048], [0.5, 0.45, 0.4], "k 16")
    data = {
        "benchmark": "emoe_executors",
        "setting": {"tokens": 4096, "out": "x.json"},
        "threads": 2,
        "ratios": {"sparse_fwd_vs_dense": 0.38, "masked_fwd_bwd_vs_dense": 1.2, "stream_vs_raw": 0.9},
        "targets": {"sparse_fwd_vs_dense": 0.4, "masked_fwd_bwd_vs_dense": 1.15},
        "targets_min": {"stream_vs_raw": 0.85},
        "met": {"sparse_fwd_vs_dense": True, "masked_fwd_bwd_vs_dense": False, "stream_vs_raw": True},
        "curves": [c],
        "notes": ["routing takes 3% of the time"],
    }
    (tmp_path / "emoe_executors.json").write_text(json.dumps(data))
    prov = {"command": "python benchmarks/emoe_executors.py", "machine": {"cpus": 2}, "date": "2026-12-03"}
    (tmp_path / "provenance.json").write_text(json.dumps({"emoe_executors.json": prov}))
    text = gen.render(tmp_path)
    assert "| `sparse_fwd_vs_dense` | 0.38 | ≤ 0.4 | met |" in text
    assert "| `masked_fwd_bwd_vs_dense` | 1.2 | ≤ 1.15 | **missed** |" in text
    assert "| `stream_vs_raw` | 0.9 | ≥ 0.85 | met |" in text
    assert f"| {c['exponent']:.2f} |" in text and "ratio vs tokens" in text
    assert "- routing takes 3% of the time" in text and "Setting: tokens 4096; torch threads 2." in text
