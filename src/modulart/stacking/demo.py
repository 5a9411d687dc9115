"""The growth step of ``modulart tour``: MiniLM 6 -> 12 layers in memory and on disk.

Example:
    >>> from modulart.stacking.demo import stacking_tour_step  # doctest: +SKIP
    >>> numbers = stacking_tour_step(bert, tokenizer, print, Path("/tmp/tour"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulart.stacking.check import function_difference
from modulart.stacking.checkpoint import MANIFEST_NAME, grow_checkpoint
from modulart.stacking.depth import grow
from modulart.stacking.plan import LayerPlan
from modulart.text import reference_sentences

__all__ = ["stacking_tour_step"]


def stacking_tour_step(
    bert: nn.Module, tokenizer: Any, echo: Callable[[str], None], workdir: Path, *, sentences: int = 8
) -> dict[str, Any]:
    """Grow ``bert`` x2 in depth with G_stack / G_zero / G_random, and its checkpoint on disk; echo the gaps.

    Args:
        bert: the pretrained all-MiniLM-L6-v2 (``BertModel``, 6 layers); not changed.
        tokenizer: its tokenizer.
        echo: where the lines go.
        workdir: a directory for the small and the grown checkpoint.
        sentences: how many reference sentences the function differences are measured on.

    Returns:
        ``plan``, ``layers`` (before, after), ``diff`` (max |Δ last_hidden_state| per operator),
        ``checkpoint_vs_memory`` (max |Δ| between the grown checkpoint reloaded and in-memory growth),
        ``shards``.
    """
    depth = len(bert.encoder.layer)  # type: ignore[arg-type,union-attr]
    plan = LayerPlan.stack(depth, 2)
    inputs = dict(tokenizer(reference_sentences(sentences), return_tensors="pt", padding=True))
    echo(f"  plan: {plan.describe()}  (G_stack: the whole block sequence repeated, in order)")
    diffs: dict[str, float] = {}
    grown: dict[str, nn.Module] = {}
    for op in ("direct", "zero", "random"):
        grown[op] = grow(bert, plan, operator=op)
        diffs[op] = function_difference(bert, grown[op], inputs)
    echo(
        "  max |Δ last_hidden_state| vs the 6-layer model: "
        + ", ".join(f"{op} {d:.3g}" for op, d in diffs.items())
        + "  (G_stack changes the function; G_random's mask starts at 0; G_zero is exact only for pre-norm blocks,"
        " and BERT is post-norm)"
    )
    small_dir, big_dir = Path(workdir) / "minilm-6", Path(workdir) / "minilm-12"
    bert.save_pretrained(small_dir, max_shard_size="40MB")  # type: ignore[operator]
    grow_checkpoint(small_dir, big_dir, plan, max_shard_size="40MB", overwrite=True, progress=False)
    with torch.no_grad():
        reloaded = type(bert).from_pretrained(big_dir).eval()  # type: ignore[attr-defined]
    ckpt_gap = function_difference(grown["direct"], reloaded, inputs)
    manifest = json.loads((big_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    echo(
        f"  on disk: {len(manifest['shards'])} shards of <= 40MB, config num_hidden_layers = "
        f"{reloaded.config.num_hidden_layers}, reloaded vs in-memory growth: max |Δ| = {ckpt_gap:.3g}"
    )
    return {
        "plan": plan.describe(),
        "layers": (depth, plan.grown_layers),
        "diff": diffs,
        "checkpoint_vs_memory": ckpt_gap,
        "shards": len(manifest["shards"]),
        "source_hash": manifest["source_hash"],
    }
