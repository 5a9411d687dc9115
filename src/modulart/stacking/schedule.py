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

__all__ = [
    "DECAYS",
    "FITTED_MAX_PARAMS",
    "INDEXINGS",
    "OPTIMIZER_STATES",
    "GStackSchedule",
    "LRRecipe",
    "growth_tokens",
    "gstack_schedule",
]

FITTED_MAX_PARAMS = 3e9

INDEXINGS = ("step", "iteration")
"""How :meth:`LRRecipe.lr_at` maps an optimizer step onto the curve (see :class:`LRRecipe`)."""
DECAYS = ("cosine",)
"""Decay shapes :meth:`LRRecipe.lr_at` implements."""
OPTIMIZER_STATES = ("reset", "copy", "zero_new", "scaled")
"""What happens to the optimizer state at growth: the policies of :func:`~modulart.stacking.grow_optimizer`."""


@dataclass(frozen=True)
class LRRecipe:
    """A learning-rate schedule: linear warmup to ``peak``, cosine decay to ``final``.

    ``indexing`` says how an optimizer step maps onto the curve:

    - ``"step"`` (modulart): warmup ``peak·(step + 1)/warmup_steps`` (the first step already moves,
      the last warmup step is at ``peak``), then ``final + ½(peak − final)(1 + cos(π·f))`` with
      ``f = (step − warmup_steps)/(total_steps − warmup_steps)`` clipped to 1.
    - ``"iteration"`` (the G_stack reference code, prts ``pretrain/run_pretrain.py``): the rate is set
      per micro-batch iteration ``it`` and the optimizer step ``s`` uses the one of its last micro-batch,
      ``it = (s + 1)·grad_accum − 1``; warmup ``peak·it/(warmup_steps·grad_accum)`` (the very first
      step of a run with ``grad_accum = 1`` has rate 0), then the same cosine over iterations, with
      ``W = warmup_steps·grad_accum`` and ``T = total_steps·grad_accum``:
      ``f = (it − W)/(T − W)``, and ``final`` once ``it > T``.

    Raises:
        ConfigError: a negative warmup, a peak or final that is not a finite number >= 0, a ``decay``
            other than ``"cosine"``, an ``optimizer_state`` that is no ``grow_optimizer`` policy, an
            unknown ``indexing`` or a ``grad_accum`` that is not an int >= 1.

    Example:
        >>> LRRecipe(3000, 1e-3, 1e-4, indexing="iteration", grad_accum=4).lr_at(0, 300_000)  # it = 3
        2.5e-07
        >>> LRRecipe(3000, 1e-3, 1e-4, grad_accum=0)
        Traceback (most recent call last):
        ...
        modulart.core.errors.ConfigError: LRRecipe.grad_accum = 0: must be an int >= 1
    """

    warmup_steps: int
    peak: float
    final: float
    decay: str = "cosine"
    optimizer_state: str = "reset"
    indexing: str = "step"
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if not (
            isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool) and self.warmup_steps >= 0
        ):
            raise ConfigError(f"LRRecipe.warmup_steps = {self.warmup_steps!r}: must be an int >= 0")
        for name in ("peak", "final"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"LRRecipe.{name} = {v!r}: must be a finite number >= 0")
        if self.decay not in DECAYS:
            raise ConfigError(f"LRRecipe.decay = {self.decay!r}: must be one of {DECAYS}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ConfigError(
                f"LRRecipe.optimizer_state = {self.optimizer_state!r}: must be one of {OPTIMIZER_STATES} "
                "(the grow_optimizer policies)"
            )
        if self.indexing not in INDEXINGS:
            raise ConfigError(f"LRRecipe.indexing = {self.indexing!r}: must be one of {INDEXINGS}")
        g = self.grad_accum
        if not (isinstance(g, int) and not isinstance(g, bool) and g >= 1):
            raise ConfigError(f"LRRecipe.grad_accum = {g!r}: must be an int >= 1")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) of ``total_steps`` (the cosine horizon).

        Example:
            >>> r = LRRecipe(10, 1e-3, 1e-4)
            >>> r.lr_at(4, 100), r.lr_at(100, 100)
            (0.0005, 0.0001)
            >>> ref = LRRecipe(10, 1e-3, 1e-4, indexing="iteration")
            >>> ref.lr_at(0, 100), ref.lr_at(5, 100)
            (0.0, 0.0005)
        """
        if self.indexing == "iteration":
            g = self.grad_accum
            it, warm, horizon = (step + 1) * g - 1, self.warmup_steps * g, total_steps * g
            if it < warm:
                return self.peak * it / warm
            if it > horizon:
                return self.final
            ratio = (it - warm) / max(1, horizon - warm)
            return self.final + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.peak - self.final)
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
        small_lr: the small model's schedule: warmup 3000 steps, peak 1e-3, cosine to 1e-4.
        grown_lr: after growth: fresh AdamW, warmup 3000 steps, peak 3e-4, cosine to 3e-5.

    In the reference code both cosines run over the whole run's ``max_step`` (300,000 steps in its
    scripts), the small model's too: it is grown long before its schedule decays.
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
    n_params: float,
    n_tokens: float,
    tokens_per_step: int | None = None,
    *,
    growth_factor: int = 4,
    reference: bool = False,
) -> GStackSchedule:
    """The G_stack recipe for a target of ``n_params`` parameters trained on ``n_tokens`` tokens.

    Args:
        n_params: N, the target (grown) model's parameter count.
        n_tokens: D, the target's total training tokens.
        tokens_per_step: tokens per optimizer step of the small model (for ``small_steps``).
        growth_factor: g (default 4, the paper's choice).
        reference: the LR recipes index steps as the reference code does (``indexing="iteration"``,
            with the gradient accumulation of its scripts: 1 for the small model, ``base_model.sh``,
            4 for the grown one, ``g_stack.sh``); peaks, floors and warmups are the same either way.

    Example:
        >>> s = gstack_schedule(4e8, 1e11, reference=True)
        >>> s.small_lr.warmup_steps, s.small_lr.indexing, s.grown_lr.grad_accum
        (3000, 'iteration', 4)

    Warns:
        UserWarning: N > 3B, beyond the range the formula was fitted on.
    """
    d = growth_tokens(n_params, n_tokens)
    if tokens_per_step is not None and not (isinstance(tokens_per_step, int) and tokens_per_step > 0):
        raise ConfigError(f"tokens_per_step = {tokens_per_step!r}: must be a positive int")
    if not (isinstance(growth_factor, int) and growth_factor >= 1):
        raise ConfigError(f"growth_factor = {growth_factor!r}: must be an int >= 1")
    if not isinstance(reference, bool):
        raise ConfigError(f"reference = {reference!r}: must be a bool")
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
    indexing = "iteration" if reference else "step"
    return GStackSchedule(
        growth_factor=growth_factor,
        growth_tokens=d,
        small_steps=math.ceil(d / tokens_per_step) if tokens_per_step else None,
        target_params=float(n_params),
        target_tokens=float(n_tokens),
        compute_flops=6.0 * n_params * n_tokens,
        extrapolated=extrapolated,
        small_lr=LRRecipe(3000, 1e-3, 1e-4, indexing=indexing, grad_accum=1),
        grown_lr=LRRecipe(3000, 3e-4, 3e-5, indexing=indexing, grad_accum=4 if reference else 1),
    )
