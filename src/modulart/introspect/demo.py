"""The introspection step of ``modulart tour``: a tiny Mixtral report, then EMoE routing telemetry on MiniLM.

1. The tiny random Mixtral: every static and dynamic analysis, the per-layer table, report and figures.
2. The real all-MiniLM-L6-v2 converted with ``modulart.emoe.apply`` (16 experts, top-4, the last third
   of its FFNs): the same analyses on the emergent experts (their routing telemetry is the same
   D1–D4), then the conversion is removed.

Example:
    >>> from modulart.introspect.demo import introspect_tour_step  # doctest: +SKIP
    >>> numbers = introspect_tour_step(bert, tokenizer, tiny_mixtral(), print, Path("introspect"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulart.core.operator import get_operator
from modulart.introspect.reporting import HEADLINE, Report, report
from modulart.text import reference_sentences

__all__ = ["COLUMN_LEGEND", "column_legend", "introspect_tour_step"]

NUM_EXPERTS = 16
TOP_K = 4

COLUMN_LEGEND: dict[str, str] = {
    "S1 act": "cosine of two experts' flattened gate matrices (mean over pairs); ~0 distinct, ~1 copies",
    "S1 act-F": "the same between each expert and the dense FFN F; ~1: experts upcycled from F",
    "S2 act": "cosine of two experts' mean gate neuron (ignores neuron order); high: shared neurons",
    "S3 tau": "Kendall τ of the best neuron matching of experts 0 and 1; ~0: no common order",
    "S4 R act": "R between router-row and S2 cosines over expert pairs; high: router follows neurons",
    "D1 angular": "angular similarity of experts' outputs on the same tokens; 0.5 orthogonal, 1 identical",
    "D1 selected": "D1 among the experts the router selected for a token",
    "D1 other": "D1 among the other expert pairs",
    "D2 spearman": "per-token rank correlation of router score and expert output norm; >0.3: norm-driven",
    "D2 hit": "share of the top-k experts by output norm the router also picked (chance: k/E)",
    "D3 active": "share of expert neurons with |activation| > 1e-3 (dense activations: ~1)",
    "D4 consec": "overlap of neighbouring tokens' expert sets (chance: figure d4_routing_map.png)",
}
"""Meaning of each column of :meth:`~modulart.introspect.Report.table` (what the tour prints as its legend)."""


def column_legend(*reports: Report) -> list[str]:
    """Legend lines for the columns that ``reports``' tables show (the same order as the tables).

    Example:
        >>> from modulart.introspect.reporting import report
        >>> from modulart.introspect.toy import toy_moe
        >>> lines = column_legend(report(toy_moe(), progress=False))
        >>> lines[0].split()[:3]
        ['S1', 'act', 'cosine']
    """
    shown = {c for rep in reports for c in HEADLINE if any(not math.isnan(r.get(c, math.nan)) for r in rep.rows)}
    width = max((len(c) for c in shown), default=0)
    lines = [f"{c:<{width}}  {text}" for c, text in COLUMN_LEGEND.items() if c in shown]
    return [*lines, f"{'S5':<{width}}  PCA of the experts, figure pca_experts.png (far apart: distinct experts)"]


def _summary(rep: Report) -> dict[str, Any]:
    a = rep.arrays
    out: dict[str, Any] = {
        "layers": rep.layers,
        "s1_act": a["trend.s1.act"].tolist(),
        "s4_mean_r2_act": rep.meta["headline"]["mean_r2"].get("act"),
    }
    if "d2.spearman" in a:
        out |= {
            "d1_angular": a["trend.d1"].tolist(),
            "d2_spearman": a["d2.spearman"].tolist(),
            "d2_hit_rate": a["d2.hit_rate"].tolist(),
            "d2_chance": a["d2.chance"].tolist(),
            "d3_active": a["d3.ratio"].tolist(),
            "d4_consecutive": a["d4.consecutive"].tolist(),
        }
    return out


def _write(rep: Report, folder: Path, echo: Callable[[str], None], plots: bool) -> list[Path]:
    rep.save(folder)
    figures = rep.plot(folder) if plots else []
    echo(f"  report and {len(figures)} figures written to {folder}" if plots else f"  report written to {folder}")
    return figures


def introspect_tour_step(
    bert: nn.Module,
    tokenizer: Any,
    mixtral: nn.Module,
    echo: Callable[[str], None],
    outdir: Path,
    *,
    plots: bool = True,
    sentences: int = 16,
) -> dict[str, Any]:
    """Run both introspection reports, print their tables and a legend, write reports + figures under ``outdir``.

    ``plots=False`` writes the reports only (no matplotlib needed). ``sentences``: how many
    reference sentences MiniLM routes.
    """
    outdir = Path(outdir)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    mix = report(mixtral, {"input_ids": ids}, progress=False)
    texts = reference_sentences(sentences)
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64))
    # through the operator registry: introspect imports no operator package
    handle = get_operator("emoe").apply(bert, num_experts=NUM_EXPERTS, top_k=TOP_K, layers="last_third")
    try:  # an EMoE handle implements the NeuronExperts protocol (expert_groups())
        emo = report(bert, inputs, experts=handle, progress=False)
    finally:
        handle.remove()
    echo("  columns (one row per MoE layer; S = from the weights, D = from routing inputs):")
    echo("\n".join("    " + line for line in column_legend(mix, emo)))
    echo("  tiny Mixtral (random experts): static S1-S5 and dynamic D1-D4 per MoE layer")
    echo("\n".join("    " + line for line in mix.table().splitlines()))
    mix_figs = _write(mix, outdir / "mixtral", echo, plots)
    echo(
        f"  MiniLM with EMoE ({NUM_EXPERTS} experts, top-{TOP_K}, {len(emo.layers)} layers): "
        f"routing telemetry on {len(texts)} sentences"
    )
    echo("\n".join("    " + line for line in emo.table().splitlines()))
    emo_figs = _write(emo, outdir / "minilm_emoe", echo, plots)
    return {
        "mixtral": _summary(mix),
        "minilm_emoe": _summary(emo),
        "figures": [str(p) for p in mix_figs + emo_figs],
    }
