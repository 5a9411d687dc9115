"""Grown checkpoints reload as the model grown in memory: every per-layer config key follows the plan.

For each family a tiny random model is saved, grown on disk with ``grow_checkpoint`` and reloaded
with ``from_pretrained``; the reload must equal ``grow(model, plan)``: same tensors, same logits,
same block at every position (dense / MoE, sliding / global, RoPE / NoPE). Plans a config's rules
cannot express must raise a ``ConfigError`` naming the key, with nothing written.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modulart.stacking as st
from modulart.core.errors import ConfigError, ShapeError
from modulart.stacking import layout
from modulart.stacking.blocks import find_block_list
from modulart.stacking.hfconfig import rewrite_config_dict
from modulart.stacking.layerkeys import GrowthConfigWarning, compress_pattern
from modulart.stacking.layout import grow_layout

transformers = pytest.importorskip("transformers")

_B = dict(hidden_size=32, intermediate_size=64, vocab_size=128, num_attention_heads=2, num_key_value_heads=2)
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
_ROUTED = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1)
# family -> tiny config; windows and chunks are shorter than the test sequence so that a layer
# reloaded as sliding instead of global (or chunked, or NoPE) changes the logits
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_B, num_hidden_layers=2),
    "mistral": dict(_B, num_hidden_layers=2, sliding_window=4),
    "qwen2": dict(_B, num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen2_moe": dict(
        _B,
        num_hidden_layers=4,
        decoder_sparse_step=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "qwen3_moe": dict(
        _B, num_hidden_layers=3, mlp_only_layers=[0], num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
    ),
    "mixtral": dict(_B, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(_B, num_hidden_layers=3, first_k_dense_replace=1, **_ROUTED, **_MLA),
    "deepseek_v2": dict(_B, num_hidden_layers=3, first_k_dense_replace=1, **_ROUTED, **_MLA),
    "llama4_text": dict(
        _B,
        num_hidden_layers=4,
        intermediate_size_mlp=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=2,
        attention_chunk_size=4,
        head_dim=16,
    ),
    "ernie4_5_moe": dict(
        _B, num_hidden_layers=3, moe_intermediate_size=16, moe_num_experts=4, moe_k=2, moe_layer_start_index=1
    ),
    "gpt_neo": dict(
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        vocab_size=128,
        attention_types=[[["global", "local"], 2]],
        max_position_embeddings=64,
        window_size=4,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gemma2": dict(_B, num_hidden_layers=4, sliding_window=4, head_dim=16),
    "gemma3_text": dict(
        _B,
        num_hidden_layers=4,
        sliding_window=4,
        head_dim=16,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    ),
    "granitemoe": dict(_B, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(_B, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, eos_token_id=0),
    "glm4_moe": dict(_B, num_hidden_layers=3, first_k_dense_replace=1, head_dim=16, **_ROUTED),
    "glm4_moe_lite": dict(_B, num_hidden_layers=3, **_ROUTED, **_MLA),
    "hunyuan_v1_moe": dict(_B, num_hidden_layers=2, num_experts=4, moe_topk=[1, 2], head_dim=16),
    "phimoe": dict(_B, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "lfm2_moe": dict(
        _B,
        num_hidden_layers=4,
        num_dense_layers=1,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
    ),
    "jamba": dict(
        _B,
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=2,
        mamba_dt_rank=4,
    ),
    "smollm3": dict(_B, num_hidden_layers=4, no_rope_layer_interval=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "dots1": dict(_B, num_hidden_layers=3, first_k_dense_replace=1, head_dim=16, n_shared_experts=1, **_ROUTED),
    "afmoe": dict(
        _B,
        num_hidden_layers=3,
        num_dense_layers=1,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        head_dim=16,
        sliding_window=4,
        global_attn_every_n_layers=2,
    ),
    "cohere2_moe": dict(
        _B,
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        sliding_window=4,
        head_dim=16,
    ),
    "granitemoehybrid": dict(
        _B,
        num_hidden_layers=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba", "attention"],
        mamba_d_state=4,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_conv=2,
    ),
    "gemma3n_text": dict(
        _B,
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=4,
        intermediate_size=[64, 64, 48, 48],
        num_kv_shared_layers=1,
        layer_types=["sliding_attention", "full_attention"] * 2,
        activation_sparsity_pattern=[0.0] * 4,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128,
        laurel_rank=4,
        altup_num_inputs=2,
    ),
    "exaone4": dict(_B, num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2),
    "qwen3_next": dict(
        _B,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention"] * 2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        mlp_only_layers=[0],
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        head_dim=16,
    ),
}


def _model(name: str, seed: int = 0) -> nn.Module:
    """A tiny random model; every float tensor (routers and correction biases too) drawn at random."""
    cfg = transformers.AutoConfig.for_model(name, **FAMILIES[name])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_(0.0, 0.3)
    return model


def _layers(model: nn.Module) -> nn.ModuleList:
    return find_block_list(model, "model.layers" if hasattr(model, "model") else None)[1]


def _structure(block: nn.Module) -> list[tuple[str, str]]:
    """Module classes and per-layer settings of a block (not its position)."""
    out = [(p, type(m).__name__) for p, m in block.named_modules()]
    for p, m in block.named_modules():
        for k in ("sliding_window", "is_sliding", "use_rope", "is_moe_layer", "layer_type", "attention_type"):
            if k in vars(m):
                out.append((f"{p}.{k}", repr(vars(m)[k])))
    return out


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def _check_identity(name: str, plan: st.LayerPlan, tmp: Path) -> nn.Module:
    """grow_checkpoint + from_pretrained == grow in memory (tensors, logits, per-layer blocks)."""
    model = _model(name)
    src = tmp / "src"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(src)
    want = st.grow(model, plan, blocks=BLOCKS.get(name)).eval()
    out = st.grow_checkpoint(src, tmp / "grown", plan, progress=False, blocks=BLOCKS.get(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    got.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    w, g = want.state_dict(), got.state_dict()
    assert w.keys() == g.keys()
    for k in w:
        assert torch.equal(w[k], g[k]), k
    src_layers, got_layers, want_layers = _layers(model), _layers(got), _layers(want)
    assert len(got_layers) == plan.grown_layers
    for i, s in enumerate(plan):
        assert _structure(got_layers[i]) == _structure(src_layers[s]) == _structure(want_layers[i]), (i, s)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(got, ids), _logits(want, ids), rtol=1e-5, atol=1e-6)
    gc, wc = got.config.to_dict(), want.config.to_dict()
    for k in {*layout.expand_layout(wc, plan.grown_layers)} | {"num_hidden_layers"}:
        for key in (k,) if isinstance(k, str) else k:
            assert gc.get(key) == wc.get(key), key
    return got


# --- identity on disk, family by family ------------------------------------------------------------
CASES = [
    ("llama", [0, 1, 0, 1]),
    ("qwen2_moe", "interleave"),
    ("deepseek_v3", "interleave"),
    ("llama4_text", [0, 1, 1, 2, 3, 3]),
    ("ernie4_5_moe", "interleave"),
    ("gpt_neo", "interleave"),
    ("gemma2", [1, 1, 0, 2, 3, 3]),
    ("mixtral", "stack"),
    ("mistral", [1, 0, 1]),
    ("qwen2", [0, 1, 2, 0, 1, 2]),
    ("qwen2", [2, 0, 1]),
    ("qwen2_moe", "stack"),
    ("qwen3_moe", "stack"),
    ("deepseek_v2", [0, 0, 1, 2, 2]),
    ("llama4_text", "stack"),
    ("ernie4_5_moe", [0, 1, 2, 2]),
    ("gpt_neo", [0, 0, 0, 1, 2, 3]),
    ("gemma3_text", "interleave"),
    ("granitemoe", "stack"),
    ("olmoe", "interleave"),
    ("glm4_moe", "interleave"),
    ("glm4_moe_lite", "stack"),
    ("hunyuan_v1_moe", [1, 0, 1]),
    ("phimoe", "stack"),
    ("lfm2_moe", [0, 0, 1, 2, 3]),
    ("exaone4", [0, 1, 1, 2, 3]),
    ("qwen3_next", [0, 1, 2, 3, 2, 3]),
    ("jamba", "stack"),
    ("jamba", [0, 1, 0, 1]),
    ("smollm3", [0, 1, 1, 2, 3]),
    ("dots1", "interleave"),
    ("afmoe", [0, 1, 2, 1, 2]),
    ("cohere2_moe", "interleave"),
    ("granitemoehybrid", [1, 0, 1, 2, 3]),
]
# families with several block lists
BLOCKS = {"gemma3n_text": "model.layers"}


def _plan(name: str, how: str | list[int]) -> st.LayerPlan:
    n = int(transformers.AutoConfig.for_model(name, **FAMILIES[name]).to_dict()[_depth(name)])
    if how == "stack":
        return st.LayerPlan.stack(n, 2)
    if how == "interleave":
        return st.LayerPlan.interleave(n, 2)
    assert isinstance(how, list)
    return st.LayerPlan.from_list(how, n)


def _depth(name: str) -> str:
    return "num_layers" if name == "gpt_neo" else "num_hidden_layers"


@pytest.mark.parametrize(("name", "how"), CASES, ids=[f"{n}-{h if isinstance(h, str) else 'list'}" for n, h in CASES])
def test_grown_checkpoint_reloads_as_grown_model(name: str, how: str | list[int], tmp_path: Path) -> None:
    _check_identity(name, _plan(name, how), tmp_path)


def test_per_layer_keys_follow_the_plan(tmp_path: Path) -> None:
    got = _check_identity("llama4_text", _plan("llama4_text", [0, 1, 1, 2, 3, 3]), tmp_path)
    assert got.config.moe_layers == [1, 2, 4, 5] and got.config.no_rope_layers == [1, 0, 0, 1, 0, 0]
    written = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert written["num_hidden_layers"] == 6 and written["moe_layers"] == [1, 2, 4, 5]
    ds = rewrite_config_dict(_model("deepseek_v3").config.to_dict(), st.LayerPlan.interleave(3, 2))
    assert ds["first_k_dense_replace"] == 2 and ds["num_hidden_layers"] == 6


# --- plans a rule cannot express: typed error, nothing written -------------------------------------
REFUSED = [
    ("deepseek_v3", "stack", "first_k_dense_replace = 1"),
    ("ernie4_5_moe", "stack", "moe_layer_interval = 1, moe_layer_start_index = 1, moe_layer_end_index = 2"),
    ("jamba", "interleave", "attn_layer_period = 2, attn_layer_offset = 1"),
    ("afmoe", "stack", "num_dense_layers = 1"),
    ("dots1", "stack", "first_k_dense_replace = 1"),
    ("glm4_moe", "stack", "first_k_dense_replace = 1"),
]


@pytest.mark.parametrize(("name", "how", "key"), REFUSED, ids=[r[0] for r in REFUSED])
def test_inexpressible_plan_raises_before_writing(name: str, how: str, key: str, tmp_path: Path) -> None:
    model = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "src")
    plan = _plan(name, how)
    depth = model.config.num_hidden_layers
    msg = rf"config {key} \(.*\) cannot express the grown layout: plan {re.escape(plan.describe())} gives layers"
    with pytest.raises(ConfigError, match=msg):
        st.grow_checkpoint(tmp_path / "src", tmp_path / "grown", plan, progress=False, blocks=BLOCKS.get(name))
    assert not (tmp_path / "grown").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(ConfigError, match=f"config {key}"):
        st.grow(model, plan, blocks=BLOCKS.get(name))
    assert model.config.num_hidden_layers == depth


def test_depth_sized_tensors_outside_the_blocks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 3n's per-layer input embeddings, outside the blocks, have one slice per layer: growth by
    block copies cannot grow them; refused by its config key, and by the model check without it."""
    model = _model("gemma3n_text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "src")
    plan = st.LayerPlan.interleave(4, 2)
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input = 8: cannot grow this model's depth"):
        st.grow_checkpoint(tmp_path / "src", tmp_path / "grown", plan, progress=False, blocks="model.layers")
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input = 8: cannot grow"):
        st.grow(model, plan, blocks="model.layers")
    monkeypatch.setattr(layout, "UNGROWABLE_KEYS", {})
    msg = r"tensor model\.embed_tokens_per_layer\.weight outside the block list changes with the depth"
    with pytest.raises(ConfigError, match=msg):
        st.grow_checkpoint(tmp_path / "src", tmp_path / "grown", plan, progress=False, blocks="model.layers")
    assert not (tmp_path / "grown").exists()


def test_learn_refuses_blocks_that_differ() -> None:
    model = _model("deepseek_v3")
    with pytest.raises(ShapeError, match="blocks 0 and 1 hold different parameters"):
        st.grow(model, st.LayerPlan.interleave(3, 2), operator="learn", loss_fn=lambda m: torch.zeros(()))


def test_unknown_structural_key_is_caught_by_the_model_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were first_k_dense_replace unknown to the layout rules, building the grown config still shows
    that grown layer 3 (a copy of dense layer 0) would reload as MoE."""
    model = _model("deepseek_v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "src")
    rules = tuple(k for k in layout.LAYER_KEYS if "first_k_dense_replace" not in k.keys)
    monkeypatch.setattr(layout, "LAYER_KEYS", rules)
    with (
        pytest.warns(GrowthConfigWarning, match="first_k_dense_replace = 1 looks per-layer"),
        pytest.raises(ConfigError, match=r"grown layer 3 \(a copy of layer 0\) would reload as a different block"),
    ):
        st.grow_checkpoint(tmp_path / "src", tmp_path / "grown", 2, progress=False)
    assert not (tmp_path / "grown").exists()


# --- mixed dense / MoE checkpoints: errors in the user's terms ----------------------------------------
def _mixed(tmp: Path, config: dict[str, Any] | None) -> Path:
    tmp.mkdir()
    tensors = {
        "layers.0.mlp.w": torch.ones(2),
        "layers.1.moe.router": torch.ones(2),
        "layers.2.moe.router": torch.ones(2),
    }
    save_file(tensors, str(tmp / "model.safetensors"))
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config))
    return tmp


def test_mixed_layers_grow_with_their_config_and_explain_themselves_without(tmp_path: Path) -> None:
    plan = st.LayerPlan.interleave(3, 2)
    ok = _mixed(tmp_path / "ok", {"num_hidden_layers": 3, "first_k_dense_replace": 1})
    out = st.grow_checkpoint(ok, tmp_path / "ok_out", plan, progress=False)
    assert json.loads((out / "config.json").read_text())["first_k_dense_replace"] == 2
    bare = _mixed(tmp_path / "bare", None)
    with pytest.raises(
        ConfigError, match=r"tensor layers\.0\.moe\.router is missing \(layer 1 has it\).*without a config"
    ):
        st.grow_checkpoint(bare, tmp_path / "bare_out", plan, progress=False)
    wrong = _mixed(tmp_path / "wrong", {"num_hidden_layers": 3, "first_k_dense_replace": 2})
    with pytest.raises(
        ConfigError, match=r"layers\.0\.moe\.router is missing: layer 1, which the config gives the same"
    ):
        st.grow_checkpoint(wrong, tmp_path / "wrong_out", plan, progress=False)
    assert not (tmp_path / "bare_out").exists() and not (tmp_path / "wrong_out").exists()


# --- the layout rules themselves -------------------------------------------------------------------
def test_rules_express_what_they_can_and_refuse_the_rest() -> None:
    ernie = {"moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 2}
    # source (4 layers): dense, MoE, dense, MoE; stacked twice every second layer is MoE
    assert grow_layout(ernie, st.LayerPlan.stack(4, 2), 4) == {
        "moe_layer_interval": 2,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 7,
    }
    with pytest.raises(ConfigError, match=r"moe_layer_interval = 2.*gives layers"):
        grow_layout(ernie, st.LayerPlan.from_list([1, 1, 0, 3], 4), 4)
    qwen = {"decoder_sparse_step": 2, "mlp_only_layers": [], "num_experts": 4}
    assert grow_layout(qwen, st.LayerPlan.stack(2, 2), 2) == {"decoder_sparse_step": 2, "mlp_only_layers": []}
    assert grow_layout(qwen, st.LayerPlan.interleave(2, 2), 2) == {"decoder_sparse_step": 1, "mlp_only_layers": [0, 1]}
    jamba = {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1}
    assert grow_layout(jamba, st.LayerPlan.stack(2, 2), 2) == jamba
    with pytest.raises(ConfigError, match=r"attn_layer_period = 2, attn_layer_offset = 1 .* cannot express"):
        grow_layout(jamba, st.LayerPlan.interleave(2, 2), 2)
    kv = {"num_kv_shared_layers": 1}
    assert grow_layout(kv, st.LayerPlan.interleave(2, 2), 2) == {"num_kv_shared_layers": 2}
    with pytest.raises(ConfigError, match=r"num_kv_shared_layers = 1 .*last k layers"):
        grow_layout(kv, st.LayerPlan.stack(2, 2), 2)
    # the seed of an explicit list is left alone: the list decides
    llama4 = {"interleave_moe_layer_step": 2, "moe_layers": [1]}
    assert grow_layout(llama4, st.LayerPlan.interleave(2, 2), 2) == {"moe_layers": [2, 3]}
    assert grow_layout({"interleave_moe_layer_step": 2}, st.LayerPlan.stack(2, 2), 2) == {
        "interleave_moe_layer_step": 2
    }
    with pytest.raises(ConfigError, match=r"interleave_moe_layer_step = 2 .* no per-layer list \(moe_layers\)"):
        grow_layout({"interleave_moe_layer_step": 2}, st.LayerPlan.from_list([1, 0, 0], 2), 2)
    assert compress_pattern(["global", "local", "local"]) == [[["global"], 1], [["local"], 2]]


def test_unknown_and_ungrowable_keys() -> None:
    plan = st.LayerPlan.interleave(2, 2)
    with pytest.warns(GrowthConfigWarning, match="dense_layer_ids = \\[0\\] looks per-layer.*list of layer indices"):
        assert grow_layout({"dense_layer_ids": [0]}, plan, 2) == {"dense_layer_ids": [0, 1]}
    with pytest.warns(GrowthConfigWarning, match="per_layer_scales.*one entry per layer"):
        assert grow_layout({"per_layer_scales": [1.0, 2.0]}, plan, 2) == {"per_layer_scales": [1.0, 1.0, 2.0, 2.0]}
    with pytest.warns(GrowthConfigWarning, match="moe_layer_frequency = 2 .*left unchanged"):
        grow_layout({"moe_layer_frequency": 2}, plan, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer, whatever the plan: nothing to report
        assert grow_layout({"moe_layer_freq": 1}, plan, 2) == {}
    with pytest.raises(ConfigError, match="max_window_layers = 1 decides the per-layer layer_types"):
        grow_layout({"max_window_layers": 1}, plan, 2)
    with pytest.raises(ConfigError, match="ple_layer_ids = \\[1\\]: cannot grow"):
        grow_layout({"ple_layer_ids": [1]}, plan, 2)
    with pytest.raises(ConfigError, match=r"config\['layer_types'\] has 3 entries; expected one per layer \(2\)"):
        grow_layout({"layer_types": ["a", "b", "c"]}, plan, 2)


def test_model_check_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-layer differences raise; a setting every layer changes with the depth only warns."""
    from modulart.stacking import skeleton

    def sig(kind: str, scale: int) -> skeleton.Signature:
        return (((kind, "Block"),), ((f"{kind}.w", (2,)),), (("scale", str(scale)),))

    src = [sig("dense", 2), sig("moe", 2)]
    layers = {"src": src}
    monkeypatch.setattr(skeleton, "build_skeleton", lambda cfg, blocks: skeleton.Skeleton(layers[cfg["name"]], {}))
    plan = st.LayerPlan.stack(2, 2)
    layers["depth"] = [sig("dense", 4), sig("moe", 4)] * 2
    with pytest.warns(GrowthConfigWarning, match="depends on the model's depth"):
        assert skeleton.check_grown_config({"name": "src"}, {"name": "depth"}, plan, None)
    layers["layer"] = [sig("dense", 2), sig("moe", 2), sig("dense", 2), sig("moe", 3)]
    with pytest.raises(ConfigError, match=r"grown layer 3 \(a copy of layer 1\) would reload as a different block"):
        skeleton.check_grown_config({"name": "src"}, {"name": "layer"}, plan, None)
    layers["moe"] = [sig("dense", 2), sig("moe", 2), sig("moe", 2), sig("moe", 2)]
    keyed = {"name": "src", "first_k_dense_replace": 1}
    with pytest.raises(ConfigError, match=r"grown layer 2 \(a copy of layer 0\).*tensors of the source layer"):
        skeleton.check_grown_config(keyed, {"name": "moe"}, plan, None)
    # without any per-layer key, only block 0 differing is the model class's doing (T5): a warning
    with pytest.warns(GrowthConfigWarning, match="gives only its first block"):
        assert skeleton.check_grown_config({"name": "src"}, {"name": "moe"}, plan, None)
    assert skeleton.check_grown_config({"name": "src"}, {"name": "src"}, st.LayerPlan.stack(2, 1), None)


def test_growing_a_decoder_rewrites_the_config_copy_its_stack_keeps() -> None:
    # T5-style models give each stack its own config copy; the decoder sizes its KV cache from it,
    # so a grown decoder whose copy kept the old depth failed at the first forward (IndexError)
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    import modulart as mt

    cfg = AutoConfig.for_model(
        "umt5", d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
        vocab_size=128, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    big = mt.stacking.grow(model, 2, blocks="decoder.block").eval()
    assert big.decoder.config.num_layers == 4 and big.config.num_decoder_layers == 4
    assert big.encoder.config.num_layers == 2
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = big(input_ids=ids, decoder_input_ids=ids[:, :5])
    assert out.logits.shape == (2, 5, 128)


def test_t5_copies_of_block_0_drop_its_relative_bias_and_reload_exactly(tmp_path: Path) -> None:
    # T5 builds the relative attention bias into block 0 only and hands position_bias to the later
    # blocks; growth once kept the bias in later copies, so the checkpoint reloaded with other keys
    import copy

    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    import modulart as mt

    cfg = AutoConfig.for_model(
        "t5", d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2, vocab_size=128,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    big = mt.stacking.grow(mt.stacking.grow(model, 2, blocks="encoder.block"), 2, blocks="decoder.block").eval()
    attn = big.decoder.block[2].layer[0].SelfAttention
    assert not attn.has_relative_attention_bias and not hasattr(attn, "relative_attention_bias")
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    kept = copy.deepcopy(big)  # the copy as it was: its own bias, never used (position_bias is passed in)
    for stack in (kept.encoder, kept.decoder):
        a = stack.block[2].layer[0].SelfAttention
        a.has_relative_attention_bias = True
        a.relative_attention_bias = copy.deepcopy(stack.block[0].layer[0].SelfAttention.relative_attention_bias)
    with torch.no_grad():
        torch.testing.assert_close(big(**inputs).logits, kept(**inputs).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "small")
    mid = mt.stacking.grow_checkpoint(tmp_path / "small", tmp_path / "mid", 2, blocks="encoder.block", progress=False)
    out = mt.stacking.grow_checkpoint(mid, tmp_path / "big", 2, blocks="decoder.block", progress=False)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert loaded.state_dict().keys() == big.state_dict().keys()
    assert all(torch.equal(v, big.state_dict()[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, big(**inputs).logits)
    with pytest.raises(mt.ConfigError, match="must be a copy of block 0"):
        mt.stacking.grow(model, mt.stacking.LayerPlan.from_list([1, 0], 2), blocks="decoder.block")
