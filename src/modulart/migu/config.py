"""Configuration of MIGU, magnitude-gated gradient updates (spec: shared/specs/migu.md).

Example:
    >>> from modulart.migu import MIGUConfig
    >>> MIGUConfig(keep_ratio=0.25).select
    'quantile'
    >>> MIGUConfig(keep_ratio=0.0)
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: MIGUConfig.keep_ratio = 0.0: must be a number in (0, 1]
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modulart.core.operator import OperatorConfig, option

__all__ = ["CONTROLS", "SELECTS", "STATS", "MIGUConfig"]

STATS = ("abs_sum", "l1_token_mean")
SELECTS = ("quantile", "topk")
CONTROLS = ("magnitude", "random")


@dataclasses.dataclass
class MIGUConfig(OperatorConfig):
    """Which layers are gated, how unit magnitudes are measured and how many units are updated."""

    keep_ratio: float = option(0.3, "fraction of output units per layer that are updated each step, in (0, 1]")
    stat: str = option(
        "abs_sum",
        "'abs_sum' (reference code: sum of |h| over all positions) or 'l1_token_mean' (paper text: per token "
        "|h| normalised to sum 1 over units, then averaged over tokens)",
    )
    select: str = option(
        "quantile",
        "'quantile' (keep a >= quantile(a, 1 - keep_ratio), ties kept, as the reference) or 'topk' "
        "(exactly ceil(keep_ratio * units) units, at least one)",
    )
    freeze_masked_rows: bool = option(
        True,
        "guarantee masked units do not move in the step (Adam moments and weight decay would move them even "
        "with a zero gradient); False = only zero their gradients, as the reference",
    )
    targets: Any = option(
        None,
        "None: every nn.Linear / HF Conv1D whose weight requires grad, except the LM head and layers tied to an "
        "input embedding, plus (with moe) MoE routers and fused experts; else a Selector spec (as_selector) picking "
        "linears, routers, fused experts modules or PEFT LoRA layers (expanded to their lora_A/lora_B)",
    )
    moe: bool = option(
        True,
        "with the default targets, also gate MoE routers (any class with an [E, d_model] weight) and the "
        "per-expert gate/up/down units of fused 3-D expert parameters",
    )
    mask_bias: bool = option(True, "also zero the bias entries of masked units (the reference leaves bias alone)")
    skip_first_task: bool = option(False, "no masking until the first task_boundary() (statistics still recorded)")
    control: str = option("magnitude", "'magnitude' (MIGU) or 'random' (same count, seeded random units: ablation)")
    seed: int = option(0, "seed of the random control")

    def validate(self) -> None:
        ok = isinstance(self.keep_ratio, (int, float)) and not isinstance(self.keep_ratio, bool)
        self.require(ok and 0.0 < float(self.keep_ratio) <= 1.0, "keep_ratio", "must be a number in (0, 1]")
        self.require(self.stat in STATS, "stat", f"must be one of {STATS}")
        self.require(self.select in SELECTS, "select", f"must be one of {SELECTS}")
        self.require(self.control in CONTROLS, "control", f"must be one of {CONTROLS}")
        for name in ("freeze_masked_rows", "mask_bias", "skip_first_task", "moe"):
            self.require(isinstance(getattr(self, name), bool), name, "must be a bool")
        self.require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an int")
        t = self.targets
        ok_t = t is None or isinstance(t, str) or (isinstance(t, (list, tuple)) and all(isinstance(s, str) for s in t))
        self.require(ok_t or callable(t) or hasattr(t, "matches"), "targets", "must be None, a Selector spec or list")
