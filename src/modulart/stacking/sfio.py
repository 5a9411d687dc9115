"""Raw safetensors reading and writing with bounded memory (no memory maps).

``safe_open`` memory-maps the file, and every page it touches counts in the process's resident
set. Here a tensor is read with explicit ``readinto`` calls at the offsets the header gives, in
chunks of a fixed buffer, and written straight to the output file: the memory used for copying is
one buffer, whatever the tensor or model size.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from modulart.stacking.sfio import SafetensorsFile
    >>> p = tempfile.mkdtemp() + "/a.safetensors"
    >>> save_file({"w": torch.arange(6.0).reshape(2, 3)}, p)
    >>> f = SafetensorsFile(p)
    >>> f.entries["w"].shape, f.read_tensor("w").sum().item()
    ((2, 3), 15.0)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from modulart.core.errors import ConfigError, IncompatibleArtifactError

__all__ = ["CHUNK", "DTYPES", "Entry", "SafetensorsFile", "header_bytes", "parse_size"]

CHUNK = 16 << 20  # bytes per read/write
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor in a safetensors file: dtype name, shape, absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """The header of a safetensors file, validated against the file size, and bounded-memory reads.

    Raises:
        IncompatibleArtifactError: unreadable / truncated file or a header that does not fit
            (the message names the file and the tensor).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise IncompatibleArtifactError(f"{self.path}: truncated safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100 << 20:
                    raise IncompatibleArtifactError(f"{self.path}: header length {n} exceeds the file ({size} bytes)")
                header = json.loads(fh.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IncompatibleArtifactError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        base = 8 + n
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
                b, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise IncompatibleArtifactError(f"{self.path}: malformed header entry {name!r}") from None
            if dtype not in DTYPES:
                raise IncompatibleArtifactError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
            numel = 1
            for s in shape:
                numel *= s
            if end - b != numel * DTYPES[dtype].itemsize or b < 0:
                raise IncompatibleArtifactError(f"{self.path}: tensor {name!r} byte range does not match its shape")
            if base + end > size:
                raise IncompatibleArtifactError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
                )
            self.entries[name] = Entry(dtype, shape, base + b, base + end)

    def copy_to(
        self,
        name: str,
        out: BinaryIO | io.RawIOBase,
        buffer: bytearray,
        *,
        hasher: Any = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream the bytes of tensor ``name`` into ``out`` through ``buffer`` (optionally hashing them)."""
        e = self.entries[name]
        view = memoryview(buffer)
        with self.path.open("rb", buffering=0) as fh:
            fh.seek(e.start)
            left = e.nbytes
            while left:
                n = fh.readinto(view[: min(left, len(buffer))])
                if not n:
                    raise IncompatibleArtifactError(f"{self.path}: unexpected end of file while reading {name!r}")
                out.write(view[:n])
                if hasher is not None:
                    hasher.update(view[:n])
                if progress is not None:
                    progress(n)
                left -= n
            _drop_cache(fh, e.start, e.nbytes)

    def hash_tensor(self, name: str, buffer: bytearray) -> str:
        """blake2b digest of the tensor's bytes (streamed)."""
        h = hashlib.blake2b(digest_size=16)
        self.copy_to(name, _Discard(), buffer, hasher=h)
        return h.hexdigest()

    def read_tensor(self, name: str) -> torch.Tensor:
        """The whole tensor in memory (for small tensors and tests)."""
        e = self.entries[name]
        buf = bytearray(e.nbytes)
        with self.path.open("rb", buffering=0) as fh:
            fh.seek(e.start)
            fh.readinto(memoryview(buf))
        if not buf:
            return torch.empty(e.shape, dtype=DTYPES[e.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[e.dtype]).reshape(e.shape)


def _drop_cache(fh: BinaryIO, start: int, length: int) -> None:
    """Tell the kernel we will not reread these pages soon (keeps the page cache from ballooning)."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        with contextlib.suppress(OSError):
            fadvise(fh.fileno(), start, length, os.POSIX_FADV_DONTNEED)


class _Discard(io.RawIOBase):
    """A writable sink that keeps nothing (hashing a tensor reuses the copy loop)."""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON header (space-padded to 8 bytes) for ``(name, dtype, shape, nbytes)`` in file order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in ``5GB`` / ``500MB`` / ``2GiB`` / an int (Hugging Face's decimal units).

    Example:
        >>> parse_size("2GB"), parse_size("1KiB"), parse_size(10)
        (2000000000, 1024, 10)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if m is None or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"max_shard_size = {size!r}: expected bytes or a size like '2GB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConfigError(f"max_shard_size = {size!r}: must be positive")
    return value
