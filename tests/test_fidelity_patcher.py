"""The patcher's reference preset against re-implementations of the reference code's formulas.

Each expected number is computed here, in plain torch, the way the reference code computes it
(ZeroYuHuang/Transformer-Patcher: ``calculate_act_loss`` / ``calculate_memory_loss`` over
``[memory, views, neurons]`` tensors, the binary classifier's ``CE − 0.1·entropy``, PyTorch's
``ReduceLROnPlateau(threshold=0.05, patience=1, factor=0.5)``, ``early_stop_editing(thd=0.001)``,
the memory update of its detectors and its pooled GR), and compared with what modulart's preset
computes on the same tensors.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modulart.patcher as mp
from modulart.core.errors import ConfigError
from modulart.patcher.records import EditResult
from modulart.patcher.task import make_example
from modulart.patcher.train import NeuronSet, _edit_loss, _neuron_terms, _Plateau, _ValidationStop, init_neurons
from patcher_helpers import causal_lm

# --- the reference code's formulas, re-implemented -------------------------------------------------


def ref_top_mean_exp(x: torch.Tensor, k: int) -> torch.Tensor:
    """``top_k_loss_func(x, 'exp', tk=k)``: mean of the k largest ``exp`` over every entry of ``x``."""
    e = x.reshape(-1).exp()
    return e.topk(min(k, e.numel())).values.mean()


def ref_losses(
    act: torch.Tensor, his: torch.Tensor, beta: float, gamma: float, k_a: int = 5, k_m: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """One edit: ``act [V, n]`` the neurons' activations per view, ``his [N, n]`` on the memory.

    The activation loss is the top-k_a of ``exp(-act)``; the memory loss stacks the memory
    activations once per view (``[N, V, n]``) and takes the top-k_m of ``exp(his - act + gamma)``
    plus the top-k_m of ``exp(his - beta)`` over all those entries.
    """
    h = his[:, None, :].expand(-1, act.shape[0], -1)  # [N, V, n]
    l_a = ref_top_mean_exp(-act, k_a)
    l_m = ref_top_mean_exp(h - act[None] + gamma, k_m) + ref_top_mean_exp(h - beta, k_m)
    return l_a, l_m


def ref_early_stop(history: list[float], thd: float = 1e-3, patience: int = 1) -> bool:
    best = 0
    for i, v in enumerate(history):
        if v < history[best] - thd:
            best = i
    return best < len(history) - patience


# --- fixtures ---------------------------------------------------------------------------------------


def _neurons(d: int, owner: list[int], positions: list[int], seed: int) -> NeuronSet:
    g = torch.Generator().manual_seed(seed)
    n = len(owner)
    return NeuronSet(
        keys=torch.randn(n, d, generator=g) * 0.3,
        key_bias=torch.randn(n, generator=g) * 0.1,
        scale=torch.ones(n, 4),
        direction=torch.zeros(n, 4),
        owner=torch.tensor(owner),
        positions=[[p] for p in positions],
    )


def _case(seed: int = 0) -> tuple[torch.Tensor, NeuronSet, torch.Tensor, int]:
    """Two edits: edit 0 with three neurons (positions 1, 3, 4), edit 1 with one (position 2); 8 views."""
    views, seq, d = 8, 6, 12
    owner, pos = [0, 0, 0, 1], [1, 3, 4, 2]
    ns = _neurons(d, owner, pos, seed)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(2 * views, seq, len(owner), generator=g) * 2.0  # [B, L, Pn] pre-activations
    memory = torch.randn(700, d, generator=g)  # N x V x n > 1000: the top-k is a strict subset
    return a, ns, memory, views


def _act(a: torch.Tensor, ns: NeuronSet, views: int, e: int) -> torch.Tensor:
    """``[V, n_e]`` edit e's neuron activations per view, as the reference reads them."""
    js = (ns.owner == e).nonzero().flatten().tolist()
    rows = range(e * views, (e + 1) * views)
    return torch.stack([torch.stack([a[r, ns.positions[j][0], j] for j in js]) for r in rows])


# --- losses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_memory_and_activation_losses_match_the_reference(task: str, agreement: Any) -> None:
    cfg = mp.PatcherConfig.reference(task)
    a, ns, memory, views = _case()
    l_a, l_m, _, _ = _neuron_terms(a, ns, views, memory, cfg, 2)
    his = memory @ ns.keys.T + ns.key_bias
    worst_a = worst_m = 0.0
    for e in range(2):
        js = (ns.owner == e).nonzero().flatten()
        ref_a, ref_m = ref_losses(_act(a, ns, views, e), his[:, js], cfg.silence_margin, cfg.edit_margin)
        worst_a = max(worst_a, float((l_a[e] - ref_a).abs() / ref_a))
        worst_m = max(worst_m, float((l_m[e] - ref_m).abs() / ref_m))
    agreement("patcher", f"{task}: activation loss, top-5 pooled over views x neurons (rel. error)", worst_a, 1e-6)
    agreement("patcher", f"{task}: memory loss, top-1000 over memory x views x neurons (rel. error)", worst_m, 1e-6)


def test_default_memory_loss_differs_from_the_reference_as_documented() -> None:
    """The default takes each memory term's top-k over memory vectors per neuron, against the view mean."""
    cfg = mp.PatcherConfig(task="classification")
    a, ns, memory, views = _case()
    _, l_m, a_e, _ = _neuron_terms(a, ns, views, memory, cfg, 2)
    his = memory @ ns.keys.T + ns.key_bias
    expected = []
    for e in range(2):
        per = []
        for j in (ns.owner == e).nonzero().flatten().tolist():
            per.append(
                ref_top_mean_exp(his[:, j] - cfg.silence_margin, 1000)
                + ref_top_mean_exp(his[:, j] - a_e[j] + cfg.edit_margin, 1000)
            )
        expected.append(torch.stack(per).mean())
    torch.testing.assert_close(l_m, torch.stack(expected), rtol=1e-6, atol=0)
    ref = mp.PatcherConfig.reference("classification")
    _, l_ref, _, _ = _neuron_terms(a, ns, views, memory, ref, 2)
    assert not torch.allclose(l_m, l_ref, rtol=1e-3)


def test_classification_loss_subtracts_a_tenth_of_the_entropy(agreement: Any) -> None:
    """The reference's binary classifier: BCE(z, y) − 0.1·H(Bernoulli(z)); a 2-class softmax on [0, z] is the same."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, generator=g) * 3
    y = torch.randint(0, 2, (16,), generator=g)
    exs = [make_example(torch.tensor([1, 2]), int(t), "classification") for t in y]
    logits = torch.stack([torch.zeros_like(z), z], dim=1)
    got = _edit_loss(logits, exs, mp.PatcherConfig.reference("classification"))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y.float(), reduction="none")
    expected = bce - 0.1 * torch.distributions.Bernoulli(logits=z).entropy()
    agreement(
        "patcher",
        "classification: edit loss CE - 0.1 entropy (max abs error)",
        float((got - expected).abs().max()),
        1e-6,
    )
    plain = _edit_loss(logits, exs, mp.PatcherConfig(task="classification"))
    torch.testing.assert_close(plain, bce, rtol=1e-6, atol=1e-6)


def test_key_init_fires_exactly_once_on_the_edit(agreement: Any) -> None:
    """The reference's init: key q/||q||^2 (q the FFN input at the edit position), bias 0, value scale 10."""
    torch.manual_seed(0)
    model = _Toy().eval()
    p = mp.apply(model, mp.PatcherConfig(task="classification"))
    g = torch.Generator().manual_seed(4)
    qs = [torch.randn(5, 16, generator=g) for _ in range(2)]
    ns = init_neurons(qs, [[[0]], [[0]]], p.bank, p.config, [1, 2])
    k_ref = torch.stack([q[0] / q[0].pow(2).sum() for q in qs])
    err = float((ns.keys.detach() - k_ref).abs().max())
    pre = torch.stack([qs[j][0] @ ns.keys[j] + ns.key_bias[j] for j in range(2)]).detach()
    agreement("patcher", "init: key q/|q|^2 (max abs error)", err, 1e-7)
    torch.testing.assert_close(pre, torch.ones(2))
    assert bool((ns.key_bias == 0).all()) and bool((ns.scale == 10.0).all())
    p.remove()


# --- learning rate and stopping ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 10.0, allow_nan=False), min_size=1, max_size=30))
def test_learning_rate_rule_is_torch_reduce_on_plateau(losses: list[float]) -> None:
    cfg = mp.PatcherConfig.reference("classification")
    ours = _Plateau(1, cfg, torch.device("cpu"))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1, threshold=0.05)
    for v in losses:
        ours.check_loss([0], torch.tensor([v]))
        sched.step(v)
        assert math.isclose(float(ours.lr[0]), opt.param_groups[0]["lr"], rel_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=12))
def test_validation_stop_is_the_reference_early_stop(history: list[float]) -> None:
    rule = _ValidationStop(1)
    for i in range(len(history)):
        assert rule.stop(0, history[i]) == ref_early_stop(history[: i + 1])


# --- end to end -------------------------------------------------------------------------------------


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.ffn = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 16)
        )
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head((h + self.ffn(h))[:, 0])  # type: ignore[no-any-return]


def test_reference_preset_stops_only_at_validation_checks(agreement: Any) -> None:
    torch.manual_seed(0)
    model = _Toy().eval()
    g = torch.Generator().manual_seed(1)
    p = mp.apply(model, mp.PatcherConfig.reference("classification"))
    p.set_memory(torch.randint(0, 50, (64, 5), generator=g))
    with pytest.raises(ConfigError, match="set_validation_memory"):
        p.edit(torch.tensor([3, 4, 5]), (int(model(torch.tensor([[3, 4, 5]])).argmax()) + 1) % 3)
    assert not p.patches
    p.set_validation_memory(torch.randint(0, 50, (32, 5), generator=g))
    off = stopped = 0
    for _ in range(3):
        x = torch.randint(0, 50, (5,), generator=g)
        y = (int(model(x[None]).argmax()) + 1) % 3
        r = p.edit(x, y)
        assert r.patch_ids  # kept even when it failed
        if r.success and r.steps < 2000:
            # the first check past step 100 is after 125 steps; the rule needs two checks
            off += r.steps % 25 != 0 or r.steps < 150
            stopped += 1
    assert stopped >= 1
    agreement("patcher", "reference stop: edits stopping off the validation checks (count)", off, 0)
    p.remove()


def test_generation_memory_update_appends_the_reference_vectors(agreement: Any) -> None:
    s = causal_lm("llama")
    cfg = mp.PatcherConfig.reference("generation", max_steps=30)
    p = mp.apply(s.model, cfg)
    p.set_memory(s.memory)
    p.set_validation_memory(s.memory)
    x, y = s.edits[0]
    ex = make_example(x, y, "generation")
    seen: list[torch.Tensor] = []
    hook = p.ffn.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        s.model.eval()
        s.model(input_ids=ex.inputs["input_ids"])
    hook.remove()
    q = seen[0][0]  # [L, d] the FFN input of the clean edit
    assert p.memory is not None and p.validation_memory is not None
    n0, v0 = p.memory.shape[0], p.validation_memory.shape[0]
    r = p.edit(x, y)
    assert r.patch_ids
    # the reference: views copies of the target-predicting positions, flattened, first and last dropped
    expected = q[ex.label_positions.tolist() * cfg.views][1:-1]
    assert p.memory.shape[0] == n0 + expected.shape[0] and p.validation_memory.shape[0] == v0 + expected.shape[0]
    err = float((p.memory[n0:] - expected).abs().max())
    agreement("patcher", "generation: vectors appended to the memory after an edit (max abs error)", err, 1e-5)
    p.remove()


def test_generalisation_pooled_over_paraphrases(agreement: Any) -> None:
    torch.manual_seed(0)
    model = _Toy().eval()
    g = torch.Generator().manual_seed(2)
    memory = torch.randint(0, 50, (64, 5), generator=g)
    cases = []
    for n_equiv in (1, 4, 2):
        x = torch.randint(0, 50, (5,), generator=g)
        y = (int(model(x[None]).argmax()) + 1) % 3
        equiv = [torch.cat([x[:1], torch.randint(0, 50, (4,), generator=g)]) for _ in range(n_equiv)]
        cases.append(mp.EditCase(x, y, equivalents=equiv))
    counts = [0, 0]

    class Counting:
        """The patcher, counting right paraphrases itself right after each edit."""

        def __init__(self, m: torch.nn.Module) -> None:
            self.p = mp.apply(m, task="classification", max_steps=60)
            self.p.set_memory(memory)
            self.m = m

        def edit(self, inputs: Any, target: Any, **kw: Any) -> EditResult:
            r = self.p.edit(inputs, target, **kw)
            case = next(c for c in cases if c.inputs is inputs)
            with torch.no_grad():
                for e in case.equivalents:
                    counts[0] += int(int(self.m(e[None]).argmax()) == int(case.target))
                    counts[1] += 1
            return r

        def remove(self) -> None:
            self.p.remove()

    rep = mp.sequential_edit(model, cases, {"test": [(memory[0], 0)]}, editor=Counting)
    expected = counts[0] / counts[1]
    agreement(
        "patcher",
        "GR pooled over paraphrases (abs error)",
        abs(rep.right_after["generalisation_pooled"] - expected),
        1e-12,
    )


# --- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_loss", "views"),
        ("lr_schedule", "cosine"),
        ("stop_rule", "never"),
        ("memory_update", "all"),
        ("pool_neurons", 1),
        ("entropy_weight", -0.1),
        ("check_every", 0),
        ("check_start", -1),
    ],
)
def test_bad_reference_options_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        mp.PatcherConfig(**{field: value})


def test_entropy_term_is_classification_only() -> None:
    with pytest.raises(ConfigError, match="entropy_weight"):
        mp.PatcherConfig(task="generation", entropy_weight=0.1)


def test_reference_preset_fields() -> None:
    c = mp.PatcherConfig.reference("classification")
    assert (c.memory_loss, c.pool_neurons, c.entropy_weight, c.lr_schedule, c.stop_rule) == (
        "per_view",
        True,
        0.1,
        "reference",
        "validation",
    )
    assert (c.keep_failed, c.memory_update, c.silence_margin, c.edit_margin, c.mu) == (
        True,
        "reference",
        -3.0,
        3.0,
        5.0,
    )
    gen = mp.PatcherConfig.reference("generation")
    assert (gen.silence_margin, gen.edit_margin, gen.mu, gen.smoothing, gen.entropy_weight) == (
        0.0,
        0.0,
        10.0,
        0.1,
        0.0,
    )
    d = mp.PatcherConfig()
    assert (d.memory_loss, d.pool_neurons, d.lr_schedule, d.stop_rule, d.memory_update, d.keep_failed) == (
        "mean_view",
        False,
        "train_plateau",
        "margins",
        "neurons",
        False,
    )
