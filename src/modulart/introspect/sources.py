"""Where expert weights come from: a live model, or a checkpoint read one slice at a time.

Every analysis reads a layer through a :class:`LayerReader`, which names the layer's *members*
(routed experts ``e0..``, shared experts ``s0..``, the dense reference ``F``) and hands out their
matrices in one canonical orientation, in fp32, chunk by chunk:

- ``act`` ``[I, d_model]``: the gate rows (``W_act = gate_proj / w1``; the first layer of a plain FFN);
- ``up``  ``[I, d_model]``: the up rows (gated FFNs only);
- ``down`` ``[d_model, I]``: the second layer (column ``i`` is neuron ``i``'s value vector).

A chunk is a block of consecutive rows (``axis == 0``) or columns (``axis == 1``) of the canonical
matrix, whichever is contiguous in storage; chunk ``c`` of ``n`` covers the same fraction of the
axis for every member, so members of one shape get aligned blocks.

Example:
    >>> import torch
    >>> reader = LayerReader(0, "demo", [Member("e0", "expert"), Member("e1", "expert")],
    ...     {(m, "act"): memory_reader(torch.randn(6, 4), f"e{m}.act") for m in range(2)}, router=None)
    >>> reader.members, reader.shape(1, "act"), reader.tensor(0, "act").chunk(1, 3).tensor.shape
    (['e0', 'e1'], (6, 4), torch.Size([2, 4]))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch

from modulart.core.errors import ConfigError, OutOfRangeError, ShapeError

__all__ = [
    "MATRICES",
    "NEURON_AXIS",
    "Block",
    "LayerPlan",
    "LayerReader",
    "Member",
    "TensorReader",
    "WeightSource",
    "check_matrix",
    "chunk_count",
    "common_axis",
    "memory_reader",
]

MatrixName: TypeAlias = Literal["act", "up", "down"]
MATRICES: tuple[MatrixName, ...] = ("act", "up", "down")
NEURON_AXIS: dict[str, int] = {"act": 0, "up": 0, "down": 1}


def check_matrix(matrix: str) -> MatrixName:
    """Validate a matrix name (``act``, ``up`` or ``down``).

    Example:
        >>> check_matrix("act")
        'act'
    """
    if matrix not in MATRICES:
        raise ConfigError(f"matrix must be one of {list(MATRICES)} (act = gate_proj / w1), got {matrix!r}")
    return matrix


@dataclass(frozen=True)
class Member:
    """One matrix-holder of a layer.

    Attributes:
        name: ``e{i}`` (routed expert), ``s{i}`` (shared expert) or ``F`` (dense reference).
        kind: ``expert``, ``shared`` or ``dense``.
    """

    name: str
    kind: Literal["expert", "shared", "dense"]


@dataclass(frozen=True)
class Block:
    """A chunk of a canonical matrix: ``tensor`` covers ``[start, stop)`` along ``axis``, in the stored
    dtype (bf16 checkpoints stay bf16 until the accumulator converts them, saving a full-size copy)."""

    axis: int
    start: int
    stop: int
    tensor: torch.Tensor


class TensorReader(ABC):
    """Reads one canonical 2-D matrix, whole or in chunks.

    Attributes:
        shape: canonical shape.
        chunk_axis: the axis along which chunks are cheap (contiguous in storage).
        axes: the axes it can chunk along (in-memory matrices: both).
    """

    shape: tuple[int, int]
    chunk_axis: int = 0
    axes: tuple[int, ...] = (0,)

    @abstractmethod
    def read(self, start: int, stop: int, axis: int) -> Block:
        """Rows (``axis=0``) or columns (``axis=1``) ``[start, stop)``, in the stored dtype."""

    def chunk(self, c: int, n: int, axis: int | None = None) -> Block:
        """Chunk ``c`` of ``n`` along ``axis`` (default :attr:`chunk_axis`; ``n == 1``: the whole matrix)."""
        axis = self.chunk_axis if axis is None or n == 1 else axis
        if axis not in self.axes:
            raise ConfigError(f"this matrix is chunked along axis {self.chunk_axis}, not {axis}")
        size = self.shape[axis]
        return self.read(size * c // n, size * (c + 1) // n, axis)

    def full(self) -> torch.Tensor:
        """The whole canonical matrix, fp32."""
        return self.read(0, self.shape[self.chunk_axis], self.chunk_axis).tensor.float()

    def hint(self, c: int, n: int, axis: int | None = None) -> None:
        """Announce that chunk ``c`` of ``n`` will be read soon (stored matrices ask the operating
        system to start reading it; a no-op here)."""
        del c, n, axis

    def describe(self) -> str:
        """What this matrix is, for error messages (a stored one names its file and key)."""
        return f"a {self.shape[0]}x{self.shape[1]} matrix"


class _MemoryTensor(TensorReader):
    axes = (0, 1)

    def __init__(self, t: torch.Tensor, what: str = "") -> None:
        self.t = t
        self.what = what
        self.shape = (int(t.shape[0]), int(t.shape[1]))

    def describe(self) -> str:
        return self.what or super().describe()

    def read(self, start: int, stop: int, axis: int) -> Block:
        part = self.t[start:stop] if axis == 0 else self.t[:, start:stop]
        return Block(axis, start, stop, part.detach())


class LayerReader:
    """The members of one MoE layer and their matrices.

    Attributes:
        index: the layer's position in the model's block list.
        label: where it lives (module path or key prefix).
        members: member names (routed experts first, then shared, then ``F``).
        kinds: the :class:`Member` kind of each.
        num_experts: routed experts.
    """

    def __init__(
        self,
        index: int,
        label: str,
        members: list[Member],
        tensors: dict[tuple[int, str], TensorReader],
        router: torch.Tensor | None,
    ) -> None:
        self.index, self.label = index, label
        self._members = members
        self._tensors = tensors
        self._router = router

    @property
    def members(self) -> list[str]:
        return [m.name for m in self._members]

    @property
    def kinds(self) -> list[str]:
        return [m.kind for m in self._members]

    @property
    def num_experts(self) -> int:
        return sum(1 for m in self._members if m.kind == "expert")

    def has(self, m: int, matrix: str) -> bool:
        """Whether member ``m`` has matrix ``matrix`` (plain FFNs have no ``up``)."""
        return (m, check_matrix(matrix)) in self._tensors

    def tensor(self, m: int, matrix: str) -> TensorReader:
        """The reader of member ``m``'s matrix (raises naming what is missing)."""
        key = (m, check_matrix(matrix))
        if key not in self._tensors:
            raise ShapeError(f"layer {self.index} ({self.label}): member {self.members[m]!r} has no {matrix!r} matrix")
        return self._tensors[key]

    def shape(self, m: int, matrix: str) -> tuple[int, int]:
        """Canonical shape: ``[I, d]`` for act/up, ``[d, I]`` for down."""
        return self.tensor(m, matrix).shape

    def router(self) -> torch.Tensor | None:
        """``[E, d_model]`` router weight (fp32), or None."""
        return None if self._router is None else self._router.detach().float()


@dataclass
class LayerPlan:
    """Everything needed to read one MoE layer of a checkpoint (validated before any data is read).

    Attributes:
        layer: block index; label: where it lives; members / tensors: as for :class:`LayerReader`;
        router: the ``[E, d_model]`` router weight.
    """

    layer: int
    label: str
    members: list[Member]
    tensors: dict[tuple[int, str], TensorReader]
    router: TensorReader


class WeightSource(ABC):
    """A model's MoE layers, read one at a time."""

    #: description of the source (a path or a model class)
    name: str = ""

    @property
    @abstractmethod
    def layer_indices(self) -> list[int]:
        """Block index of every MoE layer, in depth order."""

    @abstractmethod
    def layer(self, position: int) -> LayerReader:
        """The reader of the ``position``-th MoE layer (an index into :attr:`layer_indices`)."""

    def _check_position(self, position: int) -> int:
        n = len(self.layer_indices)
        if not isinstance(position, int) or not -n <= position < n:
            raise OutOfRangeError(
                f"{self.name}: layer position {position!r} out of range; there are {n} MoE layers "
                f"(block indices {self.layer_indices})"
            )
        return position % n


def memory_reader(t: torch.Tensor, what: str, expected: tuple[int, int] | None = None) -> TensorReader:
    """Wrap an in-memory canonical matrix (a view is kept, nothing is copied until a chunk is read).

    Example:
        >>> memory_reader(torch.ones(4, 3), "e0.act").chunk(1, 2).tensor.shape
        torch.Size([2, 3])
    """
    if t.dim() != 2:
        raise ShapeError(f"{what}: expected a 2-D matrix, got shape {tuple(t.shape)}")
    if expected is not None and tuple(t.shape) != expected:
        raise ShapeError(f"{what}: expected shape {expected}, got {tuple(t.shape)}")
    return _MemoryTensor(t, what)


def chunk_count(shapes: list[tuple[int, int]], axis_sizes: list[int], budget_bytes: int) -> int:
    """How many chunks keep one chunk of all members (fp32) under ``budget_bytes``.

    Example:
        >>> chunk_count([(100, 10)] * 4, [100] * 4, 800)
        20
    """
    total = 4 * sum(r * c for r, c in shapes)
    n = max(1, math.ceil(total / max(budget_bytes, 1)))
    return min(n, max(1, min(axis_sizes)))


def common_axis(readers: list[TensorReader]) -> int | None:
    """An axis every reader can chunk along, preferring the streamed ones' native axis; None if none.

    Example:
        >>> common_axis([memory_reader(torch.ones(2, 2), "a")])
        0
    """
    axes = {0, 1}
    for r in readers:
        axes &= set(r.axes)
    if not axes:
        return None
    native = [r.chunk_axis for r in readers if len(r.axes) == 1]
    return native[0] if native and native[0] in axes else min(axes)
