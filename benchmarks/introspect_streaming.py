"""Streamed MoE weight analysis vs reading the same bytes: speed, peak memory, and how both grow with size.

Writes a synthetic Mixtral-shaped checkpoint (per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` keys,
bf16 random weights, one layer per shard) under /tmp, then measures in fresh subprocesses (peak RSS from
/proc/self/status VmHWM; before every timed run the checkpoint's pages are dropped from the page cache
with ``posix_fadvise(DONTNEED)``, so the raw read and the analysis start from the same, cold-ish, state):

- ``baseline``: the interpreter with torch + modulart.introspect imported (no analysis);
- ``raw_read``: read every byte of every shard once, sequentially (the speed limit of the same bytes);
- ``stream``: ``modulart.introspect.weights(dir).scan(["act", "up", "down"])`` and the S1/S2/S4 numbers,
  one layer at a time through the read-ahead pipeline;
- ``*_warm``: the same two with the files already in the page cache (the compute-bound case);
- ``in_memory``: load every tensor (as the reference notebooks do), then the same numbers in memory;
- ``fp64_layer0``: S1 of layer 0 in fp64, the accuracy reference for both;
- ``profile``: the streamed pass once more with its stages timed (read, fp32 conversion, sums, Gram).

Raw read and analysis alternate in interleaved rounds (medians). Curves: analysis time and peak RSS vs
checkpoint size (1, 2, 4, 8 layers by default; the smaller checkpoints are hard links to the first shards of
the largest, with their own index). Targets (ratios measured in the same run):

- ``analysis_vs_raw_read_time`` (cold) <= 1 / 0.85: the analysis runs at >= 85 % of the raw read speed;
- ``stream_rss_above_baseline_over_one_layer_plus_base`` <= 1.5: peak RSS above the baseline interpreter
  over (one layer's expert bytes + a fixed 64 MiB for allocator, BLAS and thread overheads);
- ``rss_vs_size_exponent`` <= 0.2 (flat) and ``time_vs_size_exponent`` <= 1.15 (linear): the fitted exponents.

Run:  python benchmarks/introspect_streaming.py               (curve 0.14-1.1 GB, about 2-3 minutes)
      python benchmarks/introspect_streaming.py --size-gb 4.4  (one big run at the top of the curve)
      python benchmarks/introspect_streaming.py --quick        (tiny, < 1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _scaling import curve, plot_curves

RESULTS = Path(__file__).resolve().parent / "results"
BASE_BYTES = 64 << 20  # the fixed part of the memory target


# --- helpers run in the worker subprocesses ---------------------------------------------------------
def _vm(field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _evict(directory: Path) -> None:
    """Drop the checkpoint's pages from the page cache (clean pages; no root needed)."""
    for f in sorted(directory.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _numbers_in_memory(directory: Path) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state |= load_file(str(f))  # the whole model in memory, as the reference notebooks do
    layers = sorted({int(k.split(".")[2]) for k in state if ".experts." in k})
    out: dict[str, Any] = {"s1": {}, "s2": {}, "s4_r": {}}
    for m, name in (("act", "w1"), ("up", "w3"), ("down", "w2")):
        s1, s2, r = [], [], []
        for layer in layers:
            prefix = f"model.layers.{layer}.block_sparse_moe"
            mats = [state[f"{prefix}.experts.{e}.{name}.weight"].float() for e in range(_num_experts(state, prefix))]
            flat = F.normalize(torch.stack([w.reshape(-1) for w in mats]), dim=1)
            s1.append((flat @ flat.t()).tolist())
            means = torch.stack([w.mean(0) if m != "down" else w.mean(1) for w in mats])
            cos = F.normalize(means, dim=1) @ F.normalize(means, dim=1).t()
            s2.append(cos.tolist())
            router = F.normalize(state[f"{prefix}.gate.weight"].float(), dim=1)
            rc = router @ router.t()
            iu = torch.triu_indices(len(mats), len(mats), 1)
            x, y = cos[iu[0], iu[1]].double(), rc[iu[0], iu[1]].double()
            x, y = x - x.mean(), y - y.mean()
            r.append(float((x * y).sum() / (x.norm() * y.norm())))
            del mats, flat
        out["s1"][m], out["s2"][m], out["s4_r"][m] = s1, s2, r
    return out


def _num_experts(state: dict[str, Any], prefix: str) -> int:
    return int(state[f"{prefix}.gate.weight"].shape[0])


def _s1_fp64_layer0(directory: Path) -> dict[str, Any]:
    """S1 of layer 0 in fp64: the accuracy reference for both fp32 computations."""
    import torch
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = "model.layers.0.block_sparse_moe"
    out: dict[str, Any] = {}
    for m, name in (("act", "w1"), ("up", "w3"), ("down", "w2")):
        rows = []
        for e in range(8):
            key = f"{prefix}.experts.{e}.{name}.weight"
            with safe_open(str(directory / index[key]), framework="pt") as h:
                rows.append(h.get_tensor(key).double().reshape(-1))
        x = torch.nn.functional.normalize(torch.stack(rows), dim=1)
        out[m] = (x @ x.t()).tolist()
    return out


def _numbers_streamed(directory: Path, budget_mb: float) -> dict[str, Any]:
    import modulart.introspect as mi

    w = mi.weights(directory, budget_mb=budget_mb, progress=False)
    w.scan(["act", "up", "down"])  # one pass over the checkpoint, one layer at a time
    out: dict[str, Any] = {"s1": {}, "s2": {}, "s4_r": {}}
    gve = w.gate_vs_experts()
    for m in ("act", "up", "down"):
        out["s1"][m] = w.expert_similarity(m, "matrix").values.tolist()
        out["s2"][m] = w.expert_similarity(m, "neuron_mean").values.tolist()
        out["s4_r"][m] = gve.r[m].tolist()
    return out


def _warm(directory: Path) -> None:
    """Read every shard once (untimed) so the timed run finds them in the page cache."""
    buf = bytearray(64 << 20)
    for f in sorted(directory.glob("*.safetensors")):
        with f.open("rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _raw_read(directory: Path) -> int:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    for f in sorted(directory.glob("*.safetensors")):
        with f.open("rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def _profile(directory: Path, budget_mb: float) -> dict[str, Any]:
    """The streamed pass with its stages timed: the reader thread's reads (``pread``: the positional
    reads; ``read_chunk``: reads + bf16 -> fp32 copies) and the caller's reduction (``gram``, waiting for the
    next chunk ``caller_waits``, and the rest: neuron sums, bookkeeping)."""
    import modulart.introspect as mi
    import modulart.introspect.prefetch as pf
    import modulart.introspect.static as st
    import modulart.introspect.stored as so

    spent: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    st._read_chunk = timed("read_chunk", st._read_chunk)
    st._reduce_layer = timed("reduce_layer", st._reduce_layer)
    st._gram = timed("gram", st._gram)
    so.StoredMatrix._pread = timed("pread", so.StoredMatrix._pread)
    pf.Prefetcher.__next__ = timed("caller_waits", pf.Prefetcher.__next__)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    mi.weights(directory, budget_mb=budget_mb, progress=False).scan(["act", "up", "down"])
    spent["wall"] = time.perf_counter() - t0
    return spent


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _measure(mode: str, directory: Path, budget_mb: float) -> dict[str, Any]:
    """One measurement: the page cache dropped (or warmed, ``*_warm``), the peak RSS reset, then ``mode``."""
    warm = mode.endswith("_warm")
    kind = mode.removesuffix("_warm")
    if warm:
        _warm(directory)
    else:
        _evict(directory)
    base = _vm("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"mode": mode}
    if kind == "stream":
        result["numbers"] = _numbers_streamed(directory, budget_mb)
    elif kind == "in_memory":
        result["numbers"] = _numbers_in_memory(directory)
    elif kind == "fp64_layer0":
        result["numbers"] = _s1_fp64_layer0(directory)
    elif kind == "raw_read":
        result["bytes"] = _raw_read(directory)
    elif kind == "profile":
        result["stages"] = _profile(directory, budget_mb)
    elif kind != "baseline":
        raise ValueError(mode)
    result["seconds"] = time.perf_counter() - t0
    result["rss_before"] = base
    result["peak_rss"] = _vm("VmHWM")
    result["peak_reset"] = reset
    return result


def worker(mode: str, directory: Path, budget_mb: float) -> dict[str, Any]:
    """Measurements in this (fresh) process: ``mode`` is one mode or several joined by commas (run in
    that order, the peak RSS reset before each; ``{"series": [...]}``). Only the first is in a fresh
    interpreter; the later ones reuse it (no import cost), which is how the interleaved rounds stay short."""
    import torch

    import modulart.introspect  # noqa: F401  (part of the baseline)

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    modes = mode.split(",")
    if len(modes) == 1:
        return _measure(mode, directory, budget_mb)
    series = [_measure(m, directory, budget_mb) for m in modes]
    first = True
    for r in series:  # keep the numbers of the first analysis only (the JSON stays small)
        if r["mode"] == "stream" and first:
            first = False
        elif r["mode"] not in ("in_memory", "fp64_layer0"):
            r.pop("numbers", None)
    return {"series": series}


# --- the driver -------------------------------------------------------------------------------------
def write_checkpoint(directory: Path, layers: int, experts: int, d: int, inter: int, layers_per_shard: int) -> int:
    """A Mixtral-shaped bf16 checkpoint with per-expert keys; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    n_shards = (layers + layers_per_shard - 1) // layers_per_shard
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        for layer in range(s * layers_per_shard, min(layers, (s + 1) * layers_per_shard)):
            prefix = f"model.layers.{layer}.block_sparse_moe"
            shard[f"{prefix}.gate.weight"] = (torch.randn(experts, d, generator=g) * 0.02).bfloat16()
            for e in range(experts):
                for key, shape in (("w1", (inter, d)), ("w3", (inter, d)), ("w2", (d, inter))):
                    shard[f"{prefix}.experts.{e}.{key}.weight"] = (torch.randn(shape, generator=g) * 0.02).bfloat16()
        save_file(shard, str(directory / name))
        weight_map |= dict.fromkeys(shard, name)
        del shard
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _max_diff(a: Any, b: Any) -> dict[str, float]:
    """Max |a - b| per analysis (over matrices and layers)."""
    import torch

    out = {}
    for kind in ("s1", "s2", "s4_r"):
        out[kind] = max(float((torch.tensor(a[kind][m]) - torch.tensor(b[kind][m])).abs().max()) for m in a[kind])
    return out


def run_worker(mode: str, directory: Path, budget_mb: float) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; its result (``seconds``, ``peak_rss``, ...)."""
    cmd = [sys.executable, __file__, "--worker", mode, "--dir", str(directory), "--budget-mb", str(budget_mb)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def subset(full: Path, dst: Path, layers: int) -> int:
    """A checkpoint of the first ``layers`` layers of ``full`` (one layer per shard): hard links and an index."""
    dst.mkdir(parents=True)
    weight_map = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {k: f for k, f in weight_map.items() if int(k.split(".")[2]) < layers}
    for f in sorted(set(keep.values())):
        os.link(full / f, dst / f)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    return sum(f.stat().st_size for f in dst.glob("*.safetensors"))


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny checkpoints (< 1 minute)")
    p.add_argument(
        "--size-gb", type=float, default=None, help="size of the largest checkpoint (default 1.1; quick 0.14)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved raw/stream rounds per size (default 3; quick 2)"
    )
    p.add_argument("--no-curves", action="store_true", help="only the largest checkpoint, no size sweep")
    p.add_argument("--dir", default="/tmp/modulart_introspect_bench", help="where the synthetic checkpoints go")
    p.add_argument("--budget-mb", type=float, default=128, help="streaming chunk budget (fp32)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/...)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    directory = Path(args.dir)
    if args.worker:
        print(json.dumps(worker(args.worker, directory, args.budget_mb)))
        return
    shape = {"experts": 8, "d": 512, "inter": 1408} if args.quick else {"experts": 8, "d": 1024, "inter": 2816}
    layer_bytes = shape["experts"] * 3 * shape["d"] * shape["inter"] * 2
    size_gb = args.size_gb if args.size_gb is not None else (0.14 if args.quick else 1.1)
    layers = max(1, round(size_gb * 1e9 / layer_bytes))
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    sweep = [n for n in (layers // 8, layers // 4, layers // 2) if n >= 1] + [layers]
    sweep = sorted(set(sweep)) if not args.no_curves else [layers]
    if args.quick and len(sweep) < 2 and not args.no_curves:
        sweep = [max(1, layers // 2), max(2, layers)]
        layers = sweep[-1]
    if directory.exists():
        shutil.rmtree(directory)
    full = directory / "full"
    per_size: dict[int, dict[str, Any]] = {}
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(full, layers, shape["experts"], shape["d"], shape["inter"], 1)
        write_s = time.perf_counter() - t0
        print(f"wrote {size / 1e9:.2f} GB Mixtral-shaped checkpoint ({layers} layers, {shape}) in {write_s:.0f}s")
        baseline = run_worker("baseline", full, args.budget_mb)
        for n in sweep:
            d = full if n == layers else directory / f"layers{n}"
            nbytes = size if n == layers else subset(full, d, n)
            modes = ["stream", "raw_read"] * rounds  # interleaved, so both see the same machine load
            if n == layers:
                modes += ["stream_warm", "raw_read_warm"] * rounds + ["fp64_layer0", "profile"]
            runs: dict[str, list[dict[str, Any]]] = {}
            for r in run_worker(",".join(modes), d, args.budget_mb)["series"]:
                runs.setdefault(r["mode"], []).append(r)
            per_size[n] = {"bytes": nbytes, "runs": runs}
            print(
                f"{n:>3} layers {nbytes / 1e9:6.2f} GB: raw read {_median(runs['raw_read'], 'seconds'):6.2f} s, "
                f"analysis {_median(runs['stream'], 'seconds'):6.2f} s, "
                f"peak RSS {runs['stream'][0]['peak_rss'] / 2**20:6.0f} MiB"
            )
        top = per_size[layers]["runs"]
        extra = {"in_memory": run_worker("in_memory", full, args.budget_mb)}
        extra |= {mode: top.pop(mode)[0] for mode in ("fp64_layer0", "profile")}
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    base = baseline["peak_rss"]
    stream_s, raw_s = _median(top["stream"], "seconds"), _median(top["raw_read"], "seconds")
    warm_s, warm_raw_s = _median(top["stream_warm"], "seconds"), _median(top["raw_read_warm"], "seconds")
    stream_peak = top["stream"][0]["peak_rss"]  # the first run of its process: a fresh interpreter
    mem = extra["in_memory"]
    stream_numbers = top["stream"][0]["numbers"]
    xs = [per_size[n]["bytes"] / 1e9 for n in sweep]
    curves = []
    if len(sweep) >= 2:
        rss = [per_size[n]["runs"]["stream"][0]["peak_rss"] / 2**20 for n in sweep]
        secs = [_median(per_size[n]["runs"]["stream"], "seconds") for n in sweep]
        curves = [
            curve(
                "peak RSS vs checkpoint size",
                "checkpoint GB",
                "analysis peak RSS MiB",
                xs,
                rss,
                "whole process (torch included); flat: one layer's chunks in flight whatever the size",
            ),
            curve(
                "analysis time vs checkpoint size",
                "checkpoint GB",
                "analysis seconds (median, cold)",
                xs,
                secs,
                f"median of {rounds} interleaved rounds; page cache dropped before each",
            ),
        ]
    ratios = {
        "analysis_vs_raw_read_time": stream_s / raw_s,
        "analysis_vs_raw_read_time_warm": warm_s / warm_raw_s,
        "stream_throughput_over_raw_read": raw_s / stream_s,
        "stream_rss_above_baseline_over_one_layer_plus_base": (stream_peak - base) / (layer_bytes + BASE_BYTES),
        "stream_above_baseline_over_one_layer_bf16": (stream_peak - base) / layer_bytes,
        "stream_peak_rss_over_checkpoint": stream_peak / size,
        "stream_peak_rss_over_in_memory_peak_rss": stream_peak / mem["peak_rss"],
        "in_memory_vs_raw_read_time": mem["seconds"] / raw_s,
    }
    targets = {
        "analysis_vs_raw_read_time": 1 / 0.85,
        "stream_rss_above_baseline_over_one_layer_plus_base": 1.5,
    }
    if curves:
        ratios["rss_vs_size_exponent"] = curves[0]["exponent"]
        ratios["time_vs_size_exponent"] = curves[1]["exponent"]
        targets |= {"rss_vs_size_exponent": 0.2, "time_vs_size_exponent": 1.15}
    met = {k: ratios[k] <= v for k, v in targets.items()}
    diff = _max_diff(stream_numbers, mem["numbers"])
    ref = extra["fp64_layer0"]["numbers"]
    accuracy = {}
    for name, nums in (("stream", stream_numbers), ("in_memory", mem["numbers"])):
        accuracy[name] = max(float((torch.tensor(nums["s1"][m][0]) - torch.tensor(ref[m])).abs().max()) for m in ref)
    st = extra["profile"]["stages"]
    conversion = st.get("read_chunk", 0.0) - st.get("pread", 0.0)
    waits = st.get("caller_waits", 0.0)
    rest = st.get("reduce_layer", 0.0) - st.get("gram", 0.0) - waits
    busy_reader, busy_caller = st.get("read_chunk", 0.0), st.get("reduce_layer", 0.0) - waits
    overlap = (busy_reader + busy_caller - st["wall"]) / max(min(busy_reader, busy_caller), 1e-9)
    bound = "reading" if busy_reader >= busy_caller else "compute"
    notes = [
        "cache state: posix_fadvise(DONTNEED) on every shard before each cold run (raw read and analysis alike); "
        "the disk below may still cache (a virtual disk), so 'cold' is cold-ish; the *_warm runs read the files "
        "once first",
        "one process per checkpoint size runs the interleaved rounds (analysis, raw read, ...; the first in a fresh "
        "interpreter, VmHWM reset before each); the peak RSS figures are of that first, fresh analysis run",
        f"profile of one streamed pass at {size / 1e9:.2f} GB (wall {st['wall']:.2f} s): reader thread "
        f"{busy_reader:.2f} s = positional reads {st.get('pread', 0.0):.2f} s + bf16 -> fp32 copies "
        f"{conversion:.2f} s; caller busy {busy_caller:.2f} s = batched Gram {st.get('gram', 0.0):.2f} s + neuron "
        f"sums and bookkeeping {rest:.2f} s; caller waiting for the next chunk {waits:.2f} s",
        f"pipeline: the reader thread reads and converts chunk k+1 (and hints chunk k+2 to the kernel) while the "
        f"caller reduces chunk k; overlap (reader + caller - wall) / min(reader, caller) = {overlap:.2f} "
        f"(1: the shorter side fully hidden); the pass is {bound}-bound (the busier side)",
        "tried and kept during development (not measured by this run): "
        "the reader reuses one scratch buffer for its positional reads and the caller hands each "
        "reduced fp32 chunk buffer back for reuse: a fresh ~100 MB buffer per chunk paid a page fault per 4 KiB "
        "(the fp32 copy into a fresh buffer measured ~4.5x slower than into a reused one, the read ~4x)",
        "remaining cost above the raw read: the bf16 -> fp32 copy (the Gram and sums are fp32 for equal numbers) "
        "and the Gram itself; on 2 cores they cannot fully overlap",
        f"max |streamed - in-memory|: {diff}; S1 layer 0 max error vs fp64: {accuracy}",
    ]
    if args.quick:
        notes.append("--quick: tiny checkpoints, interpreter noise dominates; the targets are meant for the full run")
    print(f"\n{'run':<14} {'peak RSS MiB':>12} {'seconds':>8} {'MB/s':>8}")
    for mode in ("raw_read", "stream", "raw_read_warm", "stream_warm"):
        sec = _median(top[mode], "seconds")
        print(f"{mode:<14} {top[mode][0]['peak_rss'] / 2**20:>12.0f} {sec:>8.2f} {size / 1e6 / sec:>8.0f}")
    print(f"{'in_memory':<14} {mem['peak_rss'] / 2**20:>12.0f} {mem['seconds']:>8.2f}")
    print(f"{'baseline':<14} {base / 2**20:>12.0f}")
    print()
    for k, v in ratios.items():
        tgt = f"  target <= {targets[k]:.3f}: {'met' if met[k] else 'NOT met'}" if k in targets else ""
        print(f"{k:<52} {v:8.3f}{tgt}")
    for n in notes:
        print("-", n)
    record = {
        "benchmark": "introspect_streaming",
        "setting": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
        | {"shape": shape, "layers": layers, "sweep_layers": sweep, "rounds": rounds},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "checkpoint_bytes": size,
        "one_layer_experts_bytes_bf16": layer_bytes,
        "median_seconds": {mode: _median(top[mode], "seconds") for mode in top} | {"in_memory": mem["seconds"]},
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "numbers"} for r in v] for k, v in top.items()}
        | {"baseline": baseline, "in_memory": {k: v for k, v in mem.items() if k != "numbers"}},
        "sweep": {
            str(n): {
                "bytes": per_size[n]["bytes"],
                "raw_read_seconds": [r["seconds"] for r in per_size[n]["runs"]["raw_read"]],
                "stream_seconds": [r["seconds"] for r in per_size[n]["runs"]["stream"]],
                "stream_peak_rss": [r["peak_rss"] for r in per_size[n]["runs"]["stream"]],
            }
            for n in sweep
        },
        "profile": st,
        "ratios": ratios,
        "targets": targets,
        "met": met,
        "curves": curves,
        "max_abs_diff_stream_vs_in_memory": diff,
        "s1_layer0_max_abs_error_vs_fp64": accuracy,
        "write_seconds": write_s,
        "notes": notes,
    }
    out = args.out or RESULTS / f"introspect_streaming{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    if curves:
        plot_curves(curves, out.with_name(out.stem + "_curves.png"), "streamed MoE weight analysis")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
