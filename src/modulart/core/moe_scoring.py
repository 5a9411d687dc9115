"""Routing rules: how router logits become expert choices and weights, for every MoE family.

All rules work on ``logits [T, E]`` (router bias included) in fp32 and return the per-expert
``scores [T, E]`` they rank, the ``weights [T, k]`` the chosen experts' outputs are multiplied by
and the chosen ``indices [T, k]``:

===================  ===========================================================================
``softmax_topk``     softmax; top-k of (softmax + selection bias); weights = softmax of the chosen,
                     optionally renormalised (p-norm, denominator clamped at ``norm_min``); scaled
``softmax_grouped``  DeepSeek-V2 group-limited greedy: softmax, keep the ``topk_group`` groups with
                     the best single score (others set to 0), top-k; scaled
``sigmoid_topk``     sigmoid; top-k of (sigmoid + selection bias); optional renormalisation; scaled
``sigmoid_grouped``  DeepSeek-V3: sigmoid + selection bias, group score = sum of the two best
                     biased scores, keep ``topk_group`` groups, top-k; weights = unbiased sigmoid,
                     optionally renormalised; scaled
``topk_softmax``     top-k logits, softmax over the k (GPT-OSS, GraniteMoE, JetMoE)
``topk_sigmoid``     top-k logits, sigmoid of each (Llama4)
``sparsemixer``      PhiMoE in eval mode: the best expert, then the best of the rest, each weighted
                     by a softmax over the logits within ``2 * jitter_eps`` (relative) of it
``custom``           a user callable ``logits -> (weights, indices)``
===================  ===========================================================================

Example:
    >>> import torch
    >>> from modulart.core.moe_scoring import ScoringRule, apply_rule
    >>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> scores, w, idx = apply_rule(ScoringRule("topk_softmax", top_k=2), logits)
    >>> idx.tolist(), [round(v, 4) for v in w[0].tolist()]
    ([[0, 1]], [0.7311, 0.2689])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modulart.core.errors import UnsupportedModuleError
from modulart.core.moe_layouts import ScoreFn, ScoringKind

__all__ = ["Routing", "ScoringRule", "apply_capacity", "apply_rule"]


@dataclass(frozen=True)
class ScoringRule:
    """How router logits become expert choices and weights (see the module docstring).

    Attributes:
        kind: the rule.
        top_k: experts per token.
        normalize: renormalise the selected weights.
        n_group / topk_group: group-limited selection (``*_grouped``).
        scaling: factor applied to the final weights.
        norm_p: p of the renormalisation norm (1: the sum of the weights).
        norm_min: lower clamp of the renormalisation denominator.
        jitter_eps: ``sparsemixer`` threshold.
        capacity: tokens each expert takes per sequence before dropping (Switch), or None.
        weights_on_input: weights scale the expert input (Llama4) instead of its output.
        score_fn: ``custom`` rule.
    """

    kind: ScoringKind
    top_k: int
    normalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    norm_p: float = 1.0
    norm_min: float = 0.0
    jitter_eps: float = 0.0
    capacity: int | None = None
    weights_on_input: bool = False
    score_fn: ScoreFn | None = None


@dataclass
class Routing:
    """A routing decision for ``T`` tokens.

    Attributes:
        logits: ``[T, E]`` raw router logits (router bias included).
        scores: ``[T, E]`` the per-expert scores the rule ranks (softmax or sigmoid, fp32).
        weights: ``[T, k]`` the weights the selected experts' outputs are multiplied by
            (0 for a token an expert dropped because it was over capacity).
        indices: ``[T, k]`` the selected experts.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


def _normalize(w: torch.Tensor, rule: ScoringRule) -> torch.Tensor:
    if not rule.normalize:
        return w
    denom = w.sum(-1, keepdim=True) if rule.norm_p == 1.0 else w.norm(p=rule.norm_p, dim=-1, keepdim=True)
    return w / (denom.clamp(min=rule.norm_min) if rule.norm_min > 0 else denom)


def _group_mask(choice: torch.Tensor, rule: ScoringRule, group_score: str) -> torch.Tensor:
    """``[T, E]`` bool: experts in the ``topk_group`` best groups."""
    t, n_exp = choice.shape
    if rule.n_group < 1 or n_exp % rule.n_group:
        raise UnsupportedModuleError(f"{n_exp} experts cannot be split into n_group={rule.n_group} groups")
    groups = choice.view(t, rule.n_group, n_exp // rule.n_group)
    if group_score == "max":
        gs = groups.max(dim=-1).values
    else:
        gs = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
    keep = gs.topk(rule.topk_group, dim=-1).indices
    mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, keep, True)
    return mask.repeat_interleave(n_exp // rule.n_group, dim=1)


def _sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    top, first = logits.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=top)
    masked = logits.masked_fill((top - logits) / factor > 2 * eps, float("-inf"))
    w1 = masked.softmax(-1).gather(-1, first)
    rest = logits.scatter(-1, first, float("-inf"))
    top2, second = rest.max(dim=-1, keepdim=True)
    factor2 = logits.abs().clamp(min=top2)
    masked2 = rest.masked_fill((top2 - logits) / factor2 > 2 * eps, float("-inf"))
    w2 = masked2.softmax(-1).gather(-1, second)
    return torch.cat([w1, w2], -1), torch.cat([first, second], -1)


def apply_rule(
    rule: ScoringRule, logits: torch.Tensor, selection_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` -> ``(scores [T, E], weights [T, k], indices [T, k])`` in fp32."""
    lf = logits.float()
    k = rule.top_k
    bias = selection_bias.float().reshape(-1) if selection_bias is not None else None
    if rule.kind in ("softmax_topk", "softmax_grouped", "sigmoid_topk", "sigmoid_grouped"):
        scores = lf.softmax(-1) if rule.kind.startswith("softmax") else lf.sigmoid()
        choice = scores + bias if bias is not None else scores
        if rule.kind == "sigmoid_grouped":
            choice = choice.masked_fill(~_group_mask(choice, rule, "top2_sum"), float("-inf"))
        elif rule.kind == "softmax_grouped" and rule.n_group > 1:
            choice = choice.masked_fill(~_group_mask(choice, rule, "max"), 0.0)
        idx = choice.topk(k, dim=-1).indices
        picked = (choice if rule.kind == "softmax_grouped" else scores).gather(1, idx)
        weights = _normalize(picked, rule) * rule.scaling
    elif rule.kind in ("topk_softmax", "topk_sigmoid"):
        scores = lf.softmax(-1) if rule.kind == "topk_softmax" else lf.sigmoid()
        top, idx = lf.topk(k, dim=-1)
        weights = (top.softmax(-1) if rule.kind == "topk_softmax" else top.sigmoid()) * rule.scaling
    elif rule.kind == "sparsemixer":
        scores = lf.softmax(-1)
        weights, idx = _sparsemixer(lf, rule.jitter_eps)
    elif rule.kind == "custom":
        if rule.score_fn is None:
            raise UnsupportedModuleError("scoring 'custom' needs MoELayout.score_fn")
        scores = lf.softmax(-1)
        weights, idx = rule.score_fn(logits)
        weights, idx = weights.float(), idx.long()
    else:  # pragma: no cover - ScoringKind is closed
        raise UnsupportedModuleError(f"unknown scoring rule {rule.kind!r}")
    return scores, weights, idx


def apply_capacity(weights: torch.Tensor, indices: torch.Tensor, shape: torch.Size, capacity: int) -> torch.Tensor:
    """Zero the weights of tokens beyond an expert's ``capacity`` within each sequence.

    Args:
        weights, indices: ``[T, k]`` with ``T = prod(shape[:-1])``.
        shape: the input shape ``[..., S, d]``; capacity counts along ``S`` (the whole ``T`` for 2-D).
        capacity: tokens an expert takes per sequence.
    """
    n_exp = int(indices.max()) + 1 if indices.numel() else 1
    seq = shape[-2] if len(shape) >= 3 else weights.shape[0]
    onehot = torch.nn.functional.one_hot(indices, n_exp).sum(1)  # [T, E]
    onehot = onehot.view(-1, seq, n_exp)
    priority = onehot.cumsum(dim=1).view(-1, n_exp)
    keep = priority.gather(1, indices) <= capacity
    return weights * keep.to(weights.dtype)
