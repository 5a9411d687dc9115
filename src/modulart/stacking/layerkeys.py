"""The ways a model config encodes a per-layer property, each able to expand and re-express it.

A :class:`LayerKey` turns its config keys into one value per layer (:meth:`LayerKey.expand`) and
back (:meth:`LayerKey.express`): per-layer lists (:class:`ListKey`), index sets
(:class:`IndexSetKey`) and rules over the layer index (:class:`PrefixRule`, :class:`ModRule`,
:class:`PeriodRule`, :class:`IntervalRangeRule`, :class:`SparseStepRule`,
:class:`PatternListRule`). Which config keys use which encoding is the table in
:mod:`modulart.stacking.layout`.

Example:
    >>> from modulart.stacking.layerkeys import IntervalRangeRule
    >>> rule = IntervalRangeRule()
    >>> cfg = {"moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1}
    >>> rule.expand(cfg, 3)
    ['dense', 'sparse', 'sparse']
    >>> rule.express(cfg, ["dense", "dense", "sparse", "sparse"])
    {'moe_layer_interval': 1, 'moe_layer_start_index': 2, 'moe_layer_end_index': 3}
    >>> rule.express(cfg, ["sparse", "dense", "sparse", "sparse"]) is None
    True
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from modulart.core.errors import ConfigError

__all__ = [
    "GrowthConfigWarning",
    "IndexSetKey",
    "IntervalRangeRule",
    "LayerKey",
    "ListKey",
    "ModRule",
    "PatternListRule",
    "PeriodRule",
    "PrefixRule",
    "SparseStepRule",
    "compress_pattern",
]


class GrowthConfigWarning(UserWarning):
    """A config key looks per-layer but modulart does not know its meaning (the message names it)."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_list(v: Any) -> bool:
    return isinstance(v, list) and all(is_int(i) for i in v)


class LayerKey(abc.ABC):
    """One way a config encodes a per-layer property.

    ``keys`` are the config keys read and written, ``meaning`` says what they mean in the user's
    terms (for error messages), ``overridden_by`` names per-layer list keys that, when present, take
    precedence: the key is then only the default that produced the list, and is left alone when it
    cannot follow the plan.
    """

    overridden_by: tuple[str, ...] = ()

    @property
    @abc.abstractmethod
    def keys(self) -> tuple[str, ...]:
        """The config keys this encoding reads and writes (the first one marks its presence)."""

    @property
    @abc.abstractmethod
    def meaning(self) -> str:
        """What the keys say, for error messages."""

    def present(self, cfg: dict[str, Any]) -> bool:
        """Whether ``cfg`` uses this encoding."""
        return cfg.get(self.keys[0]) is not None

    @abc.abstractmethod
    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        """One value per layer, for a config of depth ``n``."""

    @abc.abstractmethod
    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any] | None:
        """Key updates that make ``cfg`` say ``values`` (one per grown layer); None when impossible."""

    def shown(self, cfg: dict[str, Any]) -> str:
        return ", ".join(f"{k} = {cfg.get(k)!r}" for k in self.keys if k in cfg)


@dataclass(frozen=True)
class ListKey(LayerKey):
    """A list with one entry per layer (``layer_types``; ``intermediate_size`` when it is a list)."""

    key: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def meaning(self) -> str:
        return "one entry per layer"

    def present(self, cfg: dict[str, Any]) -> bool:
        return isinstance(cfg.get(self.key), list)

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        v = cfg[self.key]
        if len(v) != n:
            raise ConfigError(f"config[{self.key!r}] has {len(v)} entries; expected one per layer ({n})")
        return [_Frozen(x) for x in v]

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any]:
        return {self.key: [copy.deepcopy(v.value) if isinstance(v, _Frozen) else v for v in values]}


@dataclass(frozen=True)
class _Frozen:
    """A hashable wrapper of a JSON value (lists and dicts as per-layer entries)."""

    value: Any

    def __hash__(self) -> int:
        return hash(repr(self.value))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and self.value == other.value

    def __repr__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True)
class IndexSetKey(LayerKey):
    """A list of the indices of the layers that have a property (``moe_layers``, ``mlp_only_layers``)."""

    key: str
    base: int = 0  # 1 when the config counts layers from one

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def meaning(self) -> str:
        return "the indices of the layers that have the property"

    def present(self, cfg: dict[str, Any]) -> bool:
        return int_list(cfg.get(self.key))

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        listed = set(cfg[self.key])
        bad = sorted(i for i in listed if not self.base <= i < n + self.base)
        if bad:
            raise ConfigError(f"config[{self.key!r}] lists layers {bad}, outside the {n}-layer model")
        return [i + self.base in listed for i in range(n)]

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any]:
        return {self.key: [i + self.base for i, v in enumerate(values) if v]}


class _Rule(LayerKey):
    """A rule over the layer index, given by its keys' values."""

    def present(self, cfg: dict[str, Any]) -> bool:
        return is_int(cfg.get(self.keys[0]))


@dataclass(frozen=True)
class PrefixRule(_Rule):
    """``key = k``: layers ``< k`` have ``first``, the rest ``rest`` (``first_k_dense_replace``)."""

    key: str
    first: str = "dense"
    rest: str = "sparse"
    overridden_by: tuple[str, ...] = ("mlp_layer_types",)
    suffix: bool = False  # the property sits on the last k layers instead

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def meaning(self) -> str:
        side = "last" if self.suffix else "first"
        return f"the {side} k layers are {self.first}, the rest {self.rest}"

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        k = int(cfg[self.key])
        return [self.first if (i >= n - k if self.suffix else i < k) else self.rest for i in range(n)]

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any] | None:
        k = sum(v == self.first for v in values)
        n = len(values)
        return {self.key: k} if self.expand({self.key: k}, n) == values else None


@dataclass(frozen=True)
class ModRule(_Rule):
    """``on`` where ``(i + 1) % key == 0`` (``interleave_moe_layer_step``), ``off`` elsewhere."""

    key: str
    on: Hashable
    off: Hashable
    overridden_by: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def meaning(self) -> str:
        return f"every key-th layer is {self.on!r}, the others {self.off!r}"

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        step = max(int(cfg[self.key]), 1)
        return [self.on if (i + 1) % step == 0 else self.off for i in range(n)]

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any] | None:
        for step in range(1, len(values) + 2):
            if self.expand({self.key: step}, len(values)) == values:
                return {self.key: step}
        return None


@dataclass(frozen=True)
class PeriodRule(_Rule):
    """``on`` where ``i % period == offset`` (Jamba's ``attn_layer_period`` / ``attn_layer_offset``)."""

    period: str
    offset: str
    on: str
    off: str
    overridden_by: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.period, self.offset)

    @property
    def meaning(self) -> str:
        return f"layers with i % {self.period} == {self.offset} are {self.on}, the others {self.off}"

    def present(self, cfg: dict[str, Any]) -> bool:
        return is_int(cfg.get(self.period)) and is_int(cfg.get(self.offset))

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        p, o = max(int(cfg[self.period]), 1), int(cfg[self.offset])
        return [self.on if i % p == o else self.off for i in range(n)]

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any] | None:
        n = len(values)
        for p in range(1, n + 2):
            for o in range(p):
                if self.expand({self.period: p, self.offset: o}, n) == values:
                    return {self.period: p, self.offset: o}
        return None


@dataclass(frozen=True)
class IntervalRangeRule(_Rule):
    """MoE on layers with ``(i + 1) % interval == 0`` and ``start <= i <= end`` (Ernie 4.5 MoE)."""

    start: str = "moe_layer_start_index"
    end: str = "moe_layer_end_index"
    interval: str = "moe_layer_interval"

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.interval, self.start, self.end)

    @property
    def meaning(self) -> str:
        return f"MoE on layers i with (i + 1) % {self.interval} == 0 and {self.start} <= i <= {self.end}"

    def present(self, cfg: dict[str, Any]) -> bool:
        return all(is_int(cfg.get(k)) for k in self.keys)

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        step, a, b = max(int(cfg[self.interval]), 1), int(cfg[self.start]), int(cfg[self.end])
        b = n - 1 if b == -1 else b
        return ["sparse" if (i + 1) % step == 0 and a <= i <= b else "dense" for i in range(n)]

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any] | None:
        n = len(values)
        moe = [i for i, v in enumerate(values) if v == "sparse"]
        if not moe:
            return {self.interval: 1, self.start: n, self.end: n - 1}
        for step in range(1, n + 1):
            upd = {self.interval: step, self.start: moe[0], self.end: moe[-1]}
            if self.expand(upd, n) == values:
                return upd
        return None


@dataclass(frozen=True)
class SparseStepRule(_Rule):
    """Qwen-MoE: MoE where ``num_experts > 0``, ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is
    not in ``mlp_only_layers``; re-expressed with the same step where possible, else step 1."""

    @property
    def keys(self) -> tuple[str, ...]:
        return ("decoder_sparse_step", "mlp_only_layers")

    @property
    def meaning(self) -> str:
        return "MoE on every decoder_sparse_step-th layer not listed in mlp_only_layers"

    def present(self, cfg: dict[str, Any]) -> bool:
        return is_int(cfg.get("decoder_sparse_step")) and "mlp_only_layers" in cfg

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        step = max(int(cfg["decoder_sparse_step"]), 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        experts = cfg.get("num_experts", 1)
        moe = (experts or 0) > 0 if is_int(experts) else True
        return ["sparse" if moe and (i + 1) % step == 0 and i not in dense else "dense" for i in range(n)]

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any] | None:
        for step in (max(int(cfg["decoder_sparse_step"]), 1), 1):
            dense = [i for i, v in enumerate(values) if v == "dense" and (i + 1) % step == 0]
            upd = {"decoder_sparse_step": step, "mlp_only_layers": dense}
            if self.expand({**cfg, **upd}, len(values)) == values:
                return upd
        return None  # all-dense layouts of a config without experts are expressed above


@dataclass(frozen=True)
class PatternListRule(_Rule):
    """GPT-Neo: ``attention_types = [[pattern, repeats], ...]`` expanded into ``attention_layers``."""

    @property
    def keys(self) -> tuple[str, ...]:
        return ("attention_types", "attention_layers")

    @property
    def meaning(self) -> str:
        return "a compressed attention pattern [[types, repeats], ...], expanded into attention_layers"

    def present(self, cfg: dict[str, Any]) -> bool:
        return isinstance(cfg.get("attention_types"), list)

    def expand(self, cfg: dict[str, Any], n: int) -> list[Hashable]:
        out: list[Hashable] = []
        try:
            for pattern, repeats in cfg["attention_types"]:
                out.extend(str(t) for t in list(pattern) * int(repeats))
        except (TypeError, ValueError):
            raise ConfigError(
                f"config attention_types = {cfg['attention_types']!r}: expected [[types, repeats], ...]"
            ) from None
        if len(out) != n:
            raise ConfigError(f"config attention_types expands to {len(out)} layers; the config has {n}")
        return out

    def express(self, cfg: dict[str, Any], values: list[Hashable]) -> dict[str, Any]:
        return {"attention_types": compress_pattern([str(v) for v in values]), "attention_layers": list(values)}


def compress_pattern(values: Sequence[str]) -> list[list[Any]]:
    """``[[pattern, repeats], ...]`` that expands back to ``values``: one repeated period if there is
    one, else runs of equal entries.

    Example:
        >>> compress_pattern(["global", "local"] * 3)
        [[['global', 'local'], 3]]
        >>> compress_pattern(["global", "global", "local"])
        [[['global'], 2], [['local'], 1]]
    """
    n = len(values)
    for p in range(1, n // 2 + 1):
        if n % p == 0 and list(values[:p]) * (n // p) == list(values):
            return [[list(values[:p]), n // p]]
    runs: list[list[Any]] = []
    for v in values:
        if runs and runs[-1][0] == [v]:
            runs[-1][1] += 1
        else:
            runs.append([[v], 1])
    return runs
