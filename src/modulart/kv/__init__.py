"""modulart.kv: tune FFN keys, values or both (arXiv 2402.12233).

FFNs act as key-value memories: the first layer's rows are keys, the second layer's columns are
values. ``apply`` makes exactly the chosen matrices of the chosen blocks trainable — fully
(``mode="full"``), as low-rank deltas through hooks (``"lora"``; the LoRA tensors are parameters of
the model while the handle lives), or only for the rows / columns of selected neurons
(``"mask"``) — and ``remove()`` restores every ``requires_grad`` flag.

Example:
    >>> import torch
    >>> import modulart.kv
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> h = modulart.kv.apply(model, target="keys", mode="full")
    >>> opt = torch.optim.AdamW(h.param_groups(weight_decay=0.01), lr=2e-4)
    >>> h.report().trainable
    64
    >>> h.peft_target_modules()
    ['0']
    >>> h.remove()
"""

from modulart.kv.config import KEY_SIDES, MODES, TARGETS, KVConfig
from modulart.kv.handle import KVHandle
from modulart.kv.lora import LoRA
from modulart.kv.operator import KV, KVPlan, apply
from modulart.kv.peft_targets import peft_target_modules
from modulart.kv.report import KVReport, ReportRow
from modulart.kv.targets import Part, find_blocks, resolve_parts

__all__ = [
    "KEY_SIDES",
    "KV",
    "MODES",
    "TARGETS",
    "KVConfig",
    "KVHandle",
    "KVPlan",
    "KVReport",
    "LoRA",
    "Part",
    "ReportRow",
    "apply",
    "find_blocks",
    "peft_target_modules",
    "resolve_parts",
]
