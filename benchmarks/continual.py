"""Continual learning on three real-text domains: does MIGU (or KV tuning, or EMoE) forget less?

A small byte-level Llama (built from a config, random init) is first trained on a base domain, then on
three tasks in sequence, each a different kind of real text shipped with CPython:

1. ``prose``: the English prose of the Python language reference (``pydoc_data.topics``);
2. ``email``: the source code of the standard library's ``email`` package;
3. ``unittest``: the source code of ``unittest``.

(The base domain is the source of ``collections``, ``argparse`` and ``typing``.) Each task keeps its
last 10% as held-out text. After every task the model is evaluated on every task: next-byte loss and
top-1 accuracy, giving the full matrices. Reported per method, averaged over seeds: the final average
accuracy and loss, and backward transfer ``BWT = mean_j<last (acc[last][j] - acc[j][j])`` (negative:
forgetting).

Methods: ``full`` (plain fine-tuning), ``migu`` (magnitude-gated updates, keep 0.3, from the second task
on as the reference does), ``kv_keys`` / ``kv_values`` (train only FFN keys / values), ``emoe`` (EMoE
masks on every FFN, N = 8, k = 2, full fine-tuning). Same data order, init and optimizer for all.

Usage:
    python benchmarks/continual.py [--seeds 3] [--steps 80] [--out benchmarks/results/continual.json]
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
import torch.nn.functional as F
from torch import nn

import modulart as mt
from modulart.text import reference_paragraphs, stdlib_source

SEQ, BATCH = 128, 16


def _domains() -> dict[str, bytes]:
    return {
        "base": "\n".join(stdlib_source(p) for p in ("collections", "argparse", "typing")).encode(),
        "prose": "\n\n".join(reference_paragraphs()).encode(),
        "email": stdlib_source("email").encode(),
        "unittest": stdlib_source("unittest").encode(),
    }


def _split(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(t) * 0.9)
    return t[:cut], t[cut:]


def _batch(data: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
    return torch.stack([data[s : s + SEQ] for s in starts.tolist()])


def _model(seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=SEQ,
    )
    return AutoModelForCausalLM.from_config(cfg)


@torch.no_grad()
def _evaluate(model: nn.Module, held_out: torch.Tensor) -> tuple[float, float]:
    model.eval()
    n = (len(held_out) - 1) // SEQ
    windows = held_out[: n * SEQ + 1]
    starts = torch.arange(0, n * SEQ, SEQ)[:64]  # 64 windows = 8192 predicted bytes
    x = torch.stack([windows[s : s + SEQ] for s in starts.tolist()])
    y = torch.stack([windows[s + 1 : s + SEQ + 1] for s in starts.tolist()])
    logits = model(input_ids=x).logits
    loss = float(F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)))
    acc = float((logits.argmax(-1) == y).float().mean())
    model.train()
    return loss, acc


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = _batch(data, gen)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


Method = Callable[[nn.Module], tuple[torch.optim.Optimizer, Callable[[], None], Callable[[], None]]]
LR = 2e-3


def _full(model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], None], Callable[[], None]]:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01), lambda: None, lambda: None


def _migu(model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], None], Callable[[], None]]:
    import modulart.migu

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    handle = modulart.migu.apply(model, keep_ratio=0.3, skip_first_task=True, optimizer=opt)
    return opt, handle.task_boundary, handle.remove


def _kv(target: str) -> Method:
    def make(model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], None], Callable[[], None]]:
        import modulart.kv

        handle = modulart.kv.apply(model, target=target, mode="full")
        opt = torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=LR)
        return opt, lambda: None, handle.remove

    return make


def _emoe(model: nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], None], Callable[[], None]]:
    handle = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all")
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01), lambda: None, handle.remove


METHODS: dict[str, Method] = {
    "full": _full,
    "migu": _migu,
    "kv_keys": _kv("keys"),
    "kv_values": _kv("values"),
    "emoe": _emoe,
}


def run_method(
    name: str,
    seed: int,
    steps: int,
    base_state: dict[str, torch.Tensor],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    model = _model(seed)
    model.load_state_dict(base_state)
    tasks = ["prose", "email", "unittest"]
    opt, boundary, finish = METHODS[name](model)
    losses, accs = [], []
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        _train(model, opt, data[task][0], steps, seed * 100 + i)
        boundary()
        row = [_evaluate(model, data[t][1]) for t in tasks]
        losses.append([r[0] for r in row])
        accs.append([r[1] for r in row])
    finish()
    last = len(tasks) - 1
    return {
        "loss": losses,
        "acc": accs,
        "final_avg_acc": statistics.fmean(accs[last]),
        "final_avg_loss": statistics.fmean(losses[last]),
        "bwt_acc": statistics.fmean(accs[last][j] - accs[j][j] for j in range(last)),
        "bwt_loss": statistics.fmean(losses[last][j] - losses[j][j] for j in range(last)),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80, help="training steps per task")
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "continual.json")
    args = ap.parse_args()
    data = {k: _split(v) for k, v in _domains().items()}
    methods = args.methods.split(",")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        base = _model(seed)
        opt = torch.optim.AdamW(base.parameters(), lr=LR, weight_decay=0.01)
        _train(base, opt, data["base"][0], args.base_steps, seed)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for m in methods:
            results[m].append(run_method(m, seed, args.steps, state, data))
            r = results[m][-1]
            print(
                f"seed {seed} {m:>9}: final acc {r['final_avg_acc']:.4f} BWT {r['bwt_acc']:+.4f} "
                f"({r['seconds']:.0f} s)",
                flush=True,
            )
    summary = {
        m: {
            key: (statistics.fmean(r[key] for r in rs), statistics.pstdev([r[key] for r in rs]))
            for key in ("final_avg_acc", "final_avg_loss", "bwt_acc", "bwt_loss")
        }
        for m, rs in results.items()
    }
    print(f"\n{'method':>9}  final acc (mean±sd)   BWT acc          final loss      BWT loss   [{args.seeds} seeds]")
    for m, s in summary.items():
        print(
            f"{m:>9}  {s['final_avg_acc'][0]:.4f}±{s['final_avg_acc'][1]:.4f}    "
            f"{s['bwt_acc'][0]:+.4f}±{s['bwt_acc'][1]:.4f}   {s['final_avg_loss'][0]:.4f}   "
            f"{s['bwt_loss'][0]:+.4f}"
        )
    mean_acc = {
        m: [[statistics.fmean(r["acc"][i][j] for r in rs) for j in range(3)] for i in range(3)]
        for m, rs in results.items()
    }
    for m, mat in mean_acc.items():
        print(
            f"{m:>9} accuracy matrix (rows: after task, cols: prose email unittest): "
            + " | ".join(" ".join(f"{v:.3f}" for v in row) for row in mat)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "continual",
                "setting": {k: str(v) for k, v in vars(args).items()},
                "summary": summary,
                "mean_acc_matrix": mean_acc,
                "runs": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
