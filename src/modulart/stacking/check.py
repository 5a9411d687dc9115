"""Does a grown model compute what the small one did? Max logit difference in eval / fp32.

Example:
    >>> import torch
    >>> from modulart.stacking import function_difference
    >>> a = torch.nn.Linear(3, 3); x = torch.randn(2, 3)
    >>> function_difference(a, a, x)
    0.0
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypeAlias

import torch
from torch import nn

from modulart.core.errors import ModulartError, UnsupportedModuleError

__all__ = ["FunctionNotPreservedError", "assert_function_preserved", "function_difference"]

CheckInputs: TypeAlias = torch.Tensor | tuple[object, ...] | Mapping[str, object]
"""What the models are called with: a tensor, a tuple of positional arguments or a dict of keyword arguments."""


class FunctionNotPreservedError(ModulartError, AssertionError):
    """The grown model's outputs differ from the source model's by more than the tolerance."""


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedModuleError(f"cannot find logits in a model output of type {type(out).__name__}")


def _run(model: nn.Module, inputs: CheckInputs) -> torch.Tensor:
    m = copy.deepcopy(model).float().eval() if any(p.dtype != torch.float32 for p in model.parameters()) else model
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                out = m(**inputs)
            elif isinstance(inputs, tuple):
                out = m(*inputs)
            else:
                out = m(inputs)
    finally:
        m.train(was)
    return _logits(out).float()


def function_difference(small: nn.Module, grown: nn.Module, inputs: CheckInputs) -> float:
    """Max ``|logits_small - logits_grown|`` over ``inputs``, both models run in eval mode and fp32.

    Args:
        small, grown: the models (not changed; a model that is not fp32 is compared on an fp32 copy).
        inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.

    Returns:
        The max absolute difference of the logits (``logits`` ``[batch, seq, vocab]``,
        ``last_hidden_state`` ``[batch, seq, d_model]``, the first tuple element or the tensor output);
        outputs of different shapes raise :class:`FunctionNotPreservedError`.
    """
    a, b = _run(small, inputs), _run(grown, inputs)
    if a.shape != b.shape:
        raise FunctionNotPreservedError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_function_preserved(small: nn.Module, grown: nn.Module, inputs: CheckInputs, *, atol: float = 1e-5) -> float:
    """Raise :class:`FunctionNotPreservedError` unless the max logit difference is ``<= atol``.

    Returns:
        The max logit difference.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
        >>> assert_function_preserved(a, b, torch.ones(1, 3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modulart.stacking.check.FunctionNotPreservedError: ...
    """
    diff = function_difference(small, grown, inputs)
    if not diff <= atol:
        raise FunctionNotPreservedError(f"max logit difference {diff:.3g} exceeds atol={atol:g}")
    return diff
