"""Live and streamed introspection agree: one source of truth for which tensors make up which expert.

For every MoE family that builds tiny from its config, ``report(saved_dir)`` must equal
``report(model)`` — same layers, same members (shared experts included) and the same numbers — for
the checkpoint ``save_pretrained`` writes (historical key names), for checkpoints written by hand
with the legacy names (Mixtral per-expert ``w1/w2/w3``, GraniteMoE ``input_linear`` /
``output_linear`` / ``router.layer``) and with the in-memory names; a family the live MoE view
refuses is refused by the streamed reader too, with a typed error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modulart as mt
import modulart.introspect as mi
from modulart.core.errors import IncompatibleArtifactError, UnsupportedModuleError
from modulart.introspect.footprint import footprint
from modulart.introspect.stored import StoredMatrix, checkpoint_index

REFUSED = (UnsupportedModuleError, IncompatibleArtifactError)
_A = {"num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64}
_K = {"num_experts_per_tok": 2}
_T = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# model_type -> config (hidden 32, 2-3 layers, 4 experts); every entry builds in well under a second
FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_local_experts=4, **_K, **_A),
    "qwen2_moe": dict(  # shared expert of another width, behind a sigmoid gate
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        **_A,
    ),
    "qwen3_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_experts=4, **_K, **_A
    ),
    "olmoe": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_experts=4, **_K, **_A, **_T),
    "deepseek_v3": dict(  # layer 0 dense, shared experts, sigmoid + selection bias, groups
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_shared_experts=1,
        **_A,
    ),
    "gpt_oss": dict(
        hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, head_dim=16, **_K, **_A
    ),
    "granitemoe": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, **_K, **_A),
    "granitemoeshared": dict(
        hidden_size=32,
        intermediate_size=16,
        shared_intermediate_size=24,
        num_hidden_layers=2,
        num_local_experts=4,
        **_K,
        **_A,
    ),
    "phimoe": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, **_K, **_A),
    "jamba": dict(  # attention layers only: the Mamba mixer is not what is tested here
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_experts=4,
        **_K,
        expert_layer_period=1,
        expert_layer_offset=0,
        attn_layer_period=1,
        attn_layer_offset=0,
        use_mamba_kernels=False,
        **_A,
    ),
    "dbrx": dict(
        d_model=32,
        n_heads=2,
        n_layers=2,
        vocab_size=64,
        max_seq_len=64,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
    ),
    "jetmoe": dict(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_local_experts=4,
        **_K,
        num_key_value_heads=2,
        kv_channels=16,
        vocab_size=64,
    ),
    "glm4_moe": dict(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        head_dim=16,
        **_A,
    ),
    "llama4_text": dict(
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_hidden_layers=2,
        num_local_experts=4,
        head_dim=16,
        **_A,
    ),
    "hunyuan_v1_moe": dict(
        hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_experts=4, moe_topk=2, head_dim=16, **_A
    ),
    "ernie4_5_moe": dict(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        moe_num_experts=4,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        **_A,
    ),
    "switch_transformers": dict(
        d_model=32,
        d_kv=8,
        d_ff=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        vocab_size=64,
        num_experts=4,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        decoder_start_token_id=0,
    ),
}
SEQ2SEQ = {"switch_transformers"}
# families whose MoE blocks hold shared experts (a live view that accepts them must show them)
WITH_SHARED = {"qwen2_moe", "deepseek_v3", "glm4_moe", "llama4_text", "hunyuan_v1_moe", "ernie4_5_moe"}
# zero-initialised tensors that take part in routing
_SELECTION = ("e_score_correction_bias", "expert_bias")


def build(name: str, seed: int = 0) -> nn.Module:
    """A tiny model of ``name`` with every weight random (HF initialises routers to zero) but norms."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(name, **FAMILIES[name])
    auto = AutoModelForSeq2SeqLM if name in SEQ2SEQ else AutoModelForCausalLM
    model = auto.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 1 and "norm" not in n.lower():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if n.rsplit(".", 1)[-1] in _SELECTION else 0.2))
        for n, b in model.named_buffers():
            if n.rsplit(".", 1)[-1] in _SELECTION:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return model.eval()


def _report(source: Any) -> mi.Report:
    return mi.report(source, progress=False, budget_mb=0.002)  # a tiny budget: many chunks per matrix


def assert_same(live: mi.Report, streamed: mi.Report) -> None:
    assert streamed.layers == live.layers
    assert streamed.members == live.members and streamed.kinds == live.kinds
    assert streamed.arrays.keys() == live.arrays.keys()
    for k, v in live.arrays.items():
        w = streamed.arrays[k]
        assert w.shape == v.shape, k
        assert torch.allclose(w.double(), v.double(), rtol=1e-5, atol=1e-5, equal_nan=True), (k, w, v)


def _moe_tensors_only(directory: Path, tensors: dict[str, torch.Tensor], config: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config.save_pretrained(directory)
    return directory


# --- every family: save_pretrained -> streamed report == live report ------------------------------
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_streamed_report_equals_live_report(tmp_path: Path, name: str) -> None:
    model = build(name)
    model.save_pretrained(tmp_path)
    try:
        live = _report(model)
    except UnsupportedModuleError:
        with pytest.raises(REFUSED):  # refused live: refused streamed, never read differently
            _report(tmp_path)
        return
    assert mi.CheckpointSource(tmp_path).mode == "config"
    streamed = _report(tmp_path)
    assert_same(live, streamed)
    if name in WITH_SHARED:
        assert "shared" in streamed.kinds, f"{name}: the MoE view shows no shared expert"


def test_sharded_checkpoint_with_base_model_names_reads_the_same(tmp_path: Path) -> None:
    model = build("qwen2_moe")
    live = _report(model)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert_same(live, _report(tmp_path / "sharded"))
    base = {k.removeprefix("model."): v for k, v in model.state_dict().items() if k.startswith("model.")}
    assert_same(live, _report(_moe_tensors_only(tmp_path / "base", base, model.config)))  # no "model." prefix


def test_in_memory_names_are_read_too(tmp_path: Path) -> None:
    """A checkpoint of the v5 parameters as they are (fused ``experts.gate_up_proj``), not converted."""
    for name in ("mixtral", "granitemoe", "gpt_oss"):
        model = build(name)
        d = _moe_tensors_only(tmp_path / name, dict(model.state_dict()), model.config)
        assert any(k.endswith("experts.gate_up_proj") for k in checkpoint_index(d))
        assert_same(_report(model), _report(d))


# --- legacy key names written by hand -------------------------------------------------------------
def test_legacy_mixtral_per_expert_keys(tmp_path: Path) -> None:
    model = build("mixtral")
    tensors: dict[str, torch.Tensor] = {}
    for moe in mt.find_moes(model):
        block = f"model.layers.{moe.layer}.block_sparse_moe"
        tensors[f"{block}.gate.weight"] = moe.router_weight
        for e in moe.experts():
            for w, t in (("w1", e.gate), ("w3", e.up), ("w2", e.down)):
                tensors[f"{block}.experts.{e.index}.{w}.weight"] = t
    d = _moe_tensors_only(tmp_path / "mixtral", tensors, model.config)
    assert not any("mlp" in k for k in checkpoint_index(d))
    assert_same(_report(model), _report(d))


def test_legacy_granitemoe_keys(tmp_path: Path) -> None:
    model = build("granitemoe")
    renames = {
        "experts.gate_up_proj": "input_linear.weight",  # [E, 2I, d], gate rows first
        "experts.down_proj": "output_linear.weight",  # [E, d, I]
        "router.weight": "router.layer.weight",
    }
    tensors = {}
    for k, v in model.state_dict().items():
        for new, old in renames.items():
            if k.endswith(f"block_sparse_moe.{new}"):
                tensors[k.removesuffix(new) + old] = v
    assert len(tensors) == 3 * 2
    d = _moe_tensors_only(tmp_path / "granite", tensors, model.config)
    src = mi.CheckpointSource(d)
    assert getattr(src.layer(0).tensor(0, "act"), "key", None) == "model.layers.0.block_sparse_moe.input_linear.weight"
    assert_same(_report(model), _report(d))


def test_legacy_names_are_read_as_the_same_numbers_not_just_the_same_shapes(tmp_path: Path) -> None:
    """Swapping w1 and w3 on disk (same shapes) must change what is read: the names carry the roles."""
    model = build("mixtral")
    moe = mt.find_moes(model)[0]
    tensors: dict[str, torch.Tensor] = {"model.layers.0.block_sparse_moe.gate.weight": moe.router_weight}
    for e in moe.experts():
        b = f"model.layers.0.block_sparse_moe.experts.{e.index}"
        tensors |= {f"{b}.w1.weight": e.up, f"{b}.w3.weight": e.gate, f"{b}.w2.weight": e.down}  # swapped
    cfg = model.config
    cfg.num_hidden_layers = 1
    reader = mi.CheckpointSource(_moe_tensors_only(tmp_path / "swapped", tensors, cfg)).layer(0)
    assert torch.equal(reader.tensor(2, "act").full(), moe.expert(2).up.detach())
    assert torch.equal(reader.tensor(2, "up").full(), moe.expert(2).gate.detach())


# --- refusals -------------------------------------------------------------------------------------
def test_a_family_the_views_refuse_is_refused_streamed(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    cfg = AutoConfig.for_model(
        "nllb-moe",
        d_model=32,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        vocab_size=64,
        num_experts=4,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        max_position_embeddings=64,
    )
    model = AutoModelForSeq2SeqLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModuleError) as live:
        mt.find_moes(model)
    with pytest.raises(UnsupportedModuleError) as streamed:
        mi.report(tmp_path, progress=False)
    assert "NllbMoeSparseMLP" in str(live.value) and "NllbMoeSparseMLP" in str(streamed.value)


def test_a_dense_model_is_refused_like_live(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, **_A)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModuleError, match="no MoE block"):
        mt.find_moes(model)
    with pytest.raises(UnsupportedModuleError, match="no MoE block"):
        mi.report(tmp_path, progress=False)


def test_a_missing_tensor_names_every_form_it_was_looked_for_in(tmp_path: Path) -> None:
    model = build("mixtral")
    model.save_pretrained(tmp_path)
    tensors = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.experts.down_proj" not in k}
    d = _moe_tensors_only(tmp_path / "partial", tensors, model.config)
    with pytest.raises(IncompatibleArtifactError, match=r"layers\.1\.mlp\.experts\.down_proj.*block_sparse_moe"):
        mi.CheckpointSource(d)


def test_blocks_are_verified_for_real_when_discovery_verifies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Discovery on the weightless model skips the forward check; one real block per kind is checked."""
    import modulart.introspect.skeleton as sk

    model = build("olmoe")
    model.save_pretrained(tmp_path)
    calls: list[tuple[bool, bool]] = []
    real = sk.find_moes

    def fake(m: nn.Module, selector: Any = None, *, strict: bool = True, verify: bool = True) -> Any:
        t = next(m.parameters())
        calls.append((verify, t.is_meta))
        if verify:
            assert not t.is_meta and all(bool(p.isfinite().all()) for p in m.parameters())
            raise UnsupportedModuleError("probe says no")
        return real(m, selector, strict=strict, verify=verify)

    monkeypatch.setattr(sk, "find_moes", fake)
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.0\.mlp .*probe says no"):
        mi.CheckpointSource(tmp_path)
    assert calls == [(False, True), (True, False)]  # the meta model without, one real block with

    def elsewhere(m: nn.Module, selector: Any = None, *, strict: bool = True, verify: bool = True) -> Any:
        return real(m, selector, strict=strict, verify=verify) if not verify else []  # verified: not this block

    monkeypatch.setattr(sk, "find_moes", elsewhere)
    with pytest.raises(UnsupportedModuleError, match="reads other tensors"):
        mi.CheckpointSource(tmp_path)
    assert mi.CheckpointSource(tmp_path, verify=False).layer_indices == [0, 1]  # the opt-out skips the check


# --- the fallback without config.json ------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v3",
        "gpt_oss",
        "phimoe",
        "jamba",
        "glm4_moe",
        "ernie4_5_moe",
    ],
)
def test_without_config_key_names_give_the_same_report(tmp_path: Path, name: str) -> None:
    model = build(name)
    model.save_pretrained(tmp_path)
    with_config = _report(tmp_path)
    (tmp_path / "config.json").unlink()
    assert mi.CheckpointSource(tmp_path).mode == "keys"
    assert_same(with_config, _report(tmp_path))


def test_without_config_ambiguous_transposed_storage_is_refused(tmp_path: Path) -> None:
    """Llama 4's [E, d, 2I] gate/up is concatenated, GPT-OSS's interleaved: only the config can tell."""
    model = build("llama4_text")
    model.save_pretrained(tmp_path)
    _report(tmp_path)  # with the config: fine
    (tmp_path / "config.json").unlink()
    with pytest.raises(IncompatibleArtifactError, match="cannot tell GPT-OSS's interleaved"):
        mi.CheckpointSource(tmp_path)


# --- the reader itself ----------------------------------------------------------------------------
def test_any_strided_view_is_read_back_exactly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    stored = {"fused": torch.randn(3, 10, 6, generator=g), "flat": torch.randn(12, 5, generator=g)}
    save_file(stored, str(tmp_path / "model.safetensors"))
    index = checkpoint_index(tmp_path)
    f, flat = stored["fused"], stored["flat"]
    views = {
        "fused": [f[1][:5], f[2][5:], f[0][:, ::2].t(), f[2][:, 1::2].t(), f[1].t(), f[0][3:4]],
        "flat": [flat.view(3, 4, 5)[1], flat.view(3, 4, 5)[2].t(), flat[::3], flat],
    }
    for key, vs in views.items():
        for v in vs:
            r = StoredMatrix(index[key], key, footprint(v, stored[key]))
            assert torch.equal(r.full(), v), (key, v.shape, v.stride())
            n = min(3, r.shape[r.chunk_axis])
            parts = torch.cat([r.chunk(c, n).tensor for c in range(n)], dim=r.chunk_axis)
            assert torch.equal(parts, v)
    with pytest.raises(ValueError, match="not a strided selection"):
        footprint(f[0][:, [0, 2, 1]], f)  # a copy: its strides fit no dimension of the stored tensor


# --- the dense reference F, memory ------------------------------------------------------------------
def test_dense_reference_checkpoint_is_read_through_its_ffn_views(tmp_path: Path) -> None:
    """GPT-2 keeps its FFN in transposed Conv1D weights (``mlp.c_fc.weight [d, d_ff]``): no key pattern."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    dense.save_pretrained(tmp_path / "gpt2")
    assert mi.DenseCheckpoint(tmp_path / "gpt2").mode == "config"
    model = build("mixtral")
    live = mi.report(model, dense=dense, progress=False, budget_mb=0.002)
    streamed = mi.report(model, dense=tmp_path / "gpt2", progress=False, budget_mb=0.002)
    assert live.members[-1] == "F" and not bool(live.arrays["s2.act"][:, -1, :-1].isnan().any())
    assert_same(live, streamed)
    model.save_pretrained(tmp_path / "moe")  # both streamed
    assert_same(live, mi.report(tmp_path / "moe", dense=tmp_path / "gpt2", progress=False, budget_mb=0.002))


def test_reads_stay_within_the_chunk_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = build("qwen2_moe")
    model.save_pretrained(tmp_path)
    sizes: list[tuple[int, int]] = []  # (elements read, elements of the whole matrix)
    read = StoredMatrix.read

    def spy(self: StoredMatrix, start: int, stop: int, axis: int) -> Any:
        block = read(self, start, stop, axis)
        sizes.append((block.tensor.numel(), self.shape[0] * self.shape[1]))
        return block

    monkeypatch.setattr(StoredMatrix, "read", spy)
    budget = 1024  # bytes (fp32) of one chunk of a layer's same-shape members
    mi.weights(tmp_path, budget_mb=budget / (1 << 20), progress=False).expert_similarity("act")
    assert len(sizes) > 2 * 5  # 2 layers x 5 members (act [16, 32] x 4, shared [48, 32]), in several chunks
    assert max(n for n, _ in sizes) * 4 <= budget
    big = [(n, whole) for n, whole in sizes if whole * 4 > budget]  # every expert matrix; not the routers
    assert len(big) > 10 and all(n < whole for n, whole in big)  # none of them is ever read whole


def test_quantized_expert_tensors_are_named_as_the_reason(tmp_path: Path) -> None:
    model = build("gpt_oss")
    tensors = {k: v for k, v in model.state_dict().items() if "experts.gate_up_proj" not in k or "bias" in k}
    for layer in range(2):  # MXFP4 as released: uint8 blocks and scales instead of gate_up_proj
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj_blocks"] = torch.zeros(4, 32, 1, 16, dtype=torch.uint8)
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj_scales"] = torch.zeros(4, 32, 1, dtype=torch.uint8)
    d = _moe_tensors_only(tmp_path / "mxfp4", tensors, model.config)
    with pytest.raises(IncompatibleArtifactError, match=r"gate_up_proj'.*quantized tensors such as .*_blocks"):
        mi.CheckpointSource(d)
