"""The operator contract every modulart subpackage implements, and the one way in and out.

An operator is a class ``Operator[C, P, H]`` over a config type ``C`` (an :class:`OperatorConfig`
dataclass), a plan type ``P`` (a :class:`Plan` dataclass) and a handle type ``H``
(a :class:`Handle` ``[C]``):

1. ``Operator.apply(model, config=None, **overrides) -> H`` (or :func:`apply` with a config,
   dispatching on its type): the config is built and validated (bad values raise
   :class:`~modulart.core.errors.ConfigError` naming the field);
2. :meth:`Operator.plan` checks everything against the model *without changing it* and returns the
   typed plan;
3. the handle is built from ``(model, config, plan)`` in its ``__init__`` (the one place its state
   is set up), then :meth:`Operator.install` changes the model through ``handle.registry``; if
   anything fails the handle is torn down and the model is exactly as before.

Wrapped models are accepted everywhere (DDP/FSDP ``.module``, ``torch.compile``'s ``._orig_mod``,
PEFT's ``PeftModel``): the operator acts on the unwrapped model, whose module paths are the ones
plans and artefacts record.

The verbs of every handle, one meaning each:

=====================  ============================================================================
``remove()``           undo this operator's own changes (hooks, flags, owned tensors), in any order
                       relative to other handles; idempotent
``disable()`` /        switch the whole operator off / on; ``disabled()`` is the context manager;
``enable()``           ``enabled`` tells the state
``merge_()``           make the change permanent *without changing the function* (bake into
                       weights, no hooks left) or raise ``UnsupportedOperationError``
``attach(optimizer)``  hook an optimizer (accelerate's wrappers are unwrapped); operators that
                       involve no optimizer raise ``UnsupportedOperationError``
``state_dict()`` /     everything the handle needs, tensors and JSON values, symmetric: what
``load_state_dict()``  ``state_dict()`` returns, ``load_state_dict()`` restores
``save(dir)``          an artefact (config, state, the model's :class:`~modulart.core.fingerprint.
                       Fingerprint` as it is now); :func:`load` applies it again
=====================  ============================================================================

Verbs on parts of an operator are named for the part (the patcher's ``remove_patch(id)``).

Example:
    >>> import dataclasses, torch
    >>> import modulart as mt
    >>> from modulart.core.operator import Plan, option
    >>> @dataclasses.dataclass
    ... class ScaleConfig(mt.OperatorConfig):
    ...     factor: float = option(2.0, "multiply every FFN output by this")
    ...     def validate(self) -> None:
    ...         self.require(self.factor > 0, "factor", "must be positive")
    >>> class ScaleHandle(mt.Handle[ScaleConfig]):
    ...     pass
    >>> class Scale(mt.Operator[ScaleConfig, Plan, ScaleHandle]):
    ...     name = "doc-scale"
    ...     @classmethod
    ...     def plan(cls, model, config):
    ...         return Plan(targets=[f.path for f in mt.find_ffns(model)])
    ...     @classmethod
    ...     def install(cls, handle, plan):
    ...         for f in mt.find_ffns(handle.model):
    ...             handle.registry.at(f.output_site, lambda y: y * handle.config.factor)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> x = torch.randn(2, 4); before = model(x)
    >>> h = mt.apply(model, ScaleConfig(factor=3.0))
    >>> type(h).__name__, torch.allclose(model(x), 3 * before)
    ('ScaleHandle', True)
    >>> h.remove(); torch.equal(model(x), before)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import nn

from modulart.core.arch import TypeTable
from modulart.core.errors import (
    ConfigError,
    IncompatibleArtifactError,
    InvalidArgumentError,
    KeyNotFoundError,
    ModulartError,
    OperatorExistsError,
    OperatorNotFoundError,
    OutOfRangeError,
    ShapeError,
    UnknownArtifactOperatorError,
    UnsupportedModuleError,
    UnsupportedOperationError,
)
from modulart.core.fingerprint import Fingerprint, fingerprint
from modulart.core.flags import release_requires_grad, set_requires_grad
from modulart.core.hooks import HookRegistry
from modulart.core.io import Artifact, load_artifact, resolve_artifact, save_artifact
from modulart.core.sharing import release_claims
from modulart.core.types import OptimizerLike, StateDict, StateValue
from modulart.core.unwrap import unwrap_model

__all__ = [
    "BUILTIN_OPERATORS",
    "ENTRY_POINT_GROUP",
    "Handle",
    "Operator",
    "OperatorConfig",
    "Plan",
    "apply",
    "available_operators",
    "get_operator",
    "load",
    "operator_for_config",
    "option",
    "register_operator",
]

ENTRY_POINT_GROUP = "modulart.operators"
C = TypeVar("C", bound="OperatorConfig")
P = TypeVar("P", bound="Plan")
H = TypeVar("H", bound="Handle[Any]")
AnyOperator = type["Operator[Any, Any, Any]"]


def option(
    default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Callable[[], Any] | None = None
) -> Any:
    """A config field with help text: ``threshold: float = option(0.5, "what it does")``."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class OperatorConfig:
    """Base class of operator configs: typed, validated, JSON round-trippable, versioned.

    Subclasses add dataclass fields (use :func:`option` for help text) and override
    :meth:`validate`, raising through :meth:`require` so errors name the field. A subclass that
    changes what fields mean raises the default of ``version`` and overrides :meth:`migrate` to
    read older artefacts.
    """

    version: int = option(1, "schema version of this config (bumped when fields change meaning)")

    def __post_init__(self) -> None:
        self.require(isinstance(self.version, int) and self.version >= 1, "version", "must be an int >= 1")
        self.validate()

    def validate(self) -> None:
        """Check field values; override in subclasses (call :meth:`require`)."""

    def require(self, condition: bool, name: str, message: str) -> None:
        """Raise :class:`ConfigError` naming ``name`` (and its value) unless ``condition`` holds."""
        if not condition:
            value = getattr(self, name, "<unset>")
            raise ConfigError(f"{type(self).__name__}.{name} = {value!r}: {message}")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}

    @classmethod
    def schema_version(cls) -> int:
        """The config version this modulart writes (the default of the ``version`` field)."""
        for f in dataclasses.fields(cls):
            if f.name == "version" and isinstance(f.default, int):
                return f.default
        return 1

    @classmethod
    def migrate(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Turn a config dict written at ``from_version`` into the current schema (override)."""
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields (tuples become lists)."""
        return cast(dict[str, Any], json.loads(json.dumps(dataclasses.asdict(self), default=_json_default)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a dict; unknown keys are dropped with a warning; values are validated."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict: expected a mapping of field names, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", UserWarning, stacklevel=2)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if isinstance(value, list) and "tuple" in str(f.type):
                    value = tuple(value)
                kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def from_saved(cls: type[C], data: Mapping[str, Any], *, written_by: str = "unknown") -> C:
        """Build from a saved config: the version is checked and migrated, unknown keys warned about.

        Raises:
            IncompatibleArtifactError: the config is newer than this modulart reads.
        """
        saved = data.get("version", 1)
        current = cls.schema_version()
        if not isinstance(saved, int) or saved < 1:
            raise IncompatibleArtifactError(f"{cls.__name__}: saved config version {saved!r} is not an int >= 1")
        if saved > current:
            from modulart._version import __version__

            raise IncompatibleArtifactError(
                f"{cls.__name__} version {saved} was written by modulart {written_by}; this modulart "
                f"({__version__}) reads up to version {current}: upgrade modulart"
            )
        fields = dict(data)
        if saved < current:
            fields = cls.migrate(fields, saved)
        fields["version"] = current
        return cls.from_dict(fields)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{cls.__name__}.from_json: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def replace(self: C, **overrides: Any) -> C:
        """A validated copy with some fields changed; an unknown field raises :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no field(s) {unknown}; fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def _require_path(value: object, name: str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is a ``str`` or ``os.PathLike`` path."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentError(f"{name}: expected a folder path (str or os.PathLike), got {type(value).__name__}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise ConfigError(f"config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


@dataclass
class Plan:
    """What an operator will touch, computed without changing the model.

    Operators subclass it (a dataclass) with typed fields for what they resolved (views,
    labels, shapes...).

    Attributes:
        targets: resolved module paths.
        selector: the selector as written (for artefacts), if any.
    """

    targets: list[str] = field(default_factory=list)
    selector: str | None = None


class Handle(Generic[C]):
    """A live application of an operator to a model; see the module docstring for the verbs.

    Subclasses set up their state in ``__init__(model, operator, config, plan)`` (after calling
    ``super().__init__``) and override :meth:`_teardown` (undo what was done outside the
    registry and the ``requires_grad`` ledger), :meth:`_set_enabled`, :meth:`state_dict` /
    :meth:`load_state_dict` and, where meaningful, :meth:`merge_` and :meth:`attach`.

    Attributes:
        model: the (unwrapped) model.
        operator: the operator class.
        config: the validated config.
        plan: the plan it was installed from.
        registry: the hook registry every hook of this handle lives in.
    """

    #: ``True`` where every state tensor keeps the shape :meth:`state_dict` gives it now (the
    #: generic check of :meth:`load_state_dict` then compares whole shapes, not only the trailing
    #: dimensions); states that grow (patches, a task history) leave it ``False``.
    fixed_state_shapes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("load_state_dict")
        if own is not None and not getattr(own, "_modulart_checked", False):
            cls.load_state_dict = _checked_load(own)  # type: ignore[method-assign]

    def __init__(self, model: nn.Module, operator: AnyOperator, config: C, plan: Plan) -> None:
        self.model = model
        self.operator = operator
        self.config: C = config
        self.plan = plan
        self.registry = HookRegistry(model, name=operator.name or operator.__name__)
        self._removed = False
        self._enabled = True

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def removed(self) -> bool:
        return self._removed

    def remove(self) -> None:
        """Undo this operator's changes (hooks, flags, owned tensors); idempotent, any order.

        Removal is a sequence of resumable steps (the operator's teardown, its hooks, its claims,
        its ``requires_grad`` changes) whose progress is recorded: a ``remove()`` interrupted by an
        exception or ``KeyboardInterrupt`` leaves :attr:`removed` false, and calling it again
        finishes what is left. An ordinary exception in one step still runs the later ones before
        it propagates; a ``KeyboardInterrupt`` (any non-``Exception``) stops at once.
        """
        if self._removed:
            return
        done: set[str] = self.__dict__.setdefault("_remove_done", set())
        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("teardown", self._teardown),
            ("hooks", self.registry.remove),
            ("claims", lambda: release_claims(self.registry)),
            ("flags", lambda: release_requires_grad(self)),
        )
        error: Exception | None = None
        for name, step in steps:
            if name in done:
                continue
            try:
                step()
            except Exception as exc:  # the later steps still run; retrying remove() redoes this one
                error = error or exc
                continue
            done.add(name)
        if error is not None:
            raise error
        self._removed = True

    def _teardown(self) -> None:
        """Undo what the operator did outside the hook registry and the flag ledger (override)."""

    def set_requires_grad(self, params: Iterable[torch.Tensor], value: bool) -> None:
        """Change ``requires_grad`` on behalf of this handle (undone by :meth:`remove`, in any order)."""
        set_requires_grad(self, params, value)

    @property
    def enabled(self) -> bool:
        """Whether the operator acts (see :meth:`disable`)."""
        return self._enabled and not self._removed

    def disable(self) -> None:
        """Switch the whole operator off: the model runs as if it were not applied."""
        self._check_live()
        if self._enabled:
            self._enabled = False
            self._set_enabled(False)
            self._sync_hooks()

    def enable(self) -> None:
        """Switch the operator back on after :meth:`disable`."""
        self._check_live()
        if not self._enabled:
            self._enabled = True
            self._set_enabled(True)
            self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Make every hook of the registry follow :attr:`enabled` (call after adding hooks)."""
        for h in self.registry.handles():
            h.enabled = self._enabled

    def _set_enabled(self, enabled: bool) -> None:
        """Switch behaviour outside the registry on/off (override if needed)."""

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model as if the operator were not applied, inside the block."""
        was = self.enabled
        self.disable()
        try:
            yield
        finally:
            if was and not self._removed:
                self.enable()

    def merge_(self) -> nn.Module:
        """Make the change permanent without changing the function; afterwards no hooks remain."""
        raise UnsupportedOperationError(
            f"operator {self.operator.name!r} has no function-preserving merge_(); use remove() to undo it"
        )

    def attach(self, optimizer: OptimizerLike) -> None:
        """Hook ``optimizer`` (accelerate's wrappers unwrapped), for operators that involve one."""
        raise UnsupportedOperationError(f"operator {self.operator.name!r} involves no optimizer")

    def _check_live(self) -> None:
        if self._removed:
            raise UnsupportedOperationError(f"this {self.operator.name!r} handle was removed")

    def __enter__(self: H) -> H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """Everything the handle needs to be restored: tensors and JSON values (not the model's weights)."""
        return {}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore what :meth:`state_dict` returned; the default accepts only an empty state."""
        if state:
            raise IncompatibleArtifactError(f"operator {self.operator.name!r} keeps no state, got {sorted(state)[:5]}")

    def fingerprint(self) -> Fingerprint:
        """The fingerprint of the model as it is now, without what modulart owns in it."""
        return fingerprint(self.model)

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write config, state and the model's fingerprint to ``directory``, atomically.

        ``directory`` may be new, empty or an artefact (replaced atomically; files modulart did not
        write there are kept). Any other non-empty folder raises
        :class:`~modulart.core.errors.UnsafePathError` unless ``overwrite=True``, which replaces only
        the artefact's own files and keeps every other file byte for byte.
        """
        self._check_live()
        _require_path(directory, f"{type(self).__name__}.save: directory")
        return save_artifact(
            directory,
            operator=self.operator.name,
            config=self.config.to_dict(),
            tensors=self.state_dict(),
            fingerprint=self.fingerprint(),
            selector=self.plan.selector,
            resolved=self.plan.targets,
            overwrite=overwrite,
        )

    @classmethod
    def load(
        cls: type[H], model: nn.Module, path_or_repo_id: str | os.PathLike[str], *, check_fingerprint: bool = True
    ) -> H:
        """:func:`load`, refusing an artefact whose handle is not a ``cls``."""
        art = load_artifact(resolve_artifact(path_or_repo_id))
        op = _artifact_operator(art)
        if not issubclass(op.handle_class, cls):
            raise IncompatibleArtifactError(
                f"artefact {art.path} belongs to operator {art.operator!r} "
                f"(handle {op.handle_class.__name__}), not to {cls.__name__}"
            )
        handle = _load(model, art, op, check_fingerprint)
        if not isinstance(handle, cls):  # pragma: no cover - guarded by the issubclass check
            handle.remove()
            raise IncompatibleArtifactError(f"{art.path}: loaded a {type(handle).__name__}, not a {cls.__name__}")
        return handle

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.registry)} hooks" + ("" if self._enabled else ", disabled")
        return f"{type(self).__name__}({self.operator.name!r}, targets={len(self.plan.targets)}, {state})"


_LOAD_ERRORS = (ShapeError, ConfigError, OutOfRangeError, KeyNotFoundError, ValueError, TypeError, LookupError)
_STATE_ERRORS = (ValueError, TypeError, LookupError)


def check_state(handle: Handle[Any], state: Any) -> None:
    """Check a state for ``handle.load_state_dict`` against the handle's own :meth:`Handle.state_dict`.

    Before anything changes: ``state`` must map strings to tensors or JSON values; an entry the
    handle also has must be of the same kind (a tensor for a tensor), the same dtype, the same
    number of dimensions and the same trailing dimensions (the whole shape where the handle's
    ``fixed_state_shapes`` is set). Everything else (which keys, leading dimensions that grow) the
    handle's own ``load_state_dict`` checks.

    Raises:
        IncompatibleArtifactError: naming the entry, what it is and what was expected.

    Example:
        >>> import torch, modulart as mt
        >>> from modulart.core.operator import check_state
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> h = mt.kv.apply(model, target="values", mode="lora", rank=2)
        >>> check_state(h, {"2.lora_A": torch.zeros(2, 16, dtype=torch.float16)})
        Traceback (most recent call last):
        ...
        modulart.core.errors.IncompatibleArtifactError: KVHandle state entry '2.lora_A' is float16 ...
        >>> h.remove()
    """
    what = f"{type(handle).__name__} state"
    if not isinstance(state, Mapping):
        raise IncompatibleArtifactError(
            f"{what} must be a mapping of names to tensors / JSON values, got {type(state).__name__}"
        )
    bad = sorted(repr(k) for k in state if not isinstance(k, str))
    if bad:
        raise IncompatibleArtifactError(f"{what} has keys that are not strings: {bad[:5]}")
    if not state:
        return
    own = handle.state_dict()
    for key, value in state.items():
        if not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str, list, dict))):
            raise IncompatibleArtifactError(
                f"{what} entry {key!r} is a {type(value).__name__}, not a tensor or JSON value"
            )
        mine = own.get(key)
        if not isinstance(mine, torch.Tensor) or value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise IncompatibleArtifactError(
                f"{what} entry {key!r} is a {type(value).__name__}, expected a {_describe(mine)} tensor"
            )
        shape_ok = (
            tuple(value.shape) == tuple(mine.shape)
            if handle.fixed_state_shapes
            else value.dim() == mine.dim() and tuple(value.shape[1:]) == tuple(mine.shape[1:])
        )
        if value.dtype != mine.dtype or not shape_ok:
            raise IncompatibleArtifactError(f"{what} entry {key!r} is {_describe(value)}, expected {_describe(mine)}")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _checked_load(load: Any) -> Any:
    """Wrap a handle class's ``load_state_dict``: :func:`check_state` first, typed errors after."""

    @functools.wraps(load)
    def load_state_dict(self: Handle[Any], state: Mapping[str, StateValue], *args: Any, **kwargs: Any) -> None:
        check_state(self, state)
        try:
            load(self, state, *args, **kwargs)
        except IncompatibleArtifactError:
            raise
        except _LOAD_ERRORS as e:  # a value that does not fit, found by the handle's own checks
            raise IncompatibleArtifactError(f"{type(self).__name__} state does not fit: {e}") from e

    load_state_dict._modulart_checked = True  # type: ignore[attr-defined]
    return load_state_dict


class Operator(Generic[C, P, H]):
    """Base class of operators; see the module docstring for the lifecycle.

    Subclass as ``class MyOp(Operator[MyConfig, MyPlan, MyHandle])``: ``config_class`` and
    ``handle_class`` are read from the type arguments. Setting ``name`` registers the subclass
    (``override=True`` as a class keyword replaces an operator already registered under it).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[OperatorConfig]] = OperatorConfig
    handle_class: ClassVar[type[Handle[Any]]] = Handle
    _handlers: ClassVar[TypeTable[Any]]

    def __init_subclass__(cls, *, override: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = TypeTable()
        _read_type_arguments(cls)
        if "name" in cls.__dict__ and cls.name:
            register_operator(cls, override=override)

    # --- the lifecycle ------------------------------------------------------------------------
    @classmethod
    def apply(cls, model: nn.Module, config: C | Mapping[str, Any] | None = None, /, **overrides: Any) -> H:
        """Validate, plan, then apply the operator to ``model``; returns the handle."""
        return cls._apply(model, cls.make_config(config, overrides), None)

    @classmethod
    def apply_from_state(cls, model: nn.Module, config: C, state: Mapping[str, StateValue]) -> H:
        """Apply with a saved :meth:`Handle.state_dict` (what :func:`load` uses)."""
        return cls._apply(model, cls.make_config(config, {}), state)

    @classmethod
    def _apply(cls, model: nn.Module, cfg: C, state: Mapping[str, StateValue] | None) -> H:
        if not isinstance(model, nn.Module):
            raise UnsupportedModuleError(f"{cls.__name__}.apply needs an nn.Module, got {type(model).__name__}")
        model = unwrap_model(model)
        if state is None:
            plan = cls.plan(model, cfg)
            handle = cast(H, cls.handle_class(model, cls, cfg, plan))
        else:
            try:
                plan = cls.plan_from_state(model, cfg, state)
                handle = cast(H, cls.handle_class(model, cls, cfg, plan))
            except (ShapeError, OutOfRangeError) as e:  # a saved value that does not fit (labels out of range)
                raise IncompatibleArtifactError(f"{cls.__name__}: the saved state does not fit: {e}") from e
            except ModulartError:
                raise
            except _STATE_ERRORS as e:
                raise IncompatibleArtifactError(f"{cls.__name__}: the saved state does not fit: {e}") from e
        try:
            with handle.registry.atomic():
                cls.install(handle, plan)
            if state is not None:
                handle.load_state_dict(state)
        except BaseException:
            handle.remove()
            raise
        return handle

    @classmethod
    def make_config(cls, config: C | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> C:
        """The validated config from a config object / dict / None plus keyword overrides."""
        if config is None:
            base = cls.config_class()
        elif isinstance(config, OperatorConfig):
            if not isinstance(config, cls.config_class):
                raise ConfigError(f"{cls.__name__} expects a {cls.config_class.__name__}, got {type(config).__name__}")
            base = config
        elif isinstance(config, Mapping):
            base = cls.config_class.from_dict(config)
        else:
            raise ConfigError(
                f"{cls.__name__}: config must be a {cls.config_class.__name__}, a dict or None, "
                f"got {type(config).__name__}"
            )
        return cast(C, base.replace(**overrides) if overrides else base)

    @classmethod
    def plan(cls, model: nn.Module, config: C) -> P:
        """Validate against ``model`` and resolve targets, changing nothing (override)."""
        raise UnsupportedOperationError(f"operator {cls.__name__} does not implement plan()")

    @classmethod
    def plan_from_state(cls, model: nn.Module, config: C, state: Mapping[str, StateValue]) -> P:
        """Like :meth:`plan`, given a saved state (override to reuse it instead of recomputing)."""
        return cls.plan(model, config)

    @classmethod
    def install(cls, handle: H, plan: P) -> None:
        """Change the model through ``handle.registry`` (override)."""

    # --- per-module-type handlers -------------------------------------------------------------
    @classmethod
    def register_handler(cls, module_type: type[nn.Module] | str, handler: Any) -> None:
        """Register how this operator (and its subclasses) treats ``module_type`` (and subclasses)."""
        cls._handlers.register(module_type, handler)

    @classmethod
    def handler_for(cls, module: nn.Module | type[nn.Module]) -> Any:
        """The handler for a module, looked up along this operator's MRO, then the module's MRO."""
        mtype = module if isinstance(module, type) else type(module)
        for op in cls.__mro__:
            table = op.__dict__.get("_handlers")
            if isinstance(table, TypeTable):
                found = table.lookup(mtype)
                if found is not None:
                    return found
        return None


def _read_type_arguments(cls: type) -> None:
    """Fill ``config_class`` / ``handle_class`` from ``Operator[C, P, H]`` type arguments."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if not (isinstance(origin, type) and issubclass(origin, Operator)):
            continue
        args = typing.get_args(base)
        if len(args) != 3:
            continue
        config, _, handle = args
        if "config_class" not in cls.__dict__ and isinstance(config, type) and issubclass(config, OperatorConfig):
            cls.config_class = config  # type: ignore[attr-defined]
        if "handle_class" not in cls.__dict__ and isinstance(handle, type) and issubclass(handle, Handle):
            cls.handle_class = handle  # type: ignore[attr-defined]


# --- the operator registry ----------------------------------------------------------------------
_OPERATORS: dict[str, AnyOperator] = {}
_BY_CONFIG: dict[type[OperatorConfig], AnyOperator] = {}
_ENTRY_POINTS_LOADED = False


def _same_definition(a: type, b: type) -> bool:
    """The same class statement run twice (a module imported again): not a clash."""
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def register_operator(cls: AnyOperator, name: str | None = None, *, override: bool = False) -> AnyOperator:
    """Register an operator class under ``name`` (default: ``cls.name``).

    Raises:
        OperatorExistsError: the name is taken by another operator and ``override`` is False.
    """
    key = name or cls.name
    if not key:
        raise ConfigError(f"operator {cls.__name__} has no name to register under")
    taken = _OPERATORS.get(key)
    if taken is not None and taken is not cls and not override and not _same_definition(taken, cls):
        raise OperatorExistsError(
            f"operator name {key!r} is taken by {taken.__module__}.{taken.__qualname__}; "
            f"choose another name or register with override=True"
        )
    _OPERATORS[key] = cls
    owner = _BY_CONFIG.get(cls.config_class)
    # a subclass that reuses its parent's config does not take over mt.apply for that config
    if cls.config_class is not OperatorConfig and (
        owner is None or override or owner is taken or _same_definition(owner, cls)
    ):
        _BY_CONFIG[cls.config_class] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _OPERATORS:
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break modulart
            warnings.warn(
                f"modulart: cannot load operator entry point {ep.name!r} ({ep.value}): {e}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if isinstance(obj, type) and issubclass(obj, Operator):
            if ep.name not in _OPERATORS:
                register_operator(obj, ep.name)
        else:
            warnings.warn(
                f"modulart: entry point {ep.name!r} is not an Operator subclass", RuntimeWarning, stacklevel=3
            )


def get_operator(name: str) -> AnyOperator:
    """The operator registered under ``name`` (entry points of group ``modulart.operators`` included)."""
    if name not in _OPERATORS:
        _load_builtin(name)
    if name not in _OPERATORS:
        _load_entry_points()
    try:
        return _OPERATORS[name]
    except KeyError:
        raise OperatorNotFoundError(f"no operator named {name!r}; available: {available_operators()}") from None


def operator_for_config(config: OperatorConfig) -> AnyOperator:
    """The operator whose config class is ``type(config)`` (or its nearest registered base)."""
    if not isinstance(config, OperatorConfig):
        raise ConfigError(f"expected an OperatorConfig (e.g. mt.emoe.EMoEConfig()), got {type(config).__name__}")
    for attempt in range(2):
        for klass in type(config).__mro__:
            if klass in _BY_CONFIG:
                return _BY_CONFIG[klass]
        if attempt == 0:
            _load_builtins()
            _load_entry_points()
    raise OperatorNotFoundError(
        f"no registered operator takes a {type(config).__name__}; available: {available_operators()}"
    )


def available_operators() -> list[str]:
    """Names of all registered operators (built-in, user-registered and from entry points)."""
    _load_builtins()
    _load_entry_points()
    return sorted(_OPERATORS)


# The built-in operators and the module that registers each: a fixed table, so a name read from a
# file never selects what gets imported.
BUILTIN_OPERATORS: dict[str, str] = {
    "emoe": "modulart.emoe",
    "kv": "modulart.kv",
    "migu": "modulart.migu",
    "patcher": "modulart.patcher",
}


def _load_builtins() -> None:
    """Import every built-in operator package (each registers its operator on import)."""
    import importlib

    for module in BUILTIN_OPERATORS.values():
        importlib.import_module(module)


def _load_builtin(name: str) -> None:
    """Import the package of the built-in operator ``name``, if it is one (nothing else is imported)."""
    import importlib

    module = BUILTIN_OPERATORS.get(name)
    if module is not None:
        importlib.import_module(module)


# --- the two entry points -----------------------------------------------------------------------
def apply(model: nn.Module, config: C, /, **overrides: Any) -> Handle[C]:
    """Apply the operator that ``config``'s type belongs to (plug-ins included); returns its handle.

    Example:
        >>> import torch, modulart as mt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> h = mt.apply(model, mt.kv.KVConfig(target="keys"))
        >>> type(h).__name__, [n for n, p in model.named_parameters() if p.requires_grad]
        ('KVHandle', ['0.weight'])
        >>> h.remove()
    """
    op = operator_for_config(config)
    return cast(Handle[C], op.apply(model, config, **overrides))


def _artifact_operator(art: Artifact) -> AnyOperator:
    """The registered operator an artefact names (looked up, never imported)."""
    try:
        return get_operator(art.operator)
    except OperatorNotFoundError as e:
        raise UnknownArtifactOperatorError(f"artefact {art.path}: {e}") from None


def _load(model: nn.Module, art: Artifact, op: AnyOperator, check_fingerprint: bool) -> Handle[Any]:
    config = op.config_class.from_saved(art.config, written_by=art.library_version)
    target = unwrap_model(model)
    if check_fingerprint:
        art.check_fingerprint(target)
    return cast(Handle[Any], op.apply_from_state(target, config, art.state))


def load(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike[str],
    *,
    check_fingerprint: bool = True,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | None = None,
) -> Handle[Any]:
    """Apply a saved artefact to ``model`` and return the live handle.

    ``path_or_repo_id`` is a local artefact folder or a Hub repo id (resolved from the local cache
    when offline). The config version is checked (a too-new artefact says which modulart wrote
    it), unknown config keys are dropped with a warning, and the model's fingerprint is compared
    with the one saved, before anything changes.

    Raises:
        IncompatibleArtifactError: not an artefact, too new, or saved from another model (the
            message names the tensors that differ; ``check_fingerprint=False`` overrides).

    Example:
        >>> import tempfile, torch, modulart as mt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> h = mt.kv.apply(model, target="values", mode="lora", rank=2)
        >>> d = h.save(tempfile.mkdtemp() + "/kv"); h.remove()
        >>> again = mt.load(model, d)
        >>> type(again).__name__, sorted(again.state_dict())
        ('KVHandle', ['2.lora_A', '2.lora_B'])
        >>> again.remove()
    """
    _require_path(path_or_repo_id, "mt.load: path_or_repo_id")
    local = resolve_artifact(path_or_repo_id, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    art = load_artifact(local)
    return _load(model, art, _artifact_operator(art), check_fingerprint)
