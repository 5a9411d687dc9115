"""EMoE's reference presets against independent re-implementations of the reference code (qiuzh20/EMoE).

Every expected number here is computed in plain torch by following the reference code step by step
(its Tutel MoE layer for BERT / GPT-2: the avg-k gate, the gate noise, the top-k, the capacity and
the order in which expert slots fill, the load/importance loss, the per-expert bias copies, the
dropout before the GELU; its Llama MLP for the score modes), on the same tensors as modulart, and
compared through the ``agreement`` fixture. Nothing here calls modulart to get the expected values
except to read the neuron -> expert labels (the split is not what is compared).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modulart as mt
from conftest import Agreement
from families import build
from modulart.emoe import EMoEConfig

D, DFF, N, K = 16, 64, 8, 4


def _ffn_model(seed: int = 0, gelu: str = "none") -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, DFF), nn.GELU(approximate=gelu), nn.Linear(DFF, D))
    with torch.no_grad():  # a visible output bias, and popular experts (so capacity bites)
        model[2].bias.normal_(0.0, 0.5)
        model[0].weight.add_(0.3 * torch.randn(1, D))
    return model


def _inputs(t: int = 240, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, D, generator=g) + 2.0 * torch.randn(1, D, generator=g)


# --- the reference code, re-implemented -------------------------------------------------------------
def _ref_experts(model: nn.Sequential, labels: torch.Tensor, n: int = N, k: int = K) -> dict[str, torch.Tensor]:
    """bert_to_MoE / gpt_to_MoE: the expert weights sliced by cluster id, the gate = mean raw key rows."""
    w0, b0 = model[0].weight.detach(), model[0].bias.detach()
    w1, b1 = model[2].weight.detach(), model[2].bias.detach()
    fc1_w = torch.stack([w0[labels == e] for e in range(n)])  # [N, s, d]
    fc1_b = torch.stack([b0[labels == e] for e in range(n)])  # [N, s]
    fc2_w = torch.stack([w1.t()[labels == e] for e in range(n)])  # [N, s, d]
    fc2_b = b1.unsqueeze(0).repeat(n, 1).div(k)  # [N, d]: bias_1 / top_k per expert
    gate = torch.stack([fc1_w[e].mean(dim=0) for e in range(n)])  # wg
    return {"fc1_w": fc1_w, "fc1_b": fc1_b, "fc2_w": fc2_w, "fc2_b": fc2_b, "gate": gate}


def _ref_locations(scores: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """extract_critical with batch_prioritized_routing=True: each assignment's slot in its expert."""
    masks = [F.one_hot(topk[:, r], scores.shape[1]).to(scores.dtype) for r in range(topk.shape[1])]
    importance = -1 * scores.max(dim=1)[0]

    def location(x: torch.Tensor) -> torch.Tensor:
        sorted_x = x[importance.argsort(dim=0)]
        sorted_cumsum = (torch.cumsum(sorted_x, dim=0) - 1) * sorted_x
        return sorted_cumsum[importance.argsort(dim=0).argsort(dim=0)]

    locs = [torch.sum(location(masks[0]) * masks[0], dim=1)]
    acc = None
    for r in range(1, topk.shape[1]):
        acc = masks[r - 1].sum(0, keepdim=True) if acc is None else acc + masks[r - 1].sum(0, keepdim=True)
        locs.append(torch.sum((location(masks[r]) + acc) * masks[r], dim=1))
    return torch.stack(locs, dim=1).long()  # [T, k]


def _ref_capacity(tokens: int, capacity_factor: float, n: int = N, k: int = K) -> int:
    samples_per_expert = (tokens + n - 1) // n
    return k * int(capacity_factor * samples_per_expert)


def _ref_moe(
    ref: dict[str, torch.Tensor],
    x: torch.Tensor,
    capacity_factor: float,
    noise: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    k: int = K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MOELayer.forward with one_score_gate (experts combine with weight 1): output and kept [T, k]."""
    n = ref["gate"].shape[0]
    logits = x @ ref["gate"].t()
    noisy = logits if noise is None else logits + 1.0 * noise / n
    scores = F.softmax(noisy, dim=1)
    topk = torch.topk(scores, k, dim=1).indices
    kept = _ref_locations(scores, topk) < _ref_capacity(x.shape[0], capacity_factor, n, k)
    outs = []  # every expert on every token (the dispatch only chooses which of these a token gets)
    for e in range(ref["fc1_w"].shape[0]):
        z = x @ ref["fc1_w"][e].t() + ref["fc1_b"][e]
        if dropout_mask is not None:  # dropout_gelu: GELU(dropout(z))
            z = z * dropout_mask[:, ref["cols"][e]]
        outs.append(F.gelu(z) @ ref["fc2_w"][e] + ref["fc2_b"][e])
    every = torch.stack(outs)  # [N, T, d]
    rows = torch.arange(x.shape[0])
    y = sum(kept[:, r, None] * every[topk[:, r], rows] for r in range(topk.shape[1]))
    assert isinstance(y, torch.Tensor)
    return y, kept


def _ref_load_importance_loss(
    logits: torch.Tensor, noisy: torch.Tensor, topk: torch.Tensor, gate_noise: float
) -> torch.Tensor:
    """tutel losses.load_importance_loss(softmax(logits), noisy.gather(topk), N, gate_noise)."""
    scores_wo_noise = F.softmax(logits, dim=1)
    topk_logits = noisy.gather(index=topk, dim=1)
    normal = torch.distributions.Normal(torch.tensor([0.0]), torch.tensor([gate_noise / N]))
    threshold = topk_logits[:, -1].view(-1, 1).float()
    load = normal.cdf(scores_wo_noise.float() - threshold).sum(0)
    l_load = load.var() / (load.mean() ** 2 + 1e-10)
    imp = scores_wo_noise.float().sum(0)
    l_imp = imp.var() / (imp.mean() ** 2 + 1e-10)
    return (l_imp + l_load) / 2.0


def _bert_preset(**overrides: Any) -> EMoEConfig:
    return EMoEConfig.reference("bert", **({"num_experts": N, "top_k": K, "layers": "all"} | overrides))


def _labels(handle: mt.emoe.EMoEHandle) -> torch.Tensor:
    return next(iter(handle.labels().values()))


# --- capacity and token dropping --------------------------------------------------------------------
@pytest.mark.parametrize("capacity_factor", [1.0, 1.5])
def test_capacity_drops_the_reference_assignments(agreement: Agreement, capacity_factor: float) -> None:
    model = _ffn_model().eval()  # eval: no noise, no dropout; capacity applies all the same
    x = _inputs()
    handle = mt.emoe.apply(model, _bert_preset(capacity_factor=capacity_factor))
    with torch.no_grad():
        y = model(x)
    stats = next(iter(handle.routing_stats().values()))
    ref = _ref_experts(model, _labels(handle))
    want, kept = _ref_moe(ref, x, capacity_factor)
    dropped = 1.0 - float(kept.double().mean())
    assert dropped > 0.02  # the limit really bites on this batch
    agreement(
        "emoe",
        f"capacity {capacity_factor}: dropped-assignment fraction (abs. difference)",
        abs(stats.dropped - dropped),
        1e-12,
    )
    agreement(
        "emoe",
        f"capacity {capacity_factor}: FFN output with dropped tokens (max abs. difference)",
        float((y - want).abs().max()),
        1e-5,
    )
    handle.remove()


def test_capacity_on_a_real_bert_block(agreement: Agreement) -> None:
    fam = build("bert")
    handle = mt.emoe.apply(fam.model, _bert_preset(capacity_factor=1.0, layers=[-1]))
    layer = next(iter(handle.layers.values()))
    got = mt.capture(fam.model, {"q": layer.ffn.input_site, "y": layer.ffn.output_site}, fam.run)
    q, y = got["q"].reshape(-1, 32), got["y"].reshape(-1, 32)
    bert_ffn = nn.Sequential(layer.ffn.key_proj.module, nn.GELU(), layer.ffn.value_proj.module)
    ref = _ref_experts(bert_ffn, _labels(handle))
    want, _ = _ref_moe(ref, q, 1.0)
    agreement("emoe", "capacity on a BERT block: FFN output (max abs. difference)", float((y - want).abs().max()), 1e-5)
    handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [16, 4])
def test_capacity_on_real_minilm_4096_tokens(agreement: Agreement, top_k: int) -> None:
    """The preset on the real MiniLM, 64 experts, 4,096 tokens: which assignments drop, and the outputs."""
    from families import minilm

    model, _ = minilm()
    ids = torch.randint(1000, 20000, (16, 256), generator=torch.Generator().manual_seed(0))
    cfg = EMoEConfig.reference("bert", top_k=top_k)
    handle = mt.emoe.apply(model, cfg)
    sites = {p: (layer.ffn.input_site, layer.ffn.output_site) for p, layer in handle.layers.items()}
    flat = {f"{p}|{i}": s for p, pair in sites.items() for i, s in enumerate(pair)}
    got = mt.capture(model, flat, lambda: model(input_ids=ids))
    stats = handle.routing_stats()
    for path, layer in handle.layers.items():
        q, y = got[f"{path}|0"].reshape(-1, 384), got[f"{path}|1"].reshape(-1, 384)
        ffn = nn.Sequential(layer.ffn.key_proj.module, nn.GELU(), layer.ffn.value_proj.module)
        want, kept = _ref_moe(_ref_experts(ffn, layer.groups.labels, 64, top_k), q, 1.5, k=top_k)
        dropped = 1.0 - float(kept.double().mean())
        name = f"MiniLM {path}, 64 experts, top-{top_k}"
        # fp32 rounding of the gate (mean keys computed another way) can flip a near-tied assignment
        agreement(
            "emoe",
            f"{name}: dropped fraction {dropped:.3f} (abs. difference; 1/65,536 = one assignment)",
            abs(stats[path].dropped - dropped),
            1e-4,
        )
        off = (y - want).abs().amax(dim=1) > 1e-4
        agreement(
            "emoe", f"{name}: tokens whose FFN output differs by > 1e-4 (fraction)", float(off.double().mean()), 1e-3
        )
    handle.remove()


def test_sparse_executor_matches_masked_with_capacity_and_bias(agreement: Agreement) -> None:
    x = _inputs()
    outs = []
    for executor in ("masked", "sparse"):
        model = _ffn_model().eval()
        handle = mt.emoe.apply(model, _bert_preset(capacity_factor=1.0, executor=executor))
        with torch.no_grad():
            outs.append(model(x))
        handle.remove()
    agreement(
        "emoe",
        "sparse vs masked executor, capacity + per-expert bias (max abs. difference)",
        float((outs[0] - outs[1]).abs().max()),
        1e-5,
    )


# --- the balance loss --------------------------------------------------------------------------------
def test_reference_balance_loss_value_and_no_gradient_into_keys(agreement: Agreement) -> None:
    model = _ffn_model().train()
    x = _inputs().requires_grad_(True)
    cfg = _bert_preset(capacity_factor=None, dropout=0.0, per_expert_bias=False)
    handle = mt.emoe.apply(model, cfg)
    model(x)
    loss = handle.balance_loss() / cfg.balance_loss_weight
    loss.backward()
    keys_grad = model[0].weight.grad
    ours_x = x.grad.clone()

    ref = _ref_experts(model, _labels(handle))
    x2 = x.detach().clone().requires_grad_(True)
    noise = torch.randn((x.shape[0], N), generator=torch.Generator().manual_seed(cfg.seed))  # the layer's draw
    logits = x2 @ ref["gate"].t()  # wg: a frozen tensor of its own
    noisy = logits + cfg.gate_noise * noise / N
    topk = torch.topk(F.softmax(noisy, dim=1), K, dim=1).indices
    want = _ref_load_importance_loss(logits, noisy, topk, cfg.gate_noise)
    want.backward()
    agreement(
        "emoe",
        "balance loss 'reference': value (relative difference)",
        abs(float(loss.detach()) - float(want.detach())) / abs(float(want.detach())),
        1e-5,
    )
    agreement(
        "emoe",
        "balance loss 'reference': gradient into the FFN keys (max abs.)",
        0.0 if keys_grad is None else float(keys_grad.abs().max()),
        0.0,
    )
    agreement(
        "emoe",
        "balance loss 'reference': gradient on the FFN input (max abs. difference)",
        float((ours_x - x2.grad).abs().max()) / float(x2.grad.abs().max()),
        1e-4,
    )
    handle.remove()

    # the default ('counts') is a different loss, and it does send gradient into the keys
    counts = mt.emoe.apply(model, cfg.replace(balance_loss="counts"))
    model.zero_grad()
    model(x.detach())
    default = counts.balance_loss() / cfg.balance_loss_weight
    default.backward()
    assert abs(float(default.detach()) - float(want.detach())) > 1e-3
    assert model[0].weight.grad is not None and float(model[0].weight.grad.abs().sum()) > 0
    counts.remove()


# --- per-expert output bias -------------------------------------------------------------------------
def test_per_expert_bias_after_an_sgd_step(agreement: Agreement) -> None:
    model = _ffn_model().train()
    x, x_next = _inputs(), _inputs(seed=7)
    b_out = model[2].bias.detach().clone()
    cfg = _bert_preset(capacity_factor=1.0, gate_noise=1.0, balance_loss_weight=0.0, dropout=0.0)
    handle = mt.emoe.apply(model, cfg)
    ref = {k: v.clone().requires_grad_(k != "gate") for k, v in _ref_experts(model, _labels(handle)).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    layer = next(iter(handle.layers.values()))
    assert layer.bias is not None
    assert torch.equal(model[2].bias.detach(), b_out)  # b_out frozen: the copies train instead

    noise = torch.randn((x.shape[0], N), generator=torch.Generator().manual_seed(cfg.seed))
    y_ref, _ = _ref_moe(ref, x, 1.0, noise=noise)
    y_ref.square().mean().backward()
    with torch.no_grad():
        for name in ("fc1_w", "fc1_b", "fc2_w", "fc2_b"):
            ref[name] -= 0.5 * ref[name].grad
        ref["gate"] = ref["fc1_w"].mean(dim=1)  # update_one_score_gate after the step
    agreement(
        "emoe",
        "per-expert bias: the copies after one SGD step (max abs. difference)",
        float((layer.bias.weight.detach() - ref["fc2_b"].detach()).abs().max()),
        1e-6,
    )
    model.eval()
    with torch.no_grad():
        got = model(x_next)
        want, _ = _ref_moe({k: v.detach() for k, v in ref.items()}, x_next, 1.0)
    agreement(
        "emoe",
        "per-expert bias: outputs after one SGD step (max abs. difference)",
        float((got - want).abs().max()),
        1e-5,
    )
    # what a single shared bias would have given differs visibly (the 0.111)
    shared = float((ref["fc2_b"].detach() - ref["fc2_b"].detach().mean(0)).abs().max())
    assert shared > 1e-3
    handle.remove()


def test_per_expert_bias_lifecycle(tmp_path: Any) -> None:
    model = _ffn_model().train()
    x = _inputs(32)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    handle = mt.emoe.apply(model, _bert_preset(capacity_factor=None, dropout=0.0, balance_loss_weight=0.0))
    layer = next(iter(handle.layers.values()))
    assert layer.bias is not None and any(p is layer.bias.weight for p in model.parameters())
    assert not model[2].bias.requires_grad
    torch.optim.SGD(model.parameters(), lr=0.5).zero_grad()
    model(x).square().mean().backward()
    with torch.no_grad():
        layer.bias.weight -= 0.5 * layer.bias.weight.grad
    model.eval()
    with torch.no_grad():
        want = model(x)
    path = handle.save(tmp_path / "emoe")
    bias = layer.bias.weight.detach().clone()
    handle.remove()  # copies discarded, b_out untouched and trainable again
    assert model[2].bias.requires_grad and torch.equal(model[2].bias, state0["2.bias"])
    assert set(model.state_dict()) == set(state0)
    loaded = mt.load(model, path)
    with torch.no_grad():
        assert torch.equal(model(x), want)  # the trained copies came back
    dense = loaded.to_dense()
    torch.testing.assert_close(dense[2].bias.detach(), bias.sum(0) * K / N)  # (k/N) sum_e B_e
    full = mt.emoe.apply(_ffn_model().eval(), _bert_preset(top_k=N, capacity_factor=None))
    with torch.no_grad():
        full.layers[next(iter(full.layers))].bias.weight.add_(0.1)  # copies diverge
        routed = full.model(x)
    merged = full.merge_()  # k = N: function-preserving, b_out = sum_e B_e
    with torch.no_grad():
        torch.testing.assert_close(merged(x), routed, atol=1e-5, rtol=1e-5)


# --- dropout ------------------------------------------------------------------------------------------
def test_dropout_before_the_activation(agreement: Agreement) -> None:
    model = _ffn_model().train()
    x = _inputs()
    cfg = _bert_preset(capacity_factor=1.0, gate_noise=1.0, balance_loss_weight=0.0, per_expert_bias=True)
    handle = mt.emoe.apply(model, cfg)
    ref = _ref_experts(model, labels := _labels(handle))
    ref["cols"] = torch.stack([torch.nonzero(labels == e).flatten() for e in range(N)])
    torch.manual_seed(11)
    with torch.no_grad():
        got = model(x)
    torch.manual_seed(11)
    mask = F.dropout(torch.ones(x.shape[0], DFF), cfg.dropout, training=True)  # the same draw, on z's shape
    noise = torch.randn((x.shape[0], N), generator=torch.Generator().manual_seed(cfg.seed))
    want, _ = _ref_moe(ref, x, 1.0, noise=noise, dropout_mask=mask)
    agreement(
        "emoe", "dropout 0.1 before the GELU in training (max abs. difference)", float((got - want).abs().max()), 1e-5
    )
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout, no noise in eval
    handle.remove()


# --- Llama path: score modes -----------------------------------------------------------------------
class _RefLlamaMLP(nn.Module):
    """MoELlamaMLP of the reference (experts contiguous after its neuron permutation)."""

    def __init__(self, mlp: nn.Module, perm: torch.Tensor, select: str) -> None:
        super().__init__()
        self.gate = mlp.gate_proj.weight.detach()[perm]
        self.up = mlp.up_proj.weight.detach()[perm]
        self.down = mlp.down_proj.weight.detach()[:, perm]
        self.select = select

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_output = x @ self.gate.t()
        up_output = x @ self.up.t()
        inter = F.silu(gate_output) * up_output
        chosen = {"gate": gate_output, "up": up_output, "up_abs": up_output.abs(), "inter": inter}[self.select]
        expert_scores = chosen.reshape(*x.shape[:-1], N, -1).mean(dim=-1)
        idx = torch.topk(expert_scores, k=2, dim=-1).indices
        mask = torch.zeros_like(expert_scores).scatter_(-1, idx, 1)
        mask = mask.repeat_interleave(self.gate.shape[0] // N, dim=-1)
        return (inter * mask) @ self.down.t(), idx


@pytest.mark.parametrize("router, select", [("avgk", "gate"), ("up", "up"), ("up_abs", "up_abs"), ("inter", "inter")])
def test_llama_score_modes(agreement: Agreement, router: str, select: str) -> None:
    fam = build("llama")
    cfg = EMoEConfig.reference("llama", num_experts=N, top_k=2, layers="all", router=router)
    handle = mt.emoe.apply(fam.model, cfg)
    layer = handle.layers[next(iter(handle.layers))]
    got = mt.capture(fam.model, {"q": layer.ffn.input_site, "y": layer.ffn.output_site}, fam.run)
    q = got["q"].reshape(-1, 32)
    perm = torch.argsort(layer.groups.labels, stable=True)
    want, idx = _RefLlamaMLP(layer.ffn.module, perm, select)(q)
    ours = mt.emoe.routing.select_topk(layer.scores(q, layer.ffn.hidden(q)), 2)
    relabel = layer.groups.labels[perm].reshape(N, -1)[:, 0]  # reference expert j -> modulart expert
    same = (torch.sort(ours, dim=1).values == torch.sort(relabel[idx], dim=1).values).all(dim=1)
    agreement(
        "emoe",
        f"Llama score '{select}': top-k sets differing (fraction of tokens)",
        1.0 - float(same.float().mean()),
        0.0,
    )
    agreement(
        "emoe",
        f"Llama score '{select}': MLP output (max abs. difference)",
        float((got["y"].reshape(-1, 32) - want).abs().max()),
        1e-5,
    )
    handle.remove()


# --- which layers ------------------------------------------------------------------------------------
def _deep(family: str, depth: int) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if family == "bert":
        cfg = AutoConfig.for_model(
            "bert", hidden_size=8, intermediate_size=16, num_hidden_layers=depth, num_attention_heads=2, vocab_size=16
        )
        return AutoModel.from_config(cfg)
    if family == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=8, n_layer=depth, n_head=2, vocab_size=16, n_positions=8)
        return AutoModelForCausalLM.from_config(cfg)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=depth,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=16,
    )
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize(
    "family, placement, depth, reference_layers",
    [
        ("bert", "every2", 12, [10, 11]),  # search_glue_no_trainer.py: --moe_layers default [10, 11]
        ("gpt2", "every2", 48, [44]),  # README: GPT2-XL --moe_layers 44
        ("llama", "every2", 32, [i for i in range(32) if i >= 28 and (i - 28) % 2 == 0]),  # run_7B_emo.sh
        ("llama", "every4", 32, [i for i in range(32) if i >= 16 and (i - 16) % 4 == 0]),
    ],
)
def test_reference_layers(
    agreement: Agreement, family: str, placement: str, depth: int, reference_layers: list[int]
) -> None:
    torch.manual_seed(0)
    model = _deep(family, depth)
    cfg = EMoEConfig.reference(family, placement=placement, num_experts=4, top_k=2, split="random")
    handle = mt.emoe.apply(model, cfg)
    got = [layer.ffn.layer for layer in handle.layers.values()]
    agreement(
        "emoe",
        f"layers {family} ({placement}, depth {depth}): layers differing",
        len(set(got) ^ set(reference_layers)),
        0,
    )
    handle.remove()


def test_reference_preset_values() -> None:
    bert, gpt2, llama = (EMoEConfig.reference(f) for f in ("bert", "gpt2", "llama"))
    assert (bert.num_experts, bert.top_k, gpt2.top_k, llama.top_k) == (64, 16, 32, 16)
    for cfg in (bert, gpt2):
        assert (cfg.gate_noise, cfg.balance_loss, cfg.balance_loss_weight) == (1.0, "reference", 0.01)
        assert (cfg.capacity_factor, cfg.per_expert_bias, cfg.dropout) == (1.5, True, 0.1)
    assert (llama.gate_noise, llama.balance_loss_weight, llama.capacity_factor) == (0.0, 0.0, None)
    assert (llama.per_expert_bias, llama.dropout, llama.router) == (False, 0.0, "avgk")
    default = EMoEConfig()  # the defaults stay modulart's
    assert (default.balance_loss, default.capacity_factor, default.per_expert_bias, default.dropout) == (
        "counts",
        None,
        False,
        0.0,
    )


# --- bad values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"balance_loss": "tutel"}, "balance_loss"),
        ({"balance_loss": "reference", "gate_noise": 0.0}, "balance_loss"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.5}, "capacity_factor"),
        ({"capacity_factor": math.inf}, "capacity_factor"),
        ({"capacity_factor": "1.5"}, "capacity_factor"),
        ({"per_expert_bias": 1}, "per_expert_bias"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": True}, "dropout"),
        ({"router": "gate"}, "router"),
        ({"router": "inter", "executor": "sparse"}, "router"),
    ],
)
def test_bad_new_options_raise_config_error_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(mt.ConfigError, match=rf"EMoEConfig\.{field} = "):
        EMoEConfig(**kwargs)


@pytest.mark.parametrize(
    "family, kwargs, field",
    [
        ("plain", {"router": "up"}, "router"),  # no up projection
        ("plain", {"router": "up_abs"}, "router"),
        ("llama", {"per_expert_bias": True}, "per_expert_bias"),  # no output bias
    ],
)
def test_options_the_model_cannot_take_raise_config_error_at_apply(
    family: str, kwargs: dict[str, Any], field: str
) -> None:
    fam = build(family)
    with pytest.raises(mt.ConfigError, match=rf"EMoEConfig\.{field} = "):
        mt.emoe.apply(fam.model, num_experts=4, top_k=2, layers="all", **kwargs)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in fam.model.modules())


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("t5",), {}, "family"),
        (("bert",), {"placement": "every4"}, "placement"),
        (("llama",), {"placement": "every3"}, "placement"),
        (("bert",), {"capacity": 2.0}, "no field"),
        (("bert",), {"dropout": 2.0}, r"EMoEConfig\.dropout = "),
    ],
)
def test_bad_reference_arguments(args: tuple[str, ...], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(mt.ConfigError, match=match):
        EMoEConfig.reference(*args, **kwargs)
