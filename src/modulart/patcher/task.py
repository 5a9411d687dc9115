"""Edit examples and the two task types: how to batch them, read predictions, score and locate errors.

An *example* is one input (a token tensor ``[L]`` / ``[1, L]`` or a mapping of such tensors, e.g. a
tokenizer's output) and its target:

- ``classification``: the model returns logits ``[B, C]`` (a tensor, or an object / dict with
  ``logits``); the target is a class index.
- ``generation``: a causal LM returning logits ``[B, L, V]``; the input is the prompt and the target
  a token sequence ``[T]``. Under teacher forcing the model reads ``prompt ⊕ target[:-1]``, and the
  logits at positions ``Lp−1 … Lp+T−2`` predict the target tokens; the example is right when every
  target token is the argmax.

Example:
    >>> import torch
    >>> from modulart.patcher.task import make_example, collate
    >>> ex = make_example(torch.tensor([5, 6, 7]), torch.tensor([8, 9]), "generation")
    >>> ex.inputs["input_ids"].tolist(), ex.label_positions.tolist()
    ([[5, 6, 7, 8]], [2, 3])
    >>> batch = collate([ex, make_example(torch.tensor([1, 2]), torch.tensor([3]), "generation")])
    Traceback (most recent call last):
    ...
    modulart.core.errors.ShapeError: examples of different lengths [4, 2] need an attention_mask to be batched
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import ShapeError

__all__ = [
    "Example",
    "buckets",
    "collate",
    "correct",
    "evaluate",
    "examples_from",
    "logits_of",
    "make_example",
    "neuron_positions",
    "per_example_loss",
    "run_model",
    "token_errors",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class Example:
    """One example ready to run.

    Attributes:
        inputs: name -> ``[1, L]`` tensors (``input_ids`` for tensor inputs).
        positional: call ``model(input_ids)`` instead of ``model(**inputs)``.
        target: classification: ``[]`` long; generation: ``[T]`` long.
        label_positions: generation: ``[T]`` positions whose logits predict the target; else empty.
        prompt_length: length of the prompt (= ``L`` for classification).
    """

    inputs: dict[str, torch.Tensor]
    positional: bool
    target: torch.Tensor
    label_positions: torch.Tensor
    prompt_length: int

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def valid_length(self) -> int:
        """Positions that are not padding (from the attention mask when there is one)."""
        mask = self.inputs.get("attention_mask")
        return int(mask.sum()) if mask is not None else self.length


def _as_row(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] != 1:
        raise ShapeError(f"an edit is one example: {name} must be [L] or [1, L], got {list(t.shape)}")
    if t.shape[1] == 0:
        raise ShapeError(f"{name} is empty")
    out: torch.Tensor = t
    return out


def make_example(inputs: Inputs, target: Any, task: str) -> Example:
    """Validate and normalise one ``(inputs, target)`` pair for ``task``; raises :class:`ShapeError`."""
    positional = isinstance(inputs, torch.Tensor)
    if positional:
        assert isinstance(inputs, torch.Tensor)
        named = {"input_ids": _as_row(inputs, "inputs")}
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ShapeError(f"inputs needs an 'input_ids' entry; got keys {sorted(inputs)}")
        named = {str(k): _as_row(v, f"inputs[{k!r}]") for k, v in inputs.items() if v is not None}
        lengths = {k: v.shape[1] for k, v in named.items()}
        if len(set(lengths.values())) != 1:
            raise ShapeError(f"inputs entries have different lengths {lengths}")
    else:
        raise ShapeError(f"inputs must be a token tensor or a mapping of tensors, got {type(inputs).__name__}")
    if named["input_ids"].dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ShapeError(f"inputs['input_ids'] must hold token ids (an integer tensor), got {named['input_ids'].dtype}")
    device = named["input_ids"].device
    if task == "classification":
        t = (
            torch.as_tensor(target)
            if isinstance(target, (int, torch.Tensor)) and not isinstance(target, bool)
            else None
        )
        if t is None or t.numel() != 1 or t.is_floating_point() or int(t) < 0:
            raise ShapeError(f"a classification target must be one non-negative class index, got {target!r}")
        prompt = named["input_ids"].shape[1]
        return Example(named, positional, t.reshape(()).long().to(device), torch.zeros(0, dtype=torch.long), prompt)
    if isinstance(target, (list, tuple)) and all(isinstance(v, int) for v in target):
        target = torch.tensor(target)
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.numel() == 0:
        raise ShapeError(f"a generation target must be a non-empty integer token tensor [T], got {target!r}")
    tgt = target.reshape(-1).long().to(device)
    prompt = named["input_ids"].shape[1]
    full: dict[str, torch.Tensor] = {}
    extra = tgt[None, :-1]
    for k, v in named.items():
        if k == "input_ids":
            full[k] = torch.cat([v, extra.to(v.dtype)], dim=1)
        elif k == "attention_mask":
            full[k] = torch.cat([v, torch.ones_like(extra, dtype=v.dtype)], dim=1)
        else:
            full[k] = torch.cat([v, torch.zeros_like(extra, dtype=v.dtype)], dim=1)
    positions = torch.arange(prompt - 1, prompt - 1 + tgt.numel())
    return Example(full, positional, tgt, positions, prompt)


def collate(examples: Sequence[Example], repeat: int = 1) -> dict[str, torch.Tensor]:
    """Stack examples (each repeated ``repeat`` times, consecutively) into one right-padded batch."""
    if not examples:
        raise ShapeError("nothing to batch")
    lengths = [e.length for e in examples]
    if len(set(lengths)) > 1 and any("attention_mask" not in e.inputs for e in examples):
        raise ShapeError(f"examples of different lengths {lengths} need an attention_mask to be batched")
    width = max(lengths)
    keys = examples[0].inputs.keys()
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        rows = [F.pad(e.inputs[k], (0, width - e.length)) for e in examples]
        out[k] = torch.cat(rows).repeat_interleave(repeat, dim=0)
    return out


def buckets(examples: Sequence[Example], batch_size: int) -> Iterator[list[int]]:
    """Indices of examples grouped by length (no padding at all), at most ``batch_size`` per group."""
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_len.setdefault(e.length, []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            yield idx[s : s + batch_size]


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``output.logits``, ``output['logits']`` or ``output[0]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return torch.as_tensor(output["logits"])
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ShapeError(f"cannot find logits in the model output ({type(output).__name__})")


def run_model(model: nn.Module, batch: Mapping[str, torch.Tensor], positional: bool) -> torch.Tensor:
    """Call the model on a collated batch and return its logits."""
    out = model(batch["input_ids"]) if positional else model(**batch)
    return logits_of(out)


def _target_logits(logits: torch.Tensor, examples: Sequence[Example], task: str) -> torch.Tensor:
    """classification: ``[B, C]``; generation: ``[B, T, V]`` (all examples share T here)."""
    if task == "classification":
        if logits.dim() != 2:
            raise ShapeError(f"task='classification' needs logits [batch, classes], got {list(logits.shape)}")
        return logits
    if logits.dim() != 3:
        raise ShapeError(f"task='generation' needs logits [batch, seq, vocab], got {list(logits.shape)}")
    idx = torch.stack([e.label_positions for e in examples]).to(logits.device)
    return logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))


def _check_classes(logits: torch.Tensor, examples: Sequence[Example], task: str) -> None:
    n = logits.shape[-1]
    top = max(int(e.target.max()) for e in examples)
    low = min(int(e.target.min()) for e in examples)
    what = "class index" if task == "classification" else "target token id"
    if top >= n:
        raise ShapeError(f"{what} {top} is out of range: the model's logits have {n} entries")
    if low < 0:
        raise ShapeError(f"{what} {low} is out of range: it must lie in [0, {n})")


def _groups(examples: Sequence[Example]) -> list[list[int]]:
    by_t: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_t.setdefault(int(e.target.numel()), []).append(i)
    return list(by_t.values())


def _per_group(
    logits: torch.Tensor,
    examples: Sequence[Example],
    task: str,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    _check_classes(logits, examples, task)
    out: torch.Tensor | None = None
    for idx in _groups(examples):
        sub = [examples[i] for i in idx]
        tl = _target_logits(logits[idx], sub, task)
        tgt = torch.stack([e.target for e in sub]).to(logits.device)
        val = fn(tl, tgt)
        if out is None:
            out = val.new_zeros(len(examples))
        out[idx] = val
    assert out is not None
    return out


def token_errors(logits: torch.Tensor, example: Example, task: str) -> torch.Tensor:
    """``[T]`` bool: which target tokens the (single-example) logits get wrong (classification: ``[1]``)."""
    _check_classes(logits, [example], task)
    tl = _target_logits(logits[:1], [example], task)[0]
    return tl.argmax(-1) != example.target.to(tl.device)


def correct(logits: torch.Tensor, examples: Sequence[Example], task: str) -> torch.Tensor:
    """``[B]`` bool: every target token (or the class) is the argmax."""

    def fn(tl: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        right = tl.argmax(-1) == tgt
        return (right if right.dim() == 1 else right.all(-1)).float()

    return _per_group(logits, examples, task, fn).bool()


def per_example_loss(logits: torch.Tensor, examples: Sequence[Example], task: str, smoothing: float) -> torch.Tensor:
    """``[B]`` cross-entropy (label-smoothed by ``smoothing``), averaged over target tokens."""

    def fn(tl: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        flat = F.cross_entropy(
            tl.reshape(-1, tl.shape[-1]).float(), tgt.reshape(-1), reduction="none", label_smoothing=smoothing
        )
        return flat.reshape(tgt.shape[0], -1).mean(-1)

    return _per_group(logits, examples, task, fn)


def neuron_positions(example: Example, policy: str, errors: torch.Tensor, max_neurons: int) -> list[list[int]]:
    """The positions each new neuron is trained at: one list per neuron.

    ``cls``: ``[[0]]``; ``last_prompt``: the last prompt token; ``all``: one neuron over every
    non-padding position; ``erroneous_target_tokens``: one neuron per wrong target token (the
    position whose logits predict it), at most ``max_neurons``.
    """
    if policy == "cls":
        return [[0]]
    if policy == "last_prompt":
        return [[min(example.prompt_length, example.valid_length) - 1]]
    if policy == "all":
        return [list(range(example.valid_length))]
    wrong = errors.nonzero().flatten().tolist()
    return [[int(example.label_positions[t])] for t in wrong[:max_neurons]]


def examples_from(pairs: Iterable[tuple[Inputs, Any]], task: str) -> list[Example]:
    """:func:`make_example` over ``(inputs, target)`` pairs."""
    return [make_example(x, y, task) for x, y in pairs]


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: Sequence[Example], task: str, batch_size: int = 64
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eval-mode correctness ``[n]`` bool and argmax predictions (class ``[]`` / tokens ``[T]``) per example.

    Examples are grouped by length, so no padding is ever involved; the model's mode is restored.
    """
    right = torch.zeros(len(examples), dtype=torch.bool)
    preds: list[torch.Tensor | None] = [None] * len(examples)
    was = model.training
    model.eval()
    try:
        for idx in buckets(examples, batch_size):
            sub = [examples[i] for i in idx]
            logits = run_model(model, collate(sub), sub[0].positional)
            right[idx] = correct(logits, sub, task).cpu()
            for j, i in enumerate(idx):
                tl = logits[j] if task == "classification" else logits[j, sub[j].label_positions.to(logits.device)]
                preds[i] = tl.argmax(-1).cpu()
    finally:
        model.train(was)
    return right, [p for p in preds if p is not None]
