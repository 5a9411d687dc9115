"""modulart.stacking: plans, in-memory growth, operators, function check, optimizer growth."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hst
from torch import nn

import modulart.stacking as st
from families import build
from modulart.core.errors import ConfigError, UnsupportedModuleError
from modulart.stacking.blocks import find_block_list


# --- plans --------------------------------------------------------------------------------------
@given(depth=hst.integers(1, 12), indices=hst.lists(hst.integers(-3, 15), min_size=1, max_size=30))
def test_plan_validation_property(depth: int, indices: list[int]) -> None:
    if all(0 <= i < depth for i in indices):
        plan = st.LayerPlan.from_list(indices, depth)
        assert plan.indices == tuple(indices) and plan.grown_layers == len(indices)
        assert st.LayerPlan.parse(plan.describe().split(" ")[0], depth) == plan
    else:
        bad = next(i for i in indices if not 0 <= i < depth)
        with pytest.raises(ConfigError, match=rf"= {bad}: the source model has {depth} layers"):
            st.LayerPlan.from_list(indices, depth)


@given(depth=hst.integers(1, 10), factor=hst.integers(1, 5))
def test_stack_and_interleave_shapes(depth: int, factor: int) -> None:
    s, i = st.LayerPlan.stack(depth, factor), st.LayerPlan.interleave(depth, factor)
    assert s.indices == tuple(range(depth)) * factor
    assert sorted(s.indices) == sorted(i.indices) and i.indices == tuple(sorted(i.indices))
    assert s.originals() == tuple(range(depth)) and i.originals() == tuple(range(0, depth * factor, factor))


def test_plan_constructors_and_errors() -> None:
    assert st.LayerPlan.dus(32, 8).grown_layers == 48
    assert st.LayerPlan.partial(6, [(0, 6), (3, 6)]).indices == (0, 1, 2, 3, 4, 5, 3, 4, 5)
    with pytest.raises(ConfigError, match=r"ranges\[1\] = \(3, 7\).*source depth 6"):
        st.LayerPlan.partial(6, [(0, 6), (3, 7)])
    with pytest.raises(ConfigError, match="cannot read 'x'"):
        st.LayerPlan.parse("0-2,x", 3)
    with pytest.raises(ConfigError, match="factor = 0"):
        st.LayerPlan.stack(3, 0)
    with pytest.raises(ConfigError, match="at least one layer"):
        st.LayerPlan.from_list([], 3)
    assert st.LayerPlan.from_dict(st.LayerPlan.dus(4, 1).to_dict()) == st.LayerPlan.dus(4, 1)


# --- in-memory growth ---------------------------------------------------------------------------
def _block_state(model: nn.Module, path: str, i: int) -> dict[str, torch.Tensor]:
    prefix = f"{path}.{i}."
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "plain", "mixtral"])
def test_direct_growth_copies_blocks(family: str) -> None:
    f = build(family)
    small = f.model
    before = {k: v.clone() for k, v in small.state_dict().items()}
    plan = st.LayerPlan.from_list([1, 0, 1, 1], num_layers=len(find_block_list(small)[1]))
    big = st.grow(small, plan)
    path, blocks = find_block_list(big)
    assert len(blocks) == 4
    for i, s in enumerate(plan):
        got, want = _block_state(big, path, i), _block_state(small, path, s)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # everything outside the block list is unchanged
    outside = {k: v for k, v in small.state_dict().items() if not k.startswith(path + ".")}
    big_sd = big.state_dict()
    assert all(torch.equal(big_sd[k], v) for k, v in outside.items())
    # no shared storage: between copies, and with the source
    ptrs: dict[int, str] = {}
    small_ptrs = {p.data_ptr() for p in small.parameters()}
    for name, p in big.named_parameters():
        assert p.data_ptr() not in ptrs, f"{name} shares storage with {ptrs.get(p.data_ptr())}"
        assert p.data_ptr() not in small_ptrs, name
        ptrs[p.data_ptr()] = name
    # the source is untouched
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    if hasattr(big, "config"):
        assert big.config.num_hidden_layers == 4 and small.config.num_hidden_layers == len(plan.indices) - 2


def test_grown_copies_train_independently() -> None:
    small = build("llama").model
    big = st.grow(small, 2)
    with torch.no_grad():
        big.model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert not torch.equal(big.model.layers[0].mlp.down_proj.weight, big.model.layers[2].mlp.down_proj.weight)
    assert not torch.equal(big.model.layers[0].mlp.down_proj.weight, small.model.layers[0].mlp.down_proj.weight)


def test_layer_idx_and_layer_types_rewritten() -> None:
    small = build("qwen2").model
    small.config.layer_types = ["sliding_attention", "full_attention"]
    big = st.grow(small, st.LayerPlan.interleave(2, 3))
    assert [blk.self_attn.layer_idx for blk in big.model.layers] == list(range(6))
    assert big.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"] * 3
    assert small.config.layer_types == ["sliding_attention", "full_attention"]
    assert [blk.self_attn.layer_idx for blk in small.model.layers] == [0, 1]


def _generate(model: nn.Module, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    out = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)
    assert isinstance(out, torch.Tensor)
    return out


def test_generation_with_kv_cache_on_grown_llama() -> None:
    f = build("llama")
    big = st.grow(f.model, st.LayerPlan.stack(2, 3)).eval()
    ids = f.inputs["input_ids"][:1]
    cached, uncached = _generate(big, ids, True), _generate(big, ids, False)
    assert torch.equal(cached, uncached)
    # the check can fail: with the source's layer_idx left in place, copies overwrite each other's cache
    for blk, s in zip(big.model.layers, st.LayerPlan.stack(2, 3), strict=True):
        blk.self_attn.layer_idx = s
    try:
        broken = _generate(big, ids, True)
    except RuntimeError:  # the shared cache slot grows twice per step: shapes stop matching
        return
    assert not torch.equal(broken, uncached)


# --- operators and the function check ----------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt", "plain", "qwen2_moe"])
@pytest.mark.parametrize("operator", ["zero", "random"])
def test_function_preserving_operators(family: str, operator: str) -> None:
    f = build(family)
    assert st.OPERATORS[operator].preserves_function
    big = st.grow(f.model, 3, operator=operator, seed=1)
    assert st.assert_function_preserved(f.model, big, f.inputs, atol=1e-5) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "plain"])
def test_gstack_is_not_function_preserving(family: str) -> None:
    f = build(family)
    assert not st.OPERATORS["direct"].preserves_function
    big = st.grow(f.model, 2, operator="direct")
    with pytest.raises(st.FunctionNotPreservedError, match="max logit difference"):
        st.assert_function_preserved(f.model, big, f.inputs)
    assert st.function_difference(f.model, big, f.inputs) > 1e-2


def test_zero_operator_zeroes_exactly_the_new_blocks_outputs() -> None:
    small = build("llama").model
    big = st.grow(small, st.LayerPlan.interleave(2, 2), operator="zero")
    for i, blk in enumerate(big.model.layers):
        zero = i in (1, 3)
        for w in (blk.self_attn.o_proj.weight, blk.mlp.down_proj.weight):
            assert bool((w == 0).all()) == zero
        assert torch.equal(blk.self_attn.q_proj.weight, small.model.layers[i // 2].self_attn.q_proj.weight)


def test_random_ramp_blends_in_new_blocks() -> None:
    f = build("llama")
    big = st.grow(f.model, 2, operator="random", ramp_steps=4, seed=3)
    ramp = st.get_ramp(big)
    assert ramp is not None and ramp.value == 0.0
    assert st.function_difference(f.model, big, f.inputs) == 0.0
    # new blocks are fresh random weights, not copies
    assert not torch.equal(big.model.layers[2].mlp.up_proj.weight, f.model.model.layers[0].mlp.up_proj.weight)
    opt = torch.optim.SGD(big.parameters(), lr=0.0)
    ramp.attach(opt)
    diffs = []
    for _ in range(4):
        opt.step()
        diffs.append(st.function_difference(f.model, big, f.inputs))
    assert ramp.done and diffs[0] > 0 and diffs[-1] > diffs[0]
    full = st.function_difference(f.model, big, f.inputs)
    ramp.remove()
    assert st.get_ramp(big) is None
    assert abs(st.function_difference(f.model, big, f.inputs) - full) < 1e-5
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in big.modules())


def test_learn_operator_improves_on_stacking() -> None:
    f = build("llama")
    ids = f.inputs["input_ids"]

    def loss(m: nn.Module) -> torch.Tensor:
        out = m(input_ids=ids, labels=ids)
        return out.loss  # type: ignore[no-any-return]

    stacked = st.grow(f.model, 2)
    learned = st.grow(f.model, 2, operator="learn", loss_fn=loss, learn_steps=15, learn_lr=0.05)
    with torch.no_grad():
        assert float(loss(learned)) < float(loss(stacked)) - 1e-3
    with pytest.raises(ConfigError, match="needs loss_fn"):
        st.grow(f.model, 2, operator="learn")


def test_bad_inputs_raise_before_building() -> None:
    small = build("llama").model
    with pytest.raises(ConfigError, match="written for a 3-layer source but the source model has 2"):
        st.grow(small, st.LayerPlan.stack(3, 2))
    with pytest.raises(ConfigError, match="operator = 'nope'"):
        st.grow(small, 2, operator="nope")
    with pytest.raises(ConfigError, match=r"unknown options \['opertor'\]"):
        st.grow(small, 2, opertor="zero")
    with pytest.raises(ConfigError, match=r"must contain 0\.\.1 in order"):
        st.grow(small, st.LayerPlan.from_list([1, 0], 2), operator="zero")
    with pytest.raises(UnsupportedModuleError, match="several block lists"):
        st.grow(build("t5").model, 2)
    with pytest.raises(UnsupportedModuleError, match="blocks='lm_head'"):
        st.grow(small, 2, blocks="lm_head")
    assert small.config.num_hidden_layers == 2
    t5 = st.grow(build("t5").model, 2, blocks="decoder.block")
    assert t5.config.num_decoder_layers == 4 and t5.config.num_layers == 2


# --- optimizer growth ---------------------------------------------------------------------------
def _trained_opt(model: nn.Module, ids: torch.Tensor) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("policy", st.POLICIES)
def test_optimizer_growth_policies(policy: str) -> None:
    f = build("llama")
    small, ids = f.model, f.inputs["input_ids"]
    opt = _trained_opt(small, ids)
    plan = st.LayerPlan.stack(2, 2)
    big = st.grow(small, plan)
    new = st.grow_optimizer(opt, small, big, plan, policy=policy)
    assert type(new) is torch.optim.AdamW and new.param_groups[0]["weight_decay"] == 0.1
    assert {id(p) for g in new.param_groups for p in g["params"]} == {id(p) for p in big.parameters()}
    src = small.model.layers[1].mlp.up_proj.weight
    s_state = opt.state[src]
    for pos in (1, 3):
        p = big.model.layers[pos].mlp.up_proj.weight
        if policy == "reset":
            assert p not in new.state
            continue
        st_ = new.state[p]
        if policy == "copy" or (policy == "zero_new" and pos == 1):
            assert torch.equal(st_["exp_avg"], s_state["exp_avg"]) and float(st_["step"]) == 2
            assert st_["exp_avg"].data_ptr() != s_state["exp_avg"].data_ptr()
        elif policy == "zero_new":
            assert not st_["exp_avg"].any() and not st_["exp_avg_sq"].any() and float(st_["step"]) == 0
        else:
            assert torch.allclose(st_["exp_avg"], s_state["exp_avg"] / 2)
            assert torch.allclose(st_["exp_avg_sq"], s_state["exp_avg_sq"] / 2) and float(st_["step"]) == 2
    if policy != "reset":
        emb = big.model.embed_tokens.weight
        assert torch.equal(new.state[emb]["exp_avg_sq"], opt.state[small.model.embed_tokens.weight]["exp_avg_sq"])
    # the new optimizer steps
    big(input_ids=ids, labels=ids).loss.backward()
    new.step()
    with pytest.raises(ConfigError, match="policy = 'bogus'"):
        st.grow_optimizer(opt, small, big, plan, policy="bogus")


# --- growth and live operators --------------------------------------------------------------------
def _live_emoe(model: nn.Module) -> object:
    import modulart as mt

    return mt.emoe.apply(model)


def _live_lora(model: nn.Module) -> object:
    import modulart.kv

    return modulart.kv.apply(model, mode="lora", rank=2)


def _live_registry(model: nn.Module) -> object:
    import modulart as mt

    reg = mt.HookRegistry(model)
    reg.forward("model.layers.0.mlp", lambda m, a, o: None)
    return reg


@pytest.mark.parametrize(
    ("apply_live", "name"), [(_live_emoe, "emoe"), (_live_lora, "kv"), (_live_registry, "modulart")]
)
def test_grow_refuses_a_model_with_live_operator_hooks(apply_live: object, name: str) -> None:
    from modulart.core.errors import CompositionError
    from modulart.core.sharing import live_hooks

    f = build("llama")
    assert callable(apply_live)
    live = apply_live(f.model)
    for grow in (lambda: st.grow(f.model, 2), lambda: st.grow_width(f.model, d_ff=96)):
        with pytest.raises(CompositionError, match=rf"\['{name}'\].*remove\(\)"):
            grow()
    live.remove()  # type: ignore[attr-defined]
    big = st.grow(f.model, 2, operator="zero")
    assert not live_hooks([big], subtree=True)
    assert st.function_difference(f.model, big, f.inputs) == 0.0


def test_grow_drops_user_hook_functions_from_the_copies_and_warns() -> None:
    class Halve:  # a callable object: deepcopy copies it with its module, so it acts on the copy alone
        def __call__(self, m: nn.Module, a: object, o: torch.Tensor) -> torch.Tensor:
            return o * 0.5

    f = build("llama")
    calls: list[str] = []
    mlp = f.model.model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, a, o: calls.append("hook"))
    f.model.model.layers[1].mlp.register_forward_hook(Halve())
    with pytest.warns(UserWarning, match=r"grow\(\).*model\.layers\.0\.mlp.*not copied"):
        big = st.grow(f.model, 2)
    hooked = [n for n, m in big.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == ["model.layers.1.mlp", "model.layers.3.mlp"]  # the copies of block 1 keep Halve
    big(**f.inputs)
    assert calls == []  # the grown model runs without the source's hook function
    f.model(**f.inputs)
    assert calls == ["hook"]  # the source keeps its hook, and the user's handle still removes it
    handle.remove()
    assert not mlp._forward_hooks


def test_growth_ramp_is_grown_with_live_ramp_refused_and_attaches_wrapped_optimizers() -> None:
    from modulart.core.errors import CompositionError

    class Wrapped:  # accelerate's AcceleratedOptimizer exposes the torch optimizer as .optimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

        def step(self) -> None:
            self.optimizer.step()

    f = build("llama")
    big = st.grow(f.model, 2, operator="random", ramp_steps=2)
    ramp = st.get_ramp(big)
    assert ramp is not None
    opt = torch.optim.SGD(big.parameters(), lr=0.0)
    ramp.attach(Wrapped(Wrapped(opt)))
    Wrapped(opt).step()
    assert ramp.value == 0.5
    with pytest.raises(CompositionError, match="stacking-ramp"):
        st.grow(big, 2)  # growing again copies the ramp's hooks: finish (or remove) the ramp first
    ramp.remove()
    ramp.remove()  # idempotent, as on handles
    assert st.grow(big, 2).model.layers.__len__() == 8
