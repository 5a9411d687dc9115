"""The grouped sparse EMoE executor against its references: outputs and gradients.

``ConvertedFFN.sparse_forward`` (one argsort, reused per-expert buffers, a fused key/up GEMM per
expert, a custom backward) must give the outputs and the input/parameter gradients of
``sparse_forward_reference`` (autograd over the per-expert loop) and of the masked executor, up to
fp32 summation order, on plain and gated FFNs, with and without biases, with capacity-dropped
assignments, per-expert output biases, empty experts, and partly frozen weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import modulart as mt
from benchmark_smoke import run_quick

TOL = {"atol": 1e-6, "rtol": 2e-5}  # fp32 summation order: observed differences are ~1e-7 relative


class PlainFFN(nn.Module):
    def __init__(self, d: int, f: int, bias: bool) -> None:
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, f, bias=bias), nn.GELU(), nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GatedFFN(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``; ``bias`` picks which projections have one."""

    def __init__(self, d: int, f: int, bias: tuple[bool, bool, bool]) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=bias[0])
        self.up_proj = nn.Linear(d, f, bias=bias[1])
        self.down_proj = nn.Linear(f, d, bias=bias[2])
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


SHAPES = {
    "plain-bias": lambda: PlainFFN(24, 96, bias=True),
    "plain-nobias": lambda: PlainFFN(16, 40, bias=False),
    "gated-bias": lambda: GatedFFN(24, 96, (True, True, True)),
    "gated-nobias": lambda: GatedFFN(20, 64, (False, False, False)),
    "gated-upbias-only": lambda: GatedFFN(16, 48, (False, True, False)),
}


def _model(shape: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SHAPES[shape]()


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = model(xg)
    (y.square().mean() + y.sum() * 0.01).backward()
    assert xg.grad is not None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), {"x": xg.grad.clone()} | grads


def _refuse(*args: object) -> torch.Tensor:
    raise AssertionError("the grouped executor fell back to the reference path")


def _sparse_vs_masked(shape: str, monkeypatch: pytest.MonkeyPatch, **cfg: object) -> None:
    monkeypatch.setattr(mt.emoe.ConvertedFFN, "sparse_forward_reference", _refuse)  # the grouped path must run
    model = _model(shape)
    other = copy.deepcopy(model)
    base = {"num_experts": 8, "top_k": 3, "layers": "all", "split": "random"} | cfg
    masked = mt.emoe.apply(model, **base)
    sparse = mt.emoe.apply(other, **base, executor="sparse")
    assert all(torch.equal(masked.labels()[p], sparse.labels()[p]) for p in masked.labels())
    x = torch.randn(37, next(model.parameters()).shape[1], generator=torch.Generator().manual_seed(1))
    ym, gm = _grads(model, x)
    ys, gs = _grads(other, x)
    torch.testing.assert_close(ys, ym, **TOL)
    assert gm.keys() == gs.keys()
    for name in gm:
        torch.testing.assert_close(gs[name], gm[name], **TOL, msg=name)
    masked.remove()
    sparse.remove()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_sparse_outputs_and_gradients_equal_masked(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _sparse_vs_masked(shape, monkeypatch)


@pytest.mark.parametrize("shape", ["plain-bias", "gated-bias"])
def test_sparse_equals_masked_with_capacity_drops(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _sparse_vs_masked(shape, monkeypatch, capacity_factor=0.5)


@pytest.mark.parametrize("shape", ["plain-bias", "gated-bias"])
def test_sparse_equals_masked_with_per_expert_bias_and_capacity(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _sparse_vs_masked(shape, monkeypatch, per_expert_bias=True, capacity_factor=0.75)


def _layer(shape: str, n: int = 8, k: int = 3, **cfg: object) -> tuple[nn.Module, mt.emoe.ConvertedFFN, object]:
    model = _model(shape)
    handle = mt.emoe.apply(model, num_experts=n, top_k=k, layers="all", split="random", executor="sparse", **cfg)
    return model, next(iter(handle.layers.values())), handle


def _both(
    layer: mt.emoe.ConvertedFFN,
    x: torch.Tensor,
    idx: torch.Tensor,
    keep: torch.Tensor | None,
    params: list[torch.Tensor],
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Output and gradients (``x`` if it needs one, then ``params``): the grouped path, then the reference."""
    seen = []
    for fn in (layer.sparse_forward, layer.sparse_forward_reference):
        y = fn(x, idx, keep)
        wrt = ([x] if x.requires_grad else []) + params
        g = torch.autograd.grad((y.square().mean() + 0.01 * y.sum()), wrt) if wrt else ()
        seen.append((y.detach(), *g))
    return tuple(seen[0]), tuple(seen[1])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_grouped_path_equals_reference_with_empty_experts_and_drops(shape: str) -> None:
    model, layer, handle = _layer(shape)
    g = torch.Generator().manual_seed(2)
    d = layer.ffn.d_model
    x = torch.randn(29, d, generator=g).requires_grad_(True)
    # experts 5..7 never selected (empty); the rows of idx are distinct experts per token
    idx = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(29)])
    keep = torch.rand(29, 3, generator=g) > 0.3
    params = list(model.parameters())
    for kp in (None, keep):
        new, ref = _both(layer, x, idx, kp, params)
        assert len(new) == len(ref) == 2 + len(params)
        for a, b in zip(new, ref, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    # the empty experts' neurons get exactly zero gradient
    empty = torch.isin(layer.groups.labels, torch.tensor([5, 6, 7]))
    keys_grad = new[2 + [n for n, _ in model.named_parameters()].index(_first_weight(model))]
    assert torch.count_nonzero(keys_grad[empty]) == 0
    handle.remove()  # type: ignore[attr-defined]


def _first_weight(model: nn.Module) -> str:
    return "fc_in.weight" if isinstance(model, PlainFFN) else "gate_proj.weight"


def test_grouped_path_gradients_with_partly_frozen_weights() -> None:
    model, layer, handle = _layer("gated-bias")
    model.gate_proj.weight.requires_grad_(False)
    model.up_proj.bias.requires_grad_(False)
    x = torch.randn(23, layer.ffn.d_model, generator=torch.Generator().manual_seed(3))  # no input gradient
    idx = layer.route(x)
    params = [p for p in model.parameters() if p.requires_grad]
    new, ref = _both(layer, x, idx, None, params)
    for a, b in zip(new, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # only the input needs a gradient (every weight frozen)
    for p in model.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    new, ref = _both(layer, xg, idx, None, [])
    for a, b in zip(new, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    handle.remove()  # type: ignore[attr-defined]


@pytest.mark.parametrize("shape", ["plain-bias", "gated-nobias"])
def test_grouped_path_without_gradients_equals_reference(shape: str) -> None:
    _, layer, handle = _layer(shape, n=4, k=4)
    x = torch.randn(17, layer.ffn.d_model, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        idx = layer.route(x)
        torch.testing.assert_close(layer.sparse_forward(x, idx), layer.sparse_forward_reference(x, idx), **TOL)
        torch.testing.assert_close(layer.sparse_forward(x, idx), layer.ffn.forward(x), **TOL)  # k = N: dense
    handle.remove()  # type: ignore[attr-defined]


def test_grouped_weight_cache_follows_optimizer_steps_and_a_new_split() -> None:
    model, layer, handle = _layer("gated-bias")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(31, layer.ffn.d_model, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # training steps through the grouped path: the cached blocks must follow
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            idx = layer.route(x)
            torch.testing.assert_close(layer.sparse_forward(x, idx), layer.sparse_forward_reference(x, idx), **TOL)
    labels = torch.roll(layer.groups.labels, 1)
    layer.set_split(labels, layer.frozen)
    with torch.no_grad():
        idx = layer.route(x)
        torch.testing.assert_close(layer.sparse_forward(x, idx), layer.sparse_forward_reference(x, idx), **TOL)
    handle.remove()  # type: ignore[attr-defined]


def test_dropout_in_training_uses_the_reference_path() -> None:
    model, layer, handle = _layer("plain-bias", dropout=0.5)
    model.train()
    x = torch.randn(13, layer.ffn.d_model)
    assert layer._uses_reference(x)
    model.eval()
    assert not layer._uses_reference(x)
    handle.remove()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_emoe_executors_benchmark_quick_writes_its_keys(tmp_path: Path) -> None:
    result = run_quick("emoe_executors", tmp_path)
    assert "median_seconds" in result
    assert {"sparse_fwd_vs_dense", "sparse_fwd_vs_dense_half_k", "sparse_fwd_bwd_vs_dense"} <= set(result["targets"])
    assert result["notes"]
    assert {c["x_label"] for c in result["curves"]} >= {"N/k", "tokens"}
    assert result["sparse_vs_masked_max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_emoe_clustering_benchmark_quick_writes_its_keys(tmp_path: Path) -> None:
    result = run_quick("emoe_clustering", tmp_path)
    assert {c["x_label"] for c in result["curves"]} >= {"d_ff", "experts"}
