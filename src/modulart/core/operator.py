"""The operator lifecycle every modulart subpackage implements.

``Operator.apply(model, config=None, **overrides) -> Handle``:

1. the config is built and validated (:class:`OperatorConfig`: typed dataclass fields with help
   text; bad values raise :class:`~modulart.core.errors.ConfigError` naming the field);
2. :meth:`Operator.plan` checks everything against the model *without changing it* (bad selector,
   missing FFN, wrong shape: all raise here);
3. :meth:`Operator.install` changes the model through the handle's
   :class:`~modulart.core.hooks.HookRegistry`; if it fails, the handle is torn down and the model is
   exactly as before.

The returned :class:`Handle` has ``remove()`` (model bitwise as before), ``disabled()``,
``state_dict()`` / ``save(dir)`` / ``Handle.load(model, dir)`` and, where meaningful, ``merge_()``.

Operators register under a name (automatically when a subclass defines ``name``; third-party
packages via the ``modulart.operators`` entry-point group) and keep per-module-type handlers that
are looked up along both the operator's and the module's MRO, so subclassing either just works.

Example:
    >>> import dataclasses, torch
    >>> import modulart as mt
    >>> @dataclasses.dataclass
    ... class ScaleConfig(mt.OperatorConfig):
    ...     factor: float = mt.core.operator.option(2.0, "multiply every FFN output by this")
    ...     def validate(self) -> None:
    ...         self.require(self.factor > 0, "factor", "must be positive")
    >>> class Scale(mt.Operator):
    ...     name = "doc-scale"
    ...     config_class = ScaleConfig
    ...     @classmethod
    ...     def plan(cls, model, config):
    ...         return mt.core.operator.Plan(targets=[f.path for f in mt.find_ffns(model)])
    ...     @classmethod
    ...     def install(cls, handle, plan):
    ...         for f in mt.find_ffns(handle.model):
    ...             handle.registry.at(f.output_site, lambda y: y * handle.config.factor)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> x = torch.randn(2, 4); before = model(x)
    >>> h = Scale.apply(model, factor=3.0)
    >>> torch.allclose(model(x), 3 * before)
    True
    >>> h.remove(); torch.equal(model(x), before)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from modulart.core.arch import TypeTable
from modulart.core.errors import (
    ConfigError,
    IncompatibleArtifactError,
    OperatorNotFoundError,
    UnsupportedOperationError,
)
from modulart.core.hooks import HookRegistry
from modulart.core.io import Fingerprint, fingerprint, from_pretrained, load_artifact, save_artifact

__all__ = [
    "ENTRY_POINT_GROUP",
    "Handle",
    "Operator",
    "OperatorConfig",
    "Plan",
    "available_operators",
    "get_operator",
    "option",
    "register_operator",
]

ENTRY_POINT_GROUP = "modulart.operators"
C = TypeVar("C", bound="OperatorConfig")
H = TypeVar("H", bound="Handle")


def option(
    default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Callable[[], Any] | None = None
) -> Any:
    """A config field with help text: ``threshold: float = option(0.5, "what it does")``."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class OperatorConfig:
    """Base class of operator configs: typed, validated, JSON round-trippable.

    Subclasses add dataclass fields (use :func:`option` for help text) and override
    :meth:`validate`, raising through :meth:`require` so errors name the field.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))  # type: ignore[no-any-return]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a dict; unknown keys are dropped with a warning; values are validated."""
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
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def replace(self: C, **overrides: Any) -> C:
        """A validated copy with some fields changed; an unknown field raises :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no field(s) {unknown}; fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


@dataclass
class Plan:
    """What an operator will touch, computed without changing the model.

    Attributes:
        targets: resolved module paths.
        selector: the selector as written (for artefacts), if any.
        data: operator-specific results of validation (views, shapes...).
    """

    targets: list[str] = field(default_factory=list)
    selector: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Handle:
    """A live application of an operator to a model.

    Subclasses override :meth:`_teardown` (undo anything done outside the registry, e.g. restore
    ``requires_grad`` flags), :meth:`state_dict` / :meth:`load_state_dict` (what the operator
    owns), :meth:`_set_enabled` and, where meaningful, :meth:`merge_`.
    """

    def __init__(self, model: nn.Module, operator: type[Operator], config: OperatorConfig, plan: Plan) -> None:
        self.model = model
        self.operator = operator
        self.config = config
        self.plan = plan
        self.registry = HookRegistry(model, name=operator.name or operator.__name__)
        self.base_fingerprint: Fingerprint = fingerprint(model)
        self._removed = False

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def removed(self) -> bool:
        return self._removed

    def remove(self) -> None:
        """Undo the operator: hooks gone, state restored (idempotent)."""
        if self._removed:
            return
        try:
            self._teardown()
        finally:
            self.registry.remove()
            self._removed = True

    def _teardown(self) -> None:
        """Undo what the operator did outside the hook registry (override)."""

    def _set_enabled(self, enabled: bool) -> None:
        """Switch operator behaviour outside the registry on/off (override if needed)."""

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model as if the operator were not applied, inside the block."""
        self._check_live()
        self._set_enabled(False)
        try:
            with self.registry.disabled():
                yield
        finally:
            self._set_enabled(True)

    def merge_(self) -> nn.Module:
        """Bake the operator into the model's weights; afterwards no hooks remain."""
        raise UnsupportedOperationError(f"operator {self.operator.name!r} has no merge_()")

    def _check_live(self) -> None:
        if self._removed:
            raise UnsupportedOperationError(f"this {self.operator.name!r} handle was removed")

    def __enter__(self: H) -> H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors the operator owns (not the model's)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; the default accepts only an empty state."""
        if state:
            raise IncompatibleArtifactError(f"operator {self.operator.name!r} owns no tensors, got {sorted(state)[:5]}")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``modulart_config.json`` + safetensors of :meth:`state_dict`, atomically."""
        self._check_live()
        return save_artifact(
            directory,
            operator=self.operator.name,
            config=self.config.to_dict(),
            tensors=self.state_dict(),
            fingerprint=self.base_fingerprint,
            selector=self.plan.selector,
            resolved=self.plan.targets,
        )

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike[str], *, check_fingerprint: bool = True) -> Handle:
        """Re-apply a saved operator to ``model`` (a local artefact dir or a Hub repo id).

        The base-model fingerprint is checked first; a mismatch raises
        :class:`IncompatibleArtifactError` saying which tensors differ, before anything changes.
        """
        art = load_artifact(from_pretrained(directory))
        op = get_operator(art.operator)
        if not issubclass(op.handle_class, cls):
            raise IncompatibleArtifactError(
                f"artefact {art.path} belongs to operator {art.operator!r} "
                f"(handle {op.handle_class.__name__}), not to {cls.__name__}"
            )
        if check_fingerprint:
            art.check_fingerprint(model)
        return op.apply_from_state(model, op.config_class.from_dict(art.config), art.tensors)

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.registry)} hooks"
        return f"{type(self).__name__}({self.operator.name!r}, targets={len(self.plan.targets)}, {state})"


class Operator:
    """Base class of operators; see the module docstring for the lifecycle.

    Class attributes:
        name: registered name (setting it in a subclass registers the subclass).
        config_class / handle_class: the config dataclass and handle type.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[OperatorConfig]] = OperatorConfig
    handle_class: ClassVar[type[Handle]] = Handle
    _handlers: ClassVar[TypeTable[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = TypeTable()
        if "name" in cls.__dict__ and cls.name:
            register_operator(cls)

    # --- the lifecycle ------------------------------------------------------------------------
    @classmethod
    def apply(
        cls, model: nn.Module, config: OperatorConfig | Mapping[str, Any] | None = None, /, **overrides: Any
    ) -> Handle:
        """Validate, then apply the operator to ``model``; returns the handle."""
        return cls._apply(model, cls.make_config(config, overrides), None)

    @classmethod
    def apply_from_state(cls, model: nn.Module, config: OperatorConfig, state: Mapping[str, torch.Tensor]) -> Handle:
        """Apply with a saved :meth:`Handle.state_dict` (what :meth:`Handle.load` uses)."""
        return cls._apply(model, cls.make_config(config, {}), state)

    @classmethod
    def _apply(cls, model: nn.Module, cfg: OperatorConfig, state: Mapping[str, torch.Tensor] | None) -> Handle:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{cls.__name__}.apply needs an nn.Module, got {type(model).__name__}")
        plan = cls.plan(model, cfg) if state is None else cls.plan_from_state(model, cfg, state)
        handle = cls.handle_class(model, cls, cfg, plan)
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
    def make_config(
        cls, config: OperatorConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]
    ) -> OperatorConfig:
        """The validated config from a config object / dict / None plus keyword overrides."""
        if config is None:
            base = cls.config_class()
        elif isinstance(config, OperatorConfig):
            if not isinstance(config, cls.config_class):
                raise ConfigError(f"{cls.__name__} expects a {cls.config_class.__name__}, got {type(config).__name__}")
            base = config
        else:
            base = cls.config_class.from_dict(config)
        return base.replace(**overrides) if overrides else base

    @classmethod
    def plan(cls, model: nn.Module, config: OperatorConfig) -> Plan:
        """Validate against ``model`` and resolve targets, changing nothing (override)."""
        return Plan()

    @classmethod
    def plan_from_state(cls, model: nn.Module, config: OperatorConfig, state: Mapping[str, torch.Tensor]) -> Plan:
        """Like :meth:`plan`, given a saved state (override to reuse it instead of recomputing)."""
        return cls.plan(model, config)

    @classmethod
    def install(cls, handle: Handle, plan: Plan) -> None:
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


# --- the operator registry ----------------------------------------------------------------------
_OPERATORS: dict[str, type[Operator]] = {}
_ENTRY_POINTS_LOADED = False


def register_operator(cls: type[Operator], name: str | None = None) -> type[Operator]:
    """Register an operator class under ``name`` (default: ``cls.name``); usable as a decorator."""
    key = name or cls.name
    if not key:
        raise ConfigError(f"operator {cls.__name__} has no name to register under")
    _OPERATORS[key] = cls
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
            _OPERATORS.setdefault(ep.name, obj)
        else:
            warnings.warn(
                f"modulart: entry point {ep.name!r} is not an Operator subclass", RuntimeWarning, stacklevel=3
            )


def get_operator(name: str) -> type[Operator]:
    """The operator registered under ``name`` (entry points of group ``modulart.operators`` included)."""
    if name not in _OPERATORS:
        _load_builtin(name)
    if name not in _OPERATORS:
        _load_entry_points()
    try:
        return _OPERATORS[name]
    except KeyError:
        raise OperatorNotFoundError(f"no operator named {name!r}; available: {available_operators()}") from None


def available_operators() -> list[str]:
    """Names of all registered operators (built-in, user-registered and from entry points)."""
    _load_builtins()
    _load_entry_points()
    return sorted(_OPERATORS)


def _load_builtins() -> None:
    """Import every operator subpackage of modulart (each registers its operator on import)."""
    import importlib
    import pkgutil

    import modulart

    for info in pkgutil.iter_modules(modulart.__path__):
        if info.ispkg and info.name != "core":
            importlib.import_module(f"modulart.{info.name}")


def _load_builtin(name: str) -> None:
    """Import ``modulart.<name>`` if it is a built-in subpackage (it registers its operator)."""
    import importlib
    import importlib.util

    if name.isidentifier() and importlib.util.find_spec(f"modulart.{name}") is not None:
        importlib.import_module(f"modulart.{name}")
