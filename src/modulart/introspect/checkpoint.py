"""Expert weights straight from a directory of (sharded) safetensors, one slice at a time.

Nothing is loaded up front: the constructor reads only the files' headers (names, shapes, dtypes),
finds the MoE layers and checks every tensor they need; the data are then read per member and per
chunk with ``safe_open(...).get_slice`` (:mod:`~modulart.introspect.stored`), so peak memory stays
at one chunk of one layer's members, whatever the model size.

Which tensors make up which expert comes from one place, the model's own MoE views:

- with a ``config.json`` (primary): the model is built on the meta device, its MoE blocks are
  discovered as for a live model, and every view's canonical matrices are mapped to the stored
  tensors — under the model's parameter names or under the historical names that transformers'
  conversion mapping reads and ``save_pretrained`` writes (Mixtral's per-expert ``w1/w3/w2``,
  GraniteMoE's ``input_linear`` / ``output_linear`` / ``router.layer``, ...). Live and streamed
  analyses then see the same members, shared experts included; blocks the views refuse are refused.
- without a usable config (fallback): layers are recognised by key names
  (:mod:`~modulart.introspect.keyed`), which reads the same members for the key styles it knows.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> t = {"model.layers.0.mlp.gate.weight": torch.randn(2, 4)}
    >>> for e in range(2):
    ...     for n, s in (("gate_proj", (6, 4)), ("up_proj", (6, 4)), ("down_proj", (4, 6))):
    ...         t[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = torch.randn(*s)
    >>> save_file(t, f"{d}/model.safetensors")
    >>> src = CheckpointSource(d)                    # no config.json: key names
    >>> r = src.layer(0)
    >>> src.mode, src.layer_indices, r.members, r.shape(1, "down")
    ('keys', [0], ['e0', 'e1'], (4, 6))
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from os import PathLike
from typing import TYPE_CHECKING, Literal

from modulart.core.errors import IncompatibleArtifactError, ShapeError
from modulart.introspect.keyed import ROLE, keyed_layers
from modulart.introspect.sources import LayerPlan, LayerReader, Member, TensorReader, WeightSource
from modulart.introspect.stored import StoredMatrix, checkpoint_index, plain

if TYPE_CHECKING:
    from modulart.introspect.live import DenseSpec

__all__ = ["CheckpointSource", "DenseCheckpoint", "checkpoint_index"]

logger = logging.getLogger(__name__)

_DENSE = re.compile(
    r"^(?:.*\.)?(?P<layer>\d+)\.(?:mlp|feed_forward)\.(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)


class CheckpointSource(WeightSource):
    """The MoE layers of a safetensors checkpoint directory, streamed (see the module docstring).

    Args:
        directory: the checkpoint directory (``*.safetensors``, optionally sharded with an index,
            and normally its ``config.json``).
        dense: optional dense reference (checkpoint dir or ``nn.Module``) giving the ``F`` member.
        verify: with a config, check one real copy of each kind of MoE block against its forward,
            as live discovery does (one block's parameters in memory, once); ``False`` trusts
            discovery on the weightless model, like ``find_moes(..., verify=False)``.

    Attributes:
        mode: ``"config"`` (layers from the model's MoE views) or ``"keys"`` (from key names).

    Raises:
        UnsupportedModuleError: the model's MoE views refuse it (as they would refuse it live).
        IncompatibleArtifactError: no MoE layer found, a missing tensor, or a wrong shape (named).
    """

    def __init__(self, directory: str | PathLike[str], *, dense: DenseSpec = None, verify: bool = True) -> None:
        from modulart.introspect.live import dense_members
        from modulart.introspect.skeleton import load_skeleton

        self.name = str(directory)
        self.index = checkpoint_index(directory)
        self._dense = dense_members(dense)
        skeleton = load_skeleton(directory)
        self.mode: Literal["config", "keys"]
        if skeleton is None:
            logger.info("%s: no usable config.json; MoE layers are recognised by their key names", self.name)
            self.mode = "keys"
            self._plans = keyed_layers(self.index, self.name)
        else:
            from modulart.introspect.viewplan import view_layers

            self.mode = "config"
            self._plans = view_layers(skeleton, self.index, self.name, verify=verify)

    @property
    def layer_indices(self) -> list[int]:
        return [p.layer for p in self._plans]

    def layer(self, position: int) -> LayerReader:
        plan: LayerPlan = self._plans[self._check_position(position)]
        members, tensors = list(plan.members), dict(plan.tensors)
        if self._dense is not None:
            dense = self._dense.tensors(plan.layer)
            if dense is None:
                raise ShapeError(f"the dense reference has no FFN at layer {plan.layer} (needed for {plan.label})")
            members.append(Member("F", "dense"))
            tensors.update({(len(members) - 1, k): v for k, v in dense.items()})
        return LayerReader(plan.layer, plan.label, members, tensors, plan.router.full())


class DenseCheckpoint:
    """The dense FFNs of a safetensors checkpoint: the ``F`` reference of the S1 maps.

    With a ``config.json`` the FFNs are the model's own FFN views (built on the meta device), read
    wherever they are stored; without one, keys ``<...>.{layer}.mlp.gate_proj/up_proj/down_proj.weight``
    (or ``w1/w3/w2``).

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
        from modulart.introspect.skeleton import load_skeleton

        self.name = str(directory)
        self.index = checkpoint_index(directory)
        skeleton = load_skeleton(directory)
        self.mode: Literal["config", "keys"] = "keys" if skeleton is None else "config"
        if skeleton is not None:
            from modulart.introspect.viewplan import dense_layers

            self._layers = dense_layers(skeleton, self.index, self.name)
        else:
            self._layers = self._keyed()
        if not self._layers:
            raise IncompatibleArtifactError(
                f"{directory}: no dense FFN keys like '<...>.{{layer}}.mlp.gate_proj.weight'"
            )

    def tensors(self, layer: int) -> dict[str, TensorReader] | None:
        """Canonical readers of layer ``layer``'s FFN, or None when it has none."""
        return self._layers.get(layer)

    def _keyed(self) -> dict[int, dict[str, TensorReader]]:
        layers: dict[int, dict[str, str]] = defaultdict(dict)
        for k in self.index:
            m = _DENSE.match(k)
            if m is not None and ".experts." not in k:
                layers[int(m["layer"])][ROLE[m["name"]]] = k
        out: dict[int, dict[str, TensorReader]] = {}
        for layer, keys in layers.items():
            if "act" not in keys or "down" not in keys:
                raise IncompatibleArtifactError(
                    f"{self.name}: dense layer {layer} lacks {sorted({'act', 'down'} - set(keys))}"
                )
            inter, d = self.index[keys["act"]].shape
            out[layer] = {}
            for role, shape in (("act", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                if role in keys:
                    e = self.index[keys[role]]
                    if e.shape != shape:
                        raise IncompatibleArtifactError(
                            f"{self.name}: tensor {keys[role]!r} has shape {list(e.shape)}, expected {list(shape)}"
                        )
                    out[layer][role] = StoredMatrix(e, keys[role], plain(shape))
        return out
