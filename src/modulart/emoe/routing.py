"""Experts as groups of neurons, and the routers that pick them per token.

An FFN with ``d_ff`` neurons is split into ``N`` experts by a label vector (``labels[i]`` is neuron
``i``'s expert). No weight is moved: the grouping is an index map, so converting and merging back
never permute anything.

Routers score experts per token (``[T, N]``, fp32):

- ``avgk``: ``x · G_j`` with ``G_j`` the mean of expert ``j``'s *raw* key rows, recomputed from the
  live keys at every call (it tracks fine-tuning). Equals the mean pre-activation of the expert's
  neurons without the key bias.
- ``frozen``: the same with the centroids taken at conversion.
- ``cosine``: cosine between ``x`` and ``G_j``.
- ``oracle``: the mean ``|h|`` of the expert's neurons (needs every activation: analysis only).
- ``random`` / ``bottomk``: ablations (random scores; the *lowest* avg-k scores).
- ``up`` / ``up_abs`` / ``inter`` (gated FFNs; the score modes of the reference code's Llama
  path): the mean over the expert's neurons of the up projection ``x W_upᵀ + b_up``, of its
  absolute value, or of the hidden activation ``h = σ(x W_gateᵀ) ⊙ (x W_upᵀ)`` itself (signed;
  ``oracle`` is the mean of ``|h|``, the reference's ``inter_abs``).

Selection keeps the top ``k`` scores per token; ties go to the lower expert index (stable sort),
so results are deterministic. :func:`capacity_keep` optionally drops assignments beyond an
expert's capacity in the reference code's order, and two balance losses are offered:
:func:`balance_loss` (modulart's) and :func:`reference_balance_loss` (the reference code's).

Example:
    >>> import torch
    >>> from modulart.emoe.routing import ExpertGroups, select_topk
    >>> g = ExpertGroups(torch.tensor([0, 1, 0, 1]), 2)
    >>> keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0]])
    >>> g.centroids(keys)
    tensor([[2., 0.],
            [0., 2.]])
    >>> select_topk(torch.tensor([[0.5, 0.5], [0.1, 0.9]]), 1)
    tensor([[0],
            [1]])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modulart.core.neuron_groups import ExpertGroups, select_topk, selection_mask

__all__ = [
    "ExpertGroups",
    "balance_loss",
    "capacity_keep",
    "expert_capacity",
    "reference_balance_loss",
    "select_topk",
    "selection_mask",
]


def _cv2(x: torch.Tensor) -> torch.Tensor:
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """modulart's load-balancing loss ``0.5 * (CV²(importance) + CV²(load))`` (``balance_loss="counts"``).

    ``importance`` is the per-expert sum over tokens of ``softmax(scores)``, the scores *as routed*
    (with the training-time gate noise, if any), differentiable; ``load`` is the number of tokens
    that selected each expert (a count: no gradient). ``CV² = var / mean²`` with the population
    variance. The router computes ``scores`` from the live keys, so the gradient reaches the FFN
    input *and* the FFN's keys.

    This is not the reference code's loss (:func:`reference_balance_loss`): there the load is a
    smooth estimate (the probability, under the gate noise, that each expert stays in the top k),
    the importance uses the clean scores, the variance is the sample variance, and the gate is a
    separate tensor, so no gradient reaches the keys. On the same batch the two differ in value:
    0.271 here against 0.0128 there on a batch of a real model (gradients on the FFN input at
    cosine 0.999), 0.108 against 0.024 on a toy batch (cosine 0.73).

    Args:
        scores: ``[T, N]`` router scores (fp32).
        indices: ``[T, k]`` selected experts.
        num_experts: ``N``.

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
        >>> round(float(balance_loss(s, torch.tensor([[0], [0]]), 2)), 3)
        0.79
    """
    importance = F.softmax(scores, dim=-1).sum(0)
    load = torch.bincount(indices.flatten(), minlength=num_experts).to(scores.dtype)
    return 0.5 * (_cv2(importance) + _cv2(load))


def _cv2_sample(x: torch.Tensor) -> torch.Tensor:
    return x.var(unbiased=True) / (x.mean() ** 2 + 1e-10)


def reference_balance_loss(
    logits: torch.Tensor, noisy: torch.Tensor, indices: torch.Tensor, gate_noise: float
) -> torch.Tensor:
    """The reference code's load/importance loss (``balance_loss="reference"``).

    With ``p = softmax(logits)`` (the clean scores), ``θ_t`` the ``k``-th largest *noisy* score of
    token ``t`` (the last selected one) and ``σ = gate_noise / N``:

    - ``importance_e = Σ_t p[t, e]``;
    - ``load_e = Σ_t Φ((p[t, e] − θ_t) / σ)`` (Φ the standard normal CDF: the reference compares
      the softmax probability with the noisy score, as written);
    - loss ``= ½ (CV²(importance) + CV²(load))`` with ``CV² = var / (mean² + 1e-10)`` and the
      *sample* variance (``N − 1`` in the denominator). 0 when ``N = 1``.

    Computed in fp32. Gradients reach whatever ``logits`` and ``noisy`` depend on: pass scores
    computed from detached keys (as the converted layer does) and none reaches the FFN's keys,
    as with the reference's separate gate tensor.

    Args:
        logits: ``[T, N]`` clean router scores.
        noisy: ``[T, N]`` the scores with the gate noise added (what was routed on).
        indices: ``[T, k]`` selected experts, best first (``indices[:, -1]`` is the k-th).
        gate_noise: the noise scale (> 0).

    Returns:
        A scalar tensor.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
        >>> idx = torch.tensor([[0], [1]])
        >>> round(float(reference_balance_loss(s, s, idx, 1.0)), 4)
        0.3275
    """
    n = logits.shape[-1]
    if n < 2:
        return logits.sum() * 0.0
    p = F.softmax(logits.float(), dim=-1)
    threshold = noisy.float().gather(1, indices[:, -1:].to(noisy.device))
    load = torch.special.ndtr((p - threshold) / (gate_noise / n)).sum(0)
    return 0.5 * (_cv2_sample(p.sum(0)) + _cv2_sample(load))


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert accepts per forward: ``k · ⌊f · ⌈T / N⌉⌋`` (the reference code's formula).

    Example:
        >>> expert_capacity(4096, 64, 16, 1.5)
        1536
    """
    per_expert = (tokens + num_experts - 1) // num_experts
    return top_k * int(capacity_factor * per_expert)


def capacity_keep(probs: torch.Tensor, indices: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which token -> expert assignments fit the capacity, filled in the reference code's order.

    Every expert accepts at most ``capacity`` assignments and fills its slots in this order: all
    first choices (``indices[:, 0]``), then all second choices, and so on; within one choice rank,
    tokens with a higher top probability ``max_e probs[t, e]`` come first (ties: the lower token
    index). An assignment that finds its expert full is dropped: the token gets nothing from that
    expert (no output, no bias share).

    Args:
        probs: ``[T, N]`` the routing probabilities (softmax of the scores as routed).
        indices: ``[T, k]`` selected experts, best first.
        capacity: slots per expert (:func:`expert_capacity`).

    Returns:
        ``[T, k]`` bool: True where the assignment is kept.

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
        >>> capacity_keep(p, torch.tensor([[0], [0], [0]]), 2).flatten().tolist()
        [True, False, True]
    """
    t, k = indices.shape
    device = indices.device
    priority = torch.argsort(-probs.detach().max(dim=-1).values, stable=True)
    rank = torch.empty(t, dtype=torch.long, device=device)
    rank[priority] = torch.arange(t, device=device)
    expert = indices.long()
    choice = torch.arange(k, device=device).expand(t, k)
    # slot order within an expert: choice rank first, then token priority
    key = (expert * k + choice) * t + rank.unsqueeze(1)
    order = torch.argsort(key.flatten())
    sorted_expert = expert.flatten()[order]
    counts = torch.bincount(sorted_expert, minlength=int(probs.shape[-1]))
    starts = counts.cumsum(0) - counts
    slot_sorted = torch.arange(t * k, device=device) - starts[sorted_expert]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return (slot < capacity).reshape(t, k)
