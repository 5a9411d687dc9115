"""Mask histories as handle state: flat tensor / JSON entries and back.

A :class:`~modulart.migu.stats.MaskHistory` (a linear layer) or an
:class:`~modulart.migu.expert_stats.ExpertHistory` (one projection of fused experts) is written
as ``"<prefix>.<field>"`` entries: tensors as tensors, counters and flags as JSON, a mask not
recorded yet as JSON ``null``; finished tasks as ``"<prefix>.tasks"`` (their count) and
``"<prefix>.tasks.<i>"`` (``.<i>.<j>`` for the ``(frequency, ran)`` pairs of experts).

Example:
    >>> import torch
    >>> from modulart.migu.stats import MaskHistory
    >>> h = MaskHistory(3, 0.5); h.push(torch.tensor([True, False, True])); h.end_task()
    >>> state = history_state(h, "l")
    >>> again = MaskHistory(3, 0.5); _ = load_history_state(again, "l", state)
    >>> again.report() == h.report(), again.steps, len(again.tasks)
    (True, 1, 1)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from modulart.core.errors import IncompatibleArtifactError
from modulart.core.types import StateDict, StateValue
from modulart.migu.expert_stats import ExpertHistory
from modulart.migu.stats import MaskHistory

__all__ = ["history_state", "load_history_state"]

_FIELDS = ("last", "prev", "has_last", "has_prev", "seen", "steps", "unseen_steps", "freq", "task_steps")


def history_state(history: MaskHistory | ExpertHistory, prefix: str) -> StateDict:
    """The entries of one history (see the module docstring)."""
    out: StateDict = {}
    for name in _FIELDS:
        if not hasattr(history, name):
            continue
        value = getattr(history, name)
        if isinstance(value, torch.Tensor):
            out[f"{prefix}.{name}"] = value.detach().cpu().clone()
        elif value is None or isinstance(value, (bool, int)):
            out[f"{prefix}.{name}"] = value
    out[f"{prefix}.tasks"] = len(history.tasks)
    if isinstance(history, ExpertHistory):
        for i, (freq, ran) in enumerate(history.tasks):
            out[f"{prefix}.tasks.{i}.0"] = freq.detach().cpu().clone()
            out[f"{prefix}.tasks.{i}.1"] = ran.detach().cpu().clone()
    else:
        for i, task in enumerate(history.tasks):
            out[f"{prefix}.tasks.{i}"] = task.detach().cpu().clone()
    return out


def _tensor_like(key: str, value: StateValue, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(like.shape):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise IncompatibleArtifactError(
            f"MIGU state {key!r}: expected a tensor of shape {tuple(like.shape)}, got {got}"
        )
    return value.detach().to(like.dtype).cpu().clone()


def load_history_state(history: MaskHistory | ExpertHistory, prefix: str, state: Mapping[str, StateValue]) -> set[str]:
    """Restore ``history`` from the entries under ``prefix`` (none: left as it is); returns the keys read.

    Raises:
        IncompatibleArtifactError: an entry of the wrong type or shape.
    """
    count_key = f"{prefix}.tasks"
    if count_key not in state:
        return set()
    used = {count_key}
    freq = history.freq
    for name in _FIELDS:
        key = f"{prefix}.{name}"
        if key not in state or not hasattr(history, name):
            continue
        used.add(key)
        value, current = state[key], getattr(history, name)
        if isinstance(history, MaskHistory) and name in ("last", "prev"):  # a bool [units] mask or None
            mask = None if value is None else _tensor_like(key, value, torch.zeros(history.units, dtype=torch.bool))
            setattr(history, name, mask)
        elif isinstance(current, torch.Tensor):
            setattr(history, name, _tensor_like(key, value, current))
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise IncompatibleArtifactError(f"MIGU state {key!r}: expected a bool, got {value!r}")
            setattr(history, name, value)
        else:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise IncompatibleArtifactError(f"MIGU state {key!r}: expected an int >= 0, got {value!r}")
            setattr(history, name, value)
    count = state[count_key]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise IncompatibleArtifactError(f"MIGU state {count_key!r}: expected an int >= 0, got {count!r}")
    if isinstance(history, ExpertHistory):
        ran = torch.zeros(history.experts, dtype=torch.bool)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(count):
            keys = (f"{prefix}.tasks.{i}.0", f"{prefix}.tasks.{i}.1")
            used |= set(keys)
            pairs.append(
                (_tensor_like(keys[0], state.get(keys[0]), freq), _tensor_like(keys[1], state.get(keys[1]), ran))
            )
        history.tasks = pairs
    else:
        tasks: list[torch.Tensor] = []
        for i in range(count):
            key = f"{prefix}.tasks.{i}"
            used.add(key)
            tasks.append(_tensor_like(key, state.get(key), freq))
        history.tasks = tasks
    return used
