"""FFN views: the keys, values, activation and hook sites of any feed-forward block.

Notation (all canonical, whatever the storage — ``nn.Linear``, HF ``Conv1D``):

- ``keys``   ``[d_ff, d_model]``: rows of the first layer (the gate rows for gated FFNs);
- ``up``     ``[d_ff, d_model]``: gated FFNs only;
- ``values`` ``[d_model, d_ff]``: the second layer;
- ``h = σ(q·keysᵀ + b_k)`` or ``h = σ(q·keysᵀ + b_k) ⊙ (q·upᵀ + b_u)``; ``y = h·valuesᵀ + b_v``.

Hook sites (see :class:`~modulart.core.hooks.HookSite`): ``input_site`` (q), ``hidden_site``
(h, the input of the value projection — after dropout in training mode where the model has one
there) and ``output_site`` (y, before any residual, dropout or norm).

Example:
    >>> import torch
    >>> import modulart as mt
    >>> class MLP(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc_in, self.act, self.fc_out = torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
    ...     def forward(self, x):
    ...         return self.fc_out(self.act(self.fc_in(x)))
    >>> model = torch.nn.Sequential(MLP(), MLP())
    >>> ffn = mt.find_ffns(model)[1]
    >>> ffn.path, tuple(ffn.keys.shape), tuple(ffn.values.shape), ffn.gated
    ('1', (32, 8), (8, 32), False)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(ffn.forward(x), model[1](x))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.arch import FFN_LAYOUTS, FFNLayout, block_position, get_attr, infer_ffn_layout
from modulart.core.errors import UnsupportedModuleError
from modulart.core.hooks import HookSite
from modulart.core.linear import LinearRef, is_linear_like
from modulart.core.moe_layouts import MOE_LAYOUTS, infer_moe_layout
from modulart.core.select import filter_by_selector

__all__ = ["FFN", "adapter_help", "ffn_from_layout", "find_ffns"]


class FFN:
    """A typed view of one feed-forward block (reads and writes go to the model's own tensors).

    Attributes:
        path: dotted path of the block in the model.
        module: the block.
        layout: the :class:`~modulart.core.arch.FFNLayout` it was read with.
        layer: index within its block list (``None`` if it is not in a ``ModuleList``).
        stack: path of that block list (e.g. ``"encoder.block"``).
        key_proj / up_proj / value_proj: the projections as :class:`LinearRef`.
        activation: σ.
        input_site / hidden_site / output_site: where q, h and y can be hooked.
    """

    def __init__(
        self, path: str, module: nn.Module, layout: FFNLayout, *, layer: int | None = None, stack: str | None = None
    ) -> None:
        self.path, self.module, self.layout, self.layer, self.stack = path, module, layout, layer, stack
        self.key_proj = self._linear(layout.key)
        self.up_proj = self._linear(layout.up) if layout.up is not None else None
        self.value_proj = self._linear(layout.value)
        act = layout.activation
        self.activation: Callable[[torch.Tensor], torch.Tensor] = (
            act if callable(act) else self._attr(act, "activation")
        )
        if not callable(self.activation):
            raise UnsupportedModuleError(f"{path!r}: activation {act!r} is not callable")
        d_ff, d_model = self.key_proj.out_features, self.key_proj.in_features
        want = {"value": (d_model, d_ff)} | ({"up": (d_ff, d_model)} if self.up_proj else {})
        got = {"value": tuple(self.values.shape)} | ({"up": tuple(self.up_proj.weight.shape)} if self.up_proj else {})
        if want != got:
            raise UnsupportedModuleError(
                f"{path!r}: inconsistent FFN shapes: keys [{d_ff}, {d_model}] needs {want}, found {got}"
            )
        if layout.input is not None:
            inp = self._attr(layout.input, "input")
            self.input_site = HookSite(inp, _join(path, layout.input), "forward_pre")
        elif self.up_proj is not None:
            self.input_site = HookSite(module, path, "forward_pre")
        else:
            self.input_site = HookSite(self.key_proj.module, self.key_proj.path, "forward_pre")
        self.hidden_site = HookSite(self.value_proj.module, self.value_proj.path, "forward_pre")
        self.output_site = HookSite(self.value_proj.module, self.value_proj.path, "forward")

    def _attr(self, rel: str, what: str) -> Any:
        try:
            return get_attr(self.module, rel)
        except AttributeError as e:
            raise UnsupportedModuleError(
                f"{self.path!r} ({type(self.module).__name__}): layout field {what!r} "
                f"points to {rel!r}, which does not exist ({e})"
            ) from None

    def _linear(self, rel: str) -> LinearRef:
        mod = self._attr(rel, rel)
        if not isinstance(mod, nn.Module) or not is_linear_like(mod):
            raise UnsupportedModuleError(
                f"{_join(self.path, rel)!r} is {type(mod).__name__}; expected nn.Linear or a Hugging Face Conv1D"
            )
        return LinearRef(mod, _join(self.path, rel))

    # --- shapes -------------------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.up_proj is not None

    @property
    def d_model(self) -> int:
        return self.key_proj.in_features

    @property
    def d_ff(self) -> int:
        return self.key_proj.out_features

    # --- canonical weights (views: in-place edits reach the model) ----------------------------
    @property
    def keys(self) -> torch.Tensor:
        """``[d_ff, d_model]`` first-layer rows (gate rows when gated)."""
        return self.key_proj.weight

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        self.key_proj.set_weight(value)

    @property
    def up(self) -> torch.Tensor | None:
        """``[d_ff, d_model]`` up-projection rows (gated FFNs), else None."""
        return self.up_proj.weight if self.up_proj is not None else None

    @up.setter
    def up(self, value: torch.Tensor) -> None:
        if self.up_proj is None:
            raise UnsupportedModuleError(f"{self.path!r} is not gated: it has no up projection")
        self.up_proj.set_weight(value)

    @property
    def values(self) -> torch.Tensor:
        """``[d_model, d_ff]`` second layer (column i is neuron i's value vector)."""
        return self.value_proj.weight

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        self.value_proj.set_weight(value)

    @property
    def key_bias(self) -> torch.Tensor | None:
        """``[d_ff]`` or None."""
        return self.key_proj.bias

    @property
    def up_bias(self) -> torch.Tensor | None:
        """``[d_ff]`` or None."""
        return self.up_proj.bias if self.up_proj is not None else None

    @property
    def value_bias(self) -> torch.Tensor | None:
        """``[d_model]`` or None."""
        return self.value_proj.bias

    # --- recomputation ------------------------------------------------------------------------
    def pre_activation(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., d_model] -> q·keysᵀ + b_k  [..., d_ff]``."""
        return F.linear(q, self.keys, self.key_bias)

    def hidden(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., d_model] -> h [..., d_ff]`` (σ, or σ(gate) ⊙ up)."""
        h = self.activation(self.pre_activation(q))
        if self.up_proj is not None:
            h = h * self.up_proj(q)
        return h

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q [..., d_model] -> y [..., d_model]`` computed from the canonical weights."""
        return F.linear(self.hidden(q), self.values, self.value_bias)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The FFN's own stored parameters by role: ``key``, ``up``, ``value`` (+ ``*_bias``)."""
        out: dict[str, torch.Tensor] = {"key": self.key_proj.param, "value": self.value_proj.param}
        if self.up_proj is not None:
            out["up"] = self.up_proj.param
        for role, ref in (("key", self.key_proj), ("up", self.up_proj), ("value", self.value_proj)):
            if ref is not None and ref.bias is not None:
                out[f"{role}_bias"] = ref.bias
        return out

    def __repr__(self) -> str:
        kind = "gated" if self.gated else "plain"
        return (
            f"FFN({self.path!r}, {type(self.module).__name__}, {kind}, d_model={self.d_model}, "
            f"d_ff={self.d_ff}, layer={self.layer})"
        )


def _join(a: str, b: str) -> str:
    return ".".join(p for p in (a, b) if p)


def ffn_from_layout(model: nn.Module, path: str, layout: FFNLayout) -> FFN:
    """Build the view of the block at ``path`` with an explicit layout (validated)."""
    module = model.get_submodule(path)
    stack, layer = block_position(model, path)
    return FFN(path, module, layout, layer=layer, stack=stack)


def _moe_paths(model: nn.Module) -> list[str]:
    return [
        p
        for p, m in model.named_modules()
        if MOE_LAYOUTS.lookup(type(m)) is not None or infer_moe_layout(m) is not None
    ]


def find_ffns(
    model: nn.Module, selector: Any = None, *, strict: bool = True, include_shared_experts: bool = False
) -> list[FFN]:
    """Every dense feed-forward block of ``model``, in depth (module-definition) order.

    Blocks are recognised through :data:`~modulart.core.arch.FFN_LAYOUTS` (walked along the MRO)
    and, failing that, generic discovery. Experts inside MoE blocks are not dense FFNs and are left
    out (shared experts are included with ``include_shared_experts=True``).

    Args:
        model: any ``nn.Module``.
        selector: optionally keep only blocks whose path it selects (see :func:`as_selector`).
        strict: raise :class:`UnsupportedModuleError` when nothing is found.
        include_shared_experts: also return the shared experts of MoE blocks.

    Returns:
        The FFN views, outermost first, in the order modules are defined.
    """
    moe = _moe_paths(model)
    found: list[FFN] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed):
            continue
        if path in moe:
            continue
        enclosing = [m for m in moe if m == "" or path.startswith(m + ".")]
        if enclosing and (not include_shared_experts or _is_routed_expert(model, path, enclosing[-1])):
            continue
        layout = FFN_LAYOUTS.lookup(type(module)) or infer_ffn_layout(module)
        if layout is None:
            continue
        found.append(ffn_from_layout(model, path, layout))
        claimed.append(path)
    if selector is not None:
        found = filter_by_selector(found, selector, model, strict=strict, what="FFNs")
    if not found and strict:
        raise UnsupportedModuleError(_no_ffn_message(model))
    return found


def _is_routed_expert(model: nn.Module, path: str, moe_path: str) -> bool:
    block = model.get_submodule(moe_path)
    layout = MOE_LAYOUTS.lookup(type(block)) or infer_moe_layout(block)
    experts = _join(moe_path, layout.experts if layout is not None else "experts")
    return path == experts or path.startswith(experts + ".")


def _no_ffn_message(model: nn.Module) -> str:
    candidates = []
    for path, m in model.named_modules():
        lin = [(n, tuple(c.weight.shape)) for n, c in m.named_children() if is_linear_like(c)]
        name = type(m).__name__.lower()
        if len(lin) >= 2 or any(k in name for k in ("mlp", "ffn", "feedforward", "feed_forward")):
            candidates.append(f"  - {path or '<root>'} ({type(m).__name__}): linear children {lin[:4]}")
    shown = "\n".join(candidates[:10]) or "  (no module with two or more linear children)"
    return f"found no feed-forward block in {type(model).__name__}. Candidates seen:\n{shown}\n" + adapter_help("ffn")


def adapter_help(kind: str) -> str:
    """The how-to text shown when a model is not understood (``kind``: ``"ffn"`` or ``"moe"``)."""
    if kind == "ffn":
        return (
            "Register an adapter for your block class (attribute paths relative to the block):\n"
            "    import modulart as mt\n"
            "    mt.register_ffn_layout(MyMLP, mt.FFNLayout(key='fc_in', value='fc_out', activation='act'))\n"
            "    # gated: mt.FFNLayout(key='w_gate', up='w_up', value='w_down', activation=torch.nn.functional.silu)\n"
            "See docs/adapters.md."
        )
    return (
        "Register an adapter for your MoE block class:\n"
        "    import modulart as mt\n"
        "    mt.register_moe_layout(MyMoE, mt.MoELayout(router='router', experts='experts',\n"
        "        storage='module_list', scoring='softmax_topk', top_k='top_k'))\n"
        "See docs/adapters.md."
    )
