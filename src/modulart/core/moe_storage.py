"""Expert storage: canonical per-expert ``gate`` / ``up`` ``[I, d]`` and ``down`` ``[d, I]`` views.

Every storage a MoE family uses is described by a :class:`FusedSpec` (for 3-D or flattened
parameters) or read through dense FFN views (one module per expert). The canonical tensors are
*views* of the stored ones, so in-place edits reach the model:

- ``gate_up [E, 2I, d]`` gate first (Mixtral & co) or up first; ``down [E, d, I]``;
- transposed ``gate_up [E, d, 2I]`` (Llama4), interleaved (GPT-OSS, with biases); ``down [E, I, d]``;
- separate ``gate`` / ``up`` tensors, flattened ``[E * I, d]`` (DBRX ``w1`` / ``v1`` / ``w2``);
- JetMoE / ParallelExperts ``input_linear.weight [E, 2I, d]``, ``output_linear.weight [E, d, I]``.

Example:
    >>> import torch
    >>> from modulart.core.moe_storage import FusedSpec, fused_expert
    >>> gu, down = torch.randn(3, 8, 5), torch.randn(3, 5, 4)  # E=3, I=4, d=5
    >>> e = fused_expert(FusedSpec(gu, None, down), 1, lambda g, u: g * u)
    >>> torch.equal(e.gate, gu[1, :4]), torch.equal(e.up, gu[1, 4:]), tuple(e.down.shape)
    (True, True, (5, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.arch import FFN_LAYOUTS, FFNLayout, get_attr, infer_ffn_layout
from modulart.core.errors import ShapeError, UnsupportedModuleError

__all__ = ["GLU_VARIANTS", "Expert", "FusedSpec", "dense_expert_layout", "fused_expert"]

Glu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Act = Callable[[torch.Tensor], torch.Tensor]


class Expert:
    """One routed expert in canonical orientation (views of the stored tensors).

    Attributes:
        index: expert number.
        gate, up: ``[I, d_model]`` (``up`` is None for an ungated expert, whose ``gate`` is its
            first layer); down: ``[d_model, I]``; biases or None.
    """

    def __init__(
        self,
        index: int,
        gate: torch.Tensor,
        up: torch.Tensor | None,
        down: torch.Tensor,
        glu: Glu,
        biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
        activation: Act | None = None,
    ) -> None:
        self.index, self.gate, self.up, self.down, self.glu = index, gate, up, down, glu
        self.gate_bias, self.up_bias, self.down_bias = biases
        self._activation = activation

    @property
    def gated(self) -> bool:
        return self.up is not None

    @property
    def d_expert(self) -> int:
        return int(self.gate.shape[0])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_model] -> [..., I]``."""
        g = F.linear(x, self.gate, self.gate_bias)
        if self.up is None:
            return self.glu(g, torch.ones_like(g))
        return self.glu(g, F.linear(x, self.up, self.up_bias))

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
        for name, value in tensors.items():
            with torch.no_grad():
                getattr(self, name).copy_(value)

    def __repr__(self) -> str:
        return f"Expert({self.index}, I={self.d_expert}, gated={self.gated})"


@dataclass(frozen=True)
class FusedSpec:
    """How fused expert tensors are stored.

    Attributes:
        gate_up: gate and up (or the gate alone when ``up`` is given), ``[E, 2I, d]`` / ``[E, d, 2I]``
            or flattened ``[E * 2I, d]``.
        up: a separate up tensor shaped like the gate, or None.
        down: ``[E, d, I]`` or ``[E, I, d]`` (``down_transposed``), or flattened.
        transposed: gate/up have the neuron axis last.
        down_transposed: down has the neuron axis first (``[E, I, d]``).
        interleaved: gate/up alternate along the neuron axis.
        up_first: the up half comes first.
        flat: tensors are flattened ``[E * n, m]``; ``num_experts`` is then required.
        gate_up_bias: ``[E, 2I]`` or None; down_bias: ``[E, d]`` or None.
        num_experts: E (read from the tensors unless ``flat``).
    """

    gate_up: torch.Tensor
    up: torch.Tensor | None
    down: torch.Tensor
    transposed: bool = False
    down_transposed: bool = False
    interleaved: bool = False
    up_first: bool = False
    flat: bool = False
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    num_experts: int | None = None

    @property
    def experts(self) -> int:
        if self.flat:
            if self.num_experts is None:
                raise UnsupportedModuleError("flattened expert storage needs the number of experts")
            return self.num_experts
        return int(self.gate_up.shape[0])

    def _per_expert(self, t: torch.Tensor, e: int) -> torch.Tensor:
        if self.flat:
            return t.view(self.experts, -1, t.shape[-1])[e]
        return t[e]

    def check(self) -> None:
        """Raise :class:`UnsupportedModuleError` when the shapes do not fit together."""
        e0 = fused_expert(self, 0, lambda g, u: g)
        d, inter = int(e0.gate.shape[1]), int(e0.gate.shape[0])
        want_down = (d, inter)
        if tuple(e0.down.shape) != want_down or (e0.up is not None and e0.up.shape != e0.gate.shape):
            raise UnsupportedModuleError(
                f"fused expert shapes do not fit: gate {tuple(e0.gate.shape)}, "
                f"up {None if e0.up is None else tuple(e0.up.shape)}, down {tuple(e0.down.shape)} "
                f"(expected down {want_down})"
            )
        for t in (self.gate_up, self.down, *([self.up] if self.up is not None else [])):
            if not self.flat and int(t.shape[0]) != self.experts:
                raise UnsupportedModuleError(f"expert tensors disagree on the number of experts: {tuple(t.shape)}")


def fused_expert(spec: FusedSpec, e: int, glu: Glu, activation: Act | None = None) -> Expert:
    """Expert ``e`` of fused storage ``spec`` as canonical views."""
    gu = spec._per_expert(spec.gate_up, e)
    if spec.transposed:
        gu = gu.t()  # -> [n, d]
    bias = spec.gate_up_bias[e] if spec.gate_up_bias is not None else None
    if spec.up is not None:
        up = spec._per_expert(spec.up, e)
        gate, up = gu, (up.t() if spec.transposed else up)
        gb, ub = bias, None
    else:
        n = int(gu.shape[0])
        if n % 2:
            raise UnsupportedModuleError(f"fused gate/up has an odd neuron count {n}")
        if spec.interleaved:
            first, second = gu[0::2], gu[1::2]
            fb, sb = (bias[0::2], bias[1::2]) if bias is not None else (None, None)
        else:
            first, second = gu[: n // 2], gu[n // 2 :]
            fb, sb = (bias[: n // 2], bias[n // 2 :]) if bias is not None else (None, None)
        gate, up, gb, ub = (second, first, sb, fb) if spec.up_first else (first, second, fb, sb)
    down = spec._per_expert(spec.down, e)
    if spec.down_transposed:
        down = down.t()
    db = spec.down_bias[e] if spec.down_bias is not None else None
    return Expert(e, gate, up, down, glu, (gb, ub, db), activation)


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
    "act_mul": _silu_glu,  # act(gate) * up, act read from MoELayout.activation (default experts.act_fn)
    "gpt_oss": _gpt_oss_glu,  # clamp, gate * sigmoid(alpha * gate), (up + 1) *
}


def dense_expert_layout(module: nn.Module) -> FFNLayout | None:
    """The FFN layout of a dense expert module (a shared expert, or one expert of a list), or None.

    Beyond the FFN table and generic discovery: ``gate_proj`` / ``up_proj`` / ``down_proj`` with an
    ``act*`` attribute, where shapes alone are ambiguous (``d_ff == d_model``); the enclosing MoE
    view is verified, so a wrong guess is refused there.
    """
    lay = FFN_LAYOUTS.lookup(type(module)) or infer_ffn_layout(module)
    if lay is not None:
        return lay
    names = dict(module.named_children())
    if not all(n in names for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    act = next((a for a in ("act_fn", "activation_fn", "act") if callable(getattr(module, a, None))), None)
    return FFNLayout(key="gate_proj", up="up_proj", value="down_proj", activation=act) if act else None
