"""Streaming depth growth of a checkpoint on disk, tensor by tensor, with bounded memory.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file, load_file
    >>> import modulart.stacking as st
    >>> d = tempfile.mkdtemp()
    >>> save_file({"emb": torch.ones(2), "layers.0.w": torch.zeros(2), "layers.1.w": torch.ones(2)},
    ...           d + "/model.safetensors")
    >>> out = st.grow_checkpoint(d, tempfile.mkdtemp() + "/grown", st.LayerPlan.stack(2, 2), progress=False)
    >>> sorted(load_file(str(out / "model.safetensors")))
    ['emb', 'layers.0.w', 'layers.1.w', 'layers.2.w', 'layers.3.w']
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modulart._version import __version__
from modulart.core.errors import ConfigError, IncompatibleArtifactError
from modulart.core.io import atomic_directory, inside
from modulart.stacking.blocks import block_info_by_name
from modulart.stacking.hfconfig import depth_key, rewrite_config_dict
from modulart.stacking.layout import layer_kinds
from modulart.stacking.operators import get_growth_operator
from modulart.stacking.plan import LayerPlan
from modulart.stacking.sfio import CHUNK, header_bytes, parse_size
from modulart.stacking.skeleton import kinds, layer_signatures, materialize
from modulart.stacking.source import INDEX_NAME, WEIGHT_SUFFIXES, Source, block_prefix, find_prefix, open_source

__all__ = [
    "MANIFEST_NAME",
    "RESIDUAL_OUTPUT_NAMES",
    "OutputTensor",
    "config_kinds",
    "grow_checkpoint",
    "plan_outputs",
    "source_config",
    "source_layers",
]

MANIFEST_NAME = "modulart_growth.json"
# files copied next to a single-file source (a directory source has every non-weight file copied)
COMPANION_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab*",
    "merges.txt",
    "added_tokens.json",
    "*.model",
    "chat_template*",
)
# module names (suffix match) whose weights write into the residual stream: zeroed by G_zero
RESIDUAL_OUTPUT_NAMES: tuple[str, ...] = (
    "o_proj",
    "down_proj",
    "attn.c_proj",
    "mlp.c_proj",
    "dense_4h_to_h",
    "attention.dense",
    "fc2",
    "out_proj",
    "output.dense",
    "SelfAttention.o",
    "EncDecAttention.o",
    "wo",
    "w2",
    "attn.proj",
)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the grown checkpoint: its name, where its bytes come from, and whether they are zeros."""

    name: str
    source: str
    zero: bool = False


def _is_residual_output(suffix: str) -> bool:
    parts = suffix.split(".")
    module = ".".join(parts[:-1]) if parts[-1] in ("weight", "bias") else suffix
    return any(module == n or module.endswith("." + n) for n in RESIDUAL_OUTPUT_NAMES)


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_outputs(
    names: list[str],
    plan: LayerPlan,
    operator: str = "direct",
    blocks: str | None = None,
    kinds: Sequence[Hashable] | None = None,
    first_only: Sequence[str] = (),
) -> list[OutputTensor]:
    """The grown checkpoint's tensors in file order (validates the plan against the checkpoint).

    Grown layer ``i`` holds the tensors of source layer ``plan[i]``, so layers that differ (dense and
    MoE) keep their own tensors; ``kinds`` (see :func:`~modulart.stacking.source.block_prefix`)
    says which layers may differ. Copies of layer 0 placed later leave out the tensors under
    ``first_only`` (module paths the model class builds into its first block only).

    Example:
        >>> [o.name + "<-" + o.source for o in plan_outputs(["l.0.w", "l.1.w"], LayerPlan.from_list([1, 1], 2))]
        ['l.0.w<-l.1.w', 'l.1.w<-l.1.w']
    """
    op = get_growth_operator(operator)
    if operator not in ("direct", "zero"):
        raise ConfigError(
            f"operator = {operator!r}: checkpoint growth supports 'direct' and 'zero' ({op.description} needs the "
            "model in memory: use grow())"
        )
    prefix, layers = block_prefix(names, blocks, kinds)
    plan.check_source(len(layers), f"checkpoint (block list {prefix!r})")
    from modulart.stacking.depth import new_positions

    new = set(new_positions(plan, operator))
    out: list[OutputTensor] = []
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    for n in names:
        if not pat.match(n):
            out.append(OutputTensor(n, n))
    for i, s in enumerate(plan):
        for suffix in sorted(layers[s]):
            if s == 0 and i != 0 and any(suffix.startswith(f + ".") for f in first_only):
                continue
            zero = i in new and _is_residual_output(suffix)
            out.append(OutputTensor(f"{prefix}.{i}.{suffix}", f"{prefix}.{s}.{suffix}", zero))
    if operator == "zero" and not any(o.zero for o in out):
        raise ConfigError(
            f"operator 'zero': no tensor of {prefix!r} looks like a residual output {RESIDUAL_OUTPUT_NAMES}"
        )
    return sorted(out, key=lambda o: _natural(o.name))


def _first_block_only(kinds: Sequence[Hashable] | None) -> tuple[str, ...]:
    """The first-block-only parts of the block class the per-layer kinds were built from (or none)."""
    if not kinds:
        return ()
    first = kinds[0]
    classes = first[0] if isinstance(first, tuple) and first and isinstance(first[0], tuple) else ()
    name = dict(c for c in classes if isinstance(c, tuple) and len(c) == 2).get("")
    return block_info_by_name(str(name).rsplit(".", 1)[-1]).first_block_only if name else ()


def source_config(source: Source) -> dict[str, Any] | None:
    """The ``config.json`` next to the checkpoint, or None.

    Raises:
        IncompatibleArtifactError: the file is not a JSON object.
    """
    path = source.root / "config.json"
    if not path.is_file():
        return None
    inside(source.root, path.name)  # a symlink out of the folder is not read
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleArtifactError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise IncompatibleArtifactError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def config_kinds(config: dict[str, Any], blocks: str) -> list[Hashable]:
    """Per-layer kinds of the source config: the blocks transformers builds from it when it can,
    else the layout its per-layer keys describe (equal kinds = layers that hold the same tensors).

    Example:
        >>> config_kinds({"num_hidden_layers": 3, "first_k_dense_replace": 1}, "layers")
        [('dense',), ('sparse',), ('sparse',)]
    """
    cfg = materialize(config)
    try:
        sigs = layer_signatures(cfg, blocks)
    except ConfigError:
        sigs = None
    if sigs is not None:
        return kinds(sigs)
    return layer_kinds(cfg, int(cfg[depth_key(cfg, blocks)]))


def source_layers(
    source: Source, blocks: str | None = None, config: dict[str, Any] | None = None
) -> tuple[str, dict[int, set[str]], list[Hashable] | None]:
    """The block-list prefix, the tensor suffixes of every layer and, when the layers hold different
    tensors, their kinds from ``config`` (None when they are all alike or there is no config).

    Raises:
        ConfigError: no block list, or a layer lacks a tensor that a layer of the same kind has.
    """
    prefix, found = find_prefix(list(source.names), blocks)
    alike = len({frozenset(v) for v in found.values()}) == 1
    kinds_ = None if config is None or alike else config_kinds(config, prefix)
    _, layers = block_prefix(list(source.names), prefix, kinds_)
    return prefix, layers, kinds_


def _shards(outputs: list[OutputTensor], src: Source, max_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for o in outputs:
        n = src.nbytes(o.source)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += n
    return shards


def grow_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    plan: LayerPlan | int,
    *,
    operator: str = "direct",
    max_shard_size: int | str = "5GB",
    blocks: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
    check: bool | None = None,
) -> Path:
    """Grow a checkpoint on disk: block ``i`` of the output is block ``plan[i]`` of the source.

    Tensors are streamed one at a time through a fixed 16 MiB buffer with explicit reads (no
    memory map), so peak memory stays far below one output shard whatever the model size. The
    output is written to a temporary sibling directory renamed into place at the end: interrupted,
    it leaves no output directory.

    Args:
        src: a directory with ``model.safetensors.index.json`` or ``*.safetensors``, a single
            ``.safetensors`` state dict, or a lit-gpt style ``.pth`` (``{'model': ...}``).
        dst: the output directory (must not exist unless ``overwrite``).
        plan: a :class:`LayerPlan`, or an int factor (G_stack of all layers).
        operator: ``"direct"`` (G_stack) or ``"zero"`` (new blocks' residual outputs zeroed).
        max_shard_size: cap of an output shard (``"2GB"``, bytes); a larger single tensor gets its own shard.
        blocks: tensor-name prefix of the block list (None: discovered, e.g. ``model.layers``).
        seed: recorded in the manifest (the supported operators are deterministic).
        overwrite: replace an existing ``dst`` (atomically): an empty folder or a checkpoint grown by
            modulart (files modulart did not write there are kept). A folder of other files is
            refused even so (:class:`~modulart.core.errors.UnsafePathError`): shards, an index or a
            ``config.json`` left beside the grown ones would change what loads.
        progress: show a progress bar (default: when stderr is a terminal).
        check: build the source and grown models from their configs with transformers (meta
            device, no weights) and compare them block by block, so a config key modulart does not
            know cannot silently change a layer. None: when the layers hold different tensors or
            the config states more than plain per-layer lists (this imports transformers, a fixed
            ~150 MiB; plain configs skip it).

    Returns:
        ``Path(dst)``, holding the shards (and ``model.safetensors.index.json`` when there are
        several), ``config.json`` rewritten for the new depth, the tokenizer / generation files,
        and ``modulart_growth.json`` (source hash, plan, operator, seed, library version).

    Raises:
        ConfigError / IncompatibleArtifactError: a bad plan, a missing tensor, a truncated shard, an
            existing ``dst``, a per-layer config key that cannot express the grown layout
            (``first_k_dense_replace`` with a dense layer after a MoE one; the message names the key),
            a grown layer that would reload as a different block: all before anything is written.
    """
    source = open_source(src)
    names = list(source.names)
    config = source_config(source)
    prefix, layers, kinds = source_layers(source, blocks, config)
    if not isinstance(plan, LayerPlan):
        plan = LayerPlan.stack(len(layers), plan)
    outputs = plan_outputs(names, plan, operator, prefix, kinds, _first_block_only(kinds))
    max_bytes = parse_size(max_shard_size)
    dst_p = Path(dst)
    if dst_p.exists() and not overwrite:
        raise ConfigError(f"dst = {str(dst_p)!r} exists; pass overwrite=True to replace it")
    if dst_p.resolve() == source.root.resolve():
        raise ConfigError("dst must differ from the source directory")
    if check is None:  # layers that differ are checked against the model class
        check = None if kinds is None else True
    new_config = None if config is None else rewrite_config_dict(config, plan, prefix, check=check, for_reload=True)
    shards = _shards(outputs, source, max_bytes)
    total = sum(source.nbytes(o.source) for o in outputs)
    buffer = bytearray(CHUNK)
    digests: dict[str, str] = {}
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="grow",
        disable=not (sys.stderr.isatty() if progress is None else progress),
    )
    n_sh = len(shards)
    files = (
        ["model.safetensors"] if n_sh == 1 else [f"model-{k + 1:05d}-of-{n_sh:05d}.safetensors" for k in range(n_sh)]
    )
    inputs = [*source.files, *([source.root] if Path(src).is_dir() else [])]  # a folder source: all of it
    with atomic_directory(dst_p, sources=inputs, kind="checkpoint") as tmp:
        weight_map: dict[str, str] = {}
        for fname, shard in zip(files, shards, strict=True):
            entries = [(o.name, *source.names[o.source][:2], source.nbytes(o.source)) for o in shard]
            with (tmp / fname).open("wb") as out:
                out.write(header_bytes(entries, {"format": "pt"}))
                for o in shard:
                    weight_map[o.name] = fname
                    if o.zero:
                        left = source.nbytes(o.source)
                        while left:
                            k = min(left, CHUNK)
                            out.write(bytes(k))
                            left -= k
                        bar.update(source.nbytes(o.source))
                        continue
                    hasher = None if o.source in digests else hashlib.blake2b(digest_size=16)
                    source.write(o.source, out, buffer, hasher=hasher, progress=bar.update)
                    if hasher is not None:
                        digests[o.source] = hasher.hexdigest()
        for n in names:  # tensors the plan drops still count in the source hash
            if n not in digests:
                digests[n] = source.hash_of(n, buffer)
        bar.close()
        if n_sh > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if new_config is not None:
            (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        copied = []
        whole_dir = Path(src).is_dir()  # a single-file source: only the usual companions from its folder
        for f in sorted(source.root.iterdir()):
            if (
                f.is_file()
                and f.name not in ("config.json", INDEX_NAME, MANIFEST_NAME)
                and not f.name.endswith(WEIGHT_SUFFIXES)
                and not f.name.startswith(".")
                and (whole_dir or any(fnmatch.fnmatch(f.name, pat) for pat in COMPANION_FILES))
            ):
                shutil.copy2(inside(source.root, f.name), tmp / f.name)
                copied.append(f.name)
        overall = hashlib.blake2b(digest_size=16)
        for n in sorted(digests):
            overall.update(f"{n}={digests[n]};".encode())
        manifest = {
            "format": "modulart-growth",
            "library_version": __version__,
            "source": str(Path(src)),
            "source_hash": overall.hexdigest(),
            "source_files": [f.name for f in source.files],
            "plan": plan.to_dict() | {"text": plan.describe()},
            "operator": operator,
            "seed": seed,
            "blocks": prefix,
            "max_shard_size": max_bytes,
            "shards": files,
            "total_size": total,
            "copied_files": copied,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return dst_p
