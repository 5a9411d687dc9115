"""modulart.introspect dynamic analyses (D1–D4): known answers, hooks, every family, EMoE telemetry."""

from __future__ import annotations

import math

import pytest
import torch

import modulart as mt
import modulart.introspect as mi
from families import MOE_FAMILIES, build
from introspect_models import scaled_expert_moe, tiny_mixtral, upcycle
from modulart.core.errors import HooksNotFiredError

IDS = {"ids": torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))}


def test_router_monotone_in_output_norms_gives_a_diagonal_count_matrix() -> None:
    model = scaled_expert_moe(scales=[1.0, 2.0, 3.0, 4.0], router_bias=[0.1, 0.5, 0.9, 1.3])
    r = mi.routing(model, IDS)
    counts = r.norm_score_counts()
    tokens = 27
    for c in counts:
        assert torch.equal(c, torch.diag(torch.full((4,), tokens)))
    corr = r.norm_score_correlation()
    assert torch.allclose(corr.spearman, torch.ones(3)) and torch.allclose(corr.kendall, torch.ones(3))
    assert torch.allclose(corr.hit_rate, torch.ones(3)) and torch.allclose(corr.chance, torch.full((3,), 0.5))


def test_anti_monotone_router_gives_the_reverse() -> None:
    model = scaled_expert_moe(scales=[1.0, 2.0, 3.0, 4.0], router_bias=[1.3, 0.9, 0.5, 0.1])
    r = mi.routing(model, IDS)
    for c in r.norm_score_counts():
        assert torch.equal(c, torch.diag(torch.full((4,), 27)).flip(1))
    corr = r.norm_score_correlation()
    assert torch.allclose(corr.spearman, -torch.ones(3)) and torch.allclose(corr.kendall, -torch.ones(3))
    assert torch.allclose(corr.hit_rate, torch.zeros(3))


def test_scaled_copies_have_identical_output_directions() -> None:
    r = mi.routing(scaled_expert_moe(scales=[1.0, 2.0, 3.0, 4.0], router_bias=[0.0, 1.0, 2.0, 3.0]), IDS)
    assert torch.allclose(r.output_similarity(), torch.ones(3, 4, 4), atol=1e-3)
    sel, _ = r.selected_similarity()
    assert torch.allclose(sel, torch.ones(3), atol=1e-3)
    # constant routing: every consecutive pair shares both experts
    cons, chance = r.consecutive_same_expert()
    assert torch.allclose(cons, torch.ones(3)) and torch.allclose(chance, torch.ones(3))
    m = r.routing_map(layer=1, max_tokens=5)
    assert m.shape == (4, 5) and bool((m[:2] == 0).all()) and torch.allclose(m.sum(0), torch.ones(5))


def test_upcycled_outputs_are_alike_and_random_ones_are_not() -> None:
    ids = {"input_ids": IDS["ids"]}
    alike = mi.routing(upcycle(tiny_mixtral(), noise=0.05), ids).output_similarity()
    assert float(alike.min()) > 0.9
    apart = mi.routing(tiny_mixtral(), ids).output_similarity()
    off = apart[:, ~torch.eye(4, dtype=torch.bool)]
    assert float(off.max()) < 0.75 and abs(float(off.mean()) - 0.5) < 0.1  # angular 0.5 = orthogonal


def test_scores_are_recomputed_in_the_pre_hook_and_match_the_router() -> None:
    fam = build("mixtral")
    moe = mt.find_moes(fam.model)[1]
    seen: dict[str, torch.Tensor] = {}
    with mt.HookRegistry(fam.model) as reg:
        reg.forward(moe.router, lambda m, a, out: seen.__setitem__("logits", a[0] @ m.weight.t()))
        r = mi.routing(fam.model, fam.inputs)
    want = seen["logits"].reshape(-1, moe.num_experts).float().softmax(-1)
    assert torch.allclose(r.records[1].scores, want, atol=1e-6)


def test_hooks_not_firing_is_an_error() -> None:
    fam = build("plain_moe")
    model = fam.model

    moes = mt.find_moes(model)
    original = model.blocks[2].forward
    model.blocks[2].forward = lambda x: x  # type: ignore[method-assign]  # bypasses the MoE, as a fused kernel would
    try:
        with pytest.raises(HooksNotFiredError):
            mi.routing(model, fam.inputs["ids"])
    finally:
        model.blocks[2].forward = original  # type: ignore[method-assign]
    assert len(moes) == 3 and not model.blocks[2].mlp._forward_pre_hooks


def test_padding_is_left_out_and_batches_accumulate() -> None:
    fam = build("mixtral")
    ids = fam.inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    r = mi.routing(fam.model, [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}])
    assert r.records[0].norms.shape[0] == 11 + 14
    assert int(r.norm_score_counts()[0].sum()) == 4 * 25


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_dynamic_analyses_run_on_every_family(name: str) -> None:
    fam = build(name)
    r = mi.routing(fam.model, fam.inputs if name != "plain_moe" else fam.inputs["ids"])
    moe = mt.find_moes(fam.model)[0]
    e, t = moe.num_experts, 14
    assert r.layers == [m.layer for m in mt.find_moes(fam.model)]
    assert r.output_similarity().shape == (fam.n_moe, e, e)
    assert torch.equal(r.norm_score_counts().sum((1, 2)), torch.full((fam.n_moe,), t * e))
    ratio = r.activation_ratio()
    assert bool(((ratio > 0.5) & (ratio <= 1)).all())
    c = r.norm_score_correlation()
    assert all(-1 <= float(v) <= 1 for v in c.spearman)
    # the selection the analysis saw is the block's own: recompute it from the captured input
    x = mt.capture(fam.model, {"x": moe.input_site}, lambda: fam.run())["x"]
    assert torch.equal(r.records[0].indices, moe.route(x.reshape(-1, x.shape[-1])).indices)


def test_d3_counts_small_activations() -> None:
    fam = build("mixtral")
    with torch.no_grad():
        for moe in mt.find_moes(fam.model):
            for ex in moe.experts()[:2]:
                ex.set(gate=torch.zeros_like(ex.gate))  # silu(0) = 0: half the experts inactive
    ratio = mi.routing(fam.model, fam.inputs).activation_ratio()
    assert bool(((ratio > 0.45) & (ratio <= 0.5)).all()), ratio


def test_emoe_routing_telemetry_matches_the_converted_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    # masked: the sparse executor claims its FFN (here the whole model), so introspect's hooks are refused
    h = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all", executor="masked")
    try:
        r = mi.routing(model, x, experts=h)
        stats = h.routing_stats()[""]
    finally:
        h.remove()
    counts = torch.bincount(r.records[0].indices.reshape(-1), minlength=8).double()
    assert torch.allclose(counts / counts.sum(), torch.tensor(stats.load, dtype=torch.float64))
    q = x.reshape(-1, 16)
    hidden = model[1](model[0](q))
    outs = r.records[0].norms.sum(1)
    labels = h.labels()[""]
    want = sum((hidden[:, labels == j] @ model[2].weight[:, labels == j].t()).norm(dim=1) for j in range(8))
    assert torch.allclose(outs, want, atol=1e-5)
    assert not math.isnan(float(r.consecutive_same_expert()[0][0]))


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_expert_gate_activation_is_the_gate_branch_of_hidden(name: str) -> None:
    fam = build(name)
    x = torch.randn(5, mt.find_moes(fam.model)[0].d_model, generator=torch.Generator().manual_seed(1))
    for moe in mt.find_moes(fam.model):
        for e in moe.experts()[:2]:
            with torch.no_grad():
                up = torch.nn.functional.linear(x, e.up, e.up_bias)
                if name == "gpt_oss":  # (clamp(up) + 1) * act(gate)
                    limit = float(moe.experts_module.limit)
                    want = e.act(x) * (up.clamp(-limit, limit) + 1)
                else:
                    want = e.act(x) * up
                assert torch.allclose(want, e.hidden(x), atol=1e-6)
                assert not torch.allclose(e.act(x), e.hidden(x))
