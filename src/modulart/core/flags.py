"""Order-independent ``requires_grad`` changes, shared by every handle that freezes or unfreezes.

Two handles that both change a parameter's ``requires_grad`` must be removable in any order and
leave the flag as it was before the first. Each handle records its wish through
:func:`set_requires_grad` with itself as the owner; the flag a parameter shows is the wish of the
most recent live owner, or its original value once every owner has released it
(:func:`release_requires_grad`, which :meth:`modulart.Handle.remove` calls).

Example:
    >>> import torch
    >>> from modulart.core.flags import release_requires_grad, set_requires_grad
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> a, b = object(), object()
    >>> set_requires_grad(a, [p], False); set_requires_grad(b, [p], True)
    >>> release_requires_grad(b); p.requires_grad      # a's wish again
    False
    >>> release_requires_grad(a); p.requires_grad      # the original
    True
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["release_requires_grad", "set_requires_grad"]


@dataclass
class _Entry:
    original: bool
    wishes: list[tuple[int, bool]] = field(default_factory=list)  # (owner id, value), oldest first


_LOCK = threading.RLock()
_ENTRIES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> _Entry, by identity
_BY_OWNER: dict[int, list[weakref.ref[torch.Tensor]]] = {}


def _entry(p: torch.Tensor) -> _Entry | None:
    found = _ENTRIES.get(p)  # type: ignore[no-untyped-call]
    return found if isinstance(found, _Entry) else None


def set_requires_grad(owner: object, params: Iterable[torch.Tensor], value: bool) -> None:
    """Set ``requires_grad = value`` on ``params`` on behalf of ``owner`` (a later wish wins)."""
    key = id(owner)
    with _LOCK:
        refs = _BY_OWNER.setdefault(key, [])
        for p in params:
            entry = _entry(p)
            if entry is None:
                entry = _ENTRIES[p] = _Entry(bool(p.requires_grad))
            entry.wishes = [w for w in entry.wishes if w[0] != key]
            entry.wishes.append((key, bool(value)))
            refs.append(weakref.ref(p))
            p.requires_grad_(bool(value))


def _restore_flag(p: torch.Tensor, value: bool) -> None:
    """Set one parameter's flag during a release (one resumable step of :func:`release_requires_grad`)."""
    p.requires_grad_(value)


def release_requires_grad(owner: object) -> None:
    """Drop every wish of ``owner``; each parameter shows the latest remaining wish or its original flag.

    Resumable: a parameter is forgotten only after its flag is restored, so a release interrupted
    part-way (an exception, ``KeyboardInterrupt``) restores the rest when called again.
    """
    key = id(owner)
    with _LOCK:
        refs = _BY_OWNER.get(key)
        while refs:
            ref = refs[-1]
            p = ref()
            entry = None if p is None else _entry(p)
            if p is not None and entry is not None:
                remaining = [w for w in entry.wishes if w[0] != key]
                if remaining:
                    _restore_flag(p, remaining[-1][1])
                    entry.wishes = remaining
                elif any(w[0] == key for w in entry.wishes):
                    _restore_flag(p, entry.original)
                    del _ENTRIES[p]
            refs.pop()
        _BY_OWNER.pop(key, None)
