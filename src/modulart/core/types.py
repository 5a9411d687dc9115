"""Typed aliases used in modulart's public signatures.

- :data:`JSONValue`: what artefact metadata and handle state may hold besides tensors.
- :data:`StateValue` / :data:`StateDict`: a handle's state: tensors (saved as safetensors) and
  JSON values (saved in ``modulart_config.json``).
- :data:`OptimizerLike`: a ``torch.optim.Optimizer`` or a wrapper exposing it as ``.optimizer``
  (accelerate's ``AcceleratedOptimizer``, the HF Trainer's wrappers).
- :data:`ModelLike`: an ``nn.Module``, possibly wrapped (DDP / FSDP ``.module``, ``torch.compile``
  ``._orig_mod``, PEFT ``PeftModel``); see :mod:`modulart.core.unwrap`.
- :data:`Batch` / :data:`ModelInputs`: what analyses feed a model: one batch (a tensor, passed
  positionally, or a mapping of keyword inputs) or a list of batches.

Example:
    >>> from modulart.core.types import JSONValue
    >>> value: JSONValue = {"patches": [1, 2], "name": "x"}
    >>> value["name"]
    'x'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

import torch
from torch import nn

__all__ = ["Batch", "JSONValue", "ModelInputs", "ModelLike", "OptimizerLike", "StateDict", "StateValue"]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
StateValue: TypeAlias = torch.Tensor | JSONValue
StateDict: TypeAlias = dict[str, StateValue]
OptimizerLike: TypeAlias = torch.optim.Optimizer | object
ModelLike: TypeAlias = nn.Module
Batch: TypeAlias = torch.Tensor | Mapping[str, object]
ModelInputs: TypeAlias = Batch | Sequence[Batch]
