"""Weight analyses of one layer: the streaming pass (S1, S2, S5-experts) and the per-pair ones (S3, S5-neurons).

The streaming pass reads each matrix type of a layer chunk by chunk (all members' chunk ``c``
together) and keeps only small accumulators:

- S1: the Gram matrix ``G[i, j] = <W_i, W_j>`` of the flattened matrices (members of one shape);
  cosine ``G[i, j] / sqrt(G[i, i] G[j, j])``;
- S2: each member's neuron sum (rows of act/up, columns of down) -> the mean neuron ``[d_model]``;
- S5: the Gram matrix of the PCA members' flattened matrices (the routed experts; with
  ``pca_kinds`` also the dense reference ``F`` and same-shape shared experts) z-scored per coordinate
  across those members, whose eigenvectors give the expert PCA (exactly PCA of the ``[n, I*d]`` data
  matrix).

Example:
    >>> import torch
    >>> from modulart.core.neuron_groups import ExpertGroups
    >>> from modulart.introspect.live import ModelSource
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> reader = ModelSource(model, experts={"": ExpertGroups(torch.arange(32) % 4, 4)}).layer(0)
    >>> stats = scan_layer(reader, ["act"])
    >>> tuple(stats.cosine("act").shape), bool(torch.allclose(stats.cosine("act").diagonal(), torch.ones(4)))
    ((4, 4), True)
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modulart.core.errors import ConfigError, ModulartError, OutOfRangeError, ShapeError
from modulart.introspect.prefetch import Job, Prefetcher
from modulart.introspect.sources import (
    NEURON_AXIS,
    LayerReader,
    TensorReader,
    check_matrix,
    chunk_count,
    common_axis,
)
from modulart.introspect.stored import StoredMatrix

__all__ = [
    "LayerScan",
    "LayerWeightStats",
    "ReorderResult",
    "kendall_tau",
    "neuron_pca",
    "pca_from_gram",
    "pearson",
    "reorder_similarity",
    "scan_layer",
    "scan_layers",
]


@dataclass
class LayerWeightStats:
    """Accumulated weight statistics of one layer (fp32).

    Attributes:
        index: block index; members / kinds: as in :class:`LayerReader`.
        router: ``[E, d_model]`` or None.
        gram: per matrix ``[M, M]`` Gram of flattened matrices (NaN between different shapes).
        zgram: per matrix ``[n, n]`` Gram of the z-scored flattened PCA members (population variance).
        zmembers: per matrix the ``n`` member indices of ``zgram`` (routed experts first, in member order).
        neuron_mean: per matrix ``[M, d_model]`` mean neuron vector (NaN where a member lacks it).
    """

    index: int
    members: list[str]
    kinds: list[str]
    router: torch.Tensor | None
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    zgram: dict[str, torch.Tensor] = field(default_factory=dict)
    zmembers: dict[str, list[int]] = field(default_factory=dict)
    neuron_mean: dict[str, torch.Tensor] = field(default_factory=dict)

    def cosine(self, matrix: str) -> torch.Tensor:
        """S1: ``[M, M]`` cosine between flattened ``matrix`` of every pair of members."""
        g = self.gram[check_matrix(matrix)]
        n = g.diagonal().clamp(min=1e-30).sqrt()
        return g / (n[:, None] * n[None, :])

    def neuron_cosine(self, matrix: str) -> torch.Tensor:
        """S2: ``[M, M]`` cosine between members' mean neurons."""
        v = self.neuron_mean[check_matrix(matrix)]
        return F.normalize(v, dim=1) @ F.normalize(v, dim=1).t()


def scan_layer(
    reader: LayerReader,
    matrices: Sequence[str],
    budget_bytes: int = 128 << 20,
    pca: Sequence[str] = (),
    pca_kinds: Collection[str] = ("expert",),
) -> LayerWeightStats:
    """One streaming pass over ``matrices`` of a layer: S1 Grams, S2 neuron means, S5 z-scored Grams.

    Args:
        reader: the layer.
        matrices: any of ``act``, ``up``, ``down``.
        budget_bytes: bytes (fp32) of one chunk of all same-shape members; two chunks are in flight
            (the next one is read while the current one is reduced).
        pca: the matrices (among ``matrices``) whose z-scored Gram (S5) is accumulated too (the costliest part).
        pca_kinds: the member kinds that are PCA points: ``expert`` (routed), ``dense`` (``F``),
            ``shared``; they must all have the same shape.

    Returns:
        The :class:`LayerWeightStats` (router read too).
    """
    (stats,) = scan_layers([LayerScan(lambda: reader, matrices, pca)], budget_bytes, pca_kinds)
    return stats


@dataclass(frozen=True)
class LayerScan:
    """One layer of a :func:`scan_layers` pass: how to open it (called in the reader thread) and
    which matrices to accumulate (``pca``: those whose S5 z-scored Gram is accumulated too)."""

    open: Callable[[], LayerReader]
    matrices: Sequence[str]
    pca: Sequence[str] = ()


@dataclass
class _Group:
    """The members of one shape of one matrix type: read together, chunk by chunk."""

    matrix: str
    shape: tuple[int, int]
    group: list[int]
    readers: list[TensorReader]
    n: int
    axis: int


@dataclass
class _Plan:
    """A layer opened and checked in the reader thread: what the caller accumulates, in read order."""

    reader: LayerReader
    router: torch.Tensor | None
    matrices: list[str]
    pca: list[str]
    have: dict[str, list[int]]
    experts: dict[str, list[int]]
    groups: list[_Group]


def _plan_layer(
    reader: LayerReader, matrices: Sequence[str], budget_bytes: int, pca: Sequence[str], pca_kinds: Collection[str]
) -> _Plan:
    """Check a layer's matrices (the errors :func:`scan_layer` raises, in its order) and list its chunked groups."""
    members, kinds = reader.members, reader.kinds
    n_m = len(members)
    plan = _Plan(reader, reader.router(), [], list(pca), {}, {}, [])
    for matrix in matrices:
        check_matrix(matrix)
        have = [m for m in range(n_m) if reader.has(m, matrix)]
        if not have:
            raise ShapeError(f"layer {reader.index} ({reader.label}): no member has a {matrix!r} matrix")
        experts = [m for m in have if kinds[m] in pca_kinds]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for m in have:
            groups[reader.shape(m, matrix)].append(m)
        if matrix in pca and len({reader.shape(m, matrix) for m in experts}) > 1:
            shapes = {members[m]: reader.shape(m, matrix) for m in experts}
            raise ShapeError(
                f"layer {reader.index} ({reader.label}): the PCA members' {matrix!r} matrices differ in shape "
                f"{shapes}; leave the odd ones out (IntrospectOptions.pca_dense / pca_shared)"
            )
        plan.matrices.append(matrix)
        plan.have[matrix], plan.experts[matrix] = have, experts
        for shape, group in groups.items():
            readers = [reader.tensor(m, matrix) for m in group]
            axis = common_axis(readers)
            n = 1 if axis is None else chunk_count([shape] * len(group), [shape[axis]], budget_bytes)
            plan.groups.append(_Group(matrix, shape, group, readers, n, 0 if axis is None else axis))
    return plan


_Chunk = tuple[torch.Tensor, list[tuple[int, int, int, tuple[int, ...]]]]


class _Buffers:
    """fp32 chunk buffers handed back by the caller once reduced and reused by the reader thread, so a
    pass does not fault in fresh pages for every chunk (a fresh 100 MB buffer costs several times the
    bf16 -> fp32 copy into it). At most ``keep`` free buffers are kept; the caller gives a buffer back
    before it asks for the next chunk, so with ``keep = depth`` no more than ``depth`` buffers exist."""

    def __init__(self, keep: int) -> None:
        self._free: list[torch.Tensor] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, rows: int, cols: int) -> torch.Tensor:
        """``[rows, cols]`` fp32, contiguous, uninitialised (a reused buffer when one is large enough)."""
        need = rows * cols
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= need]
            buf = self._free.pop(fits[0]) if fits else None
            if buf is None and self._free:
                self._free.pop(0)  # too small: dropped, so the count stays bounded
        if buf is None:
            buf = torch.empty(need)
        return buf.view(-1)[:need].view(rows, cols)

    def give(self, t: torch.Tensor) -> None:
        """Hand back a buffer from :meth:`take` (the caller must hold no view of it any more)."""
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(t)


def _jobs(
    layers: Iterable[LayerScan], budget_bytes: int, pca_kinds: Collection[str], buffers: _Buffers | None = None
) -> Iterator[Job[_Plan | _Chunk]]:
    """The reader thread's work, in the order the caller consumes it: per layer its plan, then every
    group's chunks."""
    for item in layers:
        plan = _plan_layer(item.open(), item.matrices, budget_bytes, item.pca, pca_kinds)
        yield Job(f"layer {plan.reader.index} ({plan.reader.label})", functools.partial(_same, plan))
        for grp in plan.groups:
            for c in range(grp.n):
                what = ", ".join(r.describe() for r in grp.readers[:2]) + (", ..." if len(grp.readers) > 2 else "")
                yield Job(
                    f"layer {plan.reader.index} {grp.matrix!r} chunk {c + 1}/{grp.n} of {what}",
                    functools.partial(_read_chunk, grp.readers, c=c, n=grp.n, axis=grp.axis, buffers=buffers),
                    functools.partial(_hint_chunk, grp.readers, c=c, n=grp.n, axis=grp.axis),
                )


def scan_layers(
    layers: Iterable[LayerScan],
    budget_bytes: int = 128 << 20,
    pca_kinds: Collection[str] = ("expert",),
    *,
    depth: int = 2,
) -> Generator[LayerWeightStats, None, None]:
    """:func:`scan_layer` over many layers as one pipeline: a background thread opens the layers and
    reads (and converts to fp32) the chunks ahead, across matrix and layer boundaries, while the
    caller reduces the current one; ``depth`` chunks are alive at most (the one being reduced
    included), so memory stays at ``depth x budget_bytes`` whatever the model size.

    The numbers are the same as :func:`scan_layer`'s, layer by layer (same chunks, same order of
    accumulation). Stopping the iteration early (``close()`` on the generator) stops and joins the
    thread; an error in it (a missing member, an unreadable file) is raised here, naming the layer,
    the file and the tensor.

    Args:
        layers: per layer, how to open it and which matrices to scan (see :class:`LayerScan`).
        budget_bytes: fp32 bytes of one chunk of all same-shape members.
        pca_kinds: as for :func:`scan_layer`.
        depth: chunks in flight (>= 1).

    Yields:
        One :class:`LayerWeightStats` per layer, in order.

    Example:
        >>> from modulart.introspect.live import ModelSource
        >>> from modulart.introspect.toy import toy_moe
        >>> src = ModelSource(toy_moe())
        >>> todo = [LayerScan(lambda p=p: src.layer(p), ["act", "down"]) for p in range(2)]
        >>> [tuple(s.cosine("down").shape) for s in scan_layers(todo)]
        [(4, 4), (4, 4)]
    """
    buffers = _Buffers(depth)
    jobs = _jobs(layers, budget_bytes, pca_kinds, buffers)
    with Prefetcher(jobs, depth, name="modulart-introspect-reader") as items:
        for first in items:
            assert isinstance(first, _Plan)
            yield _reduce_layer(first, items, buffers)


def _reduce_layer(plan: _Plan, items: Iterator[_Plan | _Chunk], buffers: _Buffers | None = None) -> LayerWeightStats:
    """Accumulate one layer's chunks (taken from ``items`` in plan order) into its statistics."""
    reader = plan.reader
    members, kinds = reader.members, reader.kinds
    n_m = len(members)
    stats = LayerWeightStats(reader.index, members, kinds, plan.router)
    grams: dict[str, torch.Tensor] = {}
    sums_: dict[str, torch.Tensor] = {}
    zgrams: dict[str, torch.Tensor] = {}
    for matrix in plan.matrices:
        d_model = reader.shape(plan.have[matrix][0], matrix)[1 - NEURON_AXIS[matrix]]
        grams[matrix] = torch.full((n_m, n_m), float("nan"))
        sums_[matrix] = torch.full((n_m, d_model), float("nan"))
        zgrams[matrix] = torch.zeros(len(plan.experts[matrix]), len(plan.experts[matrix]), dtype=torch.float64)
    for grp in plan.groups:
        matrix, shape, group = grp.matrix, grp.shape, grp.group
        na = NEURON_AXIS[matrix]
        experts = plan.experts[matrix]
        d_model = sums_[matrix].shape[1]
        g = torch.zeros(len(group), len(group), dtype=torch.float64)
        acc = torch.zeros(len(group), d_model, dtype=torch.float64)
        zrows = [i for i, m in enumerate(group) if m in experts] if matrix in plan.pca else []
        pos = torch.tensor([experts.index(group[i]) for i in zrows])
        for _ in range(grp.n):
            item = next(items)
            assert not isinstance(item, _Plan)
            flat, spans = item  # flat [g, chunk] fp32
            for i, (b_axis, start, stop, b_shape) in enumerate(spans):
                blk = flat[i].view(b_shape)
                part = (torch.mv(blk.t(), blk.new_ones(blk.shape[0])) if na == 0 else blk.sum(1)).double()
                if b_axis == na:
                    acc[i] += part
                else:
                    acc[i, start:stop] += part
            g += _gram(flat)
            if len(zrows) > 1:
                zgrams[matrix][pos[:, None], pos[None, :]] += _zscored_gram(flat, zrows)
            del item, blk
            if buffers is not None:
                buffers.give(flat)  # reduced: the reader thread may refill it
            del flat
        idx = torch.tensor(group)
        grams[matrix][idx[:, None], idx[None, :]] = g.float()
        sums_[matrix][idx] = (acc / float(shape[na])).float()
    for matrix in plan.matrices:
        stats.gram[matrix], stats.neuron_mean[matrix] = grams[matrix], sums_[matrix]
        if matrix in plan.pca:
            stats.zgram[matrix], stats.zmembers[matrix] = zgrams[matrix].float(), plan.experts[matrix]
    return stats


def _read_chunk(
    readers: list[TensorReader], *, c: int, n: int, axis: int, buffers: _Buffers | None = None
) -> tuple[torch.Tensor, list[tuple[int, int, int, tuple[int, ...]]]]:
    """Chunk ``c`` of every reader into one fp32 ``[g, chunk]`` buffer (from ``buffers`` when given),
    one block in flight at a time (stored blocks read into a reused scratch buffer); with each block's
    ``(axis, start, stop, shape)``."""
    flat: torch.Tensor | None = None
    spans = []
    for i, r in enumerate(readers):
        b = r.chunk_transient(c, n, axis) if isinstance(r, StoredMatrix) else r.chunk(c, n, axis)
        if flat is None:
            numel = b.tensor.numel()
            flat = buffers.take(len(readers), numel) if buffers is not None else torch.empty(len(readers), numel)
        flat[i].copy_(b.tensor.reshape(-1))  # fp32 from the stored dtype, one pass
        spans.append((b.axis, b.start, b.stop, tuple(b.tensor.shape)))
        del b
    assert flat is not None
    return flat, spans


def _same(plan: _Plan) -> _Plan:
    return plan


def _hint_chunk(readers: list[TensorReader], *, c: int, n: int, axis: int) -> None:
    """Tell the operating system which bytes chunk ``c`` will read (stored readers; a no-op in memory)."""
    for r in readers:
        r.hint(c, n, axis)


def _gram(x: torch.Tensor, step: int = 1 << 18) -> torch.Tensor:
    """``x [n, p] -> x xᵀ [n, n]`` in fp64: fp32 products over ``step`` columns, summed in fp64
    (one fp32 dot product over millions of coordinates loses about four digits).

    The full ``step``-column blocks go through one batched product (``[p // step, n, n]``; a
    strided ``[n, step]`` slice per call is several times slower in BLAS), summed in fp64 in the
    same order as one block at a time: the result is the same to the bit.
    """
    n, p = x.shape
    out = torch.zeros(n, n, dtype=torch.float64)
    full = p // step
    if full:
        v = x[:, : full * step].view(n, full, step).transpose(0, 1)  # [full, n, step], no copy
        for blk in torch.bmm(v, v.transpose(1, 2)).double():
            out += blk
    if full * step < p:
        part = x[:, full * step :]
        out += (part @ part.t()).double()
    return out


def _gram_reference(x: torch.Tensor, step: int = 1 << 18) -> torch.Tensor:
    """The one-block-at-a-time form of :func:`_gram` (the reference its tests compare against)."""
    out = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[1], step):
        part = x[:, s : s + step]
        out += (part @ part.t()).double()
    return out


def _zscored_gram(x: torch.Tensor, rows: list[int], step: int = 1 << 20) -> torch.Tensor:
    """``x [n, p] -> [k, k]``: Gram of ``x[rows]`` z-scored per column across those rows (fp64).

    Row-wise arithmetic on contiguous slices (a reduction over the short row axis of a wide matrix is
    slow), ``step`` columns at a time, so the fp64 temporaries stay small.
    """
    k = len(rows)
    out = torch.zeros(k, k, dtype=torch.float64)
    for s in range(0, x.shape[1], step):
        part = [x[i, s : s + step].double() for i in rows]
        mean = sum(part[1:], part[0].clone()) / k
        centred = [r - mean for r in part]
        var = sum((c * c for c in centred[1:]), centred[0] * centred[0]) / k
        inv = var.clamp(min=1e-24).rsqrt()
        z = torch.stack([c * inv for c in centred])
        out += z @ z.t()
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (NaN when either is constant).

    Example:
        >>> round(pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])), 4)
        0.9934
    """
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's τ-a between two 1-D sequences (O(n²) memory in chunks).

    Example:
        >>> kendall_tau(torch.arange(5), torch.arange(5)), kendall_tau(torch.arange(5), torch.arange(5).flip(0))
        (1.0, -1.0)
    """
    n = int(a.numel())
    if n < 2:
        return float("nan")
    a, b = a.double(), b.double()
    total = 0.0
    for s in range(0, n, 1024):
        da = torch.sign(a[s : s + 1024, None] - a[None, :])
        db = torch.sign(b[s : s + 1024, None] - b[None, :])
        total += float((da * db).sum())
    return total / (n * (n - 1))


def pca_from_gram(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA coordinates from the Gram matrix of centred data: ``[n, n] -> ([n, k], explained [k])``.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> coords, ratio = pca_from_gram(x @ x.t(), 1)
        >>> coords.abs().flatten().tolist(), ratio.tolist()
        ([1.0, 1.0], [1.0])
    """
    vals, vecs = torch.linalg.eigh(gram.double())
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    k = min(k, gram.shape[0])
    coords = vecs[:, :k] * vals[:k].sqrt()
    total = float(vals.sum())
    ratio = vals[:k] / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    return coords.float(), ratio.float()


def _neurons(reader: LayerReader, m: int, matrices: Sequence[str]) -> torch.Tensor:
    """``[I, len(matrices) * d]``: each neuron's (act row, up row, down column) concatenated."""
    parts = []
    for matrix in matrices:
        w = reader.tensor(m, matrix).full()
        parts.append(w if NEURON_AXIS[matrix] == 0 else w.t())
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class ReorderResult:
    """S3 for one pair of experts.

    Attributes:
        tau: Kendall τ between the sampled neurons of A and the neurons of B matched to them
            (1: the identity order, about 0: no relation); with one permutation per matrix, the
            mean of the per-matrix τ.
        before / after: per matrix, cosine of the (sampled) flattened matrices before and after
            permuting B's neurons (by that matrix's permutation).
        neuron_cosine: mean cosine of matched neuron vectors (per-matrix mode: mean over matrices).
        rows / permutation: A's sampled neurons and B's neuron matched to each (per-matrix mode:
            the first matrix's permutation).
        method: ``assignment`` (linear assignment, exact) or ``nearest`` (each A neuron's most
            similar B neuron: a permutation-invariant proxy, one matrix product).
        per_matrix: one permutation per matrix (True) or one joint permutation (False).
        taus / permutations: per matrix, the τ and the permutation applied to it (in joint mode
            the joint ones).
    """

    tau: float
    before: dict[str, float]
    after: dict[str, float]
    neuron_cosine: float
    rows: torch.Tensor
    permutation: torch.Tensor
    method: str
    per_matrix: bool = False
    taus: dict[str, float] = field(default_factory=dict)
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)


def _match(sim: torch.Tensor, method: str) -> torch.Tensor:
    """B's neuron matched to each row of ``sim [n, I_b]``: linear assignment or the row's argmax."""
    if method == "nearest":
        return sim.argmax(1)
    try:
        linear_sum_assignment = importlib.import_module("scipy.optimize").linear_sum_assignment
    except ImportError:
        raise ModulartError(
            "reorder_similarity(method='assignment') needs scipy (pip install 'modulart[plot]'); "
            "method='nearest' needs nothing extra"
        ) from None
    r, c = linear_sum_assignment(sim.double().numpy(), maximize=True)
    perm = torch.empty(sim.shape[0], dtype=torch.long)
    perm[torch.as_tensor(r)] = torch.as_tensor(c, dtype=torch.long)
    return perm


def reorder_similarity(
    reader: LayerReader,
    a: int,
    b: int,
    *,
    matrices: Sequence[str] = ("act", "up", "down"),
    max_neurons: int | None = None,
    method: str = "assignment",
    seed: int = 0,
    per_matrix: bool = False,
) -> ReorderResult:
    """S3: match expert ``b``'s neurons to expert ``a``'s and measure similarity after permuting.

    By default neurons are compared by the cosine of their concatenated (act row, up row, down
    column), and one permutation serves all matrices. ``per_matrix=True`` finds one permutation per
    matrix from that matrix's neuron vectors alone, as the reference notebooks (three τ per pair).
    ``max_neurons`` samples that many of A's neurons (matched against all of B's), keeping the
    O(n · I²) assignment affordable.

    Example:
        >>> from modulart.introspect.live import ModelSource
        >>> from modulart.introspect.toy import toy_moe
        >>> model = toy_moe()
        >>> e0, e1 = model.layers[0].experts[0], model.layers[0].experts[1]
        >>> perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
        >>> with torch.no_grad():  # expert 1 := expert 0 with its neurons permuted
        ...     for a, b in ((e1.gate_proj, e0.gate_proj), (e1.up_proj, e0.up_proj)):
        ...         _ = a.weight.copy_(b.weight[perm])
        ...     _ = e1.down_proj.weight.copy_(e0.down_proj.weight[:, perm])
        >>> res = reorder_similarity(ModelSource(model).layer(0), 1, 0)
        >>> torch.equal(res.permutation, perm), round(res.after["down"], 4), res.before["down"] < 0.5
        (True, 1.0, True)
        >>> sorted(reorder_similarity(ModelSource(model).layer(0), 1, 0, per_matrix=True).taus)
        ['act', 'down', 'up']
    """
    if method not in ("assignment", "nearest"):
        raise ConfigError(f"method must be 'assignment' or 'nearest', got {method!r}")
    if not isinstance(per_matrix, bool):
        raise ConfigError(f"per_matrix = {per_matrix!r}: must be a bool")
    n_m = len(reader.members)
    for name, m in (("a", a), ("b", b)):
        if not 0 <= m < n_m:
            raise OutOfRangeError(
                f"pair member {name}={m} out of range: layer {reader.index} has members {reader.members}"
            )
    mats = [check_matrix(x) for x in matrices if reader.has(a, x) and reader.has(b, x)]
    na, nb = _neurons(reader, a, mats), _neurons(reader, b, mats)
    if na.shape[1] != nb.shape[1]:
        raise ShapeError(f"experts {a} and {b} have neurons of different sizes ({na.shape[1]} vs {nb.shape[1]})")
    rows = torch.arange(na.shape[0])
    if max_neurons is not None and max_neurons < na.shape[0]:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(na.shape[0], generator=g)[:max_neurons].sort().values
    d = reader.shape(a, mats[0])[1 - NEURON_AXIS[mats[0]]]
    blocks = [(na[:, i * d : (i + 1) * d], nb[:, i * d : (i + 1) * d]) for i in range(len(mats))]
    perms: dict[str, torch.Tensor] = {}
    matched: list[float] = []
    if per_matrix:
        for matrix, (wa, wb) in zip(mats, blocks, strict=True):
            sim = F.normalize(wa[rows], dim=1) @ F.normalize(wb, dim=1).t()  # [n, I_b]
            perms[matrix] = _match(sim, method)
            matched.append(float(sim[torch.arange(len(rows)), perms[matrix]].mean()))
    else:
        sim = F.normalize(na[rows], dim=1) @ F.normalize(nb, dim=1).t()  # [n, I_b]
        joint = _match(sim, method)
        perms = dict.fromkeys(mats, joint)
        matched.append(float(sim[torch.arange(len(rows)), joint].mean()))
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for matrix, (wa, wb) in zip(mats, blocks, strict=True):
        same = rows if rows.max() < wb.shape[0] else rows.clamp(max=wb.shape[0] - 1)
        before[matrix] = float(F.cosine_similarity(wa[rows].reshape(1, -1), wb[same].reshape(1, -1)))
        after[matrix] = float(F.cosine_similarity(wa[rows].reshape(1, -1), wb[perms[matrix]].reshape(1, -1)))
    taus: dict[str, float] = {matrix: kendall_tau(rows, perms[matrix]) for matrix in mats}
    return ReorderResult(
        tau=sum(taus.values()) / len(taus) if per_matrix else taus[mats[0]],
        before=before,
        after=after,
        neuron_cosine=sum(matched) / len(matched),
        rows=rows,
        permutation=perms[mats[0]],
        method=method,
        per_matrix=per_matrix,
        taus=taus,
        permutations=perms,
    )


def neuron_pca(
    reader: LayerReader,
    matrix: str,
    *,
    max_neurons: int | None = 256,
    k: int = 2,
    seed: int = 0,
    kinds: Collection[str] = ("expert",),
    zscore: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S5 (neurons): PCA of the neuron vectors of ``matrix`` of the members of ``kinds`` (sampled per member).

    The ``[n, d_model]`` data (neuron = a row of act/up, a column of down) is centred per feature;
    ``zscore=True`` also divides each feature by its sample standard deviation over all ``n``
    neurons (constant features become 0), as the reference notebooks. ``max_neurons=None`` takes
    every neuron of every member, in member order.

    Args:
        reader: the layer.
        matrix: ``act``, ``up`` or ``down``.
        max_neurons: neurons sampled per member (None: all).
        k: components.
        seed: sampling seed.
        kinds: member kinds that contribute neurons: ``expert`` (routed), ``shared``, ``dense`` (``F``).
        zscore: standardise every feature, not only centre it.

    Returns:
        ``coords [n, k]``, ``member [n]`` (the member index each neuron belongs to), ``explained [k]``.

    Example:
        >>> from modulart.introspect.live import ModelSource
        >>> from modulart.introspect.toy import toy_moe
        >>> coords, owner, ratio = neuron_pca(ModelSource(toy_moe()).layer(0), "up", max_neurons=5)
        >>> tuple(coords.shape), owner.tolist()[:6], bool(ratio.sum() <= 1)
        ((20, 2), [0, 0, 0, 0, 0, 1], True)
    """
    check_matrix(matrix)
    g = torch.Generator().manual_seed(seed)
    vecs, owner = [], []
    for m, kind in enumerate(reader.kinds):
        if kind not in kinds or not reader.has(m, matrix):
            continue
        w = reader.tensor(m, matrix).full()
        w = w if NEURON_AXIS[matrix] == 0 else w.t()
        if max_neurons is None:
            pick = torch.arange(w.shape[0])
        else:
            pick = torch.randperm(w.shape[0], generator=g)[: min(max_neurons, w.shape[0])]
        vecs.append(w[pick])
        owner.append(torch.full((len(pick),), m, dtype=torch.long))
    if not vecs:
        raise ShapeError(f"layer {reader.index}: no member of kinds {sorted(kinds)} has a {matrix!r} matrix")
    x = torch.cat(vecs).double()
    x = x - x.mean(0)
    if zscore:
        std = x.std(0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=x.dtype)
        x = torch.where(std > 0, x / std.clamp(min=1e-300), torch.zeros_like(x))
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    k = min(k, v.shape[0])
    var = s**2
    return (x @ v[:k].t()).float(), torch.cat(owner), (var[:k] / var.sum().clamp(min=1e-30)).float()
