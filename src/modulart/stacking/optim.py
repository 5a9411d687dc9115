"""Growing an optimizer's state along with the model.

Policies (``c`` = how many grown blocks copy the same source block):

| policy     | grown block copying source block ``s``                                                |
|------------|----------------------------------------------------------------------------------------|
| reset      | no state (fresh optimizer): the G_stack reference recipe                               |
| copy       | every copy gets a clone of ``s``'s state                                                |
| zero_new   | the original positions (:meth:`LayerPlan.originals`, else the first copy) get a clone;  |
|            | the other copies get zero moments and ``step = 0`` (a fresh Adam start for them)        |
| scaled     | every copy gets a clone whose parameter-shaped tensors (``exp_avg``, ``exp_avg_sq``,    |
|            | ``momentum_buffer``...) are divided by ``c``; scalars such as ``step`` are copied       |

Parameters outside the block list keep their state under every policy but ``reset``. The new
optimizer has the source's class, parameter groups and hyper-parameters.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import modulart.stacking as st
    >>> small = nn.Sequential(nn.ModuleList([nn.Linear(2, 2) for _ in range(2)]))
    >>> opt = torch.optim.AdamW(small.parameters(), lr=1e-3)
    >>> for b in small[0]: b(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> plan = st.LayerPlan.stack(2, 2)
    >>> big = st.grow(small, plan)
    >>> new = st.grow_optimizer(opt, small, big, plan, policy="copy")
    >>> len(new.state), new.param_groups[0]["lr"]
    (8, 0.001)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modulart.core.errors import ConfigError, InvalidArgumentError, UnsupportedModuleError
from modulart.stacking.blocks import find_block_list
from modulart.stacking.plan import LayerPlan

__all__ = ["POLICIES", "grow_optimizer", "source_parameter_names"]

POLICIES = ("reset", "copy", "zero_new", "scaled")


def source_parameter_names(big: nn.Module, plan: LayerPlan, blocks: str) -> dict[str, str]:
    """Grown parameter name -> the source parameter name it was copied from."""
    prefix = blocks + "."
    out: dict[str, str] = {}
    for name, _ in big.named_parameters():
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix) :].partition(".")
            if idx.isdigit():
                out[name] = f"{prefix}{plan[int(idx)]}.{rest}"
                continue
        out[name] = name
    return out


def _clone_state(state: dict[str, Any], param: torch.Tensor, mode: str, copies: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            same = v.shape == param.shape and v.dim() > 0
            if (mode == "zero" and same) or (mode == "zero" and k == "step"):
                out[k] = torch.zeros_like(v)
            elif mode == "scaled" and same:
                out[k] = v.detach().clone() / copies
            else:
                out[k] = v.detach().clone()
        elif mode == "zero" and k == "step":
            out[k] = type(v)(0)
        else:
            out[k] = v
    return out


def grow_optimizer(
    optimizer: torch.optim.Optimizer,
    small: nn.Module,
    big: nn.Module,
    plan: LayerPlan,
    policy: str = "reset",
    *,
    blocks: str | None = None,
) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class over ``big``'s parameters, with state grown by ``policy``.

    Args:
        optimizer: the small model's optimizer (not changed).
        small: the small model; big: the model grown from it with ``plan``.
        plan: the plan used for growth.
        policy: ``"reset"``, ``"copy"``, ``"zero_new"`` or ``"scaled"`` (see the module docstring).
        blocks: dotted path of the block list (None: discovered).

    Raises:
        ConfigError: unknown policy, or the plan does not match the models' depths.
        UnsupportedModuleError: a grown parameter has no source parameter in ``small``.
    """
    if policy not in POLICIES:
        raise ConfigError(f"policy = {policy!r}: must be one of {POLICIES}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgumentError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    path, small_blocks = find_block_list(small, blocks)
    _, big_blocks = find_block_list(big, path)
    plan.check_source(len(small_blocks), "small model")
    if len(big_blocks) != plan.grown_layers:
        raise ConfigError(f"the plan grows to {plan.grown_layers} layers but the big model has {len(big_blocks)}")
    small_params = dict(small.named_parameters())
    name_of = {id(p): n for n, p in small_params.items()}
    group_of: dict[str, int] = {}
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) in name_of:
                group_of[name_of[id(p)]] = g
    src = source_parameter_names(big, plan, path)
    missing = sorted(n for n, s in src.items() if s not in small_params)
    if missing:
        raise UnsupportedModuleError(f"grown parameters without a source in the small model: {missing[:5]}")
    groups: list[dict[str, Any]] = [
        {k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups
    ]
    big_params = dict(big.named_parameters())
    for name, p in big_params.items():
        gi = group_of.get(src[name])
        if gi is not None:
            groups[gi]["params"].append(p)
    groups = [g for g in groups if g["params"]]
    cls: Any = type(optimizer)
    try:
        new: torch.optim.Optimizer = cls(groups, **optimizer.defaults)
    except TypeError:
        new = cls(groups)
    if policy == "reset":
        return new
    originals = plan.originals()
    keep = set(originals) if originals is not None else {ps[0] for ps in plan.sources_of().values()}
    copies = {s: len(ps) for s, ps in plan.sources_of().items()}
    prefix = path + "."
    for name, p in big_params.items():
        sp = small_params[src[name]]
        if src[name] not in group_of or sp not in optimizer.state:
            continue
        state = optimizer.state[sp]
        mode, c = "copy", 1
        if name.startswith(prefix) and name[len(prefix) :].split(".", 1)[0].isdigit():
            pos = int(name[len(prefix) :].split(".", 1)[0])
            c = copies[plan[pos]]
            if policy == "zero_new" and pos not in keep:
                mode = "zero"
            elif policy == "scaled":
                mode = "scaled"
        new.state[p] = _clone_state(state, sp, mode, c)
    return new
