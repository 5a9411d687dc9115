"""Who else acts on a module: live modulart hooks and exclusive claims, for operators that share one.

Two operators on the same FFN must compose or refuse. This module answers the two questions they
need:

- :func:`live_hooks`: the modulart callbacks installed on given modules (or inside a subtree), by
  registry scope, so that an operator about to replace modules (``bake``, ``merge_()``, growth)
  can refuse instead of silently bypassing another operator's hooks;
- :func:`claim` / :func:`check_claims`: an operator that changes what a module's inner hooks see
  (sparse EMoE runs the FFN itself and hands its modules an empty token dimension) claims the
  subtree exclusively; any other registry's hook on a claimed module is refused with a
  :class:`~modulart.core.errors.CompositionError` naming the claimant, and the claimant refuses a
  subtree that already carries foreign hooks.

Example:
    >>> import torch
    >>> from modulart.core.hooks import HookRegistry
    >>> from modulart.core.sharing import live_hooks
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> reg = HookRegistry(model, name="demo")
    >>> _ = reg.forward("0", lambda m, a, o: None)
    >>> [h.scope for h in live_hooks([model], subtree=True)]
    ['demo']
    >>> reg.remove()
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from modulart.core.dispatch import _DISPATCHERS, HOOK_KINDS, HookHandle
from modulart.core.errors import CompositionError

if TYPE_CHECKING:
    from modulart.core.hooks import HookRegistry

__all__ = ["check_claims", "claim", "live_hooks", "release_claims", "root_scope"]

_LOCK = threading.RLock()
_CLAIMS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # module -> (root registry, reason)


def root_scope(scope: str) -> str:
    """The operator part of a hook scope (``"emoe/mask#2"`` -> ``"emoe"``)."""
    return scope.split("/", 1)[0].split("#", 1)[0]


def live_hooks(modules: Iterable[nn.Module], *, subtree: bool = False) -> list[HookHandle]:
    """Every live modulart callback on ``modules`` (and their submodules with ``subtree``)."""
    targets: list[object] = []
    for m in modules:
        targets.extend(m.modules() if subtree else [m])
        if subtree:
            targets.extend(m.parameters())
    out: list[HookHandle] = []
    seen: set[int] = set()
    for t in targets:
        if id(t) in seen:
            continue
        seen.add(id(t))
        for kind in HOOK_KINDS:
            d = _DISPATCHERS.get((id(t), kind))
            if d is not None and d.target_ref() is t:
                out.extend(e for e in d.entries if e.active)
    return out


def _root(registry: HookRegistry) -> HookRegistry:
    while registry.parent is not None:
        registry = registry.parent
    return registry


def claim(registry: HookRegistry, module: nn.Module, reason: str) -> None:
    """Claim ``module``'s subtree for ``registry``'s operator alone (see the module docstring).

    Raises:
        CompositionError: another operator already hooks or claims something in the subtree.
    """
    root = _root(registry)
    foreign = [
        h for h in live_hooks([module], subtree=True) if h._registry is not None and _root(h._registry) is not root
    ]
    if foreign:
        h = foreign[0]
        raise CompositionError(
            f"{reason}: operator {root_scope(h.scope)!r} already hooks {h.path!r} inside it; "
            f"remove that operator first, or choose a setting of this one that does not need the module alone"
        )
    with _LOCK:
        for m in module.modules():
            held = _CLAIMS.get(m)  # type: ignore[no-untyped-call]
            if held is not None and held[0] is not root:
                raise CompositionError(f"{reason}: {root_scope(held[0].name)!r} already claims it ({held[1]})")
        for m in module.modules():
            _CLAIMS[m] = (root, reason)


def release_claims(registry: HookRegistry) -> None:
    """Drop every claim of ``registry`` (its operator's handle was removed).

    Resumable: the claims still held are listed again on every call, so a release interrupted
    part-way drops the rest when called again.
    """
    root = _root(registry)
    with _LOCK:
        for m in [m for m, held in list(_CLAIMS.items()) if held[0] is root]:  # type: ignore[no-untyped-call]
            _drop_claim(m)


def _drop_claim(module: nn.Module) -> None:
    """Forget one module's claim (one resumable step of :func:`release_claims`)."""
    with _LOCK:
        if module in _CLAIMS:
            del _CLAIMS[module]


def check_claims(registry: HookRegistry, target: object) -> None:
    """Refuse a hook of ``registry`` on a module another operator claims exclusively."""
    if not _CLAIMS or not isinstance(target, nn.Module):
        return
    held = _CLAIMS.get(target)  # type: ignore[no-untyped-call]
    if held is not None and held[0] is not _root(registry):
        raise CompositionError(
            f"operator {root_scope(held[0].name)!r} has this module to itself ({held[1]}); "
            f"{root_scope(registry.name)!r} cannot hook it: remove the first operator or change its settings"
        )
