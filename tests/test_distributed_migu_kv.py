"""MIGU and KV (modes full, mask, lora) under 2-process DDP and FSDP2 (gloo, CPU), and the rule that
collectives run only for models that are really distributed.

Each spawned job runs every case of one wrapper. Every rank also trains the single-process
reference on the concatenated batch: a local model inside the process group, which must run no
collective (if MIGU all-reduced there, the other rank would never join and the job would time
out). Per case the tests check: the ranks agree bit for bit, they match the reference (SGD with
momentum and weight decay: deterministic, and it would move masked slices unless they are frozen),
masked slices did not move in any step, or the order was refused with the typed error the docs name.

Why MIGU under DDP equals one process on the concatenated batch: per rank it accumulates, per unit,
the sum of ``|h|`` over its positions and the number of positions; those are averaged over the
ranks, i.e. the concatenated sums divided by ``world``. ``abs_sum`` selects by rank (quantile /
top-k), which a positive factor does not change; ``l1_token_mean`` divides the two averages, so
the factor cancels. The masks are therefore those of the concatenated batch (tested exactly), and
DDP's averaged gradient is the concatenated batch's when every rank has as many loss tokens.

The in-process tests at the bottom run in a 1-process gloo group and are fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import modulart as mt
from distributed import full_parameters, max_difference, requires_gloo, run_ranks, save_rank
from modulart.core.errors import InvalidStateError, ShardedModelError
from modulart.core.unwrap import is_distributed

pytestmark = requires_gloo

STEPS = 3
ATOL = 2e-5
KV_MODES = ("full", "mask", "lora")
CASES = ("migu", *(f"kv_{m}" for m in KV_MODES))


# --- helpers run inside the spawned ranks ----------------------------------------------------
def _batch(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s token batch ``[2, 6]`` of step ``step`` (different on every rank)."""
    return torch.randint(100, (2, 6), generator=torch.Generator().manual_seed(1000 * (rank + 1) + step))


def _concatenated(world: int, step: int) -> torch.Tensor:
    """What one process sees: every rank's batch of ``step`` in rank order, ``[2 * world, 6]``."""
    return torch.cat([_batch(r, step) for r in range(world)])


def _model() -> nn.Module:
    from families import tiny_llama

    return tiny_llama()


def _apply(case: str, model: nn.Module) -> mt.Handle[Any]:
    if case == "migu":
        return mt.migu.apply(model, keep_ratio=0.3)
    mode = case.removeprefix("kv_")
    extra: dict[str, Any] = {"neurons": 0.5} if mode == "mask" else {"rank": 2} if mode == "lora" else {}
    return mt.kv.apply(model, target="both", mode=mode, **extra)


def _frozen(case: str, handle: Any) -> dict[str, tuple[torch.Tensor, int]]:
    """Per parameter name: (keep bool vector, axis): the slices that must not move in the last step."""
    if case == "migu":
        return {f"{p}.weight": (keep, handle.layers[p].target.axis) for p, keep in handle.masks().items()}
    if case == "kv_mask":
        return {part.name: (keep, axis) for part in handle.parts for _, keep, axis in [handle.keep[id(part.param)]]}
    return {}


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], frozen: dict[str, Any]) -> float:
    """The largest change of a slice that was masked in this step (0.0 when masks hold)."""
    worst = 0.0
    for name, (keep, axis) in frozen.items():
        masked = (~keep).nonzero().flatten()
        delta = (after[name] - before[name]).index_select(axis, masked)
        worst = max(worst, float(delta.abs().max()) if delta.numel() else 0.0)
    return worst


def _train(
    case: str, handle: Any, model: nn.Module, wrapped: nn.Module, batches: Callable[[int], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Three SGD steps (momentum, weight decay); returns the final parameters, masks and checks."""
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=0.1)
    if case in ("migu", "kv_mask"):
        handle.attach(opt)
    moved, masked_units = 0.0, 0
    masks: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        before = full_parameters(model)
        ids = batches(step)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        frozen = _frozen(case, handle)
        moved = max(moved, _moved(before, full_parameters(model), frozen))
        masked_units += sum(int((~keep).sum()) for keep, _ in frozen.values())
        if case == "migu":
            masks.update({f"mask/{step}/{k}": v for k, v in handle.masks().items()})
    out = {f"param/{k}": v for k, v in full_parameters(model).items()}
    return out | masks | {"moved": torch.tensor(moved), "masked_units": torch.tensor(masked_units)}


def _reference(case: str, world: int) -> dict[str, torch.Tensor]:
    model = _model()
    handle = _apply(case, model)  # a local model inside a process group: no collective may run
    return _train(case, handle, model, model, lambda s: _concatenated(world, s))


def _each(runs: dict[str, Callable[[], dict[str, torch.Tensor]]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run every named case; tensors under ``name/…``, errors as ``{name: "Type: message"}``."""
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for name, run in runs.items():
        try:
            tensors.update({f"{name}/{k}": v for k, v in run().items()})
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    return tensors, errors


def _split(ranks: list[dict[str, Any]], prefix: str) -> list[dict[str, torch.Tensor]]:
    return [{k[len(prefix) + 1 :]: v for k, v in r.items() if k.startswith(prefix + "/")} for r in ranks]


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model)
    return model


# --- DDP -------------------------------------------------------------------------------------
def _ddp_run(rank: int, case: str, order: str) -> dict[str, torch.Tensor]:
    model = _model()
    if order == "wrapped":  # apply to the DDP-wrapped model
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
        handle = _apply(case, wrapped)
    else:  # apply, then wrap
        handle = _apply(case, model)
        wrapped = nn.parallel.DistributedDataParallel(model)
    return _train(case, handle, model, wrapped, lambda s: _batch(rank, s))


def _ddp_worker(rank: int, world: int, out: str) -> None:
    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    for case in CASES:
        runs[f"{case}/reference"] = lambda case=case: _reference(case, world)
        for order in ("apply_wrap", "wrapped"):
            runs[f"{case}/{order}"] = lambda case=case, order=order: _ddp_run(rank, case, order)
    tensors, errors = _each(runs)
    save_rank(out, rank, tensors, {"errors": errors})


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("transformers")
    return run_ranks(_ddp_worker, tmp_path_factory.mktemp("ddp"), timeout_s=600)


def _check_trained(case: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]):
    assert max_difference(a, b) == 0.0  # parameters (and MIGU's masks) identical on both ranks
    assert max_difference(a, ref) < ATOL  # = one process on the concatenated batch
    assert float(a["moved"]) == 0.0  # no masked slice moved in any step (momentum and weight decay included)
    if case in ("migu", "kv_mask"):
        assert int(a["masked_units"]) > 0
    start = _model()
    _apply(case, start)
    changed = [k for k, v in full_parameters(start).items() if not torch.equal(a[f"param/{k}"], v)]
    assert any(".mlp." in k for k in changed)  # the steps did train
    assert all(".mlp." in k for k in changed) or case == "migu"  # KV trained nothing else
    if case == "migu":
        masks = [k for k in ref if k.startswith("mask/")]
        assert masks and all(torch.equal(a[k], ref[k]) for k in masks)  # the concatenated batch's masks


DDP_ORDERS = [("migu", "apply_wrap"), ("migu", "wrapped"), *((f"kv_{m}", "apply_wrap") for m in KV_MODES)]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "order"), DDP_ORDERS)
def test_ddp_ranks_agree_and_match_one_process(ddp_ranks: list[dict[str, Any]], case: str, order: str) -> None:
    for r in ddp_ranks:
        assert f"{case}/{order}" not in r["errors"], r["errors"][f"{case}/{order}"]
        assert f"{case}/reference" not in r["errors"], r["errors"][f"{case}/reference"]
    a, b = _split(ddp_ranks, f"{case}/{order}")
    _check_trained(case, a, b, _split(ddp_ranks, f"{case}/reference")[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", KV_MODES)
def test_kv_on_a_ddp_wrapped_model_is_refused_naming_the_order(ddp_ranks: list[dict[str, Any]], mode: str) -> None:
    for r in ddp_ranks:  # DDP fixed its parameters at construction; KV changes requires_grad / adds LoRA
        err = r["errors"].get(f"kv_{mode}/wrapped", "")
        assert err.startswith("UnsupportedOperationError:") and "apply KV to the bare model" in err, err


# --- FSDP2 -----------------------------------------------------------------------------------
def _fsdp_run(rank: int, case: str, order: str) -> dict[str, torch.Tensor]:
    model = _model()
    if order == "shard_apply":
        _shard(model)
        handle = _apply(case, model)
    else:
        handle = _apply(case, model)
        _shard(model)
    return _train(case, handle, model, model, lambda s: _batch(rank, s))


def _stale_optimizer(rank: int) -> dict[str, torch.Tensor]:
    """MIGU given an optimizer built before fully_shard: the step is refused, nothing moves."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mt.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    _shard(model)
    ids = _batch(rank, 0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return {}


def _kv_mask_without_optimizer(rank: int) -> dict[str, torch.Tensor]:
    """KV mask mode sharded without attach(): gradients could not be masked, so training is refused."""
    model = _model()
    _apply("kv_mask", model)
    _shard(model)
    ids = _batch(rank, 0)
    model(input_ids=ids, labels=ids).loss.backward()
    return {}


def _fsdp_worker(rank: int, world: int, out: str) -> None:
    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    for case in CASES:
        runs[f"{case}/reference"] = lambda case=case: _reference(case, world)
        for order in ("apply_shard", "shard_apply"):
            runs[f"{case}/{order}"] = lambda case=case, order=order: _fsdp_run(rank, case, order)
    runs["migu/stale_optimizer"] = lambda: _stale_optimizer(rank)
    runs["kv_mask/no_optimizer"] = lambda: _kv_mask_without_optimizer(rank)
    tensors, errors = _each(runs)
    save_rank(out, rank, tensors, {"errors": errors})


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("transformers")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    return run_ranks(_fsdp_worker, tmp_path_factory.mktemp("fsdp"), timeout_s=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_apply_then_shard_masks_hold_and_match_one_process(fsdp_ranks: list[dict[str, Any]], case: str) -> None:
    for r in fsdp_ranks:
        assert f"{case}/apply_shard" not in r["errors"], r["errors"][f"{case}/apply_shard"]
    a, b = _split(fsdp_ranks, f"{case}/apply_shard")
    _check_trained(case, a, b, _split(fsdp_ranks, f"{case}/reference")[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_shard_then_apply_is_refused_naming_the_order_that_works(
    fsdp_ranks: list[dict[str, Any]], case: str
) -> None:
    for r in fsdp_ranks:
        err = r["errors"].get(f"{case}/shard_apply", "")
        assert err.startswith("ShardedModelError:"), err
        assert "before fully_shard" in err and ("MIGU" if case == "migu" else "KV") in err


@pytest.mark.slow
def test_fsdp2_misuse_after_sharding_is_refused_typed(fsdp_ranks: list[dict[str, Any]]) -> None:
    for r in fsdp_ranks:
        stale = r["errors"].get("migu/stale_optimizer", "")
        assert stale.startswith("InvalidStateError:") and "before fully_shard" in stale and "attach" in stale, stale
        unmasked = r["errors"].get("kv_mask/no_optimizer", "")
        assert unmasked.startswith("UnsupportedOperationError:") and "attach(optimizer)" in unmasked, unmasked


# --- a local model inside a distributed job: no collective ----------------------------------
def _local_step_worker(rank: int, world: int, out: str) -> None:
    """Only rank 0 trains a local, unwrapped model with MIGU; rank 1 waits (no collective) for it."""
    done = Path(out) / "done"
    if rank == 0:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = mt.migu.apply(model, keep_ratio=0.5, select="topk", optimizer=opt)
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        kept = {k: int(v.sum()) for k, v in handle.masks().items()}
        done.write_text("ok", encoding="utf-8")
        save_rank(out, rank, {}, {"kept": kept})
        return
    deadline = time.monotonic() + 40
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    save_rank(out, rank, {}, {"saw_done": done.exists()})


@pytest.mark.slow
def test_migu_step_on_a_local_model_of_one_rank_finishes(tmp_path: Path) -> None:
    ranks = run_ranks(_local_step_worker, tmp_path, timeout_s=30)
    assert ranks[0]["kept"] == {"0": 4, "2": 1}
    assert ranks[1]["saw_done"]


# --- in-process, 1-rank gloo group (fast) ----------------------------------------------------
@pytest.fixture
def all_reduces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``torch.distributed.all_reduce`` calls (they still run)."""
    calls: list[int] = []
    real = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    return calls


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _migu_step(model: nn.Module, wrapped: nn.Module, opt: torch.optim.Optimizer) -> None:
    wrapped(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_migu_on_a_local_model_in_a_process_group_runs_no_collective(
    one_rank_group: None, all_reduces: list[int]
) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = mt.migu.apply(model, keep_ratio=0.5, optimizer=opt)
    for _ in range(2):
        _migu_step(model, model, opt)
    assert all_reduces == [] and handle.stats()["0"].steps == 2


@pytest.mark.parametrize("order", ["apply_wrap", "wrapped"])
def test_migu_under_ddp_all_reduces_once_per_step(one_rank_group: None, all_reduces: list[int], order: str) -> None:
    model = _mlp()
    if order == "wrapped":
        wrapped = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        mt.migu.apply(wrapped, keep_ratio=0.5, optimizer=opt)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mt.migu.apply(model, keep_ratio=0.5, optimizer=opt)
        wrapped = nn.parallel.DistributedDataParallel(model)  # wrapped after apply: found during the forward
    for _ in range(2):
        _migu_step(model, wrapped, opt)
    assert len(all_reduces) == 2
    _migu_step(model, model, opt)  # the inner model's own forward, outside DDP: local, no collective
    assert len(all_reduces) == 2


def test_is_distributed(one_rank_group: None) -> None:
    plain = _mlp()
    assert not is_distributed(plain) and not is_distributed(torch.compile(plain)) and not is_distributed(3)
    ddp = nn.parallel.DistributedDataParallel(plain)
    assert is_distributed(ddp) and not is_distributed(plain)  # the inner model alone is local
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if hasattr(fsdp, "fully_shard"):
        sharded = _mlp()
        fsdp.fully_shard(sharded)
        assert is_distributed(sharded)


def test_sharded_model_is_refused_at_apply_naming_the_order(one_rank_group: None) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("no FSDP2")
    model = _mlp()
    fsdp.fully_shard(model)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    with pytest.raises(ShardedModelError, match=r"MIGU.*apply MIGU before fully_shard"):
        mt.migu.apply(model, keep_ratio=0.5)
    with pytest.raises(ShardedModelError, match=r"KV.*apply KV before fully_shard"):
        mt.kv.apply(model, mode="mask", neurons=0.5)
    assert hooks == [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert all(p.requires_grad for p in model.parameters())


def test_migu_sharded_after_apply_refuses_a_stale_optimizer(one_rank_group: None) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("no FSDP2")
    model = _mlp()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    mt.migu.apply(model, keep_ratio=0.25, select="topk", optimizer=stale)
    fsdp.fully_shard(model)
    model(torch.randn(3, 4)).sum().backward()
    before = full_parameters(model)
    with pytest.raises(InvalidStateError, match="before fully_shard"):
        stale.step()
    assert max_difference(before, full_parameters(model)) == 0.0


@pytest.mark.parametrize("case", ["migu", "kv_mask"])
def test_masks_hold_on_sharded_parameters(one_rank_group: None, case: str) -> None:
    """Apply, fully_shard, then the optimizer: masked units keep their values (momentum, weight decay)."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("no FSDP2")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
    if case == "migu":
        handle: Any = mt.migu.apply(model, keep_ratio=0.25, select="topk")
    else:
        handle = mt.kv.apply(model, target="both", mode="mask", neurons={"": [1, 4, 6, 11]})
    fsdp.fully_shard(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=0.5)
    handle.attach(opt)
    for _ in range(2):
        before = full_parameters(model)
        _migu_step(model, model, opt)
        after = full_parameters(model)
        frozen = _frozen(case, handle)
        assert frozen and sum(int((~k).sum()) for k, _ in frozen.values()) > 0
        assert _moved(before, after, frozen) == 0.0
        assert any(not torch.equal(before[k], after[k]) for k in frozen)  # the kept units did train


def test_kv_on_a_ddp_wrapped_model_is_refused_before_any_change(one_rank_group: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    keys = list(model.state_dict())
    for mode in KV_MODES:
        with pytest.raises(mt.UnsupportedOperationError, match="apply KV to the bare model"):
            mt.kv.apply(ddp, mode=mode)
    assert list(model.state_dict()) == keys and all(p.requires_grad for p in model.parameters())
    mt.kv.apply(model, mode="lora", rank=2).remove()  # the bare model is fine


def test_kv_mask_sharded_after_apply_without_an_optimizer_refuses_to_train(one_rank_group: None) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("no FSDP2")
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
    handle = mt.kv.apply(model, target="both", mode="mask", neurons=0.5)
    fsdp.fully_shard(model)  # the root itself: inside its forward the parameters are unsharded
    assert handle.sharded
    with pytest.raises(mt.UnsupportedOperationError, match=r"fully_shard.*handle.attach\(optimizer\)"):
        model(torch.randn(3, 4))
    handle.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    model(torch.randn(3, 4)).sum().backward()  # attached: trains
