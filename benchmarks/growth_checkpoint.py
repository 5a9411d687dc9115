"""Benchmark: streaming depth growth of a synthetic Llama-shaped sharded checkpoint.

Measured in one run, each in a fresh child process (peak RSS from ``os.wait4``), each followed by
``sync`` so every tool pays for getting its bytes to disk:

- ``baseline``: the interpreter importing torch + modulart.stacking (the RSS floor);
- ``copy``: a plain kernel copy (``os.copy_file_range``) of as many bytes as the grown checkpoint
  has, into shards of the same size: the physical limit;
- ``modulart``: ``grow_checkpoint(src, dst, LayerPlan.stack(L, 2), max_shard_size=...)``;
- ``mergekit``: its passthrough merge of the same plan (``--clone-tensors``), when installed.

Ratios: wall time vs the copy (target <= 1.5x); peak RSS vs the checkpoint size and vs the target
``largest output shard + 2 x largest tensor``. The source checkpoint lives under /tmp and is deleted.

Curve ``grow_checkpoint``: the time of ``grow_checkpoint`` itself (timed inside the child, the ``sync``
included, the interpreter start-up not) vs the output size, for 1, 2, 4, 8 layers of a narrower
Llama shape (hidden 2048; quick: 512), with its fitted exponent (target <= 1.15: linear in the bytes
written); ``--no-curves`` skips it.

Run: python benchmarks/growth_checkpoint.py            (>= 4 GB source, ~8 GB output, a few minutes)
     python benchmarks/growth_checkpoint.py --quick    (CI size, seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _scaling import curve, plot_curves

RESULTS = Path(__file__).resolve().parent / "results"


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """safetensors header (same layout as modulart.stacking.sfio.header_bytes; torch-free so the parent stays small)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def llama_tensors(hidden: int, inter: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    return [*out, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def make_checkpoint(d: Path, hidden: int, inter: int, vocab: int, layers: int, shard_bytes: int) -> dict[str, Any]:
    """Write a bf16 Llama-shaped sharded checkpoint without ever holding more than 64 MiB."""
    d.mkdir(parents=True)
    block = os.urandom(64 << 20)
    tensors = [(n, s, 2 * _numel(s)) for n, s in llama_tensors(hidden, inter, vocab, layers)]
    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t[2] > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t[2]
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with (d / fname).open("wb") as f:
            f.write(header_bytes([(n, "BF16", s, b) for n, s, b in shard], {"format": "pt"}))
            for n, _, b in shard:
                weight_map[n] = fname
                while b:
                    k2 = min(b, len(block))
                    f.write(block[:k2])
                    b -= k2
    total = sum(t[2] for t in tensors)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 128),
        "num_key_value_heads": max(1, hidden // 128),
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "layer_types": ["full_attention"] * layers,
    }
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return {"bytes": total, "largest_tensor": max(t[2] for t in tensors), "files": len(shards)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stdout.write(r.stdout[-3000:] + r.stderr[-3000:]); "
    "print('\\nMAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def run_child(argv: list[str]) -> dict[str, float]:
    """Run a command in a small wrapper process; wall time (including a sync afterwards) and peak RSS in MiB.

    The wrapper holds no torch, so the child's peak RSS (``RUSAGE_CHILDREN`` of the wrapper) is the
    command's own, not the pages a fork of a big parent would inherit.
    """
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True)
    run_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[:3]}... failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-2000:]}")
    os.sync()
    wall = time.perf_counter() - t0
    rss_kib = int(r.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    return {"wall_s": wall, "run_s": run_s, "peak_rss_mib": rss_kib / 1024}


COPY = r"""
import os, sys
from pathlib import Path
src, dst, total, shard = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dst.mkdir()
files = sorted(src.glob("*.safetensors"))
left, k, i = total, 0, 0
while left:
    with (dst / f"copy-{k:05d}.safetensors").open("wb") as out:
        room = min(shard, left)
        while room:
            with files[i % len(files)].open("rb") as f:
                n = min(room, os.fstat(f.fileno()).st_size)
                off = 0
                while off < n:
                    off += os.copy_file_range(f.fileno(), out.fileno(), n - off, off)
            room -= n; left -= n; i += 1
        os.fsync(out.fileno())
    k += 1
"""


GROW_TIMED = r"""
import json, os, shutil, sys, time
from pathlib import Path
import modulart.stacking as st
points, g, shard, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
out = []
for k, (src, dst, layers) in enumerate(points):
    times = []
    for r in range(rounds + (k == 0)):  # one untimed warm-up grow first (lazy imports, first-call costs)
        t = time.perf_counter()
        st.grow_checkpoint(src, dst, st.LayerPlan.stack(layers, g), max_shard_size=shard, progress=False)
        os.sync()
        took = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(dst).glob("*.safetensors"))
        shutil.rmtree(dst)
        if r or k:
            times.append(took)
    out.append({"layers": layers, "output_bytes": size, "seconds": times})
print("GROW_JSON", json.dumps(out))
"""


def grow_curve(work: Path, quick: bool, g: int, rounds: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``grow_checkpoint`` time vs output size (1, 2, 4, 8 layers), all in one child process (the
    interpreter start-up paid once, outside the timings); the curve and its points."""
    # full size: 0.5 to 1.9 GB of output, large enough that every point is bound by the writes (at
    # hidden 1024 the smaller outputs finished in the page cache before the sync, which bent the curve)
    hidden, inter, vocab = (512, 1376, 8000) if quick else (2048, 5504, 32000)
    shard, shard_arg = (16 << 20, "16MB") if quick else (1 << 30, "1GB")
    todo = []
    for layers in (1, 2, 4, 8):
        src = work / f"curve-src-{layers}"
        make_checkpoint(src, hidden, inter, vocab, layers, shard)
        todo.append([str(src), str(work / f"curve-out-{layers}"), layers])
    os.sync()
    argv = [sys.executable, "-c", GROW_TIMED, json.dumps(todo), str(g), shard_arg, str(rounds)]
    r = subprocess.run(argv, capture_output=True, text=True)
    for src, _, _ in todo:
        shutil.rmtree(src)
    if r.returncode != 0:
        raise RuntimeError(f"grow curve failed:\n{r.stderr[-2000:]}")
    points: list[dict[str, Any]] = json.loads(r.stdout.rsplit("GROW_JSON", 1)[1])
    xs = [pt["output_bytes"] / 1e9 for pt in points]
    ys = [sorted(pt["seconds"])[len(pt["seconds"]) // 2] for pt in points]
    c = curve(
        "grow_checkpoint",
        "output GB",
        "seconds (median, sync included)",
        xs,
        ys,
        f"x{g} stack of 1-8 layers, hidden {hidden}; timed inside one child (no interpreter start-up)",
    )
    return c, points


def mergekit_yaml(src: Path, layers: int, g: int) -> str:
    slices = "\n".join(f"  - sources:\n      - model: {src}\n        layer_range: [0, {layers}]" for _ in range(g))
    return f"slices:\n{slices}\nmerge_method: passthrough\ndtype: bfloat16\n"


def mergekit_layer_types_check(mk: str, work: Path) -> dict[str, Any]:
    """Does mergekit's passthrough handle a config with ``layer_types``? (a 2-layer toy checkpoint)"""
    src = work / "tiny"
    make_checkpoint(src, 64, 128, 256, 2, 1 << 30)
    (work / "tiny.yml").write_text(mergekit_yaml(src, 2, 2))
    argv = [mk, str(work / "tiny.yml"), str(work / "tiny-out"), "--clone-tensors", "--no-copy-tokenizer", "--quiet"]
    r = subprocess.run(argv, capture_output=True, text=True)
    shutil.rmtree(work / "tiny-out", ignore_errors=True)
    last = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return {"ok": r.returncode == 0, "message": last[0][-300:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size (~60 MB)")
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: results/...)")
    ap.add_argument("--no-curves", action="store_true", help="skip the grow_checkpoint time vs size curve")
    args = ap.parse_args()
    if args.quick:
        dims, shard = {"hidden": 512, "inter": 1376, "vocab": 8000, "layers": 4}, 16 << 20
        shard_arg, mk_shard = "16MB", "8M"
    else:  # 9 layers of Llama-7B width: 4.17 GB in bf16
        dims, shard = {"hidden": 4096, "inter": 11008, "vocab": 32000, "layers": 9}, 2 * 10**9
        shard_arg, mk_shard = "2GB", "1B"
    work = Path(tempfile.mkdtemp(prefix="modulart-growth-bench-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.perf_counter()
        info = make_checkpoint(src, dims["hidden"], dims["inter"], dims["vocab"], dims["layers"], shard)
        os.sync()
        make_s = time.perf_counter() - t0
        layers, g = dims["layers"], args.factor
        block = (info["bytes"] - 2 * 2 * dims["vocab"] * dims["hidden"] - 2 * dims["hidden"]) // layers
        out_bytes = info["bytes"] + (g - 1) * layers * block
        py = sys.executable
        results: dict[str, Any] = {}
        results["baseline"] = run_child([py, "-c", "import torch, tqdm, safetensors, modulart.stacking"])
        results["copy"] = run_child([py, "-c", COPY, str(src), str(work / "copy"), str(out_bytes), str(shard)])
        shutil.rmtree(work / "copy")
        grow = (
            "import sys, modulart.stacking as st; "
            f"st.grow_checkpoint(sys.argv[1], sys.argv[2], st.LayerPlan.stack({layers}, {g}), "
            f"max_shard_size={shard_arg!r}, progress=False)"
        )
        results["modulart"] = run_child([py, "-c", grow, str(src), str(work / "grown")])
        from modulart.stacking.sfio import SafetensorsFile

        grown_files = sorted((work / "grown").glob("*.safetensors"))
        shard_sizes = [sum(e.nbytes for e in SafetensorsFile(f).entries.values()) for f in grown_files]
        written = sum(shard_sizes)
        assert written == out_bytes, (written, out_bytes)
        mk = shutil.which("mergekit-yaml")
        if mk and not args.no_mergekit:
            results["mergekit_layer_types"] = mergekit_layer_types_check(mk, work)
            config = json.loads((src / "config.json").read_text())
            config.pop("layer_types")  # mergekit rewrites only num_hidden_layers: drop it so the merge can finish
            (src / "config.json").write_text(json.dumps(config, indent=2))
            cfg = work / "merge.yml"
            cfg.write_text(mergekit_yaml(src, layers, g))
            mk_args = [mk, str(cfg), str(work / "mergekit"), "--out-shard-size", mk_shard, "--clone-tensors"]
            mk_args += ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
            try:
                results["mergekit"] = run_child(mk_args)
                import torch

                a = SafetensorsFile(grown_files[-1])
                name = next(n for n in a.entries if ".layers." in n)
                mk_files = {n: f for f in (work / "mergekit").glob("*.safetensors") for n in SafetensorsFile(f).entries}
                b = SafetensorsFile(mk_files[name])
                ta, tb = a.read_tensor(name), b.read_tensor(name)
                results["mergekit"]["same_bytes_as_modulart"] = bool(ta.view(torch.uint8).equal(tb.view(torch.uint8)))
            except RuntimeError as e:
                results["mergekit"] = {"error": str(e)[-500:]}
            shutil.rmtree(work / "mergekit", ignore_errors=True)
        curves, curve_points = [], []
        if not args.no_curves:
            c, curve_points = grow_curve(work, args.quick, g, 3)
            curves.append(c)
        base = results["baseline"]["peak_rss_mib"]
        target = (max(shard_sizes) + 2 * info["largest_tensor"]) / 2**20
        summary = {
            "source_bytes": info["bytes"],
            "output_bytes": out_bytes,
            "largest_tensor_bytes": info["largest_tensor"],
            "largest_output_shard_bytes": max(shard_sizes),
            "make_source_s": make_s,
            "rss_target_mib": target,
            "time_ratio_vs_copy": results["modulart"]["wall_s"] / results["copy"]["wall_s"],
            "time_ratio_vs_copy_excl_import": (results["modulart"]["wall_s"] - results["baseline"]["wall_s"])
            / results["copy"]["wall_s"],
            "rss_above_baseline_mib": results["modulart"]["peak_rss_mib"] - base,
            "rss_vs_checkpoint": results["modulart"]["peak_rss_mib"] * 2**20 / info["bytes"],
            "rss_within_target": results["modulart"]["peak_rss_mib"] - base <= target,
        }
        if "wall_s" in results.get("mergekit", {}):
            summary["mergekit_time_ratio_vs_copy"] = results["mergekit"]["wall_s"] / results["copy"]["wall_s"]
            summary["mergekit_rss_vs_checkpoint"] = results["mergekit"]["peak_rss_mib"] * 2**20 / info["bytes"]
        import torch

        ratios = {
            "time_ratio_vs_copy": summary["time_ratio_vs_copy"],
            "time_ratio_vs_copy_excl_import": summary["time_ratio_vs_copy_excl_import"],
            "rss_above_baseline_over_target": summary["rss_above_baseline_mib"] / target,
            "rss_vs_checkpoint": summary["rss_vs_checkpoint"],
        }
        targets = {"time_ratio_vs_copy": 1.5, "rss_above_baseline_over_target": 1.0}
        if curves:
            ratios["grow_time_vs_size_exponent"] = curves[0]["exponent"]
            targets["grow_time_vs_size_exponent"] = 1.15
        notes = [
            "wall times include a sync afterwards (every tool pays for its bytes reaching the disk) and, for the "
            "ratios vs copy, the child's interpreter start-up (time_ratio_vs_copy_excl_import subtracts it)",
            "peak RSS from os.wait4 of a torch-free wrapper: the child's own, not a fork of this process",
        ]
        if curves:
            ys = curves[0]["y"]
            notes.append(
                f"grow_checkpoint curve: {ys[0]:.2f} s at {curves[0]['x'][0]:.3f} GB to {ys[-1]:.2f} s at "
                f"{curves[0]['x'][-1]:.3f} GB, exponent {curves[0]['exponent']:.2f} (below 1 when fixed costs: "
                "headers, file creation, the sync, dominate the small outputs)"
            )
        if args.quick:
            notes.append("--quick: CI sizes; fixed costs dominate, the targets are meant for the full run")
        report = {
            "benchmark": "growth_checkpoint",
            "setting": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"dims": dims},
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "median_seconds": {k: r["wall_s"] for k, r in results.items() if "wall_s" in r},
            "ratios": ratios,
            "targets": targets,
            "met": {k: ratios[k] <= v for k, v in targets.items()},
            "curves": curves,
            "curve_points": curve_points,
            "notes": notes,
            "quick": args.quick,
            "dims": dims,
            "factor": g,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "results": results,
            "summary": summary,
        }
        out = args.out or RESULTS / f"growth_checkpoint{'_quick' if args.quick else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        if curves:
            plot_curves(curves, out.with_name(out.stem + "_curves.png"), "streaming depth growth")
        gb = 1e9
        print(
            f"source {info['bytes'] / gb:.2f} GB -> grown x{g} {out_bytes / gb:.2f} GB "
            f"(largest tensor {info['largest_tensor'] / 2**20:.0f} MiB, largest output shard "
            f"{max(shard_sizes) / 2**20:.0f} MiB)"
        )
        print(f"{'run':<10} {'wall s':>8} {'x copy':>8} {'peak RSS MiB':>13} {'RSS / ckpt':>11}")
        for k, r in results.items():
            if k == "mergekit_layer_types":
                continue
            if "wall_s" not in r:
                print(f"{k:<10} failed: {r.get('error', '')[-80:]}")
                continue
            ratio = r["wall_s"] / results["copy"]["wall_s"]
            print(
                f"{k:<10} {r['wall_s']:>8.2f} {ratio:>8.2f} {r['peak_rss_mib']:>13.0f} "
                f"{r['peak_rss_mib'] * 2**20 / info['bytes']:>11.3f}"
            )
        print(
            f"modulart RSS above the interpreter baseline: {summary['rss_above_baseline_mib']:.0f} MiB "
            f"(target <= largest shard + 2 x largest tensor = {target:.0f} MiB): "
            f"{'OK' if summary['rss_within_target'] else 'MISSED'}; wall time {summary['time_ratio_vs_copy']:.2f}x copy"
        )
        print(
            f"modulart wall time minus the interpreter/torch start-up ({results['baseline']['wall_s']:.2f} s): "
            f"{summary['time_ratio_vs_copy_excl_import']:.2f}x copy"
        )
        if "mergekit_layer_types" in results:
            lt = results["mergekit_layer_types"]
            print(f"mergekit on a config with layer_types: {'ok' if lt['ok'] else 'FAILS: ' + lt['message'].strip()}")
        if "same_bytes_as_modulart" in results.get("mergekit", {}):
            print(f"mergekit output tensor identical to modulart's: {results['mergekit']['same_bytes_as_modulart']}")
        for c in curves:
            pts = ", ".join(f"{x:.3f} GB {y:.2f} s" for x, y in zip(c["x"], c["y"], strict=True))
            print(f"curve {c['name']}: {pts}; exponent {c['exponent']:.2f}")
        for k, v in ratios.items():
            tgt = f" (target <= {targets[k]}: {'met' if report['met'][k] else 'NOT met'})" if k in targets else ""
            print(f"{k}: {v:.3f}{tgt}")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
