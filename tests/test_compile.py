"""Operators under ``torch.compile`` (CPU): compiled outputs, gradients and masked updates equal eager.

Dynamo does not guard on *empty* module hook dicts (``torch._dynamo.config.skip_nnmodule_hook_guards``,
default on): code compiled while a module had no hooks keeps running without hooks added to it later.
That is what made EMoE and the patcher silently inactive on a model compiled (and run) before
``apply()``: outputs equal to the model without them, firing counters at 0. The registry now resets
the compile caches when it adds the first hook of a kind to a module while compiled code exists, and
warns :class:`CompiledHooksWarning`; ``assert_fired`` names compiled code when hooks did not fire.

The default tests are few and small; the whole matrix (every operator x HF / hand-written
``nn.Sequential`` FFN x apply before compile / compile then apply / apply on the compiled wrapper /
``model.compile()``) is slow-marked.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import modulart as mt
from modulart.core import hooks as hooks_module
from modulart.core.errors import CompiledHooksBypassedError, CompiledHooksWarning, HooksNotFiredError
from modulart.core.hooks import HookRegistry
from modulart.core.unwrap import unwrap_model


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class SeqLM(nn.Module):
    """A hand-written LM whose FFNs are ``nn.Sequential(Linear, GELU, Linear)`` (residual)."""

    def __init__(self, vocab: int = 64, d: int = 16, f: int = 32, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.ffns = nn.ModuleList([nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for ffn in self.ffns:
            h = h + ffn(h)
        return self.head(h)


def build(kind: str) -> tuple[nn.Module, Callable[[Any, torch.Tensor], torch.Tensor]]:
    """A fresh, identically initialised model and how to get its logits ``[B, L, V]``."""
    if kind == "hf":
        from families import tiny_llama

        return tiny_llama(), lambda call, ids: call(ids).logits
    return SeqLM().eval(), lambda call, ids: call(ids)


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


# --- operators ------------------------------------------------------------------------------
def with_patches(model: nn.Module) -> Any:
    patcher = mt.patcher.apply(model, task="generation")
    ffn, g = patcher.ffn, torch.Generator().manual_seed(3)
    d = ffn.d_model
    extra = {"up": torch.randn(2, d, generator=g), "up_bias": torch.ones(2)} if ffn.gated else {}
    patcher.bank.add(
        ["p1", "p2"],
        keys=torch.randn(2, d, generator=g),
        key_bias=torch.ones(2),
        values=torch.randn(2, ffn.values.shape[0], generator=g),
        **extra,
    )
    return patcher


def lora(model: nn.Module) -> Any:
    handle = mt.kv.apply(model, target="both", layers="all", mode="lora")
    with torch.no_grad():  # B is zero-initialised: give the deltas a value so the forward changes
        for name, p in unwrap_model(model).named_parameters():  # names without torch.compile's prefix
            if p.requires_grad and "lora" in name.lower():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return handle


@dataclass(frozen=True)
class Case:
    apply: Callable[[nn.Module], Any]
    train: bool  # compare a training step (outputs, gradients' effect on every parameter) too
    hooks_forward: bool  # acts through forward hooks, so adding them after a compiled run must warn


CASES: dict[str, Case] = {
    "emoe-masked": Case(lambda m: mt.emoe.apply(m, num_experts=4, top_k=1, layers="all"), False, True),
    "emoe-sparse": Case(
        lambda m: mt.emoe.apply(m, num_experts=4, top_k=1, layers="all", executor="sparse"), False, True
    ),
    "patcher": Case(with_patches, False, True),
    "kv-full": Case(lambda m: mt.kv.apply(m, target="keys", layers="all", mode="full"), True, False),
    "kv-mask": Case(lambda m: mt.kv.apply(m, target="keys", layers="all", mode="mask", neurons=0.5), True, False),
    "kv-lora": Case(lora, True, True),
    "migu": Case(lambda m: mt.migu.apply(m, keep_ratio=0.3), True, True),
}


def observe(
    model: nn.Module, handle: Any, call: Any, logits: Callable[..., torch.Tensor], train: bool
) -> dict[str, torch.Tensor]:
    """Outputs (and, for training operators, one SGD step: every parameter and the outputs after it)."""
    if not train:
        with torch.no_grad():
            return {"out": logits(call, IDS).detach().clone()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    if handle is not None and hasattr(handle, "attach") and type(handle).__name__.startswith("MIGU"):
        handle.attach(opt)
    out = logits(call, IDS)
    out.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    seen = {"out": out.detach().clone()}
    with torch.no_grad():
        seen["after"] = logits(call, IDS).detach().clone()
    seen |= {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    return seen


def run_case(
    op: str, kind: str, order: str, backend: str = "inductor"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool, Any]:
    """(eager observation, compiled observation, whether CompiledHooksWarning was issued, handle).

    ``backend="eager"`` (dynamo only, no code generation) reproduces the same guard behaviour fast.
    """
    case = CASES[op]
    eager_model, logits = build(kind)
    compiled_model = copy.deepcopy(eager_model)
    want = observe(eager_model, case.apply(eager_model), eager_model, logits, case.train)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "apply-compile":
            handle = case.apply(compiled_model)
            call: Any = torch.compile(compiled_model, backend=backend)
        elif order == "model.compile":
            handle = case.apply(compiled_model)
            compiled_model.compile(backend=backend)
            call = compiled_model
        else:  # compile, run, then apply (to the bare model, or to the compiled wrapper)
            call = torch.compile(compiled_model, backend=backend)
            with torch.no_grad():
                logits(call, IDS)
            handle = case.apply(compiled_model if order == "compile-apply" else call)
        got = observe(compiled_model, handle, call, logits, case.train)
    warned = any(issubclass(w.category, CompiledHooksWarning) for w in caught)
    return want, got, warned, handle


def assert_same(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --- default tests --------------------------------------------------------------------------
def test_emoe_applied_after_compiled_run_is_active_and_warned() -> None:
    """The reported bug: compile, run, apply -> EMoE silently inactive (outputs = dense model, counters 0)."""
    want, got, warned, handle = run_case("emoe-masked", "seq", "compile-apply")
    assert_same(want, got)
    assert warned
    model, logits = build("seq")
    with torch.no_grad():
        dense = logits(model, IDS)
    assert not torch.allclose(got["out"], dense, atol=1e-3)  # routing acts
    handle.registry.assert_fired()


def test_patcher_applied_to_the_compiled_wrapper_matches_eager() -> None:
    want, got, warned, handle = run_case("patcher", "seq", "apply-on-compiled", backend="eager")
    assert_same(want, got)
    assert warned
    handle.registry.assert_fired()


def test_hooks_added_and_removed_after_compilation_keep_working() -> None:
    """Callbacks added to / removed from modules that already had hooks when compiled need no reset."""
    model, logits = build("seq")
    emoe = mt.emoe.apply(model, num_experts=4, top_k=1, layers="all")  # hooks ffns.i.2's forward-pre
    call = torch.compile(model, backend="eager")
    with torch.no_grad():
        logits(call, IDS)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompiledHooksWarning)  # the module already has hooks: no reset
            extra = HookRegistry(model, name="extra")
            added = extra.forward_pre("ffns.1.2", lambda m, args: (args[0] * 2,))
        both_eager = logits(model, IDS)
        torch.testing.assert_close(logits(call, IDS), both_eager)
        assert added.fired == 2
        extra.remove()
        emoe_only = logits(model, IDS)
        assert not torch.allclose(emoe_only, both_eager)
        torch.testing.assert_close(logits(call, IDS), emoe_only)
        emoe.remove()
        plain, _ = build("seq")
        torch.testing.assert_close(logits(call, IDS), logits(plain, IDS))
        assert not torch.allclose(emoe_only, logits(plain, IDS))


def test_bypassed_hooks_are_reported_as_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the reset skipped, the counters catch it: ``assert_fired`` raises the compile-specific error."""
    monkeypatch.setattr(hooks_module, "note_new_module_hook", lambda path, scope: False)
    model, logits = build("seq")
    call = torch.compile(model, backend="eager")
    with torch.no_grad():
        logits(call, IDS)
    with HookRegistry(model, name="probe") as reg:
        reg.forward("ffns.0", lambda m, a, out: out * 0)
        with torch.no_grad():
            logits(call, IDS)
        with pytest.raises(CompiledHooksBypassedError, match=r"ffns\.0.*\n.*torch\.compile") as info:
            reg.assert_fired()
        assert isinstance(info.value, HooksNotFiredError)
    torch._dynamo.reset()
    with HookRegistry(model, name="eager") as reg:  # nothing compiled: the plain error
        reg.forward("ffns.0", lambda m, a, out: None)
        with pytest.raises(HooksNotFiredError) as plain:
            reg.assert_fired()
        assert not isinstance(plain.value, CompiledHooksBypassedError)


# --- the whole matrix -----------------------------------------------------------------------
ORDERS = ["apply-compile", "compile-apply", "apply-on-compiled", "model.compile"]


@pytest.mark.slow
@pytest.mark.compile_matrix
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["hf", "seq"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_compile_matrix(op: str, kind: str, order: str) -> None:
    """Inductor for apply-then-compile (generated code vs eager); ``aot_eager`` (the same dynamo
    guards and AOT-autograd graphs, without code generation) for the other orders, to stay affordable."""
    want, got, warned, _ = run_case(op, kind, order, backend="inductor" if order == "apply-compile" else "aot_eager")
    assert_same(want, got)
    late = order in ("compile-apply", "apply-on-compiled")
    assert late or not warned  # applied before compiling: nothing to reset
    if late and CASES[op].hooks_forward:
        assert warned
