"""Artefacts are verified (dtype, shape, sha256 per tensor), typed on every corruption, never lost by a crash."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import modulart as mt
from modulart.core import io


# --- helpers ------------------------------------------------------------------------------------
def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))


def _kv_artefact(d: Path, model: torch.nn.Module) -> Path:
    h = mt.kv.apply(model, target="values", mode="lora", rank=2)
    state = h.state_dict()  # lora_B = 0 at first: made random so that the outputs change
    h.load_state_dict({k: torch.randn_like(v) if k.endswith("lora_B") else v for k, v in state.items()})  # type: ignore[arg-type]
    h.save(d)
    h.remove()
    return d


def _rewrite(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the artefact's tensors *consistently* (the JSON's dtype, shape and sha256 follow)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / io.STATE_NAME))
    meta = json.loads((d / io.CONFIG_NAME).read_text())
    meta["tensors"] = {
        k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "sha256": io.tensor_digest(v)}
        for k, v in tensors.items()
    }
    (d / io.CONFIG_NAME).write_text(json.dumps(meta))


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int, dict[str, bool]]:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        hooks,
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_unchanged(model: torch.nn.Module, snap: tuple[dict[str, torch.Tensor], int, dict[str, bool]]) -> None:
    now = _snapshot(model)
    assert now[0].keys() == snap[0].keys() and all(torch.equal(now[0][k], snap[0][k]) for k in snap[0])
    assert now[1:] == snap[1:]


# --- verification -------------------------------------------------------------------------------
def test_save_records_dtype_shape_and_sha256_of_every_tensor(tmp_path: Path) -> None:
    t = {"a": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors=t)
    meta = json.loads((tmp_path / "a" / io.CONFIG_NAME).read_text())
    assert meta["format_version"] == io.FORMAT_VERSION == 3
    assert meta["tensors"]["a"] == {"dtype": "int64", "shape": [2, 3], "sha256": io.tensor_digest(t["a"])}
    assert meta["tensors"]["b"]["dtype"] == "bfloat16" and meta["tensors"]["b"]["shape"] == [4]
    back = io.load_artifact(tmp_path / "a").tensors
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_a_flipped_byte_in_tensor_data_is_refused_naming_file_and_tensor(tmp_path: Path) -> None:
    """It used to load silently with different values (and different outputs)."""
    d = io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={"w": torch.zeros(64)})
    raw = bytearray((d / io.STATE_NAME).read_bytes())
    raw[-5] ^= 0x40  # inside the data of "w"
    (d / io.STATE_NAME).write_bytes(bytes(raw))
    with pytest.raises(mt.IncompatibleArtifactError, match=r"modulart_state\.safetensors: tensor 'w' .*sha256"):
        io.load_artifact(d)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: {"w": t["w"].reshape(8, 8)}, r"tensor 'w' is float32 \[8, 8\].*says float32 \[64\]"),
        (lambda t: {"w": t["w"].double()}, r"tensor 'w' is float64"),
        (lambda t: {}, r"tensors \['w'\] are missing"),
        (lambda t: {**t, "z": torch.ones(1)}, r"holds tensors \['z'\] that modulart_config\.json does not list"),
    ],
)
def test_tensors_that_differ_from_the_json_are_refused(
    tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], match: str
) -> None:
    d = io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={"w": torch.zeros(64)})
    changed = edit(load_file(str(d / io.STATE_NAME)))
    if changed:
        save_file(changed, str(d / io.STATE_NAME))
    else:
        (d / io.STATE_NAME).unlink()
    with pytest.raises(mt.IncompatibleArtifactError, match=match):
        io.load_artifact(d)


def test_truncated_or_garbled_safetensors_is_a_typed_error(tmp_path: Path) -> None:
    """A truncated file raised ``SafetensorError``, which is not a modulart error."""
    d = io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={"w": torch.zeros(64)})
    raw = (d / io.STATE_NAME).read_bytes()
    for cut in (3, 8, 20, len(raw) - 1):
        (d / io.STATE_NAME).write_bytes(raw[:cut])
        with pytest.raises(mt.IncompatibleArtifactError, match=r"modulart_state\.safetensors"):
            io.load_artifact(d)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("operator", 1),
        ("operator", ""),
        ("config", []),
        ("state", "x"),
        ("tensors", "w"),
        ("tensors", {"w": {"dtype": "float32", "shape": "64", "sha256": "0"}}),
        ("tensors", {"w": [1]}),
        ("format_version", "3"),
        ("format_version", True),
        ("format_version", 0),
        ("selector", 3),
        ("base_model", "abc"),
        ("base_model", {"kind": "sampled", "tensors": {"w": 3}}),
        ("extra", [1]),
        ("library_version", 2),
    ],
)
def test_malformed_json_fields_are_typed_errors_naming_the_field(tmp_path: Path, field: str, value: Any) -> None:
    d = io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={"w": torch.zeros(2)})
    meta = json.loads((d / io.CONFIG_NAME).read_text())
    meta[field] = value
    (d / io.CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(mt.IncompatibleArtifactError, match=rf"modulart_config\.json.*{field}"):
        io.load_artifact(d)


def test_format_2_artefacts_of_modulart_0_2_still_load(tmp_path: Path) -> None:
    model = _mlp()
    base = model(torch.ones(2, 8))
    d = _kv_artefact(tmp_path / "kv", model)
    meta = json.loads((d / io.CONFIG_NAME).read_text())
    meta["format_version"] = 2
    meta["tensors"] = sorted(meta["tensors"])  # 0.2 lists the names only
    (d / io.CONFIG_NAME).write_text(json.dumps(meta))
    h = mt.load(model, d)
    assert not torch.equal(model(torch.ones(2, 8)), base)
    h.remove()
    meta["tensors"].append("2.lora_C")
    (d / io.CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(mt.IncompatibleArtifactError, match=r"\['2\.lora_C'\] are missing"):
        io.load_artifact(d)


# --- handle states are checked against the handle's own before anything changes --------------------
def test_emoe_centroids_of_the_wrong_dtype_or_labels_out_of_range_are_refused_at_load(tmp_path: Path) -> None:
    """fp16 centroids used to load; labels outside [0, N) raised an untyped-for-artefacts ShapeError."""
    model = _mlp()
    h = mt.emoe.apply(model, num_experts=4, top_k=2)
    d = h.save(tmp_path / "emoe")
    h.remove()
    good = load_file(str(d / io.STATE_NAME))
    snap = _snapshot(model)
    cen = next(k for k in good if k.endswith("centroids"))
    lab = next(k for k in good if k.endswith("labels"))
    for bad, match in (
        ({**good, cen: good[cen].half()}, rf"'{re.escape(cen)}' is float16.*expected float32"),
        ({**good, cen: good[cen][:3]}, re.escape(cen)),
        ({**good, lab: torch.full_like(good[lab], 99)}, "labels must lie in"),
        ({**good, lab: good[lab].float()}, rf"'{re.escape(lab)}' is float32.*expected int64"),
    ):
        _rewrite(d, bad)
        with pytest.raises(mt.IncompatibleArtifactError, match=match):
            mt.load(model, d)
        _assert_unchanged(model, snap)


def test_live_load_state_dict_checks_dtype_before_changing_anything() -> None:
    model = _mlp()
    h = mt.kv.apply(model, target="values", mode="lora", rank=2)
    before = {k: v.clone() for k, v in h.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in h.state_dict().items()}
    with pytest.raises(mt.IncompatibleArtifactError, match=r"KVHandle state entry .* is float64"):
        h.load_state_dict(bad)
    with pytest.raises(mt.IncompatibleArtifactError, match="not a tensor or JSON value"):
        h.load_state_dict({"2.lora_A": object()})  # type: ignore[dict-item]
    after = h.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # type: ignore[arg-type]
    h.remove()


# --- seeded fuzz: every corrupted artefact is refused typed, or loads to the same outputs ------------
def _corrupt(rng: random.Random, d: Path) -> None:
    """One random corruption of the artefact ``d``."""
    state, cfg = d / io.STATE_NAME, d / io.CONFIG_NAME
    raw = bytearray(state.read_bytes())
    n = int.from_bytes(raw[:8], "little")  # the header length
    kind = rng.choice(["data", "header", "truncate", "json", "shape", "dtype"])
    if kind == "data":
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(8 + n, len(raw))] ^= 1 << rng.randrange(8)
        state.write_bytes(bytes(raw))
    elif kind == "header":
        raw[rng.randrange(0, 8 + n)] ^= 1 << rng.randrange(8)
        state.write_bytes(bytes(raw))
    elif kind == "truncate":
        state.write_bytes(bytes(raw[: rng.randrange(0, len(raw))]))
    elif kind == "json":
        meta = json.loads(cfg.read_text())
        field = rng.choice(["operator", "config", "tensors", "state", "format_version", "selector", "entry"])
        junk = rng.choice([None, 1, "x", [], {}, True, -1, 1.5])
        if field == "config" and junk == {}:
            junk = []  # an empty config is a valid edit (the defaults), not a corruption
        if field == "entry":
            name = rng.choice(sorted(meta["tensors"]))
            meta["tensors"][name][rng.choice(["dtype", "shape", "sha256"])] = junk
        else:
            meta[field] = junk
        cfg.write_text(json.dumps(meta))
    else:  # a consistent rewrite: the file verifies, the handle must refuse it
        tensors = load_file(str(state))
        name = rng.choice(sorted(tensors))
        t = tensors[name]
        if kind == "shape":
            tensors[name] = torch.zeros(t.shape[0] + rng.randint(1, 3), *t.shape[1:]) if t.dim() else t.reshape(1)
        else:
            tensors[name] = t.to(rng.choice([torch.float64, torch.float16, torch.int64]))
        _rewrite(d, tensors)


def test_fuzzed_artefacts_are_refused_typed_or_load_identically(tmp_path: Path) -> None:
    rng = random.Random(1234)
    model = _mlp()
    x = torch.randn(3, 8)
    plain = model(x).detach()
    good = _kv_artefact(tmp_path / "good", model)
    h = mt.load(model, good)
    expected = model(x).detach()
    h.remove()
    snap = _snapshot(model)
    outcomes = {"refused": 0, "identical": 0}
    for i in range(120):
        d = tmp_path / f"c{i}"
        d.mkdir()
        for f in (io.CONFIG_NAME, io.STATE_NAME):
            (d / f).write_bytes((good / f).read_bytes())
        _corrupt(rng, d)
        try:
            h = mt.load(model, d)
        except mt.IncompatibleArtifactError:
            outcomes["refused"] += 1
            _assert_unchanged(model, snap)
            assert torch.equal(model(x), plain)
            continue
        assert torch.equal(model(x).detach(), expected), f"corruption {i} loaded with different outputs"
        h.remove()
        _assert_unchanged(model, snap)
        outcomes["identical"] += 1
    assert outcomes["refused"] >= 100, outcomes


# --- no moment without an artefact: crash at the worst point ----------------------------------------
_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from modulart.core import io
    target, point, fallback = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if fallback:
        io._renameat2 = None
    def crash(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)
    io._crash_point = crash
    io.save_artifact(target, operator="demo", config={"v": 2}, tensors={"x": torch.full((4,), 2.0)})
    """
)


def _exchange_works(tmp: Path) -> bool:
    a, b = tmp / "xa", tmp / "xb"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    ok = io._exchange(a, b)
    done = ok and (b / "f").is_file()
    for p in (a, b):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    return bool(done)


@pytest.mark.parametrize(("point", "fallback"), [("after-first-rename", True), ("after-exchange", False)])
def test_a_write_killed_at_the_worst_point_leaves_a_loadable_artefact(
    tmp_path: Path, point: str, fallback: bool
) -> None:
    if not fallback and not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    target = tmp_path / "art"
    io.save_artifact(target, operator="demo", config={"v": 1}, tensors={"x": torch.ones(4)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(target), point, "1" if fallback else "0"], env=env, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "art")
    assert leftovers, "the child was killed mid-swap: it leaves a backup or a temp folder behind"
    art = io.load_artifact(target)  # the load repairs: restores the backup / drops the temp folder
    assert art.config["v"] == (1 if fallback else 2)
    assert torch.equal(art.tensors["x"], torch.full((4,), float(art.config["v"])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_the_exchange_is_used_where_linux_has_it(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux") or io._renameat2 is None:
        pytest.skip("no renameat2 in this C library")
    if not _exchange_works(tmp_path):
        pytest.skip("this filesystem does not support RENAME_EXCHANGE")
    target = tmp_path / "art"
    io.save_artifact(target, operator="demo", config={"v": 1}, tensors={})
    seen: list[str] = []
    old = io._crash_point
    io._crash_point = seen.append  # type: ignore[assignment]
    try:
        io.save_artifact(target, operator="demo", config={"v": 2}, tensors={})
    finally:
        io._crash_point = old  # type: ignore[assignment]
    assert seen == ["after-exchange"] and io.load_artifact(target).config == {"v": 2}


def test_an_unknown_operator_name_is_an_artefact_error_and_an_operator_not_found_error(tmp_path: Path) -> None:
    d = io.save_artifact(tmp_path / "a", operator="nope", config={}, tensors={})
    with pytest.raises(mt.IncompatibleArtifactError, match=r"artefact .*a: .*'nope'") as info:
        mt.load(_mlp(), d)
    assert isinstance(info.value, mt.OperatorNotFoundError)


def _emoe_artefact(d: Path, model: torch.nn.Module) -> Path:
    h = mt.emoe.apply(model, num_experts=4, top_k=2)
    h.save(d)
    h.remove()
    return d


def _migu_artefact(d: Path, model: torch.nn.Module) -> Path:
    h = mt.migu.apply(model)
    h.save(d)
    h.remove()
    return d


@pytest.mark.slow
@pytest.mark.parametrize("make", [_kv_artefact, _emoe_artefact, _migu_artefact], ids=["kv", "emoe", "migu"])
def test_fuzzed_artefacts_of_every_stateful_operator(
    tmp_path: Path, make: Callable[[Path, torch.nn.Module], Path]
) -> None:
    rng = random.Random(99)
    model = _mlp()
    x = torch.randn(3, 8)
    plain = model(x).detach()
    good = make(tmp_path / "good", model)
    h = mt.load(model, good)
    expected = model(x).detach()
    h.remove()
    snap = _snapshot(model)
    refused = 0
    for i in range(400):
        d = tmp_path / f"c{i}"
        d.mkdir()
        for f in (io.CONFIG_NAME, io.STATE_NAME):
            (d / f).write_bytes((good / f).read_bytes())
        _corrupt(rng, d)
        try:
            h = mt.load(model, d)
        except mt.IncompatibleArtifactError:
            refused += 1
            _assert_unchanged(model, snap)
            assert torch.equal(model(x), plain)
            continue
        assert torch.equal(model(x).detach(), expected), f"corruption {i} loaded with different outputs"
        h.remove()
        _assert_unchanged(model, snap)
    assert refused >= 300
