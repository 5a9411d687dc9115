"""Configuration of MIGU, magnitude-gated gradient updates (Du et al., arXiv 2406.17245).

:meth:`MIGUConfig.reference` is the reference code's behaviour (github.com/wenyudu/MIGU, full
fine-tuning): every ``nn.Linear`` (LM head included), ``Σ|h|`` over the positions of every forward of
the step, ``keep = a >= quantile(a, 0.7)`` (its scripts' ``ini_threshold``), gradients of the weights
only zeroed (biases and optimizer state untouched), no masking in the first task.

Example:
    >>> from modulart.migu import MIGUConfig
    >>> MIGUConfig(keep_ratio=0.25).select
    'quantile'
    >>> ref = MIGUConfig.reference()
    >>> ref.targets, ref.freeze_masked_rows, ref.mask_bias, ref.skip_first_task
    ('type:torch.nn.modules.linear.Linear', False, False, True)
    >>> MIGUConfig(keep_ratio=0.0)
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: MIGUConfig.keep_ratio = 0.0: must be a number in (0, 1]
"""

from __future__ import annotations

import dataclasses
from typing import Any

from modulart.core.operator import OperatorConfig, option

__all__ = ["CONTROLS", "REFERENCE_TARGETS", "SELECTS", "STATS", "MIGUConfig"]

STATS = ("abs_sum", "l1_token_mean")
SELECTS = ("quantile", "topk")
CONTROLS = ("magnitude", "random")
REFERENCE_TARGETS = "type:torch.nn.modules.linear.Linear"
"""Selector spec of the reference's targets: ``isinstance(module, nn.Linear)`` (JSON-safe)."""


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

    @classmethod
    def reference(cls, **overrides: Any) -> MIGUConfig:
        """The reference code's MIGU (wenyudu/MIGU, ``src/accelerate_local.py`` + ``uie_trainer_ft.py``).

        Field by field: ``keep_ratio=0.3`` (its scripts pass ``ini_threshold=0.7`` and keep
        ``a >= torch.quantile(a, 0.7)``), ``stat="abs_sum"`` (``Σ|h|`` over every position of every
        forward of the optimizer step, reset after the step), ``select="quantile"`` (ties kept),
        ``targets`` = every ``nn.Linear`` module, subclasses and the LM head included (HF ``Conv1D``
        is not an ``nn.Linear``: not gated), ``moe=False`` (routers are plain linears there: their
        statistic is their output), ``mask_bias=False`` (only ``weight.grad`` rows are zeroed),
        ``freeze_masked_rows=False`` (gradient masking only: AdamW moments and weight decay still
        move masked rows), ``skip_first_task=True`` (the first task trains without hooks; masking
        starts after the first :meth:`~modulart.migu.handle.MIGUHandle.task_boundary`),
        ``control="magnitude"``. Statistics stay fp32 (the reference sums in the model dtype, the
        same numbers for an fp32 model; ``torch.quantile`` rejects bf16/fp16, so it cannot run in
        half precision at all). Only forwards run with gradients enabled vote (the reference's hooks
        count every forward; all of its training forwards have gradients). Masks are applied at
        ``optimizer.step()``; the reference masks
        inside ``backward`` (before DeepSpeed's clipping): call ``handle.mask_()`` before
        ``clip_grad_norm_`` to match that.

        Args:
            overrides: fields to change on top of the reference values (validated).

        Raises:
            ConfigError: an unknown field or a bad value.

        Example:
            >>> MIGUConfig.reference().keep_ratio, MIGUConfig.reference(skip_first_task=False).skip_first_task
            (0.3, False)
        """
        base = cls(
            keep_ratio=0.3,
            stat="abs_sum",
            select="quantile",
            freeze_masked_rows=False,
            targets=REFERENCE_TARGETS,
            moe=False,
            mask_bias=False,
            skip_first_task=True,
            control="magnitude",
        )
        return base.replace(**overrides) if overrides else base

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
