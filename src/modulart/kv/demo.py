"""The KV step of ``modulart tour``: train only the FFN keys of the real MiniLM's last layers, then LoRA on them.

Example:
    >>> from modulart.kv.demo import kv_tour_step  # doctest: +SKIP
    >>> numbers = kv_tour_step(model, loss_fn, print)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modulart.core.types import JSONValue
from modulart.kv.operator import apply

__all__ = ["kv_tour_step"]


def kv_tour_step(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], echo: Callable[[str], None], steps: int = 3
) -> dict[str, JSONValue]:
    """Full key tuning for ``steps`` steps (only the keys move), then a LoRA on the keys merged back."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    handle = apply(model, target="keys", layers="last_half", mode="full")
    report = handle.report()
    opt = torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=1e-4)
    for _ in range(steps):
        torch.autograd.backward(loss_fn())
        opt.step()
        opt.zero_grad(set_to_none=True)
    handle.remove()
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    echo(
        f"  keys of the last half: {report.trainable:,} trainable of {report.model_total:,} parameters "
        f"({100 * report.fraction:.2f}%); after {steps} steps the changed tensors are: {changed}"
    )
    model.load_state_dict(before)
    lora = apply(model, target="keys", layers="last_half", mode="lora", rank=8)
    lora_report = lora.report()
    lora_opt = torch.optim.AdamW(lora.param_groups(weight_decay=0.0), lr=1e-3)
    for _ in range(steps):
        torch.autograd.backward(loss_fn())
        lora_opt.step()
        lora_opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        unmerged = loss_fn()
        lora.merge_()
        merged = loss_fn()
    model.load_state_dict(before)
    echo(
        f"  LoRA r=8 on the same keys: {lora_report.trainable:,} trainable parameters; after merge_() the loss is "
        f"{merged.item():.6f} vs {unmerged.item():.6f} unmerged (no hooks left)"
    )
    return {
        "trainable_keys": report.trainable,
        "model_total": report.model_total,
        "changed": list(changed),
        "lora_trainable": lora_report.trainable,
        "merge_gap": abs(merged.item() - unmerged.item()),
    }
