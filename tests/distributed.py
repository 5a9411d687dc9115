"""Spawn a 2-process gloo job on CPU from a test, and collect what each rank wrote.

A worker is a module-level function ``worker(rank, world, out_dir, *args)`` (spawned processes import
it by qualified name, so it cannot be a closure). It runs inside an initialised gloo process group
and writes its results with :func:`save_rank`; :func:`run_ranks` returns them per rank. A job that
does not finish in ``timeout_s`` is killed and the test fails, instead of hanging CI.

Example (a worker in a test file)::

    def _worker(rank: int, world: int, out: str) -> None:
        save_rank(out, rank, {"x": torch.full((2,), float(rank))})

    ranks = run_ranks(_worker, tmp_path)
    assert ranks[1]["x"].tolist() == [1.0, 1.0]
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

TIMEOUT_S = 180.0

requires_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, worker: Callable[..., None], world: int, port: int, out: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        worker(rank, world, out, *args)
    finally:
        dist.destroy_process_group()


def save_rank(
    out: str | os.PathLike[str],
    rank: int,
    tensors: Mapping[str, torch.Tensor],
    values: Mapping[str, Any] | None = None,
) -> None:
    """Write one rank's results: tensors (safetensors) and JSON values."""
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, f"{out}/rank{rank}.safetensors")
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(dict(values or {})), encoding="utf-8")


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` as a whole tensor (FSDP2's DTensor shards gathered)."""
    params = {}
    for name, p in model.named_parameters():
        t = p.detach()
        full = getattr(t, "full_tensor", None)
        params[name] = (full() if callable(full) else t).clone()
    return params


def run_ranks(
    worker: Callable[..., None],
    tmp_path: Path,
    *args: Any,
    world: int = 2,
    timeout_s: float = TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Run ``worker`` on ``world`` spawned ranks; returns each rank's tensors and JSON values merged."""
    ctx = mp.start_processes(
        _entry,
        args=(worker, world, free_port(), str(tmp_path), args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-process run of {worker.__name__} did not finish in {timeout_s} s")
    out: list[dict[str, Any]] = []
    for r in range(world):
        merged: dict[str, Any] = dict(load_file(str(tmp_path / f"rank{r}.safetensors")))
        merged.update(json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")))
        out.append(merged)
    return out


def max_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference between two equal-keyed tensor dicts."""
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)
