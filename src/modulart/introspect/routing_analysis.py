"""``modulart.introspect.routing_analysis``: the dynamic analyses D1–D4, by the paper's two-stage protocol.

Stage 1 runs the model normally; a forward-pre hook on every MoE block keeps the block's input and
recomputes the router scores from the router weight right there (robust to whatever the block's
router returns in a given transformers version); the hooks are asserted to have fired. Stage 2
computes, for every MoE layer, *every* expert's output on that input (top-k = all, before the
routing weights), in token chunks, and keeps per-token statistics only:

- D1: per-token cosine between all experts' outputs -> the token-averaged angular similarity map
  ``1 - arccos(cos)/π`` ``[E, E]``, and the mean among the experts the router selected vs the rest;
  with the options ``d1_shared`` / ``d1_dense`` the shared experts' outputs and the dense reference
  ``F``'s (its FFN in its own forward on the same inputs) join the map (``[M, M]``);
- D2: per token, experts ranked by output L2 norm and by router score -> the count matrix
  ``C[score_rank, norm_rank]`` (rank 0 the largest; ``d2_ranks="ascending"``: the smallest, as the
  reference notebooks), per-token Spearman and Kendall correlations, and the hit rate of
  "top-k by norm" against the router's top-k;
- D3: the fraction of ``|σ(W_act x)| > threshold`` over all experts' neurons;
- D4: routing maps (experts × tokens, top-k weights) and the consecutive-token same-expert rate.

EMoE-converted dense FFNs are analysed the same way: pass ``experts=`` the EMoE handle (an expert's
output is its neuron group's contribution; scores are the EMoE router's).

Example:
    >>> import torch, modulart.introspect as mi
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    >>> import modulart as mt
    >>> h = mt.emoe.apply(model, num_experts=4, top_k=2, layers="all")
    >>> r = mi.routing(model, torch.randn(2, 5, 8), experts=h)
    >>> h.remove()
    >>> tuple(r.norm_score_counts().shape), r.layers
    ((1, 4, 4), [0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import ConfigError, OutOfRangeError, ShapeError, UnsupportedModuleError
from modulart.core.ffn import FFN, find_ffns
from modulart.core.hooks import HookRegistry, HookSite
from modulart.core.moe import MoE, find_moes
from modulart.core.neuron_groups import ExpertGroups, NeuronExpertSplit, select_topk
from modulart.core.types import Batch, ModelInputs
from modulart.introspect.neuron_experts import ExpertsSpec, neuron_splits
from modulart.introspect.options import D2_RANKS, IntrospectOptions, OptionsArg, resolve_options

__all__ = ["LayerRouting", "NormScoreCorrelation", "RoutingAnalysis", "routing"]


@dataclass
class LayerRouting:
    """Per-token records of one MoE layer (fp32, ``T`` kept tokens).

    Attributes:
        index: block index; path: module path; top_k: experts per token.
        scores: ``[T, E]`` router scores (softmax over all experts, or sigmoid).
        indices / weights: ``[T, k]`` the router's selection and weights.
        norms: ``[T, E]`` each expert's output L2 norm.
        angular_sum / cos_sum: ``[M, M]`` sums over tokens of the angular similarity / cosine
            between the outputs of ``members`` (the routed experts, then the shared ones and ``F``
            when the options include them).
        selected_sim / other_sim: sums and pair counts of the angular similarity among selected
            pairs and among the other pairs (routed experts only).
        active / neurons: counts for D3.
        seq / pos: ``[T]`` sequence id and position of each token.
        members: the ``M`` output members' names (``e{i}``, ``s{i}``, ``F``).
    """

    index: int
    path: str
    top_k: int
    scores: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    norms: torch.Tensor
    angular_sum: torch.Tensor
    cos_sum: torch.Tensor
    selected_sim: tuple[float, int]
    other_sim: tuple[float, int]
    active: int
    neurons: int
    seq: torch.Tensor
    pos: torch.Tensor
    members: list[str] = field(default_factory=list)


class _Layer:
    """What stage 2 needs of one layer: experts' outputs and gate activations, and the routing rule."""

    def __init__(
        self,
        index: int,
        path: str,
        top_k: int,
        site: HookSite,
        scores: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        outputs: Callable[[torch.Tensor], torch.Tensor],
        acts: Callable[[torch.Tensor], torch.Tensor],
        shared: list[FFN] | None = None,
    ) -> None:
        self.index, self.path, self.top_k, self.site = index, path, top_k, site
        self.scores, self.outputs, self.acts = scores, outputs, acts
        self.shared = shared or []
        self.dense: FFN | None = None  # the dense reference's FFN at this block (D1 with F)


def _moe_layer(moe: MoE, i: int) -> _Layer:
    def scores(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = moe.route(x)
        return r.scores.float(), r.indices, r.weights.float()

    def acts(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([e.act(x) for e in moe.experts()])  # [E, T, I]

    return _Layer(
        moe.layer if moe.layer is not None else i,
        moe.path,
        moe.top_k,
        moe.input_site,
        scores,
        moe.expert_outputs,
        acts,
        shared=list(moe.shared_experts),
    )


def _split_layers(model: nn.Module, splits: Mapping[str, NeuronExpertSplit]) -> list[_Layer]:
    """Stage-2 layers of dense FFNs split into neuron-group experts (e.g. by EMoE)."""
    by_path = {f.path: f for f in find_ffns(model)}
    missing = [p for p in splits if p not in by_path]
    if missing:
        raise UnsupportedModuleError(f"experts name FFNs that {type(model).__name__} does not have: {missing[:4]}")
    out = []
    for i, (path, split) in enumerate(splits.items()):
        ffn, top_k = by_path[path], split.top_k
        if top_k is None:
            raise ConfigError(
                f"experts[{path!r}]: the routing analyses need a routing rule (NeuronExpertSplit.top_k); "
                "pass the operator's handle (e.g. an EMoE handle), not bare ExpertGroups"
            )

        def scores(
            x: torch.Tensor, split: NeuronExpertSplit = split, ffn: FFN = ffn, top_k: int = top_k
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if split.scores is not None:
                s = split.scores(x, ffn.hidden(x) if split.needs_hidden else None).float()
            else:  # the avg-k rule: x . (frozen or live mean key row of each group)
                rows = split.centroids if split.centroids is not None else split.groups.centroids(ffn.keys.detach())
                s = x.float() @ rows.to(x.device, torch.float32).t()
            idx = select_topk(s, top_k)
            return s.softmax(-1), idx, torch.ones(idx.shape)

        def outputs(x: torch.Tensor, ffn: FFN = ffn, groups: ExpertGroups = split.groups) -> torch.Tensor:
            h = ffn.hidden(x)
            return torch.stack(
                [h[:, groups.members(j)] @ ffn.values[:, groups.members(j)].t() for j in range(groups.num_experts)]
            )

        def acts(x: torch.Tensor, ffn: FFN = ffn, groups: ExpertGroups = split.groups) -> torch.Tensor:
            a = ffn.activation(ffn.pre_activation(x))
            return torch.stack([a[:, groups.members(j)] for j in range(groups.num_experts)])

        layer = ffn.layer if ffn.layer is not None else i
        out.append(_Layer(layer, path, top_k, ffn.input_site, scores, outputs, acts))
    return out


def _batches(inputs: ModelInputs) -> list[Batch]:
    if isinstance(inputs, (list, tuple)) and inputs and not isinstance(inputs[0], (int, float)):
        return list(inputs)
    return [cast(Batch, inputs)]


def _call(model: nn.Module, batch: Batch) -> None:
    with torch.no_grad():
        if isinstance(batch, Mapping):
            model(**batch)
        else:
            model(batch)


def _mask_of(batch: Batch) -> torch.Tensor | None:
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return m.bool() if isinstance(m, torch.Tensor) else None


def _flatten(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, S, d]`` or ``[T, d]`` -> kept tokens ``[T', d]``, sequence ids and positions."""
    if x.dim() == 3:
        b, s, _ = x.shape
        seq = torch.arange(b).repeat_interleave(s)
        pos = torch.arange(s).repeat(b)
        keep = (
            mask.reshape(-1)
            if mask is not None and tuple(mask.shape) == (b, s)
            else torch.ones(b * s, dtype=torch.bool)
        )
        flat = x.reshape(-1, x.shape[-1])
    else:
        flat = x.reshape(-1, x.shape[-1])
        seq, pos = torch.zeros(flat.shape[0], dtype=torch.long), torch.arange(flat.shape[0])
        keep = (
            mask.reshape(-1)
            if mask is not None and mask.numel() == flat.shape[0]
            else torch.ones(flat.shape[0], dtype=torch.bool)
        )
    return flat[keep], seq[keep], pos[keep]


def routing(
    model: nn.Module,
    inputs: ModelInputs,
    *,
    experts: ExpertsSpec | None = None,
    layers: Sequence[int] | None = None,
    threshold: float = 1e-3,
    chunk_tokens: int = 1024,
    dense: nn.Module | None = None,
    options: OptionsArg = None,
) -> RoutingAnalysis:
    """Run the two-stage protocol on ``model`` and ``inputs`` (see the module docstring).

    Args:
        model: a model with MoE blocks (or with EMoE-converted FFNs, given ``experts=``).
        inputs: a dict of keyword inputs, a tensor (positional input), or a list of those (batches).
            Tokens where ``attention_mask`` is 0 are left out.
        experts: a :class:`~modulart.core.neuron_groups.NeuronExperts` with a routing rule (an EMoE
            handle): analyse its expert-split FFNs instead of MoE blocks.
        layers: block indices to keep (default: all MoE layers).
        threshold: D3 activity threshold on ``|σ(W_act x)|``.
        chunk_tokens: tokens per stage-2 chunk (memory ``E × chunk × d``).
        dense: a live dense sibling model (same tokenizer, same blocks) whose same-block FFN is the
            ``F`` member of D1; it runs its own forward on ``inputs`` (the reference notebooks'
            protocol). Used with ``options.d1_dense`` only.
        options: an :class:`~modulart.introspect.options.IntrospectOptions`, ``"reference"`` or None
            (D1 members ``d1_shared`` / ``d1_dense``, D2 rank order ``d2_ranks``).

    Returns:
        :class:`RoutingAnalysis`.

    Example:
        >>> from modulart.introspect.toy import toy_moe
        >>> r = routing(toy_moe(), torch.randn(2, 6, 16))
        >>> r.layers, tuple(r.output_similarity().shape), int(r.norm_score_counts()[0].sum())
        ([0, 1], (2, 4, 4), 48)
    """
    opts = resolve_options(options)
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ConfigError(f"threshold = {threshold!r}: must be a finite number >= 0")
    if not (isinstance(chunk_tokens, int) and not isinstance(chunk_tokens, bool) and chunk_tokens >= 1):
        raise ConfigError(f"chunk_tokens = {chunk_tokens!r}: must be an int >= 1")
    if dense is not None and not isinstance(dense, nn.Module):
        raise ConfigError(
            f"dense = {type(dense).__name__}: must be a live dense nn.Module (its FFNs run on the inputs) or None"
        )
    if dense is not None and not opts.d1_dense:
        raise ConfigError("dense= is the F member of D1: it needs options.d1_dense=True (or options='reference')")
    layer_list = (
        _split_layers(model, neuron_splits(experts))
        if experts is not None
        else [_moe_layer(m, i) for i, m in enumerate(find_moes(model))]
    )
    if layers is not None:
        known = [lay.index for lay in layer_list]
        bad = [i for i in layers if i not in known]
        if bad:
            raise OutOfRangeError(f"layers {bad} are not MoE layers of {type(model).__name__}; MoE layers: {known}")
        layer_list = [lay for lay in layer_list if lay.index in layers]
    if not opts.d1_shared:
        for lay in layer_list:
            lay.shared = []
    if dense is not None:
        ffns = {f.layer if f.layer is not None else i: f for i, f in enumerate(find_ffns(dense))}
        missing = [lay.index for lay in layer_list if lay.index not in ffns]
        if missing:
            known = [x.index for x in layer_list]
            raise ShapeError(f"the dense reference has no FFN at blocks {missing} (MoE blocks: {known})")
        for lay in layer_list:
            lay.dense = ffns[lay.index]
    records: dict[
        int, list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]]
    ] = {i: [] for i in range(len(layer_list))}
    dense_records: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layer_list))}
    for batch in _batches(inputs):
        mask = _mask_of(batch)

        def keep(i: int, mask: torch.Tensor | None = mask) -> Callable[[torch.Tensor], None]:
            def hook(x: torch.Tensor) -> None:
                flat, seq, pos = _flatten(x.detach(), mask)
                with torch.no_grad():
                    routed = layer_list[i].scores(flat)  # recomputed from the router weight, here
                records[i].append((flat.float().clone(), routed, seq, pos))

            return hook

        with HookRegistry(model, name="introspect.routing") as reg:
            for i, lay in enumerate(layer_list):
                reg.at(lay.site, keep(i), priority=-1, name=f"{lay.path}:input")
            _call(model, batch)
            reg.assert_fired()
        if dense is not None:
            _dense_inputs(dense, batch, mask, layer_list, dense_records)
    per_layer: list[LayerRouting] = []
    for i, lay in enumerate(layer_list):
        offset = 0
        chunks = []
        for b, (x, routed, seq, pos) in enumerate(records[i]):
            xd = dense_records[i][b] if dense is not None else None
            if xd is not None and xd.shape[0] != x.shape[0]:
                raise ShapeError(
                    f"{lay.path}: the dense reference saw {xd.shape[0]} tokens of batch {b}, the model "
                    f"{x.shape[0]}: give both models the same inputs"
                )
            chunks.append((x, routed, seq + offset, pos, xd))
            offset += int(seq.max()) + 1 if seq.numel() else 0
        per_layer.append(_stage_two(lay, chunks, threshold, chunk_tokens))
        records[i], dense_records[i] = [], []
    return RoutingAnalysis(per_layer, threshold, opts)


def _dense_inputs(
    dense: nn.Module,
    batch: Batch,
    mask: torch.Tensor | None,
    layer_list: list[_Layer],
    out: dict[int, list[torch.Tensor]],
) -> None:
    """Stage 1 of the dense reference: its own forward on ``batch``, keeping each matched FFN's input."""

    def keep(i: int) -> Callable[[torch.Tensor], None]:
        def hook(x: torch.Tensor) -> None:
            out[i].append(_flatten(x.detach(), mask)[0].float().clone())

        return hook

    with HookRegistry(dense, name="introspect.routing.dense") as reg:
        for i, lay in enumerate(layer_list):
            assert lay.dense is not None
            reg.at(lay.dense.input_site, keep(i), priority=-1, name=f"{lay.dense.path}:input")
        _call(dense, batch)
        reg.assert_fired()


def _stage_two(lay: _Layer, chunks: list[Any], threshold: float, chunk_tokens: int) -> LayerRouting:
    scores_l, idx_l, w_l, norms_l, seq_l, pos_l = [], [], [], [], [], []
    ang = cos_sum = None
    sel: list[float] = [0.0, 0.0]
    oth: list[float] = [0.0, 0.0]
    active = neurons = 0
    e = 0
    for x, (scores, idx, weights), seq, pos, xd in chunks:
        for s in range(0, x.shape[0], chunk_tokens):
            xs = x[s : s + chunk_tokens]
            with torch.no_grad():
                routed = lay.outputs(xs).float()  # [E, t, d]
                act = lay.acts(xs).float()
                extra = [f.forward(xs.to(f.keys.dtype)).float() for f in lay.shared]
                if lay.dense is not None and xd is not None:
                    xds = xd[s : s + chunk_tokens].to(lay.dense.keys.device, lay.dense.keys.dtype)
                    extra.append(lay.dense.forward(xds).float().to(routed.device))
            e = routed.shape[0]
            out = torch.cat([routed, torch.stack(extra)]) if extra else routed  # [M, t, d]
            norms = routed.norm(dim=-1).t()  # [t, E]
            u = F.normalize(out, dim=-1).transpose(0, 1)  # [t, M, d]
            cos = (u @ u.transpose(1, 2)).clamp(-1, 1)  # [t, M, M]
            cos.diagonal(dim1=1, dim2=2).fill_(1.0)  # exactly 1, not arccos(1 - ulp)
            angular = 1 - torch.arccos(cos) / math.pi
            ang = angular.sum(0) if ang is None else ang + angular.sum(0)
            cos_sum = cos.sum(0) if cos_sum is None else cos_sum + cos.sum(0)
            chosen = torch.zeros(xs.shape[0], e, dtype=torch.bool).scatter_(1, idx[s : s + chunk_tokens], True)
            pair_sel = chosen[:, :, None] & chosen[:, None, :]
            off = ~torch.eye(e, dtype=torch.bool)
            routed_ang = angular[:, :e, :e]
            sel[0] += float(routed_ang[pair_sel & off].sum())
            sel[1] += int((pair_sel & off).sum())
            oth[0] += float(routed_ang[~pair_sel & off].sum())
            oth[1] += int((~pair_sel & off).sum())
            active += int((act.abs() > threshold).sum())
            neurons += act.numel()
            norms_l.append(norms)
        scores_l.append(scores)
        idx_l.append(idx)
        w_l.append(weights)
        seq_l.append(seq)
        pos_l.append(pos)
    if ang is None or cos_sum is None:
        raise ShapeError(f"{lay.path}: no tokens reached this layer (all masked?)")
    members = [f"e{j}" for j in range(e)] + [f"s{j}" for j in range(len(lay.shared))]
    members += ["F"] if lay.dense is not None else []
    return LayerRouting(
        index=lay.index,
        path=lay.path,
        top_k=lay.top_k,
        scores=torch.cat(scores_l),
        indices=torch.cat(idx_l),
        weights=torch.cat(w_l),
        norms=torch.cat(norms_l),
        angular_sum=ang,
        cos_sum=cos_sum,
        selected_sim=(sel[0], int(sel[1])),
        other_sim=(oth[0], int(oth[1])),
        active=active,
        neurons=neurons,
        seq=torch.cat(seq_l),
        pos=torch.cat(pos_l),
        members=members,
    )


def _ranks(x: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Rank of each entry along the last dim (descending: 0 = largest; else 0 = smallest); ties broken by index."""
    order = torch.sort(x, dim=-1, descending=descending, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1]).expand_as(order).contiguous())


@dataclass
class NormScoreCorrelation:
    """D2 scalars per layer: mean per-token Spearman ρ and Kendall τ between expert output norms and
    router scores, the hit rate of the top-k by norm against the router's top-k, and its chance level k/E."""

    spearman: torch.Tensor
    kendall: torch.Tensor
    hit_rate: torch.Tensor
    chance: torch.Tensor
    layers: list[int]


class RoutingAnalysis:
    """Results of :func:`routing`; every method returns per-layer arrays (``L`` = analysed layers)."""

    def __init__(self, layers: list[LayerRouting], threshold: float, options: IntrospectOptions | None = None) -> None:
        self.records = layers
        self.threshold = threshold
        self.options = options if options is not None else IntrospectOptions()

    @property
    def members(self) -> list[str]:
        """The members of the D1 maps: routed experts ``e{i}``, then (with the options) ``s{i}`` and ``F``."""
        best = max(self.records, key=lambda r: r.angular_sum.shape[0])
        return best.members or [f"e{i}" for i in range(best.angular_sum.shape[0])]

    @property
    def layers(self) -> list[int]:
        """Block indices of the analysed layers."""
        return [r.index for r in self.records]

    def _record(self, layer: int) -> LayerRouting:
        for r in self.records:
            if r.index == layer:
                return r
        raise OutOfRangeError(f"layer {layer!r} was not analysed; layers: {self.layers}")

    def output_similarity(self, kind: str = "angular") -> torch.Tensor:
        """D1: ``[L, M, M]`` token-averaged angular similarity (``kind="cosine"``: mean cosine).

        ``M`` = the routed experts, plus the shared experts and ``F`` when the options include them
        (:attr:`members`; a layer with fewer members is NaN-padded).

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> d1 = routing(toy_moe(), torch.randn(1, 4, 16)).output_similarity()
            >>> tuple(d1.shape), torch.allclose(d1.diagonal(dim1=1, dim2=2), torch.ones(2, 4))
            ((2, 4, 4), True)
        """
        if kind not in ("angular", "cosine"):
            raise ConfigError(f"kind must be 'angular' or 'cosine', got {kind!r}")
        n = len(self.members)
        out = torch.full((len(self.records), n, n), float("nan"))
        for i, r in enumerate(self.records):
            v = (r.angular_sum if kind == "angular" else r.cos_sum) / r.norms.shape[0]
            out[i, : v.shape[0], : v.shape[1]] = v
        return out

    def selected_similarity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """D1: ``([L], [L])`` mean angular similarity among the selected experts' outputs, and among the other pairs.

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> sel, other = routing(toy_moe(), torch.randn(1, 4, 16)).selected_similarity()
            >>> tuple(sel.shape), bool(((other > 0) & (other < 1)).all())
            ((2,), True)
        """
        sel = torch.tensor([r.selected_sim[0] / max(r.selected_sim[1], 1) for r in self.records])
        oth = torch.tensor([r.other_sim[0] / max(r.other_sim[1], 1) for r in self.records])
        return sel, oth

    def norm_score_counts(self, ranks: str | None = None) -> torch.Tensor:
        """D2: ``[L, E, E]`` int64 counts ``C[score_rank, norm_rank]`` over tokens.

        ``ranks`` (default: ``options.d2_ranks``): ``"descending"`` — rank 0 is the highest score /
        largest norm, so a router that picks large-norm experts fills the diagonal from the top-left
        (rank 0 = the router's first choice); ``"ascending"`` — rank 0 is the lowest, as the
        reference notebooks' ``np.argsort`` (the same matrix rotated by 180° when there are no ties).

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> c = routing(toy_moe(), torch.randn(1, 5, 16)).norm_score_counts()
            >>> c.sum((1, 2)).tolist(), c[0].sum(0).tolist()  # each token ranks every expert once
            ([20, 20], [5, 5, 5, 5])
        """
        order = self.options.d2_ranks if ranks is None else ranks
        if order not in D2_RANKS:
            raise ConfigError(f"ranks = {ranks!r}: must be None (from the options) or one of {D2_RANKS}")
        out = []
        for r in self.records:
            e = r.norms.shape[1]
            sr, nr = _ranks(r.scores, order == "descending"), _ranks(r.norms, order == "descending")
            out.append(torch.bincount((sr * e + nr).reshape(-1), minlength=e * e).reshape(e, e))
        return torch.stack(out)

    def norm_score_correlation(self) -> NormScoreCorrelation:
        """D2 scalars (see :class:`NormScoreCorrelation`).

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> c = routing(toy_moe(), torch.randn(1, 5, 16)).norm_score_correlation()
            >>> c.chance.tolist(), bool((c.spearman.abs() <= 1).all())
            ([0.5, 0.5], True)
        """
        sp, kt, hit, chance = [], [], [], []
        for r in self.records:
            e, k = r.norms.shape[1], r.top_k
            sr, nr = _ranks(r.scores).double(), _ranks(r.norms).double()
            sc, nc = sr - sr.mean(1, keepdim=True), nr - nr.mean(1, keepdim=True)
            sp.append(float(((sc * nc).sum(1) / (sc.norm(dim=1) * nc.norm(dim=1))).mean()))
            conc = torch.sign(sr[:, :, None] - sr[:, None, :]) * torch.sign(nr[:, :, None] - nr[:, None, :])
            kt.append(float((conc.sum((1, 2)) / (e * (e - 1))).mean()))
            by_norm = torch.zeros_like(r.norms, dtype=torch.bool).scatter_(1, r.norms.topk(k, dim=1).indices, True)
            by_router = torch.zeros_like(by_norm).scatter_(1, r.indices, True)
            hit.append(float((by_norm & by_router).sum(1).double().mean() / k))
            chance.append(k / e)
        return NormScoreCorrelation(
            torch.tensor(sp), torch.tensor(kt), torch.tensor(hit), torch.tensor(chance), self.layers
        )

    def activation_ratio(self) -> torch.Tensor:
        """D3: ``[L]`` fraction of ``|σ(W_act x)| > threshold`` over all experts' neurons and tokens.

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> bool((routing(toy_moe(), torch.randn(1, 5, 16)).activation_ratio() > 0.9).all())
            True
        """
        return torch.tensor([r.active / max(r.neurons, 1) for r in self.records])

    def routing_map(self, layer: int | None = None, max_tokens: int = 64) -> torch.Tensor:
        """D4: ``[E, T]`` top-k routing weights of the first ``max_tokens`` tokens (0 where not selected).

        ``layer`` is a block index (default: the last analysed layer).

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> m = routing(toy_moe(), torch.randn(1, 5, 16)).routing_map(layer=0)
            >>> tuple(m.shape), torch.allclose(m.sum(0), torch.ones(5)), int((m > 0).sum())
            ((4, 5), True, 10)
        """
        r = self.records[-1] if layer is None else self._record(layer)
        t = min(max_tokens, r.indices.shape[0])
        out = torch.zeros(r.norms.shape[1], t)
        out.scatter_(0, r.indices[:t].t(), r.weights[:t].t().float())
        return out

    def consecutive_same_expert(self) -> tuple[torch.Tensor, torch.Tensor]:
        """D4: ``([L], [L])`` mean overlap ``|top-k(t) ∩ top-k(t+1)| / k`` of consecutive tokens of a
        sequence, and the same for a random token pairing (the chance level under the layer's load).

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> rate, chance = routing(toy_moe(), torch.randn(2, 5, 16)).consecutive_same_expert()
            >>> tuple(rate.shape), bool(((rate >= 0) & (rate <= 1)).all())
            ((2,), True)
        """
        rates, base = [], []
        g = torch.Generator().manual_seed(0)
        for r in self.records:
            e = r.norms.shape[1]
            chosen = torch.zeros(r.indices.shape[0], e, dtype=torch.bool).scatter_(1, r.indices, True)
            nxt = (r.seq[1:] == r.seq[:-1]) & (r.pos[1:] == r.pos[:-1] + 1)
            overlap = (chosen[1:] & chosen[:-1]).sum(1).double() / r.top_k
            rates.append(float(overlap[nxt].mean()) if bool(nxt.any()) else float("nan"))
            perm = torch.randperm(chosen.shape[0], generator=g)
            base.append(float(((chosen & chosen[perm]).sum(1).double() / r.top_k).mean()))
        return torch.tensor(rates), torch.tensor(base)
