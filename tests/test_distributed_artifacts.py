"""Artefacts of FSDP2-sharded models: ``save`` and ``mt.load`` gather the shards they fingerprint.

Before, fingerprinting indexed a ``DTensor`` with plain index tensors and failed untyped ("mixed
torch.Tensor and DTensor") for every operator on a ``fully_shard`` model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modulart as mt
from families import tiny_llama

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)


def _shard(model: torch.nn.Module) -> None:
    for layer in model.model.layers:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)


def test_fingerprint_of_a_sharded_model_equals_the_unsharded_one(one_rank_group: None) -> None:
    plain = tiny_llama()
    sharded = tiny_llama()
    _shard(sharded)
    assert any(type(p).__name__ == "DTensor" for p in sharded.parameters())
    assert mt.fingerprint(sharded).diff(mt.fingerprint(plain)) == []


def test_emoe_artefact_saved_from_a_sharded_model_loads_into_a_plain_one(one_rank_group: None, tmp_path: Path) -> None:
    sharded = tiny_llama()
    handle = mt.emoe.apply(sharded, num_experts=4, top_k=2)
    _shard(sharded)
    handle.save(tmp_path / "art")
    ids = torch.randint(100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sharded(input_ids=ids).logits
    sharded.reshard()
    plain = tiny_llama()
    mt.load(plain, tmp_path / "art")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
