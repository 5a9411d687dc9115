"""Hooks and views follow a module that is wrapped (or unwrapped) after modulart hooked it.

PEFT's ``get_peft_model`` (and other wrappers: gradient-checkpointing, quantisation adapters)
replace ``parent.down_proj`` by a wrapper whose ``base_layer`` (or ``module``) is the original
module. A hook left on the original then acts on the wrapper's *base path only*: EMoE's expert mask
on ``down_proj``'s input would reach the base layer but not the LoRA branch, which reads the
wrapper's own input. This module keeps modulart's hooks on whatever the model calls:

- :func:`remember` records where a module lives (``(parent, attribute name)``); views do it for
  their projections, :class:`~modulart.core.hooks.HookRegistry` for every module it hooks;
- :func:`watch` marks a module modulart hooks; while any is marked, one global *module registration
  hook* (``torch.nn.modules.module.register_module_module_registration_hook``) sees every
  ``setattr(parent, name, new)`` — how PEFT, ``set_submodule`` and most wrappers swap modules in —
  and, when ``new`` wraps the hooked module in that place (or the module comes back in place of its
  wrapper, e.g. ``merge_and_unload()``), moves every modulart dispatcher from the old object to the
  new one *before* it is ever called. Nothing runs per forward call, and no hook is added to any
  module's own hook dicts;
- :func:`follow` answers the same question on demand (views and new hooks resolve through it), so
  a view made before the wrap reads the wrapper (effective weights) and new hooks land on it.

The registration hook is removed with the last modulart hook on a module. A module replaced by
something unrelated (neither wraps the other) is left alone: hooks on it then no longer fire,
which :meth:`~modulart.core.hooks.HookRegistry.assert_fired` reports.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import modulart as mt
    >>> class Wrap(nn.Module):  # what PEFT does: the original becomes .base_layer
    ...     def __init__(self, base):
    ...         super().__init__()
    ...         self.base_layer = base
    ...     def forward(self, x):
    ...         return self.base_layer(x) + x.sum(-1, keepdim=True)  # an extra branch on the input
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    >>> reg = mt.HookRegistry(model)
    >>> _ = reg.forward_pre("2", lambda m, args: (args[0] * 0,))  # zero the input of model[2]
    >>> model[2] = Wrap(model[2])
    >>> y = model(torch.ones(1, 2))  # the hook moved onto the wrapper: both branches see 0
    >>> torch.equal(y, model[2].base_layer.bias.expand(1, 2)), len(model[2]._forward_pre_hooks)
    (True, 1)
    >>> len(model[2].base_layer._forward_pre_hooks)
    0
    >>> reg.remove(); len(model[2]._forward_pre_hooks)
    0
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle

from modulart.core.dispatch import REGISTRY_LOCK, has_module_dispatchers, move_module_dispatchers

__all__ = ["follow", "home_of", "remember", "unwatch", "watch", "wraps"]

_WRAPPED_ATTRS = ("base_layer", "module", "_checkpoint_wrapped_module")
_MAX_DEPTH = 8

# module -> (weakref to its parent, attribute name)
_HOMES: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[nn.Module], str]] = weakref.WeakKeyDictionary()
# modules modulart hooks, and the global registration hook installed while there are any
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_REGISTRATION: RemovableHandle | None = None
_IN_ASSIGN = False


def wraps(outer: nn.Module, inner: nn.Module) -> bool:
    """Whether ``inner`` is reached from ``outer`` through ``base_layer`` / ``module`` attributes."""
    m: Any = outer
    for _ in range(_MAX_DEPTH):
        mods = getattr(m, "_modules", None)
        if not isinstance(mods, dict):
            return False
        nxt = next((mods[a] for a in _WRAPPED_ATTRS if isinstance(mods.get(a), nn.Module)), None)
        if nxt is None:
            return False
        if nxt is inner:
            return True
        m = nxt
    return False


def remember(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Record that ``child`` lives at ``parent.<name>`` (``name`` a direct child name)."""
    if parent._modules.get(name) is child:
        _HOMES[child] = (weakref.ref(parent), name)


def home_of(module: nn.Module) -> tuple[nn.Module, str] | None:
    """``(parent, name)`` recorded for ``module``, or None (unknown or the parent is gone)."""
    home = _HOMES.get(module)
    if home is None:
        return None
    parent = home[0]()
    return None if parent is None else (parent, home[1])


def follow(module: nn.Module) -> nn.Module:
    """What the model calls in ``module``'s place: a wrapper that replaced it (or the module that
    replaced its wrapper); ``module`` itself when it is still in place, unknown or replaced by
    something unrelated. A change found here moves modulart's dispatchers too."""
    home = home_of(module)
    if home is None:
        return module
    parent, name = home
    current = parent._modules.get(name)
    if current is module or current is None:
        return module
    if wraps(current, module) or wraps(module, current):
        _rehome(module, current, parent, name)
        return current
    return module


def _rehome(old: nn.Module, new: nn.Module, parent: nn.Module, name: str) -> None:
    with REGISTRY_LOCK:
        move_module_dispatchers(old, new)
        _HOMES[new] = (weakref.ref(parent), name)
        if has_module_dispatchers(new):
            watch(new)
        unwatch(old)


def _on_assign(parent: nn.Module, name: str, value: nn.Module | None) -> None:
    """The global registration hook: ``parent.<name> = value`` is about to happen."""
    global _IN_ASSIGN
    if not _WATCHED or value is None:
        return
    old = parent._modules.get(name)
    if old is None or old is value or old not in _WATCHED:
        return
    if wraps(value, old) or wraps(old, value):
        _IN_ASSIGN = True  # torch is iterating over the registration hooks: keep ours in place
        try:
            _rehome(old, value, parent, name)
        finally:
            _IN_ASSIGN = False


def watch(module: nn.Module) -> None:
    """Mark ``module`` as hooked by modulart: a later wrap of it in its place is followed."""
    global _REGISTRATION
    with REGISTRY_LOCK:
        _WATCHED.add(module)
        if _REGISTRATION is None:
            _REGISTRATION = register_module_module_registration_hook(_on_assign)


def unwatch(module: nn.Module | None) -> None:
    """Unmark ``module`` once no modulart hook is left on it (called by dispatchers; None: a module
    that was garbage-collected while hooked). The registration hook goes with the last mark."""
    global _REGISTRATION
    with REGISTRY_LOCK:
        if module is not None:
            if has_module_dispatchers(module):
                return
            _WATCHED.discard(module)
        if not _WATCHED and _REGISTRATION is not None and not _IN_ASSIGN:
            _REGISTRATION.remove()
            _REGISTRATION = None
