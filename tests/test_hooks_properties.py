"""Property test of :class:`modulart.core.hooks.HookRegistry`: whatever happens, removal leaves no trace.

A random program over a small model installs identity hooks through random registries and nested
scopes, removes handles and scopes, adds (and removes) foreign torch hooks behind the registry's back,
fails inside ``atomic()`` blocks and ``install()`` calls, and runs forward/backward passes, some of
which hit a hook that raises. After every step the registries' bookkeeping and the model's hook dicts
are checked against a model of what should be there; at the end every registry is removed and the hook
dicts must be exactly the baseline plus the foreign hooks still present, with outputs and gradients
equal to the original ones. Hypothesis profiles (``dev``/``ci``) come from ``tests/conftest.py``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import event, given, note
from hypothesis import strategies as st
from torch import nn

from modulart.core.errors import HookError
from modulart.core.hooks import HookHandle, HookRegistry, HookSite, HookSpec, Priority
from test_hooks import hook_state, seeded_

N_LAYERS = 4
ADD_KINDS = ("forward", "forward_pre", "tensor", "post_accumulate_grad", "at_forward", "at_forward_pre")
BAD_KINDS = ("unknown_path", "tensor_for_forward", "frozen_tensor", "not_callable", "non_optimizer", "dup_name")
# hook dict -> the registry kind that owns its extra (dispatcher) key; None: the registry never adds one
MAIN_DICTS: dict[str, str | None] = {
    "_forward_hooks": "forward",
    "_forward_pre_hooks": "forward_pre",
    "_backward_hooks": None,
    "_backward_pre_hooks": None,
}
# extra dict -> main dict whose extra keys it may repeat
SIDE_DICTS = {
    "_forward_hooks_with_kwargs": "_forward_hooks",
    "_forward_hooks_always_called": "_forward_hooks",
    "_forward_pre_hooks_with_kwargs": "_forward_pre_hooks",
}
PARAM_DICTS = {"_backward_hooks": "tensor", "_post_accumulate_grad_hooks": "post_accumulate_grad"}


class BombError(Exception):
    """Raised by a registry hook during forward; the test catches it."""


def make_model() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(N_LAYERS):
        layers.append(nn.Linear(4, 4))
        if i < N_LAYERS - 1:
            layers.append(nn.ReLU())
    return seeded_(nn.Sequential(*layers))


# --- the operation language ---------------------------------------------------------------------


class Op:
    """One step of a program (the subclasses below)."""


@dataclass(frozen=True)
class AddSpec:
    kind: str
    target: int  # index into the module or parameter paths (modulo their count)
    as_path: bool
    priority: int
    with_kwargs: bool
    same: bool  # identity by returning the same value (else by returning None)
    bomb: bool  # raises once, at its first firing
    named: bool


@dataclass(frozen=True)
class NewRegistry(Op):
    pass


@dataclass(frozen=True)
class NewScope(Op):
    parent: int


@dataclass(frozen=True)
class Add(Op):
    reg: int
    spec: AddSpec


@dataclass(frozen=True)
class RemoveHandle(Op):
    index: int


@dataclass(frozen=True)
class RemoveRegistry(Op):
    reg: int


@dataclass(frozen=True)
class AddForeign(Op):
    kind: str  # forward | forward_pre | grad | post_acc
    target: int
    with_kwargs: bool
    prepend: bool
    always_call: bool


@dataclass(frozen=True)
class RemoveForeign(Op):
    index: int


@dataclass(frozen=True)
class AtomicRaise(Op):
    reg: int
    specs: tuple[AddSpec, ...]
    raise_at: int  # raise before the spec at this position (== len: after all of them)
    raises: bool


@dataclass(frozen=True)
class Install(Op):
    reg: int
    specs: tuple[AddSpec, ...]
    bad: str | None
    bad_at: int


@dataclass(frozen=True)
class Forward(Op):
    disabled_reg: int | None  # run inside this registry's disabled() block


index = st.integers(0, 15)
targets = st.one_of(st.integers(0, 2), index)  # biased to a few objects, so callbacks share dispatchers
add_specs = st.builds(
    AddSpec,
    kind=st.sampled_from(ADD_KINDS),
    target=targets,
    as_path=st.booleans(),
    priority=st.sampled_from([Priority.INTERVENE, Priority.DEFAULT, Priority.RECORD, 7]),
    with_kwargs=st.booleans(),
    same=st.booleans(),
    bomb=st.integers(0, 5).map(lambda i: i == 0),
    named=st.booleans(),
)
foreign_ops = st.builds(
    AddForeign, st.sampled_from(["forward", "forward_pre", "grad", "post_acc"]), targets, *[st.booleans()] * 3
)
atomic_ops = st.builds(AtomicRaise, index, st.lists(add_specs, min_size=1, max_size=4).map(tuple), index, st.booleans())
install_ops = st.builds(
    Install, index, st.lists(add_specs, max_size=4).map(tuple), st.one_of(st.none(), st.sampled_from(BAD_KINDS)), index
)
# (weight, strategy); hypothesis' one_of favours early branches, so the draw goes through sampled_from
OP_WEIGHTS: list[tuple[int, st.SearchStrategy[Op]]] = [
    (6, st.builds(Add, index, add_specs)),
    (3, st.builds(Forward, st.one_of(st.none(), index))),
    (2, st.builds(RemoveHandle, index)),
    (1, st.builds(RemoveRegistry, index)),
    (1, st.builds(NewScope, index)),
    (1, st.just(NewRegistry())),
    (1, foreign_ops),
    (1, st.builds(RemoveForeign, index)),
    (1, atomic_ops),
    (1, install_ops),
]
ops: st.SearchStrategy[Op] = st.sampled_from([s for w, s in OP_WEIGHTS for _ in range(w)]).flatmap(lambda s: s)


# --- the harness --------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    reg: HookRegistry
    parent: Node | None

    def within(self, other: Node) -> bool:
        """Whether this node is ``other`` or one of its descendants."""
        node: Node | None = self
        while node is not None:
            if node is other:
                return True
            node = node.parent
        return False


@dataclass(eq=False)
class Live:
    handle: HookHandle
    node: Node
    kind: str  # forward | forward_pre | tensor | post_accumulate_grad
    where: str  # module or parameter path of the hooked object
    bomb: list[bool] | None  # [armed] for bombs


@dataclass(eq=False)
class Foreign:
    handle: Any  # torch RemovableHandle
    where: str
    dicts: tuple[str, ...]
    calls: list[int] = field(default_factory=lambda: [0])


class Harness:
    """Runs one program and keeps a model of what every registry and hook dict should hold."""

    def __init__(self) -> None:
        self.model = make_model()
        self.modules = dict(self.model.named_modules())
        self.params = dict(self.model.named_parameters())
        self.module_paths = list(self.modules)
        self.param_paths = list(self.params)
        self.x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        self.ref_out, self.ref_grads = self.run_model()
        self.frozen = torch.zeros(2)
        self.names = itertools.count()
        self.nodes: list[Node] = [Node(HookRegistry(self.model, name="r0"), None)]
        self.nodes.append(Node(HookRegistry(self.model, name="r1"), None))
        self.nodes.append(Node(self.nodes[0].reg.scope("s2"), self.nodes[0]))
        self.live: list[Live] = []
        self.dead: list[HookHandle] = []
        self.foreign: list[Foreign] = []
        self.removed_foreign: list[Foreign] = []
        self.stats: Counter[str] = Counter()
        self.expected = hook_state(self.model)  # the model of the hook dicts, without registry hooks
        # baseline: foreign hooks that were there before any registry touched the model
        self.add_foreign(AddForeign("forward", 3, with_kwargs=True, prepend=False, always_call=True))
        self.add_foreign(AddForeign("forward_pre", 5, with_kwargs=True, prepend=False, always_call=False))
        self.add_foreign(AddForeign("grad", 0, with_kwargs=False, prepend=False, always_call=False))
        assert hook_state(self.model) == self.expected

    # -- running the model --
    def run_model(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for p in self.model.parameters():
            p.grad = None
        out = self.model(self.x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in self.model.named_parameters()}  # type: ignore[union-attr]

    # -- registry hooks --
    def make_fn(self, spec: AddSpec, kind: str, with_kwargs: bool, bomb: list[bool] | None) -> Callable[..., Any]:
        same = spec.same

        def fire() -> None:
            if bomb is not None and bomb[0]:
                bomb[0] = False
                raise BombError

        if kind == "forward":
            if with_kwargs:

                def fwk(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], out: Any) -> Any:
                    fire()
                    return out if same else None

                return fwk

            def fw(m: nn.Module, a: tuple[Any, ...], out: Any) -> Any:
                fire()
                return out if same else None

            return fw
        if kind == "forward_pre":
            if with_kwargs:

                def prek(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> Any:
                    fire()
                    return (a, k) if same else None

                return prek

            def pre(m: nn.Module, a: tuple[Any, ...]) -> Any:
                fire()
                return a if same else None

            return pre

        def one(t: torch.Tensor) -> Any:  # tensor, post_accumulate_grad and HookRegistry.at callbacks
            fire()
            return t if same and kind != "post_accumulate_grad" else None

        return one

    def resolve(self, spec: AddSpec) -> tuple[str, str, Any]:
        """(registry kind, path, target as the registry gets it) for ``spec``."""
        kind = spec.kind.removeprefix("at_")
        if kind in ("forward", "forward_pre"):
            path = self.module_paths[spec.target % len(self.module_paths)]
            return kind, path, path if spec.as_path else self.modules[path]
        path = self.param_paths[spec.target % len(self.param_paths)]
        return kind, path, path if spec.as_path else self.params[path]

    def bomb_for(self, spec: AddSpec, kind: str) -> list[bool] | None:
        return [True] if spec.bomb and kind in ("forward", "forward_pre") else None

    def add(self, node: Node, spec: AddSpec) -> None:
        kind, path, target = self.resolve(spec)
        name = f"n{next(self.names)}" if spec.named else None
        bomb = self.bomb_for(spec, kind)
        reg = node.reg
        if spec.kind.startswith("at_"):
            site = HookSite(self.modules[path], path, kind)  # type: ignore[arg-type]
            h = reg.at(site, self.make_fn(spec, "at", False, bomb), priority=spec.priority, name=name)
        elif kind == "forward":
            fn = self.make_fn(spec, kind, spec.with_kwargs, bomb)
            h = reg.forward(target, fn, priority=spec.priority, with_kwargs=spec.with_kwargs, name=name)
        elif kind == "forward_pre":
            fn = self.make_fn(spec, kind, spec.with_kwargs, bomb)
            h = reg.forward_pre(target, fn, priority=spec.priority, with_kwargs=spec.with_kwargs, name=name)
        elif kind == "tensor":
            h = reg.tensor(target, self.make_fn(spec, kind, False, None), priority=spec.priority, name=name)
        else:
            fn = self.make_fn(spec, kind, False, None)
            h = reg.post_accumulate_grad(target, fn, priority=spec.priority, name=name)
        self.live.append(Live(h, node, kind, path, bomb))

    def hook_spec(self, spec: AddSpec) -> tuple[HookSpec, str, str, list[bool] | None]:
        """``spec`` as a HookSpec (``at_`` kinds become plain ones), with its kind, path and bomb."""
        kind, path, target = self.resolve(spec)
        with_kwargs = spec.with_kwargs and kind in ("forward", "forward_pre")
        bomb = self.bomb_for(spec, kind)
        fn = self.make_fn(spec, kind, with_kwargs, bomb)
        name = f"n{next(self.names)}" if spec.named else None
        hs = HookSpec(kind, target, fn, priority=spec.priority, with_kwargs=with_kwargs, name=name)  # type: ignore[arg-type]
        return hs, kind, path, bomb

    def bad_spec(self, bad: str) -> HookSpec:
        return {
            "unknown_path": HookSpec("forward", "9.nope", lambda *a: None),
            "tensor_for_forward": HookSpec("forward", self.params["0.weight"], lambda *a: None),
            "frozen_tensor": HookSpec("tensor", self.frozen, lambda g: None),
            "not_callable": HookSpec("forward_pre", "0", 42),  # type: ignore[arg-type]
            "non_optimizer": HookSpec("optimizer_step_pre", self.model, lambda *a: None),
            "dup_name": HookSpec("forward", "0", lambda *a: None, name="dup"),
        }[bad]

    # -- foreign hooks --
    def add_foreign(self, op: AddForeign) -> None:
        calls = [0]

        def count(*args: Any) -> None:
            calls[0] += 1

        if op.kind in ("forward", "forward_pre"):
            path = self.module_paths[op.target % len(self.module_paths)]
            m = self.modules[path]
            if op.kind == "forward":
                h = m.register_forward_hook(
                    count, prepend=op.prepend, with_kwargs=op.with_kwargs, always_call=op.always_call
                )
                dicts = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
                flags = (True, op.with_kwargs, op.always_call)
            else:
                h = m.register_forward_pre_hook(count, prepend=op.prepend, with_kwargs=op.with_kwargs)
                dicts = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
                flags = (True, op.with_kwargs)
            for d, flag in zip(dicts, flags, strict=True):
                if flag:
                    item = (h.id, count if d in MAIN_DICTS else True)
                    items = self.expected[f"{path}:{d}"]
                    if op.prepend and d in MAIN_DICTS:
                        items.insert(0, item)
                    else:
                        items.append(item)
        else:
            path = self.param_paths[op.target % len(self.param_paths)]
            p = self.params[path]
            if op.kind == "grad":
                h = p.register_hook(count)
                dicts = ("_backward_hooks",)
            else:
                h = p.register_post_accumulate_grad_hook(count)
                dicts = ("_post_accumulate_grad_hooks",)
            self.expected[f"{path}:{dicts[0]}"].append((h.id, count))
        self.foreign.append(Foreign(h, path, dicts, calls))

    def remove_foreign(self, f: Foreign) -> None:
        f.handle.remove()
        for d in f.dicts:
            where = f"{f.where}:{d}"
            self.expected[where] = [i for i in self.expected[where] if i[0] != f.handle.id]
        self.foreign.remove(f)
        self.removed_foreign.append(f)

    # -- removal bookkeeping --
    def forget(self, dead: list[Live]) -> None:
        self.dead.extend(e.handle for e in dead)
        self.live = [e for e in self.live if e not in dead]

    # -- the operations --
    def node(self, i: int) -> Node:
        return self.nodes[i % len(self.nodes)]

    def apply(self, op: Op) -> None:
        if isinstance(op, NewRegistry):
            self.nodes.append(Node(HookRegistry(self.model, name=f"r{len(self.nodes)}"), None))
        elif isinstance(op, NewScope):
            parent = self.node(op.parent)
            self.nodes.append(Node(parent.reg.scope(f"s{len(self.nodes)}"), parent))
        elif isinstance(op, Add):
            self.add(self.node(op.reg), op.spec)
        elif isinstance(op, RemoveHandle):
            if self.live:
                e = self.live[op.index % len(self.live)]
                e.handle.remove()
                self.forget([e])
        elif isinstance(op, RemoveRegistry):
            node = self.node(op.reg)
            node.reg.remove()
            self.forget([e for e in self.live if e.node.within(node)])
        elif isinstance(op, AddForeign):
            self.add_foreign(op)
        elif isinstance(op, RemoveForeign):
            if self.foreign:
                self.remove_foreign(self.foreign[op.index % len(self.foreign)])
        elif isinstance(op, AtomicRaise):
            self.atomic(op)
        elif isinstance(op, Install):
            self.install(op)
        else:
            self.forward(op)

    def atomic(self, op: AtomicRaise) -> None:
        node = self.node(op.reg)
        n_live = len(self.live)
        raise_at = op.raise_at % (len(op.specs) + 1)
        try:
            with node.reg.atomic():
                for i, spec in enumerate(op.specs):
                    if op.raises and i == raise_at:
                        raise BombError
                    self.add(node, spec)
                if op.raises:
                    raise BombError
        except BombError:
            added = self.live[n_live:]
            assert not any(e.handle.active for e in added), "atomic() left hooks of the failed block"
            self.forget(added)
            self.stats["atomic rollbacks"] += bool(added)
        else:
            assert not op.raises

    def install(self, op: Install) -> None:
        node = self.node(op.reg)
        pairs = [self.hook_spec(s) for s in op.specs]
        specs = [hs for hs, *_ in pairs]
        if op.bad is not None:
            bad_at = op.bad_at % (len(specs) + 1)
            specs.insert(bad_at, self.bad_spec(op.bad))
            if op.bad == "dup_name":
                specs.insert(op.bad_at % (len(specs) + 1), HookSpec("forward_pre", "2", lambda *a: None, name="dup"))
        before = hook_state(self.model)
        before_handles = node.reg.handles()
        try:
            handles = node.reg.install(specs)
        except HookError:
            assert op.bad is not None, "install() of valid specs raised"
            after = hook_state(self.model)
            assert after == before, "a failed install() changed the hook dicts"
            assert node.reg.handles() == before_handles, "a failed install() kept handles"
            self.stats["install rollbacks"] += bool(specs)
            return
        assert op.bad is None, f"install() accepted a bad spec ({op.bad})"
        assert len(handles) == len(pairs)
        for h, (_, kind, path, bomb) in zip(handles, pairs, strict=True):
            self.live.append(Live(h, node, kind, path, bomb))

    def forward(self, op: Forward) -> None:
        disabled = None if op.disabled_reg is None else self.node(op.disabled_reg)
        off = [e for e in self.live if disabled is not None and e.node.within(disabled)]
        pending = [e for e in self.live if e.bomb is not None and e.bomb[0] and e not in off]
        fired = {id(e): e.handle.fired for e in self.live}
        calls = [f.calls[0] for f in self.foreign]
        try:
            if disabled is None:
                out, grads = self.run_model()
            else:
                with disabled.reg.disabled():
                    out, grads = self.run_model()
        except BombError:
            assert pending, "a disarmed or removed hook raised"
            self.stats["bombs"] += 1
            exploded = [e for e in pending if e.bomb is not None and not e.bomb[0]]
            assert len(exploded) == 1, "the forward pass did not stop at the first raising hook"
            assert all(e.handle.enabled for e in self.live), "disabled() did not restore after an exception"
            return
        assert not pending, "an armed hook did not fire"
        self.stats["clean forwards with hooks"] += bool(self.live)
        self.stats["disabled forwards"] += bool(off)
        self.stats["callbacks sharing an object"] = max(
            self.stats["callbacks sharing an object"], len(self.live) - len({(e.where, e.kind) for e in self.live})
        )
        assert torch.equal(out, self.ref_out), "identity hooks changed the output"
        assert all(torch.equal(grads[n], g) for n, g in self.ref_grads.items()), "identity hooks changed grads"
        for e in self.live:
            want = 0 if e in off else 1
            assert e.handle.fired - fired[id(e)] == want, f"{e.handle} fired {e.handle.fired - fired[id(e)]}x"
        assert [f.calls[0] - c for f, c in zip(self.foreign, calls, strict=True)] == [1] * len(self.foreign)

    # -- invariants --
    def check(self) -> None:
        for node in self.nodes:
            own = [e.handle for e in self.live if e.node is node]
            assert node.reg.handles(recursive=False) == own, f"{node.reg} lost track of its handles"
            mine = {id(e.handle) for e in self.live if e.node.within(node)}
            assert {id(h) for h in node.reg.handles()} == mine and len(node.reg) == len(mine)
            assert len(node.reg.counts()) == len(mine), "counts() lost a hook"
        assert all(e.handle.active for e in self.live)
        assert not any(h.active for h in self.dead)
        state = hook_state(self.model)
        live_on = {(e.where, e.kind) for e in self.live}
        extras: dict[str, set[Any]] = {}
        for where, items in self.expected.items():
            path, attr = where.rsplit(":", 1)
            keys = {k for k, _ in items}
            got = state[where]
            kept = [i for i in got if i[0] in keys]
            assert [k for k, _ in kept] == [k for k, _ in items], f"{where}: foreign hooks moved or lost"
            assert all(a is b for (_, a), (_, b) in zip(kept, items, strict=True)), f"{where}: objects differ"
            extras[where] = {k for k, _ in got if k not in keys}
        for where, extra in extras.items():
            path, attr = where.rsplit(":", 1)
            if path in self.params:
                kind: str | None = PARAM_DICTS[attr]
            elif attr in SIDE_DICTS:
                assert extra <= extras[f"{path}:{SIDE_DICTS[attr]}"], f"{where}: stray keys {extra}"
                continue
            else:
                kind = MAIN_DICTS[attr]
            want = 1 if (path, kind) in live_on else 0
            assert len(extra) == want, f"{where}: {len(extra)} registry hooks, expected {want}"

    def finish(self) -> None:
        for _ in range(len(self.live) + 1):  # set off the remaining bombs, then one clean pass
            self.forward(Forward(None))
        for node in reversed(self.nodes):
            if node.parent is None:
                node.reg.remove()
        self.forget(list(self.live))
        for node in self.nodes:
            node.reg.remove()  # idempotent, also for scopes already removed with their parent
            assert len(node.reg) == 0 and node.reg.counts() == {}
        self.check()
        state = hook_state(self.model)
        assert state.keys() == self.expected.keys()
        for where, items in self.expected.items():
            assert [k for k, _ in state[where]] == [k for k, _ in items], f"{where}: keys differ after removal"
            assert all(a is b for (_, a), (_, b) in zip(state[where], items, strict=True)), where
        calls = [f.calls[0] for f in self.foreign]
        gone = [f.calls[0] for f in self.removed_foreign]
        out, grads = self.run_model()
        assert torch.equal(out, self.ref_out)
        assert all(torch.equal(grads[n], g) for n, g in self.ref_grads.items())
        assert [f.calls[0] - c for f, c in zip(self.foreign, calls, strict=True)] == [1] * len(self.foreign)
        assert [f.calls[0] for f in self.removed_foreign] == gone, "a removed foreign hook fired"


@given(st.lists(ops, min_size=10, max_size=50))
def test_registry_removal_leaves_no_trace(program: list[Op]) -> None:
    h = Harness()
    h.check()
    for op in program:
        note(repr(op))
        h.apply(op)
        h.check()
    h.finish()
    for what, n in sorted(h.stats.items()):
        event(f"{what}: {min(n, 3)}{'+' if n >= 3 else ''}")
