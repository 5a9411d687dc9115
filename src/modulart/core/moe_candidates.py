"""Discovery candidates: every reading of a MoE block that its structure allows, in order of likelihood.

:func:`storage_candidates` lists the ways the expert tensors can be read (fused ``[E, 2I, d]`` /
transposed ``[E, d, 2I]``, gate or up first, interleaved, separate gate/up tensors, flattened
``[E * I, d]``, ``down`` in either orientation, with each activation the block carries);
:func:`scoring_candidates` lists the routing rules with the parameters the block carries (top-k
attributes, renormalisation flags, selection-bias vectors, group counts, scaling factors,
capacities, jitter thresholds), read by :class:`Facts`. Nothing here runs the block: the candidates
are judged by :mod:`modulart.core.moe_discovery`.

Example:
    >>> import torch
    >>> from modulart.core.moe_layouts import MoEParts
    >>> from modulart.core.moe_candidates import Facts, scoring_candidates
    >>> block = torch.nn.Module(); block.gate = torch.nn.Linear(4, 4); block.top_k = 2
    >>> first = next(scoring_candidates(Facts(block, MoEParts("gate", ()), 4, 4), None))
    >>> first["scoring"], first["top_k"]
    ('softmax_topk', 'top_k')
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from modulart.core.arch import get_attr
from modulart.core.linear import is_linear_like
from modulart.core.moe_layouts import MoEParts

__all__ = ["KINDS", "Facts", "scoring_candidates", "storage_candidates"]


def _join(a: str, b: str) -> str:
    return ".".join(p for p in (a, b) if p)


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


KINDS = ("softmax_topk", "topk_softmax", "sigmoid_grouped", "softmax_grouped", "sigmoid_topk", "topk_sigmoid")
_TOPK_NAMES = ("top_k", "num_experts_per_tok", "moe_top_k", "moe_topk", "topk", "k", "num_selected_experts")


class Facts:
    """What the block carries outside its experts: scalars and small tensors, by relative path."""

    def __init__(self, module: nn.Module, parts: MoEParts, n_exp: int, d_model: int) -> None:
        skip = tuple(parts.experts) + tuple(parts.shared)
        self.scalars: dict[str, Any] = {}
        self.vectors: list[str] = []
        self.gates: list[str] = []
        self.out_bias: list[str] = []
        self.capacity: list[str] = []
        router = parts.router or ""
        for mpath, m in module.named_modules():
            if any(mpath == s or mpath.startswith(s + ".") for s in skip if s):
                continue
            for k, v in vars(m).items():
                if not k.startswith("_") and k != "training" and (isinstance(v, (bool, int, float)) or v is None):
                    self.scalars[_join(mpath, k)] = v
                    if "capacity" in k and v is not None and not isinstance(v, bool):
                        self.capacity.append(_join(mpath, k))
            for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                full = _join(mpath, name)
                if mpath == router and name in ("weight", "bias"):
                    continue
                if t.is_floating_point() and t.numel() == n_exp and t.dim() <= 2:
                    self.vectors.append(full)
                if mpath == "" and t.dim() == 1 and t.numel() == d_model:
                    self.out_bias.append(full)
            if mpath and mpath != router and is_linear_like(m) and int(m.weight.shape[0]) == 1:
                self.gates.append(mpath)


def storage_candidates(module: nn.Module, parts: MoEParts, n_exp: int) -> Iterator[dict[str, Any]]:
    if len(parts.experts) == 1:
        container = get_attr(module, parts.experts[0])
        if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
            yield {"experts": parts.experts[0], "storage": "module_list"}
            return
        tensors = [
            n
            for n, t in container.named_parameters()
            if not n.endswith("_bias")
            and (t.dim() == 3 or (t.dim() == 2 and t.shape[0] % n_exp == 0 and t.shape[0] > n_exp))
        ]
        base: dict[str, Any] = {"experts": parts.experts[0]}
        flat = all(get_attr(container, n).dim() == 2 for n in tensors)
    else:
        tensors = [
            f"{c}.weight"
            for c in parts.experts
            if isinstance(getattr(get_attr(module, c), "weight", None), torch.Tensor)
        ]
        base, flat = {"experts": ""}, False
    acts = _activations(module, parts)
    glus: list[dict[str, Any]] = [{"glu": "act_mul", "activation": a} for a in acts]
    if len(parts.experts) == 1:
        c = get_attr(module, parts.experts[0])
        if hasattr(c, "limit") and hasattr(c, "alpha"):
            glus.insert(0, {"glu": "gpt_oss", "activation": None})
    orient = list(itertools.product((False, True), repeat=4))  # transposed, down_transposed, interleaved, up_first
    if len(tensors) == 2:
        for gu, down in itertools.permutations(tensors, 2):
            for (tr, dtr, inter, upf), g in itertools.product(orient, glus):
                yield {
                    **base,
                    "storage": "fused",
                    "gate_up": gu,
                    "down": down,
                    "transposed": tr,
                    "down_transposed": None if dtr == tr else dtr,
                    "interleaved": inter,
                    "up_first": upf,
                    "flat": flat,
                    **g,
                }
    elif len(tensors) == 3:
        for gate, up, down in itertools.permutations(tensors, 3):
            for tr, dtr in itertools.product((False, True), repeat=2):
                for g in glus:
                    yield {
                        **base,
                        "storage": "fused",
                        "gate_up": gate,
                        "up": up,
                        "down": down,
                        "transposed": tr,
                        "down_transposed": None if dtr == tr else dtr,
                        "flat": flat,
                        **g,
                    }


def _activations(module: nn.Module, parts: MoEParts) -> list[str | None]:
    """Attribute paths (relative to the block) of callables named ``*act*`` in the experts or the block."""
    out: list[str | None] = []
    roots = [(c, get_attr(module, c)) for c in parts.experts if c] + [("", module)]
    for prefix, root in roots:
        for mpath, m in root.named_modules() if prefix else [("", root)]:
            named = [(n, c) for n, c in m.named_children()] + [
                (k, v) for k, v in vars(m).items() if not k.startswith("_")
            ]
            for k, v in named:
                if "act" in k.lower() and callable(v) and not isinstance(v, (nn.ModuleList, nn.ModuleDict)):
                    p = _join(_join(prefix, mpath), k)
                    if p not in out:
                        out.append(p)
    return out or [None]


def scoring_candidates(facts: Facts, k_seen: int | None) -> Iterator[dict[str, Any]]:
    ints = {p: v for p, v in facts.scalars.items() if isinstance(v, int) and not isinstance(v, bool)}
    ks: list[str | int] = [p for p, v in ints.items() if _last(p) in _TOPK_NAMES and (k_seen is None or v == k_seen)]
    if not ks:
        ks = [k_seen] if k_seen is not None else [1, 2]
    norms: list[bool | str] = [p for p, v in facts.scalars.items() if isinstance(v, bool) and "norm" in _last(p)]
    norms += [True, False]
    biases: list[str | None] = [*facts.vectors, None]
    scal: list[str | None] = [p for p, v in facts.scalars.items() if isinstance(v, float) and "scal" in _last(p)] + [
        None
    ]
    nmin: list[str | float] = [
        p for p, v in facts.scalars.items() if isinstance(v, float) and "norm_min" in _last(p)
    ] + [0.0]
    nps: list[str | float] = [1.0] + [
        p
        for p, v in facts.scalars.items()
        if "normalize" in _last(p) and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    caps: list[str | None] = [p for p, v in ints.items() if "capacity" in _last(p)] + [None]
    groups = [p for p in ints if _last(p) in ("n_group", "num_group", "n_groups", "num_groups")]
    tgroups = [p for p in ints if _last(p) in ("topk_group", "topk_groups")]
    jitter = [p for p, v in facts.scalars.items() if isinstance(v, float) and "jitter" in _last(p)]
    for kind in KINDS:
        grouped = kind.endswith("grouped")
        if grouped and not (groups and tgroups):
            continue
        gopts = list(itertools.product(groups, tgroups)) if grouped else [(None, None)]
        if kind.startswith("topk_"):
            for k, s, c in itertools.product(ks, scal, caps):
                yield {"scoring": kind, "top_k": k, "scaling": s, "capacity": c, "normalize_topk": False}
            continue
        for k, (ng, tg), n, b, s, mn, npp, c in itertools.product(ks, gopts, norms, biases, scal, nmin, nps, caps):
            if (n is False and (mn != 0.0 or npp != 1.0)) or (kind == "softmax_grouped" and b is not None):
                continue
            yield {
                "scoring": kind,
                "top_k": k,
                "n_group": ng,
                "topk_group": tg,
                "normalize_topk": n,
                "selection_bias": b,
                "scaling": s,
                "norm_min": mn,
                "norm_p": npp,
                "capacity": c,
            }
    for j in jitter:
        yield {"scoring": "sparsemixer", "top_k": 2, "jitter_eps": j}
