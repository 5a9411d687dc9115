"""Free attribute names for the holder modules operators attach to a model's modules.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> m.add_module("holder", torch.nn.Identity())
    >>> free_attribute_name(m, "holder"), free_attribute_name(m, "other")
    ('holder_2', 'other')
"""

from __future__ import annotations

from torch import nn

__all__ = ["free_attribute_name"]


def free_attribute_name(module: nn.Module, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``... if that attribute or child of ``module`` is taken (e.g. by
    another handle's holder)."""
    name, i = base, 1
    while name in module._modules or hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name
