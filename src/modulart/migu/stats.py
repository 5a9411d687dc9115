"""Per-unit magnitude statistics, mask selection and mask-overlap bookkeeping for MIGU.

Everything here is fp32, whatever the model's dtype (``torch.quantile`` rejects bf16).

Example:
    >>> import torch
    >>> from modulart.migu.stats import UnitStats, select_mask
    >>> acc = UnitStats(4, "abs_sum")
    >>> acc.record(torch.tensor([[1.0, -5.0, 0.5, 2.0]]))
    >>> select_mask(acc.score(), 0.5, "topk").tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass, field

import torch

from modulart.core.errors import InvalidStateError

__all__ = [
    "LayerStats",
    "MaskHistory",
    "UnitStats",
    "jaccard",
    "keep_count",
    "random_mask",
    "select_mask",
    "select_masks",
]

_EPS = 1e-12
_QUANTILE_MAX = 2**24  # elements torch.quantile accepts in one call


def keep_count(keep_ratio: float, units: int) -> int:
    """Units kept by ``topk`` / the random control: ``ceil(keep_ratio * units)``, at least 1.

    Example:
        >>> keep_count(0.3, 10), keep_count(0.3, 4), keep_count(0.01, 5)
        (3, 2, 1)
    """
    return max(1, min(units, math.ceil(round(keep_ratio * units, 6))))


def magnitude(a: torch.Tensor, stat: str) -> torch.Tensor:
    """Per-unit statistic of the outputs ``a [tokens, units]`` of one forward, ``[units]`` fp32.

    ``abs_sum``: ``sum_t |a[t, j]|``; ``l1_token_mean`` (before the division by the token count):
    ``sum_t |a[t, j]| / sum_i |a[t, i]|``.

    Example:
        >>> magnitude(torch.tensor([[1.0, -3.0], [0.0, 2.0]]), "abs_sum").tolist()
        [1.0, 5.0]
        >>> magnitude(torch.tensor([[1.0, -3.0], [0.0, 2.0]]), "l1_token_mean").tolist()
        [0.25, 1.75]
    """
    if stat == "l1_token_mean":
        f = a.float().abs()
        return (f / f.sum(-1, keepdim=True).clamp_min(_EPS)).sum(0)
    return a.abs().sum(0, dtype=torch.float32)  # |a| keeps the input precision; the sums accumulate in fp32


class UnitStats:
    """Accumulates a per-output-unit magnitude over the forwards of one optimizer step.

    Args:
        units: output units of the layer (``d_out``).
        stat: ``"abs_sum"`` (sum of ``|h|`` over positions) or ``"l1_token_mean"`` (per position,
            ``|h|`` divided by its sum over units; then averaged over positions).
    """

    def __init__(self, units: int, stat: str) -> None:
        self.units = units
        self.stat = stat
        self.total: torch.Tensor | None = None  # [units] fp32
        # positions that voted, summed as fp32 (exactly what a 0-dim fp32 tensor would hold): a host
        # number while the count is known on the host (no tensor per forward, no device copy), a
        # 0-dim tensor once loaded from an all-reduce
        self._tokens: float | torch.Tensor | None = None
        self._warned = False

    @torch.no_grad()
    def record(self, h: torch.Tensor, token_mask: torch.Tensor | None = None, *, path: str = "") -> None:
        """Add the output ``h [..., units]`` of one forward; ``token_mask [...]`` (nonzero = counts).

        Costs one elementwise ``|h|`` and one column sum of it (a fused single-pass ``|h|`` reduction,
        ``torch.linalg.vector_norm(ord=1)``, sums in another order: other bits, and slower on CPU).
        """
        a = h.detach().reshape(-1, self.units)
        if token_mask is not None and tuple(token_mask.shape) == tuple(h.shape[:-1]):
            keep = token_mask.detach().to(a.device).reshape(-1).ne(0)
            a = a[keep]  # only the positions that vote
        elif token_mask is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"MIGU: token mask of shape {tuple(token_mask.shape)} does not fit the output "
                f"{tuple(h.shape)} of {path!r}; every position of that layer votes",
                UserWarning,
                stacklevel=2,
            )
        s = magnitude(a, self.stat)
        n = _fp32(float(a.shape[0]))
        if self.total is None or self._tokens is None:
            self.total, self._tokens = s, n
        else:
            self.total += s
            if isinstance(self._tokens, torch.Tensor):
                self._tokens += n
            else:
                self._tokens = _fp32(self._tokens + n)

    @property
    def tokens(self) -> torch.Tensor | None:
        """``[]`` fp32 on the statistic's device: the positions that voted this step (None: none ran)."""
        if self._tokens is None or isinstance(self._tokens, torch.Tensor):
            return self._tokens
        device = self.total.device if self.total is not None else None
        return torch.full((), self._tokens, dtype=torch.float32, device=device)

    @property
    def seen(self) -> bool:
        return self.total is not None

    def score(self) -> torch.Tensor:
        """``[units]`` fp32 score: the sum (``abs_sum``) or the per-token mean (``l1_token_mean``)."""
        if self.total is None or self._tokens is None:
            raise InvalidStateError("no forward was recorded")
        if self.stat == "l1_token_mean":
            tokens = self.tokens
            assert tokens is not None
            return self.total / tokens.clamp_min(1.0)
        return self.total

    def reset(self) -> None:
        self.total = None
        self._tokens = None

    def to_flat(self, device: torch.device) -> torch.Tensor:
        """``[units + 2]`` fp32: total, token count, seen flag (what DDP ranks average)."""
        total = self.total if self.total is not None else torch.zeros(self.units)
        tokens = self.tokens
        tokens = tokens if tokens is not None else torch.zeros(())
        seen = torch.ones(1) if self.seen else torch.zeros(1)
        return torch.cat([total.to(device), tokens.to(device).reshape(1), seen.to(device)])

    def load_flat(self, flat: torch.Tensor, device: torch.device) -> None:
        """Inverse of :meth:`to_flat` (averaged): seen on any rank keeps the averaged sums."""
        if float(flat[-1]) > 0:
            self.total, self._tokens = flat[: self.units].clone().to(device), flat[self.units].clone().to(device)
        else:
            self.reset()


def _fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (token counts are integers: their double sum is exact, so
    rounding it is the fp32 sum a tensor would hold)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def select_mask(score: torch.Tensor, keep_ratio: float, select: str) -> torch.Tensor:
    """Bool ``[units]`` mask of the units to update.

    ``quantile``: ``score >= torch.quantile(score, 1 - keep_ratio)`` (linear interpolation, so
    ``1 + floor(keep_ratio * (units - 1))`` distinct units, plus ties at the threshold).
    ``topk``: exactly :func:`keep_count` units (ties broken by ``torch.topk``).

    Example:
        >>> select_mask(torch.tensor([3.0, 1.0, 2.0, 2.0]), 0.5, "quantile").tolist()
        [True, False, True, True]
    """
    s = score.detach().float()
    if select == "topk":
        keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        keep[torch.topk(s, keep_count(keep_ratio, s.numel())).indices] = True
        return keep
    return s >= torch.quantile(s, 1.0 - keep_ratio)


def select_masks(scores: list[torch.Tensor], keep_ratio: float, select: str) -> list[torch.Tensor]:
    """:func:`select_mask` of every score ``[units_i]``, in order; bool ``[units_i]`` each.

    ``quantile``: the scores of equal length on one device are stacked ``[L, units]`` and share one
    ``torch.quantile(..., dim=-1)`` (a per-row sort, gather and lerp: each row's threshold has the
    bits of its own 1-D quantile, so the masks are :func:`select_mask`'s). ``topk``: one
    :func:`select_mask` per score (``torch.topk`` breaks ties by its own rules).

    Example:
        >>> [m.tolist() for m in select_masks([torch.tensor([3.0, 1.0]), torch.tensor([0.0, 2.0])], 0.5, "quantile")]
        [[True, False], [False, True]]
    """
    if select != "quantile":
        return [select_mask(s, keep_ratio, select) for s in scores]
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for i, s in enumerate(scores):
        groups.setdefault((s.numel(), s.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(scores)
    for (units, _), same in groups.items():
        rows = max(1, _QUANTILE_MAX // units)  # torch.quantile refuses inputs above 2**24 elements
        for start in range(0, len(same), rows):
            idx = same[start : start + rows]
            stacked = torch.stack([scores[i].detach().float().reshape(-1) for i in idx])
            keep = stacked >= torch.quantile(stacked, 1.0 - keep_ratio, dim=-1, keepdim=True)
            for i, row in zip(idx, keep.unbind(0), strict=True):
                out[i] = row.clone().view(scores[i].shape)  # its own storage, as select_mask's
    return [m for m in out if m is not None]


def random_mask(units: int, keep_ratio: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The random control: :func:`keep_count` units drawn uniformly with ``generator`` (CPU)."""
    keep = torch.zeros(units, dtype=torch.bool)
    keep[torch.randperm(units, generator=generator)[: keep_count(keep_ratio, units)]] = True
    return keep.to(device)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a & b| / |a | b|`` of two bool masks (1.0 when both are empty).

    Example:
        >>> jaccard(torch.tensor([True, True, False]), torch.tensor([True, False, False]))
        0.5
    """
    b = b.to(a.device)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


@dataclass
class LayerStats:
    """What :meth:`MIGUHandle.stats` reports for one layer.

    Attributes:
        kept_fraction: fraction of units updated in the last step (None: never seen).
        seen: whether the layer ran a forward in the last step (unseen layers are not masked).
        jaccard_prev: Jaccard of the last step's mask with the step before (None: fewer than 2 masks).
        task_jaccard: Jaccard of the current task's mask so far with each finished task's mask
            (a task's mask: its :func:`keep_count` most frequently kept units).
        steps: steps in which the layer was seen; unseen_steps: steps in which it was not.
    """

    kept_fraction: float | None
    seen: bool
    jaccard_prev: float | None
    task_jaccard: list[float] = field(default_factory=list)
    steps: int = 0
    unseen_steps: int = 0


class MaskHistory:
    """Per-layer record of the last masks and per-task keep frequencies."""

    def __init__(self, units: int, keep_ratio: float) -> None:
        self.units = units
        self.keep_ratio = keep_ratio
        self.last: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.seen = False
        self.steps = 0
        self.unseen_steps = 0
        self.freq = torch.zeros(units)  # times each unit was kept in the running task
        self.task_steps = 0
        self.tasks: list[torch.Tensor] = []  # finished tasks: fraction of steps each unit was kept

    def push(self, keep: torch.Tensor | None) -> None:
        """Record one step's mask (None: the layer was not seen)."""
        if keep is None:
            self.seen = False
            self.unseen_steps += 1
            return
        keep = keep.detach().cpu()
        self.prev, self.last, self.seen = self.last, keep, True
        self.steps += 1
        self.freq += keep.float()
        self.task_steps += 1

    def end_task(self) -> None:
        """Close the running task (no-op for the overlap report if it had no step)."""
        if self.task_steps:
            self.tasks.append(self.freq / self.task_steps)
        self.freq = torch.zeros(self.units)
        self.task_steps = 0

    def task_mask(self, freq: torch.Tensor) -> torch.Tensor:
        return select_mask(freq, self.keep_ratio, "topk")

    def report(self) -> LayerStats:
        current = self.task_mask(self.freq) if self.task_steps else None
        return LayerStats(
            kept_fraction=None if self.last is None else int(self.last.sum()) / self.units,
            seen=self.seen,
            jaccard_prev=None if self.prev is None or self.last is None else jaccard(self.last, self.prev),
            task_jaccard=[] if current is None else [jaccard(current, self.task_mask(t)) for t in self.tasks],
            steps=self.steps,
            unseen_steps=self.unseen_steps,
        )
