"""MIGU's fast step paths against a by-hand MIGU, bit for bit, over several AdamW steps.

The by-hand MIGU below follows the definition in docs/migu.md, independently of the library: per
gated linear layer, a per-output-row magnitude of its outputs over the step's tokens (``abs_sum``:
``sum_t |h[t, j]|``; ``l1_token_mean``: ``|h[t, j]| / sum_i |h[t, i]|`` averaged over tokens), the
rows to update (``quantile``: ``a >= quantile(a, 1 - keep_ratio)``; ``topk``: the
``ceil(keep_ratio * units)`` largest), every other row's gradient (and bias entry) zeroed, then
AdamW; with ``freeze_masked_rows`` the masked rows are put back as they were before the step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import modulart.migu
from benchmark_smoke import run_quick
from modulart.migu.stats import select_mask, select_masks

KEEP = 0.25  # keep counts ceil(0.25 * units) are exact for the widths below


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    # two layers of width 8 (one shared quantile) and one of width 12; biases everywhere
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 12))


def _batches(steps: int, micro: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(2, 5, 6, generator=g) for _ in range(micro)] for _ in range(steps)]


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out**2).mean() + out[..., 0].sum()


class _HandMIGU:
    """MIGU written out by hand on its own copy of the model; ``shift`` rolls every mask by rows
    (a deliberately wrong variant) and ``skip`` names a layer left unmasked (another one)."""

    def __init__(self, model: nn.Module, stat: str, select: str, freeze: bool, shift: int = 0, skip: int = -1) -> None:
        self.model, self.stat, self.select, self.freeze = model, stat, select, freeze
        self.shift, self.skip = shift, skip
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.total: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for i, lin in enumerate(self.linears):
            lin.register_forward_hook(lambda _m, _a, out, i=i: self._record(i, out))

    def _record(self, i: int, out: torch.Tensor) -> None:
        h = out.detach().reshape(-1, out.shape[-1])
        if self.stat == "abs_sum":
            s = h.abs().sum(0, dtype=torch.float32)
        else:
            a = h.float().abs()
            s = (a / a.sum(-1, keepdim=True).clamp_min(1e-12)).sum(0)
        self.total[i] = s if i not in self.total else self.total[i] + s
        self.tokens[i] = self.tokens.get(i, 0) + h.shape[0]

    def keep(self, i: int) -> torch.Tensor:
        a = self.total[i] if self.stat == "abs_sum" else self.total[i] / self.tokens[i]
        if self.select == "quantile":
            keep = a >= torch.quantile(a, 1 - KEEP)
        else:
            keep = torch.zeros(a.numel(), dtype=torch.bool)
            keep[torch.topk(a, math.ceil(KEEP * a.numel())).indices] = True
        return keep.roll(self.shift)

    def step(self) -> list[torch.Tensor]:
        keeps = [self.keep(i) for i in range(len(self.linears))]
        before = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in self.linears]
        for i, (lin, keep) in enumerate(zip(self.linears, keeps, strict=True)):
            if i == self.skip:
                continue
            assert lin.weight.grad is not None and lin.bias.grad is not None
            lin.weight.grad[~keep] = 0.0
            lin.bias.grad[~keep] = 0.0
        self.opt.step()
        if self.freeze:
            with torch.no_grad():
                for i, (lin, keep, (w0, b0)) in enumerate(zip(self.linears, keeps, before, strict=True)):
                    if i != self.skip:
                        lin.weight[~keep] = w0[~keep]
                        lin.bias[~keep] = b0[~keep]
        self.opt.zero_grad(set_to_none=True)
        self.total, self.tokens = {}, {}
        return keeps


def _run_both(
    stat: str, select: str, freeze: bool, steps: int = 5, micro: int = 1, **wrong: int
) -> tuple[list[list[bool]], list[list[torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Train the library's MIGU and the by-hand one side by side; per step: are the parameters equal,
    the by-hand masks, the library's masks."""
    lib_model = _model()
    hand = _HandMIGU(copy.deepcopy(lib_model), stat, select, freeze, **wrong)
    opt = torch.optim.AdamW(lib_model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = modulart.migu.apply(
        lib_model, keep_ratio=KEEP, stat=stat, select=select, freeze_masked_rows=freeze, optimizer=opt
    )
    equal, hand_masks, lib_masks = [], [], []
    for batch in _batches(steps, micro):
        for x in batch:  # micro-batches accumulate into one step
            _loss(lib_model(x)).backward()
            _loss(hand.model(x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hand_masks.append(hand.step())
        lib_masks.append(handle.masks())
        equal.append([torch.equal(a, b) for a, b in zip(lib_model.parameters(), hand.model.parameters(), strict=True)])
    handle.remove()
    return equal, hand_masks, lib_masks


@pytest.mark.parametrize(
    ("stat", "select", "freeze", "micro"),
    [
        ("l1_token_mean", "topk", True, 1),
        ("l1_token_mean", "quantile", True, 2),
        ("abs_sum", "quantile", True, 1),
        ("abs_sum", "topk", False, 2),
    ],
)
def test_migu_steps_bit_identical_to_hand_migu(stat: str, select: str, freeze: bool, micro: int) -> None:
    equal, hand_masks, lib_masks = _run_both(stat, select, freeze, micro=micro)
    for step, (eq, hand, lib) in enumerate(zip(equal, hand_masks, lib_masks, strict=True)):
        assert all(eq), f"step {step}: parameters differ from the by-hand MIGU: {eq}"
        assert [lib[p].tolist() for p in ("0", "2", "4")] == [k.tolist() for k in hand], f"step {step}: masks"
        assert all(0 < int(k.sum()) < k.numel() for k in hand), "every mask keeps some rows and drops some"


@pytest.mark.parametrize("wrong", [{"shift": 1}, {"skip": 1}], ids=["mask-off-by-one-row", "wrong-layer"])
def test_hand_migu_comparison_detects_a_wrong_mask(wrong: dict[str, int]) -> None:
    """The comparison above is sharp: a mask shifted by one row, or one layer left unmasked, differs."""
    equal, _, _ = _run_both("l1_token_mean", "topk", True, steps=2, **wrong)
    assert not all(all(eq) for eq in equal)


def test_masked_rows_frozen_kept_rows_move() -> None:
    """``freeze_masked_rows``: each step's masked rows (and bias entries) are bit-identical to before it,
    even with AdamW's moments and weight decay; the kept rows move."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = modulart.migu.apply(model, keep_ratio=KEEP, optimizer=opt)
    lins = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    for batch in _batches(4, 1):
        before = {p: (m.weight.detach().clone(), m.bias.detach().clone()) for p, m in lins.items()}
        _loss(model(batch[0])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p, keep in handle.masks().items():
            w0, b0 = before[p]
            w, b = lins[p].weight.detach(), lins[p].bias.detach()
            assert torch.equal(w[~keep], w0[~keep]) and torch.equal(b[~keep], b0[~keep]), p
            assert bool((w[keep] != w0[keep]).any(dim=1).all()), f"{p}: every kept row moves"
    handle.remove()


def test_select_masks_equals_select_mask_per_score() -> None:
    """The batched decision (one quantile per width) gives each layer's own select_mask, bit for bit:
    mixed widths, ties, a constant row, a NaN row, single units."""
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(n, generator=g) for n in (8, 12, 8, 1, 8, 5, 1)]
    scores.append(torch.tensor([2.0, 1.0, 2.0, 2.0, 0.0, 1.0, 1.0, 2.0]))  # ties at the threshold
    scores.append(torch.ones(12))
    scores.append(torch.tensor([1.0, float("nan"), 3.0, 0.5, 2.0]))
    scores.append((torch.rand(8, generator=g) * 1e-30).double())  # another dtype: compared as fp32
    for keep_ratio in (0.01, 0.25, 0.3, 0.5, 0.7, 1.0):
        for select in ("quantile", "topk"):
            got = select_masks(scores, keep_ratio, select)
            assert len(got) == len(scores)
            for s, m in zip(scores, got, strict=True):
                want = select_mask(s, keep_ratio, select)
                assert m.dtype == torch.bool and torch.equal(m, want), (keep_ratio, select, s)
                assert m.untyped_storage().nbytes() == want.numel(), "each mask owns its storage"


def test_select_masks_chunks_large_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups above torch.quantile's size limit are split into several calls; the masks do not change."""
    import modulart.migu.stats as stats

    monkeypatch.setattr(stats, "_QUANTILE_MAX", 20)  # 8 units: 2 rows per quantile call
    g = torch.Generator().manual_seed(4)
    scores = [torch.rand(8, generator=g) for _ in range(5)] + [torch.rand(30, generator=g)]
    got = stats.select_masks(scores, 0.3, "quantile")
    assert all(torch.equal(m, select_mask(s, 0.3, "quantile")) for s, m in zip(scores, got, strict=True))


@pytest.mark.slow
def test_migu_overhead_benchmark_quick(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = run_quick("migu_overhead", tmp_path)
    assert set(data["targets"]) == {"migu_vs_adamw_8x128", "migu_vs_adamw_32x128"}
    assert {"fixed_us_per_gated_layer", "fixed_cost", "migu_only_seconds", "peak_rss_kib"} <= set(data)
    assert {c["x_label"] for c in data["curves"]} >= {"decoder layers"}
    assert len(data["curves"]) == 3
