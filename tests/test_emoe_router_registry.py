"""The public EMoE router extension point: register_router, checked scores, artefacts by name only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import modulart as mt
from modulart.core.errors import ConfigError, InvalidArgumentError, KeyNotFoundError, NonFiniteError, ShapeError
from modulart.emoe import EMoEConfig, RouterContext


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8)), nn.LayerNorm(8))


def _mean_key(x: torch.Tensor, ctx: RouterContext, config: EMoEConfig) -> torch.Tensor:
    """avg-k written against the public context only."""
    return x @ ctx.groups.centroids(ctx.keys.float()).t()


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names registered by a test; unregistered afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        if n in mt.emoe.available_routers():
            mt.emoe.unregister_router(n)


def _register(names: list[str], name: str, fn: mt.emoe.RouterFn, **kw: bool) -> None:
    mt.emoe.register_router(name, fn, **kw)
    if name not in names:
        names.append(name)


@pytest.mark.parametrize("executor", ["masked", "sparse"])
def test_registered_router_equals_the_builtin_it_reimplements(registered: list[str], executor: str) -> None:
    _register(registered, "mean_key", _mean_key)
    x = torch.randn(2, 7, 8)
    outs, loads = [], []
    for router in ("avgk", "mean_key"):
        model = _model()
        h = mt.emoe.apply(model, num_experts=8, top_k=3, layers="all", router=router, executor=executor)
        with torch.no_grad():
            outs.append(model(x))
        loads.append(next(iter(h.routing_stats().values())).load)
        h.remove()
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=0)
    assert loads[0] == loads[1]


def test_the_router_decides_the_selection(registered: list[str]) -> None:
    def prefer_last(x: torch.Tensor, ctx: RouterContext, config: EMoEConfig) -> torch.Tensor:
        return torch.arange(ctx.num_experts, dtype=x.dtype, device=x.device).expand(x.shape[0], -1)

    _register(registered, "prefer_last", prefer_last)
    model = _model()
    h = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all", router="prefer_last")
    model(torch.randn(5, 8))
    load = next(iter(h.routing_stats().values())).load
    h.remove()
    assert load == [0.0] * 6 + [0.5, 0.5]


def test_context_holds_the_live_weights_and_the_config(registered: list[str]) -> None:
    seen: list[tuple[RouterContext, EMoEConfig, torch.Tensor]] = []

    def spy(x: torch.Tensor, ctx: RouterContext, config: EMoEConfig) -> torch.Tensor:
        seen.append((ctx, config, x))
        return _mean_key(x, ctx, config)

    _register(registered, "spy", spy)
    model = _model()
    h = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all", router="spy", seed=3)
    model(torch.randn(3, 4, 8).double().float())
    ctx, cfg, x = seen[-1]
    ffn = mt.find_ffns(model)[0]
    assert cfg.router == "spy" and cfg.seed == 3
    assert x.shape == (12, 8) and x.dtype == torch.float32
    assert ctx.path == ffn.path and (ctx.d_ff, ctx.d_model, ctx.num_experts) == (64, 8, 8)
    assert ctx.keys.data_ptr() == ffn.keys.data_ptr() and not ctx.keys.requires_grad
    assert torch.equal(ctx.groups.labels, h.labels()[ffn.path]) and ctx.up is None
    assert torch.equal(ctx.centroids, ctx.groups.centroids(ffn.keys.detach().float()))
    with torch.no_grad():
        ffn.keys.mul_(2.0)  # the context is rebuilt at every call: it follows the weights
    model(torch.randn(2, 8))
    assert torch.equal(seen[-1][0].keys, ffn.keys)
    h.remove()


def test_balance_loss_gradient_reaches_the_keys_through_a_registered_router(registered: list[str]) -> None:
    _register(registered, "mean_key", _mean_key)
    model = _model()
    h = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all", router="mean_key", balance_loss_weight=1.0)
    model(torch.randn(6, 8))
    h.balance_loss().backward()
    grad = mt.find_ffns(model)[0].keys.grad
    h.remove()
    assert grad is not None and float(grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("bad", "error", "fragment"),
    [
        (lambda x, ctx, cfg: torch.ones(x.shape[0]), ShapeError, "expected [T, N] = [5, 8]"),
        (lambda x, ctx, cfg: torch.ones(x.shape[0], 4), ShapeError, "shape [5, 4]"),
        (lambda x, ctx, cfg: torch.full((x.shape[0], 8), float("nan")), NonFiniteError, "40 of 40 scores"),
        (lambda x, ctx, cfg: torch.ones(x.shape[0], 8, dtype=torch.long), InvalidArgumentError, "torch.int64"),
        (lambda x, ctx, cfg: [[0.0] * 8] * x.shape[0], InvalidArgumentError, "returned list"),
    ],
    ids=["rank1", "wrong_n", "nan", "integer", "not_a_tensor"],
)
def test_bad_scores_are_typed_errors_naming_the_router(
    registered: list[str], bad: mt.emoe.RouterFn, error: type[Exception], fragment: str
) -> None:
    _register(registered, "bad_router", bad)
    model = _model()
    h = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all", router="bad_router")
    try:
        with pytest.raises(error) as info:
            model(torch.randn(5, 8))
    finally:
        h.remove()
    assert "EMoE router 'bad_router' at '0'" in str(info.value)
    assert fragment in str(info.value)
    assert isinstance(info.value, mt.ModulartError)


def test_registration_errors(registered: list[str]) -> None:
    with pytest.raises(ConfigError, match="'avgk' is a built-in router"):
        mt.emoe.register_router("avgk", _mean_key)
    with pytest.raises(ConfigError, match="name = '9lives'"):
        mt.emoe.register_router("9lives", _mean_key)
    with pytest.raises(InvalidArgumentError, match="must be callable"):
        mt.emoe.register_router("not_fn", 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="name must be a str"):
        mt.emoe.register_router(None, _mean_key)  # type: ignore[arg-type]
    _register(registered, "taken", _mean_key)
    mt.emoe.register_router("taken", _mean_key)  # the same function again: fine

    def other(x: torch.Tensor, ctx: RouterContext, config: EMoEConfig) -> torch.Tensor:
        return -_mean_key(x, ctx, config)

    with pytest.raises(ConfigError, match="'taken' is taken by"):
        mt.emoe.register_router("taken", other)
    assert mt.emoe.get_router("taken") is _mean_key
    mt.emoe.register_router("taken", other, override=True)
    assert mt.emoe.get_router("taken") is other
    with pytest.raises(KeyNotFoundError, match="'never_registered'"):
        mt.emoe.unregister_router("never_registered")
    with pytest.raises(KeyNotFoundError):
        mt.emoe.unregister_router("avgk")


def test_unknown_router_name_is_a_config_error_naming_the_extension_point() -> None:
    with pytest.raises(ConfigError) as info:
        EMoEConfig(router="nowhere")
    msg = str(info.value)
    assert "EMoEConfig.router = 'nowhere'" in msg and "modulart.emoe.register_router" in msg
    with pytest.raises(ConfigError, match=r"EMoEConfig\.router = \[.avgk.\]"):
        EMoEConfig(router=["avgk"])  # type: ignore[arg-type]


def test_live_layers_keep_the_function_they_were_converted_with(registered: list[str]) -> None:
    _register(registered, "mean_key", _mean_key)
    model = _model()
    x = torch.randn(4, 8)
    h = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all", router="mean_key")
    with torch.no_grad():
        before = model(x)
    mt.emoe.unregister_router("mean_key")
    with torch.no_grad():
        after = model(x)
    h.remove()
    assert torch.equal(before, after)


def test_artefacts_name_the_router_and_loading_looks_it_up_never_imports(
    registered: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a module whose name is the router's: loading must not import it (it would leave a marker)
    marker = tmp_path / "imported"
    (tmp_path / "router_plugin_xyz.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "router_plugin_xyz.score"
    _register(registered, name, _mean_key)
    model = _model()
    x = torch.randn(3, 5, 8)
    h = mt.emoe.apply(model, num_experts=8, top_k=3, layers="all", router=name)
    with torch.no_grad():
        expected = model(x)
    folder = h.save(tmp_path / "art")
    h.remove()
    mt.emoe.unregister_router(name)
    with pytest.raises(ConfigError, match=f"EMoEConfig.router = '{name}'"):
        mt.load(model, folder)
    assert not marker.exists() and "router_plugin_xyz" not in sys.modules
    assert not any(mt.find_ffns(model)[0].module._forward_hooks.values())  # nothing left on the model
    mt.emoe.register_router(name, _mean_key)
    again = mt.load(model, folder)
    with torch.no_grad():
        got = model(x)
    assert again.config.router == name
    again.remove()
    assert torch.equal(got, expected)
