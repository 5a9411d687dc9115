"""MoE views (DESIGN §2, "Views, not module surgery"): discovery, routing, recomputation, canonical
per-expert weights over fused / interleaved-transposed / module-list storage, and shared experts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import modulart as mt
from families import MOE_FAMILIES, Family, build
from view_helpers import capture, changed, snapshot

ATOL = 1e-5

# written down independently of modulart's layout tables
NUM_EXPERTS = {"mixtral": 4, "qwen2_moe": 4, "olmoe": 8, "deepseek_v3": 8, "gpt_oss": 4, "plain_moe": 4}
D_EXPERT = {"mixtral": 48, "qwen2_moe": 16, "olmoe": 16, "deepseek_v3": 16, "gpt_oss": 16, "plain_moe": 64}
SCORING = {
    "mixtral": "softmax_topk",
    "qwen2_moe": "softmax_topk",
    "olmoe": "softmax_topk",
    "deepseek_v3": "sigmoid_grouped",
    "gpt_oss": "topk_softmax",
    "plain_moe": "softmax_topk",
}
STORAGE = {"gpt_oss": "fused_interleaved_t", "plain_moe": "module_list"}  # the rest: "fused"
ROUTER = {"gpt_oss": "router", "plain_moe": "router"}  # the rest: "gate"
PATHS = {
    "deepseek_v3": ["model.layers.1.mlp", "model.layers.2.mlp"],
    "plain_moe": ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"],
}
SHARED = {"qwen2_moe": ["shared_expert"], "deepseek_v3": ["shared_experts"]}
FUSED = [n for n in MOE_FAMILIES if n not in STORAGE]


def paths(name: str) -> list[str]:
    return PATHS.get(name, ["model.layers.0.mlp", "model.layers.1.mlp"])


def block_io(fam: Family, moe: mt.MoE) -> tuple[torch.Tensor, torch.Tensor]:
    cap = capture(fam, {"x": moe.input_site, "y": moe.output_site})
    return cap["x"], cap["y"]


def reference_route(name: str, moe: mt.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices) as the model itself routes ``x [T, d]``."""
    with torch.no_grad():
        if name == "plain_moe":  # the hand-written block: softmax, top-k, renormalise
            probs = moe.module.router(x).softmax(-1)
            w, idx = probs.topk(moe.module.top_k, dim=-1)
            return w / w.sum(-1, keepdim=True), idx
        _, w, idx = moe.router(x)  # HF routers return (logits, weights, indices)
        return w, idx


def by_expert(weights: torch.Tensor, indices: torch.Tensor) -> list[dict[int, float]]:
    return [dict(zip(i.tolist(), w.tolist(), strict=True)) for w, i in zip(weights, indices, strict=True)]


# --- discovery and shape ------------------------------------------------------------------------
def test_families_give_routers_and_selection_biases_nonzero_values() -> None:
    """Guards tests/families.py: with zero routers (the HF init) routing would be a tie everywhere."""
    for name in MOE_FAMILIES:
        for moe in mt.find_moes(build(name).model):
            assert moe.router_weight.abs().min() > 0, name
            if name == "deepseek_v3":
                assert moe.selection_bias is not None and moe.selection_bias.abs().min() > 0


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_find_moes_discovers_every_block(name: str) -> None:
    fam = build(name)
    moes = mt.find_moes(fam.model)
    assert len(moes) == fam.n_moe
    assert [m.path for m in moes] == paths(name)
    assert [m.layer for m in moes] == [int(p.split(".")[-2]) for p in paths(name)]
    for m in moes:
        assert m.module is fam.model.get_submodule(m.path)
        assert m.num_experts == NUM_EXPERTS[name] and m.top_k == 2
        assert m.router is m.module.get_submodule(ROUTER.get(name, "gate"))
        assert tuple(m.router_weight.shape) == (m.num_experts, 32) and m.d_model == 32
        assert m.router_weight.data_ptr() == m.router.weight.data_ptr()
        assert m.scoring.kind == SCORING[name]
        assert m.layout.storage == STORAGE.get(name, "fused")
        assert m.d_expert == D_EXPERT[name]
        assert (m.router_bias is not None) == (name == "gpt_oss")


def test_scoring_parameters_come_from_the_model() -> None:
    (m,) = mt.find_moes(build("deepseek_v3").model, "layers.1.mlp")
    gate = m.module.gate
    assert (m.scoring.n_group, m.scoring.topk_group, m.scoring.scaling) == (2, 1, 2.5)
    assert m.selection_bias is gate.e_score_correction_bias  # the live buffer, not a copy
    assert m.scoring.normalize is bool(gate.norm_topk_prob)
    (q,) = mt.find_moes(build("qwen2_moe").model, "layers.0.mlp")
    assert q.scoring.normalize is False  # families set norm_topk_prob=False
    (mx,) = mt.find_moes(build("mixtral").model, "layers.0.mlp")
    assert mx.scoring.normalize is True and mx.selection_bias is None


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_expert_views_have_canonical_shapes(name: str) -> None:
    (m, *_) = mt.find_moes(build(name).model)
    experts = m.experts()
    assert [e.index for e in experts] == list(range(m.num_experts))
    for e in experts:
        assert tuple(e.gate.shape) == (D_EXPERT[name], 32)
        assert tuple(e.up.shape) == (D_EXPERT[name], 32)
        assert tuple(e.down.shape) == (32, D_EXPERT[name])
    with pytest.raises(IndexError):
        m.expert(m.num_experts)


# --- recomputation ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_forward_recomputes_the_block_output(name: str) -> None:
    fam = build(name)
    for moe in mt.find_moes(fam.model):
        x, y = block_io(fam, moe)
        assert x.shape == y.shape and x.shape[-1] == 32
        with torch.no_grad():
            torch.testing.assert_close(moe.forward(x), y, atol=ATOL, rtol=1e-5)
        assert y.abs().max() > 1e-3


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_route_matches_the_models_router(name: str) -> None:
    fam = build(name)
    for moe in mt.find_moes(fam.model):
        x = block_io(fam, moe)[0].reshape(-1, moe.d_model)
        with torch.no_grad():
            r = moe.route(x)
        ref_w, ref_idx = reference_route(name, moe, x)
        t = x.shape[0]
        assert r.indices.shape == r.weights.shape == (t, 2)
        assert r.logits.shape == r.scores.shape == (t, moe.num_experts)
        assert [set(i) for i in r.indices.tolist()] == [set(i) for i in ref_idx.tolist()]
        got, want = by_expert(r.weights, r.indices), by_expert(ref_w, ref_idx)
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for k in g:
                assert g[k] == pytest.approx(w[k], abs=1e-6)


def test_deepseek_selection_bias_changes_the_choice_not_the_weights() -> None:
    fam = build("deepseek_v3")
    moe = mt.find_moes(fam.model)[0]
    x = block_io(fam, moe)[0].reshape(-1, moe.d_model)
    assert moe.selection_bias is not None
    with torch.no_grad():
        biased = moe.route(x)
        saved = moe.selection_bias.clone()
        moe.selection_bias.zero_()
        try:
            unbiased = moe.route(x)
        finally:
            moe.selection_bias.copy_(saved)
    differ = [set(a) != set(b) for a, b in zip(biased.indices.tolist(), unbiased.indices.tolist(), strict=True)]
    assert any(differ), "the selection bias must matter on this input"
    # the weights are the (bias-free) sigmoid scores of the chosen experts, renormalised and scaled
    s = torch.sigmoid(biased.logits.float()).gather(1, biased.indices)
    torch.testing.assert_close(biased.weights, s / s.sum(-1, keepdim=True) * 2.5)


# --- write-through ------------------------------------------------------------------------------
def _edit_expert1(moe: mt.MoE, part: str) -> None:
    e = moe.expert(1)
    with torch.no_grad():
        if part == "down":
            e.down[:, 0] *= 2
        else:
            getattr(e, part)[0] *= 2


def _expected_slice(name: str, part: str, moe: mt.MoE) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The state_dict key and a function selecting the storage slice that must double."""
    p = moe.path
    inter = D_EXPERT[name]
    if name == "plain_moe":
        mod = {"gate": "w1", "up": "w3", "down": "w2"}[part]
        key = f"{p}.experts.1.{mod}.weight"
        return key, (lambda w: w[:, 0]) if part == "down" else (lambda w: w[0])
    if name == "gpt_oss":  # gate_up_proj [E, d, 2I], gate/up interleaved on the last dim; down [E, I, d]
        if part == "down":
            return f"{p}.experts.down_proj", lambda w: w[1, 0, :]
        col = 0 if part == "gate" else 1
        return f"{p}.experts.gate_up_proj", lambda w: w[1, :, col]
    if part == "down":  # down_proj [E, d, I]
        return f"{p}.experts.down_proj", lambda w: w[1, :, 0]
    row = 0 if part == "gate" else inter  # gate_up_proj [E, 2I, d], gate first
    return f"{p}.experts.gate_up_proj", lambda w: w[1, row, :]


@pytest.mark.parametrize("part", ["gate", "up", "down"])
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_in_place_edit_of_an_expert_writes_the_right_slice(name: str, part: str) -> None:
    fam = build(name)
    moe = mt.find_moes(fam.model)[-1]
    before = snapshot(fam.model)
    _edit_expert1(moe, part)
    key, piece = _expected_slice(name, part, moe)
    diff = changed(before, fam.model)
    assert list(diff) == [key]
    expected = before[key].clone()
    piece(expected).mul_(2)
    assert torch.equal(diff[key], expected)
    assert not torch.equal(piece(diff[key]), piece(before[key]))
    # the model and the view still agree after the edit
    x, y = block_io(fam, moe)
    with torch.no_grad():
        torch.testing.assert_close(moe.forward(x), y, atol=ATOL, rtol=1e-5)


def test_gpt_oss_interleaved_layout_explicitly() -> None:
    model = build("gpt_oss").model
    moe = mt.find_moes(model)[0]
    ex = model.model.layers[0].mlp.experts
    e1 = moe.expert(1)
    assert torch.equal(e1.gate[0], ex.gate_up_proj[1, :, 0])
    assert torch.equal(e1.up[0], ex.gate_up_proj[1, :, 1])
    assert torch.equal(e1.gate[3], ex.gate_up_proj[1, :, 6])
    assert torch.equal(e1.down, ex.down_proj[1].t())
    assert torch.equal(e1.gate_bias, ex.gate_up_proj_bias[1, ::2])
    assert torch.equal(e1.up_bias, ex.gate_up_proj_bias[1, 1::2])
    assert torch.equal(e1.down_bias, ex.down_proj_bias[1])
    with torch.no_grad():
        e1.up_bias[2] += 1.0
    assert ex.gate_up_proj_bias[1, 5] == e1.up_bias[2]


def test_mixtral_fused_layout_explicitly() -> None:
    model = build("mixtral").model
    moe = mt.find_moes(model)[1]
    ex = model.model.layers[1].mlp.experts
    e2 = moe.expert(2)
    assert torch.equal(e2.gate, ex.gate_up_proj[2, :48])
    assert torch.equal(e2.up, ex.gate_up_proj[2, 48:])
    assert torch.equal(e2.down, ex.down_proj[2])
    assert e2.gate.data_ptr() == ex.gate_up_proj[2].data_ptr()


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "plain_moe"])
def test_expert_set_copies_in_place_and_checks_shapes(name: str) -> None:
    fam = build(name)
    moe = mt.find_moes(fam.model)[0]
    e = moe.expert(1)
    before = snapshot(fam.model)
    for kwargs in (
        {"gate": torch.zeros(32, D_EXPERT[name])},
        {"down": torch.zeros(D_EXPERT[name], 32)},
        {"up": torch.zeros(D_EXPERT[name] + 1, 32)},
    ):
        with pytest.raises(mt.ShapeError):
            e.set(**kwargs)
    with pytest.raises(mt.ShapeError):
        e.set(bogus=torch.zeros(1))
    assert changed(before, fam.model) == {}
    new_gate = torch.full((D_EXPERT[name], 32), 0.25)
    new_down = torch.full((32, D_EXPERT[name]), -0.5)
    e.set(gate=new_gate, down=new_down)
    fresh = moe.expert(1)
    assert torch.equal(fresh.gate, new_gate) and torch.equal(fresh.down, new_down)
    assert torch.equal(fresh.up, before_up(before, name, moe))
    assert torch.equal(moe.expert(0).gate, snapshot_expert0_gate(before, name, moe))


def before_up(before: dict[str, torch.Tensor], name: str, moe: mt.MoE) -> torch.Tensor:
    p = moe.path
    if name == "plain_moe":
        return before[f"{p}.experts.1.w3.weight"]
    gu = before[f"{p}.experts.gate_up_proj"][1]
    return gu[:, 1::2].t() if name == "gpt_oss" else gu[D_EXPERT[name] :]


def snapshot_expert0_gate(before: dict[str, torch.Tensor], name: str, moe: mt.MoE) -> torch.Tensor:
    p = moe.path
    if name == "plain_moe":
        return before[f"{p}.experts.0.w1.weight"]
    gu = before[f"{p}.experts.gate_up_proj"][0]
    return gu[:, ::2].t() if name == "gpt_oss" else gu[: D_EXPERT[name]]


# --- shared experts and mixed stacks ------------------------------------------------------------
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_shared_experts(name: str) -> None:
    model = build(name).model
    for moe in mt.find_moes(model):
        want = [f"{moe.path}.{s}" for s in SHARED.get(name, [])]
        assert [f.path for f in moe.shared_experts] == want
        assert all(f.gated and f.d_model == 32 for f in moe.shared_experts)
        if name == "qwen2_moe":
            assert moe.shared_gate is not None
            assert moe.shared_gate.module is moe.module.shared_expert_gate
            assert tuple(moe.shared_gate.weight.shape) == (1, 32)
        else:
            assert moe.shared_gate is None
        x = torch.randn(5, 32)
        out = moe.shared_output(x)
        assert (out is None) == (name not in SHARED)


def test_shared_expert_output_is_part_of_the_block() -> None:
    fam = build("qwen2_moe")
    moe = mt.find_moes(fam.model)[0]
    x, y = block_io(fam, moe)
    with torch.no_grad():
        flat = x.reshape(-1, 32)
        shared = moe.shared_output(flat)
        expected = torch.sigmoid(moe.module.shared_expert_gate(flat)) * moe.module.shared_expert(flat)
        torch.testing.assert_close(shared, expected)
        routed = moe.forward(x) - shared.reshape(x.shape)
    assert not torch.allclose(routed, y, atol=1e-4)  # the shared part is not negligible here


def test_deepseek_first_layer_is_dense() -> None:
    model = build("deepseek_v3").model
    assert [f.path for f in mt.find_ffns(model)] == ["model.layers.0.mlp"]
    assert [m.path for m in mt.find_moes(model)] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert [m.layer for m in mt.find_moes(model)] == [1, 2]


def test_find_moes_selector() -> None:
    model = build("olmoe").model
    assert [m.layer for m in mt.find_moes(model, "layers.1.mlp")] == [1]
    assert [m.layer for m in mt.find_moes(model, mt.Selector.type("OlmoeSparseMoeBlock"))] == [0, 1]
    assert mt.find_moes(model, "self_attn", strict=False) == []
    with pytest.raises(mt.ModulartError):
        mt.find_moes(model, "self_attn")


# --- unsupported models -------------------------------------------------------------------------
def test_find_moes_on_a_dense_model_raises_with_adapter_help() -> None:
    with pytest.raises(mt.UnsupportedModuleError) as info:
        mt.find_moes(build("llama").model)
    msg = str(info.value)
    assert "LlamaForCausalLM" in msg and "Candidates seen" in msg and "register_moe_layout" in msg
    assert mt.find_moes(build("llama").model, strict=False) == []


class OddMoE(nn.Module):
    """Experts that are not FFNs modulart can read, and no top-k attribute: not inferable."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 2, bias=False)
        self.experts = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])


def test_find_moes_names_unrecognised_candidates() -> None:
    model = nn.Sequential(OddMoE(), OddMoE())
    with pytest.raises(mt.UnsupportedModuleError) as info:
        mt.find_moes(model)
    msg = str(info.value)
    assert "0.experts (ModuleList)" in msg and "1.experts (ModuleList)" in msg
    assert "register_moe_layout" in msg
