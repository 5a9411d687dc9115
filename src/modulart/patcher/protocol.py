"""The sequential model editing (SME) protocol and its metrics, "right after each edit" and "on the final model".

A stream of edits is applied one on top of the other. Reported, explicitly for both moments:

- ``success``: the edit is right (right after its own edit / on the final model);
- ``generalisation``: fraction of its equivalent inputs (paraphrases) that are right (right after
  each edit: averaged over edits; ``generalisation_pooled``: right paraphrases over all paraphrases
  of all edits, as the reference code's GR);
- ``edit_retain``: fraction of all edits made so far that are still right (right after edit t:
  averaged over t; final: over every edit on the final model);
- ``locality``: per ordinary evaluation set, accuracy relative to the original model
  (``TrainR``/``TestR`` = acc_edited / acc_original) and the fraction of unchanged predictions.

Edits the original model already gets right are skipped and counted separately; an edit that
earlier edits already made right counts as attempted (a success with no training). With ``folds > 1``
the edits are split into independent streams, each from the original model, and metrics averaged.

Example:
    >>> import torch
    >>> from modulart.patcher.protocol import EditCase
    >>> case = EditCase(torch.tensor([1, 2, 3]), 1, equivalents=[torch.tensor([1, 2, 4])])
    >>> len(case.equivalents)
    1
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from modulart.core.errors import ShapeError
from modulart.patcher.config import PatcherConfig
from modulart.patcher.records import EditResult
from modulart.patcher.task import Example, Inputs, evaluate, make_example

__all__ = ["EditCase", "Editor", "SequentialReport", "sequential_edit"]


@dataclasses.dataclass
class EditCase:
    """One edit of a stream: the input, the wanted target, equivalent inputs, optional text."""

    inputs: Inputs
    target: Any
    equivalents: Sequence[Inputs] = ()
    text: str | None = None
    target_text: str | None = None


class Editor(Protocol):
    """What :func:`sequential_edit` drives: a :class:`~modulart.patcher.PatcherHandle` or the fine-tuning baseline."""

    def edit(
        self, inputs: Inputs, target: Any, *, text: str | None = None, target_text: str | None = None
    ) -> EditResult: ...

    def remove(self) -> None: ...


@dataclasses.dataclass
class SequentialReport:
    """Metrics of a sequential editing run (see the module docstring); ``to_dict()`` is JSON-safe."""

    editor: str
    n_edits: int
    attempted: int
    skipped: int
    failed: int
    neurons_added: float
    seconds_per_edit: float
    steps_per_edit: float
    right_after: dict[str, float]
    final: dict[str, float]
    locality: dict[str, dict[str, float]]
    locality_curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    folds: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=float))  # type: ignore[no-any-return]

    def table(self) -> str:
        """A printable summary."""
        rows = [f"{self.editor}: {self.attempted} edits attempted ({self.skipped} skipped, {self.failed} failed)"]
        for name in ("success", "generalisation", "edit_retain"):
            rows.append(f"  {name:<15} right after {self.right_after[name]:7.1%}   final {self.final[name]:7.1%}")
        for set_name, m in self.locality.items():
            rows.append(
                f"  locality[{set_name}] acc {m['accuracy_original']:.3f} -> {m['accuracy_final']:.3f} "
                f"(ratio {m['ratio']:.3f}, unchanged {m['unchanged']:.1%})"
            )
        rows.append(
            f"  neurons added {self.neurons_added:.1f}, {self.seconds_per_edit:.2f} s and "
            f"{self.steps_per_edit:.0f} steps per edit"
        )
        return "\n".join(rows)


def _mean(xs: Iterable[float]) -> float:
    vals = list(xs)
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _pooled(folds: Sequence[Mapping[str, Any]]) -> float:
    """Paraphrases right just after their edit over all paraphrases, pooled over edits and folds."""
    total = sum(int(f["paraphrases"]["total"]) for f in folds)
    return sum(int(f["paraphrases"]["right"]) for f in folds) / total if total else float("nan")


def _as_cases(edits: Sequence[EditCase | tuple[Any, ...]]) -> list[EditCase]:
    out = []
    for i, e in enumerate(edits):
        if isinstance(e, EditCase):
            out.append(e)
        elif isinstance(e, tuple) and len(e) in (2, 3):
            out.append(EditCase(*e))
        else:
            raise ShapeError(f"edits[{i}] must be an EditCase or an (inputs, target[, equivalents]) tuple")
    return out


def _locality(
    model: nn.Module,
    sets: Mapping[str, list[Example]],
    base: Mapping[str, tuple[torch.Tensor, list[torch.Tensor]]],
    task: str,
) -> dict[str, dict[str, float]]:
    out = {}
    for name, exs in sets.items():
        right, preds = evaluate(model, exs, task)
        b_right, b_preds = base[name]
        acc0, acc1 = float(b_right.float().mean()), float(right.float().mean())
        same = _mean(float(torch.equal(p, q)) for p, q in zip(preds, b_preds, strict=True))
        out[name] = {
            "accuracy_original": acc0,
            "accuracy_final": acc1,
            "ratio": acc1 / acc0 if acc0 > 0 else float("nan"),
            "unchanged": same,
        }
    return out


def _run_stream(
    model: nn.Module,
    cases: list[EditCase],
    make_editor: Callable[[nn.Module], Editor],
    sets: Mapping[str, list[Example]],
    base: Mapping[str, tuple[torch.Tensor, list[torch.Tensor]]],
    task: str,
    locality_every: int,
) -> dict[str, Any]:
    edit_ex = [make_example(c.inputs, c.target, task) for c in cases]
    equiv_ex = [[make_example(x, c.target, task) for x in c.equivalents] for c in cases]
    already, _ = evaluate(model, edit_ex, task)  # right on the original model: skipped, never edited
    editor = make_editor(model)
    try:
        done: list[int] = []
        after_success, after_gen, after_retain = [], [], []
        curve: list[dict[str, Any]] = []
        seconds: list[float] = []
        steps: list[int] = []
        skipped = failed = 0
        neurons = gen_right = gen_total = 0
        for t, c in enumerate(cases):
            if already[t]:
                skipped += 1
                continue
            res = editor.edit(c.inputs, c.target, text=c.text, target_text=c.target_text)
            done.append(t)
            seconds.append(res.seconds)
            steps.append(res.steps)
            neurons += len(res.patch_ids)
            failed += not res.success
            right_now, _ = evaluate(model, [edit_ex[i] for i in done], task)
            after_success.append(float(right_now[-1]))
            after_retain.append(float(right_now.float().mean()))
            if equiv_ex[t]:
                g, _ = evaluate(model, equiv_ex[t], task)
                after_gen.append(float(g.float().mean()))
                gen_right += int(g.sum())
                gen_total += len(equiv_ex[t])
            if locality_every and len(done) % locality_every == 0:
                curve.append({"edits": len(done), "locality": _locality(model, sets, base, task)})
        final_right, _ = evaluate(model, [edit_ex[i] for i in done], task) if done else (torch.zeros(0), [])
        all_equiv = [x for i in done for x in equiv_ex[i]]
        final_gen, _ = evaluate(model, all_equiv, task) if all_equiv else (torch.zeros(0), [])
        locality = _locality(model, sets, base, task)
    finally:
        editor.remove()
    return {
        "attempted": len(done),
        "skipped": skipped,
        "failed": failed,
        "neurons_added": neurons,
        "seconds_per_edit": _mean(seconds),
        "steps": steps,
        "right_after": {
            "success": _mean(after_success),
            "generalisation": _mean(after_gen),
            "edit_retain": _mean(after_retain),
        },
        "paraphrases": {"right": gen_right, "total": gen_total},
        "final": {
            "success": float(final_right.float().mean()) if done else float("nan"),
            "generalisation": float(final_gen.float().mean()) if all_equiv else float("nan"),
            "edit_retain": float(final_right.float().mean()) if done else float("nan"),
        },
        "locality": locality,
        "locality_curve": curve,
    }


def sequential_edit(
    model: nn.Module,
    edits: Sequence[EditCase | tuple[Any, ...]],
    eval_sets: Mapping[str, Sequence[tuple[Inputs, Any]]],
    *,
    editor: str | Callable[[nn.Module], Editor] = "patcher",
    config: PatcherConfig | None = None,
    memory: Inputs | Iterable[Inputs] | None = None,
    validation_memory: Inputs | Iterable[Inputs] | None = None,
    folds: int = 1,
    locality_every: int = 0,
    finetune: Mapping[str, Any] | None = None,
) -> SequentialReport:
    """Run the SME protocol: apply ``edits`` one after another and measure everything.

    Args:
        model: the model to edit (restored exactly at the end of each fold).
        edits: :class:`EditCase` objects (or ``(inputs, target[, equivalents])`` tuples).
        eval_sets: ordinary data for locality, e.g. ``{"train": pairs, "test": pairs}``.
        editor: ``"patcher"`` (Transformer-Patcher with ``config`` and ``memory``), ``"finetune"``
            (the FT-L baseline with ``finetune`` keyword arguments), or ``model -> editor``.
        config: the patcher's config (``task`` is read from it for every editor).
        memory: ordinary inputs for the patcher's memory set.
        validation_memory: held-out ordinary inputs for its validation memory (needed by
            ``stop_rule='validation'``, the reference preset's stopping).
        folds: split the edits into this many independent streams from the original model.
        locality_every: also measure locality every this many edits (0 = only at the end).

    Returns:
        A :class:`SequentialReport` (metrics averaged over folds, per-fold numbers in ``folds``).
    """
    cfg = config or PatcherConfig()
    cases = _as_cases(edits)
    if not cases:
        raise ShapeError("edits is empty")
    if not isinstance(folds, int) or not 1 <= folds <= len(cases):
        raise ShapeError(f"folds = {folds!r}: must be an int in [1, {len(cases)}]")
    sets = {name: [make_example(x, y, cfg.task) for x, y in pairs] for name, pairs in eval_sets.items()}
    name, make_editor = _editor_factory(editor, cfg, memory, validation_memory, finetune)
    base = {k: evaluate(model, v, cfg.task) for k, v in sets.items()}
    size = -(-len(cases) // folds)
    per_fold = [
        _run_stream(model, cases[i : i + size], make_editor, sets, base, cfg.task, locality_every)
        for i in range(0, len(cases), size)
    ]

    keys = ("success", "generalisation", "edit_retain")
    loc = {s: {m: _mean(f["locality"][s][m] for f in per_fold) for m in per_fold[0]["locality"][s]} for s in sets}
    return SequentialReport(
        editor=name,
        n_edits=len(cases),
        attempted=sum(f["attempted"] for f in per_fold),
        skipped=sum(f["skipped"] for f in per_fold),
        failed=sum(f["failed"] for f in per_fold),
        neurons_added=_mean(f["neurons_added"] for f in per_fold),
        seconds_per_edit=_mean(f["seconds_per_edit"] for f in per_fold),
        steps_per_edit=_mean(s for f in per_fold for s in f["steps"]),
        right_after={k: _mean(f["right_after"][k] for f in per_fold) for k in keys}
        | {"generalisation_pooled": _pooled(per_fold)},
        final={k: _mean(f["final"][k] for f in per_fold) for k in keys},
        locality=loc,
        locality_curve=per_fold[0]["locality_curve"],
        folds=per_fold,
    )


def _editor_factory(
    editor: str | Callable[[nn.Module], Editor],
    cfg: PatcherConfig,
    memory: Inputs | Iterable[Inputs] | None,
    validation_memory: Inputs | Iterable[Inputs] | None,
    finetune: Mapping[str, Any] | None,
) -> tuple[str, Callable[[nn.Module], Editor]]:
    if callable(editor):
        return getattr(editor, "__name__", "custom"), editor
    if editor == "patcher":
        from modulart.patcher.operator import apply

        def make_patcher(model: nn.Module) -> Editor:
            p = apply(model, cfg)
            try:
                if memory is not None:
                    p.set_memory(memory)
                if validation_memory is not None:
                    p.set_validation_memory(validation_memory)
            except BaseException:
                p.remove()
                raise
            return p

        return "patcher", make_patcher
    if editor == "finetune":
        from modulart.patcher.baseline import FineTuneEditor

        kwargs = {"layer": cfg.layer, "task": cfg.task, "smoothing": cfg.smoothing} | dict(finetune or {})
        return "finetune", lambda model: FineTuneEditor(model, **kwargs)
    raise ShapeError(f"editor = {editor!r}: must be 'patcher', 'finetune' or a callable model -> editor")
