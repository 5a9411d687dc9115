"""The EMoE operator: convert dense FFNs into emergent experts, and back.

Example:
    >>> import torch, modulart as mt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> x = torch.randn(5, 8)
    >>> dense = model(x)
    >>> h = mt.emoe.apply(model, num_experts=4, top_k=4, layers="all")   # k = N: the dense model
    >>> torch.allclose(model(x), dense, atol=1e-6)
    True
    >>> h.remove()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from modulart.core.errors import ConfigError, IncompatibleArtifactError
from modulart.core.ffn import FFN, find_ffns
from modulart.core.operator import Handle, Operator, OperatorConfig, Plan
from modulart.core.select import select_views
from modulart.emoe.cluster import balanced_kmeans, random_balanced_labels
from modulart.emoe.config import EMoEConfig, default_layers
from modulart.emoe.layer import ConvertedFFN, RoutingStats

__all__ = ["EMoE", "EMoEHandle", "apply"]


def _chosen_ffns(model: nn.Module, config: EMoEConfig) -> list[FFN]:
    ffns = find_ffns(model)
    spec = default_layers(len(ffns)) if config.layers == "default" else config.layers
    return select_views(ffns, spec, field="EMoEConfig.layers", what="FFN", every=config.every, start=config.start)


def _check_fits(ffns: list[FFN], config: EMoEConfig) -> None:
    for f in ffns:
        if config.num_experts > f.d_ff:
            raise ConfigError(
                f"EMoEConfig.num_experts = {config.num_experts}: more experts than the {f.d_ff} neurons of {f.path!r}"
            )


def _split(ffn: FFN, config: EMoEConfig) -> torch.Tensor:
    if config.split == "random":
        return random_balanced_labels(ffn.d_ff, config.num_experts, seed=config.seed).to(ffn.keys.device)
    return balanced_kmeans(
        ffn.keys.detach(), config.num_experts, seed=config.seed, max_iter=config.max_iter, cache_dir=config.cache_dir
    )


class EMoEHandle(Handle):
    """A live EMoE conversion: routing telemetry, the balance loss, save/load, ``merge_()``."""

    layers: dict[str, ConvertedFFN]

    def routing_stats(self) -> dict[str, RoutingStats]:
        """Per converted FFN: expert load, normalised selection entropy and stability since the last call."""
        return {path: layer.stats() for path, layer in self.layers.items()}

    def balance_loss(self) -> torch.Tensor:
        """``balance_loss_weight`` × the sum over layers of the last forward's balance loss (add it to yours)."""
        losses = [layer.last_balance_loss for layer in self.layers.values() if layer.last_balance_loss is not None]
        cfg = self.config
        assert isinstance(cfg, EMoEConfig)
        if not losses:
            return torch.zeros(())
        return cfg.balance_loss_weight * torch.stack(losses).sum()

    def labels(self) -> dict[str, torch.Tensor]:
        """Expert id of every neuron, per converted FFN (``[d_ff]`` int64)."""
        return {p: layer.groups.labels.clone() for p, layer in self.layers.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{p}.labels": layer.groups.labels.detach().cpu() for p, layer in self.layers.items()}
        out |= {f"{p}.centroids": layer.frozen.detach().cpu() for p, layer in self.layers.items()}
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise IncompatibleArtifactError(
                f"EMoE state keys differ: missing {sorted(expected - set(state))[:6]}, "
                f"unexpected {sorted(set(state) - expected)[:6]}"
            )
        for p, layer in self.layers.items():
            if not torch.equal(state[f"{p}.labels"].to(layer.groups.labels), layer.groups.labels):
                raise IncompatibleArtifactError(f"{p}: saved labels differ from the ones this conversion planned")
            layer.frozen = state[f"{p}.centroids"].to(layer.frozen)

    def merge_(self) -> nn.Module:
        """Back to a stock dense model: hooks removed; no weight was ever permuted, so none is left."""
        self._check_live()
        self.remove()
        return self.model


class EMoE(Operator):
    """Emergent MoE (arXiv 2310.10908): route tokens to clusters of FFN neurons, no new parameters."""

    name = "emoe"
    config_class = EMoEConfig
    handle_class = EMoEHandle

    @classmethod
    def plan(cls, model: nn.Module, config: OperatorConfig) -> Plan:
        assert isinstance(config, EMoEConfig)
        ffns = _chosen_ffns(model, config)
        _check_fits(ffns, config)
        labels = {f.path: _split(f, config) for f in ffns}
        return Plan(targets=[f.path for f in ffns], selector=str(config.layers), data={"ffns": ffns, "labels": labels})

    @classmethod
    def plan_from_state(cls, model: nn.Module, config: OperatorConfig, state: Mapping[str, torch.Tensor]) -> Plan:
        assert isinstance(config, EMoEConfig)
        ffns = _chosen_ffns(model, config)
        _check_fits(ffns, config)
        labels: dict[str, torch.Tensor] = {}
        for f in ffns:
            saved = state.get(f"{f.path}.labels")
            if saved is None or tuple(saved.shape) != (f.d_ff,):
                raise IncompatibleArtifactError(
                    f"EMoE artefact has no labels of shape ({f.d_ff},) for {f.path!r} "
                    f"(got {None if saved is None else tuple(saved.shape)})"
                )
            labels[f.path] = saved.long().to(f.keys.device)
        return Plan(targets=[f.path for f in ffns], selector=str(config.layers), data={"ffns": ffns, "labels": labels})

    @classmethod
    def install(cls, handle: Handle, plan: Plan) -> None:
        assert isinstance(handle, EMoEHandle) and isinstance(handle.config, EMoEConfig)
        handle.layers = {}
        for f in plan.data["ffns"]:
            layer = ConvertedFFN(f, plan.data["labels"][f.path], handle.config)
            layer.install(handle.registry)
            handle.layers[f.path] = layer


def apply(model: nn.Module, config: EMoEConfig | Mapping[str, Any] | None = None, /, **overrides: Any) -> EMoEHandle:
    """Convert the chosen FFNs of ``model`` into emergent experts; see :class:`EMoEConfig`.

    Args:
        model: any model whose FFNs modulart finds.
        config: an :class:`EMoEConfig` (or dict); keyword overrides win.

    Returns:
        The handle: ``routing_stats()``, ``balance_loss()``, ``save()``, ``remove()``, ``merge_()``.
    """
    handle = EMoE.apply(model, config, **overrides)
    assert isinstance(handle, EMoEHandle)
    return handle
