"""modulart.introspect's reference mode against the paper's notebooks (kamanphoebe/Look-into-MoEs).

Every expected number comes from an independent re-implementation of the notebooks' formulas written
here, on the Hugging Face modules' own tensors and forwards (``mlp.gate.weight``,
``mlp.experts.gate_up_proj`` / ``down_proj``, the dense model's ``mlp`` output), with numpy / scipy
as the notebooks use them (``linear_sum_assignment``, ``kendalltau``, ``linregress``, ``torch.std``
z-scores, PCA = centring + SVD as scikit-learn's ``svd_solver="full"``, ``np.argsort`` ranks), not
through modulart's code paths; so a drift of the reference mode fails here. The notebooks round
some intermediate values to bfloat16 (``.astype(ml_dtypes.bfloat16)``); both sides here stay in
fp32 / fp64 (modulart never rounds to bf16), which is documented in docs/introspect.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import modulart.introspect as mi
from introspect_models import tiny_mistral, tiny_mixtral
from modulart.core.errors import ConfigError, ShapeError
from modulart.introspect.options import IntrospectOptions

scipy_optimize = pytest.importorskip("scipy.optimize")
scipy_stats = pytest.importorskip("scipy.stats")

Agreement = Callable[[str, str, float, float], None]
OP = "introspect"
E, LAYERS, D, INTER = 4, 3, 32, 48


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """A random tiny Mixtral and a random tiny Mistral (the dense reference F) of the same shapes."""
    torch.manual_seed(0)
    return tiny_mixtral(num_experts=E, layers=LAYERS, d=D, inter=INTER), tiny_mistral(layers=LAYERS, d=D, inter=INTER)


# --- the notebooks' weights, read from the HF modules -----------------------------------------------
def _hf_experts(model: nn.Module, layer: int) -> dict[str, list[torch.Tensor]]:
    """Per expert the notebooks' ``w1`` (gate) ``[I, d]``, ``w3`` (up) ``[I, d]`` and ``w2`` (down) ``[d, I]``."""
    ex: Any = model.model.layers[layer].mlp.experts  # type: ignore[union-attr,index]
    gate_up, down = ex.gate_up_proj.detach().double(), ex.down_proj.detach().double()
    inter = down.shape[2]
    return {
        "w1": [gate_up[e, :inter] for e in range(gate_up.shape[0])],
        "w3": [gate_up[e, inter:] for e in range(gate_up.shape[0])],
        "w2": [down[e] for e in range(down.shape[0])],
    }


def _hf_dense(dense: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    mlp: Any = dense.model.layers[layer].mlp  # type: ignore[union-attr,index]
    return {
        "w1": mlp.gate_proj.weight.detach().double(),
        "w3": mlp.up_proj.weight.detach().double(),
        "w2": mlp.down_proj.weight.detach().double(),
    }


MATS = {"act": "w1", "up": "w3", "down": "w2"}


# --- S3 -------------------------------------------------------------------------------------------
def _ref_reorder(m1: torch.Tensor, m2: torch.Tensor, is_down: bool) -> tuple[float, float]:
    """The notebook's ``get_permute_idx`` + ``kendalltau`` + the cosine after permuting (one matrix)."""
    n1 = m1.t() if is_down else m1  # neuron i: column of w2, row of w1 / w3
    n2 = m2.t() if is_down else m2
    sim = np.empty((n1.shape[0], n2.shape[0]))
    for i in range(n1.shape[0]):
        sim[i] = torch.nn.functional.cosine_similarity(n1[i : i + 1], n2, dim=1).numpy()
    _, col = scipy_optimize.linear_sum_assignment(sim, maximize=True)
    tau = float(scipy_stats.kendalltau(col, np.arange(n1.shape[0])).statistic)
    permuted = m2[:, col] if is_down else m2[col]
    after = float(torch.nn.functional.cosine_similarity(m1.flatten(), permuted.flatten(), dim=0))
    return tau, after


def test_s3_one_permutation_per_matrix(pair: tuple[nn.Module, nn.Module], agreement: Agreement) -> None:
    model, dense = pair
    w = mi.weights(model, dense=dense, options="reference", progress=False)
    worst_tau = worst_after = 0.0
    for layer in range(LAYERS):
        mats = _hf_experts(model, layer)
        f = _hf_dense(dense, layer)
        for a, b in ((0, 1), (2, 3), (1, E)):  # E = the dense reference F (the notebooks' last member)
            got = w.reorder_similarity(layer, (a, b))
            assert got.per_matrix and sorted(got.taus) == ["act", "down", "up"]
            for matrix, name in MATS.items():
                ma = mats[name][a] if a < E else f[name]
                mb = mats[name][b] if b < E else f[name]
                tau, after = _ref_reorder(ma, mb, name == "w2")
                worst_tau = max(worst_tau, abs(got.taus[matrix] - tau))
                worst_after = max(worst_after, abs(got.after[matrix] - after))
    agreement(OP, "S3: per-matrix Kendall τ (max |Δτ|, 3 layers x 3 pairs x 3 matrices)", worst_tau, 1e-12)
    agreement(OP, "S3: cosine after the per-matrix permutation (max |Δ|)", worst_after, 1e-6)
    # the default stays one joint permutation: one τ shared by the three matrices
    joint = mi.weights(model, progress=False).reorder_similarity(0, (0, 1))
    assert not joint.per_matrix and len(set(joint.taus.values())) == 1


# --- S4 -------------------------------------------------------------------------------------------
def test_s4_mean_of_rounded_r2(pair: tuple[nn.Module, nn.Module], agreement: Agreement) -> None:
    model, _ = pair
    gve = mi.weights(model, options="reference", progress=False).gate_vs_experts()
    default = mi.weights(model, progress=False).gate_vs_experts()
    worst = 0.0
    for matrix, name in MATS.items():
        sum_r2, raw = 0.0, 0.0
        for layer in range(LAYERS):
            gate = model.model.layers[layer].mlp.gate.weight.detach().double()  # type: ignore[union-attr,index]
            mean_dim = 1 if name == "w2" else 0
            means = [m.mean(dim=mean_dim) for m in _hf_experts(model, layer)[name]]
            cos = torch.nn.functional.cosine_similarity
            gate_sim = np.array([[float(cos(gate[j], gate[k], dim=0)) for k in range(E)] for j in range(E)])
            exp_sim = np.array([[float(cos(means[j], means[k], dim=0)) for k in range(E)] for j in range(E)])
            x = np.array([exp_sim[r][c] for r in range(E) for c in range(r)])  # lower triangle, as the notebook
            y = np.array([gate_sim[r][c] for r in range(E) for c in range(r)])
            r = scipy_stats.linregress(x, y).rvalue
            sum_r2 += round(r**2, 2)
            raw += r**2
        worst = max(worst, abs(gve.mean_r2[matrix] - sum_r2 / LAYERS))
        assert default.mean_r2[matrix] == pytest.approx(raw / LAYERS, abs=1e-6)  # the default does not round
    agreement(OP, "S4: mean over layers of R² rounded to 2 decimals (max |Δ| over matrices)", worst, 1e-9)


# --- S5 -------------------------------------------------------------------------------------------
def _sklearn_pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``PCA(n_components=k, svd_solver="full").fit_transform``: centre, SVD, ``U·S``; and the variance ratios."""
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return (u * s)[:, :k], (s**2 / (s**2).sum())[:k]


def _up_to_sign(ref: np.ndarray, got: np.ndarray) -> float:
    """Max |ref - ±got| relative to max |ref|, each component's sign aligned (PCA axes are defined up to sign)."""
    signs = np.sign((ref * got).sum(0))
    signs[signs == 0] = 1
    return float(np.abs(ref - got * signs).max() / np.abs(ref).max())


def test_s5_expert_pca_with_f_and_sample_std(pair: tuple[nn.Module, nn.Module], agreement: Agreement) -> None:
    model, dense = pair
    w = mi.weights(model, dense=dense, options="reference", progress=False)
    worst = worst_ratio = 0.0
    for matrix, name in MATS.items():
        pca = w.pca(matrix)
        assert pca.labels == ["e0", "e1", "e2", "e3", "F"]  # E + 1 points, as the notebooks
        for layer in range(LAYERS):
            rows = [*_hf_experts(model, layer)[name], _hf_dense(dense, layer)[name]]
            x = torch.stack([m.t().flatten() if name == "w2" else m.flatten() for m in rows])
            x = (x - x.mean(0)) / x.std(0)  # torch.std: the sample deviation
            ref, ratio = _sklearn_pca(x.numpy(), 2)
            worst = max(worst, _up_to_sign(ref, pca.coords[layer].double().numpy()))
            worst_ratio = max(worst_ratio, float(np.abs(ratio - pca.explained[layer].double().numpy()).max()))
    agreement(OP, "S5 experts: PCA coordinates with F, sample-std z-scores (max rel. |Δ| up to sign)", worst, 1e-5)
    agreement(OP, "S5 experts: explained variance ratios (max |Δ|)", worst_ratio, 1e-5)
    assert mi.weights(model, dense=dense, progress=False).pca("act").labels == ["e0", "e1", "e2", "e3"]


def test_s5_neuron_pca_zscored_with_f(pair: tuple[nn.Module, nn.Module], agreement: Agreement) -> None:
    model, dense = pair
    w = mi.weights(model, dense=dense, options="reference", progress=False)
    worst = 0.0
    for matrix, name in MATS.items():
        for layer in (0, LAYERS - 1):
            got = w.pca(matrix, level="neurons", layer=layer)
            assert got.labels == [m for m in ("e0", "e1", "e2", "e3", "F") for _ in range(INTER)]  # every neuron
            parts = [*_hf_experts(model, layer)[name], _hf_dense(dense, layer)[name]]
            x = torch.cat([m.t() if name == "w2" else m for m in parts])  # [(E + 1) I, d]
            x = (x - x.mean(0)) / x.std(0)
            ref, _ = _sklearn_pca(x.numpy(), 2)
            worst = max(worst, _up_to_sign(ref, got.coords.double().numpy()))
    agreement(OP, "S5 neurons: z-scored PCA of all neurons with F (max rel. |Δ| up to sign)", worst, 1e-5)


# --- D1 / D2 --------------------------------------------------------------------------------------
def _qwen_moe() -> nn.Module:
    """A random tiny Qwen2-MoE: 4 routed experts and a shared expert (gated by a sigmoid)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen2_moe",
        hidden_size=D,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_experts=E,
        num_experts_per_tok=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(1)
    model: nn.Module = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _mlp_io(model: nn.Module, ids: torch.Tensor, layers: int, kind: str) -> list[torch.Tensor]:
    """Per decoder layer the ``mlp``'s input (``kind="in"``) or output (``"out"``) in a plain forward, flattened."""
    got: list[torch.Tensor] = [torch.empty(0)] * layers
    handles = []
    for i in range(layers):
        mlp = model.model.layers[i].mlp  # type: ignore[union-attr,index]

        def hook(_m: nn.Module, args: Any, out: Any = None, i: int = i) -> None:
            t = args[0] if kind == "in" else out
            got[i] = t.detach().reshape(-1, t.shape[-1]).clone()

        if kind == "in":
            handles.append(mlp.register_forward_pre_hook(hook))
        else:
            handles.append(mlp.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return got


def _ref_outputs(mlp: Any, x: torch.Tensor, shared: bool) -> list[torch.Tensor]:
    """Every routed expert's output on ``x`` (the HF experts module with top-k = that expert, weight 1),
    then the shared expert's (its module, before its gate), as the notebooks' stage 2."""
    t = x.shape[0]
    with torch.no_grad():
        outs = [mlp.experts(x, torch.full((t, 1), e), torch.ones(t, 1)) for e in range(E)]
        if shared:
            outs.append(mlp.shared_expert(x))
    return outs


def _ref_angular(outs: list[torch.Tensor]) -> np.ndarray:
    """The notebooks' long-input D1: per token ``1 - acos(cos)/π`` (diagonal 1), averaged over tokens."""
    o = torch.stack(outs).double()  # [M, T, d]
    total = np.zeros((o.shape[0], o.shape[0]))
    for j in range(o.shape[1]):
        sim = 1 - torch.acos(torch.nn.functional.cosine_similarity(o[:, None, j], o[None, :, j], dim=2)) / math.pi
        total += sim.fill_diagonal_(1.0).numpy()
    return total / o.shape[1]


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_d1_with_shared_experts_and_f(agreement: Agreement) -> None:
    model, dense = _qwen_moe(), tiny_mistral(layers=2, d=D, inter=INTER)
    r = mi.routing(model, {"input_ids": IDS}, dense=dense, options="reference")
    assert r.members == ["e0", "e1", "e2", "e3", "s0", "F"]
    got = r.output_similarity().double().numpy()
    inputs, f_out = _mlp_io(model, IDS, 2, "in"), _mlp_io(dense, IDS, 2, "out")  # F: the dense model's own forward
    worst_shared = worst_f = 0.0
    for layer in range(2):
        mlp = model.model.layers[layer].mlp  # type: ignore[union-attr,index]
        ref = _ref_angular([*_ref_outputs(mlp, inputs[layer], shared=True), f_out[layer]])
        diff = np.abs(ref - got[layer])
        worst_shared = max(worst_shared, float(diff[: E + 1, : E + 1].max()))
        worst_f = max(worst_f, float(diff[E + 1].max()), float(diff[:, E + 1].max()))
    agreement(OP, "D1: angular similarity incl. the shared expert (max |Δ|)", worst_shared, 1e-5)
    agreement(OP, "D1: angular similarity incl. F from the dense model's forward (max |Δ|)", worst_f, 1e-5)
    default = mi.routing(model, {"input_ids": IDS})
    assert default.members == ["e0", "e1", "e2", "e3"] and tuple(default.output_similarity().shape) == (2, 4, 4)


def test_d2_counts_in_the_notebooks_orientation(pair: tuple[nn.Module, nn.Module], agreement: Agreement) -> None:
    model, _ = pair
    r = mi.routing(model, {"input_ids": IDS}, options="reference")
    got = r.norm_score_counts()
    inputs = _mlp_io(model, IDS, LAYERS, "in")
    differing = 0
    for layer in range(LAYERS):
        mlp = model.model.layers[layer].mlp  # type: ignore[union-attr,index]
        x = inputs[layer]
        with torch.no_grad():
            scores = torch.softmax(nn.functional.linear(x, mlp.gate.weight), dim=-1).numpy()
        norms = torch.stack([o.norm(dim=1) for o in _ref_outputs(mlp, x, shared=False)], 1).numpy()  # [T, E]
        counts = np.zeros((E, E), dtype=np.int64)
        for j in range(x.shape[0]):  # the notebook's loop: argsort, then rank -> count[score_rank, norm_rank]
            norm_rank, score_rank = np.empty(E), np.empty(E)
            for rank, idx in enumerate(np.argsort(norms[j])):
                norm_rank[idx] = rank
            for rank, idx in enumerate(np.argsort(scores[j])):
                score_rank[idx] = rank
            for row, col in zip(score_rank.tolist(), norm_rank.tolist(), strict=True):
                counts[int(row), int(col)] += 1
        differing += int(np.abs(counts - got[layer].numpy()).sum())
    agreement(OP, "D2: count matrix C[score_rank, norm_rank], ascending ranks (entries differing)", differing, 0)
    # modulart's default (descending ranks) is the same matrix rotated by 180°
    assert torch.equal(mi.routing(model, {"input_ids": IDS}).norm_score_counts(), got.flip(1, 2))


# --- the report in reference mode -----------------------------------------------------------------
def test_report_in_reference_mode_records_the_members(pair: tuple[nn.Module, nn.Module]) -> None:
    model, dense = pair
    rep = mi.report(model, {"input_ids": IDS}, dense=dense, options="reference", progress=False, reorder_neurons=16)
    assert rep.meta["s5_labels"] == ["e0", "e1", "e2", "e3", "F"] and tuple(rep.arrays["s5.experts"].shape) == (3, 5, 2)
    assert rep.meta["d1_members"] == ["e0", "e1", "e2", "e3", "F"] and rep.meta["d2_ranks"] == "ascending"
    assert {"s3.tau.act", "s3.tau.up", "s3.tau.down"} <= set(rep.arrays) and "S3 tau act" in rep.meta["columns"]
    gve = mi.weights(model, options="reference", progress=False).gate_vs_experts()
    assert rep.meta["headline"]["mean_r2"] == pytest.approx(gve.mean_r2)
    assert rep.meta["options"] == IntrospectOptions.reference().to_dict()


@pytest.mark.slow
def test_reference_mode_figures_are_written(pair: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model, dense = pair
    rep = mi.report(model, {"input_ids": IDS}, dense=dense, options="reference", progress=False, reorder_neurons=8)
    names = {p.name for p in rep.plot(tmp_path)}  # the figures name F and state the rank order
    assert {"pca_experts.png", "d1_output_similarity.png", "d2_rank_counts.png"} <= names


def test_shared_experts_as_pca_points() -> None:
    model = _qwen_moe()  # shared expert of width 48, routed experts of width 16
    w = mi.weights(model, options=IntrospectOptions(pca_shared=True), progress=False)
    with pytest.raises(ShapeError, match="pca_shared"):
        w.pca("act")  # flattened matrices of different shapes cannot be points of one PCA
    neurons = w.pca("act", level="neurons", layer=0, max_neurons=None)  # neurons are d_model vectors
    assert neurons.labels == [f"e{e}" for e in range(E) for _ in range(16)] + ["s0"] * 48


def test_cli_reference_mode_streams_the_same_numbers(pair: tuple[nn.Module, nn.Module], tmp_path: Path) -> None:
    """``modulart inspect --reference`` on checkpoints: the live reference mode's numbers, F in the PCA."""
    import argparse

    from introspect_models import per_expert_keys, save_sharded
    from modulart.introspect.cli import add_inspect_parser, run_inspect

    model, dense = pair
    ckpt = save_sharded(per_expert_keys(model, "mixtral"), tmp_path / "ckpt")
    dense.save_pretrained(tmp_path / "dense")
    parser = argparse.ArgumentParser(prog="modulart")
    add_inspect_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    argv = ["inspect", str(ckpt), "--out", str(out), "--dense", str(tmp_path / "dense"), "--reference", "--no-plots"]
    assert run_inspect(parser.parse_args([*argv, "--reorder-neurons", "8"]), [].append) == 0
    rep = mi.Report.load(out)
    live = mi.weights(model, dense=dense, options="reference", progress=False)
    assert rep.meta["s5_labels"] == ["e0", "e1", "e2", "e3", "F"]
    assert torch.allclose(rep.arrays["s5.experts"].abs(), live.pca("act").coords.abs(), rtol=1e-4, atol=1e-4)
    assert rep.meta["headline"]["mean_r2"] == pytest.approx(live.gate_vs_experts().mean_r2)


# --- bad option values ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("s3_per_matrix", "yes"),
        ("s4_round", -1),
        ("s4_round", 2.0),
        ("pca_dense", 1),
        ("pca_shared", None),
        ("pca_ddof", 2),
        ("neuron_pca_zscore", "true"),
        ("neuron_pca_sample", 0),
        ("d1_dense", 0),
        ("d1_shared", "no"),
        ("d2_ranks", "up"),
    ],
)
def test_each_bad_option_value_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"IntrospectOptions\.{field} = "):
        IntrospectOptions(**{field: value})
    with pytest.raises(ConfigError, match=rf"IntrospectOptions\.{field} = "):
        IntrospectOptions.reference(**{field: value})


def test_bad_call_arguments_name_the_argument(pair: tuple[nn.Module, nn.Module]) -> None:
    model, dense = pair
    with pytest.raises(ConfigError, match="options = 'paper'"):
        mi.weights(model, options="paper", progress=False)
    with pytest.raises(ConfigError, match="options = 3"):
        mi.routing(model, {"input_ids": IDS}, options=3)  # type: ignore[arg-type]
    opts = IntrospectOptions()
    opts.d2_ranks = "sideways"  # assigned after construction: checked when used
    with pytest.raises(ConfigError, match="d2_ranks"):
        mi.report(model, options=opts, progress=False)
    w = mi.weights(model, progress=False)
    with pytest.raises(ConfigError, match="per_matrix"):
        w.reorder_similarity(0, (0, 1), per_matrix="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_neurons"):
        w.pca("act", level="neurons", layer=0, max_neurons=0)
    r = mi.routing(model, {"input_ids": IDS})
    with pytest.raises(ConfigError, match="ranks"):
        r.norm_score_counts(ranks="sideways")
    with pytest.raises(ConfigError, match="d1_dense"):
        mi.routing(model, {"input_ids": IDS}, dense=dense)  # F in D1 is a reference-mode option
    with pytest.raises(ConfigError, match="dense"):
        mi.routing(model, {"input_ids": IDS}, dense="ckpt/", options="reference")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="d1_dense"):  # F's outputs need a model that runs, not a directory
        mi.report(model, {"input_ids": IDS}, dense="ckpt/", options="reference", progress=False)
