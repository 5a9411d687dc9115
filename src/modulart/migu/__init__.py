"""modulart.migu: magnitude-gated gradient updates for continual learning (arXiv 2406.17245).

Each optimizer step, every gated linear layer updates only the output units whose activations had
the largest magnitude over the step's micro-batches; the other units' gradients are zeroed (and,
with ``freeze_masked_rows``, their values restored after the step, so Adam moments and weight decay
cannot move them either). On MoE models the routers and every expert's gate / up / down
projection are gated too, fused 3-D expert parameters included (per expert, over the tokens routed
to it); trainable parameters left ungated are named in one :class:`MIGUCoverageWarning`.

Example:
    >>> import torch, modulart.migu
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> migu = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    >>> model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    >>> migu.stats()["0"].kept_fraction >= 0.3
    True
    >>> migu.remove()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from modulart.migu.config import MIGUConfig
from modulart.migu.coverage import MIGUCoverageWarning
from modulart.migu.handle import MIGUHandle
from modulart.migu.operator import MIGU, MIGUPlan, Target, apply, find_targets
from modulart.migu.stats import LayerStats, jaccard, keep_count, select_mask

__all__ = [
    "MIGU",
    "LayerStats",
    "MIGUCallback",
    "MIGUConfig",
    "MIGUCoverageWarning",
    "MIGUHandle",
    "MIGUPlan",
    "Target",
    "apply",
    "find_targets",
    "jaccard",
    "keep_count",
    "select_mask",
]

if TYPE_CHECKING:
    from modulart.migu.hf import MIGUCallback as MIGUCallback


def __getattr__(name: str) -> object:
    # MIGUCallback needs transformers: imported on first use, so `import modulart.migu` stays light
    if name == "MIGUCallback":
        value: object = importlib.import_module("modulart.migu.hf").MIGUCallback
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modulart.migu' has no attribute {name!r}")
