"""Layer plans: which source block each block of the grown model is a copy of.

A :class:`LayerPlan` is plain data, ``indices[i]`` = the source block that grown block ``i`` copies,
plus the depth of the source it was written for. The same plan drives in-memory growth
(:func:`~modulart.stacking.grow`), checkpoint streaming (:func:`~modulart.stacking.grow_checkpoint`)
and optimizer-state growth (:func:`~modulart.stacking.grow_optimizer`).

Example:
    >>> from modulart.stacking import LayerPlan
    >>> LayerPlan.stack(num_layers=3, factor=2).indices
    (0, 1, 2, 0, 1, 2)
    >>> LayerPlan.interleave(num_layers=3, factor=2).indices
    (0, 0, 1, 1, 2, 2)
    >>> LayerPlan.dus(num_layers=8, drop=2).indices  # SOLAR: [0, 6) + [2, 8)
    (0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7)
    >>> LayerPlan.parse("0-2,0-2", num_layers=3).describe()
    '0-2,0-2 (3 -> 6 layers)'
    >>> LayerPlan.from_list([0, 3], num_layers=3)
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: LayerPlan.indices[1] = 3: the source model has 3 layers (valid indices 0..2)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from modulart.core.errors import ConfigError
from modulart.core.types import JSONValue

__all__ = ["LayerPlan"]


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} = {value!r}: expected an int")
    return value


@dataclass(frozen=True)
class LayerPlan:
    """Grown block ``i`` is a copy of source block ``indices[i]``.

    Attributes:
        indices: source block index of every grown block, in order (length = grown depth).
        num_layers: depth of the source model the plan was written for.

    Raises:
        ConfigError: an empty plan, a non-int entry, or an index outside ``[0, num_layers)``;
            the message names the entry and the source depth.
    """

    indices: tuple[int, ...]
    num_layers: int

    def __post_init__(self) -> None:
        n = _int(self.num_layers, "LayerPlan.num_layers")
        if n < 1:
            raise ConfigError(f"LayerPlan.num_layers = {n}: must be >= 1")
        object.__setattr__(self, "indices", tuple(self.indices))
        if not self.indices:
            raise ConfigError("LayerPlan.indices = (): a plan needs at least one layer")
        for i, v in enumerate(self.indices):
            _int(v, f"LayerPlan.indices[{i}]")
            if not 0 <= v < n:
                raise ConfigError(
                    f"LayerPlan.indices[{i}] = {v}: the source model has {n} layers (valid indices 0..{n - 1})"
                )

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def stack(cls, num_layers: int, factor: int = 4) -> LayerPlan:
        """G_stack: the whole block sequence repeated ``factor`` times, in order (0..L-1, 0..L-1, ...).

        Example:
            >>> LayerPlan.stack(2, 3).indices
            (0, 1, 0, 1, 0, 1)
        """
        f = _int(factor, "LayerPlan.stack factor")
        if f < 1:
            raise ConfigError(f"LayerPlan.stack factor = {f}: must be >= 1")
        return cls(tuple(range(_int(num_layers, "num_layers"))) * f, num_layers)

    @classmethod
    def interleave(cls, num_layers: int, factor: int = 2) -> LayerPlan:
        """Each block repeated ``factor`` times in place (0,0,1,1,...), "interpolation" in the paper.

        Example:
            >>> LayerPlan.interleave(2, 3).indices
            (0, 0, 0, 1, 1, 1)
        """
        f = _int(factor, "LayerPlan.interleave factor")
        if f < 1:
            raise ConfigError(f"LayerPlan.interleave factor = {f}: must be >= 1")
        return cls(tuple(i for i in range(_int(num_layers, "num_layers")) for _ in range(f)), num_layers)

    @classmethod
    def dus(cls, num_layers: int, drop: int) -> LayerPlan:
        """SOLAR depth up-scaling: layers ``[0, L-drop)`` followed by ``[drop, L)``.

        Example:
            >>> len(LayerPlan.dus(32, drop=8))  # SOLAR 10.7B: 32 -> 48 layers
            48
        """
        n, d = _int(num_layers, "num_layers"), _int(drop, "LayerPlan.dus drop")
        if not 0 <= d < n:
            raise ConfigError(f"LayerPlan.dus drop = {d}: must lie in [0, {n}) for a {n}-layer source")
        return cls(tuple(range(n - d)) + tuple(range(d, n)), n)

    @classmethod
    def partial(cls, num_layers: int, ranges: Sequence[tuple[int, int]]) -> LayerPlan:
        """Concatenate half-open ranges ``[a, b)`` (mergekit's ``layer_range``).

        Example:
            >>> LayerPlan.partial(4, [(0, 4), (2, 4)]).indices
            (0, 1, 2, 3, 2, 3)
        """
        n = _int(num_layers, "num_layers")
        out: list[int] = []
        for k, r in enumerate(ranges):
            if not (isinstance(r, (tuple, list)) and len(r) == 2):
                raise ConfigError(f"LayerPlan.partial ranges[{k}] = {r!r}: expected a pair (start, stop)")
            a, b = _int(r[0], f"ranges[{k}][0]"), _int(r[1], f"ranges[{k}][1]")
            if not 0 <= a < b <= n:
                raise ConfigError(
                    f"LayerPlan.partial ranges[{k}] = ({a}, {b}): need 0 <= start < stop <= {n} (source depth {n})"
                )
            out.extend(range(a, b))
        return cls(tuple(out), n)

    @classmethod
    def from_list(cls, indices: Iterable[int], num_layers: int) -> LayerPlan:
        """An explicit list of source indices.

        Example:
            >>> LayerPlan.from_list([0, 0, 1], num_layers=2).grown_layers
            3
        """
        return cls(tuple(indices), num_layers)

    @classmethod
    def parse(cls, text: str, num_layers: int) -> LayerPlan:
        """Parse ``"0-5,0-5"`` (inclusive ranges and single indices, comma separated).

        Example:
            >>> LayerPlan.parse("0-1, 1, 0", 2).indices
            (0, 1, 1, 0)
        """
        out: list[int] = []
        for part in (p.strip() for p in str(text).split(",")):
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if m is None:
                raise ConfigError(f"plan {text!r}: cannot read {part!r}; expected indices and ranges like '0-5,0-5'")
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) is not None else a
            if b < a:
                raise ConfigError(f"plan {text!r}: range {part!r} runs backwards")
            out.extend(range(a, b + 1))
        return cls(tuple(out), num_layers)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(tuple(data["indices"]), int(data["num_layers"]))
        except KeyError as e:
            raise ConfigError(f"LayerPlan dict is missing {e.args[0]!r}") from None

    # --- queries --------------------------------------------------------------------------------
    @property
    def grown_layers(self) -> int:
        """Depth of the grown model."""
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __getitem__(self, i: int) -> int:
        return self.indices[i]

    def check_source(self, num_layers: int, what: str = "source model") -> None:
        """Raise :class:`ConfigError` unless the plan was written for a source of ``num_layers`` layers."""
        if num_layers != self.num_layers:
            raise ConfigError(
                f"LayerPlan was written for a {self.num_layers}-layer source but the {what} has {num_layers} layers"
            )

    def originals(self) -> tuple[int, ...] | None:
        """Positions that keep the source's function: the first in-order occurrence of 0, 1, ..., L-1.

        The other positions are *new* blocks; a function-preserving operator makes them identities.
        None when the plan does not contain the source sequence in order (e.g. a reversed plan).

        Example:
            >>> LayerPlan.stack(2, 2).originals(), LayerPlan.interleave(2, 2).originals()
            ((0, 1), (0, 2))
            >>> LayerPlan.from_list([1, 0], 2).originals() is None
            True
        """
        out: list[int] = []
        want = 0
        for pos, v in enumerate(self.indices):
            if want < self.num_layers and v == want:
                out.append(pos)
                want += 1
        return tuple(out) if want == self.num_layers else None

    def sources_of(self) -> dict[int, list[int]]:
        """Source index -> grown positions that copy it."""
        out: dict[int, list[int]] = {}
        for pos, v in enumerate(self.indices):
            out.setdefault(v, []).append(pos)
        return out

    def describe(self) -> str:
        """Compact text form (inclusive ranges), parseable by :meth:`parse`."""
        parts: list[str] = []
        start = prev = self.indices[0]
        for v in (*self.indices[1:], None):
            if v is not None and v == prev + 1:
                prev = v
                continue
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            if v is not None:
                start = prev = v
        return f"{','.join(parts)} ({self.num_layers} -> {self.grown_layers} layers)"

    def to_dict(self) -> dict[str, JSONValue]:
        """JSON-safe form."""
        return {"indices": list(self.indices), "num_layers": self.num_layers}
