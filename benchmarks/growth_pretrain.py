"""Benchmark: does G_stack speed up pre-training at small scale? (Du et al. 2024 report 54.6% at 7B)

Real text available offline (byte-level): the prose of the CPython language reference
(``pydoc_data``) and standard-library source. A 2-layer Llama is trained for ``d`` steps, grown x4
to 8 layers with each operator (direct = G_stack, zero, random, learn), and trained on with a fresh
AdamW and a restarted schedule (the paper's recipe); an 8-layer Llama of the same width is trained
from scratch on the same batches for ``T`` steps, at two peak LRs (1e-3, and the small model's 3e-3
as a control). The best scratch run is the target, and the grown runs use that run's peak LR, so an
untuned scratch baseline cannot inflate the speedup (the speedup against the 1e-3 run is reported
too). Reported: the tokens each grown run needs to reach the scratch model's final validation loss
(small-model tokens included) and the speedup ``T_tokens / tokens_needed - 1``, plus the loss curves
as a PNG.

The number of steps is calibrated to a wall-clock budget (default 13 minutes) from the measured
step time, unless ``--steps`` is given.

Run: python benchmarks/growth_pretrain.py             (<= ~15 minutes on 2 CPU cores)
     python benchmarks/growth_pretrain.py --quick     (CI size, about a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modulart.stacking as st
from modulart.text import reference_paragraphs, stdlib_source

RESULTS = Path(__file__).resolve().parent / "results"
OPERATORS = ("direct", "zero", "random", "learn")


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    text = "\n\n".join(reference_paragraphs())
    for pkg in ("json", "email", "argparse", "textwrap", "csv"):
        text += "\n\n" + stdlib_source(pkg)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(len(data) * 0.95)
    return data[:cut], data[cut:]


class Batches:
    """Deterministic batches: batch ``step`` is the same for every run."""

    def __init__(self, data: torch.Tensor, batch: int, seq: int, seed: int) -> None:
        self.data, self.batch, self.seq, self.seed = data, batch, seq, seed

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.data) - self.seq - 1, (self.batch,), generator=g)
        return torch.stack([self.data[s : s + self.seq] for s in starts.tolist()])


def make_model(layers: int, d: int, seq: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=d * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=max(1, d // 32),
        num_key_value_heads=max(1, d // 32),
        vocab_size=256,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 10 + 0.5 * (peak - peak / 10) * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def evaluate(model: nn.Module, val: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(model(input_ids=b, labels=b).loss) for b in val) / len(val)
    model.train()
    return loss


def train(
    model: nn.Module,
    batches: Callable[[int], torch.Tensor],
    steps: range,
    peak: float,
    warmup: int,
    val: list[torch.Tensor],
    eval_every: int,
    tokens_per_step: int,
    token_offset: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[list[tuple[int, float]], torch.optim.Optimizer]:
    """Train over ``steps`` (global batch indices); returns (tokens, val loss) points and the optimizer."""
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.1, betas=(0.9, 0.95))
    curve: list[tuple[int, float]] = []
    n = len(steps)
    model.train()
    for k, step in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(k, n, peak, warmup)
        ids = batches(step)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (k + 1) % eval_every == 0 or k + 1 == n:
            curve.append((token_offset + (k + 1) * tokens_per_step, evaluate(model, val)))
    return curve, opt


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which the (linearly interpolated) validation loss is <= target."""
    prev: tuple[int, float] | None = None
    for tok, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tok)
            frac = (prev[1] - target) / (prev[1] - loss)
            return prev[0] + frac * (tok - prev[0])
        prev = (tok, loss)
    return None


def _learn_loss(batches: Callable[[int], torch.Tensor], first: int) -> Callable[[nn.Module], torch.Tensor]:
    """The LiGO fit's loss: fresh training batches from step ``first`` on (their tokens are counted)."""
    counter = {"k": 0}

    def loss_fn(m: nn.Module) -> torch.Tensor:
        ids = batches(first + counter["k"])
        counter["k"] += 1
        return m(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]

    return loss_fn


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: tiny model, a few dozen steps")
    ap.add_argument("--steps", type=int, default=None, help="T, steps of the 8-layer run (default: from the budget)")
    ap.add_argument("--budget-min", type=float, default=12.0, help="wall-clock budget used to choose T")
    ap.add_argument("--growth-fraction", type=float, default=0.25, help="d = this fraction of T (small-model steps)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    d_model, seq, batch = (32, 32, 8) if args.quick else (64, 64, 16)
    small_layers, factor = 2, 4
    train_data, val_data = corpus()
    batches = Batches(train_data, batch, seq, args.seed)
    val = [Batches(val_data, batch, seq, args.seed + 1)(i) for i in range(4)]
    tokens_per_step = batch * seq
    t_start = time.perf_counter()

    if args.steps is not None:
        T = args.steps
    elif args.quick:
        T = 40
    else:  # calibrate: 8-layer step time; total work ~ T (scratch) + 4 (T - d) + small d + evals
        probe = make_model(small_layers * factor, d_model, seq, args.seed)
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for i in range(6):
            probe(input_ids=batches(i), labels=batches(i)).loss.backward()
            opt.step()
            opt.zero_grad()
        step_s = (time.perf_counter() - t0) / 6
        per_t = 2 + len(OPERATORS) * (1 - args.growth_fraction) + args.growth_fraction / 3 + 0.3
        T = int(max(60, min(4000, args.budget_min * 60 / (per_t * step_s))))
    d_steps = max(1, int(T * args.growth_fraction))
    eval_every = max(1, T // 20)
    peak_large, peak_small = 1e-3, 3e-3
    warm = max(1, T // 20)
    print(f"T = {T} steps of {tokens_per_step} tokens; small model {d_steps} steps; x{factor} growth")

    # scratch baselines: the recipe's large-model LR, and (a control) the small model's higher LR;
    # the target is the best of them, so an untuned scratch LR cannot inflate the speedup
    scratch_runs: dict[str, Any] = {}
    timings: dict[str, float] = {}
    n_params = 0
    for lr in (peak_large, peak_small):
        scratch = make_model(small_layers * factor, d_model, seq, args.seed)
        n_params = sum(p.numel() for p in scratch.parameters())
        t0 = time.perf_counter()
        curve, _ = train(scratch, batches, range(T), lr, warm, val, eval_every, tokens_per_step, 0)
        timings[f"scratch_lr{lr:g}_s"] = time.perf_counter() - t0
        scratch_runs[f"{lr:g}"] = {"final_val_loss": curve[-1][1], "curve": curve}
        del scratch
    best_lr = min(scratch_runs, key=lambda k: scratch_runs[k]["final_val_loss"])
    target = scratch_runs[best_lr]["final_val_loss"]
    recipe_target = scratch_runs[f"{peak_large:g}"]["final_val_loss"]

    small = make_model(small_layers, d_model, seq, args.seed + 7)
    t0 = time.perf_counter()
    small_curve, small_opt = train(
        small, batches, range(d_steps), peak_small, warm, val, eval_every, tokens_per_step, 0
    )
    timings["small_s"] = time.perf_counter() - t0
    d_tokens = d_steps * tokens_per_step
    plan = st.LayerPlan.stack(small_layers, factor)
    runs: dict[str, Any] = {}
    for op in OPERATORS:
        t0 = time.perf_counter()
        extra_tokens = 0
        kwargs: dict[str, Any] = {}
        if op == "random":
            kwargs["ramp_steps"] = max(1, (T - d_steps) // 10)
        if op == "learn":
            learn_steps = max(2, (T - d_steps) // 50)
            kwargs.update(loss_fn=_learn_loss(batches, d_steps), learn_steps=learn_steps, learn_lr=0.02)
            extra_tokens = learn_steps * tokens_per_step
        big = st.grow(small, plan, operator=op, seed=args.seed, **kwargs)
        at_growth = evaluate(big, val)
        opt = st.grow_optimizer(small_opt, small, big, plan, policy="reset")
        ramp = st.get_ramp(big)
        if ramp is not None:
            ramp.attach(opt)
        curve, _ = train(
            big,
            batches,
            range(d_steps, T),
            float(best_lr),  # the large-model LR that worked best from scratch: same for both
            warm,
            val,
            eval_every,
            tokens_per_step,
            d_tokens + extra_tokens,
            optimizer=opt,
        )
        if ramp is not None:
            ramp.remove()
        reach = tokens_to_reach(curve, target)
        reach_recipe = tokens_to_reach(curve, recipe_target)
        runs[op] = {
            "speedup_pct_vs_recipe_lr_scratch": None
            if reach_recipe is None
            else 100 * (T * tokens_per_step / reach_recipe - 1),
            "val_loss_at_growth": at_growth,
            "final_val_loss": curve[-1][1],
            "tokens_to_scratch_final_loss": reach,
            "speedup_pct": None if reach is None else 100 * (T * tokens_per_step / reach - 1),
            "extra_tokens": extra_tokens,
            "curve": curve,
            "wall_s": time.perf_counter() - t0,
        }
        del big

    total_s = time.perf_counter() - t_start
    sched_d = st.growth_tokens(n_params, T * tokens_per_step)
    report = {
        "benchmark": "growth_pretrain",
        "quick": args.quick,
        "model": {"d_model": d_model, "seq": seq, "batch": batch, "small_layers": small_layers, "factor": factor},
        "target_params": n_params,
        "T_steps": T,
        "d_steps": d_steps,
        "tokens_per_step": tokens_per_step,
        "scratch": {"best_lr": float(best_lr), "final_val_loss": target, "runs": scratch_runs},
        "small": {"final_val_loss": small_curve[-1][1], "curve": small_curve},
        "runs": runs,
        "gstack_schedule_d_tokens_at_this_scale": sched_d,
        "timings": timings | {"total_s": total_s},
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"growth_pretrain{'_quick' if args.quick else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for lr, r in scratch_runs.items():
            style = {"color": "black", "lw": 2.0} if lr == best_lr else {"color": "black", "lw": 1.0, "ls": "-."}
            ax.plot(*zip(*r["curve"], strict=True), label=f"8 layers from scratch, lr {lr}", **style)
        ax.plot(*zip(*small_curve, strict=True), label="2-layer small model", color="gray", ls=":")
        for op, r in runs.items():
            ax.plot(*zip(*r["curve"], strict=True), label=f"grown x4 ({op})")
        ax.axhline(target, color="black", ls="--", lw=0.8)
        ax.set_xlabel("training tokens (small-model tokens included)")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.set_title(f"Growth vs scratch, {n_params / 1e6:.2f}M params, T = {T * tokens_per_step / 1e6:.2f}M tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"target: {n_params / 1e6:.2f}M params, {T} steps = {T * tokens_per_step / 1e6:.2f}M tokens")
    print(
        "scratch final val loss: "
        + ", ".join(f"lr {k}: {v['final_val_loss']:.4f}" for k, v in scratch_runs.items())
        + f" (target: the best, lr {best_lr})"
    )
    print(f"small model (2 layers) after {d_tokens / 1e6:.2f}M tokens: {small_curve[-1][1]:.4f}")
    vs = f"vs lr {peak_large:g} scratch"
    print(
        f"{'operator':<9} {'loss@growth':>11} {'final loss':>10} {'tokens to scratch loss':>23} {'speedup':>8} {vs:>20}"
    )
    for op, r in runs.items():
        reach = r["tokens_to_scratch_final_loss"]
        print(
            f"{op:<9} {r['val_loss_at_growth']:>11.4f} {r['final_val_loss']:>10.4f} "
            f"{(f'{reach / 1e6:.2f}M' if reach else 'not reached'):>23} "
            f"{_pct(r['speedup_pct']):>8} {_pct(r['speedup_pct_vs_recipe_lr_scratch']):>20}"
        )
    print(f"(gstack_schedule's d at this scale would be {sched_d:.3g} tokens: the fit does not extrapolate down)")
    print(f"total {total_s / 60:.1f} min; wrote {RESULTS / (stem + '.json')} and .png")


if __name__ == "__main__":
    main()
