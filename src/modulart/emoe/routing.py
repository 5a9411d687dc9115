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

Selection keeps the top ``k`` scores per token; ties go to the lower expert index (stable sort),
so results are deterministic.

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

__all__ = ["ExpertGroups", "balance_loss", "select_topk", "selection_mask"]


def _cv2(x: torch.Tensor) -> torch.Tensor:
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The reference's load-balancing loss ``0.5 * (CV²(importance) + CV²(load))``.

    ``importance`` is the per-expert sum of ``softmax(scores)`` over tokens (differentiable);
    ``load`` the number of tokens that selected each expert (a count, no gradient).
    """
    importance = F.softmax(scores, dim=-1).sum(0)
    load = torch.bincount(indices.flatten(), minlength=num_experts).to(scores.dtype)
    return 0.5 * (_cv2(importance) + _cv2(load))
