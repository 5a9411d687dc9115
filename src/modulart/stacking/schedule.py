"""The G_stack growth guideline (Du et al. 2024): growth factor g = 4 and growth timing d.

``log10(d) = 0.88·log10(N) + 163.27 / log10(6·N·D) − 5.74`` with ``N`` the target model's
parameters, ``D`` its training tokens and ``d`` the tokens the small model is trained before
growth. The fit covers targets up to 3B parameters; beyond that it extrapolates (a warning says so).

Example:
    >>> from modulart.stacking import gstack_schedule
    >>> s = gstack_schedule(n_params=1e9, n_tokens=2e11, tokens_per_step=2**20)
    >>> s.growth_factor, round(s.growth_tokens / 1e9, 2), s.small_steps
    (4, 8.42, 8035)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

from modulart.core.errors import ConfigError
from modulart.core.types import JSONValue

__all__ = ["FITTED_MAX_PARAMS", "GStackSchedule", "LRRecipe", "growth_tokens", "gstack_schedule"]

FITTED_MAX_PARAMS = 3e9


@dataclass(frozen=True)
class LRRecipe:
    """A learning-rate schedule: linear warmup to ``peak``, cosine decay to ``final``."""

    warmup_steps: int
    peak: float
    final: float
    decay: str = "cosine"
    optimizer_state: str = "reset"

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate at ``step`` of ``total_steps``.

        Example:
            >>> r = LRRecipe(10, 1e-3, 1e-4)
            >>> r.lr_at(4, 100), r.lr_at(100, 100)
            (0.0005, 0.0001)
        """
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        return self.final + 0.5 * (self.peak - self.final) * (1 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class GStackSchedule:
    """When and how to grow.

    Attributes:
        growth_factor: g (the paper found about 4 best; no fitted law).
        growth_tokens: d, tokens to train the small model before growing.
        small_steps: d in optimizer steps for ``tokens_per_step`` (None when not given).
        target_params / target_tokens: N and D.
        compute_flops: C = 6·N·D.
        extrapolated: N is beyond the fitted range (> 3B).
        small_lr: the small model's schedule (1e-3 -> 1e-4).
        grown_lr: after growth: fresh AdamW, warmup 3000 steps, peak 3e-4, cosine to 3e-5.
    """

    growth_factor: int
    growth_tokens: float
    small_steps: int | None
    target_params: float
    target_tokens: float
    compute_flops: float
    extrapolated: bool
    small_lr: LRRecipe
    grown_lr: LRRecipe

    def to_dict(self) -> dict[str, JSONValue]:
        return asdict(self)


def growth_tokens(n_params: float, n_tokens: float) -> float:
    """d = 10 ** (0.88·log10(N) + 163.27 / log10(6·N·D) − 5.74).

    Example:
        >>> round(growth_tokens(7e9, 2e12) / 1e9, 2)
        11.11
    """
    for name, v in (("n_params", n_params), ("n_tokens", n_tokens)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} = {v!r}: must be a positive number")
    c = 6.0 * n_params * n_tokens
    if c <= 10:
        raise ConfigError(f"6·N·D = {c:g}: too small for the fit (log10 must exceed 1)")
    return float(10 ** (0.88 * math.log10(n_params) + 163.27 / math.log10(c) - 5.74))


def gstack_schedule(
    n_params: float, n_tokens: float, tokens_per_step: int | None = None, *, growth_factor: int = 4
) -> GStackSchedule:
    """The G_stack recipe for a target of ``n_params`` parameters trained on ``n_tokens`` tokens.

    Args:
        n_params: N, the target (grown) model's parameter count.
        n_tokens: D, the target's total training tokens.
        tokens_per_step: tokens per optimizer step of the small model (for ``small_steps``).
        growth_factor: g (default 4, the paper's choice).

    Warns:
        UserWarning: N > 3B, beyond the range the formula was fitted on.
    """
    d = growth_tokens(n_params, n_tokens)
    if tokens_per_step is not None and not (isinstance(tokens_per_step, int) and tokens_per_step > 0):
        raise ConfigError(f"tokens_per_step = {tokens_per_step!r}: must be a positive int")
    if not (isinstance(growth_factor, int) and growth_factor >= 1):
        raise ConfigError(f"growth_factor = {growth_factor!r}: must be an int >= 1")
    extrapolated = n_params > FITTED_MAX_PARAMS
    if extrapolated:
        warnings.warn(
            f"gstack_schedule: N = {n_params:.3g} is beyond the fitted range (<= 3B parameters); "
            "the growth timing is extrapolated",
            UserWarning,
            stacklevel=2,
        )
    if d >= n_tokens:
        warnings.warn(f"growth timing d = {d:.3g} tokens is not below the budget D = {n_tokens:.3g}", stacklevel=2)
    return GStackSchedule(
        growth_factor=growth_factor,
        growth_tokens=d,
        small_steps=math.ceil(d / tokens_per_step) if tokens_per_step else None,
        target_params=float(n_params),
        target_tokens=float(n_tokens),
        compute_flops=6.0 * n_params * n_tokens,
        extrapolated=extrapolated,
        small_lr=LRRecipe(warmup_steps=0, peak=1e-3, final=1e-4),
        grown_lr=LRRecipe(warmup_steps=3000, peak=3e-4, final=3e-5),
    )
