"""The shared gradient/update masking mechanism (used by MIGU and KV)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import modulart as mt
from modulart.core.grad_mask import GradientMasker


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5))


def _step(model: nn.Module, opt: torch.optim.Optimizer, n_micro: int = 1) -> None:
    for i in range(n_micro):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


KEEP = torch.tensor([True, False, True, True, False, False, True, False])


def test_sgd_masked_rows_and_bias_are_bit_identical() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    masker = GradientMasker(model, opt)
    masker.set(model[0].weight, KEEP, axis=0, bias=model[0].bias)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    _step(model, opt)
    assert torch.equal(model[0].weight[~KEEP], w[~KEEP]) and torch.equal(model[0].bias[~KEEP], b[~KEEP])
    assert not torch.equal(model[0].weight[KEEP], w[KEEP])
    masker.remove()


def test_adamw_moves_masked_rows_unless_frozen() -> None:
    results = {}
    for freeze in (False, True):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        masker = GradientMasker(model, opt, freeze=freeze)
        w = model[0].weight.detach().clone()
        for step in range(3):
            keep = KEEP if step % 2 == 0 else ~KEEP  # masks change per step, as in MIGU
            masker.set(model[0].weight, keep, axis=0)
            before = model[0].weight.detach().clone()
            _step(model, opt)
            results[(freeze, step)] = torch.equal(model[0].weight[~keep], before[~keep])
        assert not torch.equal(model[0].weight, w)
        masker.remove()
    assert not results[(False, 1)]  # Adam momentum / weight decay moved masked rows
    assert all(results[(True, s)] for s in range(3))  # frozen: bit-identical every step


def test_conv1d_output_units_are_columns() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(8, 6)  # weight [6, 8]: output units are columns
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    masker = GradientMasker(conv, opt)
    masker.set(conv.weight, KEEP, axis=1, bias=conv.bias)
    w = conv.weight.detach().clone()
    conv(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert torch.equal(conv.weight[:, ~KEEP], w[:, ~KEEP]) and not torch.equal(conv.weight[:, KEEP], w[:, KEEP])
    masker.remove()


def test_explicit_mask_before_clipping_and_accumulation() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    masker = GradientMasker(model, opt)
    masker.set(model[0].weight, KEEP, axis=0)
    w = model[0].weight.detach().clone()
    for i in range(3):  # gradient accumulation over micro-batches
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(i))).square().mean().backward()
    masker.mask_()
    kept_norm = model[0].weight.grad.norm()
    assert torch.equal(model[0].weight.grad[~KEEP], torch.zeros_like(model[0].weight.grad[~KEEP]))
    torch.nn.utils.clip_grad_norm_([model[0].weight], max_norm=float(kept_norm) / 2)
    opt.step()
    assert torch.equal(model[0].weight[~KEEP], w[~KEEP])


def test_bad_masks_raise_and_change_nothing() -> None:
    model = _model()
    masker = GradientMasker(model)
    masker.set(model[0].weight, KEEP, axis=0)
    for keep, axis, match in [
        (KEEP[:5], 0, "length 8"),
        (KEEP.float(), 0, "bool vector"),
        (KEEP, 2, "axis 2 out of range"),
        (torch.ones(6, dtype=torch.bool), 1, None),  # valid: 6 input columns
    ]:
        if match is None:
            masker.set(model[0].weight, keep, axis=axis)
            continue
        with pytest.raises(mt.ShapeError, match=match):
            masker.set(model[0].weight, keep, axis=axis)
    with pytest.raises(mt.ShapeError, match=r"0\.weight: bias"):
        masker.set(model[0].weight, KEEP, axis=0, bias=model[2].bias)


def test_remove_restores_optimizer_hooks_and_keeps_foreign_ones() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    fired = []
    foreign = opt.register_step_pre_hook(lambda o, a, k: fired.append(1))
    pre, post = dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)
    masker = GradientMasker(model, opt, freeze=True)
    masker.set(model[0].weight, KEEP, axis=0)
    masker.remove()
    assert dict(opt._optimizer_step_pre_hooks) == pre and dict(opt._optimizer_step_post_hooks) == post
    w = model[0].weight.detach().clone()
    _step(model, opt)
    assert fired == [1] and not torch.equal(model[0].weight[~KEEP], w[~KEEP])  # no mask any more
    foreign.remove()


def test_bf16_parameters() -> None:
    model = _model().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    masker = GradientMasker(model, opt)
    masker.set(model[2].weight, torch.tensor([True, False, True, False, True]), axis=0)
    w = model[2].weight.detach().clone()
    model(torch.randn(4, 6, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()
    assert torch.equal(model[2].weight[1], w[1]) and torch.equal(model[2].weight[3], w[3])
    masker.remove()


@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    axis=st.integers(0, 1),
    data=st.data(),
)
def test_exactly_the_masked_slices_stay_put(rows: int, cols: int, axis: int, data: st.DataObject) -> None:
    p = nn.Parameter(torch.randn(rows, cols))
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=(rows, cols)[axis], max_size=(rows, cols)[axis])))
    holder = nn.Module()
    holder.p = p
    opt = torch.optim.SGD([p], lr=1.0)
    masker = GradientMasker(holder, opt)
    masker.set(p, keep, axis=axis)
    before = p.detach().clone()
    (p * torch.randn(rows, cols) + 1).sum().backward()
    opt.step()
    moved = (p != before).any(dim=1 - axis)
    assert not bool((moved & ~keep).any())
    masker.remove()


@pytest.mark.parametrize("axis", [1, 2])
def test_per_expert_masks_on_fused_parameters_freeze_exactly_the_masked_units(axis: int) -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 5, 4) if axis == 1 else torch.randn(3, 4, 5))  # 3 experts, 5 units
    b = nn.Parameter(torch.randn(3, 5))
    holder = nn.ParameterList([w, b])
    opt = torch.optim.AdamW([w, b], lr=0.1, weight_decay=0.1)
    masker = GradientMasker(holder, opt, freeze=True)
    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    before_w, before_b = w.detach().clone(), b.detach().clone()
    for _ in range(2):  # the second step has Adam moments: frozen units must still not move
        masker.set(w, keep, axis=axis, bias=b)
        (w.square().sum() + b.square().sum()).backward()
        opt.step()
        opt.zero_grad()
    units = (lambda t: t) if axis == 1 else (lambda t: t.transpose(1, 2))
    moved = (units(w.detach()) != units(before_w)).any(-1)  # [E, U]
    assert torch.equal(moved, keep)
    assert torch.equal(b.detach() != before_b, keep)
    with pytest.raises(mt.ShapeError, match="per-expert"):
        masker.set(w, torch.ones(2, 5, dtype=torch.bool), axis=axis)
    masker.remove()
