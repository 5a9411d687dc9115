"""The one hook registry every modulart operator goes through.

PyTorch keeps hooks in per-object ordered dicts and runs them in registration order. modulart puts
*one* dispatcher hook on each (object, kind) it touches and runs its own callbacks from there, which
gives what plain hooks do not:

- **ownership**: a :class:`HookRegistry` removes only the callbacks it added; hooks added by anyone
  else are never touched, and once the last modulart callback on an object is gone the dispatcher
  is removed too, so the object's hook dicts are exactly what they were before;
- **priority**: callbacks on the same object run in ``(priority, insertion)`` order, across all
  registries, so interventions (:attr:`Priority.INTERVENE`) run before recordings
  (:attr:`Priority.RECORD`) and recordings see the intervened values;
- **all-or-nothing installation**: :meth:`HookRegistry.install` validates every spec first and
  rolls back on failure; :meth:`HookRegistry.atomic` does the same for any block of calls;
- **firing counters**: every callback counts how often it ran, and
  :meth:`HookRegistry.assert_fired` turns "a fused kernel bypassed my module" into an error
  instead of a silent no-op;
- **compiled code**: the first hook of a kind added to a module while torch.compile'd code exists
  resets the compile caches (with a ``CompiledHooksWarning``), since dynamo would skip it;
- **threads**: ``HookRegistry(model, bind_thread=True)`` runs its module callbacks only for the
  creating thread's forwards (what :func:`capture` uses; see ``docs/execution.md``).

Supported kinds: module ``forward`` and ``forward_pre`` (both optionally with kwargs), tensor
gradient hooks (``tensor``), ``post_accumulate_grad`` on parameters, and optimizer
``optimizer_step_pre`` / ``optimizer_step_post``.

Example:
    >>> import torch
    >>> from modulart import HookRegistry
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> seen = []
    >>> with HookRegistry(model) as reg:
    ...     h = reg.forward("0", lambda m, args, out: seen.append(out.shape))
    ...     _ = model(torch.randn(2, 4))
    ...     reg.assert_fired()
    >>> seen, len(model[0]._forward_hooks)
    ([torch.Size([2, 4])], 0)
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from modulart.core import rehome
from modulart.core.dispatch import (
    HOOK_KINDS,
    MODULE_KINDS,
    REGISTRY_LOCK,
    HookHandle,
    HookKind,
    Priority,
    SiteCall,
    compiled_code_exists,
    dispatcher_for,
    drop_if_empty,
    has_torch_hooks,
    note_new_module_hook,
)
from modulart.core.errors import CompiledHooksBypassedError, HookError, HooksNotFiredError
from modulart.core.sharing import check_claims

__all__ = ["HookHandle", "HookKind", "HookRegistry", "HookSite", "HookSpec", "Priority", "capture"]


def _positional_name(module: nn.Module, index: int) -> str | None:
    """Name of the ``index``-th positional parameter of ``module.forward`` (None if unknown)."""
    try:
        params = [
            p
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return None
    return params[index].name if index < len(params) else None


@dataclass(frozen=True)
class HookSpec:
    """A hook to install, as data (see :meth:`HookRegistry.install`).

    Attributes:
        kind: one of ``forward``, ``forward_pre``, ``tensor``, ``post_accumulate_grad``,
            ``optimizer_step_pre``, ``optimizer_step_post``.
        target: a module or its dotted path (module kinds), a tensor or parameter path (grad
            kinds), or an optimizer.
        fn: the callback, with the signature of the matching torch hook.
        priority: lower runs first on the same target.
        with_kwargs: module kinds only: pass (and allow returning) keyword arguments.
        name: optional unique name for counters and error messages.
    """

    kind: HookKind
    target: Any
    fn: Callable[..., Any]
    priority: int = Priority.DEFAULT
    with_kwargs: bool = False
    name: str | None = None


@dataclass(frozen=True)
class HookSite:
    """A place in the forward pass where one tensor can be read and replaced.

    Attributes:
        module: the module whose hook reaches the tensor.
        path: the module's dotted path in the model.
        kind: ``"forward_pre"`` (the tensor is positional argument ``index`` of the module's
            forward) or ``"forward"`` (the tensor is the output, or element ``index`` of a tuple
            output).
        index: see ``kind``.
    """

    module: nn.Module
    path: str
    kind: Literal["forward_pre", "forward"]
    index: int = 0

    def __repr__(self) -> str:
        return f"HookSite({self.path!r}, {self.kind}, index={self.index})"


class HookRegistry:
    """Scoped owner of hooks on one model (see the module docstring for the contracts).

    Args:
        model: the model whose modules/parameters string paths resolve against (optional when
            every target is given as an object).
        name: scope name, used as a prefix of hook names.
        bind_thread: module callbacks (``forward`` / ``forward_pre``, of this registry and its
            child scopes) run only for forwards executed by the thread that created the registry;
            forwards of other threads skip them and do not count. For per-call recorders such as
            :func:`capture`. (Gradient and optimizer callbacks are never bound: autograd may run
            them on its own threads.)

    Example:
        >>> import torch
        >>> from modulart import HookRegistry, Priority
        >>> lin = torch.nn.Linear(3, 3)
        >>> reg = HookRegistry(lin, name="demo")
        >>> _ = reg.forward(lin, lambda m, a, out: out * 0, priority=Priority.INTERVENE)
        >>> lin(torch.ones(1, 3)).abs().sum().item()
        0.0
        >>> reg.remove(); lin._forward_hooks
        OrderedDict()
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        name: str = "modulart",
        parent: HookRegistry | None = None,
        bind_thread: bool = False,
    ) -> None:
        self.model = model
        self.name = name
        self.parent = parent
        self.thread: int | None = threading.get_ident() if bind_thread else None
        self._handles: list[HookHandle] = []
        self._children: list[HookRegistry] = []
        self._paths: dict[int, str] | None = None
        self._homes: dict[int, tuple[nn.Module, str]] | None = None
        self._names: set[str] = set()

    # --- scopes -------------------------------------------------------------------------------
    def scope(self, name: str) -> HookRegistry:
        """A child registry; removing the parent removes the child's hooks too.

        A name already used by a sibling gets a ``#2``, ``#3``... suffix so every scope stays distinct.
        """
        taken = {c.name for c in self._children}
        full = base = f"{self.name}/{name}"
        i = 1
        while full in taken:
            i += 1
            full = f"{base}#{i}"
        child = HookRegistry(self.model, name=full, parent=self)
        child.thread = self.thread
        self._children.append(child)
        return child

    def __enter__(self) -> HookRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- adding hooks -------------------------------------------------------------------------
    def forward(
        self,
        target: nn.Module | str,
        fn: Callable[..., Any],
        *,
        priority: int = Priority.DEFAULT,
        with_kwargs: bool = False,
        name: str | None = None,
    ) -> HookHandle:
        """Forward hook: ``fn(module, args, output)`` (or ``fn(module, args, kwargs, output)``)."""
        return self._add(HookSpec("forward", target, fn, priority, with_kwargs, name))

    def forward_pre(
        self,
        target: nn.Module | str,
        fn: Callable[..., Any],
        *,
        priority: int = Priority.DEFAULT,
        with_kwargs: bool = False,
        name: str | None = None,
    ) -> HookHandle:
        """Forward-pre hook: ``fn(module, args) -> args | None`` (kwargs form returns ``(args, kwargs)``)."""
        return self._add(HookSpec("forward_pre", target, fn, priority, with_kwargs, name))

    def tensor(
        self,
        target: torch.Tensor | str,
        fn: Callable[[torch.Tensor], torch.Tensor | None],
        *,
        priority: int = Priority.DEFAULT,
        name: str | None = None,
    ) -> HookHandle:
        """Gradient hook on a tensor or parameter: ``fn(grad) -> grad | None``."""
        return self._add(HookSpec("tensor", target, fn, priority, False, name))

    def post_accumulate_grad(
        self,
        target: torch.Tensor | str,
        fn: Callable[[torch.Tensor], None],
        *,
        priority: int = Priority.DEFAULT,
        name: str | None = None,
    ) -> HookHandle:
        """Runs ``fn(param)`` after ``param.grad`` was accumulated in backward."""
        return self._add(HookSpec("post_accumulate_grad", target, fn, priority, False, name))

    def optimizer_step_pre(
        self,
        optimizer: torch.optim.Optimizer,
        fn: Callable[..., Any],
        *,
        priority: int = Priority.DEFAULT,
        name: str | None = None,
    ) -> HookHandle:
        """Runs ``fn(optimizer, args, kwargs)`` before every ``optimizer.step()``."""
        return self._add(HookSpec("optimizer_step_pre", optimizer, fn, priority, False, name))

    def optimizer_step_post(
        self,
        optimizer: torch.optim.Optimizer,
        fn: Callable[..., Any],
        *,
        priority: int = Priority.DEFAULT,
        name: str | None = None,
    ) -> HookHandle:
        """Runs ``fn(optimizer, args, kwargs)`` after every ``optimizer.step()``."""
        return self._add(HookSpec("optimizer_step_post", optimizer, fn, priority, False, name))

    def at(
        self,
        site: HookSite,
        fn: Callable[[torch.Tensor], torch.Tensor | None],
        *,
        priority: int = Priority.DEFAULT,
        name: str | None = None,
    ) -> HookHandle:
        """Hook a :class:`HookSite`: ``fn(tensor) -> replacement | None``.

        The callback sees just the tensor at the site (an FFN's input, hidden activation or
        output, a MoE block's input...) whatever the module's calling convention.

        Example:
            >>> import torch
            >>> from modulart import HookRegistry, HookSite
            >>> lin = torch.nn.Linear(2, 2)
            >>> with HookRegistry(lin) as reg:
            ...     _ = reg.at(HookSite(lin, "", "forward"), lambda y: torch.zeros_like(y))
            ...     float(lin(torch.ones(1, 2)).sum())
            0.0
        """
        index = site.index
        if site.kind == "forward_pre":
            kwarg = _positional_name(site.module, index)

            def pre(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
                if len(args) > index:
                    new = fn(args[index])
                    return None if new is None else ((*args[:index], new, *args[index + 1 :]), kwargs)
                if kwarg is not None and kwarg in kwargs:
                    new = fn(kwargs[kwarg])
                    return None if new is None else (args, {**kwargs, kwarg: new})
                raise HookError(f"{site}: the forward call passed no argument {index} ({kwarg!r})")

            call = SiteCall(fn, index, kwarg, str(site))
            return self._add(HookSpec("forward_pre", site.module, pre, priority, True, name), call)

        def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, tuple):
                new = fn(output[index])
                return None if new is None else (*output[:index], new, *output[index + 1 :])
            return fn(output)

        # The dispatcher runs `call` (fn on the tensor itself); `pre` / `post` are the handle's `fn`,
        # what the hook does written as a plain module hook.
        call = SiteCall(fn, index, None, str(site))
        return self._add(HookSpec("forward", site.module, post, priority, False, name), call)

    def install(self, specs: Sequence[HookSpec]) -> list[HookHandle]:
        """Install several hooks all-or-nothing.

        Every spec is validated (kind, target resolution, callable) before anything is installed;
        if an installation then fails, the hooks already added by this call are removed and the
        error is re-raised.
        """
        resolved = [(spec, *self._resolve(spec)) for spec in specs]
        explicit = [s.name for s in specs if s.name is not None]
        clashes = sorted({n for n in explicit if explicit.count(n) > 1 or n in self._names})
        if clashes:
            raise HookError(f"hook names must be unique within scope {self.name!r}; repeated: {clashes}")
        with self.atomic():
            return [self._install_resolved(spec, obj, path) for spec, obj, path in resolved]

    @contextlib.contextmanager
    def atomic(self) -> Iterator[HookRegistry]:
        """Hooks added inside the block are all removed again if the block raises."""
        before = set(self.handles(recursive=True))  # the handles themselves: ids can be reused
        try:
            yield self
        except BaseException:
            for h in self.handles(recursive=True):
                if h not in before:
                    h.remove()
            raise

    # --- removal, enabling --------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook this registry (and its child scopes) added; foreign hooks stay."""
        with REGISTRY_LOCK:
            for child in list(self._children):
                child.remove()
            for h in list(self._handles):
                h.remove()
            self._handles.clear()
            self._names.clear()

    def _forget(self, handle: HookHandle) -> None:
        with contextlib.suppress(ValueError):
            self._handles.remove(handle)
        self._names.discard(handle.name)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily skip every callback of this registry and its children."""
        handles = self.handles(recursive=True)
        saved = [h.enabled for h in handles]
        for h in handles:
            h.enabled = False
        try:
            yield
        finally:
            for h, e in zip(handles, saved, strict=True):
                h.enabled = e

    # --- inspection ---------------------------------------------------------------------------
    def handles(self, *, recursive: bool = True) -> list[HookHandle]:
        """The active handles of this registry (and of its child scopes)."""
        out = list(self._handles)
        if recursive:
            for c in self._children:
                out.extend(c.handles(recursive=True))
        return out

    def __len__(self) -> int:
        return len(self.handles())

    def counts(self) -> dict[str, int]:
        """How often each active callback fired, by hook name (``scope::name`` where a child scope reuses a name)."""
        handles = self.handles()
        names = [h.name for h in handles]
        return {(h.name if names.count(h.name) == 1 else f"{h.scope}::{h.name}"): h.fired for h in handles}

    def reset_counts(self) -> None:
        """Set every firing counter back to zero."""
        for h in self.handles():
            h.fired = 0

    def assert_fired(self, names: Sequence[str] | None = None, *, at_least: int = 1) -> None:
        """Raise :class:`HooksNotFiredError` if a hook fired fewer than ``at_least`` times.

        Args:
            names: hook names to check (default: every active hook of this registry).
            at_least: the minimum count each must have reached.
        """
        handles = self.handles()
        if names is None:
            check = handles
        else:
            known = {h.name for h in handles}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise HookError(f"no active hook named {unknown}; known: {sorted(known)[:20]}")
            check = [h for h in handles if h.name in set(names)]
        lazy = [h for h in check if h.fired < at_least]
        if lazy:
            lines = "\n".join(f"  - {h.scope}::{h.name} on {h.path!r}: fired {h.fired}x" for h in lazy)
            if compiled_code_exists():
                raise CompiledHooksBypassedError(
                    f"{len(lazy)} hook(s) fired fewer than {at_least} time(s) while torch.compile'd code "
                    f"exists:\n{lines}\nCompiled code that predates these hooks may have run instead of "
                    "the modules: apply operators before torch.compile(model) / model.compile(), or call "
                    "torch.compiler.reset() after adding hooks (see docs/execution.md)."
                )
            raise HooksNotFiredError(
                f"{len(lazy)} hook(s) fired fewer than {at_least} time(s):\n{lines}\n"
                "The module may be bypassed by a fused kernel or never called on this input; "
                "check the model's implementation settings (e.g. attention/experts implementation)."
            )

    # --- internals ----------------------------------------------------------------------------
    def _add(self, spec: HookSpec, site: SiteCall | None = None) -> HookHandle:
        obj, path = self._resolve(spec)
        return self._install_resolved(spec, obj, path, site)

    def _install_resolved(self, spec: HookSpec, obj: Any, path: str, site: SiteCall | None = None) -> HookHandle:
        if spec.kind in MODULE_KINDS:  # follow a wrap of the module, and guard its place from now on
            self._remember_home(obj)
            obj = rehome.follow(obj)
        with REGISTRY_LOCK:
            name = self._unique_name(spec, path)
            try:
                handle = HookHandle(
                    name=name,
                    kind=spec.kind,
                    path=path,
                    priority=spec.priority,
                    fn=spec.fn,
                    with_kwargs=spec.with_kwargs,
                    registry=self,
                    thread=self.thread if spec.kind in MODULE_KINDS else None,
                    site=site,
                )
                check_claims(self, obj)
                first = spec.kind in MODULE_KINDS and not has_torch_hooks(obj, spec.kind)
                dispatcher_for(obj, spec.kind).add(handle)
            except BaseException:
                self._names.discard(name)
                drop_if_empty(obj, spec.kind)  # an interrupt between creating the dispatcher and adding
                raise
            self._handles.append(handle)
            if spec.kind in MODULE_KINDS:
                rehome.watch(obj)
                if first:  # compiled code skips hooks added to a hook-less module: make it recompile
                    note_new_module_hook(path, self.name)
            return handle

    def _remember_home(self, module: nn.Module) -> None:
        """Record ``module``'s (parent, name) in the model, so a later wrap of it is followed."""
        if self.model is None:
            return
        home = self._homes.get(id(module)) if self._homes is not None else None
        if home is None or home[0]._modules.get(home[1]) is not module:
            self._homes = {
                id(child): (parent, name)
                for parent in self.model.modules()
                for name, child in parent._modules.items()
                if child is not None
            }
            home = self._homes.get(id(module))
        if home is not None and rehome.home_of(module) is None:
            rehome.remember(home[0], home[1], module)

    def _unique_name(self, spec: HookSpec, path: str) -> str:
        if spec.name is not None:
            if spec.name in self._names:
                raise HookError(f"a hook named {spec.name!r} is already active in scope {self.name!r}")
            name = spec.name
        else:
            base = name = f"{self.name}/{spec.kind}:{path}"
            i = 1
            while name in self._names:
                i += 1
                name = f"{base}#{i}"
        self._names.add(name)
        return name

    def _resolve(self, spec: HookSpec) -> tuple[Any, str]:
        if spec.kind not in HOOK_KINDS:
            raise HookError(f"unknown hook kind {spec.kind!r}; expected one of {HOOK_KINDS}")
        if not callable(spec.fn):
            raise HookError(f"hook callback for {spec.target!r} is not callable: {spec.fn!r}")
        if isinstance(spec.priority, bool) or not isinstance(spec.priority, int):
            raise HookError(f"hook priority for {spec.target!r} must be an int (see Priority), got {spec.priority!r}")
        target = spec.target
        if spec.kind in MODULE_KINDS:
            if isinstance(target, str):
                return self._module_at(target), target
            if not isinstance(target, nn.Module):
                raise HookError(f"{spec.kind} hooks need an nn.Module or a module path, got {type(target).__name__}")
            return target, self._path_of(target)
        if spec.kind in ("tensor", "post_accumulate_grad"):
            path = target if isinstance(target, str) else None
            if isinstance(target, str):
                target = self._param_at(target)
            if not isinstance(target, torch.Tensor):
                raise HookError(f"{spec.kind} hooks need a tensor or a parameter path, got {type(target).__name__}")
            path = path or self._path_of(target)
            if not target.requires_grad:
                raise HookError(f"{spec.kind} hook on {path!r}: the tensor does not require grad")
            if spec.kind == "post_accumulate_grad" and not target.is_leaf:
                raise HookError(f"post_accumulate_grad hook on {path!r}: needs a leaf tensor")
            return target, path
        if not isinstance(target, torch.optim.Optimizer):
            raise HookError(f"{spec.kind} hooks need a torch.optim.Optimizer, got {type(target).__name__}")
        return target, f"<{type(target).__name__}>"

    def _require_model(self, path: str) -> nn.Module:
        if self.model is None:
            raise HookError(f"cannot resolve path {path!r}: this HookRegistry was created without a model")
        return self.model

    def _module_at(self, path: str) -> nn.Module:
        model = self._require_model(path)
        try:
            return model.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            close = [n for n in names if n.endswith(path.rsplit(".", 1)[-1])][:5] or names[:5]
            raise HookError(f"no module at path {path!r} in {type(model).__name__}; similar paths: {close}") from None

    def _param_at(self, path: str) -> torch.Tensor:
        model = self._require_model(path)
        try:
            return model.get_parameter(path)
        except AttributeError:
            raise HookError(f"no parameter at path {path!r} in {type(model).__name__}") from None

    def _path_of(self, obj: Any) -> str:
        if self.model is None:
            return f"<{type(obj).__name__}>"
        if self._paths is None or id(obj) not in self._paths:
            self._paths = {id(m): n for n, m in self.model.named_modules()}
            self._paths.update({id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)})
        return self._paths.get(id(obj), f"<{type(obj).__name__}>")

    def __repr__(self) -> str:
        return f"HookRegistry({self.name!r}, hooks={len(self)})"


def capture(model: nn.Module, sites: Mapping[str, HookSite], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Call ``run()`` once and return a detached copy of the tensor seen at each site.

    Recording hooks (:attr:`Priority.RECORD`, so they see what interventions made of the tensor)
    are installed for the call only and asserted to have fired. A site that fires several times
    keeps its last value. The hooks are bound to the calling thread: forwards that other threads run
    on the same model meanwhile are neither recorded nor counted.

    Example:
        >>> import torch
        >>> import modulart as mt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> ffn = mt.find_ffns(model)[0]
        >>> x = torch.randn(2, 4)
        >>> got = mt.capture(model, {"q": ffn.input_site, "y": ffn.output_site}, lambda: model(x))
        >>> torch.allclose(ffn.forward(got["q"]), got["y"])
        True
    """
    got: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Callable[[torch.Tensor], None]:
        def store(tensor: torch.Tensor) -> None:
            got[key] = tensor.detach().clone()

        return store

    with HookRegistry(model, name="capture", bind_thread=True) as reg:
        for key, site in sites.items():
            reg.at(site, keep(key), priority=Priority.RECORD)
        run()
        reg.assert_fired()
    return got
