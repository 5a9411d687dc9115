"""The KV operator: train FFN keys, values or both — fully, with LoRA, or through neuron masks.

:meth:`KV.plan` resolves the blocks and the :class:`~modulart.kv.targets.Part` s (and, in mode
``mask``, the kept neurons) without touching the model; the :class:`~modulart.kv.handle.KVHandle`
builds its LoRA tensors and masks in its ``__init__``; :meth:`KV.install` then changes the model:
``requires_grad`` through the handle's order-independent ledger, the LoRA holders registered into
the model (``<module>.modulart_kv_lora``), fused expert parameters parametrised, hooks installed.

Example:
    >>> import torch
    >>> import modulart.kv
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> h = modulart.kv.apply(model, target="keys")
    >>> [n for n, p in model.named_parameters() if p.requires_grad]
    ['0.weight']
    >>> h.remove(); all(p.requires_grad for p in model.parameters())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modulart.core.errors import IncompatibleArtifactError, NonFiniteError, UnsupportedOperationError
from modulart.core.finite import all_finite
from modulart.core.naming import free_attribute_name
from modulart.core.operator import Operator, Plan
from modulart.core.types import JSONValue, OptimizerLike, StateValue
from modulart.core.unwrap import is_distributed, refuse_sharded, unwrap_model
from modulart.kv.config import KVConfig
from modulart.kv.expert_lora import parametrize_param
from modulart.kv.handle import HOLDER, KVHandle, neurons_key, owned_parameters
from modulart.kv.targets import Part, choose_blocks, neuron_keep, resolve_parts

__all__ = ["KV", "KVPlan", "apply"]

_FSDP2_ORDER = (
    "mt.kv.apply(model, ...) -> fully_shard(...) -> build the optimizer over the sharded parameters "
    "(mode='mask': then handle.attach(optimizer))"
)


def _finite(t: torch.Tensor) -> bool:
    """Whether every local entry of ``t`` is finite (meta tensors count as finite; DTensors: the local shard)."""
    local = t.detach()
    if local.is_meta:
        return True
    to_local = getattr(local, "to_local", None)
    if callable(to_local):
        local = to_local()
    return all_finite(local)


@dataclass
class KVPlan(Plan):
    """What KV tuning trains, resolved without changing the model.

    Attributes:
        parts: every trained tensor (or slice of a fused one), in depth order.
        neurons: mode ``mask``: per block path, the ``[d_ff]`` bool vector of kept neurons.
    """

    parts: list[Part] = field(default_factory=list)
    neurons: dict[str, torch.Tensor] = field(default_factory=dict)


class KV(Operator[KVConfig, KVPlan, KVHandle]):
    """FFN key/value tuning (arXiv 2402.12233): train exactly the keys and/or values of chosen FFNs."""

    name = "kv"

    @classmethod
    def _apply(cls, model: nn.Module, cfg: KVConfig, state: Mapping[str, StateValue] | None) -> KVHandle:
        if is_distributed(model) and not is_distributed(unwrap_model(model)):
            raise UnsupportedOperationError(
                f"KV: apply KV to the bare model, then wrap it in {type(model).__name__}: the wrapper fixed at "
                "construction which parameters it synchronises, and KV changes requires_grad (mode 'lora' adds "
                "parameters), so the ranks would stop agreeing; mt.kv.apply(model.module, ...) and wrap again"
            )
        return super()._apply(model, cfg, state)

    @classmethod
    def plan(cls, model: nn.Module, config: KVConfig) -> KVPlan:
        refuse_sharded(model, "KV", _FSDP2_ORDER)
        blocks = choose_blocks(model, config)
        parts = resolve_parts(model, config, blocks)
        bad = [p.name for p in parts if not _finite(p.param)]
        if bad:
            raise NonFiniteError(
                f"KV: the tuned tensor(s) {bad[:4]} hold NaN or inf values; tuning them would spread the non-finite "
                "values (repair or reload the weights before apply)"
            )
        if config.mode == "lora" and config.lora_dropout > 0:
            fused = sorted({p.name for p in parts if p.ref is None and not p.is_bias})
            if fused:
                raise UnsupportedOperationError(
                    f"KV mode='lora' on fused expert storage {fused[:4]} keeps its deltas in weight space, where "
                    f"input dropout has no place: lora_dropout = {config.lora_dropout} needs linear modules (use 0)"
                )
        neurons = neuron_keep(blocks, config) if config.mode == "mask" else {}
        return KVPlan(targets=[b.path for b in blocks], selector=str(config.layers), parts=parts, neurons=neurons)

    @classmethod
    def plan_from_state(cls, model: nn.Module, config: KVConfig, state: Mapping[str, StateValue]) -> KVPlan:
        """As :meth:`plan`; mode ``mask`` takes the saved neuron choice (``neurons.<block>``) where present."""
        plan = cls.plan(model, config)
        for block, keep in plan.neurons.items():
            saved = state.get(neurons_key(block))
            if saved is None:
                continue
            if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(keep.shape):
                got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
                raise IncompatibleArtifactError(
                    f"{neurons_key(block)}: saved neuron choice {got}, expected a bool tensor {tuple(keep.shape)}"
                )
            plan.neurons[block] = saved.to(torch.bool)
        return plan

    @classmethod
    def install(cls, handle: KVHandle, plan: KVPlan) -> None:
        cfg = handle.config
        model = handle.model
        if cfg.freeze_rest:  # the model's own parameters; tensors modulart registered stay as they are
            owned = {id(p) for p in owned_parameters(model)}
            handle.set_requires_grad([p for p in model.parameters() if id(p) not in owned], False)
        for part in plan.parts:
            handle.set_requires_grad([part.param], cfg.mode != "lora" or part.is_bias)
        for path, lora in handle.lora.items():
            module = lora.ref.module
            name = free_attribute_name(module, HOLDER if lora.ref.rows is None else f"{HOLDER}_{handle.roles[path]}")
            module.add_module(name, lora)
            handle.holders.append((module, name, lora))
            lora.install(handle.registry)
        for owner, pname, delta in handle.fused:
            handle.parametrized.append((owner, pname, parametrize_param(owner, pname, delta)))
        for param, _, axis in handle.keep.values():
            shape = [1] * param.dim()
            shape[axis] = -1
            handle.registry.post_accumulate_grad(param, _grad_mask(handle, id(param), shape))
        masked = [p for p in plan.parts if p.axis is not None]
        if cfg.mode == "mask" and masked:  # fully_shard after apply: refuse to train unmasked
            block = model.get_submodule(masked[0].block)
            handle.registry.forward_pre(block, lambda module, args: handle.check_masking(), name="kv/sharded")


def _grad_mask(handle: KVHandle, key: int, shape: list[int]) -> Callable[[torch.Tensor], None]:
    """Multiply the fresh gradient by the current keep mask (``handle.keep`` may be reloaded)."""

    def hook(param: torch.Tensor) -> None:
        entry = handle.keep.get(key)  # None: the parameter was replaced (fully_shard) and is unused
        if param.grad is not None and entry is not None:
            param.grad.mul_(entry[1].view(shape).to(param.grad.dtype))

    return hook


def apply(
    model: nn.Module,
    config: KVConfig | Mapping[str, JSONValue] | None = None,
    /,
    *,
    optimizer: OptimizerLike | None = None,
    **overrides: object,
) -> KVHandle:
    """Make exactly the chosen FFN keys / values trainable; see :class:`KVConfig`.

    Args:
        model: any model whose FFN or MoE blocks modulart finds (DDP / compile / PEFT wrappers are
            unwrapped).
        config: a :class:`KVConfig` (or dict); keyword overrides win.
        optimizer: :meth:`KVHandle.attach` it right away (mode ``mask``: masked slices stay fixed
            through its steps); remembered as ``handle.optimizer`` in every mode.

    Returns:
        The handle: ``param_groups()``, ``report()``, ``attach()``, ``remove()``, ``merge_()``.

    Example:
        >>> import torch, modulart.kv
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> h = modulart.kv.apply(model, target="values", mode="lora", rank=2)
        >>> sorted(h.state_dict())
        ['2.lora_A', '2.lora_B']
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['2.modulart_kv_lora.lora_A', '2.modulart_kv_lora.lora_B']
        >>> _ = h.merge_()
    """
    handle = KV.apply(model, config, **overrides)
    if optimizer is not None:
        try:
            handle.attach(optimizer)
        except BaseException:
            handle.remove()
            raise
    return handle
