"""The MIGU step of ``modulart tour``: a few magnitude-gated AdamW steps on the real MiniLM.

Example:
    >>> from modulart.migu.demo import migu_tour_step  # doctest: +SKIP
    >>> numbers = migu_tour_step(model, loss_fn, print)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modulart.migu.operator import apply

__all__ = ["migu_tour_step"]


def migu_tour_step(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], echo: Callable[[str], None], steps: int = 3
) -> dict[str, Any]:
    """Train ``steps`` steps with MIGU (keep 30%), report kept fractions and that masked rows stood still."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    handle = apply(model, keep_ratio=0.3, optimizer=opt)
    layer = next(iter(handle.layers.values()))
    weight = layer.target.weight
    kept_rows, frozen_ok = [], True
    for _ in range(steps):
        before = weight.detach().clone()
        loss = loss_fn()
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        keep = handle.masks()[layer.target.path]
        moved = (weight.detach() != before).any(dim=1 - layer.target.axis)
        frozen_ok &= not bool((moved & ~keep.to(moved.device)).any())
        kept_rows.append(int(keep.sum()))
    stats = handle.stats()
    fractions = [s.kept_fraction for s in stats.values() if s.kept_fraction is not None]
    jaccard = [s.jaccard_prev for s in stats.values() if s.jaccard_prev is not None]
    handle.remove()
    echo(f"  {len(stats)} linear layers gated (LM head / tied embeddings excluded), {steps} AdamW steps, keep 30%")
    echo(
        f"  kept fraction per layer: min {min(fractions):.3f} max {max(fractions):.3f}; Jaccard of the last two "
        f"steps' masks: mean {sum(jaccard) / max(len(jaccard), 1):.3f}"
    )
    echo(
        f"  {layer.target.path}: {kept_rows[-1]} of {len(keep)} output rows updated in the last step; masked rows "
        f"{'did not move' if frozen_ok else 'MOVED'} (momentum and weight decay included); last loss {loss.item():.4f}"
    )
    return {
        "layers": len(stats),
        "kept_fraction_min": min(fractions),
        "kept_fraction_max": max(fractions),
        "masked_rows_frozen": frozen_ok,
    }
