"""What MIGU gates in a model: linear layers, MoE routers and fused MoE experts.

Example:
    >>> import torch
    >>> from modulart.migu.targets import find_targets
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10))
    >>> [(t.path, t.units, t.axis) for t in find_targets(model)]
    [('1', 4, 0), ('2', 10, 0)]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modulart.core.errors import UnsupportedModuleError
from modulart.core.linear import is_conv1d, is_linear_like
from modulart.core.select import as_selector
from modulart.core.unwrap import unwrap_model
from modulart.migu.expert_discovery import core_moes, find_fused_experts, find_routers
from modulart.migu.experts import FusedExperts

__all__ = ["Discovery", "Target", "by_design_ungated", "discover", "find_targets"]


@dataclass
class Target:
    """One gated layer: its weight, the output-unit axis of that weight (0, or 1 for Conv1D), its bias.

    ``from_input``: the statistic is recomputed from the module's input as ``x @ weight.T + bias``
    instead of read from its output (MoE routers, whose forward returns scores and indices too).
    """

    path: str
    module: nn.Module
    weight: torch.Tensor
    axis: int
    bias: torch.Tensor | None
    from_input: bool = False

    @property
    def units(self) -> int:
        return int(self.weight.shape[self.axis])


def _target(path: str, module: nn.Module, *, from_input: bool = False) -> Target:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if weight.dim() != 2:
        raise UnsupportedModuleError(f"{path!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    bias = getattr(module, "bias", None)
    b = bias if isinstance(bias, torch.Tensor) else None
    return Target(path, module, weight, 1 if is_conv1d(module) else 0, b, from_input)


def _lora_parts(path: str, module: nn.Module) -> list[Target] | None:
    """PEFT-style LoRA layer (``lora_A`` / ``lora_B`` ModuleDicts): one target per adapter matrix."""
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not (isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict)):
        return None
    out = []
    for side, parts in (("lora_A", a), ("lora_B", b)):
        for key, sub in parts.items():
            if not is_linear_like(sub):
                raise UnsupportedModuleError(f"{path}.{side}.{key} is a {type(sub).__name__}; expected nn.Linear")
            out.append(_target(f"{path}.{side}.{key}", sub))
    return out


@dataclass
class Discovery:
    """Everything MIGU gates in a model.

    Attributes:
        targets: linear-like layers and routers (one 2-D weight each), in model order.
        experts: fused experts modules (per-expert units of 3-D parameters).
        refused: ``{path: reason}`` of fused experts modules MIGU cannot gate exactly.
    """

    targets: list[Target]
    experts: list[FusedExperts] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def find_targets(model: nn.Module, targets: Any = None, *, moe: bool = True) -> list[Target]:
    """The 2-D layers MIGU gates (see ``MIGUConfig.targets``), in model order, each weight once.

    Default: every ``nn.Linear`` / HF ``Conv1D`` whose weight requires grad, except the LM head
    (``lm_head`` or ``get_output_embeddings()``) and layers whose weight is an ``nn.Embedding``
    weight; with ``moe``, also every MoE router with a trainable ``[E, d_model]`` weight, whatever
    its class. A user selector may pick linears (tied ones warn), routers or PEFT LoRA layers
    (expanded to their ``lora_A`` / ``lora_B`` linears); anything else raises
    :class:`UnsupportedModuleError`. Fused experts are in :func:`discover`. A wrapped model
    (DDP, ``torch.compile``, PEFT ``PeftModel``) is unwrapped first, so paths are the ones the
    handle of :func:`modulart.migu.apply` reports.

    Example:
        >>> import torch
        >>> [t.path for t in find_targets(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh()))]
        ['0']
    """
    return discover(unwrap_model(model), targets, moe=moe).targets


def discover(model: nn.Module, targets: Any = None, *, moe: bool = True) -> Discovery:
    """Linear targets, routers and fused experts of ``model`` (see :func:`find_targets`).

    Raises:
        UnsupportedModuleError: nothing to gate, or a selector picks a module MIGU cannot gate
            (a fused experts module that does not verify names the reason).

    Example:
        >>> import torch
        >>> d = discover(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        >>> [t.path for t in d.targets], d.experts, d.refused
        (['0'], [], {})
    """
    heads, embeddings = _lm_heads(model), _embedding_weights(model)
    moes = core_moes(model) if moe else []
    experts, refused = find_fused_experts(model, moes=moes) if moe else ([], {})
    routers = find_routers(model, experts, moes=moes) if moe else []
    router_ids = {id(m) for _, m in routers}
    found: list[Target] = []
    chosen: list[FusedExperts] = []
    if targets is None:
        for path, m in model.named_modules():
            if not path or not is_linear_like(m) or not m.weight.requires_grad:
                continue
            if id(m) in heads or path.rsplit(".", 1)[-1] == "lm_head" or _is_tied(m.weight, embeddings):
                continue
            found.append(_target(path, m, from_input=id(m) in router_ids))
        seen = {id(t.module) for t in found}
        found += [_target(p, m, from_input=True) for p, m in routers if id(m) not in seen and _trainable(m)]
        chosen = experts
    else:
        by_module = {id(fe.module): fe for fe in experts}
        for path, m in as_selector(targets).select(model):
            if id(m) in by_module:
                chosen.append(by_module[id(m)])
                continue
            if path in refused:
                raise UnsupportedModuleError(
                    f"MIGUConfig.targets selects {path!r}, fused experts MIGU cannot gate: {refused[path]}"
                )
            if id(m) in router_ids:
                found.append(_target(path, m, from_input=True))
                continue
            lora = _lora_parts(path, m)
            if lora is not None:
                found.extend(lora)
                continue
            if not is_linear_like(m):
                raise UnsupportedModuleError(
                    f"MIGUConfig.targets selects {path!r}, a {type(m).__name__}; expected nn.Linear, a HF Conv1D, "
                    "a MoE router, fused MoE experts or a PEFT LoRA layer (lora_A / lora_B ModuleDicts)"
                )
            if _is_tied(_target(path, m).weight, embeddings):
                warnings.warn(
                    f"MIGU: {path!r} shares its weight with an input embedding; masking its rows also masks "
                    "embedding rows",
                    UserWarning,
                    stacklevel=3,
                )
            found.append(_target(path, m))
    unique: dict[int, Target] = {}
    for t in found:
        unique.setdefault(id(t.weight), t)
    if not unique and not chosen:
        raise UnsupportedModuleError(f"MIGU found no trainable linear layer to gate in {type(model).__name__}")
    return Discovery(list(unique.values()), chosen, refused)


def _trainable(module: nn.Module) -> bool:
    w = module._parameters.get("weight")
    return w is not None and w.dim() == 2 and w.requires_grad


def _roots(model: nn.Module) -> list[nn.Module]:
    """The model and the modules it wraps (DDP / PEFT ``.module`` / ``.base_model``)."""
    out, m = [model], model
    for attr in ("module", "base_model", "model"):
        inner = getattr(m, attr, None)
        if isinstance(inner, nn.Module) and inner is not m:
            out.append(inner)
    return out


def _lm_heads(model: nn.Module) -> set[int]:
    heads: set[int] = set()
    for root in _roots(model):
        get = getattr(root, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    return heads


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} | {
        m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)
    }


def _is_tied(weight: torch.Tensor, embeddings: set[int]) -> bool:
    return id(weight) in embeddings or weight.data_ptr() in embeddings


def by_design_ungated(model: nn.Module) -> set[int]:
    """``id`` of the parameters MIGU never gates by default: embedding weights and the LM head's."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = _lm_heads(model)
    for path, m in model.named_modules():
        if id(m) in heads or path.rsplit(".", 1)[-1] == "lm_head":
            ids |= {id(p) for p in m.parameters()}
    return ids
