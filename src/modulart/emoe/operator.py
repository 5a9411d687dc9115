"""The EMoE operator: convert dense FFNs into emergent experts.

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

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modulart.core.errors import ConfigError, IncompatibleArtifactError, NonFiniteError, UnsupportedModuleError
from modulart.core.ffn import FFN, find_ffns
from modulart.core.finite import all_finite
from modulart.core.naming import free_attribute_name
from modulart.core.operator import Operator, Plan
from modulart.core.select import select_views
from modulart.core.sharing import claim
from modulart.core.types import StateValue
from modulart.core.unwrap import unwrap_model
from modulart.emoe.cluster import balanced_kmeans, random_balanced_labels
from modulart.emoe.config import GATED_ROUTERS, EMoEConfig, default_layers
from modulart.emoe.handle import EMoEHandle
from modulart.emoe.ranks import (
    broadcast_from_first,
    rank_groups,
    refuse_leaf_shards,
    refuse_shards_inside,
    unsharded,
    whole,
)

__all__ = ["EMoE", "EMoEHandle", "EMoEPlan", "apply"]


@dataclass
class EMoEPlan(Plan):
    """The FFNs to convert and the neuron -> expert labels of each (``{path: [d_ff] int64}``)."""

    ffns: list[FFN] = field(default_factory=list)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)


def _chosen_ffns(model: nn.Module, config: EMoEConfig) -> list[FFN]:
    try:
        ffns = find_ffns(model)
    except UnsupportedModuleError as e:
        refuse_leaf_shards(model, e)  # FSDP2 units of single layers: say so, not "no FFN"
        raise
    spec = default_layers(len(ffns)) if config.layers == "default" else config.layers
    return select_views(ffns, spec, field="EMoEConfig.layers", what="FFN", every=config.every, start=config.start)


def _check_fits(ffns: list[FFN], config: EMoEConfig) -> None:
    for f in ffns:
        refuse_shards_inside(f.module, f.path)
        if config.num_experts > f.d_ff:
            raise ConfigError(
                f"EMoEConfig.num_experts = {config.num_experts}: more experts than the {f.d_ff} neurons of {f.path!r}"
            )
        if config.router in GATED_ROUTERS and not f.gated:
            raise ConfigError(
                f"EMoEConfig.router = {config.router!r}: scores the up projection of a gated FFN; {f.path!r} has none"
            )
        if config.per_expert_bias and f.value_bias is None:
            raise ConfigError(
                f"EMoEConfig.per_expert_bias = True: copies the FFN output bias per expert; {f.path!r} has no "
                "output bias"
            )
        if config.dropout > 0 and config.executor == "masked" and f.fused:
            raise ConfigError(
                f"EMoEConfig.dropout = {config.dropout}: {f.path!r} computes its gate and up projections in one "
                "layer, whose output the masked executor cannot drop out before the activation alone (use "
                "executor='sparse', or dropout=0)"
            )


def _split(ffn: FFN, config: EMoEConfig) -> torch.Tensor:
    if config.split == "random":
        return random_balanced_labels(ffn.d_ff, config.num_experts, seed=config.seed).to(ffn.keys.device)
    return balanced_kmeans(
        whole(ffn.keys.detach()),
        config.num_experts,
        seed=config.seed,
        max_iter=config.max_iter,
        cache_dir=config.cache_dir,
    )


def _progress(ffns: list[FFN], desc: str) -> Iterable[FFN]:
    """``ffns``, with a tqdm bar on a terminal when there are several (clustering is the slow part)."""
    if len(ffns) < 2 or not sys.stderr.isatty():
        return ffns
    from tqdm.auto import tqdm

    bar: Iterable[FFN] = tqdm(ffns, desc=desc, unit="FFN", leave=False)
    return bar


class EMoE(Operator[EMoEConfig, EMoEPlan, EMoEHandle]):
    """Emergent MoE (arXiv 2310.10908): route tokens to clusters of FFN neurons, no new parameters."""

    name = "emoe"

    @classmethod
    def plan(cls, model: nn.Module, config: EMoEConfig) -> EMoEPlan:
        ffns = _chosen_ffns(model, config)
        _check_fits(ffns, config)
        for f in ffns:
            if not f.keys.is_meta and not all_finite(whole(f.keys.detach())):
                raise NonFiniteError(
                    f"EMoE: the keys of FFN {f.path!r} hold NaN or inf values; neither the clustering nor the "
                    "router can use them (repair or reload the weights before apply)"
                )
        labels = {f.path: _split(f, config) for f in _progress(ffns, "EMoE: clustering")}
        return EMoEPlan(targets=[f.path for f in ffns], selector=str(config.layers), ffns=ffns, labels=labels)

    @classmethod
    def _apply(cls, model: nn.Module, cfg: EMoEConfig, state: Mapping[str, StateValue] | None) -> EMoEHandle:
        """Apply; on a distributed model, every rank then takes the first rank's split.

        The split is deterministic for a seed on one device, but the clustering's float arithmetic
        is not guaranteed bitwise equal across machines, and a model whose weights differed across
        ranks when it was converted would route differently on every rank. An FSDP2-sharded model
        is unsharded for the duration of the apply (every rank must apply). When ``model`` is
        distributed (a ``DistributedDataParallel`` wrapper, or FSDP2 ``DTensor`` parameters) the
        labels and centroids of the first rank are broadcast (a state loaded from a file is the same
        everywhere already). A model that is local to its rank runs no collective.
        """
        groups = rank_groups(model) if state is None else []
        with unsharded(unwrap_model(model)):  # FSDP2 shard -> apply: views are verified on whole blocks
            handle = super()._apply(model, cfg, state)
        if groups:
            try:
                paths = list(handle.layers)
                mine = [t for p in paths for t in (handle.layers[p].groups.labels, handle.layers[p].frozen)]
                agreed = broadcast_from_first(mine, groups)
                for i, p in enumerate(paths):
                    handle.layers[p].set_split(agreed[2 * i], agreed[2 * i + 1])
                    handle.layers[p].ranks_agree = True
            except BaseException:
                handle.remove()
                raise
        return handle

    @classmethod
    def plan_from_state(cls, model: nn.Module, config: EMoEConfig, state: Mapping[str, StateValue]) -> EMoEPlan:
        ffns = _chosen_ffns(model, config)
        _check_fits(ffns, config)
        labels: dict[str, torch.Tensor] = {}
        for f in ffns:
            saved = state.get(f"{f.path}.labels")
            if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != (f.d_ff,):
                got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else saved
                raise IncompatibleArtifactError(
                    f"EMoE artefact has no labels of shape ({f.d_ff},) for {f.path!r} (got {got})"
                )
            labels[f.path] = saved.long().to(f.keys.device)
        return EMoEPlan(targets=[f.path for f in ffns], selector=str(config.layers), ffns=ffns, labels=labels)

    @classmethod
    def install(cls, handle: EMoEHandle, plan: EMoEPlan) -> None:
        """Install every layer's executor hooks; a sparse layer first claims its FFN for itself.

        The sparse executor hands the FFN's modules an empty token dimension, so another
        operator's hook inside the FFN (or on it) would see ``[..., 0, d]``: the claim refuses such
        hooks, now and later, with a :class:`~modulart.core.errors.CompositionError`, until
        ``remove()``.
        """
        for path, layer in handle.layers.items():
            if handle.config.executor == "sparse":
                claim(
                    handle.registry,
                    layer.ffn.module,
                    f"EMoE's sparse executor on {path!r} computes the FFN itself and hands its modules an empty "
                    "token dimension (executor='masked' composes with other operators)",
                )
            layer.install(handle.registry)
        for layer in handle.layers.values():  # per_expert_bias: the copies join the model, b_out is frozen
            if layer.bias is None:
                continue
            module = layer.ffn.value_proj.module  # a leaf layer: no container iterates it (nn.Sequential would)
            name = free_attribute_name(module, "emoe_expert_bias")
            module.add_module(name, layer.bias)
            handle.holders.append((module, name, layer.bias))
            b = layer.ffn.value_bias
            if b is not None and b.requires_grad:
                handle.set_requires_grad([b], False)


def apply(model: nn.Module, config: EMoEConfig | Mapping[str, Any] | None = None, /, **overrides: Any) -> EMoEHandle:
    """Convert the chosen FFNs of ``model`` into emergent experts; see :class:`EMoEConfig`.

    Args:
        model: any model whose FFNs modulart finds.
        config: an :class:`EMoEConfig` (or dict); keyword overrides win.

    Returns:
        The handle: ``routing_stats()``, ``balance_loss()``, ``save()``, ``remove()``, ``to_dense()``
        (``merge_()`` only with ``top_k == num_experts``).
    """
    return EMoE.apply(model, config, **overrides)
