"""Tensors of a safetensors checkpoint directory: the header index, and canonical matrices read by slices.

:func:`checkpoint_index` reads only the files' headers. :class:`StoredMatrix` reads one canonical
matrix (a :class:`~modulart.introspect.footprint.Footprint` inside one stored tensor) chunk by chunk
with ``safe_open(...).get_slice``: each read opens the file, takes a contiguous block of the stored
tensor and closes the file again, so the pages it touched are unmapped and peak memory stays at one
chunk, whatever the model size.

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

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modulart.core.errors import ArtifactNotFoundError, IncompatibleArtifactError
from modulart.core.io import inside
from modulart.introspect.footprint import Footprint
from modulart.introspect.sources import Block, TensorReader

__all__ = ["Entry", "StoredMatrix", "checkpoint_index", "plain", "read_full"]


@dataclass(frozen=True)
class Entry:
    """One stored tensor: the file it is in, its shape and its dtype (as safetensors names it)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


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
                for k in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    sl = h.get_slice(k)
                    out[k] = Entry(f, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a truncated or garbled file
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

    def read(self, start: int, stop: int, axis: int) -> Block:
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
        with safe_open(str(self.entry.file), framework="pt") as h:
            t: torch.Tensor = h.get_slice(self.key)[tuple(index)]
        order = [owner[j] for j in sorted(owner)]  # canonical axes in stored order
        t = t[tuple(slice(None, None, fp.axes[a][1]) for a in order)]
        if order == [1, 0]:
            t = t.t()
        for a, (d, _) in enumerate(fp.axes):
            if d < 0:
                t = t.unsqueeze(a)
        return Block(self.chunk_axis, start, stop, t)
