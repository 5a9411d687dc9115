"""The MIGU operator: update only the output units with the largest activation magnitude each step.

Example:
    >>> import torch, modulart.migu
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> migu = modulart.migu.apply(model, keep_ratio=0.3, select="topk", optimizer=opt)
    >>> model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    >>> {p: s.kept_fraction for p, s in migu.stats().items()}
    {'0': 0.3, '2': 0.5}
    >>> migu.remove()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from modulart.core.operator import Operator, Plan
from modulart.core.types import JSONValue, OptimizerLike
from modulart.core.unwrap import refuse_sharded
from modulart.migu.config import MIGUConfig
from modulart.migu.coverage import warn_ungated
from modulart.migu.experts import FusedExperts
from modulart.migu.handle import MIGUHandle
from modulart.migu.targets import Target, discover, find_targets

__all__ = ["MIGU", "MIGUHandle", "MIGUPlan", "Target", "apply", "find_targets"]  # MIGUHandle: from .handle


_FSDP2_ORDER = "mt.migu.apply(model, ...) -> fully_shard(...) -> build the optimizer -> handle.attach(optimizer)"


@dataclass
class MIGUPlan(Plan):
    """What MIGU gates: the linear layers / routers and the fused experts modules.

    ``targets`` (the base field) lists every path, layers first; ``targets_found`` and
    ``experts`` hold what was resolved at them.
    """

    targets_found: list[Target] = field(default_factory=list)
    experts: list[FusedExperts] = field(default_factory=list)


class MIGU(Operator[MIGUConfig, MIGUPlan, MIGUHandle]):
    """MIGU (arXiv 2406.17245): per step, update only the output units with the largest magnitude."""

    name = "migu"

    @classmethod
    def plan(cls, model: nn.Module, config: MIGUConfig) -> MIGUPlan:
        refuse_sharded(model, "MIGU", _FSDP2_ORDER)
        found = discover(model, config.targets, moe=config.moe)
        if config.targets is None:
            warn_ungated(model, found, stacklevel=5)  # the caller of modulart.migu.apply
        sel = None if config.targets is None else str(config.targets)
        paths = [t.path for t in found.targets] + [fe.path for fe in found.experts]
        return MIGUPlan(targets=paths, selector=sel, targets_found=list(found.targets), experts=list(found.experts))

    @classmethod
    def install(cls, handle: MIGUHandle, plan: MIGUPlan) -> None:
        handle.install_hooks()


def apply(
    model: nn.Module,
    config: MIGUConfig | Mapping[str, JSONValue] | None = None,
    /,
    *,
    optimizer: OptimizerLike | None = None,
    **overrides: object,
) -> MIGUHandle:
    """Gate the updates of ``model``'s linear layers by output magnitude; see :class:`MIGUConfig`.

    Args:
        model: any model with ``nn.Linear`` / HF ``Conv1D`` layers (DDP-wrapped or not).
        config: a :class:`MIGUConfig` (or dict); keyword overrides win.
        optimizer: masks are built and applied right before its ``step()`` (accelerate's wrapper
            is unwrapped); without it, call :meth:`MIGUHandle.attach` before training.

    Returns:
        The handle: ``stats()``, ``task_boundary()``, ``mask_()``, ``enable()`` / ``disable()`` /
        ``disabled()``, ``set_token_mask()``, ``merge_()``, ``save()``, ``remove()``.
    """
    handle = MIGU.apply(model, config, **overrides)
    if optimizer is not None:
        try:
            handle.attach(optimizer)
        except BaseException:
            handle.remove()
            raise
    return handle
