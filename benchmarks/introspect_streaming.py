"""Streaming MoE introspection vs loading the whole checkpoint: peak memory and throughput.

Writes a synthetic Mixtral-shaped checkpoint (per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` keys,
bf16, sharded, >= 4 GB by default) under /tmp, then measures in fresh subprocesses (peak RSS from
/proc/self/status VmHWM, the page cache evicted with posix_fadvise before each run):

- ``baseline``: the interpreter with torch + modulart.introspect imported (no analysis);
- ``stream``: ``modulart.introspect.weights(dir)``: S1 + S2 (all three matrices) + S4, one layer at a time;
- ``in_memory``: load every tensor (as the reference notebooks do), then the same numbers in memory;
- ``raw_read``: read every file once, sequentially (the disk/page-cache speed of the same bytes);
- ``fp64_layer0``: S1 of layer 0 in fp64, the accuracy reference for both.

It prints a table and the ratios (stream peak RSS / checkpoint size, stream / in-memory peak RSS,
stream throughput / raw read throughput), checks that the streamed and in-memory numbers agree, and
writes JSON to benchmarks/results/introspect_streaming.json. The checkpoint is deleted afterwards.

Run:  python benchmarks/introspect_streaming.py            (>= 4 GB checkpoint, a few minutes)
      python benchmarks/introspect_streaming.py --quick    (~0.3 GB, seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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


def worker(mode: str, directory: Path, budget_mb: float) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    import modulart.introspect  # noqa: F401  (part of the baseline)

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    _evict(directory)
    base = _vm("VmRSS")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"mode": mode}
    if mode == "stream":
        result["numbers"] = _numbers_streamed(directory, budget_mb)
    elif mode == "in_memory":
        result["numbers"] = _numbers_in_memory(directory)
    elif mode == "fp64_layer0":
        result["numbers"] = _s1_fp64_layer0(directory)
    elif mode == "raw_read":
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        total = 0
        for f in sorted(directory.glob("*.safetensors")):
            with f.open("rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    total += n
        result["bytes"] = total
    elif mode != "baseline":
        raise ValueError(mode)
    result["seconds"] = time.perf_counter() - t0
    result["rss_before"] = base
    result["peak_rss"] = _vm("VmHWM")
    return result


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


def run_worker(mode: str, directory: Path, budget_mb: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", mode, "--dir", str(directory), "--budget-mb", str(budget_mb)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _max_diff(a: Any, b: Any) -> dict[str, float]:
    """Max |a - b| per analysis (over matrices and layers)."""
    import torch

    out = {}
    for kind in ("s1", "s2", "s4_r"):
        out[kind] = max(float((torch.tensor(a[kind][m]) - torch.tensor(b[kind][m])).abs().max()) for m in a[kind])
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~0.3 GB checkpoint instead of >= 4 GB")
    p.add_argument("--dir", default="/tmp/modulart_introspect_bench", help="where the synthetic checkpoint goes")
    p.add_argument("--budget-mb", type=float, default=128, help="streaming chunk budget (fp32)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/...)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    directory = Path(args.dir)
    if args.worker:
        print(json.dumps(worker(args.worker, directory, args.budget_mb)))
        return
    shape = (
        {"layers": 4, "experts": 8, "d": 1024, "inter": 2816, "layers_per_shard": 2}
        if args.quick
        else {"layers": 8, "experts": 8, "d": 2048, "inter": 5632, "layers_per_shard": 2}
    )
    if directory.exists():
        shutil.rmtree(directory)
    try:
        t0 = time.perf_counter()
        size = write_checkpoint(directory, **shape)
        took = time.perf_counter() - t0
        print(f"wrote {size / 2**30:.2f} GiB ({size / 1e9:.2f} GB) Mixtral-shaped checkpoint in {took:.0f}s: {shape}")
        modes = ("baseline", "raw_read", "stream", "in_memory", "fp64_layer0")
        runs = {mode: run_worker(mode, directory, args.budget_mb) for mode in modes}
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    base = runs["baseline"]["peak_rss"]
    layer_bytes = shape["experts"] * 3 * shape["d"] * shape["inter"] * 2
    gib = 2**30
    print(f"\n{'run':<10} {'peak RSS GiB':>12} {'above baseline':>15} {'seconds':>8} {'MB/s':>8}")
    for mode, r in runs.items():
        if mode == "fp64_layer0":
            continue
        mbps = size / 2**20 / r["seconds"] if mode != "baseline" else float("nan")
        above = (r["peak_rss"] - base) / gib
        print(f"{mode:<10} {r['peak_rss'] / gib:>12.3f} {above:>15.3f} {r['seconds']:>8.2f} {mbps:>8.0f}")
    stream, mem, raw = runs["stream"], runs["in_memory"], runs["raw_read"]
    ratios = {
        "stream_peak_rss_over_checkpoint": stream["peak_rss"] / size,
        "stream_above_baseline_over_checkpoint": (stream["peak_rss"] - base) / size,
        "stream_above_baseline_over_one_layer_bf16": (stream["peak_rss"] - base) / layer_bytes,
        "stream_peak_rss_over_in_memory_peak_rss": stream["peak_rss"] / mem["peak_rss"],
        "stream_throughput_over_raw_read": raw["seconds"] / stream["seconds"],
        "in_memory_throughput_over_raw_read": raw["seconds"] / mem["seconds"],
    }
    diff = _max_diff(stream["numbers"], mem["numbers"])
    print()
    for k, v in ratios.items():
        print(f"{k:<45} {v:8.3f}")
    for kind, v in diff.items():
        print(f"{'max |streamed - in-memory| ' + kind:<45} {v:8.1e}")
    ref = runs["fp64_layer0"]["numbers"]
    accuracy = {}
    for name, run in (("stream", stream), ("in_memory", mem)):
        err = max(float((torch.tensor(run["numbers"]["s1"][m][0]) - torch.tensor(ref[m])).abs().max()) for m in ref)
        accuracy[name] = err
        print(f"{'max |' + name + ' - fp64| S1, layer 0':<45} {err:8.1e}")
    met = ratios["stream_peak_rss_over_checkpoint"] <= 0.25
    note = " (the target is for the >= 4 GB run; --quick is smaller than a few interpreters)" if args.quick else ""
    print(f"target: stream peak RSS <= 1/4 of the checkpoint: {'met' if met else 'NOT met'}{note}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint_bytes": size,
        "shape": shape,
        "budget_mb": args.budget_mb,
        "one_layer_experts_bytes_bf16": layer_bytes,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "numbers"} for k, v in runs.items() if k != "fp64_layer0"},
        "ratios": ratios,
        "max_abs_diff_stream_vs_in_memory": diff,
        "s1_layer0_max_abs_error_vs_fp64": accuracy,
        "quick": args.quick,
        "cpus": os.cpu_count(),
    }
    out = args.out or RESULTS / f"introspect_streaming{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
