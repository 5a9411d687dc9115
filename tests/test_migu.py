"""modulart.migu: masks reach the update, statistics, targets, lifecycle, HF Trainer, DDP."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import modulart.migu
from families import build
from modulart.core.errors import ConfigError, UnsupportedModuleError, UnsupportedOperationError
from modulart.core.operator import get_operator
from modulart.migu import MIGUConfig, keep_count, select_mask


def _mlp(seed: int = 0, d: int = 6, f: int = 20) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))


def _masked_rows(handle: modulart.migu.MIGUHandle, path: str) -> torch.Tensor:
    return ~handle.masks()[path]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _hooks(model: nn.Module) -> list[list[int]]:
    return [list(m._forward_hooks) + list(m._forward_pre_hooks) for m in model.modules()]


# --- masks reach the update ---------------------------------------------------------------------
def test_sgd_masked_rows_and_biases_bit_identical() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, freeze_masked_rows=False, optimizer=opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, opt, torch.randn(16, 6))
    for path in ("0", "2"):
        masked = _masked_rows(h, path)
        assert masked.any() and (~masked).any()
        w, b = model.get_parameter(f"{path}.weight"), model.get_parameter(f"{path}.bias")
        assert torch.equal(w[masked], before[f"{path}.weight"][masked])
        assert torch.equal(b[masked], before[f"{path}.bias"][masked])
        assert not torch.equal(w[~masked], before[f"{path}.weight"][~masked])
    h.remove()


def test_mask_bias_false_leaves_bias_gradient() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, mask_bias=False, optimizer=opt)
    before = model[0].bias.detach().clone()
    _step(model, opt, torch.randn(16, 6))
    masked = _masked_rows(h, "0")
    assert not torch.equal(model[0].bias[masked], before[masked])
    h.remove()


@pytest.mark.parametrize("freeze", [True, False])
def test_adamw_weight_decay_freeze(freeze: bool) -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, freeze_masked_rows=freeze, optimizer=opt)
    _step(model, opt, torch.randn(16, 6))  # builds Adam moments for the first step's kept rows
    before = model[0].weight.detach().clone()
    _step(model, opt, torch.randn(16, 6) * 3)
    masked = _masked_rows(h, "0")
    moved = (model[0].weight != before).any(1)
    if freeze:
        assert not moved[masked].any()
    else:  # decoupled weight decay and momentum move rows whose gradient was zeroed
        assert moved[masked].all()
    assert moved[~masked].all()
    h.remove()


# --- selection --------------------------------------------------------------------------------
@given(st.integers(2, 200), st.floats(0.01, 1.0), st.integers(0, 10_000))
def test_topk_keeps_exact_count_quantile_at_least(n: int, ratio: float, seed: int) -> None:
    score = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).float()  # distinct values
    assert int(select_mask(score, ratio, "topk").sum()) == keep_count(ratio, n) == max(1, math.ceil(ratio * n - 1e-6))
    kept = int(select_mask(score, ratio, "quantile").sum())
    assert kept >= 1 + math.floor(ratio * (n - 1) - 1e-4)
    assert kept >= ratio * n - 1  # within one unit of the ratio (linear interpolation)


def test_quantile_keeps_ties_and_operator_ratios() -> None:
    assert bool(select_mask(torch.ones(10), 0.3, "quantile").all())
    model = _mlp(f=40)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for select in ("topk", "quantile"):
        h = modulart.migu.apply(model, keep_ratio=0.25, select=select, optimizer=opt)
        _step(model, opt, torch.randn(8, 6))
        stats = h.stats()
        assert stats["0"].kept_fraction == pytest.approx(10 / 40) if select == "topk" else True
        assert stats["2"].kept_fraction == pytest.approx(keep_count(0.25, 6) / 6) if select == "topk" else True
        assert all(s.kept_fraction is not None and s.kept_fraction >= 0.25 - 1 / 6 for s in stats.values())
        h.remove()


def test_mask_decided_on_accumulated_microbatches() -> None:
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    model = nn.Sequential(lin)
    h = modulart.migu.apply(model, keep_ratio=0.3, select="topk", optimizer=opt)
    for x in ([5.0, 0.0, 3.0], [0.0, 5.0, 3.0]):  # tops: unit 0, unit 1; union: unit 2
        model(torch.tensor([x])).sum().backward()
    opt.step()
    assert h.masks()["0"].tolist() == [False, False, True]
    h.remove()


def test_bf16_statistics_are_fp32() -> None:
    model = _mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, optimizer=opt)  # quantile: torch.quantile would reject bf16
    model(torch.randn(8, 6, dtype=torch.bfloat16)).float().sum().backward()
    total = h.layers["0"].acc.total
    assert total is not None and total.dtype == torch.float32
    opt.step()
    assert h.stats()["0"].kept_fraction is not None
    h.remove()


@pytest.mark.parametrize("stat", ["abs_sum", "l1_token_mean"])
def test_padding_does_not_vote(stat: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
    x = torch.tensor([[[1.0, 2.0, 3.0, 0.5], [0.5, 2.5, 3.5, 0.1], [1000.0, 0.0, 0.0, 0.0]]])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = modulart.migu.apply(model, keep_ratio=0.5, select="topk", stat=stat, optimizer=opt)
    h.set_token_mask(torch.tensor([[1, 1, 0]]))
    _step(model, opt, x)
    assert h.masks()["0"].tolist() == [False, True, True, False]
    h.set_token_mask(None)
    _step(model, opt, x)
    assert h.masks()["0"][0]  # without the mask, the padded position's unit 0 wins
    h.remove()


# --- hooks, targets, lifecycle ------------------------------------------------------------------
def test_remove_keeps_foreign_hooks_and_optimizer_hook_dicts() -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    calls: list[int] = []
    model[0].register_forward_hook(lambda m, a, o: calls.append(0))
    pre_before, post_before = dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)
    hooks_before = _hooks(model)
    h = modulart.migu.apply(model, optimizer=opt)
    model[2].register_forward_hook(lambda m, a, o: calls.append(2))
    h.remove()
    model(torch.randn(2, 6))
    assert calls == [0, 2]
    assert [hs[:1] for hs in _hooks(model)][:2] == [hs[:1] for hs in hooks_before][:2]
    assert len(model[2]._forward_hooks) == 1 and len(model[0]._forward_hooks) == 1
    assert dict(opt._optimizer_step_pre_hooks) == pre_before
    assert dict(opt._optimizer_step_post_hooks) == post_before
    assert h.removed


def test_gpt2_conv1d_columns_and_tied_lm_head() -> None:
    fam = build("gpt2")
    model = fam.model
    targets = modulart.migu.find_targets(model)
    paths = [t.path for t in targets]
    assert "lm_head" not in paths and not any("wte" in p or "wpe" in p for p in paths)
    assert all(t.axis == 1 for t in targets)  # every GPT-2 linear is a Conv1D
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    c_fc = model.transformer.h[0].mlp.c_fc
    before = c_fc.weight.detach().clone()
    model(**fam.inputs).logits.pow(2).mean().backward()
    opt.step()
    assert h.masker is not None and id(model.lm_head.weight) not in h.masker.masks
    masked = _masked_rows(h, "transformer.h.0.mlp.c_fc")
    assert masked.numel() == c_fc.weight.shape[1]
    assert torch.equal(c_fc.weight[:, masked], before[:, masked])
    assert not torch.equal(c_fc.weight[:, ~masked], before[:, ~masked])
    h.remove()
    with pytest.warns(UserWarning, match="lm_head"):
        h2 = modulart.migu.apply(model, targets="lm_head")
    h2.remove()


def test_selector_on_non_linear_raises_and_leaves_model() -> None:
    model = _mlp()
    with pytest.raises(UnsupportedModuleError, match="ReLU"):
        modulart.migu.apply(model, targets="1")
    assert all(not hs for hs in _hooks(model))


def test_peft_lora_masks_adapter_rows() -> None:
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["fc1"], init_lora_weights=False))
    paths = [t.path for t in modulart.migu.find_targets(model)]
    assert any(p.endswith("lora_A.default") for p in paths) and any(p.endswith("lora_B.default") for p in paths)
    assert not any("base_layer" in p for p in paths)  # frozen base weights are not targets
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.5, select="topk", optimizer=opt)
    a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    path_a = next(p for p in paths if p.endswith("lora_A.default"))
    before = a.weight.detach().clone()
    _step(model, opt, torch.randn(8, 6))
    masked = _masked_rows(h, path_a)
    assert int(masked.sum()) == 2 and torch.equal(a.weight[masked], before[masked])
    assert not torch.equal(a.weight[~masked], before[~masked])
    h.remove()
    sel = modulart.migu.find_targets(model, "fc1")  # a user selector on the LoRA layer expands it
    assert sorted(t.path.rsplit(".", 2)[-2] for t in sel) == ["lora_A", "lora_B"]


def test_explicit_mask_before_clipping() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    before = model[0].weight.detach().clone()
    model(torch.randn(16, 6)).pow(2).sum().backward()
    h.mask_()
    masked = _masked_rows(h, "0")
    assert not model[0].weight.grad[masked].any()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert norm > 1e-3
    opt.step()
    assert torch.equal(model[0].weight[masked], before[masked])
    h.remove()


def test_random_control_same_ratio_seeded() -> None:
    def run(seed: int) -> torch.Tensor:
        model = _mlp(f=40)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        h = modulart.migu.apply(model, keep_ratio=0.3, control="random", seed=seed, optimizer=opt)
        _step(model, opt, torch.randn(8, 6))
        m = h.masks()["0"]
        h.remove()
        return m

    a, b, c = run(0), run(0), run(1)
    assert int(a.sum()) == 12 and torch.equal(a, b) and not torch.equal(a, c)


def test_jaccard_steps_and_tasks() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    x = torch.randn(8, 6)
    _step(model, opt, x)
    assert h.stats()["0"].jaccard_prev is None
    _step(model, opt, x)
    assert h.stats()["0"].jaccard_prev == 1.0
    h.task_boundary()
    _step(model, opt, x)
    assert h.stats()["0"].task_jaccard == [1.0]
    _step(model, opt, -x)  # other units light up
    for s in h.stats().values():
        assert s.jaccard_prev is not None and 0.0 <= s.jaccard_prev <= 1.0
        assert all(0.0 <= j <= 1.0 for j in s.task_jaccard)
    assert h.stats()["0"].jaccard_prev < 1.0
    h.remove()


def test_unseen_layer_not_masked() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    before = model[2].weight.detach().clone()
    model[2](torch.randn(4, 20)).sum().backward()  # only layer "2" runs
    model[0].weight.grad = torch.ones_like(model[0].weight)
    opt.step()
    s = h.stats()
    assert not s["0"].seen and s["0"].unseen_steps == 1 and s["2"].seen
    assert model[2].weight.ne(before).any(1).sum() < 6
    assert h.masker is not None and id(model[0].weight) not in h.masker.masks
    h.remove()


def test_skip_first_task_and_disable() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, skip_first_task=True, optimizer=opt)

    def moved_rows() -> int:
        before = model[0].weight.detach().clone()
        _step(model, opt, torch.randn(16, 6))
        return int(model[0].weight.ne(before).any(1).sum())

    kept = 1 + math.floor(0.3 * 19)  # quantile keeps 6 of 20 distinct scores
    assert moved_rows() > kept  # first task: plain fine-tuning
    assert h.stats()["0"].kept_fraction is not None  # statistics recorded anyway
    h.task_boundary()
    assert moved_rows() <= kept
    h.disable()
    assert moved_rows() > kept
    h.enable()
    assert moved_rows() <= kept
    with h.disabled():
        assert moved_rows() > kept
    assert moved_rows() <= kept and h.enabled
    h.remove()


def test_config_validation_and_registry() -> None:
    for field, value in [("keep_ratio", 1.5), ("stat", "l2"), ("select", "top"), ("control", "x"), ("seed", 0.5)]:
        with pytest.raises(ConfigError, match=field):
            MIGUConfig(**{field: value})
    cfg = MIGUConfig(keep_ratio=0.2, targets=["0", "2"])
    assert MIGUConfig.from_json(cfg.to_json()) == cfg
    model = _mlp()
    h = get_operator("migu").apply(model, keep_ratio=0.5, select="topk")
    assert isinstance(h, modulart.migu.MIGUHandle)
    with pytest.raises(UnsupportedOperationError):
        h.mask_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h.attach(opt)
    _step(model, opt, torch.randn(4, 6))
    assert h.stats()["0"].kept_fraction == 0.5
    h.remove()


def test_import_does_not_import_transformers() -> None:
    code = "import sys, modulart.migu; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- HF Trainer --------------------------------------------------------------------------------
def test_hf_trainer_callback(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from modulart.migu.hf import MIGUCallback

    fam = build("gpt2")
    model = fam.model.train()
    ids = torch.randint(1, 100, (8, 6), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_strategy="no",
        disable_tqdm=True,
    )
    cb = MIGUCallback(keep_ratio=0.3)
    c_fc = model.transformer.h[0].mlp.c_fc
    snaps: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Spy(transformers.TrainerCallback):  # type: ignore[misc]
        def on_pre_optimizer_step(self, *a: Any, **k: Any) -> None:
            assert cb.handle is not None
            snaps.append((c_fc.weight.detach().clone(), cb.handle.layers["transformer.h.0.mlp.c_fc"].history.last))

        def on_optimizer_step(self, *a: Any, **k: Any) -> None:
            before, keep = snaps[-1]
            assert torch.equal(c_fc.weight[:, ~keep], before[:, ~keep])
            assert not torch.equal(c_fc.weight[:, keep], before[:, keep])
            snaps.append((before, keep))

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, Spy()])
    trainer.train()
    assert len(snaps) == 4
    assert cb.handle is not None and cb.handle.removed and cb.handle.stats()["transformer.h.0.mlp.c_fc"].steps == 2


# --- DDP ---------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(_mlp(seed=0))
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        masks = []
        for _ in range(3):
            model(torch.randn(8, 6, generator=g)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            masks.append(h.masks())
        torch.save({"masks": masks, "params": {k: v.detach() for k, v in model.state_dict().items()}}, f"{out}{rank}")
        h.remove()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "rank")
    mp.spawn(_ddp_worker, args=(2, init, out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}0"), torch.load(f"{out}1")
    for m0, m1 in zip(r0["masks"], r1["masks"], strict=True):
        assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k])
    # the local statistics differ per rank, so without the all-reduce the masks would differ
    local = [select_mask(torch.randn(20, generator=torch.Generator().manual_seed(s)), 0.3, "quantile") for s in (0, 1)]
    assert not torch.equal(*local)


# --- the operator contract: disable, merge_, attach, state ---------------------------------------
def _fired(h: modulart.migu.MIGUHandle) -> int:
    return sum(h.registry.counts().values())


def test_disable_before_attach_masks_nothing_and_new_hooks_follow() -> None:
    model, plain = _mlp(), _mlp()
    opt, plain_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(plain.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3)
    h.disable()
    h.attach(opt)  # hooks added after disable() stay off
    assert not h.enabled and h.registry.handles() and not any(x.enabled for x in h.registry.handles())
    x = torch.randn(16, 6)
    _step(model, opt, x)
    h.mask_()  # a no-op while disabled
    _step(plain, plain_opt, x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))
    assert _fired(h) == 0 and h.stats()["0"].steps == 0 and not h.masks()
    h.enable()
    before = model[0].weight.detach().clone()
    _step(model, opt, x)
    assert int(model[0].weight.ne(before).any(1).sum()) <= 1 + math.floor(0.3 * 19)
    h.remove()
    assert not h.enabled
    with pytest.raises(UnsupportedOperationError, match="removed"):
        h.disable()


def test_disabled_context_equals_no_migu() -> None:
    model, plain = _mlp(), _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.05, weight_decay=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    x = torch.randn(16, 6)
    model(x).pow(2).sum().backward()  # statistics pending when MIGU is switched off: they are dropped
    fired = _fired(h)
    with h.disabled():
        h.mask_()  # as MIGUCallback calls it every step: a no-op while disabled
        opt.step()
        opt.zero_grad()
        for _ in range(2):
            model(x).pow(2).sum().backward()
            h.mask_()
            opt.step()
            opt.zero_grad()
        fired = _fired(h) - fired
    plain(x).pow(2).sum().backward()
    plain_opt.step()
    plain_opt.zero_grad()
    for _ in range(2):
        _step(plain, plain_opt, x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))
    assert fired == 0 and h.enabled and h.stats()["0"].steps == 0
    before = model[0].weight.detach().clone()
    _step(model, opt, x)  # on again: this step is decided on its own forward and masked
    assert h.stats()["0"].steps == 1 and torch.equal(model[0].weight[~h.masks()["0"]], before[~h.masks()["0"]])
    h.remove()


def test_merge_is_function_preserving_and_leaves_no_hooks() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre, post = dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)
    h = modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    _step(model, opt, torch.randn(16, 6))
    x = torch.randn(4, 6)
    with torch.no_grad():
        out = model(x)
    assert h.merge_() is model
    assert h.removed and not any(_hooks(model)) and h.stats()["0"].steps == 1
    assert dict(opt._optimizer_step_pre_hooks) == pre and dict(opt._optimizer_step_post_hooks) == post
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_attach_unwraps_accelerate_style_optimizers() -> None:
    from modulart.core.errors import InvalidArgumentError

    class Wrapped:  # accelerate's AcceleratedOptimizer (possibly around another wrapper)
        def __init__(self, optimizer: object) -> None:
            self.optimizer = optimizer

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, freeze_masked_rows=False, optimizer=Wrapped(Wrapped(opt)))
    assert h.optimizer is opt
    before = model[0].weight.detach().clone()
    _step(model, opt, torch.randn(16, 6))
    masked = _masked_rows(h, "0")
    assert masked.any() and torch.equal(model[0].weight[masked], before[masked])
    h.remove()
    with pytest.raises(InvalidArgumentError, match="Optimizer"):
        modulart.migu.apply(_mlp(), optimizer=Wrapped(object()))


@pytest.mark.parametrize("control", ["magnitude", "random"])
def test_save_load_keeps_task_counter_history_and_generator(tmp_path: Path, control: str) -> None:
    import modulart as mt

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = modulart.migu.apply(model, keep_ratio=0.3, skip_first_task=True, control=control, optimizer=opt)
    g = torch.Generator().manual_seed(5)
    for task in range(2):
        for _ in range(2):
            _step(model, opt, torch.randn(16, 6, generator=g))
        if task == 0:
            h.task_boundary()
    path = h.save(tmp_path / "migu")
    stats, weights = h.stats(), {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 6, generator=g)
    _step(model, opt, x)  # what the original handle does next
    next_masks, next_stats = h.masks(), h.stats()
    h.remove()

    model.load_state_dict(weights)
    again = mt.load(model, path)
    assert isinstance(again, modulart.migu.MIGUHandle)
    assert again.tasks_done == 1 and again.stats() == stats and stats["0"].task_jaccard
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    again.attach(opt2)
    before = model[0].weight.detach().clone()
    _step(model, opt2, x)  # tasks_done = 1: skip_first_task does not apply, the step is masked
    assert again.stats() == next_stats
    assert all(torch.equal(again.masks()[k], v) for k, v in next_masks.items())
    assert torch.equal(model[0].weight[~next_masks["0"]], before[~next_masks["0"]])
    again.remove()
