"""Fused MoE experts as MIGU targets: the output units of every expert inside 3-D parameters.

In transformers v5 most MoE families store their routed experts as two 3-D parameters of one
module (no ``nn.Linear`` per expert, so a forward hook cannot see per-expert outputs):

- ``gate_up_proj [E, 2I, d]`` (gate rows first) and ``down_proj [E, d, I]``: units on axis 1
  (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...);
- ``gate_up_proj [E, d, 2I]`` and ``down_proj [E, I, d]``: units on the last axis ("transposed"),
  gate/up interleaved with biases ``[E, 2I]`` / ``[E, d]`` (GPT-OSS) or concatenated (Llama4).

MIGU treats the gate, up and down projection of every expert as a layer of its own, exactly as it
would treat the ``nn.Linear`` layers of a per-expert ``ModuleList``: expert ``e``'s statistic is
computed from expert ``e``'s outputs (before the routing weight) over the tokens routed to ``e``.
A forward hook on the experts module reads the tokens and the routing the module received
(``experts(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k])``) and recomputes,
per routed expert, the projections from the stored weights — exact for every layout, whatever
kernel (eager, grouped_mm, ...) the module itself runs. Finding and verifying the layout of a
module is :mod:`modulart.migu.expert_discovery`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Experts(nn.Module):  # Mixtral-style storage, eager loop
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 5))  # [E, 2I, d]
    ...         self.down_proj = nn.Parameter(torch.randn(3, 5, 4))  # [E, d, I]
    ...         self.act_fn = nn.SiLU()
    ...     def forward(self, x, idx, w):
    ...         out = torch.zeros_like(x)
    ...         for t in range(x.shape[0]):
    ...             for j in range(idx.shape[1]):
    ...                 gate, up = (self.gate_up_proj[idx[t, j]] @ x[t]).chunk(2)
    ...                 out[t] += w[t, j] * (self.down_proj[idx[t, j]] @ (self.act_fn(gate) * up))
    ...         return out
    >>> fe = FusedExperts("experts", Experts(), FusedLayout(transposed=False, interleaved=False))
    >>> fe.num_experts, fe.d_expert, [(p.name, p.units, p.axis) for p in fe.parts]
    (3, 4, [('gate', 4, 1), ('up', 4, 1), ('down', 5, 1)])
    >>> x = torch.randn(2, 5)
    >>> gate_up, down = fe.project(1, x)  # expert 1 on two tokens, before the routing weight
    >>> tuple(gate_up.shape), tuple(down.shape)
    ((2, 8), (2, 5))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import UnsupportedModuleError

__all__ = ["ExpertPart", "FusedExperts", "FusedLayout"]

_INDEX_KWARGS = ("top_k_index", "router_indices", "selected_experts", "topk_indices")


@dataclass(frozen=True)
class FusedLayout:
    """How one experts module stores its experts and receives its tokens.

    Attributes:
        transposed: ``gate_up_proj [E, d, 2I]`` / ``down_proj [E, I, d]`` (units on the last axis)
            instead of ``[E, 2I, d]`` / ``[E, d, I]`` (units on axis 1).
        interleaved: gate and up units alternate (``gate = [..., ::2]``) instead of gate first.
        dense: the module is called as ``experts(x [E * T, d])`` with every expert's copy of the
            tokens pre-scaled by its routing score (zero rows: not routed; Llama4) instead of
            ``experts(x [T, d], top_k_index [T, k], top_k_weights [T, k])``.
    """

    transposed: bool
    interleaved: bool
    dense: bool = False


@dataclass
class ExpertPart:
    """One projection (``gate``, ``up`` or ``down``) of every expert of a fused parameter.

    Attributes:
        name: ``"gate"``, ``"up"`` or ``"down"``.
        param: the stored 3-D parameter holding it.
        axis: the unit axis of ``param`` (1, or 2 when transposed).
        units_slice: the positions of this projection's units along ``axis`` (a basic slice:
            ``[:I]`` / ``[I:]`` gate first, ``[0::2]`` / ``[1::2]`` interleaved, ``[:]`` down).
        size: the number of units along ``axis`` of ``param``.
        bias: the ``[E, units of param]`` bias of ``param``, or None.
    """

    name: str
    param: torch.Tensor
    axis: int
    units_slice: slice
    size: int
    bias: torch.Tensor | None

    @property
    def units(self) -> int:
        return len(range(*self.units_slice.indices(self.size)))


class FusedExperts:
    """A fused experts module in MIGU's terms: its parts and the recomputation of expert outputs.

    Shapes are checked against ``layout`` here; whether the layout is right is checked by
    :func:`modulart.migu.expert_discovery.verify`.

    Attributes:
        path, module, layout: where it is and how it stores its experts.
        gate_up: ``[E, 2I, d]`` or ``[E, d, 2I]``; down: ``[E, d, I]`` or ``[E, I, d]``; biases or None.
        parts: gate, up (units of ``gate_up``) and down (units of ``down``).
    """

    def __init__(self, path: str, module: nn.Module, layout: FusedLayout) -> None:
        self.path, self.module, self.layout = path, module, layout
        gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3):
            raise UnsupportedModuleError(f"{path!r}: expected 3-D gate_up_proj and down_proj parameters")
        self.gate_up, self.down = gu, down
        self.axis = 2 if layout.transposed else 1
        e, two_i, d = gu.shape[0], gu.shape[self.axis], gu.shape[3 - self.axis]
        want_down = (e, d, two_i // 2) if not layout.transposed else (e, two_i // 2, d)
        if two_i % 2 or tuple(down.shape) != want_down:
            raise UnsupportedModuleError(
                f"{path!r}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} do not fit the "
                f"{'transposed' if layout.transposed else 'standard'} layout (down_proj should be {want_down})"
            )
        self.gate_up_bias = _bias(module, "gate_up_proj_bias", (e, two_i), path)
        self.down_bias = _bias(module, "down_proj_bias", (e, d), path)
        inter = two_i // 2
        gate, up = (slice(0, None, 2), slice(1, None, 2)) if layout.interleaved else (slice(inter), slice(inter, None))
        self.parts = [
            ExpertPart("gate", gu, self.axis, gate, two_i, self.gate_up_bias),
            ExpertPart("up", gu, self.axis, up, two_i, self.gate_up_bias),
            ExpertPart("down", down, self.axis, slice(None), d, self.down_bias),
        ]

    @property
    def num_experts(self) -> int:
        return int(self.gate_up.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.gate_up.shape[3 - self.axis])

    @property
    def d_expert(self) -> int:
        return int(self.gate_up.shape[self.axis]) // 2

    def params(self) -> list[torch.Tensor]:
        """The parameters this module's parts gate (weights and biases)."""
        return [t for t in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if t is not None]

    def project(self, expert: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert`` on ``x [n, d]``: ``(gate_up outputs [n, 2I] in storage order, down outputs [n, d])``.

        Both before the routing weight, biases included: the outputs of the expert's projections.
        """
        w, dw = self.gate_up[expert], self.down[expert]
        gu = x @ w if self.layout.transposed else F.linear(x, w)
        if self.gate_up_bias is not None:
            gu = gu + self.gate_up_bias[expert]
        h = self._glu(gu)
        out = h @ dw if self.layout.transposed else F.linear(h, dw)
        if self.down_bias is not None:
            out = out + self.down_bias[expert]
        return gu, out

    def _glu(self, gu: torch.Tensor) -> torch.Tensor:
        apply_gate = getattr(self.module, "_apply_gate", None)  # what the module's own forward uses
        if callable(apply_gate):
            out = apply_gate(gu)
            assert isinstance(out, torch.Tensor)
            return out
        act = getattr(self.module, "act_fn", None)
        if not callable(act):
            raise UnsupportedModuleError(f"{self.path!r}: no _apply_gate and no act_fn to compute the expert hidden")
        gate, up = (gu[..., 0::2], gu[..., 1::2]) if self.layout.interleaved else gu.chunk(2, dim=-1)
        hidden = act(gate) * up
        assert isinstance(hidden, torch.Tensor)
        return hidden

    def routed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """From the experts module's call arguments: ``(expert, token rows [n] long, inputs [n, d])`` per routed expert.

        Rows index the flattened tokens ``[T]`` (T = ``hidden_states.shape[0]``; with ``dense``, the
        rows of expert ``e``'s block of ``T``).

        Raises:
            UnsupportedModuleError: the call does not carry ``(hidden_states [T, d], top_k_index [T, k])``.
        """
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.d_model:
            raise UnsupportedModuleError(f"{self.path!r}: expected hidden_states [T, {self.d_model}] as first argument")
        if self.layout.dense:
            blocks = x.reshape(self.num_experts, -1, self.d_model)
            for e in range(self.num_experts):
                rows = blocks[e].ne(0).any(-1).nonzero().flatten()
                if rows.numel():
                    yield e, rows, blocks[e, rows]
            return
        idx = args[1] if len(args) > 1 else next((kwargs[k] for k in _INDEX_KWARGS if k in kwargs), None)
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
            raise UnsupportedModuleError(
                f"{self.path!r}: expected integer top_k_index [{x.shape[0]}, k] as second argument, got "
                f"{type(idx).__name__}{'' if not isinstance(idx, torch.Tensor) else tuple(idx.shape)}"
            )
        flat = idx.flatten()
        tokens = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
        valid = (flat >= 0) & (flat < self.num_experts)  # some families pad with a "no expert" index
        flat, tokens = flat[valid], tokens[valid]
        order = torch.argsort(flat, stable=True)  # grouped by expert, tokens ascending within a group
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = tokens[order[start : start + n]]
                yield e, rows, x[rows]
            start += n


def _bias(module: nn.Module, name: str, shape: tuple[int, int], path: str) -> torch.Tensor | None:
    b = getattr(module, name, None)
    if b is None:
        return None
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != shape:
        raise UnsupportedModuleError(f"{path}.{name}: expected shape {shape}, got {getattr(b, 'shape', None)}")
    return b
