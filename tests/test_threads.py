"""Concurrent forwards on one model: per-thread in-flight state, never silently wrong outputs.

Each test forces the interleaving that broke before: a foreign hook *inside* the FFN (after the
operator's input hook, before its output hook) waits on a barrier, so every thread has stored its
FFN input before any thread reads it back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import modulart as mt
from modulart.core.errors import ConcurrentUseError
from modulart.core.hooks import HookRegistry

THREADS = 3
ROUNDS = 4


class Clf(nn.Module):
    """Embeddings -> one ``nn.Sequential`` FFN (residual) -> logits at position 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head((h + self.ffn(h))[:, 0])


def inputs(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 50, (2, 5), generator=g) for _ in range(n)]


def run_threads(job: Callable[[int], Any], n: int = THREADS) -> list[Any]:
    """Run ``job(i)`` in ``n`` threads; re-raise the first exception."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = job(i)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def barrier_inside(module: nn.Module, n: int = THREADS, *, pre: bool = False) -> Callable[[], None]:
    """A foreign forward (or forward-pre) hook on ``module`` that waits until ``n`` threads reached it.

    Returns its remover. ``module`` must run exactly once per forward.
    """
    barrier = threading.Barrier(n, timeout=20)

    def wait(m: nn.Module, *rest: Any) -> None:
        barrier.wait()

    return (module.register_forward_pre_hook(wait) if pre else module.register_forward_hook(wait)).remove


def concurrent_outputs(model: nn.Module, xs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Thread i runs ``model(xs[i])`` ROUNDS times, all threads in lock-step inside the FFN."""

    def job(i: int) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(xs[i]) for _ in range(ROUNDS)]

    return run_threads(job)


def patched_model() -> tuple[Clf, Any]:
    model = Clf().eval()
    patcher = mt.patcher.apply(model, task="classification")
    g = torch.Generator().manual_seed(3)
    patcher.bank.add(
        ["p1", "p2"],
        keys=torch.randn(2, 16, generator=g),
        key_bias=torch.zeros(2),
        values=torch.randn(2, 16, generator=g) * 3,
    )
    return model, patcher


def test_patcher_concurrent_forwards_match_sequential() -> None:
    model, patcher = patched_model()
    xs = inputs(THREADS)
    with torch.no_grad():
        want = [model(x) for x in xs]
        with patcher.disabled():
            assert not all(torch.allclose(w, model(x)) for w, x in zip(want, xs, strict=True))  # patches act
    remove = barrier_inside(model.ffn[1])
    try:
        got = concurrent_outputs(model, xs)
    finally:
        remove()
    for i in range(THREADS):
        for y in got[i]:
            torch.testing.assert_close(y, want[i], rtol=0, atol=0)
    patcher.remove()


def test_patcher_pending_neurons_stay_in_the_training_thread() -> None:
    """While one thread trains an edit (``bank.pending``), other threads' forwards see only committed patches."""
    from modulart.patcher.bank import Pending

    model, patcher = patched_model()
    x = inputs(1)[0]
    with torch.no_grad():
        committed = model(x)
        g = torch.Generator().manual_seed(5)
        patcher.bank.pending = Pending(
            torch.randn(1, 16, generator=g), torch.ones(1), torch.randn(1, 16, generator=g) * 5, torch.ones(2, 1)
        )
        try:
            training_view = model(x)
            (other,) = run_threads(lambda i: model(x), n=1)
        finally:
            patcher.bank.pending = None
    assert not torch.allclose(training_view, committed)
    torch.testing.assert_close(other, committed, rtol=0, atol=0)
    patcher.remove()


def test_capture_in_concurrent_threads_records_its_own_forward() -> None:
    model = Clf().eval()
    ffn = mt.find_ffns(model)[0]
    xs = inputs(THREADS)
    with torch.no_grad():
        want = [model.emb(x) for x in xs]  # the FFN input
    start = threading.Barrier(THREADS, timeout=20)  # every capture's hooks are installed before any forward
    remove = barrier_inside(model.ffn[1])

    def job(i: int) -> list[torch.Tensor]:
        out = []
        for _ in range(ROUNDS):

            def run() -> None:
                start.wait()
                with torch.no_grad():
                    model(xs[i])

            out.append(mt.capture(model, {"q": ffn.input_site}, run)["q"])
        return out

    try:
        got = run_threads(job)
    finally:
        remove()
    for i in range(THREADS):
        for q in got[i]:
            torch.testing.assert_close(q, want[i], rtol=0, atol=0)
    assert not model.ffn._forward_pre_hooks and not model.ffn[0]._forward_pre_hooks  # every capture cleaned up


@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_emoe_concurrent_forwards_match_sequential(executor: str) -> None:
    model = Clf().eval()
    xs = inputs(THREADS)
    with torch.no_grad():
        dense = [model(x) for x in xs]
    handle = mt.emoe.apply(model, num_experts=4, top_k=1, layers="all", executor=executor)
    with torch.no_grad():
        want = [model(x) for x in xs]
    assert not any(torch.allclose(w, d) for w, d in zip(want, dense, strict=True))  # routing acts
    # masked: between the input record and the hidden mask; sparse: between its input and output hooks
    remove = barrier_inside(model.ffn[1]) if executor == "masked" else barrier_inside(model.ffn[2], pre=True)
    try:
        got = concurrent_outputs(model, xs)
    finally:
        remove()
    for i in range(THREADS):
        for y in got[i]:
            torch.testing.assert_close(y, want[i], rtol=0, atol=0)
    handle.remove()


def test_bound_registry_ignores_other_threads() -> None:
    lin = nn.Linear(2, 2)
    seen: list[int] = []
    with HookRegistry(lin, name="bound", bind_thread=True) as reg:
        h = reg.forward(lin, lambda m, a, out: seen.append(threading.get_ident()))
        run_threads(lambda i: lin(torch.ones(1, 2)), n=2)
        assert h.fired == 0 and seen == []
        lin(torch.ones(1, 2))
        assert h.fired == 1 and seen == [threading.get_ident()]
        child = reg.scope("child")  # child scopes inherit the binding
        c = child.forward(lin, lambda m, a, out: None)
        run_threads(lambda i: lin(torch.ones(1, 2)), n=1)
        assert c.fired == 0
    with HookRegistry(lin, name="free") as free:
        f = free.forward(lin, lambda m, a, out: None)
        run_threads(lambda i: lin(torch.ones(1, 2)), n=2)
        assert f.fired == 2


def test_patch_added_while_a_forward_is_in_flight() -> None:
    """Another thread's ``add`` landing between the forward's reads of keys and values (forced here,
    deterministically, from inside the activation) must not mix old and new neuron shapes."""
    model, patcher = patched_model()
    x = inputs(1)[0]
    with torch.no_grad():
        before = model(x)
    bank, act = patcher.bank, patcher.bank.activation
    g = torch.Generator().manual_seed(11)
    fired: list[bool] = []

    def activation_with_concurrent_edit(a: torch.Tensor) -> torch.Tensor:
        if not fired:
            fired.append(True)
            bank.add(["late"], keys=torch.randn(1, 16, generator=g), key_bias=torch.ones(1), values=torch.ones(1, 16))
        return act(a)

    bank.activation = activation_with_concurrent_edit
    with torch.no_grad():
        during = model(x)  # read the neurons published when it started
        after = model(x)  # sees the new patch
    bank.activation = act
    assert fired
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert not torch.allclose(after, before)
    patcher.remove()


def test_kv_lora_concurrent_forwards_match_sequential() -> None:
    model = Clf().eval()
    handle = mt.kv.apply(model, target="both", layers="all", mode="lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # the LoRA factors (B starts at zero): make the deltas act
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    xs = inputs(THREADS)
    with torch.no_grad():
        want = [model(x) for x in xs]
        with handle.disabled():
            assert not any(torch.allclose(w, model(x)) for w, x in zip(want, xs, strict=True))
    remove = barrier_inside(model.ffn[1])
    try:
        got = concurrent_outputs(model, xs)
    finally:
        remove()
    for i in range(THREADS):
        for y in got[i]:
            torch.testing.assert_close(y, want[i], rtol=0, atol=0)
    handle.remove()


def test_migu_training_forwards_from_two_threads_in_one_step_raise() -> None:
    """MIGU's per-step statistics belong to one training loop: a second thread is refused, typed."""
    model = Clf()
    handle = mt.migu.apply(model)
    x = inputs(1)[0]
    model(x).sum()  # the main thread's forward of this step
    with pytest.raises(ConcurrentUseError, match="two threads"):
        run_threads(lambda i: model(x), n=1)

    def evaluate(i: int) -> torch.Tensor:
        with torch.no_grad():  # not recorded: any thread may run it (grad mode is per thread)
            return model(x)

    run_threads(evaluate, n=2)
    handle.remove()
