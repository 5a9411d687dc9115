"""Which ranks a model spans, and the few collectives operators need to agree across them.

A model is *distributed* here when it is wrapped in ``DistributedDataParallel`` or holds FSDP2
(``fully_shard``) / tensor-parallel ``DTensor`` parameters; a process group that merely exists does
not count, so nothing here runs a collective for a model that is local to its rank.

- :func:`whole` gathers a sharded tensor (an ``all_gather`` over its mesh: every rank must call it);
- :func:`rank_groups` names the process groups a model is replicated or sharded over;
- :func:`broadcast_from_first` / :func:`broadcast_` make tensors equal to the first rank's of every
  group, so a decision taken on each rank (a clustering, a stopping rule) is the same everywhere.

Example:
    >>> import torch
    >>> from modulart.core.ranks import broadcast_from_first, rank_groups, whole
    >>> rank_groups(torch.nn.Linear(2, 2))  # not distributed: no group, no collective
    []
    >>> w = torch.ones(2, 3)
    >>> whole(w) is w, broadcast_from_first([w], [])[0].tolist() == w.tolist()
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modulart.core.unwrap import is_dtensor

__all__ = ["broadcast_", "broadcast_from_first", "rank_groups", "whole"]


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor when ``t`` is a sharded ``DTensor`` (collective)."""
    if is_dtensor(t):
        full: torch.Tensor = t.full_tensor()  # type: ignore[attr-defined]
        return full
    return t


def _ddp_group(model: object) -> Any:
    seen: set[int] = set()
    current = model
    while isinstance(current, nn.Module) and id(current) not in seen:
        seen.add(id(current))
        if any(c.__name__ == "DistributedDataParallel" for c in type(current).__mro__):
            return getattr(current, "process_group", None)
        current = (
            current.__dict__.get("_orig_mod") or current._modules.get("_orig_mod") or getattr(current, "module", None)
        )
    return None


def rank_groups(model: object) -> list[Any]:
    """The process groups ``model`` is replicated or sharded over (``[]`` when it is local to its rank).

    A ``DistributedDataParallel`` wrapper (peeled through ``torch.compile``) gives its
    ``process_group``; ``DTensor`` parameters give every dimension of their device mesh.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return []
    group = _ddp_group(model)
    if group is not None:
        return [group]
    if not isinstance(model, nn.Module):
        return []
    for p in model.parameters():
        if is_dtensor(p):
            mesh = p.device_mesh  # type: ignore[attr-defined]
            return [mesh.get_group(d) for d in range(mesh.ndim)]
    return []


def broadcast_from_first(tensors: Sequence[torch.Tensor], groups: Sequence[Any]) -> list[torch.Tensor]:
    """Copies of ``tensors`` equal to the first rank's of every group in ``groups`` (in order).

    Every rank of every group must call this with tensors of the same shapes and dtypes.
    """
    out = [t.detach().clone().contiguous() for t in tensors]
    broadcast_(out, groups)
    return out


def broadcast_(tensors: Sequence[torch.Tensor], groups: Sequence[Any], device: torch.device | None = None) -> None:
    """Overwrite ``tensors`` in place with the first rank's of every group (a no-op without groups).

    Sent through buffers on ``device`` (default: each tensor's own; NCCL needs CUDA tensors), bools
    as ``uint8``.
    """
    dist = torch.distributed
    for group in groups:
        src = 0 if group is None else dist.get_global_rank(group, 0)  # None: the default group
        for t in tensors:
            with torch.no_grad():
                dtype = torch.uint8 if t.dtype == torch.bool else t.dtype
                buf = t.detach().to(device or t.device, dtype).clone().contiguous()
                dist.broadcast(buf, src=src, group=group)
                t.copy_(buf.to(t.device, t.dtype))
