"""PEFT ``target_modules`` for KV tuning, without applying it.

:func:`peft_target_modules` plans KV tuning on a model exactly as :func:`modulart.kv.apply` would
(same block choice, same key / value parts) and returns the module paths to hand to
``peft.LoraConfig(target_modules=...)``; the model is not touched (no hook, no ``requires_grad``
change).

Example:
    >>> import torch
    >>> import modulart.kv
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> modulart.kv.peft_target_modules(model, target="both")
    ['0', '2']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from modulart.core.errors import ConfigError, UnsupportedOperationError
from modulart.core.types import JSONValue
from modulart.kv.config import KVConfig
from modulart.kv.targets import Part, choose_blocks, resolve_parts

__all__ = ["module_paths", "peft_target_modules"]


def _config(config: KVConfig | Mapping[str, JSONValue] | None, overrides: Mapping[str, object]) -> KVConfig:
    if config is None:
        base = KVConfig()
    elif isinstance(config, KVConfig):
        base = config
    elif isinstance(config, Mapping):
        base = KVConfig.from_dict(config)
    else:
        raise ConfigError(f"config: expected a KVConfig, a mapping or None, got {type(config).__name__}")
    return base.replace(**overrides) if overrides else base


def peft_target_modules(
    model: nn.Module, config: KVConfig | Mapping[str, JSONValue] | None = None, /, **overrides: object
) -> list[str]:
    """Full module paths of the linear maps KV tuning would train, for ``peft.LoraConfig``.

    Args:
        model: the model (unchanged).
        config: a :class:`KVConfig` or a dict of its fields; keyword ``overrides`` win
            (e.g. ``target="values"``, ``layers="last_half"``).

    Returns:
        The paths in depth order, each once (gate and up of a gated FFN are two paths).

    Raises:
        UnsupportedOperationError: a chosen block stores its experts fused (3-D parameters, not
            modules: PEFT's ``target_parameters`` would be needed).
        ConfigError / SelectorError: as for :func:`modulart.kv.apply`.
    """
    cfg = _config(config, overrides)
    return module_paths(resolve_parts(model, cfg, choose_blocks(model, cfg)))


def module_paths(parts: Sequence[Part]) -> list[str]:
    """The module path of every non-bias part, each once, in order (what PEFT's ``target_modules`` takes).

    Raises:
        UnsupportedOperationError: a part lives in fused expert storage (a parameter, not a module).
    """
    out: list[str] = []
    for part in parts:
        if part.is_bias:
            continue
        if part.module is None:
            raise UnsupportedOperationError(
                f"{part.name}: fused expert storage has no per-matrix module for PEFT target_modules"
            )
        if part.module not in out:
            out.append(part.module)
    return out
