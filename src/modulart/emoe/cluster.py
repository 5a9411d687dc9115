"""Balanced clustering of FFN key vectors into equal-size experts (EMoE step 3).

:func:`balanced_kmeans` splits ``n`` vectors into ``k`` clusters of exactly ``n // k`` or
``n // k + 1`` members (sizes differ by at most one) with size-constrained k-means:

1. k-means++ initialisation (greedy, ``2 + ln k`` local trials per centre as in scikit-learn) driven
   by a ``torch.Generator`` seeded with ``seed``;
2. Lloyd iterations whose assignment step solves the capacitated assignment (a transportation
   problem: every point to one cluster, cluster ``j`` takes exactly ``caps[j]`` points, minimum
   total squared distance) *exactly*, the job the reference hands to a min-cost-flow solver.
   Vectorised over the ``[n, k]`` cost matrix: a few rounds of cluster prices (over-full clusters
   raise their price past the regret of their ``excess``-th most willing member), then successive
   shortest paths over the ``k``-node cluster graph (edge ``a → b``: the cheapest move of one member
   of ``a`` to ``b``) along many disjoint augmenting paths per Bellman-Ford pass. Prices carry over
   between Lloyd iterations, so later iterations start almost balanced;
3. an improvement pass of pairwise swaps between clusters (and, when ``n % k != 0``, single-point
   moves from an ``n // k + 1`` cluster to an ``n // k`` one, which lets the data choose the clusters
   that get the extra point) that strictly reduce the total squared distance;
4. centroid update; stop when the labels stop changing, or at ``max_iter``.

Distances, centroids and the initialisation run in torch fp32 on the input's device (CPU or CUDA);
the assignment step (latency-bound bookkeeping on the small ``[n, k]`` cost matrix) runs in numpy
fp64 on the CPU. Random draws come from a CPU generator, so a seed draws the same numbers on
every device. Results are deterministic for a seed on a given device (stable sorts, first-index
``argmin``; no reliance on ``topk`` tie order). Labels are canonical: clusters are numbered in the
order of their first member, so equal partitions give equal label tensors.

Results are cached in memory (LRU, 32 entries) and optionally on disk, keyed by a SHA-256 hash of
the vectors' fp32 bytes plus every argument that changes the answer and :data:`ALGORITHM_VERSION`
(never by shape alone: a fine-tuned checkpoint of the same shape gets its own labels).

Example:
    >>> import torch
    >>> from modulart.emoe.cluster import balanced_kmeans, cluster_sizes
    >>> keys = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    >>> labels = balanced_kmeans(keys, 3, seed=0, cache=False)
    >>> sorted(cluster_sizes(labels, 3).tolist())
    [3, 3, 4]
"""

from __future__ import annotations

import hashlib
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from modulart.core.errors import ConfigError
from modulart.core.finite import all_finite
from modulart.emoe.assignment import assign, refine
from modulart.emoe.label_cache import cache_get, cache_put, clear_cluster_cache

__all__ = [
    "ALGORITHM_VERSION",
    "balanced_kmeans",
    "clear_cluster_cache",
    "cluster_sizes",
    "inertia",
    "random_balanced_labels",
    "within_cluster_cosine",
]

ALGORITHM_VERSION = "balanced-kmeans/1"
"""Part of every cache key: bump it whenever a change to the algorithm can change the labels."""

_PROGRESS_MIN_WORK = 1 << 30  # n·d·k above which an auto progress bar is shown on a TTY
_DOT_BLOCK = 256  # rows of x per block of the k-means++ candidate products (see _CandidateDots)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def balanced_kmeans(
    vectors: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = 100,
    normalize: bool = True,
    progress: bool | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Cluster the rows of ``vectors`` into ``k`` clusters of (almost) equal size.

    Every cluster gets ``n // k`` or ``n // k + 1`` rows; exactly ``n % k`` clusters get the extra
    row (which ones is decided by the data, deterministically). See the module docstring for the
    algorithm.

    Args:
        vectors: ``[n, d]`` rows to cluster (e.g. FFN key vectors, the rows of ``W_in``), any
            floating dtype, on CPU or CUDA. Computation happens in fp32 on this device.
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of the k-means++ initialisation.
        max_iter: maximum number of Lloyd iterations (``>= 1``).
        normalize: L2-normalise the rows first (EMoE clusters normalised keys, biases excluded).
        progress: show a tqdm bar over iterations; ``None`` shows one only for large problems when
            stderr is a terminal.
        cache: look up / store the labels in the in-memory LRU cache (and in ``cache_dir``).
        cache_dir: optional directory of an on-disk cache (safetensors files named by the key).

    Returns:
        ``[n]`` int64 labels in ``[0, k)`` on the device of ``vectors``; clusters are numbered in
        the order of their first member.

    Raises:
        ConfigError: ``vectors`` is not a finite 2-D floating tensor, ``k`` is not in ``[1, n]``,
            ``max_iter < 1`` or ``seed`` is not an integer (the message names the argument).

    Note:
        The cache key covers the vectors' fp32 values, ``k``, ``seed``, ``max_iter``, ``normalize``
        and :data:`ALGORITHM_VERSION`, not the device: labels computed on CUDA serve a CPU call with
        the same weights and vice versa (the two can differ only where distances tie to fp32
        rounding).

    Example:
        >>> import torch
        >>> from modulart.emoe.cluster import balanced_kmeans
        >>> centres = torch.eye(4) * 10
        >>> pts = centres.repeat_interleave(3, dim=0) + 0.01 * torch.randn(12, 4)
        >>> labels = balanced_kmeans(pts, 4, normalize=False, cache=False)
        >>> labels.tolist()
        [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    """
    x = _check_vectors(vectors, "vectors")
    n = x.shape[0]
    _check_k(k, n)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    x32 = x.detach().to(torch.float32)

    # a dtype conversion made ``x32`` a private copy: it may be normalised in place, hashed without a clone
    owned = x32.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    key: str | None = None
    if cache:
        key = _cache_key(x32, k, seed=seed, max_iter=max_iter, normalize=normalize, owned=owned)
        hit = cache_get(key, n, k, cache_dir)
        if hit is not None:
            return hit.to(vectors.device, copy=True)

    if progress is None:
        progress = n * x.shape[1] * k >= _PROGRESS_MIN_WORK and _stderr_isatty()
    labels = _balanced_kmeans_impl(
        x32, k, seed=seed, max_iter=max_iter, normalize=normalize, progress=progress, owned=owned
    )

    if key is not None:
        cache_put(key, labels, n, k, cache_dir, algorithm=ALGORITHM_VERSION)
    return labels.clone()


def random_balanced_labels(n: int, k: int, *, seed: int = 0) -> torch.Tensor:
    """A uniformly random exactly balanced split of ``n`` items into ``k`` clusters (ablation baseline).

    Clusters ``0 .. n % k - 1`` get ``n // k + 1`` members, the others ``n // k``.

    Args:
        n: number of items (``>= 1``).
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of the permutation.

    Returns:
        ``[n]`` int64 labels on CPU.

    Raises:
        ConfigError: ``n < 1`` or ``k`` not in ``[1, n]``.

    Example:
        >>> from modulart.emoe.cluster import cluster_sizes, random_balanced_labels
        >>> cluster_sizes(random_balanced_labels(10, 4, seed=1), 4).tolist()
        [3, 3, 2, 2]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    _check_k(k, n)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    labels = torch.empty(n, dtype=torch.int64)
    labels[perm] = torch.arange(n) % k
    return labels


def cluster_sizes(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Number of members of every cluster.

    Args:
        labels: ``[n]`` integer labels in ``[0, k)``.
        k: number of clusters.

    Returns:
        ``[k]`` int64 counts, on the device of ``labels``.

    Raises:
        ConfigError: ``labels`` is not a 1-D integer tensor with values in ``[0, k)``.

    Example:
        >>> import torch
        >>> from modulart.emoe.cluster import cluster_sizes
        >>> cluster_sizes(torch.tensor([0, 2, 2, 0, 2]), 3).tolist()
        [2, 0, 3]
    """
    lab = _check_labels(labels, k, None)
    return torch.bincount(lab, minlength=k)


def inertia(vectors: torch.Tensor, labels: torch.Tensor, k: int, *, normalize: bool = True) -> float:
    """Sum over rows of the squared distance to the mean of the row's cluster.

    Computed as ``Σ‖x‖² − Σ_j ‖S_j‖² / n_j`` (``S_j`` the sum of cluster ``j``) in fp64.

    Args:
        vectors: ``[n, d]`` rows, any floating dtype.
        labels: ``[n]`` integer labels in ``[0, k)``.
        k: number of clusters.
        normalize: L2-normalise the rows first (as :func:`balanced_kmeans` does by default).

    Returns:
        The k-means objective (lower is better).

    Raises:
        ConfigError: bad ``vectors`` or ``labels`` (the message names which).

    Example:
        >>> import torch
        >>> from modulart.emoe.cluster import inertia
        >>> x = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
        >>> inertia(x, torch.tensor([0, 0, 1, 1]), 2, normalize=False)
        4.0
    """
    x = _prepare(_check_vectors(vectors, "vectors"), normalize).to(torch.float64)
    lab = _check_labels(labels, k, x.shape[0]).to(x.device)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, lab, x)
    counts = torch.bincount(lab, minlength=k).to(torch.float64).clamp_min(1.0)
    total = x.square().sum() - (sums.square().sum(1) / counts).sum()
    return max(float(total), 0.0)


def within_cluster_cosine(vectors: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean over clusters of the mean pairwise cosine similarity between distinct members.

    For unit rows the sum of pairwise dot products of a cluster is ``‖Σx‖² − Σ‖x‖²``, so this costs
    ``O(n·d)``. Clusters with fewer than two members are skipped; all-zero rows count as
    similarity 0.

    Args:
        vectors: ``[n, d]`` rows, any floating dtype.
        labels: ``[n]`` integer labels in ``[0, k)``.
        k: number of clusters.

    Returns:
        A value in ``[-1, 1]`` (higher means more coherent clusters); ``nan`` when no cluster has
        two members.

    Raises:
        ConfigError: bad ``vectors`` or ``labels`` (the message names which).

    Example:
        >>> import torch
        >>> from modulart.emoe.cluster import within_cluster_cosine
        >>> x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
        >>> within_cluster_cosine(x, torch.tensor([0, 0, 1, 1]), 2)
        1.0
    """
    x = _prepare(_check_vectors(vectors, "vectors"), True).to(torch.float64)
    lab = _check_labels(labels, k, x.shape[0]).to(x.device)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, lab, x)
    self_sim = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, lab, x.square().sum(1))
    counts = torch.bincount(lab, minlength=k).to(torch.float64)
    ok = counts >= 2
    if not bool(ok.any()):
        return math.nan
    pair_sum = sums.square().sum(1) - self_sim
    mean_pair = pair_sum[ok] / (counts[ok] * (counts[ok] - 1.0))
    return float(mean_pair.mean())


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------


def _check_vectors(vectors: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(vectors).__name__}")
    if vectors.dim() != 2:
        raise ConfigError(f"{name} must be 2-D [n, d], got shape {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise ConfigError(f"{name} must have a floating dtype, got {vectors.dtype}")
    if vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ConfigError(f"{name} must have at least one row and one column, got shape {tuple(vectors.shape)}")
    if not all_finite(vectors):
        raise ConfigError(f"{name} must be finite (found nan or inf)")
    return vectors


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"k must be an integer, got {k!r}")
    if k < 1 or k > n:
        raise ConfigError(f"k must satisfy 1 <= k <= n = {n}, got k = {k}")


def _check_labels(labels: torch.Tensor, k: int, n: int | None) -> torch.Tensor:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ConfigError(f"labels must be a 1-D tensor, got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ConfigError(f"labels must have an integer dtype, got {labels.dtype}")
    if n is not None and labels.shape[0] != n:
        raise ConfigError(f"labels must have one entry per row of vectors ({n}), got {labels.shape[0]}")
    lab = labels.to(torch.int64)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= k):
        raise ConfigError(f"labels must lie in [0, k) = [0, {k}), got range [{int(lab.min())}, {int(lab.max())}]")
    return lab


def _prepare(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = x.detach().to(torch.float32)
    return F.normalize(x, dim=1) if normalize else x


def _stderr_isatty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------


def _cache_key(x32: torch.Tensor, k: int, *, seed: int, max_iter: int, normalize: bool, owned: bool = False) -> str:
    h = hashlib.sha256()  # SHA extensions make it about twice as fast as blake2b on the fp32 bytes
    n, d = x32.shape
    h.update(f"{ALGORITHM_VERSION}|n={n}|d={d}|k={k}|seed={seed}|max_iter={max_iter}|norm={int(normalize)}|".encode())
    # a copy: a numpy view would pin the storage (FSDP2 must resize an unsharded weight's storage);
    # ``x32`` made by a dtype conversion is already a private copy, as is one brought to the CPU
    flat = x32.detach().cpu()
    owned = owned or x32.device.type != "cpu"
    if not owned:
        flat = flat.clone()
    h.update(flat.contiguous().numpy().data)
    return h.hexdigest()[:40]


# ----------------------------------------------------------------------------------------------
# algorithm
# ----------------------------------------------------------------------------------------------


def _balanced_kmeans_impl(
    x32: torch.Tensor, k: int, *, seed: int, max_iter: int, normalize: bool, progress: bool, owned: bool = False
) -> torch.Tensor:
    """Run balanced k-means on fp32 ``[n, d]`` rows; returns canonical int64 labels ``[n]``.

    ``owned``: ``x32`` is a private copy, normalised in place (the same values, no second copy).

    Distances and centroids are computed with torch on the rows' device; the capacitated
    assignment (latency-bound bookkeeping on an ``[n, k]`` cost matrix) runs in numpy fp64 on the
    CPU, which avoids thread-pool and kernel-launch overhead on thousands of tiny operations.
    """
    x = (F.normalize(x32, dim=1, out=x32) if owned else F.normalize(x32, dim=1)) if normalize else x32
    n = x.shape[0]
    dev = x.device
    if k == 1:
        return torch.zeros(n, dtype=torch.int64, device=dev)
    if k == n:
        return torch.arange(n, dtype=torch.int64, device=dev)
    q, r = divmod(n, k)
    caps = np.full(k, q, dtype=np.int64)
    caps[:r] += 1

    gen = torch.Generator().manual_seed(seed)
    row_sq = _row_sq(x)
    centers = _kmeans_pp(x, k, gen, sq=row_sq)
    # A fixed, tiny (1e-9 of the squared row norms) deterministic perturbation of the costs breaks
    # exact ties (duplicate or all-zero rows), which would otherwise make the assignment move tied
    # points one at a time; its effect on the objective is far below fp32 resolution.
    jitter = torch.rand(n, k, generator=gen, dtype=torch.float64).numpy()
    jitter *= 1e-9 * max(float(row_sq.max()), 1e-30)
    sq_total = float(row_sq.sum())
    rows = np.arange(n)
    prices = np.zeros(k, dtype=np.float64)
    labels: np.ndarray | None = None
    from tqdm.auto import tqdm  # lazy: tqdm.auto may pull in IPython

    bar = tqdm(total=max_iter, desc="balanced k-means", unit="it", disable=not progress, leave=False)
    try:
        for _ in range(max_iter):
            cost = _to_numpy64(x @ centers.T)
            cost *= -2.0
            cost += _to_numpy64(centers.square().sum(1))[None, :]  # ‖x − c‖² − ‖x‖², [n, k]
            cost += jitter
            if labels is not None:
                caps = np.bincount(labels, minlength=k)
            new, prices = assign(cost, caps, prices)
            new = refine(cost, new, q=q, allow_moves=r > 0)
            bar.update(1)
            bar.set_postfix(inertia=f"{float(cost[rows, new].sum()) + sq_total:.6g}")
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            lab_t = torch.from_numpy(labels).to(dev)
            counts = torch.bincount(lab_t, minlength=k).to(torch.float32)
            centers = torch.zeros_like(centers).index_add_(0, lab_t, x) / counts[:, None]
    finally:
        bar.close()
    assert labels is not None
    return _canonical(torch.from_numpy(labels).to(dev), k)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, sq: np.ndarray | None = None) -> torch.Tensor:
    """Greedy k-means++ (``2 + ln k`` local trials per centre); returns ``[k, d]`` fp32 centres.

    ``sq``: the rows' squared norms (:func:`_row_sq`), when the caller has them already.

    Dot products run in torch on the rows' device (see :class:`_CandidateDots`); the ``[n]``-sized
    bookkeeping in numpy fp64. Random numbers come from the CPU generator ``gen``, so a seed draws
    the same numbers on every device.
    """
    n = x.shape[0]
    dev = x.device
    trials = 2 + int(math.log(k))
    sq = _row_sq(x) if sq is None else sq
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = np.maximum(sq + sq[chosen[0]] - 2.0 * _to_numpy64(x @ x[chosen[0]]), 0.0)
    pot = float(d2.sum())
    dots_of = _CandidateDots(x)
    for _ in range(1, k):
        u = torch.rand(trials, generator=gen, dtype=torch.float64).numpy()
        if pot > 0.0:
            cand = np.minimum(np.searchsorted(np.cumsum(d2), u * pot, side="right"), n - 1)
        else:  # every point coincides with a centre: any choice is as good
            cand = np.minimum((u * n).astype(np.int64), n - 1)
        dots = dots_of(x[torch.from_numpy(cand).to(dev)])  # [trials, n]
        new_d2 = np.minimum(d2[None, :], np.maximum(sq[None, :] + sq[cand][:, None] - 2.0 * dots, 0.0))
        pots = new_d2.sum(1)
        best = int(np.argmin(pots))
        chosen.append(int(cand[best]))
        d2 = new_d2[best]
        pot = float(pots[best])
    return x[torch.tensor(chosen, device=dev)].clone()


class _CandidateDots:
    """``rows @ x.T`` as fp64 numpy ``[m, n]``, bit-identical to one full product, faster on CPU.

    One ``[m, d] @ [d, n]`` product with a large ``n`` streams all of ``x`` through a BLAS packing
    buffer; products over consecutive blocks of :data:`_DOT_BLOCK` rows of ``x`` (the last block
    taking the remainder) keep that buffer in cache and run about twice as fast on CPU. Each
    entry is still one dot product of the same two fp32 rows computed by the same kernel, which
    the first call checks: it computes both forms and keeps the blocked one only if the two agree
    bit for bit (otherwise, and off the CPU or for small ``n``, every call uses the full product).
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.stops = _row_blocks(x)
        self.checked = False

    def _blocked(self, rows: torch.Tensor, stops: list[int]) -> torch.Tensor:
        out = torch.empty(rows.shape[0], self.x.shape[0], dtype=rows.dtype)
        start = 0
        for stop in stops:
            torch.mm(rows, self.x[start:stop].T, out=out[:, start:stop])
            start = stop
        return out

    def __call__(self, rows: torch.Tensor) -> np.ndarray:
        if self.stops is None:
            return _to_numpy64(rows @ self.x.T)
        blocked = self._blocked(rows, self.stops)
        if not self.checked:
            self.checked = True
            full = rows @ self.x.T
            if not torch.equal(blocked, full):
                self.stops = None
                return _to_numpy64(full)
        return _to_numpy64(blocked)


def _row_blocks(x: torch.Tensor) -> list[int] | None:
    """Ends of consecutive blocks of :data:`_DOT_BLOCK` rows of ``x`` (the last block takes the
    remainder, so none is shorter than the block); None off the CPU or below two blocks."""
    n = x.shape[0]
    if x.device.type != "cpu" or n < 2 * _DOT_BLOCK:
        return None
    stops = list(range(_DOT_BLOCK, n - _DOT_BLOCK + 1, _DOT_BLOCK))
    stops[-1] = n
    return stops


def _row_sq(x: torch.Tensor) -> np.ndarray:
    """``x.square().sum(1)`` as fp64 numpy ``[n]``, with the same bits, without an ``[n, d]`` temporary.

    On CPU the squares of one block of rows at a time go through one reused buffer (a fresh
    ``[n, d]`` temporary costs a page fault per 4 KiB, several times the arithmetic); each row's
    sum is the same contiguous reduction over its ``d`` entries either way.
    """
    stops = _row_blocks(x)
    if stops is None:
        return _to_numpy64(x.square().sum(1))
    out = torch.empty(x.shape[0], dtype=x.dtype)
    buf = torch.empty(stops[-1] - stops[-2] if len(stops) > 1 else stops[0], x.shape[1], dtype=x.dtype)
    start = 0
    for stop in stops:
        b = buf[: stop - start]
        torch.square(x[start:stop], out=b)
        torch.sum(b, 1, out=out[start:stop])
        start = stop
    return _to_numpy64(out)


def _to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy().astype(np.float64)


def _canonical(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber clusters in the order of their first member."""
    n = labels.shape[0]
    first = torch.full((k,), n, dtype=torch.int64, device=labels.device)
    first = first.scatter_reduce(0, labels, torch.arange(n, device=labels.device), "amin")
    order = torch.sort(first, stable=True).indices
    mapping = torch.empty_like(order)
    mapping[order] = torch.arange(k, device=labels.device)
    return mapping[labels]
