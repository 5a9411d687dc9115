"""Checking a rewritten config against the model it describes, through transformers' own classes.

A grown config is right when the model transformers builds from it has, at every grown position
``i``, the block that the source config builds at ``plan[i]``: the same submodule classes, tensor
names and shapes, and the same per-layer settings (``sliding_window``, ``use_rope``,
``is_moe_layer``...), except the position itself (``layer_idx``). Both models are built on the meta
device (no memory, no weights), so this costs milliseconds. Without transformers, or for a config
it cannot build, the check is skipped and the layout rules of :mod:`modulart.stacking.layout` alone
decide.

Example:
    >>> from transformers import LlamaConfig
    >>> from modulart.stacking import LayerPlan
    >>> from modulart.stacking.skeleton import check_grown_config
    >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                   vocab_size=32).to_dict()
    >>> grown = dict(cfg, num_hidden_layers=4, layer_types=["full_attention"] * 4)
    >>> check_grown_config(cfg, grown, LayerPlan.stack(2, 2), "model.layers")
    True
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modulart.core.arch import get_attr
from modulart.core.errors import ConfigError, UnsupportedModuleError
from modulart.stacking.blocks import block_info, block_info_by_name, find_block_list
from modulart.stacking.layout import LAYER_KEYS, GrowthConfigWarning, IndexSetKey, ListKey, per_layer_keys
from modulart.stacking.plan import LayerPlan

__all__ = ["Skeleton", "build_skeleton", "check_grown_config", "layer_signatures", "materialize"]

log = logging.getLogger(__name__)
Signature = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, str], ...]]
_SCALARS = (bool, int, float, str, type(None))
_LIST_KEYS = tuple(k for lk in LAYER_KEYS if isinstance(lk, (ListKey, IndexSetKey)) for k in lk.keys)


def _config_object(cfg: dict[str, Any]) -> Any:
    """The transformers config object of ``cfg``; raises whatever transformers raises."""
    from transformers import AutoConfig

    body = {k: v for k, v in cfg.items() if k != "model_type"}
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(str(cfg["model_type"]), **body)


@contextlib.contextmanager
def _quiet() -> Any:
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _buildable(cfg: dict[str, Any]) -> bool:
    if not isinstance(cfg.get("model_type"), str):
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def materialize(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` plus the per-layer lists its transformers config class derives but the dict omits.

    Old ``config.json`` files say ``max_window_layers`` or ``sliding_window_pattern`` and let the
    class compute ``layer_types``; growth needs the list itself. Returns ``cfg`` unchanged when
    transformers cannot read it.

    Example:
        >>> from transformers import Qwen2Config
        >>> d = Qwen2Config(num_hidden_layers=2).to_dict(); del d["layer_types"]
        >>> materialize(d)["layer_types"]
        ['full_attention', 'full_attention']
    """
    if not _buildable(cfg):
        return cfg
    try:
        full = _config_object(cfg).to_dict()
    except Exception as e:  # transformers' own validation: the rules alone decide
        log.debug("transformers cannot read the config (%s); not materializing per-layer lists", e)
        return cfg
    added = {k: full[k] for k in _LIST_KEYS if cfg.get(k) is None and full.get(k) is not None}
    return {**cfg, **added} if added else cfg


def _signature(block: nn.Module) -> Signature:
    index = set(block_info(block).index_attrs) | {"training"}
    classes = tuple((p, type(m).__qualname__) for p, m in block.named_modules())
    tensors = tuple(sorted((k, tuple(v.shape)) for k, v in block.state_dict(keep_vars=True).items()))
    attrs = tuple(
        sorted(
            (f"{p}.{k}" if p else k, repr(v))
            for p, m in block.named_modules()
            for k, v in vars(m).items()
            if not k.startswith("_") and k not in index and isinstance(v, _SCALARS)
        )
    )
    return classes, tensors, attrs


@dataclass(frozen=True)
class Skeleton:
    """What transformers builds from a config: per-layer signatures and the shapes of every tensor
    outside the block list (embeddings, norms, heads)."""

    layers: list[Signature]
    outside: dict[str, tuple[int, ...]]


def build_skeleton(cfg: dict[str, Any], blocks: str | None) -> Skeleton | None:
    """Build ``cfg``'s model on the meta device and describe it (None when transformers cannot).

    Raises:
        ConfigError: transformers refuses the config (its message is included).
    """
    if not _buildable(cfg):
        return None
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        obj = _config_object(cfg)
    except Exception as e:
        raise ConfigError(f"transformers cannot read the config: {e}") from None
    model: nn.Module | None = None
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"), warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                model = auto.from_config(obj)
            break
        except Exception as e:  # not a class of this auto mapping, or an unbuildable model
            log.debug("%s cannot build %s: %s", auto.__name__, cfg["model_type"], e)
    if model is None:
        return None
    try:
        path, layers = find_block_list(model) if blocks is None else (blocks, get_attr(model, blocks))
    except (AttributeError, UnsupportedModuleError):
        return None
    if not isinstance(layers, nn.ModuleList):
        return None
    outside = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(path + ".")}
    return Skeleton([_signature(b) for b in layers], outside)


def layer_signatures(cfg: dict[str, Any], blocks: str | None) -> list[Signature] | None:
    """Per-layer structure of the model transformers builds from ``cfg`` (None when it cannot).

    Raises:
        ConfigError: transformers refuses the config (its message is included).
    """
    sk = build_skeleton(cfg, blocks)
    return None if sk is None else sk.layers


def _outside_changes(before: Skeleton, after: Skeleton, plan: LayerPlan) -> None:
    changed = sorted(k for k in before.outside if after.outside.get(k, before.outside[k]) != before.outside[k])
    added = sorted(set(after.outside) - set(before.outside))
    if changed or added:
        k = (changed or added)[0]
        raise ConfigError(
            f"tensor {k} outside the block list changes with the depth ({before.outside.get(k)} in the source, "
            f"{after.outside[k]} for plan {plan.describe()}): growth copies blocks only, so this model's depth "
            "cannot be grown"
        )


def _difference(a: Signature, b: Signature) -> str:
    parts: list[str] = []
    for what, x, y in (("modules", a[0], b[0]), ("tensors", a[1], b[1]), ("settings", a[2], b[2])):
        only_a, only_b = sorted(set(x) - set(y)), sorted(set(y) - set(x))
        if only_a or only_b:
            parts.append(f"{what} of the source layer {only_a[:4]} vs the grown one {only_b[:4]}")
    return "; ".join(parts)


def _depth_setting(before: list[Signature], after: list[Signature], plan: LayerPlan, bad: list[Any]) -> bool:
    """Every layer differs, and only in settings: a function of the depth, not of the layer
    (``scaling_factor = sqrt(num_hidden_layers / 36)``)."""
    return len(bad) == plan.grown_layers and all(after[i][:2] == before[s][:2] for i, s in enumerate(plan))


def _first_block_special(src: dict[str, Any], before: list[Signature], bad: list[tuple[int, int]]) -> bool:
    """The model class, not the config, makes block 0 differ (T5's relative attention bias): only
    copies of block 0 differ, and the config has no key that looks per-layer."""
    n = len(before)
    return (
        all(s == 0 for _, s in bad) and all(before[j] != before[0] for j in range(1, n)) and not per_layer_keys(src, n)
    )


def _placed_first_copy(before: list[Signature], after: list[Signature], i: int, s: int) -> bool:
    """A copy of block 0 at a later position of a stack whose class builds some parts into block 0
    only: growth drops them (:func:`~modulart.stacking.blocks.place_first_block_copy`), so the copy
    must equal what the class builds at any later position."""
    if s != 0 or i == 0:
        return False
    cls = dict(before[0][0]).get("")
    info = block_info_by_name(cls.rsplit(".", 1)[-1]) if cls is not None else None
    if info is None or not info.first_block_only:
        return False
    classes, tensors, attrs = before[0]

    def first_only(path: str) -> bool:
        return any(path == f or path.startswith(f + ".") for f in info.first_block_only)

    flags = set(info.first_block_flags)
    placed = (
        tuple(c for c in classes if not first_only(c[0])),
        tuple(t for t in tensors if not first_only(t[0])),
        tuple(sorted((k, repr(False) if k in flags else v) for k, v in attrs if not first_only(k))),
    )
    return after[i] == placed


def check_grown_config(
    src: dict[str, Any], grown: dict[str, Any], plan: LayerPlan, blocks: str | None, *, for_reload: bool = False
) -> bool:
    """Check that ``grown`` builds, at every position ``i``, the block ``src`` builds at ``plan[i]``.

    Returns True when checked, False when transformers cannot build the models (nothing checked).
    A difference only in what the model class builds into block 0 whatever the config (T5's
    relative attention bias) is a :class:`~modulart.stacking.layout.GrowthConfigWarning` for a model
    grown in memory, and a :class:`ConfigError` with ``for_reload`` (a grown checkpoint would then
    reload as another model).

    Raises:
        ConfigError: a grown layer differs from its source layer (names the layer, what differs, and
            the per-layer keys the config holds), a tensor outside the blocks changes shape with the
            depth (Gemma 3n's per-layer input embeddings), or transformers refuses the grown config.
    """
    try:
        src_sk = build_skeleton(src, blocks)
    except ConfigError:  # transformers cannot read the source config either: nothing to compare with
        return False
    if src_sk is None:
        return False
    try:
        grown_sk = build_skeleton(grown, blocks)
    except ConfigError as e:
        raise ConfigError(f"the config rewritten for plan {plan.describe()} does not load: {e}") from None
    if grown_sk is None:
        return False
    _outside_changes(src_sk, grown_sk, plan)
    before, after = src_sk.layers, grown_sk.layers
    if len(after) != plan.grown_layers:
        raise ConfigError(f"the rewritten config builds {len(after)} layers; plan {plan.describe()} needs them all")
    bad = [(i, s) for i, s in enumerate(plan) if after[i] != before[s] and not _placed_first_copy(before, after, i, s)]
    if not bad:
        return True
    i, s = bad[0]
    what = _difference(before[s], after[i])
    known = _depth_setting(before, after, plan, bad) or _first_block_special(src, before, bad)
    if known and for_reload:
        raise ConfigError(
            f"the grown checkpoint would not reload as the grown model: grown layer {i} (a copy of layer {s}) "
            f"would reload as a different block ({what}), and no config key can say otherwise; grow the model in "
            "memory with modulart.stacking.grow instead (it warns about this) and save it yourself"
        )
    if _depth_setting(before, after, plan, bad):
        warnings.warn(
            f"every grown layer differs from its source in a setting that depends on the model's depth ({what}); "
            "the reloaded model computes with the grown depth, the model grown in memory with the source's",
            GrowthConfigWarning,
            stacklevel=3,
        )
        return True
    if _first_block_special(src, before, bad):
        warnings.warn(
            f"grown layer {i} (a copy of layer 0) would reload without what the model class gives only its first "
            f"block ({what}); no config key decides this, and a reload drops those tensors",
            GrowthConfigWarning,
            stacklevel=3,
        )
        return True
    keys = sorted(k for k in grown if isinstance(grown.get(k), (list, int)) and "layer" in k)
    raise ConfigError(
        f"grown layer {i} (a copy of layer {s}) would reload as a different block: {what}; the config decides "
        f"this by a key modulart does not rewrite (its per-layer keys: {keys})"
    )


def kinds(signatures: list[Signature]) -> list[Hashable]:
    """The signatures as hashable per-layer kinds (equal kind = equal structure)."""
    return [(s[0], s[1]) for s in signatures]
