"""Expert weights straight from a directory of (sharded) safetensors, one slice at a time.

Nothing is loaded up front: the constructor reads only the files' headers (names, shapes, dtypes),
recognises the MoE layers and checks every tensor they need; the data are then read per expert and
per chunk with ``safe_open(...).get_slice`` — the file is opened for the read and closed right
after, so the pages it touched are unmapped and peak memory stays at one chunk of one layer's
members, whatever the model size.

On-disk layouts understood (layers are found by their keys, any prefix):

- per-expert keys: ``<block>.experts.{e}.w1/w3/w2.weight`` (Mixtral) or
  ``<block>.experts.{e}.gate_proj/up_proj/down_proj.weight`` (Qwen2-MoE, OLMoE, DeepSeek-V3);
- fused keys: ``<block>.experts.gate_up_proj [E, 2I, d]`` (gate first) and ``down_proj [E, d, I]``;
- GPT-OSS: ``gate_up_proj [E, d, 2I]`` (gate/up interleaved) and ``down_proj [E, I, d]`` — told
  apart from the fused layout by the shapes;
- router ``<block>.gate.weight`` or ``<block>.router.weight`` ``[E, d]``; shared experts
  ``<block>.shared_expert(s).{gate,up,down}_proj.weight``.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> t = {"model.layers.0.mlp.gate.weight": torch.randn(2, 4)}
    >>> for e in range(2):
    ...     for n, s in (("gate_proj", (6, 4)), ("up_proj", (6, 4)), ("down_proj", (4, 6))):
    ...         t[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = torch.randn(*s)
    >>> save_file(t, f"{d}/model.safetensors")
    >>> src = CheckpointSource(d)
    >>> r = src.layer(0)
    >>> src.layer_indices, r.members, r.shape(1, "down")
    ([0], ['e0', 'e1'], (4, 6))
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from modulart.core.errors import IncompatibleArtifactError, ShapeError
from modulart.introspect.sources import Block, LayerReader, Member, TensorReader, WeightSource

__all__ = ["CheckpointSource", "DenseCheckpoint", "checkpoint_index"]

_ROLE = {"w1": "act", "gate_proj": "act", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_BLOCK = r"(?P<block>(?:.*\.)?(?P<layer>\d+)\.[^.]+)"
_PER_EXPERT = re.compile(rf"^{_BLOCK}\.experts\.(?P<e>\d+)\.(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(rf"^{_BLOCK}\.experts\.(?P<name>gate_up_proj|down_proj)(?:\.weight)?$")
_SHARED = re.compile(rf"^{_BLOCK}\.(?P<s>shared_experts?)\.(?P<name>gate_proj|up_proj|down_proj)\.weight$")
_DENSE = re.compile(
    r"^(?:.*\.)?(?P<layer>\d+)\.(?:mlp|feed_forward)\.(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_QUANTIZED = re.compile(r"\.experts\..*(_blocks|_scales)$")


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def checkpoint_index(directory: str | PathLike[str]) -> dict[str, _Entry]:
    """Every tensor of a safetensors checkpoint directory: name -> (file, shape, dtype), headers only.

    Raises:
        FileNotFoundError: not a directory, or no ``*.safetensors`` in it.
        IncompatibleArtifactError: the shard index names a file that is missing.

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
        raise FileNotFoundError(f"{root}: not a checkpoint directory")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({root / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise IncompatibleArtifactError(f"{index} names shard(s) that do not exist: {missing[:4]}")
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.safetensors files")
    out: dict[str, _Entry] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = h.get_slice(k)
                out[k] = _Entry(f, tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()))
    return out


class _SliceTensor(TensorReader):
    """A canonical matrix inside one stored tensor, read with ``get_slice`` (file closed after each read).

    ``mode``: ``plain`` (stored ``[R, C]`` is canonical), ``rows`` (``stored[e, offset:offset+R]``),
    ``interleaved`` (canonical ``stored[e][:, parity::2].T``, chunks over stored rows = canonical
    columns) or ``transposed`` (canonical ``stored[e].T``).
    """

    def __init__(
        self, entry: _Entry, key: str, shape: tuple[int, int], mode: str, e: int = 0, offset: int = 0, parity: int = 0
    ) -> None:
        self.entry, self.key, self.shape, self.mode = entry, key, shape, mode
        self.e, self.offset, self.parity = e, offset, parity
        self.chunk_axis = 1 if mode in ("interleaved", "transposed") else 0
        self.axes = (self.chunk_axis,)

    def read(self, start: int, stop: int, axis: int) -> Block:
        with safe_open(str(self.entry.file), framework="pt") as h:
            sl = h.get_slice(self.key)
            if self.mode == "plain":
                t = sl[start:stop]
            elif self.mode == "rows":
                t = sl[self.e, self.offset + start : self.offset + stop]
            elif self.mode == "interleaved":
                t = sl[self.e, start:stop][:, self.parity :: 2].t()
            else:
                t = sl[self.e, start:stop].t()
            del sl
        return Block(self.chunk_axis, start, stop, t)


def _read_full(entry: _Entry, key: str) -> torch.Tensor:
    with safe_open(str(entry.file), framework="pt") as h:
        t: torch.Tensor = h.get_tensor(key)
    return t.float()


@dataclass
class _Layer:
    block: str
    layer: int
    experts: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    fused: dict[str, str] = field(default_factory=dict)
    shared: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))


class CheckpointSource(WeightSource):
    """The MoE layers of a safetensors checkpoint directory, streamed (see the module docstring).

    Args:
        directory: the checkpoint directory (``*.safetensors``, optionally sharded with an index).
        dense: optional dense reference (checkpoint dir or ``nn.Module``) giving the ``F`` member.

    Raises:
        IncompatibleArtifactError: no MoE layer found, a missing tensor, or a wrong shape (named).
    """

    def __init__(self, directory: str | PathLike[str], *, dense: Any = None) -> None:
        from modulart.introspect.live import dense_members

        self.name = str(directory)
        self.index = checkpoint_index(directory)
        self._dense = dense_members(dense)
        layers: dict[str, _Layer] = {}
        for k in self.index:
            for pattern in (_PER_EXPERT, _FUSED, _SHARED):
                m = pattern.match(k)
                if m is None:
                    continue
                lay = layers.setdefault(m["block"], _Layer(m["block"], int(m["layer"])))
                if pattern is _PER_EXPERT:
                    lay.experts[int(m["e"])][_ROLE[m["name"]]] = k
                elif pattern is _FUSED:
                    lay.fused[m["name"]] = k
                else:
                    lay.shared[m["s"]][_ROLE[m["name"]]] = k
                break
        self._layers = sorted((v for v in layers.values() if v.experts or v.fused), key=lambda v: v.layer)
        if not self._layers:
            quant = [k for k in self.index if _QUANTIZED.search(k)][:3]
            hint = f" (quantized expert tensors such as {quant} are not supported)" if quant else ""
            sample = [k for k in self.index if "expert" in k or "mlp" in k][:6]
            raise IncompatibleArtifactError(
                f"{directory}: no MoE layer found{hint}; expected keys like "
                "'<block>.experts.{e}.w1.weight', '<block>.experts.{e}.gate_proj.weight' or "
                f"'<block>.experts.gate_up_proj'; MLP-like keys seen: {sample}"
            )
        self._readers = [self._plan(v) for v in self._layers]  # validates everything up front

    @property
    def layer_indices(self) -> list[int]:
        return [v.layer for v in self._layers]

    def layer(self, position: int) -> LayerReader:
        position = self._check_position(position)
        members, tensors, router_key = self._readers[position]
        members, tensors = list(members), dict(tensors)
        lay = self._layers[position]
        if self._dense is not None:
            dense = self._dense.tensors(lay.layer)
            if dense is None:
                raise ShapeError(f"the dense reference has no FFN at layer {lay.layer} (needed for {lay.block})")
            members.append(Member("F", "dense"))
            tensors.update({(len(members) - 1, k): v for k, v in dense.items()})
        router = _read_full(self.index[router_key], router_key)
        return LayerReader(lay.layer, lay.block, members, tensors, router)

    # --- planning and validation --------------------------------------------------------------
    def _entry(self, key: str, shape: tuple[int, ...] | None = None) -> _Entry:
        if key not in self.index:
            raise IncompatibleArtifactError(f"{self.name}: missing tensor {key!r}")
        entry = self.index[key]
        if shape is not None and entry.shape != shape:
            raise IncompatibleArtifactError(
                f"{self.name}: tensor {key!r} has shape {list(entry.shape)}, expected {list(shape)}"
            )
        return entry

    def _plan(self, lay: _Layer) -> tuple[list[Member], dict[tuple[int, str], TensorReader], str]:
        router_key = next(
            (f"{lay.block}.{r}.weight" for r in ("gate", "router") if f"{lay.block}.{r}.weight" in self.index), None
        )
        if router_key is None:
            raise IncompatibleArtifactError(
                f"{self.name}: missing router tensor '{lay.block}.gate.weight' (or '{lay.block}.router.weight')"
            )
        rshape = self.index[router_key].shape
        if len(rshape) != 2:
            raise IncompatibleArtifactError(
                f"{self.name}: router {router_key!r} has shape {list(rshape)}, expected [E, d]"
            )
        n_exp, d = rshape
        members: list[Member] = []
        tensors: dict[tuple[int, str], TensorReader] = {}
        if lay.experts:
            first = lay.experts[min(lay.experts)]
            if "act" not in first:
                raise IncompatibleArtifactError(
                    f"{self.name}: missing tensor for the gate of {lay.block}.experts.{min(lay.experts)}"
                )
            inter = self._entry(first["act"]).shape[0]
            for e in range(n_exp):
                keys = lay.experts.get(e, {})
                for role, shape in (("act", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                    key = keys.get(role)
                    if key is None:
                        names = {"act": "w1 / gate_proj", "up": "w3 / up_proj", "down": "w2 / down_proj"}[role]
                        raise IncompatibleArtifactError(
                            f"{self.name}: missing tensor {lay.block}.experts.{e}.({names}).weight "
                            f"(the router {router_key!r} has {n_exp} experts)"
                        )
                    tensors[(e, role)] = _SliceTensor(self._entry(key, shape), key, (shape[0], shape[1]), "plain")
                members.append(Member(f"e{e}", "expert"))
            extra = sorted(set(lay.experts) - set(range(n_exp)))
            if extra:
                raise IncompatibleArtifactError(
                    f"{self.name}: {lay.block} has experts {extra} beyond the router's {n_exp}"
                )
        else:
            for name in ("gate_up_proj", "down_proj"):
                if name not in lay.fused:
                    raise IncompatibleArtifactError(f"{self.name}: missing tensor '{lay.block}.experts.{name}'")
            gk, dk = lay.fused["gate_up_proj"], lay.fused["down_proj"]
            gs, ds = self._entry(gk).shape, self._entry(dk).shape
            if len(gs) != 3 or len(ds) != 3 or gs[0] != n_exp or ds[0] != n_exp:
                raise IncompatibleArtifactError(
                    f"{self.name}: {gk!r} {list(gs)} / {dk!r} {list(ds)}: "
                    f"expected 3-D tensors with {n_exp} experts first"
                )
            if gs[2] == d and ds[1] == d and gs[1] == 2 * ds[2]:  # fused, gate first
                inter = ds[2]
                for e in range(n_exp):
                    ge = self.index[gk]
                    tensors[(e, "act")] = _SliceTensor(ge, gk, (inter, d), "rows", e, 0)
                    tensors[(e, "up")] = _SliceTensor(ge, gk, (inter, d), "rows", e, inter)
                    tensors[(e, "down")] = _SliceTensor(self.index[dk], dk, (d, inter), "rows", e, 0)
                    members.append(Member(f"e{e}", "expert"))
            elif gs[1] == d and ds[2] == d and gs[2] == 2 * ds[1]:  # GPT-OSS: transposed, interleaved
                inter = ds[1]
                for e in range(n_exp):
                    ge = self.index[gk]
                    tensors[(e, "act")] = _SliceTensor(ge, gk, (inter, d), "interleaved", e, parity=0)
                    tensors[(e, "up")] = _SliceTensor(ge, gk, (inter, d), "interleaved", e, parity=1)
                    tensors[(e, "down")] = _SliceTensor(self.index[dk], dk, (d, inter), "transposed", e)
                    members.append(Member(f"e{e}", "expert"))
            else:
                raise IncompatibleArtifactError(
                    f"{self.name}: {gk!r} {list(gs)} and {dk!r} {list(ds)} fit neither the fused layout "
                    f"([E, 2I, {d}] / [E, {d}, I]) nor the GPT-OSS one ([E, {d}, 2I] / [E, I, {d}])"
                )
        for i, (s, keys) in enumerate(sorted(lay.shared.items())):
            if set(keys) != {"act", "up", "down"}:
                missing = sorted({"act", "up", "down"} - set(keys))
                raise IncompatibleArtifactError(f"{self.name}: shared expert {lay.block}.{s} lacks {missing}")
            inter = self._entry(keys["act"]).shape[0]
            m = len(members)
            for role, shape in (("act", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                tensors[(m, role)] = _SliceTensor(self._entry(keys[role], shape), keys[role], shape, "plain")
            members.append(Member(f"s{i}", "shared"))
        return members, tensors, router_key


class DenseCheckpoint:
    """The dense FFNs of a safetensors checkpoint (``<...>.{layer}.mlp.gate_proj/up_proj/down_proj.weight``).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({f"model.layers.0.mlp.{n}.weight": torch.zeros(s) for n, s in
        ...     (("gate_proj", (6, 4)), ("up_proj", (6, 4)), ("down_proj", (4, 6)))}, f"{d}/model.safetensors")
        >>> sorted(DenseCheckpoint(d).tensors(0))
        ['act', 'down', 'up']
    """

    def __init__(self, directory: str | PathLike[str]) -> None:
        self.name = str(directory)
        self.index = checkpoint_index(directory)
        self.layers: dict[int, dict[str, str]] = defaultdict(dict)
        for k in self.index:
            m = _DENSE.match(k)
            if m is not None and ".experts." not in k:
                self.layers[int(m["layer"])][_ROLE[m["name"]]] = k
        if not self.layers:
            raise IncompatibleArtifactError(
                f"{directory}: no dense FFN keys like '<...>.{{layer}}.mlp.gate_proj.weight'"
            )

    def tensors(self, layer: int) -> dict[str, TensorReader] | None:
        """Canonical readers of layer ``layer``'s FFN, or None when it has none."""
        keys = self.layers.get(layer)
        if keys is None:
            return None
        if "act" not in keys or "down" not in keys:
            raise IncompatibleArtifactError(
                f"{self.name}: dense layer {layer} lacks {sorted({'act', 'down'} - set(keys))}"
            )
        inter, d = self.index[keys["act"]].shape
        out: dict[str, TensorReader] = {}
        for role, shape in (("act", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
            if role in keys:
                e = self.index[keys[role]]
                if e.shape != shape:
                    raise IncompatibleArtifactError(
                        f"{self.name}: tensor {keys[role]!r} has shape {list(e.shape)}, expected {list(shape)}"
                    )
                out[role] = _SliceTensor(e, keys[role], shape, "plain")
        return out
