"""A minimal LoRA registered into the model: a forward hook adds ``dropout(x)·Aᵀ·Bᵀ·α/r``.

No module is replaced: the base linear map (``nn.Linear`` or HF ``Conv1D``, read in canonical
``[out, in]`` orientation through :class:`~modulart.core.linear.LinearRef`) stays as it is and its
output gets the low-rank delta added by a hook of the operator's registry. ``A [r, in]`` starts
kaiming-uniform (as PEFT does), ``B [out, r]`` at zero, so the model is unchanged at init. Half and
bfloat16 weights get fp32 adapters (the delta is cast to the output dtype).

A :class:`LoRA` is an ``nn.Module`` marked ``_modulart_owned``: the KV operator registers it as a
child of the linear module it adapts (``<module>.modulart_kv_lora``), so ``model.named_parameters()``
(any optimizer, the HF Trainer, DDP, FSDP2, ``save_pretrained``) sees ``lora_A`` / ``lora_B``, while
fingerprints leave it out; the handle's ``remove()`` unregisters it again.

Example:
    >>> import torch
    >>> from modulart.core.hooks import HookRegistry
    >>> from modulart.core.linear import LinearRef
    >>> from modulart.kv.lora import LoRA
    >>> lin = torch.nn.Linear(4, 6)
    >>> x = torch.randn(2, 4); y = lin(x)
    >>> lora = LoRA(LinearRef(lin, "lin"), rank=2, alpha=4.0)
    >>> with HookRegistry(lin) as reg:
    ...     _ = lora.install(reg)
    ...     torch.equal(lin(x), y)              # B = 0 at init
    True
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.hooks import HookHandle, HookRegistry, Priority
from modulart.core.linear import LinearRef

__all__ = ["LoRA"]


class LoRA(nn.Module):
    """The low-rank delta of one linear map.

    Args:
        ref: the base map (its weight is not modified until :meth:`merge_`).
        rank, alpha: the delta is ``(alpha / rank) · B·A``.
        dropout: dropout probability on the delta path's input (when the base module is training).
        generator: for the initialisation of ``A`` (determinism).
    """

    _modulart_owned: ClassVar[bool] = True  # fingerprints and freeze_rest leave its tensors alone

    def __init__(
        self,
        ref: LinearRef,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.ref = ref
        self.scale = alpha / rank
        self.dropout = dropout
        w = ref.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        a = torch.empty(rank, ref.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=dtype))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(ref.out_features, rank, device=w.device, dtype=dtype))  # [out, r]

    def delta(self, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        """``x [..., in] -> [..., out]``: the low-rank term added to the base output."""
        h = F.dropout(x, self.dropout, training) if self.dropout > 0 else x
        out = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return out.to(x.dtype)

    def weight_delta(self) -> torch.Tensor:
        """``[out, in]`` the delta as a dense matrix, ``(alpha / rank) · B·A``."""
        return (self.lora_B @ self.lora_A) * self.scale

    def install(self, registry: HookRegistry) -> HookHandle:
        """Hook the base module so its output gets :meth:`delta` of its input."""
        module = self.ref.module

        rows = self.ref.rows

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
            x = args[0] if args else next(iter(kwargs.values()))
            d = self.delta(x, mod.training).to(output.dtype)
            if rows is None:
                return output + d
            out = output.clone()  # a row block of a fused layer (gate or up half): only those outputs move
            out[..., rows] = out[..., rows] + d
            return out

        return registry.forward(
            module, hook, with_kwargs=True, priority=Priority.INTERVENE, name=f"lora:{self.ref.path}"
        )

    @torch.no_grad()
    def merge_(self) -> None:
        """Add the delta into the base weight (in the weight's dtype)."""
        w = self.ref.weight
        self.ref.set_weight(w + self.weight_delta().to(w.dtype))
