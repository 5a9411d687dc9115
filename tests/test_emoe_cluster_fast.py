"""The fast balanced k-means path returns exactly the labels of the original implementation.

``_reference_labels`` below is a verbatim copy of the implementation of
:func:`modulart.emoe.cluster.balanced_kmeans` before its speed-ups (k-means++ with one full
``[trials, n]`` product per centre, squared norms recomputed, the progress bar left out), so every
test here compares the optimised code path against the old one with ``torch.equal``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modulart.emoe.cluster as cl
from modulart.emoe.assignment import assign, refine
from modulart.emoe.cluster import balanced_kmeans, clear_cluster_cache

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# the reference: the implementation before the speed-ups, copied unchanged
# ----------------------------------------------------------------------------------------------


def _ref_to_numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy().astype(np.float64)


def _ref_canonical(labels: torch.Tensor, k: int) -> torch.Tensor:
    n = labels.shape[0]
    first = torch.full((k,), n, dtype=torch.int64, device=labels.device)
    first = first.scatter_reduce(0, labels, torch.arange(n, device=labels.device), "amin")
    order = torch.sort(first, stable=True).indices
    mapping = torch.empty_like(order)
    mapping[order] = torch.arange(k, device=labels.device)
    return mapping[labels]


def _ref_kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    dev = x.device
    trials = 2 + int(math.log(k))
    sq = _ref_to_numpy64(x.square().sum(1))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = np.maximum(sq + sq[chosen[0]] - 2.0 * _ref_to_numpy64(x @ x[chosen[0]]), 0.0)
    pot = float(d2.sum())
    for _ in range(1, k):
        u = torch.rand(trials, generator=gen, dtype=torch.float64).numpy()
        if pot > 0.0:
            cand = np.minimum(np.searchsorted(np.cumsum(d2), u * pot, side="right"), n - 1)
        else:
            cand = np.minimum((u * n).astype(np.int64), n - 1)
        dots = _ref_to_numpy64(x[torch.from_numpy(cand).to(dev)] @ x.T)
        new_d2 = np.minimum(d2[None, :], np.maximum(sq[None, :] + sq[cand][:, None] - 2.0 * dots, 0.0))
        pots = new_d2.sum(1)
        best = int(np.argmin(pots))
        chosen.append(int(cand[best]))
        d2 = new_d2[best]
        pot = float(pots[best])
    return x[torch.tensor(chosen, device=dev)].clone()


def _reference_labels(
    vectors: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 100, normalize: bool = True
) -> torch.Tensor:
    x32 = vectors.detach().to(torch.float32)
    x = F.normalize(x32, dim=1) if normalize else x32
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
    centers = _ref_kmeans_pp(x, k, gen)
    row_sq = _ref_to_numpy64(x.square().sum(1))
    jitter = torch.rand(n, k, generator=gen, dtype=torch.float64).numpy()
    jitter *= 1e-9 * max(float(row_sq.max()), 1e-30)
    prices = np.zeros(k, dtype=np.float64)
    labels: np.ndarray | None = None
    for _ in range(max_iter):
        cost = _ref_to_numpy64(x @ centers.T)
        cost *= -2.0
        cost += _ref_to_numpy64(centers.square().sum(1))[None, :]
        cost += jitter
        if labels is not None:
            caps = np.bincount(labels, minlength=k)
        new, prices = assign(cost, caps, prices)
        new = refine(cost, new, q=q, allow_moves=r > 0)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        lab_t = torch.from_numpy(labels).to(dev)
        counts = torch.bincount(lab_t, minlength=k).to(torch.float32)
        centers = torch.zeros_like(centers).index_add_(0, lab_t, x) / counts[:, None]
    assert labels is not None
    return _ref_canonical(torch.from_numpy(labels).to(dev), k)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cluster_cache()
    yield
    clear_cluster_cache()


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _structured(n: int, d: int, centres: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows = one of ``centres`` random directions + noise of half their scale (as the 7B benchmark draws them)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    which = torch.randint(0, centres, (n,), generator=g)
    return ((c[which] + 0.5 * torch.randn(n, d, generator=g)) * 0.02).to(dtype)


def _check(x: torch.Tensor, k: int, **kw: int | bool) -> torch.Tensor:
    new = balanced_kmeans(x, k, cache=False, **kw)  # type: ignore[arg-type]
    ref = _reference_labels(x, k, **kw)  # type: ignore[arg-type]
    assert torch.equal(new, ref)
    return new


# ----------------------------------------------------------------------------------------------
# new path == old path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "d", "k", "seed"),
    [(600, 32, 8, 0), (1000, 37, 13, 1), (777, 64, 64, 2), (1024, 16, 16, 3), (513, 8, 5, 4), (300, 20, 7, 5)],
)
def test_random_inputs_match_reference(n: int, d: int, k: int, seed: int) -> None:
    """Several shapes (``n`` above and below the blocked-product threshold, ``k`` dividing ``n`` or not)."""
    labels = _check(_random(n, d, seed), k, seed=seed)
    assert torch.bincount(labels, minlength=k).max() - torch.bincount(labels, minlength=k).min() <= 1


@pytest.mark.parametrize(("n", "d", "k", "centres", "seed"), [(1100, 64, 16, 16, 0), (688, 256, 8, 8, 1)])
def test_structured_bf16_inputs_match_reference(n: int, d: int, k: int, centres: int, seed: int) -> None:
    """Conversion-like keys: bf16 rows around random centres."""
    _check(_structured(n, d, centres, seed, torch.bfloat16), k, seed=seed)


def test_unnormalised_and_short_runs_match_reference() -> None:
    x = _random(900, 24, 7) * 3.0 + 1.0
    _check(x, 12, seed=3, normalize=False)
    _check(x, 12, seed=3, max_iter=1)
    _check(x, 12, seed=4, max_iter=2, normalize=False)


def test_edge_cases_match_reference() -> None:
    x = _random(520, 6, 0)
    assert torch.equal(_check(x, 520), torch.arange(520))  # k == n
    assert torch.equal(_check(x, 1), torch.zeros(520, dtype=torch.int64))  # k == 1
    _check(x, 2)
    _check(x, 519)  # q = 1, one cluster of two


def test_duplicate_rows_and_ties_match_reference() -> None:
    """Duplicated rows, all-zero rows and exactly tied distances."""
    base = _random(8, 10, 1)
    dup = base.repeat(70, 1)  # 560 rows, 8 distinct values
    _check(dup, 16)
    _check(dup, 8, seed=2)
    zeros = torch.zeros(600, 5)
    zeros[::7] = 1.0
    _check(zeros, 10)
    _check(torch.zeros(530, 3), 7)
    grid = torch.tensor([[float(i % 4), float(i // 4 % 4)] for i in range(640)])  # many exact ties
    _check(grid, 16, normalize=False)


# ----------------------------------------------------------------------------------------------
# the pieces
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [511, 512, 513, 767, 768, 1000, 1301])
@pytest.mark.parametrize("m", [1, 3, 6, 8])
def test_blocked_candidate_dots_equal_one_product(n: int, m: int) -> None:
    x = F.normalize(_random(n, 96, n + m), dim=1)
    rows = x[torch.randint(n, (m,), generator=torch.Generator().manual_seed(m))]
    dots = cl._CandidateDots(x)
    full = _ref_to_numpy64(rows @ x.T)
    for _ in range(2):  # the first call checks the blocked form, the second trusts it
        assert np.array_equal(dots(rows), full)
    assert (dots.stops is not None) == (n >= 2 * cl._DOT_BLOCK)


def test_blocked_candidate_dots_fall_back_when_they_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    x = F.normalize(_random(700, 16, 0), dim=1)
    rows = x[:4]
    dots = cl._CandidateDots(x)
    real = dots._blocked
    monkeypatch.setattr(dots, "_blocked", lambda r, s: real(r, s) + 1.0)
    assert np.array_equal(dots(rows), _ref_to_numpy64(rows @ x.T))
    assert dots.stops is None  # from now on one full product per call
    assert np.array_equal(dots(x[5:9]), _ref_to_numpy64(x[5:9] @ x.T))


@pytest.mark.parametrize("n", [1, 511, 512, 513, 767, 768, 1000, 1301])
@pytest.mark.parametrize("d", [1, 7, 96, 4097])
def test_blocked_row_norms_equal_one_reduction(n: int, d: int) -> None:
    x = _random(n, d, n * d)
    assert np.array_equal(cl._row_sq(x), _ref_to_numpy64(x.square().sum(1)))


def test_fp32_input_is_not_normalised_in_place() -> None:
    x = _random(600, 8, 3)
    before = x.clone()
    labels = balanced_kmeans(x, 4, cache=False)
    assert torch.equal(x, before)  # the caller's fp32 tensor is the working copy's source, never changed
    assert torch.equal(labels, balanced_kmeans(x.double(), 4, cache=False))  # a private copy: in place


def test_finiteness_check_fast_path() -> None:
    huge = torch.full((600, 4), 3e38)  # finite entries whose sum overflows: the entrywise check decides
    assert cl._check_vectors(huge, "v") is huge
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(600, 4)
        x[17, 2] = bad
        with pytest.raises(cl.ConfigError, match="finite"):
            balanced_kmeans(x, 3)
        with pytest.raises(cl.ConfigError, match="finite"):
            cl._check_vectors(x.to(torch.bfloat16), "v")
    mixed = torch.randn(600, 4)
    mixed[0, 0], mixed[1, 0] = float("inf"), -float("inf")
    with pytest.raises(cl.ConfigError, match="finite"):
        cl._check_vectors(mixed, "v")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cache_key_is_the_hash_of_the_fp32_bytes(dtype: torch.dtype) -> None:
    import hashlib

    x = _random(40, 6, 0).to(dtype)
    h = hashlib.sha256()
    h.update(f"{cl.ALGORITHM_VERSION}|n=40|d=6|k=4|seed=1|max_iter=9|norm=1|".encode())
    h.update(x.float().numpy().tobytes())
    x32 = x.to(torch.float32)
    for owned in (False, True):
        assert cl._cache_key(x32, 4, seed=1, max_iter=9, normalize=True, owned=owned) == h.hexdigest()[:40]


def test_cache_still_serves_equal_labels() -> None:
    x = _structured(600, 32, 8, 3, torch.bfloat16)
    first = balanced_kmeans(x, 8, seed=1)
    assert torch.equal(balanced_kmeans(x, 8, seed=1), first)
    assert torch.equal(balanced_kmeans(x.float(), 8, seed=1), first)  # same fp32 values, same key
    assert torch.equal(first, _reference_labels(x, 8, seed=1))


# ----------------------------------------------------------------------------------------------
# slow: the 7B shape, and the benchmark's quick mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["structured", "random"])
def test_llama_7b_ffn_shape_matches_reference(kind: str) -> None:
    """One Llama-7B FFN's keys (11008 x 4096, k 64), as the conversion clusters them."""
    x = _structured(11008, 4096, 64, 0, torch.bfloat16) if kind == "structured" else _random(11008, 4096, 1)
    _check(x, 64)


@pytest.mark.slow
def test_benchmark_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "emoe_clustering.py"), "--quick", "--out", str(out)],
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    res = json.loads(out.read_text())
    for key in ("benchmark", "setting", "threads", "torch", "median_seconds", "ratios", "targets", "met", "curves"):
        assert key in res
    assert "notes" in res
    assert "conversion_structured" in res["median_seconds"]
    assert set(res["met"]) == set(res["targets"])
