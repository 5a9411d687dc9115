"""MoE views: router and experts of any mixture-of-experts block, in one canonical shape.

Whatever the storage — one FFN module per expert (``ModuleList``), fused 3-D parameters
(``gate_up_proj [E, 2I, d]`` gate first, ``down_proj [E, d, I]``, transformers v5), or GPT-OSS's
transposed and interleaved ``gate_up_proj [E, d, 2I]`` / ``down_proj [E, I, d]`` with biases — an
:class:`Expert` exposes ``gate`` / ``up`` ``[I, d_model]`` and ``down`` ``[d_model, I]`` as *views*
of the stored tensors (in-place edits reach the model).

The router is exposed as ``router_weight [E, d_model]`` (+ ``router_bias``), with the block's
:class:`ScoringRule` so :meth:`MoE.route` and :meth:`MoE.forward` recompute exactly what the block
does: softmax-then-top-k (Mixtral, Qwen2-MoE, OLMoE), top-k-then-softmax (GPT-OSS) and
sigmoid + selection-bias with group-limited top-k (DeepSeek-V3). Shared experts are dense
:class:`~modulart.core.ffn.FFN` views.

Example:
    >>> import torch
    >>> import modulart as mt
    >>> from transformers import AutoConfig, AutoModelForCausalLM  # doctest: +SKIP
    >>> cfg = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=2, num_key_value_heads=2, vocab_size=100, num_local_experts=4)  # doctest: +SKIP
    >>> moe = mt.find_moes(AutoModelForCausalLM.from_config(cfg))[0]  # doctest: +SKIP
    >>> moe.num_experts, moe.top_k, tuple(moe.expert(0).gate.shape)  # doctest: +SKIP
    (4, 2, (64, 32))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.arch import FFN_LAYOUTS, FFNLayout, block_position, get_attr, infer_ffn_layout
from modulart.core.errors import ShapeError, UnsupportedModuleError
from modulart.core.ffn import FFN, adapter_help, ffn_from_layout
from modulart.core.hooks import HookSite
from modulart.core.linear import LinearRef
from modulart.core.moe_layouts import GLU_VARIANTS, MOE_LAYOUTS, MoELayout, ScoringKind, infer_moe_layout
from modulart.core.select import filter_by_selector

__all__ = ["Expert", "MoE", "Routing", "ScoringRule", "find_moes"]


@dataclass(frozen=True)
class ScoringRule:
    """How router logits become expert choices and weights.

    Attributes:
        kind: ``softmax_topk``, ``topk_softmax`` or ``sigmoid_grouped``.
        top_k: experts per token.
        normalize: renormalise the selected weights to sum to one.
        n_group / topk_group: group-limited selection (``sigmoid_grouped``).
        scaling: factor applied to the final weights (``sigmoid_grouped``).
    """

    kind: ScoringKind
    top_k: int
    normalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0


@dataclass
class Routing:
    """A routing decision for ``T`` tokens.

    Attributes:
        logits: ``[T, E]`` raw router logits (router bias included).
        scores: ``[T, E]`` the per-expert scores the rule ranks (softmax or sigmoid, fp32).
        weights: ``[T, k]`` the weights the selected experts' outputs are multiplied by.
        indices: ``[T, k]`` the selected experts.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


class Expert:
    """One routed expert in canonical orientation (views of the stored tensors).

    Attributes:
        index: expert number.
        gate, up: ``[I, d_model]``; down: ``[d_model, I]``; biases or None.
    """

    def __init__(
        self,
        index: int,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.index, self.gate, self.up, self.down, self.glu = index, gate, up, down, glu
        self.gate_bias, self.up_bias, self.down_bias = biases
        self._activation = activation

    @property
    def d_expert(self) -> int:
        return int(self.gate.shape[0])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_model] -> [..., I]``."""
        return self.glu(F.linear(x, self.gate, self.gate_bias), F.linear(x, self.up, self.up_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_model] -> [..., d_model]`` (before the routing weight)."""
        return F.linear(self.hidden(x), self.down, self.down_bias)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_model] -> σ(gate·x + b) [..., I]``: the gate branch alone, before the up product."""
        if self._activation is None:
            raise UnsupportedModuleError(f"expert {self.index}: no gate activation known for this storage")
        return self._activation(F.linear(x, self.gate, self.gate_bias))

    def set(self, **tensors: torch.Tensor) -> None:
        """Copy canonical tensors in place: ``expert.set(gate=..., up=..., down=...)``."""
        for name, value in tensors.items():
            dst = getattr(self, name, None)
            if not isinstance(dst, torch.Tensor):
                raise ShapeError(f"expert {self.index} has no tensor {name!r}")
            if dst.shape != value.shape:
                raise ShapeError(f"expert {self.index}.{name}: expected {tuple(dst.shape)}, got {tuple(value.shape)}")
            with torch.no_grad():
                dst.copy_(value)


class MoE:
    """A typed view of one MoE block.

    Attributes:
        path, module, layout, layer, stack: as for :class:`~modulart.core.ffn.FFN`.
        router: the router module; ``router_weight`` ``[E, d_model]``, ``router_bias`` ``[E]``.
        selection_bias: ``[E]`` added to scores for selection only (DeepSeek-V3), or None.
        scoring: the :class:`ScoringRule`.
        shared_experts: dense FFN views of always-on experts; ``shared_gate`` scales them.
        input_site / output_site: the block's input and output hidden states.
    """

    def __init__(
        self,
        path: str,
        module: nn.Module,
        layout: MoELayout,
        *,
        model: nn.Module,
        layer: int | None = None,
        stack: str | None = None,
    ) -> None:
        self.path, self.module, self.layout, self.layer, self.stack = path, module, layout, layer, stack
        self.router = self._attr(layout.router, "router")
        self.experts_module = self._attr(layout.experts, "experts")
        w = getattr(self.router, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise UnsupportedModuleError(f"{path!r}: router {layout.router!r} has no 2-D weight")
        self.scoring = ScoringRule(
            kind=layout.scoring,
            top_k=int(self._attr(layout.top_k, "top_k")),
            normalize=bool(
                self._attr(layout.normalize_topk, "normalize_topk")
                if isinstance(layout.normalize_topk, str)
                else layout.normalize_topk
            ),
            n_group=int(self._attr(layout.n_group, "n_group")) if layout.n_group else 1,
            topk_group=int(self._attr(layout.topk_group, "topk_group")) if layout.topk_group else 1,
            scaling=float(self._attr(layout.scaling, "scaling")) if layout.scaling else 1.0,
        )
        self._expert_ffns: list[FFN] = []
        if layout.storage == "module_list":
            if not isinstance(self.experts_module, nn.ModuleList):
                raise UnsupportedModuleError(f"{path!r}: experts {layout.experts!r} is not a ModuleList")
            for i, e in enumerate(self.experts_module):
                lay = FFN_LAYOUTS.lookup(type(e)) or infer_ffn_layout(e)
                if lay is None:
                    raise UnsupportedModuleError(
                        f"{_join(path, layout.experts)}.{i} ({type(e).__name__}) is not "
                        "a recognised FFN block\n" + adapter_help("ffn")
                    )
                self._expert_ffns.append(ffn_from_layout(model, _join(path, f"{layout.experts}.{i}"), lay))
        elif layout.glu not in GLU_VARIANTS:
            raise UnsupportedModuleError(
                f"{path!r}: unknown gated activation {layout.glu!r}; known: {sorted(GLU_VARIANTS)}"
            )
        self.shared_experts = [
            ffn_from_layout(model, _join(path, s), _shared_layout(model, _join(path, s))) for s in layout.shared
        ]
        self.shared_gate = (
            LinearRef(self._attr(layout.shared_gate, "shared_gate"), _join(path, layout.shared_gate))
            if layout.shared_gate
            else None
        )
        sb = self._attr(layout.selection_bias, "selection_bias") if layout.selection_bias else None
        self.selection_bias: torch.Tensor | None = sb if isinstance(sb, torch.Tensor) else None
        self.input_site = HookSite(module, path, "forward_pre")
        self.output_site = HookSite(module, path, "forward", layout.output_index or 0)
        if self.router_weight.shape[0] != self.num_experts:
            raise UnsupportedModuleError(
                f"{path!r}: router has {self.router_weight.shape[0]} rows but there are {self.num_experts} experts"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise UnsupportedModuleError(f"{path!r}: top_k={self.top_k} outside [1, {self.num_experts}]")

    def _attr(self, rel: str, what: str) -> Any:
        try:
            return get_attr(self.module, rel)
        except AttributeError as e:
            raise UnsupportedModuleError(
                f"{self.path!r} ({type(self.module).__name__}): layout field {what!r} "
                f"points to {rel!r}, which does not exist ({e})"
            ) from None

    # --- shape --------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        if self._expert_ffns:
            return len(self._expert_ffns)
        return int(self.experts_module.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return self.scoring.top_k

    @property
    def d_model(self) -> int:
        return int(self.router_weight.shape[1])

    @property
    def d_expert(self) -> int:
        return self.expert(0).d_expert

    @property
    def router_weight(self) -> torch.Tensor:
        """``[E, d_model]`` view of the router weight."""
        w = self.router.weight
        assert isinstance(w, torch.Tensor)
        return w

    @property
    def router_bias(self) -> torch.Tensor | None:
        """``[E]`` router bias (inside the logits), or None."""
        b = getattr(self.router, "bias", None)
        return b if isinstance(b, torch.Tensor) else None

    # --- experts ------------------------------------------------------------------------------
    def expert(self, e: int) -> Expert:
        """Expert ``e`` in canonical orientation (views of the stored tensors)."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"{self.path!r}: expert {e} out of range [0, {self.num_experts})")
        storage = self.layout.storage
        if storage == "module_list":
            f = self._expert_ffns[e]
            up = f.up
            if up is None:
                raise UnsupportedModuleError(f"{f.path!r}: routed experts must be gated FFNs")
            act = f.activation
            return Expert(e, f.keys, up, f.values, lambda g, u: act(g) * u, (f.key_bias, f.up_bias, f.value_bias), act)
        ex = self.experts_module
        glu_fn = GLU_VARIANTS[self.layout.glu]
        block = self.module
        neutral_up = _GLU_NEUTRAL_UP.get(self.layout.glu)

        def glu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return glu_fn(block, ex, g, u)

        def gate_act(g: torch.Tensor) -> torch.Tensor:
            assert neutral_up is not None
            return glu_fn(block, ex, g, torch.full_like(g, neutral_up))

        activation = gate_act if neutral_up is not None else None
        if storage == "fused":
            gu, down = ex.gate_up_proj[e], ex.down_proj[e]
            inter = gu.shape[0] // 2
            return Expert(e, gu[:inter], gu[inter:], down, glu, activation=activation)
        gu, down = ex.gate_up_proj[e], ex.down_proj[e]  # [d, 2I] interleaved, [I, d]
        b = getattr(ex, "gate_up_proj_bias", None)
        db = getattr(ex, "down_proj_bias", None)
        biases = (b[e, ::2], b[e, 1::2]) if isinstance(b, torch.Tensor) else (None, None)
        return Expert(
            e,
            gu[:, ::2].t(),
            gu[:, 1::2].t(),
            down.t(),
            glu,
            (*biases, db[e] if isinstance(db, torch.Tensor) else None),
            activation,
        )

    def experts(self) -> list[Expert]:
        """All routed experts."""
        return [self.expert(e) for e in range(self.num_experts)]

    # --- recomputation ------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        """Recompute the routing of ``x [T, d_model]`` from the router weight."""
        logits = F.linear(x, self.router_weight, self.router_bias)
        rule, k = self.scoring, self.scoring.top_k
        lf = logits.float()
        if rule.kind == "softmax_topk":
            scores = lf.softmax(-1)
            weights, idx = scores.topk(k, dim=-1)
            if rule.normalize:
                weights = weights / weights.sum(-1, keepdim=True)
        elif rule.kind == "topk_softmax":
            scores = lf.softmax(-1)
            top, idx = lf.topk(k, dim=-1)
            weights = top.softmax(-1)
        else:
            scores = lf.sigmoid()
            choice = scores + (self.selection_bias.float() if self.selection_bias is not None else 0.0)
            t, n_exp = choice.shape
            groups = choice.view(t, rule.n_group, n_exp // rule.n_group)
            group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
            keep = group_scores.topk(rule.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~mask.repeat_interleave(n_exp // rule.n_group, dim=1), float("-inf"))
            idx = choice.topk(k, dim=-1).indices
            weights = scores.gather(1, idx)
            if rule.normalize:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            weights = weights * rule.scaling
        return Routing(logits=logits, scores=scores, weights=weights, indices=idx)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every routed expert's output on every token: ``x [T, d] -> [E, T, d]`` (no routing weight)."""
        return torch.stack([e.forward(x) for e in self.experts()])

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (gated) sum of the shared experts on ``x [T, d]``, or None when there are none."""
        if not self.shared_experts:
            return None
        out = sum((f.forward(x) for f in self.shared_experts), torch.zeros_like(x))
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Recompute the block: ``x [..., d_model] -> [..., d_model]`` from canonical weights."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.route(flat)
        outs = self.expert_outputs(flat)  # [E, T, d]
        picked = outs[r.indices, torch.arange(flat.shape[0]).unsqueeze(1)]  # [T, k, d]
        y = (picked * r.weights.to(picked.dtype).unsqueeze(-1)).sum(1)
        shared = self.shared_output(flat)
        if shared is not None:
            y = y + shared
        return y.reshape(shape)

    def __repr__(self) -> str:
        return (
            f"MoE({self.path!r}, {type(self.module).__name__}, experts={self.num_experts}, top_k={self.top_k}, "
            f"storage={self.layout.storage}, scoring={self.scoring.kind}, shared={len(self.shared_experts)})"
        )


def _join(a: str, b: str) -> str:
    return ".".join(p for p in (a, b) if p)


# For each fused gated activation, the up value u0 with glu(g, u0) == σ(g) (the gate branch alone).
_GLU_NEUTRAL_UP: dict[str, float] = {"act_mul": 1.0, "gpt_oss": 0.0}


def _shared_layout(model: nn.Module, path: str) -> FFNLayout:
    module = model.get_submodule(path)
    lay = FFN_LAYOUTS.lookup(type(module)) or infer_ffn_layout(module)
    if lay is None:
        raise UnsupportedModuleError(
            f"shared expert {path!r} ({type(module).__name__}) is not a recognised FFN\n" + adapter_help("ffn")
        )
    return lay


def find_moes(model: nn.Module, selector: Any = None, *, strict: bool = True) -> list[MoE]:
    """Every MoE block of ``model``, in depth order.

    Args:
        model: any ``nn.Module``.
        selector: optionally keep only blocks whose path it selects.
        strict: raise :class:`UnsupportedModuleError` (naming candidates) when none is found.
    """
    found: list[MoE] = []
    for path, module in model.named_modules():
        if any(path.startswith(f.path + ".") for f in found):
            continue
        layout = MOE_LAYOUTS.lookup(type(module)) or infer_moe_layout(module)
        if layout is None:
            continue
        stack, layer = block_position(model, path)
        found.append(MoE(path, module, layout, model=model, layer=layer, stack=stack))
    if selector is not None:
        found = filter_by_selector(found, selector, model, strict=strict, what="MoE blocks")
    if not found and strict:
        cands = [
            f"  - {p} ({type(m).__name__})"
            for p, m in model.named_modules()
            if "expert" in p.rsplit(".", 1)[-1].lower() or "moe" in type(m).__name__.lower()
        ][:10]
        shown = "\n".join(cands) or "  (no module named like experts / MoE)"
        raise UnsupportedModuleError(
            f"found no MoE block in {type(model).__name__}. Candidates seen:\n{shown}\n" + adapter_help("moe")
        )
    return found
