"""Tensors of a safetensors checkpoint directory: the header index, and canonical matrices read by slices.

:func:`checkpoint_index` reads only the files' headers. :class:`StoredMatrix` reads one canonical
matrix (a :class:`~modulart.introspect.footprint.Footprint` inside one stored tensor) chunk by chunk
with one large positional read (``os.preadv``) into a fresh tensor when the block is contiguous in
the file (the usual case: chunks run along the outermost stored axis), else with
``safe_open(...).get_slice``; each read opens the file and closes it again, so no pages stay
mapped and peak memory stays at one chunk, whatever the model size. :meth:`StoredMatrix.hint`
asks the kernel to start reading a chunk's bytes (``posix_fadvise(WILLNEED)``) while the previous
chunk is reduced. :meth:`StoredMatrix.chunk_transient` reads into a per-thread scratch buffer that is
reused from read to read (the streaming pass converts each block to fp32 at once), so a pass over the
checkpoint does not fault in fresh pages for every block.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from modulart.introspect.footprint import footprint
    >>> d = tempfile.mkdtemp()
    >>> gu = torch.arange(2 * 6 * 4.0).reshape(2, 6, 4)              # fused gate_up_proj [E, 2I, d]
    >>> save_file({"experts.gate_up_proj": gu}, f"{d}/model.safetensors")
    >>> entry = checkpoint_index(d)["experts.gate_up_proj"]
    >>> up1 = StoredMatrix(entry, "experts.gate_up_proj", footprint(gu[1][3:], gu))
    >>> torch.equal(up1.full(), gu[1][3:]), up1.chunk(1, 3).tensor.shape
    (True, torch.Size([1, 4]))
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import threading
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modulart.core.errors import ArtifactNotFoundError, IncompatibleArtifactError, ModulartError
from modulart.core.io import inside
from modulart.introspect.footprint import Footprint
from modulart.introspect.sources import Block, TensorReader

__all__ = ["Entry", "StoredMatrix", "checkpoint_index", "plain", "read_full"]


@dataclass(frozen=True)
class Entry:
    """One stored tensor: the file it is in, its shape, its dtype (as safetensors names it) and the
    byte offset of its data in the file (-1: unknown, read through ``safe_open`` only)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int = -1


_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


def _data_offsets(file: Path) -> dict[str, int]:
    """Absolute byte offset of each tensor's data in a safetensors file (from its JSON header)."""
    with file.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    base = 8 + n
    return {k: base + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def checkpoint_index(directory: str | PathLike[str]) -> dict[str, Entry]:
    """Every tensor of a safetensors checkpoint directory: name -> :class:`Entry`, headers only.

    Raises:
        ArtifactNotFoundError: not a directory, or no ``*.safetensors`` in it (a ``FileNotFoundError``).
        IncompatibleArtifactError: the shard index is not JSON or names a file that is missing, or a
            file is not a readable safetensors file.
        UnsafePathError: the index names a file outside the folder (``../x``, an absolute path, a
            symlink resolving outside), or a ``*.safetensors`` is such a symlink; before any read.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": torch.zeros(3, 2, dtype=torch.bfloat16)}, f"{d}/model.safetensors")
        >>> e = checkpoint_index(d)["w"]
        >>> e.shape, e.dtype
        ((3, 2), 'BF16')
    """
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactNotFoundError(f"{root}: not a checkpoint directory")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        inside(root, index.name)
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise IncompatibleArtifactError(f"{index}: not a shard index with a 'weight_map' ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise IncompatibleArtifactError(f"{index}: 'weight_map' must map tensor names to file names")
        files = sorted({inside(root, f, index=index) for f in weight_map.values()})  # before reading any
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise IncompatibleArtifactError(f"{index} names shard(s) that do not exist: {missing[:4]}")
    else:
        files = sorted(inside(root, f.name) for f in root.glob("*.safetensors"))  # no symlink out of root
    if not files:
        raise ArtifactNotFoundError(f"{root}: no *.safetensors files")
    out: dict[str, Entry] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                offsets = _data_offsets(f)
                for k in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    sl = h.get_slice(k)
                    out[k] = Entry(f, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()), offsets.get(k, -1))
        except (OSError, ValueError, RuntimeError, SafetensorError, struct.error) as e:  # truncated or garbled
            raise IncompatibleArtifactError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def read_full(entry: Entry, key: str) -> torch.Tensor:
    """A whole stored tensor, fp32."""
    with safe_open(str(entry.file), framework="pt") as h:
        t: torch.Tensor = h.get_tensor(key)
    return t.float()


def plain(shape: tuple[int, int]) -> Footprint:
    """The footprint of a 2-D stored tensor that is the canonical matrix as it is.

    Example:
        >>> plain((3, 4)).axes
        ((0, 1), (1, 1))
    """
    return Footprint((0, 0), ((0, 1), (1, 1)), shape)


_SCRATCH = threading.local()


def _scratch(nbytes: int) -> torch.Tensor:
    """``[nbytes]`` uint8: the start of this thread's scratch buffer (grown when too small, else reused:
    its pages are already mapped). It lives as long as the thread."""
    buf: torch.Tensor | None = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < nbytes:
        _SCRATCH.buf = None  # the old one freed before the larger one is mapped
        _SCRATCH.buf = buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


class StoredMatrix(TensorReader):
    """A canonical matrix inside one stored tensor (a :class:`Footprint` of it), read by slices.

    Chunks run along the canonical axis that is outermost in storage, so every read is one
    contiguous block of the file; steps (interleaved storage) are taken after the read.
    """

    def __init__(self, entry: Entry, key: str, fp: Footprint) -> None:
        if len(fp.start) != len(entry.shape):
            raise IncompatibleArtifactError(
                f"{key!r} has shape {list(entry.shape)}, expected a {len(fp.start)}-D tensor"
            )
        self.entry, self.key, self.fp = entry, key, fp
        self.shape = fp.shape
        walked = [(d, a) for a, (d, _) in enumerate(fp.axes) if d >= 0]
        self.chunk_axis = min(walked)[1] if walked else 0
        self.axes = (self.chunk_axis,)

    def _index(self, start: int, stop: int, axis: int) -> list[int | slice]:
        """The stored tensor's index of rows/columns ``[start, stop)`` along canonical ``axis``."""
        fp = self.fp
        owner = {d: a for a, (d, _) in enumerate(fp.axes) if d >= 0}
        index: list[int | slice] = []
        for j, s in enumerate(fp.start):
            a = owner.get(j)
            if a is None:
                index.append(s)
                continue
            step = fp.axes[a][1]
            lo, hi = (start, stop) if a == axis else (0, fp.shape[a])
            index.append(slice(s + lo * step, s + (hi - 1) * step + 1))
        return index

    def _span(self, index: list[int | slice]) -> tuple[int, int, bool]:
        """``(byte offset, byte length, contiguous)`` of ``index`` in the file; the length is of the
        bounding range when the block is not contiguous. ``(-1, 0, False)`` when unknown."""
        dtype = _DTYPES.get(self.entry.dtype)
        if self.entry.offset < 0 or dtype is None:
            return -1, 0, False
        item = torch.empty((), dtype=dtype).element_size()
        dims = self.entry.shape
        bounds = [
            (i, i + 1, 1) if isinstance(i, int) else (i.start, i.stop, 1 if i.step is None else i.step) for i in index
        ]
        strides = [1] * len(dims)
        for j in range(len(dims) - 2, -1, -1):
            strides[j] = strides[j + 1] * dims[j + 1]
        first = sum(lo * st for (lo, _, _), st in zip(bounds, strides, strict=True))
        last = sum((hi - 1) * st for (_, hi, _), st in zip(bounds, strides, strict=True))
        count = 1
        for lo, hi, _ in bounds:
            count *= hi - lo
        contiguous = all(step == 1 for _, _, step in bounds) and last - first + 1 == count
        return self.entry.offset + first * item, (last - first + 1) * item, contiguous

    def chunk_transient(self, c: int, n: int, axis: int | None = None) -> Block:
        """:meth:`chunk`, but the block's tensor may be a view of this thread's scratch buffer: valid only
        until the next transient read in the same thread (copy it before that). Same values as :meth:`chunk`."""
        _SCRATCH.on = True
        try:
            return self.chunk(c, n, axis)
        finally:
            _SCRATCH.on = False

    def read(self, start: int, stop: int, axis: int) -> Block:
        fp = self.fp
        owner = {d: a for a, (d, _) in enumerate(fp.axes) if d >= 0}
        index = self._index(start, stop, axis)
        try:
            t = self._pread(index, transient=getattr(_SCRATCH, "on", False))
            if t is None:
                with safe_open(str(self.entry.file), framework="pt") as h:
                    t = h.get_slice(self.key)[tuple(index)]
        except ModulartError:
            raise
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise IncompatibleArtifactError(
                f"{self.entry.file}: reading tensor {self.key!r} (rows/columns {start}:{stop} along axis {axis}) "
                f"failed: {e}"
            ) from e
        order = [owner[j] for j in sorted(owner)]  # canonical axes in stored order
        t = t[tuple(slice(None, None, fp.axes[a][1]) for a in order)]
        if order == [1, 0]:
            t = t.t()
        for a, (d, _) in enumerate(fp.axes):
            if d < 0:
                t = t.unsqueeze(a)
        return Block(self.chunk_axis, start, stop, t)

    def _pread(self, index: list[int | slice], *, transient: bool = False) -> torch.Tensor | None:
        """The block as ``get_slice(key)[index]`` would return it, by one positional read into a fresh
        tensor (``transient``: into this thread's reused scratch buffer); None when the block is not one
        contiguous byte range (or the layout is unknown)."""
        offset, nbytes, contiguous = self._span(index)
        if not contiguous or sys.byteorder != "little":
            return None
        shape = [len(range(i.start, i.stop, i.step or 1)) for i in index if isinstance(i, slice)]
        out = _scratch(nbytes) if transient else torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            buf = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
            fd = os.open(self.entry.file, os.O_RDONLY)
            try:
                done = 0
                while done < nbytes:
                    got = os.preadv(fd, [buf[done:]], offset + done)
                    if got == 0:
                        raise IncompatibleArtifactError(
                            f"{self.entry.file}: tensor {self.key!r} ends after byte {offset + done} (truncated file)"
                        )
                    done += got
            finally:
                os.close(fd)
        return out.view(_DTYPES[self.entry.dtype]).view(shape)

    def hint(self, c: int, n: int, axis: int | None = None) -> None:
        axis = self.chunk_axis if axis is None or n == 1 else axis
        size = self.shape[axis]
        offset, nbytes, _ = self._span(self._index(size * c // n, size * (c + 1) // n, axis))
        if offset < 0 or not nbytes or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.entry.file, os.O_RDONLY)
        except OSError:
            return  # the read reports it
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def describe(self) -> str:
        return f"tensor {self.key!r} in {self.entry.file}"
