"""Forward-time overhead of the modulart HookRegistry, measured against baselines in the same run.

Configurations (all on the real all-MiniLM-L6-v2, eval, fp32, no grad):

- ``bare``: the model, no hooks;
- ``empty_scope``: inside an open ``HookRegistry(model).scope(...)`` with nothing installed;
- ``torch_capture``: plain ``register_forward_hook`` on every FFN output module, storing the output;
- ``registry_capture``: the same capture through ``HookRegistry.at(ffn.output_site, ...)``.

The configurations are timed in interleaved rounds (so drift hits all alike) and the median
per-forward time of each is reported. Ratios and targets:
``empty_scope / bare <= 1.03`` and ``registry_capture / torch_capture <= 1.05``.

Usage:
    python benchmarks/hook_overhead.py [--batch 8] [--seq 128] [--rounds 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import modulart as mt
from modulart.tour import load_minilm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hook_overhead.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, _ = load_minilm()
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    ffns = mt.find_ffns(model)
    store: dict[str, torch.Tensor] = {}

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def bare() -> Callable[[], None]:
        return lambda: None

    def empty_scope() -> Callable[[], None]:
        reg = mt.HookRegistry(model).scope("bench")
        return reg.remove

    def torch_capture() -> Callable[[], None]:
        handles = []
        for f in ffns:

            def hook(m: torch.nn.Module, a: Any, out: torch.Tensor, p: str = f.path) -> None:
                store[p] = out.detach()

            handles.append(f.output_site.module.register_forward_hook(hook))

        def teardown() -> None:
            for h in handles:
                h.remove()

        return teardown

    def registry_capture() -> Callable[[], None]:
        reg = mt.HookRegistry(model, name="bench")
        for f in ffns:

            def grab(y: torch.Tensor, p: str = f.path) -> None:
                store[p] = y.detach()

            reg.at(f.output_site, grab, priority=mt.Priority.RECORD)
        return reg.remove

    configs: dict[str, Callable[[], Callable[[], None]]] = {
        "bare": bare,
        "empty_scope": empty_scope,
        "torch_capture": torch_capture,
        "registry_capture": registry_capture,
    }
    for _ in range(3):  # warm-up
        forward()
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            teardown = configs[name]()
            t0 = time.perf_counter()
            forward()
            times[name].append(time.perf_counter() - t0)
            teardown()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "empty_scope_vs_bare": med["empty_scope"] / med["bare"],
        "registry_capture_vs_bare": med["registry_capture"] / med["bare"],
        "registry_capture_vs_torch_capture": med["registry_capture"] / med["torch_capture"],
        "torch_capture_vs_bare": med["torch_capture"] / med["bare"],
    }
    targets = {"empty_scope_vs_bare": 1.03, "registry_capture_vs_torch_capture": 1.05}
    result = {
        "benchmark": "hook_overhead",
        "model": "all-MiniLM-L6-v2",
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "median_seconds": med,
        "ratios": ratios,
        "targets": targets,
        "met": {k: ratios[k] <= v for k, v in targets.items()},
    }
    for k, v in med.items():
        print(f"{k:>18}: {v * 1e3:8.2f} ms / forward (median of {args.rounds})")
    for k, v in ratios.items():
        tgt = f"  (target <= {targets[k]:.2f}: {'met' if v <= targets[k] else 'MISSED'})" if k in targets else ""
        print(f"{k:>36}: {v:.4f}x{tgt}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
