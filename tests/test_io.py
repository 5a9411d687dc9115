"""Artefacts: fingerprints, atomic writes, loading errors, Hub helpers (offline)."""

from __future__ import annotations

import json
import os
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
    assert meta["base_model"]["digest"] == fp.digest and meta["tensors"] == []
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
