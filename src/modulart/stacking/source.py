"""Where checkpoint tensors come from: a sharded / single safetensors checkpoint, or a ``.pth`` file.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from modulart.stacking.source import open_source
    >>> d = tempfile.mkdtemp()
    >>> save_file({"layers.0.w": torch.ones(2), "layers.1.w": torch.zeros(2)}, d + "/model.safetensors")
    >>> src = open_source(d)
    >>> sorted(src.names), src.nbytes("layers.0.w")
    (['layers.0.w', 'layers.1.w'], 8)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from modulart.core.errors import ConfigError, IncompatibleArtifactError
from modulart.core.io import inside, recover
from modulart.stacking.sfio import DTYPE_NAMES, SafetensorsFile

__all__ = ["Source", "block_prefix", "find_prefix", "open_source"]

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack")


class Source:
    """Read access to the tensors of a checkpoint.

    Attributes:
        root: the directory of the checkpoint (the file's directory for a single file).
        files: the weight files read.
        names: tensor name -> ``(dtype name, shape, nbytes)``.
    """

    def __init__(self, root: Path, files: list[Path]) -> None:
        self.root, self.files = root, files
        self.names: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self._sf: dict[str, SafetensorsFile] = {}
        self._mem: dict[str, torch.Tensor] = {}

    def add_safetensors(self, f: SafetensorsFile, only: set[str] | None = None) -> None:
        for name, e in f.entries.items():
            if only is None or name in only:
                self._sf[name] = f
                self.names[name] = (e.dtype, e.shape, e.nbytes)

    def add_tensors(self, tensors: Mapping[str, torch.Tensor], origin: str) -> None:
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise IncompatibleArtifactError(f"{origin}: entry {name!r} is a {type(t).__name__}, not a tensor")
            if t.dtype not in DTYPE_NAMES:
                raise IncompatibleArtifactError(f"{origin}: tensor {name!r} has unsupported dtype {t.dtype}")
            t = t.detach().cpu().contiguous()
            self._mem[name] = t
            self.names[name] = (DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size())

    def nbytes(self, name: str) -> int:
        return self.names[name][2]

    def write(
        self,
        name: str,
        out: BinaryIO,
        buffer: bytearray,
        *,
        hasher: Any = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream the bytes of ``name`` into ``out``."""
        if name in self._sf:
            self._sf[name].copy_to(name, out, buffer, hasher=hasher, progress=progress)
            return
        t = self._mem[name]
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out.write(data)
        if hasher is not None:
            hasher.update(data)
        if progress is not None:
            progress(len(data))

    def hash_of(self, name: str, buffer: bytearray) -> str:
        import hashlib

        if name in self._sf:
            return self._sf[name].hash_tensor(name, buffer)
        t = self._mem[name]
        return hashlib.blake2b(t.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def open_source(path: str | os.PathLike[str]) -> Source:
    """Open a checkpoint: a directory (``model.safetensors.index.json``, or ``*.safetensors`` files),
    a single ``.safetensors`` state dict, or a lit-gpt style ``.pth`` (``{'model': state_dict}`` or a
    plain state dict, loaded with ``weights_only=True``).

    Raises:
        IncompatibleArtifactError: missing files, a truncated shard, an index naming a tensor its
            shard does not hold (all before anything is written).
        UnsafePathError: the index names a file outside the folder (``../x``, an absolute path, a
            symlink that resolves outside), or a ``*.safetensors`` file is such a symlink; raised
            before any shard is read.
    """
    p = Path(path)
    if p.is_file():
        src = Source(p.parent, [p])
        if p.suffix == ".safetensors":
            src.add_safetensors(SafetensorsFile(p))
        elif p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise IncompatibleArtifactError(f"{p}: cannot load with weights_only=True ({e})") from None
            state = obj.get("model", obj) if isinstance(obj, dict) else obj
            if not isinstance(state, dict):
                raise IncompatibleArtifactError(f"{p}: expected a state dict or {{'model': state_dict}}")
            src.add_tensors(state, str(p))
        else:
            raise IncompatibleArtifactError(f"{p}: unsupported checkpoint file type {p.suffix!r}")
        return src
    recover(p)  # a growth into this folder that was killed: put the old checkpoint back, drop temp folders
    if not p.is_dir():
        raise IncompatibleArtifactError(f"{p}: no such checkpoint file or directory")
    index = p / INDEX_NAME
    if index.is_file():
        inside(p, INDEX_NAME)
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise IncompatibleArtifactError(f"{index}: not a valid index ({e})") from None
        if not isinstance(weight_map, dict):
            raise IncompatibleArtifactError(f"{index}: 'weight_map' must be an object, got {type(weight_map).__name__}")
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str):
                raise IncompatibleArtifactError(f"{index}: tensor {name!r} maps to {fname!r}, not a file name")
            by_file.setdefault(fname, set()).add(name)
        for fname in sorted(by_file):  # before any shard is opened
            inside(p, fname, index=index)
        src = Source(p, [p / f for f in sorted(by_file)])
        for fname, names in sorted(by_file.items()):
            if not (p / fname).is_file():
                raise IncompatibleArtifactError(f"{index} names shard {fname!r}, which does not exist in {p}")
            f = SafetensorsFile(p / fname)
            missing = sorted(names - set(f.entries))
            if missing:
                raise IncompatibleArtifactError(f"{p / fname} is missing tensors listed in the index: {missing[:5]}")
            src.add_safetensors(f, names)
        return src
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise IncompatibleArtifactError(f"{p}: no {INDEX_NAME} and no *.safetensors file")
    for fp in files:  # a symlink out of the folder is refused before anything is read
        inside(p, fp.name)
    src = Source(p, files)
    for fp in files:
        sf = SafetensorsFile(fp)
        dup = sorted(set(sf.entries) & set(src.names))
        if dup:
            raise IncompatibleArtifactError(f"{fp}: tensors {dup[:5]} appear in more than one file")
        src.add_safetensors(sf)
    return src


_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def block_prefix(
    names: list[str], blocks: str | None = None, kinds: Sequence[Hashable] | None = None
) -> tuple[str, dict[int, set[str]]]:
    """The block-list prefix of a checkpoint's tensor names and, per layer, its tensor suffixes.

    Args:
        names: the checkpoint's tensor names.
        blocks: the block-list prefix (None: discovered).
        kinds: one value per layer, from the model config: layers of equal kind must hold the same
            tensors, layers of different kinds may differ (dense and MoE layers of DeepSeek-V3).
            None: every layer must hold the same tensors.

    Raises:
        ConfigError: no block list, several candidates (``blocks=`` chooses), or a layer missing a
            tensor that a layer of the same kind has (the message names both).

    Example:
        >>> names = ["l.0.mlp.w", "l.1.moe.router", "l.2.moe.router"]
        >>> block_prefix(names, kinds=["dense", "sparse", "sparse"])[0]
        'l'
    """
    prefix, layers = find_prefix(names, blocks)
    _check_layers(prefix, layers, max(layers) + 1, kinds)
    return prefix, layers


def find_prefix(names: list[str], blocks: str | None = None) -> tuple[str, dict[int, set[str]]]:
    """:func:`block_prefix` without the check that the layers hold matching tensors."""
    by_prefix: dict[str, dict[int, set[str]]] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            by_prefix.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
    if blocks is not None:
        if blocks not in by_prefix:
            raise ConfigError(f"blocks={blocks!r}: no tensor is named '{blocks}.<i>.…'; candidates {sorted(by_prefix)}")
        prefix = blocks
    else:
        cands = [k for k, v in by_prefix.items() if len(v) >= 1 and sorted(v) == list(range(len(v)))]
        if not cands:
            raise ConfigError("found no block list (tensors named '<prefix>.<i>.<name>' for i = 0..L-1)")
        top = max(sum(len(s) for s in by_prefix[c].values()) for c in cands)
        best = [c for c in cands if sum(len(s) for s in by_prefix[c].values()) == top]
        if len(best) > 1:
            raise ConfigError(f"several block lists {sorted(best)}; pass blocks= to choose one")
        prefix = best[0]
    return prefix, by_prefix[prefix]


def _check_layers(prefix: str, layers: dict[int, set[str]], depth: int, kinds: Sequence[Hashable] | None) -> None:
    """Layers of the same kind (all layers, without kinds) must hold the same tensors."""
    if kinds is not None and len(kinds) != depth:
        raise ConfigError(
            f"the checkpoint's {prefix!r} has {depth} layers but its config.json describes {len(kinds)} (extra layers "
            "such as multi-token-prediction modules stored after the blocks are not supported)"
        )
    groups: dict[Hashable, list[int]] = {}
    for i in range(depth):
        groups.setdefault(kinds[i] if kinds is not None else None, []).append(i)
    for members in groups.values():
        union: set[str] = set().union(*(layers.get(i, set()) for i in members))
        for i in members:
            missing = sorted(union - layers.get(i, set()))
            if not missing:
                continue
            other = next(j for j in members if missing[0] in layers.get(j, set()))
            if kinds is None:
                raise ConfigError(
                    f"tensor {prefix}.{i}.{missing[0]} is missing (layer {other} has it): the layers hold different "
                    "tensors, and without a config.json next to the weights modulart cannot tell a mixed layout "
                    "(dense and MoE layers) from a missing tensor"
                )
            raise ConfigError(
                f"tensor {prefix}.{i}.{missing[0]} is missing: layer {other}, which the config gives the same "
                f"structure as layer {i}, has it (the checkpoint is incomplete or does not match its config.json)"
            )
