"""PEFT-wrapped models: views see through tuner layers, hooks follow a later wrap, operators act on
the effective (LoRA-included) computation. CPU, offline, tiny models."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import modulart as mt
from families import tiny_llama
from modulart.core import rehome
from modulart.core.errors import UnsupportedModuleError
from modulart.core.linear import LinearRef
from modulart.core.verify import clear_verification_cache

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FFN_TARGETS = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    clear_verification_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers / peft deprecation chatter
        yield
    clear_verification_cache()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def lora(model: nn.Module, targets: list[str] | None = None, **kw: object) -> nn.Module:
    cfg = peft.LoraConfig(target_modules=targets or FFN_TARGETS, **kw)
    return peft.get_peft_model(model, cfg)


def randomise_lora_b(model: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """PEFT initialises B = 0 (no effect); random B makes the LoRA path visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if ".lora_B." in name and isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * scale)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * scale)


def effective(layer: nn.Module) -> torch.Tensor:
    """``W + scaling·B·A`` in ``[out, in]``, by hand from the PEFT layer's own tensors."""
    base = layer.base_layer
    w = base.weight.t() if type(base).__name__ == "Conv1D" else base.weight
    for name in layer.active_adapters:
        w = w + layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
    return w.detach()


def ids(seed: int = 0, shape: tuple[int, int] = (2, 8)) -> torch.Tensor:
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


# --- 1. views see through PEFT layers -----------------------------------------------------------------
def test_find_ffns_on_peft_llama_verifies_with_nonzero_lora() -> None:
    model = lora(tiny_llama(), lora_dropout=0.1)
    randomise_lora_b(model)
    model.train()  # lora dropout active: verification probes in eval mode all the same
    ffns = mt.find_ffns(model)
    model.eval()
    assert [f.path for f in ffns] == [f"model.layers.{i}.mlp" for i in range(2)]  # relative to the unwrapped model
    for f in ffns:
        assert f.verification is not None and f.verification.ok, f.verification
        mlp = f.module
        assert f.key_proj.module is mlp.gate_proj and f.key_proj.is_peft  # hooks stay on the wrapper
        assert f.hidden_site.module is mlp.down_proj and f.output_site.module is mlp.down_proj
        assert f.key_proj.param is mlp.gate_proj.base_layer.weight
        torch.testing.assert_close(f.keys, effective(mlp.gate_proj))
        torch.testing.assert_close(f.values, effective(mlp.down_proj))
        assert not torch.allclose(f.keys, mlp.gate_proj.base_layer.weight)
        x = torch.randn(3, 5, 32)
        with torch.no_grad():
            torch.testing.assert_close(f.forward(x), mlp(x))
    # the parameters the view names are the base layer's stored ones, found in the model by name
    names = {id(p): n for n, p in model.named_parameters()}
    assert names[id(ffns[0].parameters()["key"])].endswith("mlp.gate_proj.base_layer.weight")


def test_find_ffns_on_peft_gpt2_conv1d_fan_in_fan_out() -> None:
    model = lora(tiny_gpt2(), ["c_fc", "mlp.c_proj"], fan_in_fan_out=True, lora_bias=True)
    randomise_lora_b(model)
    ffns = mt.find_ffns(model)
    assert len(ffns) == 2 and all(f.verification is not None and f.verification.ok for f in ffns)
    f = ffns[0]
    assert f.key_proj.transposed and tuple(f.keys.shape) == (128, 32) and tuple(f.values.shape) == (32, 128)
    torch.testing.assert_close(f.keys, effective(f.module.c_fc))
    lb = f.module.c_fc.lora_B["default"].bias * f.module.c_fc.scaling["default"]
    torch.testing.assert_close(f.key_bias, (f.module.c_fc.base_layer.bias + lb).detach())
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(f.forward(x), f.module(x))


def test_discovery_ignores_the_insides_of_peft_layers() -> None:
    """A block no table knows is found by data flow through the tuner layers (never their base_layer
    or lora_A / lora_B, which would verify with B = 0 but describe the wrong computation)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w_in, self.w_out = nn.Linear(8, 24), nn.Linear(24, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w_out(torch.tanh(self.w_in(x)))

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(Block(), Block()), peft.LoraConfig(target_modules=["w_in", "w_out"]))
    randomise_lora_b(model)
    ffns = mt.find_ffns(model)
    assert [(f.layout.key, f.layout.value) for f in ffns] == [("w_in", "w_out")] * 2
    assert all(f.verification is not None and f.verification.ok for f in ffns)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(ffns[1].forward(x), ffns[1].module(x))


def test_effective_weight_follows_adapter_state_and_writes_refuse_while_a_delta_is_in_effect() -> None:
    model = lora(tiny_llama())
    randomise_lora_b(model)
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    ref = LinearRef(layer, "gate_proj")
    base = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(ref.weight, effective(layer))
    with torch.no_grad():
        assert ref.weight is ref.weight  # cached while nothing changes (EMoE's sparse weight cache relies on it)
    assert ref.weight.requires_grad and ref.weight.grad_fn is not None  # differentiable in the adapters
    with pytest.raises(UnsupportedModuleError, match=r"gate_proj.*merge the adapters first \(`merge_and_unload\(\)`\)"):
        ref.set_weight(torch.zeros_like(base))
    torch.testing.assert_close(layer.base_layer.weight, base)  # nothing written
    with model.disable_adapter():
        torch.testing.assert_close(ref.weight, base)
        assert ref.writable
    # a second adapter, active alone, then both active
    model.add_adapter("other", peft.LoraConfig(target_modules=FFN_TARGETS, r=4))
    randomise_lora_b(model, seed=7)
    model.base_model.set_adapter("other")
    torch.testing.assert_close(ref.weight, effective(layer))
    layer.set_adapter(["default", "other"])
    torch.testing.assert_close(ref.weight, effective(layer))
    # merged: the stored weight is the effective one, and writing it is fine
    want = effective(layer)
    layer.merge()
    torch.testing.assert_close(ref.weight, want)
    assert ref.weight.data_ptr() == layer.base_layer.weight.data_ptr()
    ref.set_weight(want * 2)
    torch.testing.assert_close(layer.base_layer.weight, want * 2)


def test_dora_is_refused_typed() -> None:
    model = lora(tiny_llama(), use_dora=True)
    with pytest.raises(UnsupportedModuleError, match="merge the adapters first"):
        mt.find_ffns(model)


# --- 2. hooks follow a later wrap -----------------------------------------------------------------
class Wrapper(nn.Module):
    """Not PEFT: any wrapper whose ``module`` is the original, with a branch of its own on the input."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.side = nn.Linear(module.in_features, module.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) + self.side(x)


def test_hooks_follow_a_wrap_and_an_unwrap_and_leave_no_trace() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    inner = model[2]
    seen: list[torch.Tensor] = []
    reg = mt.HookRegistry(model)
    reg.forward_pre("2", lambda m, args: (args[0] * 0,), priority=mt.Priority.INTERVENE)
    reg.forward("2", lambda m, args, out: seen.append(out.detach()), priority=mt.Priority.RECORD)
    model[2] = Wrapper(inner)
    y = model(torch.randn(3, 4))
    torch.testing.assert_close(y, inner.bias.expand(3, 4).detach())  # both branches saw the zeroed input
    assert len(seen) == 1  # the output hook saw the wrapper's (effective) output, once
    assert not inner._forward_pre_hooks and not inner._forward_hooks
    reg.assert_fired()
    model[2] = inner  # unwrapped again: the hooks come back to the module
    model(torch.randn(3, 4))
    assert len(seen) == 2 and len(inner._forward_pre_hooks) == 1
    wrapper_hooks = len(Wrapper(nn.Linear(1, 1))._forward_pre_hooks)
    reg.remove()
    assert not inner._forward_pre_hooks and not inner._forward_hooks and wrapper_hooks == 0
    assert not any(m in rehome._WATCHED for m in model.modules())
    # the global registration hook lives only while some module (maybe another test's) is watched
    assert rehome._REGISTRATION is None or list(rehome._WATCHED)


def test_unrelated_replacement_is_left_alone_and_reported_by_assert_fired() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with mt.HookRegistry(model) as reg:
        reg.forward("2", lambda m, a, o: None)
        model[2] = nn.Linear(4, 4)
        model(torch.randn(1, 4))
        with pytest.raises(mt.HooksNotFiredError):
            reg.assert_fired()
    assert not any(m in rehome._WATCHED for m in model.modules())
    assert rehome._REGISTRATION is None or list(rehome._WATCHED)


# --- 3. operators on PEFT models ------------------------------------------------------------------
def masked_reference(mlp: nn.Module, q: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The EMoE-masked Llama MLP by hand from the PEFT layers' effective weights (top-1)."""
    g, u, d = (effective(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    h = torch.nn.functional.silu(q @ g.t()) * (q @ u.t())
    mask = (labels[None, :] == selected[:, None]).to(h.dtype)
    return (h * mask) @ d.t()


@pytest.mark.parametrize("order", ["emoe_then_peft", "peft_then_emoe"])
def test_emoe_mask_covers_the_lora_path(order: str) -> None:
    base = tiny_llama()
    if order == "emoe_then_peft":
        handle = mt.emoe.apply(base, num_experts=4, top_k=1)
        model = lora(base)
        randomise_lora_b(model)
    else:
        model = lora(base)
        randomise_lora_b(model)
        handle = mt.emoe.apply(base, num_experts=4, top_k=1)
    mlp = base.model.layers[1].mlp
    down = mlp.down_proj
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):  # type: ignore[no-untyped-def]
        return lambda m, args: seen.__setitem__(key, args[0].detach().clone())

    hooks = [
        down.lora_A["default"].register_forward_pre_hook(keep("lora")),
        down.base_layer.register_forward_pre_hook(keep("base")),
        mlp.register_forward_pre_hook(keep("q")),
        mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out.detach().clone())),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids())
    finally:
        for h in hooks:
            h.remove()
    handle.registry.assert_fired()
    zeros = seen["lora"] == 0
    assert torch.equal(zeros, seen["base"] == 0)
    assert 0.7 <= zeros.float().mean().item() <= 0.8  # 3 of 4 experts off
    q = seen["q"].reshape(-1, 32)
    layer = handle.layers[mlp_path(handle, "model.layers.1.mlp")]
    labels = layer.groups.labels
    # avgk routing by hand: the mean *effective* key of each expert, top-1
    centroids = torch.stack([effective(mlp.gate_proj)[labels == e].mean(0) for e in range(4)])
    selected = (q @ centroids.t()).argmax(-1)
    want = masked_reference(mlp, q, labels, selected)
    torch.testing.assert_close(seen["y"].reshape(-1, 32), want, rtol=1e-5, atol=1e-5)
    # and the hooks route on the effective keys (the view reads through the wrapper)
    torch.testing.assert_close(layer.ffn.keys, effective(mlp.gate_proj))
    handle.remove()
    assert not down._forward_pre_hooks and not down.base_layer._forward_pre_hooks


def test_emoe_follows_merge_and_unload_back_to_the_base_layers() -> None:
    base = tiny_llama()
    handle = mt.emoe.apply(base, num_experts=4, top_k=1, split="random")
    model = lora(base)
    randomise_lora_b(model)
    with torch.no_grad():
        want = model(input_ids=ids()).logits
    merged = model.merge_and_unload()
    assert merged is base and isinstance(base.model.layers[1].mlp.down_proj, nn.Linear)
    down = base.model.layers[1].mlp.down_proj
    assert len(down._forward_pre_hooks) == 1  # the mask came back to the (now merged) module
    handle.registry.reset_counts()
    with torch.no_grad():
        got = base(input_ids=ids()).logits
    handle.registry.assert_fired()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    layer = handle.layers[mlp_path(handle, "model.layers.1.mlp")]
    assert layer.ffn.value_proj.module is down and not layer.ffn.value_proj.is_peft
    handle.remove()
    assert not down._forward_pre_hooks


def test_moe_views_see_through_peft_on_shared_experts() -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = lora(transformers.AutoModelForCausalLM.from_config(cfg).eval(), [*FFN_TARGETS, "shared_expert_gate"])
    randomise_lora_b(model)
    moes = mt.find_moes(model)
    assert len(moes) == 2 and all(m.verification is not None and m.verification.ok for m in moes)
    shared = mt.find_ffns(model, include_shared_experts=True)
    assert [f.path.rsplit(".", 2)[-2:] for f in shared] == [["mlp", "shared_expert"]] * 2
    assert all(f.verification is not None and f.verification.ok and f.key_proj.is_peft for f in shared)


def mlp_path(handle: object, suffix: str) -> str:
    return next(p for p in handle.layers if p.endswith(suffix))  # type: ignore[attr-defined]


@pytest.mark.parametrize("order", ["emoe_then_peft", "peft_then_emoe"])
def test_emoe_sparse_executor_uses_effective_weights(order: str) -> None:
    outs = []
    for executor in ("masked", "sparse"):
        base = tiny_llama()
        if order == "emoe_then_peft":
            handle = mt.emoe.apply(base, num_experts=4, top_k=1, executor=executor, split="random")
            model = lora(base)
        else:
            model = lora(base)
            handle = mt.emoe.apply(base, num_experts=4, top_k=1, executor=executor, split="random")
        randomise_lora_b(model)
        with torch.no_grad():
            outs.append(model(input_ids=ids()).logits)
        handle.registry.assert_fired()
        handle.remove()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_emoe_sparse_weight_cache_follows_lora_updates() -> None:
    base = tiny_llama()
    model = lora(base)
    randomise_lora_b(model)
    sparse = mt.emoe.apply(base, num_experts=4, top_k=1, executor="sparse", split="random")
    with torch.no_grad():
        first = model(input_ids=ids()).logits
        randomise_lora_b(model, seed=5)  # as an optimizer step would: in place
        second = model(input_ids=ids()).logits
    sparse.remove()
    assert not torch.allclose(first, second)
    masked = mt.emoe.apply(base, num_experts=4, top_k=1, split="random")
    with torch.no_grad():
        torch.testing.assert_close(second, model(input_ids=ids()).logits, rtol=1e-4, atol=1e-5)
    masked.remove()


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["full", "mask", "lora"])
def test_kv_on_a_peft_model_trains_the_base_keys(mode: str) -> None:
    import modulart.kv

    base = tiny_llama()
    model = lora(base)
    randomise_lora_b(model)
    extra = {"neurons": 0.25} if mode == "mask" else {}
    handle = modulart.kv.apply(base, target="keys", keys="both", mode=mode, **extra)
    trainable = _trainable(model)
    base_keys = {
        f"base_model.model.model.layers.{i}.mlp.{p}.base_layer.weight" for i in range(2) for p in FFN_TARGETS[:2]
    }
    if mode == "lora":  # modulart's own deltas only; PEFT's adapters and the base weights stay frozen
        assert trainable and trainable.isdisjoint(base_keys) and not any(".lora_A.default" in n for n in trainable)
        assert all("modulart" in n for n in trainable), trainable
    else:
        assert trainable == base_keys  # the base layers' weights; PEFT's own adapters stay frozen
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    if mode == "mask":
        attach = getattr(handle, "attach", None) or handle.attach_optimizer  # the handle API is being renamed
        attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=ids()).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if name in trainable and not name.endswith("lora_A"):  # modulart's A gets no gradient while B = 0
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    if mode == "mask":  # only the chosen neurons (rows of the stored keys) moved
        name = sorted(base_keys)[0]
        rows = (model.get_parameter(name) != before[name]).any(1)
        assert 0 < int(rows.sum()) < rows.numel()
    if mode == "lora":  # modulart's delta sits on the wrapper's (effective) output: it moves the output
        layer = base.model.layers[0].mlp.gate_proj
        x = torch.randn(2, 32)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "modulart" in n and n.endswith("lora_B"):
                    p.fill_(0.1)
            torch.testing.assert_close(
                layer(x)
                - layer.base_layer(x)
                - layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"],
                handle.lora[next(k for k in handle.lora if k.endswith("0.mlp.gate_proj"))].delta(x),
            )
    handle.remove()


def test_kv_keeps_peft_adapters_trainable_when_not_freezing_the_rest() -> None:
    import modulart.kv

    base = tiny_llama()
    model = lora(base)
    adapters = {n for n in _trainable(model) if "lora_" in n}
    handle = modulart.kv.apply(base, target="values", mode="full", freeze_rest=False)
    trainable = _trainable(model)
    assert adapters <= trainable
    assert {n for n in trainable if n.endswith("down_proj.base_layer.weight")} and not any(
        n.endswith("gate_proj.base_layer.weight") for n in trainable
    )
    handle.remove()


def test_patcher_edit_works_on_a_peft_model_and_bake_refuses_typed() -> None:
    import modulart.patcher

    base = tiny_llama()
    model = lora(base)
    randomise_lora_b(model)
    patcher = modulart.patcher.apply(base, task="generation", max_steps=200)
    patcher.set_memory([{"input_ids": ids(1, (1, 6))}])
    prompt = ids(2, (1, 6))
    target = torch.tensor([5])
    result = patcher.edit({"input_ids": prompt}, target)
    assert result.success
    with torch.no_grad():
        assert int(model(input_ids=prompt).logits[0, -1].argmax()) == 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModuleError, match=r"merge the adapters first \(`merge_and_unload\(\)`\)"):
        patcher.bake()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert type(base.model.layers[1].mlp.down_proj).__module__.startswith("peft")
    patcher.remove()


def test_patcher_bake_refuses_typed_on_peft_layers() -> None:
    from modulart.patcher.bake import widen

    base = tiny_llama()
    lora(base)
    ffn = mt.find_ffns(base)[-1]
    with pytest.raises(UnsupportedModuleError, match="PEFT tuner layers"):
        widen(
            base,
            ffn,
            keys=torch.zeros(1, 32),
            key_bias=torch.zeros(1),
            values=torch.zeros(1, 32),
            up=torch.zeros(1, 32),
            up_bias=torch.zeros(1),
        )
    assert type(base.model.layers[1].mlp.gate_proj).__module__.startswith("peft")
