"""Train the neurons of several independent edits in one vectorised pass.

Each edit owns one or more new neurons, applied only to its own batch rows (its ``views`` copies),
with its own loss, gradient clipping, learning rate, plateau halving and stopping; training several
edits together therefore gives each the same result as training it alone (up to float rounding).

Loss of edit e (Transformer-Patcher, arXiv 2301.09785), with a the new neuron's pre-activation:

    l_e = task loss on the views (label-smoothed CE; minus entropy_weight·entropy for classification)
    l_a = mean top-k_a over views×positions of exp(−a_e)
    l_m = mean top-k_m over memory of exp(a_m − β) + mean top-k_m of exp(a_m − ā_e + γ)
    L   = l_e + α·l_a + μ·l_m          (neuron terms averaged over the edit's neurons)

``memory_loss='per_view'`` takes both top-k over memory × views with each view's own activation
and ``pool_neurons`` one top-k over all of an edit's neurons (the reference code's losses).

Example:
    >>> from modulart.patcher.train import VectorAdam
    >>> import torch
    >>> p = torch.ones(2, 3, requires_grad=True)
    >>> opt = VectorAdam([p], lr=torch.tensor([0.1, 0.0]), weight_decay=0.0)
    >>> p.grad = torch.ones(2, 3)
    >>> opt.step()
    >>> p.detach()[:, 0].tolist()  # the second row has lr 0
    [0.8999999761581421, 1.0]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modulart.core.errors import ConfigError, NonFiniteError, RankMismatchError
from modulart.core.fingerprint import fingerprint
from modulart.core.ranks import broadcast_, rank_groups
from modulart.patcher.bank import PatchBank, Pending
from modulart.patcher.config import PatcherConfig
from modulart.patcher.records import content_hash
from modulart.patcher.task import Example, collate, correct, per_example_loss, run_model

__all__ = [
    "CleanCheck",
    "NeuronSet",
    "TrainOutcome",
    "VectorAdam",
    "agree_across_ranks",
    "clean_check",
    "init_neurons",
    "model_digest",
    "train_edits",
    "validation_memory_loss",
]

_MAX_EXP = 60.0


class VectorAdam:
    """Adam (L2 weight decay added to the gradient) with one learning rate per leading row."""

    def __init__(self, params: Sequence[torch.Tensor], lr: torch.Tensor, weight_decay: float) -> None:
        self.params, self.lr, self.wd = list(params), lr, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.t += 1
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            g = p.grad + self.wd * p
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            lr = self.lr.reshape(-1, *([1] * (p.dim() - 1))).to(p.dtype)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + eps))


# --- distributed models ---------------------------------------------------------------------
# An edit is rank-local: the patcher runs the model it was applied to, never a DDP wrapper, and
# the same edit on the same weights gives the same neurons on every rank (seeds follow the edit's
# content). Under FSDP2 (DTensor parameters) every forward is a collective, so every rank must run
# the same edits for the same number of steps: the edits are checked to agree before anything runs,
# the stopping decisions of the first rank are followed, and its trained neurons are committed.


def model_digest(model: nn.Module) -> str:
    """``fingerprint(model).digest``: of the whole parameters, FSDP2 shards gathered (collective)."""
    return fingerprint(model).digest


def agree_across_ranks(model: nn.Module, examples: Sequence[Example], what: str = "edit") -> None:
    """Check that every rank of a sharded ``model`` edits exactly ``examples`` (one all-gather).

    A model local to its rank (no FSDP2 ``DTensor`` parameters) runs no collective.

    Raises:
        RankMismatchError: the ranks were given different edits (they would otherwise hang in the
            next forward's all-gather, or commit different patches).
    """
    groups = rank_groups(model)
    if not groups:
        return
    digest = content_hash([(ex.inputs, ex.target, ex.positional) for ex in examples])
    mine = torch.tensor([int(digest[i : i + 8], 16) for i in range(0, 16, 8)], dtype=torch.int64)
    for group in groups:
        size = torch.distributed.get_world_size(group)
        gathered = [torch.empty_like(mine) for _ in range(size)]
        torch.distributed.all_gather(gathered, mine, group=group)
        differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differ:
            raise RankMismatchError(
                f"{what}: the model is sharded by FSDP2 and ranks {differ} of its mesh were given other edits than "
                "rank 0; an edit of a sharded model runs on every rank together: pass the same (inputs, target) "
                "pairs on every rank (e.g. gather every rank's mistakes first)"
            )


@dataclass
class NeuronSet:
    """Trainable tensors of the new neurons, rows grouped by edit (``owner[j]`` = edit index)."""

    keys: torch.Tensor
    key_bias: torch.Tensor
    scale: torch.Tensor
    direction: torch.Tensor
    owner: torch.Tensor
    positions: list[list[int]]
    up: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None

    @property
    def values(self) -> torch.Tensor:
        """``[Pn, d_out]`` = u ⊙ s."""
        return self.direction * self.scale

    def params(self) -> list[torch.Tensor]:
        extra = [self.up, self.up_bias] if self.up is not None and self.up_bias is not None else []
        return [self.keys, self.key_bias, self.direction, self.scale, *extra]


@dataclass
class TrainOutcome:
    """Result of training one edit's neurons."""

    success: bool
    steps: int
    losses: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    margins: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def init_neurons(
    clean_q: Sequence[torch.Tensor],
    positions: Sequence[Sequence[Sequence[int]]],
    bank: PatchBank,
    cfg: PatcherConfig,
    seeds: Sequence[int],
) -> NeuronSet:
    """k = q̄/‖q̄‖² (q̄ = mean FFN input over the neuron's positions), b = 0, v = u ⊙ s.

    Both the direction ``u ~ N(0, I)`` and the per-entry scale ``s`` (starting at ``value_scale``,
    0 for the zero init) train: with ``s`` alone Adam moves ``v`` by ``lr`` per entry per step, about
    0.1% of its size at ``s = 10``, and edits on a post-LayerNorm FFN then need thousands of steps.

    ``clean_q[e]`` is edit e's FFN input ``[L, d_model]``; ``positions[e]`` its neurons' positions;
    ``seeds[e]`` seeds its value directions, so an edit starts the same whatever it is batched with.
    """
    keys, owner, flat_pos, dirs = [], [], [], []
    for e, (q, neurons) in enumerate(zip(clean_q, positions, strict=True)):
        dirs.append(torch.randn(len(neurons), bank.d_out, generator=torch.Generator().manual_seed(seeds[e])))
        for pos in neurons:
            qbar = q[list(pos)].float().mean(0)
            keys.append(qbar / qbar.pow(2).sum().clamp_min(1e-12))
            owner.append(e)
            flat_pos.append(list(pos))
    dev = bank.device
    k = torch.stack(keys).to(dev)
    n = k.shape[0]
    direction = torch.cat(dirs).to(dev)
    s0 = cfg.value_scale if cfg.init == "reference" else 0.0
    ns = NeuronSet(
        keys=k.clone().requires_grad_(True),
        key_bias=torch.zeros(n, device=dev, requires_grad=True),
        scale=torch.full((n, bank.d_out), float(s0), device=dev, requires_grad=True),
        direction=direction.requires_grad_(True),
        owner=torch.tensor(owner, device=dev),
        positions=flat_pos,
    )
    if bank.gated:
        ns.up = k.clone().requires_grad_(True)
        ns.up_bias = torch.zeros(n, device=dev, requires_grad=True)
    return ns


def _top_mean(x: torch.Tensor, k: int, owner: torch.Tensor, n_edits: int, pooled: bool) -> torch.Tensor:
    """Mean of the top-``k`` of ``x [M, Pn, W]``: per neuron (over M·W) then averaged over each edit's
    neurons, or ``pooled`` over all of an edit's neurons together (over M·W·|J_e|). Returns ``[n_edits]``."""
    if not pooled:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        per = flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)
        return _per_edit(per, owner, n_edits)
    out = []
    for e in range(n_edits):
        vals = x[:, owner == e].reshape(-1)
        out.append(vals.topk(min(k, vals.numel())).values.mean())
    return torch.stack(out)


def _memory_terms(
    a_m: torch.Tensor, a_views: torch.Tensor, ns: NeuronSet, n_edits: int, cfg: PatcherConfig
) -> torch.Tensor:
    """l_m ``[n_edits]`` from memory activations ``a_m [N, Pn]`` and edit activations ``a_views [Pn, W]``.

    ``W`` = 1 (``memory_loss='mean_view'``: the view mean) or the views (``'per_view'``: every
    (memory vector, view) pair is one entry, the silence term's entries repeat per view).
    """
    w = a_views.shape[1]
    silence = (a_m - cfg.silence_margin).clamp(max=_MAX_EXP).exp()[:, :, None].expand(-1, -1, w)
    margin = (a_m[:, :, None] - a_views[None] + cfg.edit_margin).clamp(max=_MAX_EXP).exp()  # [N, Pn, W]
    k, pooled = cfg.memory_top_k, cfg.pool_neurons
    return _top_mean(silence, k, ns.owner, n_edits, pooled) + _top_mean(margin, k, ns.owner, n_edits, pooled)


def _edit_views(a_e: torch.Tensor, a_v: torch.Tensor, cfg: PatcherConfig) -> torch.Tensor:
    """The edit activations the margin term compares against: ``[Pn, 1]`` (view mean) or ``[Pn, V]``."""
    return a_v if cfg.memory_loss == "per_view" else a_e[:, None]


def _neuron_terms(
    a: torch.Tensor, ns: NeuronSet, views: int, memory: torch.Tensor, cfg: PatcherConfig, n_edits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per edit l_a and l_m ``[n_edits]``; per neuron the mean edit activation ā_e ``[Pn]``; memory
    activations ``[N, Pn]``. ``a [B, L, Pn]`` are the new neurons' pre-activations on the views."""
    n, seq = ns.keys.shape[0], a.shape[1]
    dev = a.device
    rows = ns.owner[:, None] * views + torch.arange(views, device=dev)[None]  # [Pn, V]
    cols = torch.arange(n, device=dev)
    sel = a[rows[:, :, None], torch.arange(seq, device=dev)[None, None], cols[:, None, None]]  # [Pn, V, L]
    pos_mask = torch.zeros(n, seq, dtype=torch.bool, device=dev)
    for j, pos in enumerate(ns.positions):
        pos_mask[j, pos] = True
    valid = pos_mask[:, None, :].expand_as(sel)
    count = valid.flatten(1).sum(1).float()  # [Pn]
    masked = sel * valid
    a_e = masked.flatten(1).sum(1) / count
    a_v = masked.sum(2) / valid.sum(2).float()  # [Pn, V]: each view's activation (mean over positions)
    neg = torch.where(valid, (-sel).clamp(max=_MAX_EXP).exp(), torch.zeros_like(sel)).flatten(1)
    k_a = cfg.activation_top_k
    if cfg.pool_neurons:
        l_a = torch.stack(
            [
                neg[ns.owner == e].reshape(-1).topk(min(k_a, int((ns.owner == e).sum()) * neg.shape[1])).values.sum()
                / count[ns.owner == e].sum().clamp(max=k_a)
                for e in range(n_edits)
            ]
        )
    else:
        per = neg.topk(min(k_a, neg.shape[1]), dim=1).values.sum(1) / count.clamp(max=k_a)
        l_a = _per_edit(per, ns.owner, n_edits)
    a_m = memory @ ns.keys.T + ns.key_bias  # [N, Pn]
    l_m = _memory_terms(a_m, _edit_views(a_e, a_v, cfg), ns, n_edits, cfg)
    return l_a, l_m, a_e, a_m


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` entropy of the softmax of classification logits ``[B, C]`` (fp32)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _edit_loss(logits: torch.Tensor, examples: Sequence[Example], cfg: PatcherConfig) -> torch.Tensor:
    """``[B]`` edit loss: label-smoothed CE, minus ``entropy_weight`` × entropy (classification)."""
    loss = per_example_loss(logits, examples, cfg.task, cfg.smoothing)
    if cfg.entropy_weight > 0:
        loss = loss - cfg.entropy_weight * _entropy(logits)
    return loss


def _per_edit(values: torch.Tensor, owner: torch.Tensor, n_edits: int) -> torch.Tensor:
    total = values.new_zeros(n_edits).index_add(0, owner, values)
    count = values.new_zeros(n_edits).index_add(0, owner, torch.ones_like(values))
    return total / count


def _clip_(ns: NeuronSet, n_edits: int, max_norm: float) -> None:
    if max_norm <= 0:
        return
    sq = torch.zeros(ns.keys.shape[0], device=ns.keys.device)
    for p in ns.params():
        if p.grad is not None:
            sq += p.grad.pow(2).reshape(p.shape[0], -1).sum(1)
    norm = sq.new_zeros(n_edits).index_add(0, ns.owner, sq).sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)[ns.owner]
    for p in ns.params():
        if p.grad is not None:
            p.grad.mul_(factor.reshape(-1, *([1] * (p.dim() - 1))))


def _margins(a_e: torch.Tensor, a_m: torch.Tensor, cfg: PatcherConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron: whether both margins hold, and the max memory activation."""
    top = a_m.max(0).values
    ok = (top <= cfg.silence_margin) & (a_e - top >= cfg.edit_margin)
    return ok, top


@dataclass
class CleanCheck:
    """Eval-mode check of some edits with their pending neurons (see :func:`clean_check`).

    Attributes:
        right: ``[n]`` bool, the model is right on each checked edit.
        a_e: ``[Pn]`` each neuron's mean pre-activation over its positions (NaN: not checked).
        loss: ``[n]`` the eval-mode edit loss (the training edit loss: smoothing, entropy term).
    """

    right: torch.Tensor
    a_e: torch.Tensor
    loss: torch.Tensor


class _Plateau:
    """Per-edit learning rates: the default plateau halving or the reference code's rule.

    ``train_plateau``: halve after ``plateau_patience`` steps whose training loss did not fall by
    0.01 %, down to ``min_lr``. ``reference``: at each check (every ``check_every`` steps) on the
    eval-mode edit loss, a check is bad unless the loss fell 5 % below the best so far; after two
    bad checks in a row the rate halves (unless that changes it by less than 1e-8) and the count
    restarts.
    """

    def __init__(self, n_edits: int, cfg: PatcherConfig, dev: torch.device) -> None:
        self.cfg = cfg
        self.lr = torch.full((n_edits,), float(cfg.lr), device=dev)
        self.best = torch.full((n_edits,), math.inf, device=dev)
        self.bad = torch.zeros(n_edits, dtype=torch.long, device=dev)

    def train_loss(self, loss: torch.Tensor, active: torch.Tensor) -> None:
        if self.cfg.lr_schedule != "train_plateau":
            return
        improved = loss < self.best * (1 - 1e-4)
        self.best = torch.where(improved, loss, self.best)
        self.bad = torch.where(improved, torch.zeros_like(self.bad), self.bad + 1)
        halve = active & (self.bad >= self.cfg.plateau_patience)
        self.lr = torch.where(halve, (self.lr / 2).clamp(min=self.cfg.min_lr), self.lr)
        self.bad = torch.where(halve, torch.zeros_like(self.bad), self.bad)

    def check_loss(self, idx: list[int], loss: torch.Tensor) -> None:
        for e, v in zip(idx, loss.tolist(), strict=True):
            if v < float(self.best[e]) * (1 - 0.05):
                self.best[e], self.bad[e] = v, 0
                continue
            self.bad[e] += 1
            if int(self.bad[e]) > 1:
                if float(self.lr[e]) * 0.5 > 1e-8:
                    self.lr[e] = self.lr[e] * 0.5
                self.bad[e] = 0


class _ValidationStop:
    """The reference code's stopping: at each check past ``check_start`` where the edit is right,
    record its memory loss on the validation memory; stop when the latest did not fall 0.001 below
    the best recorded (so at the second such check at the earliest)."""

    def __init__(self, n_edits: int) -> None:
        self.history: list[list[float]] = [[] for _ in range(n_edits)]

    def stop(self, e: int, value: float) -> bool:
        h = self.history[e]
        h.append(value)
        best = 0
        for i, v in enumerate(h):
            if v < h[best] - 1e-3:
                best = i
        return best < len(h) - 1


def validation_memory_loss(
    a_clean: torch.Tensor, ns: NeuronSet, validation_memory: torch.Tensor, idx: list[int], cfg: PatcherConfig
) -> torch.Tensor:
    """``[len(idx)]`` memory loss l_m of edits ``idx`` on ``validation_memory [N, d]`` in eval mode.

    ``a_clean [Pn]`` are the eval-mode edit activations; with ``memory_loss='per_view'`` they stand
    for ``views`` identical eval-mode views, as in the reference code's validation batch.
    """
    w = cfg.views if cfg.memory_loss == "per_view" else 1
    a_vm = validation_memory @ ns.keys.T + ns.key_bias  # [N, Pn]
    l_m = _memory_terms(a_vm, a_clean[:, None].expand(-1, w), ns, int(ns.owner.max()) + 1, cfg)
    return l_m[torch.tensor(idx, device=l_m.device)]


def train_edits(
    model: nn.Module,
    bank: PatchBank,
    examples: Sequence[Example],
    ns: NeuronSet,
    memory: torch.Tensor,
    cfg: PatcherConfig,
    run: Callable[[dict[str, torch.Tensor], bool], torch.Tensor],
    clean_check: Callable[[list[int]], CleanCheck],
    seed: int,
    validation_memory: torch.Tensor | None = None,
) -> list[TrainOutcome]:
    """Train ``ns`` (the new neurons of ``examples``) with the base model frozen.

    Every stopping decision is taken on the neurons that are then stored: each iteration first
    evaluates the current neurons (training loss, and when an edit may stop the eval-mode check),
    stops the edits that pass, and only then takes the optimizer step of the others. ``steps`` is
    the number of optimizer steps an edit's neurons took.

    Args:
        memory: ``[N, d]`` FFN inputs of ordinary inputs (the memory loss).
        run: ``run(batch, positional) -> logits`` of the model (hooks active).
        clean_check: ``clean_check(edit_indices) -> CleanCheck`` in eval mode with the pending
            neurons of those edits only.
        validation_memory: ``[N_v, d]``, needed by ``stop_rule='validation'``.

    The model's ``requires_grad`` flags and train/eval mode are restored afterwards, and
    ``bank.pending`` is cleared whatever happens.

    Raises:
        ConfigError: ``stop_rule='validation'`` without a validation memory.
        NonFiniteError: a loss became NaN or inf (no patch is added).
    """
    if cfg.stop_rule == "validation" and not cfg.fixed_steps and validation_memory is None:
        raise ConfigError(
            "PatcherConfig.stop_rule = 'validation' stops on the memory loss of a validation memory: call "
            "handle.set_validation_memory(ordinary_inputs) first (or use stop_rule='margins')"
        )
    n_edits, views = len(examples), cfg.views
    dev = bank.device
    start = time.perf_counter()
    batch = collate(examples, repeat=views)
    rep = [e for e in examples for _ in range(views)]
    rows_mask = (torch.arange(n_edits * views, device=dev)[:, None] // views == ns.owner[None]).float()
    rates = _Plateau(n_edits, cfg, dev)
    groups = rank_groups(model)  # FSDP2: every rank follows the first rank's stopping decisions
    stopper = _Stopper(
        cfg, ns, clean_check, rates, _ValidationStop(n_edits), validation_memory, lambda t: broadcast_([t], groups, dev)
    )
    active = torch.ones(n_edits, dtype=torch.bool, device=dev)
    opt = VectorAdam(ns.params(), rates.lr[ns.owner], cfg.weight_decay)
    # settling: steps since the loss last fell by 1% (coarser than the plateau rule, not reset by halving)
    settle_best = torch.full((n_edits,), math.inf, device=dev)
    since_best = torch.zeros(n_edits, dtype=torch.long, device=dev)
    steps = torch.zeros(n_edits, dtype=torch.long)
    losses: list[list[float]] = [[] for _ in range(n_edits)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, desc="patch", unit="step", leave=False, disable=_no_bar(cfg.progress))
    devices = [dev] if dev.type == "cuda" else []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for it in range(cfg.max_steps):
                model.train(cfg.dropout_views)
                bank.pending = Pending(ns.keys, ns.key_bias, ns.values, rows_mask, ns.up, ns.up_bias)
                logits = run(batch, examples[0].positional)
                a = bank.pending.pre_activations
                assert a is not None, "the patch hook did not run"
                if a.dim() == 2:
                    a = a[:, None]
                l_e = _edit_loss(logits, rep, cfg).reshape(n_edits, views).mean(1)
                l_a, l_m, a_e, a_m = _neuron_terms(a, ns, views, memory, cfg, n_edits)
                per_edit = l_e + cfg.activation_weight * l_a + cfg.mu * l_m
                if not bool(per_edit.detach()[active].isfinite().all()):
                    bad = [e for e in active.nonzero().flatten().tolist() if not bool(per_edit[e].isfinite())]
                    raise NonFiniteError(
                        f"patch training: the loss of edit(s) {bad} is NaN or inf at step {int(steps.max())} "
                        f"(the model's outputs on the edit, or the config's lr / weights); no patch was added"
                    )
                pe = per_edit.detach()
                for e in active.nonzero().flatten().tolist():
                    losses[e].append(float(pe[e]))
                if not cfg.fixed_steps:
                    fell = pe < settle_best * (1 - 1e-2)
                    settle_best = torch.where(fell, pe, settle_best)
                    since_best = torch.where(fell, torch.zeros_like(since_best), since_best + 1)
                    stop = stopper(it, logits, rep, a_e, a_m, active, since_best)
                    broadcast_([stop], groups, dev)
                    active &= ~stop
                    if not bool(active.any()):
                        break
                # gradients of the new neurons only: nothing accumulates into the model's .grad (under
                # FSDP2 the frozen flags reach only the parameters registered at the time, and a
                # backward() would reduce-scatter edit gradients into the others)
                params = ns.params()
                grads = torch.autograd.grad((per_edit * active).sum(), params, allow_unused=True)
                for t, g in zip(params, grads, strict=True):
                    t.grad = g
                _clip_(ns, n_edits, cfg.grad_clip)
                opt.lr = (rates.lr * active)[ns.owner]
                opt.step()
                steps[active.cpu()] += 1
                rates.train_loss(pe, active)
                bar.update(1)
    finally:
        bank.pending = None
        bar.close()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    broadcast_(ns.params(), groups, dev)  # the first rank's neurons, bitwise, on every rank
    final = clean_check(list(range(n_edits)))
    a_clean = final.a_e
    with torch.no_grad():
        a_m = memory @ ns.keys.T + ns.key_bias
        _, top = _margins(a_clean, a_m, cfg)
    seconds = (time.perf_counter() - start) / n_edits
    out = []
    for e in range(n_edits):
        rows = (ns.owner == e).nonzero().flatten().tolist()
        margins = [
            {
                "edit_activation": float(a_clean[j]),
                "max_memory_activation": float(top[j]),
                "edit_margin": float(a_clean[j] - top[j] - cfg.edit_margin),
                "silence_margin": float(cfg.silence_margin - top[j]),
            }
            for j in rows
        ]
        out.append(TrainOutcome(bool(final.right[e]), int(steps[e]), losses[e], rows, margins, seconds))
    return out


@dataclass
class _Stopper:
    """Which active edits stop now, their current neurons (after ``it`` steps) being final.

    ``stop_rule='margins'``: right on every training view and, in eval mode, right with both
    margins holding on the eval-mode activations (or, with ``stop_patience``, settled). The
    reference rule: at checks (``it`` a multiple of ``check_every``, ``it - 1 >= check_start``),
    right in eval mode and the validation-memory loss no longer falling. The reference learning
    rate rule acts at the same checks. ``agree`` makes every rank of a sharded model take the first
    rank's candidates (the eval-mode check is a collective forward there).
    """

    cfg: PatcherConfig
    ns: NeuronSet
    clean_check: Callable[[list[int]], CleanCheck]
    rates: _Plateau
    val_stop: _ValidationStop
    validation_memory: torch.Tensor | None
    agree: Callable[[torch.Tensor], None]

    def __call__(
        self,
        it: int,
        logits: torch.Tensor,
        rep: Sequence[Example],
        a_e: torch.Tensor,
        a_m: torch.Tensor,
        active: torch.Tensor,
        since_best: torch.Tensor,
    ) -> torch.Tensor:
        """``[n_edits]`` bool: the edits to stop (``a_e [Pn]`` / ``a_m [N, Pn]`` of this iteration's forward)."""
        cfg, ns, clean_check, rates = self.cfg, self.ns, self.clean_check, self.rates
        n_edits = active.shape[0]
        stop = torch.zeros_like(active)
        at_check = it > 0 and it % cfg.check_every == 0
        if at_check and (cfg.stop_rule == "validation" or cfg.lr_schedule == "reference"):
            idx = active.nonzero().flatten().tolist()
            chk = clean_check(idx)
            if cfg.lr_schedule == "reference":
                rates.check_loss(idx, chk.loss)
            if cfg.stop_rule == "validation" and it - 1 >= cfg.check_start:
                assert self.validation_memory is not None
                with torch.no_grad():
                    vl = validation_memory_loss(chk.a_e, ns, self.validation_memory, idx, cfg)
                for k, e in enumerate(idx):
                    if bool(chk.right[k]) and self.val_stop.stop(e, float(vl[k])):
                        stop[e] = True
        if cfg.stop_rule == "validation":
            return stop
        with torch.no_grad():
            view_ok = correct(logits.detach(), rep, cfg.task).reshape(n_edits, cfg.views).all(1)
            ok_n, _ = _margins(a_e.detach(), a_m.detach(), cfg)
            margin_ok = _per_edit(ok_n.float(), ns.owner, n_edits) == 1
        settled = since_best >= cfg.stop_patience
        cand = active & view_ok & (margin_ok | settled | (not cfg.require_margins))
        self.agree(cand)
        if not bool(cand.any()):
            return stop
        idx = cand.nonzero().flatten().tolist()
        chk = clean_check(idx)
        with torch.no_grad():
            ok_clean, _ = _margins(chk.a_e, a_m.detach(), cfg)
        for k, e in enumerate(idx):
            mine = ns.owner == e
            margins_hold = bool(ok_clean[mine].all())
            if bool(chk.right[k]) and (margins_hold or bool(settled[e]) or not cfg.require_margins):
                stop[e] = True
        return stop


def clean_check(
    model: nn.Module, bank: PatchBank, sub: Sequence[Example], idx: list[int], ns: NeuronSet, cfg: PatcherConfig
) -> CleanCheck:
    """Eval-mode check of edits ``idx`` (examples ``sub``) with their pending neurons only.

    Returns the :class:`CleanCheck`: ``right [len(idx)]``, ``a_e [Pn]`` (neuron j's mean
    pre-activation over its positions on the clean input; NaN for neurons of edits not in ``idx``)
    and the eval-mode edit loss ``[len(idx)]``.
    """
    dev = bank.device
    rows = (torch.tensor(idx, device=dev)[:, None] == ns.owner[None]).float()
    was = model.training
    model.eval()
    a_e = torch.full((ns.keys.shape[0],), float("nan"), device=dev)
    try:
        with torch.no_grad():
            bank.pending = Pending(ns.keys, ns.key_bias, ns.values, rows, ns.up, ns.up_bias)
            logits = run_model(model, collate(sub), sub[0].positional)
            a = bank.pending.pre_activations
            assert a is not None, "the patch hook did not run"
            a = a[:, None] if a.dim() == 2 else a
            right = correct(logits, sub, cfg.task).cpu()
            loss = _edit_loss(logits, sub, cfg).float().cpu()
            for r, e in enumerate(idx):
                for j in (ns.owner == e).nonzero().flatten().tolist():
                    a_e[j] = a[r, ns.positions[j], j].mean()
    finally:
        bank.pending = None
        model.train(was)
    return CleanCheck(right, a_e, loss)


def _no_bar(progress: bool | None) -> bool:
    if progress is not None:
        return not progress
    import sys

    return not sys.stderr.isatty()
