"""MoE views: router and experts of any mixture-of-experts block, in one canonical shape.

Whatever the storage (see :mod:`modulart.core.moe_storage`) an :class:`Expert` exposes ``gate`` /
``up`` ``[I, d_model]`` and ``down`` ``[d_model, I]`` as *views* of the stored tensors (in-place
edits reach the model). The router is exposed as ``router_weight [E, d_model]`` (+ ``router_bias``),
with the block's :class:`ScoringRule` (see :mod:`modulart.core.moe_scoring`) so :meth:`MoE.route`
and :meth:`MoE.forward` recompute exactly what the block does. Shared experts are dense
:class:`~modulart.core.ffn.FFN` views.

:func:`find_moes` hands out a view only after it has matched the block's own forward and routing
on a probe (:mod:`modulart.core.moe_verify`); blocks outside the table are discovered by matching
candidate layouts against the block's behaviour (:mod:`modulart.core.moe_discovery`).

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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.arch import FFNLayout, get_attr
from modulart.core.errors import OutOfRangeError, UnsupportedModuleError
from modulart.core.ffn import FFN, adapter_help, ffn_from_layout
from modulart.core.hooks import HookSite
from modulart.core.linear import LinearRef
from modulart.core.moe_layouts import GLU_VARIANTS, MoELayout
from modulart.core.moe_scoring import Routing, ScoringRule, apply_capacity, apply_rule
from modulart.core.moe_storage import Expert, FusedSpec, dense_expert_layout, fused_expert

if TYPE_CHECKING:
    from modulart.core.verify import Verification

__all__ = ["Expert", "MoE", "Routing", "ScoringRule", "find_moes"]


class MoE:
    """A typed view of one MoE block.

    Attributes:
        path, module, layout, layer, stack: as for :class:`~modulart.core.ffn.FFN`.
        router: the router module; ``router_weight`` ``[E, d_model]``, ``router_bias`` ``[E]``.
        selection_bias: ``[E]`` added to scores for selection only (DeepSeek-V3), or None.
        scoring: the :class:`ScoringRule`.
        shared_experts: dense FFN views of always-on experts; ``shared_gate`` scales them.
        output_bias: ``[d_model]`` added to the block output (JetMoE), or None.
        input_site / output_site: the block's input and output hidden states.
        verification: how the view was checked against the block (None with ``verify=False``).
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
        self.verification: Verification | None = None
        self.router = self._attr(layout.router, "router")
        self.experts_module = self._attr(layout.experts, "experts")
        w = getattr(self.router, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise UnsupportedModuleError(f"{path!r}: router {layout.router!r} has no 2-D weight")
        try:
            self.scoring = self._rule(layout)
        except (TypeError, ValueError) as e:
            raise UnsupportedModuleError(f"{path!r}: a routing parameter of the layout is not usable ({e})") from None
        self._expert_ffns: list[FFN] = []
        self._fused: FusedSpec | None = None
        if layout.storage == "module_list":
            self._read_expert_modules(model)
        else:
            self._fused = self._fused_spec()
            self._fused.check()
        self.shared_experts = [
            ffn_from_layout(model, p, _shared_layout(model, p), verify=False) for p in self._shared_paths(layout)
        ]
        self.shared_gate = (
            LinearRef(self._attr(layout.shared_gate, "shared_gate"), _join(path, layout.shared_gate))
            if layout.shared_gate
            else None
        )
        sb = self._attr(layout.selection_bias, "selection_bias") if layout.selection_bias else None
        self.selection_bias: torch.Tensor | None = (
            (sb if sb.dim() == 1 else sb.view(-1)) if isinstance(sb, torch.Tensor) else None
        )
        ob = self._attr(layout.output_bias, "output_bias") if layout.output_bias else None
        self.output_bias: torch.Tensor | None = ob if isinstance(ob, torch.Tensor) else None
        self.input_site = HookSite(module, path, "forward_pre")
        self.output_site = HookSite(module, path, "forward", layout.output_index or 0)
        self._check_shapes()

    # --- construction helpers -----------------------------------------------------------------
    def _attr(self, rel: str, what: str) -> Any:
        try:
            return get_attr(self.module, rel)
        except AttributeError as e:
            raise UnsupportedModuleError(
                f"{self.path!r} ({type(self.module).__name__}): layout field {what!r} "
                f"points to {rel!r}, which does not exist ({e})"
            ) from None

    def _value(self, v: Any, what: str) -> Any:
        return self._attr(v, what) if isinstance(v, str) else v

    def _shared_paths(self, layout: MoELayout) -> list[str]:
        """Model paths of the shared experts; a ``ModuleList`` / ``ModuleDict`` holds several."""
        out = []
        for s in layout.shared:
            m = self._attr(s, "shared")
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                out += [
                    _join(self.path, f"{s}.{n}") for n, c in m.named_children() if any(True for _ in c.parameters())
                ]
            else:
                out.append(_join(self.path, s))
        return out

    def _rule(self, layout: MoELayout) -> ScoringRule:
        norm_p = self._value(layout.norm_p, "norm_p")
        return ScoringRule(
            kind=layout.scoring,
            top_k=int(self._value(layout.top_k, "top_k")),
            normalize=bool(self._value(layout.normalize_topk, "normalize_topk")) and norm_p is not None,
            n_group=int(self._value(layout.n_group, "n_group")) if layout.n_group is not None else 1,
            topk_group=int(self._value(layout.topk_group, "topk_group")) if layout.topk_group is not None else 1,
            scaling=float(self._value(layout.scaling, "scaling")) if layout.scaling is not None else 1.0,
            norm_p=float(norm_p) if norm_p is not None else 1.0,
            norm_min=float(self._value(layout.norm_min, "norm_min") or 0.0),
            jitter_eps=float(self._value(layout.jitter_eps, "jitter_eps") or 0.0),
            capacity=int(self._value(layout.capacity, "capacity")) if layout.capacity is not None else None,
            weights_on_input=layout.weights_on_input,
            score_fn=layout.score_fn,
        )

    def _read_expert_modules(self, model: nn.Module) -> None:
        ex = self.experts_module
        if not isinstance(ex, (nn.ModuleList, nn.ModuleDict)):
            raise UnsupportedModuleError(f"{self.path!r}: experts {self.layout.experts!r} is not a ModuleList/Dict")
        for name, e in ex.named_children():
            if not any(True for _ in e.parameters()):
                continue  # a dropout or another parameter-free helper next to the experts
            lay = dense_expert_layout(e)
            where = _join(self.path, f"{self.layout.experts}.{name}")
            if lay is None:
                raise UnsupportedModuleError(
                    f"{where} ({type(e).__name__}) is not a recognised FFN block\n" + adapter_help("ffn")
                )
            self._expert_ffns.append(ffn_from_layout(model, where, lay, verify=False))  # the block is verified

    def _fused_spec(self) -> FusedSpec:
        lay, ex = self.layout, self.experts_module
        legacy = lay.storage == "fused_interleaved_t"

        def tensor(rel: str | None, what: str) -> torch.Tensor | None:
            if rel is None:
                return None
            t = self._attr(_join(lay.experts, rel), what)
            if not isinstance(t, torch.Tensor):
                raise UnsupportedModuleError(f"{self.path!r}: {what} {rel!r} is {type(t).__name__}, not a tensor")
            return t

        gb = lay.gate_up_bias or (f"{lay.gate_up}_bias" if hasattr(ex, f"{lay.gate_up}_bias") else None)
        db = lay.down_bias or (f"{lay.down}_bias" if hasattr(ex, f"{lay.down}_bias") else None)
        transposed = lay.transposed or legacy
        gu, down = tensor(lay.gate_up, "gate_up"), tensor(lay.down, "down")
        assert gu is not None and down is not None
        return FusedSpec(
            gate_up=gu,
            up=tensor(lay.up, "up"),
            down=down,
            transposed=transposed,
            down_transposed=transposed if lay.down_transposed is None else lay.down_transposed,
            interleaved=lay.interleaved or legacy,
            up_first=lay.up_first,
            flat=lay.flat,
            gate_up_bias=tensor(gb, "gate_up_bias"),
            down_bias=tensor(db, "down_bias"),
            num_experts=int(self.router_weight.shape[0]) if lay.flat else None,
        )

    def _check_shapes(self) -> None:
        if self.router_weight.shape[0] != self.num_experts:
            raise UnsupportedModuleError(
                f"{self.path!r}: router has {self.router_weight.shape[0]} rows but there are {self.num_experts} experts"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise UnsupportedModuleError(f"{self.path!r}: top_k={self.top_k} outside [1, {self.num_experts}]")
        e0 = self.expert(0)
        if int(e0.gate.shape[1]) != self.d_model or int(e0.down.shape[0]) != self.d_model:
            raise UnsupportedModuleError(
                f"{self.path!r}: experts are [{e0.gate.shape[0]}, {e0.gate.shape[1]}] but the router "
                f"reads d_model={self.d_model}"
            )
        if self.selection_bias is not None and self.selection_bias.numel() != self.num_experts:
            raise UnsupportedModuleError(f"{self.path!r}: selection bias has {self.selection_bias.numel()} entries")

    def _glu(
        self,
    ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        lay, block, ex = self.layout, self.module, self.experts_module
        if lay.glu == "act_mul":
            act_src = lay.activation if lay.activation is not None else _join(lay.experts, "act_fn")
            act = act_src if callable(act_src) else self._attr(act_src, "activation")
            if not callable(act):
                raise UnsupportedModuleError(f"{self.path!r}: activation {act_src!r} is not callable")
            return (lambda g, u: act(g) * u), act
        variant = GLU_VARIANTS.get(lay.glu)
        if variant is None:
            raise UnsupportedModuleError(
                f"{self.path!r}: unknown gated activation {lay.glu!r}; known: {sorted(GLU_VARIANTS)}"
            )
        neutral = _GLU_NEUTRAL_UP.get(lay.glu, 1.0)
        return (lambda g, u: variant(block, ex, g, u)), (lambda g: variant(block, ex, g, torch.full_like(g, neutral)))

    # --- shape --------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        if self._fused is None:
            return len(self._expert_ffns)
        return self._fused.experts

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
            raise OutOfRangeError(f"{self.path!r}: expert {e} out of range [0, {self.num_experts})")
        if self._fused is None:
            f = self._expert_ffns[e]
            act = f.activation
            if f.up is None:
                return Expert(e, f.keys, None, f.values, lambda g, u: act(g), (f.key_bias, None, f.value_bias), act)
            return Expert(
                e, f.keys, f.up, f.values, lambda g, u: act(g) * u, (f.key_bias, f.up_bias, f.value_bias), act
            )
        glu, act = self._glu()
        return fused_expert(self._fused, e, glu, act)

    @property
    def fused_storage(self) -> FusedSpec | None:
        """How fused expert tensors are stored (orientation, order, flattening), or None for one
        module per expert: what code that slices the stored tensors directly must follow."""
        return self._fused

    def experts(self) -> list[Expert]:
        """All routed experts."""
        return [self.expert(e) for e in range(self.num_experts)]

    # --- recomputation ------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        """Recompute the routing of ``x [T, d_model]`` (or ``[..., S, d_model]``) from the router weight.

        Returns ``[T, ...]`` tensors over the flattened tokens. With a capacity (Switch) the
        weights of tokens beyond an expert's capacity within their sequence are 0.
        """
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.to(self.router_weight.dtype), self.router_weight, self.router_bias)
        scores, weights, idx = apply_rule(self.scoring, logits, self.selection_bias)
        if self.scoring.capacity is not None:
            weights = apply_capacity(weights, idx, x.shape, self.scoring.capacity)
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

    def routed_output(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """The weighted sum of the chosen experts: ``x [T, d] -> [T, d]`` (only chosen experts run)."""
        r = routing if routing is not None else self.route(x)
        y = torch.zeros_like(x)
        for e in torch.unique(r.indices).tolist():
            tok, slot = torch.where(r.indices == e)
            w = r.weights[tok, slot].to(x.dtype).unsqueeze(-1)
            ex = self.expert(int(e))
            out = ex.forward(x[tok] * w) if self.scoring.weights_on_input else ex.forward(x[tok]) * w
            y.index_add_(0, tok, out.to(y.dtype))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Recompute the block: ``x [..., d_model] -> [..., d_model]`` from canonical weights."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.route(x)
        y = self.routed_output(flat, routing)
        shared = self.shared_output(flat)
        if shared is not None:
            y = y + shared
        if self.output_bias is not None:
            y = y + self.output_bias
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
    lay = dense_expert_layout(module)
    if lay is None:
        raise UnsupportedModuleError(
            f"shared expert {path!r} ({type(module).__name__}) is not a recognised FFN\n" + adapter_help("ffn")
        )
    return lay


def find_moes(model: nn.Module, selector: Any = None, *, strict: bool = True, verify: bool = True) -> list[MoE]:
    """Every MoE block of ``model``, in depth order, each view verified against its block.

    Blocks are recognised structurally (:func:`~modulart.core.moe_layouts.moe_block_parts`); the
    layout comes from :data:`~modulart.core.moe_layouts.MOE_LAYOUTS` (user adapters included) or
    is discovered by matching candidates against the block's own behaviour on one probe. Before a
    view is returned, its ``forward`` and ``route`` are compared with what the block computes
    (output within the dtype's tolerance, identical expert choices and weights); outcomes are
    cached per block type, so a deep model pays for one probe per distinct block.

    Args:
        model: any ``nn.Module``.
        selector: optionally keep only blocks whose path it selects.
        strict: raise :class:`UnsupportedModuleError` (naming candidates) when none is found, or
            when a block looks like a MoE block but no exact view exists; with ``strict=False``
            such blocks are left out (with a warning).
        verify: check every view against its block (default). ``verify=False`` skips the probe
            and trusts the table or the structural guess — the opt-out, at the user's risk.

    Raises:
        UnsupportedModuleError: with the measured error, the candidates tried and how to write
            an adapter.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import modulart as mt
        >>> class Expert(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        ...     def forward(self, x):
        ...         return self.fc2(self.act(self.fc1(x)))
        >>> class Block(nn.Module):  # top-1 of a softmax, output scaled by the probability
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.router, self.experts = nn.Linear(8, 4), nn.ModuleList([Expert() for _ in range(4)])
        ...     def forward(self, x):
        ...         w, idx = self.router(x).softmax(-1).max(-1)
        ...         return torch.stack([self.experts[int(i)](t) for t, i in zip(x.reshape(-1, 8), idx.flatten())]
        ...                            ).reshape(x.shape) * w.unsqueeze(-1)
        >>> moe = mt.find_moes(nn.Sequential(Block(), Block()))[0]
        >>> moe.scoring.kind, moe.top_k, moe.scoring.normalize, moe.verification.ok
        ('softmax_topk', 1, False, True)
    """
    from modulart.core.moe_verify import resolve_moes
    from modulart.core.unwrap import unwrap_model

    return resolve_moes(unwrap_model(model), selector, strict=strict, verify=verify)
