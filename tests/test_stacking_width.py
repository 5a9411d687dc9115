"""modulart.stacking.grow_width: FFN width and residual width."""

from __future__ import annotations

import pytest
import torch

import modulart.stacking as st
from families import build
from modulart.core.errors import ConfigError, UnsupportedModuleError
from modulart.core.ffn import find_ffns


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "plain", "opt"])
@pytest.mark.parametrize("operator", ["direct", "zero", "random"])
def test_d_ff_growth_preserves_function(family: str, operator: str) -> None:
    f = build(family)
    old = find_ffns(f.model)[0].d_ff
    wide = st.grow_width(f.model, d_ff=old + 24, operator=operator, seed=2)
    assert all(v.d_ff == old + 24 for v in find_ffns(wide))
    assert all(v.d_ff == old for v in find_ffns(f.model))  # source untouched
    assert st.function_difference(f.model, wide, f.inputs) < 1e-5
    if operator == "random":
        ramp = st.get_ramp(wide)
        assert isinstance(ramp, st.WidthRamp)
        ramp.step(10**6)
        assert st.function_difference(f.model, wide, f.inputs) > 1e-3
        ramp.remove()
        assert not any(m._forward_pre_hooks for m in wide.modules())


def test_split_neurons_weights() -> None:
    f = build("llama")
    wide = st.grow_width(f.model, d_ff=80, operator="direct", seed=0)
    small, big = find_ffns(f.model)[0], find_ffns(wide)[0]
    assert torch.equal(big.keys[:64], small.keys) and torch.equal(big.up[:64], small.up)  # type: ignore[index]
    # every new unit copies an old one; the copied units' value columns are divided by the copy count
    for j in range(64, 80):
        src = next(i for i in range(64) if torch.equal(big.keys[j], small.keys[i]))
        copies = sum(torch.equal(big.keys[k], small.keys[src]) for k in range(80))
        assert torch.allclose(big.values[:, j], small.values[:, src] / copies)
        assert torch.allclose(big.values[:, src], small.values[:, src] / copies)
    assert wide.config.intermediate_size == 80 and f.model.config.intermediate_size == 64


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_d_model_zero_padding_is_exact_with_rmsnorm(family: str) -> None:
    f = build(family)
    wide = st.grow_width(f.model, d_model=48, d_ff=80, operator="zero")
    assert wide.config.hidden_size == 48 and wide.model.embed_tokens.weight.shape == (128, 48)
    assert wide.model.layers[0].self_attn.q_proj.weight.shape == (32, 48)  # heads keep head_dim
    assert st.assert_function_preserved(f.model, wide, f.inputs, atol=1e-5) <= 1e-5
    # the wider model reloads from its own config and state dict
    again = type(wide)(wide.config).eval()
    again.load_state_dict(wide.state_dict())
    assert st.function_difference(wide, again, f.inputs) == 0.0


def test_d_model_direct_is_approximate() -> None:
    f = build("llama")
    wide = st.grow_width(f.model, d_model=64, operator="direct")
    d = st.function_difference(f.model, wide, f.inputs)
    assert 0 < d < float("inf")


def test_width_errors() -> None:
    f = build("llama")
    with pytest.raises(ConfigError, match="d_ff = 8: smaller than"):
        st.grow_width(f.model, d_ff=8)
    with pytest.raises(ConfigError, match="needs d_model and/or d_ff"):
        st.grow_width(f.model)
    with pytest.raises(ConfigError, match="'random' grows d_ff only"):
        st.grow_width(f.model, d_model=64, operator="random")
    with pytest.raises(ConfigError, match="'learn' needs loss_fn"):
        st.grow_width(f.model, d_ff=96, operator="learn")
    with pytest.raises(ConfigError, match="operator = 'bogus'"):
        st.grow_width(f.model, d_ff=96, operator="bogus")
    with pytest.raises(UnsupportedModuleError, match="needs a Hugging Face model"):
        st.grow_width(build("plain").model, d_model=64)
    with pytest.raises(UnsupportedModuleError, match=r"c_attn\.weight: axis 1 changes 96 -> 144"):
        st.grow_width(build("gpt2").model, d_model=48)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_learned_width_expansion(family: str) -> None:
    f = build(family)
    ids = f.inputs["input_ids"]

    def loss(m: torch.nn.Module) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]

    old = find_ffns(f.model)[0].d_ff
    start = st.grow_width(f.model, d_ff=old + 16, operator="learn", loss_fn=loss, learn_steps=0, seed=1)
    fitted = st.grow_width(
        f.model, d_ff=old + 16, operator="learn", loss_fn=loss, learn_steps=12, learn_lr=0.05, seed=1
    )
    # at init B = [I; N]: the old units are unchanged copies, the new ones mixes of them
    s0, b0 = find_ffns(f.model)[0], find_ffns(start)[0]
    assert torch.allclose(b0.keys[:old], s0.keys) and not torch.allclose(b0.keys[old:], torch.zeros_like(b0.keys[old:]))
    with torch.no_grad():
        assert float(loss(fitted)) < float(loss(start)) - 1e-3
    assert st.function_difference(f.model, start, f.inputs) > 0  # G_learn is not function-preserving
