"""Verifying MoE views against their blocks: one probe per block type, output *and* routing compared.

:func:`record_block` runs the block's own forward once (quietly, see :func:`~modulart.core.probe.quiet`)
on a ``[2, T, d_model]`` probe — or, when the block cannot be called alone, a whole-model forward
with :func:`~modulart.core.probe.model_probe_inputs` — and records its input, its output and the
routing decisions it took, read from wherever the block exposes them:

- the experts container called as ``experts(hidden [T, d], top_k_index [T, k], top_k_weights [T, k])``
  (transformers v5), or with a one-hot dispatch mask ``[T, k, E]`` (Switch Transformers);
- a router returning ``(.., weights [T, k], indices [T, k])``, a one-hot mask, or dense scores
  ``[T, E]`` that are zero off the chosen experts (Llama4);
- one module per expert: the tokens each expert received;
- ``ParallelExperts``-style containers called with ``(sorted inputs, expert_size)`` (JetMoE).

:func:`check_view` compares a view with a record: ``view.forward(x)`` against the block output
within :func:`~modulart.core.probe.tolerance`, and ``view.route(x)`` against the recorded routing
(the same set of experts for every token, the same weights).

Example:
    >>> import torch
    >>> from modulart.core.moe_verify import RoutingEvidence
    >>> ev = RoutingEvidence([frozenset({0, 2})], [{0: 0.5, 2: 0.5}], "router")
    >>> ev.tokens
    1
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modulart.core.arch import block_position, get_attr
from modulart.core.errors import UnsupportedModuleError
from modulart.core.ffn import adapter_help
from modulart.core.moe import MoE
from modulart.core.moe_layouts import MoEParts, moe_block_parts
from modulart.core.probe import PROBE_BATCH, PROBE_TOKENS, Trace, model_probe_inputs, relative_error, tolerance, trace
from modulart.core.select import filter_by_selector
from modulart.core.verify import Verification, block_signature, cached_verification

__all__ = ["BlockRecord", "RoutingEvidence", "check_view", "record_block", "resolve_moes"]


@dataclass
class RoutingEvidence:
    """The experts a block chose per token (and their weights, when visible)."""

    sets: list[frozenset[int]]
    weights: list[dict[int, float]] | None
    source: str

    @property
    def tokens(self) -> int:
        return len(self.sets)


@dataclass
class BlockRecord:
    """What one probe forward of a block showed.

    Attributes:
        x: the block input ``[..., d_model]``; y: its output (hidden states element).
        routing: the routing decisions, if the block exposed them.
        experts_call: ``(hidden [T, d], indices [T, k], weights [T, k], output [T, d])`` of a
            v5-style experts call, or None.
        dtype: the dtype the block computes in.
    """

    x: torch.Tensor
    y: torch.Tensor
    routing: RoutingEvidence | None
    experts_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    dtype: torch.dtype
    tuple_output: bool = False


def _compute_dtype(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    floats = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    if not floats:
        return torch.float32, torch.device("cpu")
    big = max(floats, key=lambda t: t.numel())
    return big.dtype, big.device


def record_block(
    model: nn.Module, module: nn.Module, parts: MoEParts, d_model: int, output_index: int = 0
) -> BlockRecord:
    """Run the block once (alone, else inside a model forward) and record what it did."""
    dtype, device = _compute_dtype(module)
    taps: dict[str, nn.Module] = {"block": module}
    names = dict(module.named_modules())
    if parts.router is not None:
        prefix = ""
        for piece in parts.router.split("."):
            prefix = f"{prefix}.{piece}" if prefix else piece
            if prefix in names:
                taps[f"router:{prefix}"] = names[prefix]
    for c in parts.experts:
        container = names.get(c)
        if container is None:
            continue
        taps[f"experts:{c}"] = container
        if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
            for i, child in enumerate(container.children()):
                taps[f"expert:{i}"] = child
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_BATCH, PROBE_TOKENS, d_model, generator=g).to(device=device, dtype=dtype)
    try:
        t = trace(module, taps, lambda: module(x))
        t.input("block")
    except Exception:  # the block needs more than hidden states: probe the whole model instead
        inputs = model_probe_inputs(model)
        if inputs is None:
            raise UnsupportedModuleError(
                f"{type(module).__name__}: the block cannot be called on a [{PROBE_BATCH}, {PROBE_TOKENS}, "
                f"{d_model}] probe and the model has no probe inputs"
            ) from None
        t = trace(model, taps, lambda: model(**inputs))
    xin = t.input("block")
    y = t.output("block", index=output_index)
    n_exp = _num_experts(module, parts)
    tup = isinstance(t.calls["block"][0].output, (tuple, list))
    return BlockRecord(xin, y, _routing_evidence(t, xin, n_exp), _experts_call(t, xin, parts), dtype, tup)


def _num_experts(module: nn.Module, parts: MoEParts) -> int:
    from modulart.core.moe_structure import router_weight_rows

    if parts.router is None:
        return 0
    found = router_weight_rows(get_attr(module, parts.router))
    return found[1] if found else 0


def _tensors(call_args: tuple[Any, ...], kwargs: Mapping[str, Any], output: Any) -> list[Any]:
    out = list(call_args) + list(kwargs.values())
    return out + (list(output) if isinstance(output, (tuple, list)) else [output])


def _from_pairs(idx: torch.Tensor, w: torch.Tensor | None, source: str) -> RoutingEvidence:
    sets = [frozenset(int(i) for i in row) for row in idx.tolist()]
    weights = None
    if w is not None:
        weights = [
            dict(zip(map(int, i), map(float, ww), strict=True)) for i, ww in zip(idx.tolist(), w.tolist(), strict=True)
        ]
    return RoutingEvidence(sets, weights, source)


def _from_onehot(mask: torch.Tensor, w: torch.Tensor | None, t: int, source: str) -> RoutingEvidence:
    m = mask.reshape(t, -1, mask.shape[-1]).sum(1)  # [T, E]
    sets = [frozenset(torch.nonzero(row).flatten().tolist()) for row in m]
    weights = None
    if w is not None and w.numel() == t:
        weights = [{e: float(v) for e in s} for s, v in zip(sets, w.reshape(-1).tolist(), strict=True)]
    return RoutingEvidence(sets, weights, source)


def _distinct_rows(idx: torch.Tensor) -> bool:
    """Each row holds distinct values (expert indices, k of them), as a one-hot row of E > 2 cannot."""
    srt = idx.sort(-1).values
    return bool((srt[:, 1:] != srt[:, :-1]).all()) if idx.shape[-1] > 1 else True


def _pairs_in(values: list[Any], t: int, n_exp: int, source: str) -> RoutingEvidence | None:
    ints = [v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() >= 2]
    floats = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for idx in ints:
        w = next((f for f in floats if f.shape == idx.shape), None)
        if idx.dim() == 2 and idx.shape[0] == t and 0 < idx.shape[1] < n_exp:  # indices [T, k]
            return _from_pairs(idx, w, source)
        if idx.dim() == 2 and idx.shape == (t, n_exp) and w is not None and _distinct_rows(idx):
            return _from_pairs(idx, w, source)  # k == E: indices (with their weights), not a one-hot mask
        onehot = n_exp > 0 and idx.shape[-1] == n_exp and idx.numel() // n_exp in (t, t * idx.shape[-2])
        if onehot and bool(((idx == 0) | (idx == 1)).all()):  # one-hot dispatch mask [T, (k,) E]
            w = next((f for f in floats if f.numel() == t), None)
            return _from_onehot(idx, w, t, source)
    for f in floats:  # dense scores, zero off the chosen experts (Llama4)
        if f.dim() == 2 and f.shape == (t, n_exp) and n_exp:
            nz = (f != 0).sum(-1)
            if bool((nz == nz[0]).all()) and 0 < int(nz[0]) < n_exp:
                sets = [frozenset(torch.nonzero(row).flatten().tolist()) for row in f]
                weights = [{e: float(row[e]) for e in s} for s, row in zip(sets, f, strict=True)]
                return RoutingEvidence(sets, weights, source)
    return None


def _token_ids(rows: torch.Tensor, flat: torch.Tensor) -> list[int]:
    eq = (rows.unsqueeze(1) == flat.unsqueeze(0)).all(-1)  # [n, T]
    return [int(i) for i in eq.float().argmax(-1).tolist()] if eq.numel() else []


def _routing_evidence(t: Trace, x: torch.Tensor, n_exp: int) -> RoutingEvidence | None:
    flat = x.reshape(-1, x.shape[-1])
    tokens = flat.shape[0]
    for name, calls in t.calls.items():
        if name.startswith("experts:") and calls:
            c = calls[0]
            ev = _pairs_in(list(c.args[1:]) + list(c.kwargs.values()), tokens, n_exp, name)
            if ev is not None:
                return ev
            sizes = next((a for a in c.args[1:] if isinstance(a, list) and len(a) == n_exp), None)
            inp = c.args[0] if c.args and isinstance(c.args[0], torch.Tensor) else None
            if sizes is not None and inp is not None and inp.shape[-1] == flat.shape[-1]:
                sets: list[set[int]] = [set() for _ in range(tokens)]
                for e, chunk in enumerate(torch.split(inp, [int(n) for n in sizes], dim=0)):
                    for tok in _token_ids(chunk, flat):
                        sets[tok].add(e)
                return RoutingEvidence([frozenset(s) for s in sets], None, f"{name} (expert_size)")
    for name, calls in t.calls.items():
        if name.startswith("router:") and calls:
            ev = _pairs_in(_tensors((), {}, calls[0].output), tokens, n_exp, name)
            if ev is not None:
                return ev
    experts = sorted((int(n.split(":")[1]), calls) for n, calls in t.calls.items() if n.startswith("expert:"))
    if experts:
        sets = [set() for _ in range(tokens)]
        for e, calls in experts:
            for c in calls:
                for tok in _token_ids(c.args[0].reshape(-1, flat.shape[-1]), flat):
                    sets[tok].add(e)
        return RoutingEvidence([frozenset(s) for s in sets], None, "expert modules")
    return None


def _experts_call(
    t: Trace, x: torch.Tensor, parts: MoEParts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if len(parts.experts) != 1:
        return None
    calls = t.calls.get(f"experts:{parts.experts[0]}") or []
    if not calls:
        return None
    c = calls[0]
    args = list(c.args) + list(c.kwargs.values())
    if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]):
        return None
    h, idx, w = args[0], args[1], args[2]
    out = c.output[0] if isinstance(c.output, (tuple, list)) else c.output
    if idx.is_floating_point() or idx.dim() != 2 or w.shape != idx.shape or not isinstance(out, torch.Tensor):
        return None
    return h.reshape(-1, h.shape[-1]), idx, w, out.reshape(-1, out.shape[-1])


def compare_routing(view: MoE, x: torch.Tensor, ev: RoutingEvidence, tol: float) -> str | None:
    """None when ``view.route(x)`` takes the recorded decisions, else what differs."""
    with torch.no_grad():
        r = view.route(x)
    keep = r.weights != 0 if view.scoring.capacity is not None else torch.ones_like(r.indices, dtype=torch.bool)
    got = [
        frozenset(int(i) for i, k in zip(row, kr, strict=True) if k)
        for row, kr in zip(r.indices.tolist(), keep.tolist(), strict=True)
    ]
    if len(got) != ev.tokens:
        return f"routing covers {len(got)} tokens, the block routed {ev.tokens}"
    bad = [i for i, (a, b) in enumerate(zip(got, ev.sets, strict=True)) if a != b]
    if bad:
        i = bad[0]
        return (
            f"routing picks other experts on {len(bad)} of {ev.tokens} tokens "
            f"(token {i}: view {sorted(got[i])}, block {sorted(ev.sets[i])})"
        )
    if ev.weights is not None:
        worst = 0.0
        scale = max((abs(v) for d in ev.weights for v in d.values()), default=1.0) or 1.0
        for row_i, row_w, k, want in zip(
            r.indices.tolist(), r.weights.tolist(), keep.tolist(), ev.weights, strict=True
        ):
            for e, w, kk in zip(row_i, row_w, k, strict=True):
                if kk:
                    worst = max(worst, abs(w - want[e]) / scale)
        if worst > tol:
            return f"routing weights differ by {worst:.3g} (relative; tolerance {tol:.1g})"
    return None


def check_view(view: MoE, rec: BlockRecord) -> Verification:
    """Compare ``view`` with the recorded behaviour of its block."""
    tol = tolerance(rec.dtype)
    with torch.no_grad():
        try:
            got = view.forward(rec.x)
        except Exception as e:  # a view that cannot even run is not the block
            return Verification(False, float("inf"), tol, f"view.forward raised {type(e).__name__}: {e}")
    err = relative_error(got, rec.y.reshape(got.shape) if rec.y.numel() == got.numel() else rec.y)
    if err > tol:
        return Verification(False, err, tol, f"output differs: relative error {err:.3g} (tolerance {tol:.1g})")
    if rec.routing is not None:
        why = compare_routing(view, rec.x, rec.routing, max(tol, 1e-5))
        if why is not None:
            return Verification(False, err, tol, f"{why} [evidence: {rec.routing.source}]")
    src = rec.routing.source if rec.routing is not None else "output only"
    return Verification(True, err, tol, f"output error {err:.2g}; routing checked against {src}")


def _layout_key(layout: object) -> object:
    try:
        hash(layout)
        return layout
    except TypeError:
        return id(layout)


def resolve_moes(model: nn.Module, selector: Any, *, strict: bool, verify: bool) -> list[MoE]:
    """:func:`~modulart.core.moe.find_moes` (see there)."""
    from modulart.core.moe_discovery import discover_view

    blocks = [_Stub(p, model.get_submodule(p), _relative(p, parts)) for p, parts in moe_block_parts(model).items()]
    if selector is not None:
        blocks = filter_by_selector(blocks, selector, model, strict=strict, what="MoE blocks")
    found: list[MoE] = []
    for b in blocks:
        stack, layer = block_position(model, b.path)
        try:
            view = discover_view(model, b.path, b.module, b.parts, verify=verify)
        except UnsupportedModuleError as e:
            if strict:
                raise
            warnings.warn(f"find_moes: leaving out {b.path!r}: {e}", stacklevel=3)
            continue
        view.layer, view.stack = layer, stack
        found.append(view)
    if not found and strict:
        cands = [
            f"  - {p} ({type(m).__name__})"
            for p, m in model.named_modules()
            if "expert" in p.rsplit(".", 1)[-1].lower() or "moe" in type(m).__name__.lower()
        ][:10]
        shown = "\n".join(cands) or "  (no module named like experts / MoE)"
        raise UnsupportedModuleError(
            f"found no MoE block in {type(model).__name__}. Candidates seen:\n{shown}\n" + adapter_help("moe")
        )
    return found


def _relative(path: str, parts: MoEParts) -> MoEParts:
    cut = len(path) + 1 if path else 0
    return MoEParts(
        router=parts.router[cut:] if parts.router is not None else None,
        experts=tuple(e[cut:] for e in parts.experts),
        shared=tuple(s[cut:] for s in parts.shared),
    )


@dataclass
class _Stub:
    path: str
    module: nn.Module
    parts: MoEParts


def verified(model: nn.Module, view: MoE, record: Callable[[], BlockRecord]) -> Verification:
    """The cached verification of ``view``; ``record()`` probes the block when not cached."""

    def compute() -> Verification:
        return check_view(view, record())

    key = block_signature(view.module, ("moe-view", _layout_key(view.layout)))
    return cached_verification(key, compute)
