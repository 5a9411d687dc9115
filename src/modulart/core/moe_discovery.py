"""MoE discovery without a table entry: match candidate layouts against the block's own behaviour.

One probe forward of the block (:func:`~modulart.core.moe_verify.record_block`) records its input,
its output and the routing decisions it took. Candidates are then evaluated *offline* on that
record, in stages:

1. **storage** — for each reading of the expert tensors (module per expert; fused ``[E, 2I, d]``
   gate first or up first, transposed ``[E, d, 2I]``, interleaved, separate gate/up tensors,
   flattened ``[E * I, d]``, down ``[E, d, I]`` or ``[E, I, d]``), the weighted sum of the recorded
   chosen experts must reproduce the experts container's recorded output (when it has one);
2. **routing** — every scoring rule of :mod:`modulart.core.moe_scoring` with the parameters the
   block carries (top-k, renormalisation flags, selection-bias tensors, group counts, scaling
   factors, capacities, jitter thresholds) must reproduce the recorded choices and weights;
3. **the whole block** — with or without the shared experts, their sigmoid gate and an output bias,
   the recomputed block output must match the recorded one within the dtype's tolerance.

The first candidate that passes every check (:func:`~modulart.core.moe_verify.check_view`) is the
layout; when none does the block is refused with the best error measured. Outcomes are cached per
block signature: the second block of a type is not probed.

Example:
    >>> from modulart.core.moe_discovery import scoring_kinds
    >>> scoring_kinds()[:2]
    ('softmax_topk', 'topk_softmax')
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from modulart.core.arch import get_attr
from modulart.core.errors import UnsupportedModuleError
from modulart.core.ffn import adapter_help
from modulart.core.moe import MoE
from modulart.core.moe_candidates import KINDS, Facts, scoring_candidates, storage_candidates
from modulart.core.moe_layouts import (
    MOE_LAYOUTS,
    MOE_REFUSALS,
    MoELayout,
    MoEParts,
    infer_moe_layout,
    is_builtin_layout,
)
from modulart.core.moe_scoring import Routing
from modulart.core.moe_structure import router_weight_rows
from modulart.core.moe_verify import BlockRecord, check_view, record_block, verified
from modulart.core.probe import relative_error, tolerance
from modulart.core.verify import block_signature, on_clear

__all__ = ["discover_view", "scoring_kinds"]

_DISCOVERED: dict[tuple[object, ...], tuple[MoELayout | None, list[str]]] = {}


def scoring_kinds() -> tuple[str, ...]:
    """The scoring rules discovery tries, in order (``sparsemixer`` where a jitter threshold exists)."""
    return KINDS


def _join(a: str, b: str) -> str:
    return ".".join(p for p in (a, b) if p)


def _make(
    model: nn.Module, path: str, module: nn.Module, kw: dict[str, Any], errors: dict[str, None] | None = None
) -> MoE | None:
    """The view of ``kw``, or None when the layout does not fit the block (the reason kept in ``errors``)."""
    try:
        return MoE(path, module, MoELayout(**kw), model=model)
    except (UnsupportedModuleError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as e:
        if errors is not None:
            errors[str(e).splitlines()[0]] = None
        return None


def _search(
    model: nn.Module, path: str, module: nn.Module, parts: MoEParts, rec: BlockRecord
) -> tuple[MoELayout | None, list[str]]:
    assert parts.router is not None
    sub = router_weight_rows(get_attr(module, parts.router))
    router = _join(parts.router, sub[0] if sub else "")
    n_exp = sub[1] if sub else 0
    tol = tolerance(rec.dtype)
    x = rec.x
    flat = x.reshape(-1, x.shape[-1])
    y = rec.y.reshape(flat.shape) if rec.y.numel() == flat.numel() else rec.y
    head: dict[str, Any] = {"router": router, "output_index": 0 if rec.tuple_output else None}
    tried: list[str] = []
    storages: list[tuple[dict[str, Any], MoE, _LazyOutputs]] = []
    best: tuple[float, str] = (float("inf"), "no candidate could be built")
    for skw in storage_candidates(module, parts, n_exp):
        view = _make(model, path, module, {**head, **skw, "scoring": "softmax_topk", "top_k": 1})
        if view is None:
            continue
        with torch.no_grad():
            if rec.experts_call is not None:
                h, idx, w, out = rec.experts_call
                r = Routing(torch.empty(0), torch.empty(0), w.float(), idx.long())
                err = relative_error(view.routed_output(h, r), out)
                if err > tol:
                    best = min(best, (err, f"storage {_describe(skw)}"))
                    continue
            storages.append((skw, view, _LazyOutputs(view, flat)))
    if not storages:
        tried.append(
            f"expert storage: no reading reproduces the experts' output (best: {best[1]}, error {best[0]:.3g})"
        )
        return None, tried
    facts = Facts(module, parts, n_exp, int(flat.shape[-1]))
    k_seen = None
    if (
        rec.routing is not None
        and rec.routing.sets
        and (rec.experts_call is not None or "router" in rec.routing.source)
    ):
        sizes = {len(s) for s in rec.routing.sets}
        k_seen = sizes.pop() if len(sizes) == 1 else max(len(s) for s in rec.routing.sets)
    shared_opts: list[tuple[str, ...]] = [parts.shared, ()] if parts.shared else [()]
    gate_opts: list[str | None] = [*facts.gates, None] if parts.shared else [None]
    bias_opts: list[str | None] = [*facts.out_bias, None]
    n_rules = 0
    unfit: dict[str, None] = {}
    for on_input in (False, True):
        for skw, _, outs in storages:
            for rkw in scoring_candidates(facts, k_seen):
                n_rules += 1
                rule_view = _make(model, path, module, {**head, **skw, **rkw, "weights_on_input": on_input})
                if rule_view is None:
                    continue
                with torch.no_grad():
                    r = rule_view.route(x)
                    routed = rule_view.routed_output(flat, r) if on_input else outs.combine(r)
                for sh, g, ob in itertools.product(shared_opts, gate_opts, bias_opts):
                    kw = {
                        **head,
                        **skw,
                        **rkw,
                        "weights_on_input": on_input,
                        "shared": sh,
                        "shared_gate": g if sh else None,
                        "output_bias": ob,
                    }
                    full = _make(model, path, module, kw, unfit)
                    if full is None:
                        continue
                    with torch.no_grad():
                        pred = routed
                        so = full.shared_output(flat)
                        pred = pred + so if so is not None else pred
                        pred = pred + full.output_bias if full.output_bias is not None else pred
                    err = relative_error(pred, y)
                    if err > tol:
                        best = min(best, (err, _describe(kw)))
                        continue
                    v = check_view(full, rec)
                    if v.ok and full.scoring.capacity is None and facts.capacity:
                        v = replace(
                            v, ok=False, detail=f"the block has a token capacity ({facts.capacity[0]}) the view ignores"
                        )
                    if v.ok:
                        return full.layout, tried
                    best = min(best, (v.error, f"{_describe(kw)}: {v.detail}"))
    tried.extend(f"candidate does not fit: {e}" for e in list(unfit)[:3])
    tried.append(
        f"discovery: {len(storages)} storage reading(s) x {n_rules // 2 // max(1, len(storages))} routing rule(s) "
        f"x shared/gate/bias options; best {best[1]!s} with error {best[0]:.3g} (tolerance {tol:.1g})"
    )
    return None, tried


class _LazyOutputs:
    """Expert outputs on the probe tokens, computed only for the (expert, token) pairs a candidate
    routing picks, and kept: the candidates mostly agree, so a large model pays little more than
    one block forward per storage reading."""

    def __init__(self, view: MoE, flat: torch.Tensor) -> None:
        self.view, self.flat = view, flat
        self.outs = torch.zeros(view.num_experts, *flat.shape, dtype=flat.dtype, device=flat.device)
        self.done = torch.zeros(view.num_experts, flat.shape[0], dtype=torch.bool, device=flat.device)

    def combine(self, r: Routing) -> torch.Tensor:
        """``sum_k w[t, k] * expert_{idx[t, k]}(x_t)``: ``[T, d]``."""
        t = torch.arange(self.flat.shape[0], device=self.flat.device).unsqueeze(1).expand_as(r.indices)
        missing = ~self.done[r.indices, t]
        for e in torch.unique(r.indices[missing]).tolist():
            tok = torch.unique(t[missing & (r.indices == e)])
            self.outs[e, tok] = self.view.expert(int(e)).forward(self.flat[tok]).to(self.outs.dtype)
            self.done[e, tok] = True
        picked = self.outs[r.indices, t]  # [T, k, d]
        return (picked * r.weights.to(picked.dtype).unsqueeze(-1)).sum(1)


def _describe(kw: dict[str, Any]) -> str:
    keys = (
        "storage",
        "gate_up",
        "up",
        "down",
        "transposed",
        "down_transposed",
        "interleaved",
        "up_first",
        "scoring",
        "top_k",
        "normalize_topk",
        "selection_bias",
        "scaling",
        "shared",
        "weights_on_input",
    )
    return ", ".join(f"{k}={kw[k]!r}" for k in keys if kw.get(k) not in (None, False, (), ""))


def _refuse(path: str, module: nn.Module, tried: list[str]) -> UnsupportedModuleError:
    lines = "\n".join(f"  - {t}" for t in tried)
    return UnsupportedModuleError(
        f"{path!r} ({type(module).__name__}) looks like a MoE block but no view reproduces it exactly "
        f"(what the block computes was compared on a probe):\n{lines}\n" + adapter_help("moe")
    )


def discover_view(model: nn.Module, path: str, module: nn.Module, parts: MoEParts, *, verify: bool) -> MoE:
    """The verified view of the MoE block at ``path`` (``parts`` relative to the block)."""
    refusal = MOE_REFUSALS.lookup(type(module))
    if refusal is not None:
        raise UnsupportedModuleError(f"{path!r} ({type(module).__name__}) is not supported: {refusal}")
    entry = MOE_LAYOUTS.lookup(type(module))
    tried: list[str] = []
    records: list[BlockRecord] = []

    def record(layout: MoELayout | None = None) -> BlockRecord:
        if not records:
            d = _d_model(module, parts)
            out_idx = (layout.output_index or 0) if layout is not None else 0
            records.append(record_block(model, module, parts, d, out_idx))
        return records[0]

    if entry is not None:
        who = "table layout" if is_builtin_layout(entry) else "registered adapter"
        try:
            view = MoE(path, module, entry, model=model)
        except UnsupportedModuleError as e:
            tried.append(f"{who}: {e}")
        else:
            if not verify:
                return view
            v = verified(model, view, lambda: record(entry))
            if v.ok:
                view.verification = v
                return view
            tried.append(f"{who} {_describe(vars(entry))}: {v.detail}")
        if not is_builtin_layout(entry):
            raise _refuse(path, module, tried)
    if not verify:
        guess = infer_moe_layout(module)
        if guess is None:
            raise _refuse(path, module, [*tried, "no structural guess"])
        return MoE(path, module, guess, model=model)
    key = block_signature(module, ("moe-discovery", parts))
    if key not in _DISCOVERED:
        _DISCOVERED[key] = _search(model, path, module, parts, record())
    layout, more = _DISCOVERED[key]
    if layout is None:
        raise _refuse(path, module, [*tried, *more])
    view = MoE(path, module, layout, model=model)
    v = verified(model, view, lambda: record(layout))
    if not v.ok:
        raise _refuse(path, module, [*tried, f"discovered {_describe(vars(layout))}: {v.detail}"])
    view.verification = v
    return view


def _d_model(module: nn.Module, parts: MoEParts) -> int:
    sub = router_weight_rows(get_attr(module, parts.router or ""))
    if sub is None:
        raise UnsupportedModuleError(f"{type(module).__name__}: no router weight")
    w = get_attr(module, _join(parts.router or "", sub[0])).weight
    return int(w.shape[1])


def clear_discovery_cache() -> None:
    """Forget discovered layouts (the next discovery probes again; also done by
    :func:`~modulart.core.verify.clear_verification_cache`)."""
    _DISCOVERED.clear()


on_clear(clear_discovery_cache)
