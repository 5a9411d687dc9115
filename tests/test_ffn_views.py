"""FFN views (DESIGN §2, "Views, not module surgery"): discovery, hook sites, recomputation and
write-through in canonical orientation, for every dense family, the real MiniLM, and user adapters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modulart as mt
from families import DENSE_FAMILIES, Family, build, minilm
from modulart.core.arch import FFN_LAYOUTS
from modulart.core.moe_layouts import MOE_LAYOUTS
from view_helpers import capture, changed, snapshot

ATOL = 1e-5

# --- what each family looks like, written down independently of modulart's tables -------------
PATHS: dict[str, list[str]] = {
    "gpt2": ["transformer.h.0.mlp", "transformer.h.1.mlp"],
    "llama": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "qwen2": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "opt": ["model.decoder.layers.0", "model.decoder.layers.1"],
    "gpt_neox": ["gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"],
    "t5": [
        "encoder.block.0.layer.1.DenseReluDense",
        "encoder.block.1.layer.1.DenseReluDense",
        "decoder.block.0.layer.2.DenseReluDense",
        "decoder.block.1.layer.2.DenseReluDense",
    ],
    "vit": ["layers.0.mlp", "layers.1.mlp"],
    "bert": ["encoder.layer.0", "encoder.layer.1"],
    "plain": ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"],
}
PATHS["t5_gated"] = PATHS["t5"]
LAYERS = {"t5": [0, 1, 0, 1], "t5_gated": [0, 1, 0, 1], "plain": [0, 1, 2]}
D_FF = {"gpt2": 128}  # GPT-2's n_inner defaults to 4 * n_embd; the others are configured to 64
# storage module of each role, relative to the FFN block
KEY = {
    "gpt2": "c_fc",
    "llama": "gate_proj",
    "qwen2": "gate_proj",
    "opt": "fc1",
    "gpt_neox": "dense_h_to_4h",
    "t5": "wi",
    "t5_gated": "wi_0",
    "vit": "fc1",
    "bert": "intermediate.dense",
    "plain": "fc_in",
}
VALUE = {
    "gpt2": "c_proj",
    "llama": "down_proj",
    "qwen2": "down_proj",
    "opt": "fc2",
    "gpt_neox": "dense_4h_to_h",
    "t5": "wo",
    "t5_gated": "wo",
    "vit": "fc2",
    "bert": "output.dense",
    "plain": "fc_out",
}
UP = {"llama": "up_proj", "qwen2": "up_proj", "t5_gated": "wi_1"}
TRANSPOSED = {"gpt2"}  # HF Conv1D: weight stored [in, out]


# --- helpers ------------------------------------------------------------------------------------
def storage_name(fam: str, ffn: mt.FFN, role: str) -> str:
    rel = {"key": KEY, "value": VALUE, "up": UP}[role][fam]
    return f"{ffn.path}.{rel}.weight"


def busiest_neuron(ffn: mt.FFN, fam: Family) -> int:
    """A neuron that is active on the test input, so editing it changes the output."""
    h = capture(fam, {"h": ffn.hidden_site})["h"]
    return int(h.reshape(-1, ffn.d_ff).abs().sum(0).argmax())


def assert_output_is_recomputed(fam: Family, ffn: mt.FFN, old_y: torch.Tensor | None = None) -> None:
    cap = capture(fam, {"q": ffn.input_site, "y": ffn.output_site})
    with torch.no_grad():
        torch.testing.assert_close(ffn.forward(cap["q"]), cap["y"], atol=ATOL, rtol=1e-5)
    if old_y is not None:
        assert not torch.allclose(cap["y"], old_y, atol=1e-4), "the edit did not reach the model"


@pytest.fixture
def registered() -> Iterator[Callable[[Any, mt.FFNLayout], None]]:
    """register_ffn_layout, undone after the test."""
    done: list[Any] = []

    def reg(cls: Any, layout: mt.FFNLayout) -> None:
        mt.register_ffn_layout(cls, layout)
        done.append(cls)

    yield reg
    for cls in done:
        FFN_LAYOUTS.unregister(cls)


# --- discovery ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_find_ffns_discovers_every_block_in_depth_order(name: str) -> None:
    fam = build(name)
    ffns = mt.find_ffns(fam.model)
    assert len(ffns) == fam.n_ffn
    assert [f.path for f in ffns] == PATHS[name]
    assert [f.layer for f in ffns] == LAYERS.get(name, list(range(fam.n_ffn)))
    for f in ffns:
        assert f.module is fam.model.get_submodule(f.path)
        assert (f.d_model, f.d_ff) == (32, D_FF.get(name, 64))
        assert f.gated == (name in UP)
        assert tuple(f.keys.shape) == (f.d_ff, f.d_model)
        assert tuple(f.values.shape) == (f.d_model, f.d_ff)
        assert (f.up is not None) == f.gated
        if f.up is not None:
            assert tuple(f.up.shape) == (f.d_ff, f.d_model)
        # the canonical views read the model's own weights
        key_param = fam.model.get_parameter(storage_name(name, f, "key"))
        value_param = fam.model.get_parameter(storage_name(name, f, "value"))
        transposed = name in TRANSPOSED
        torch.testing.assert_close(f.keys, key_param.t() if transposed else key_param, atol=0, rtol=0)
        torch.testing.assert_close(f.values, value_param.t() if transposed else value_param, atol=0, rtol=0)
        if f.up is not None:
            torch.testing.assert_close(f.up, fam.model.get_parameter(storage_name(name, f, "up")), atol=0, rtol=0)


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_recomputation_matches_a_real_forward(name: str) -> None:
    fam = build(name)
    ffns = mt.find_ffns(fam.model)
    sites = {}
    for i, f in enumerate(ffns):
        sites |= {f"q{i}": f.input_site, f"h{i}": f.hidden_site, f"y{i}": f.output_site}
    cap = capture(fam, sites)
    with torch.no_grad():
        for i, f in enumerate(ffns):
            q, h, y = cap[f"q{i}"], cap[f"h{i}"], cap[f"y{i}"]
            assert q.shape[-1] == f.d_model and h.shape[-1] == f.d_ff and y.shape[-1] == f.d_model
            torch.testing.assert_close(f.hidden(q), h, atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(f.forward(q), y, atol=ATOL, rtol=1e-5)
            assert y.abs().max() > 1e-3  # a zero output would make the comparison vacuous


def test_hooks_at_sites_are_counted_and_checked() -> None:
    fam = build("llama")
    f = mt.find_ffns(fam.model)[1]
    with mt.HookRegistry(fam.model) as reg:
        for site in (f.input_site, f.hidden_site, f.output_site):
            reg.at(site, lambda t: None)
        with pytest.raises(mt.HooksNotFiredError):
            reg.assert_fired()  # nothing ran yet
        fam.run()
        reg.assert_fired()
        assert sorted(reg.counts().values()) == [1, 1, 1]
    for m in fam.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


# --- the real pretrained MiniLM -----------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_model() -> tuple[nn.Module, Callable[[list[str]], dict[str, torch.Tensor]]]:
    return minilm()


def test_minilm_views_read_the_real_weights(minilm_model: Any) -> None:
    model, _ = minilm_model
    ffns = mt.find_ffns(model)
    assert [f.path for f in ffns] == [f"encoder.layer.{i}" for i in range(6)]
    assert [f.layer for f in ffns] == list(range(6))
    for i, f in enumerate(ffns):
        layer = model.encoder.layer[i]
        assert (f.d_model, f.d_ff, f.gated) == (384, 1536, False)
        assert f.keys.data_ptr() == layer.intermediate.dense.weight.data_ptr()
        assert torch.equal(f.keys, layer.intermediate.dense.weight)
        assert torch.equal(f.values, layer.output.dense.weight)
        assert torch.equal(f.key_bias, layer.intermediate.dense.bias)
        assert torch.equal(f.value_bias, layer.output.dense.bias)


def test_minilm_recomputation_matches_a_real_forward(minilm_model: Any) -> None:
    model, encode = minilm_model
    inputs = encode(["Feed-forward layers are key-value memories.", "A short one."])
    fam = Family("minilm", model, inputs, 6, 0)
    ffns = mt.find_ffns(model)
    sites = {}
    for i, f in enumerate(ffns):
        sites |= {f"q{i}": f.input_site, f"h{i}": f.hidden_site, f"y{i}": f.output_site}
    cap = capture(fam, sites)
    with torch.no_grad():
        for i, f in enumerate(ffns):
            torch.testing.assert_close(f.hidden(cap[f"q{i}"]), cap[f"h{i}"], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(f.forward(cap[f"q{i}"]), cap[f"y{i}"], atol=ATOL, rtol=1e-5)


# --- writing through the views ------------------------------------------------------------------
def _expected_after_row_edit(before: torch.Tensor, i: int, transposed: bool, fn: Callable) -> torch.Tensor:
    """Apply ``fn`` to canonical row i (keys/up) in storage orientation: a column of a Conv1D weight."""
    out = before.clone()
    if transposed:
        out[:, i] = fn(out[:, i])
    else:
        out[i] = fn(out[i])
    return out


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_scaling_a_key_row_in_place_writes_exactly_that_row(name: str) -> None:
    fam = build(name)
    ffn = mt.find_ffns(fam.model)[-1]
    i = busiest_neuron(ffn, fam)
    old_y = capture(fam, {"y": ffn.output_site})["y"]
    before = snapshot(fam.model)
    with torch.no_grad():
        ffn.keys[i] *= 2
    key = storage_name(name, ffn, "key")
    diff = changed(before, fam.model)
    assert list(diff) == [key]
    expected = _expected_after_row_edit(before[key], i, name in TRANSPOSED, lambda r: r * 2)
    assert torch.equal(diff[key], expected)
    assert_output_is_recomputed(fam, ffn, old_y)


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_scaling_a_value_column_in_place_writes_exactly_that_column(name: str) -> None:
    fam = build(name)
    ffn = mt.find_ffns(fam.model)[0]
    i = busiest_neuron(ffn, fam)
    old_y = capture(fam, {"y": ffn.output_site})["y"]
    before = snapshot(fam.model)
    with torch.no_grad():
        ffn.values[:, i] *= 2
    value = storage_name(name, ffn, "value")
    diff = changed(before, fam.model)
    assert list(diff) == [value]
    expected = before[value].clone()
    if name in TRANSPOSED:  # Conv1D c_proj stored [d_ff, d_model]: column i of values is row i
        expected[i] *= 2
    else:
        expected[:, i] *= 2
    assert torch.equal(diff[value], expected)
    assert_output_is_recomputed(fam, ffn, old_y)


@pytest.mark.parametrize("name", sorted(UP))
def test_scaling_an_up_row_in_place_writes_exactly_that_row(name: str) -> None:
    fam = build(name)
    ffn = mt.find_ffns(fam.model)[0]
    assert ffn.up is not None
    i = busiest_neuron(ffn, fam)
    old_y = capture(fam, {"y": ffn.output_site})["y"]
    before = snapshot(fam.model)
    with torch.no_grad():
        ffn.up[i] *= 2
    up = storage_name(name, ffn, "up")
    diff = changed(before, fam.model)
    assert list(diff) == [up]
    expected = before[up].clone()
    expected[i] *= 2
    assert torch.equal(diff[up], expected)
    assert_output_is_recomputed(fam, ffn, old_y)


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_setters_copy_canonical_tensors_into_storage(name: str) -> None:
    fam = build(name)
    ffn = mt.find_ffns(fam.model)[0]
    i = busiest_neuron(ffn, fam)
    old_y = capture(fam, {"y": ffn.output_site})["y"]
    before = snapshot(fam.model)
    transposed = name in TRANSPOSED
    new_keys = ffn.keys.detach().clone()
    new_keys[i] = torch.linspace(-1, 1, ffn.d_model)
    new_values = ffn.values.detach().clone()
    new_values[:, i] = torch.linspace(1, -1, ffn.d_model)
    ffn.keys = new_keys
    ffn.values = new_values
    key, value = storage_name(name, ffn, "key"), storage_name(name, ffn, "value")
    expected = {key: new_keys.t() if transposed else new_keys, value: new_values.t() if transposed else new_values}
    if ffn.gated:
        new_up = ffn.up.detach().clone()
        new_up[i] = 0.5
        ffn.up = new_up
        expected[storage_name(name, ffn, "up")] = new_up
    diff = changed(before, fam.model)
    assert sorted(diff) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(diff[k], v), k
    # the stored parameters are still parameters (copied into, not replaced)
    assert isinstance(fam.model.get_parameter(key), nn.Parameter)
    assert_output_is_recomputed(fam, ffn, old_y)


def test_gpt2_conv1d_key_row_is_a_column_of_c_fc() -> None:
    fam = build("gpt2")
    ffn = mt.find_ffns(fam.model)[1]
    c_fc = fam.model.transformer.h[1].mlp.c_fc.weight  # [d_model, d_ff]
    c_proj = fam.model.transformer.h[1].mlp.c_proj.weight  # [d_ff, d_model]
    assert tuple(c_fc.shape) == (32, 128) and tuple(ffn.keys.shape) == (128, 32)
    col, row = c_fc[:, 5].clone(), c_proj[7].clone()
    with torch.no_grad():
        ffn.keys[5] *= 2
        ffn.values[:, 7] *= -1
    assert torch.equal(c_fc[:, 5], col * 2)
    assert torch.equal(c_proj[7], -row)
    assert torch.equal(ffn.keys[5], c_fc[:, 5])


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5_gated", "bert"])
def test_setter_with_wrong_shape_raises_and_changes_nothing(name: str) -> None:
    fam = build(name)
    ffn = mt.find_ffns(fam.model)[0]
    before = snapshot(fam.model)
    bad = [
        ("keys", torch.zeros(ffn.d_ff + 1, ffn.d_model)),
        ("keys", torch.zeros(ffn.d_model, ffn.d_ff)),  # storage orientation of a Conv1D: still wrong
        ("values", torch.zeros(ffn.d_ff, ffn.d_model)),
        ("values", torch.zeros(ffn.d_model)),
    ]
    if ffn.gated:
        bad.append(("up", torch.zeros(ffn.d_model, ffn.d_ff)))
    for attr, value in bad:
        with pytest.raises(mt.ShapeError, match="expected shape"):
            setattr(ffn, attr, value)
    assert changed(before, fam.model) == {}


def test_up_setter_on_a_plain_ffn_raises() -> None:
    ffn = mt.find_ffns(build("gpt2").model)[0]
    assert ffn.up is None
    with pytest.raises(mt.UnsupportedModuleError, match="not gated"):
        ffn.up = torch.zeros(ffn.d_ff, ffn.d_model)


# --- selector argument --------------------------------------------------------------------------
def test_selector_argument_filters_blocks() -> None:
    model = build("llama").model
    assert [f.layer for f in mt.find_ffns(model, "layers.1.mlp")] == [1]
    assert [f.layer for f in mt.find_ffns(model, mt.Selector.type("LlamaMLP"))] == [0, 1]
    assert [f.layer for f in mt.find_ffns(model, r"re:model\.layers\.0\..*")] == [0]
    assert [f.layer for f in mt.find_ffns(model, ["layers.0.mlp", "layers.1.mlp"])] == [0, 1]
    assert [f.layer for f in mt.find_ffns(model, lambda p, m: p.endswith("1.mlp"))] == [1]
    t5 = build("t5").model
    assert [f.path for f in mt.find_ffns(t5, r"re:decoder\..*")] == PATHS["t5"][2:]


def test_selector_that_selects_no_ffn_raises_unless_lenient() -> None:
    model = build("llama").model
    with pytest.raises(mt.ModulartError):
        mt.find_ffns(model, "self_attn")
    assert mt.find_ffns(model, "self_attn", strict=False) == []


def test_selector_typo_inside_a_union_is_reported() -> None:
    # BUG: find_ffns (src/modulart/core/ffn.py, find_ffns, the `if selector is not None` branch)
    # filters with `sel.matches(...)` only and never runs the selector's strictness check, so a
    # misspelt leaf inside a union is silently ignored (here the model gets one FFN instead of an
    # error), contradicting the strict-selector contract of core/select.py. Same in find_moes.
    model = build("llama").model
    sel = mt.Selector.suffix("layers.0.mlp") | mt.Selector.suffix("layers.0.mpl")
    with pytest.raises(mt.SelectorError, match="mpl"):
        mt.find_ffns(model, sel)


# --- unsupported models and user adapters -------------------------------------------------------
class FunctionalMLP(nn.Module):
    """An MLP whose activation is written inline and is in no catalogue: discovery cannot name it."""

    def __init__(self, d: int = 8, f: int = 24) -> None:
        super().__init__()
        self.inp = nn.Linear(d, f)
        self.out = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sin(self.inp(x)))


class InlineGeluMLP(FunctionalMLP):
    """An activation written inline that the catalogue knows: found by data flow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.inp(x)))


class SubFunctionalMLP(FunctionalMLP):
    pass


class Net(nn.Module):
    def __init__(self, mlp_cls: type[nn.Module] = FunctionalMLP, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([mlp_cls() for _ in range(n)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = x + b(x)
        return x


def _net_family(mlp_cls: type[nn.Module] = FunctionalMLP) -> Family:
    torch.manual_seed(0)
    return Family("net", Net(mlp_cls).eval(), {"ids": torch.randint(0, 16, (2, 5))}, 2, 0)


def test_model_without_ffn_raises_with_adapter_help() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(mt.UnsupportedModuleError) as info:
        mt.find_ffns(model)
    msg = str(info.value)
    assert "Candidates seen" in msg and "register_ffn_layout" in msg and "Sequential" in msg


def test_unrecognised_mlp_is_named_as_candidate() -> None:
    with pytest.raises(mt.UnsupportedModuleError) as info:
        mt.find_ffns(_net_family().model)
    msg = str(info.value)
    assert "register_ffn_layout" in msg
    assert "blocks.0 (FunctionalMLP)" in msg and "blocks.1 (FunctionalMLP)" in msg
    assert "'inp'" in msg and "'out'" in msg


def test_inline_catalogue_activation_is_found_by_data_flow() -> None:
    fam = _net_family(InlineGeluMLP)
    ffns = mt.find_ffns(fam.model)
    assert [(f.path, f.source, f.activation_name) for f in ffns] == [
        ("blocks.0", "discovered", "gelu"),
        ("blocks.1", "discovered", "gelu"),
    ]
    for f in ffns:
        assert_output_is_recomputed(fam, f)


def test_registered_layout_makes_an_unknown_mlp_work(registered: Any) -> None:
    fam = _net_family()
    registered(FunctionalMLP, mt.FFNLayout(key="inp", value="out", activation=torch.sin))
    ffns = mt.find_ffns(fam.model)
    assert [(f.path, f.layer, f.d_model, f.d_ff, f.gated) for f in ffns] == [
        ("blocks.0", 0, 8, 24, False),
        ("blocks.1", 1, 8, 24, False),
    ]
    for f in ffns:
        assert_output_is_recomputed(fam, f)
    FFN_LAYOUTS.unregister(FunctionalMLP)
    with pytest.raises(mt.UnsupportedModuleError):
        mt.find_ffns(fam.model)


def test_registered_layout_applies_to_subclasses(registered: Any) -> None:
    fam = _net_family(SubFunctionalMLP)
    with pytest.raises(mt.UnsupportedModuleError):
        mt.find_ffns(fam.model)
    registered(FunctionalMLP, mt.FFNLayout(key="inp", value="out", activation=torch.sin))
    ffns = mt.find_ffns(fam.model)
    assert [type(f.module) for f in ffns] == [SubFunctionalMLP, SubFunctionalMLP]
    assert_output_is_recomputed(fam, ffns[1])


def test_layout_can_be_registered_by_class_name(registered: Any) -> None:
    fam = _net_family()
    registered("FunctionalMLP", mt.FFNLayout(key="inp", value="out", activation=torch.sin))
    assert len(mt.find_ffns(fam.model)) == 2


def test_layout_pointing_to_a_missing_attribute_is_reported(registered: Any) -> None:
    registered(FunctionalMLP, mt.FFNLayout(key="fc_in", value="out", activation=torch.sin))
    with pytest.raises(mt.UnsupportedModuleError, match="fc_in"):
        mt.find_ffns(_net_family().model)


# --- shared experts -----------------------------------------------------------------------------
def test_qwen2_moe_shared_expert_only_on_request() -> None:
    model = build("qwen2_moe").model
    with pytest.raises(mt.UnsupportedModuleError):
        mt.find_ffns(model)  # every layer is sparse: no dense FFN by default
    assert mt.find_ffns(model, strict=False) == []
    shared = mt.find_ffns(model, include_shared_experts=True)
    assert [f.path for f in shared] == ["model.layers.0.mlp.shared_expert", "model.layers.1.mlp.shared_expert"]
    assert all(f.gated and f.d_ff == 48 and f.d_model == 32 for f in shared)
    assert [f.layer for f in shared] == [0, 1]


def test_deepseek_v3_shared_experts_only_on_request() -> None:
    model = build("deepseek_v3").model
    assert [f.path for f in mt.find_ffns(model)] == ["model.layers.0.mlp"]
    paths = [f.path for f in mt.find_ffns(model, include_shared_experts=True)]
    assert paths == ["model.layers.0.mlp", "model.layers.1.mlp.shared_experts", "model.layers.2.mlp.shared_experts"]


class ListMoE(nn.Module):
    """A module-list MoE whose routed experts are not called ``experts``."""

    def __init__(self, d: int = 8, f: int = 16, n: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(d, n, bias=False)
        self.mlps = nn.ModuleList([_SwiGLU(d, f) for _ in range(n)])
        self.shared = _SwiGLU(d, f)
        self.top_k = 1


class _SwiGLU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.act = nn.Linear(f, d, bias=False), nn.SiLU()


def test_include_shared_experts_never_returns_routed_experts() -> None:
    # BUG: src/modulart/core/ffn.py, _is_routed_expert (used by find_ffns) hard-codes the routed
    # experts' attribute name as "experts" instead of reading the enclosing MoE block's
    # MoELayout.experts, so with a registered layout whose experts live elsewhere (here "mlps"),
    # include_shared_experts=True returns every routed expert as a "shared" dense FFN.
    # Fix: look up the enclosing block's layout (MOE_LAYOUTS.lookup(type(m)) or infer_moe_layout(m))
    # and test `path` against _join(moe_path, layout.experts).
    model = nn.Sequential(ListMoE(), ListMoE())
    layout = mt.MoELayout(
        router="router", experts="mlps", storage="module_list", scoring="softmax_topk", shared=("shared",)
    )
    mt.register_moe_layout(ListMoE, layout)
    try:
        # the blocks have no forward: this checks structure only, so verification is switched off
        assert [m.path for m in mt.find_moes(model, verify=False)] == ["0", "1"]
        assert mt.find_ffns(model, strict=False, verify=False) == []
        shared = mt.find_ffns(model, include_shared_experts=True, verify=False)
        assert [f.path for f in shared] == ["0.shared", "1.shared"]
    finally:
        MOE_LAYOUTS.unregister(ListMoE)
