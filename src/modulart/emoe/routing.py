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

Custom routers: :func:`register_router` adds a scoring function under a name that
``EMoEConfig(router=name)`` then accepts. It maps the FFN input ``x [T, d_model]`` (fp32), a
:class:`RouterContext` (the expert groups, the live keys, the conversion-time centroids) and the
config to scores ``[T, N]``; the scores are checked on every call (a tensor, shape ``[T, N]``,
floating point, on ``x``'s device, finite) and a bad return is a typed error naming the router.
Saved artefacts store only the name: loading one looks the name up in this registry and never
imports anything, so register the router before :func:`modulart.load`.

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

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import torch
import torch.nn.functional as F

from modulart.core.errors import (
    ConfigError,
    InvalidArgumentError,
    KeyNotFoundError,
    NonFiniteError,
    ShapeError,
)
from modulart.core.neuron_groups import ExpertGroups, select_topk, selection_mask

if TYPE_CHECKING:
    from modulart.emoe.config import EMoEConfig

__all__ = [
    "ExpertGroups",
    "RouterContext",
    "RouterFn",
    "available_routers",
    "balance_loss",
    "call_router",
    "capacity_keep",
    "expert_capacity",
    "get_router",
    "reference_balance_loss",
    "register_router",
    "select_topk",
    "selection_mask",
    "unregister_router",
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
    0.108 here against 0.024 there on a toy batch (gradients on the FFN input at cosine 0.73; an
    earlier side-by-side run on a real model's batch, not repeated here, gave 0.271 against 0.0128
    at cosine 0.999).

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


# --- custom routers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouterContext:
    """What a registered router sees of one converted FFN, at one call.

    Built afresh at every call, so the weights are the live ones. They are detached unless
    ``balance_loss_weight > 0`` (then ``x`` carries its gradient, and with
    ``balance_loss="counts"`` the key and up rows do too), the same rule as the built-in routers.

    Attributes:
        path: the FFN's path in the model (``FFN.path``).
        groups: the neuron -> expert split: ``labels [d_ff]``, ``sizes [N]``, ``num_experts``,
            ``centroids(w)`` (``[d_ff, d] -> [N, d]``, the mean row of each expert) and
            ``expert_mass(h)`` (``[T, d_ff] -> [T, N]``).
        keys: ``[d_ff, d_model]`` the key rows (first layer) as the model holds them (its dtype).
        key_bias: ``[d_ff]`` the key bias, or None.
        up: ``[d_ff, d_model]`` the up projection of a gated FFN (None otherwise).
        up_bias: ``[d_ff]`` its bias, or None.
        centroids: ``[N, d_model]`` fp32: each expert's mean key row at conversion (what
            ``router="frozen"`` scores with; restored with a saved state).
        generator: a ``torch.Generator`` on the keys' device, seeded with ``config.seed`` at
            conversion, for routers that draw random numbers (reproducible runs).

    Example:
        >>> import torch
        >>> g = ExpertGroups(torch.tensor([0, 1, 0, 1]), 2)
        >>> keys = torch.eye(4, 3)
        >>> ctx = RouterContext("ffn", g, keys, None, None, None, g.centroids(keys), torch.Generator())
        >>> ctx.num_experts, ctx.d_ff, ctx.d_model
        (2, 4, 3)
    """

    path: str
    groups: ExpertGroups
    keys: torch.Tensor
    key_bias: torch.Tensor | None
    up: torch.Tensor | None
    up_bias: torch.Tensor | None
    centroids: torch.Tensor
    generator: torch.Generator

    @property
    def num_experts(self) -> int:
        """``N``."""
        return self.groups.num_experts

    @property
    def d_ff(self) -> int:
        """Neurons of the FFN."""
        return int(self.keys.shape[0])

    @property
    def d_model(self) -> int:
        """Width of the FFN input."""
        return int(self.keys.shape[1])


RouterFn: TypeAlias = Callable[[torch.Tensor, RouterContext, "EMoEConfig"], torch.Tensor]
"""A router: ``(x [T, d_model] fp32, context, config) -> scores [T, N]`` (higher = preferred)."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_ROUTERS: dict[str, RouterFn] = {}
_LOCK = threading.Lock()


def _builtin_routers() -> tuple[str, ...]:
    from modulart.emoe.config import ROUTERS

    return ROUTERS


def _same_definition(a: object, b: object) -> bool:
    """The same ``def`` run twice (a module imported again): not a clash."""
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None),
        getattr(b, "__qualname__", None),
    ) and getattr(a, "__qualname__", None) is not None


def register_router(name: str, fn: RouterFn, *, override: bool = False) -> RouterFn:
    """Register ``fn`` as the EMoE router ``name``, for ``EMoEConfig(router=name)``.

    ``fn(x, context, config)`` gets the FFN input ``x [T, d_model]`` (fp32, all tokens of the
    forward flattened), a :class:`RouterContext` and the layer's :class:`EMoEConfig`, and returns
    scores ``[T, N]``; every token then uses the ``top_k`` experts with the highest scores (ties to
    the lower index), plus the configured gate noise, capacity limit and balance loss as for the
    built-in routers. Every return is checked (:func:`call_router`). Layers look the function up
    when they are converted: registering another function under the name later (``override=True``)
    changes new conversions only. Artefacts save the name; :func:`modulart.load` finds it here (it
    never imports code named in a file), so register before loading.

    Args:
        name: letters, digits, ``_``, ``.``, ``-`` (not starting with a digit, ``.`` or ``-``); not
            a built-in router's name (``modulart.emoe.config.ROUTERS``).
        fn: the scoring function.
        override: replace a function already registered under ``name``.

    Returns:
        ``fn`` (so it can be registered where it is defined).

    Raises:
        InvalidArgumentError: ``name`` is not a str or ``fn`` is not callable.
        ConfigError: ``name`` is malformed, a built-in router's, or taken by another function
            (without ``override``).

    Example:
        >>> import torch, modulart as mt
        >>> def nearest(x, ctx, config):  # negative distance to each expert's mean key
        ...     return -torch.cdist(x, ctx.groups.centroids(ctx.keys.float()))
        >>> _ = mt.emoe.register_router("nearest", nearest)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        >>> h = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all", router="nearest")
        >>> y = model(torch.randn(5, 8))
        >>> next(iter(h.routing_stats().values())).tokens
        5
        >>> h.remove(); mt.emoe.unregister_router("nearest")
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"register_router: name must be a str, got {type(name).__name__}")
    if not callable(fn):
        raise InvalidArgumentError(
            f"register_router: fn for router {name!r} must be callable (x, context, config) -> scores [T, N], "
            f"got {type(fn).__name__}"
        )
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"register_router: name = {name!r}: must be letters, digits, '_', '.', '-', starting with a letter or '_'"
        )
    if name in _builtin_routers():
        raise ConfigError(
            f"register_router: name = {name!r} is a built-in router ({', '.join(_builtin_routers())}); choose another"
        )
    with _LOCK:
        taken = _ROUTERS.get(name)
        if taken is not None and taken is not fn and not override and not _same_definition(taken, fn):
            where = f"{getattr(taken, '__module__', '?')}.{getattr(taken, '__qualname__', repr(taken))}"
            raise ConfigError(
                f"register_router: name = {name!r} is taken by {where}; choose another name or pass override=True"
            )
        _ROUTERS[name] = fn
    return fn


def unregister_router(name: str) -> None:
    """Remove the router registered under ``name`` (layers converted with it keep their function).

    Raises:
        KeyNotFoundError: no router is registered under ``name`` (built-ins cannot be removed).

    Example:
        >>> import torch, modulart as mt
        >>> _ = mt.emoe.register_router("zeros", lambda x, ctx, cfg: x.new_zeros(x.shape[0], ctx.num_experts))
        >>> "zeros" in mt.emoe.available_routers()
        True
        >>> mt.emoe.unregister_router("zeros")
        >>> "zeros" in mt.emoe.available_routers()
        False
    """
    with _LOCK:
        if name not in _ROUTERS:
            registered = sorted(_ROUTERS)
            raise KeyNotFoundError(f"unregister_router: no router registered as {name!r}; registered: {registered}")
        del _ROUTERS[name]


def available_routers() -> list[str]:
    """The router names ``EMoEConfig.router`` accepts: the built-ins, then the registered ones (sorted).

    Example:
        >>> import modulart as mt
        >>> mt.emoe.available_routers()[:3]
        ['avgk', 'frozen', 'cosine']
    """
    with _LOCK:
        return [*_builtin_routers(), *sorted(_ROUTERS)]


def get_router(name: str) -> RouterFn | None:
    """The function registered under ``name``; None for a built-in router.

    Raises:
        ConfigError: ``name`` is neither built in nor registered.

    Example:
        >>> import modulart as mt
        >>> mt.emoe.get_router("avgk") is None
        True
    """
    if isinstance(name, str) and name in _builtin_routers():
        return None
    with _LOCK:
        fn = _ROUTERS.get(name) if isinstance(name, str) else None
        registered = sorted(_ROUTERS)
    if fn is None:
        raise ConfigError(
            f"EMoEConfig.router = {name!r}: not a built-in router {_builtin_routers()} and not registered "
            f"(registered: {registered}); register it with modulart.emoe.register_router({name!r}, fn) first "
            "(router names in artefacts are looked up there, never imported)"
        )
    return fn


def call_router(name: str, fn: RouterFn, x: torch.Tensor, context: RouterContext, config: EMoEConfig) -> torch.Tensor:
    """Run a registered router and check what it returns: fp32 scores ``[T, N]``.

    Args:
        name: the router's name (for the messages).
        fn: the router.
        x: ``[T, d_model]`` fp32 FFN input.
        context: the layer's :class:`RouterContext`.
        config: the layer's config.

    Raises:
        InvalidArgumentError: the router returned no tensor, a non-floating tensor, or one on
            another device than ``x``.
        ShapeError: the scores are not ``[T, N]``.
        NonFiniteError: a score is NaN or infinite.

    Example:
        >>> import torch
        >>> from modulart.emoe import EMoEConfig
        >>> g = ExpertGroups(torch.tensor([0, 1]), 2)
        >>> ctx = RouterContext("ffn", g, torch.eye(2), None, None, None, torch.eye(2), torch.Generator())
        >>> cfg = EMoEConfig(num_experts=2, top_k=1)
        >>> call_router("sum", lambda x, c, cfg: x @ c.centroids.t(), torch.ones(3, 2), ctx, cfg).shape
        torch.Size([3, 2])
        >>> call_router("flat", lambda x, c, cfg: torch.ones(3), torch.zeros(3, 2), ctx, cfg)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modulart.core.errors.ShapeError: EMoE router 'flat' at 'ffn': returned scores of shape [3], expected ...
    """
    where = f"EMoE router {name!r} at {context.path!r}"
    s = fn(x, context, config)
    if not isinstance(s, torch.Tensor):
        raise InvalidArgumentError(f"{where}: returned {type(s).__name__}, expected a tensor of scores [T, N]")
    expected = [int(x.shape[0]), context.num_experts]
    if list(s.shape) != expected:
        raise ShapeError(f"{where}: returned scores of shape {list(s.shape)}, expected [T, N] = {expected}")
    if not s.is_floating_point():
        raise InvalidArgumentError(f"{where}: returned {s.dtype} scores, expected a floating-point tensor")
    if s.device != x.device:
        raise InvalidArgumentError(f"{where}: returned scores on {s.device}, the tokens are on {x.device}")
    if not bool(torch.isfinite(s).all()):
        bad = int((~torch.isfinite(s)).sum())
        raise NonFiniteError(f"{where}: {bad} of {s.numel()} scores are NaN or infinite; scores must be finite")
    return s.float()
