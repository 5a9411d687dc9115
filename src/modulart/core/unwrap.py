"""The model and optimizer a user holds, unwrapped to the ones modulart acts on.

Training code hands modulart wrapped objects. :func:`unwrap_model` peels, repeatedly:

- ``DistributedDataParallel`` / ``DataParallel`` / FSDP1 and accelerate's wrappers: ``.module``;
- ``torch.compile``: ``._orig_mod`` (the compiled wrapper shares the original's parameters);
- PEFT's ``PeftModel`` / ``LoraModel``: ``.base_model.model`` (the model with adapters injected,
  whose module paths equal those of the merged model).

Module paths in plans and artefacts are relative to the unwrapped model, so an artefact saved
from a wrapped model applies to the bare one and back. :func:`unwrap_optimizer` peels
``.optimizer`` attributes (accelerate's ``AcceleratedOptimizer``) down to the
``torch.optim.Optimizer`` whose ``step()`` runs.

Example:
    >>> import torch
    >>> from modulart.core.unwrap import unwrap_model
    >>> inner = torch.nn.Linear(2, 2)
    >>> compiled = torch.compile(inner)
    >>> unwrap_model(compiled) is inner
    True
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from modulart.core.errors import InvalidArgumentError, UnsupportedModuleError
from modulart.core.types import OptimizerLike

__all__ = ["is_peft_model", "unwrap_model", "unwrap_optimizer"]

_WRAPPER_NAMES = frozenset(
    {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine", "PipelineModule"}
)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT ``PeftModel`` (checked by class name: PEFT is never imported)."""
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__)


def _peel(model: nn.Module) -> nn.Module | None:
    orig = model.__dict__.get("_orig_mod") or model._modules.get("_orig_mod")
    if isinstance(orig, nn.Module):  # torch.compile's OptimizedModule
        return orig
    if type(model).__name__ in _WRAPPER_NAMES or any(c.__name__ in _WRAPPER_NAMES for c in type(model).__mro__):
        inner = getattr(model, "module", None)
        return inner if isinstance(inner, nn.Module) else None
    if is_peft_model(model):
        base = getattr(model, "base_model", None)
        inner = getattr(base, "model", None)
        return inner if isinstance(inner, nn.Module) else None
    return None


def unwrap_model(model: object) -> nn.Module:
    """The module modulart acts on, with every known wrapper peeled off.

    Raises:
        UnsupportedModuleError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"expected a torch.nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = _peel(model)
        if inner is None:
            break
        model = inner
    return model


def unwrap_optimizer(optimizer: OptimizerLike) -> Optimizer:
    """The ``torch.optim.Optimizer`` whose ``step()`` really runs (``.optimizer`` wrappers peeled).

    Raises:
        InvalidArgumentError: nothing inside is a ``torch.optim.Optimizer``.
    """
    current: object = optimizer
    for _ in range(8):
        if isinstance(current, Optimizer) and not isinstance(getattr(current, "optimizer", None), Optimizer):
            return current
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    if isinstance(current, Optimizer):
        return current
    raise InvalidArgumentError(
        f"optimizer: expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}"
    )
