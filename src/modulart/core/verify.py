"""Verification results and their cache: a view is handed out only once it matched its module.

Every FFN and MoE view (from the class tables, from generic discovery or from a user adapter) is
checked by recomputing the block from the view's canonical weights on a probe and comparing with
what the block itself computed (:mod:`modulart.core.probe`). The outcome is a
:class:`Verification`; failures become :class:`~modulart.core.errors.UnsupportedModuleError` with
the measured error, what was tried, and how to write an adapter.

Outcomes are cached per *block signature* — the module classes, the parameter and buffer names,
shapes, dtypes and devices, the scalar attributes (configuration such as ``top_k``; per-layer
positions such as ``layer_idx`` left out) and the layout — so a 32-layer model pays for one probe
per block type. :func:`clear_verification_cache` empties it.

Example:
    >>> import torch
    >>> from modulart.core.verify import block_signature
    >>> a, b = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
    >>> block_signature(a, "x") == block_signature(b, "x"), block_signature(a, "x") == block_signature(a, "y")
    (True, False)
"""

from __future__ import annotations

import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Verification", "block_signature", "cached_verification", "clear_verification_cache", "on_clear"]

# per-layer position attributes: they differ between otherwise identical blocks
_POSITION_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num", "idx"})
_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a view against its module.

    Attributes:
        ok: the view recomputed the block within ``tolerance``.
        error: the measured relative error (``max |view - block| / max |block|``).
        tolerance: the bound for the block's dtype.
        detail: what was compared, or why it failed (shown in errors).
        probed: a probe forward ran (False: the block could not be probed; such outcomes are not
            cached, since other probe inputs may reach it).
    """

    ok: bool
    error: float
    tolerance: float
    detail: str = ""
    probed: bool = True


def block_signature(module: nn.Module, layout: Hashable) -> tuple[object, ...]:
    """A hashable description of ``module``'s structure (not its values), plus ``layout``."""
    tensors = tuple(
        (kind, name, tuple(t.shape), t.dtype, t.device.type)
        for kind, items in (("p", module.named_parameters()), ("b", module.named_buffers()))
        for name, t in items
        if isinstance(t, torch.Tensor)
    )
    attrs: list[tuple[str, object]] = []
    for path, m in module.named_modules():
        attrs.append((path, type(m)))
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training" or k in _POSITION_ATTRS:
                continue
            if isinstance(v, (bool, int, float, str)) or v is None:
                attrs.append((f"{path}.{k}", v))
            elif isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
                attrs.append((f"{path}.{k}", getattr(v, "__qualname__", repr(v))))
    return (type(module), tensors, tuple(attrs), layout)


_cache: OrderedDict[tuple[object, ...], Verification] = OrderedDict()
_lock = threading.Lock()


def cached_verification(key: tuple[object, ...], compute: Callable[[], Verification]) -> Verification:
    """``compute()`` once per ``key`` (least recently used entries are dropped past 4096; outcomes
    with ``probed=False`` are not kept)."""
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    result = compute()
    if not result.probed:
        return result
    with _lock:
        _cache[key] = result
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result


_clearers: list[Callable[[], None]] = []


def on_clear(fn: Callable[[], None]) -> None:
    """Have :func:`clear_verification_cache` also call ``fn`` (for other caches of probe results)."""
    _clearers.append(fn)


def clear_verification_cache() -> None:
    """Forget every cached verification and discovery (the next discovery probes again).

    Example:
        >>> clear_verification_cache()
    """
    with _lock:
        _cache.clear()
    for fn in _clearers:
        fn()
