"""The members of a MoE layer and their canonical matrices, as the MoE view gives them.

Live analyses and checkpoint streaming both enumerate a layer's members here, from the same
:class:`~modulart.core.moe.MoE` view, so they see the same experts in the same order: routed
experts ``e0..`` (``gate`` / ``up`` ``[I, d_model]`` — ``up`` only for gated experts —, ``down``
``[d_model, I]``), then the shared
experts ``s0..`` of ``moe.shared_experts`` (dense FFN views: ``act`` = keys, ``up`` when gated,
``down`` = values). Shared experts are members of the S1/S2 similarity maps (the neuron-averaged
comparison of S2 is order- and width-invariant, so they join it, as in the paper's DeepSeek figures;
a shared expert of another width is NaN in S1), never of the routed-only statistics (expert means,
S4, and by default the expert PCA: ``IntrospectOptions.pca_shared`` adds same-shape ones there).

Example:
    >>> from modulart.introspect.toy import toy_moe
    >>> import modulart as mt
    >>> found = moe_members(mt.find_moes(toy_moe())[0])
    >>> [m.name for m, _ in found], {k: tuple(v.shape) for k, v in found[0][1].items()}
    (['e0', 'e1', 'e2', 'e3'], {'act': (32, 16), 'up': (32, 16), 'down': (16, 32)})
"""

from __future__ import annotations

import torch

from modulart.core.ffn import FFN
from modulart.core.moe import MoE
from modulart.introspect.sources import Member

__all__ = ["ffn_matrices", "moe_members"]


def ffn_matrices(ffn: FFN) -> dict[str, torch.Tensor]:
    """``act`` (keys ``[d_ff, d_model]``), ``up`` (gated only) and ``down`` (values ``[d_model, d_ff]``).

    Example:
        >>> import modulart as mt
        >>> ffn = mt.find_ffns(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)))[0]
        >>> {k: tuple(v.shape) for k, v in ffn_matrices(ffn).items()}
        {'act': (8, 4), 'down': (4, 8)}
    """
    out = {"act": ffn.keys, "down": ffn.values}
    if ffn.up is not None:
        out = {"act": ffn.keys, "up": ffn.up, "down": ffn.values}
    return out


def moe_members(moe: MoE) -> list[tuple[Member, dict[str, torch.Tensor]]]:
    """Routed experts then shared experts of ``moe``, each with its canonical matrices (views)."""
    out: list[tuple[Member, dict[str, torch.Tensor]]] = []
    for e in moe.experts():
        mats = {"act": e.gate, "up": e.up, "down": e.down}
        out.append((Member(f"e{e.index}", "expert"), {k: t for k, t in mats.items() if t is not None}))
    out += [(Member(f"s{i}", "shared"), ffn_matrices(f)) for i, f in enumerate(moe.shared_experts)]
    return out
