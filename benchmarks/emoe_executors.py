"""EMoE executors against the dense FFN, measured in one run, with scaling curves and a profile.

- masked executor, forward + backward, vs the dense FFN (target <= 1.15x);
- sparse executor, forward (inference), vs the dense FFN at k/N = 0.25 (target <= 0.40x) and at
  k/N = 0.125 (target <= 0.25x);
- sparse executor, forward + backward, vs the dense FFN at k/N = 0.25 (target <= 0.55x).

Setting: one FFN with d_model 1024, d_ff 4096 (GELU), a batch of 4096 tokens, N = 64 experts,
k = 16, fp32 on CPU. Configurations are timed in interleaved rounds (the order reverses every
round); medians are reported. Every configuration runs on its own copy of the same FFN (the
same random split, so the executors compute the same function).

Curves: the sparse / dense forward ratio against N/k (k/N = 1/2 ... 1/16 at N = 64) and against
the number of tokens (512 ... 8192 at k/N = 0.25), each with its fitted exponent.

Profile (``torch.profiler``, one call each): where the sparse forward and forward + backward
spend their time (routing, the per-expert GEMMs, gathers, ``index_add_``, the activation, the
rest = Python and allocation), and the GFLOP/s of the per-expert GEMMs against the dense GEMMs.

Usage:
    python benchmarks/emoe_executors.py [--tokens 4096] [--d-model 1024] [--d-ff 4096] [--experts 64]
        [--top-k 16] [--rounds 7] [--quick] [--no-curves] [--device cpu] [--out benchmarks/results/emoe_executors.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _scaling import curve, plot_curves
from torch import nn

import modulart as mt


class MLP(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


DEVICE = torch.device("cpu")  # set by --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _time(fn: Callable[[], object]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _fwd(model: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        with torch.no_grad():
            return _time(lambda: model(x))

    return run


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    def body() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    return lambda: _time(body)


def _interleaved(runs: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each run over ``rounds`` interleaved rounds (order reversed every other round)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(runs[name]())
    return {k: statistics.median(v) for k, v in times.items()}


def _convert(model: nn.Module, experts: int, k: int, executor: str) -> tuple[nn.Module, Any]:
    copy_ = copy.deepcopy(model)
    handle = mt.emoe.apply(copy_, num_experts=experts, top_k=k, layers="all", split="random", executor=executor)
    return copy_, handle


# --- profile --------------------------------------------------------------------------------------
PHASES = {
    "expert GEMMs (mm/addmm)": ("aten::mm", "aten::addmm"),
    "gather (index_select)": ("aten::index_select",),
    "scatter (index_add_)": ("aten::index_add_", "aten::index_add", "aten::scatter_add_"),
    "activation (gelu + backward)": ("aten::gelu", "aten::gelu_backward"),
    "grouping plan (argsort, bincount, sync)": (
        "aten::sort",
        "aten::argsort",
        "aten::bincount",
        "aten::div",
        "aten::nonzero",
        "aten::_local_scalar_dense",
    ),
    "allocation / zero-fill": ("aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::zeros_like"),
}


def _op_self_seconds(fn: Callable[[], object]) -> tuple[dict[str, float], float]:
    """Self CPU seconds per aten op of one call of ``fn`` (``torch.profiler``) and the call's wall seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        out[ev.key] = out.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e6
    return out, wall


def _phases(ops: dict[str, float], wall: float) -> dict[str, float]:
    seen: dict[str, float] = {}
    claimed = 0.0
    for phase, names in PHASES.items():
        seen[phase] = sum(ops.get(n, 0.0) for n in names)
        claimed += seen[phase]
    seen["other aten ops"] = sum(ops.values()) - claimed
    seen["python / dispatch (wall - ops)"] = max(0.0, wall - sum(ops.values()))
    seen["wall (profiled)"] = wall
    return seen


def _profile(
    layer: mt.emoe.ConvertedFFN, sparse_model: nn.Module, dense: nn.Module, x: torch.Tensor, args: argparse.Namespace
) -> tuple[dict[str, Any], list[str]]:
    """Per-phase seconds of a sparse forward / forward + backward and the GEMM FLOP rates."""
    t, d, f = args.tokens, args.d_model, args.d_ff
    with torch.no_grad():
        idx, keep = layer.dispatch(x)
        counts = torch.bincount(idx.flatten(), minlength=layer.groups.num_experts)
        # neurons each assignment runs: the size of its expert
        expert_flops = 4.0 * d * float((counts * layer.groups.sizes).sum())  # 2 GEMMs, 2 flops per MAC
        layer.sparse_forward(x, idx, keep)  # warm
        route_ops, route_wall = _op_self_seconds(lambda: layer.dispatch(x))
        fwd_ops, fwd_wall = _op_self_seconds(lambda: layer.sparse_forward(x, idx, keep))
        dense_ops, dense_wall = _op_self_seconds(lambda: dense(x))

    def fwd_bwd() -> None:
        sparse_model.zero_grad(set_to_none=True)
        sparse_model(x).square().mean().backward()

    fwd_bwd()
    fb_ops, fb_wall = _op_self_seconds(fwd_bwd)
    dense_flops = 4.0 * t * d * f
    gemm = ("aten::mm", "aten::addmm")
    t_expert = sum(fwd_ops.get(n, 0.0) for n in gemm)
    t_dense = sum(dense_ops.get(n, 0.0) for n in gemm)
    t_expert_bwd = sum(fb_ops.get(n, 0.0) for n in gemm)
    rates = {
        "dense_gemm_gflops": dense_flops / t_dense / 1e9 if t_dense else float("nan"),
        "expert_gemm_gflops_forward": expert_flops / t_expert / 1e9 if t_expert else float("nan"),
        # forward + backward: 2 forward GEMMs + 3 backward ones (input needs no gradient), flops 2.5x the forward's
        "expert_gemm_gflops_fwd_bwd": 2.5 * expert_flops / t_expert_bwd / 1e9 if t_expert_bwd else float("nan"),
        "expert_flops_over_dense": expert_flops / dense_flops,
    }
    profile = {
        "routing_seconds": route_wall,
        "routing_ops": dict(sorted(route_ops.items(), key=lambda kv: -kv[1])[:6]),
        "sparse_forward_phases": _phases(fwd_ops, fwd_wall),
        "sparse_fwd_bwd_phases": _phases(fb_ops, fb_wall),
        "dense_forward_phases": _phases(dense_ops, dense_wall),
        "gemm_rates": rates,
    }
    fp = profile["sparse_forward_phases"]
    total = route_wall + fwd_wall
    notes = [
        f"per-expert GEMMs run at {rates['expert_gemm_gflops_forward']:.0f} GFLOP/s in the forward "
        f"({rates['expert_gemm_gflops_fwd_bwd']:.0f} in forward + backward) against "
        f"{rates['dense_gemm_gflops']:.0f} GFLOP/s for the dense GEMMs; the experts do "
        f"{rates['expert_flops_over_dense']:.3f}x the dense FLOPs",
        "sparse forward (profiled, one call): "
        + ", ".join(
            f"{k} {v / total:.0%}"
            for k, v in [("routing", route_wall), *((k, v) for k, v in fp.items() if k != "wall (profiled)")]
            if v > 0
        ),
    ]
    return profile, notes


# --- curves ---------------------------------------------------------------------------------------
def _ratio_point(model: nn.Module, x: torch.Tensor, experts: int, k: int, rounds: int) -> float:
    sparse, handle = _convert(model, experts, k, "sparse")
    med = _interleaved({"dense": _fwd(model, x), "sparse": _fwd(sparse, x)}, rounds)
    handle.remove()
    return med["sparse"] / med["dense"]


def _curves(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    n = args.experts
    rounds = max(3, args.rounds // 2)
    x = torch.randn(args.tokens, args.d_model, device=DEVICE)
    ks = [n // 2, n // 4, n // 8, n // 16]
    by_k = [_ratio_point(model, x, n, k, rounds) for k in ks]
    tokens = [args.tokens // 8, args.tokens // 4, args.tokens // 2, args.tokens, args.tokens * 2]
    k = max(1, n // 4)
    by_t = [_ratio_point(model, torch.randn(t, args.d_model, device=DEVICE), n, k, rounds) for t in tokens]
    setting = f"d_model {args.d_model}, d_ff {args.d_ff}, N {n}"
    return [
        curve(
            "sparse/dense forward vs N/k",
            "N/k",
            "sparse / dense forward",
            [n / k_ for k_ in ks],
            by_k,
            f"{setting}, {args.tokens} tokens; ideal exponent -1 (FLOPs scale with k/N)",
        ),
        curve(
            "sparse/dense forward vs tokens",
            "tokens",
            "sparse / dense forward",
            tokens,
            by_t,
            f"{setting}, k {k} (k/N 0.25); ideal exponent 0",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=16, help="k of the main comparison (k/N = 0.25 at N = 64)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="a small setting (< 60 s) with every measured path")
    ap.add_argument("--no-curves", action="store_true", help="skip the scaling sweeps")
    ap.add_argument("--device", default="cpu", help="torch device of the FFN and the batch (e.g. cuda)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "emoe_executors.json")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.quick:
        args.tokens, args.d_model, args.d_ff, args.experts, args.top_k, args.rounds = 512, 256, 1024, 16, 4, 3

    torch.manual_seed(0)
    n, k = args.experts, args.top_k
    k_half = max(1, k // 2)
    model = MLP(args.d_model, args.d_ff).to(DEVICE)
    x = torch.randn(args.tokens, args.d_model, device=DEVICE)
    masked_model, masked = _convert(model, n, k, "masked")
    sparse_model, sparse = _convert(model, n, k, "sparse")
    half_model, half = _convert(model, n, k_half, "sparse")
    dense = model

    runs: dict[str, Callable[[], float]] = {
        "dense_fwd_bwd": _fwd_bwd(dense, x),
        "masked_fwd_bwd": _fwd_bwd(masked_model, x),
        "sparse_fwd_bwd": _fwd_bwd(sparse_model, x),
        "dense_fwd": _fwd(dense, x),
        "masked_fwd": _fwd(masked_model, x),
        "sparse_fwd": _fwd(sparse_model, x),
        "sparse_fwd_half_k": _fwd(half_model, x),
    }
    med = _interleaved(runs, args.rounds, warmup=2)

    # correctness of what was timed: sparse == masked on the same input and the same labels
    with torch.no_grad():
        ym, ys = masked_model(x), sparse_model(x)
    labels_equal = all(torch.equal(masked.labels()[p], sparse.labels()[p]) for p in masked.labels())
    max_diff = float((ym - ys).abs().max())
    grads = []
    for m in (masked_model, sparse_model):
        m.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None})
    grad_diff = max(
        float((grads[1][n_] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n_, g in grads[0].items()
    )
    layer = next(iter(sparse.layers.values()))
    if DEVICE.type == "cpu":
        profile, notes = _profile(layer, sparse_model, dense, x, args)
    else:  # the profile reads CPU self times, which say nothing about kernels on an accelerator
        profile, notes = {}, [f"device {DEVICE}: timings synchronise the device; no CPU-op profile"]
    masked.remove()
    sparse.remove()
    half.remove()

    kn, kn_half = k / n, k_half / n
    ratios = {
        "masked_fwd_bwd_vs_dense": med["masked_fwd_bwd"] / med["dense_fwd_bwd"],
        "sparse_fwd_vs_dense": med["sparse_fwd"] / med["dense_fwd"],
        "sparse_fwd_vs_dense_half_k": med["sparse_fwd_half_k"] / med["dense_fwd"],
        "sparse_fwd_bwd_vs_dense": med["sparse_fwd_bwd"] / med["dense_fwd_bwd"],
        "masked_fwd_vs_dense": med["masked_fwd"] / med["dense_fwd"],
    }
    targets = {
        "masked_fwd_bwd_vs_dense": 1.15,
        "sparse_fwd_vs_dense": 0.40,
        "sparse_fwd_vs_dense_half_k": 0.25,
        "sparse_fwd_bwd_vs_dense": 0.55,
    }
    curves = [] if args.no_curves else _curves(model, args)
    notes = [
        f"sparse_fwd_vs_dense: k/N = {kn:g} (k {k}); sparse_fwd_vs_dense_half_k: k/N = {kn_half:g} (k {k_half})",
        *notes,
        "executor: one stable argsort groups assignments by expert; per expert one index_select into a reused "
        "buffer, one GEMM for the key (and up) columns, the activation, one GEMM for the value rows, index_add_ "
        "into the output; every GEMM writes into preallocated buffers; custom autograd backward replays the loop",
        "tried during development (not measured by this run): "
        "fresh per-expert tensors (the previous loop) pay a page-faulting allocation per GEMM output "
        "(about 1.4x slower GEMMs, 5-7x slower gathers); torch.bmm over padded capacity blocks wastes work "
        "under uneven load and its K = s GEMMs were slower than per-expert mm with an out= buffer",
    ]
    result = {
        "benchmark": "emoe_executors",
        "setting": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "device": str(DEVICE) if DEVICE.type == "cpu" else f"{DEVICE} ({torch.cuda.get_device_name(DEVICE)})",
        "torch": torch.__version__,
        "median_seconds": med,
        "ratios": ratios,
        "targets": targets,
        "met": {k_: ratios[k_] <= v for k_, v in targets.items()},
        "curves": curves,
        "notes": notes,
        "sparse_vs_masked_max_abs_diff": max_diff,
        "sparse_vs_masked_grad_max_rel_diff": grad_diff,
        "same_labels": labels_equal,
        "profile": profile,
    }
    for k_, v in med.items():
        print(f"{k_:>18}: {v * 1e3:9.1f} ms (median of {args.rounds})")
    for k_, v in ratios.items():
        tgt = f"  (target <= {targets[k_]}: {'met' if v <= targets[k_] else 'MISSED'})" if k_ in targets else ""
        print(f"{k_:>28}: {v:.3f}x{tgt}")
    for c in curves:
        print(f"curve {c['name']}: x {c['x']} y {[round(v, 3) for v in c['y']]} exponent {c['exponent']:.2f}")
    print(f"sparse vs masked: outputs max |diff| {max_diff:.2e}, gradients max rel diff {grad_diff:.2e}")
    for note in notes:
        print("note:", note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if curves:
        plot_curves(curves, args.out.with_name(args.out.stem + "_curves.png"), "EMoE sparse executor scaling")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
