"""EMoE executors against the dense FFN, measured in one run.

- masked executor, forward + backward, vs the dense FFN (target <= 1.15x);
- sparse executor, forward (inference), vs the dense FFN at k/N = 0.25 (target <= 0.6x).

Setting (from the issue): one FFN with d_model 1024, d_ff 4096 (GELU), a batch of 4096 tokens,
N = 64 experts, k = 16, fp32 on CPU. Configurations are timed in interleaved rounds; medians are
reported, and a per-phase profile of the sparse executor shows where its time goes.

Usage:
    python benchmarks/emoe_executors.py [--tokens 4096] [--d-model 1024] [--d-ff 4096] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import modulart as mt


class MLP(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "emoe_executors.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = MLP(args.d_model, args.d_ff)
    x = torch.randn(args.tokens, args.d_model)
    cfg = {"num_experts": args.experts, "top_k": args.top_k, "layers": "all", "split": "random"}

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(x.requires_grad_(False)).square().mean().backward()

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    # Two copies of the same FFN, each converted once (steady state); "dense" runs a copy with its
    # handle disabled. Configurations alternate order every round.
    sparse_model = copy.deepcopy(model)
    masked = mt.emoe.apply(model, **cfg)
    sparse = mt.emoe.apply(sparse_model, **cfg, executor="sparse")

    def timed_dense(body: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            with masked.disabled():
                return _time(body)

        return run

    def fwd_bwd_sparse() -> None:
        sparse_model.zero_grad(set_to_none=True)
        sparse_model(x).square().mean().backward()

    def fwd_sparse() -> None:
        with torch.no_grad():
            sparse_model(x)

    runs: dict[str, Callable[[], float]] = {
        "dense_fwd_bwd": timed_dense(fwd_bwd),
        "masked_fwd_bwd": lambda: _time(fwd_bwd),
        "sparse_fwd_bwd": lambda: _time(fwd_bwd_sparse),
        "dense_fwd": timed_dense(fwd),
        "masked_fwd": lambda: _time(fwd),
        "sparse_fwd": lambda: _time(fwd_sparse),
    }
    for run in runs.values():  # warm-up (allocator, weight regrouping cache)
        run()
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name in runs if r % 2 == 0 else reversed(list(runs)):
            times[name].append(runs[name]())
    med = {k: statistics.median(v) for k, v in times.items()}

    # correctness of what was timed: sparse == masked on the same input and the same labels
    with torch.no_grad():
        ym, ys = model(x), sparse_model(x)
    labels_equal = all(torch.equal(masked.labels()[p], sparse.labels()[p]) for p in masked.labels())
    max_diff = float((ym - ys).abs().max())
    profile = _profile_sparse(next(iter(sparse.layers.values())), x)
    masked.remove()
    sparse.remove()

    ratios = {
        "masked_fwd_bwd_vs_dense": med["masked_fwd_bwd"] / med["dense_fwd_bwd"],
        "sparse_fwd_vs_dense": med["sparse_fwd"] / med["dense_fwd"],
        "masked_fwd_vs_dense": med["masked_fwd"] / med["dense_fwd"],
        "sparse_fwd_bwd_vs_dense": med["sparse_fwd_bwd"] / med["dense_fwd_bwd"],
    }
    targets = {"masked_fwd_bwd_vs_dense": 1.15, "sparse_fwd_vs_dense": 0.6}
    result = {
        "benchmark": "emoe_executors",
        "setting": vars(args) | {"out": str(args.out)},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_seconds": med,
        "ratios": ratios,
        "targets": targets,
        "met": {k: ratios[k] <= v for k, v in targets.items()},
        "sparse_vs_masked_max_abs_diff": max_diff,
        "same_labels": labels_equal,
        "sparse_profile_seconds": profile,
    }
    for k, v in med.items():
        print(f"{k:>16}: {v * 1e3:9.1f} ms (median of {args.rounds})")
    for k, v in ratios.items():
        tgt = f"  (target <= {targets[k]}: {'met' if v <= targets[k] else 'MISSED'})" if k in targets else ""
        print(f"{k:>26}: {v:.3f}x{tgt}")
    print(f"sparse vs masked outputs: max |diff| = {max_diff:.2e}")
    print("sparse executor profile (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in profile.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _profile_sparse(layer: mt.emoe.ConvertedFFN, x: torch.Tensor) -> dict[str, float]:
    """Time the phases of one sparse forward: routing, then expert compute (incl. gathers)."""
    with torch.no_grad():
        t_route = _time(lambda: layer.route(x))
        idx = layer.route(x)
        t_compute = _time(lambda: layer.sparse_forward(x, idx))
    return {"route": t_route, "gather_compute_scatter": t_compute}


if __name__ == "__main__":
    main()
