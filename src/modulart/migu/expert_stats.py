"""Per-expert unit statistics, masks and mask history for fused MoE experts.

A fused expert parameter holds ``E`` experts; each expert's projection is its own layer for MIGU.
These classes keep one row per expert, so a step costs a few tensor operations per parameter, not
per expert. Row ``e`` of everything here is what :mod:`modulart.migu.stats` computes for a single
layer (same statistic, same selection, same overlap report), restricted to expert ``e``.

Example:
    >>> import torch
    >>> from modulart.migu.expert_stats import ExpertStats, select_rows
    >>> acc = ExpertStats(2, 4, "abs_sum")
    >>> acc.record(torch.tensor([1]), torch.tensor([[1.0, -5.0, 0.5, 2.0]]))
    >>> acc.seen.tolist(), select_rows(acc.score(), 0.5, "topk")[1].tolist()
    ([False, True], [False, True, False, True])
"""

from __future__ import annotations

import torch

from modulart.migu.stats import LayerStats, jaccard, keep_count, select_mask

__all__ = ["ExpertHistory", "ExpertStats", "random_rows", "select_rows"]


class ExpertStats:
    """Accumulates ``[experts, units]`` magnitudes over the forwards of one optimizer step.

    Args:
        experts: number of experts ``E``.
        units: output units of one expert's projection ``U``.
        stat: ``"abs_sum"`` or ``"l1_token_mean"`` (see :func:`modulart.migu.stats.magnitude`).
    """

    def __init__(self, experts: int, units: int, stat: str) -> None:
        self.experts, self.units, self.stat = experts, units, stat
        self.total: torch.Tensor | None = None  # [E, U] fp32
        self.tokens = torch.zeros(experts)  # [E] fp32: positions that voted
        self.seen = torch.zeros(experts, dtype=torch.bool)  # [E]: expert ran on >= 1 token

    @torch.no_grad()
    def record(self, experts: torch.Tensor, h: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add outputs ``h [rows, units]``, row ``r`` produced by expert ``experts[r]`` (``[rows]`` long).

        ``token_mask [rows]``: nonzero rows vote; an expert that ran counts as seen even if none of
        its rows voted (as a layer whose positions were all padding).
        """
        a, ids = h.detach(), experts.to(h.device)
        if self.total is None:
            self.total = torch.zeros(self.experts, self.units, device=a.device)
            self.tokens, self.seen = self.tokens.to(a.device), self.seen.to(a.device)
        self.seen[ids] = True
        if token_mask is not None:
            votes = token_mask.detach().to(a.device).ne(0)
            a, ids = a[votes], ids[votes]
        if self.stat == "l1_token_mean":
            f = a.float().abs()
            v = f / f.sum(-1, keepdim=True).clamp_min(1e-12)
        else:
            v = a.abs().float()
        self.total.index_add_(0, ids, v)
        self.tokens.index_add_(0, ids, torch.ones(ids.shape, device=a.device))

    def score(self) -> torch.Tensor:
        """``[E, U]`` fp32 score (rows of unseen experts are zero)."""
        if self.total is None:
            return torch.zeros(self.experts, self.units)
        if self.stat == "l1_token_mean":
            return self.total / self.tokens.clamp_min(1.0).unsqueeze(1)
        return self.total

    def reset(self) -> None:
        self.total = None
        self.tokens = torch.zeros(self.experts, device=self.tokens.device)
        self.seen = torch.zeros(self.experts, dtype=torch.bool, device=self.seen.device)

    def to_flat(self, device: torch.device) -> torch.Tensor:
        """``[E * U + 2 E]`` fp32: totals, token counts, seen flags (what DDP ranks average)."""
        total = self.total if self.total is not None else torch.zeros(self.experts, self.units)
        return torch.cat([total.to(device).flatten(), self.tokens.to(device), self.seen.to(device).float()])

    def load_flat(self, flat: torch.Tensor, device: torch.device) -> None:
        """Inverse of :meth:`to_flat` (averaged): an expert seen on any rank keeps its averaged sums."""
        n = self.experts * self.units
        seen = flat[n + self.experts :].to(device) > 0
        if not bool(seen.any()):
            self.reset()
            return
        self.total = flat[:n].to(device).reshape(self.experts, self.units).clone()
        self.tokens, self.seen = flat[n : n + self.experts].to(device).clone(), seen


def select_rows(score: torch.Tensor, keep_ratio: float, select: str) -> torch.Tensor:
    """Bool ``[E, U]``: :func:`~modulart.migu.stats.select_mask` applied to every row of ``score``.

    Example:
        >>> select_rows(torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]]), 0.5, "quantile").int().tolist()
        [[1, 0, 1, 1], [0, 0, 1, 1]]
    """
    s = score.detach().float()
    if select == "topk":
        keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        return keep.scatter_(1, torch.topk(s, keep_count(keep_ratio, s.shape[1]), dim=1).indices, True)
    return s >= torch.quantile(s, 1.0 - keep_ratio, dim=1, keepdim=True)


def random_rows(
    experts: int, units: int, keep_ratio: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The random control per expert: :func:`keep_count` units per row, drawn with ``generator`` (CPU)."""
    order = torch.rand(experts, units, generator=generator).argsort(dim=1)
    keep = torch.zeros(experts, units, dtype=torch.bool)
    return keep.scatter_(1, order[:, : keep_count(keep_ratio, units)], True).to(device)


class ExpertHistory:
    """Per-expert record of the last masks and per-task keep frequencies (one row per expert)."""

    def __init__(self, experts: int, units: int, keep_ratio: float) -> None:
        self.experts, self.units, self.keep_ratio = experts, units, keep_ratio
        self.last = torch.zeros(experts, units, dtype=torch.bool)
        self.prev = torch.zeros(experts, units, dtype=torch.bool)
        self.has_last = torch.zeros(experts, dtype=torch.bool)
        self.has_prev = torch.zeros(experts, dtype=torch.bool)
        self.seen = torch.zeros(experts, dtype=torch.bool)  # in the last step
        self.steps = torch.zeros(experts, dtype=torch.long)
        self.unseen_steps = torch.zeros(experts, dtype=torch.long)
        self.freq = torch.zeros(experts, units)
        self.task_steps = torch.zeros(experts, dtype=torch.long)
        self.tasks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keep frequency [E, U], had steps [E])

    def push(self, keep: torch.Tensor, seen: torch.Tensor) -> None:
        """Record one step: ``keep [E, U]`` for the experts with ``seen [E]``; the others were not run."""
        keep, seen = keep.detach().cpu(), seen.detach().cpu()
        rows = seen.unsqueeze(1)
        self.prev = torch.where(rows, self.last, self.prev)
        self.has_prev = torch.where(seen, self.has_last, self.has_prev)
        self.last = torch.where(rows, keep, self.last)
        self.has_last |= seen
        self.seen = seen.clone()
        self.steps += seen.long()
        self.unseen_steps += (~seen).long()
        self.freq += (keep & rows).float()
        self.task_steps += seen.long()

    def end_task(self) -> None:
        """Close the running task (experts without a step in it are left out of its overlap report)."""
        ran = self.task_steps > 0
        if bool(ran.any()):
            self.tasks.append((self.freq / self.task_steps.clamp_min(1).unsqueeze(1), ran))
        self.freq = torch.zeros(self.experts, self.units)
        self.task_steps = torch.zeros(self.experts, dtype=torch.long)

    def mask(self, expert: int) -> torch.Tensor | None:
        """Expert ``expert``'s last bool ``[U]`` mask, or None if it never ran."""
        return self.last[expert].clone() if bool(self.has_last[expert]) else None

    def report(self, expert: int) -> LayerStats:
        e = expert
        last = self.mask(e)
        current = select_mask(self.freq[e], self.keep_ratio, "topk") if int(self.task_steps[e]) else None
        return LayerStats(
            kept_fraction=None if last is None else int(last.sum()) / self.units,
            seen=bool(self.seen[e]),
            jaccard_prev=jaccard(self.last[e], self.prev[e]) if bool(self.has_prev[e]) else None,
            task_jaccard=[]
            if current is None
            else [
                jaccard(current, select_mask(f[e], self.keep_ratio, "topk")) for f, ran in self.tasks if bool(ran[e])
            ],
            steps=int(self.steps[e]),
            unseen_steps=int(self.unseen_steps[e]),
        )
