"""modulart.kv under 2-process DDP / FSDP2 (gloo, CPU): the LoRA tensors are model parameters, so DDP syncs them.

Before they were registered, DDP refused a model whose only trainable tensors were KV's LoRA (the
default ``freeze_rest=True``: "no parameter requires a gradient"), and with ``freeze_rest=False``
the LoRA tensors trained per rank and drifted apart. The other modes and the comparison with one
process on the concatenated batch are in ``test_distributed_migu_kv.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modulart.kv
from distributed import full_parameters, max_difference, requires_gloo, run_ranks, save_rank

pytest.importorskip("transformers")

pytestmark = requires_gloo

STEPS = 3


def _worker(rank: int, world: int, out: str, freeze_rest: bool, wrap: str) -> None:
    from families import tiny_llama

    model = tiny_llama()
    handle = modulart.kv.apply(model, target="both", mode="lora", rank=2, freeze_rest=freeze_rest)
    init = {k: v for k, v in handle.state_dict().items() if isinstance(v, torch.Tensor)}
    assert len(init) == 8  # gate and down of 2 layers, A and B
    wrapped: torch.nn.Module
    if wrap == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    for _ in range(STEPS):
        ids = torch.randint(100, (2, 6), generator=g)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trained = handle.state_dict()  # (FSDP2: gathered whole on every rank)
    lora_changed = sorted(k for k, v in init.items() if not torch.equal(v, trained[k]))
    save_rank(out, rank, full_parameters(model), {"lora": sorted(init), "lora_changed": lora_changed})


def _run(tmp_path: Path, freeze_rest: bool, wrap: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ranks = run_ranks(_worker, tmp_path, freeze_rest, wrap, timeout_s=180)
    for r in ranks:
        assert r["lora"] and r["lora_changed"] == r["lora"], "every LoRA tensor trained"
    params = [{k: v for k, v in r.items() if isinstance(v, torch.Tensor)} for r in ranks]
    return params[0], params[1]


@pytest.mark.slow
@pytest.mark.parametrize("freeze_rest", [True, False], ids=["default", "freeze_rest_false"])
def test_ddp_keeps_kv_lora_identical_on_both_ranks(tmp_path: Path, freeze_rest: bool) -> None:
    a, b = _run(tmp_path, freeze_rest, "ddp")
    assert any(".modulart_kv_lora." in n for n in a)  # the LoRA tensors are among the compared parameters
    assert max_difference(a, b) == 0.0


@pytest.mark.slow
def test_fsdp2_keeps_kv_lora_identical_on_both_ranks(tmp_path: Path) -> None:
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    a, b = _run(tmp_path, False, "fsdp2")
    assert any(".modulart_kv_lora." in n for n in a)
    assert max_difference(a, b) == 0.0
