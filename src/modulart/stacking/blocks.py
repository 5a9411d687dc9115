"""Finding the block list of a model and re-indexing per-layer attributes after growth.

Example:
    >>> from torch import nn
    >>> from modulart.stacking.blocks import find_block_list
    >>> m = nn.Module(); m.embed = nn.Embedding(4, 2)
    >>> m.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    >>> find_block_list(m)[0]
    'layers'
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from modulart.core.arch import BLOCK_GROWTH, BLOCK_GROWTH_GENERIC, BlockGrowthInfo, get_attr
from modulart.core.errors import UnsupportedModuleError

__all__ = ["block_info", "block_info_by_name", "find_block_list", "place_first_block_copy", "reindex_block"]


def _homogeneous(m: nn.Module) -> bool:
    kids = list(m.children())
    return (
        isinstance(m, nn.ModuleList)
        and len(kids) >= 1
        and len({type(k) for k in kids}) == 1
        and any(True for _ in kids[0].parameters())
    )


def _common_base(kids: list[nn.Module]) -> type | None:
    """The most specific class every entry derives from, other than ``nn.Module`` itself."""
    for cls in type(kids[0]).__mro__:
        if cls in (nn.Module, object):
            return None
        if all(isinstance(k, cls) for k in kids):
            return cls
    return None


def _mixed(m: nn.Module) -> bool:
    """A list of blocks of several classes with a common base (Jamba's attention and Mamba layers)."""
    kids = list(m.children())
    return (
        isinstance(m, nn.ModuleList)
        and len(kids) >= 2
        and _common_base(kids) is not None
        and all(any(True for _ in k.parameters()) for k in kids)
    )


def _candidates(model: nn.Module, accept: Callable[[nn.Module], bool]) -> list[str]:
    out: list[str] = []
    for path, m in model.named_modules():
        if path and accept(m) and not any(path.startswith(c + ".") for c in out):
            out.append(path)
    return out


def find_block_list(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The homogeneous block list of ``model``: ``(path, module_list)``.

    Args:
        model: any ``nn.Module``.
        blocks: the dotted path of the block list; when None it is discovered: the outermost
            ``ModuleList`` whose entries all have the same class (Hugging Face ``model.layers``,
            ``transformer.h``, ``encoder.layer``...), else the one list of blocks of several
            classes with a common base (Jamba's attention and Mamba layers), which ``blocks=``
            may also name.

    Raises:
        UnsupportedModuleError: the path is not a homogeneous ``ModuleList``, no candidate exists, or
            several do (encoder-decoder models): the message lists them so ``blocks=`` can be given.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)] * 2))
        >>> find_block_list(m, "0")[0]
        '0'
    """
    if blocks is not None:
        try:
            found = get_attr(model, blocks)
        except AttributeError as e:
            raise UnsupportedModuleError(f"blocks={blocks!r}: {e}") from None
        if not (_homogeneous(found) or _mixed(found)):
            raise UnsupportedModuleError(
                f"blocks={blocks!r} is a {type(found).__name__}; expected a non-empty nn.ModuleList whose entries "
                "all have the same class (or a common base class) and parameters"
            )
        return blocks, found
    candidates = _candidates(model, _homogeneous) or _candidates(model, _mixed)
    if len(candidates) == 1:
        return candidates[0], get_attr(model, candidates[0])
    if not candidates:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no homogeneous block list (an nn.ModuleList of same-class blocks); "
            "pass blocks='path.to.layers'"
        )
    raise UnsupportedModuleError(
        f"{type(model).__name__} has several block lists {candidates}; pass blocks= to choose one"
    )


def block_info(block: nn.Module) -> BlockGrowthInfo:
    """The :class:`~modulart.core.arch.BlockGrowthInfo` of a block class (table, else the generic one)."""
    return BLOCK_GROWTH.lookup(type(block)) or BLOCK_GROWTH_GENERIC


def block_info_by_name(class_name: str) -> BlockGrowthInfo:
    """:func:`block_info` for a class known only by name (from a meta-device skeleton)."""
    return BLOCK_GROWTH.lookup(type(class_name, (), {})) or BLOCK_GROWTH_GENERIC


def place_first_block_copy(block: nn.Module, position: int) -> list[str]:
    """Make a copy of a stack's first block fit ``position``: drop what the model class builds only
    into block 0 (:attr:`~modulart.core.arch.BlockGrowthInfo.first_block_only`) and clear its flags,
    so the copy is what ``from_pretrained`` would build there. Returns the dropped paths.

    Example:
        >>> from torch import nn
        >>> place_first_block_copy(nn.Linear(2, 2), 3)  # no first-block-only parts: nothing to do
        []
    """
    info = block_info(block)
    if position == 0 or not info.first_block_only:
        return []
    dropped = []
    for path in info.first_block_only:
        parent, _, name = path.rpartition(".")
        holder = get_attr(block, parent)
        if isinstance(holder, nn.Module) and name in holder._modules:
            delattr(holder, name)
            dropped.append(path)
    for flag in info.first_block_flags:
        parent, _, name = flag.rpartition(".")
        holder = get_attr(block, parent)
        if hasattr(holder, name):
            setattr(holder, name, False)
    return dropped


def reindex_block(block: nn.Module, old: int, new: int) -> list[str]:
    """Set every per-layer index attribute (``layer_idx``...) equal to ``old`` inside ``block`` to ``new``.

    Returns the relative paths of the changed attributes. Hugging Face attention modules address
    their KV-cache slot with ``layer_idx``; a copied block that kept its source's index would
    overwrite another layer's cache.

    Example:
        >>> from torch import nn
        >>> b = nn.Sequential(nn.Linear(2, 2)); b[0].layer_idx = 1
        >>> reindex_block(b, 1, 4), b[0].layer_idx
        (['0.layer_idx'], 4)
    """
    names = block_info(block).index_attrs
    changed: list[str] = []
    for path, m in block.named_modules():
        for name in names:
            v = m.__dict__.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v == old:
                setattr(m, name, new)
                changed.append(f"{path}.{name}" if path else name)
    return changed
