"""modulart.patcher.sequential_edit: the SME protocol, its metrics and the fine-tuning baseline."""

from __future__ import annotations

import json

import pytest
import torch

import modulart.patcher as mp
from modulart.core.errors import ShapeError
from patcher_helpers import causal_lm, outputs


def _eval_pairs(model: torch.nn.Module, seed: int, n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ordinary data whose targets are the model's own greedy next tokens (accuracy 1 at the start)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        x = torch.randint(1, 100, (5,), generator=g)
        with torch.no_grad():
            y = model(input_ids=x[None]).logits[0, -1].argmax()
        pairs.append((x, y[None]))
    return pairs


@pytest.fixture(scope="module")
def stream() -> tuple[object, list[mp.EditCase], dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    s = causal_lm("gpt2")
    cases = []
    for x, y in s.edits:
        cases.append(mp.EditCase(x, y[:1], equivalents=[torch.cat([x[:1], x])]))
    # one edit the model already gets right: skipped, counted, no neuron
    x0 = s.edits[0][0]
    with torch.no_grad():
        right = s.model(input_ids=x0[None]).logits[0, -1].argmax()
    cases.insert(0, mp.EditCase(x0, right[None]))
    sets = {"train": _eval_pairs(s.model, 1), "test": _eval_pairs(s.model, 2)}
    return s, cases, sets


def test_patcher_stream_reports_every_metric(
    stream: tuple[object, list[mp.EditCase], dict[str, list[tuple[torch.Tensor, torch.Tensor]]]],
) -> None:
    s, cases, sets = stream
    before = outputs(s)  # type: ignore[arg-type]
    state = {k: v.clone() for k, v in s.model.state_dict().items()}  # type: ignore[attr-defined]
    cfg = mp.PatcherConfig(task="generation", require_margins=False, max_steps=300)
    report = mp.sequential_edit(s.model, cases, sets, config=cfg, memory=s.memory, locality_every=1)  # type: ignore[attr-defined]
    assert report.n_edits == 4 and report.skipped == 1 and report.attempted == 3
    fold = report.folds[0]
    assert report.right_after["success"] == pytest.approx(1 - report.failed / 3)
    assert report.final["success"] == report.final["edit_retain"]
    assert 0.0 <= report.right_after["generalisation"] <= 1.0
    assert report.neurons_added == 3 - report.failed  # one wrong target token per edit, failed ones dropped
    assert fold["attempted"] == 3
    for name in ("train", "test"):
        loc = report.locality[name]
        assert loc["accuracy_original"] == 1.0
        assert loc["ratio"] == pytest.approx(loc["accuracy_final"])
        assert 0.0 <= loc["unchanged"] <= 1.0
    assert [c["edits"] for c in report.locality_curve] == [1, 2, 3]
    assert report.seconds_per_edit > 0
    json.dumps(report.to_dict())
    assert "right after" in report.table()
    # the protocol leaves the model exactly as it found it
    assert torch.equal(outputs(s), before)  # type: ignore[arg-type]
    for k, v in s.model.state_dict().items():  # type: ignore[attr-defined]
        assert torch.equal(v, state[k])


def test_finetune_baseline_and_folds(
    stream: tuple[object, list[mp.EditCase], dict[str, list[tuple[torch.Tensor, torch.Tensor]]]],
) -> None:
    s, cases, sets = stream
    state = {k: v.clone() for k, v in s.model.state_dict().items()}  # type: ignore[attr-defined]
    cfg = mp.PatcherConfig(task="generation")
    report = mp.sequential_edit(
        s.model,
        cases,
        sets,
        editor="finetune",
        config=cfg,
        folds=2,
        finetune={"lr": 1e-2, "max_steps": 50},  # type: ignore[attr-defined]
    )
    assert report.editor == "finetune" and len(report.folds) == 2
    assert report.neurons_added == 0 and report.skipped == 1
    assert report.right_after["success"] == 1.0
    for k, v in s.model.state_dict().items():  # type: ignore[attr-defined]
        assert torch.equal(v, state[k])


def test_protocol_bad_input(
    stream: tuple[object, list[mp.EditCase], dict[str, list[tuple[torch.Tensor, torch.Tensor]]]],
) -> None:
    s, cases, sets = stream
    with pytest.raises(ShapeError, match="edits is empty"):
        mp.sequential_edit(s.model, [], sets)  # type: ignore[attr-defined]
    with pytest.raises(ShapeError, match="folds"):
        mp.sequential_edit(s.model, cases, sets, folds=9)  # type: ignore[attr-defined]
    with pytest.raises(ShapeError, match="editor = 'rome'"):
        mp.sequential_edit(s.model, cases, sets, editor="rome")  # type: ignore[attr-defined]
    with pytest.raises(ShapeError, match=r"edits\[0\]"):
        mp.sequential_edit(s.model, ["not an edit"], sets)  # type: ignore[attr-defined, list-item]
