"""Expert weights of a live model: MoE blocks through the MoE view, or dense FFNs split into experts.

- MoE blocks (every layout the MoE view reads: per-expert ModuleList, fused 3-D, GPT-OSS
  interleaved/transposed) give routed experts ``e0..``, shared experts ``s0..`` and the router.
- Dense FFNs analysed as experts: pass ``experts=`` a
  :class:`~modulart.core.neuron_groups.NeuronExperts` (an EMoE handle: its neuron groups and
  avg-k router) or a mapping ``{ffn_path: ExpertGroups}``; each group of neurons is an expert and its
  mean key row is the router row, as in EMoE.
- An optional dense reference model (``dense=``) adds the ``F`` member: the same-layer FFN.

Example:
    >>> import torch
    >>> from modulart.introspect.live import ModelSource
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> from modulart.core.neuron_groups import ExpertGroups
    >>> src = ModelSource(model, experts={"": ExpertGroups(torch.arange(32) % 4, 4)})
    >>> r = src.layer(0)
    >>> r.members, r.shape(0, "act"), r.has(0, "up")
    (['e0', 'e1', 'e2', 'e3'], (8, 8), False)
"""

from __future__ import annotations

from os import PathLike
from typing import Protocol, TypeAlias

import torch
from torch import nn

from modulart.core.errors import InvalidArgumentError, ShapeError, UnsupportedModuleError
from modulart.core.ffn import FFN, find_ffns
from modulart.core.moe import MoE, find_moes
from modulart.core.neuron_groups import ExpertGroups
from modulart.introspect.members import ffn_matrices, moe_members
from modulart.introspect.neuron_experts import ExpertsSpec, neuron_splits
from modulart.introspect.sources import LayerReader, Member, TensorReader, WeightSource, memory_reader

__all__ = ["DenseMembers", "DenseSpec", "ModelSource", "dense_members", "ffn_tensors"]

DenseSpec: TypeAlias = nn.Module | str | PathLike[str] | None
"""A dense reference: a dense ``nn.Module``, a checkpoint directory of safetensors, or None."""


class DenseMembers(Protocol):
    """The ``F`` member's source: a layer's canonical FFN readers, or None when it has no FFN."""

    def tensors(self, layer: int) -> dict[str, TensorReader] | None: ...


def ffn_tensors(ffn: FFN, what: str) -> dict[str, TensorReader]:
    """The canonical matrices of a dense FFN view (``up`` only when gated), as in-memory readers.

    Example:
        >>> import modulart as mt
        >>> ffn = mt.find_ffns(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)))[0]
        >>> {k: v.shape for k, v in ffn_tensors(ffn, "demo").items()}
        {'act': (8, 4), 'down': (4, 8)}
    """
    return {k: memory_reader(t, f"{what}.{k}") for k, t in ffn_matrices(ffn).items()}


class _DenseModel:
    def __init__(self, model: nn.Module) -> None:
        self.ffns = {f.layer if f.layer is not None else i: f for i, f in enumerate(find_ffns(model))}

    def tensors(self, layer: int) -> dict[str, TensorReader] | None:
        f = self.ffns.get(layer)
        return None if f is None else ffn_tensors(f, f"dense {f.path}")


def dense_members(dense: DenseSpec) -> DenseMembers | None:
    """An object with ``tensors(layer) -> {matrix: TensorReader} | None`` for a dense reference.

    ``dense`` is a dense ``nn.Module`` or a checkpoint directory of safetensors (read lazily).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> sorted(dense_members(model).tensors(0)), dense_members(model).tensors(5)
        (['act', 'down'], None)
    """
    if dense is None:
        return None
    if isinstance(dense, nn.Module):
        return _DenseModel(dense)
    if isinstance(dense, (str, PathLike)):
        from modulart.introspect.checkpoint import DenseCheckpoint

        return DenseCheckpoint(dense)
    raise InvalidArgumentError(f"dense must be an nn.Module or a checkpoint directory, got {type(dense).__name__}")


def _groups_of(experts: ExpertsSpec) -> dict[str, tuple[ExpertGroups, torch.Tensor | None]]:
    """``{ffn_path: (groups, frozen centroids or None)}`` from a NeuronExperts or a mapping."""
    return {p: (split.groups, split.centroids) for p, split in neuron_splits(experts).items()}


class ModelSource(WeightSource):
    """The MoE layers (or expert-split dense FFNs) of a live model.

    Args:
        model: the model.
        dense: optional dense reference (``nn.Module`` or checkpoint dir) giving the ``F`` member.
        experts: analyse dense FFNs as experts: a :class:`~modulart.core.neuron_groups.NeuronExperts`
            (an EMoE handle) or ``{ffn_path: ExpertGroups}``.
    """

    def __init__(self, model: nn.Module, *, dense: DenseSpec = None, experts: ExpertsSpec | None = None) -> None:
        self.model = model
        self.name = type(model).__name__
        self._dense = dense_members(dense)
        self._moes: list[MoE] = []
        self._ffns: list[tuple[FFN, ExpertGroups, torch.Tensor | None]] = []
        if experts is not None:
            groups = _groups_of(experts)
            by_path = {f.path: f for f in find_ffns(model)}
            missing = [p for p in groups if p not in by_path]
            if missing:
                raise UnsupportedModuleError(f"experts name FFNs that {self.name} does not have: {missing[:4]}")
            for p, (g, frozen) in groups.items():
                if g.d_ff != by_path[p].d_ff:
                    raise ShapeError(f"{p}: ExpertGroups cover {g.d_ff} neurons but the FFN has {by_path[p].d_ff}")
                self._ffns.append((by_path[p], g, frozen))
        else:
            self._moes = find_moes(model)

    @property
    def layer_indices(self) -> list[int]:
        layers = [m.layer for m in self._moes] if self._moes else [f.layer for f, _, _ in self._ffns]
        return [v if v is not None else i for i, v in enumerate(layers)]

    def layer(self, position: int) -> LayerReader:
        position = self._check_position(position)
        index = self.layer_indices[position]
        if self._moes:
            members, tensors, router, label = self._moe_layer(self._moes[position])
        else:
            members, tensors, router, label = self._ffn_layer(*self._ffns[position])
        if self._dense is not None:
            dense = self._dense.tensors(index)
            if dense is None:
                raise ShapeError(f"the dense reference has no FFN at layer {index} (needed for {label})")
            members.append(Member("F", "dense"))
            tensors.update({(len(members) - 1, k): v for k, v in dense.items()})
        return LayerReader(index, label, members, tensors, router)

    def _moe_layer(self, moe: MoE) -> tuple[list[Member], dict[tuple[int, str], TensorReader], torch.Tensor, str]:
        members: list[Member] = []
        tensors: dict[tuple[int, str], TensorReader] = {}
        for m, (member, mats) in enumerate(moe_members(moe)):
            members.append(member)
            act = mats["act"]
            for k, t in mats.items():
                want = (act.shape[0], moe.d_model) if k != "down" else (moe.d_model, act.shape[0])
                tensors[(m, k)] = memory_reader(t, f"{moe.path} {member.name} {k}", (int(want[0]), int(want[1])))
        return members, tensors, moe.router_weight, moe.path

    def _ffn_layer(
        self, ffn: FFN, groups: ExpertGroups, frozen: torch.Tensor | None
    ) -> tuple[list[Member], dict[tuple[int, str], TensorReader], torch.Tensor, str]:
        members: list[Member] = []
        tensors: dict[tuple[int, str], TensorReader] = {}
        groups = groups.to(ffn.keys.device)
        for j in range(groups.num_experts):
            idx = groups.members(j)
            members.append(Member(f"e{j}", "expert"))
            tensors[(j, "act")] = memory_reader(ffn.keys.index_select(0, idx), f"{ffn.path} group {j} keys")
            if ffn.up is not None:
                tensors[(j, "up")] = memory_reader(ffn.up.index_select(0, idx), f"{ffn.path} group {j} up")
            tensors[(j, "down")] = memory_reader(ffn.values.index_select(1, idx), f"{ffn.path} group {j} values")
        router = frozen if frozen is not None else groups.centroids(ffn.keys.detach())
        return members, tensors, router, ffn.path
