"""modulart.core.finite.all_finite: the one-sum check agrees with the entrywise one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modulart.core.finite import all_finite
from modulart.core.neuron_groups import ExpertGroups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_entry_is_found(dtype: torch.dtype, bad: float) -> None:
    x = torch.randn(37, 5).to(dtype)
    assert all_finite(x)
    x[11, 3] = bad
    assert not all_finite(x)


def test_an_overflowing_sum_of_finite_entries_is_finite() -> None:
    assert all_finite(torch.full((4,), 6e4, dtype=torch.float16))  # the fp16 sum is inf, no entry is
    assert all_finite(torch.full((3,), 3e38))
    both = torch.tensor([float("inf"), -float("inf"), 1.0])  # +inf and -inf: the sum is nan
    assert not all_finite(both)


def test_integer_bool_and_empty_tensors_are_finite() -> None:
    assert all_finite(torch.arange(5)) and all_finite(torch.ones(3, dtype=torch.bool)) and all_finite(torch.empty(0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.5, -2.0, 6e4, -6e4, float("nan"), float("inf"), -float("inf")]), min_size=1))
def test_agrees_with_the_entrywise_check(values: list[float]) -> None:
    for dtype in (torch.float32, torch.float16):
        x = torch.tensor(values, dtype=dtype)
        assert all_finite(x) == bool(x.isfinite().all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_centroids_by_blocks_equal_one_index_add(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (2500,), generator=g)
    labels[:7] = torch.arange(7)
    keys = torch.randn(2500, 33, generator=g).to(dtype)
    groups = ExpertGroups(labels, 7)
    k = keys.float()
    want = torch.zeros(7, 33).index_add_(0, labels, k) / groups.sizes.float().unsqueeze(1)
    assert torch.equal(groups.centroids(keys), want)
