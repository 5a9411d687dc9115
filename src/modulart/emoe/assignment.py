"""Exact capacitated assignment of points to clusters (the assignment step of balanced k-means).

Every point goes to one cluster, cluster ``j`` takes exactly ``caps[j]`` points, total cost minimal:
a transportation problem solved on the ``[n, k]`` cost matrix. :func:`assign` first raises the
prices of over-full clusters for a few rounds (nearly balanced), then finishes exactly by moving
points along shortest paths between clusters (Bellman-Ford over the ``k``-node cluster graph, many
disjoint augmenting paths per pass, negative cycles cancelled). :func:`refine` then applies
pairwise swaps (and, when sizes differ by one, single moves) that strictly lower the total cost.
Latency-bound bookkeeping on a small matrix, so it runs in numpy fp64.

Example:
    >>> import numpy as np
    >>> from modulart.emoe.assignment import assign
    >>> cost = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [1.0, 0.0]])
    >>> labels, prices = assign(cost, np.array([2, 2]), np.zeros(2))
    >>> labels.tolist()
    [1, 0, 0, 1]
"""

from __future__ import annotations

import itertools

import numpy as np

from modulart.core.errors import ConvergenceError

__all__ = ["BALANCE_ROUNDS", "REFINE_PASSES", "assign", "refine"]

BALANCE_ROUNDS = 100  # at most this many price-raising rounds before the exact assignment
REFINE_PASSES = 64  # at most this many swap/move passes per Lloyd iteration


def _row_moves(
    cost: np.ndarray, labels: np.ndarray, w: np.ndarray, who: np.ndarray, rows: np.ndarray | None = None
) -> None:
    """Cheapest single-point move between ordered pairs of clusters, written into ``w`` and ``who``.

    Sets ``w[a, b] = min_{i in a} cost[i, b] − cost[i, a]`` (``+inf`` on the diagonal and for an
    empty ``a``) and ``who[a, b]`` to the lowest-index point achieving it, for every cluster ``a``
    in ``rows`` (all clusters when ``None``).
    """
    n, k = cost.shape
    if rows is None:
        members = np.arange(n)
        rows = np.arange(k)
    else:
        flag = np.zeros(k, dtype=bool)
        flag[rows] = True
        members = np.flatnonzero(flag[labels])
    w[rows] = np.inf
    if members.size:
        order = members[np.argsort(labels[members], kind="stable")]
        lab_s = labels[order]
        present, starts = np.unique(lab_s, return_index=True)
        cs = cost[order]
        delta = cs - cs[np.arange(order.size), lab_s][:, None]  # [m, k]
        best = np.minimum.reduceat(delta, starts, axis=0)
        w[present] = best
        hit = delta == best[np.searchsorted(present, lab_s)]
        who[present] = np.minimum.reduceat(np.where(hit, order[:, None], n), starts, axis=0)
    w[rows, rows] = np.inf


def _shortest_paths(w: np.ndarray, dist: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Bellman-Ford on the dense cluster graph ``w`` (no negative cycles) from initial ``dist``.

    Only improvements larger than ``tol`` count, so rounding on zero-cost cycles (ties) cannot
    create cycles in the predecessor graph. Stops after ``k`` rounds even if still improving (which
    only a negative cycle can cause; :func:`_assign` then cancels it).
    """
    k = w.shape[0]
    cols = np.arange(k)
    pred = np.full(k, -1, dtype=np.int64)
    for _ in range(k):
        cand = dist[:, None] + w
        via = cand.argmin(0)
        best = cand[via, cols]
        better = best < dist - tol
        if not better.any():
            break
        dist = np.where(better, best, dist)
        pred = np.where(better, via, pred)
    return dist, pred


def _pred_cycle(pred: np.ndarray) -> list[int] | None:
    """A cycle of the predecessor graph (``pred[v]`` precedes ``v``; ``-1`` for none), if any."""
    done = np.zeros(pred.shape[0], dtype=bool)
    for start in range(pred.shape[0]):
        seen: dict[int, int] = {}
        path: list[int] = []
        v = start
        while v >= 0 and not done[v] and v not in seen:
            seen[v] = len(path)
            path.append(v)
            v = int(pred[v])
        if v >= 0 and v in seen:
            return path[seen[v] :]
        done[path] = True
    return None


def _balance_prices(cost: np.ndarray, caps: np.ndarray, prices: np.ndarray, tol: float) -> np.ndarray:
    """Raise the prices of over-full clusters until ``argmin(cost + prices)`` is nearly balanced.

    Every round, each over-full cluster raises its price just past the ``excess``-th smallest
    regret (second-best minus best reduced cost) of its members, so that exactly its excess would
    leave if no other price moved; as other prices only rise too, over-full clusters never become
    under-full (up to ties). Stops once at most ``4 k`` points are surplus (the exact phase of
    :func:`_assign` clears that in a few passes), when progress stalls, or after ``BALANCE_ROUNDS``
    rounds. Only a warm start: correctness never depends on it.
    """
    n, k = cost.shape
    rows = np.arange(n)
    prices = prices.copy()
    history: list[int] = []
    for _ in range(BALANCE_ROUNDS):
        red = cost + prices[None, :]
        labels = red.argmin(1)
        counts = np.bincount(labels, minlength=k)
        excess = counts - caps
        total = int(excess[excess > 0].sum())
        history.append(total)
        if total <= 4 * k or (len(history) > 20 and total > 0.9 * history[-21]):
            break
        best = red[rows, labels]
        red[rows, labels] = np.inf
        regret = red.min(1) - best
        order = np.lexsort((regret, labels))
        starts = np.cumsum(counts) - counts
        over = np.flatnonzero(excess > 0)
        prices[over] += regret[order[starts[over] + excess[over] - 1]] + tol
    return prices


def assign(cost: np.ndarray, caps: np.ndarray, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact capacitated assignment by successive shortest paths on the cluster graph.

    Minimises ``Σ_i cost[i, label_i]`` subject to ``bincount(label) == caps`` (``caps.sum() == n``),
    the min-cost-flow problem of the reference, without building the ``n·k``-arc graph:

    1. :func:`_balance_prices` raises the prices of over-full clusters (a warm start only);
    2. start from ``argmin(cost + prices)``, which is optimal for its own cluster sizes;
    3. while a cluster is over capacity, compute shortest paths (Bellman-Ford over ``k`` nodes) from
       all over-full clusters in the graph whose edge ``a → b`` costs the cheapest move of one member
       of ``a`` to ``b``, and move one point along each of a set of shortest paths to under-full
       clusters that share no edge and no point. Each has zero reduced cost under the
       shortest-path potentials, so the assignment stays optimal for its sizes and ends optimal for
       ``caps`` (up to a ``1e-12`` relative tolerance; a negative cycle of tolerance size that
       near-ties can leave behind is cancelled when found).

    Warm prices from the previous Lloyd iteration make the start nearly balanced, so few passes are
    needed.

    Args:
        cost: ``[n, k]`` fp64 assignment costs.
        caps: ``[k]`` int64 capacities summing to ``n``.
        prices: ``[k]`` fp64 warm-start prices (zeros for a cold start).

    Returns:
        ``[n]`` int64 labels and ``[k]`` prices for which the labels are ``argmin(cost + prices)``
        up to ties (dual potentials, shifted so that the smallest is 0).
    """
    n, k = cost.shape
    tol = 1e-12 * max(float(np.abs(cost).max()), 1.0)
    prices = _balance_prices(cost, caps, prices, tol)
    labels = (cost + prices[None, :]).argmin(1)
    counts = np.bincount(labels, minlength=k)
    w = np.empty((k, k))
    who = np.zeros((k, k), dtype=np.int64)
    _row_moves(cost, labels, w, who)
    for _ in range(2 * n + k):
        excess = counts - caps
        if not (excess > 0).any():
            break
        dist, pred = _shortest_paths(w, np.where(excess > 0, 0.0, np.inf), tol)
        cycle = _pred_cycle(pred)
        if cycle is not None and sum(float(w[pred[v], v]) for v in cycle) < 0.0:
            # near-ties can leave negative cycles of tolerance size: cancel one (sizes unchanged)
            movers = np.asarray([who[pred[v], v] for v in cycle], dtype=np.int64)
            labels[movers] = np.asarray(cycle, dtype=np.int64)
            _row_moves(cost, labels, w, who, np.asarray(sorted(cycle), dtype=np.int64))
            continue
        targets = np.flatnonzero(excess < 0)
        targets = targets[np.argsort(dist[targets], kind="stable")]
        # paths of the shortest-path forest that share no edge (no non-root node) and no point
        used = np.zeros(k, dtype=bool)
        supply = np.maximum(excess, 0)
        moved: set[int] = set()
        src: list[int] = []
        dst: list[int] = []
        for t in targets.tolist():
            path = [t]
            while pred[path[-1]] >= 0 and len(path) <= k:
                path.append(int(pred[path[-1]]))
            root = path[-1]
            if len(path) > k or supply[root] <= 0 or used[path[:-1]].any():
                continue
            pts = [int(who[a, b]) for b, a in itertools.pairwise(path)]
            if moved.intersection(pts):
                continue
            moved.update(pts)
            used[path[:-1]] = True
            supply[root] -= 1
            src.extend(pts)
            dst.extend(path[:-1])
            counts[root] -= 1
            counts[t] += 1
        if not src:  # pragma: no cover - only reachable with float pathologies (negative cycles)
            raise ConvergenceError("balanced assignment found no augmenting path")
        src_a = np.asarray(src, dtype=np.int64)
        dst_a = np.asarray(dst, dtype=np.int64)
        touched = np.unique(np.concatenate([labels[src_a], dst_a]))
        labels[src_a] = dst_a
        _row_moves(cost, labels, w, who, touched)
    else:  # pragma: no cover - every pass augments or cancels a negative cycle
        raise ConvergenceError("balanced assignment did not converge")
    potentials, _ = _shortest_paths(w, np.zeros(k), tol)
    prices = -potentials
    return labels, prices - prices.min()


def refine(cost: np.ndarray, labels: np.ndarray, *, q: int, allow_moves: bool) -> np.ndarray:
    """Pairwise swaps (and moves from ``q + 1`` to ``q`` clusters) that strictly reduce the cost.

    Each pass finds, for every ordered pair of clusters ``(a, b)``, the member of ``a`` that gains
    most by moving to ``b`` (lowest index on ties); swapping the best members of ``a`` and ``b``
    gains the sum of both. Operations on disjoint cluster pairs are applied greedily, best gain
    first, until a pass finds nothing (or after ``REFINE_PASSES`` passes).

    Args:
        cost: ``[n, k]`` fp64 assignment costs.
        labels: ``[n]`` int64 current labels (every cluster non-empty).
        q: ``n // k``; clusters have ``q`` or ``q + 1`` members.
        allow_moves: also move single points from ``q + 1`` clusters to ``q`` clusters.

    Returns:
        ``[n]`` improved labels; cluster sizes stay in ``{q, q + 1}``.
    """
    n, k = cost.shape
    labels = labels.copy()
    tol = 1e-9 * max(float(np.abs(cost).max()), 1.0)
    lower = np.tril(np.ones((k, k), dtype=bool))
    for _ in range(REFINE_PASSES):
        order = np.argsort(labels, kind="stable")
        lab_s = labels[order]
        sizes = np.bincount(labels, minlength=k)
        starts = np.cumsum(sizes) - sizes
        cs = cost[order]
        gain = cs[np.arange(n), lab_s][:, None] - cs  # [n, k]: gain of moving a point to cluster b
        best = np.maximum.reduceat(gain, starts, axis=0)  # [k, k]
        who = np.minimum.reduceat(np.where(gain == best[lab_s], order[:, None], n), starts, axis=0)
        swap = np.where(lower, -np.inf, best + best.T)
        cands = [swap]
        if allow_moves:
            ok = (sizes > q)[:, None] & (sizes == q)[None, :]
            cands.append(np.where(ok, best, -np.inf))
        gains = np.stack(cands).ravel()
        pos = np.flatnonzero(gains > tol)
        if pos.size == 0:
            break
        pos = pos[np.argsort(-gains[pos], kind="stable")]
        used = np.zeros(k, dtype=bool)
        src: list[int] = []
        dst: list[int] = []
        for p in pos.tolist():
            kind, rest = divmod(p, k * k)
            a, b = divmod(rest, k)
            if used[a] or used[b]:
                continue
            used[a] = used[b] = True
            src.append(int(who[a, b]))
            dst.append(b)
            if kind == 0:
                src.append(int(who[b, a]))
                dst.append(a)
        labels[np.asarray(src, dtype=np.int64)] = np.asarray(dst, dtype=np.int64)
    return labels
