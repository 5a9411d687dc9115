"""MoE layouts as data: where a mixture-of-experts block keeps its router and experts, and how it routes.

:data:`MOE_LAYOUTS` maps module classes (looked up along the MRO, by class or by name) to
:class:`MoELayout`; blocks that are not in the table are discovered by matching candidate layouts
against the block's own behaviour (:mod:`modulart.core.moe_discovery`). Every layout — from the
table, discovered, or registered by a user with :func:`register_moe_layout` — is checked against
the block's own forward before a view is handed out (see :func:`modulart.core.moe.find_moes`).

:func:`moe_block_parts` is the cheap structural pass (no probe): which modules are MoE blocks and
where their routed and shared experts are.

Example:
    >>> from modulart.core.moe_layouts import MOE_LAYOUTS
    >>> MOE_LAYOUTS.lookup(type("MixtralSparseMoeBlock", (), {})).storage
    'fused'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

import torch
from torch import nn

from modulart.core.arch import TypeTable, get_attr
from modulart.core.errors import ConfigError
from modulart.core.moe_storage import GLU_VARIANTS
from modulart.core.moe_structure import MoEParts, block_parts, try_attr
from modulart.core.moe_structure import moe_block_parts as _structural_parts

__all__ = [
    "GLU_VARIANTS",
    "MOE_LAYOUTS",
    "MOE_REFUSALS",
    "ExpertStorage",
    "MoELayout",
    "MoEParts",
    "ScoreFn",
    "ScoringKind",
    "infer_moe_layout",
    "is_builtin_layout",
    "moe_block_parts",
    "register_moe_layout",
]

ExpertStorage: TypeAlias = Literal["fused", "fused_interleaved_t", "fused_custom", "module_list"]
ScoringKind: TypeAlias = Literal[
    "softmax_topk",
    "topk_softmax",
    "sigmoid_topk",
    "topk_sigmoid",
    "sigmoid_grouped",
    "softmax_grouped",
    "sparsemixer",
    "custom",
]
ScoreFn: TypeAlias = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A custom scoring rule: ``logits [T, E] -> (weights [T, k], indices [T, k])``."""


@dataclass(frozen=True)
class MoELayout:
    """Where a MoE block keeps its router and experts, and how it routes.

    Attribute paths are relative to the block; fields that take ``str | number`` accept either an
    attribute path or the value itself.

    Attributes:
        router: the router: a module with a ``weight [E, d_model]`` (``nn.Linear`` or not).
        experts: the experts container (``""``: the block itself, e.g. JetMoE's
            ``input_linear`` / ``output_linear``, given as ``gate_up`` / ``down``).
        storage: ``"module_list"`` (one FFN module per expert, ``ModuleList`` or ``ModuleDict``),
            ``"fused"`` (``gate_up_proj [E, 2I, d]`` gate first, ``down_proj [E, d, I]``),
            ``"fused_interleaved_t"`` (GPT-OSS: ``[E, d, 2I]`` interleaved, ``[E, I, d]``, biases) or
            ``"fused_custom"`` (3-D or flattened tensors described by the fields below). A
            ``"fused"`` layout with non-default storage fields is normalised to ``"fused_custom"``.
        scoring: ``softmax_topk`` (softmax, top-k of softmax + selection bias, optional
            renormalisation), ``topk_softmax`` (top-k logits, softmax over them), ``sigmoid_topk``,
            ``topk_sigmoid`` (Llama4: sigmoid of the top-k logits), ``sigmoid_grouped`` (DeepSeek-V3:
            group score = sum of the two best biased scores), ``softmax_grouped`` (DeepSeek-V2
            group-limited greedy: group score = best softmax score), ``sparsemixer`` (PhiMoE, eval
            mode) or ``custom`` (``score_fn``).
        top_k: experts per token.
        normalize_topk: renormalise the selected weights (bool or attribute path).
        glu: fused storage: name in :data:`GLU_VARIANTS` of the gated activation.
        shared: shared (always-on) experts, each a dense FFN.
        shared_gate: a ``Linear(d_model, 1)`` whose sigmoid scales the summed shared experts.
        selection_bias: per-expert bias added to the scores for selection only.
        n_group / topk_group / scaling: group-limited selection and the routed scaling factor.
        output_index: element of a tuple output that holds the hidden states.
        gate_up / up / down: fused storage: tensors (relative to ``experts``); with ``up`` set,
            ``gate_up`` holds the gate only.
        transposed: gate/up stored ``[E, d, 2I]`` (``x @ W``) instead of ``[E, 2I, d]``.
        down_transposed: down stored ``[E, I, d]``; None: same as ``transposed``.
        interleaved: gate/up interleaved along the neuron axis (g0, u0, g1, u1 ...).
        up_first: the up half comes first in ``gate_up``.
        flat: tensors stored flattened as ``[E * I, ...]`` (DBRX).
        gate_up_bias / down_bias: fused biases ``[E, 2I]`` / ``[E, d]``.
        activation: ``act_mul``: the gate activation (path relative to the block, or a callable);
            default ``act_fn`` of the experts container.
        norm_p: p of the renormalisation norm (DBRX ``moe_normalize_expert_weights``; 1 = sum).
        norm_min: lower clamp of the renormalisation denominator (Ernie 4.5 ``moe_norm_min``).
        weights_on_input: routing weights scale the expert *input* (Llama4), not its output.
        capacity: per-expert token capacity along the sequence (Switch Transformers), or None.
        jitter_eps: ``sparsemixer`` threshold (PhiMoE ``router_jitter_noise``).
        score_fn: ``custom`` scoring: ``logits [T, E] -> (weights [T, k], indices [T, k])``.
        output_bias: a ``[d_model]`` bias added to the block output (JetMoE).
    """

    router: str
    experts: str
    storage: ExpertStorage
    scoring: ScoringKind
    top_k: str | int = "top_k"
    normalize_topk: bool | str = True
    glu: str = "act_mul"
    shared: tuple[str, ...] = ()
    shared_gate: str | None = None
    selection_bias: str | None = None
    n_group: str | int | None = None
    topk_group: str | int | None = None
    scaling: str | float | None = None
    output_index: int | None = None
    gate_up: str = "gate_up_proj"
    up: str | None = None
    down: str = "down_proj"
    transposed: bool = False
    down_transposed: bool | None = None
    interleaved: bool = False
    up_first: bool = False
    flat: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    activation: str | Callable[[torch.Tensor], torch.Tensor] | None = None
    norm_p: float | str = 1.0
    norm_min: float | str = 0.0
    weights_on_input: bool = False
    capacity: str | int | None = None
    jitter_eps: str | float | None = None
    score_fn: ScoreFn | None = None
    output_bias: str | None = None

    def __post_init__(self) -> None:
        if self.storage == "fused" and self.custom_storage:
            object.__setattr__(self, "storage", "fused_custom")
        if self.scoring == "custom" and self.score_fn is None:
            raise ConfigError("MoELayout.score_fn: scoring='custom' needs a score_fn callable")

    @property
    def custom_storage(self) -> bool:
        """Whether the fused storage fields differ from the plain ``fused`` layout."""
        plain = MoELayout.__dataclass_fields__
        names = (
            "gate_up",
            "up",
            "down",
            "transposed",
            "down_transposed",
            "interleaved",
            "up_first",
            "flat",
            "gate_up_bias",
            "down_bias",
        )
        return any(getattr(self, n) != plain[n].default for n in names)

    def parts(self) -> MoEParts:
        """The structural parts this layout names (relative to the block)."""
        if self.experts:
            experts: tuple[str, ...] = (self.experts,)
        else:
            tensors = [t for t in (self.gate_up, self.up, self.down) if t]
            experts = tuple(dict.fromkeys(t.rsplit(".", 1)[0] for t in tensors if "." in t))
        return MoEParts(router=self.router, experts=experts, shared=self.shared)


def _fused(**kw: Any) -> MoELayout:
    return MoELayout(router="gate", experts="experts", storage="fused", **kw)


_DEEPSEEK_V3 = _fused(
    scoring="sigmoid_grouped",
    top_k="gate.top_k",
    normalize_topk="gate.norm_topk_prob",
    shared=("shared_experts",),
    selection_bias="gate.e_score_correction_bias",
    n_group="gate.num_group",
    topk_group="gate.topk_group",
    scaling="gate.routed_scaling_factor",
)
_SOFTMAX = _fused(scoring="softmax_topk", top_k="gate.top_k")
MOE_LAYOUTS: TypeTable[MoELayout] = TypeTable()
_builtin: set[int] = set()
for _name, _moe in {
    "MixtralSparseMoeBlock": _SOFTMAX,
    "MiniMaxSparseMoeBlock": _SOFTMAX,
    "Qwen2MoeSparseMoeBlock": replace(
        _SOFTMAX, normalize_topk="gate.norm_topk_prob", shared=("shared_expert",), shared_gate="shared_expert_gate"
    ),
    "Qwen3MoeSparseMoeBlock": replace(_SOFTMAX, normalize_topk="gate.norm_topk_prob"),
    "OlmoeSparseMoeBlock": replace(_SOFTMAX, normalize_topk="gate.norm_topk_prob"),
    "DeepseekV3MoE": _DEEPSEEK_V3,
    "Glm4MoeMoE": _DEEPSEEK_V3,
    "Dots1MoE": _DEEPSEEK_V3,
    "DeepseekV2Moe": _fused(
        scoring="softmax_grouped",
        top_k="gate.top_k",
        normalize_topk=False,
        shared=("shared_experts",),
        n_group="gate.num_group",
        topk_group="gate.topk_group",
        scaling="gate.routed_scaling_factor",
    ),
    "Ernie4_5_MoeSparseMoeBlock": _fused(
        scoring="softmax_topk",
        top_k="gate.top_k",
        shared=("shared_experts",),
        selection_bias="gate.moe_statics.e_score_correction_bias",
        norm_min="gate.norm_min",
    ),
    "JambaSparseMoeBlock": replace(_SOFTMAX, router="router", top_k="router.top_k", normalize_topk=False),
    "HunYuanMoEV1Moe": replace(_SOFTMAX, router="gate.wg", shared=("shared_mlp",)),
    "PhimoeSparseMoeBlock": replace(
        _SOFTMAX, router="router", scoring="sparsemixer", top_k=2, jitter_eps="router.router_jitter_noise"
    ),
    "GraniteMoeMoE": replace(_SOFTMAX, router="router", scoring="topk_softmax", top_k="router.top_k"),
    "Llama4TextMoe": MoELayout(
        router="router",
        experts="experts",
        storage="fused",
        scoring="topk_sigmoid",
        top_k="router.top_k",
        transposed=True,
        weights_on_input=True,
        shared=("shared_expert",),
        output_index=0,
    ),
    "DbrxFFN": MoELayout(
        router="router.layer",
        experts="experts",
        storage="fused",
        scoring="softmax_topk",
        top_k="top_k",
        normalize_topk=True,
        norm_p="moe_normalize_expert_weights",
        gate_up="mlp.w1",
        up="mlp.v1",
        down="mlp.w2",
        flat=True,
        down_transposed=True,
        activation="experts.mlp.activation_fn",
    ),
    "JetMoeMoE": MoELayout(
        router="router.layer",
        experts="",
        storage="fused",
        scoring="topk_softmax",
        top_k="router.top_k",
        gate_up="input_linear.weight",
        down="output_linear.weight",
        activation="activation",
        output_bias="bias",
    ),
    "SwitchTransformersSparseMLP": MoELayout(
        router="router.classifier",
        experts="experts",
        storage="module_list",
        scoring="softmax_topk",
        top_k=1,
        normalize_topk=False,
        capacity="router.expert_capacity",
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
    _builtin.add(id(_moe))
_BUILTIN = frozenset(_builtin)


def is_builtin_layout(layout: MoELayout) -> bool:
    """Whether ``layout`` is one of modulart's own table entries (not a user adapter)."""
    return id(layout) in _BUILTIN


MOE_REFUSALS: TypeTable[str] = TypeTable()
"""Block classes known to compute something no :class:`MoELayout` expresses exactly, with the reason."""
MOE_REFUSALS.register(
    "NllbMoeSparseMLP",
    "NLLB-MoE drops tokens by an expert capacity computed from the whole batch "
    "(moe_eval_capacity_token_fraction, batch-prioritised top-2 positions) and renormalises the "
    "weights after dropping; which tokens an expert keeps depends on the other tokens of the batch, "
    "so no per-token view recomputes it exactly",
)
MOE_REFUSALS.register(
    "LongcatFlashMoE",
    "LongCat-Flash routes tokens to zero-computation (identity) experts besides its E routed experts "
    "(router rows = E + zero_expert_num); a MoE view has no identity experts",
)


def register_moe_layout(cls: type[nn.Module] | str, layout: MoELayout) -> None:
    """Teach modulart how the MoE block ``cls`` (and its subclasses) is built.

    The layout is verified against the block's own forward like any other (a wrong adapter is
    refused with the measured error).

    Example:
        >>> import modulart as mt
        >>> mt.register_moe_layout("MyMoE", mt.MoELayout(router="router", experts="experts",
        ...     storage="module_list", scoring="softmax_topk", top_k="top_k"))
    """
    MOE_LAYOUTS.register(cls, layout)


_TOPK_ATTRS = ("top_k", "num_experts_per_tok", "moe_top_k", "k", "router.top_k", "gate.top_k")


def infer_moe_layout(module: nn.Module) -> MoELayout | None:
    """A first structural guess at the layout of a block that is not in the table, or None.

    No probe: the guess is only the starting point of discovery
    (:func:`modulart.core.moe_discovery.discover_layout` matches the scoring rule, storage
    orientation and shared experts against the block's behaviour).

    Example:
        >>> import torch
        >>> infer_moe_layout(torch.nn.Linear(2, 2)) is None
        True
    """
    found = block_parts(module)
    if found is None:
        return None
    router, experts, shared = found
    rel = _router_path(module, router)
    top_k: str | int = next((a for a in _TOPK_ATTRS if isinstance(try_attr(module, a), int)), 1)
    if len(experts) == 1:
        container = get_attr(module, experts[0])
        storage: ExpertStorage = "module_list" if isinstance(container, (nn.ModuleList, nn.ModuleDict)) else "fused"
        return MoELayout(
            router=rel, experts=experts[0], storage=storage, scoring="softmax_topk", top_k=top_k, shared=shared
        )
    return MoELayout(
        router=rel,
        experts="",
        storage="fused",
        scoring="softmax_topk",
        top_k=top_k,
        gate_up=f"{experts[0]}.weight",
        down=f"{experts[-1]}.weight",
        shared=shared,
    )


def _router_path(module: nn.Module, router: str | None) -> str:
    from modulart.core.moe_structure import router_weight_rows

    assert router is not None
    sub = router_weight_rows(get_attr(module, router))
    return ".".join(p for p in (router, sub[0] if sub else "") if p)


def _layout_parts(module: nn.Module) -> MoEParts | None:
    layout = MOE_LAYOUTS.lookup(type(module))
    return layout.parts() if layout is not None else None


def moe_block_parts(model: nn.Module) -> dict[str, MoEParts]:
    """Every MoE block of ``model`` -> paths of its router, routed-expert containers and shared experts.

    Structural and cheap (no probe, no transformers import); generous: it also recognises blocks
    whose view :func:`~modulart.core.moe.find_moes` would refuse, so that dense-FFN discovery never
    reports routed experts (or, unless asked, shared experts) as the layer's FFN. Table entries of
    :data:`MOE_LAYOUTS` are used first, then the structural rules of
    :mod:`modulart.core.moe_structure`.

    Example:
        >>> import torch
        >>> moe_block_parts(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        {}
    """
    return _structural_parts(model, _layout_parts)
