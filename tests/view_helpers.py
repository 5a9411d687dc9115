"""Helpers shared by the view tests: capture tensors at hook sites, diff state dicts."""

from __future__ import annotations

import torch
from torch import nn

import modulart as mt
from families import Family


def capture(fam: Family, sites: dict[str, mt.HookSite]) -> dict[str, torch.Tensor]:
    """Run the model once and return the tensor seen at each site (hooks must all fire)."""
    seen = mt.capture(fam.model, sites, fam.run)
    assert set(seen) == set(sites)
    return seen


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict entries that differ from ``before`` (new values)."""
    after = model.state_dict()
    assert set(after) == set(before)
    return {k: v.detach().clone() for k, v in after.items() if not torch.equal(v, before[k])}
