"""Train the neurons of several independent edits in one vectorised pass.

Each edit owns one or more new neurons, applied only to its own batch rows (its ``views`` copies),
with its own loss, gradient clipping, learning rate, plateau halving and stopping; training several
edits together therefore gives each the same result as training it alone (up to float rounding).

Loss of edit e (spec: shared/specs/patcher.md), with a the new neuron's pre-activation:

    l_e = task loss on the views (label-smoothed CE)
    l_a = mean top-k_a over views×positions of exp(−a_e)
    l_m = mean top-k_m over memory of exp(a_m − β) + mean top-k_m of exp(a_m − ā_e + γ)
    L   = l_e + α·l_a + μ·l_m          (neuron terms averaged over the edit's neurons)

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

from modulart.core.errors import NonFiniteError, RankMismatchError
from modulart.core.fingerprint import fingerprint
from modulart.core.ranks import broadcast_, rank_groups
from modulart.patcher.bank import PatchBank, Pending
from modulart.patcher.config import PatcherConfig
from modulart.patcher.records import content_hash
from modulart.patcher.task import Example, collate, correct, per_example_loss, run_model

__all__ = [
    "NeuronSet",
    "TrainOutcome",
    "VectorAdam",
    "agree_across_ranks",
    "clean_check",
    "init_neurons",
    "model_digest",
    "train_edits",
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


def _neuron_terms(
    a: torch.Tensor, ns: NeuronSet, views: int, memory: torch.Tensor, cfg: PatcherConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per neuron: l_a ``[Pn]``, l_m ``[Pn]``, mean edit activation ā_e ``[Pn]``, memory activations ``[N, Pn]``."""
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
    a_e = (sel * valid).flatten(1).sum(1) / count
    neg = torch.where(valid, (-sel).clamp(max=_MAX_EXP).exp(), torch.zeros_like(sel)).flatten(1)
    k_a = min(cfg.activation_top_k, neg.shape[1])
    l_a = neg.topk(k_a, dim=1).values.sum(1) / count.clamp(max=k_a)
    a_m = memory @ ns.keys.T + ns.key_bias  # [N, Pn]
    k_m = min(cfg.memory_top_k, a_m.shape[0])
    silence = (a_m - cfg.silence_margin).clamp(max=_MAX_EXP).exp().topk(k_m, dim=0).values.mean(0)
    margin = (a_m - a_e[None] + cfg.edit_margin).clamp(max=_MAX_EXP).exp().topk(k_m, dim=0).values.mean(0)
    return l_a, silence + margin, a_e, a_m


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


def train_edits(
    model: nn.Module,
    bank: PatchBank,
    examples: Sequence[Example],
    ns: NeuronSet,
    memory: torch.Tensor,
    cfg: PatcherConfig,
    run: Callable[[dict[str, torch.Tensor], bool], torch.Tensor],
    clean_check: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
    seed: int,
) -> list[TrainOutcome]:
    """Train ``ns`` (the new neurons of ``examples``) with the base model frozen.

    Args:
        run: ``run(batch, positional) -> logits`` of the model (hooks active).
        clean_check: ``clean_check(edit_indices) -> (correct [n] bool, a_e [Pn_sel] clean pre-activations)``
            in eval mode with the pending neurons of those edits only.

    The model's ``requires_grad`` flags and train/eval mode are restored afterwards, and
    ``bank.pending`` is cleared whatever happens.
    """
    n_edits, views = len(examples), cfg.views
    dev = bank.device
    start = time.perf_counter()
    batch = collate(examples, repeat=views)
    rep = [e for e in examples for _ in range(views)]
    rows_mask = (torch.arange(n_edits * views, device=dev)[:, None] // views == ns.owner[None]).float()
    lr = torch.full((n_edits,), float(cfg.lr), device=dev)
    active = torch.ones(n_edits, dtype=torch.bool, device=dev)
    opt = VectorAdam(ns.params(), lr[ns.owner], cfg.weight_decay)
    best = torch.full((n_edits,), math.inf, device=dev)
    stall = torch.zeros(n_edits, dtype=torch.long, device=dev)
    # settling: steps since the loss last fell by 1% (coarser than the plateau rule, not reset by halving)
    settle_best = torch.full((n_edits,), math.inf, device=dev)
    since_best = torch.zeros(n_edits, dtype=torch.long, device=dev)
    steps = torch.zeros(n_edits, dtype=torch.long)
    losses: list[list[float]] = [[] for _ in range(n_edits)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    groups = rank_groups(model)  # FSDP2: every rank follows the first rank's stopping decisions
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, desc="patch", unit="step", leave=False, disable=_no_bar(cfg.progress))
    devices = [dev] if dev.type == "cuda" else []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _ in range(cfg.max_steps):
                model.train(cfg.dropout_views)
                bank.pending = Pending(ns.keys, ns.key_bias, ns.values, rows_mask, ns.up, ns.up_bias)
                logits = run(batch, examples[0].positional)
                a = bank.pending.pre_activations
                assert a is not None, "the patch hook did not run"
                if a.dim() == 2:
                    a = a[:, None]
                l_e = per_example_loss(logits, rep, cfg.task, cfg.smoothing).reshape(n_edits, views).mean(1)
                l_a, l_m, a_e, a_m = _neuron_terms(a, ns, views, memory, cfg)
                per_edit = l_e + cfg.activation_weight * _per_edit(l_a, ns.owner, n_edits)
                per_edit = per_edit + cfg.mu * _per_edit(l_m, ns.owner, n_edits)
                # gradients of the new neurons only: nothing accumulates into the model's .grad (under
                # FSDP2 the frozen flags reach only the parameters registered at the time, and a
                # backward() would reduce-scatter edit gradients into the others)
                params = ns.params()
                grads = torch.autograd.grad((per_edit * active).sum(), params, allow_unused=True)
                for t, g in zip(params, grads, strict=True):
                    t.grad = g
                if not bool(per_edit.detach()[active].isfinite().all()):
                    bad = [e for e in active.nonzero().flatten().tolist() if not bool(per_edit[e].isfinite())]
                    raise NonFiniteError(
                        f"patch training: the loss of edit(s) {bad} is NaN or inf at step {int(steps.max())} "
                        f"(the model's outputs on the edit, or the config's lr / weights); no patch was added"
                    )
                _clip_(ns, n_edits, cfg.grad_clip)
                opt.lr = (lr * active)[ns.owner]
                opt.step()
                pe = per_edit.detach()
                for e in active.nonzero().flatten().tolist():
                    losses[e].append(float(pe[e]))
                    steps[e] += 1
                improved = pe < best * (1 - 1e-4)
                best = torch.where(improved, pe, best)
                stall = torch.where(improved, torch.zeros_like(stall), stall + 1)
                fell = pe < settle_best * (1 - 1e-2)
                settle_best = torch.where(fell, pe, settle_best)
                since_best = torch.where(fell, torch.zeros_like(since_best), since_best + 1)
                halve = active & (stall >= cfg.plateau_patience)
                lr = torch.where(halve, (lr / 2).clamp(min=cfg.min_lr), lr)
                stall = torch.where(halve, torch.zeros_like(stall), stall)
                bar.update(1)
                if cfg.fixed_steps:
                    continue
                with torch.no_grad():
                    view_ok = correct(logits.detach(), rep, cfg.task).reshape(n_edits, views).all(1)
                    ok_n, _ = _margins(a_e.detach(), a_m.detach(), cfg)
                    margin_ok = _per_edit(ok_n.float(), ns.owner, n_edits) == 1
                settled = margin_ok | (since_best >= cfg.stop_patience) | (not cfg.require_margins)
                cand = active & view_ok & settled
                broadcast_([cand], groups, dev)
                if bool(cand.any()):
                    idx = cand.nonzero().flatten().tolist()
                    bank.pending = None
                    right, _ = clean_check(idx)
                    for e, r in zip(idx, right.tolist(), strict=True):
                        if r:
                            active[e] = False
                broadcast_([active], groups, dev)
                if not bool(active.any()):
                    break
    finally:
        bank.pending = None
        bar.close()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    broadcast_(ns.params(), groups, dev)  # the first rank's neurons, bitwise, on every rank
    right, a_clean = clean_check(list(range(n_edits)))
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
        out.append(TrainOutcome(bool(right[e]), int(steps[e]), losses[e], rows, margins, seconds))
    return out


def clean_check(
    model: nn.Module, bank: PatchBank, sub: Sequence[Example], idx: list[int], ns: NeuronSet, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode check of edits ``idx`` (examples ``sub``) with their pending neurons only.

    Returns ``(right [len(idx)] bool, a_e [Pn])``: ``a_e[j]`` is neuron j's mean pre-activation over its
    positions on the clean input (NaN for neurons of edits not in ``idx``).
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
            right = correct(logits, sub, task).cpu()
            for r, e in enumerate(idx):
                for j in (ns.owner == e).nonzero().flatten().tolist():
                    a_e[j] = a[r, ns.positions[j], j].mean()
    finally:
        bank.pending = None
        model.train(was)
    return right, a_e


def _no_bar(progress: bool | None) -> bool:
    if progress is not None:
        return not progress
    import sys

    return not sys.stderr.isatty()
