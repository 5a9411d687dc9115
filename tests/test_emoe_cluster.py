"""Tests of modulart.emoe.cluster: balanced k-means, its cache, metrics and baselines."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modulart.emoe.assignment as asg
import modulart.emoe.cluster as cl
import modulart.emoe.label_cache as lc
from modulart.core.errors import ConfigError
from modulart.emoe.cluster import (
    balanced_kmeans,
    clear_cluster_cache,
    cluster_sizes,
    inertia,
    random_balanced_labels,
    within_cluster_cosine,
)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cluster_cache()
    yield
    clear_cluster_cache()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(k: int, per: int, d: int, *, noise: float, seed: int = 0, sizes: list[int] | None = None) -> torch.Tensor:
    """``k`` random directions (norm 10) plus Gaussian noise; rows grouped by blob, ``per`` each."""
    g = _gen(seed)
    centres = torch.randn(k, d, generator=g)
    centres = 10.0 * centres / centres.norm(dim=1, keepdim=True)
    counts = sizes if sizes is not None else [per] * k
    idx = torch.repeat_interleave(torch.arange(k), torch.tensor(counts))
    return centres[idx] + noise * torch.randn(len(idx), d, generator=g)


def _assert_balanced(labels: torch.Tensor, n: int, k: int) -> None:
    assert labels.dtype == torch.int64
    assert labels.shape == (n,)
    sizes = torch.bincount(labels, minlength=k)
    assert sizes.numel() == k
    q, r = divmod(n, k)
    assert int(sizes.min()) == q
    assert int(sizes.max()) == (q + 1 if r else q)
    assert int((sizes == q + 1).sum()) == r


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a relabelling of clusters."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ----------------------------------------------------------------------------------------------
# balance, determinism, structure
# ----------------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 120),
    k_frac=st.floats(0.0, 1.0),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    normalize=st.booleans(),
)
def test_exact_balance_for_any_n_k(n: int, k_frac: float, d: int, seed: int, normalize: bool) -> None:
    k = max(1, min(n, round(k_frac * n)))
    x = torch.randn(n, d, generator=_gen(seed))
    labels = balanced_kmeans(x, k, seed=seed % 7, normalize=normalize, cache=False)
    _assert_balanced(labels, n, k)
    # canonical numbering: clusters appear in order of their first member
    first = [labels.tolist().index(j) for j in range(k)]
    assert first == sorted(first)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 5), (7, 1), (100, 3), (101, 10), (257, 64), (64, 63)])
def test_exact_balance_edge_cases(n: int, k: int) -> None:
    x = torch.randn(n, 8, generator=_gen(n + k))
    _assert_balanced(balanced_kmeans(x, k, cache=False), n, k)


def test_degenerate_inputs_stay_balanced() -> None:
    same = torch.ones(50, 4)  # every point identical: all ties
    _assert_balanced(balanced_kmeans(same, 7, cache=False), 50, 7)
    zeros = torch.zeros(30, 3)  # zero rows survive normalisation
    _assert_balanced(balanced_kmeans(zeros, 4, cache=False), 30, 4)
    few = torch.randn(3, 5, generator=_gen(1)).repeat(20, 1)  # 3 distinct points, 6 clusters
    _assert_balanced(balanced_kmeans(few, 6, cache=False), 60, 6)


def test_many_duplicate_rows_stay_balanced_and_deterministic() -> None:
    """Dead (all-zero) neurons are exact ties; the tie-breaking must not break balance or determinism."""
    x = torch.randn(768, 16, generator=_gen(0))
    x[::2] = 0.0  # (this case also needs the cancellation of tolerance-size negative cycles)
    a = balanced_kmeans(x, 24, cache=False)
    _assert_balanced(a, 768, 24)
    assert torch.equal(a, balanced_kmeans(x, 24, cache=False))


def test_deterministic_for_a_seed_and_seed_matters() -> None:
    x = torch.randn(300, 16, generator=_gen(3))
    a = balanced_kmeans(x, 8, seed=0, cache=False)
    b = balanced_kmeans(x, 8, seed=0, cache=False)
    assert torch.equal(a, b)
    others = [balanced_kmeans(x, 8, seed=s, cache=False) for s in range(1, 5)]
    assert any(not _same_partition(a, o) for o in others)


def test_does_not_modify_input() -> None:
    x = torch.randn(40, 6, generator=_gen(0))
    before = x.clone()
    balanced_kmeans(x, 4, cache=False)
    assert torch.equal(x, before)


@pytest.mark.parametrize("normalize", [True, False])
def test_recovers_planted_equal_clusters(normalize: bool) -> None:
    k, per = 8, 25
    x = _blobs(k, per, 32, noise=0.5, seed=1)
    perm = torch.randperm(k * per, generator=_gen(2))  # planted groups interleaved
    labels = balanced_kmeans(x[perm], k, normalize=normalize, cache=False)
    truth = torch.arange(k).repeat_interleave(per)[perm]
    assert _same_partition(labels, truth)


def test_beats_random_split_on_structured_data() -> None:
    k = 8
    x = _blobs(k, 0, 64, noise=0.5, seed=4, sizes=[10, 20, 30, 40, 50, 60, 70, 80])  # unequal natural sizes
    n = x.shape[0]
    ours = balanced_kmeans(x, k, cache=False)
    rand = random_balanced_labels(n, k, seed=0)
    assert inertia(x, ours, k) < 0.5 * inertia(x, rand, k)
    assert within_cluster_cosine(x, ours, k) > within_cluster_cosine(x, rand, k) + 0.3


# ----------------------------------------------------------------------------------------------
# optimality
# ----------------------------------------------------------------------------------------------


def _lsa_optimum(cost: np.ndarray, caps: np.ndarray) -> float:
    from scipy.optimize import linear_sum_assignment

    expanded = np.repeat(cost, caps, axis=1)  # one column per slot
    rows, cols = linear_sum_assignment(expanded)
    return float(expanded[rows, cols].sum())


def test_assignment_step_is_exact_on_random_costs() -> None:
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    for trial in range(120):
        n = int(rng.integers(2, 40))
        k = int(rng.integers(2, min(n, 8) + 1))
        cost = rng.standard_normal((n, k)) * rng.uniform(0.1, 5.0)
        if trial % 3 == 0:
            cost = np.round(cost, 1)  # many ties
        q, r = divmod(n, k)
        caps = np.full(k, q, dtype=np.int64)
        caps[rng.permutation(k)[:r]] += 1
        prices = rng.standard_normal(k) if trial % 2 else np.zeros(k)  # cold and (bad) warm starts
        labels, new_prices = asg.assign(cost, caps, prices)
        assert np.array_equal(np.bincount(labels, minlength=k), caps)
        ours = float(cost[np.arange(n), labels].sum())
        assert ours <= _lsa_optimum(cost, caps) + 1e-9
        # the returned prices are dual potentials: every point sits in a cheapest cluster
        red = cost + new_prices[None, :]
        assert np.all(red[np.arange(n), labels] <= red.min(1) + 1e-9)


def test_assignment_to_fixed_centroids_is_optimal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the public function: one Lloyd step from fixed centres is the capacitated optimum."""
    pytest.importorskip("scipy")
    monkeypatch.setattr(cl, "_canonical", lambda labels, k: labels)  # keep cluster j = centre j
    for seed, n in [(0, 60), (1, 60), (2, 64), (3, 90), (4, 61)]:
        g = _gen(seed)
        x = torch.randn(n, 5, generator=g)
        centres = torch.randn(6, 5, generator=g)
        monkeypatch.setattr(cl, "_kmeans_pp", lambda v, k, gen, sq=None, c=centres: c.clone())
        labels = balanced_kmeans(x, 6, max_iter=1, normalize=False, cache=False).numpy()
        cost = torch.cdist(x.double(), centres.double()).square().numpy()
        ours = float(cost[np.arange(n), labels].sum())
        caps = np.bincount(labels, minlength=6)  # n % 6 != 0: the data chose who gets extra points
        assert sorted(caps.tolist()) == sorted([n // 6 + 1] * (n % 6) + [n // 6] * (6 - n % 6))
        assert ours <= _lsa_optimum(cost, caps) + 1e-6


def _brute_force_inertia(x: torch.Tensor, k: int) -> float:
    """Smallest inertia over every balanced labelling (vectorised enumeration of ``k ** n`` labellings)."""
    n = x.shape[0]
    labs = np.array(list(itertools.product(range(k), repeat=n)))  # [P, n]
    onehot = labs[:, :, None] == np.arange(k)  # [P, n, k]
    sizes = onehot.sum(1)
    ok = (sizes.min(1) == n // k) & (sizes.max(1) == -(-n // k))
    onehot, sizes = onehot[ok].astype(np.float64), sizes[ok]
    u = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    sums = np.einsum("pnk,nd->pkd", onehot, u)
    values = (u**2).sum() - ((sums**2).sum(2) / sizes).sum(1)
    return float(values.min())


@pytest.mark.parametrize(("n", "k", "seed"), [(8, 2, 0), (8, 2, 1), (10, 2, 2), (9, 3, 3), (9, 3, 4), (10, 3, 5)])
def test_near_brute_force_optimum_on_tiny_problems(n: int, k: int, seed: int) -> None:
    g = _gen(seed)
    centres = 2.0 * torch.randn(k, 3, generator=g)
    x = centres[torch.arange(n) % k] + 0.4 * torch.randn(n, 3, generator=g)
    best = _brute_force_inertia(x, k)
    ours = inertia(x, balanced_kmeans(x, k, cache=False), k)
    assert ours <= 1.03 * best + 1e-9


def test_pred_cycle() -> None:
    assert asg._pred_cycle(np.array([-1, 0, 1, 1])) is None  # a tree
    cycle = asg._pred_cycle(np.array([-1, 3, 1, 2, 0]))  # 1 <- 3 <- 2 <- 1
    assert cycle is not None
    assert sorted(cycle) == [1, 2, 3]


def test_refine_only_applies_strict_improvements() -> None:
    rng = np.random.default_rng(1)
    cost = rng.standard_normal((40, 4))
    labels = np.repeat(np.arange(4), 10)  # a poor balanced start
    before = float(cost[np.arange(40), labels].sum())
    out = asg.refine(cost, labels, q=10, allow_moves=False)
    assert np.array_equal(np.bincount(out, minlength=4), np.full(4, 10))
    assert float(cost[np.arange(40), out].sum()) < before
    # a local optimum for swaps is returned unchanged
    again = asg.refine(cost, out, q=10, allow_moves=False)
    assert np.array_equal(again, out)


def test_uneven_sizes_move_the_extra_point_where_it_fits() -> None:
    # 2 tight pairs and 1 tight triple: k = 3 of a 7-point set must give the triple the extra point
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0], [0.0, 10.0], [0.1, 10.0], [0.0, 10.1]])
    truth = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    for seed in range(6):  # the first cluster gets the extra point initially; which one that is varies
        perm = torch.randperm(7, generator=_gen(seed))
        labels = balanced_kmeans(x[perm], 3, seed=seed, normalize=False, cache=False)
        assert _same_partition(labels, truth[perm])


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------


class _Counter:
    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.fn(*args, **kwargs)
        return out


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> _Counter:
    c = _Counter(cl._balanced_kmeans_impl)
    monkeypatch.setattr(cl, "_balanced_kmeans_impl", c)
    return c


def test_cache_hit_skips_recomputation(counter: _Counter) -> None:
    x = torch.randn(64, 8, generator=_gen(0))
    a = balanced_kmeans(x, 4)
    b = balanced_kmeans(x.clone(), 4)
    assert counter.calls == 1
    assert torch.equal(a, b)
    a.fill_(0)  # callers get copies: corrupting one must not corrupt the cache
    assert torch.equal(balanced_kmeans(x, 4), b)
    assert counter.calls == 1


def test_cache_key_is_the_weights_not_the_shape(counter: _Counter) -> None:
    """Regression: the reference keys its cache by shape, reusing labels across checkpoints."""
    x = torch.randn(64, 8, generator=_gen(0))
    balanced_kmeans(x, 4)
    y = x.clone()
    y[17, 3] += 1e-3  # same shape, one weight changed
    balanced_kmeans(y, 4)
    assert counter.calls == 2
    for kwargs in ({"k": 8}, {"k": 4, "seed": 1}, {"k": 4, "max_iter": 7}, {"k": 4, "normalize": False}):
        balanced_kmeans(x, **kwargs)
    assert counter.calls == 6
    balanced_kmeans(x.to(torch.float64), 4)  # same fp32 values: a hit
    assert counter.calls == 6


def test_cache_false_bypasses_memory_and_disk(counter: _Counter, tmp_path: Path) -> None:
    x = torch.randn(64, 8, generator=_gen(0))
    balanced_kmeans(x, 4, cache=False, cache_dir=tmp_path)
    balanced_kmeans(x, 4, cache=False, cache_dir=tmp_path)
    assert counter.calls == 2
    assert list(tmp_path.iterdir()) == []


def test_disk_cache_round_trip(counter: _Counter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(64, 8, generator=_gen(0))
    a = balanced_kmeans(x, 4, cache_dir=tmp_path / "c")
    files = list((tmp_path / "c").iterdir())
    assert len(files) == 1
    assert files[0].suffix == ".safetensors"  # written atomically: no temp file left behind
    clear_cluster_cache()

    def boom(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("recomputed despite the disk cache")

    monkeypatch.setattr(cl, "_balanced_kmeans_impl", boom)
    assert torch.equal(balanced_kmeans(x, 4, cache_dir=tmp_path / "c"), a)
    assert torch.equal(balanced_kmeans(x, 4), a)  # the disk hit also filled the memory cache


def test_corrupt_disk_cache_is_ignored(counter: _Counter, tmp_path: Path) -> None:
    x = torch.randn(64, 8, generator=_gen(0))
    a = balanced_kmeans(x, 4, cache_dir=tmp_path)
    (file,) = tmp_path.iterdir()
    file.write_bytes(b"not a safetensors file")
    clear_cluster_cache()
    with pytest.warns(RuntimeWarning, match="cluster cache"):
        b = balanced_kmeans(x, 4, cache_dir=tmp_path)
    assert counter.calls == 2
    assert torch.equal(a, b)


def test_memory_cache_is_a_bounded_lru(counter: _Counter) -> None:
    xs = [torch.randn(8, 2, generator=_gen(i)) for i in range(lc._CACHE_SIZE + 1)]
    for x in xs:
        balanced_kmeans(x, 2)
    assert len(lc._MEMORY_CACHE) == lc._CACHE_SIZE
    balanced_kmeans(xs[-1], 2)  # most recent: still cached
    assert counter.calls == lc._CACHE_SIZE + 1
    balanced_kmeans(xs[0], 2)  # least recently used: evicted
    assert counter.calls == lc._CACHE_SIZE + 2


# ----------------------------------------------------------------------------------------------
# dtypes, devices, progress
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    x = _blobs(4, 20, 16, noise=1.0, seed=5).to(dtype)
    labels = balanced_kmeans(x, 4, cache=False)
    _assert_balanced(labels, 80, 4)
    assert torch.equal(labels, balanced_kmeans(x.float(), 4, cache=False))  # computed in fp32
    assert isinstance(inertia(x, labels, 4), float)
    assert within_cluster_cosine(x, labels, 4) > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = _blobs(8, 30, 64, noise=1.0, seed=6)
    cpu = balanced_kmeans(x, 8, cache=False)
    gpu = balanced_kmeans(x.cuda().half(), 8, cache=False)
    assert gpu.device.type == "cuda"
    _assert_balanced(gpu.cpu(), 240, 8)
    assert _same_partition(cpu, gpu.cpu())


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    x = torch.randn(50, 4, generator=_gen(0))
    balanced_kmeans(x, 5, progress=True, cache=False)
    assert "balanced k-means" in capsys.readouterr().err
    balanced_kmeans(x, 5, cache=False)  # small problem, not a TTY: silent
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# metrics and baselines
# ----------------------------------------------------------------------------------------------


def test_random_balanced_labels() -> None:
    a = random_balanced_labels(103, 10, seed=0)
    _assert_balanced(a, 103, 10)
    assert torch.equal(a, random_balanced_labels(103, 10, seed=0))
    assert not torch.equal(a, random_balanced_labels(103, 10, seed=1))
    assert torch.equal(cluster_sizes(a, 10), torch.tensor([11, 11, 11, 10, 10, 10, 10, 10, 10, 10]))


def test_cluster_sizes() -> None:
    assert cluster_sizes(torch.tensor([3, 0, 3, 3]), 5).tolist() == [1, 0, 0, 3, 0]


def test_inertia_matches_naive() -> None:
    x = torch.randn(50, 7, generator=_gen(0), dtype=torch.float64)
    labels = torch.randint(0, 5, (50,), generator=_gen(1))
    for normalize in (False, True):
        v = torch.nn.functional.normalize(x, dim=1) if normalize else x
        naive = sum(float((v[labels == j] - v[labels == j].mean(0)).square().sum()) for j in labels.unique())
        assert inertia(x, labels, 5, normalize=normalize) == pytest.approx(naive, rel=1e-5)


def test_within_cluster_cosine_matches_naive() -> None:
    x = torch.randn(40, 6, generator=_gen(0), dtype=torch.float64)
    labels = torch.arange(40) % 4
    u = torch.nn.functional.normalize(x, dim=1)
    means = []
    for j in range(4):
        m = u[labels == j]
        sim = m @ m.T
        means.append(float((sim.sum() - sim.diagonal().sum()) / (len(m) * (len(m) - 1))))
    assert within_cluster_cosine(x, labels, 4) == pytest.approx(float(np.mean(means)), rel=1e-6)
    assert np.isnan(within_cluster_cosine(x[:3], torch.tensor([0, 1, 2]), 3))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vectors", "k", "kwargs", "name"),
    [
        (torch.randn(10, 3), 0, {}, "k"),
        (torch.randn(10, 3), 11, {}, "k"),
        (torch.randn(10, 3), 2.5, {}, "k"),
        (torch.randn(10), 2, {}, "vectors"),
        (torch.randn(2, 5, 3), 2, {}, "vectors"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, {}, "vectors"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, {}, "vectors"),
        (torch.ones(4, 2, dtype=torch.int64), 2, {}, "vectors"),
        (torch.randn(10, 3), 2, {"max_iter": 0}, "max_iter"),
        (torch.randn(10, 3), 2, {"seed": "0"}, "seed"),
    ],
)
def test_balanced_kmeans_errors_name_the_argument(
    vectors: torch.Tensor, k: Any, kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}\b"):
        balanced_kmeans(vectors, k, cache=False, **kwargs)


def test_metric_errors_name_the_argument() -> None:
    x = torch.randn(4, 2)
    with pytest.raises(ConfigError, match=r"^labels\b"):
        cluster_sizes(torch.tensor([0, 5]), 3)
    with pytest.raises(ConfigError, match=r"^labels\b"):
        inertia(x, torch.tensor([0, 1, 0]), 2)
    with pytest.raises(ConfigError, match=r"^labels\b"):
        within_cluster_cosine(x, torch.tensor([0.0, 1.0, 0.0, 1.0]), 2)
    with pytest.raises(ConfigError, match=r"^vectors\b"):
        inertia(torch.randn(4), torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ConfigError, match=r"^n\b"):
        random_balanced_labels(0, 1)
    with pytest.raises(ConfigError, match=r"^k\b"):
        random_balanced_labels(3, 4)
