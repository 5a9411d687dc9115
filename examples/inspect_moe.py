"""Introspect a tiny Mixtral: from the live model, then straight from its checkpoint files, streamed.

Builds a 2-layer Mixtral (random init, no download), saves it as safetensors, and runs the paper's
static analyses from both; the numbers agree. Then the dynamic analyses (expert outputs, norm vs
router score, routing map) on a few token sequences, and the report (arrays + JSON). For the figures,
``report.plot(folder)`` (plot extra: pip install "modulart[plot]"), or ``modulart inspect CKPT_DIR``.

Run: python examples/inspect_moe.py
"""

import tempfile
from pathlib import Path

import torch

import modulart.introspect as mi
from modulart.tour import tiny_mixtral

model = tiny_mixtral()
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    model.save_pretrained(out / "ckpt")  # transformers v5 writes per-expert keys (block_sparse_moe.experts.{e}.w1...)

    live = mi.weights(model)
    streamed = mi.weights(out / "ckpt")  # reads one layer at a time, per-expert slices
    s1 = live.expert_similarity(matrix="act", level="matrix")  # [L, E, E]
    print("S1 (act) layer 0:\n", s1.values[0])
    diff = (s1.values - streamed.expert_similarity(matrix="act").values).abs().max()
    print("max |live - streamed| S1 =", float(diff))
    print("S4 mean R² per matrix:", live.gate_vs_experts().mean_r2)
    print("S3 layer 0, experts 0-1: Kendall tau", round(live.reorder_similarity(layer=0, pair=(0, 1)).tau, 3))

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    r = mi.routing(model, {"input_ids": ids})  # two-stage protocol: every expert on each layer's real input
    print("D2 per-token Spearman(norm, score):", r.norm_score_correlation().spearman.tolist())
    print("D3 active fraction:", r.activation_ratio().tolist())

    report = mi.report(model, {"input_ids": ids})
    print(report.table())
    report.save(out / "report")  # arrays.safetensors + report.json; report.plot(out / "report") for the PNGs
    print("reloaded layers:", mi.Report.load(out / "report").layers)
