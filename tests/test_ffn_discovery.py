"""FFN discovery by data flow and verification against the block's own forward.

Every view must recompute exactly what its block computes (checked here on a real forward of the
whole model, independently of the probe the library uses), and a block that is not an FFN — or a
layout that does not describe its block — must be refused with a typed error that says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modulart as mt
from modulart.core import activations
from modulart.core.arch import FFN_LAYOUTS
from modulart.core.ffn import UnprobedBlockWarning
from modulart.core.ffn_discovery import clear_discovery_cache
from modulart.core.verify import clear_verification_cache


# --- blocks that are not in any table -------------------------------------------------------------
class TimmMlp(nn.Module):
    """timm's ``Mlp`` layout: fc1, act, drop1, norm (Identity), fc2, drop2."""

    def __init__(self, d: int = 16, f: int = 40) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(d, f), nn.GELU(), nn.Dropout(0.1)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(f, d), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmGluMlp(nn.Module):
    """timm's ``GluMlp``: one fc1 ``[2f, d]``, chunked; the gate is the *second* half (``x1 * act(x2)``)."""

    def __init__(self, d: int = 16, f: int = 24, gate_last: bool = True) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * f), nn.Sigmoid(), nn.Linear(f, d)
        self.gate_last = gate_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        h = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        return self.fc2(h)


class NanoGPTBlock(nn.Module):
    """nanoGPT: attention with c_attn / c_proj, MLP with c_fc, gelu, c_proj, residuals in the block."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.attn_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.mlp["c_proj"](self.gelu(self.mlp["c_fc"](self.ln_2(x))))


class SwapOrder(nn.Sequential):
    """``Linear, Linear, ReLU``: the activation comes after both linears — not an FFN."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(8, 24), nn.Linear(24, 8), nn.ReLU())


class ResidualInside(nn.Module):
    """The residual is added inside the MLP: the FFN is the part up to ``out`` (its output site)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.act, self.out = nn.Linear(8, 24), nn.SiLU(), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.act(self.inp(x)))


class NormBetween(nn.Module):
    """A LayerNorm over the hidden units between the layers: neurons are not independent."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(8, 24), nn.LayerNorm(24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.norm(self.inp(x))))


class Stack(nn.Module):
    """Blocks in a ModuleList, called on embeddings: the way models hold their layers."""

    def __init__(self, make: Callable[[], nn.Module], n: int = 2, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, d)
        self.blocks = nn.ModuleList([make() for _ in range(n)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return x


def _ids() -> torch.Tensor:
    return torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))


def _assert_exact(model: nn.Module, ffns: list[mt.FFN], run: Callable[[], Any]) -> None:
    """Each view's recompute equals what its output site saw on a real forward of the model."""
    model.eval()
    for f in ffns:
        rec = mt.capture(model, {"in": f.input_site, "h": f.hidden_site, "out": f.output_site}, run)
        torch.testing.assert_close(f.forward(rec["in"]), rec["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.hidden(rec["in"]), rec["h"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_torch_transformer_encoder_layer_with_a_function_activation(activation: str) -> None:
    model = Stack(lambda: nn.TransformerEncoderLayer(16, 2, 48, activation=activation, batch_first=True))
    ffns = mt.find_ffns(model)
    assert [(f.path, f.layout.key, f.layout.value, f.activation_name) for f in ffns] == [
        (f"blocks.{i}", "linear1", "linear2", activation) for i in range(2)
    ]
    assert ffns[0].layout.activation == "activation"  # the layer's own function attribute
    ids = _ids()
    _assert_exact(model, ffns, lambda: model(ids))


def test_torch_transformer_decoder_layer() -> None:
    layer = nn.TransformerDecoderLayer(16, 2, 40, batch_first=True).eval()
    memory, x = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with pytest.raises(mt.UnsupportedModuleError, match=r"(?s)could not be probed.*set_probe_inputs"):
        mt.find_ffns(layer)  # its forward needs `memory`: it cannot be probed on a tensor alone
    with pytest.warns(UnprobedBlockWarning, match="TransformerDecoderLayer"):
        assert mt.find_ffns(layer, strict=False) == []  # never a silent omission
    ffns = mt.find_ffns(layer, probe_inputs={"tgt": x, "memory": memory})
    assert [(f.path, f.layout.key, f.layout.value) for f in ffns] == [("", "linear1", "linear2")]
    _assert_exact(layer, ffns, lambda: layer(x, memory))


def test_timm_mlp_and_glu_mlp() -> None:
    model = Stack(TimmMlp)
    ffns = mt.find_ffns(model)
    assert [(f.path, f.gated, f.activation_name) for f in ffns] == [
        ("blocks.0", False, "gelu"),
        ("blocks.1", False, "gelu"),
    ]
    ids = _ids()
    _assert_exact(model, ffns, lambda: model(ids))
    for gate_last, order in ((True, "up_first"), (False, "gate_first")):
        glu = Stack(lambda g=gate_last: TimmGluMlp(gate_last=g))  # type: ignore[misc]
        views = mt.find_ffns(glu)
        assert [(f.fused, f.layout.fused_gate_up, f.d_ff) for f in views] == [(True, order, 24)] * 2
        _assert_exact(glu, views, lambda m=glu: m(ids))  # type: ignore[misc]


def test_fused_gate_up_views_are_row_blocks_of_the_stored_weight() -> None:
    block = TimmGluMlp(gate_last=True)
    ffn = mt.find_ffns(Stack(lambda: block, n=1))[0]
    w = block.fc1.weight
    assert ffn.keys.data_ptr() == w[24:].data_ptr() and ffn.up is not None and ffn.up.data_ptr() == w.data_ptr()
    new = torch.randn(24, 16)
    ffn.keys = new
    assert torch.equal(block.fc1.weight[24:], new)


def test_nanogpt_block_mlp_in_a_moduledict() -> None:
    model = Stack(NanoGPTBlock)
    ffns = mt.find_ffns(model)
    # the FFN is the ModuleDict holding both layers; it has no forward, so its block was probed
    assert [(f.path, f.layout.key, f.layout.value, f.layer) for f in ffns] == [
        ("blocks.0.mlp", "c_fc", "c_proj", 0),
        ("blocks.1.mlp", "c_fc", "c_proj", 1),
    ]
    ids = _ids()
    _assert_exact(model, ffns, lambda: model(ids))


def test_plain_sequential_mlp_and_the_residual_inside_case() -> None:
    seq = nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8))
    assert [f.path for f in mt.find_ffns(seq)] == [""]
    res = ResidualInside()
    (ffn,) = mt.find_ffns(res)
    x = torch.randn(3, 8)
    _assert_exact(res, [ffn], lambda: res(x))  # the output site is before the residual


@pytest.mark.parametrize("block", [SwapOrder, NormBetween])
def test_blocks_that_are_not_ffns_are_refused(block: type[nn.Module]) -> None:
    with pytest.raises(mt.UnsupportedModuleError, match="found no feed-forward block"):
        mt.find_ffns(block())


def test_a_wrong_adapter_is_refused_with_the_measured_error(registered: Any) -> None:
    # the child order says key, value, activation — but the activation runs after both linears
    registered(SwapOrder, mt.FFNLayout(key="0", value="1", activation="2"))
    with pytest.raises(mt.UnsupportedModuleError, match=r"does not reproduce the block: .*relative error"):
        mt.find_ffns(SwapOrder())
    # the right structure with the wrong activation is refused too
    registered(ResidualInside, mt.FFNLayout(key="inp", value="out", activation=F.gelu))
    with pytest.raises(mt.UnsupportedModuleError, match="does not reproduce"):
        mt.find_ffns(ResidualInside())
    assert mt.find_ffns(ResidualInside(), verify=False)[0].source == "table"  # the documented opt-out


def test_verification_leaves_no_trace() -> None:
    clear_verification_cache()
    clear_discovery_cache()
    model = Stack(lambda: nn.TransformerEncoderLayer(16, 2, 48, batch_first=True, dropout=0.3))
    model.train()
    model.blocks[1].eval()
    flags = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    rng = torch.get_rng_state()
    with mt.HookRegistry(model) as reg:
        reg.forward("blocks.0.linear2", lambda m, a, o: o * 0)
        mt.find_ffns(model)
        assert reg.counts() == {next(iter(reg.counts())): 0}  # the probe neither fired nor was changed by it
    assert [m.training for m in model.modules()] == flags
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_one_probe_per_block_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from modulart.core import ffn_discovery, ffn_verify

    clear_verification_cache()
    clear_discovery_cache()
    calls: list[str] = []
    real = ffn_verify.probe_block

    def counting(model: nn.Module, block: nn.Module, *a: Any, **k: Any) -> Any:
        calls.append(type(block).__name__)
        return real(model, block, *a, **k)

    monkeypatch.setattr(ffn_discovery, "probe_block", counting)
    monkeypatch.setattr(ffn_verify, "probe_block", counting)
    model = Stack(TimmMlp, n=6)
    assert len(mt.find_ffns(model)) == 6
    assert calls == ["TimmMlp"]
    mt.find_ffns(model)
    assert calls == ["TimmMlp"]  # cached


def test_bf16_model_is_verified_in_its_own_dtype() -> None:
    model = Stack(TimmMlp).to(torch.bfloat16)
    ffns = mt.find_ffns(model)
    assert all(f.keys.dtype == torch.bfloat16 and f.verification is not None for f in ffns)


def test_block_that_needs_model_inputs_uses_probe_inputs() -> None:
    class NeedsMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.down(F.silu(self.up(x))) * mask

    class Split(nn.Module):  # the FFN spans two sibling blocks, and the layer needs a mask
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.layers = nn.ModuleList([NeedsMask()])

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            return self.layers[0](x, torch.ones((*x.shape[:-1], 1)))

    model = Split()
    with pytest.raises(mt.UnsupportedModuleError, match="could not be probed"):
        mt.find_ffns(model)  # cannot be probed: not called alone, not a Hugging Face model
    ffns = mt.find_ffns(model, probe_inputs={"ids": _ids()})
    assert [f.path for f in ffns] == ["layers.0"]
    ids = _ids()
    _assert_exact(model, ffns, lambda: model(ids))
    mt.set_probe_inputs(model, {"ids": _ids()})  # the same, once for every operator
    assert [f.path for f in mt.find_ffns(model)] == ["layers.0"]
    mt.set_probe_inputs(model, None)


def test_activation_catalogue_identifies_by_behaviour() -> None:
    assert activations.identify_activation(nn.GELU()) == "gelu"
    assert activations.identify_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activations.identify_activation(lambda x: x * torch.sigmoid(1.702 * x)) == "quick_gelu"
    assert activations.identify_activation(torch.sin) is None
    assert not activations.is_elementwise_nonlinear(nn.LayerNorm(6), torch.randn(3, 6))
    assert not activations.is_elementwise_nonlinear(nn.Identity(), torch.randn(3, 6))
    assert activations.is_elementwise_nonlinear(torch.sin, torch.randn(3, 6))


@pytest.fixture
def registered() -> Any:
    added: list[Any] = []

    def register(cls: Any, layout: mt.FFNLayout) -> None:
        mt.register_ffn_layout(cls, layout)
        added.append(cls)

    yield register
    for cls in added:
        FFN_LAYOUTS.unregister(cls)
    clear_verification_cache()


# --- regressions: what generic discovery got wrong before views were verified ---------------------
def test_emoe_refuses_a_block_whose_activation_comes_after_both_linears() -> None:
    with pytest.raises(mt.UnsupportedModuleError):
        mt.emoe.apply(SwapOrder(), num_experts=4, top_k=2, layers="all")


def test_switch_transformers_routed_experts_are_not_dense_ffns() -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    cfg = AutoConfig.for_model(
        "switch_transformers", d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=2,
        vocab_size=128, num_experts=4, decoder_start_token_id=0, encoder_sparse_step=2, decoder_sparse_step=2,
    )  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    paths = [f.path for f in mt.find_ffns(model)]
    assert paths == ["encoder.block.0.layer.1.mlp", "decoder.block.0.layer.2.mlp"]  # the sparse blocks are MoEs


def test_hunyuan_shared_expert_is_not_the_layers_ffn() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "hunyuan_v1_moe", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=128, num_experts=4, moe_topk=2, head_dim=16,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert mt.find_ffns(model, strict=False) == []
    with pytest.raises(mt.UnsupportedModuleError):
        mt.patcher.apply(model, task="generation")  # no dense FFN to attach to
    shared = mt.find_ffns(model, include_shared_experts=True)
    assert [f.path for f in shared] == ["model.layers.0.mlp.shared_mlp", "model.layers.1.mlp.shared_mlp"]


@pytest.mark.parametrize("name", ["gemma", "starcoder2", "gpt_bigcode", "bloom", "phi3", "glm4", "roberta"])
def test_families_the_class_tables_never_knew(name: str) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kw: dict[str, Any] = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if name == "gpt_bigcode":
        kw = dict(n_embd=32, n_inner=64, n_layer=2, n_head=2, vocab_size=128)
    if name == "bloom":
        kw = dict(hidden_size=32, n_layer=2, n_head=2, vocab_size=128)
    cfg = AutoConfig.for_model(name, **kw)
    torch.manual_seed(0)
    model = (AutoModel if name == "roberta" else AutoModelForCausalLM).from_config(cfg).eval()
    ffns = mt.find_ffns(model)
    assert len(ffns) == 2 and all(f.source == "discovered" for f in ffns)
    assert all(f.fused for f in ffns) == (name in ("phi3", "glm4"))
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    _assert_exact(model, ffns, lambda: model(input_ids=ids))
