"""Probing a block: run the module's *own* forward on a probe input and record what its parts saw.

View verification (:mod:`modulart.core.verify`) compares what a view recomputes with what the model
computes. The model's side comes from here: :func:`trace` runs a forward inside :func:`quiet` and
records, for each tapped module, every call's arguments and output.

:func:`quiet` leaves no trace on the model: gradients off, every module in eval mode (restored
afterwards), the random number generators forked (dropout or sampling inside the forward cannot
move the user's RNG state), modulart's own hooks suspended (operators already applied to the
block neither act on nor count the probe), and PyTorch's fused ``nn.TransformerEncoderLayer`` /
``MultiheadAttention`` inference fast path switched off so that submodules are really called.

Example:
    >>> import torch
    >>> from modulart.core.probe import probe_input, trace
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> x = probe_input(mlp, 4)
    >>> t = trace(mlp, {"up": mlp[0], "down": mlp[2]}, lambda: mlp(x))
    >>> t.input("up").shape, torch.equal(t.input("down"), torch.relu(t.output("up")))
    (torch.Size([2, 16, 4]), True)
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modulart.core.dispatch import suspended
from modulart.core.errors import UnsupportedModuleError

__all__ = [
    "Call",
    "Trace",
    "first_tensor",
    "model_probe_inputs",
    "probe_input",
    "quiet",
    "relative_error",
    "set_probe_inputs",
    "tolerance",
    "trace",
]

PROBE_TOKENS = 16
PROBE_BATCH = 2


@dataclass
class Call:
    """One recorded call of a tapped module (tensors detached and cloned); ``seq`` orders the
    calls of all taps of one trace by when they returned."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    seq: int = 0


@dataclass
class Trace:
    """What each tapped module saw during one probe forward: ``calls[name]`` in call order."""

    calls: dict[str, list[Call]] = field(default_factory=dict)

    def seq(self, name: str, call: int = 0) -> int:
        """When call ``call`` of ``name`` returned, relative to the other tapped calls."""
        return self._call(name, call).seq

    def fired(self, name: str) -> bool:
        """Whether the tapped module ``name`` was called at all."""
        return bool(self.calls.get(name))

    def input(self, name: str, call: int = 0) -> torch.Tensor:
        """The first tensor argument of call ``call`` of ``name``."""
        c = self._call(name, call)
        x = first_tensor(c.args) if c.args else None
        if x is None:
            x = first_tensor(tuple(c.kwargs.values()))
        if x is None:
            raise UnsupportedModuleError(f"probe: {name!r} was called without a tensor argument")
        return x

    def output(self, name: str, call: int = 0, index: int = 0) -> torch.Tensor:
        """The output of call ``call`` of ``name`` (element ``index`` of a tuple output)."""
        out = self._call(name, call).output
        if isinstance(out, (tuple, list)):
            out = out[index]
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModuleError(f"probe: {name!r} returned {type(out).__name__}, not a tensor")
        return out

    def _call(self, name: str, call: int) -> Call:
        calls = self.calls.get(name) or []
        if call >= len(calls):
            raise UnsupportedModuleError(
                f"probe: {name!r} was called {len(calls)} time(s) during the probe forward; the block "
                "bypassed it (a fused kernel, or a data flow the view does not describe)"
            )
        return calls[call]


def first_tensor(values: tuple[Any, ...]) -> torch.Tensor | None:
    """The first floating-point tensor among ``values``, or None."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    if isinstance(v, list):
        return [_detach(x) for x in v]
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


@contextlib.contextmanager
def quiet(model: nn.Module) -> Iterator[None]:
    """Run a probe forward without leaving a trace (see the module docstring)."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    fastpath = _mha_fastpath()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), suspended():
            for m, _ in modes:
                m.training = False
            _set_mha_fastpath(False)
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        _set_mha_fastpath(fastpath)


def _mha_fastpath() -> bool | None:
    getter = getattr(torch.backends.mha, "get_fastpath_enabled", None)
    return bool(getter()) if getter is not None else None


def _set_mha_fastpath(value: bool | None) -> None:
    setter = getattr(torch.backends.mha, "set_fastpath_enabled", None)
    if setter is not None and value is not None:
        setter(value)


def trace(host: nn.Module, taps: Mapping[str, nn.Module], run: Callable[[], Any]) -> Trace:
    """Run ``run()`` (a forward that reaches ``host``) quietly, recording every call of each tap.

    Args:
        host: the module whose state :func:`quiet` protects (the model, or the probed block).
        taps: name -> module to record (arguments, keyword arguments and output of every call).
        run: the forward to run, e.g. ``lambda: block(x)``.

    Returns:
        The :class:`Trace`. Hooks added here are gone when it returns, whatever happens.
    """
    result = Trace({name: [] for name in taps})
    handles = []
    order = itertools.count()

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            result.calls[name].append(Call(_detach(args), _detach(kwargs), _detach(output), next(order)))

        return record

    try:
        for name, module in taps.items():
            handles.append(module.register_forward_hook(recorder(name), with_kwargs=True))
        with quiet(host):
            run()
    finally:
        for h in handles:
            h.remove()
    return result


def probe_input(module: nn.Module, d_model: int, *, tokens: int = PROBE_TOKENS, seed: int = 0) -> torch.Tensor:
    """A ``[2, tokens, d_model]`` standard-normal probe on ``module``'s device and floating dtype.

    Drawn from its own generator: the global RNG state does not move.
    """
    p = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(PROBE_BATCH, tokens, d_model, generator=g).to(device=device, dtype=dtype)


_USER_INPUTS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def set_probe_inputs(model: nn.Module, inputs: Mapping[str, Any] | None) -> None:
    """Tell modulart how to call ``model`` for a whole-model probe: ``model(**inputs)``.

    Needed only for models that are not Hugging Face models and whose blocks cannot be called on
    a hidden-state tensor alone (they need masks, memories, positions...). Every operator's
    discovery then uses these inputs; ``None`` forgets them.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> set_probe_inputs(model, {"input": torch.randn(2, 4)})
        >>> sorted(model_probe_inputs(model))
        ['input']
    """
    if inputs is None:
        _USER_INPUTS.pop(model, None)
    else:
        _USER_INPUTS[model] = dict(inputs)


def model_probe_inputs(model: nn.Module, *, tokens: int = PROBE_TOKENS, seed: int = 0) -> dict[str, Any] | None:
    """Inputs for a whole-model forward: those given to :func:`set_probe_inputs`, else token ids
    or pixels for a Hugging Face model (from its config), else None.

    Used when a block cannot be called on its own (it needs position embeddings, masks ...): the
    probe then runs the model itself and records the block's parts on the way.
    """
    given = _USER_INPUTS.get(model)
    if given is not None:
        return given
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or not isinstance(main, str):
        return None
    g = torch.Generator().manual_seed(seed)
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab <= 1:
            return None
        ids = torch.randint(1, vocab, (1, tokens), generator=g).to(device)
        out: dict[str, Any] = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = ids[:, : max(1, tokens // 2)]
        return out
    if main == "pixel_values":
        size = getattr(config, "image_size", None)
        channels = int(getattr(config, "num_channels", 3) or 3)
        if not isinstance(size, int):
            return None
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        return {"pixel_values": torch.randn(1, channels, size, size, generator=g).to(device=device, dtype=dtype)}
    return None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64 (inf on a shape mismatch or non-finite values)."""
    if got.shape != want.shape:
        return float("inf")
    a, b = got.detach().double(), want.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / max(scale, 1e-12)


_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def tolerance(dtype: torch.dtype) -> float:
    """The largest :func:`relative_error` still taken as "the same function" for ``dtype``."""
    return _TOLERANCE.get(dtype, 2e-5)
