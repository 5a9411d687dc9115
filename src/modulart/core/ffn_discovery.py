"""Finding feed-forward blocks by data flow: no table entry, class name or child order needed.

For every pair of linear layers ``A: d -> f`` and ``B: f -> d`` (``f != d``) inside one block (not
across the entries of a ``ModuleList``), the lowest module holding both is probed once
(:func:`~modulart.core.ffn_verify.probe_block`) with every linear layer and submodule tapped. ``B``'s
recorded input ``h`` is then explained, most specific first, as

- ``σ(G(q)) ⊙ U(q)`` for two layers ``G, U: d -> f`` reading the same ``q`` (gated);
- ``σ(a₁) ⊙ a₂`` or ``σ(a₂) ⊙ a₁`` for the halves of one layer ``d -> 2f`` (fused gate/up);
- ``σ(A(q))`` (plain),

where σ is tried among the block's own activation modules and function attributes, then the
:data:`~modulart.core.activations.CATALOGUE`, and must act on each neuron alone and not be linear.
What cannot be explained is not an FFN (``Sequential(Linear, Linear, ReLU)`` is not). Results are
cached per block signature, so a 32-layer model probes one block per block type.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from modulart.core.ffn_discovery import discover_ffns
    >>> layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=32, batch_first=True)
    >>> [(d.path, d.layout.key, d.layout.value, d.verification.ok) for d in discover_ffns(layer, skip=lambda p: False)]
    [('', 'linear1', 'linear2', True)]
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modulart.core.activations import CATALOGUE, Activation, is_elementwise_nonlinear
from modulart.core.arch import FFNLayout
from modulart.core.ffn_verify import ProbeInputs, probe_block
from modulart.core.linear import LinearRef, is_linear_map, is_peft_layer
from modulart.core.probe import Trace, relative_error, tolerance
from modulart.core.verify import Verification, block_signature, on_clear

__all__ = ["Discovered", "clear_discovery_cache", "discover_ffns"]


@dataclass(frozen=True)
class Discovered:
    """An FFN found by data flow: the block's path, its layout (relative to it), the measured check."""

    path: str
    layout: FFNLayout
    verification: Verification


@dataclass(frozen=True)
class _Found:
    rel_block: str
    layout: FFNLayout
    verification: Verification
    linears: tuple[str, ...]  # relative to the host


@dataclass(frozen=True)
class _Lin:
    path: str
    ref: LinearRef

    @property
    def d_in(self) -> int:
        return self.ref.in_features

    @property
    def d_out(self) -> int:
        return self.ref.out_features


_cache: dict[tuple[object, ...], tuple[tuple[_Found, ...], tuple[str, ...]]] = {}
_lock = threading.Lock()


def clear_discovery_cache() -> None:
    """Forget every cached discovery result (:func:`~modulart.core.verify.clear_verification_cache`
    does this too)."""
    with _lock:
        _cache.clear()


on_clear(clear_discovery_cache)


def _join(a: str, b: str) -> str:
    return ".".join(p for p in (a, b) if p)


def _rel(path: str, base: str) -> str:
    return path if not base else path[len(base) + 1 :] if path != base else ""


def _lca(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    common = []
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def discover_ffns(
    model: nn.Module,
    *,
    skip: Callable[[str], bool],
    probe_inputs: ProbeInputs | None = None,
    notes: list[str] | None = None,
    unprobed: list[str] | None = None,
) -> list[Discovered]:
    """Every FFN block of ``model`` found by data flow, outside the paths ``skip`` rejects.

    Args:
        model: any module.
        skip: ``skip(path)`` is true for modules to leave out (routed experts, claimed blocks...).
        probe_inputs: keyword inputs of ``model`` for a whole-model probe when a block cannot be
            called alone (Hugging Face models get them from their config).
        notes: if given, receives one line per candidate pair that was probed and rejected, or
            per block that could not be probed (for error messages).
        unprobed: if given, receives one line per block that holds a candidate pair but could
            not be probed at all (so whether it holds an FFN is unknown).
    """
    named = _outside_peft_layers(dict(model.named_modules()))
    lists = {p for p, m in named.items() if _separates_blocks(m)}
    lins = [_Lin(p, LinearRef(m, p)) for p, m in named.items() if is_linear_map(m) and p and not skip(p)]
    hosts = _candidate_hosts(lins, lists)
    claimed: set[str] = set()
    out: list[Discovered] = []
    for host in sorted(hosts, key=_depth, reverse=True):
        if not any(a not in claimed and b not in claimed for a, b in hosts[host]):
            continue
        found: tuple[_Found, ...] | None = None
        why: tuple[str, ...] = ()
        while found is None:  # a host that cannot be called alone: probe its parent block instead
            inner = {_rel(li.path, host): li for li in lins if li.path not in claimed and _under(li.path, host)}
            found, why = _discover_in(model, named[host], inner, probe_inputs)
            parent = host.rpartition(".")[0]
            if found is None and (not host or parent in lists):
                break
            host = parent if found is None else host
        if notes is not None:
            notes.extend(f"{host or '<root>'} ({type(named[host]).__name__}): {w}" for w in why)
        if found is None and unprobed is not None:
            unprobed.append(f"{host or '<root>'} ({type(named[host]).__name__}): {why[0] if why else ''}")
        for f in found or ():
            linears = {_join(host, r) for r in f.linears}
            if linears & claimed:
                continue
            claimed |= linears
            out.append(Discovered(_join(host, f.rel_block), f.layout, f.verification))
    order = {p: i for i, p in enumerate(named)}
    return sorted(out, key=lambda d: order[d.path])


def _outside_peft_layers(named: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``named`` without the insides of PEFT tuner layers (base layer, adapters, dropout): the
    tuner layer itself is the linear map the model calls."""
    tuners = [p for p, m in named.items() if is_peft_layer(m)]
    if not tuners:
        return named
    return {p: m for p, m in named.items() if not any(p.startswith(t + ".") for t in tuners)}


def _separates_blocks(m: nn.Module) -> bool:
    """A list of blocks (layers, experts): an FFN never spans two of its entries. A container of
    leaf layers (``ModuleDict(c_fc=Linear, c_proj=Linear)``) holds the parts of one block instead."""
    if not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
        return False
    children = list(m.children())
    return any(list(c.children()) for c in children)


def _under(path: str, base: str) -> bool:
    return not base or path == base or path.startswith(base + ".")


def _candidate_hosts(lins: list[_Lin], lists: set[str]) -> dict[str, list[tuple[str, str]]]:
    by_shape: dict[tuple[int, int], list[_Lin]] = {}
    for li in lins:
        by_shape.setdefault((li.d_in, li.d_out), []).append(li)
    hosts: dict[str, list[tuple[str, str]]] = {}
    for a in lins:
        if a.d_in == a.d_out:
            continue
        for f in {a.d_out, a.d_out // 2} if a.d_out % 2 == 0 else {a.d_out}:
            for b in by_shape.get((f, a.d_in), []):
                lca = _lca(a.path, b.path)
                if lca in lists or _crosses_list(a.path, lca, lists) or _crosses_list(b.path, lca, lists):
                    continue
                hosts.setdefault(lca, []).append((a.path, b.path))
    return hosts


def _pairs(inner: dict[str, _Lin]) -> list[tuple[str, str]]:
    """Candidate (first layer, second layer) pairs: ``d -> f`` (or ``d -> 2f``) then ``f -> d``."""
    return [
        (ra, rb)
        for ra, a in inner.items()
        for rb, b in inner.items()
        if a.d_in != a.d_out and b.d_out == a.d_in and b.d_in in (a.d_out, a.d_out // 2) and ra != rb
    ]


def _crosses_list(path: str, lca: str, lists: set[str]) -> bool:
    parts = path.split(".")
    start = _depth(lca)
    return any(".".join(parts[:i]) in lists for i in range(start + 1, len(parts)))


def _discover_in(
    model: nn.Module, host: nn.Module, inner: dict[str, _Lin], probe_inputs: ProbeInputs | None
) -> tuple[tuple[_Found, ...] | None, tuple[str, ...]]:
    """The FFNs found in ``host`` (paths relative to it; None when it could not be probed) and
    notes on what was rejected."""
    key = block_signature(host, ("ffn-discovery", tuple(sorted(inner))))
    with _lock:
        if key in _cache:
            return _cache[key]
    modules = {p: m for p, m in _outside_peft_layers(dict(host.named_modules())).items() if not is_linear_map(m)}
    taps = {f"lin:{r}": li.ref.module for r, li in inner.items()} | {f"mod:{p}": m for p, m in modules.items()}
    d_model = next(li.d_in for li in inner.values() if li.d_in != li.d_out)
    pairs = [(f"lin:{a}", f"lin:{b}") for a, b in _pairs(inner)]

    def reached_a_pair(t: Trace) -> bool:
        return any(t.fired(a) and t.fired(b) for a, b in pairs)

    t, how = probe_block(model, host, taps, d_model, probe_inputs, enough=reached_a_pair)
    if t is None:  # not probed (not cached: other probe inputs may reach it)
        return None, (f"not probed: {how}",)
    rejected: list[str] = []
    found = tuple(_explain(t, host, inner, rejected))
    result = (found, tuple(rejected))
    with _lock:
        _cache[key] = result
    return result


# --- explaining the recorded data flow -------------------------------------------------------------
@dataclass(frozen=True)
class _Sigma:
    where: str | None  # path (relative to the host) of the module / attribute, or None (catalogue)
    fn: Activation
    name: str


def _sigmas(host: nn.Module) -> Iterator[_Sigma]:
    for path, m in _outside_peft_layers(dict(host.named_modules())).items():
        if is_linear_map(m) or list(m.children()) or isinstance(m, (nn.Dropout, nn.Identity)):
            continue
        if path and not isinstance(m, (nn.Embedding, nn.LayerNorm)) and "norm" not in type(m).__name__.lower():
            yield _Sigma(path, m, type(m).__name__)
    for path, m in host.named_modules():
        for k, v in vars(m).items():
            if not k.startswith("_") and isinstance(
                v, (types.FunctionType, types.BuiltinFunctionType, functools.partial)
            ):
                yield _Sigma(_join(path, k), v, getattr(v, "__name__", k))
    for name, fn in CATALOGUE.items():
        yield _Sigma(None, fn, name)


def _explain(t: Trace, host: nn.Module, inner: dict[str, _Lin], rejected: list[str]) -> Iterator[_Found]:
    fired = {r: li for r, li in inner.items() if t.fired(f"lin:{r}")}
    used: set[str] = set()
    sigmas = list(_sigmas(host))
    for rb, b in fired.items():
        if rb in used:
            continue
        h = t.input(f"lin:{rb}")
        tol = tolerance(h.dtype)
        ups = {
            r: li
            for r, li in fired.items()
            if r not in used and r != rb and li.d_in == b.d_out and t.seq(f"lin:{r}") < t.seq(f"lin:{rb}")
        }
        if b.d_in == b.d_out:  # d_ff == d_model: only a fused d -> 2·d_ff layer tells it from attention
            ups = {r: li for r, li in ups.items() if li.d_out == 2 * b.d_in}
            if not ups:
                continue
            match = _match_fused(t, ups, b.d_in, h, tol, sigmas)
        else:
            match = _match_gated(t, ups, b.d_in, h, tol, sigmas) or _match_fused(t, ups, b.d_in, h, tol, sigmas)
            match = match or _match_plain(t, ups, b.d_in, h, tol, sigmas)
        if match is None:
            if any(li.d_out in (b.d_in, 2 * b.d_in) for li in ups.values()):
                rejected.append(
                    f"the input of {rb!r} is not σ(A·q), σ(G·q) ⊙ (U·q) or a product of the halves of a "
                    f"fused layer for any layer of the block and any elementwise nonlinear σ tried "
                    f"({len(sigmas)} candidates; something that mixes neurons, such as a norm, between them?)"
                )
            continue
        roles, sigma, h_hat = match
        y = t.output(f"lin:{rb}")
        err = relative_error(b.ref(h_hat.to(h.dtype)), y)
        if err > tol:
            continue
        linears = (*{r for r in roles.values() if r is not None}, rb)
        block = functools.reduce(_lca, linears)
        layout = _layout(t, roles, rb, block, sigma)
        used.update(linears)
        detail = f"found by data flow: recompute vs the block's own forward, relative error {err:.3g}"
        yield _Found(block, layout, Verification(True, err, tol, detail), linears)


_Roles = dict[str, str | None]


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return relative_error(got, want) <= tol


def _apply(sigma: _Sigma, x: torch.Tensor) -> torch.Tensor | None:
    try:
        out = sigma.fn(x)
    except Exception:  # a candidate that is not an activation may fail in any way
        return None
    return out if isinstance(out, torch.Tensor) and out.shape == x.shape else None


def _match_gated(
    t: Trace, ups: dict[str, _Lin], f: int, h: torch.Tensor, tol: float, sigmas: list[_Sigma]
) -> tuple[_Roles, _Sigma, torch.Tensor] | None:
    cands = [r for r, li in ups.items() if li.d_out == f]
    for g in cands:
        for u in cands:
            if g == u or not torch.equal(t.input(f"lin:{g}"), t.input(f"lin:{u}")):
                continue
            a, up = t.output(f"lin:{g}"), t.output(f"lin:{u}")
            for s in sigmas:
                act = _apply(s, a)
                if act is not None and _close(act * up, h, tol) and is_elementwise_nonlinear(s.fn, a):
                    return {"key": g, "up": u, "fused": None}, s, act * up
    return None


def _match_fused(
    t: Trace, ups: dict[str, _Lin], f: int, h: torch.Tensor, tol: float, sigmas: list[_Sigma]
) -> tuple[_Roles, _Sigma, torch.Tensor] | None:
    for r, li in ups.items():
        if li.d_out != 2 * f:
            continue
        out = t.output(f"lin:{r}")
        first, second = out[..., :f], out[..., f:]
        for order, (gate, up) in (("gate_first", (first, second)), ("up_first", (second, first))):
            for s in sigmas:
                act = _apply(s, gate)
                if act is not None and _close(act * up, h, tol) and is_elementwise_nonlinear(s.fn, gate):
                    return {"key": r, "up": None, "fused": order}, s, act * up
    return None


def _match_plain(
    t: Trace, ups: dict[str, _Lin], f: int, h: torch.Tensor, tol: float, sigmas: list[_Sigma]
) -> tuple[_Roles, _Sigma, torch.Tensor] | None:
    for r, li in ups.items():
        if li.d_out != f:
            continue
        a = t.output(f"lin:{r}")
        for s in sigmas:
            act = _apply(s, a)
            if act is not None and _close(act, h, tol) and is_elementwise_nonlinear(s.fn, a):
                return {"key": r, "up": None, "fused": None}, s, act
    return None


def _layout(t: Trace, roles: _Roles, value: str, block: str, sigma: _Sigma) -> FFNLayout:
    key = roles["key"]
    assert key is not None
    activation: str | Activation = sigma.fn
    if sigma.where is not None and _under(sigma.where, block) and sigma.where != block:
        activation = _rel(sigma.where, block)
    up = roles["up"]
    needs_input = False
    if up is not None:  # a separate up projection reads q too: is the block's own input q?
        name = f"mod:{block}"
        needs_input = not (t.fired(name) and torch.equal(t.input(name), t.input(f"lin:{key}")))
    fused: Literal["gate_first", "up_first"] | None = (
        "gate_first" if roles["fused"] == "gate_first" else "up_first" if roles["fused"] == "up_first" else None
    )
    return FFNLayout(
        key=_rel(key, block),
        value=_rel(value, block),
        activation=activation,
        up=_rel(up, block) if up is not None else None,
        input=_rel(key, block) if needs_input else None,
        fused_gate_up=fused,
    )
