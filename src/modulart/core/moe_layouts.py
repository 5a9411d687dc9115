"""MoE layouts as data: where a mixture-of-experts block keeps its router and experts, and how it routes.

:data:`MOE_LAYOUTS` maps module classes (looked up along the MRO, by class or by name) to
:class:`MoELayout`; :func:`infer_moe_layout` guesses the layout of blocks that are not in the table.
Every layout, from the table or guessed, is checked against the block's own forward before a view
is handed out (see :func:`modulart.core.moe.find_moes`).

Example:
    >>> from modulart.core.moe_layouts import MOE_LAYOUTS
    >>> MOE_LAYOUTS.lookup(type("MixtralSparseMoeBlock", (), {})).storage
    'fused'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import nn

from modulart.core.arch import FFN_LAYOUTS, TypeTable, get_attr, infer_ffn_layout

__all__ = [
    "GLU_VARIANTS",
    "MOE_LAYOUTS",
    "ExpertStorage",
    "MoELayout",
    "ScoringKind",
    "infer_moe_layout",
    "register_moe_layout",
]


# --- MoE layouts --------------------------------------------------------------------------------
ExpertStorage: TypeAlias = Literal["fused", "fused_interleaved_t", "module_list"]
ScoringKind: TypeAlias = Literal["softmax_topk", "topk_softmax", "sigmoid_grouped"]


def _silu_glu(block: nn.Module, experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    act = get_attr(experts, "act_fn")
    out: torch.Tensor = act(gate) * up
    return out


def _gpt_oss_glu(block: nn.Module, experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    limit, alpha = float(get_attr(experts, "limit")), float(get_attr(experts, "alpha"))
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


GLU_VARIANTS: dict[str, Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "act_mul": _silu_glu,  # act_fn(gate) * up, act_fn read from the experts module
    "gpt_oss": _gpt_oss_glu,  # clamp, gate * sigmoid(alpha * gate), (up + 1) *
}


@dataclass(frozen=True)
class MoELayout:
    """Where a MoE block keeps its router and experts, and how it routes.

    Attributes:
        router: attribute path of the router (anything with a ``weight [E, d_model]``).
        experts: attribute path of the experts container.
        storage: ``"fused"`` (``gate_up_proj [E, 2I, d]`` gate first, ``down_proj [E, d, I]``),
            ``"fused_interleaved_t"`` (GPT-OSS: ``gate_up_proj [E, d, 2I]`` gate/up interleaved,
            ``down_proj [E, I, d]``, with biases) or ``"module_list"`` (one FFN module per expert).
        scoring: ``"softmax_topk"`` (softmax over all experts, then top-k, optionally
            renormalised), ``"topk_softmax"`` (top-k logits, then softmax over them) or
            ``"sigmoid_grouped"`` (DeepSeek-V3: sigmoid, bias for selection, group-limited top-k,
            optional renormalisation, scaling factor).
        top_k: attribute path of the number of experts per token.
        normalize_topk: whether the top-k weights are renormalised (bool or attribute path).
        glu: fused storage: name in :data:`GLU_VARIANTS` of the gated activation.
        shared: attribute paths of shared (always-on) experts, each a dense FFN.
        shared_gate: attribute path of a ``Linear(d_model, 1)`` whose sigmoid scales the shared
            experts (Qwen2-MoE), or None.
        selection_bias: attribute path of a per-expert bias added for selection only (DeepSeek-V3).
        n_group / topk_group / scaling: attribute paths for ``sigmoid_grouped`` routing.
        output_index: element of a tuple output that holds the hidden states (GPT-OSS: 0).
    """

    router: str
    experts: str
    storage: ExpertStorage
    scoring: ScoringKind
    top_k: str = "top_k"
    normalize_topk: bool | str = True
    glu: str = "act_mul"
    shared: tuple[str, ...] = ()
    shared_gate: str | None = None
    selection_bias: str | None = None
    n_group: str | None = None
    topk_group: str | None = None
    scaling: str | None = None
    output_index: int | None = None


MOE_LAYOUTS: TypeTable[MoELayout] = TypeTable()
for _name, _moe in {
    "MixtralSparseMoeBlock": MoELayout(
        router="gate",
        experts="experts",
        storage="fused",
        scoring="softmax_topk",
        top_k="gate.top_k",
        normalize_topk=True,
    ),
    "Qwen2MoeSparseMoeBlock": MoELayout(
        router="gate",
        experts="experts",
        storage="fused",
        scoring="softmax_topk",
        top_k="gate.top_k",
        normalize_topk="gate.norm_topk_prob",
        shared=("shared_expert",),
        shared_gate="shared_expert_gate",
    ),
    "OlmoeSparseMoeBlock": MoELayout(
        router="gate",
        experts="experts",
        storage="fused",
        scoring="softmax_topk",
        top_k="gate.top_k",
        normalize_topk="gate.norm_topk_prob",
    ),
    "DeepseekV3MoE": MoELayout(
        router="gate",
        experts="experts",
        storage="fused",
        scoring="sigmoid_grouped",
        top_k="gate.top_k",
        normalize_topk="gate.norm_topk_prob",
        shared=("shared_experts",),
        selection_bias="gate.e_score_correction_bias",
        n_group="gate.num_group",
        topk_group="gate.topk_group",
        scaling="gate.routed_scaling_factor",
    ),
    "GptOssMLP": MoELayout(
        router="router",
        experts="experts",
        storage="fused_interleaved_t",
        scoring="topk_softmax",
        top_k="router.top_k",
        glu="gpt_oss",
        output_index=0,
    ),
}.items():
    MOE_LAYOUTS.register(_name, _moe)


def register_moe_layout(cls: type[nn.Module] | str, layout: MoELayout) -> None:
    """Teach modulart how the MoE block ``cls`` (and its subclasses) is built."""
    MOE_LAYOUTS.register(cls, layout)


_TOPK_ATTRS = ("top_k", "num_experts_per_tok", "k", "router.top_k", "gate.top_k")


def infer_moe_layout(module: nn.Module) -> MoELayout | None:
    """Guess the layout of a MoE block, or None.

    Recognised: an ``experts`` child that is either a ``ModuleList`` of FFN blocks or a module with
    3-D ``gate_up_proj``/``down_proj`` parameters (gate first), a child whose ``weight`` is
    ``[num_experts, d_model]`` (the router), and a top-k attribute (``top_k``,
    ``num_experts_per_tok`` or ``k``, on the block or the router). Scoring is softmax over all
    experts, then top-k, renormalised unless the block or router has ``norm_topk_prob = False``.
    """
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    if isinstance(experts, nn.ModuleList):
        if not len(experts) or not all(FFN_LAYOUTS.lookup(type(e)) or infer_ffn_layout(e) for e in experts):
            return None
        storage: ExpertStorage = "module_list"
        n_exp = len(experts)
    else:
        gu = getattr(experts, "gate_up_proj", None)
        if not (
            isinstance(gu, torch.Tensor)
            and gu.dim() == 3
            and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        ):
            return None
        storage, n_exp = "fused", int(gu.shape[0])
    router = next((n for n, c in module.named_children() if n != "experts" and _weight_rows(c) == n_exp), None)
    top_k = next((a for a in _TOPK_ATTRS if isinstance(_try_attr(module, a), int)), None)
    if router is None or top_k is None:
        return None
    norm: bool | str = True
    for a in ("norm_topk_prob", f"{router}.norm_topk_prob"):
        if isinstance(_try_attr(module, a), bool):
            norm = a
    return MoELayout(
        router=router, experts="experts", storage=storage, scoring="softmax_topk", top_k=top_k, normalize_topk=norm
    )


def _weight_rows(module: nn.Module) -> int | None:
    """Rows of a 2-D ``weight`` attribute, or None."""
    w = getattr(module, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def _try_attr(root: Any, path: str) -> Any:
    try:
        return get_attr(root, path)
    except AttributeError:
        return None
