"""Finding fused MoE experts and their routers, and verifying the experts' layout on a probe.

The layout of an experts module comes from the block's verified core MoE view
(:func:`modulart.core.moe.find_moes`, its ``fused_storage``: the one place expert storage is known),
else from the flags transformers sets on its decorated experts classes (``is_transposed``,
``is_concatenated``, ``has_gate``, ``has_post_expert_norm``). It is then checked by :func:`verify`: the module's own
forward on a random probe must equal the sum of the routing weights times
:meth:`~modulart.migu.experts.FusedExperts.project`. A module that fails is refused (MIGU leaves it
ungated and names it, with the reason, in its coverage warning).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Experts(nn.Module):  # Mixtral-style storage and flags, eager loop
    ...     is_transposed, is_concatenated = False, True
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 5))  # [E, 2I, d]
    ...         self.down_proj = nn.Parameter(torch.randn(3, 5, 4))  # [E, d, I]
    ...         self.act_fn = nn.SiLU()
    ...     def forward(self, x, idx, w):
    ...         out = torch.zeros_like(x)
    ...         for t in range(x.shape[0]):
    ...             for j in range(idx.shape[1]):
    ...                 gate, up = (self.gate_up_proj[idx[t, j]] @ x[t]).chunk(2)
    ...                 out[t] += w[t, j] * (self.down_proj[idx[t, j]] @ (self.act_fn(gate) * up))
    ...         return out
    >>> block = nn.Module(); block.experts = Experts(); block.gate = nn.Linear(5, 3, bias=False)
    >>> found, refused = find_fused_experts(block)
    >>> [fe.path for fe in found], refused, [p for p, _ in find_routers(block, found)]
    (['experts'], {}, ['gate'])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from modulart.core.errors import ModulartError, UnsupportedModuleError
from modulart.migu.experts import FusedExperts, FusedLayout

__all__ = ["core_moes", "find_fused_experts", "find_routers", "verify"]

# What a core MoE view may raise on a block it cannot describe (MIGU then relies on its own discovery).
_VIEW_ERRORS = (ModulartError, AttributeError, TypeError, ValueError, RuntimeError, KeyError, IndexError)


def _flags_layout(module: nn.Module) -> FusedLayout | str | None:
    """The layout transformers declares on decorated experts classes, a refusal reason, or None."""
    transposed, concatenated = getattr(module, "is_transposed", None), getattr(module, "is_concatenated", None)
    if not (isinstance(transposed, bool) and isinstance(concatenated, bool)):
        return None
    if getattr(module, "has_post_expert_norm", False):
        return "a norm follows every expert (has_post_expert_norm)"
    if getattr(module, "has_gate", True) is False:
        return "experts without a gate projection (has_gate=False)"
    return FusedLayout(transposed=transposed, interleaved=not concatenated)


@torch.no_grad()
def verify(fe: FusedExperts, tokens: int = 6, seed: int = 0) -> str | None:
    """Check :meth:`FusedExperts.project` against the module's own forward on a probe; None if it matches.

    The module's ``forward`` is called directly (no hooks fire). Returns the reason of a mismatch.
    """
    p = fe.gate_up
    g = torch.Generator().manual_seed(seed)
    e, k = fe.num_experts, min(2, fe.num_experts)
    x = torch.randn(tokens, fe.d_model, generator=g).to(device=p.device, dtype=p.dtype)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]).to(p.device)
    w = torch.rand(tokens, k, generator=g).to(device=p.device, dtype=p.dtype)
    try:
        if fe.layout.dense:
            dense = torch.zeros(e, tokens, fe.d_model, device=p.device, dtype=p.dtype)
            for j in range(k):
                dense[idx[:, j], torch.arange(tokens, device=p.device)] = x * w[:, j : j + 1]
            got = fe.module.forward(dense.reshape(-1, fe.d_model)).reshape(e, tokens, -1)
            want = torch.stack([fe.project(i, dense[i])[1] for i in range(e)])
        else:
            got = fe.module.forward(x, idx, w)
            want = torch.zeros_like(x)
            for j in range(k):
                for t in range(tokens):
                    want[t] += w[t, j] * fe.project(int(idx[t, j]), x[t : t + 1])[1][0]
    except (RuntimeError, TypeError, ValueError, IndexError, ModulartError) as err:
        return f"the probe forward failed ({type(err).__name__}: {err})"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return f"the forward returned {getattr(got, 'shape', type(got).__name__)}, expected {tuple(want.shape)}"
    tol = 1e-4 if p.dtype == torch.float32 or p.dtype == torch.float64 else 3e-2
    scale = float(want.abs().max()) + 1e-6
    gap = float((got.float() - want.float()).abs().max())
    if gap > tol * scale:
        return f"recomputed expert outputs differ from the module's forward (max error {gap:.3g}, scale {scale:.3g})"
    return None


def core_moes(model: nn.Module) -> list[Any]:
    """The core MoE views of ``model`` (:func:`modulart.core.moe.find_moes`), or [] where it cannot describe them.

    Example:
        >>> import torch
        >>> core_moes(torch.nn.Linear(2, 2))
        []
    """
    from modulart.core.moe import find_moes

    try:
        with warnings.catch_warnings():  # MIGU needs the views only as a fallback: their refusals are not its news
            warnings.simplefilter("ignore")
            return list(find_moes(model, strict=False))
    except _VIEW_ERRORS:
        return []


def find_fused_experts(
    model: nn.Module, candidates: Iterable[tuple[str, nn.Module]] | None = None, *, moes: list[Any] | None = None
) -> tuple[list[FusedExperts], dict[str, str]]:
    """The trainable fused experts modules of ``model`` (or among ``candidates``), verified.

    Args:
        moes: the core MoE views (default: :func:`core_moes`), for layouts not declared otherwise.

    Returns:
        ``(found, refused)``: the supported modules in model order, and ``{path: reason}`` for
        fused experts modules whose layout is unknown or does not verify (MIGU leaves them ungated).
    """
    view_layouts = _view_layouts(core_moes(model) if moes is None else moes)
    found: list[FusedExperts] = []
    refused: dict[str, str] = {}
    verified: dict[tuple[type, FusedLayout], str | None] = {}
    for path, module in model.named_modules() if candidates is None else candidates:
        gu, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
        if gu is None or down is None or gu.dim() != 3 or not (gu.requires_grad or down.requires_grad):
            continue
        layout = view_layouts.get(id(module)) or _flags_layout(module)
        if layout is None or isinstance(layout, str):
            refused[path] = layout or "no verified MoE view describes its storage (see modulart.find_moes)"
            continue
        try:
            fe = FusedExperts(path, module, layout)
        except UnsupportedModuleError as err:
            refused[path] = str(err)
            continue
        key = (type(module), layout)
        if key not in verified:
            verified[key] = verify(fe)
        reason = verified[key]
        if reason is not None:
            refused[path] = reason
            continue
        found.append(fe)
    return found, refused


def _view_layouts(moes: list[Any]) -> dict[int, FusedLayout | str]:
    """``id(experts module) -> layout`` (or why MIGU cannot gate it) from the verified core MoE views:
    the one source of truth for expert storage."""
    out: dict[int, FusedLayout | str] = {}
    for m in moes:
        spec, experts = getattr(m, "fused_storage", None), getattr(m, "experts_module", None)
        if spec is None or not isinstance(experts, nn.Module):
            continue
        if spec.flat or spec.up is not None or spec.up_first or spec.down_transposed != spec.transposed:
            out[id(experts)] = (
                "expert storage MIGU cannot slice per unit (flattened, separate up, up first, or mixed orientation)"
            )
            continue
        on_input = bool(getattr(getattr(m, "layout", None), "weights_on_input", False))
        out[id(experts)] = FusedLayout(transposed=spec.transposed, interleaved=spec.interleaved, dense=on_input)
    return out


def find_routers(
    model: nn.Module, experts: list[FusedExperts], *, moes: list[Any] | None = None
) -> list[tuple[str, nn.Module]]:
    """Router modules: those of the core MoE views, and siblings of fused experts with a ``[E, d]`` weight."""
    paths = {id(m): p for p, m in model.named_modules()}
    out: dict[int, tuple[str, nn.Module]] = {}
    for moe in core_moes(model) if moes is None else moes:
        router = getattr(moe, "router", None)
        if isinstance(router, nn.Module) and id(router) in paths:
            out[id(router)] = (paths[id(router)], router)
    for fe in experts:
        parent_path = fe.path.rsplit(".", 1)[0] if "." in fe.path else ""
        for name, child in model.get_submodule(parent_path).named_children():
            w = child._parameters.get("weight")
            if child is not fe.module and w is not None and tuple(w.shape) == (fe.num_experts, fe.d_model):
                out[id(child)] = (f"{parent_path}.{name}" if parent_path else name, child)
    order = {p: i for i, p in enumerate(paths.values())}
    return sorted(out.values(), key=lambda pm: order[pm[0]])
