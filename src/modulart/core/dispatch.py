"""Dispatchers: the single torch hook modulart owns on each (object, hook kind).

Every :class:`~modulart.core.hooks.HookRegistry` adds its callbacks (:class:`HookHandle`) to the
dispatcher of the target object; the dispatcher runs them in ``(priority, insertion)`` order, counts
their firings, threads replaced values from one to the next, and removes its torch hook once its
last callback is gone. Dispatchers are shared by all registries, so priorities hold across
operators.

Two execution contexts need care (see ``docs/execution.md``):

- **torch.compile.** Dynamo does not guard on *empty* module hook dicts
  (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by default), so a torch hook added to a
  module that had none, after compiled code for it exists, is silently skipped by that code.
  :func:`note_new_module_hook` is called whenever modulart adds the first hook of a kind to a
  module; if dynamo holds compiled code (frames since its last reset), it resets the compile caches
  (the next compiled call recompiles *with* the hooks) and warns
  :class:`~modulart.core.errors.CompiledHooksWarning`.
- **threads.** A callback can be bound to the thread that installed it (``HookHandle.thread``):
  it then fires only for forwards run by that thread, so per-call recorders (``mt.capture``) never
  see another thread's tensors.

Example:
    >>> import torch
    >>> from modulart.core.dispatch import Priority
    >>> Priority.INTERVENE < Priority.RECORD
    True
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import itertools
import sys
import threading
import warnings
import weakref
from threading import get_ident
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast, get_args

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from modulart.core.errors import CompiledHooksWarning, HookError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from modulart.core.hooks import HookRegistry

__all__ = [
    "HOOK_KINDS",
    "MODULE_KINDS",
    "REGISTRY_LOCK",
    "HookHandle",
    "HookKind",
    "Priority",
    "SiteCall",
    "compiled_code_exists",
    "dispatcher_for",
    "has_module_dispatchers",
    "has_torch_hooks",
    "move_module_dispatchers",
    "note_new_module_hook",
    "suspended",
]

HookKind: TypeAlias = Literal[
    "forward",
    "forward_pre",
    "tensor",
    "post_accumulate_grad",
    "optimizer_step_pre",
    "optimizer_step_post",
]
HOOK_KINDS: tuple[HookKind, ...] = get_args(HookKind)
MODULE_KINDS: tuple[HookKind, ...] = ("forward", "forward_pre")
HookTarget: TypeAlias = "nn.Module | torch.Tensor | torch.optim.Optimizer | str"


class Priority(enum.IntEnum):
    """Ordering of callbacks on one object: lower runs first; ties run in insertion order."""

    INTERVENE = 0
    DEFAULT = 50
    RECORD = 100


_SEQ = itertools.count()
REGISTRY_LOCK = threading.RLock()


class _SuspendDepth(threading.local):
    depth = 0  # per thread: open suspended() blocks (the class attribute is every thread's start)


_SUSPENDED = _SuspendDepth()
# Open suspended() blocks over all threads. A dispatcher reads only this global while it is 0 (the
# common case: the per-thread lookup is the cost of a threading.local); it may stay too high after
# an interrupt (then the per-thread depth decides, as before), never too low.
_SUSPENDERS = 0
_SUSPENDERS_LOCK = threading.Lock()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within this block (in this thread), every modulart callback is skipped and not counted.

    View verification uses it to run a block's *own* forward on a probe even when operators are
    applied to it; nothing the operators count or record sees the probe.

    Example:
        >>> with suspended():
        ...     pass
    """
    global _SUSPENDERS
    depth = _SUSPENDED.depth
    with _SUSPENDERS_LOCK:
        _SUSPENDERS += 1
    try:
        _SUSPENDED.depth = depth + 1
        yield
    finally:
        _SUSPENDED.depth = depth
        with _SUSPENDERS_LOCK:
            _SUSPENDERS -= 1


def _is_suspended() -> bool:
    """Whether the current thread is inside :func:`suspended` (cheap while no thread is)."""
    return _SUSPENDERS > 0 and _SUSPENDED.depth > 0


class HookHandle:
    """One callback owned by a :class:`HookRegistry`.

    Attributes:
        name: unique, human-readable name (``"<scope>/<kind>:<path>"`` unless given).
        kind: the hook kind.
        path: dotted module/parameter path of the target (or a description).
        priority: ordering key on the target (lower first).
        fired: how many times the callback ran since the last reset.
        enabled: a disabled callback is skipped (and not counted).
        thread: ``threading.get_ident()`` of the only thread whose forwards run the callback
            (``None``: every thread).
        site: for a hook made by ``HookRegistry.at``, the site callback and its place (the
            dispatcher calls it on the tensor directly; ``fn`` is the equivalent closure).
    """

    __slots__ = (
        "_dispatcher",
        "_registry",
        "enabled",
        "fired",
        "fn",
        "kind",
        "name",
        "path",
        "priority",
        "scope",
        "seq",
        "site",
        "thread",
        "with_kwargs",
    )

    def __init__(
        self,
        *,
        name: str,
        kind: HookKind,
        path: str,
        priority: int,
        fn: Callable[..., Any],
        with_kwargs: bool,
        registry: HookRegistry,
        thread: int | None = None,
        site: SiteCall | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.path = path
        self.priority = int(priority)
        self.fn = fn
        self.with_kwargs = with_kwargs
        self.fired = 0
        self.enabled = True
        self.seq = next(_SEQ)
        self.thread = thread
        self.site = site
        self._registry: HookRegistry | None = registry
        self.scope = registry.name
        self._dispatcher: _Dispatcher | None = None

    @property
    def active(self) -> bool:
        """Whether the callback is still installed."""
        return self._dispatcher is not None

    def remove(self) -> None:
        """Remove this callback (idempotent)."""
        with REGISTRY_LOCK:
            if self._dispatcher is not None:
                self._dispatcher.discard(self)
                self._dispatcher = None
            if self._registry is not None:
                self._registry._forget(self)
                self._registry = None

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"HookHandle({self.name!r}, priority={self.priority}, fired={self.fired}, {state})"


def _runs_here(entry: HookHandle) -> bool:
    """Whether ``entry`` runs now: enabled, and unbound or bound to the current thread."""
    return entry.enabled and (entry.thread is None or entry.thread == get_ident())


class SiteCall:
    """What a :class:`HookHandle` made by ``HookRegistry.at`` does, as data for the dispatcher.

    The handle's ``fn`` is the equivalent ``(module, args[, kwargs], output)`` closure; the
    dispatcher calls ``fn`` here on the site's tensor itself, which saves that closure's call.

    Attributes:
        fn: the site callback, ``fn(tensor) -> replacement | None``.
        index: positional argument (``forward_pre``) or tuple element (``forward``) of the tensor.
        kwarg: ``forward_pre`` only: the name of that positional parameter, for calls passing it
            by keyword (None: unknown).
        where: the site, for the error raised when a call passes no such argument.
    """

    __slots__ = ("fn", "index", "kwarg", "where")

    def __init__(self, fn: Callable[[Any], Any], index: int, kwarg: str | None, where: str) -> None:
        self.fn = fn
        self.index = index
        self.kwarg = kwarg
        self.where = where


class _Dispatcher:
    """The single torch hook modulart owns on one (object, kind).

    ``entries`` is the ordered list of callbacks; ``_run`` is the same as a tuple, rebuilt on every
    change, which each call iterates (a callback that adds or removes hooks does not change the
    ones the current call runs, as with a copy taken per call).
    """

    def __init__(self, target: Any, kind: HookKind) -> None:
        self.key = (id(target), kind)
        self.target_ref = weakref.ref(target)
        self.kind = kind
        self.entries: list[HookHandle] = []
        self._run: tuple[HookHandle, ...] = ()
        self.torch_handle: RemovableHandle = self._register(target)
        self._finalizer = weakref.finalize(target, _DISPATCHERS.pop, self.key, None)

    def _register(self, target: Any) -> RemovableHandle:
        kind = self.kind
        if kind == "forward":
            return cast(RemovableHandle, target.register_forward_hook(self._run_forward, with_kwargs=True))
        if kind == "forward_pre":
            return cast(RemovableHandle, target.register_forward_pre_hook(self._run_pre, with_kwargs=True))
        if kind == "tensor":
            return cast(RemovableHandle, target.register_hook(self._run_grad))
        if kind == "post_accumulate_grad":
            return cast(RemovableHandle, target.register_post_accumulate_grad_hook(self._run_post_acc))
        if kind == "optimizer_step_pre":
            return cast(RemovableHandle, target.register_step_pre_hook(self._run_opt_pre))
        return cast(RemovableHandle, target.register_step_post_hook(self._run_opt_post))

    def add(self, entry: HookHandle) -> None:
        keys = [(e.priority, e.seq) for e in self.entries]
        self.entries.insert(bisect.bisect_right(keys, (entry.priority, entry.seq)), entry)
        self._run = tuple(self.entries)
        entry._dispatcher = self

    def discard(self, entry: HookHandle | None) -> None:
        if entry is not None:
            with contextlib.suppress(ValueError):
                self.entries.remove(entry)
            self._run = tuple(self.entries)
        if not self.entries:
            self.torch_handle.remove()
            self._finalizer.detach()
            if _DISPATCHERS.get(self.key) is self:
                del _DISPATCHERS[self.key]
            if self.kind in MODULE_KINDS:
                from modulart.core import rehome  # here: rehome imports this module

                rehome.unwatch(self.target_ref())

    def take_all(self) -> list[HookHandle]:
        """Empty the dispatcher (its torch hook stays until :meth:`discard`); returns the callbacks."""
        entries, self.entries, self._run = self.entries, [], ()
        return entries

    # --- the torch-facing callbacks -----------------------------------------------------------
    # Per call: one read of a global while no thread is suspended, one tuple built at install
    # time, and per callback one check (enabled / thread) and one call: site callbacks
    # (HookRegistry.at) get the tensor directly.
    def _run_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if _SUSPENDERS and _is_suspended():
            return output
        for e in self._run:
            if not e.enabled or (e.thread is not None and e.thread != get_ident()):  # = not _runs_here(e)
                continue
            e.fired += 1
            site = e.site
            if site is not None:  # = e.fn(module, args, output), without the closure's call
                if isinstance(output, tuple):
                    i = site.index
                    new = site.fn(output[i])
                    if new is not None:
                        output = (*output[:i], new, *output[i + 1 :])
                else:
                    new = site.fn(output)
                    if new is not None:
                        output = new
                continue
            r = e.fn(module, args, kwargs, output) if e.with_kwargs else e.fn(module, args, output)
            if r is not None:
                output = r
        return output

    def _run_pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if _SUSPENDERS and _is_suspended():
            return None
        changed = False
        for e in self._run:
            if not e.enabled or (e.thread is not None and e.thread != get_ident()):  # = not _runs_here(e)
                continue
            e.fired += 1
            site = e.site
            if site is not None:  # = e.fn(module, args, kwargs), without the closure's call
                i = site.index
                if len(args) > i:
                    new = site.fn(args[i])
                    if new is not None:
                        args, changed = (*args[:i], new, *args[i + 1 :]), True
                elif site.kwarg is not None and site.kwarg in kwargs:
                    new = site.fn(kwargs[site.kwarg])
                    if new is not None:
                        kwargs, changed = {**kwargs, site.kwarg: new}, True
                else:
                    raise HookError(f"{site.where}: the forward call passed no argument {i} ({site.kwarg!r})")
            elif e.with_kwargs:
                r = e.fn(module, args, kwargs)
                if r is not None:
                    if not (isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], dict)):
                        raise HookError(
                            f"forward-pre hook {e.name!r} (with_kwargs) must return None or "
                            f"(args, kwargs), got {type(r).__name__}"
                        )
                    args, kwargs = (r[0] if isinstance(r[0], tuple) else (r[0],)), r[1]
                    changed = True
            else:
                r = e.fn(module, args)
                if r is not None:
                    args = r if isinstance(r, tuple) else (r,)
                    changed = True
        return (args, kwargs) if changed else None

    def _run_grad(self, grad: torch.Tensor) -> torch.Tensor | None:
        if _SUSPENDERS and _is_suspended():
            return None
        changed = False
        for e in self._run:
            if not _runs_here(e):
                continue
            e.fired += 1
            r = e.fn(grad)
            if r is not None:
                grad, changed = r, True
        return grad if changed else None

    def _run_post_acc(self, param: torch.Tensor) -> None:
        for e in self._run:
            if _runs_here(e):
                e.fired += 1
                e.fn(param)

    def _run_opt_pre(
        self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        changed = False
        for e in self._run:
            if not _runs_here(e):
                continue
            e.fired += 1
            r = e.fn(opt, args, kwargs)
            if r is not None:
                args, kwargs = r
                changed = True
        return (args, kwargs) if changed else None

    def _run_opt_post(self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for e in self._run:
            if _runs_here(e):
                e.fired += 1
                e.fn(opt, args, kwargs)


# (id(target), kind) -> dispatcher; shared by every registry so priorities hold across operators.
_DISPATCHERS: dict[tuple[int, HookKind], _Dispatcher] = {}


def dispatcher_for(target: Any, kind: HookKind) -> _Dispatcher:
    key = (id(target), kind)
    d = _DISPATCHERS.get(key)
    if d is None or d.target_ref() is not target:
        d = _Dispatcher(target, kind)
        _DISPATCHERS[key] = d
    return d


def drop_if_empty(target: Any, kind: HookKind) -> None:
    """Remove the dispatcher on ``(target, kind)`` if it holds no callback (an interrupted install)."""
    d = _DISPATCHERS.get((id(target), kind))
    if d is not None and d.target_ref() is target and not d.entries:
        d.discard(None)


def _live(target: Any, kind: HookKind) -> _Dispatcher | None:
    d = _DISPATCHERS.get((id(target), kind))
    return d if d is not None and d.target_ref() is target and d.entries else None


def has_module_dispatchers(module: nn.Module) -> bool:
    """Whether any modulart callback is installed on ``module`` (forward or forward-pre)."""
    return any(_live(module, kind) is not None for kind in MODULE_KINDS)


def move_module_dispatchers(old: nn.Module, new: nn.Module) -> int:
    """Move every modulart forward / forward-pre callback from ``old`` to ``new``; returns how many.

    Used when ``new`` took ``old``'s place in the model (a wrapper such as a PEFT layer, or the
    module again after its wrapper was unloaded): the callbacks keep their priority, insertion
    order, counters and handles, and merge with callbacks already on ``new``. Foreign hooks on
    ``old`` are not touched.
    """
    moved = 0
    with REGISTRY_LOCK:
        for kind in MODULE_KINDS:
            d = _live(old, kind)
            if d is None:
                continue
            entries = d.take_all()
            d.torch_handle.remove()
            d._finalizer.detach()
            if _DISPATCHERS.get(d.key) is d:
                del _DISPATCHERS[d.key]
            target = dispatcher_for(new, kind)
            for e in entries:
                target.add(e)
            moved += len(entries)
    return moved


# --- torch.compile: hooks added after compiled code exists ------------------------------------
_HOOK_DICTS: dict[HookKind, str] = {"forward": "_forward_hooks", "forward_pre": "_forward_pre_hooks"}


def has_torch_hooks(module: nn.Module, kind: HookKind) -> bool:
    """Whether ``module`` has any torch hook of ``kind`` (``forward`` / ``forward_pre``), modulart's or not."""
    return bool(getattr(module, _HOOK_DICTS[kind], None))


def compiled_code_exists() -> bool:
    """Whether dynamo has processed frames since its caches were last reset (never imports dynamo).

    Example:
        >>> import torch
        >>> torch.compiler.reset()
        >>> compiled_code_exists()
        False
    """
    if "torch._dynamo" not in sys.modules:  # nothing was ever compiled: keep `import modulart` light
        return False
    from torch._dynamo import convert_frame

    tracker = getattr(convert_frame, "input_codes", None)
    seen = getattr(tracker, "seen", None)
    if seen is None:  # another torch version: assume compiled code may exist
        return True
    return len(seen) > 0


def note_new_module_hook(path: str, scope: str) -> bool:
    """Make compiled code see the first hook of a kind just added to the module at ``path``.

    Dynamo skips guards on empty module hook dicts, so code it compiled while ``path`` had no hooks
    would keep running without them (outputs equal to the model without the operator, firing
    counters at 0). If dynamo holds compiled code (it processed frames since its caches were last
    reset), the caches are reset (``torch.compiler.reset()``: the next compiled call recompiles
    with the hooks) and a :class:`CompiledHooksWarning` naming ``path`` and ``scope`` is issued.
    Returns whether it reset.

    Example:
        >>> import torch
        >>> torch.compiler.reset()
        >>> note_new_module_hook("layers.0.mlp", "emoe")  # nothing compiled since: no reset
        False
    """
    if not compiled_code_exists():
        return False
    import torch._dynamo

    if not torch._dynamo.config.skip_nnmodule_hook_guards:  # dynamo guards on hooks itself
        return False
    torch.compiler.reset()
    warnings.warn(
        f"{scope}: hooks were added to {path!r} after torch.compile had compiled code; compiled code "
        "skips hooks added to a module that had none when it was compiled, so modulart reset the "
        "compile caches (torch.compiler.reset()) and the next compiled call recompiles with them. "
        "Apply operators before torch.compile / model.compile() to avoid the recompilation.",
        CompiledHooksWarning,
        stacklevel=4,
    )
    return True
