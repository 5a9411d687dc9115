"""Cost of a MIGU training step against a plain AdamW step on the same small Llama-shaped model.

Time: the two configurations alternate in rounds in one process (same model, same batch); the
median step time of each is reported (target: MIGU <= 1.10x plain). Memory: each configuration runs
in its own subprocess and reports the growth of its peak resident set size over the training steps,
since a process's peak cannot be reset (reported as a ratio; the statistics and masks are small).

Usage:
    python benchmarks/migu_overhead.py [--rounds 15] [--hidden 256] [--layers 4] [--seq 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=args.seq,
    )
    return AutoModelForCausalLM.from_config(cfg)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _memory_child(args: argparse.Namespace, config: str) -> None:
    model = _model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    _step(model, opt, ids)  # optimizer state allocated
    if config == "migu":
        import modulart.migu

        modulart.migu.apply(model, keep_ratio=0.3, optimizer=opt)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        _step(model, opt, ids)
    print(
        json.dumps(
            {
                "peak_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--memory-child", choices=["plain", "migu"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "migu_overhead.json")
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args, args.memory_child)
        return
    import modulart.migu

    plain_model, migu_model = _model(args), _model(args)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    migu_opt = torch.optim.AdamW(migu_model.parameters(), lr=1e-4)
    handle = modulart.migu.apply(migu_model, keep_ratio=0.3, optimizer=migu_opt)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    runs = {"plain": lambda: _step(plain_model, plain_opt, ids), "migu": lambda: _step(migu_model, migu_opt, ids)}
    for run in runs.values():
        run()
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name in runs if r % 2 == 0 else reversed(list(runs)):
            times[name].append(runs[name]())
    stats = handle.stats()
    handle.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("hidden", "layers", "seq", "batch")]
    memory = {}
    for config in ("plain", "migu"):
        out = subprocess.run(
            [sys.executable, __file__, f"--memory-child={config}", *flags], capture_output=True, text=True, check=True
        )
        memory[config] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = med["migu"] / med["plain"]
    mem_ratio = memory["migu"]["peak_kib"] / memory["plain"]["peak_kib"]
    result = {
        "benchmark": "migu_overhead",
        "setting": {k: str(v) for k, v in vars(args).items()},
        "median_step_seconds": med,
        "step_time_ratio": ratio,
        "target": 1.10,
        "met": ratio <= 1.10,
        "peak_rss_kib": memory,
        "peak_rss_ratio": mem_ratio,
        "layers_masked": len(stats),
    }
    print(
        f"plain AdamW step {med['plain'] * 1e3:.1f} ms, MIGU step {med['migu'] * 1e3:.1f} ms "
        f"(median of {args.rounds}): ratio {ratio:.3f}x (target <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})"
    )
    print(
        f"peak RSS: plain {memory['plain']['peak_kib'] / 1024:.0f} MiB, MIGU {memory['migu']['peak_kib'] / 1024:.0f} "
        f"MiB (ratio {mem_ratio:.3f}); {len(stats)} layers masked"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
