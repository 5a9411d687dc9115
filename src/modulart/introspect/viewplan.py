"""MoE layers of a checkpoint read through the model's own MoE views (the config-driven path).

The model is built from ``config.json`` on the meta device (:mod:`~modulart.introspect.skeleton`)
and its MoE blocks are discovered exactly as for a live model. Each member's canonical matrix is a
view of a parameter; its :class:`~modulart.introspect.footprint.Footprint` says which elements of
that parameter it covers, and the parameter's on-disk layouts (its own name, or transformers'
historical names under the reverse conversion mapping, :mod:`~modulart.introspect.conversion`) say
which stored tensor holds them. So live and streamed analyses see the same members — shared experts
included — and read the same numbers, and a block the views refuse is refused here too.

Example:
    >>> import tempfile, torch
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> cfg = AutoConfig.for_model("mixtral", hidden_size=8, intermediate_size=4, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=2, vocab_size=16, num_local_experts=4)
    >>> d = tempfile.mkdtemp()
    >>> AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    >>> from modulart.introspect.stored import checkpoint_index
    >>> from modulart.introspect.skeleton import load_skeleton
    >>> plans = view_layers(load_skeleton(d), checkpoint_index(d), d)
    >>> [m.name for m in plans[0].members], plans[0].tensors[(1, "act")].key
    (['e0', 'e1', 'e2', 'e3'], 'model.layers.0.block_sparse_moe.experts.1.w1.weight')
"""

from __future__ import annotations

import torch

from modulart.core.errors import IncompatibleArtifactError, UnsupportedModuleError
from modulart.introspect.conversion import DiskNames, Layout, UnsupportedConversionError
from modulart.introspect.footprint import Piece, footprint, locate
from modulart.introspect.members import ffn_matrices, moe_members
from modulart.introspect.skeleton import Skeleton, discover_moes
from modulart.introspect.sources import LayerPlan, TensorReader
from modulart.introspect.stored import Entry, StoredMatrix

__all__ = ["dense_layers", "view_layers"]


def view_layers(skeleton: Skeleton, index: dict[str, Entry], name: str, *, verify: bool = True) -> list[LayerPlan]:
    """Plan the reading of every MoE layer of ``skeleton``'s model from the checkpoint ``index``
    (``verify``: as for :func:`~modulart.introspect.skeleton.discover_moes`).

    Raises:
        UnsupportedModuleError: the MoE views refuse the model (as they would refuse it live), or a
            view is not a selection of a stored parameter.
        IncompatibleArtifactError: a tensor the views need is not in the checkpoint under any of
            its on-disk names, or has another shape (named).
    """
    moes = discover_moes(skeleton, verify=verify)
    resolver = _Resolver(skeleton, index, name)
    plans = []
    for pos, moe in enumerate(moes):
        members, tensors = [], {}
        for m, (member, mats) in enumerate(moe_members(moe)):
            members.append(member)
            for k, t in mats.items():
                tensors[(m, k)] = resolver.reader(t, f"{moe.path} {member.name} {k}")
        router = resolver.reader(moe.router_weight, f"{moe.path} router")
        plans.append(LayerPlan(moe.layer if moe.layer is not None else pos, moe.path, members, tensors, router))
    return plans


def dense_layers(skeleton: Skeleton, index: dict[str, Entry], name: str) -> dict[int, dict[str, TensorReader]]:
    """The dense FFNs of ``skeleton``'s model, per block index, as readers of the checkpoint ``index``.

    Raises:
        UnsupportedModuleError: the FFN views refuse the model, or finding its FFNs needs a forward
            (data-flow discovery) that the weightless model cannot run.
        IncompatibleArtifactError: a tensor the views need is not in the checkpoint.
    """
    from modulart.core.ffn import find_ffns

    try:
        ffns = find_ffns(skeleton.model, verify=False)
    except RuntimeError as e:  # data-flow discovery computes; a meta model cannot
        raise UnsupportedModuleError(
            f"{name}: finding the FFNs of {type(skeleton.model).__name__} needs a forward the weightless model "
            f"cannot run ({str(e).splitlines()[0]})"
        ) from e
    resolver = _Resolver(skeleton, index, name)
    out: dict[int, dict[str, TensorReader]] = {}
    for i, f in enumerate(ffns):
        out[f.layer if f.layer is not None else i] = {
            k: resolver.reader(t, f"{f.path} {k}") for k, t in ffn_matrices(f).items()
        }
    return out


class _Resolver:
    """Maps views of the skeleton's parameters to readers of the stored tensors."""

    def __init__(self, skeleton: Skeleton, index: dict[str, Entry], name: str) -> None:
        self.model, self.index, self.name = skeleton.model, index, name
        self.prefix = skeleton.base_prefix
        self.names = DiskNames(skeleton.model)
        self.owner: dict[int, str] = {}
        for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            self.owner.setdefault(id(t), n)
        self._stored: dict[str, list[tuple[str, Entry, Piece]]] = {}

    def reader(self, view: torch.Tensor, what: str) -> TensorReader:
        base = view._base if view._base is not None else view
        param = self.owner.get(id(base))
        if param is None:
            raise UnsupportedModuleError(
                f"{what}: the view is computed, not a selection of a stored parameter, so it cannot be streamed"
            )
        try:
            fp = footprint(view, base)
        except ValueError as e:
            raise UnsupportedModuleError(f"{what} (a view of {param!r}): {e}") from None
        stored = self.stored(param)
        for key, entry, piece in stored:
            local = locate(fp, piece)
            if local is not None:
                return StoredMatrix(entry, key, local)
        raise IncompatibleArtifactError(
            f"{self.name}: {what} spans several stored tensors ({sorted(k for k, _, _ in stored)[:4]})"
        )

    def stored(self, param: str) -> list[tuple[str, Entry, Piece]]:
        """The stored tensors of ``param``: the first on-disk layout whose tensors are all present."""
        if param not in self._stored:
            layouts: list[Layout] = [self.names.own(param)]
            why = ""
            try:
                layouts += [lay for lay in self.names.legacy(param) if lay != layouts[0]]
            except UnsupportedConversionError as e:
                why = f"; its historical names are not readable: {e}"
            for layout in layouts:
                found = [(self._lookup(n, p.shape), p) for n, p in layout.items()]
                if all(hit is not None for hit, _ in found):
                    self._stored[param] = [(*hit, p) for hit, p in found if hit is not None]
                    break
            else:
                raise IncompatibleArtifactError(self._missing(param, layouts) + why)
        return self._stored[param]

    def _lookup(self, name: str, shape: tuple[int, ...]) -> tuple[str, Entry] | None:
        """``name`` in the index (also with the base-model prefix added or removed), of ``shape``."""
        p = f"{self.prefix}." if self.prefix else ""
        for key in (name, name.removeprefix(p) if p and name.startswith(p) else f"{p}{name}"):
            entry = self.index.get(key)
            if entry is not None and entry.shape == shape:
                return key, entry
        return None

    def _missing(self, param: str, layouts: list[Layout]) -> str:
        forms = []
        for layout in layouts:
            bad = []
            for n, p in layout.items():
                if self._lookup(n, p.shape) is None:
                    e = self.index.get(n)
                    bad.append(f"{n!r} {list(p.shape)}" + (f" (found {list(e.shape)})" if e is not None else ""))
            forms.append(f"{len(bad)} of {len(layout)} tensors missing, e.g. {bad[0]}")
        stem = param.rsplit(".", 1)[0]
        quant = sorted(k for k in self.index if k.startswith(stem) and k.endswith(("_blocks", "_scales")))[:2]
        hint = f" (quantized tensors such as {quant} are not supported)" if quant else ""
        return f"{self.name}: the model's {param!r} is not in the checkpoint{hint}: " + " / ".join(forms)
