"""Checking an FFN view against the block it describes.

:func:`verify_ffn` runs the block's own forward on a probe (the block called on a
``[2, 16, d_model]`` standard-normal tensor; when the block cannot be called alone, the whole model
on :func:`~modulart.core.probe.model_probe_inputs` or on the caller's ``probe_inputs``), records the
input of the view's ``input_site`` and the output of its ``output_site``, and compares the output
with :meth:`FFN.forward` of the recorded input. The outcome is cached per block signature.

Example:
    >>> import torch
    >>> import modulart as mt
    >>> from modulart.core.ffn_verify import verify_ffn
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> view = mt.find_ffns(model, verify=False)[0]
    >>> verify_ffn(view, model).ok
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modulart.core.errors import ModulartError
from modulart.core.probe import (
    PROBE_TOKENS,
    Trace,
    model_probe_inputs,
    probe_input,
    relative_error,
    tolerance,
    trace,
)
from modulart.core.verify import Verification, block_signature, cached_verification

if TYPE_CHECKING:
    from modulart.core.ffn import FFN

__all__ = ["ProbeInputs", "probe_block", "verify_ffn"]

ProbeInputs = Mapping[str, Any]
_MAX_CALLS = 4


def probe_block(
    model: nn.Module,
    block: nn.Module,
    taps: Mapping[str, nn.Module],
    d_model: int,
    probe_inputs: ProbeInputs | None = None,
    *,
    enough: Callable[[Trace], bool] | None = None,
) -> tuple[Trace | None, str]:
    """Record ``taps`` during the block's own forward on a probe (else a whole-model forward).

    The block alone is enough when ``enough(trace)`` holds (default: every tap was called).

    Returns:
        ``(trace, how)``: the :class:`~modulart.core.probe.Trace` and a phrase saying which
        forward ran; or ``(None, why)`` when neither could run.
    """
    x = probe_input(block, d_model)
    why = ""
    try:
        t = trace(block, taps, lambda: block(x))
        if enough(t) if enough is not None else all(t.fired(name) for name in taps):
            return t, f"{type(block).__name__} called on a [2, {PROBE_TOKENS}, {d_model}] probe"
        why = "calling the block alone did not reach every part (it needs the model around it)"
    except Exception as e:  # any failure of user code: fall back to a whole-model probe
        why = f"calling the block on a [2, {PROBE_TOKENS}, {d_model}] tensor raised {type(e).__name__}: {e}"
    inputs = probe_inputs if probe_inputs is not None else model_probe_inputs(model)
    if inputs is None or (model is block and probe_inputs is None):
        return None, why + "; no whole-model probe is possible (pass probe_inputs=... with model inputs)"
    try:
        t = trace(model, taps, lambda: model(**inputs))
    except Exception as e:
        return None, f"{why}; the whole-model probe raised {type(e).__name__}: {e}"
    return t, f"a whole-model forward of {type(model).__name__} ({why})"


def verify_ffn(view: FFN, model: nn.Module, probe_inputs: ProbeInputs | None = None) -> Verification:
    """Whether ``view.forward`` recomputes what the block's output site sees (cached per block type)."""
    rel_input = view.input_site.path[len(view.path) :]
    key = block_signature(view.module, ("ffn", view.layout, rel_input))
    return cached_verification(key, lambda: _measure(view, model, probe_inputs))


def _measure(view: FFN, model: nn.Module, probe_inputs: ProbeInputs | None) -> Verification:
    taps = {"in": view.input_site.module, "out": view.value_proj.module}
    dtype = view.keys.dtype
    tol = tolerance(dtype)
    t, how = probe_block(model, view.module, taps, view.d_model, probe_inputs)
    if t is None:
        return Verification(False, float("inf"), tol, f"could not run a probe forward: {how}", probed=False)
    n = min(len(t.calls["in"]), len(t.calls["out"]), _MAX_CALLS)
    if n == 0:
        return Verification(False, float("inf"), tol, f"the probe ({how}) bypassed the input or output site")
    err = 0.0
    with torch.no_grad():
        for i in range(n):
            try:
                got = view.forward(t.input("in", i))
            except (RuntimeError, ModulartError) as e:
                return Verification(False, float("inf"), tol, f"recomputing from the view raised {e} ({how})")
            err = max(err, relative_error(got, t.output("out", i)))
    return Verification(err <= tol, err, tol, f"recompute vs {how}: relative error {err:.3g} (bound {tol:.1g})")
