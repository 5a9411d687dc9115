"""Which FFN a patcher (or the fine-tuning baseline) works on.

Example:
    >>> import torch
    >>> from modulart.patcher.layer import resolve_ffn
    >>> model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    ...                               for _ in range(3)])
    >>> resolve_ffn(model, "last").path, resolve_ffn(model, 0).path, resolve_ffn(model, "1").path
    ('2', '0', '1')
    >>> resolve_ffn(model, 5)
    Traceback (most recent call last):
    ...
    modulart.core.errors.SelectorError: layer = 5: the model has 3 FFNs (['0', '1', '2'])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from modulart.core.errors import SelectorError
from modulart.core.ffn import FFN, find_ffns

__all__ = ["resolve_ffn"]


def resolve_ffn(model: nn.Module, layer: Any, *, field: str = "layer") -> FFN:
    """The FFN named by ``layer``: ``'last'``, an index into ``find_ffns(model)`` or an FFN path.

    Raises :class:`SelectorError` naming ``field`` and listing the FFN paths when nothing matches.
    """
    ffns = find_ffns(model)
    paths = [f.path for f in ffns]
    if layer == "last":
        return ffns[-1]
    if isinstance(layer, int) and not isinstance(layer, bool):
        if not -len(ffns) <= layer < len(ffns):
            raise SelectorError(f"{field} = {layer}: the model has {len(ffns)} FFNs ({paths})")
        return ffns[layer]
    for f in ffns:
        if f.path == layer:
            return f
    raise SelectorError(f"{field} = {layer!r}: no FFN at that path; FFNs: {paths}")
