"""Where a canonical matrix lies inside a stored tensor, read off the view itself.

The MoE and FFN views hand out canonical matrices (``gate`` / ``up`` ``[I, d_model]``, ``down``
``[d_model, I]``, the router ``[E, d_model]``) as *views* of the model's parameters: a row block of
a fused ``gate_up_proj [E, 2I, d]``, every other column of GPT-OSS's ``[E, d, 2I]`` transposed, a
``Linear`` weight as it is. A view's storage offset and strides say exactly which elements of the
parameter it covers, so the same description tells a checkpoint reader which elements of the stored
tensor to read — no per-layout table. A :class:`Footprint` is that description:

    canonical[i, j] = stored[start + i * step_0 * e(dim_0) + j * step_1 * e(dim_1)]

where ``e(k)`` is the unit index along stored dimension ``k``; stored dimensions that no canonical
axis walks along stay at ``start[k]`` (e.g. the expert index of a fused tensor).

Example:
    >>> import torch
    >>> p = torch.empty(4, 6, 8, device="meta")          # a fused gate_up_proj [E, 2I, d]
    >>> fp = footprint(p[2][3:6], p)                     # the up rows of expert 2
    >>> fp.start, fp.axes, fp.shape
    ((2, 3, 0), ((1, 1), (2, 1)), (3, 8))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modulart.core.errors import ShapeError

__all__ = ["Footprint", "Piece", "footprint", "locate"]


@dataclass(frozen=True)
class Footprint:
    """A 2-D canonical matrix as a strided selection of a stored tensor.

    Attributes:
        start: index (per stored dimension) of ``canonical[0, 0]``.
        axes: per canonical axis, ``(stored dimension, step)``; ``(-1, 1)`` for an axis of size 1.
        shape: the canonical shape.
    """

    start: tuple[int, ...]
    axes: tuple[tuple[int, int], tuple[int, int]]
    shape: tuple[int, int]

    def extent(self, dim: int) -> tuple[int, int]:
        """``[first, last]`` index touched along stored dimension ``dim``."""
        lo = self.start[dim]
        for (d, step), n in zip(self.axes, self.shape, strict=True):
            if d == dim:
                return lo, lo + step * (n - 1)
        return lo, lo


@dataclass(frozen=True)
class Piece:
    """A stored tensor that holds a block of a model parameter (after an on-disk conversion).

    Attributes:
        region: per parameter dimension, ``[lo, hi)`` of the parameter that the stored tensor holds.
        dims: the parameter dimension behind each stored dimension, in stored order; parameter
            dimensions left out are single indices (``lo``) split off on disk (per-expert keys).
    """

    region: tuple[tuple[int, int], ...]
    dims: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.region[p][1] - self.region[p][0] for p in self.dims)

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> Piece:
        """The parameter stored as it is."""
        return cls(tuple((0, n) for n in shape), tuple(range(len(shape))))


def _dense_order(base: torch.Tensor) -> list[int]:
    """The dimensions of ``base`` from outermost to innermost, checking it is a permuted contiguous tensor."""
    strides = [int(s) for s in base.stride()]
    order = sorted(range(base.dim()), key=lambda k: (-strides[k], k))
    expect = 1
    for k in reversed(order):
        if base.shape[k] > 1 and strides[k] != expect:
            raise ShapeError(f"a tensor of shape {list(base.shape)} with strides {base.stride()} is not dense")
        expect *= int(base.shape[k])
    return order


def footprint(view: torch.Tensor, base: torch.Tensor) -> Footprint:
    """The :class:`Footprint` of the 2-D ``view`` inside ``base`` (a parameter it is a view of).

    Raises:
        ValueError: ``view`` is not 2-D, or is not a strided selection of ``base`` (e.g. a copy).

    Example:
        >>> import torch
        >>> gu = torch.empty(4, 8, 12, device="meta")    # GPT-OSS gate_up_proj [E, d, 2I], interleaved
        >>> footprint(gu[1][:, 1::2].t(), gu).axes          # up: columns 1, 3, ... transposed
        ((2, 2), (1, 1))
    """
    if view.dim() != 2:
        raise ShapeError(f"expected a 2-D view, got shape {list(view.shape)}")
    order = _dense_order(base)
    stride = [int(s) for s in base.stride()]
    offset = int(view.storage_offset()) - int(base.storage_offset())
    start = [0] * base.dim()
    rest = offset
    for k in order:
        if base.shape[k] > 1:
            start[k], rest = divmod(rest, stride[k])
    if rest or offset < 0 or any(s >= n for s, n in zip(start, base.shape, strict=True)):
        raise ShapeError(f"offset {offset} lies outside a tensor of shape {list(base.shape)}")
    axes: list[tuple[int, int]] = []
    for n, s in zip((int(v) for v in view.shape), (int(v) for v in view.stride()), strict=True):
        if n == 1:
            axes.append((-1, 1))
            continue
        hit = next(
            (
                (k, s // stride[k])
                for k in order
                if base.shape[k] > 1
                and s > 0
                and s % stride[k] == 0
                and start[k] + (s // stride[k]) * (n - 1) < base.shape[k]
            ),
            None,
        )
        if hit is None or hit[0] in [d for d, _ in axes]:
            raise ShapeError(f"a view of stride {view.stride()} is not a strided selection of {list(base.shape)}")
        axes.append(hit)
    return Footprint(tuple(start), (axes[0], axes[1]), (int(view.shape[0]), int(view.shape[1])))


def locate(fp: Footprint, piece: Piece) -> Footprint | None:
    """Re-express ``fp`` (in parameter coordinates) inside the stored ``piece``; None if it lies elsewhere.

    Example:
        >>> import torch
        >>> p = torch.empty(4, 6, 8, device="meta")
        >>> w3_of_expert_2 = Piece(((2, 3), (3, 6), (0, 8)), (1, 2))    # [I, d] on disk
        >>> locate(footprint(p[2][3:6], p), w3_of_expert_2)
        Footprint(start=(0, 0), axes=((0, 1), (1, 1)), shape=(3, 8))
    """
    walked = {d for d, _ in fp.axes if d >= 0}
    for p, (lo, hi) in enumerate(piece.region):
        first, last = fp.extent(p)
        if first < lo or last >= hi or (p not in piece.dims and (p in walked or first != lo)):
            return None
    start = tuple(fp.start[p] - piece.region[p][0] for p in piece.dims)
    axes = tuple((piece.dims.index(d) if d >= 0 else -1, step) for d, step in fp.axes)
    return Footprint(start, (axes[0], axes[1]), fp.shape)
