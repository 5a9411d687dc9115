"""LoRA on fused 3-D expert parameters: one low-rank delta per expert, in weight space.

Fused experts (``gate_up_proj [E, 2I, d]``, ``down_proj [E, d, I]``, transposed or interleaved
variants) are parameters, not ``nn.Linear`` modules, and the experts module runs its own kernel
(an eager loop, ``grouped_mm``...), so a forward hook cannot add a per-expert ``B·A·x``. Instead the
stored parameter is parametrised (:func:`torch.nn.utils.parametrize.register_parametrization`):
whatever reads it sees ``W + ΔW``, where ``ΔW`` is zero except on the part's neurons of every
expert, ``ΔW[e] = (alpha / rank) · B[e] · A[e]`` placed along the neuron axis. That is exact for any
kernel, trains through autograd, and merges by adding ``ΔW`` into the stored weight.

Shapes, for a part with ``n`` neurons on neuron axis ``axis`` (1 or 2) of ``param [E, ., .]`` whose
other axis has ``m`` entries: ``A [E, rank, m]``, ``B [E, n, rank]`` (zero-initialised: the model is
unchanged until training). Every access of the parametrised weight recomputes ``ΔW``; an experts
module that indexes it once per expert pays that per expert — wrap the forward in
``torch.nn.utils.parametrize.cached()`` to compute it once.

Example:
    >>> import torch
    >>> from modulart.kv.expert_lora import ExpertLoRA
    >>> w = torch.nn.Parameter(torch.randn(3, 8, 5))  # [E, 2I, d]: neurons on axis 1
    >>> lora = ExpertLoRA(w, axis=1, index=torch.arange(4), rank=2, alpha=4.0)  # the gate half
    >>> with torch.no_grad():
    ...     _ = lora.lora_B.normal_()
    >>> d = lora.dense(w)
    >>> tuple(d.shape), bool(d[:, 4:].eq(0).all()), bool(d[:, :4].ne(0).any())
    ((3, 8, 5), True, True)
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from modulart.core.errors import ShapeError

__all__ = ["ExpertLoRA", "FusedDelta", "parametrize_param", "unparametrize_param"]


class ExpertLoRA(nn.Module):
    """Per-expert low-rank delta on the ``index`` neurons of a fused expert parameter.

    Args:
        param: the stored ``[E, ., .]`` parameter.
        axis: its neuron axis (1 or 2).
        index: ``[n]`` neuron indices along ``axis`` this delta covers.
        rank, alpha: LoRA rank and scale numerator (``scale = alpha / rank``).
        generator: seeds ``A``'s Kaiming-uniform initialisation.
    """

    _modulart_owned: ClassVar[bool] = True

    def __init__(
        self,
        param: torch.Tensor,
        *,
        axis: int,
        index: torch.Tensor,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if param.dim() != 3 or axis not in (1, 2):
            raise ShapeError(f"ExpertLoRA needs a 3-D parameter and axis 1 or 2, got {tuple(param.shape)}, {axis}")
        experts, m = int(param.shape[0]), int(param.shape[3 - axis])
        dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
        a = torch.empty(experts, rank, m, dtype=torch.float32)
        bound = 1 / math.sqrt(m)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and LoRA use
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=param.device, dtype=dtype))  # [E, r, m]
        self.lora_B = nn.Parameter(torch.zeros(experts, int(index.numel()), rank, device=param.device, dtype=dtype))
        self.register_buffer("index", index.to(device=param.device, dtype=torch.long), persistent=False)
        self.axis = axis
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        """``[E, n, m]``: ``scale · B[e] · A[e]`` for every expert."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scale

    def dense(self, like: torch.Tensor) -> torch.Tensor:
        """The delta placed into a zero tensor shaped like the parameter (in its dtype)."""
        d = self.delta().to(like.dtype)
        if self.axis == 2:
            d = d.transpose(1, 2)
        index = self.index
        assert isinstance(index, torch.Tensor)
        return torch.zeros_like(like).index_add(self.axis, index, d)


class FusedDelta(nn.Module):
    """The parametrisation ``W -> W + Σ ΔW`` of one fused parameter (gate and up halves may share it).

    ``active = False`` makes it the identity (the handle's ``disable()``): the weight reads as stored.
    """

    _modulart_owned: ClassVar[bool] = True

    def __init__(self, parts: list[ExpertLoRA]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.active = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return weight
        out = weight
        for p in self.parts:
            assert isinstance(p, ExpertLoRA)
            out = out + p.dense(weight)
        return out


def parametrize_param(owner: nn.Module, name: str, delta: FusedDelta) -> list[str]:
    """Make ``owner.<name>`` read as ``W + ΔW`` (the stored parameter object is kept as ``original``).

    Returns:
        The order of ``owner``'s parameters before (for :func:`unparametrize_param`).
    """
    order = list(owner._parameters)
    parametrize.register_parametrization(owner, name, delta, unsafe=True)
    return order


def unparametrize_param(owner: nn.Module, name: str, *, merge: bool, order: list[str] | None = None) -> None:
    """Undo :func:`parametrize_param`; with ``merge`` first add ``ΔW`` into the stored weight.

    The original parameter object comes back under its own name (same tensor, so optimizers that
    hold it keep working), at its place among ``owner``'s parameters when ``order`` is given (so
    ``state_dict()`` lists the keys exactly as before).
    """
    if not parametrize.is_parametrized(owner, name):
        return
    plist = getattr(owner.parametrizations, name)
    original: torch.Tensor = plist.original
    if merge:
        delta = plist[0]
        assert isinstance(delta, FusedDelta)
        with torch.no_grad():  # in the order the parametrisation adds them: merged == unmerged
            for part in delta.parts:
                assert isinstance(part, ExpertLoRA)
                original.add_(part.dense(original.detach()))
    parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
    params = owner._parameters
    if order is not None and set(order) == set(params):
        for key in order:  # in place: re-insert in the original order
            params[key] = params.pop(key)
