"""A hypothesis state machine over a tiny Llama: operators applied, trained, saved, loaded,
disabled and removed in any order, with exceptions and ``KeyboardInterrupt`` injected inside
hooks (during a forward), ``apply``, ``save`` and ``remove``.

Invariants, after every step:

- the modulart hooks on the model are exactly those of the live handles' registries, and once
  every handle is removed the model's hook dicts equal the original ones (no leftover dispatcher);
- with no live handle, the state dict equals the reference bitwise, the flags equal the original
  ones and the outputs equal a shadow model holding the reference weights. The reference is the
  original state dict, updated only by train steps, and read from the base parameter objects
  (by identity) right after each train step: a change of a base weight by anything else
  (a forward, save, load, disable, an interrupted apply or remove, a removal) is caught;
- removing one operator leaves the others acting as before: the outputs equal a shadow model
  (reference weights) onto which the remaining handles' saved artefacts are loaded in order;
- a saved artefact reloads (onto such a shadow) to the live model's outputs.

Combinations the contract refuses end in a typed :class:`modulart.ModulartError` with the model
unchanged; the machine checks exactly that.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import modulart as mt
from families import build
from modulart.core import dispatch, io
from modulart.core.dispatch import _DISPATCHERS
from test_interrupts import Interrupt, snapshot

CONFIGS: dict[str, Any] = {
    "emoe-sparse": lambda: mt.emoe.EMoEConfig(num_experts=4, top_k=1, layers="all"),
    "emoe-dense": lambda: mt.emoe.EMoEConfig(num_experts=4, top_k=4, layers="all"),
    "kv-lora": lambda: mt.kv.KVConfig(target="both", mode="lora", rank=2, layers="all"),
    "kv-mask": lambda: mt.kv.KVConfig(target="both", mode="mask", layers="all"),
    "kv-full": lambda: mt.kv.KVConfig(target="both", mode="full", layers="all"),
    "migu": lambda: mt.migu.MIGUConfig(),
    "patcher": lambda: mt.patcher.PatcherConfig(task="generation", memory_weight=0.0, max_steps=2),
}
FAULTS = st.sampled_from([None, KeyboardInterrupt, RuntimeError])


class _Fault:
    """Raise ``exc`` on the ``at``-th call of ``owner.attr`` inside the block (never when ``exc`` is None)."""

    def __init__(self, owner: Any, attr: str, at: int, exc: type[BaseException] | None) -> None:
        self.owner, self.attr, self.at, self.exc = owner, attr, at, exc
        self.calls = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.exc is None:
            yield
            return
        real = getattr(self.owner, self.attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            n = self.calls
            self.calls += 1
            if n == self.at:
                raise self.exc("injected")  # type: ignore[misc]
            return real(*args, **kwargs)

        mp = pytest.MonkeyPatch()
        mp.setattr(self.owner, self.attr, wrapped)
        try:
            yield
        finally:
            mp.undo()


class OperatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fam = build("llama")
        self.model = self.fam.model
        self.ids = self.fam.inputs["input_ids"]
        self.base = dict(self.model.named_parameters())  # base parameter objects, by name
        self.reference = {n: p.detach().clone() for n, p in self.base.items()}
        self.buffers = {n: v.clone() for n, v in self.original_state().items() if n not in self.base}
        self.original = snapshot(self.model)
        self.live: list[tuple[str, mt.Handle[Any]]] = []
        self.tmp = tempfile.TemporaryDirectory()
        self.saves = 0
        self.migu_opts: dict[int, torch.optim.Optimizer] = {}

    def teardown(self) -> None:
        for _, h in reversed(self.live):
            h.remove()
        self.tmp.cleanup()

    # --- helpers ------------------------------------------------------------------------------
    def original_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def out(self, model: nn.Module | None = None) -> torch.Tensor:
        with torch.no_grad():
            return (model or self.model)(input_ids=self.ids).logits.detach().clone()

    def shadow(self, handles: list[mt.Handle[Any]]) -> torch.Tensor:
        """Outputs of a fresh model with the reference weights and ``handles`` reloaded from artefacts."""
        model = build("llama").model
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.reference[n])
        for h in handles:
            self.saves += 1
            path = Path(self.tmp.name) / f"shadow{self.saves}"
            h.save(path)
            loaded = mt.load(model, path, check_fingerprint=False)
            if not h.enabled:
                loaded.disable()
        return self.out(model)

    def unchanged_by(self, before: dict[str, Any], what: str) -> None:
        now = snapshot(self.model)
        assert now["params"] == before["params"], f"{what}: flags changed"
        assert now["hooks"] == before["hooks"], f"{what}: hook dicts changed"
        assert list(now["state"]) == list(before["state"]), f"{what}: state-dict keys changed"
        for k, v in before["state"].items():
            assert torch.equal(now["state"][k], v), f"{what}: {k} changed"

    # --- rules --------------------------------------------------------------------------------
    @rule(
        kind=st.sampled_from(sorted(CONFIGS)),
        fault=FAULTS,
        at=st.integers(0, 30),
        site=st.sampled_from([(dispatch.HookHandle, "__init__"), (dispatch._Dispatcher, "add")]),
    )
    def apply(self, kind: str, fault: type[BaseException] | None, at: int, site: tuple[Any, str]) -> None:
        before = snapshot(self.model)
        out = self.out()
        try:
            with _Fault(site[0], site[1], at, fault).active():
                h = mt.apply(self.model, CONFIGS[kind]())
        except (KeyboardInterrupt, RuntimeError, mt.ModulartError) as e:
            if isinstance(e, RuntimeError) and str(e) != "injected":
                raise
            event(f"apply refused or interrupted: {type(e).__name__}")
            self.unchanged_by(before, f"failed apply of {kind} ({type(e).__name__}: {e})")
            assert torch.equal(self.out(), out), f"failed apply of {kind} changed the outputs"
            return
        event(f"applied {kind}")
        self.live.append((kind, h))

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 10), fault=FAULTS, at=st.integers(0, 200))
    def remove(self, i: int, fault: type[BaseException] | None, at: int) -> None:
        kind, h = self.live[i % len(self.live)]
        if fault is not None:
            counter = Interrupt(pytest.MonkeyPatch(), at, at % 2 == 1, fault)
            try:
                h.remove()
            except (KeyboardInterrupt, RuntimeError):
                event("remove interrupted")
                assert not h.removed, f"interrupted remove of {kind} says removed"
            finally:
                counter.undo()
        h.remove()  # the retry completes
        assert h.removed
        self.live.remove((kind, h))
        others = [x for _, x in self.live]
        assert torch.equal(self.out(), self.shadow(others)), f"removing {kind} changed the other operators"

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 10))
    def toggle(self, i: int) -> None:
        _, h = self.live[i % len(self.live)]
        try:
            if h.enabled:
                h.disable()
            else:
                h.enable()
        except mt.UnsupportedOperationError:
            pass

    @rule(fault=FAULTS, at=st.integers(0, 12))
    def forward(self, fault: type[BaseException] | None, at: int) -> None:
        out = self.out()
        try:
            with _Fault(dispatch, "_runs_here", at, fault).active():
                self.out()
        except (KeyboardInterrupt, RuntimeError) as e:
            if isinstance(e, RuntimeError) and str(e) != "injected":
                raise
        assert torch.equal(self.out(), out), "an interrupted forward changed later outputs"

    @rule()
    def train(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:  # e.g. only a disabled LoRA: everything else is frozen
            return
        base = {id(p) for p in self.base.values()}
        migu = next((h for k, h in self.live if k == "migu" and h.enabled), None)
        opts = []
        if migu is not None:  # MIGU masks the steps of the one optimizer it is attached to: the base weights
            if id(migu) not in self.migu_opts:
                self.migu_opts[id(migu)] = torch.optim.SGD(list(self.base.values()), lr=1e-2)
                migu.attach(self.migu_opts[id(migu)])
            opts.append(self.migu_opts[id(migu)])
            params = [p for p in params if id(p) not in base]
        if params:
            opts.append(torch.optim.SGD(params, lr=1e-2))
        self.model.train()
        try:
            loss = self.model(input_ids=self.ids).logits.float().pow(2).mean()
            if loss.requires_grad:
                loss.backward()
                for opt in opts:
                    opt.step()
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.eval()
        self.reference = {n: p.detach().clone() for n, p in self.base.items()}

    @precondition(lambda self: any(k == "patcher" and h.enabled for k, h in self.live))
    @rule()
    def patch(self) -> None:
        h = next(h for k, h in self.live if k == "patcher" and h.enabled)
        ids = self.ids[:1]
        target = (self.out()[:1].argmax(-1) + 1) % 128
        with contextlib.suppress(mt.ModulartError):
            h.edit(ids, target)  # type: ignore[attr-defined]

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 10), fault=FAULTS, at=st.integers(0, 3))
    def save(self, i: int, fault: type[BaseException] | None, at: int) -> None:
        _, h = self.live[i % len(self.live)]
        before = snapshot(self.model)
        self.saves += 1
        path = Path(self.tmp.name) / f"save{self.saves}"
        try:
            with _Fault(io, "save_file", at, fault).active():
                h.save(path)
        except (KeyboardInterrupt, RuntimeError) as e:
            if isinstance(e, RuntimeError) and str(e) != "injected":
                raise
            self.unchanged_by(before, "interrupted save")
            # the save is atomic: an interrupted one publishes nothing at the (new) target
            assert not path.exists() or not any(path.iterdir()), f"interrupted save left files in {path}"
        self.unchanged_by(before, "save")
        handles = [x for _, x in self.live]
        assert torch.equal(self.out(), self.shadow(handles)), "saved artefacts reload to other outputs"

    # --- invariants ---------------------------------------------------------------------------
    @invariant()
    def hooks_are_the_live_handles(self) -> None:
        targets = {id(t) for t in [*self.model.modules(), *self.model.parameters()]}
        on_model = {
            id(e)
            for t in [*self.model.modules(), *self.model.parameters()]
            for kind in dispatch.HOOK_KINDS
            if (d := _DISPATCHERS.get((id(t), kind))) is not None and d.target_ref() is t
            for e in d.entries
        }
        # a live handle's hook is installed on the model, or on an optimizer it was attached to
        expected = {
            id(e)
            for _, h in self.live
            for e in h.registry.handles()
            if e._dispatcher is None or id(e._dispatcher.target_ref()) in targets
        }
        assert on_model == expected, "the dispatchers hold other hooks than the live handles'"

    @invariant()
    def nothing_live_means_reference(self) -> None:
        if self.live:
            return
        now = snapshot(self.model)
        assert now["hooks"] == self.original["hooks"], "hook dicts not restored"
        assert now["param_hooks"] == self.original["param_hooks"], "parameter hooks not restored"
        assert now["params"] == self.original["params"], "requires_grad flags not restored"
        assert now["classes"] == self.original["classes"], "module classes not restored"
        assert list(now["state"]) == list(self.original["state"]), "state-dict keys not restored"
        for n, v in self.reference.items():
            assert torch.equal(now["state"][n], v), f"{n} differs from the reference"
        for n, v in self.buffers.items():
            assert torch.equal(now["state"][n], v), f"buffer {n} changed"


OperatorMachine.TestCase.settings = settings(
    max_examples=10,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestOperatorMachine = OperatorMachine.TestCase


@pytest.mark.slow
def test_operator_machine_large() -> None:
    """30 programs of 30 steps in CI (about a minute); ``MODULART_STATE_MACHINE_EXAMPLES=300`` searches deeper."""
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        OperatorMachine,
        settings=settings(
            max_examples=int(os.environ.get("MODULART_STATE_MACHINE_EXAMPLES", "30")),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
