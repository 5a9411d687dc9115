"""Structural recognition of mixture-of-experts blocks: cheap, no probe, no transformers import.

:func:`moe_block_parts` walks a model once and reports, for every module that *looks like* a MoE
block, where its router, its routed-expert containers and its shared experts are. It is generous:
it also recognises blocks whose :class:`~modulart.core.moe.MoE` view would be refused, so that
dense-FFN discovery can leave routed experts (and shared experts) out whatever happens later.

A block is recognised when one of its direct children is an expert container and another one is a
router whose output size equals the number of experts:

- a ``ModuleList`` / ``ModuleDict`` of at least two FFN-like modules of one class (``E`` = length);
- a module holding at least two 3-D tensors ``[E, ., .]`` (fused experts: ``gate_up_proj`` /
  ``down_proj``, transposed or not, or ``weight`` of JetMoE's ``ParallelExperts``, where the
  input and output experts are two sibling containers);
- a module whose subtree holds at least two equally shaped 2-D tensors ``[E * I, d]``
  (DBRX's flattened ``experts.mlp.w1 / v1 / w2``);

and the router is a child with a 2-D ``weight [E, d]`` (itself, or one linear child of it such
as ``router.layer`` or ``gate.wg``). Every other direct child that is a dense FFN (or is named
``shared*``) is a shared expert. Blocks of :data:`~modulart.core.moe_layouts.MOE_LAYOUTS` are
reported from their table entry.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Expert(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w1, self.w2, self.act = nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU()
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.router = nn.Linear(8, 4, bias=False)
    ...         self.experts = nn.ModuleList([Expert() for _ in range(4)])
    ...         self.shared = Expert()
    >>> moe_block_parts(nn.Sequential(Block()))["0"]
    MoEParts(router='0.router', experts=('0.experts',), shared=('0.shared',), beside=())
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modulart.core.arch import FFN_LAYOUTS, get_attr, infer_ffn_layout
from modulart.core.linear import is_linear_like

__all__ = ["MoEParts", "block_parts", "moe_block_parts"]


@dataclass(frozen=True)
class MoEParts:
    """Where the parts of one MoE block are (model-relative dotted paths).

    Attributes:
        router: the router module (the module holding the ``[E, d]`` weight or its parent), or None.
        experts: the routed-expert containers (usually one; JetMoE has two sibling containers).
        shared: the shared (always-on) experts inside the block.
        beside: shared experts kept next to the block rather than inside it (GraniteMoE-shared's
            ``shared_mlp`` beside ``block_sparse_moe``; the layer adds them): siblings whose name
            says ``shared``. They are no part of the block's view, and no dense FFN of the layer either.
    """

    router: str | None
    experts: tuple[str, ...]
    shared: tuple[str, ...] = ()
    beside: tuple[str, ...] = ()


def _join(a: str, b: str) -> str:
    return ".".join(p for p in (a, b) if p)


def _tensors(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    out: list[torch.Tensor] = list(module.parameters(recurse=recurse))
    out += [t for t in module.buffers(recurse=recurse) if t.is_floating_point()]
    return out


def _is_ffn(module: nn.Module) -> bool:
    if FFN_LAYOUTS.lookup(type(module)) is not None or infer_ffn_layout(module) is not None:
        return True
    linears = [m for m in module.modules() if m is not module and is_linear_like(m)]
    return len(linears) >= 2


def _list_experts(child: nn.Module) -> int | None:
    """``E`` for a ModuleList / ModuleDict of >= 2 FFN-like modules of one class."""
    if not isinstance(child, (nn.ModuleList, nn.ModuleDict)):
        return None
    items = [m for m in child.children() if any(True for _ in m.parameters())]
    if len(items) < 2 or len({type(m) for m in items}) != 1 or not _is_ffn(items[0]):
        return None
    return len(items)


def _fused_experts(child: nn.Module, n_exp: int) -> bool:
    """A module with >= 2 own 3-D tensors, one of them ``[E, ., .]`` (or a ``ParallelExperts``-like
    module whose only tensor is a 3-D ``weight [E, ., .]``). Generous: the tensors may disagree on
    their first dimension (LongCat-Flash stores extra rows for its identity experts). A convolution's
    ``[C_out, C_in / groups, k]`` weight is not one (Mamba mixers, LFM2's short convolutions)."""
    if is_linear_like(child) or isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.modules.conv._ConvNd)):
        return False
    three = [t for t in _tensors(child, recurse=False) if t.dim() == 3]
    if not any(int(t.shape[0]) == n_exp for t in three):
        return False
    return len(three) >= 2 or isinstance(getattr(child, "weight", None), torch.Tensor)


def _flat_experts(child: nn.Module, n_exp: int) -> bool:
    """DBRX-like: >= 2 equally shaped 2-D tensors ``[E * I, d]`` (I > 1) in the subtree, no linears."""
    if is_linear_like(child) or any(is_linear_like(m) for m in child.modules()):
        return False
    two = [t for t in _tensors(child, recurse=True) if t.dim() == 2]
    if len(two) < 2 or len({tuple(t.shape) for t in two}) != 1:
        return False
    rows = int(two[0].shape[0])
    return rows % n_exp == 0 and rows // n_exp > 1


_HINTS = ("expert", "moe", "router", "gate", "sparse", "mixture", "switch", "wg", "classifier")


def _named_like_moe(module: nn.Module, router: str, container: str) -> bool:
    """A list of FFNs next to a Linear is a MoE block only when a name says so (not a layer stack)."""
    names = (type(module).__name__.lower(), router.lower(), container.lower())
    return any(h in n for h in _HINTS for n in names)


def _has_activation(module: nn.Module) -> bool:
    """Whether the block itself holds a callable named ``*act*`` (sibling expert containers need one)."""
    named = [*module.named_children(), *((k, v) for k, v in vars(module).items() if not k.startswith("_"))]
    return any("act" in k.lower() and callable(v) for k, v in named)


def router_weight_rows(module: nn.Module) -> tuple[str, int] | None:
    """(relative path, E) of a router-like module: its own 2-D ``weight`` or one linear child's."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return "", int(w.shape[0])
    kids = [(n, c) for n, c in module.named_children() if is_linear_like(c)]
    if len(kids) == 1:
        cw = kids[0][1].weight
        if isinstance(cw, torch.Tensor) and cw.dim() == 2:
            return kids[0][0], int(cw.shape[0])
    return None


def block_parts(module: nn.Module) -> tuple[str | None, tuple[str, ...], tuple[str, ...]] | None:
    """(router, expert containers, shared experts) relative to ``module``, or None if not a MoE block."""
    children = dict(module.named_children())
    routers = {n: r for n, c in children.items() if (r := router_weight_rows(c)) is not None}
    for rname, (_, n_exp) in routers.items():
        if n_exp < 2:
            continue
        experts: list[str] = []
        for n, c in children.items():
            if n == rname:
                continue
            listed = _list_experts(c) == n_exp and _named_like_moe(module, rname, n)
            if listed or _fused_experts(c, n_exp) or (not routers.get(n) and _flat_experts(c, n_exp)):
                experts.append(n)
        if not experts or (len(experts) > 1 and not _has_activation(module)):
            continue
        shared = tuple(
            n
            for n, c in children.items()
            if n != rname
            and n not in experts
            and not is_linear_like(c)
            and (("shared" in n.lower() and any(True for _ in c.parameters())) or _is_ffn(c))
        )
        return rname, tuple(experts), shared
    return None


def moe_block_parts(
    model: nn.Module, layout_parts: Callable[[nn.Module], MoEParts | None] | None = None
) -> dict[str, MoEParts]:
    """Every MoE block of ``model`` (path -> :class:`MoEParts`), outermost first; no probe.

    Args:
        model: any ``nn.Module``.
        layout_parts: optional lookup giving the parts of a block from a registered layout
            (relative paths); used before the structural rules.

    Returns:
        Block path -> parts with model-relative paths. Modules inside a recognised block are not
        examined again.
    """
    found: dict[str, MoEParts] = {}
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") or p == "" for p in found):
            continue
        parts = layout_parts(module) if layout_parts is not None else None
        if parts is None:
            guess = block_parts(module)
            if guess is None:
                continue
            parts = MoEParts(*guess)
        found[path] = MoEParts(
            router=_join(path, parts.router) if parts.router is not None else None,
            experts=tuple(_join(path, e) for e in parts.experts),
            shared=tuple(_join(path, s) for s in parts.shared),
            beside=_beside(model, path),
        )
    return found


def _beside(model: nn.Module, path: str) -> tuple[str, ...]:
    """The siblings of the block at ``path`` whose name says ``shared`` (see :attr:`MoEParts.beside`)."""
    if not path:
        return ()
    parent = path.rpartition(".")[0]
    holder = model.get_submodule(parent)
    return tuple(
        _join(parent, n)
        for n, c in holder.named_children()
        if "shared" in n.lower() and _join(parent, n) != path and any(True for _ in c.parameters())
    )


def try_attr(root: object, path: str) -> object | None:
    """``get_attr`` that returns None instead of raising."""
    try:
        value: object = get_attr(root, path)
    except AttributeError:
        return None
    return value
