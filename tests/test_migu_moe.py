"""modulart.migu on MoE models: per-expert gating of fused experts, routers, coverage warning, removal.

Every expected statistic here is recomputed independently of modulart: the MoE block's input is
captured with a plain torch hook, the routing is recomputed by calling the block's router, and each
expert's gate / up / down outputs are computed token by token from the stored weights with the
family's layout written out below.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modulart.migu
from modulart.core.errors import UnsupportedModuleError
from modulart.migu import keep_count, select_mask
from modulart.migu.coverage import MIGUCoverageWarning

_ATTN = dict(num_attention_heads=2, num_key_value_heads=2)
_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **_ATTN),
    "qwen2_moe": dict(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        **_ATTN,
    ),
    "qwen3_moe": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, **_ATTN
    ),
    "olmoe": dict(hidden_size=32, intermediate_size=16, num_experts=8, num_experts_per_tok=2, **_ATTN),
    "deepseek_v3": dict(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=2,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        **_ATTN,
    ),
    "gpt_oss": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=16, **_ATTN
    ),
    "llama4_text": dict(
        hidden_size=32,
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_local_experts=4,
        num_experts_per_tok=1,
        head_dim=16,
        **_ATTN,
    ),
}
FAMILIES = list(_CONFIGS)
# GPT-OSS attention sinks are trainable and ungated: that warning is tested once, below.
pytestmark = pytest.mark.filterwarnings("ignore::modulart.migu.coverage.MIGUCoverageWarning")


@dataclass(frozen=True)
class Layout:
    """What the test knows about a family's storage (written from the transformers sources)."""

    router: str  # attribute of the MoE block
    transposed: bool  # gate_up [E, d, 2I] / down [E, I, d]
    interleaved: bool  # gate = [..., ::2], up = [..., 1::2]
    scaled_input: bool = False  # Llama4: router returns (scores, logits); experts see x * sigmoid(logit)


_LAYOUT = {name: Layout("gate", False, False) for name in FAMILIES} | {
    "gpt_oss": Layout("router", True, True),
    "llama4_text": Layout("router", True, False, scaled_input=True),
}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # HF initialises routers to zero: randomise them too
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _hf(name: str, seed: int = 0) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(name, num_hidden_layers=2, vocab_size=96, **_CONFIGS[name])
    return _randomize(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), seed)


def _ids(seed: int = 0, batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits.float().pow(2).mean()


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    """MoE blocks (parents of fused experts modules), by path."""
    return {
        p: m
        for p, m in model.named_modules()
        if isinstance(getattr(m, "experts", None), nn.Module) and hasattr(m.experts, "gate_up_proj")
    }


def _capture_inputs(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, block in _blocks(model).items():
        seen[path] = []

        def pre(m: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            seen[path].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        handles.append(block.register_forward_pre_hook(pre))
    return seen, handles


# --- the independent reference ------------------------------------------------------------------
def _expert_outputs(
    experts: nn.Module, lay: Layout, e: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token ``x [d]`` through expert ``e``: (gate [I], up [I], down [d]) outputs, before routing."""
    w, dw = experts.gate_up_proj[e], experts.down_proj[e]
    gu = x @ w if lay.transposed else w @ x
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:
        gu = gu + bias[e]
    inter = gu.shape[0] // 2
    gate, up = (gu[0::2], gu[1::2]) if lay.interleaved else (gu[:inter], gu[inter:])
    if lay.interleaved:  # GPT-OSS's clamped GLU
        g, u = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        h = (u + 1) * g * torch.sigmoid(g * experts.alpha)
    else:
        h = experts.act_fn(gate) * up
    out = h @ dw if lay.transposed else dw @ h
    down_bias = getattr(experts, "down_proj_bias", None)
    return gate, up, out + down_bias[e] if down_bias is not None else out


def _l1(v: torch.Tensor) -> torch.Tensor:
    return v.abs() / v.abs().sum().clamp_min(1e-12)


@torch.no_grad()
def _reference(
    model: nn.Module, name: str, inputs: dict[str, list[torch.Tensor]], stat: str, token_mask: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Expected statistic per expert projection and router, looping over the tokens routed to each expert."""
    lay = _LAYOUT[name]
    blocks = _blocks(model)
    out: dict[str, torch.Tensor] = {}
    for path, xs in inputs.items():
        block = blocks[path]
        router = getattr(block, lay.router)
        acc: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}

        def add(key: str, v: torch.Tensor, acc: dict[str, torch.Tensor] = acc, count: dict[str, int] = count) -> None:
            v = _l1(v) if stat == "l1_token_mean" else v.abs()
            acc[key] = acc.get(key, torch.zeros_like(v)) + v.float()
            count[key] = count.get(key, 0) + 1

        for x in xs:
            if lay.scaled_input:
                logits = router(x)[1]
                idx = logits.topk(block.top_k, dim=-1).indices
            else:
                idx = router(x)[2]
            votes = torch.ones(x.shape[0], dtype=torch.bool) if token_mask is None else token_mask.reshape(-1).bool()
            for t in range(x.shape[0]):
                if not votes[t]:
                    continue
                add(f"{path}.{lay.router}", F.linear(x[t], router.weight, getattr(router, "bias", None)))
                for e in idx[t].tolist():
                    xe = x[t] * torch.sigmoid(logits[t, e]) if lay.scaled_input else x[t]
                    gate, up, down = _expert_outputs(block.experts, lay, e, xe)
                    for part, v in (("gate", gate), ("up", up), ("down", down)):
                        add(f"{path}.experts.{e}.{part}", v)
        for key, v in acc.items():
            out[key] = v / count[key] if stat == "l1_token_mean" else v
    return out


def _num_experts(model: nn.Module) -> int:
    return int(next(iter(_blocks(model).values())).experts.gate_up_proj.shape[0])


# --- (b) the per-expert statistic equals the independent recomputation ---------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_expert_and_router_statistics_match_reference(name: str) -> None:
    model = _hf(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    assert sorted(h.expert_groups) == sorted(f"{p}.experts" for p in _blocks(model))
    inputs, handles = _capture_inputs(model)
    for seed in (1, 2):  # two micro-batches accumulate into one step
        _loss(model, _ids(seed)).backward()
    for hd in handles:
        hd.remove()
    expected = _reference(model, name, inputs, "abs_sum", None)
    got = h.scores()
    routed = [k for k in expected if ".experts." in k]
    assert len(routed) >= 3 * 2  # at least two experts ran in each test model
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=key)
    # experts that received no token have no statistic (and are not masked)
    assert not {k for k in got if ".experts." in k and k.rsplit(".", 1)[-1] in ("gate", "up", "down")} - set(routed)
    opt.step()
    masks = h.masks()
    for key in routed:
        assert torch.equal(masks[key], select_mask(expected[key], 0.3, "quantile")), key
    h.remove()


@pytest.mark.parametrize(("name", "stat"), [("mixtral", "l1_token_mean"), ("gpt_oss", "abs_sum")])
def test_expert_statistic_token_mask_and_l1(name: str, stat: str) -> None:
    model = _hf(name, seed=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    h = modulart.migu.apply(model, keep_ratio=0.3, stat=stat, optimizer=opt)
    ids = _ids(4)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding does not vote
    h.set_token_mask(mask)
    inputs, handles = _capture_inputs(model)
    _loss(model, ids).backward()
    for hd in handles:
        hd.remove()
    expected = _reference(model, name, inputs, stat, mask)
    unmasked = _reference(model, name, inputs, stat, None)
    got = h.scores()
    assert any(not torch.allclose(expected[k], unmasked[k]) for k in expected)  # the mask matters here
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-6, msg=key)
    h.remove()


# --- (a) + (c) only the kept units of each expert and of the router move --------------------------
def _changed_units(before: torch.Tensor, after: torch.Tensor, axis: int) -> torch.Tensor:
    """Bool [E, units]: which units of each expert changed (``axis``: unit axis of the 3-D tensor)."""
    diff = after != before
    if diff.dim() == 2:  # a bias [E, units]
        return diff
    return diff.any(dim=3 - axis)


def _kept_storage(masks: dict[str, torch.Tensor], experts_path: str, lay: Layout, e: int, inter: int) -> torch.Tensor:
    """Expert ``e``'s kept gate_up units in storage order, from its gate and up masks."""
    gate, up = masks[f"{experts_path}.{e}.gate"], masks[f"{experts_path}.{e}.up"]
    if lay.interleaved:
        return torch.stack([gate, up], dim=1).reshape(2 * inter)
    return torch.cat([gate, up])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("optim", ["sgd", "adamw_freeze"])
def test_only_kept_units_of_each_expert_change(name: str, optim: str) -> None:
    model = _hf(name, seed=5).train()
    lay = _LAYOUT[name]
    if optim == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, select="topk", freeze_masked_rows=optim != "sgd", optimizer=opt)
    if optim != "sgd":  # first step builds Adam moments, the second must still leave masked units alone
        _loss(model, _ids(6)).backward()
        opt.step()
        opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, _ids(7)).backward()
    opt.step()
    masks, stats = h.masks(), h.stats()
    axis = 2 if lay.transposed else 1
    checked = 0
    for path, block in _blocks(model).items():
        ex = block.experts
        inter = ex.down_proj.shape[1 if lay.transposed else 2]
        d = ex.gate_up_proj.shape[1 if lay.transposed else 2]
        gu = _changed_units(before[f"{path}.experts.gate_up_proj"], ex.gate_up_proj.detach(), axis)
        dn = _changed_units(before[f"{path}.experts.down_proj"], ex.down_proj.detach(), axis)
        for e in range(ex.gate_up_proj.shape[0]):
            key = f"{path}.experts.{e}"
            if not stats[f"{key}.gate"].seen:  # no token routed to e: zero gradient, not masked
                if optim == "sgd":
                    assert not gu[e].any() and not dn[e].any()
                continue
            checked += 1
            for part, units in (("gate", inter), ("up", inter), ("down", d)):
                assert stats[f"{key}.{part}"].kept_fraction == keep_count(0.3, units) / units
            kept = _kept_storage(masks, f"{path}.experts", lay, e, inter)
            assert torch.equal(gu[e], kept), f"{key}: gate_up units that moved != kept units"
            assert torch.equal(dn[e], masks[f"{key}.down"]), f"{key}: down units that moved != kept units"
            if hasattr(ex, "gate_up_proj_bias"):  # GPT-OSS biases follow their units
                gb = _changed_units(before[f"{path}.experts.gate_up_proj_bias"], ex.gate_up_proj_bias.detach(), 1)
                db = _changed_units(before[f"{path}.experts.down_proj_bias"], ex.down_proj_bias.detach(), 1)
                assert torch.equal(gb[e], kept) and torch.equal(db[e], masks[f"{key}.down"])
        # (c) the router: one unit per expert, top keep_count(0.3, E) kept, only those rows move
        rpath = f"{path}.{lay.router}"
        router = getattr(block, lay.router)
        moved = (router.weight.detach() != before[f"{rpath}.weight"]).any(1)
        n_exp = router.weight.shape[0]
        assert int(masks[rpath].sum()) == keep_count(0.3, n_exp)
        assert torch.equal(moved, masks[rpath]), f"{rpath}: rows that moved != kept experts"
    assert checked >= 2
    h.remove()


def test_quantile_keeps_migu_rounding_per_expert() -> None:
    model = _hf("olmoe", seed=8).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    _loss(model, _ids(9)).backward()
    scores = h.scores()
    opt.step()
    masks = h.masks()
    experts = [k for k in scores if ".experts." in k]
    assert experts
    for key in experts:
        n = scores[key].numel()
        assert int(masks[key].sum()) >= 1 + int(0.3 * (n - 1))  # linear-interpolation quantile, ties kept
        assert torch.equal(masks[key], select_mask(scores[key], 0.3, "quantile"))
    h.remove()


# --- per-expert ModuleList (nn.Linear experts): a hook on each linear sees only its tokens ----------
class _SwiGLU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _ListMoE(nn.Module):
    def __init__(self, d: int = 12, f: int = 10, n: int = 4, k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList([_SwiGLU(d, f) for _ in range(n)])
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * w[tok, slot, None])
        return out.reshape(x.shape)


class _ListModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.inp = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.moe = _ListMoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.norm(self.inp(x)))


def test_module_list_experts_gated_over_their_own_tokens() -> None:
    model = _ListModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MIGUCoverageWarning)  # everything trainable is gated (norm by design)
        h = modulart.migu.apply(model, keep_ratio=0.3, select="topk", optimizer=opt)
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(12))
    model(x).pow(2).sum().backward()
    got = h.scores()
    with torch.no_grad():
        z = model.norm(model.inp(x)).reshape(-1, 12)
        idx = model.moe.router(z).topk(2, dim=-1).indices
        for e, ex in enumerate(model.moe.experts):
            rows = [t for t in range(z.shape[0]) if e in idx[t].tolist()]
            if not rows:
                assert f"moe.experts.{e}.gate_proj" not in got
                continue
            zs = z[rows]
            g, u = zs @ ex.gate_proj.weight.T, zs @ ex.up_proj.weight.T
            dn = (F.silu(g) * u) @ ex.down_proj.weight.T
            for name, v in (("gate_proj", g), ("up_proj", u), ("down_proj", dn)):
                torch.testing.assert_close(got[f"moe.experts.{e}.{name}"], v.abs().sum(0))
        torch.testing.assert_close(got["moe.router"], (z @ model.moe.router.weight.T).abs().sum(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    masks = h.masks()
    for e, ex in enumerate(model.moe.experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"moe.experts.{e}.{name}"
            moved = (getattr(ex, name).weight.detach() != before[f"{key}.weight"]).any(1)
            if key in got:
                assert torch.equal(moved, masks[key])
            else:
                assert not moved.any()
    h.remove()


# --- (d) the coverage warning ------------------------------------------------------------------
def _coverage(model: nn.Module, **kw: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        h = modulart.migu.apply(model, **kw)
    h.remove()
    return [str(w.message) for w in rec if issubclass(w.category, MIGUCoverageWarning)]


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_no_coverage_warning_when_everything_is_gated(name: str) -> None:
    assert _coverage(_hf(name)) == []


def test_coverage_warning_names_every_ungated_parameter() -> None:
    msgs = _coverage(_hf("gpt_oss"))  # attention sinks are not output units of a linear map
    assert len(msgs) == 1
    assert "model.layers.0.self_attn.sinks" in msgs[0] and "model.layers.1.self_attn.sinks" in msgs[0]
    assert "experts" not in msgs[0].split("\n")[0] and "embed_tokens" not in msgs[0]

    msgs = _coverage(_hf("mixtral"), moe=False)  # experts and routers left out on request
    assert len(msgs) == 1
    for layer in (0, 1):
        for p in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            assert f"model.layers.{layer}.mlp.{p}" in msgs[0]
    assert "norm" not in msgs[0].split("\n")[0] and "lm_head" not in msgs[0].split("\n")[0]

    torch.manual_seed(0)
    mha = nn.Sequential(nn.Embedding(10, 8))
    mha.add_module("attn", nn.MultiheadAttention(8, 2))
    msgs = _coverage(mha, targets=None)
    assert len(msgs) == 1 and "attn.in_proj_weight" in msgs[0] and "attn.in_proj_bias" in msgs[0]
    assert "attn.out_proj" not in msgs[0] and "0.weight" not in msgs[0]


class _UpFirstExperts(nn.Module):
    """Fused storage shaped like Mixtral's but with the *up* rows first: MIGU must not guess."""

    def __init__(self, n: int = 3, d: int = 8, f: int = 5, claim_layout: bool = False) -> None:
        super().__init__()
        if claim_layout:  # the flags transformers sets on its decorated experts, here wrong
            self.is_transposed, self.is_concatenated = False, True
        self.gate_up_proj = nn.Parameter(torch.randn(n, 2 * f, d))
        self.down_proj = nn.Parameter(torch.randn(n, d, f))
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                up, gate = (self.gate_up_proj[idx[t, j]] @ x[t]).chunk(2)
                out[t] += w[t, j] * (self.down_proj[idx[t, j]] @ (self.act_fn(gate) * up))
        return out


class _UpFirstMoE(nn.Module):
    def __init__(self, claim_layout: bool) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.gate = nn.Linear(8, 3, bias=False)
        self.experts = _UpFirstExperts(claim_layout=claim_layout)
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x).softmax(-1).topk(self.top_k, -1)
        return self.experts(x, idx, w)


@pytest.mark.parametrize(
    ("claim_layout", "reason"),
    [(False, "no verified MoE view describes its storage"), (True, "recomputed expert outputs differ")],
)
def test_unverifiable_experts_are_refused_and_named(claim_layout: bool, reason: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8), _UpFirstMoE(claim_layout))
    msgs = _coverage(model)
    assert len(msgs) == 1
    assert "1.experts.gate_up_proj" in msgs[0] and "1.experts.down_proj" in msgs[0]
    assert f"1.experts: {reason}" in msgs[0]
    with pytest.raises(UnsupportedModuleError, match="fused experts MIGU cannot gate"):
        modulart.migu.apply(model, targets="1.experts")


def test_selector_picks_experts_and_routers() -> None:
    model = _hf("qwen3_moe")
    h = modulart.migu.apply(model, targets=["re:.*mlp\\.experts$", "re:.*mlp\\.gate$"])
    assert sorted(h.expert_groups) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert sorted(h.layers) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(layer.target.from_input for layer in h.layers.values())
    h.remove()


# --- (e) remove() restores everything -------------------------------------------------------------
def _hook_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[int]]:
    out = [list(m._forward_hooks) + list(m._forward_pre_hooks) for m in model.modules()]
    return [*out, list(opt._optimizer_step_pre_hooks), list(opt._optimizer_step_post_hooks)]


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_remove_restores_hooks_outputs_and_plain_updates(name: str) -> None:
    model = _hf(name, seed=14).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks, state = _hook_dicts(model, opt), {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=_ids(15)).logits
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    _loss(model, _ids(15)).backward()  # statistics recorded, masks pending
    opt.zero_grad()
    h.remove()
    assert _hook_dicts(model, opt) == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids(15)).logits, ref)
    # after removal a step updates every unit of every routed expert again
    path = next(iter(_blocks(model)))
    before = model.get_parameter(f"{path}.experts.down_proj").detach().clone()
    _loss(model, _ids(16)).backward()
    opt.step()
    axis = 2 if _LAYOUT[name].transposed else 1
    changed = _changed_units(before, model.get_parameter(f"{path}.experts.down_proj").detach(), axis)
    ran = changed.any(1)
    assert ran.any() and changed[ran].all()


def test_disable_and_skip_first_task_leave_experts_unmasked() -> None:
    model = _hf("mixtral", seed=17).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, skip_first_task=True, optimizer=opt)
    key = "model.layers.0.mlp.experts.down_proj"
    for step in range(2):
        before = model.get_parameter(key).detach().clone()
        _loss(model, _ids(18 + step)).backward()
        opt.step()
        opt.zero_grad()
        changed = _changed_units(before, model.get_parameter(key).detach(), 1)
        ran = changed.any(1)
        if step == 0:  # first task: statistics recorded, no masking
            assert changed[ran].all() and any(s.steps == 1 for k, s in h.stats().items() if ".experts." in k)
            h.task_boundary()
        else:
            assert not changed[ran].all()
            assert any(s.task_jaccard for k, s in h.stats().items() if ".experts." in k)
    with h.disabled():
        before = model.get_parameter(key).detach().clone()
        _loss(model, _ids(30)).backward()
        opt.step()
        opt.zero_grad()
        changed = _changed_units(before, model.get_parameter(key).detach(), 1)
        assert changed[changed.any(1)].all()
    h.remove()


def test_distributed_statistics_round_trip_with_experts(tmp_path: Any) -> None:
    """One-rank gloo group: the flat all-reduce buffer (linears, routers, experts) unpacks to the same masks."""
    import torch.distributed as dist

    def run() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = _hf("olmoe", seed=21).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
        _loss(model, _ids(22)).backward()
        h.mask_()  # decides the masks (all-reducing the statistics when a process group is up)
        scores = {k: v.clone() for k, v in h.scores().items()}
        opt.step()
        masks = h.masks()
        h.remove()
        return scores, masks

    scores, masks = run()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        scores_d, masks_d = run()
    finally:
        dist.destroy_process_group()
    assert any(".experts." in k for k in masks) and masks.keys() == masks_d.keys()
    assert all(torch.equal(masks[k], masks_d[k]) for k in masks)
    assert scores.keys() == scores_d.keys() and all(torch.equal(scores[k], scores_d[k]) for k in scores)
