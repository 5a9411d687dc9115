"""Every row of the bad-input catalogue raises its typed error and changes nothing.

For each row of ``tests/error_catalogue.py``: the call raises the row's error class (always a
``ModulartError``) with the row's message fragment, and the state dicts (bitwise, NaNs included),
the ``requires_grad`` flags, every module's hook dicts and every file under the catalogue's folder
are what they were before the call. The shared models are checked on every row, so a row that
mutates them fails too. ``docs/errors.md`` must be what ``scripts/gen_errors_doc.py`` generates.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import modulart as mt
from error_catalogue import CLI_ROWS, PENDING, ROWS, Ctx, Row, assert_unchanged, shared_ctx, snapshot
from modulart.core.errors import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    return shared_ctx(tmp_path_factory.mktemp)


RUN = [r for r in ROWS if r.id not in PENDING]


@pytest.mark.parametrize("row", RUN, ids=[r.id for r in RUN])
def test_row_raises_its_typed_error_and_changes_nothing(ctx: Ctx, row: Row) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = row.setup(ctx) if row.setup is not None else None
        before = snapshot(ctx, state)
        result: object = None
        try:
            with pytest.raises(row.error) as info:
                result = row.call(ctx, state)
        finally:
            remove = getattr(result, "remove", None)
            if callable(remove):  # a call that wrongly succeeded must not poison the other rows
                remove()
    assert isinstance(info.value, mt.ModulartError), f"{row.id}: untyped {type(info.value).__name__}"
    if row.match is not None:
        assert row.match in str(info.value), f"{row.id}: {str(info.value)!r} lacks {row.match!r}"
    assert_unchanged(before, snapshot(ctx, state))


def test_catalogue_is_large_and_well_formed() -> None:
    ids = [r.id for r in ROWS] + [r.id for r in CLI_ROWS]
    assert len(ids) == len(set(ids)), "duplicate row ids"
    assert len(ROWS) + len(CLI_ROWS) >= 100
    assert set(PENDING) <= {r.id for r in ROWS}, "PENDING names rows that do not exist"
    areas = {r.area for r in ROWS}
    assert {"emoe", "kv", "migu", "patcher", "stacking", "checkpoints", "introspect", "artefacts"} <= areas
    assert all(issubclass(r.error, mt.ModulartError) for r in ROWS)
    nonfinite = [r for r in ROWS if "nan" in r.id or "inf" in r.id]
    assert len(nonfinite) >= 20  # weights, configs and losses


def test_snapshot_sees_each_kind_of_change(ctx: Ctx) -> None:
    """The invariance check can fail: a weight, a flag, a hook and a file change are all detected."""
    model = ctx.fresh("plain")
    base = snapshot(ctx, model)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    nan = snapshot(ctx, model)
    assert nan != base
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    assert snapshot(ctx, model) == nan  # NaN compares equal to itself, bitwise
    model.head.weight.requires_grad_(False)
    flags = snapshot(ctx, model)
    assert flags["row:0:flags"] != nan["row:0:flags"]
    h = model.head.register_forward_hook(lambda *a: None)
    assert snapshot(ctx, model)["row:0:hooks"] != flags["row:0:hooks"]
    h.remove()
    (ctx.scratch / "probe.txt").write_text("x")
    try:
        assert snapshot(ctx, model)["files"] != flags["files"]
    finally:
        (ctx.scratch / "probe.txt").unlink()


def test_docs_errors_md_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_errors_doc", ROOT / "scripts" / "gen_errors_doc.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (ROOT / "docs" / "errors.md").read_text()
    assert text == gen.render(), "docs/errors.md is stale: run python scripts/gen_errors_doc.py"


def test_a_refused_nan_migu_step_leaves_a_working_handle(ctx: Ctx) -> None:
    """After the NaN step is refused, zeroing the gradients and stepping on a good batch trains as usual."""
    model = ctx.fresh("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the attention projections stay ungated
        h = mt.migu.apply(model, optimizer=opt)
    (model(ctx.ids).float().mean() * float("nan")).backward()
    with pytest.raises(NonFiniteError, match="NaN or inf"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(ctx.ids).float().mean().backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(bool(p.isfinite().all()) for p in model.parameters())
    h.remove()
