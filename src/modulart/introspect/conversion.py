"""On-disk names of a model's parameters, from transformers' own weight-conversion mapping.

transformers v5 keeps fused expert parameters in memory (``experts.gate_up_proj [E, 2I, d]``) but
reads — and ``save_pretrained`` writes — the families' historical key names: Mixtral's
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``, Qwen-style ``mlp.experts.{e}.gate_proj.weight``,
GraniteMoE's ``block_sparse_moe.input_linear.weight``, ... The mapping between the two is
``transformers.conversion_mapping``; saving runs it in reverse. :func:`on_disk` runs the same reverse
mapping on one parameter *symbolically*: instead of tensors it moves :class:`~.footprint.Piece`
descriptions through the reverse operations (chunk along a dimension, split a stacked dimension
into per-expert tensors, transpose), so the result says which block of the parameter each stored
tensor holds, in which orientation. The names come from transformers' own renaming code; they are
checked against transformers' own reverse conversion run on the meta parameter.

Example:
    >>> import torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> cfg = AutoConfig.for_model("mixtral", hidden_size=8, intermediate_size=4, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=2, vocab_size=16, num_local_experts=2)
    >>> with torch.device("meta"):
    ...     model = AutoModelForCausalLM.from_config(cfg)
    >>> names = DiskNames(model)
    >>> sorted(names.legacy("model.layers.0.mlp.experts.down_proj")[0])
    ['model.layers.0.block_sparse_moe.experts.0.w2.weight', 'model.layers.0.block_sparse_moe.experts.1.w2.weight']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modulart.introspect.footprint import Piece

__all__ = ["DiskNames", "UnsupportedConversionError"]

# One way of storing a parameter: on-disk name -> the block of the parameter it holds.
Layout = dict[str, Piece]


class UnsupportedConversionError(Exception):
    """A reverse conversion step that cannot be described as re-indexing (named in the message)."""


class DiskNames:
    """The on-disk layouts of ``model``'s parameters, under the model's conversion mapping.

    Args:
        model: a transformers model (the meta-device skeleton is enough: no data is touched).
    """

    def __init__(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

        self.model = model
        conversions = [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
        reverse = [c.reverse_transform() for c in conversions[::-1]]
        self._renamings = [r for r in reverse if isinstance(r, WeightRenaming)]
        self._converters = [r for r in reverse if isinstance(r, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}

    def own(self, name: str) -> Layout:
        """``name`` stored as it is, under its own name."""
        return {name: Piece.whole(tuple(int(s) for s in _tensor(self.model, name).shape))}

    def legacy(self, name: str) -> list[Layout]:
        """The layouts of ``name`` under the reverse conversion mapping, preferred first (the first is
        what ``save_pretrained`` writes; a transpose that loading applies only on a shape mismatch
        gives a second); ``[own(name)]`` when the mapping leaves ``name`` alone.

        Raises:
            UnsupportedConversionError: a reverse step is not a re-indexing of the parameter.
        """
        return self._reverse(name, tuple(int(s) for s in _tensor(self.model, name).shape))

    # --- the reverse mapping, symbolically ----------------------------------------------------
    def _reverse(self, name: str, shape: tuple[int, ...]) -> list[Layout]:
        from transformers.core_model_loading import apply_converters, apply_renamings

        renamed, pattern = apply_converters(name, self._converters)
        if pattern is None:
            return [{apply_renamings(name, self._renamings): Piece.whole(shape)}]
        conv = self._by_pattern[pattern]
        states: list[dict[str, Piece]] = [{pattern: Piece.whole(shape)}]
        for op in conv.operations:
            states = [s2 for s in states for s2 in self._apply(op, s, conv.source_patterns, conv.target_patterns)]
        full_name = renamed.replace("*.", "0.")
        layouts = []
        for state in states:
            hit = next((full_name.partition(k) for k in state if k in full_name), None)
            if hit is None:
                raise UnsupportedConversionError(f"{name}: cannot place the converted keys {sorted(state)[:3]}")
            prefix, _, suffix = hit
            layouts.append({apply_renamings(prefix + k + suffix, self._renamings): p for k, p in state.items()})
        self._cross_check(name, layouts[0])
        return layouts

    def _apply(
        self, op: Any, state: dict[str, Piece], sources: list[str], targets: list[str]
    ) -> list[dict[str, Piece]]:
        from transformers.core_model_loading import Chunk, SplitModulelist, Transpose

        kind = type(op)
        if kind is Chunk:
            if len(state) != 1:
                raise UnsupportedConversionError("a chunk of several tensors")
            (piece,) = state.values()
            names = op.get_target_patterns(targets, config=getattr(self.model, "config", None))
            parts = _split(piece, op.dim, len(names))
            return [dict(zip(names, parts, strict=False))]
        if kind is SplitModulelist:
            out: dict[str, Piece] = {}
            for key, piece in state.items():
                n = piece.shape[op.dim]
                names = op.get_target_patterns(state, key, targets, n)
                singles = [_drop(p, op.dim) for p in _split(piece, op.dim, n)]
                out.update(zip(names, singles, strict=False))
            return [out]
        if kind is Transpose:
            key = op.get_target_pattern(state, sources, targets)
            (piece,) = state.values()
            swapped = _transpose(piece, op.dim0, op.dim1)
            if op.check_dims:  # loading transposes only when the stored shape differs: both are readable
                return [{key: piece}, {key: swapped}]
            return [{key: swapped}]
        raise UnsupportedConversionError(f"the on-disk conversion step {kind.__name__} is not a re-indexing")

    def _cross_check(self, name: str, layout: Layout) -> None:
        """The names and shapes must be those transformers' own reverse conversion gives (when that
        conversion can run on a meta tensor; some steps read parameters of the model by name)."""
        from transformers.core_model_loading import revert_weight_conversion

        meta = torch.empty(_tensor(self.model, name).shape, device="meta")
        try:
            got = revert_weight_conversion(self.model, {name: meta})
        except Exception:  # transformers' own code failed on the meta tensor: nothing to compare with
            return
        mine = {k: p.shape for k, p in layout.items()}
        theirs = {k: tuple(int(s) for s in v.shape) for k, v in got.items()}
        if mine != theirs:
            raise UnsupportedConversionError(
                f"{name}: reading the conversion mapping gave {sorted(mine.items())[:3]}, "
                f"transformers' reverse conversion gives {sorted(theirs.items())[:3]}"
            )


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _split(piece: Piece, axis: int, n: int) -> list[Piece]:
    """``torch.chunk(stored, n, dim=axis)`` on the description."""
    p = piece.dims[axis]
    lo, hi = piece.region[p]
    size = -(-(hi - lo) // n)
    out = []
    for a in range(lo, hi, size):
        region = list(piece.region)
        region[p] = (a, min(a + size, hi))
        out.append(Piece(tuple(region), piece.dims))
    return out


def _drop(piece: Piece, axis: int) -> Piece:
    """``squeeze(axis)`` of a size-1 stored dimension."""
    dims = list(piece.dims)
    del dims[axis]
    return Piece(piece.region, tuple(dims))


def _transpose(piece: Piece, a: int, b: int) -> Piece:
    dims = list(piece.dims)
    dims[a], dims[b] = dims[b], dims[a]
    return Piece(piece.region, tuple(dims))
