"""Selectors and layer specifications (core/select.py): leaves, combinators, strictness, plans,
coercions, and select_layers with a hypothesis property."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import modulart as mt
from families import PlainMLP, PlainTransformer


@pytest.fixture
def model() -> nn.Module:
    return PlainTransformer(n_layers=3).eval()


def paths_where(model: nn.Module, pred) -> list[str]:  # type: ignore[no-untyped-def]
    return [p for p, m in model.named_modules() if p and pred(p, m)]


def non_root(model: nn.Module) -> list[str]:
    return [p for p, _ in model.named_modules() if p]


# --- leaves -------------------------------------------------------------------------------------
def test_exact(model: nn.Module) -> None:
    assert mt.Selector.exact("blocks.1.mlp").plan(model) == ["blocks.1.mlp"]
    assert mt.Selector.exact("blocks.2.mlp", "head").plan(model) == ["blocks.2.mlp", "head"]  # model order


def test_suffix_respects_dot_boundaries(model: nn.Module) -> None:
    assert mt.Selector.suffix("mlp").plan(model) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    assert mt.Selector.suffix("1.mlp.fc_in").plan(model) == ["blocks.1.mlp.fc_in"]
    assert mt.Selector.suffix("norm1", "norm2").plan(model) == paths_where(
        model, lambda p, m: p.endswith(("norm1", "norm2"))
    )
    with pytest.raises(mt.SelectorError):  # "lp" is a string suffix of "mlp" but not a path suffix
        mt.Selector.suffix("lp").plan(model)


def test_regex_matches_the_whole_path(model: nn.Module) -> None:
    assert mt.Selector.regex(r"blocks\.[02]\.mlp").plan(model) == ["blocks.0.mlp", "blocks.2.mlp"]
    assert mt.Selector.regex(r"blocks\.0").plan(model) == ["blocks.0"]  # not its children
    with pytest.raises(mt.SelectorError):
        mt.Selector.regex(r"locks\.0").plan(model)  # a search would match; a full match does not
    with pytest.raises(mt.SelectorError, match="regular expression"):
        mt.Selector.regex("blocks.(")


def test_type_by_class_and_by_name_along_the_mro(model: nn.Module) -> None:
    linears = paths_where(model, lambda p, m: isinstance(m, nn.Linear))
    # MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear, a subclass of nn.Linear
    assert "blocks.0.attn.out_proj" in linears
    assert type(model.get_submodule("blocks.0.attn.out_proj")) is not nn.Linear
    assert mt.Selector.type(nn.Linear).plan(model) == linears
    assert mt.Selector.type("Linear").plan(model) == linears
    assert mt.Selector.type("torch.nn.modules.linear.Linear").plan(model) == linears
    assert mt.Selector.type(PlainMLP).plan(model) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    assert mt.Selector.type(nn.LayerNorm, nn.Embedding).plan(model) == paths_where(
        model, lambda p, m: isinstance(m, nn.LayerNorm | nn.Embedding)
    )


def test_predicate_and_all(model: nn.Module) -> None:
    sel = mt.Selector.predicate(lambda p, m: isinstance(m, nn.LayerNorm) and p.startswith("blocks.1"))
    assert sel.plan(model) == ["blocks.1.norm1", "blocks.1.norm2"]
    assert mt.Selector.all().plan(model) == non_root(model)
    assert not mt.Selector.all().matches("", model)  # the root is never selected
    assert "" not in mt.Selector.predicate(lambda p, m: True).plan(model)


def test_leaf_constructors_need_a_pattern() -> None:
    for ctor in (mt.Selector.exact, mt.Selector.suffix, mt.Selector.regex, mt.Selector.type):
        with pytest.raises(mt.SelectorError, match="at least one"):
            ctor()


# --- combinators --------------------------------------------------------------------------------
def test_combinators_are_set_operations_in_model_order(model: nn.Module) -> None:
    lin = mt.Selector.type(nn.Linear)
    mlp = mt.Selector.regex(r"blocks\.\d\.mlp(\..*)?")
    b1 = mt.Selector.regex(r"blocks\.1(\..*)?")
    L, M, B = (set(s.plan(model)) for s in (lin, mlp, b1))
    everything = non_root(model)

    def ordered(s: set[str]) -> list[str]:
        return [p for p in everything if p in s]

    assert (lin | b1).plan(model) == ordered(L | B)
    assert (lin & mlp).plan(model) == ordered(L & M)
    assert (mlp - b1).plan(model) == ordered(M - B)
    assert (~lin).plan(model) == ordered(set(everything) - L)
    assert ((lin & mlp) - b1 | mt.Selector.exact("head")).plan(model) == ordered((L & M) - B | {"head"})
    assert len((lin & mlp).plan(model)) == 6


def test_description_records_how_it_was_written() -> None:
    sel = (mt.Selector.suffix("mlp") | mt.Selector.exact("head")) - ~mt.Selector.type(nn.Linear)
    text = sel.to_json()
    assert "suffix('mlp')" in text and "exact('head')" in text and "~type(torch.nn.modules.linear.Linear)" in text
    assert " | " in text and " - " in text


def test_regex_description_is_the_pattern_as_written() -> None:
    # BUG: src/modulart/core/select.py, Selector.regex builds its leaf from the *compiled* patterns,
    # and _Leaf.describe uses repr(p), so the description saved in artefacts ("selector as written")
    # reads "regex(re.compile('a'))" instead of "regex('a')" like the other leaves ("suffix('mlp')").
    # Fix: in _Leaf.describe, show `p.pattern` for re.Pattern objects.
    assert mt.Selector.regex(r"blocks\.0").to_json() == "regex('blocks\\\\.0')"
    assert mt.Selector.regex("a", "b").description == "regex('a', 'b')"


# --- strictness ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sel", "shown"),
    [
        (mt.Selector.exact("blocks.7.mlp"), "blocks.7.mlp"),
        (mt.Selector.suffix("mpl"), "mpl"),
        (mt.Selector.regex("layers[.][0-9]+"), "layers[.][0-9]+"),
        (mt.Selector.type(nn.Conv2d), "Conv2d"),
        (mt.Selector.type("LlamaMLP"), "LlamaMLP"),
        (mt.Selector.suffix("mlp") | mt.Selector.suffix("mpl"), "mpl"),  # inside a union
        (mt.Selector.type(nn.Linear) & mt.Selector.exact("nope"), "nope"),
        (mt.Selector.all() - mt.Selector.exact("blocks.9"), "blocks.9"),
        (~mt.Selector.suffix("ghost"), "ghost"),
    ],
)
def test_a_leaf_pattern_that_matches_nothing_raises(model: nn.Module, sel: mt.Selector, shown: str) -> None:
    with pytest.raises(mt.SelectorError) as info:
        sel.plan(model)
    assert shown in str(info.value)
    assert "PlainTransformer" in str(info.value)
    sel.lenient().plan(model)  # lenient: no error


def test_error_suggests_close_paths(model: nn.Module) -> None:
    with pytest.raises(mt.SelectorError, match=re.escape("blocks.1.mlp")):
        mt.Selector.exact("blocks.1.mpl.fc_in", "blocks.1.mlp").plan(model)


def test_a_selector_that_selects_nothing_raises(model: nn.Module) -> None:
    sel = mt.Selector.suffix("fc_in") & mt.Selector.suffix("fc_out")  # both leaves match, jointly nothing
    with pytest.raises(mt.SelectorError, match="selects no module"):
        sel.plan(model)
    with pytest.raises(mt.SelectorError):
        sel.select(model)
    assert sel.lenient().plan(model) == []
    assert sel.lenient().select(model) == []


def test_lenient_keeps_what_the_good_leaves_match(model: nn.Module) -> None:
    sel = (mt.Selector.exact("head") | mt.Selector.exact("blocks.9.mlp")).lenient()
    assert sel.plan(model) == ["head"]
    assert not sel.strict and (mt.Selector.exact("head")).strict


def test_plan_changes_nothing(model: nn.Module) -> None:
    pre_hook_counts = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    out = mt.Selector.type(nn.Linear) | mt.Selector.suffix("norm1")
    planned = out.plan(model)
    assert planned and planned == [p for p, _ in out.select(model)]
    assert [m for _, m in out.select(model)] == [model.get_submodule(p) for p in planned]
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()
    ] == pre_hook_counts
    assert [m.training for m in model.modules()] == modes


# --- as_selector --------------------------------------------------------------------------------
def test_as_selector_coercions(model: nn.Module) -> None:
    mlps = ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    assert mt.as_selector("mlp").plan(model) == mlps
    assert mt.as_selector(r"re:blocks\.\d\.mlp").plan(model) == mlps
    assert mt.as_selector("type:PlainMLP").plan(model) == mlps
    assert mt.as_selector("=blocks.0.mlp").plan(model) == ["blocks.0.mlp"]
    with pytest.raises(mt.SelectorError):
        mt.as_selector("=mlp").plan(model)  # exact, not a suffix
    assert mt.as_selector(["blocks.2.mlp", "=head", "re:embed"]).plan(model) == ["embed", "blocks.2.mlp", "head"]
    assert mt.as_selector(PlainMLP).plan(model) == mlps
    assert mt.as_selector(lambda p, m: p == "head").plan(model) == ["head"]
    sel = mt.Selector.exact("head")
    assert mt.as_selector(sel) is sel


@pytest.mark.parametrize("bad", [42, None, [], [1, 2], ["mlp", 3], 1.5, {"mlp"}])
def test_as_selector_rejects_bad_input(bad: object) -> None:
    with pytest.raises(mt.SelectorError, match="cannot build a Selector"):
        mt.as_selector(bad)  # type: ignore[arg-type]


def test_as_selector_bad_regex() -> None:
    with pytest.raises(mt.SelectorError):
        mt.as_selector("re:blocks.(")


# --- select_layers ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, list(range(12))),
        ("all", list(range(12))),
        (0, [0]),
        (11, [11]),
        (-1, [11]),
        (-12, [0]),
        ([3, 1, 3, -1], [1, 3, 11]),
        ((2, 4), [2, 4]),  # a tuple of ints is a list of indices, not a fraction pair
        (range(0, 12, 3), [0, 3, 6, 9]),
        (range(-3, 0), [9, 10, 11]),
        (slice(2, 5), [2, 3, 4]),
        (slice(None, None, 3), [0, 3, 6, 9]),
        (slice(-2, None), [10, 11]),
        ("first", [0]),
        ("last", [11]),
        ("first_half", [0, 1, 2, 3, 4, 5]),
        ("last_half", [6, 7, 8, 9, 10, 11]),
        ("last_quarter", [9, 10, 11]),
        ("last_third", [8, 9, 10, 11]),
        ("0-3,8,-1", [0, 1, 2, 3, 8, 11]),
        (" 2 - 4 , 2 ", [2, 3, 4]),
        ("0:2", [0, 1, 2]),
        ("-3--1", [9, 10, 11]),
        ("5", [5]),
        (0.25, [9, 10, 11]),
        (1.0, list(range(12))),
        (0.01, [11]),
        ((0.0, 0.5), [0, 1, 2, 3, 4, 5]),
        ((0.5, 1.0), [6, 7, 8, 9, 10, 11]),
        ((0.25, 0.5), [3, 4, 5]),
        (mt.LayerSpec("last_half", every=2), [6, 8, 10]),
        (mt.LayerSpec(every=3, start=1), [1, 4, 7, 10]),
        (mt.LayerSpec([0, 1, 2, 5, 8], every=2, start=1), [1, 5]),
        (mt.LayerSpec(), list(range(12))),
    ],
)
def test_select_layers(spec: object, expected: list[int]) -> None:
    assert mt.select_layers(spec, 12) == expected


def test_every_and_start_keyword_arguments() -> None:
    assert mt.select_layers("all", 10, every=4) == [0, 4, 8]
    assert mt.select_layers("last_half", 10, every=2) == [5, 7, 9]
    assert mt.select_layers(None, 10, every=3, start=-4) == [6, 9]
    with pytest.raises(mt.SelectorError, match="every"):
        mt.select_layers(None, 10, every=0)
    with pytest.raises(mt.SelectorError, match="depth 10"):
        mt.select_layers(None, 10, start=10)


@pytest.mark.parametrize("spec", [12, -13, 40, [0, 12], range(10, 14), "0-12", "13", "-13"])
def test_out_of_range_index_names_the_depth(spec: object) -> None:
    with pytest.raises(mt.SelectorError, match="depth 12"):
        mt.select_layers(spec, 12)


@pytest.mark.parametrize(
    "spec",
    [
        [],
        "",
        " , ",
        slice(5, 2),
        slice(12, None),
        "3-1",
        "abc",
        "last_half,0",
        0.0,
        1.5,
        -0.5,
        (0.5, 0.5),
        (0.7, 0.2),
        (0.5, 1.5),
        True,
        {1, 2},
        [1.0, 2.0],
        object(),
        mt.LayerSpec("first", every=2, start=5),
    ],
)
def test_bad_or_empty_specifications_raise(spec: object) -> None:
    with pytest.raises(mt.SelectorError):
        mt.select_layers(spec, 12)


def test_named_range_that_is_empty_for_a_shallow_model_raises() -> None:
    assert mt.select_layers("last_quarter", 2) == [1]
    with pytest.raises(mt.SelectorError, match="selects no layer"):
        mt.select_layers("first_half", 1)


@pytest.mark.parametrize("depth", [0, -3])
def test_non_positive_depth_raises(depth: int) -> None:
    with pytest.raises(mt.SelectorError, match="depth"):
        mt.select_layers(None, depth)


def test_negative_step_slice_is_sorted() -> None:
    # BUG: src/modulart/core/select.py, _resolve: `list(range(depth))[spec]` is returned as is for a
    # slice, so a negative step yields descending indices ([11, 10, ..., 0]) although select_layers
    # promises "sorted, unique" indices; with every/start it then keeps only the first (largest) one.
    # Fix: `return sorted(set(range(depth)[spec]))`.
    assert mt.select_layers(slice(None, None, -1), 4) == [0, 1, 2, 3]
    assert mt.select_layers(slice(None, None, -2), 6) == [1, 3, 5]
    assert mt.select_layers(slice(None, None, -1), 6, every=2) == [0, 2, 4]


def test_fraction_pair_near_the_top_stays_in_range() -> None:
    # BUG: src/modulart/core/select.py, _resolve (the (lo, hi) float pair branch):
    # `range(round(lo * depth), max(round(lo * depth) + 1, round(hi * depth)))` yields the index
    # `depth` when lo * depth rounds up to depth, e.g. (0.9, 1.0) at depth 2 -> [2], (0.99, 1.0) at
    # depth 1 -> [1]: out of range, returned silently. Fix: clamp the start,
    # `a = min(round(lo * depth), depth - 1)`, and use `range(a, max(a + 1, round(hi * depth)))`.
    assert mt.select_layers((0.9, 1.0), 2) == [1]
    assert mt.select_layers((0.99, 1.0), 1) == [0]
    assert mt.select_layers((0.95, 1.0), 12) == [11]


# --- property -----------------------------------------------------------------------------------
_NAMED = ["all", "first", "last", "first_half", "last_half", "last_quarter", "last_third"]


@st.composite
def depth_and_spec(draw: st.DrawFn, *, risky: bool = False) -> tuple[int, object]:
    """A depth in 1..64 and a valid layer specification for it (``risky``: the forms with known bugs)."""
    depth = draw(st.integers(1, 64))
    index = st.integers(-depth, depth - 1)
    if risky:
        lo = draw(st.floats(0.0, 1.0, exclude_max=True, allow_nan=False))
        hi = draw(st.floats(lo, 1.0, exclude_min=True, allow_nan=False))
        step = draw(st.integers(-5, 5).filter(bool))
        kinds = [
            st.just((lo, hi)),
            st.just(slice(draw(st.none() | index), draw(st.none() | index), step)),
        ]
    else:
        a = draw(st.integers(0, depth - 1))
        b = draw(st.integers(a, depth - 1))
        kinds = [
            index,
            st.lists(index, min_size=1, max_size=10),
            st.just(range(a, b + 1, draw(st.integers(1, 4)))),
            st.just(slice(a, b + 1, draw(st.integers(1, 4)))),
            st.sampled_from([n for n in _NAMED if n != "first_half" or depth > 1]),
            st.just(f"{a}-{b}," + ",".join(str(draw(index)) for _ in range(draw(st.integers(0, 3))))),
            st.floats(0.0, 1.0, exclude_min=True, allow_nan=False),
            st.none(),
        ]
    return depth, draw(st.one_of(kinds))


def _check_indices(idx: list[int], depth: int) -> None:
    assert idx, "empty results must raise, not return []"
    assert idx == sorted(set(idx))
    assert all(0 <= i < depth for i in idx)


@settings(max_examples=300, deadline=None)
@given(depth_and_spec(), st.integers(1, 6), st.booleans())
def test_select_layers_property(ds: tuple[int, object], every: int, with_start: bool) -> None:
    depth, spec = ds
    base = mt.select_layers(spec, depth)
    _check_indices(base, depth)
    strided = mt.select_layers(mt.LayerSpec(spec, every=every), depth)
    _check_indices(strided, depth)
    assert strided == [i for i in base if (i - base[0]) % every == 0]
    assert strided == mt.select_layers(spec, depth, every=every)
    if with_start:
        start = base[-1]
        assert mt.select_layers(spec, depth, every=every, start=start) == [start]


@settings(max_examples=300, deadline=None)
@given(depth_and_spec(risky=True))
def test_select_layers_property_fraction_pairs_and_slices(ds: tuple[int, object]) -> None:
    # BUG: fails through the two select_layers bugs above ((lo, hi) near the top, negative-step slices).
    depth, spec = ds
    try:
        idx = mt.select_layers(spec, depth)
    except mt.SelectorError:
        assert isinstance(spec, slice) and not range(depth)[spec]  # only an empty slice may raise
        return
    _check_indices(idx, depth)
    if isinstance(spec, slice):
        assert idx == sorted(range(depth)[spec])


def test_select_views_by_spec_or_paths() -> None:
    from modulart.core.select import select_views

    class V:
        def __init__(self, path: str) -> None:
            self.path, self.module = path, nn.Identity()

    views = [V(f"layers.{i}.mlp") for i in range(6)]
    assert [v.path for v in select_views(views, "last_half", field="F")] == [
        "layers.3.mlp",
        "layers.4.mlp",
        "layers.5.mlp",
    ]
    assert [v.path for v in select_views(views, ["layers.5.mlp", "layers.0.mlp"], field="F")] == [
        "layers.5.mlp",
        "layers.0.mlp",
    ]
    with pytest.raises(mt.SelectorError, match=r"Cfg.layers: no FFN at \['layers.9.mlp'\]"):
        select_views(views, ["layers.9.mlp"], field="Cfg.layers", what="FFN")
    with pytest.raises(mt.SelectorError, match="depth 6"):
        select_views(views, [8], field="F")
