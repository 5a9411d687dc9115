"""The streaming weight pass's read-ahead pipeline: same numbers, bounded, errors surface, no thread left."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import modulart.introspect as mi
from modulart.core.errors import IncompatibleArtifactError
from modulart.introspect.checkpoint import CheckpointSource
from modulart.introspect.footprint import footprint
from modulart.introspect.prefetch import Job, Prefetcher
from modulart.introspect.static import _Buffers, _gram, _gram_reference, _jobs, _Plan, _reduce_layer, scan_layer
from modulart.introspect.stored import StoredMatrix, checkpoint_index


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("modulart-")]


def _ckpt(d: Path, layers: int = 3, e: int = 4, dim: int = 16, inter: int = 24) -> Path:
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        p = f"model.layers.{layer}.mlp"
        t[f"{p}.gate.weight"] = torch.randn(e, dim, generator=g)
        for x in range(e):
            for n, s in (("gate_proj", (inter, dim)), ("up_proj", (inter, dim)), ("down_proj", (dim, inter))):
                t[f"{p}.experts.{x}.{n}.weight"] = torch.randn(*s, generator=g).bfloat16()
    save_file(t, str(d / "model.safetensors"))
    return d


def test_gram_batched_is_bit_exact() -> None:
    g = torch.Generator().manual_seed(1)
    for n, p, step in ((8, 3 * 64 + 5, 64), (3, 100, 256), (5, 4 * 32, 32)):
        x = torch.randn(n, p, generator=g)
        assert torch.equal(_gram(x, step), _gram_reference(x, step))


def test_pipelined_pass_equals_layer_by_layer(tmp_path: Path) -> None:
    d = _ckpt(tmp_path)
    src = CheckpointSource(d)
    w = mi.weights(d, budget_mb=0.001, progress=False)  # many chunks per matrix
    stats = w.scan(["act", "up", "down"], pca=["act"])
    for p, s in enumerate(stats):
        ref = scan_layer(src.layer(p), ["act", "up", "down"], int(0.001 * (1 << 20)), pca=["act"])
        for m in ("act", "up", "down"):
            assert torch.equal(s.gram[m], ref.gram[m]) and torch.equal(s.neuron_mean[m], ref.neuron_mean[m])
        assert torch.equal(s.zgram["act"], ref.zgram["act"])
    assert not _threads()


def test_preadv_read_equals_get_slice(tmp_path: Path) -> None:
    gu = torch.randn(3, 12, 8).bfloat16()
    save_file({"gu": gu}, str(tmp_path / "model.safetensors"))
    entry = checkpoint_index(tmp_path)["gu"]
    assert entry.offset > 0
    for view in (gu[1][6:], gu[2][:6], gu[0]):
        fast = StoredMatrix(entry, "gu", footprint(view, gu))
        slow = StoredMatrix(type(entry)(entry.file, entry.shape, entry.dtype), "gu", footprint(view, gu))
        for c in range(3):
            assert torch.equal(fast.chunk(c, 3).tensor, slow.chunk(c, 3).tensor)
        fast.hint(1, 3)


def test_transient_reads_equal_fresh_reads_and_reuse_one_buffer(tmp_path: Path) -> None:
    gu = torch.randn(3, 12, 8).bfloat16()
    save_file({"gu": gu}, str(tmp_path / "model.safetensors"))
    entry = checkpoint_index(tmp_path)["gu"]
    StoredMatrix(entry, "gu", footprint(gu[0], gu)).chunk_transient(0, 1)  # the largest block: grown once
    ptrs = set()
    for view in (gu[1][6:], gu[2][:6], gu[0], gu[1][::2]):  # the last one is strided: read by get_slice
        m = StoredMatrix(entry, "gu", footprint(view, gu))
        for c in range(3):
            fresh = m.chunk(c, 3)
            t = m.chunk_transient(c, 3)
            assert (t.axis, t.start, t.stop) == (fresh.axis, fresh.start, fresh.stop)
            assert torch.equal(t.tensor, fresh.tensor) and torch.equal(
                fresh.tensor, view[m.fp.shape[0] * c // 3 :][: t.tensor.shape[0]]
            )
            if view.is_contiguous():
                ptrs.add(t.tensor.untyped_storage().data_ptr())
    assert len(ptrs) == 1  # every contiguous transient block lands in the same scratch buffer
    fresh = StoredMatrix(entry, "gu", footprint(gu[0], gu)).full()
    StoredMatrix(entry, "gu", footprint(gu[1], gu)).chunk_transient(0, 1)
    assert torch.equal(fresh, gu[0].float())  # a plain read is never the scratch buffer


def test_reused_chunk_buffers_give_the_numbers_of_fresh_ones(tmp_path: Path) -> None:
    d = _ckpt(tmp_path, layers=3)
    src = CheckpointSource(d)
    budget = int(0.002 * (1 << 20))  # several chunks per matrix: buffers are handed back and refilled
    todo = [mi.static.LayerScan(lambda p=p: src.layer(p), ["act", "up", "down"], ["act"]) for p in range(3)]
    got = list(mi.static.scan_layers(todo, budget))
    # the reference: fresh buffers, fresh reads (the form before the buffers were reused)
    plain = StoredMatrix.chunk
    items = (j.run() for j in _jobs(todo, budget, ("expert",), None))
    orig = StoredMatrix.chunk_transient
    try:
        StoredMatrix.chunk_transient = plain  # type: ignore[method-assign]
        ref = []
        for first in items:
            assert isinstance(first, _Plan)
            ref.append(_reduce_layer(first, items, None))
    finally:
        StoredMatrix.chunk_transient = orig  # type: ignore[method-assign]
    assert len(ref) == len(got) == 3
    for s, r in zip(got, ref, strict=True):
        for m in ("act", "up", "down"):
            assert torch.equal(s.gram[m], r.gram[m]) and torch.equal(s.neuron_mean[m], r.neuron_mean[m])
        assert torch.equal(s.zgram["act"], r.zgram["act"])
    assert not _threads()


def test_chunk_buffers_are_reused_and_bounded() -> None:
    pool = _Buffers(2)
    a = pool.take(2, 6)
    pool.give(a)
    b = pool.take(3, 4)  # fits in a's storage
    assert b.shape == (3, 4) and b.is_contiguous() and b.data_ptr() == a.data_ptr()
    c = pool.take(2, 3)
    for t in (b, c, torch.empty(5), torch.empty(5)):
        pool.give(t)
    assert len(pool._free) == 2  # at most ``keep`` are kept
    big = pool.take(10, 10)  # nothing large enough: a new one, one too-small one dropped
    assert big.shape == (10, 10) and len(pool._free) == 1


def test_prefetcher_bounded_and_in_order() -> None:
    seen = []
    with Prefetcher((Job(str(i), lambda i=i: i) for i in range(20)), depth=2) as items:
        for k, item in enumerate(items):
            time.sleep(0.002)  # let the thread run ahead as far as it may
            assert items.started <= k + 2
            seen.append(item)
    assert seen == list(range(20)) and not _threads()


def test_prefetcher_error_names_the_job_and_joins() -> None:
    def boom() -> int:
        raise OSError("disk on fire")

    jobs = [Job("a", lambda: 1), Job("tensor 'w' in f.safetensors", boom), Job("c", lambda: 3)]
    p = Prefetcher(iter(jobs))
    assert next(p) == 1
    with pytest.raises(OSError, match="disk on fire") as err:
        next(p)
    assert any(
        "tensor 'w' in f.safetensors" in n for n in getattr(err.value, "__notes__", ["tensor 'w' in f.safetensors"])
    )
    assert not p.alive and not _threads()


def test_prefetcher_abandoned_early_stops_thread() -> None:
    p = Prefetcher(Job(str(i), lambda i=i: i) for i in range(1000))
    assert next(p) == 0
    p.close()
    assert not p.alive
    assert not _threads()


def test_truncated_shard_surfaces_with_file_and_key(tmp_path: Path) -> None:
    d = _ckpt(tmp_path, layers=2)
    w = mi.weights(d, budget_mb=0.001, progress=False)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 2000])  # after the headers were read: the read itself fails
    with pytest.raises(IncompatibleArtifactError, match=r"model\.safetensors.*experts\.\d+\.\w+_proj\.weight"):
        w.scan(["act", "up", "down"])
    assert not _threads()


def test_on_layer_callback_and_cli_progress_lines(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    d = _ckpt(tmp_path / "ck", layers=3)
    events = []
    mi.weights(d, progress=False, on_layer=events.append).scan(["act"])
    assert [(e.done, e.total, e.layer) for e in events] == [(1, 3, 0), (2, 3, 1), (3, 3, 2)]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modulart.cli",
            "inspect",
            str(d),
            "--out",
            str(tmp_path / "o"),
            "--no-plots",
            "--reorder-neurons",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("inspect: layer ")]
    assert [x.split(" done in ")[0] for x in lines] == [f"inspect: layer {k}/3 (block {k - 1})" for k in (1, 2, 3)]


@pytest.mark.slow
def test_benchmark_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "introspect_streaming.py"),
            "--quick",
            "--dir",
            str(tmp_path / "ck"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    rec = json.loads(out.read_text())
    assert {"ratios", "runs", "max_abs_diff_stream_vs_in_memory"} <= set(rec)
    for key in ("benchmark", "setting", "threads", "torch", "median_seconds", "ratios", "targets", "met", "curves"):
        assert key in rec, key
    assert set(rec["targets"]) | set(rec.get("targets_min", {})) == set(rec["met"])
    assert set(rec["targets"]) | set(rec.get("targets_min", {})) <= set(rec["ratios"])
    assert {c["name"] for c in rec["curves"]} == {"peak RSS vs checkpoint size", "analysis time vs checkpoint size"}
    assert all(isinstance(c["exponent"], float) and len(c["x"]) >= 2 for c in rec["curves"])
    assert rec["notes"] and all(isinstance(n, str) for n in rec["notes"])
    assert not (tmp_path / "ck").exists()  # the synthetic checkpoints are deleted
