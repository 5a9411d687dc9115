"""``modulart.introspect.weight_analysis``: the static analyses S1–S5 over every MoE layer of a model or checkpoint.

Example:
    >>> import torch
    >>> import modulart.introspect as mi
    >>> from modulart.core.neuron_groups import ExpertGroups
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> w = mi.weights(model, experts={"": ExpertGroups(torch.arange(32) % 4, 4)}, progress=False)
    >>> s1 = w.expert_similarity(matrix="act", level="matrix")
    >>> tuple(s1.values.shape), s1.members
    ((1, 4, 4), ['e0', 'e1', 'e2', 'e3'])
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import ConfigError, InvalidArgumentError, OutOfRangeError, ShapeError
from modulart.core.select import LayersArg, select_layers
from modulart.introspect.options import IntrospectOptions, OptionsArg, resolve_options
from modulart.introspect.sources import MATRICES, WeightSource, check_matrix
from modulart.introspect.static import (
    LayerScan,
    LayerWeightStats,
    ReorderResult,
    neuron_pca,
    pca_from_gram,
    pearson,
    reorder_similarity,
    scan_layers,
)

if TYPE_CHECKING:
    from modulart.introspect.live import DenseSpec
    from modulart.introspect.neuron_experts import ExpertsSpec

__all__ = ["GateVsExperts", "LayerDone", "PCAResult", "Similarity", "Weights", "offdiag_mean", "weights"]


def offdiag_mean(sim: torch.Tensor, rows: Sequence[int] | None = None) -> float:
    """Mean of the off-diagonal entries of ``sim [M, M]`` restricted to ``rows`` (NaNs ignored).

    Example:
        >>> offdiag_mean(torch.tensor([[1.0, 0.2], [0.4, 1.0]]))
        0.30000001192092896
    """
    idx = torch.tensor(list(rows) if rows is not None else range(sim.shape[0]))
    sub = sim[idx[:, None], idx[None, :]]
    mask = ~torch.eye(len(idx), dtype=torch.bool) & ~sub.isnan()
    return float(sub[mask].mean()) if bool(mask.any()) else float("nan")


@dataclass
class Similarity:
    """Per-layer similarity maps between members.

    Attributes:
        values: ``[L, M, M]`` (NaN where not comparable, e.g. a shared expert of another size in S1).
        members: the ``M`` member names (``e{i}``, ``s{i}``, ``F``); kinds: their kinds.
        layers: the ``L`` block indices.
        matrix / level: what was compared.
    """

    values: torch.Tensor
    members: list[str]
    kinds: list[str]
    layers: list[int]
    matrix: str
    level: str

    def expert_mean(self) -> torch.Tensor:
        """``[L]``: mean expert–expert similarity (off-diagonal, routed experts only)."""
        rows = [i for i, k in enumerate(self.kinds) if k == "expert"]
        return torch.tensor([offdiag_mean(v, rows) for v in self.values])

    def dense_mean(self) -> torch.Tensor:
        """``[L]``: mean expert–F similarity (NaN without a dense reference)."""
        if "F" not in self.members:
            return torch.full((len(self.layers),), float("nan"))
        f = self.members.index("F")
        rows = [i for i, k in enumerate(self.kinds) if k == "expert"]
        return self.values[:, rows, f].nanmean(1)


@dataclass(frozen=True)
class LayerDone:
    """Progress of the streaming pass, handed to ``on_layer`` after each layer.

    Attributes:
        done / total: layers finished in this pass / layers it reads.
        layer: the block index just finished.
        seconds: wall time of that layer.
    """

    done: int
    total: int
    layer: int
    seconds: float


@dataclass
class GateVsExperts:
    """S4: router-row similarity against the experts' mean-neuron similarity, per layer.

    Attributes:
        router_cosine: ``[L, E, E]`` cosine between router rows.
        expert_cosine: per matrix ``[L, E, E]`` (S2 among routed experts).
        r: per matrix ``[L]`` Pearson R over the ``E(E-1)/2`` pairs.
        mean_r2: per matrix, mean over layers of R² (each layer's R² first rounded to
            ``IntrospectOptions.s4_round`` decimals when that is set, as the reference notebooks).
        layers: block indices.
    """

    router_cosine: torch.Tensor
    expert_cosine: dict[str, torch.Tensor]
    r: dict[str, torch.Tensor]
    mean_r2: dict[str, float]
    layers: list[int]


@dataclass
class PCAResult:
    """S5. ``coords [L, n, k]`` (experts) or ``[n, k]`` (neurons); ``labels`` name each point
    (``e{i}``, and with the options ``pca_shared`` / ``pca_dense`` also ``s{i}`` / ``F``);
    ``explained [.., k]`` the variance ratios."""

    coords: torch.Tensor
    labels: list[str]
    explained: torch.Tensor
    layers: list[int]
    level: str


class Weights:
    """The static analyses over a :class:`WeightSource` (one layer in memory at a time).

    Results of the streaming pass are cached per layer and matrix, so S1, S2, S4 and the expert
    PCA of one matrix cost one pass over the weights together. ``options`` (an
    :class:`~modulart.introspect.options.IntrospectOptions` or ``"reference"``) selects where the
    analyses follow the reference notebooks instead of modulart's defaults. ``on_layer`` is called
    with a :class:`LayerDone` after each layer of a streaming pass (e.g. to print progress lines).

    The pass is a pipeline (:func:`~modulart.introspect.static.scan_layers`): a background thread
    reads and converts the next chunk of weights, across matrix and layer boundaries, while the
    current one is reduced; two chunks of ``budget_mb`` are alive at most.
    """

    def __init__(
        self,
        source: WeightSource,
        *,
        layers: LayersArg = None,
        budget_mb: float = 128,
        progress: bool | None = None,
        options: OptionsArg = None,
        on_layer: Callable[[LayerDone], None] | None = None,
    ) -> None:
        self.options: IntrospectOptions = resolve_options(options)
        self.on_layer = on_layer
        self.source = source
        all_idx = source.layer_indices
        self.positions = select_layers(layers, len(all_idx)) if layers is not None else list(range(len(all_idx)))
        self.layers = [all_idx[p] for p in self.positions]
        self.budget_bytes = int(budget_mb * (1 << 20))
        self.progress = progress
        self._stats: dict[int, LayerWeightStats] = {}
        self._done: dict[int, set[str]] = {}
        self._matrices: list[str] | None = None

    # --- the streaming pass -------------------------------------------------------------------
    @property
    def matrices(self) -> list[str]:
        """The matrix types the experts have (``up`` only for gated FFNs)."""
        if self._matrices is None:
            reader = self.source.layer(self.positions[0])
            self._matrices = [m for m in MATRICES if reader.has(0, m)]
        return self._matrices

    def scan(self, matrices: Sequence[str] | None = None, *, pca: Sequence[str] = ()) -> list[LayerWeightStats]:
        """Run (or reuse) the streaming pass for ``matrices`` (default: all the experts have), one layer
        in memory at a time; for the matrices in ``pca`` the S5 expert PCA is accumulated too."""
        from tqdm.auto import tqdm

        wanted = [check_matrix(m) for m in (self.matrices if matrices is None else matrices)]
        pca = [check_matrix(m) for m in pca]
        absent = [m for m in [*wanted, *pca] if m not in self.matrices]
        if absent:
            raise ShapeError(f"{self.source.name}: the experts have no {absent} matrix; they have {self.matrices}")
        want = set(wanted) | {f"pca:{m}" for m in pca}
        todo = [p for p in self.positions if not want <= self._done.get(p, set())]
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        plans: list[tuple[int, list[str], list[str]]] = []
        for p in todo:
            done = self._done.get(p, set())
            z = [m for m in pca if f"pca:{m}" not in done]
            plans.append((p, list(dict.fromkeys([m for m in wanted if m not in done] + z)), z))
        items = [LayerScan(functools.partial(self.source.layer, p), missing, z) for p, missing, z in plans]
        bar = tqdm(total=len(todo), desc="introspect: layers", unit="layer", disable=not show or not todo, leave=False)
        t0 = time.perf_counter()
        with bar, contextlib.closing(scan_layers(items, self.budget_bytes, self._pca_kinds)) as stream:
            for k, ((p, _, _), st) in enumerate(zip(plans, stream, strict=True)):
                if p in self._stats:
                    old = self._stats[p]
                    old.gram.update(st.gram)
                    old.zgram.update(st.zgram)
                    old.zmembers.update(st.zmembers)
                    old.neuron_mean.update(st.neuron_mean)
                else:
                    self._stats[p] = st
                self._done.setdefault(p, set()).update(want)
                bar.update(1)
                now = time.perf_counter()
                if self.on_layer is not None:
                    self.on_layer(LayerDone(k + 1, len(todo), self.source.layer_indices[p], now - t0))
                t0 = now
        return [self._stats[p] for p in self.positions]

    @property
    def _pca_kinds(self) -> tuple[str, ...]:
        """The member kinds that are S5 points under the options."""
        o = self.options
        return ("expert",) + (("shared",) if o.pca_shared else ()) + (("dense",) if o.pca_dense else ())

    def _position(self, layer: int) -> int:
        if layer not in self.layers:
            raise OutOfRangeError(f"layer {layer!r} is not an analysed MoE layer; layers: {self.layers}")
        return self.positions[self.layers.index(layer)]

    # --- S1 / S2 ------------------------------------------------------------------------------
    def expert_similarity(self, matrix: str = "act", level: str = "matrix") -> Similarity:
        """S1 (``level="matrix"``) or S2 (``"neuron_mean"``): ``[L, M, M]`` cosine per layer.

        Args:
            matrix: ``act`` (gate_proj / w1), ``up`` or ``down``.
            level: ``matrix`` (flattened matrices) or ``neuron_mean`` (mean neuron vectors).

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> s = weights(toy_moe(), progress=False).expert_similarity("down", "neuron_mean")
            >>> tuple(s.values.shape), s.members
            ((2, 4, 4), ['e0', 'e1', 'e2', 'e3'])
        """
        check_matrix(matrix)
        if level not in ("matrix", "neuron_mean"):
            raise ConfigError(f"level must be 'matrix' (S1) or 'neuron_mean' (S2), got {level!r}")
        stats = self.scan([matrix])
        n = max(len(s.members) for s in stats)
        ref = next(s for s in stats if len(s.members) == n)
        out = torch.full((len(stats), n, n), float("nan"))
        for i, s in enumerate(stats):
            if matrix not in s.gram:
                continue
            sim = s.cosine(matrix) if level == "matrix" else s.neuron_cosine(matrix)
            out[i, : sim.shape[0], : sim.shape[1]] = sim
        return Similarity(out, ref.members, ref.kinds, list(self.layers), matrix, level)

    # --- S4 -----------------------------------------------------------------------------------
    def gate_vs_experts(self, matrices: Sequence[str] | None = None) -> GateVsExperts:
        """S4: per layer, Pearson R between router-row cosines and S2 cosines over expert pairs.

        Args:
            matrices: which S2 pairings (default: every matrix type the experts have).

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> g = weights(toy_moe(), progress=False).gate_vs_experts(["act"])
            >>> tuple(g.router_cosine.shape), tuple(g.r["act"].shape)
            ((2, 4, 4), (2,))
        """
        matrices = self.matrices if matrices is None else list(matrices)
        stats = self.scan(matrices)
        routers = []
        for s in stats:
            if s.router is None:
                raise ConfigError(f"layer {s.index} has no router weight")
            routers.append(F.normalize(s.router, dim=1) @ F.normalize(s.router, dim=1).t())
        router_cos = torch.stack(routers)
        e = router_cos.shape[1]
        iu = torch.triu_indices(e, e, 1)
        expert_cos: dict[str, torch.Tensor] = {}
        r: dict[str, torch.Tensor] = {}
        mean_r2: dict[str, float] = {}
        for matrix in matrices:
            if not all(matrix in s.neuron_mean for s in stats):
                continue
            cos = torch.stack([s.neuron_cosine(matrix)[:e, :e] for s in stats])
            expert_cos[matrix] = cos
            r[matrix] = torch.tensor(
                [pearson(rc[iu[0], iu[1]], c[iu[0], iu[1]]) for rc, c in zip(router_cos, cos, strict=True)]
            )
            mean_r2[matrix] = _mean_r2(r[matrix], self.options.s4_round)
        return GateVsExperts(router_cos, expert_cos, r, mean_r2, list(self.layers))

    # --- S3 -----------------------------------------------------------------------------------
    def reorder_similarity(
        self,
        layer: int,
        pair: tuple[int, int] = (0, 1),
        *,
        max_neurons: int | None = None,
        method: str = "assignment",
        seed: int = 0,
        per_matrix: bool | None = None,
    ) -> ReorderResult:
        """S3 for members ``pair`` of block ``layer`` (see :func:`~modulart.introspect.static.reorder_similarity`).

        ``pair`` indexes ``members`` (the dense reference ``F`` is the last one when given);
        ``per_matrix`` (default: ``options.s3_per_matrix``) finds one permutation per matrix, as the
        reference notebooks; ``max_neurons=None`` (default) matches all neurons, as they do.

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> res = weights(toy_moe(), progress=False).reorder_similarity(layer=1, pair=(2, 2), method="nearest")
            >>> res.tau, round(min(res.after.values()), 4)
            (1.0, 1.0)
        """
        if per_matrix is not None and not isinstance(per_matrix, bool):
            raise ConfigError(f"per_matrix = {per_matrix!r}: must be None (from the options) or a bool")
        pm = self.options.s3_per_matrix if per_matrix is None else per_matrix
        reader = self.source.layer(self._position(layer))
        return reorder_similarity(
            reader, pair[0], pair[1], max_neurons=max_neurons, method=method, seed=seed, per_matrix=pm
        )

    # --- S5 -----------------------------------------------------------------------------------
    def pca(
        self,
        matrix: str = "act",
        *,
        level: str = "experts",
        layer: int | None = None,
        n_components: int = 2,
        max_neurons: int | Literal["auto"] | None = "auto",
        seed: int = 0,
    ) -> PCAResult:
        """S5: PCA of the experts (flattened, z-scored; every layer) or of one layer's neurons.

        Points: the routed experts, plus the shared experts (``options.pca_shared``; same shape
        only in the expert PCA) and the dense reference ``F`` (``options.pca_dense``, when given).
        The expert PCA z-scores each coordinate across the points with divisor ``n - options.pca_ddof``;
        the neuron PCA centres each feature (and divides it by its sample standard deviation with
        ``options.neuron_pca_zscore``).

        Args:
            matrix: ``act``, ``up`` or ``down``.
            level: ``experts`` (flattened matrices, every layer) or ``neurons`` (one layer).
            layer: block index (``level="neurons"``).
            n_components: components kept.
            max_neurons: neurons sampled per member (``neurons`` level); ``"auto"``:
                ``options.neuron_pca_sample`` (256, or all in reference mode); None: all.
            seed: sampling seed.

        Example:
            >>> from modulart.introspect.toy import toy_moe
            >>> w = weights(toy_moe(), progress=False)
            >>> p = w.pca("act")
            >>> tuple(p.coords.shape), p.labels
            ((2, 4, 2), ['e0', 'e1', 'e2', 'e3'])
            >>> tuple(w.pca("down", level="neurons", layer=0, max_neurons=8).coords.shape)
            (32, 2)
        """
        check_matrix(matrix)
        if level == "experts":
            stats = self.scan([matrix], pca=[matrix])
            pts, ratios = [], []
            for s in stats:
                coords, ratio = pca_from_gram(s.zgram[matrix], n_components)
                n = len(s.zmembers[matrix])
                if self.options.pca_ddof and n > 1:  # sample instead of population deviation
                    coords = coords * math.sqrt((n - 1) / n)
                pts.append(coords)
                ratios.append(ratio)
            labels = [stats[0].members[i] for i in stats[0].zmembers[matrix]]
            return PCAResult(torch.stack(pts), labels, torch.stack(ratios), list(self.layers), level)
        if level != "neurons":
            raise ConfigError(f"level must be 'experts' or 'neurons', got {level!r}")
        if layer is None:
            raise ConfigError("pca(level='neurons') needs layer=<block index>")
        mn = self.options.neuron_pca_sample if isinstance(max_neurons, str) and max_neurons == "auto" else max_neurons
        if not (mn is None or (isinstance(mn, int) and not isinstance(mn, bool) and mn >= 1)):
            raise ConfigError(f"max_neurons = {max_neurons!r}: must be 'auto', None (all neurons) or an int >= 1")
        reader = self.source.layer(self._position(layer))
        coords, owner, ratio = neuron_pca(
            reader,
            matrix,
            max_neurons=mn,
            k=n_components,
            seed=seed,
            kinds=self._pca_kinds,
            zscore=self.options.neuron_pca_zscore,
        )
        return PCAResult(coords, [reader.members[int(o)] for o in owner], ratio, [layer], level)


def weights(
    source: nn.Module | str | PathLike[str] | WeightSource,
    *,
    dense: DenseSpec = None,
    experts: ExpertsSpec | None = None,
    layers: LayersArg = None,
    budget_mb: float = 128,
    progress: bool | None = None,
    options: OptionsArg = None,
    on_layer: Callable[[LayerDone], None] | None = None,
) -> Weights:
    """The static analyses of a live model or a safetensors checkpoint directory (streamed).

    Args:
        source: an ``nn.Module``, a checkpoint directory, or a :class:`WeightSource`.
        dense: optional dense reference (model or checkpoint dir): adds the ``F`` member.
        experts: analyse dense FFNs as experts (an EMoE handle or ``{ffn_path: ExpertGroups}``).
        layers: which MoE layers (a layer specification over the MoE layers in depth order).
        budget_mb: MB (fp32) of one chunk of a layer's members; two are in flight (read-ahead).
        progress: progress bar (default: when stderr is a terminal).
        options: an :class:`~modulart.introspect.options.IntrospectOptions`, ``"reference"`` (the
            reference notebooks' computations) or None / ``"default"`` (modulart's).
        on_layer: called with a :class:`LayerDone` after each layer of a streaming pass.

    Returns:
        :class:`Weights`.

    Example:
        >>> from modulart.introspect.toy import toy_moe
        >>> w = weights(toy_moe(), progress=False)
        >>> w.layers, w.matrices
        ([0, 1], ['act', 'up', 'down'])
        >>> weights(toy_moe(), options="reference", progress=False).options.s3_per_matrix
        True
    """
    opts = resolve_options(options)
    ok_budget = isinstance(budget_mb, (int, float)) and not isinstance(budget_mb, bool)
    if not (ok_budget and math.isfinite(budget_mb) and budget_mb > 0):
        raise ConfigError(f"budget_mb = {budget_mb!r}: must be a finite number of MB > 0")
    if isinstance(source, WeightSource):
        src = source
    elif isinstance(source, nn.Module):
        from modulart.introspect.live import ModelSource

        src = ModelSource(source, dense=dense, experts=experts)
    elif isinstance(source, (str, PathLike)):
        from modulart.introspect.checkpoint import CheckpointSource

        if experts is not None:
            raise ConfigError("experts= (dense FFNs as experts) needs a live model, not a checkpoint directory")
        src = CheckpointSource(source, dense=dense)
    else:
        raise InvalidArgumentError(
            f"source must be a model, a checkpoint directory or a WeightSource, got {type(source)}"
        )
    if on_layer is not None and not callable(on_layer):
        raise ConfigError(f"on_layer = {on_layer!r}: must be a callable taking a LayerDone, or None")
    return Weights(src, layers=layers, budget_mb=budget_mb, progress=progress, options=opts, on_layer=on_layer)


def _mean_r2(r: torch.Tensor, decimals: int | None) -> float:
    """Mean over layers of ``r ** 2`` (NaNs left out), each first rounded to ``decimals`` when given.

    Example:
        >>> _mean_r2(torch.tensor([0.3, 0.31]), None), _mean_r2(torch.tensor([0.3, 0.31]), 2)
        (0.09305000305175781, 0.095)
    """
    if decimals is None:
        return float((r**2).nanmean())
    vals = [round(float(v) ** 2, decimals) for v in r.tolist() if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
