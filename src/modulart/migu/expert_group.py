"""The MIGU state of one fused experts module: statistics, per-expert masks, history, reports.

One :class:`ExpertGroup` per :class:`~modulart.migu.experts.FusedExperts`. Its forward hook adds,
for every routed expert ``e``, the magnitudes of ``e``'s gate / up / down outputs over the tokens
routed to ``e`` (``[E, U]`` accumulators per projection); at the step boundary :meth:`decide`
selects the top units of every expert that ran and returns one ``keep [E, units]`` matrix per
stored parameter (experts that did not run keep everything: like a linear layer without a
forward, they are not masked). Report keys are ``"<experts path>.<e>.<gate|up|down>"``.

Example:
    >>> import torch
    >>> from modulart.migu.experts import FusedExperts, FusedLayout
    >>> class Experts(torch.nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 8, 3))  # [E, 2I, d]
    ...         self.down_proj = torch.nn.Parameter(torch.randn(2, 3, 4))  # [E, d, I]
    ...         self.act_fn = torch.nn.SiLU()
    >>> group = ExpertGroup(FusedExperts("experts", Experts(), FusedLayout(False, False)), "abs_sum", 0.5)
    >>> group.record((torch.randn(5, 3), torch.tensor([[0], [0], [0], [0], [0]])), {}, None)
    >>> [(tuple(keep.shape), int(keep[0].sum()), bool(keep[1].all())) for _, keep, _, _ in group.decide("topk")]
    [((2, 8), 4, True), ((2, 3), 2, True)]
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from modulart.migu.expert_stats import ExpertHistory, ExpertStats, random_rows, select_rows
from modulart.migu.experts import ExpertPart, FusedExperts
from modulart.migu.stats import LayerStats

__all__ = ["ExpertGroup"]


class _PartState:
    def __init__(self, part: ExpertPart, experts: int, stat: str, keep_ratio: float) -> None:
        self.part = part
        self.acc = ExpertStats(experts, part.units, stat)
        self.history = ExpertHistory(experts, part.units, keep_ratio)


class ExpertGroup:
    """Statistics and masks of the gate / up / down projections of every expert of one module.

    Args:
        experts: the fused experts module.
        stat: ``MIGUConfig.stat``; keep_ratio: ``MIGUConfig.keep_ratio``.
    """

    def __init__(self, experts: FusedExperts, stat: str, keep_ratio: float) -> None:
        self.experts = experts
        self.keep_ratio = keep_ratio
        self.parts = [_PartState(p, experts.num_experts, stat, keep_ratio) for p in experts.parts]
        self._warned = False

    @property
    def path(self) -> str:
        return self.experts.path

    def key(self, expert: int, part: str) -> str:
        return f"{self.path}.{expert}.{part}"

    # --- recording ----------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], token_mask: torch.Tensor | None) -> None:
        """Add one forward of the experts module (its call ``args`` / ``kwargs``); ``token_mask [batch, seq]``."""
        fe = self.experts
        ids: list[torch.Tensor] = []
        rows_all: list[torch.Tensor] = []
        outs: list[list[torch.Tensor]] = [[] for _ in self.parts]
        for e, rows, x in fe.routed(args, kwargs):
            gate_up, down = fe.project(e, x)
            ids.append(torch.full((rows.numel(),), e, dtype=torch.long, device=rows.device))
            rows_all.append(rows)
            for out, s in zip(outs, self.parts, strict=True):
                out.append(down if s.part.name == "down" else gate_up[:, s.part.units_slice])
        if not ids:
            return
        flat = None if token_mask is None else self._flat_mask(token_mask, args, kwargs)
        experts = torch.cat(ids)
        tm = None if flat is None else flat.to(experts.device)[torch.cat(rows_all)]
        for out, s in zip(outs, self.parts, strict=True):
            s.acc.record(experts, torch.cat(out), tm)

    def _flat_mask(
        self, token_mask: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor | None:
        x = args[0] if args else kwargs["hidden_states"]
        tokens = int(x.shape[0]) // (self.experts.num_experts if self.experts.layout.dense else 1)
        if token_mask.numel() == tokens:
            return token_mask.reshape(-1)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"MIGU: token mask of shape {tuple(token_mask.shape)} does not fit the {tokens} tokens of "
                f"{self.path!r}; every position of its experts votes",
                UserWarning,
                stacklevel=4,
            )
        return None

    # --- the step boundary --------------------------------------------------------------------
    def decide(
        self, select: str, *, random: bool = False, generator: torch.Generator | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]]:
        """Select this step's units and record them; ``[(param, keep [E, units], axis, bias)]`` per parameter.

        A parameter none of whose experts ran is left out (not masked).
        """
        merged: dict[int, tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]] = {}
        for s in self.parts:
            seen = s.acc.seen.cpu()
            if not bool(seen.any()):
                s.history.push(torch.zeros(s.acc.experts, s.part.units, dtype=torch.bool), seen)
                continue
            if random:
                assert generator is not None
                keep = random_rows(s.acc.experts, s.part.units, self.keep_ratio, generator, torch.device("cpu"))
            else:
                keep = select_rows(s.acc.score(), self.keep_ratio, select).cpu()
            s.history.push(keep, seen)
            p = s.part.param
            if id(p) not in merged:
                full = torch.ones(s.acc.experts, int(p.shape[s.part.axis]), dtype=torch.bool)
                merged[id(p)] = (p, full, s.part.axis, s.part.bias)
            merged[id(p)][1][:, s.part.units_slice] = keep | ~seen.unsqueeze(1)
        return list(merged.values())

    def accumulators(self) -> list[ExpertStats]:
        return [s.acc for s in self.parts]

    def reset(self) -> None:
        for s in self.parts:
            s.acc.reset()

    def end_task(self) -> None:
        for s in self.parts:
            s.history.end_task()

    # --- reports ------------------------------------------------------------------------------
    def stats(self) -> dict[str, LayerStats]:
        """Per expert and projection (``"<path>.<e>.<part>"``): what :meth:`MIGUHandle.stats` reports."""
        return {
            self.key(e, s.part.name): s.history.report(e) for e in range(self.experts.num_experts) for s in self.parts
        }

    def masks(self) -> dict[str, torch.Tensor]:
        """The last bool ``[units]`` mask of every expert projection that ran at least once."""
        out = {}
        for e in range(self.experts.num_experts):
            for s in self.parts:
                m = s.history.mask(e)
                if m is not None:
                    out[self.key(e, s.part.name)] = m
        return out

    def scores(self) -> dict[str, torch.Tensor]:
        """This step's fp32 ``[units]`` statistic so far of every expert projection that ran."""
        return {
            self.key(e, s.part.name): s.acc.score()[e].clone()
            for e in range(self.experts.num_experts)
            for s in self.parts
            if bool(s.acc.seen[e])
        }
