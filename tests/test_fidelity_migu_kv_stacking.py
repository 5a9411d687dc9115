"""MIGU, KV and G_stack reference presets against independent re-implementations of the reference code.

- MIGU (wenyudu/MIGU, ``src/uie_trainer_ft.py`` + ``src/accelerate_local.py``): a forward hook on
  every ``nn.Linear`` adds ``Σ|h|`` over the positions of each forward of the optimizer step; at the
  accumulation boundary ``keep = a >= torch.quantile(a, ini_threshold=0.7)`` and ``weight.grad`` rows
  of the other units are multiplied by 0 (biases untouched); the sums reset after the step; the
  first task trains without hooks.
- KV (qiuzh20/Tuning-keys-v.s.-values, ``llama2_classification_multi_tasks.py``): PEFT
  ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, bias="none", target_modules=[q_proj, v_proj,
  up_proj | gate_proj | down_proj])``: ``y = W x + b + (alpha / r)·B(A(dropout(x)))``.
- G_stack (tongxuluo/prts, ``pretrain/run_pretrain.py``, ``base_model.sh``, ``g_stack.sh``): the
  rate is set per micro-batch iteration by ``get_lr(it)`` (linear warmup over
  ``warmup_steps·grad_accum`` iterations, cosine to ``min_lr`` over ``max_step·grad_accum``), and
  the optimizer steps after the last micro-batch of each accumulation window.

Every expected number is computed here in plain torch / Python following that code, on the same
tensors as modulart, and compared through the ``agreement`` fixture.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modulart.kv
import modulart.migu
import modulart.stacking as st
from conftest import Agreement
from families import build, tiny_llama
from modulart.core.errors import ConfigError, SelectorError, UnsupportedModuleError
from modulart.kv import KVConfig
from modulart.migu import MIGUConfig

# --- MIGU ---------------------------------------------------------------------------------------------


def _tiny_llama(seed: int = 0) -> nn.Module:
    """MLP biases on (the reference leaves them alone), untied LM head, in train mode."""
    return tiny_llama(seed, vocab_size=96, mlp_bias=True, tie_word_embeddings=False).train()


def _batches(n: int, seed: int = 3, vocab: int = 96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 9), generator=g) for _ in range(n)]


class _ReferenceMIGU:
    """The reference's MIGU, re-implemented: hooks on every nn.Linear, masking at the boundary."""

    def __init__(self, model: nn.Module, ini_threshold: float = 0.7) -> None:
        self.model = model
        self.ini_threshold = ini_threshold
        self.sums: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.hooks: list[Any] = []

    def start_masking(self) -> None:  # the second task: the hooks are registered
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self.hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def fn(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            a = torch.sum(output.detach().reshape(-1, output.shape[-1]).abs(), dim=0)
            self.sums[name] = a if name not in self.sums else self.sums[name] + a

        return fn

    def mask_grads(self) -> None:  # backward at the accumulation boundary
        self.masks = {}
        for name, a in self.sums.items():
            mask = (a >= torch.quantile(a, self.ini_threshold)).float()
            self.masks[name] = mask.bool()
            self.model.get_submodule(name).weight.grad *= mask.unsqueeze(dim=-1)

    def after_step(self) -> None:
        self.sums = {}


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor], before_step: Callable[[], None]
) -> None:
    for micro in batches:  # one optimizer step over these micro-batches
        model(input_ids=micro, labels=micro).loss.div(len(batches)).backward()
    before_step()
    opt.step()
    opt.zero_grad()


def _max_param_diff(a: nn.Module, b: nn.Module) -> float:
    pb = dict(b.named_parameters())
    return max(float((p.detach() - pb[n].detach()).abs().max()) for n, p in a.named_parameters())


def test_migu_reference_preset_bit_identical(agreement: Agreement) -> None:
    ref_model = _tiny_llama()
    mt_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    mt_opt = torch.optim.AdamW(mt_model.parameters(), lr=1e-2, weight_decay=0.1)
    ref = _ReferenceMIGU(ref_model)
    h = modulart.migu.apply(mt_model, MIGUConfig.reference(), optimizer=mt_opt)
    batches = _batches(10)
    task1, task2 = [batches[0:2], batches[2:4]], [batches[4:6], batches[6:8], batches[8:10]]

    for step in task1:  # first task: no masking in either
        _train(ref_model, ref_opt, step, lambda: None)
        _train(mt_model, mt_opt, step, lambda: None)
    h.task_boundary()
    ref.start_masking()
    assert _max_param_diff(ref_model, mt_model) == 0.0

    differing = total = 0
    for step in task2:
        _train(ref_model, ref_opt, step, ref.mask_grads)
        _train(mt_model, mt_opt, step, lambda: None)
        ref.after_step()
        got = h.masks()
        assert set(got) == set(ref.masks)  # every nn.Linear, the LM head included
        for name, want in ref.masks.items():
            differing += int((got[name] != want).sum())
            total += want.numel()
    kept = sum(int(m.sum()) for m in ref.masks.values()) / total * len(task2)
    assert 0.25 < kept < 0.4  # the masks do mask (ini_threshold 0.7: about 30% kept)
    assert "lm_head" in ref.masks and any(k.endswith("mlp.up_proj") for k in ref.masks)
    agreement("migu", "masks: every nn.Linear, quantile 0.7 (fraction of entries differing)", differing / total, 0.0)
    agreement(
        "migu",
        "parameters after 2+3 AdamW steps, biases free (max abs difference)",
        _max_param_diff(ref_model, mt_model),
        0.0,
    )
    h.remove()


def test_migu_reference_preset_differs_from_default() -> None:
    """The default (frozen masked rows, masked biases, no LM head) is not the reference: the preset matters."""
    ref_model = _tiny_llama()
    default_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(default_model.parameters(), lr=1e-2, weight_decay=0.1)
    ref = _ReferenceMIGU(ref_model)
    ref.start_masking()
    h = modulart.migu.apply(default_model, optimizer=opt)
    for step in [_batches(2, seed=5), _batches(2, seed=6)]:
        _train(ref_model, ref_opt, step, ref.mask_grads)
        _train(default_model, opt, step, lambda: None)
        ref.after_step()
    assert "lm_head" not in h.masks() and _max_param_diff(ref_model, default_model) > 0
    h.remove()


def test_migu_reference_on_gpt2_gates_only_nn_linear(agreement: Agreement) -> None:
    """HF GPT-2's Conv1D is no nn.Linear: the reference (and the preset) gate only the tied LM head."""
    fam = build("gpt2")
    ref_model = fam.model.train()
    for m in ref_model.modules():  # no dropout: the two runs would draw different masks
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    mt_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    mt_opt = torch.optim.SGD(mt_model.parameters(), lr=0.1)
    ref = _ReferenceMIGU(ref_model)
    ref.start_masking()
    with pytest.warns(UserWarning, match="shares its weight with an input embedding"):
        h = modulart.migu.apply(mt_model, MIGUConfig.reference(skip_first_task=False), optimizer=mt_opt)
    step = [torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    _train(ref_model, ref_opt, step, ref.mask_grads)
    _train(mt_model, mt_opt, step, lambda: None)
    assert set(h.masks()) == set(ref.masks) == {"lm_head"}
    diff = int((h.masks()["lm_head"] != ref.masks["lm_head"]).sum()) / ref.masks["lm_head"].numel()
    agreement("migu", "GPT-2: only nn.Linear gated (tied LM head), masks (fraction differing)", diff, 0.0)
    agreement(
        "migu", "GPT-2: parameters after one SGD step (max abs difference)", _max_param_diff(ref_model, mt_model), 0.0
    )
    h.remove()


def test_migu_reference_preset_fields_and_overrides() -> None:
    ref = MIGUConfig.reference()
    assert (ref.keep_ratio, ref.stat, ref.select, ref.control) == (0.3, "abs_sum", "quantile", "magnitude")
    assert (ref.freeze_masked_rows, ref.mask_bias, ref.skip_first_task, ref.moe) == (False, False, True, False)
    assert MIGUConfig.from_dict(ref.to_dict()) == ref
    assert MIGUConfig.reference(keep_ratio=0.5).keep_ratio == 0.5
    with pytest.raises(ConfigError, match="keep_ratio"):
        MIGUConfig.reference(keep_ratio=0.0)
    with pytest.raises(ConfigError, match="nonsense"):
        MIGUConfig.reference(nonsense=1)


# --- KV -----------------------------------------------------------------------------------------------
FFN_MATRIX = {("keys", "up"): "up_proj", ("keys", "gate"): "gate_proj", ("values", "up"): "down_proj"}


def _kv_model(family: str) -> nn.Module:
    return build(family).model.eval()


def _lora_paths(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(("target", "keys"), [("keys", "up"), ("keys", "gate"), ("values", "up")])
def test_kv_reference_trains_exactly_q_v_and_one_ffn_matrix(family: str, target: str, keys: str) -> None:
    model = _kv_model(family)
    h = modulart.kv.apply(model, KVConfig.reference(keys=keys, target=target))
    want = _lora_paths(model, ("q_proj", "v_proj", FFN_MATRIX[(target, keys)]))
    assert len(want) == 3 * 2  # three matrices in each of the two layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.modulart_kv_lora.lora_{s}" for p in want for s in "AB"}
    assert sorted(h.peft_target_modules()) == sorted(want)
    for path in want:
        lora = h.lora[path]
        lin = model.get_submodule(path)
        assert tuple(lora.lora_A.shape) == (8, lin.in_features) and tuple(lora.lora_B.shape) == (lin.out_features, 8)
        assert lora.scale == 2.0 and lora.dropout == 0.1
    h.remove()
    assert all(p.requires_grad for p in model.parameters())


def _perturb(h: modulart.kv.KVHandle, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in h.lora.values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.3)


class _RefLoRALinear(nn.Module):
    """``y = W x + b + (alpha / r)·B(A(dropout(x)))``, the LoRA of PEFT's ``Linear`` layer."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, alpha: float, r: int, p: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scale, self.p = base, a.clone(), b.clone(), alpha / r, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.p, self.training)
        return self.base(x) + F.linear(F.linear(h, self.a), self.b) * self.scale


def _reference_lora_model(base: nn.Module, h: modulart.kv.KVHandle) -> nn.Module:
    ref = copy.deepcopy(base)
    for path, lora in h.lora.items():
        parent, _, child = path.rpartition(".")
        lin = ref.get_submodule(path)
        assert isinstance(lin, nn.Linear)
        new = _RefLoRALinear(lin, lora.lora_A.detach(), lora.lora_B.detach(), 16.0, 8, 0.1)
        setattr(ref.get_submodule(parent), child, new)
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_reference_forward_equals_lora_formula(family: str, agreement: Agreement) -> None:
    model = _kv_model(family)
    base = copy.deepcopy(model)
    ids = build(family).inputs["input_ids"]
    h = modulart.kv.apply(model, KVConfig.reference())
    _perturb(h)
    ref = _reference_lora_model(base, h).eval()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert float((want - plain).abs().max()) > 1e-2  # the perturbed deltas matter
    agreement(
        "kv",
        f"{family}: eval logits vs W x + 2·B A x on q/v/up (max abs difference)",
        float((got - want).abs().max()),
        1e-6,
    )
    model.train(), ref.train()
    with torch.no_grad():
        torch.manual_seed(11)
        got_t = model(input_ids=ids).logits
        torch.manual_seed(11)
        want_t = ref(input_ids=ids).logits
    assert float((got_t - got).abs().max()) > 1e-3  # dropout 0.1 on the delta path is active
    agreement(
        "kv",
        f"{family}: train logits, same dropout draws (max abs difference)",
        float((got_t - want_t).abs().max()),
        1e-6,
    )
    h.remove()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_reference_matches_peft(family: str, agreement: Agreement) -> None:
    peft = pytest.importorskip("peft")
    model = _kv_model(family)
    pmodel = copy.deepcopy(model)
    ids = build(family).inputs["input_ids"]
    h = modulart.kv.apply(model, KVConfig.reference())
    _perturb(h)
    cfg = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, bias="none", target_modules=["q_proj", "v_proj", "up_proj"]
    )
    pm = peft.get_peft_model(pmodel, cfg)
    wrapped = {
        n.removeprefix("base_model.model."): m
        for n, m in pm.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)
    }
    assert sorted(wrapped) == sorted(h.lora)  # the same modules get LoRA
    with torch.no_grad():
        for path, lora in h.lora.items():
            wrapped[path].lora_A["default"].weight.copy_(lora.lora_A)
            wrapped[path].lora_B["default"].weight.copy_(lora.lora_B)
    mt_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peft_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    agreement(
        "kv",
        f"{family}: trainable parameter count vs PEFT (absolute difference)",
        abs(mt_trainable - peft_trainable),
        0,
    )
    pm.eval()
    with torch.no_grad():
        diff = float((model(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max())
    agreement("kv", f"{family}: eval logits vs PEFT LoRA with the same A/B (max abs difference)", diff, 1e-6)
    model.train(), pm.train()
    torch.manual_seed(5)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.manual_seed(5)
    pm(input_ids=ids, labels=ids).loss.backward()
    worst = 0.0
    for path, lora in h.lora.items():
        for side in "AB":
            g_mt = getattr(lora, f"lora_{side}").grad
            g_pf = getattr(wrapped[path], f"lora_{side}")["default"].weight.grad
            assert g_mt is not None and g_pf is not None
            worst = max(worst, float((g_mt - g_pf).abs().max()))
    agreement("kv", f"{family}: LoRA gradients in training mode, dropout 0.1 (max abs difference)", worst, 1e-6)
    h.remove()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"extra_lora": "q_proj"}, "extra_lora"),  # a string, not a list of them
        ({"extra_lora": ("q_proj", "")}, "extra_lora"),
        ({"extra_lora": ("q_proj", 3)}, "extra_lora"),
        ({"mode": "full"}, "extra_lora"),  # extra LoRA needs mode lora
        ({"mode": "mask", "neurons": 0.5}, "extra_lora"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"keys": "value"}, "keys"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_kv_bad_values_raise_config_error(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        KVConfig.reference(**overrides)


def test_kv_extra_lora_selecting_a_non_linear_raises_and_changes_nothing() -> None:
    model = _kv_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModuleError, match="extra_lora"):
        modulart.kv.apply(model, KVConfig.reference(extra_lora=("self_attn",)))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any("modulart_kv_lora" in n for n, _ in model.named_modules())


def test_kv_extra_lora_matching_nothing_names_the_field() -> None:
    model = _kv_model("gpt2")  # fused c_attn: no q_proj / v_proj
    with pytest.raises(SelectorError, match=r"KVConfig.extra_lora.*q_proj"):
        modulart.kv.apply(model, KVConfig.reference())
    assert all(p.requires_grad for p in model.parameters())
    h = modulart.kv.apply(model, KVConfig.reference(extra_lora=("c_attn",), target="values"))
    assert sorted(h.lora) == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")]
    h.remove()


def test_kv_reference_round_trips_and_defaults_unchanged() -> None:
    ref = KVConfig.reference()
    assert KVConfig.from_dict(ref.to_dict()) == ref
    assert KVConfig().extra_lora == () and KVConfig().lora_dropout == 0.0 and KVConfig().mode == "full"


# --- G_stack LR schedule --------------------------------------------------------------------------------
def _prts_get_lr(it: int, learning_rate: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """prts ``get_lr``: linear warmup by iteration, then cosine down to ``min_lr``."""
    if it < warmup_iters:
        return learning_rate * it / warmup_iters
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def _prts_step_lrs(
    lr: float, min_lr: float, warmup_steps: int, max_step: int, global_batch: int, world: int, micro: int
) -> list[float]:
    """The rate each optimizer step of the prts training loop runs with (set per iteration)."""
    grad_accum = global_batch // world // micro
    warmup_iters, max_iters = warmup_steps * grad_accum, max_step * grad_accum
    out: list[float] = []
    for it in range(max_iters):
        rate = _prts_get_lr(it, lr, min_lr, warmup_iters, max_iters)  # param_group["lr"] = rate
        if (it + 1) % grad_accum == 0:  # not accumulating: optimizer.step() with that rate
            out.append(rate)
    return out


# base_model.sh (6L2048H small model) and g_stack.sh (24L2048H grown model): 4 nodes x 8 GPUs.
PRTS = {
    "small": dict(lr=1e-3, min_lr=1e-4, warmup_steps=3000, global_batch=1024, world=32, micro=32),
    "grown": dict(lr=3e-4, min_lr=3e-5, warmup_steps=3000, global_batch=1024, world=32, micro=8),
}
MAX_STEP = 30_000  # the scripts use 300,000; 30,000 keeps the loop fast and covers warmup + cosine


@pytest.mark.parametrize("which", ["small", "grown"])
def test_gstack_reference_lr_equals_prts(which: str, agreement: Agreement) -> None:
    p = PRTS[which]
    want = _prts_step_lrs(p["lr"], p["min_lr"], p["warmup_steps"], MAX_STEP, p["global_batch"], p["world"], p["micro"])
    s = st.gstack_schedule(4e8, 1e11, reference=True)
    recipe = s.small_lr if which == "small" else s.grown_lr
    assert recipe.grad_accum == p["global_batch"] // p["world"] // p["micro"]
    got = [recipe.lr_at(step, MAX_STEP) for step in range(MAX_STEP)]
    assert len(want) == MAX_STEP and want[0] < want[2999] < want[3000] and want[-1] < 1.01 * p["min_lr"]
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    agreement("stacking", f"{which} model: LR of every optimizer step vs prts get_lr (max abs difference)", diff, 1e-15)
    # the default (per-step) indexing: the same peaks, floors and warmup, shifted by under one warmup increment
    plain = st.gstack_schedule(4e8, 1e11)
    d_recipe = plain.small_lr if which == "small" else plain.grown_lr
    assert (d_recipe.warmup_steps, d_recipe.peak, d_recipe.final) == (recipe.warmup_steps, recipe.peak, recipe.final)
    d_diff = max(abs(d_recipe.lr_at(step, MAX_STEP) - w) for step, w in enumerate(want))
    bound = p["lr"] / p["warmup_steps"] * (1 + 1e-9)
    agreement(
        "stacking",
        f"{which} model: default per-step indexing vs prts (max abs difference, <= peak/warmup)",
        d_diff,
        bound,
    )


def test_gstack_default_small_model_has_3000_step_warmup() -> None:
    s = st.gstack_schedule(4e8, 1e11)
    r = s.small_lr
    assert (r.warmup_steps, r.peak, r.final, r.indexing, r.grad_accum) == (3000, 1e-3, 1e-4, "step", 1)
    assert r.lr_at(0, 100_000) == pytest.approx(1e-3 / 3000) and r.lr_at(2999, 100_000) == pytest.approx(1e-3)
    assert r.lr_at(1499, 100_000) == pytest.approx(0.5e-3)
    assert s.grown_lr.indexing == "step" and s.grown_lr.grad_accum == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_steps": True}, "warmup_steps"),
        ({"peak": float("nan")}, "peak"),
        ({"peak": -1e-3}, "peak"),
        ({"final": float("inf")}, "final"),
        ({"final": "1e-4"}, "final"),
        ({"decay": "linear"}, "decay"),
        ({"optimizer_state": "keep"}, "optimizer_state"),
        ({"indexing": "token"}, "indexing"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"grad_accum": 2.0}, "grad_accum"),
    ],
)
def test_lr_recipe_bad_fields_raise(kwargs: dict[str, Any], field: str) -> None:
    base: dict[str, Any] = {"warmup_steps": 10, "peak": 1e-3, "final": 1e-4}
    with pytest.raises(ConfigError, match=f"LRRecipe.{field}"):
        st.LRRecipe(**{**base, **kwargs})


def test_gstack_reference_flag_must_be_bool() -> None:
    with pytest.raises(ConfigError, match="reference"):
        st.gstack_schedule(4e8, 1e11, reference="yes")  # type: ignore[arg-type]


def test_lr_recipe_optimizer_states_are_the_grow_optimizer_policies() -> None:
    from modulart.stacking.optim import POLICIES
    from modulart.stacking.schedule import OPTIMIZER_STATES

    assert OPTIMIZER_STATES == POLICIES
