"""Time spent fingerprinting when an operator is applied and saved on a model with ~1B parameters.

The model is a Llama-shaped stack of plain ``nn.Linear`` FFN blocks in bfloat16 (the weights are
allocated, not initialised: fingerprinting reads a sample of values, so their content does not
matter for the timing, only that they are real tensors in memory). Measured in one run:

- ``fingerprint_s``: median time of ``mt.fingerprint(model)`` (what ``save`` takes);
- ``apply_s`` / ``save_s``: ``mt.kv.apply(model, target="keys", mode="lora", rank=4)`` and
  ``handle.save(dir)`` end to end (apply takes no fingerprint any more);
- ``full_pass_s``: the previous fingerprint's cost model, one fp64 sum over every weight, for
  comparison (``full_pass_s / fingerprint_s`` is the speed-up);
- target: ``fingerprint_s < 1`` at 1B parameters.

Usage:
    python benchmarks/fingerprint.py [--params 1e9] [--rounds 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import modulart as mt


class Block(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, dtype=torch.bfloat16)
        self.up = nn.Linear(d, f, bias=False, dtype=torch.bfloat16)
        self.act = nn.GELU()
        self.down = nn.Linear(f, d, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, d: int, f: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d, f) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(params: float) -> nn.Module:
    d, f = 2048, 8192
    layers = max(1, round(params / (2 * d * f)))
    with torch.device("meta"):
        model = Stack(d, f, layers)
    model = model.to_empty(device="cpu")  # real, uninitialised memory: the values are never used
    with torch.no_grad():
        for p in model.parameters():
            p.normal_() if p.dim() < 2 else p[:1].normal_()  # a little real content, cheaply
    return model.eval()


def _median(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = build(args.params)
    n = sum(p.numel() for p in model.parameters())
    fp_s = _median(lambda: mt.fingerprint(model), args.rounds)

    def full_pass() -> None:
        for p in model.parameters():
            float(p.detach().double().sum())

    full_s = _median(full_pass, 1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        handle = mt.kv.apply(model, target="keys", mode="lora", rank=4, layers="all")
        apply_s = time.perf_counter() - t
        t = time.perf_counter()
        handle.save(Path(tmp) / "kv")
        save_s = time.perf_counter() - t
        handle.remove()
    result = {
        "benchmark": "fingerprint",
        "parameters": n,
        "tensors": len(model.state_dict()),
        "fingerprint_s": round(fp_s, 4),
        "apply_s": round(apply_s, 4),
        "save_s": round(save_s, 4),
        "full_pass_s": round(full_s, 3),
        "speedup_vs_full_pass": round(full_s / fp_s, 1),
        "target_fingerprint_s": 1.0,
        "met": fp_s < 1.0,
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
