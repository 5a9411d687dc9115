"""In-memory depth growth of any model with a homogeneous block list.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import modulart.stacking as st
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.norm = nn.LayerNorm(8); self.out_proj = nn.Linear(8, 8)
    ...     def forward(self, x): return x + self.out_proj(self.norm(x))
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.layers = nn.ModuleList([Block() for _ in range(2)])
    ...     def forward(self, x):
    ...         for b in self.layers: x = b(x)
    ...         return x
    >>> small = Net().eval()
    >>> big = st.grow(small, st.LayerPlan.stack(2, 2), operator="zero")
    >>> len(big.layers), st.function_difference(small, big, torch.randn(3, 8)) == 0.0
    (4, True)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modulart.core.errors import ConfigError, ShardedModelError
from modulart.core.operator import OperatorConfig, option
from modulart.stacking.blocks import block_info, find_block_list, place_first_block_copy, reindex_block
from modulart.stacking.hfconfig import rewrite_config
from modulart.stacking.operators import (
    OPERATORS,
    GrowthRamp,
    drop_copied_hooks,
    get_growth_operator,
    randomize_block,
    refuse_live_hooks,
    zero_block_outputs,
)
from modulart.stacking.plan import LayerPlan

__all__ = ["GrowthConfig", "grow", "new_positions", "resolve_plan"]


@dataclasses.dataclass
class GrowthConfig(OperatorConfig):
    """How a model is grown."""

    operator: str = option("direct", "growth operator: 'direct' (G_stack), 'zero', 'random' (masked ramp) or 'learn'")
    blocks: str | None = option(None, "dotted path of the block list (None: discovered)")
    seed: int = option(0, "seed of every random choice (random operator init)")
    ramp_steps: int = option(1000, "random: steps over which the mask of the new blocks ramps from 0 to 1")
    init_std: float | None = option(None, "random: std of new weights (None: each tensor's own std)")
    learn_steps: int = option(100, "learn: optimisation steps of the mixing coefficients")
    learn_lr: float = option(1e-2, "learn: Adam learning rate of the mixing coefficients")

    def validate(self) -> None:
        self.require(self.operator in OPERATORS, "operator", f"must be one of {sorted(OPERATORS)}")
        self.require(self.blocks is None or isinstance(self.blocks, str), "blocks", "must be a dotted path or None")
        self.require(isinstance(self.seed, int), "seed", "must be an int")
        self.require(isinstance(self.ramp_steps, int) and self.ramp_steps >= 0, "ramp_steps", "must be an int >= 0")
        std = self.init_std
        ok_std = std is None or (isinstance(std, (int, float)) and math.isfinite(std) and std > 0)
        self.require(ok_std, "init_std", "must be a finite number > 0 or None")
        self.require(isinstance(self.learn_steps, int) and self.learn_steps >= 0, "learn_steps", "must be >= 0")
        ok_lr = isinstance(self.learn_lr, (int, float)) and math.isfinite(self.learn_lr) and self.learn_lr > 0
        self.require(ok_lr, "learn_lr", "must be a finite number > 0")


def resolve_plan(plan: LayerPlan | int, num_layers: int) -> LayerPlan:
    """An int ``g`` means :meth:`LayerPlan.stack` with factor ``g``; a plan is checked against the depth."""
    if isinstance(plan, int) and not isinstance(plan, bool):
        return LayerPlan.stack(num_layers, plan)
    if not isinstance(plan, LayerPlan):
        raise ConfigError(f"plan = {plan!r}: expected a LayerPlan or an int growth factor")
    plan.check_source(num_layers)
    return plan


def new_positions(plan: LayerPlan, operator: str) -> list[int]:
    """Grown positions that a function-preserving operator turns into identities (the rest keep the source).

    Raises:
        ConfigError: ``operator`` needs the source sequence in order but the plan lacks it.
    """
    op = get_growth_operator(operator)
    if not op.needs_in_order_plan:
        return []
    originals = plan.originals()
    if originals is None:
        raise ConfigError(
            f"operator {operator!r} keeps the source blocks and adds identity blocks, so the plan must contain "
            f"0..{plan.num_layers - 1} in order; {plan.describe()} does not"
        )
    keep = set(originals)
    return [i for i in range(plan.grown_layers) if i not in keep]


def _rewrite_stack_configs(grown: nn.Module, path: str, plan: LayerPlan) -> None:
    """Rewrite the configs that the modules holding the block list keep of their own.

    Encoder-decoders (T5 and relatives) give each stack a copy of the config whose depth key is that
    stack's depth; the decoder sizes its KV cache from it, so a grown decoder with the old depth in
    its copy fails at the first cached forward.
    """
    root = getattr(grown, "config", None)
    parts = path.split(".")
    for i in range(1, len(parts)):
        holder = grown.get_submodule(".".join(parts[:i]))
        own = getattr(holder, "config", None)
        if own is not None and own is not root and hasattr(own, "to_dict"):
            rewrite_config(own, plan, ".".join(parts[i:]), check=False)


def _unwrap_data_parallel(model: nn.Module) -> tuple[nn.Module, Any]:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, and DDP's process group.

    Raises:
        ShardedModelError: the model is sharded (FSDP2 ``DTensor`` parameters or an FSDP
            wrapper): growth copies whole blocks, so it needs the unsharded model.
    """
    group = None
    while any(c.__name__ in ("DistributedDataParallel", "DataParallel") for c in type(model).__mro__):
        group = getattr(model, "process_group", group)
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    sharded = any(c.__name__ in ("FSDPModule", "FullyShardedDataParallel") for c in type(model).__mro__) or any(
        any(c.__name__ == "DTensor" for c in type(p).__mro__) for p in model.parameters()
    )
    if sharded:
        raise ShardedModelError(
            f"grow(): the {type(model).__name__} is sharded (FSDP); growth copies whole blocks, so grow the unsharded "
            "model first and then fully_shard the grown one (grow, then shard)"
        )
    return model, group


def grow(
    model: nn.Module,
    plan: LayerPlan | int,
    config: GrowthConfig | None = None,
    *,
    loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    **overrides: object,
) -> nn.Module:
    """A new, deeper model: block ``i`` is built from source block ``plan[i]`` by the operator.

    The source model is not changed and shares no storage with the result. Embeddings, final norm
    and head are copied unchanged. Hugging Face configs are rewritten (depth, ``layer_types`` and
    other per-layer arrays) and per-layer ``layer_idx`` attributes are re-indexed, so generation
    with a KV cache works on the grown model.

    A plain function, not an operator: it returns a new model and keeps no handle (growth has
    nothing to ``remove()``; the ``random`` operator's ramp is a :class:`GrowthRamp` on the
    result). Operators go on the grown model afterwards: a source with live modulart hooks (EMoE,
    KV / LoRA, patcher, MIGU, a bare ``HookRegistry``) is refused, since the copies would carry
    hooks still tied to the source's handles. Forward / backward torch hooks registered on the
    source as plain functions (lambdas, closures) are not copied, since every copy would share them
    with the source (a ``UserWarning`` names where they were); hooks that are callable objects are
    copied with their module, and state-dict hooks are kept.

    Distributed training: grow the whole model on every rank, then wrap the grown one (a new
    ``DistributedDataParallel``, or ``fully_shard``). A DDP-wrapped source is grown from the module
    inside (the result is not wrapped), and with ``operator="learn"`` the mixing coefficients'
    gradients are then averaged over DDP's process group, so every rank fits the same mix on the
    union of the ranks' batches. A sharded (FSDP) source is refused.

    Args:
        model: the source model (any ``nn.Module`` with a homogeneous block list; a DDP wrapper is
            peeled).
        plan: a :class:`LayerPlan`, or an int growth factor (G_stack of all layers).
        config: a :class:`GrowthConfig` (``operator``, ``blocks``, ``seed``...); keyword
            overrides are applied on top.
        loss_fn: ``learn`` only: ``loss_fn(model) -> scalar`` on a training batch; the mixing
            coefficients of every grown block are fitted to it for ``learn_steps`` steps.

    Returns:
        The grown model (same class), in the source's train/eval mode. With ``operator="random"``
        the model carries a :class:`~modulart.stacking.operators.GrowthRamp` (see
        :func:`~modulart.stacking.get_ramp`).

    Raises:
        ConfigError: bad plan / config (before anything is built).
        CompositionError: the source carries live modulart hooks (the message names the
            operators); remove them first.
        ShardedModelError: the source is sharded by FSDP (grow first, then shard).
        UnsupportedModuleError: no block list, or (``zero``) a block without known outputs.
    """
    unknown = sorted(set(overrides) - set(GrowthConfig.field_help()))
    if unknown:
        raise ConfigError(
            f"grow() got unknown options {unknown}; GrowthConfig fields: {sorted(GrowthConfig.field_help())}"
        )
    cfg = GrowthConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    model, group = _unwrap_data_parallel(model)
    refuse_live_hooks(model, "grow()")
    path, source_blocks = find_block_list(model, cfg.blocks)
    plan = resolve_plan(plan, len(source_blocks))
    if plan[0] != 0 and block_info(source_blocks[0]).first_block_only:
        raise ConfigError(
            f"plan {plan.describe()}: the grown block 0 must be a copy of block 0 for "
            f"{type(source_blocks[0]).__name__}, whose first block alone holds "
            f"{list(block_info(source_blocks[0]).first_block_only)}"
        )
    new = new_positions(plan, cfg.operator)
    if cfg.operator == "learn" and loss_fn is None:
        raise ConfigError("operator 'learn' needs loss_fn(model) -> loss to fit the mixing coefficients")
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        from modulart.stacking.hfconfig import rewrite_config_dict

        rewrite_config_dict(hf_config.to_dict(), plan, path)  # validate (and check) before building anything

    # copy everything but the block list once, then each block once per use: no shared storage
    memo: dict[int, Any] = {id(source_blocks): nn.ModuleList()}
    grown = copy.deepcopy(model, memo)
    grown_blocks = memo[id(source_blocks)]
    assert isinstance(grown_blocks, nn.ModuleList)
    for i, s in enumerate(plan):
        # objects outside the blocks (config, rotary tables) map to the grown model's copies; the
        # block's own tensors are copied afresh for every use
        block = copy.deepcopy(source_blocks[s], dict(memo))
        reindex_block(block, s, i)
        if s == 0:
            place_first_block_copy(block, i)
        grown_blocks.append(block)
    drop_copied_hooks(grown, "grow()")
    if getattr(grown, "config", None) is not None and hasattr(grown.config, "to_dict"):
        rewrite_config(grown.config, plan, path, check=False)
    _rewrite_stack_configs(grown, path, plan)

    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.operator == "zero":
        for i in new:
            zero_block_outputs(grown_blocks[i], f"{path}.{i}")
    elif cfg.operator == "random":
        for i in new:
            randomize_block(grown_blocks[i], gen, cfg.init_std)
        ramp = GrowthRamp(grown, [f"{path}.{i}" for i in new], cfg.ramp_steps)
        object.__setattr__(grown, "_modulart_growth_ramp", ramp)
    elif cfg.operator == "learn":
        from modulart.stacking.learn import learn_mix

        assert loss_fn is not None
        learn_mix(grown, path, source_blocks, plan, loss_fn, steps=cfg.learn_steps, lr=cfg.learn_lr, group=group)
    grown.train(model.training)
    return grown
