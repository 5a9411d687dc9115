"""EMoE on distributed models: whole keys from FSDP2 shards, one neuron -> expert split on every rank.

The rank helpers (:func:`whole`, :func:`rank_groups`, :func:`broadcast_from_first`) live in
:mod:`modulart.core.ranks` and are re-exported here; EMoE broadcasts the first rank's split, since
the clustering, deterministic for a seed on one device, is not guaranteed bitwise equal across
machines. Here:

- :func:`unsharded` unshards every FSDP2 unit while EMoE is applied to an already sharded model;
- :func:`refuse_shards_inside` / :func:`refuse_leaf_shards` refuse FSDP2 units smaller than an
  FFN (its weights would be shards between its layers, where the router reads them).

Example:
    >>> import torch
    >>> from modulart.emoe.ranks import refuse_shards_inside, unsharded
    >>> ffn = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 2))
    >>> with unsharded(ffn):  # no FSDP2 unit: nothing to unshard
    ...     refuse_shards_inside(ffn, "ffn")  # no unit inside the FFN: accepted
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from modulart.core.errors import UnsupportedModuleError
from modulart.core.ranks import broadcast_from_first, rank_groups, whole
from modulart.core.unwrap import is_dtensor

__all__ = [
    "broadcast_from_first",
    "is_dtensor",
    "rank_groups",
    "refuse_leaf_shards",
    "refuse_shards_inside",
    "unsharded",
    "whole",
]


def _is_fsdp_unit(module: nn.Module) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


_UNITS_HINT = "fully_shard the FFN or the block holding it as one unit, before or after applying EMoE"


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of ``model`` unsharded (whole plain-tensor parameters) inside the block.

    What applying to an already sharded model needs: the FFN views are verified by running a
    block, and the clustering reads whole key matrices. Costs the unsharded model's memory on every
    rank for the duration (``unshard()`` is an all-gather: every rank must enter it). Nothing
    happens for a model without FSDP2 units.
    """
    units = [m for m in model.modules() if _is_fsdp_unit(m)]
    for m in units:
        m.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        for m in reversed(units):
            m.reshard()  # type: ignore[operator]


def refuse_leaf_shards(model: nn.Module, cause: Exception) -> None:
    """Explain a failed FFN discovery on a model whose single layers are FSDP2 units (if it is one).

    Raises:
        UnsupportedModuleError: some module without submodules (a single layer) is a
            ``fully_shard`` unit of its own: the FFN views cannot be verified, nor routed, while its
            weights are resharded between the FFN's layers. Returns when there is none.
    """
    leaves = [name for name, m in model.named_modules() if name and _is_fsdp_unit(m) and not any(m.children())]
    if leaves:
        raise UnsupportedModuleError(
            f"EMoE: {leaves[:3]} are FSDP2 units of a single layer, so an FFN's weights are resharded between "
            f"its layers and modulart cannot read the FFNs; {_UNITS_HINT}"
        ) from cause


def refuse_shards_inside(module: nn.Module, path: str) -> None:
    """Refuse an FFN with an FSDP2 unit strictly inside it: its weights are not whole during its forward.

    Raises:
        UnsupportedModuleError: a submodule of ``module`` was ``fully_shard``-ed on its own.
    """
    inner = [f"{path}.{name}" for name, sub in module.named_modules() if name and _is_fsdp_unit(sub)]
    if inner:
        raise UnsupportedModuleError(
            f"EMoE on {path!r}: {inner[:3]} are FSDP2 units of their own, so the FFN's weights are resharded "
            f"between its layers and the routing cannot read them; {_UNITS_HINT}"
        )
