"""modulart.kv: exactly the chosen keys / values train, in every mode, on every family; clean removal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import modulart as mt
import modulart.kv
from families import DENSE_FAMILIES, Family, build
from modulart.kv import KVConfig, KVHandle


def _out(fam: Family) -> torch.Tensor:
    out: Any = fam.model(**fam.inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _loss(fam: Family) -> torch.Tensor:
    """A loss whose gradient does not vanish after a final LayerNorm (unlike ``out.pow(2).mean()``)."""
    out = _out(fam).float()
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum()


def _hooks(model: nn.Module) -> list[list[int]]:
    return [list(m._forward_hooks) + list(m._forward_pre_hooks) for m in model.modules()]


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _name(model: nn.Module, t: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is t)


def _expected(model: nn.Module, target: str, keys: str = "gate", biases: bool = False) -> set[str]:
    """Parameter names KV should train, computed from the FFN views directly (not from modulart.kv)."""
    out: set[str] = set()
    for f in mt.find_ffns(model):
        refs = []
        if target in ("keys", "both"):
            if f.up_proj is None:
                refs.append(f.key_proj)
            else:
                refs += [f.key_proj] if keys in ("gate", "both") else []
                refs += [f.up_proj] if keys in ("up", "both") else []
        if target in ("values", "both"):
            refs.append(f.value_proj)
        for r in refs:
            out.add(_name(model, r.param))
            if biases and r.bias is not None:
                out.add(_name(model, r.bias))
    return out


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


# --- full mode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["keys", "values", "both"])
@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_full_mode_grads_exactly_on_chosen_matrices(family: str, target: str) -> None:
    fam = build(family)
    want = _expected(fam.model, target)
    assert want
    handle = modulart.kv.apply(fam.model, target=target)
    assert {n for n, p in fam.model.named_parameters() if p.requires_grad} == want
    _loss(fam).backward()
    for name, g in _grads(fam.model).items():
        if name in want:
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None, name
    assert handle.report().trainable == sum(p.numel() for p in fam.model.parameters() if p.requires_grad)
    handle.remove()


@pytest.mark.parametrize(
    ("family", "mode"),
    [
        (f, m)
        for f in ("gpt2", "llama", "t5", "plain", "plain_moe", "mixtral")
        for m in ("full", "lora", "mask")
        if (f, m) != ("mixtral", "lora")  # fused experts have no LoRA (tested below)
    ],
)
def test_remove_restores_flags_hooks_and_state_exactly(family: str, mode: str) -> None:
    fam = build(family)
    for i, p in enumerate(fam.model.parameters()):  # the user's own choices, including False ones
        p.requires_grad_(i % 3 != 0)
    flags, state, hooks = _flags(fam.model), _state(fam.model), _hooks(fam.model)
    handle = modulart.kv.apply(fam.model, target="both", mode=mode, neurons=0.5 if mode == "mask" else 1.0)
    assert _flags(fam.model) != flags
    _loss(fam).backward()
    handle.remove()
    assert _flags(fam.model) == flags
    assert _hooks(fam.model) == hooks
    now = fam.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    handle.remove()  # idempotent


def test_freeze_rest_false_keeps_other_flags_and_biases_opt_in() -> None:
    fam = build("gpt2")
    handle = modulart.kv.apply(fam.model, target="keys", freeze_rest=False, train_biases=True)
    assert all(p.requires_grad for p in fam.model.parameters())
    handle.remove()
    handle = modulart.kv.apply(fam.model, target="keys", train_biases=True)
    assert {n for n, p in fam.model.named_parameters() if p.requires_grad} == _expected(fam.model, "keys", biases=True)
    groups = handle.param_groups(weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() == 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])
    assert len(groups[0]["params"]) == len(groups[1]["params"]) == 2
    handle.remove()


@pytest.mark.parametrize("keys", ["gate", "up", "both"])
@pytest.mark.parametrize("family", ["llama", "t5_gated"])
def test_gated_key_side(family: str, keys: str) -> None:
    fam = build(family)
    handle = modulart.kv.apply(fam.model, target="keys", keys=keys)
    got = {n for n, p in fam.model.named_parameters() if p.requires_grad}
    assert got == _expected(fam.model, "keys", keys=keys)
    suffix = {"llama": {"gate": "gate_proj", "up": "up_proj"}, "t5_gated": {"gate": "wi_0", "up": "wi_1"}}[family]
    chosen = {"gate": ["gate"], "up": ["up"], "both": ["gate", "up"]}[keys]
    assert {n.split(".")[-2] for n in got} == {suffix[c] for c in chosen}
    handle.remove()


def test_layer_selection_and_report() -> None:
    fam = build("plain")  # 3 FFNs
    handle = modulart.kv.apply(fam.model, target="values", layers="last_half")
    assert handle.plan.targets == ["blocks.1.mlp", "blocks.2.mlp"]
    rep = handle.report()
    assert [r.matrix for r in rep.rows] == ["blocks.1.mlp.fc_out.weight", "blocks.2.mlp.fc_out.weight"]
    assert rep.trainable == 2 * 32 * 64 and rep.by_layer() == {"blocks.1.mlp": 2048, "blocks.2.mlp": 2048}
    assert "fc_out.weight" in str(rep) and "trainable 4,096 of" in str(rep)
    handle.remove()
    handle = modulart.kv.apply(fam.model, target="keys", layers=["blocks.0.mlp"])
    assert {n for n, p in fam.model.named_parameters() if p.requires_grad} == {"blocks.0.mlp.fc_in.weight"}
    handle.remove()


# --- LoRA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "plain", "bert", "plain_moe"])
def test_lora_init_step_merge_and_save_load(family: str, tmp_path: Path) -> None:
    fam = build(family)
    base, state, hooks = _out(fam).detach(), _state(fam.model), _hooks(fam.model)
    handle = modulart.kv.apply(fam.model, target="both", mode="lora", rank=4, alpha=8.0)
    # only the LoRA tensors train, and they are parameters of the model (an optimizer over it sees them)
    trainable = {n for n, p in fam.model.named_parameters() if p.requires_grad}
    assert trainable and all(".modulart_kv_lora" in n for n in trainable)
    assert {id(p) for n, p in fam.model.named_parameters() if p.requires_grad} == {
        id(t) for lora in handle.lora.values() for t in (lora.lora_A, lora.lora_B)
    }
    with torch.no_grad():  # (grad mode and frozen weights switch nn.MultiheadAttention's kernels)
        with handle.disabled():
            frozen_base = _out(fam)
        assert torch.equal(_out(fam), frozen_base)  # B = 0: exactly the base model
    torch.testing.assert_close(frozen_base, base)
    opt = torch.optim.SGD(handle.param_groups(), lr=0.5)
    _loss(fam).backward()
    opt.step()
    tuned = _out(fam).detach()
    assert not torch.allclose(tuned, base, atol=1e-4)
    if family != "plain_moe":  # unrouted experts legitimately never fire
        handle.registry.assert_fired()
    with torch.no_grad(), handle.disabled():
        assert torch.equal(_out(fam), frozen_base)
    rep = handle.report()
    assert rep.trainable == sum(t.numel() for t in handle.state_dict().values())
    handle.save(tmp_path / "kv")
    handle.remove()
    assert torch.equal(_out(fam), base) and all(torch.equal(v, state[k]) for k, v in fam.model.state_dict().items())
    loaded = KVHandle.load(fam.model, tmp_path / "kv")
    torch.testing.assert_close(_out(fam), tuned, atol=0, rtol=0)
    loaded.merge_()
    assert _hooks(fam.model) == hooks
    now = fam.model.state_dict()
    assert {k: tuple(v.shape) for k, v in now.items()} == {k: tuple(v.shape) for k, v in state.items()}
    torch.testing.assert_close(_out(fam), tuned, atol=1e-5, rtol=1e-5)
    assert not all(torch.equal(now[k], v) for k, v in state.items())


def test_lora_bf16_weights_get_fp32_adapters() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).to(torch.bfloat16)
    handle = modulart.kv.apply(model, target="keys", mode="lora", rank=2)
    assert handle.lora["0"].lora_A.dtype == torch.float32
    assert model(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    handle.remove()


# --- mask mode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["plain", "gpt2"])
def test_mask_mode_changes_only_selected_rows_and_columns(family: str) -> None:
    fam = build(family)
    ffn = mt.find_ffns(fam.model)[0]
    sel = [1, 5, 9, 33]
    before = _state(fam.model)
    handle = modulart.kv.apply(fam.model, target="both", mode="mask", layers=[ffn.path], neurons={ffn.path: sel})
    opt = torch.optim.SGD(handle.param_groups(), lr=0.5)
    _loss(fam).backward()
    opt.step()
    chosen = torch.zeros(ffn.d_ff, dtype=torch.bool)
    chosen[sel] = True
    for ref, neuron_axis in ((ffn.key_proj, 0), (ffn.value_proj, 1)):
        name = _name(fam.model, ref.param)
        # independent of modulart's axis logic: stored orientation per storage type
        stored_axis = neuron_axis if isinstance(ref.module, nn.Linear) else 1 - neuron_axis
        old, new = before[name], ref.param.detach()
        moved = (old != new).any(dim=1 - stored_axis)
        assert moved[chosen].all(), name
        assert not moved[~chosen].any(), name
    rep = handle.report()
    assert [r.trainable for r in rep.rows] == [len(sel) * ffn.d_model] * 2
    handle.remove()


def test_mask_fraction_with_adamw_optimizer_keeps_masked_slices_fixed() -> None:
    fam = build("llama")
    flags = _flags(fam.model)
    model = fam.model
    keys = [f.key_proj.param for f in mt.find_ffns(model)]
    before = [k.detach().clone() for k in keys]
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-2, weight_decay=0.1)
    handle = modulart.kv.apply(model, target="keys", mode="mask", neurons=0.25, seed=3, optimizer=opt)
    assert handle.optimizer is opt
    for _ in range(2):
        opt.zero_grad()
        _loss(fam).backward()
        rows_with_grad = [(k.grad != 0).any(1) for k in keys]
        assert [int(r.sum()) for r in rows_with_grad] == [16, 16]  # round(0.25 * 64)
        opt.step()
    for k, old, rows in zip(keys, before, rows_with_grad, strict=True):
        moved = (k.detach() != old).any(1)
        assert torch.equal(moved, rows)
    assert handle.report().trainable == 2 * 16 * 32
    handle.remove()
    assert _flags(model) == flags


# --- MoE ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "plain_moe"])
def test_moe_full_trains_exactly_the_expert_tensors(family: str) -> None:
    fam = build(family)
    handle = modulart.kv.apply(fam.model, target="both")
    trainable = {n for n, p in fam.model.named_parameters() if p.requires_grad}
    if family == "mixtral":
        want = {f"model.layers.{i}.mlp.experts.{t}" for i in range(2) for t in ("gate_up_proj", "down_proj")}
    else:
        want = {f"blocks.{b}.mlp.experts.{e}.{w}.weight" for b in range(3) for e in range(4) for w in ("w1", "w2")}
    assert trainable == want
    _loss(fam).backward()
    assert {n for n, g in _grads(fam.model).items() if g is not None} <= want
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(fam.model).values())
    assert handle.report().trainable == sum(p.numel() for p in fam.model.parameters() if p.requires_grad)
    if family == "plain_moe":
        assert set(handle.peft_target_modules()) == {n.removesuffix(".weight") for n in want}
    else:
        with pytest.raises(mt.UnsupportedOperationError):
            handle.peft_target_modules()
    handle.remove()


@pytest.mark.parametrize(("family", "keys"), [("mixtral", "gate"), ("mixtral", "up"), ("gpt_oss", "gate")])
def test_fused_mask_restricts_gradient_to_the_gate_or_up_slice(family: str, keys: str) -> None:
    fam = build(family)
    handle = modulart.kv.apply(fam.model, target="keys", keys=keys, mode="mask")
    _loss(fam).backward()
    moe = mt.find_moes(fam.model)[0]
    gu = moe.experts_module.gate_up_proj
    assert gu.grad is not None
    grad = gu.grad
    inter = moe.d_expert
    if family == "mixtral":  # [E, 2I, d], gate first
        gate, up = grad[:, :inter], grad[:, inter:]
    else:  # [E, d, 2I], interleaved
        gate, up = grad[..., 0::2], grad[..., 1::2]
    kept, dropped = (gate, up) if keys == "gate" else (up, gate)
    assert kept.abs().sum() > 0 and torch.equal(dropped, torch.zeros_like(dropped))
    rep = handle.report()
    assert rep.rows[0].trainable == gu.numel() // 2
    handle.remove()


def test_fused_lora_with_dropout_raises_before_anything_changes() -> None:
    fam = build("mixtral")
    flags = _flags(fam.model)
    with pytest.raises(mt.UnsupportedOperationError, match="weight space"):
        modulart.kv.apply(fam.model, mode="lora", lora_dropout=0.1)
    assert _flags(fam.model) == flags


@pytest.mark.parametrize(("family", "target"), [("mixtral", "both"), ("gpt_oss", "keys"), ("qwen2_moe", "values")])
def test_lora_on_fused_experts_trains_merges_and_removes_exactly(family: str, target: str) -> None:
    # fused 3-D experts were refused in mode 'lora'; the per-expert deltas now live in weight space
    fam = build(family)
    model = fam.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    base = fam.run().logits
    handle = modulart.kv.apply(model, target=target, mode="lora", rank=2, alpha=4.0, keys="both")
    fused = [k for k in handle.state_dict() if k.endswith(".lora_B") and ".experts." in k]
    assert fused, sorted(handle.state_dict())
    with torch.no_grad():  # B starts at zero; make the deltas real
        for d in handle.expert_lora.values():
            d.lora_B.normal_(std=0.5)
    assert all(p.requires_grad for d in handle.expert_lora.values() for p in d.parameters())
    tuned = fam.run().logits
    assert not torch.allclose(tuned, base)
    handle.merge_()
    torch.testing.assert_close(fam.run().logits, tuned, rtol=1e-5, atol=1e-5)
    assert sorted(model.state_dict()) == sorted(before)  # no parametrisation left
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    handle2 = modulart.kv.apply(model, target=target, mode="lora", keys="both")
    handle2.remove()
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert sorted(after) == sorted(merged) and all(torch.equal(after[k], v) for k, v in merged.items())


def test_blocks_mix_dense_and_moe_in_depth_order() -> None:
    fam = build("deepseek_v3")
    blocks = modulart.kv.find_blocks(fam.model)
    assert [b.path for b in blocks] == [f"model.layers.{i}.mlp" for i in range(3)]
    handle = modulart.kv.apply(fam.model, target="values", layers=[0, 2])
    assert {n for n, p in fam.model.named_parameters() if p.requires_grad} == {
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.mlp.experts.down_proj",
    }
    handle.remove()


# --- PEFT interop ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5_gated"])
def test_peft_target_modules_are_exactly_the_chosen_modules(family: str) -> None:
    fam = build(family)
    handle = modulart.kv.apply(fam.model, target="both", keys="up")
    names = handle.peft_target_modules()
    handle.remove()
    modules = dict(fam.model.named_modules())
    assert all(n in modules for n in names)
    assert {_name(fam.model, modules[n].weight) for n in names} == _expected(fam.model, "both", keys="up")
    peft = pytest.importorskip("peft")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=names), fam.model)
    wrapped = {n for n, m in fam.model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}
    assert wrapped == set(names)


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"target": "queries"}, "target"),
        ({"keys": "down"}, "keys"),
        ({"mode": "prune"}, "mode"),
        ({"rank": 0}, "rank"),
        ({"alpha": -1.0}, "alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"neurons": 1.5, "mode": "mask"}, "neurons"),
        ({"neurons": 0.5}, "neurons"),
        ({"neurons": {"x": [-1]}, "mode": "mask"}, "neurons"),
        ({"train_biases": "yes"}, "train_biases"),
    ],
)
def test_bad_config_names_the_field(overrides: dict[str, Any], field: str) -> None:
    fam = build("plain")
    flags, hooks = _flags(fam.model), _hooks(fam.model)
    with pytest.raises(mt.ConfigError, match=rf"KVConfig\.{field}\b"):
        modulart.kv.apply(fam.model, **overrides)
    assert _flags(fam.model) == flags and _hooks(fam.model) == hooks


def test_bad_selection_and_models_raise_before_changes() -> None:
    fam = build("llama")
    flags = _flags(fam.model)
    with pytest.raises(mt.SelectorError, match="depth 2"):
        modulart.kv.apply(fam.model, layers=5)
    with pytest.raises(mt.SelectorError, match="no FFN/MoE block"):
        modulart.kv.apply(fam.model, layers=["model.layers.9.mlp"])
    with pytest.raises(mt.ConfigError, match="neurons"):
        modulart.kv.apply(fam.model, mode="mask", neurons={"model.layers.0.mlp": [64]})
    with pytest.raises(mt.ConfigError, match="neurons"):
        modulart.kv.apply(fam.model, mode="mask", layers=[0], neurons={"model.layers.1.mlp": [0]})
    assert _flags(fam.model) == flags
    with pytest.raises(mt.UnsupportedModuleError):
        modulart.kv.apply(nn.Sequential(nn.Linear(4, 4)))


def test_config_round_trip_and_registry() -> None:
    cfg = KVConfig(target="both", mode="mask", neurons={"a.mlp": [0, 3]}, layers=[0])
    assert KVConfig.from_json(cfg.to_json()) == cfg
    assert mt.get_operator("kv") is modulart.kv.KV


# --- the contract: registered LoRA, order-independent flags, attach, state ------------------------
def _modules(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_lora_apply_remove_leaves_state_hooks_flags_and_modules_bitwise(family: str) -> None:
    fam = build(family)
    for i, p in enumerate(fam.model.parameters()):
        p.requires_grad_(i % 2 == 0)
    state, hooks, flags, modules = _state(fam.model), _hooks(fam.model), _flags(fam.model), _modules(fam.model)
    handle = modulart.kv.apply(fam.model, target="both", keys="both", mode="lora", rank=2)
    registered = [n for n in fam.model.state_dict() if n not in state]
    assert registered  # the LoRA tensors are in the model's state while the handle lives
    _loss(fam).backward()
    handle.remove()
    now = fam.model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert _hooks(fam.model) == hooks and _flags(fam.model) == flags and _modules(fam.model) == modules


@pytest.mark.parametrize("mode", ["full", "lora", "mask"])
@pytest.mark.parametrize("order", ["apply_order", "reverse"])
def test_two_handles_removed_in_any_order_restore_every_flag(mode: str, order: str) -> None:
    fam = build("llama")
    fam.model.model.embed_tokens.weight.requires_grad_(False)  # a user choice that must survive
    flags = _flags(fam.model)
    first = modulart.kv.apply(fam.model, target="keys", layers=[0], mode=mode)
    second = modulart.kv.apply(fam.model, target="values", layers=[1], mode=mode)
    assert _flags(fam.model) != flags
    for h in [first, second] if order == "apply_order" else [second, first]:
        h.remove()
    assert _flags(fam.model) == flags


def test_lora_tensors_are_model_parameters_in_optimizers_and_two_handles_share_a_module() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
    keys = list(model.state_dict())
    a = modulart.kv.apply(model, target="keys", mode="lora", rank=2)
    b = modulart.kv.apply(model, target="keys", mode="lora", rank=3, seed=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [f"0.{h}.lora_{w}" for h in ("modulart_kv_lora", "modulart_kv_lora_2") for w in "AB"]
    assert model[0].modulart_kv_lora._modulart_owned
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # any optimizer over the model sees them
    y = model(torch.randn(3, 4)).sum()
    y.backward()
    before = b.state_dict()["0.lora_B"]
    assert isinstance(before, torch.Tensor)
    opt.step()
    after = b.state_dict()["0.lora_B"]
    assert isinstance(after, torch.Tensor) and not torch.equal(before, after)
    assert mt.fingerprint(model).digest == a.fingerprint().digest  # owned tensors are not the model's
    a.remove()
    assert [n for n, _ in model.named_parameters() if "lora" in n] == [
        "0.modulart_kv_lora_2.lora_A",
        "0.modulart_kv_lora_2.lora_B",
    ]
    b.remove()
    assert list(model.state_dict()) == keys and all(p.requires_grad for p in model.parameters())


def test_fused_expert_lora_is_visible_owned_and_disable_reads_the_base_weight() -> None:
    fam = build("mixtral")
    model = fam.model
    digest = mt.fingerprint(model).digest
    base = fam.run().logits
    handle = modulart.kv.apply(model, target="both", mode="lora", rank=2)
    deltas = {id(t) for d in handle.expert_lora.values() for t in (d.lora_A, d.lora_B)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert deltas and trainable == deltas  # registered under the parametrisations, seen by named_parameters
    owned = [m for m in model.modules() if getattr(m, "_modulart_owned", False)]
    assert owned and {id(t) for m in owned for t in m.parameters()} == deltas
    assert mt.fingerprint(model).digest == digest
    with torch.no_grad():
        for d in handle.expert_lora.values():
            d.lora_B.normal_(std=0.5)
    tuned = fam.run().logits
    assert not torch.allclose(tuned, base)
    with handle.disabled():
        assert not handle.enabled
        torch.testing.assert_close(fam.run().logits, base, rtol=0, atol=0)
    torch.testing.assert_close(fam.run().logits, tuned, rtol=0, atol=0)
    handle.remove()


@pytest.mark.parametrize("mode", ["full", "mask"])
def test_merge_in_full_and_mask_keeps_the_function_and_is_remove(mode: str) -> None:
    fam = build("llama")
    flags, hooks = _flags(fam.model), _hooks(fam.model)
    handle = modulart.kv.apply(fam.model, target="both", mode=mode, neurons=0.5 if mode == "mask" else 1.0)
    opt = torch.optim.SGD(handle.param_groups(), lr=0.1)
    _loss(fam).backward()
    opt.step()
    with torch.no_grad():
        tuned = _out(fam)
        handle.merge_()
        torch.testing.assert_close(_out(fam), tuned, rtol=0, atol=0)
    assert handle.removed and _flags(fam.model) == flags and _hooks(fam.model) == hooks


class _Wrapped:
    """accelerate's AcceleratedOptimizer in miniature: the real optimizer as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_attach_unwraps_the_optimizer_and_mask_state_round_trips(tmp_path: Path) -> None:
    fam = build("llama")
    handle = modulart.kv.apply(fam.model, target="keys", mode="mask", neurons=0.25, seed=5)
    opt = torch.optim.AdamW(handle.param_groups(), lr=1e-2, weight_decay=0.1)
    handle.attach(_Wrapped(opt))
    assert handle.optimizer is opt
    keys = [f.key_proj.param for f in mt.find_ffns(fam.model)]
    before = [k.detach().clone() for k in keys]
    _loss(fam).backward()
    opt.step()
    state = handle.state_dict()
    kept = [v for k, v in state.items() if k.startswith("neurons.")]
    assert [int(v.sum()) for v in kept if isinstance(v, torch.Tensor)] == [16, 16]
    for k, old, keep in zip(keys, before, kept, strict=True):
        assert torch.equal((k.detach() != old).any(1), keep)
    handle.save(tmp_path / "mask")
    handle.remove()
    again = KVHandle.load(fam.model, tmp_path / "mask")
    loaded = again.state_dict()
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], v) for k, v in state.items())  # type: ignore[arg-type]
    other = {k: torch.ones_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    again.load_state_dict(other)  # symmetric: a live handle takes another neuron choice
    assert all(bool(v.all()) for v in again.state_dict().values() if isinstance(v, torch.Tensor))
    with pytest.raises(mt.IncompatibleArtifactError, match="differ"):
        again.load_state_dict({"neurons.nowhere": torch.ones(3, dtype=torch.bool)})
    again.remove()


def test_attach_optimizer_is_gone() -> None:
    assert not hasattr(KVHandle, "attach_optimizer")
