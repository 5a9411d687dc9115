"""A 7B-shaped end-to-end run: every operator path at Llama-7B FFN shapes, in bf16, on this machine.

Nothing is downloaded. The model is a 32-layer Llama built from a transformers config with
Llama-7B's FFN (d_model 4096, d_ff 11008, SwiGLU) and a small attention (8 heads of 16 dims) so that
the model (~8.7 GB in bf16) and one step's gradients fit in 24 GB. Its gate-projection rows (the
keys EMoE clusters) are drawn around 64 random centres, so that clustering has structure to find,
as trained FFNs do.

Phases, each in a fresh subprocess (peak RSS from ``/proc/self/status`` VmHWM, reset per phase):

1. ``convert``: build the model; ``modulart.emoe.apply`` on all 32 FFNs (balanced k-means, N 64,
   k 16; a tqdm bar on a terminal); clustering quality (inertia of a random balanced split over
   the k-means inertia, per layer); one EMoE forward on a short batch; then the dense model saved
   with ``save_pretrained``. Targets: conversion <= 90 s, peak RSS <= the model's size + 2 GB.
2. ``migu``: the saved model loaded; ``modulart.migu.apply`` (keep ratio 0.3, gradient masking only:
   with plain SGD a zero gradient already keeps a row in place, and ``freeze_masked_rows`` would copy
   every gated weight) and one SGD step on a short batch; the fraction of a gated layer's rows that moved.
3. ``grow``: ``modulart.stacking.grow_checkpoint`` x2 of the saved checkpoint (32 -> 64 blocks).
4. ``stream``: a Mixtral-shaped checkpoint (d 4096, d_ff 14336, 8 experts, per-expert keys) of
   comparable size, written, then its streamed weight report against a raw read of the files.

Everything is written under a fresh folder in ``--workdir`` and deleted at the end (``--keep`` keeps it).
Not run in CI (about 15 minutes and ~35 GB of disk on 2 cores); ``--quick`` runs the same phases at a
toy size in a minute.

Usage:
    python benchmarks/scale_7b.py [--workdir /tmp] [--keep] [--quick] [--out results/scale_7b.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from introspect_streaming import run_worker, write_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30

FULL = {
    "layers": 32, "d_model": 4096, "d_ff": 11008, "heads": 8, "head_dim": 16, "vocab": 32000,
    "experts": 64, "top_k": 16, "centres": 64, "tokens": 64,
    "mix_layers": 3, "mix_experts": 8, "mix_d_ff": 14336,
}  # fmt: skip
QUICK = FULL | {
    "layers": 2, "d_model": 256, "d_ff": 688, "vocab": 512, "experts": 8, "top_k": 2, "centres": 8, "tokens": 16,
    "mix_layers": 2, "mix_experts": 4, "mix_d_ff": 512,
}  # fmt: skip


# --- measurements in the phase subprocesses -----------------------------------------------------
def _status(field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a peak belongs to one part of a phase."""
    Path("/proc/self/clear_refs").write_text("5")


class _Timer:
    """``with _Timer(rec, "name"):`` records seconds and peak RSS (GiB) of the block into ``rec``."""

    def __init__(self, rec: dict[str, Any], name: str) -> None:
        self.rec, self.name = rec, name

    def __enter__(self) -> None:
        _reset_peak()
        print(f"  {self.name} ...", file=sys.stderr, flush=True)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        s = time.perf_counter() - self.t0
        self.rec[self.name] = {"seconds": round(s, 2), "peak_rss_gib": round(_status("VmHWM") / GIB, 3)}
        print(f"  {self.name}: {s:.1f} s, peak RSS {_status('VmHWM') / GIB:.2f} GiB", file=sys.stderr, flush=True)


def _config(s: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama",
        hidden_size=s["d_model"],
        intermediate_size=s["d_ff"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        head_dim=s["head_dim"],
        vocab_size=s["vocab"],
        max_position_embeddings=256,
    )


def _structured_keys(model: Any, s: dict[str, Any]) -> None:
    """Gate rows = one of ``centres`` random directions + isotropic noise (unit-scale centres, noise 0.5)."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate_proj.weight
            centres = torch.randn(s["centres"], s["d_model"], generator=g)
            which = torch.randint(0, s["centres"], (s["d_ff"],), generator=g)
            for start in range(0, s["d_ff"], 2048):  # in slices: no fp32 copy of the whole matrix
                rows = slice(start, min(s["d_ff"], start + 2048))
                noise = torch.randn(rows.stop - rows.start, s["d_model"], generator=g) * 0.5
                w[rows] = ((centres[which[rows]] + noise) * 0.02).to(w.dtype)


def phase_convert(s: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    import modulart as mt
    from modulart.emoe.cluster import inertia, random_balanced_labels

    rec: dict[str, Any] = {"rss_start_gib": _status("VmRSS") / GIB}
    with _Timer(rec, "build"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(s), dtype=torch.bfloat16).eval()
        _structured_keys(model, s)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ffn_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp." in n)
    rec |= {"model_gib": model_bytes / GIB, "ffn_gib": ffn_bytes / GIB, "rss_model_gib": _status("VmRSS") / GIB}
    with _Timer(rec, "emoe_convert"):
        handle = mt.emoe.apply(model, num_experts=s["experts"], top_k=s["top_k"], layers="all", split="kmeans")
    rec["converted_ffns"] = len(handle.labels())
    ratios = []
    for path, labels in handle.labels().items():
        keys = model.get_submodule(path).gate_proj.weight.float()
        rnd = random_balanced_labels(s["d_ff"], s["experts"], seed=1)
        ratios.append(inertia(keys, rnd, s["experts"]) / inertia(keys, labels, s["experts"]))
    rec["inertia_random_over_kmeans"] = {"min": min(ratios), "mean": sum(ratios) / len(ratios), "max": max(ratios)}
    ids = torch.randint(0, s["vocab"], (1, s["tokens"]), generator=torch.Generator().manual_seed(0))
    with _Timer(rec, "emoe_forward"), torch.no_grad():
        logits = model(input_ids=ids).logits
    rec["emoe_forward_finite"] = bool(logits.isfinite().all())
    handle.remove()
    with _Timer(rec, "save_dense"):
        model.save_pretrained(work / "dense", max_shard_size="2GB")
    rec["saved_bytes"] = sum(f.stat().st_size for f in (work / "dense").glob("*.safetensors"))
    return rec


def phase_migu(s: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    import modulart as mt

    rec: dict[str, Any] = {}
    with _Timer(rec, "load"):
        model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    # plain SGD (no momentum, no weight decay) leaves a row with a zero gradient where it is, so the
    # default freeze_masked_rows=True would only add a copy of every gated weight (~8 GiB here, which
    # with the weights and their gradients no longer fits 24 GiB): gradient masking alone, as the reference
    handle = mt.migu.apply(model, keep_ratio=0.3, optimizer=opt, freeze_masked_rows=False)
    gated = list(handle.plan.targets)
    probe_path = next(p for p in gated if ".mlp." in p)
    probe = model.get_submodule(probe_path).weight
    before = probe.detach().clone()
    ids = torch.randint(0, s["vocab"], (1, s["tokens"]), generator=torch.Generator().manual_seed(0))
    with _Timer(rec, "migu_step"):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    moved = (probe.detach() != before).any(dim=1).float().mean().item()
    rec |= {
        "gated_layers": len(gated),
        "probe_layer": probe_path,
        "probe_rows_moved": moved,
        "freeze_masked_rows": False,
    }
    handle.remove()
    return rec


def phase_grow(s: dict[str, Any], work: Path) -> dict[str, Any]:
    import modulart as mt

    rec: dict[str, Any] = {}
    with _Timer(rec, "grow_checkpoint_x2"):
        out = mt.stacking.grow_checkpoint(work / "dense", work / "grown", 2, progress=False)
    from safetensors import safe_open

    names = [k for f in out.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]  # noqa: SIM118
    blocks = {k.split(".")[2] for k in names if k.startswith("model.layers.")}
    rec |= {"output_blocks": len(blocks), "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    shutil.rmtree(out)  # written by this run, in this run's folder
    return rec


def phase_stream(s: dict[str, Any], work: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    d = work / "mixtral"
    t0 = time.perf_counter()
    size = write_checkpoint(d, s["mix_layers"], s["mix_experts"], s["d_model"], s["mix_d_ff"], 1)
    rec |= {"checkpoint_bytes": size, "write_seconds": round(time.perf_counter() - t0, 1)}
    layer_experts = s["mix_experts"] * 3 * s["d_model"] * s["mix_d_ff"] * 2
    raw = run_worker("raw_read", d, 128)
    stream = run_worker("stream", d, 128)
    rec |= {
        "raw_read_seconds": raw["seconds"],
        "stream_seconds": stream["seconds"],
        "stream_peak_rss_gib": stream["peak_rss"] / GIB,
        "stream_rss_above_start_gib": (stream["peak_rss"] - stream["rss_before"]) / GIB,
        "one_layer_experts_gib": layer_experts / GIB,
    }
    shutil.rmtree(d)
    return rec


PHASES = {"convert": phase_convert, "migu": phase_migu, "grow": phase_grow, "stream": phase_stream}


# --- the driver -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes, the same phases (about a minute)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--keep", action="store_true", help="keep the run's folder (the saved checkpoint)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: results/scale_7b[_quick].json)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (a partial run)")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    s = (QUICK if args.quick else FULL) | ({"layers": args.layers} if args.layers else {})
    if args.phase:  # one phase, in this fresh process; its record is the last stdout line
        print(json.dumps(PHASES[args.phase](s, args.dir)))
        return 0
    out = args.out or RESULTS / f"scale_7b{'_quick' if args.quick else ''}.json"
    work = Path(tempfile.mkdtemp(prefix="modulart-scale7b-", dir=args.workdir))
    phases: dict[str, Any] = {}
    try:
        for name in PHASES:
            print(f"phase {name}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--phase", name, "--dir", str(work)] + (["--quick"] if args.quick else [])
            cmd += ["--layers", str(args.layers)] if args.layers else []
            proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            phases[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work)
    c = phases["convert"]
    budget_gib = c["model_gib"] + 2.0
    ratios = {
        "emoe_convert_seconds_over_90": c["emoe_convert"]["seconds"] / 90.0,
        "emoe_convert_peak_rss_over_model_plus_2gb": c["emoe_convert"]["peak_rss_gib"] / budget_gib,
    }
    targets = dict.fromkeys(ratios, 1.0)
    st = phases["stream"]
    notes = [
        f"model {c['model_gib']:.2f} GiB in bf16 ({c['ffn_gib']:.2f} GiB of FFN weights); EMoE conversion of "
        f"{c['converted_ffns']} FFNs in {c['emoe_convert']['seconds']:.1f} s at a peak RSS of "
        f"{c['emoe_convert']['peak_rss_gib']:.2f} GiB (budget {budget_gib:.2f} GiB)",
        "clustering quality: a random balanced split's inertia over the k-means inertia, per layer: "
        f"min {c['inertia_random_over_kmeans']['min']:.2f}, mean {c['inertia_random_over_kmeans']['mean']:.2f}",
        f"EMoE forward of {s['tokens']} tokens: {c['emoe_forward']['seconds']:.1f} s; MIGU step (SGD, "
        f"{phases['migu']['gated_layers']} gated layers, gradient masking only): "
        f"{phases['migu']['migu_step']['seconds']:.1f} s at a peak "
        f"RSS of {phases['migu']['migu_step']['peak_rss_gib']:.2f} GiB (weights + gradients); "
        f"{phases['migu']['probe_rows_moved']:.3f} of {phases['migu']['probe_layer']}'s rows moved (keep ratio 0.3)",
        f"grow_checkpoint x2 ({c['saved_bytes'] / GIB:.2f} -> {phases['grow']['output_bytes'] / GIB:.2f} GiB, "
        f"{phases['grow']['output_blocks']} blocks): {phases['grow']['grow_checkpoint_x2']['seconds']:.1f} s at a "
        f"peak RSS of {phases['grow']['grow_checkpoint_x2']['peak_rss_gib']:.2f} GiB",
        f"streamed weight report of a {st['checkpoint_bytes'] / GIB:.2f} GiB Mixtral-shaped checkpoint: "
        f"{st['stream_seconds']:.1f} s vs {st['raw_read_seconds']:.1f} s to read its files, "
        f"{st['stream_rss_above_start_gib']:.2f} GiB above the process start (one layer's experts: "
        f"{st['one_layer_experts_gib']:.2f} GiB)",
    ]
    import torch

    result = {
        "benchmark": "scale_7b",
        "setting": s | {"quick": args.quick},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "phases": phases,
        "ratios": ratios,
        "targets": targets,
        "met": {k: ratios[k] <= targets[k] for k in ratios},
        "notes": notes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for n in notes:
        print(n)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
