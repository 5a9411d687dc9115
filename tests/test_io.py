"""Artefacts: fingerprints, atomic writes, loading errors, Hub helpers (offline)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modulart as mt
from modulart.core import io


def test_fingerprint_sees_fine_tuning_and_names_the_tensor() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    fp = mt.fingerprint(model)
    assert mt.fingerprint(model).matches(fp) and mt.fingerprint(model).digest == fp.digest
    with torch.no_grad():
        model[1].weight.add_(0.01 * torch.randn_like(model[1].weight))  # a fine-tuning step, everywhere
    assert mt.fingerprint(model).diff(fp) == ["1.weight: values differ"]


def test_fingerprint_sees_a_change_at_a_sampled_position_only() -> None:
    """The documented limit: one changed element outside the sample is not seen; inside it is."""
    from modulart.core.fingerprint import _positions

    model = torch.nn.Linear(256, 256)
    fp = mt.fingerprint(model)
    sampled = {tuple(int(i) for i in ix) for ix in zip(*_positions("weight", (256, 256), 16), strict=True)}
    outside = next((r, c) for r in range(256) for c in range(256) if (r, c) not in sampled)
    inside = next(iter(sampled))
    with torch.no_grad():
        model.weight[outside] += 1.0
    assert mt.fingerprint(model).matches(fp)
    with torch.no_grad():
        model.weight[inside] += 1.0
    assert mt.fingerprint(model).diff(fp) == ["weight: values differ"]


def test_fingerprint_names_shape_dtype_and_missing() -> None:
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 3))
    diffs = " ".join(mt.fingerprint(b).diff(mt.fingerprint(a)))
    assert "0.weight: dtype differ" in diffs and "1.weight: shape differ" in diffs
    c = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert "missing in the model" in " ".join(mt.fingerprint(c).diff(mt.fingerprint(a)))


@given(st.integers(1, 5000), st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64]))
def test_fingerprint_sees_a_different_tensor(n: int, dtype: torch.dtype) -> None:
    t = torch.arange(n).to(dtype)
    before = io.fingerprint({"t": t})
    assert io.fingerprint({"t": t.clone()}).matches(before)
    changed = t * 2 + 1  # differs from x for every x, in every dtype
    assert not io.fingerprint({"t": changed}).matches(before)


def test_fingerprint_is_cheap_and_skips_what_modulart_owns() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    holder = torch.nn.Module()
    holder._modulart_owned = True
    holder.w = torch.nn.Parameter(torch.ones(3))
    model.add_module("owned", holder)
    fp = mt.fingerprint(model)
    assert sorted(fp.tensors) == ["0.bias", "0.weight"]
    assert all(len(t.sample) <= 16 for t in fp.tensors.values())


def test_save_load_round_trip_and_no_pickle(tmp_path: Path) -> None:
    shared = torch.randn(3, 4)
    io.save_artifact(
        tmp_path / "a",
        operator="demo",
        config={"k": [1, 2]},
        tensors={"x": shared, "view": shared[0]},
        selector="mlp",
        resolved=["0.mlp"],
    )
    art = io.load_artifact(tmp_path / "a")
    assert art.operator == "demo" and art.config == {"k": [1, 2]}
    assert torch.equal(art.tensors["x"], shared) and torch.equal(art.tensors["view"], shared[0])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [".modulart-output", "modulart_config.json", "modulart_state.safetensors"]


def test_atomic_write_interrupted_leaves_old_artefact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io.save_artifact(tmp_path / "a", operator="demo", config={"v": 1}, tensors={"x": torch.ones(2)})

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_artifact(tmp_path / "a", operator="demo", config={"v": 2}, tensors={"x": torch.zeros(2)})
    art = io.load_artifact(tmp_path / "a")
    assert art.config == {"v": 1} and torch.equal(art.tensors["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp dirs left


def test_atomic_write_fresh_target_crash_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), io.atomic_directory(tmp_path / "new") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "modulart_config.json is missing"),
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a modulart artefact"),
        ('{"format": "modulart-artifact", "format_version": 99, "operator": "x"}', "upgrade modulart"),
        ('{"format": "modulart-artifact", "format_version": 1, "operator": "x", "tensors": ["w"]}', "incomplete"),
    ],
)
def test_load_errors(tmp_path: Path, content: str | None, match: str) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    if content is not None:
        (d / "modulart_config.json").write_text(content)
    with pytest.raises(mt.IncompatibleArtifactError, match=match):
        io.load_artifact(d)


def test_resolve_artifact_local_dir_and_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = io.save_artifact(tmp_path / "local", operator="demo", config={}, tensors={"x": torch.ones(1)})
    assert mt.resolve_artifact(art) == art
    # A repo in the Hugging Face cache layout is found offline.
    cache = tmp_path / "cache"
    snap = cache / "models--someone--gains" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in art.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--someone--gains" / "refs").mkdir()
    (cache / "models--someone--gains" / "refs" / "main").write_text("a" * 40)
    got = mt.resolve_artifact("someone/gains", cache_dir=str(cache), local_files_only=True)
    assert io.load_artifact(got).tensors["x"].item() == 1.0
    with pytest.raises(mt.IncompatibleArtifactError, match="offline, not in the cache"):
        mt.resolve_artifact("someone/missing", cache_dir=str(cache), local_files_only=True)
    with pytest.raises(mt.IncompatibleArtifactError, match="neither an artefact directory"):
        mt.resolve_artifact("not a//valid id", cache_dir=str(cache), local_files_only=True)


def test_push_to_hub_uploads_only_the_artefact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    art = io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={"x": torch.ones(1)})
    calls: dict[str, Any] = {}

    class FakeApi:
        def __init__(self, token: str | None = None) -> None:
            calls["token"] = token

        def create_repo(self, repo_id: str, **kw: Any) -> None:
            calls["create"] = (repo_id, kw)

        def upload_folder(self, **kw: Any) -> Any:
            calls["upload"] = kw
            return type("Info", (), {"commit_url": f"https://hub/{kw['repo_id']}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = mt.push_to_hub(art, "me/gains", token="t")
    assert url.endswith("me/gains/commit/1") and calls["create"][1]["exist_ok"] is True
    assert calls["upload"]["folder_path"] == str(art)
    assert "modulart_config.json" in calls["upload"]["allow_patterns"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(mt.IncompatibleArtifactError):
        mt.push_to_hub(tmp_path / "empty", "me/x")


def test_saved_json_is_plain(tmp_path: Path) -> None:
    fp = mt.fingerprint(torch.nn.Linear(2, 2))
    io.save_artifact(tmp_path / "a", operator="demo", config={"a": 1}, tensors={}, fingerprint=fp)
    meta = json.loads((tmp_path / "a" / "modulart_config.json").read_text())
    assert meta["base_model"]["digest"] == fp.digest and meta["tensors"] == {}
    assert io.load_artifact(tmp_path / "a").tensors == {}


def test_state_json_values_round_trip_and_non_json_is_refused(tmp_path: Path) -> None:
    state = {"w": torch.ones(2), "counters": {"next": 3}, "ids": ["a", "b"]}
    io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors=state)
    art = io.load_artifact(tmp_path / "a")
    assert art.state["counters"] == {"next": 3} and art.state["ids"] == ["a", "b"]
    assert torch.equal(art.state["w"], torch.ones(2))  # type: ignore[arg-type]
    with pytest.raises(mt.IncompatibleArtifactError, match=r"'bad'.*JSON"):
        io.save_artifact(tmp_path / "b", operator="demo", config={}, tensors={"bad": object()})
    assert not (tmp_path / "b").exists()


def test_format_1_fingerprints_are_still_read(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 3)
    io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={})
    meta_path = tmp_path / "a" / "modulart_config.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta["tensors"] = []  # format 1 and 2 list the names only
    meta["base_model"] = {"digest": "x", "tensors": {"weight": "float32|3x2|ab", "bias": "float32|3|cd"}}
    meta_path.write_text(json.dumps(meta))
    io.load_artifact(tmp_path / "a").check_fingerprint(model)  # names, dtypes and shapes agree
    with pytest.raises(mt.IncompatibleArtifactError, match="shape differ"):
        io.load_artifact(tmp_path / "a").check_fingerprint(torch.nn.Linear(2, 4))


def test_save_never_replaces_a_folder_modulart_did_not_write(tmp_path: Path) -> None:
    """``save`` used to rename any existing folder away and delete it: a user's files were lost."""
    user = tmp_path / "ckpt"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"user weights")
    with pytest.raises(mt.UnsafePathError, match=r"did not write.*model\.safetensors"):
        io.save_artifact(user, operator="demo", config={}, tensors={"x": torch.ones(1)})
    assert (user / "model.safetensors").read_bytes() == b"user weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left either
    (tmp_path / "file").write_text("x")
    with pytest.raises(mt.UnsafePathError, match="not a directory"):
        io.save_artifact(tmp_path / "file", operator="demo", config={}, tensors={})
    assert (tmp_path / "file").read_text() == "x"


def test_save_replaces_its_own_artefact_and_legacy_artefacts(tmp_path: Path) -> None:
    io.save_artifact(tmp_path / "a", operator="demo", config={"v": 1}, tensors={})
    io.save_artifact(tmp_path / "a", operator="demo", config={"v": 2}, tensors={})
    assert io.load_artifact(tmp_path / "a").config == {"v": 2}
    (tmp_path / "a" / io.OUTPUT_MARKER).unlink()  # written by modulart 0.1: recognised by its config
    io.save_artifact(tmp_path / "a", operator="demo", config={"v": 3}, tensors={})
    assert io.load_artifact(tmp_path / "a").config == {"v": 3}
    (tmp_path / "empty").mkdir()
    io.save_artifact(tmp_path / "empty", operator="demo", config={}, tensors={})


def test_output_equal_to_inside_or_containing_an_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w")
    for out in (tmp_path, src, src / "model.safetensors"):
        with (
            pytest.raises(mt.UnsafePathError, match="is the input"),
            io.atomic_directory(out, sources=[src / "model.safetensors"]),
        ):
            raise AssertionError("must not be reached")
    assert (src / "model.safetensors").read_bytes() == b"w"


def test_temp_folders_of_killed_writes_are_cleaned_and_folders_honour_the_umask(tmp_path: Path) -> None:
    dead = tmp_path / ".a.tmp-999999999-deadbeef"  # a pid that cannot exist: the writer was killed
    dead.mkdir()
    alive = tmp_path / f".a.tmp-{os.getpid()}-cafebabe"  # a write still running in this process
    alive.mkdir()
    old = os.umask(0o022)
    try:
        io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={})
    finally:
        os.umask(old)
    assert not dead.exists() and alive.exists()
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755


# --- overwrite= and output kinds ------------------------------------------------------------------
def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_the_artefacts_own_files(tmp_path: Path) -> None:
    """``overwrite=True`` into a folder of the user's: every other file is kept byte for byte."""
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_bytes(b"my notes\x00\xff")
    (user / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = _tree(user)
    with pytest.raises(mt.UnsafePathError, match=r"did not write.*overwrite=True"):
        io.save_artifact(user, operator="demo", config={}, tensors={"x": torch.ones(2)})
    assert _tree(user) == before
    io.save_artifact(user, operator="demo", config={"v": 1}, tensors={"x": torch.ones(2)}, overwrite=True)
    after = _tree(user)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {io.CONFIG_NAME, io.STATE_NAME, io.OUTPUT_MARKER}
    assert io.output_kind(user) == "artifact" and io.load_artifact(user).config == {"v": 1}
    # now an artefact: a plain save replaces it, still keeping the user's files
    io.save_artifact(user, operator="demo", config={"v": 2}, tensors={})
    again = _tree(user)
    assert {k: again[k] for k in before} == before and io.STATE_NAME not in again
    assert io.load_artifact(user).config == {"v": 2}


def test_an_output_of_another_kind_is_refused_without_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "out"
    with io.atomic_directory(d, kind="report") as tmp:
        (tmp / "report.json").write_text("{}")
    assert io.output_kind(d) == "report"
    with pytest.raises(mt.UnsafePathError, match="a modulart report output, not an artifact"):
        io.save_artifact(d, operator="demo", config={}, tensors={})
    assert (d / "report.json").read_text() == "{}"
    io.save_artifact(d, operator="demo", config={}, tensors={}, overwrite=True)
    assert (d / "report.json").read_text() == "{}" and io.output_kind(d) == "artifact"
    with pytest.raises(mt.ConfigError, match="kind = 'nope'"), io.atomic_directory(tmp_path / "x", kind="nope"):
        pass


def test_overwrite_never_allows_an_output_related_to_an_input(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w")
    for out in (src, tmp_path):
        with (
            pytest.raises(mt.UnsafePathError, match="is the input"),
            io.atomic_directory(out, sources=[src], overwrite=True),
        ):
            raise AssertionError("must not be reached")
    assert (src / "model.safetensors").read_bytes() == b"w"


def test_handle_save_takes_overwrite(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    h = mt.kv.apply(model, target="values", mode="lora", rank=2)
    user = tmp_path / "u"
    user.mkdir()
    (user / "keep.txt").write_text("keep")
    with pytest.raises(mt.UnsafePathError):
        h.save(user)
    h.save(user, overwrite=True)
    assert (user / "keep.txt").read_text() == "keep"
    h.remove()
    again = mt.load(model, user)
    assert sorted(again.state_dict()) == ["2.lora_A", "2.lora_B"]
    again.remove()


def test_report_save_takes_overwrite_and_keeps_the_figures(tmp_path: Path) -> None:
    from modulart.introspect import Report, report
    from modulart.introspect.toy import toy_moe

    rep = report(toy_moe(), progress=False)
    out = tmp_path / "rep"
    rep.save(out)
    (out / "fig.png").write_bytes(b"png")  # what `modulart inspect` plots next to the report
    rep.save(out)  # a report replaces a report; the figure is not the report's
    assert (out / "fig.png").read_bytes() == b"png"
    art = io.save_artifact(tmp_path / "art", operator="demo", config={}, tensors={})
    with pytest.raises(mt.UnsafePathError, match="artifact output, not an report"):
        rep.save(art)
    rep.save(art, overwrite=True)
    assert io.load_artifact(art).operator == "demo" and Report.load(art).layers == rep.layers
    ckpt = _tiny_ckpt(tmp_path / "ckpt")
    for out in (ckpt, ckpt / "introspect"):
        with pytest.raises(mt.UnsafePathError, match="is the input"):
            rep.save(out, sources=[ckpt], overwrite=True)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors"]


def test_report_load_wraps_bad_files(tmp_path: Path) -> None:
    from modulart.introspect import Report, report
    from modulart.introspect.toy import toy_moe

    out = report(toy_moe(), progress=False).save(tmp_path / "rep")
    raw = (out / "arrays.safetensors").read_bytes()
    (out / "arrays.safetensors").write_bytes(raw[:20])
    with pytest.raises(mt.IncompatibleArtifactError, match=r"arrays\.safetensors: not a readable"):
        Report.load(out)
    meta = json.loads((out / "report.json").read_text())
    for field, value in (("layers", "x"), ("meta", [])):
        (out / "report.json").write_text(json.dumps({**meta, field: value}))
        with pytest.raises(mt.IncompatibleArtifactError, match=f"field '{field}'"):
            Report.load(out)
    (out / "report.json").write_text("{nope")
    with pytest.raises(mt.IncompatibleArtifactError, match="not valid JSON"):
        Report.load(out)


def _tiny_ckpt(d: Path) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    save_file({"layers.0.w": torch.ones(2), "layers.1.w": torch.zeros(2)}, str(d / "model.safetensors"))
    return d


def test_grow_overwrite_replaces_a_grown_checkpoint_but_never_user_files_or_the_source(tmp_path: Path) -> None:
    import modulart.stacking as st

    src = _tiny_ckpt(tmp_path / "src")
    dst = tmp_path / "big"
    st.grow_checkpoint(src, dst, 2, progress=False)
    assert io.output_kind(dst) == "checkpoint"
    (dst / "README.md").write_text("mine")  # a file the user put there
    st.grow_checkpoint(src, dst, 3, progress=False, overwrite=True)
    assert (dst / "README.md").read_text() == "mine"
    assert json.loads((dst / "modulart_growth.json").read_text())["plan"]["indices"] == [0, 1, 0, 1, 0, 1]
    user = tmp_path / "user"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"user weights")
    with pytest.raises(mt.UnsafePathError, match="did not write"):
        st.grow_checkpoint(src, user, 2, progress=False, overwrite=True)
    assert (user / "model.safetensors").read_bytes() == b"user weights"
    # inside the source folder: it used to be written there (only equality was checked)
    with pytest.raises(mt.UnsafePathError, match="is the input"):
        st.grow_checkpoint(src, src / "big", 2, progress=False)
    with pytest.raises(mt.UnsafePathError, match="is the input"):
        st.grow_checkpoint(src, tmp_path, 2, progress=False, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == ["model.safetensors"]


# --- killed writes are repaired by the next load too -----------------------------------------------
def test_a_load_restores_a_backup_and_removes_temp_folders_of_killed_writes(tmp_path: Path) -> None:
    io.save_artifact(tmp_path / "a", operator="demo", config={"v": 1}, tensors={"x": torch.ones(1)})
    (tmp_path / "a").rename(tmp_path / ".a.old-999999999-0badf00d")  # killed between the renames
    (tmp_path / ".a.tmp-999999999-deadbeef").mkdir()  # killed while writing
    assert io.load_artifact(tmp_path / "a").config == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (tmp_path / "a").rename(tmp_path / ".a.old-999999999-0badf00d")
    assert io.resolve_artifact(tmp_path / "a") == tmp_path / "a"  # what mt.load calls first


def test_a_report_load_repairs_a_killed_write(tmp_path: Path) -> None:
    from modulart.introspect import Report, report
    from modulart.introspect.toy import toy_moe

    out = report(toy_moe(), progress=False).save(tmp_path / "rep")
    out.rename(tmp_path / ".rep.old-999999999-0badf00d")
    (tmp_path / ".rep.tmp-999999999-deadbeef").mkdir()
    assert Report.load(out).layers == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


# --- readers refuse paths that leave their folder --------------------------------------------------
def _sharded(d: Path, outside: Path) -> Path:
    from safetensors.torch import save_file

    d.mkdir()
    save_file({"layers.0.w": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    outside.mkdir(exist_ok=True)
    save_file({"layers.1.w": torch.ones(2)}, str(outside / "secret.safetensors"))
    return d


def _index(d: Path, second: str) -> None:
    weight_map = {"layers.0.w": "model-00001-of-00002.safetensors", "layers.1.w": second}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _entries(tmp_path: Path) -> list[tuple[str, str]]:
    outside = tmp_path / "outside"
    return [
        ("dotdot", "../outside/secret.safetensors"),
        ("absolute", str(outside / "secret.safetensors")),
        ("symlink", "link.safetensors"),
    ]


@pytest.mark.parametrize("reader", ["stacking", "introspect"])
def test_checkpoint_readers_refuse_index_entries_that_leave_the_folder(tmp_path: Path, reader: str) -> None:
    """``grow_checkpoint`` read shards outside the source folder when the index pointed there."""
    from modulart.introspect.stored import checkpoint_index
    from modulart.stacking.source import open_source

    read = open_source if reader == "stacking" else checkpoint_index
    for case, entry in _entries(tmp_path):
        d = _sharded(tmp_path / case, tmp_path / "outside")
        if case == "symlink":
            (d / "link.safetensors").symlink_to(tmp_path / "outside" / "secret.safetensors")
        _index(d, entry)
        with pytest.raises(mt.UnsafePathError, match=rf"model\.safetensors\.index\.json names .*{re.escape(str(d))}"):
            read(d)


@pytest.mark.parametrize("reader", ["stacking", "introspect"])
def test_checkpoint_readers_refuse_shards_that_are_symlinks_out_of_the_folder(tmp_path: Path, reader: str) -> None:
    from safetensors.torch import save_file

    from modulart.introspect.stored import checkpoint_index
    from modulart.stacking.source import open_source

    read = open_source if reader == "stacking" else checkpoint_index
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"layers.1.w": torch.ones(2)}, str(outside / "secret.safetensors"))
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"layers.0.w": torch.ones(2)}, str(d / "a.safetensors"))
    (d / "b.safetensors").symlink_to(outside / "secret.safetensors")
    with pytest.raises(mt.UnsafePathError, match=r"'b\.safetensors'.*outside the folder"):
        read(d)
    # a Hugging Face cache snapshot links into the repo's blobs/: that is allowed
    snap = tmp_path / "models--x" / "snapshots" / "abc"
    blobs = tmp_path / "models--x" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    save_file({"layers.0.w": torch.ones(2)}, str(blobs / "123"))
    (snap / "model.safetensors").symlink_to(blobs / "123")
    assert "layers.0.w" in (read(snap).names if reader == "stacking" else read(snap))  # type: ignore[attr-defined]


def test_grow_refuses_a_traversing_index_before_writing_anything(tmp_path: Path) -> None:
    import modulart.stacking as st

    d = _sharded(tmp_path / "src", tmp_path / "outside")
    _index(d, "../outside/secret.safetensors")
    with pytest.raises(mt.UnsafePathError, match=r"names '\.\./outside/secret\.safetensors', which leaves"):
        st.grow_checkpoint(d, tmp_path / "out", 2, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_companion_file_linking_out_of_the_source_is_not_copied(tmp_path: Path) -> None:
    import modulart.stacking as st

    src = _tiny_ckpt(tmp_path / "src")
    (tmp_path / "secret.txt").write_text("secret")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(mt.UnsafePathError, match=r"'tokenizer\.json'"):
        st.grow_checkpoint(src, tmp_path / "out", 2, progress=False)
    assert not (tmp_path / "out").exists()


def test_artefact_and_report_files_that_link_out_of_their_folder_are_refused(tmp_path: Path) -> None:
    from modulart.introspect import Report, report
    from modulart.introspect.toy import toy_moe

    d = io.save_artifact(tmp_path / "a", operator="demo", config={}, tensors={"x": torch.ones(1)})
    (d / io.STATE_NAME).rename(tmp_path / "elsewhere.safetensors")
    (d / io.STATE_NAME).symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(mt.UnsafePathError, match=r"'modulart_state\.safetensors'.*outside the folder"):
        io.load_artifact(d)
    out = report(toy_moe(), progress=False).save(tmp_path / "rep")
    (out / "report.json").rename(tmp_path / "elsewhere.json")
    (out / "report.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(mt.UnsafePathError, match=r"'report\.json'.*outside the folder"):
        Report.load(out)
    ckpt = _tiny_ckpt(tmp_path / "ckpt")
    (tmp_path / "index.json").write_text(json.dumps({"weight_map": {"layers.0.w": "model.safetensors"}}))
    (ckpt / "model.safetensors.index.json").symlink_to(tmp_path / "index.json")
    from modulart.introspect.stored import checkpoint_index
    from modulart.stacking.source import open_source

    for read in (open_source, checkpoint_index):
        with pytest.raises(mt.UnsafePathError, match=r"'model\.safetensors\.index\.json'.*outside"):
            read(ckpt)


def test_opening_a_checkpoint_repairs_a_killed_growth_into_it(tmp_path: Path) -> None:
    from modulart.stacking.source import open_source

    ckpt = _tiny_ckpt(tmp_path / "ckpt")
    ckpt.rename(tmp_path / ".ckpt.old-999999999-0badf00d")  # killed between the renames
    (tmp_path / ".ckpt.tmp-999999999-deadbeef").mkdir()
    assert sorted(open_source(ckpt).names) == ["layers.0.w", "layers.1.w"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_write_restores_a_backup_of_a_killed_write_before_replacing_it(tmp_path: Path) -> None:
    user = tmp_path / "a"
    io.save_artifact(user, operator="demo", config={"v": 1}, tensors={}, overwrite=True)
    (user / "mine.txt").write_text("mine")
    user.rename(tmp_path / ".a.old-999999999-0badf00d")  # killed between the renames: no "a" at all
    io.save_artifact(user, operator="demo", config={"v": 2}, tensors={})
    assert io.load_artifact(user).config == {"v": 2} and (user / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
