"""The dispatcher's per-call path: site callbacks called on the tensor directly, the callback tuple
built at install time, the cheap suspension check. Each is compared with the path it replaces (the
handle's own closure installed as a plain registry hook, which is what ``HookRegistry.at`` installed
before) and the semantics it touches are pinned: ordering, replacement, removal and addition during
a call, scope exit, exceptions, re-entrancy, threads, suspension.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchmark_smoke import run_quick
from modulart.core import dispatch
from modulart.core.dispatch import _DISPATCHERS, move_module_dispatchers, suspended
from modulart.core.errors import HookError
from modulart.core.hooks import HookRegistry, HookSite, Priority
from test_hooks import Pair, Scaled, assert_same_hooks, hook_state, seeded_


def make_model() -> nn.Sequential:
    return seeded_(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))


def x_in() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def dispatcher(obj: Any, kind: str) -> dispatch._Dispatcher:
    return _DISPATCHERS[(id(obj), kind)]  # type: ignore[index]


def assert_run_matches_entries(obj: Any, kind: str) -> None:
    d = dispatcher(obj, kind)
    assert d._run == tuple(d.entries)


# --- the site path against the closure path -----------------------------------------------------

SITE_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "observe": lambda t: None,
    "replace": lambda t: t * 3 - 1,
}


class TwoArgs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return (a - 2 * b) * scale


@pytest.mark.parametrize("what", sorted(SITE_FNS))
@pytest.mark.parametrize("index", [0, 1])
def test_forward_site_on_tuple_output_equals_the_closure(what: str, index: int) -> None:
    fn = SITE_FNS[what]
    x = x_in()
    a, b = Pair(), Pair()
    with HookRegistry(a) as fast, HookRegistry(b) as ref:
        h = fast.at(HookSite(a, "", "forward", index), fn)
        ref.forward(b, h.fn)  # the closure as a plain hook: the path `at` took before
        got, want = a(x), b(x)
    assert isinstance(got, tuple) and len(got) == len(want) == 2
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("what", sorted(SITE_FNS))
def test_forward_site_on_tensor_output_equals_the_closure(what: str) -> None:
    fn = SITE_FNS[what]
    m, r = make_model(), make_model()
    x = x_in()
    with HookRegistry(m) as fast, HookRegistry(r) as ref:
        h = fast.at(HookSite(m[0], "0", "forward"), fn)
        ref.forward(r[0], h.fn)
        assert torch.equal(m(x), r(x))
        assert h.fired == 1


@pytest.mark.parametrize("what", sorted(SITE_FNS))
@pytest.mark.parametrize("call", ["positional", "keyword", "second", "second_keyword"])
def test_forward_pre_site_equals_the_closure(what: str, call: str) -> None:
    fn = SITE_FNS[what]
    a, b = TwoArgs(), TwoArgs()
    x, y = x_in(), x_in() + 5
    index = 1 if call.startswith("second") else 0

    def run(m: nn.Module) -> torch.Tensor:
        if call == "positional":
            return m(x, y, scale=2.0)
        if call == "keyword":
            return m(a=x, b=y, scale=2.0)
        if call == "second":
            return m(x, y)
        return m(x, b=y)

    with HookRegistry(a) as fast, HookRegistry(b) as ref:
        h = fast.at(HookSite(a, "", "forward_pre", index), fn)
        ref.forward_pre(b, h.fn, with_kwargs=True)
        assert torch.equal(run(a), run(b))
        assert h.fired == 1


def test_forward_pre_site_without_the_argument_raises_like_the_closure() -> None:
    a, b = TwoArgs(), TwoArgs()
    x = x_in()
    with HookRegistry(a) as fast, HookRegistry(b) as ref:
        h = fast.at(HookSite(a, "", "forward_pre", 5), lambda t: t)
        ref.forward_pre(b, h.fn, with_kwargs=True)
        with pytest.raises(HookError) as got:
            a(x, x)
        with pytest.raises(HookError) as want:
            b(x, x)
    assert str(got.value) == str(want.value)
    assert a._forward_pre_hooks == {} and b._forward_pre_hooks == {}


def test_forward_pre_site_replacement_keeps_the_other_kwargs() -> None:
    m = Scaled()
    seen: list[dict[str, Any]] = []
    with HookRegistry(m) as reg:
        reg.at(HookSite(m, "", "forward_pre"), lambda t: t + 1)
        reg.forward_pre(m, lambda mod, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True, priority=99)
        out = m(x=torch.zeros(2), scale=3.0)
    assert torch.equal(out, torch.full((2,), 3.0))
    assert seen[0].keys() == {"x", "scale"} and torch.equal(seen[0]["x"], torch.ones(2))


# --- ordering and threading of values -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_site_and_plain_hooks_interleave_by_priority_and_thread_values(kind: str) -> None:
    m = make_model()
    order: list[str] = []
    site = HookSite(m[2], "2", kind)  # type: ignore[arg-type]

    def tensor_of(args_or_out: Any) -> torch.Tensor:
        return args_or_out[0] if isinstance(args_or_out, tuple) else args_or_out

    def site_hook(tag: str, delta: float) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            order.append(f"{tag}:{float(t.sum()):.4f}")
            return t + delta

        return fn

    def plain(tag: str, delta: float) -> Callable[..., Any]:
        if kind == "forward":
            return lambda mod, args, out: (order.append(f"{tag}:{float(out.sum()):.4f}"), out + delta)[1]
        return lambda mod, args: (order.append(f"{tag}:{float(tensor_of(args).sum()):.4f}"), (args[0] + delta,))[1]

    x = x_in()
    with HookRegistry(m) as reg:
        other = reg.scope("other")
        reg.at(site, site_hook("record", 0.0), priority=Priority.RECORD)
        other.at(site, site_hook("intervene", 1.0), priority=Priority.INTERVENE)
        getattr(reg, kind)(m[2], plain("default", 10.0))
        other.at(site, site_hook("default-later", 100.0))
        with torch.no_grad():
            got = m(x)
    with torch.no_grad():
        inner = m[1](m[0](x))
        want = m[2](inner + 111.0) if kind == "forward_pre" else m[2](inner) + 111.0
        base = float(inner.sum()) if kind == "forward_pre" else float(m[2](inner).sum())
    assert [o.split(":")[0] for o in order] == ["intervene", "default", "default-later", "record"]
    assert torch.allclose(got, want)
    seen = [float(o.split(":")[1]) for o in order]
    n = inner.numel()
    assert seen == pytest.approx([base, base + n, base + 11 * n, base + 111 * n], rel=1e-4, abs=1e-3)


# --- changes during a call ------------------------------------------------------------------------


def test_hook_removed_during_a_call_still_runs_in_that_call_only() -> None:
    m = make_model()
    x = x_in()
    with HookRegistry(m) as reg:
        calls: list[str] = []
        later = reg.at(HookSite(m[0], "0", "forward"), lambda t: calls.append("later"), priority=Priority.RECORD)
        reg.at(HookSite(m[0], "0", "forward"), lambda t: (calls.append("first"), later.remove())[0])
        m(x)
        assert calls == ["first", "later"]  # the call runs the callbacks installed when it began
        assert_run_matches_entries(m[0], "forward")
        m(x)
        assert calls == ["first", "later", "first"]
        assert later.fired == 1 and not later.active


def test_hook_added_during_a_call_runs_from_the_next_call() -> None:
    m = make_model()
    x = x_in()
    with HookRegistry(m) as reg:
        added: list[Any] = []

        def add_once(t: torch.Tensor) -> None:
            if not added:
                added.append(reg.at(HookSite(m[0], "0", "forward"), lambda y: y * 0, priority=Priority.RECORD))

        reg.at(HookSite(m[0], "0", "forward"), add_once)
        first = m(x)
        assert added[0].fired == 0
        assert_run_matches_entries(m[0], "forward")
        second = m(x)
        assert added[0].fired == 1
    with torch.no_grad():
        assert torch.equal(first, m(x))
        assert torch.equal(second, m[2](m[1](torch.zeros(3, 4))))


def test_reentrant_forward_from_a_hook_runs_the_hooks_again() -> None:
    m = make_model()
    x = x_in()
    depth = [0]
    seen: list[int] = []
    with HookRegistry(m) as reg:

        def again(t: torch.Tensor) -> torch.Tensor | None:
            seen.append(depth[0])
            if depth[0] == 0:
                depth[0] += 1
                inner = m[0](t[:, :4])  # the same hooked module, called from its own hook
                depth[0] -= 1
                return inner
            return None

        h = reg.at(HookSite(m[0], "0", "forward"), again)
        out = m[0](x)
        assert h.fired == 2 and seen == [0, 1]
    with torch.no_grad():
        assert torch.equal(out, m[0](m[0](x)))


# --- exceptions, scope exit -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_exception_in_a_site_hook_leaves_the_registry_clean(kind: str) -> None:
    m = make_model()
    before = hook_state(m)
    x = x_in()
    ref = m(x)

    def boom(t: torch.Tensor) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), HookRegistry(m) as reg:
        rec = reg.at(HookSite(m[0], "0", kind), lambda t: None, priority=Priority.RECORD)  # type: ignore[arg-type]
        bad = reg.at(HookSite(m[0], "0", kind), boom)  # type: ignore[arg-type]
        try:
            m(x)
        finally:
            assert bad.fired == 1 and rec.fired == 0  # the later callback did not run
            assert not dispatch._is_suspended() and dispatch._SUSPENDERS == 0
            bad.remove()
            assert torch.equal(m(x), ref) and rec.fired == 1  # the registry still works
        m(x)
    assert_same_hooks(hook_state(m), before)
    assert not any(d.target_ref() is mod for d in _DISPATCHERS.values() for mod in m.modules())


def test_scope_exit_removes_site_hooks_and_keeps_the_others_tuple() -> None:
    m = make_model()
    x = x_in()
    with HookRegistry(m) as outer:
        keep = outer.at(HookSite(m[0], "0", "forward"), lambda t: t + 1)
        with outer.scope("inner") as inner:
            inner.at(HookSite(m[0], "0", "forward"), lambda t: t * 0, priority=Priority.RECORD)
            assert len(dispatcher(m[0], "forward")._run) == 2
        assert dispatcher(m[0], "forward")._run == (keep,)
        got = m(x)
        with suspended():  # the reference: the module's own forwards
            assert torch.equal(got, m[2](m[1](m[0](x) + 1)))
    assert m[0]._forward_hooks == {}


def test_moved_dispatchers_keep_the_callback_tuple_in_step() -> None:
    old, new = nn.Linear(4, 4), nn.Linear(4, 4)
    x = x_in()
    with HookRegistry(old) as reg:
        h1 = reg.at(HookSite(old, "", "forward"), lambda t: t * 2)
        h2 = reg.forward(old, lambda m, a, out: out + 1, priority=Priority.RECORD)
        assert move_module_dispatchers(old, new) == 2
        assert old._forward_hooks == {}
        assert dispatcher(new, "forward")._run == (h1, h2)
        with torch.no_grad():
            assert torch.equal(new(x), nn.functional.linear(x, new.weight, new.bias) * 2 + 1)
    assert new._forward_hooks == {}


# --- enabled, threads, suspension -----------------------------------------------------------------------


def test_disabled_and_thread_bound_site_hooks_are_skipped_and_not_counted() -> None:
    m = make_model()
    x = x_in()
    with HookRegistry(m, bind_thread=True) as bound, HookRegistry(m) as free:
        hb = bound.at(HookSite(m[0], "0", "forward"), lambda t: t * 0)
        hf = free.at(HookSite(m[0], "0", "forward_pre"), lambda t: None)
        outs: list[torch.Tensor] = []
        th = threading.Thread(target=lambda: outs.append(m(x)))
        th.start()
        th.join()
        assert hb.fired == 0 and hf.fired == 1  # another thread's forward: the bound hook is skipped
        with suspended():
            assert torch.equal(outs[0], m[2](m[1](m[0](x))))
        with free.disabled():
            m(x)
        assert hf.fired == 1 and hb.fired == 1


def test_suspended_skips_callbacks_in_its_thread_only_and_resets() -> None:
    m = make_model()
    x = x_in()
    with HookRegistry(m) as reg:
        h = reg.at(HookSite(m[0], "0", "forward"), lambda t: t * 0)
        g = reg.at(HookSite(m[0], "0", "forward_pre"), lambda t: None)
        results: dict[str, int] = {}
        go, done = threading.Event(), threading.Event()

        def other() -> None:
            go.wait()
            m(x)
            results["fired_in_other"] = h.fired
            done.set()

        th = threading.Thread(target=other)
        th.start()
        with suspended():
            with suspended():
                m(x)
            m(x)
            assert h.fired == 0 and g.fired == 0
            assert dispatch._SUSPENDERS == 1
            go.set()
            done.wait()
        th.join()
        assert results["fired_in_other"] == 1  # the other thread was not suspended
        assert dispatch._SUSPENDERS == 0 and not dispatch._is_suspended()
        with pytest.raises(RuntimeError), suspended():
            raise RuntimeError("inside")
        assert dispatch._SUSPENDERS == 0
        m(x)
        assert h.fired == 2


def test_a_leaked_suspension_count_only_costs_the_per_thread_check(monkeypatch: pytest.MonkeyPatch) -> None:
    m = make_model()
    monkeypatch.setattr(dispatch, "_SUSPENDERS", 3)  # as after an interrupt between count and block
    with HookRegistry(m) as reg:
        h = reg.at(HookSite(m[0], "0", "forward"), lambda t: None)
        m(x_in())
        assert h.fired == 1
        with suspended():
            m(x_in())
        assert h.fired == 1
    assert dispatch._SUSPENDERS == 3


def test_grad_hooks_honour_suspension_with_the_cheap_check() -> None:
    w = torch.ones(3, requires_grad=True)
    with HookRegistry() as reg:
        h = reg.tensor(w, lambda g: g * 2)
        (w * 1).sum().backward()
        assert h.fired == 1 and torch.equal(w.grad, torch.full((3,), 2.0))  # type: ignore[arg-type]
        w.grad = None
        with suspended():
            (w * 1).sum().backward()
        assert h.fired == 1 and torch.equal(w.grad, torch.ones(3))  # type: ignore[arg-type]


# --- the benchmark ------------------------------------------------------------------------------


@pytest.mark.slow
def test_hook_overhead_benchmark_quick_writes_its_keys(tmp_path: Path) -> None:
    data = run_quick("hook_overhead", tmp_path)
    for key in ("median_seconds", "per_site_us", "empty_scope_us_per_forward"):
        assert key in data
    assert {"tiny_registry_vs_torch_per_site", "registry_capture_vs_torch_capture"} <= set(data["targets"])
    assert [c["x"] for c in data["curves"]] == [[1.0, 2.0, 4.0, 8.0, 12.0]] * 2
    assert data["ratios"]["sweep_registry_vs_torch_per_site"] > 0  # the slope over the whole sweep
    assert all("exponent" in c for c in data["curves"])
