"""The EMoE step of ``modulart tour``: emergent experts in the real all-MiniLM-L6-v2.

Measures (1) how much tighter the balanced k-means clusters of the keys are than a random balanced
split (mean within-cluster cosine), (2) how well the converted model's sentence embeddings agree
with the dense model's at k/N = 0.25 and 0.5 (mean cosine, mean-pooled embeddings, no fine-tuning),
and (3) that k = N reproduces the dense model.

Example:
    >>> from modulart.emoe.demo import emoe_tour_step  # doctest: +SKIP
    >>> numbers = emoe_tour_step(bert, tokenizer, print)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.emoe.cluster import random_balanced_labels, within_cluster_cosine
from modulart.emoe.operator import apply
from modulart.text import reference_sentences

__all__ = ["emoe_tour_step", "mean_pooled"]

NUM_EXPERTS = 64
LAYERS = "last_third"  # the last 2 of MiniLM's 6 FFNs


def mean_pooled(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings ``[B, d]``: attention-mask-weighted mean of the last hidden states."""
    with torch.no_grad():
        hidden: torch.Tensor = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def emoe_tour_step(
    model: nn.Module, tokenizer: Any, echo: Callable[[str], None], *, sentences: int = 64
) -> dict[str, Any]:
    """Run the EMoE measurements on ``model`` (MiniLM) and print them; returns the numbers.

    ``sentences``: how many reference sentences the embedding agreement is measured on. The model
    is left as it was (every conversion is removed).
    """
    texts = reference_sentences(sentences)
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64))
    dense = mean_pooled(model, inputs)
    handle = apply(model, num_experts=NUM_EXPERTS, top_k=NUM_EXPERTS, layers=LAYERS)
    exact = float((mean_pooled(model, inputs) - dense).abs().max())
    labels = handle.labels()
    keys_of = {path: layer.ffn.keys.detach() for path, layer in handle.layers.items()}
    handle.remove()
    cohesion = {}
    for path, lab in labels.items():
        keys = keys_of[path]
        rand = random_balanced_labels(keys.shape[0], NUM_EXPERTS, seed=0)
        cohesion[path] = (within_cluster_cosine(keys, lab, NUM_EXPERTS), within_cluster_cosine(keys, rand, NUM_EXPERTS))
    echo(f"  converted {list(labels)} into {NUM_EXPERTS} experts each (balanced k-means of the keys)")
    for path, (km, rnd) in cohesion.items():
        echo(
            f"  {path}: within-cluster cosine k-means {km:.4f} vs random split {rnd:.4f} ({km / max(rnd, 1e-12):.1f}x)"
        )
    agreement = {}
    for k in (NUM_EXPERTS // 4, NUM_EXPERTS // 2):
        h = apply(model, num_experts=NUM_EXPERTS, top_k=k, layers=LAYERS)
        agreement[k / NUM_EXPERTS] = float(F.cosine_similarity(mean_pooled(model, inputs), dense).mean())
        h.remove()
    for ratio, cos in agreement.items():
        echo(f"  k/N = {ratio:.2f}: sentence embeddings vs dense, mean cosine {cos:.4f} ({len(texts)} sentences)")
    echo(f"  k = N: max |embedding - dense| = {exact:.2e} (the conversion alone changes nothing)")
    return {"cohesion": cohesion, "agreement": agreement, "k_equals_n_max_abs_diff": exact}
