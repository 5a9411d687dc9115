"""modulart: operators over the modular inner structure of transformers, for any ``nn.Module``.

Public names are imported lazily, so ``import modulart`` stays light (it never imports
transformers or matplotlib).

Example:
    >>> import torch
    >>> import modulart as mt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> [f.d_ff for f in mt.find_ffns(model)]
    [32]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modulart._version import __version__

if TYPE_CHECKING:
    from modulart import core as core
    from modulart import emoe as emoe
    from modulart import introspect as introspect
    from modulart import kv as kv
    from modulart import migu as migu
    from modulart import patcher as patcher
    from modulart import stacking as stacking
    from modulart.core.arch import FFNLayout, register_ffn_layout
    from modulart.core.errors import (
        ArtifactNotFoundError,
        CompiledHooksBypassedError,
        CompiledHooksWarning,
        CompositionError,
        ConcurrentUseError,
        ConfigError,
        ConvergenceError,
        HookError,
        HooksNotFiredError,
        IncompatibleArtifactError,
        InvalidArgumentError,
        InvalidStateError,
        KeyNotFoundError,
        ModulartError,
        NonFiniteError,
        OperatorExistsError,
        OperatorNotFoundError,
        OutOfRangeError,
        RankMismatchError,
        SelectorError,
        ShapeError,
        ShardedModelError,
        UnknownArtifactOperatorError,
        UnsafePathError,
        UnsupportedModuleError,
        UnsupportedOperationError,
    )
    from modulart.core.ffn import FFN, find_ffns
    from modulart.core.fingerprint import Fingerprint, fingerprint
    from modulart.core.hooks import HookHandle, HookRegistry, HookSite, HookSpec, Priority, capture
    from modulart.core.io import push_to_hub, resolve_artifact
    from modulart.core.moe import MoE, find_moes
    from modulart.core.moe_layouts import MoELayout, register_moe_layout
    from modulart.core.operator import (
        Handle,
        Operator,
        OperatorConfig,
        apply,
        available_operators,
        get_operator,
        load,
        register_operator,
    )
    from modulart.core.probe import set_probe_inputs
    from modulart.core.select import LayerSpec, Selector, as_selector, select_layers
    from modulart.core.verify import clear_verification_cache

_EXPORTS: dict[str, str] = {
    # hooks
    "HookRegistry": "modulart.core.hooks",
    "HookHandle": "modulart.core.hooks",
    "HookSite": "modulart.core.hooks",
    "HookSpec": "modulart.core.hooks",
    "capture": "modulart.core.hooks",
    "Priority": "modulart.core.hooks",
    # selection
    "Selector": "modulart.core.select",
    "LayerSpec": "modulart.core.select",
    "as_selector": "modulart.core.select",
    "select_layers": "modulart.core.select",
    # views and architecture tables
    "FFN": "modulart.core.ffn",
    "find_ffns": "modulart.core.ffn",
    "MoE": "modulart.core.moe",
    "find_moes": "modulart.core.moe",
    "FFNLayout": "modulart.core.arch",
    "MoELayout": "modulart.core.moe_layouts",
    "register_ffn_layout": "modulart.core.arch",
    "register_moe_layout": "modulart.core.moe_layouts",
    "set_probe_inputs": "modulart.core.probe",
    "clear_verification_cache": "modulart.core.verify",
    # lifecycle
    "Operator": "modulart.core.operator",
    "OperatorConfig": "modulart.core.operator",
    "Handle": "modulart.core.operator",
    "register_operator": "modulart.core.operator",
    "get_operator": "modulart.core.operator",
    "available_operators": "modulart.core.operator",
    "apply": "modulart.core.operator",
    "load": "modulart.core.operator",
    # artefacts
    "Fingerprint": "modulart.core.fingerprint",
    "fingerprint": "modulart.core.fingerprint",
    "resolve_artifact": "modulart.core.io",
    "push_to_hub": "modulart.core.io",
    # errors
    "ModulartError": "modulart.core.errors",
    "UnsupportedModuleError": "modulart.core.errors",
    "SelectorError": "modulart.core.errors",
    "ConfigError": "modulart.core.errors",
    "CompositionError": "modulart.core.errors",
    "OperatorExistsError": "modulart.core.errors",
    "ShapeError": "modulart.core.errors",
    "UnsafePathError": "modulart.core.errors",
    "IncompatibleArtifactError": "modulart.core.errors",
    "HookError": "modulart.core.errors",
    "HooksNotFiredError": "modulart.core.errors",
    "OperatorNotFoundError": "modulart.core.errors",
    "UnsupportedOperationError": "modulart.core.errors",
    "ArtifactNotFoundError": "modulart.core.errors",
    "CompiledHooksBypassedError": "modulart.core.errors",
    "CompiledHooksWarning": "modulart.core.errors",
    "ConcurrentUseError": "modulart.core.errors",
    "ConvergenceError": "modulart.core.errors",
    "InvalidArgumentError": "modulart.core.errors",
    "InvalidStateError": "modulart.core.errors",
    "KeyNotFoundError": "modulart.core.errors",
    "NonFiniteError": "modulart.core.errors",
    "OutOfRangeError": "modulart.core.errors",
    "RankMismatchError": "modulart.core.errors",
    "ShardedModelError": "modulart.core.errors",
    "UnknownArtifactOperatorError": "modulart.core.errors",
}

__all__ = [
    "FFN",
    "ArtifactNotFoundError",
    "CompiledHooksBypassedError",
    "CompiledHooksWarning",
    "CompositionError",
    "ConcurrentUseError",
    "ConfigError",
    "ConvergenceError",
    "FFNLayout",
    "Fingerprint",
    "Handle",
    "HookError",
    "HookHandle",
    "HookRegistry",
    "HookSite",
    "HookSpec",
    "HooksNotFiredError",
    "IncompatibleArtifactError",
    "InvalidArgumentError",
    "InvalidStateError",
    "KeyNotFoundError",
    "LayerSpec",
    "MoE",
    "MoELayout",
    "ModulartError",
    "NonFiniteError",
    "Operator",
    "OperatorConfig",
    "OperatorExistsError",
    "OperatorNotFoundError",
    "OutOfRangeError",
    "Priority",
    "RankMismatchError",
    "Selector",
    "SelectorError",
    "ShapeError",
    "ShardedModelError",
    "UnknownArtifactOperatorError",
    "UnsafePathError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
    "__version__",
    "apply",
    "as_selector",
    "available_operators",
    "capture",
    "clear_verification_cache",
    "find_ffns",
    "find_moes",
    "fingerprint",
    "get_operator",
    "load",
    "push_to_hub",
    "register_ffn_layout",
    "register_moe_layout",
    "register_operator",
    "resolve_artifact",
    "select_layers",
    "set_probe_inputs",
]
assert set(__all__) == {"__version__", *_EXPORTS}


_SUBPACKAGES = ("core", "emoe", "introspect", "kv", "migu", "patcher", "stacking")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # `mt.emoe.apply(...)` without importing modulart.emoe first
        return importlib.import_module(f"modulart.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modulart' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # exactly the public names: not the helpers this file imports (importlib, Any, TYPE_CHECKING, ...)
    return sorted({*__all__, *_SUBPACKAGES})
