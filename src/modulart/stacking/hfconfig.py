"""Rewriting a model config (``config.json`` dict or a Hugging Face config object) for a grown depth.

The depth keys are data here; the per-layer keys (lists remapped by the plan, ``new[i] =
old[plan[i]]``, index sets, layout rules) live in :mod:`modulart.stacking.layout`.

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
from modulart.stacking.layout import grow_layout, plain_layout
from modulart.stacking.plan import LayerPlan

__all__ = ["DEPTH_KEYS", "depth_key", "rewrite_config", "rewrite_config_dict"]

# keys that hold the depth of the main block list, in the order they are looked for
DEPTH_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
# block-list path suffix -> depth key, for models with several block lists
BLOCK_DEPTH_KEYS: dict[str, str] = {
    "decoder.block": "num_decoder_layers",
    "encoder.block": "num_layers",
    "decoder.layers": "decoder_layers",
    "encoder.layers": "encoder_layers",
}


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


def rewrite_config_dict(
    config: dict[str, Any],
    plan: LayerPlan,
    blocks: str | None = None,
    *,
    check: bool | None = True,
    for_reload: bool = False,
) -> dict[str, Any]:
    """A copy of ``config`` rewritten for the grown depth (the input is not changed).

    Every per-layer key is carried through the plan (see :mod:`modulart.stacking.layout`): lists
    (``layer_types``...), index sets (``moe_layers``...) and rules (``first_k_dense_replace``,
    ``decoder_sparse_step``, ``moe_layer_interval``, GPT-Neo ``attention_types``...). Per-layer
    lists that the transformers config class derives but the dict omits are written out first.
    With ``check`` (and transformers importable), the models built from the source and the
    rewritten config are compared block by block on the meta device
    (:func:`~modulart.stacking.skeleton.check_grown_config`); ``check=None`` does so only when the
    config states more than plain per-layer lists (:func:`~modulart.stacking.layout.plain_layout`),
    which saves importing transformers (about 150 MiB) for the plain ones. ``for_reload`` (a grown
    checkpoint): what would only warn for a model grown in memory — a reload that would differ from
    it (T5's relative attention bias copied off block 0, depth-dependent settings) — raises.

    Example:
        >>> cfg = {"num_hidden_layers": 2, "moe_layers": [1]}
        >>> rewrite_config_dict(cfg, LayerPlan.stack(2, 2))["moe_layers"]
        [1, 3]

    Raises:
        ConfigError: the config's depth differs from the plan's source depth, a per-layer list has
            the wrong length, a rule cannot express the grown layout (``first_k_dense_replace`` with
            a dense layer after a MoE one), or a grown layer would reload as a different block; the
            message names the key. Raised before anything is changed.
    """
    from modulart.stacking.skeleton import check_grown_config, materialize

    key = depth_key(config, blocks)
    plan.check_source(int(config[key]), f"config ({key})")
    if check is None:
        check = not plain_layout(config, plan.num_layers)
    src = materialize(copy.deepcopy(config)) if check else copy.deepcopy(config)
    out = copy.deepcopy(src)
    out.update(grow_layout(src, plan, plan.num_layers))
    out[key] = plan.grown_layers
    if check:
        check_grown_config(src, out, plan, blocks, for_reload=for_reload)
    return out


def rewrite_config(config: Any, plan: LayerPlan, blocks: str | None = None, *, check: bool | None = True) -> list[str]:
    """Rewrite a Hugging Face config object in place; returns the names of the changed keys.

    Example:
        >>> from transformers import Qwen2MoeConfig
        >>> cfg = Qwen2MoeConfig(num_hidden_layers=2, decoder_sparse_step=2, hidden_size=16, num_attention_heads=2,
        ...                      num_key_value_heads=2, intermediate_size=32, moe_intermediate_size=8)
        >>> rewrite_config(cfg, LayerPlan.interleave(2, 2), "model.layers")
        ['decoder_sparse_step', 'layer_types', 'mlp_only_layers', 'num_hidden_layers']
        >>> cfg.mlp_only_layers, cfg.decoder_sparse_step
        ([0, 1], 1)
    """
    before = config.to_dict()
    after = rewrite_config_dict(before, plan, blocks, check=check)
    changed = sorted(k for k in after if after[k] != before.get(k))
    for k in changed:
        setattr(config, k, after[k])
    return changed
