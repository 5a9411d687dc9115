"""The memory set: FFN inputs on ordinary data that patch neurons must stay silent on.

Vectors are taken at the positions the policy edits (``cls``: position 0, ``last_prompt``: the last
non-padding token, otherwise every non-padding position), pooled over all batches, stored in fp32
and capped at ``memory_size`` by a seeded random subset.

Example:
    >>> import torch
    >>> from modulart.patcher.memory import positions_mask
    >>> positions_mask("last_prompt", torch.tensor([[1, 1, 0], [1, 1, 1]]), 3).int().tolist()
    [[0, 1, 0], [0, 0, 1]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from modulart.core.errors import ShapeError

__all__ = ["cap_memory", "positions_mask", "select_vectors"]


def positions_mask(policy: str, attention_mask: torch.Tensor | None, length: int, batch: int = 1) -> torch.Tensor:
    """``[batch, length]`` bool: the positions whose FFN inputs join the memory under ``policy``."""
    mask = attention_mask.bool() if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool)
    if policy == "cls":
        out = torch.zeros_like(mask)
        out[:, 0] = True
        return out
    if policy == "last_prompt":
        last = mask.long().sum(1).clamp(min=1) - 1
        out = torch.zeros_like(mask)
        out[torch.arange(mask.shape[0]), last] = True
        return out
    return mask


def batch_size(inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> int | None:
    """The number of sequences in a batch of token ids (a tensor — 1-D is one sequence — or the
    first tensor of a mapping), or None."""
    first = (
        inputs
        if isinstance(inputs, torch.Tensor)
        else next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    )
    if first is None or first.dim() == 0:
        return None
    return 1 if first.dim() == 1 else int(first.shape[0])


def as_batch_seq(q: torch.Tensor, batch: int | None) -> torch.Tensor:
    """The captured FFN input as ``[B, L, d]``: ``[B, d]`` gets ``L = 1``, and models that flatten
    tokens before the FFN (OPT: ``[B·L, d]``) are unflattened using the batch size.

    Example:
        >>> as_batch_seq(torch.zeros(6, 4), 2).shape, as_batch_seq(torch.zeros(2, 4), 2).shape
        (torch.Size([2, 3, 4]), torch.Size([2, 1, 4]))
    """
    if q.dim() != 2:
        return q
    if batch and q.shape[0] % batch == 0:
        return q.view(batch, q.shape[0] // batch, q.shape[1])
    return q[:, None]


def select_vectors(
    q: torch.Tensor, policy: str, attention_mask: torch.Tensor | None, batch: int | None = None
) -> torch.Tensor:
    """``q [B, L, d] (or [B, d], or [B·L, d] with ``batch``) -> [n, d]`` fp32 vectors at the policy's positions."""
    q = as_batch_seq(q, batch)
    if q.dim() != 3:
        raise ShapeError(
            f"the patched FFN's input must be [batch, seq, d_model] or [batch, d_model], got {list(q.shape)}"
        )
    am = attention_mask.to(q.device) if attention_mask is not None else None
    if am is not None and am.shape != q.shape[:2]:
        am = None
    mask = positions_mask(policy, am, q.shape[1], q.shape[0]).to(q.device)
    return q[mask].float()


def cap_memory(memory: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """At most ``cap`` rows of ``memory [N, d]``: a seeded random subset in original order."""
    if memory.shape[0] <= cap:
        return memory
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(memory.shape[0], generator=g)[:cap].sort().values
    return memory[keep.to(memory.device)]


def gather(
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    run: Callable[[torch.Tensor | Mapping[str, torch.Tensor]], torch.Tensor],
    policy: str,
) -> torch.Tensor:
    """Run every batch (``run`` returns the captured FFN input) and pool the selected vectors."""
    chunks: list[torch.Tensor] = []
    for b in batches:
        q = run(b)
        am = b.get("attention_mask") if isinstance(b, Mapping) else None
        chunks.append(select_vectors(q, policy, am, batch_size(b)).to("cpu"))
    if not chunks or sum(c.shape[0] for c in chunks) == 0:
        raise ShapeError("the memory set is empty: give at least one ordinary input")
    return torch.cat(chunks)
