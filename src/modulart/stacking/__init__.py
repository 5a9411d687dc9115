"""modulart.stacking: model growth — G_stack and the other growth operators (arXiv 2405.15319).

A :class:`LayerPlan` says which source block every grown block copies; it drives in-memory growth
(:func:`grow`), streaming growth of sharded safetensors checkpoints (:func:`grow_checkpoint`) and
optimizer-state growth (:func:`grow_optimizer`). :func:`gstack_schedule` implements the paper's
growth-timing guideline.

Example:
    >>> import torch
    >>> import modulart.stacking as st
    >>> plan = st.LayerPlan.stack(num_layers=6, factor=4)
    >>> plan.grown_layers, plan.describe()
    (24, '0-5,0-5,0-5,0-5 (6 -> 24 layers)')
"""

from modulart.stacking.check import FunctionNotPreservedError, assert_function_preserved, function_difference
from modulart.stacking.checkpoint import MANIFEST_NAME, grow_checkpoint
from modulart.stacking.depth import GrowthConfig, grow
from modulart.stacking.operators import OPERATORS, GrowthOperator, GrowthRamp, get_growth_operator, get_ramp
from modulart.stacking.optim import POLICIES, grow_optimizer
from modulart.stacking.plan import LayerPlan
from modulart.stacking.schedule import GStackSchedule, LRRecipe, growth_tokens, gstack_schedule
from modulart.stacking.width import WidthRamp, grow_width

__all__ = [
    "MANIFEST_NAME",
    "OPERATORS",
    "POLICIES",
    "FunctionNotPreservedError",
    "GStackSchedule",
    "GrowthConfig",
    "GrowthOperator",
    "GrowthRamp",
    "LRRecipe",
    "LayerPlan",
    "WidthRamp",
    "assert_function_preserved",
    "function_difference",
    "get_growth_operator",
    "get_ramp",
    "grow",
    "grow_checkpoint",
    "grow_optimizer",
    "grow_width",
    "growth_tokens",
    "gstack_schedule",
]
