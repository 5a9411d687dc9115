"""``remove()`` interrupted at any step can be retried and then restores the model bitwise.

Every primitive step of a removal (a hook removal, a ``requires_grad`` restore, a claim release, a
registered-module deletion, an un-parametrisation, a masker removal, a module put back) is wrapped
by a counter that raises on its k-th call, before or after the step's effect. For every operator
configuration and every k the interrupted ``remove()`` must leave ``removed`` false, and a retry
(without interrupts) must restore the state dict, flags, hook dicts and outputs bitwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import modulart as mt
from families import Family, build, tiny_llama
from model_state import assert_restored, snapshot
from modulart.core import dispatch, flags, grad_mask, sharing
from modulart.core.sharing import live_hooks
from modulart.kv import handle as kv_handle

# (owner, attribute): the primitive steps a removal is made of
STEP_SITES: list[tuple[Any, str]] = [
    (dispatch.HookHandle, "remove"),
    (flags, "_restore_flag"),
    (sharing, "_drop_claim"),
    (kv_handle, "unparametrize_param"),
    (kv_handle, "_drop_holder"),
    (grad_mask.GradientMasker, "remove"),
    (nn.Module, "set_submodule"),
]


class Interrupt:
    """Counts calls of every step site; raises ``exc`` on call number ``at`` (before or after it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None, after: bool, exc: type[BaseException]):
        self.calls = 0
        self.at, self.after, self.exc = at, after, exc
        self.monkeypatch = monkeypatch
        for owner, attr in STEP_SITES:
            monkeypatch.setattr(owner, attr, self._wrap(getattr(owner, attr)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def step(*args: Any, **kwargs: Any) -> Any:
            n = self.calls
            self.calls += 1
            if n == self.at and not self.after:
                raise self.exc("injected")
            out = fn(*args, **kwargs)
            if n == self.at and self.after:
                raise self.exc("injected")
            return out

        return step

    def undo(self) -> None:
        self.monkeypatch.undo()


def assert_removed(model: nn.Module, before: dict[str, Any]) -> None:
    """:func:`assert_restored`, and no modulart hook or claim left anywhere on ``model``."""
    assert_restored(model, before)
    assert not live_hooks([model], subtree=True), "modulart hooks left on the model"
    assert not any(m in sharing._CLAIMS for m in model.modules()), "claims left on the model"


def _edit(h: mt.Handle[Any], fam: Family) -> None:
    ids = fam.inputs["input_ids"][:1]
    with torch.no_grad():
        target = fam.model(input_ids=ids).logits.argmax(-1)
    h.edit(ids, (target + 1) % 100)  # type: ignore[attr-defined]


def _migu(h: mt.Handle[Any], fam: Family) -> None:
    h.attach(torch.optim.SGD(fam.model.parameters(), lr=0.0))
    fam.model(**fam.inputs).logits.float().pow(2).mean().backward()
    fam.model.zero_grad(set_to_none=True)


def _bake(h: mt.Handle[Any], fam: Family) -> None:
    _edit(h, fam)
    h.bake()  # type: ignore[attr-defined]


CASES: dict[str, tuple[Callable[[], mt.OperatorConfig], Callable[[mt.Handle[Any], Family], None] | None]] = {
    "emoe-sparse": (lambda: mt.emoe.EMoEConfig(num_experts=4, top_k=1, layers="all"), None),
    "emoe-dense": (lambda: mt.emoe.EMoEConfig(num_experts=4, top_k=4, layers="all"), None),
    "kv-lora": (lambda: mt.kv.KVConfig(target="both", mode="lora", rank=2, layers="all"), None),
    "kv-mask": (lambda: mt.kv.KVConfig(target="both", mode="mask", layers="all"), None),
    "kv-full": (lambda: mt.kv.KVConfig(target="both", mode="full", layers="all"), None),
    "migu": (lambda: mt.migu.MIGUConfig(), _migu),
    "patcher": (lambda: mt.patcher.PatcherConfig(task="generation", memory_weight=0.0, max_steps=2), _edit),
    "patcher-baked": (lambda: mt.patcher.PatcherConfig(task="generation", memory_weight=0.0, max_steps=2), _bake),
}


def _setup(case: str) -> tuple[Family, dict[str, Any], torch.Tensor, mt.Handle[Any]]:
    fam = build("llama")
    before = snapshot(fam.model)
    out = fam.run().logits.clone()
    make, exercise = CASES[case]
    h = mt.apply(fam.model, make())
    if exercise is not None:
        exercise(h, fam)
    return fam, before, out, h


def _points(case: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    fam, before, _out, h = _setup(case)
    counter = Interrupt(monkeypatch, None, False, KeyboardInterrupt)
    h.remove()
    counter.undo()
    assert h.removed
    assert_removed(fam.model, before)
    assert counter.calls > 0, f"{case}: remove() went through none of the step sites"
    return iter(range(counter.calls))


@pytest.mark.parametrize("case", sorted(CASES))
def test_remove_interrupted_at_every_step_is_retried(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _points(case, monkeypatch):
        for after, exc in ((False, KeyboardInterrupt), (True, KeyboardInterrupt), (True, RuntimeError)):
            fam, before, out, h = _setup(case)
            counter = Interrupt(monkeypatch, k, after, exc)
            with pytest.raises(exc):
                h.remove()
            counter.undo()
            assert not h.removed, f"{case}: step {k} interrupted, yet the handle says removed"
            h.remove()
            assert h.removed
            where = f"{case}: interrupt at step {k} ({'after' if after else 'before'}, {exc.__name__})"
            try:
                assert_removed(fam.model, before)
            except AssertionError as e:
                raise AssertionError(f"{where}: {e}") from None
            assert torch.equal(fam.run().logits, out), f"{where}: outputs differ"


def test_release_requires_grad_interrupted_then_retried() -> None:
    """Regression: the owner's list was popped before any flag was restored, so a retry did nothing."""
    params = [nn.Parameter(torch.ones(1)) for _ in range(5)]
    owner = object()
    flags.set_requires_grad(owner, params, False)
    real = flags._restore_flag
    calls = 0

    def flaky(p: torch.Tensor, value: bool) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        real(p, value)

    flags._restore_flag = flaky  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            flags.release_requires_grad(owner)
    finally:
        flags._restore_flag = real  # type: ignore[assignment]
    flags.release_requires_grad(owner)
    assert all(p.requires_grad for p in params)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_apply_interrupted_between_creating_and_filling_a_dispatcher_leaves_no_hook(
    exc: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt inside ``_Dispatcher.add`` used to leave an empty dispatcher's torch hook behind."""
    model = tiny_llama()

    def boom(self: object, entry: object) -> None:
        raise exc("injected")

    monkeypatch.setattr(dispatch._Dispatcher, "add", boom)
    with pytest.raises(exc, match="injected"):
        mt.emoe.apply(model, num_experts=4, top_k=2)
    leftovers = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert leftovers == []
    assert not any(d.target_ref() is m for d in dispatch._DISPATCHERS.values() for m in model.modules())
