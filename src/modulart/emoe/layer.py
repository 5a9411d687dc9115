"""One converted FFN: routing, the masked and sparse executors, and routing telemetry.

Both executors work through hooks on the FFN view's sites; the model's modules are never replaced.

- **masked** (training; static shapes): the FFN input q is recorded at ``input_site``; at
  ``hidden_site`` the hidden activation h is multiplied by the 0/1 mask of each token's selected
  experts, so ``y = (m(x) ⊙ h) W_outᵀ + b_out`` with ``b_out`` added once, by the model itself.
  Gradients reach only selected neurons.
- **sparse** (inference; gradients work too): at ``input_site`` the hook computes the FFN output
  from the selected experts only (tokens grouped by expert with one argsort, per-expert weight
  blocks cached while the weights are unchanged, per-expert GEMMs into reused buffers, a custom
  backward), then hands the module an *empty* token dimension so the dense path costs nothing; at
  ``output_site`` the hook returns the sparse result. Outputs equal the masked executor's. Other
  operators' hooks inside the FFN would see that empty token dimension, so :class:`EMoE
  <modulart.emoe.EMoE>` claims the FFN's subtree for a sparse layer
  (:func:`modulart.core.sharing.claim`): they are refused with a ``CompositionError``.

Options of the reference code's BERT/GPT-2 path (off by default):

- ``capacity_factor``: assignments beyond an expert's capacity are dropped
  (:func:`~modulart.emoe.routing.capacity_keep`); the token gets nothing from that expert.
- ``per_expert_bias``: every expert has its own copy ``B_e`` of the output bias (``[N, d_model]``,
  an :class:`ExpertBias` registered in the output projection while converted; it trains in place of
  ``b_out``, which is frozen meanwhile); the output is ``y = (m(x) ⊙ h) W_outᵀ + Σ_{e kept} B_e``.
- ``dropout``: in training, ``σ(dropout_p(x W_inᵀ + b_in))`` (a hook on the first layer's output
  for the masked executor; inside the computation for the sparse one).

Example:
    >>> import torch, modulart as mt
    >>> from modulart.emoe.layer import ConvertedFFN
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> ffn = mt.find_ffns(model)[0]
    >>> layer = ConvertedFFN(ffn, torch.tensor([0, 1] * 4), mt.emoe.EMoEConfig(num_experts=2, top_k=1))
    >>> with mt.HookRegistry(model) as reg:
    ...     layer.install(reg)
    ...     y = model(torch.randn(3, 4))
    >>> layer.counts.sum().item()  # 3 tokens, 1 expert each
    3
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import HookError
from modulart.core.ffn import FFN
from modulart.core.hooks import HookRegistry, HookSite, Priority
from modulart.core.unwrap import active_ddp_wrapper
from modulart.emoe.config import HIDDEN_ROUTERS, EMoEConfig
from modulart.emoe.ranks import broadcast_from_first, is_dtensor, whole
from modulart.emoe.routing import (
    ExpertGroups,
    RouterContext,
    balance_loss,
    call_router,
    capacity_keep,
    expert_capacity,
    get_router,
    reference_balance_loss,
    select_topk,
    selection_mask,
)

__all__ = ["ConvertedFFN", "ExpertBias", "RoutingStats"]


class ExpertBias(nn.Module):
    """The per-expert copies of one FFN's output bias (``per_expert_bias=True``).

    Registered in the FFN's output projection module while EMoE is applied, so ``model.parameters()`` (and the
    optimizer built from it) includes :attr:`weight`; marked modulart-owned, so fingerprints leave
    it out. Removed with the handle.

    Args:
        bias: ``[d_model]`` the FFN's output bias ``b_out``.
        num_experts: ``N``.
        top_k: ``k``: every copy starts at ``b_out / k``, so a token whose ``k`` experts are all kept
            gets ``b_out`` exactly until the copies are trained.
        requires_grad: whether the copies train.

    Attributes:
        weight: ``[N, d_model]`` parameter.

    Example:
        >>> import torch
        >>> copies = ExpertBias(torch.tensor([4.0, -2.0]), num_experts=3, top_k=2, requires_grad=True)
        >>> copies.weight.tolist()
        [[2.0, -1.0], [2.0, -1.0], [2.0, -1.0]]
    """

    _modulart_owned: ClassVar[bool] = True

    def __init__(self, bias: torch.Tensor, num_experts: int, top_k: int, *, requires_grad: bool) -> None:
        super().__init__()
        init = (bias.detach() / top_k).unsqueeze(0).repeat(num_experts, 1)
        self.weight = nn.Parameter(init, requires_grad=requires_grad)

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, d_model={self.weight.shape[1]}"


@dataclass(frozen=True)
class RoutingStats:
    """Routing telemetry of one layer since the previous :meth:`ConvertedFFN.stats` call.

    Attributes:
        tokens: tokens routed.
        load: ``[N]`` fraction of expert selections that went to each expert (sums to 1).
        entropy: entropy of ``load`` divided by ``log N`` (1 = perfectly even use).
        stability: ``1 - total variation distance`` between this ``load`` and the previous call's
            (1 = the same usage; None on the first call).
        dropped: fraction of the token -> expert assignments dropped by the capacity limit
            (0 without ``capacity_factor``). ``load`` counts selections, dropped or not.
    """

    tokens: int
    load: list[float]
    entropy: float
    stability: float | None
    dropped: float = 0.0


class ConvertedFFN:
    """Routing state and hooks of one FFN converted to ``N`` experts.

    Args:
        ffn: the FFN view.
        labels: ``[d_ff]`` expert id of each neuron.
        config: the conversion config.
        centroids: ``[N, d_model]`` frozen centroids (router ``frozen``; default: computed now).
    """

    def __init__(
        self, ffn: FFN, labels: torch.Tensor, config: EMoEConfig, centroids: torch.Tensor | None = None
    ) -> None:
        self.ffn = ffn
        self.config = config
        device = ffn.keys.device
        self.groups = ExpertGroups(labels.to(device), config.num_experts)
        self.frozen = (
            centroids.to(device, torch.float32)
            if centroids is not None
            else self.groups.centroids(whole(ffn.keys.detach()))  # FSDP2: gathered once, here
        )
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.custom_router = get_router(config.router)  # a registered router (None: a built-in one)
        self.counts = torch.zeros(config.num_experts, dtype=torch.long)
        self.tokens = 0
        self.dropped = 0
        self.bias: ExpertBias | None = None
        if config.per_expert_bias:
            b = ffn.value_bias
            if b is None:
                raise HookError(f"{ffn.path}: per_expert_bias needs an FFN output bias; this FFN has none")
            self.bias = ExpertBias(b, config.num_experts, config.top_k, requires_grad=b.requires_grad)
        self.previous_load: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None
        self._local = threading.local()  # _q / _pending: in-flight state of each thread's forward
        self._weight_cache: tuple[tuple[object, ...], _ExpertBlocks] | None = None  # the grouped executor's weights
        self.ranks_agree = False  # set once the split is the first rank's (see agree_with_ddp)

    @property
    def _q(self) -> torch.Tensor | None:
        """The FFN input of the forward this thread runs (masked executor; per thread)."""
        q: torch.Tensor | None = getattr(self._local, "q", None)
        return q

    @_q.setter
    def _q(self, value: torch.Tensor | None) -> None:
        self._local.q = value

    @property
    def _pending(self) -> torch.Tensor | None:
        """The sparse output of the forward this thread runs (sparse executor; per thread)."""
        out: torch.Tensor | None = getattr(self._local, "pending", None)
        return out

    @_pending.setter
    def _pending(self, value: torch.Tensor | None) -> None:
        self._local.pending = value

    @property
    def _kept(self) -> torch.Tensor | None:
        """``[T, N]`` bool: the kept experts of this thread's forward (masked executor, per-expert bias)."""
        sel: torch.Tensor | None = getattr(self._local, "kept", None)
        return sel

    @_kept.setter
    def _kept(self, value: torch.Tensor | None) -> None:
        self._local.kept = value

    def set_split(self, labels: torch.Tensor, centroids: torch.Tensor) -> None:
        """Replace the neuron -> expert labels and the frozen centroids (what a saved state restores)."""
        device = self.ffn.keys.device
        groups = ExpertGroups(labels.long().to(device), self.config.num_experts)
        self.groups, self.frozen = groups, centroids.to(device, torch.float32)
        self._weight_cache = None  # regrouped weights follow the labels

    # --- routing ------------------------------------------------------------------------------
    def _group_mean(self, a: torch.Tensor) -> torch.Tensor:
        """``a [T, d_ff] -> [T, N]``: the mean over each expert's neurons (fp32, differentiable)."""
        sums = a.new_zeros(a.shape[0], self.config.num_experts).index_add(1, self.groups.labels.to(a.device), a)
        return sums / self.groups.sizes.to(a.device, a.dtype)

    def scores(self, q: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """``q [T, d_model]`` (and ``h [T, d_ff]`` for ``oracle`` / ``inter``) -> router scores ``[T, N]`` (fp32).

        A router registered with :func:`~modulart.emoe.routing.register_router` gets ``q`` (fp32)
        and a :class:`~modulart.emoe.routing.RouterContext`; its scores are checked
        (:func:`~modulart.emoe.routing.call_router`).

        With a balance loss (``balance_loss_weight > 0``) the scores carry the gradient of the FFN
        input; that of the keys only with ``balance_loss="counts"`` (the reference's gate is a
        separate tensor: ``"reference"`` detaches the keys).
        """
        cfg = self.config
        router = cfg.router
        if router in HIDDEN_ROUTERS:
            if h is None:
                raise HookError(f"{self.ffn.path}: the {router} router needs the hidden activations")
            return self.groups.expert_mass(h) if router == "oracle" else self._group_mean(h.detach().float())
        if router == "random":
            return torch.rand(q.shape[0], cfg.num_experts, generator=self.generator, device=q.device)
        grad_q = cfg.balance_loss_weight > 0
        grad_w = grad_q and cfg.balance_loss == "counts"
        qf = q.float() if grad_q else q.detach().float()
        if self.custom_router is not None:
            return call_router(router, self.custom_router, qf, self._router_context(grad_w), cfg)
        if router == "frozen":
            return qf @ self.frozen.t()
        if router in ("up", "up_abs"):
            up, ub = self.ffn.up, self.ffn.up_bias
            if up is None:
                raise HookError(f"{self.ffn.path}: the {router} router needs a gated FFN (an up projection)")
            self._check_whole(up)
            up = up if grad_w else up.detach()
            ub = None if ub is None else (ub if grad_w else ub.detach()).float()
            if router == "up":
                s = qf @ self.groups.centroids(up).t()
                return s if ub is None else s + self._group_mean(ub.unsqueeze(0))
            return self._group_mean(F.linear(qf, up.float(), ub).abs())
        keys = self.ffn.keys if grad_w else self.ffn.keys.detach()
        self._check_whole(keys)
        g = self.groups.centroids(keys)
        if router == "cosine":
            return F.normalize(qf, dim=-1) @ F.normalize(g, dim=-1).t()
        s = qf @ g.t()
        return -s if router == "bottomk" else s

    def _router_context(self, grad_w: bool) -> RouterContext:
        """The live weights a registered router reads (detached unless the balance loss trains them)."""
        ffn = self.ffn

        def live(t: torch.Tensor | None) -> torch.Tensor | None:
            self._check_whole(t)
            return None if t is None else (t if grad_w else t.detach())

        keys = live(ffn.keys)
        assert keys is not None
        return RouterContext(
            path=ffn.path,
            groups=self.groups,
            keys=keys,
            key_bias=live(ffn.key_bias),
            up=live(ffn.up),
            up_bias=live(ffn.up_bias),
            centroids=self.frozen,
            generator=self.generator,
        )

    def _check_whole(self, weight: torch.Tensor | None) -> None:
        if is_dtensor(weight):
            raise HookError(
                f"{self.ffn.path}: the FFN's weights are FSDP2 shards during its forward (a layer inside the FFN "
                "is a fully_shard unit of its own); fully_shard the FFN or the block holding it as one unit"
            )

    def agree_with_ddp(self) -> None:
        """Inside a ``DistributedDataParallel`` forward: take the first rank's split, once.

        EMoE applied before the model was wrapped in DDP cannot see the wrapper, and every rank
        clustered its own keys; at the first forward under DDP (which all ranks run together) the
        labels and centroids of the first rank of DDP's group are broadcast. No collective outside
        a DDP forward, and none after the first.
        """
        ddp = active_ddp_wrapper(self.ffn.module)
        if ddp is None:
            return
        labels, centroids = broadcast_from_first(
            [self.groups.labels, self.frozen], [getattr(ddp, "process_group", None)]
        )
        self.set_split(labels, centroids)
        self.ranks_agree = True

    def route(self, q: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Selected experts ``[T, k]`` for ``q [T, d_model]``; records telemetry and the balance loss."""
        return self.dispatch(q, h)[0]

    def dispatch(self, q: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Selected experts ``[T, k]`` (best first) and which of them are kept (``[T, k]`` bool, or None).

        Scores, plus ``gate_noise · ε / N`` in training; top-k; the balance loss of the
        configured kind (when ``balance_loss_weight > 0`` and gradients are on); the capacity
        limit when ``capacity_factor`` is set (None: every selection is kept). Records telemetry.
        """
        if not self.ranks_agree:
            self.agree_with_ddp()
        cfg = self.config
        clean = s = self.scores(q, h)
        if cfg.gate_noise > 0 and self.ffn.module.training:
            noise = torch.randn(s.shape, generator=self.generator, device=s.device)
            s = s + noise * (cfg.gate_noise / cfg.num_experts)
        idx = select_topk(s.detach(), cfg.top_k)
        if cfg.balance_loss_weight > 0 and torch.is_grad_enabled():
            if cfg.balance_loss == "reference":
                self.last_balance_loss = reference_balance_loss(clean, s, idx, cfg.gate_noise)
            else:
                self.last_balance_loss = balance_loss(s, idx, cfg.num_experts)
        keep: torch.Tensor | None = None
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(int(idx.shape[0]), cfg.num_experts, cfg.top_k, cfg.capacity_factor)
            keep = capacity_keep(F.softmax(s.detach().float(), dim=-1), idx, capacity)
            self.dropped += int((~keep).sum())
        self.counts += torch.bincount(idx.flatten().cpu(), minlength=cfg.num_experts)
        self.tokens += int(idx.shape[0])
        return idx, keep

    def kept_experts(self, idx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``[T, N]`` bool: the experts each token uses (selected, and kept by the capacity limit)."""
        if keep is None:
            return selection_mask(idx, self.config.num_experts)
        out = torch.zeros(idx.shape[0], self.config.num_experts, dtype=torch.bool, device=idx.device)
        return out.scatter_(1, idx, keep)

    # --- hooks --------------------------------------------------------------------------------
    def install(self, registry: HookRegistry) -> None:
        """Install this layer's executor hooks (interventions) in ``registry``."""
        name = self.ffn.path
        if self.config.executor == "masked":
            registry.at(self.ffn.input_site, self._record_q, priority=Priority.INTERVENE, name=f"{name}:q")
            if self.config.dropout > 0:
                key = self.ffn.key_proj
                site = HookSite(key.module, key.path, "forward")
                registry.at(site, self._dropout, priority=Priority.INTERVENE, name=f"{name}:dropout")
            registry.at(self.ffn.hidden_site, self._mask_hidden, priority=Priority.INTERVENE, name=f"{name}:mask")
            if self.bias is not None:
                bias_name = f"{name}:bias"
                registry.at(self.ffn.output_site, self._add_expert_bias, priority=Priority.INTERVENE, name=bias_name)
        else:
            registry.at(self.ffn.input_site, self._sparse_input, priority=Priority.INTERVENE, name=f"{name}:sparse")
            registry.at(self.ffn.output_site, self._sparse_output, priority=Priority.INTERVENE, name=f"{name}:out")

    def _record_q(self, q: torch.Tensor) -> None:
        self._q = q

    def _dropout(self, z: torch.Tensor) -> torch.Tensor | None:
        if not self.ffn.module.training:
            return None
        return F.dropout(z, self.config.dropout, training=True)

    def _add_expert_bias(self, y: torch.Tensor) -> torch.Tensor:
        kept, self._kept = self._kept, None
        if kept is None or self.bias is None:
            raise HookError(f"{self.ffn.path}: the FFN output was seen before its routing")
        b = self.ffn.value_bias
        y2 = y.reshape(-1, y.shape[-1]).float()
        if b is not None:
            y2 = y2 - b.detach().float()
        out = y2 + kept.to(self.bias.weight.dtype) @ self.bias.weight
        return out.to(y.dtype).reshape(y.shape)

    def _mask_hidden(self, h: torch.Tensor) -> torch.Tensor:
        q, self._q = self._q, None
        if q is None:
            raise HookError(f"{self.ffn.path}: the FFN input was not seen before its hidden activation")
        q2, h2 = q.reshape(-1, q.shape[-1]), h.reshape(-1, h.shape[-1])
        if q2.shape[0] != h2.shape[0]:
            raise HookError(f"{self.ffn.path}: {q2.shape[0]} input tokens but {h2.shape[0]} hidden rows")
        idx, keep = self.dispatch(q2, h2 if self.config.router in HIDDEN_ROUTERS else None)
        kept = self.kept_experts(idx, keep)
        if self.bias is not None:
            self._kept = kept
        mask = self.groups.neuron_mask(kept.to(h2.dtype))
        return (h2 * mask).reshape(h.shape)

    def _sparse_input(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = self.sparse_forward(x2, *self.dispatch(x2))
        self._pending = y.reshape(*x.shape[:-1], y.shape[-1])
        return x.narrow(-2, 0, 0)  # the dense path now runs on zero tokens

    def _sparse_output(self, y: torch.Tensor) -> torch.Tensor:
        out, self._pending = self._pending, None
        if out is None:
            raise HookError(f"{self.ffn.path}: sparse output requested before its input was seen")
        return out.to(y.dtype)

    # --- the sparse executor ------------------------------------------------------------------
    def _weight_stamp(self) -> tuple[tuple[torch.Tensor | None, ...], tuple[object, ...]]:
        """The live FFN tensors ``(keys, up, valuesᵀ, key bias, up bias)`` and a token that changes with them."""
        ffn = self.ffn
        tensors = (ffn.keys, ffn.up, ffn.values.t(), ffn.key_bias, ffn.up_bias)
        for t in tensors:
            self._check_whole(t)
        refs = (ffn.key_proj, ffn.up_proj, ffn.value_proj)  # effective (PEFT) weights are fresh tensors
        stamp: tuple[object, ...] = (
            *((t.data_ptr(), t._version) if t is not None else None for t in tensors),
            *(r.stamp for r in refs if r is not None),
        )
        return tensors, stamp

    def _grouped_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """Per expert: ``(keysᵀ [d, s], upᵀ [d, s] | empty, values-rows [s, d], key bias, up bias)``.

        The reference executor's layout (:meth:`sparse_forward_reference`): contiguous per-expert
        copies, rebuilt differentiably at every call.
        """
        ffn = self.ffn
        tensors, _ = self._weight_stamp()
        order = self.groups.order.to(ffn.keys.device)
        empty = ffn.keys.new_empty(0)
        keys, up, vals, kb, ub = (t.index_select(0, order) if t is not None else None for t in tensors)
        assert keys is not None and vals is not None
        sizes = self.groups.sizes.tolist()

        def chunks(t: torch.Tensor | None) -> list[torch.Tensor]:  # split: one cat in backward, not N slices
            return list(torch.split(t, sizes)) if t is not None else [empty] * len(sizes)

        return [
            (k.t().contiguous(), u.t().contiguous() if u.numel() else empty, v, kb_j, ub_j)
            for k, u, v, kb_j, ub_j in zip(chunks(keys), chunks(up), chunks(vals), chunks(kb), chunks(ub), strict=True)
        ]

    def _expert_blocks(self) -> _ExpertBlocks:
        """The FFN's weights regrouped per expert for the grouped executor (:class:`_ExpertBlocks`).

        Detached copies (gradients go through :class:`_SparseExperts`), cached while the weights
        are unchanged: the same storage and in-place version (an optimizer step updates them in
        place, which bumps the version) and, for PEFT layers, the same adapter state.
        """
        tensors, stamp = self._weight_stamp()
        cache = self._weight_cache
        if cache is not None and cache[0] == stamp:
            return cache[1]
        blocks = _ExpertBlocks.build(self.groups, *(t.detach() if t is not None else None for t in tensors))
        self._weight_cache = (stamp, blocks)
        return blocks

    def _uses_reference(self, x: torch.Tensor) -> bool:
        """Cases the grouped executor leaves to the reference one: dropout in training, autocast, mixed dtypes."""
        ffn = self.ffn
        if self.config.dropout > 0 and ffn.module.training:
            return True
        if torch.is_autocast_enabled(x.device.type):
            return True
        return any(t is not None and t.dtype != x.dtype for t in (ffn.keys, ffn.up, ffn.values))

    def sparse_forward(self, x: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``x [T, d_model]``, selected experts ``idx [T, k]`` -> ``y [T, d_model]`` from those experts only.

        One stable argsort groups the token -> expert assignments by expert. Each expert gathers
        its tokens into a reused buffer, runs one GEMM for its key (and up) columns, its
        activation, one GEMM for its value rows, and adds its output back (``index_add_``); the
        buffers are allocated once per call and every GEMM writes into them, so no per-expert
        allocation (page faults) remains, and one expert's working set stays in cache. Gradients
        come from a custom autograd function (:class:`_SparseExperts`) that replays the same
        per-expert loop backwards. ``keep`` (``[T, k]`` bool) leaves out assignments dropped by
        the capacity limit. Outputs and gradients equal :meth:`sparse_forward_reference`'s (and
        the masked executor's) up to fp32 summation order; dropout in training, autocast and
        weights of another dtype than ``x`` use the reference path.
        """
        if self._uses_reference(x):
            return self.sparse_forward_reference(x, idx, keep)
        ffn = self.ffn
        token, counts = _expert_plan(idx, keep, self.groups.num_experts)
        blocks = self._expert_blocks()
        tensors = (ffn.keys, ffn.up, ffn.values, ffn.key_bias, ffn.up_bias)
        if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
            out = _SparseExperts.apply(x, token, counts, blocks, ffn.activation, *tensors)  # type: ignore[no-untyped-call]
            assert isinstance(out, torch.Tensor)
        else:
            out = _grouped_forward(x, token, counts, blocks, ffn.activation, save=False)[0]
        return self._add_output_bias(out, idx, keep)

    def sparse_forward_reference(
        self, x: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reference sparse executor (autograd over per-expert gathers, ``addmm`` and ``index_add_``).

        Same contract as :meth:`sparse_forward`; it is what that method falls back on (dropout in
        training, autocast) and what the tests compare it with.
        """
        ffn = self.ffn
        t = idx.shape[0]
        token, per_expert = _expert_plan(idx, keep, self.groups.num_experts)
        p = self.config.dropout if ffn.module.training else 0.0
        out = torch.zeros(t, ffn.d_model, dtype=x.dtype, device=x.device)
        start = 0
        for (keys_t, up_t, vals, kb, ub), n_tok in zip(self._grouped_weights(), per_expert, strict=True):
            if n_tok == 0:
                continue
            tok = token[start : start + n_tok]
            start += n_tok
            rows = x.index_select(0, tok)
            z = torch.addmm(kb, rows, keys_t) if kb.numel() else rows @ keys_t
            h = ffn.activation(F.dropout(z, p, training=True) if p > 0 else z)
            if up_t.numel():
                h = h * (torch.addmm(ub, rows, up_t) if ub.numel() else rows @ up_t)
            out.index_add_(0, tok, (h @ vals).to(out.dtype))
        return self._add_output_bias(out, idx, keep)

    def _add_output_bias(self, out: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``out [T, d_model]`` plus the output bias: the per-expert copies of the kept experts, or ``b_out``."""
        if self.bias is not None:
            kept = self.kept_experts(idx, keep)
            return out + (kept.to(self.bias.weight.dtype) @ self.bias.weight).to(out.dtype)
        b = self.ffn.value_bias
        return out + b if b is not None else out

    # --- telemetry ----------------------------------------------------------------------------
    def stats(self) -> RoutingStats:
        """Telemetry since the last call (then reset)."""
        total = self.counts.sum().clamp(min=1).double()
        load = self.counts.double() / total
        nz = load[load > 0]
        n = self.config.num_experts
        entropy = float(-(nz * nz.log()).sum() / math.log(n)) if n > 1 else 1.0
        stability = None if self.previous_load is None else float(1 - 0.5 * (load - self.previous_load).abs().sum())
        dropped = self.dropped / max(1, self.tokens * self.config.top_k)
        out = RoutingStats(
            tokens=self.tokens, load=load.tolist(), entropy=entropy, stability=stability, dropped=dropped
        )
        self.previous_load = load
        self.counts.zero_()
        self.tokens = 0
        self.dropped = 0
        return out


# --- the grouped sparse executor ------------------------------------------------------------------
def _expert_plan(idx: torch.Tensor, keep: torch.Tensor | None, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """``idx [T, k]`` (and ``keep [T, k]`` bool) -> token of every kept assignment grouped by expert, per-expert counts.

    One stable argsort: within an expert, tokens stay in ascending order (the reference's order).
    """
    k = int(idx.shape[1])
    flat = idx.reshape(-1)
    if keep is None:
        token = torch.div(torch.argsort(flat, stable=True), k, rounding_mode="floor")
    else:
        kept_pos = torch.nonzero(keep.reshape(-1)).flatten()
        flat = flat[kept_pos]
        token = torch.div(kept_pos[torch.argsort(flat, stable=True)], k, rounding_mode="floor")
    counts: list[int] = torch.bincount(flat, minlength=num_experts).tolist()
    return token, counts


@dataclass(frozen=True)
class _ExpertBlocks:
    """One FFN's weights regrouped per expert (detached copies) and the index maps back.

    Attributes:
        first: per expert ``[d_model, w_e]``: its key columns, then (gated) its up columns
            (``w_e = s_e`` or ``2 s_e``), contiguous, for ``rows @ first``.
        first_bias: per expert ``[w_e]`` (key bias, then up bias; zeros for a missing one) or None.
        second: per expert ``[s_e, d_model]``: its value rows (views of one contiguous tensor).
        sizes: ``s_e``, neurons per expert.
        gated: whether the FFN has an up projection.
        key_rows: ``[d_ff]``: row of neuron ``i``'s key in the stacked first-layer blocks
            (``first[e]ᵀ`` stacked over experts), to map their gradients back.
        up_rows: ``[d_ff]``: the same for its up row (gated), else None.
        value_rows: ``[d_ff]``: row of neuron ``i``'s value in the stacked ``second`` blocks.
    """

    first: list[torch.Tensor]
    first_bias: list[torch.Tensor | None]
    second: list[torch.Tensor]
    sizes: list[int]
    gated: bool
    key_rows: torch.Tensor
    up_rows: torch.Tensor | None
    value_rows: torch.Tensor

    @property
    def widths(self) -> list[int]:
        """``w_e``: first-layer columns per expert."""
        return [2 * s for s in self.sizes] if self.gated else list(self.sizes)

    @staticmethod
    def build(
        groups: ExpertGroups,
        keys: torch.Tensor | None,
        up: torch.Tensor | None,
        values_t: torch.Tensor | None,
        key_bias: torch.Tensor | None,
        up_bias: torch.Tensor | None,
    ) -> _ExpertBlocks:
        """Regroup ``keys / up [d_ff, d]``, ``values_t [d_ff, d_out]`` and the biases ``[d_ff]`` per expert."""
        assert keys is not None and values_t is not None
        device = keys.device
        d_ff = int(keys.shape[0])
        order = groups.order.to(device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(d_ff, device=device)
        sizes = groups.sizes.tolist()
        gated = up is not None
        if gated:
            assert up is not None
            # stacked layout: expert e's key rows, then its up rows; position j of the grouped order
            # (expert e, offset o_e) has its key at j + o_e and its up row at j + o_e + s_e
            expert_of = groups.labels.to(device)[order]
            offset = groups.offsets.to(device)[:-1]
            key_pos = torch.arange(d_ff, device=device) + offset[expert_of]
            up_pos = key_pos + groups.sizes.to(device)[expert_of]
            source = torch.empty(2 * d_ff, dtype=torch.long, device=device)
            source[key_pos], source[up_pos] = order, order + d_ff
            stacked = torch.cat([keys, up]).index_select(0, source)
            key_rows, up_rows = key_pos[inverse], up_pos[inverse]
            widths = [2 * s for s in sizes]
            if key_bias is None and up_bias is None:
                bias = None
            else:
                kb = key_bias if key_bias is not None else keys.new_zeros(d_ff)
                ub = up_bias if up_bias is not None else keys.new_zeros(d_ff)
                bias = torch.cat([kb, ub]).index_select(0, source)
        else:
            stacked = keys.index_select(0, order)
            key_rows, up_rows = inverse, None
            widths = list(sizes)
            bias = key_bias.index_select(0, order) if key_bias is not None else None
        first = [b.t().contiguous() for b in torch.split(stacked, widths)]
        first_bias: list[torch.Tensor | None] = (
            list(torch.split(bias, widths)) if bias is not None else [None] * len(sizes)
        )
        second = list(torch.split(values_t.index_select(0, order), sizes))
        return _ExpertBlocks(first, first_bias, second, sizes, gated, key_rows, up_rows, inverse)


def _hidden(z: torch.Tensor, size: int, gated: bool, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """First-layer output ``z [n, w]`` -> hidden ``[n, s]``: ``σ(z)``, or ``σ(z[:, :s]) ⊙ z[:, s:]`` (gated)."""
    return act(z[:, :size]) * z[:, size:] if gated else act(z)


def _grouped_forward(
    x: torch.Tensor,
    token: torch.Tensor,
    counts: list[int],
    blocks: _ExpertBlocks,
    act: Callable[[torch.Tensor], torch.Tensor],
    *,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [T, d]`` -> ``(y [T, d_out]`` without the output bias, every expert's first-layer output or None).

    The first-layer outputs (``save=True``) are one flat tensor: expert ``e``'s ``[n_e, w_e]`` block
    after the previous experts' (what the backward replays from).
    """
    t, d = int(x.shape[0]), int(x.shape[1])
    d_out = int(blocks.second[0].shape[1])
    out = x.new_zeros(t, d_out)
    widths = blocks.widths
    nmax = max(counts, default=0)
    if nmax == 0:
        return out, (x.new_empty(0) if save else None)
    xbuf, ybuf = x.new_empty(nmax * d), x.new_empty(nmax * d_out)
    zbuf = x.new_empty(sum(n * w for n, w in zip(counts, widths, strict=True)) if save else nmax * max(widths))
    start = zoff = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token[start : start + n]
        start += n
        w = widths[e]
        rows = torch.index_select(x, 0, tok, out=xbuf[: n * d].view(n, d))
        z = zbuf[zoff : zoff + n * w].view(n, w)
        zoff += n * w if save else 0
        bias = blocks.first_bias[e]
        if bias is None:
            torch.mm(rows, blocks.first[e], out=z)
        else:
            torch.addmm(bias, rows, blocks.first[e], out=z)
        h = _hidden(z, blocks.sizes[e], blocks.gated, act)
        out.index_add_(0, tok, torch.mm(h, blocks.second[e], out=ybuf[: n * d_out].view(n, d_out)))
    return out, (zbuf if save else None)


class _SparseExperts(torch.autograd.Function):
    """The grouped sparse executor with its own backward (the same per-expert loop, reversed).

    ``forward(x, token, counts, blocks, act, keys, up, values, key_bias, up_bias) -> y [T, d_out]``
    (no output bias). The weights are passed for their gradients only: the forward computes with
    ``blocks`` (their regrouped copies). Per expert the backward gathers the output gradient of
    its tokens, recomputes σ from the saved first-layer output, and runs three GEMMs: value-row
    gradient ``hᵀ g``, hidden gradient ``g Vᵀ``, first-layer gradient ``dzᵀ x`` (and ``dz W`` for
    the input, added back with ``index_add_``); gradients are then mapped back to the neuron order
    with one ``index_select`` per tensor. σ's derivative comes from autograd on σ itself.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        token: torch.Tensor,
        counts: list[int],
        blocks: _ExpertBlocks,
        act: Callable[[torch.Tensor], torch.Tensor],
        keys: torch.Tensor,
        up: torch.Tensor | None,
        values: torch.Tensor,
        key_bias: torch.Tensor | None,
        up_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        out, z = _grouped_forward(x, token, counts, blocks, act, save=True)
        assert z is not None
        ctx.save_for_backward(x, token, z)
        ctx.counts, ctx.blocks, ctx.act = counts, blocks, act  # type: ignore[attr-defined]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, token, zsaved = ctx.saved_tensors  # type: ignore[attr-defined]
        counts: list[int] = ctx.counts  # type: ignore[attr-defined]
        blocks: _ExpertBlocks = ctx.blocks  # type: ignore[attr-defined]
        act: Callable[[torch.Tensor], torch.Tensor] = ctx.act  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        need_x, need_second = bool(need[0]), bool(need[7])
        need_bias = bool(need[8] or need[9])
        need_first = bool(need[5] or need[6]) or need_bias
        need_dz = need_x or need_first
        gy = gy.contiguous()
        d, d_out = int(x.shape[1]), int(gy.shape[1])
        sizes, widths = blocks.sizes, blocks.widths
        nmax = max(counts, default=0)
        dx = torch.zeros_like(x) if need_x else None
        dfirst = x.new_empty(sum(widths), d) if need[5] or need[6] else None
        dbias = x.new_empty(sum(widths)) if need_bias else None
        dsecond = x.new_empty(sum(sizes), d_out) if need_second else None
        gbuf = x.new_empty(nmax * d_out)
        xbuf = x.new_empty(nmax * d) if dfirst is not None or need_x else None
        dhbuf = x.new_empty(nmax * max(sizes)) if need_dz else None
        dzbuf = x.new_empty(nmax * max(widths)) if need_dz and blocks.gated else None
        start = zoff = off1 = off2 = 0
        for e, n in enumerate(counts):
            s, w = sizes[e], widths[e]
            first_rows, second_rows = slice(off1, off1 + w), slice(off2, off2 + s)
            off1, off2 = off1 + w, off2 + s
            if n == 0:
                for buf, rows_e in ((dfirst, first_rows), (dbias, first_rows), (dsecond, second_rows)):
                    if buf is not None:
                        buf[rows_e] = 0
                continue
            tok = token[start : start + n]
            start += n
            z = zsaved[zoff : zoff + n * w].view(n, w)
            zoff += n * w
            g = torch.index_select(gy, 0, tok, out=gbuf[: n * d_out].view(n, d_out))
            zg = z[:, :s] if blocks.gated else z
            if need_dz:
                with torch.enable_grad():
                    leaf = zg.detach().requires_grad_(True)
                    a = act(leaf)
            else:
                a = act(zg)
            h = a.detach() * z[:, s:] if blocks.gated else a.detach()
            if dsecond is not None:
                torch.mm(h.t(), g, out=dsecond[second_rows])
            if not need_dz:
                continue
            assert dhbuf is not None
            dh = torch.mm(g, blocks.second[e].t(), out=dhbuf[: n * s].view(n, s))
            if blocks.gated:
                assert dzbuf is not None
                dz = dzbuf[: n * w].view(n, w)
                torch.mul(dh, a.detach(), out=dz[:, s:])
                (da,) = torch.autograd.grad(a, leaf, dh * z[:, s:])
                dz[:, :s] = da
            else:
                (dz,) = torch.autograd.grad(a, leaf, dh)
            if dbias is not None:
                torch.sum(dz, 0, out=dbias[first_rows])
            if dfirst is not None or need_x:
                assert xbuf is not None
                if dfirst is not None:
                    rows = torch.index_select(x, 0, tok, out=xbuf[: n * d].view(n, d))
                    torch.mm(dz.t(), rows, out=dfirst[first_rows])
                if dx is not None:
                    dx.index_add_(0, tok, torch.mm(dz, blocks.first[e].t(), out=xbuf[: n * d].view(n, d)))
        grads: list[torch.Tensor | None] = [dx, None, None, None, None]
        up_rows = blocks.up_rows
        grads.append(dfirst.index_select(0, blocks.key_rows) if dfirst is not None and need[5] else None)
        grads.append(
            dfirst.index_select(0, up_rows) if dfirst is not None and need[6] and up_rows is not None else None
        )
        grads.append(dsecond.index_select(0, blocks.value_rows).t() if dsecond is not None else None)
        grads.append(dbias.index_select(0, blocks.key_rows) if dbias is not None and need[8] else None)
        grads.append(dbias.index_select(0, up_rows) if dbias is not None and need[9] and up_rows is not None else None)
        return tuple(grads)
