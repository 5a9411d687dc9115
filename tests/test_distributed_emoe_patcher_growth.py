"""EMoE (both executors), patch training and growth-then-train under 2-process DDP and FSDP2 (gloo, CPU).

Every spawned job runs all the orders of one operator: DDP (apply, then wrap; or apply to the
wrapped model), FSDP2 apply -> ``fully_shard`` and ``fully_shard`` -> apply. Each rank also
computes the single-process reference on the concatenated batch (a local model inside the
process group, which must not run a collective: if it did, the other rank would never join and
the job would time out). The tests then check, per order: the ranks agree, and they match the
reference (SGD, so the comparison is not amplified by Adam's normalisation), or the order was
refused at apply time with the typed error named in the docs.

The in-process tests at the bottom run in a 1-process gloo group (fast, not slow-marked).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import modulart as mt
import modulart.stacking as st
from distributed import full_parameters, max_difference, requires_gloo, run_ranks, save_rank
from families import tiny_llama
from modulart.core.errors import ShardedModelError
from modulart.core.verify import clear_verification_cache

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)

pytestmark = requires_gloo

STEPS = 3
LR = 0.1
ATOL = 2e-5
EMOE = dict(num_experts=4, top_k=2, layers="all")
EMOE_ORDERS = ("ddp", "ddp_wrapped", "fsdp_apply_shard", "fsdp_shard_apply")


# --- shared helpers (run inside the spawned ranks) -------------------------------------------
def _batch(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s token batch ``[2, 6]`` of step ``step`` (different on every rank)."""
    return torch.randint(100, (2, 6), generator=torch.Generator().manual_seed(1000 * (rank + 1) + step))


def _concatenated(world: int, step: int) -> torch.Tensor:
    """The batch one process sees: every rank's batch of ``step`` in rank order ``[2 * world, 6]``."""
    return torch.cat([_batch(r, step) for r in range(world)])


PROBE = torch.arange(3, 27).reshape(3, 8) % 100


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model)
    return model


def _train(wrapped: nn.Module, batches: Callable[[int], torch.Tensor], params: list[nn.Parameter]) -> None:
    opt = torch.optim.SGD(params, lr=LR)
    for step in range(STEPS):
        ids = batches(step)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _logits(model: nn.Module) -> torch.Tensor:
    """Eval logits on ``PROBE``; an FSDP2 root is resharded afterwards.

    PyTorch keeps an FSDP2 root unsharded after its forward (for the backward that usually
    follows); after a no-grad forward, the next training step then updates the root's parameters
    wrongly (torch 2.13, CPU/gloo) unless ``reshard()`` is called first: part of the recipe.
    """
    with torch.no_grad():
        out = model(input_ids=PROBE).logits.detach().clone()
    reshard = getattr(model, "reshard", None)
    if callable(reshard):
        reshard()
    return out  # type: ignore[no-any-return]


def _record(out: dict[str, torch.Tensor], prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    out.update({f"{prefix}/{k}": v for k, v in tensors.items()})


def _each(
    rank: int, runs: dict[str, Callable[[], dict[str, torch.Tensor]]]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run every named case; tensors under ``name/…``, errors as ``{name: "Type: message"}``."""
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for name, run in runs.items():
        try:
            _record(tensors, name, run())
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    return tensors, errors


def _split(ranks: list[dict[str, Any]], prefix: str) -> list[dict[str, torch.Tensor]]:
    return [{k[len(prefix) + 1 :]: v for k, v in r.items() if k.startswith(prefix + "/")} for r in ranks]


# --- EMoE ------------------------------------------------------------------------------------
def _skewed_kmeans(vectors: torch.Tensor, k: int, **kwargs: Any) -> torch.Tensor:
    """Balanced k-means whose labels are relabelled: a rank whose clustering came out differently."""
    from modulart.emoe.cluster import balanced_kmeans

    labels = balanced_kmeans(vectors, k, **kwargs)
    return torch.roll(labels, 1)


def _emoe_run(rank: int, executor: str, order: str, skew: bool) -> dict[str, torch.Tensor]:
    import modulart.emoe.operator as emoe_operator

    clear_verification_cache()  # every order verifies its views itself (sharded or not)
    model = tiny_llama()
    if skew and rank == 1:  # this rank's clustering differs: apply must still give rank 0's experts
        emoe_operator.balanced_kmeans = _skewed_kmeans  # type: ignore[assignment]
    try:
        wrapped: nn.Module = model
        if order == "ddp":
            handle = mt.emoe.apply(model, executor=executor, **EMOE)
            wrapped = nn.parallel.DistributedDataParallel(model)
        elif order == "ddp_wrapped":
            wrapped = nn.parallel.DistributedDataParallel(model)
            handle = mt.emoe.apply(wrapped, executor=executor, **EMOE)
        elif order == "fsdp_apply_shard":
            handle = mt.emoe.apply(model, executor=executor, **EMOE)
            _shard(model)
        else:
            _shard(model)
            handle = mt.emoe.apply(model, executor=executor, **EMOE)
    finally:
        from modulart.emoe.cluster import balanced_kmeans

        emoe_operator.balanced_kmeans = balanced_kmeans
    before = _logits(model)
    _train(wrapped, lambda s: _batch(rank, s), [p for p in wrapped.parameters() if p.requires_grad])
    after = _logits(model)  # eval after the step: the sparse executor's weight cache must follow
    out = {f"param/{k}": v for k, v in full_parameters(model).items()}
    out |= {f"labels/{k}": v for k, v in handle.labels().items()}
    return out | {"before": before, "after": after}


def _emoe_reference(world: int, executor: str) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    handle = mt.emoe.apply(model, executor=executor, **EMOE)  # local model in a process group: no collective
    before = _logits(model)
    _train(model, lambda s: _concatenated(world, s), list(model.parameters()))
    out = {f"param/{k}": v for k, v in full_parameters(model).items()}
    out |= {f"labels/{k}": v for k, v in handle.labels().items()}
    return out | {"before": before, "after": _logits(model)}


def _emoe_worker(rank: int, world: int, out: str) -> None:
    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    for ex in ("masked", "sparse"):
        for order in EMOE_ORDERS:
            runs[f"{ex}/{order}"] = lambda ex=ex, order=order: _emoe_run(rank, ex, order, skew=False)
        for order in ("ddp", "ddp_wrapped", "fsdp_shard_apply"):
            runs[f"{ex}/{order}+skew"] = lambda ex=ex, order=order: _emoe_run(rank, ex, order, skew=True)
        runs[f"{ex}/reference"] = lambda ex=ex: _emoe_reference(world, ex)
    tensors, errors = _each(rank, runs)
    save_rank(out, rank, tensors, {"errors": errors})


@pytest.fixture(scope="module")
def emoe_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_emoe_worker, tmp_path_factory.mktemp("emoe"), timeout_s=600)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["masked", "sparse"])
@pytest.mark.parametrize("order", [*EMOE_ORDERS, "ddp+skew", "ddp_wrapped+skew", "fsdp_shard_apply+skew"])
def test_emoe_ranks_agree_and_match_one_process(emoe_ranks: list[dict[str, Any]], executor: str, order: str) -> None:
    for r in emoe_ranks:
        assert f"{executor}/{order}" not in r["errors"], r["errors"][f"{executor}/{order}"]
    a, b = _split(emoe_ranks, f"{executor}/{order}")
    ref = _split(emoe_ranks, f"{executor}/reference")[0]
    if order == "ddp+skew":  # the split is agreed at the first DDP forward: the inner model's before it differ
        for d in (a, b, ref):
            del d["before"]
    assert any(k.startswith("labels/") for k in a) and any(".mlp." in k for k in a)
    assert max_difference(a, b) == 0.0  # parameters, labels and outputs identical on both ranks
    for k in (k for k in ref if k.startswith("labels/")):
        assert torch.equal(a[k], ref[k]), k  # the same experts as one process (rank 0's, under a skew)
    if "before" in ref:
        assert torch.allclose(a["before"], ref["before"], atol=ATOL)  # the sharded model computes the same
    assert max_difference({k: a[k] for k in ref}, ref) < ATOL  # trained like one process on both batches
    start = tiny_llama().model.layers[0].mlp.up_proj.weight  # type: ignore[union-attr]
    assert not torch.equal(a["param/model.layers.0.mlp.up_proj.weight"], start)  # the steps did train


# --- patch training --------------------------------------------------------------------------
PATCHER = dict(task="generation", max_steps=6, keep_failed=True, views=2, memory_size=64, progress=False)
PATCH_ORDERS = ("ddp", "fsdp_apply_shard")


def _patcher_run(rank: int, world: int, order: str, same_edit: bool = True) -> dict[str, torch.Tensor]:
    from patcher_helpers import causal_lm

    clear_verification_cache()
    s = causal_lm("llama")
    model = s.model
    if order == "fsdp_shard_apply":
        _shard(model)
    handle = mt.patcher.apply(model, **PATCHER)
    wrapped: nn.Module = model
    if order == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif order == "fsdp_apply_shard":
        _shard(model)
    handle.set_memory(s.memory)
    x, y = s.edits[0 if same_edit or rank == 0 else 1]
    result = handle.edit(x, y)
    assert result.patch_ids, "keep_failed keeps the edit's neurons"
    bank = {f"bank/{k}": v for k, v in handle.state_dict().items() if isinstance(v, torch.Tensor)}
    patched = _logits(model)
    # then train the base model with the patch in place, every rank on its own batch
    _train(wrapped, lambda step: _batch(rank, step), list(wrapped.parameters()))
    out = {f"param/{k}": v for k, v in full_parameters(model).items()}
    return out | bank | {"patched": patched, "after": _logits(model)}


def _patcher_reference(world: int) -> dict[str, torch.Tensor]:
    from patcher_helpers import causal_lm

    s = causal_lm("llama")
    handle = mt.patcher.apply(s.model, **PATCHER)
    handle.set_memory(s.memory)
    handle.edit(*s.edits[0])
    bank = {f"bank/{k}": v for k, v in handle.state_dict().items() if isinstance(v, torch.Tensor)}
    patched = _logits(s.model)
    _train(s.model, lambda step: _concatenated(world, step), list(s.model.parameters()))
    out = {f"param/{k}": v for k, v in full_parameters(s.model).items()}
    return out | bank | {"patched": patched, "after": _logits(s.model)}


def _patcher_worker(rank: int, world: int, out: str) -> None:
    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        order: (lambda order=order: _patcher_run(rank, world, order)) for order in (*PATCH_ORDERS, "fsdp_shard_apply")
    }
    runs["fsdp_apply_shard+other_edit"] = lambda: _patcher_run(rank, world, "fsdp_apply_shard", same_edit=False)
    runs["reference"] = lambda: _patcher_reference(world)
    tensors, errors = _each(rank, runs)
    save_rank(out, rank, tensors, {"errors": errors})


@pytest.fixture(scope="module")
def patcher_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_patcher_worker, tmp_path_factory.mktemp("patcher"), timeout_s=600)


@pytest.mark.slow
@pytest.mark.parametrize("order", PATCH_ORDERS)
def test_patch_training_ranks_agree_and_match_one_process(patcher_ranks: list[dict[str, Any]], order: str) -> None:
    for r in patcher_ranks:
        assert order not in r["errors"], r["errors"][order]
    a, b = _split(patcher_ranks, order)
    ref = _split(patcher_ranks, "reference")[0]
    assert "bank/keys" in a and a["bank/keys"].shape[0] >= 1
    assert max_difference(a, b) == 0.0
    for k in (k for k in ref if k.startswith("bank/")):  # the edit is the one a single process makes
        assert torch.allclose(a[k].float(), ref[k].float(), atol=ATOL), k
    assert torch.allclose(a["patched"], ref["patched"], atol=ATOL)
    params = [k for k in ref if k.startswith("param/")]
    assert max_difference({k: a[k] for k in params}, {k: ref[k] for k in params}) < ATOL
    # the patch neuron's key is q̄/‖q̄‖²: it amplifies the rounding of trained weights in the outputs
    assert torch.allclose(a["after"], ref["after"], atol=1e-3)


@pytest.mark.slow
def test_sharded_patcher_refuses_different_edits_per_rank(patcher_ranks: list[dict[str, Any]]) -> None:
    for r in patcher_ranks:  # a typed error on every rank, before training (no hang in an all-gather)
        error = r["errors"].get("fsdp_apply_shard+other_edit", "")
        assert error.startswith("RankMismatchError") and "same (inputs, target)" in error, error


@pytest.mark.slow
def test_patcher_on_an_already_sharded_model_is_refused_typed_at_apply(patcher_ranks: list[dict[str, Any]]) -> None:
    # the FFN views cannot be verified on shards (find_ffns runs the block): refused at apply, naming the order
    for r in patcher_ranks:
        error = r["errors"].get("fsdp_shard_apply", "")
        assert error.startswith("ShardedModelError") and "apply, then fully_shard" in error, r["errors"]


# --- growth, then training -------------------------------------------------------------------
GROWTH_ORDERS = ("ddp", "ddp_random_ramp", "ddp_learn", "fsdp_grow_shard", "fsdp_shard_grow")


def _learn_loss(rank: int | None, world: int) -> Callable[[nn.Module], torch.Tensor]:
    ids = _concatenated(world, 99) if rank is None else _batch(rank, 99)
    return lambda m: m(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


def _growth_run(rank: int, world: int, order: str) -> dict[str, torch.Tensor]:
    small = tiny_llama()
    if order == "fsdp_shard_grow":
        _shard(small)
    if order == "ddp_learn":  # grown from the DDP-wrapped model: the mix is fitted on both ranks' batches
        source = nn.parallel.DistributedDataParallel(small)
        big = st.grow(source, 2, operator="learn", loss_fn=_learn_loss(rank, world), learn_steps=4, learn_lr=0.05)
    else:
        big = st.grow(small, 2, operator="random" if order == "ddp_random_ramp" else "direct", ramp_steps=2)
    assert isinstance(big, type(small)) and len(big.model.layers) == 4  # type: ignore[union-attr]
    grown = _logits(big)
    wrapped: nn.Module = _shard(big) if order == "fsdp_grow_shard" else nn.parallel.DistributedDataParallel(big)
    ramp = st.get_ramp(big)
    params = list(wrapped.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    if ramp is not None:
        ramp.attach(opt)
    for step in range(STEPS):
        ids = _batch(rank, step)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {f"param/{k}": v for k, v in full_parameters(big).items()}
    return out | {"grown": grown, "after": _logits(big)}


def _growth_reference(world: int, order: str) -> dict[str, torch.Tensor]:
    small = tiny_llama()
    if order == "ddp_learn":
        big = st.grow(small, 2, operator="learn", loss_fn=_learn_loss(None, world), learn_steps=4, learn_lr=0.05)
    else:
        big = st.grow(small, 2, operator="random" if order == "ddp_random_ramp" else "direct", ramp_steps=2)
    grown = _logits(big)
    ramp = st.get_ramp(big)
    opt = torch.optim.SGD(big.parameters(), lr=LR)
    if ramp is not None:
        ramp.attach(opt)
    for step in range(STEPS):
        ids = _concatenated(world, step)
        big(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {f"param/{k}": v for k, v in full_parameters(big).items()}
    return out | {"grown": grown, "after": _logits(big)}


def _growth_worker(rank: int, world: int, out: str) -> None:
    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        order: (lambda order=order: _growth_run(rank, world, order)) for order in GROWTH_ORDERS
    }
    for kind in ("direct", "ddp_random_ramp", "ddp_learn"):
        runs[f"reference/{kind}"] = lambda kind=kind: _growth_reference(world, kind)
    tensors, errors = _each(rank, runs)
    save_rank(out, rank, tensors, {"errors": errors})


@pytest.fixture(scope="module")
def growth_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_growth_worker, tmp_path_factory.mktemp("growth"), timeout_s=600)


@pytest.mark.slow
@pytest.mark.parametrize("order", [o for o in GROWTH_ORDERS if o != "fsdp_shard_grow"])
def test_growth_then_training_ranks_agree_and_match_one_process(growth_ranks: list[dict[str, Any]], order: str) -> None:
    for r in growth_ranks:
        assert order not in r["errors"], r["errors"][order]
    a, b = _split(growth_ranks, order)
    kind = order if order in ("ddp_random_ramp", "ddp_learn") else "direct"
    ref = _split(growth_ranks, f"reference/{kind}")[0]
    assert any(".layers.3." in k for k in a)  # the grown model's parameters are compared
    assert max_difference(a, b) == 0.0
    assert torch.allclose(a["grown"], ref["grown"], atol=ATOL)
    assert max_difference({k: a[k] for k in ref}, ref) < ATOL


@pytest.mark.slow
def test_growing_a_sharded_model_is_refused_on_every_rank(growth_ranks: list[dict[str, Any]]) -> None:
    for r in growth_ranks:
        error = r["errors"].get("fsdp_shard_grow", "")
        assert error.startswith("ShardedModelError") and "grow, then shard" in error, error


# --- in-process: one rank, fast ----------------------------------------------------------------
def _no_collectives(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("broadcast", "all_gather", "all_reduce"):
        monkeypatch.setattr(dist, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def test_local_model_in_a_process_group_runs_no_collective(
    one_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patcher_helpers import causal_lm

    calls = _no_collectives(monkeypatch)
    model = tiny_llama()
    for ex in ("masked", "sparse"):
        mt.emoe.apply(model, executor=ex, **EMOE).remove()
    s = causal_lm("llama")
    p = mt.patcher.apply(s.model, **(PATCHER | {"max_steps": 2}))
    p.set_memory(s.memory)
    p.edit(*s.edits[0])
    st.grow(tiny_llama(), 2, operator="learn", loss_fn=_learn_loss(0, 1), learn_steps=1)
    assert calls == []


def test_emoe_on_a_block_sharded_model_broadcasts_the_split(
    one_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _shard(tiny_llama())
    calls: list[int] = []
    real = dist.broadcast

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "broadcast", counting)
    handle = mt.emoe.apply(model, **EMOE)
    assert calls == [64, 4 * 32] * 2  # labels [d_ff] and centroids [N, d_model] of both FFNs
    assert _logits(model).shape == (3, 8, 100)
    handle.remove()


@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_emoe_refuses_fsdp_units_inside_the_ffn_at_apply_time(one_rank_group: None, executor: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    fully_shard(model.model.layers[0].mlp.gate_proj)
    fully_shard(model)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    with pytest.raises(mt.UnsupportedModuleError, match=r"fully_shard the FFN or the block holding it as one unit"):
        mt.emoe.apply(model, executor=executor, **EMOE)
    assert hooks == [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_emoe_then_fsdp_units_inside_the_ffn_fails_typed_at_the_first_forward(one_rank_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    mt.emoe.apply(model, **EMOE)
    fully_shard(model.model.layers[0].mlp.gate_proj)
    fully_shard(model)
    with pytest.raises(mt.HookError, match=r"FSDP2 shards during its forward"):
        _logits(model)


def test_grow_refuses_a_sharded_source_and_peels_ddp(one_rank_group: None) -> None:
    with pytest.raises(ShardedModelError, match=r"grow the unsharded model first"):
        st.grow(_shard(tiny_llama()), 2)
    small = tiny_llama()
    big = st.grow(nn.parallel.DistributedDataParallel(small), 2)
    assert type(big) is type(small) and len(big.model.layers) == 4
    assert torch.equal(_logits(big), _logits(st.grow(small, 2)))  # G_stack of the module inside the wrapper
