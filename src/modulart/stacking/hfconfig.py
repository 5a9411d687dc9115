"""Rewriting a model config (``config.json`` dict or a Hugging Face config object) for a grown depth.

Per-layer knowledge is data: the keys holding the depth, the per-layer arrays (remapped by the
plan: ``new[i] = old[plan[i]]``), the lists of layer indices (remapped to the grown positions
whose source was listed), and layout rules that cannot follow an arbitrary plan.

Example:
    >>> from modulart.stacking import LayerPlan
    >>> from modulart.stacking.hfconfig import rewrite_config_dict
    >>> cfg = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
    >>> new = rewrite_config_dict(cfg, LayerPlan.stack(2, 2))
    >>> new["num_hidden_layers"], new["layer_types"][2]
    (4, 'sliding_attention')
"""

from __future__ import annotations

import copy
from typing import Any

from modulart.core.errors import ConfigError
from modulart.stacking.plan import LayerPlan

__all__ = ["DEPTH_KEYS", "INDEX_LIST_KEYS", "PER_LAYER_KEYS", "depth_key", "rewrite_config", "rewrite_config_dict"]

# keys that hold the depth of the main block list, in the order they are looked for
DEPTH_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
# block-list path suffix -> depth key, for models with several block lists
BLOCK_DEPTH_KEYS: dict[str, str] = {
    "decoder.block": "num_decoder_layers",
    "encoder.block": "num_layers",
    "decoder.layers": "decoder_layers",
    "encoder.layers": "encoder_layers",
}
# per-layer arrays: new[i] = old[plan[i]]
PER_LAYER_KEYS: tuple[str, ...] = ("layer_types", "no_rope_layers", "mlp_layer_types", "attn_layer_types")
# lists of layer indices: new = grown positions whose source index was listed
INDEX_LIST_KEYS: tuple[str, ...] = ("mlp_only_layers", "swa_layers", "full_attn_idxs")


def depth_key(config: dict[str, Any], blocks: str | None = None) -> str:
    """The key of ``config`` that holds the depth of the block list at ``blocks``.

    Raises:
        ConfigError: no known depth key (the message lists the keys looked for).
    """
    if blocks is not None:
        for suffix, key in BLOCK_DEPTH_KEYS.items():
            if (blocks == suffix or blocks.endswith("." + suffix)) and isinstance(config.get(key), int):
                return key
    for key in DEPTH_KEYS:
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return key
    raise ConfigError(f"config has none of the depth keys {list(DEPTH_KEYS)}; cannot rewrite its depth")


def rewrite_config_dict(config: dict[str, Any], plan: LayerPlan, blocks: str | None = None) -> dict[str, Any]:
    """A copy of ``config`` rewritten for the grown depth (the input is not changed).

    Raises:
        ConfigError: the config's depth differs from the plan's source depth, a per-layer array has
            the wrong length, or the plan breaks a layout the config can only express as a rule
            (``first_k_dense_replace``).
    """
    out = copy.deepcopy(config)
    key = depth_key(out, blocks)
    plan.check_source(int(out[key]), f"config ({key})")
    n = plan.num_layers
    for k in PER_LAYER_KEYS:
        v = out.get(k)
        if isinstance(v, list):
            if len(v) != n:
                raise ConfigError(f"config[{k!r}] has {len(v)} entries; expected one per layer ({n})")
            out[k] = [copy.deepcopy(v[s]) for s in plan]
    for k in INDEX_LIST_KEYS:
        v = out.get(k)
        if isinstance(v, list) and all(isinstance(i, int) for i in v):
            listed = set(v)
            out[k] = [pos for pos, s in enumerate(plan) if s in listed]
    step = out.get("decoder_sparse_step")
    if isinstance(step, int) and step > 1:  # Qwen-MoE: MoE on layers with (i + 1) % step == 0 -> explicit list
        dense_src = {i for i in range(n) if (i + 1) % step != 0} | set(config.get("mlp_only_layers") or [])
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = [pos for pos, s in enumerate(plan) if s in dense_src]
    k_dense = out.get("first_k_dense_replace")
    if isinstance(k_dense, int) and k_dense > 0:
        dense = [s < k_dense for s in plan]
        m = sum(dense)
        if dense != [True] * m + [False] * (len(plan) - m):
            raise ConfigError(
                f"config first_k_dense_replace = {k_dense}: the first {k_dense} layers are dense, but plan "
                f"{plan.describe()} puts dense source layers after MoE ones, which this config cannot express"
            )
        out["first_k_dense_replace"] = m
    out[key] = plan.grown_layers
    return out


def rewrite_config(config: Any, plan: LayerPlan, blocks: str | None = None) -> list[str]:
    """Rewrite a Hugging Face config object in place; returns the names of the changed keys."""
    before = config.to_dict()
    after = rewrite_config_dict(before, plan, blocks)
    changed = sorted(k for k in after if after[k] != before.get(k))
    for k in changed:
        setattr(config, k, after[k])
    return changed
