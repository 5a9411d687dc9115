"""Which modules an operator touches: composable, strict selectors and layer specifications.

A :class:`Selector` is a predicate over ``(path, module)`` pairs, built from leaves (exact paths,
path suffixes, regular expressions, module types, arbitrary predicates) combined with ``|``,
``&``, ``-`` and ``~``. Selectors are *strict* by default: every leaf pattern must match at least
one module of the model and the whole selector must select something, otherwise
:class:`~modulart.core.errors.SelectorError` names the pattern and shows close candidates.
:meth:`Selector.plan` lists what would be touched without changing anything.

:func:`select_layers` turns a layer specification (indices, ranges, ``"0-3,8"``,
``"last_quarter"``, fractions of depth, ``every``/``start``) into validated layer indices.

Example:
    >>> import torch
    >>> from modulart import Selector
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> sel = Selector.type(torch.nn.Linear) - Selector.exact("2")
    >>> sel.plan(model)
    ['0']
    >>> from modulart import select_layers
    >>> select_layers("last_half", 12), select_layers("0-2,-1", 12)
    ([6, 7, 8, 9, 10, 11], [0, 1, 2, 11])
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar, cast

from torch import nn

from modulart.core.errors import SelectorError

__all__ = ["LayerSpec", "Selector", "as_selector", "filter_by_selector", "select_layers", "select_views"]

Predicate: TypeAlias = Callable[[str, nn.Module], bool]


class _View(Protocol):
    path: str
    module: nn.Module


T = TypeVar("T", bound=_View)


@dataclass(frozen=True)
class _Leaf:
    kind: str  # exact | suffix | regex | type | predicate | all
    patterns: tuple[Any, ...]
    fn: Predicate

    def describe(self) -> str:
        if self.kind == "all":
            return "all()"
        if self.kind == "type":
            return "type(" + ", ".join(_type_name(t) for t in self.patterns) + ")"
        if self.kind == "predicate":
            return f"predicate({self.patterns[0]})"
        shown = (p.pattern if isinstance(p, re.Pattern) else p for p in self.patterns)
        return f"{self.kind}(" + ", ".join(repr(p) for p in shown) + ")"

    def pattern_matches(self, pattern: Any, path: str, module: nn.Module) -> bool:
        return _LEAF_MATCH[self.kind](pattern, path, module)


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _suffix(pattern: str, path: str) -> bool:
    return path == pattern or path.endswith("." + pattern)


def _type_match(pattern: Any, path: str, module: nn.Module) -> bool:
    if isinstance(pattern, str):  # class name: matched along the MRO, no import needed
        return any(c.__name__ == pattern or _type_name(c) == pattern for c in type(module).__mro__)
    return isinstance(module, pattern)


_LEAF_MATCH: dict[str, Callable[[Any, str, nn.Module], bool]] = {
    "exact": lambda p, path, m: path == p,
    "suffix": lambda p, path, m: _suffix(p, path),
    "regex": lambda p, path, m: p.fullmatch(path) is not None,
    "type": _type_match,
    "predicate": lambda p, path, m: True,
    "all": lambda p, path, m: True,
}


class Selector:
    """A composable, strict predicate over the modules of a model.

    Build one with the class methods, combine with ``|`` (either), ``&`` (both), ``-`` (but not)
    and ``~`` (not). Root module (path ``""``) is never selected.

    Args:
        fn: ``fn(path, module) -> bool``.
        description: how the selector was written (saved in artefacts).
        leaves: the leaf patterns, checked for strictness.
        strict: raise when a leaf pattern or the whole selector matches nothing.
    """

    def __init__(self, fn: Predicate, description: str, leaves: tuple[_Leaf, ...] = (), *, strict: bool = True) -> None:
        self._fn = fn
        self.description = description
        self._leaves = leaves
        self.strict = strict

    # --- leaves -------------------------------------------------------------------------------
    @classmethod
    def _leaf(cls, kind: str, patterns: tuple[Any, ...], fn: Predicate) -> Selector:
        leaf = _Leaf(kind, patterns, fn)
        return cls(fn, leaf.describe(), (leaf,))

    @classmethod
    def exact(cls, *paths: str) -> Selector:
        """Modules at exactly these dotted paths."""
        _need(paths, "exact")
        wanted = frozenset(paths)
        return cls._leaf("exact", paths, lambda path, m: path in wanted)

    @classmethod
    def suffix(cls, *suffixes: str) -> Selector:
        """Modules whose path ends with one of these dotted suffixes (on a ``.`` boundary)."""
        _need(suffixes, "suffix")
        return cls._leaf("suffix", suffixes, lambda path, m: any(_suffix(s, path) for s in suffixes))

    @classmethod
    def regex(cls, *patterns: str) -> Selector:
        """Modules whose whole path matches one of these regular expressions."""
        _need(patterns, "regex")
        try:
            compiled = tuple(re.compile(p) for p in patterns)
        except re.error as e:
            raise SelectorError(f"invalid regular expression in Selector.regex: {e}") from None
        return cls._leaf("regex", compiled, lambda path, m: any(c.fullmatch(path) for c in compiled))

    @classmethod
    def type(cls, *types: type[nn.Module] | str) -> Selector:
        """Modules that are instances of these classes (or have a class of this name in their MRO)."""
        _need(types, "type")
        return cls._leaf("type", types, lambda path, m: any(_type_match(t, path, m) for t in types))

    @classmethod
    def predicate(cls, fn: Predicate, description: str | None = None) -> Selector:
        """Modules for which ``fn(path, module)`` is true."""
        desc = description or getattr(fn, "__name__", "<predicate>")
        return cls._leaf("predicate", (desc,), fn)

    @classmethod
    def all(cls) -> Selector:
        """Every non-root module."""
        return cls._leaf("all", (), lambda path, m: True)

    # --- combinators --------------------------------------------------------------------------
    def __or__(self, other: Selector) -> Selector:
        a, b = self._fn, other._fn
        return Selector(
            lambda p, m: a(p, m) or b(p, m),
            f"({self.description} | {other.description})",
            self._leaves + other._leaves,
            strict=self.strict and other.strict,
        )

    def __and__(self, other: Selector) -> Selector:
        a, b = self._fn, other._fn
        return Selector(
            lambda p, m: a(p, m) and b(p, m),
            f"({self.description} & {other.description})",
            self._leaves + other._leaves,
            strict=self.strict and other.strict,
        )

    def __sub__(self, other: Selector) -> Selector:
        a, b = self._fn, other._fn
        return Selector(
            lambda p, m: a(p, m) and not b(p, m),
            f"({self.description} - {other.description})",
            self._leaves + other._leaves,
            strict=self.strict and other.strict,
        )

    def __invert__(self) -> Selector:
        a = self._fn
        return Selector(lambda p, m: not a(p, m), f"~{self.description}", self._leaves, strict=self.strict)

    def lenient(self) -> Selector:
        """The same selector, returning an empty plan instead of raising when nothing matches."""
        return Selector(self._fn, self.description, self._leaves, strict=False)

    # --- use ----------------------------------------------------------------------------------
    def matches(self, path: str, module: nn.Module) -> bool:
        """Whether ``(path, module)`` is selected (the root, path ``""``, never is)."""
        return bool(path) and self._fn(path, module)

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The selected ``(path, module)`` pairs in model order; validated (see :meth:`plan`)."""
        named = [(p, m) for p, m in model.named_modules() if p]
        chosen = [(p, m) for p, m in named if self._fn(p, m)]
        if self.strict:
            self._check(named, chosen, model)
        return chosen

    def plan(self, model: nn.Module) -> list[str]:
        """The dotted paths that would be touched; changes nothing."""
        return [p for p, _ in self.select(model)]

    def _check(self, named: list[tuple[str, nn.Module]], chosen: list[tuple[str, nn.Module]], model: nn.Module) -> None:
        paths = [p for p, _ in named]
        for leaf in self._leaves:
            if leaf.kind in ("predicate", "all"):
                continue
            for pattern in leaf.patterns:
                if not any(leaf.pattern_matches(pattern, p, m) for p, m in named):
                    shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
                    if leaf.kind == "type":
                        shown = _type_name(pattern)
                    raise SelectorError(
                        f"selector {leaf.describe()}: pattern {shown!r} matches no module of "
                        f"{type(model).__name__}; close paths: {_close(str(shown), paths)}"
                    )
        if not chosen:
            raise SelectorError(f"selector {self.description} selects no module of {type(model).__name__}")

    def to_json(self) -> str:
        """The selector as written (for artefacts)."""
        return self.description

    def __repr__(self) -> str:
        return f"Selector({self.description})"


def _need(items: Sequence[Any], kind: str) -> None:
    if not items:
        raise SelectorError(f"Selector.{kind}() needs at least one pattern")


def _close(pattern: str, paths: Iterable[str]) -> list[str]:
    paths = list(paths)
    tail = pattern.rsplit(".", 1)[-1]
    hits = [p for p in paths if tail and tail in p][:5]
    return hits or difflib.get_close_matches(pattern, paths, n=5, cutoff=0.3)


def filter_by_selector(items: list[T], selector: Any, model: nn.Module, *, strict: bool, what: str) -> list[T]:
    """Keep the views (anything with ``path`` and ``module``) that ``selector`` selects.

    With ``strict``, the selector is first checked against the whole model (a misspelt pattern
    raises even inside a union) and an empty result raises :class:`SelectorError` naming it.
    """
    sel = as_selector(selector)
    if strict and sel.strict:
        sel.select(model)
    kept = [v for v in items if sel.matches(v.path, v.module)]
    if strict and not kept:
        paths = [v.path for v in items]
        raise SelectorError(f"selector {sel.description} keeps none of the {len(items)} {what} found: {paths[:10]}")
    return kept


def select_views(
    views: list[T], spec: Any, *, field: str, what: str = "view", every: int = 1, start: int | None = None
) -> list[T]:
    """Pick views (FFNs, MoE blocks...) by a layer specification over their depth order, or by paths.

    Args:
        views: in depth order; ``spec`` indices index this list.
        spec: anything :func:`select_layers` accepts, or a list of view paths.
        field: the config field being resolved (named in errors, e.g. ``"EMoEConfig.layers"``).
        what: what the views are, for errors (``"FFN"``).
        every, start: as for :func:`select_layers`.

    Raises:
        SelectorError: a path that is no view's, or an out-of-range index (naming the depth).
    """
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(p, str) for p in spec):
        by_path = {v.path: v for v in views}
        missing = [p for p in spec if p not in by_path]
        if missing:
            raise SelectorError(f"{field}: no {what} at {missing}; found: {list(by_path)[:12]}")
        return [by_path[p] for p in spec]
    return [views[i] for i in select_layers(spec, len(views), every=every, start=start)]


def as_selector(spec: Selector | str | Sequence[str] | type[nn.Module] | Predicate) -> Selector:
    """Coerce user input into a :class:`Selector`.

    ``str``: a path suffix, or ``"re:<regex>"``, ``"type:<ClassName>"``, ``"=<exact path>"``;
    a sequence of strings: any of them; a module class: instances of it; a callable:
    ``fn(path, module) -> bool``.
    """
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        if spec.startswith("re:"):
            return Selector.regex(spec[3:])
        if spec.startswith("type:"):
            return Selector.type(spec[5:])
        if spec.startswith("="):
            return Selector.exact(spec[1:])
        return Selector.suffix(spec)
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return Selector.type(spec)
    if callable(spec):
        return Selector.predicate(cast(Predicate, spec))
    if isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
        out = as_selector(spec[0])
        for s in spec[1:]:
            out = out | as_selector(s)
        return out
    raise SelectorError(
        f"cannot build a Selector from {spec!r}; expected a Selector, a path suffix, "
        "'re:<regex>', 'type:<Class>', '=<path>', a list of those, a module class or a predicate"
    )


# --- layer selection ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """A layer specification with a stride: ``layers`` resolved first, then every ``every``-th
    layer from ``start`` (default: the first selected layer).

    Example:
        >>> from modulart import LayerSpec, select_layers
        >>> select_layers(LayerSpec("last_half", every=2), 12)
        [6, 8, 10]
    """

    layers: Any = "all"
    every: int = 1
    start: int | None = None


_NAMED: dict[str, Callable[[int], range]] = {
    "all": lambda n: range(n),
    "first": lambda n: range(min(1, n)),
    "last": lambda n: range(n - 1, n),
    "first_half": lambda n: range(n // 2),
    "last_half": lambda n: range(n // 2, n),
    "last_quarter": lambda n: range(n - max(1, n // 4), n),
    "last_third": lambda n: range(n - max(1, n // 3), n),
}

LayersArg: TypeAlias = "LayerSpec | str | int | float | range | slice | Sequence[int] | tuple[float, float] | None"


def select_layers(spec: Any, depth: int, *, every: int = 1, start: int | None = None) -> list[int]:
    """Resolve a layer specification into sorted, unique layer indices in ``[0, depth)``.

    Args:
        spec: ``None``/``"all"``; an int (negative counts from the end); a list of ints;
            ``range``/``slice``; a named range (``first``, ``last``, ``first_half``,
            ``last_half``, ``last_quarter``, ``last_third``); a string of indices and half-open
            ``a-b`` ranges (inclusive ``b``) like ``"0-3,8,-1"``; a float ``f`` in (0, 1] (the last
            ``f`` of depth); a pair of floats ``(lo, hi)`` (that fraction of depth, half-open);
            or a :class:`LayerSpec`.
        depth: number of layers.
        every: keep every ``every``-th selected layer ...
        start: ... counting from this layer (default: the first selected one).

    Raises:
        SelectorError: an index outside the depth (the message names the depth), an empty
            result, or an unknown specification.
    """
    if depth <= 0:
        raise SelectorError(f"cannot select layers of a model with depth {depth}")
    if isinstance(spec, LayerSpec):
        return select_layers(spec.layers, depth, every=spec.every, start=spec.start)
    idx = _resolve(spec, depth)
    if every < 1:
        raise SelectorError(f"every must be >= 1, got {every}")
    if every > 1 or start is not None:
        first = idx[0] if start is None else _norm(start, depth)
        idx = [i for i in idx if i >= first and (i - first) % every == 0]
    if not idx:
        raise SelectorError(
            f"layer specification {spec!r} (every={every}, start={start}) selects no layer "
            f"of a model with depth {depth}"
        )
    return idx


def _norm(i: int, depth: int) -> int:
    j = i + depth if i < 0 else i
    if not 0 <= j < depth:
        raise SelectorError(
            f"layer index {i} is out of range for a model with depth {depth} (valid: {-depth}..{depth - 1})"
        )
    return j


def _resolve(spec: Any, depth: int) -> list[int]:
    if spec is None:
        return list(range(depth))
    if isinstance(spec, bool):
        raise SelectorError(f"bad layer specification {spec!r}")
    if isinstance(spec, int):
        return [_norm(spec, depth)]
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise SelectorError(f"a fractional layer specification must lie in (0, 1], got {spec}")
        return list(range(depth - max(1, round(spec * depth)), depth))
    if isinstance(spec, slice):
        return sorted(set(range(depth)[spec]))
    if isinstance(spec, range):
        return sorted({_norm(i, depth) for i in spec})
    if isinstance(spec, str):
        return _resolve_str(spec.strip(), depth)
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, float) for x in spec):
        lo, hi = spec
        if not 0.0 <= lo < hi <= 1.0:
            raise SelectorError(f"a depth-fraction pair must satisfy 0 <= lo < hi <= 1, got {spec}")
        first = min(round(lo * depth), depth - 1)
        return list(range(first, max(first + 1, round(hi * depth))))
    if isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return sorted({_norm(i, depth) for i in spec})
    raise SelectorError(
        f"bad layer specification {spec!r}; expected an int, a list of ints, a range, "
        f"one of {sorted(_NAMED)}, a string like '0-3,8', a float in (0, 1] or a LayerSpec"
    )


def _resolve_str(spec: str, depth: int) -> list[int]:
    if spec in _NAMED:
        return list(_NAMED[spec](depth))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(-?\d+)\s*(?:-|:)\s*(-?\d+)", part)
        if m:
            a, b = _norm(int(m.group(1)), depth), _norm(int(m.group(2)), depth)
            if a > b:
                raise SelectorError(f"layer range {part!r} is empty (start after end)")
            out.update(range(a, b + 1))
        elif re.fullmatch(r"-?\d+", part):
            out.add(_norm(int(part), depth))
        else:
            raise SelectorError(
                f"bad layer specification {spec!r}: cannot read {part!r}; expected indices "
                f"and ranges like '0-3,8,-1' or one of {sorted(_NAMED)}"
            )
    return sorted(out)
