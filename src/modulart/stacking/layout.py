"""The per-layer layout a model config encodes, and how to re-express it for a grown depth.

Configs say per layer whether a block is dense or MoE, sliding or global, with or without RoPE...
in three ways: per-layer lists (``layer_types``), sets of layer indices (``moe_layers``) and rules
(``first_k_dense_replace``, ``decoder_sparse_step``, ``moe_layer_interval``...). The table
:data:`LAYER_KEYS` says which keys use which encoding (:mod:`modulart.stacking.layerkeys`); each
turns its keys into one value per layer and back, so growth carries every one through the plan:
grown layer ``i`` gets the values of source layer ``plan[i]``. A rule that cannot express the grown layout is a
:class:`~modulart.core.errors.ConfigError` naming the key, unless the config also holds an
explicit per-layer list that overrides it.

Example:
    >>> from modulart.stacking import LayerPlan
    >>> from modulart.stacking.layout import grow_layout
    >>> cfg = {"num_hidden_layers": 3, "first_k_dense_replace": 1}
    >>> grow_layout(cfg, LayerPlan.interleave(3, 2), 3)
    {'first_k_dense_replace': 2}
    >>> grow_layout(cfg, LayerPlan.stack(3, 2), 3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: config first_k_dense_replace = 1 (...) cannot express the grown layout: ...
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Hashable
from typing import Any

from modulart.core.errors import ConfigError
from modulart.stacking.layerkeys import (
    GrowthConfigWarning,
    IndexSetKey,
    IntervalRangeRule,
    LayerKey,
    ListKey,
    ModRule,
    PatternListRule,
    PeriodRule,
    PrefixRule,
    SparseStepRule,
    int_list,
    is_int,
)
from modulart.stacking.plan import LayerPlan

__all__ = [
    "LAYER_KEYS",
    "GrowthConfigWarning",
    "IndexSetKey",
    "LayerKey",
    "ListKey",
    "expand_layout",
    "grow_layout",
    "layer_kinds",
    "per_layer_keys",
    "plain_layout",
]


# Rules first: they claim keys that would otherwise be read as plain lists / index sets.
LAYER_KEYS: tuple[LayerKey, ...] = (
    SparseStepRule(),
    IntervalRangeRule(),
    PatternListRule(),
    PrefixRule("first_k_dense_replace"),
    PrefixRule("num_dense_layers"),
    PrefixRule("num_kv_shared_layers", "shared", "own", overridden_by=(), suffix=True),
    ModRule("interleave_moe_layer_step", True, False, overridden_by=("moe_layers",)),
    ModRule("no_rope_layer_interval", 0, 1, overridden_by=("no_rope_layers",)),
    ModRule("sliding_window_pattern", "full_attention", "sliding_attention", overridden_by=("layer_types",)),
    ModRule("_sliding_window_pattern", "full_attention", "sliding_attention", overridden_by=("layer_types",)),
    PeriodRule("attn_layer_period", "attn_layer_offset", "attention", "mamba", overridden_by=("layers_block_type",)),
    PeriodRule("expert_layer_period", "expert_layer_offset", "sparse", "dense"),
    *(
        ListKey(k)
        for k in (
            "layer_types",
            "mlp_layer_types",
            "attn_layer_types",
            "no_rope_layers",
            "layers_block_type",
            "block_types",
            "indexer_types",
            "kv_sharing_modes",
            "per_layer_config",
            "num_attention_heads_per_layer",
            "num_key_value_heads_per_layer",
            "layers_num_experts",
            "swiglu_limits",
            "swiglu_limits_shared",
            "activation_sparsity_pattern",
            "sliding_windows",
            "attention_window",
            "intermediate_size",
            "num_key_value_heads",
            "num_attention_heads",
            "num_experts",
            "moe_topk",
            "moe_intermediate_size",
        )
    ),
    *(
        IndexSetKey(k)
        for k in (
            "moe_layers",
            "mlp_only_layers",
            "swa_layers",
            "full_attn_idxs",
            "cross_attention_layers",
            "rope_scaling_layers",
        )
    ),
)
# keys that only seed a per-layer list the config class computes (the list then decides)
DERIVED_KEYS: dict[str, str] = {
    "max_window_layers": "layer_types",
    "global_attn_every_n_layers": "layer_types",
    "prefix_dense_sliding_window_pattern": "layer_types",
}
# per-layer keys that tie layers to state outside the blocks: growth cannot copy them
UNGROWABLE_KEYS: dict[str, str] = {
    "ple_layer_ids": "it ties layers to rows of a per-layer embedding table outside the blocks",
    "loop_layer_index_start": "it marks a looped span whose passes the plan would break",
    "hidden_size_per_layer_input": "the per-layer input embeddings outside the blocks are sized by the depth",
}
_NAME_LISTS = re.compile(r"layer")
_NAME_INDEX_SET = re.compile(r"(_layers|_idxs|_indices|_indexes|_layer_ids)$")
_NAME_RULE = re.compile(r"(interval|period|_step$|every_n|replace|pattern|layer_offset|layer_start|layer_end|freq)")
_NAME_PERIOD = re.compile(r"(interval|period|_step$|every_n|freq)")  # value 1: every layer, whatever the plan
_NOT_PER_LAYER = frozenset(
    {
        "num_nextn_predict_layers",
        "num_mtp_layers",
        "vision_feature_layer",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "delay_pattern",
        "time_step_limit",
    }
)


def _present(cfg: dict[str, Any]) -> list[LayerKey]:
    claimed: set[str] = set()
    out: list[LayerKey] = []
    for lk in LAYER_KEYS:
        if not claimed.intersection(lk.keys) and lk.present(cfg):
            out.append(lk)
            claimed.update(lk.keys)
    return out


def expand_layout(cfg: dict[str, Any], n: int) -> dict[tuple[str, ...], list[Hashable]]:
    """Every known per-layer encoding in ``cfg`` -> its value per layer (``n`` = the config's depth).

    Example:
        >>> expand_layout({"decoder_sparse_step": 2, "mlp_only_layers": []}, 4)
        {('decoder_sparse_step', 'mlp_only_layers'): ['dense', 'sparse', 'dense', 'sparse']}
    """
    return {lk.keys: lk.expand(cfg, n) for lk in _present(cfg)}


def layer_kinds(cfg: dict[str, Any], n: int) -> list[Hashable]:
    """One hashable per layer: layers with equal kinds have the same structure according to ``cfg``."""
    layout = expand_layout(cfg, n)
    return [tuple(v[i] for v in layout.values()) for i in range(n)]


def _cannot(lk: LayerKey, cfg: dict[str, Any], plan: LayerPlan, values: list[Hashable]) -> ConfigError:
    alt = f" ({', '.join(lk.overridden_by)})" if lk.overridden_by else ""
    return ConfigError(
        f"config {lk.shown(cfg)} ({lk.meaning}) cannot express the grown layout: plan {plan.describe()} gives "
        f"layers {values} and the config has no per-layer list{alt} to carry it instead"
    )


def grow_layout(cfg: dict[str, Any], plan: LayerPlan, n: int) -> dict[str, Any]:
    """Key updates carrying every per-layer key of ``cfg`` (depth ``n``) through ``plan``.

    Unknown keys that look per-layer are carried when their shape says how (a list of one entry per
    layer whose name mentions layers, a list of layer indices named like one) and reported with a
    :class:`GrowthConfigWarning`; rule-like ones are reported and left unchanged.

    Raises:
        ConfigError: a rule cannot express the grown layout and no explicit list overrides it, a
            per-layer list has the wrong length, or a key cannot be grown at all (names the key).
    """
    updates: dict[str, Any] = {}
    for key, why in UNGROWABLE_KEYS.items():
        if cfg.get(key):  # None, 0, [] switch the feature off
            raise ConfigError(f"config {key} = {cfg[key]!r}: cannot grow this model's depth because {why}")
    present = _present(cfg)
    planned: dict[LayerKey, list[Hashable]] = {}
    for lk in present:
        if any(cfg.get(k) is not None for k in lk.overridden_by):
            continue  # only the seed of an explicit list, which decides and is carried: left as it is
        values = lk.expand(cfg, n)
        grown = [values[s] for s in plan]
        upd = lk.express(cfg, grown)
        if upd is None:
            raise _cannot(lk, cfg, plan, grown)
        planned[lk] = grown
        updates.update(upd)
    new = {**cfg, **updates}
    for lk, grown in planned.items():  # every encoding must read back as planned
        if lk.expand(new, plan.grown_layers) != grown:
            raise ConfigError(f"config {lk.shown(new)}: rewritten for plan {plan.describe()} it no longer says {grown}")
    for key, target in DERIVED_KEYS.items():
        if is_int(cfg.get(key)) and cfg.get(target) is None:
            raise ConfigError(
                f"config {key} = {cfg[key]!r} decides the per-layer {target} that the config does not list; "
                f"add {target} (load and save the config with transformers) before growing"
            )
    claimed = {k for lk in present for k in lk.keys} | set(DERIVED_KEYS)
    updates.update(_unknown_keys(cfg, plan, n, claimed))
    return updates


def _unknown(cfg: dict[str, Any], plan: LayerPlan | None, n: int, claimed: set[str]) -> list[tuple[str, str, Any]]:
    """Unknown keys that look per-layer: ``(key, how they are handled, new value or None)``."""
    found: list[tuple[str, str, Any]] = []
    known = claimed | {k for lk in LAYER_KEYS for k in lk.keys} | set(DERIVED_KEYS) | _NOT_PER_LAYER
    order = list(plan) if plan is not None else list(range(n))
    for key, v in cfg.items():
        if key in known or key.startswith(("num_", "mtp_")) or "token" in key:
            continue
        if isinstance(v, list) and len(v) == n and _NAME_LISTS.search(key) and not _NAME_INDEX_SET.search(key):
            found.append((key, "carried as one entry per layer", [copy.deepcopy(v[s]) for s in order]))
        elif int_list(v) and _NAME_INDEX_SET.search(key) and all(0 <= i < n for i in v) and len(set(v)) == len(v):
            listed = set(v)
            found.append((key, "carried as a list of layer indices", [p for p, s in enumerate(order) if s in listed]))
        elif is_int(v) and _NAME_RULE.search(key) and not (v == 1 and _NAME_PERIOD.search(key)):
            found.append((key, "left unchanged: if it decides which layers differ, the grown config is wrong", None))
    return found


def _unknown_keys(cfg: dict[str, Any], plan: LayerPlan, n: int, claimed: set[str]) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    for key, how, new in _unknown(cfg, plan, n, claimed):
        warnings.warn(
            f"config key {key} = {cfg[key]!r} looks per-layer but modulart does not know its meaning; {how}",
            GrowthConfigWarning,
            stacklevel=4,
        )
        if new is not None:
            updates[key] = new
    return updates


def per_layer_keys(cfg: dict[str, Any], n: int) -> list[str]:
    """The keys of ``cfg`` that (may) say something per layer: known encodings and unknown keys that
    look per-layer.

    Example:
        >>> per_layer_keys({"first_k_dense_replace": 1, "hidden_size": 8, "dense_every_n": 2}, 4)
        ['dense_every_n', 'first_k_dense_replace']
    """
    present = _present(cfg)
    claimed = {k for lk in present for k in lk.keys}
    return sorted({k for k in claimed if k in cfg} | {k for k, _, _ in _unknown(cfg, None, n, claimed)})


def plain_layout(cfg: dict[str, Any], n: int) -> bool:
    """Whether every per-layer fact ``cfg`` states is a plain per-layer list (no rule, no index set, no
    unknown per-layer-looking key, no sliding window without ``layer_types``): growth then needs no
    check against the model class.

    Example:
        >>> plain_layout({"layer_types": ["full_attention"] * 2}, 2), plain_layout({"moe_layers": [1]}, 2)
        (True, False)
    """
    present = _present(cfg)
    if any(not isinstance(lk, ListKey) for lk in present) or any(cfg.get(k) is not None for k in DERIVED_KEYS):
        return False
    windowed = any(cfg.get(k) is not None for k in ("sliding_window", "attention_chunk_size"))
    if windowed and cfg.get("layer_types") is None:
        return False
    return not _unknown(cfg, None, n, {k for lk in present for k in lk.keys})
