"""modulart.kv under 2-process DDP (gloo, CPU): the LoRA tensors are model parameters, so DDP syncs them.

Before they were registered, DDP refused a model whose only trainable tensors were KV's LoRA (the
default ``freeze_rest=True``: "no parameter requires a gradient"), and with ``freeze_rest=False``
the LoRA tensors trained per rank and drifted apart.
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import modulart.kv
from families import tiny_llama as _tiny_llama

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS = 3
TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, freeze_rest: bool, wrap: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = _tiny_llama()
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
        params = {}
        for n, p in model.named_parameters():
            t = p.detach()
            full = getattr(t, "full_tensor", None)  # FSDP2: a sharded DTensor
            params[n] = (full() if callable(full) else t).clone()
        trained = handle.state_dict()  # (FSDP2: gathered whole on every rank)
        lora_changed = sorted(k for k, v in init.items() if not torch.equal(v, trained[k]))
        torch.save({"params": params, "lora": sorted(init), "lora_changed": lora_changed}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, freeze_rest: bool, wrap: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ctx = mp.start_processes(
        _worker,
        args=(2, _free_port(), freeze_rest, wrap, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"2-process {wrap} run did not finish in {TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["lora"] and r["lora_changed"] == r["lora"], "every LoRA tensor trained"
    return ranks[0]["params"], ranks[1]["params"]


def _max_rank_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("freeze_rest", [True, False], ids=["default", "freeze_rest_false"])
def test_ddp_keeps_kv_lora_identical_on_both_ranks(tmp_path: Path, freeze_rest: bool) -> None:
    a, b = _run(tmp_path, freeze_rest, "ddp")
    assert any(".modulart_kv_lora." in n for n in a)  # the LoRA tensors are among the compared parameters
    assert _max_rank_difference(a, b) == 0.0


@pytest.mark.slow
def test_fsdp2_keeps_kv_lora_identical_on_both_ranks(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    a, b = _run(tmp_path, False, "fsdp2")
    assert any(".modulart_kv_lora." in n for n in a)
    assert _max_rank_difference(a, b) == 0.0
