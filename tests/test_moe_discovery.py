"""MoE discovery and verification (DESIGN §2, "views are verified"): every MoE family built tiny from
its config gives views that recompute the block exactly — from the class table and from discovery
alone — or is refused with the reason; wrong adapters are refused with the measured error;
verification leaves no trace and probes once per block type."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import modulart as mt
from modulart.core.moe_discovery import clear_discovery_cache
from modulart.core.moe_layouts import MOE_LAYOUTS, is_builtin_layout, moe_block_parts
from modulart.core.verify import clear_verification_cache

_A = dict(num_attention_heads=2, num_key_value_heads=2, vocab_size=128, hidden_size=32, num_hidden_layers=2)
_SHARED_GROUPED = dict(
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=0,
    n_shared_experts=1,
    routed_scaling_factor=2.0,
)
CONFIGS: dict[str, dict[str, Any]] = {
    "phimoe": dict(_A, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "glm4_moe": dict(_A, **_SHARED_GROUPED, head_dim=16),
    "dots1": dict(_A, **_SHARED_GROUPED, head_dim=16),
    "deepseek_v2": dict(
        _A,
        **_SHARED_GROUPED,
        topk_method="group_limited_greedy",
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
    "ernie4_5_moe": dict(
        _A,
        intermediate_size=48,
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
    ),
    "jamba": dict(
        _A,
        intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=1,
        expert_layer_offset=0,
        attn_layer_period=1,
        attn_layer_offset=0,
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=1,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),
    "llama4_text": dict(
        _A,
        intermediate_size=24,
        intermediate_size_mlp=48,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        head_dim=16,
    ),
    "hunyuan_v1_moe": dict(_A, intermediate_size=24, num_experts=4, moe_topk=2, head_dim=16),
    "qwen3_moe": dict(
        _A,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=16,
    ),
    "minimax": dict(_A, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "granitemoe": dict(_A, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "jetmoe": dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=8,
        intermediate_size=24,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "dbrx": dict(
        vocab_size=128,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=64,
        attn_config=dict(kv_n_heads=2, clip_qkv=100.0),
        ffn_config=dict(hidden_size=32, ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2),
    ),
    "switch_transformers": dict(
        vocab_size=128,
        d_model=32,
        d_ff=24,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        num_experts=4,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        expert_capacity=3,
        decoder_start_token_id=0,
    ),
}
SEQ2SEQ = {"switch_transformers", "nllb-moe"}
REFUSED = {
    "nllb-moe": dict(
        vocab_size=128,
        d_model=32,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_experts=4,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        max_position_embeddings=64,
        decoder_start_token_id=0,
    ),
}
BLOCKS = {"switch_transformers": 4, "jetmoe": 2}  # MoE blocks per model (default 2)


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    clear_verification_cache()
    clear_discovery_cache()
    yield
    clear_verification_cache()
    clear_discovery_cache()


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny random model: routers and zero-initialised selection-bias buffers randomised too."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.for_model(name, **(CONFIGS.get(name) or REFUSED[name]))
    if name == "dbrx":  # the DBRX attention reads attn_config.rope_theta, which its config lacks
        object.__setattr__(cfg.attn_config, "rope_theta", 10000.0)
    torch.manual_seed(seed)
    if name in SEQ2SEQ:
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 1 and "norm" not in n.lower():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for n, b in model.named_buffers():
            if b.is_floating_point() and "bias" in n.rsplit(".", 1)[-1]:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
        for n, p in model.named_parameters():  # Ernie keeps its selection bias as a frozen parameter
            if n.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids = torch.randint(1, 100, (2, 9), generator=g)
    inputs = {"input_ids": ids} | ({"decoder_input_ids": ids[:, :6]} if name in SEQ2SEQ else {})
    return model.eval(), inputs


# --- the model's own behaviour, recorded with plain torch hooks -------------------------------------
def reference(model: nn.Module, inputs: dict[str, torch.Tensor], moe: mt.MoE) -> dict[str, Any]:
    """Block input / output and the routing (expert sets, weights) the block took, on a real forward."""
    seen: dict[str, Any] = {}
    block = moe.module

    def on_block(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.setdefault("x", args[0].detach().clone())
        seen.setdefault("y", (out[0] if isinstance(out, tuple) else out).detach().clone())

    def on_experts(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.setdefault("experts", [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])

    def on_router(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.setdefault("router", out)

    handles = [block.register_forward_hook(on_block)]
    if hasattr(block, "experts"):
        handles.append(block.experts.register_forward_hook(on_experts))
    if hasattr(block, "router"):
        handles.append(block.router.register_forward_hook(on_router))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    seen["sets"], seen["weights"] = _model_routing(block, seen)
    return seen


def _model_routing(block: nn.Module, seen: dict[str, Any]) -> tuple[list[set[int]], list[dict[int, float]]]:
    name = type(block).__name__
    if name == "Llama4TextMoe":  # router returns dense sigmoid scores, zero off the chosen experts
        scores = seen["router"][0]
        sets = [set(torch.nonzero(r).flatten().tolist()) for r in scores]
        return sets, [{e: float(r[e]) for e in s} for s, r in zip(sets, scores, strict=True)]
    if name == "JetMoeMoE":  # (sorted slots, token of each slot, gate of each slot, expert sizes, logits)
        _, batch_index, gates, sizes, _ = seen["router"]
        t = seen["x"].reshape(-1, seen["x"].shape[-1]).shape[0]
        sets: list[set[int]] = [set() for _ in range(t)]
        weights: list[dict[int, float]] = [{} for _ in range(t)]
        expert_of_slot = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        for tok, gate, e in zip(batch_index.tolist(), gates.tolist(), expert_of_slot.tolist(), strict=True):
            sets[tok].add(e)
            weights[tok][e] = gate
        return sets, weights
    _, sel, w = seen["experts"][:3]
    if name == "SwitchTransformersSparseMLP":  # one-hot dispatch mask [T, 1, E]: all-zero rows dropped
        mask = sel.reshape(sel.shape[0], -1)
        sets = [set(torch.nonzero(r).flatten().tolist()) for r in mask]
        return sets, [{e: float(wt) for e in s} for s, wt in zip(sets, w.reshape(-1).tolist(), strict=True)]
    sets = [set(r) for r in sel.tolist()]
    return sets, [dict(zip(i, ww, strict=True)) for i, ww in zip(sel.tolist(), w.tolist(), strict=True)]


def assert_exact(model: nn.Module, inputs: dict[str, torch.Tensor], moe: mt.MoE) -> None:
    ref = reference(model, inputs, moe)
    with torch.no_grad():
        got = moe.forward(ref["x"])
        torch.testing.assert_close(got, ref["y"].reshape(got.shape), atol=2e-6, rtol=1e-5)  # Llama4 returns [T, d]
        r = moe.route(ref["x"])
    assert ref["y"].abs().max() > 1e-3
    keep = r.weights != 0
    got = [
        {i for i, k in zip(row, kk, strict=True) if k}
        for row, kk in zip(r.indices.tolist(), keep.tolist(), strict=True)
    ]
    assert got == ref["sets"]
    for row_i, row_w, want in zip(r.indices.tolist(), r.weights.tolist(), ref["weights"], strict=True):
        for e, w in zip(row_i, row_w, strict=True):
            if e in want:
                assert w == pytest.approx(want[e], abs=1e-5)


# --- structural recognition ---------------------------------------------------------------------
PARTS = {  # (block suffix, router, routed-expert containers, shared experts), written from the modeling code
    "hunyuan_v1_moe": ("model.layers.0.mlp", "gate.wg", ["experts"], ["shared_mlp"]),
    "llama4_text": ("model.layers.0.feed_forward", "router", ["experts"], ["shared_expert"]),
    "dbrx": ("transformer.blocks.0.ffn", "router.layer", ["experts"], []),
    "jetmoe": ("model.layers.0.mlp", "router.layer", ["input_linear", "output_linear"], []),
    "switch_transformers": ("encoder.block.0.layer.1.mlp", "router.classifier", ["experts"], []),
    "glm4_moe": ("model.layers.0.mlp", "gate", ["experts"], ["shared_experts"]),
    "nllb-moe": ("model.encoder.layers.0.ffn", "router.classifier", ["experts"], []),
}


@pytest.mark.parametrize("name", sorted(PARTS))
def test_moe_block_parts_finds_routed_and_shared_experts(name: str) -> None:
    model, _ = build(name)
    parts = moe_block_parts(model)
    block, router, experts, shared = PARTS[name]
    assert block in parts
    p = parts[block]
    for layout_free in (False, True):
        assert p.experts == tuple(f"{block}.{e}" for e in experts), layout_free
        assert p.shared == tuple(f"{block}.{s}" for s in shared)
    assert p.router is not None and p.router.startswith(f"{block}.{router.split('.')[0]}")
    assert len(parts) == BLOCKS.get(name, 2) + (2 if name == "nllb-moe" else 0)
    # nothing inside a block is reported as another block (JetMoE's attention experts are not FFN MoEs)
    assert not any(a != b and a.startswith(b + ".") for a in parts for b in parts)


def test_moe_block_parts_without_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MOE_LAYOUTS, "_by_name", {})
    model, _ = build("hunyuan_v1_moe")
    p = moe_block_parts(model)["model.layers.1.mlp"]
    assert p.experts == ("model.layers.1.mlp.experts",) and p.shared == ("model.layers.1.mlp.shared_mlp",)
    assert p.router == "model.layers.1.mlp.gate"


def test_moe_block_parts_of_dense_and_hand_written_models() -> None:
    dense = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    assert moe_block_parts(dense) == {}
    clf = nn.Module()
    clf.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)) for _ in range(2)])
    clf.head = nn.Linear(4, 2)  # two rows and two layers: a coincidence, not a router
    assert moe_block_parts(clf) == {}
    clf.head = nn.Linear(4, 3)  # named neither like a router nor like experts: still a layer stack
    assert moe_block_parts(clf) == {}


# --- exact views, from the table and from discovery alone ----------------------------------------
@pytest.mark.parametrize("mode", ["table", "discovery"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_views_recompute_the_block_and_its_routing(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "discovery":
        monkeypatch.setattr(MOE_LAYOUTS, "_by_name", {})
    model, inputs = build(name)
    moes = mt.find_moes(model)
    assert len(moes) == BLOCKS.get(name, 2)
    for moe in moes:
        assert moe.verification is not None and moe.verification.ok
        assert is_builtin_layout(moe.layout) == (mode == "table")  # the table entry itself was exact
        assert_exact(model, inputs, moe)
    assert not any(f.path.startswith(m.path + ".") for f in mt.find_ffns(model, strict=False) for m in moes)


def test_switch_capacity_drops_tokens_like_the_block() -> None:
    model, inputs = build("switch_transformers")  # expert_capacity=3 for 9 tokens over 4 experts
    moe = mt.find_moes(model)[0]
    assert moe.scoring.capacity == 3
    ref = reference(model, inputs, moe)
    assert any(not s for s in ref["sets"]), "the probe must overflow an expert"
    assert_exact(model, inputs, moe)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "plain_moe"])
def test_discovery_alone_matches_the_table_on_the_view_families(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from families import build as build_family

    fam = build_family(name)
    table = mt.find_moes(fam.model)
    clear_verification_cache()
    monkeypatch.setattr(MOE_LAYOUTS, "_by_name", {})
    found = mt.find_moes(fam.model)
    assert [m.path for m in found] == [m.path for m in table]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    for a, b in zip(found, table, strict=True):
        assert [f.path for f in a.shared_experts] == [f.path for f in b.shared_experts]
        assert (a.shared_gate is None) == (b.shared_gate is None)
        with torch.no_grad():
            torch.testing.assert_close(a.forward(x), b.module(x)[0] if name == "gpt_oss" else b.module(x))
            ra, rb = a.route(x), b.route(x)
        assert [set(r) for r in ra.indices.tolist()] == [set(r) for r in rb.indices.tolist()]


# --- refusals -----------------------------------------------------------------------------------
def test_nllb_moe_is_refused_with_the_reason() -> None:
    model, _ = build("nllb-moe")
    with pytest.raises(mt.UnsupportedModuleError, match="capacity computed from the whole batch"):
        mt.find_moes(model)
    with pytest.warns(UserWarning, match="leaving out"):
        assert mt.find_moes(model, strict=False) == []
    # its experts are still not dense FFNs
    assert not any(".ffn.experts." in f.path for f in mt.find_ffns(model, strict=False))


class Experts(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(n, d, 2 * d) * 0.3)  # [E, d, 2I], up first, I == d
        self.w_out = nn.Parameter(torch.randn(n, d, d) * 0.3)  # [E, I, d]
        self.act_fn = nn.SiLU()


class SigmoidMoE(nn.Module):
    """Hand-written: sigmoid router, top-k, renormalised; transposed up-first storage with I == d, so
    every orientation has the right shapes and only the block's behaviour tells them apart."""

    def __init__(self, d: int = 8, n: int = 4, k: int = 2, temperature: float | None = None) -> None:
        super().__init__()
        self.router = nn.Linear(d, n, bias=False)
        nn.init.normal_(self.router.weight, std=1.0)
        self.experts = Experts(n, d)
        self.top_k = k
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        if self.temperature is None:
            w, idx = logits.sigmoid().topk(self.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
        else:
            top, idx = logits.topk(self.top_k, dim=-1)
            w = (top / self.temperature).softmax(-1)
        out = torch.zeros_like(flat)
        for e in range(self.experts.w_in.shape[0]):
            tok, slot = torch.where(idx == e)
            up, gate = (flat[tok] @ self.experts.w_in[e]).chunk(2, dim=-1)
            y = (self.experts.act_fn(gate) * up) @ self.experts.w_out[e]
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out.reshape(x.shape)


def _stack(**kw: Any) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SigmoidMoE(**kw), SigmoidMoE(**kw))


def test_discovery_resolves_an_ambiguous_orientation_by_behaviour() -> None:
    model = _stack()
    moe = mt.find_moes(model)[1]
    ex = model[1].experts
    e1 = moe.expert(1)
    assert moe.scoring.kind == "sigmoid_topk" and moe.scoring.normalize
    assert torch.equal(e1.up, ex.w_in[1][:, :8].t()) and torch.equal(e1.gate, ex.w_in[1][:, 8:].t())
    assert torch.equal(e1.down, ex.w_out[1].t())
    with torch.no_grad():
        e1.gate[0, 3] += 1.0  # a view: the edit reaches the stored tensor
    assert ex.w_in[1][3, 8] == e1.gate[0, 3]
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe.forward(x), model[1](x))


@pytest.mark.parametrize(
    ("wrong", "why"),
    [
        (dict(scoring="softmax_topk"), "output differs"),  # softmax registered for a sigmoid router
        (dict(scoring="sigmoid_topk", transposed=True, up_first=False), "output differs"),  # gate/up swapped
    ],
)
def test_a_wrong_adapter_is_refused_with_the_measured_error(
    wrong: dict[str, Any], why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MOE_LAYOUTS, "_by_type", dict(MOE_LAYOUTS._by_type))
    base = dict(router="router", experts="experts", storage="fused", top_k="top_k", gate_up="w_in", down="w_out")
    mt.register_moe_layout(SigmoidMoE, mt.MoELayout(**{**base, "transposed": True, "up_first": True, **wrong}))
    with pytest.raises(mt.UnsupportedModuleError) as info:
        mt.find_moes(_stack())
    msg = str(info.value)
    assert "registered adapter" in msg and why in msg and "relative error" in msg and "register_moe_layout" in msg
    assert "'0' (SigmoidMoE)" in msg


def test_a_custom_scoring_adapter_is_verified_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stack(temperature=2.0)
    with pytest.raises(mt.UnsupportedModuleError, match="no view reproduces it exactly") as info:
        mt.find_moes(model)  # no built-in rule divides the logits by a temperature
    assert "best" in str(info.value) and "error" in str(info.value)

    def score(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = logits.topk(2, dim=-1)
        return (top / 2.0).softmax(-1), idx

    monkeypatch.setattr(MOE_LAYOUTS, "_by_type", dict(MOE_LAYOUTS._by_type))
    layout = mt.MoELayout(
        router="router",
        experts="experts",
        storage="fused",
        scoring="custom",
        score_fn=score,
        top_k=2,
        gate_up="w_in",
        down="w_out",
        transposed=True,
        up_first=True,
    )
    mt.register_moe_layout(SigmoidMoE, layout)
    moes = mt.find_moes(model)
    assert moes[0].layout.storage == "fused_custom" and moes[0].verification.ok
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(moes[0].forward(x), model[0](x))


# --- verification leaves no trace and probes once per block type ----------------------------------
def _hook_state(model: nn.Module) -> list[tuple[int, int, int, bool]]:
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), m.training) for m in model.modules()
    ]


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the block of every probe forward discovery runs."""
    from modulart.core import moe_discovery

    seen: list[str] = []
    real = moe_discovery.record_block

    def counting(model: nn.Module, module: nn.Module, *a: Any, **k: Any) -> Any:
        seen.append(type(module).__name__)
        return real(model, module, *a, **k)

    monkeypatch.setattr(moe_discovery, "record_block", counting)
    return seen


def test_verification_leaves_no_trace(probes: list[str]) -> None:
    model, _ = build("glm4_moe")
    model.train()
    model.model.layers[0].mlp.experts.eval()  # a mixed state must come back exactly
    reg = mt.HookRegistry(model, name="probe-test")
    h = reg.forward("model.layers.0.mlp", lambda m, a, out: None)
    before = _hook_state(model)
    rng = torch.get_rng_state()
    grad_mode = torch.is_grad_enabled()
    moes = mt.find_moes(model)
    assert probes, "no probe ran"
    assert _hook_state(model) == before
    assert torch.equal(torch.get_rng_state(), rng) and torch.is_grad_enabled() == grad_mode
    assert all(p.grad is None for p in model.parameters())
    assert h.fired == 0 and reg.counts() == {h.name: 0}
    reg.remove()
    assert len(moes) == 2


def test_one_probe_per_block_type(probes: list[str]) -> None:
    model, _ = build("glm4_moe")
    calls: dict[str, int] = {}
    blocks = {p: m for p, m in model.named_modules() if p.endswith(".mlp")}
    handles = [
        m.register_forward_hook(lambda mod, a, o, p=p: calls.__setitem__(p, calls.get(p, 0) + 1))
        for p, m in blocks.items()
    ]
    try:
        mt.find_moes(model)
        assert len(probes) == 1
        assert calls == {"model.layers.0.mlp": 1}  # the second block of the same type is not probed
        mt.find_moes(model)
        assert len(probes) == 1 and calls == {"model.layers.0.mlp": 1}
    finally:
        for hd in handles:
            hd.remove()


def test_verify_false_is_the_documented_opt_out(monkeypatch: pytest.MonkeyPatch, probes: list[str]) -> None:
    monkeypatch.setattr(MOE_LAYOUTS, "_by_type", dict(MOE_LAYOUTS._by_type))
    mt.register_moe_layout(
        SigmoidMoE,
        mt.MoELayout(
            router="router",
            experts="experts",
            storage="fused",
            scoring="softmax_topk",
            gate_up="w_in",
            down="w_out",
            transposed=True,
        ),
    )
    moes = mt.find_moes(_stack(), verify=False)  # the wrong adapter is trusted, at the user's risk
    assert probes == [] and [m.verification for m in moes] == [None, None]
    with pytest.raises(mt.UnsupportedModuleError):
        mt.find_moes(_stack())


def test_views_run_on_the_models_dtype() -> None:
    model, _ = build("qwen3_moe")
    model.to(torch.bfloat16)
    moes = mt.find_moes(model)
    assert moes[0].verification is not None and moes[0].verification.tolerance == pytest.approx(3e-2)
    x = torch.randn(1, 6, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert moes[0].forward(x).dtype == torch.bfloat16


# --- consumers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shared"),
    [
        ("hunyuan_v1_moe", "mlp.shared_mlp"),
        ("llama4_text", "feed_forward.shared_expert"),
        ("switch_transformers", None),
    ],
)
def test_find_ffns_reports_no_routed_expert_and_shared_ones_only_on_request(name: str, shared: str | None) -> None:
    model, _ = build(name)
    assert mt.find_ffns(model, strict=False) == []
    with_shared = [f.path for f in mt.find_ffns(model, strict=False, include_shared_experts=True)]
    assert with_shared == ([f"model.layers.{i}.{shared}" for i in range(2)] if shared else [])


def test_glm4_introspection_routing_map_takes_the_models_choices() -> None:
    model, inputs = build("glm4_moe")
    moe = mt.find_moes(model)[0]
    ref = reference(model, inputs, moe)
    rec = mt.introspect.routing(model, inputs).records[0]
    assert [set(r) for r in rec.indices.tolist()] == ref["sets"]


class NeedsScale(SigmoidMoE):
    """A block that cannot be called on hidden states alone: the probe falls back to a model forward."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * scale


class TinyLM(nn.Module):
    main_input_name = "input_ids"

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"vocab_size": 50})()
        self.embed = nn.Embedding(50, 8)
        self.blocks = nn.ModuleList([NeedsScale(), NeedsScale()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for b in self.blocks:
            x = x + b(x, torch.tensor(1.0))
        return x


def test_a_block_that_needs_more_inputs_is_probed_inside_a_model_forward() -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    moes = mt.find_moes(model)
    assert [m.path for m in moes] == ["blocks.0", "blocks.1"] and moes[0].scoring.kind == "sigmoid_topk"
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(moes[1].forward(x), model.blocks[1](x, torch.tensor(1.0)))


class SharedFFN(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.w1, self.w3, self.w2, self.act = nn.Linear(d, 12), nn.Linear(d, 12), nn.Linear(12, d), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class GatedSharedMoE(SigmoidMoE):
    """Two shared experts in a ModuleList, scaled together by a sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_experts = nn.ModuleList([SharedFFN(), SharedFFN()])
        self.shared_expert_gate = nn.Linear(8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = sum(s(x) for s in self.shared_experts)
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * shared


def test_several_gated_shared_experts_are_discovered() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(GatedSharedMoE(), GatedSharedMoE())
    moe = mt.find_moes(model)[0]
    assert [f.path for f in moe.shared_experts] == ["0.shared_experts.0", "0.shared_experts.1"]
    assert moe.shared_gate is not None and moe.shared_gate.module is model[0].shared_expert_gate
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe.forward(x), model[0](x))
    assert moe_block_parts(model)["0"].shared == ("0.shared_experts",)


@pytest.mark.parametrize(("n_experts", "k"), [(2, 2), (4, 4)])
def test_every_expert_chosen_is_read_as_indices_not_a_one_hot_mask(n_experts: int, k: int) -> None:
    # with k == E the experts call's [T, k] index tensor has the shape of a one-hot [T, E] mask; it
    # was once read as one, so a correct view was refused ("routing picks other experts")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1, vocab_size=128,
        num_local_experts=n_experts, num_experts_per_tok=k, num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_()
    (moe,) = mt.find_moes(model)
    assert (moe.num_experts, moe.top_k) == (n_experts, k)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    assert_exact(model, {"input_ids": ids}, moe)


@pytest.mark.parametrize("name", ["jamba", "lfm2_moe"])
def test_convolutions_are_not_taken_for_fused_experts(name: str) -> None:
    # a Conv1d weight [C, 1, k] once passed for a fused experts tensor next to a Linear "router":
    # Jamba's Mamba mixer and LFM2's short convolution were reported as MoE blocks (and refused)
    from zoo import build as build_zoo

    model = build_zoo(name).model
    parts = moe_block_parts(model)
    assert parts and all("mamba" not in p and not p.endswith(".conv") for p in parts)
    assert [m.path for m in mt.find_moes(model)] == list(parts)
