"""MoE layers of a checkpoint recognised by key names alone: the fallback when there is no usable config.

With a ``config.json`` the layers come from the model's own MoE views
(:mod:`modulart.introspect.viewplan`). Without one, layers are found by their keys, any prefix:

- per-expert keys: ``<block>.experts.{e}.w1/w3/w2.weight`` (Mixtral, PhiMoE) or
  ``<block>.experts.{e}.gate_proj/up_proj/down_proj.weight`` (Qwen-style);
- fused keys: ``<block>.experts.gate_up_proj [E, 2I, d]`` (gate first) and ``down_proj [E, d, I]``;
- GPT-OSS: ``gate_up_proj [E, d, 2I]`` (gate/up interleaved) and ``down_proj [E, I, d]`` — told
  apart from the fused layout by the shapes, and from other transposed storage (Llama 4's
  concatenated columns) by its ``gate_up_proj_bias``; without that bias a transposed layout is
  refused rather than guessed;
- router ``<block>.gate.weight`` or ``<block>.router.weight`` ``[E, d]``; shared experts
  ``<block>.shared_expert(s).{gate,up,down}_proj.weight``.

For the checkpoints of the families whose keys these are, this reads the same members and the same
matrices as the config-driven path (the agreement tests hold both to it).

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from modulart.introspect.stored import checkpoint_index
    >>> d = tempfile.mkdtemp()
    >>> t = {"model.layers.0.mlp.gate.weight": torch.randn(2, 4)}
    >>> for e in range(2):
    ...     for n, s in (("gate_proj", (6, 4)), ("up_proj", (6, 4)), ("down_proj", (4, 6))):
    ...         t[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = torch.randn(*s)
    >>> save_file(t, f"{d}/model.safetensors")
    >>> plans = keyed_layers(checkpoint_index(d), d)
    >>> plans[0].layer, [m.name for m in plans[0].members], plans[0].tensors[(1, "down")].shape
    (0, ['e0', 'e1'], (4, 6))
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from modulart.core.errors import IncompatibleArtifactError
from modulart.introspect.footprint import Footprint
from modulart.introspect.sources import LayerPlan, Member, TensorReader
from modulart.introspect.stored import Entry, StoredMatrix, plain

__all__ = ["keyed_layers"]

ROLE = {"w1": "act", "gate_proj": "act", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_BLOCK = r"(?P<block>(?:.*\.)?(?P<layer>\d+)\.[^.]+)"
_PER_EXPERT = re.compile(rf"^{_BLOCK}\.experts\.(?P<e>\d+)\.(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(rf"^{_BLOCK}\.experts\.(?P<name>gate_up_proj|down_proj)(?:\.weight)?$")
_SHARED = re.compile(rf"^{_BLOCK}\.(?P<s>shared_experts?)\.(?P<name>gate_proj|up_proj|down_proj)\.weight$")
_QUANTIZED = re.compile(r"\.experts\..*(_blocks|_scales)$")


@dataclass
class _Keys:
    block: str
    layer: int
    experts: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    fused: dict[str, str] = field(default_factory=dict)
    shared: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))


def keyed_layers(index: dict[str, Entry], name: str) -> list[LayerPlan]:
    """The MoE layers of a checkpoint index, found by key names (see the module docstring).

    Raises:
        IncompatibleArtifactError: no MoE layer found, a missing tensor, or a wrong shape (named).
    """
    layers: dict[str, _Keys] = {}
    for k in index:
        for pattern in (_PER_EXPERT, _FUSED, _SHARED):
            m = pattern.match(k)
            if m is None:
                continue
            lay = layers.setdefault(m["block"], _Keys(m["block"], int(m["layer"])))
            if pattern is _PER_EXPERT:
                lay.experts[int(m["e"])][ROLE[m["name"]]] = k
            elif pattern is _FUSED:
                lay.fused[m["name"]] = k
            else:
                lay.shared[m["s"]][ROLE[m["name"]]] = k
            break
    found = sorted((v for v in layers.values() if v.experts or v.fused), key=lambda v: v.layer)
    if not found:
        quant = [k for k in index if _QUANTIZED.search(k)][:3]
        hint = f" (quantized expert tensors such as {quant} are not supported)" if quant else ""
        sample = [k for k in index if "expert" in k or "mlp" in k][:6]
        raise IncompatibleArtifactError(
            f"{name}: no MoE layer found{hint}; expected keys like "
            "'<block>.experts.{e}.w1.weight', '<block>.experts.{e}.gate_proj.weight' or "
            f"'<block>.experts.gate_up_proj'; MLP-like keys seen: {sample}"
        )
    return [_Planner(index, name).plan(v) for v in found]


class _Planner:
    def __init__(self, index: dict[str, Entry], name: str) -> None:
        self.index, self.name = index, name

    def _matrix(self, key: str, fp: Footprint, stored: tuple[int, ...] | None = None) -> StoredMatrix:
        if key not in self.index:
            raise IncompatibleArtifactError(f"{self.name}: missing tensor {key!r}")
        entry = self.index[key]
        want = stored if stored is not None else fp.shape
        if entry.shape != want:
            raise IncompatibleArtifactError(
                f"{self.name}: tensor {key!r} has shape {list(entry.shape)}, expected {list(want)}"
            )
        return StoredMatrix(entry, key, fp)

    def plan(self, lay: _Keys) -> LayerPlan:
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
            self._per_expert(lay, n_exp, d, router_key, members, tensors)
        else:
            self._fused(lay, n_exp, d, members, tensors)
        for i, (s, keys) in enumerate(sorted(lay.shared.items())):
            if set(keys) != {"act", "up", "down"}:
                missing = sorted({"act", "up", "down"} - set(keys))
                raise IncompatibleArtifactError(f"{self.name}: shared expert {lay.block}.{s} lacks {missing}")
            inter = self.index[keys["act"]].shape[0]
            m = len(members)
            for role, shape in (("act", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                tensors[(m, role)] = self._matrix(keys[role], plain(shape))
            members.append(Member(f"s{i}", "shared"))
        router = self._matrix(router_key, plain((n_exp, d)))
        return LayerPlan(lay.layer, lay.block, members, tensors, router)

    def _per_expert(
        self,
        lay: _Keys,
        n_exp: int,
        d: int,
        router_key: str,
        members: list[Member],
        tensors: dict[tuple[int, str], TensorReader],
    ) -> None:
        first = lay.experts[min(lay.experts)]
        if "act" not in first:
            raise IncompatibleArtifactError(
                f"{self.name}: missing tensor for the gate of {lay.block}.experts.{min(lay.experts)}"
            )
        inter = self.index[first["act"]].shape[0]
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
                tensors[(e, role)] = self._matrix(key, plain(shape))
            members.append(Member(f"e{e}", "expert"))
        extra = sorted(set(lay.experts) - set(range(n_exp)))
        if extra:
            raise IncompatibleArtifactError(f"{self.name}: {lay.block} has experts {extra} beyond the router's {n_exp}")

    def _fused(
        self, lay: _Keys, n_exp: int, d: int, members: list[Member], tensors: dict[tuple[int, str], TensorReader]
    ) -> None:
        for name in ("gate_up_proj", "down_proj"):
            if name not in lay.fused:
                raise IncompatibleArtifactError(f"{self.name}: missing tensor '{lay.block}.experts.{name}'")
        gk, dk = lay.fused["gate_up_proj"], lay.fused["down_proj"]
        gs, ds = self.index[gk].shape, self.index[dk].shape
        if len(gs) != 3 or len(ds) != 3 or gs[0] != n_exp or ds[0] != n_exp:
            raise IncompatibleArtifactError(
                f"{self.name}: {gk!r} {list(gs)} / {dk!r} {list(ds)}: expected 3-D tensors with {n_exp} experts first"
            )
        if gs[2] == d and ds[1] == d and gs[1] == 2 * ds[2]:  # fused, gate first
            inter = ds[2]
            for e in range(n_exp):
                tensors[(e, "act")] = self._matrix(gk, Footprint((e, 0, 0), ((1, 1), (2, 1)), (inter, d)), gs)
                tensors[(e, "up")] = self._matrix(gk, Footprint((e, inter, 0), ((1, 1), (2, 1)), (inter, d)), gs)
                tensors[(e, "down")] = self._matrix(dk, Footprint((e, 0, 0), ((1, 1), (2, 1)), (d, inter)), ds)
                members.append(Member(f"e{e}", "expert"))
        elif gs[1] == d and ds[2] == d and gs[2] == 2 * ds[1]:  # transposed: GPT-OSS's interleaved one only
            inter = ds[1]
            bias = self.index.get(f"{gk}_bias")
            if bias is None or bias.shape != (n_exp, 2 * inter):
                raise IncompatibleArtifactError(
                    f"{self.name}: {gk!r} {list(gs)} is stored transposed; without the checkpoint's config.json "
                    "the key names cannot tell GPT-OSS's interleaved gate/up columns (which come with a "
                    f"'{gk}_bias' [{n_exp}, {2 * inter}]) from concatenated ones (Llama 4, Qwen3-VL-MoE): "
                    "keep config.json next to the weights"
                )
            for e in range(n_exp):
                tensors[(e, "act")] = self._matrix(gk, Footprint((e, 0, 0), ((2, 2), (1, 1)), (inter, d)), gs)
                tensors[(e, "up")] = self._matrix(gk, Footprint((e, 0, 1), ((2, 2), (1, 1)), (inter, d)), gs)
                tensors[(e, "down")] = self._matrix(dk, Footprint((e, 0, 0), ((2, 1), (1, 1)), (d, inter)), ds)
                members.append(Member(f"e{e}", "expert"))
        else:
            raise IncompatibleArtifactError(
                f"{self.name}: {gk!r} {list(gs)} and {dk!r} {list(ds)} fit neither the fused layout "
                f"([E, 2I, {d}] / [E, {d}, I]) nor the GPT-OSS one ([E, {d}, 2I] / [E, I, {d}])"
            )
