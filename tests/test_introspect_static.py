"""modulart.introspect static analyses (S1–S5): known answers, streaming == live, every layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modulart as mt
import modulart.introspect as mi
from families import MOE_FAMILIES, build
from introspect_models import (
    fused_keys,
    per_expert_keys,
    save_sharded,
    tiny_mistral,
    tiny_mixtral,
    upcycle,
)
from modulart.core.errors import IncompatibleArtifactError
from modulart.introspect.static import kendall_tau


def _offdiag(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:n, :n][~torch.eye(n, dtype=torch.bool)]


# --- S1 / S2 / S3 known answers -------------------------------------------------------------------
def test_upcycled_experts_are_alike_and_alike_to_the_dense_ffn() -> None:
    dense = tiny_mistral()
    model = upcycle(tiny_mixtral(), noise=0.05, dense=dense)
    w = mi.weights(model, dense=dense, progress=False)
    for matrix in mi.MATRICES:
        s1 = w.expert_similarity(matrix, "matrix")
        assert s1.members == ["e0", "e1", "e2", "e3", "F"]
        assert bool((_offdiag(s1.values[0], 5) > 0.99).all()), s1.values[0]
        assert bool((s1.dense_mean() > 0.99).all())
        assert bool((w.expert_similarity(matrix, "neuron_mean").expert_mean() > 0.99).all())
    s3 = w.reorder_similarity(layer=0, pair=(0, 1))
    assert s3.tau > 0.99
    assert torch.equal(s3.permutation, torch.arange(48))
    assert min(s3.after.values()) > 0.99


def test_independent_random_experts_are_unrelated() -> None:
    dense = tiny_mistral()
    w = mi.weights(tiny_mixtral(num_experts=8), dense=dense, progress=False)
    for matrix in mi.MATRICES:
        s1 = w.expert_similarity(matrix, "matrix")
        assert float(_offdiag(s1.values[0], 9).abs().max()) < 0.1  # 1536 coordinates: |cos| ~ 0.025
        assert float(s1.dense_mean().abs().max()) < 0.1
    s3 = w.reorder_similarity(layer=1, pair=(2, 5))
    assert abs(s3.tau) < 0.25
    assert max(abs(v) for v in s3.before.values()) < 0.1
    assert max(s3.after.values()) < 0.5  # the best permutation of random neurons is still far from 1


def test_reordering_recovers_a_known_permutation() -> None:
    model = tiny_mixtral(layers=1, inter=64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    moe = mt.find_moes(model)[0]
    e0, e1 = moe.expert(0), moe.expert(1)
    e1.set(gate=e0.gate[perm].clone(), up=e0.up[perm].clone(), down=e0.down[:, perm].clone())
    w = mi.weights(model, progress=False)
    exact = w.reorder_similarity(layer=0, pair=(1, 0))
    assert torch.equal(exact.permutation, perm)  # B's neuron matched to A's neuron i is perm[i]
    assert min(exact.after.values()) > 0.9999 and max(exact.before.values()) < 0.3
    assert exact.tau == pytest.approx(kendall_tau(torch.arange(64), perm))
    nearest = w.reorder_similarity(layer=0, pair=(1, 0), method="nearest")
    assert torch.equal(nearest.permutation, perm)
    sampled = w.reorder_similarity(layer=0, pair=(1, 0), max_neurons=16, seed=1)
    assert len(sampled.rows) == 16 and torch.equal(sampled.permutation, perm[sampled.rows])


# --- S4 -------------------------------------------------------------------------------------------
def test_router_linear_in_mean_act_rows_gives_r2_one() -> None:
    model = tiny_mixtral(num_experts=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for moe in mt.find_moes(model):
            means = torch.stack([e.gate.mean(0) for e in moe.experts()])
            moe.router_weight.copy_(3.0 * means + 1e-4 * torch.randn(means.shape, generator=g))
    gve = mi.weights(model, progress=False).gate_vs_experts()
    assert gve.mean_r2["act"] > 0.99
    assert bool((gve.r["act"] > 0.99).all())
    assert gve.mean_r2["down"] < 0.5  # the router is built from act rows, not from the down columns


def test_random_router_gives_low_r2() -> None:
    gve = mi.weights(tiny_mixtral(num_experts=8), progress=False).gate_vs_experts()
    assert gve.mean_r2["act"] < 0.3


# --- S5 -------------------------------------------------------------------------------------------
def test_expert_pca_equals_pca_of_the_zscored_data_matrix() -> None:
    model = tiny_mixtral(num_experts=6)
    pca = mi.weights(model, budget_mb=0.002, progress=False).pca("up", n_components=3)  # many chunks
    moe = mt.find_moes(model)[1]
    x = torch.stack([e.up.detach().reshape(-1) for e in moe.experts()]).double()
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    u, s, _ = torch.linalg.svd(z, full_matrices=False)
    ref = (u * s)[:, :3]
    got = pca.coords[1].double()
    assert torch.allclose(got.abs(), ref.abs(), atol=1e-3), (got, ref)
    assert torch.allclose(pca.explained[1].double(), (s**2 / (s**2).sum())[:3], atol=1e-5)
    neurons = mi.weights(model, progress=False).pca("act", level="neurons", layer=2, max_neurons=10)
    assert tuple(neurons.coords.shape) == (60, 2) and neurons.labels[:10] == ["e0"] * 10


# --- streaming from checkpoints ---------------------------------------------------------------------
def _all_numbers(w: mi.Weights) -> dict[str, torch.Tensor]:
    out = {}
    for m in mi.MATRICES:
        out[f"s1.{m}"] = w.expert_similarity(m, "matrix").values
        out[f"s2.{m}"] = w.expert_similarity(m, "neuron_mean").values
    gve = w.gate_vs_experts()
    out |= {f"s4.{m}": r for m, r in gve.r.items()}
    out["s5"] = w.pca("act").coords.abs()
    out["s3"] = torch.tensor([w.reorder_similarity(layer=w.layers[-1], pair=(0, 1)).tau])
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5, equal_nan=True), k


@pytest.mark.parametrize("style", ["mixtral", "qwen", "fused"])
def test_streaming_equals_live_for_every_key_style(tmp_path: Path, style: str) -> None:
    model = tiny_mixtral()
    tensors = fused_keys(model) if style == "fused" else per_expert_keys(model, style)
    ckpt = save_sharded(tensors, tmp_path / style)
    live = _all_numbers(mi.weights(model, progress=False))
    streamed = mi.weights(ckpt, budget_mb=0.002, progress=False)  # forces many chunks per matrix
    assert streamed.layers == [0, 1, 2]
    _assert_same(live, _all_numbers(streamed))


def test_save_pretrained_checkpoints_stream_like_the_live_model(tmp_path: Path) -> None:
    for name in ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"):  # per-expert keys; GPT-OSS interleaved
        fam = build(name)
        fam.model.save_pretrained(tmp_path / name)
        live = mi.weights(fam.model, progress=False)
        streamed = mi.weights(tmp_path / name, budget_mb=0.001, progress=False)
        assert streamed.layers == live.layers
        _assert_same(_all_numbers(live), _all_numbers(streamed))


def test_dense_reference_from_a_checkpoint_equals_from_a_model(tmp_path: Path) -> None:
    dense = tiny_mistral()
    model = upcycle(tiny_mixtral(), noise=0.3, dense=dense)
    dense.save_pretrained(tmp_path / "dense")
    a = mi.weights(model, dense=dense, progress=False).expert_similarity("down")
    b = mi.weights(model, dense=tmp_path / "dense", progress=False).expert_similarity("down")
    assert torch.allclose(a.values, b.values, atol=1e-6)
    assert 0.5 < float(a.dense_mean().mean()) < 0.99  # noise 0.3: alike, not equal


def test_missing_tensor_and_wrong_shape_are_named(tmp_path: Path) -> None:
    tensors = per_expert_keys(tiny_mixtral(), "mixtral")
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    save_sharded({k: v for k, v in tensors.items() if k != gone}, tmp_path / "missing")
    with pytest.raises(IncompatibleArtifactError, match=r"layers\.1\.block_sparse_moe\.experts\.2\.\(w3 / up_proj\)"):
        mi.weights(tmp_path / "missing")
    bad = "model.layers.2.block_sparse_moe.experts.0.w2.weight"
    save_sharded(tensors | {bad: torch.zeros(32, 40)}, tmp_path / "shape")
    with pytest.raises(IncompatibleArtifactError, match=r"experts\.0\.w2\.weight.*\[32, 40\], expected \[32, 48\]"):
        mi.weights(tmp_path / "shape")
    fused = fused_keys(tiny_mixtral())
    save_sharded({k: v for k, v in fused.items() if "layers.0.mlp.experts.down_proj" not in k}, tmp_path / "fused")
    with pytest.raises(IncompatibleArtifactError, match=r"missing tensor 'model\.layers\.0\.mlp\.experts\.down_proj'"):
        mi.weights(tmp_path / "fused")
    save_sharded({"model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "dense_only")
    with pytest.raises(IncompatibleArtifactError, match="no MoE layer found"):
        mi.weights(tmp_path / "dense_only")


def test_bad_layer_and_matrix_names_are_clear() -> None:
    w = mi.weights(build("deepseek_v3").model, progress=False)
    assert w.layers == [1, 2]  # layer 0 is dense
    with pytest.raises(IndexError, match=r"layer 0 is not an analysed MoE layer; layers: \[1, 2\]"):
        w.reorder_similarity(layer=0)
    with pytest.raises(ValueError, match="matrix must be one of"):
        w.expert_similarity(matrix="wq")
    with pytest.raises(ValueError, match="level must be"):
        w.expert_similarity(level="neurons")
    with pytest.raises(IndexError, match="pair member b=9"):
        w.reorder_similarity(layer=1, pair=(0, 9))


# --- every family, shared experts ------------------------------------------------------------------
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_static_analyses_run_on_every_family(name: str) -> None:
    fam = build(name)
    w = mi.weights(fam.model, progress=False)
    assert len(w.layers) == fam.n_moe
    moe = mt.find_moes(fam.model)[0]
    s2 = w.expert_similarity("act", "neuron_mean")
    n_shared = len(moe.shared_experts)
    assert len(s2.members) == moe.num_experts + n_shared
    assert not bool(s2.values.isnan().any())  # shared experts join S2 (order-invariant)
    s1 = w.expert_similarity("act", "matrix")
    if n_shared and moe.shared_experts[0].d_ff != moe.d_expert:  # Qwen2-MoE: a shared expert of another size
        assert bool(s1.values[:, -1, :-1].isnan().all())
    gve = w.gate_vs_experts()
    assert gve.router_cosine.shape == (fam.n_moe, moe.num_experts, moe.num_experts)
    assert all(torch.isfinite(r).all() for r in gve.r.values())
    assert -1 <= w.reorder_similarity(layer=w.layers[0]).tau <= 1
    # S1 recomputed here directly from the MoE view, in canonical orientation
    flat = torch.stack([e.down.detach().reshape(-1) for e in moe.experts()])
    ref = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).t()
    got = w.expert_similarity("down").values[0, : moe.num_experts, : moe.num_experts]
    assert torch.allclose(got, ref, atol=1e-5)


def test_emoe_groups_are_analysed_as_experts() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    h = mt.emoe.apply(model, num_experts=4, top_k=2, layers="all")
    w = mi.weights(model, experts=h, progress=False)
    labels = h.labels()[""]
    h.remove()
    s1 = w.expert_similarity("act")
    keys = model[0].weight.detach()
    a, b = keys[labels == 0].reshape(-1), keys[labels == 3].reshape(-1)
    assert float(s1.values[0, 0, 3]) == pytest.approx(
        float(torch.nn.functional.cosine_similarity(a, b, dim=0)), abs=1e-5
    )
    with pytest.raises(ValueError, match="up"):
        w.gate_vs_experts(["up"])
