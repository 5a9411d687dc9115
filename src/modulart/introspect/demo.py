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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulart.core.operator import get_operator
from modulart.introspect.reporting import Report, report
from modulart.text import reference_sentences

__all__ = ["introspect_tour_step"]

NUM_EXPERTS = 16
TOP_K = 4


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
    echo(f"  report and {len(figures)} figures written to {folder}")
    return figures


def introspect_tour_step(
    bert: nn.Module,
    tokenizer: Any,
    mixtral: nn.Module,
    echo: Callable[[str], None],
    outdir: Path,
    *,
    plots: bool = True,
) -> dict[str, Any]:
    """Run both introspection reports, print their tables, write reports + figures under ``outdir``.

    ``plots=False`` writes the reports only (no matplotlib needed).
    """
    outdir = Path(outdir)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    mix = report(mixtral, {"input_ids": ids}, progress=False)
    echo("  tiny Mixtral (random experts): static S1-S5 and dynamic D1-D4 per MoE layer")
    echo("\n".join("    " + line for line in mix.table().splitlines()))
    mix_figs = _write(mix, outdir / "mixtral", echo, plots)

    sentences = reference_sentences(16)
    inputs = dict(tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=64))
    # through the operator registry: introspect imports no operator package
    handle = get_operator("emoe").apply(bert, num_experts=NUM_EXPERTS, top_k=TOP_K, layers="last_third")
    try:  # an EMoE handle implements the NeuronExperts protocol (expert_groups())
        emo = report(bert, inputs, experts=handle, progress=False)
    finally:
        handle.remove()
    echo(
        f"  MiniLM with EMoE ({NUM_EXPERTS} experts, top-{TOP_K}, {len(emo.layers)} layers): "
        f"routing telemetry on {len(sentences)} sentences"
    )
    echo("\n".join("    " + line for line in emo.table().splitlines()))
    emo_figs = _write(emo, outdir / "minilm_emoe", echo, plots)
    return {
        "mixtral": _summary(mix),
        "minilm_emoe": _summary(emo),
        "figures": [str(p) for p in mix_figs + emo_figs],
    }
