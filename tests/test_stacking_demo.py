"""The growth step of ``modulart tour`` on the real MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

from modulart.stacking import MANIFEST_NAME
from modulart.stacking.demo import stacking_tour_step
from modulart.tour import load_minilm


def test_stacking_tour_step(tmp_path: Path) -> None:
    bert, tok = load_minilm()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    lines: list[str] = []
    out = stacking_tour_step(bert, tok, lines.append, tmp_path)
    assert out["layers"] == (6, 12) and out["plan"] == "0-5,0-5 (6 -> 12 layers)"
    assert out["diff"]["random"] == 0.0 and out["diff"]["direct"] > 0.1
    assert out["checkpoint_vs_memory"] == 0.0 and out["shards"] >= 3
    manifest = json.loads((tmp_path / "minilm-12" / MANIFEST_NAME).read_text())
    assert manifest["plan"]["indices"] == list(range(6)) * 2
    assert json.loads((tmp_path / "minilm-12" / "config.json").read_text())["num_hidden_layers"] == 12
    assert any("plan: 0-5,0-5" in line for line in lines) and any("direct" in line for line in lines)
    assert all(v.equal(before[k]) for k, v in bert.state_dict().items())  # the tour's model is left as it was
