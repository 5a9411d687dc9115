"""A tiny pure-PyTorch MoE for examples and doctests (per-expert ModuleList, softmax top-k router).

Example:
    >>> import modulart as mt
    >>> from modulart.introspect.toy import toy_moe
    >>> [(m.path, m.num_experts, m.top_k) for m in mt.find_moes(toy_moe())]
    [('layers.0', 4, 2), ('layers.1', 4, 2)]
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ToyMoE", "toy_moe"]


class _ToyExpert(nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out


class _ToyBlock(nn.Module):
    def __init__(self, d: int, inter: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([_ToyExpert(d, inter) for _ in range(num_experts)])
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * w[tok, slot, None])
        return out.reshape(x.shape)


class ToyMoE(nn.Module):
    """A tiny pure-PyTorch MoE stack (per-expert ModuleList, softmax top-k router) for examples and doctests.

    ``forward(x [B, S, d]) -> [B, S, d]``: ``layers`` residual MoE blocks.
    """

    def __init__(self, d: int = 16, inter: int = 32, num_experts: int = 4, top_k: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_ToyBlock(d, inter, num_experts, top_k) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block(x)
        return x


def toy_moe(seed: int = 0, **sizes: int) -> ToyMoE:
    """A seeded :class:`ToyMoE` (no transformers needed).

    Example:
        >>> import modulart as mt
        >>> [m.num_experts for m in mt.find_moes(toy_moe())]
        [4, 4]
    """
    torch.manual_seed(seed)
    return ToyMoE(**sizes).eval()
