"""A checkpoint's model, built without its weights, and the MoE views of it.

A checkpoint directory with a ``config.json`` describes its model completely: transformers builds
the model class from the config on the ``meta`` device (shapes and structure, no memory), and the
same MoE discovery that serves live models (:func:`~modulart.core.moe.find_moes`) finds its blocks
and lays out their experts. A meta model cannot compute, so discovery runs without its forward
check; instead, when discovery verifies views, one block of each kind is built for real (random
weights, one block in memory, then freed) and discovered *with* the check: a block that a live
model's view would refuse is refused here too, and the verified view must read the same tensors in
the same places as the weightless one.

Example:
    >>> import tempfile, json
    >>> d = tempfile.mkdtemp()
    >>> load_skeleton(d) is None                       # no config.json: nothing to build
    True
"""

from __future__ import annotations

import copy
import inspect
import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulart.core.errors import IncompatibleArtifactError, UnsupportedModuleError
from modulart.core.moe import MoE, find_moes
from modulart.introspect.footprint import Footprint, footprint
from modulart.introspect.members import moe_members

__all__ = ["Skeleton", "discover_moes", "geometry", "load_skeleton"]


class Skeleton:
    """A meta-device model built from a checkpoint's ``config.json``.

    Attributes:
        model: the model (every tensor on ``meta``).
        model_type: the config's ``model_type``.
    """

    def __init__(self, model: nn.Module, model_type: str) -> None:
        self.model, self.model_type = model, model_type

    @property
    def base_prefix(self) -> str:
        """``base_model_prefix`` of the model class (``"model"`` for most decoders), or ``""``."""
        return str(getattr(self.model, "base_model_prefix", "") or "")


def load_skeleton(directory: str | PathLike[str]) -> Skeleton | None:
    """The model of ``directory`` on the meta device, or None when it cannot be built from a config.

    None (the caller falls back to reading key names) when there is no ``config.json``, it names no
    ``model_type``, transformers is not installed, or transformers does not know the model type
    (custom code is never run).

    Raises:
        IncompatibleArtifactError: transformers knows the model type but no model class could be
            built from the config (the reasons are named).
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IncompatibleArtifactError(f"{path}: unreadable config ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str):
        return None
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    except ImportError:
        return None
    try:
        cfg = AutoConfig.from_pretrained(str(Path(directory)), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError):  # a model type transformers does not know (custom code is not run)
        return None
    errors = []
    for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel):
        try:
            with torch.device("meta"):
                model = auto.from_config(cfg)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            errors.append(f"{auto.__name__}: {str(e).splitlines()[0][:160]}")
            continue
        assert isinstance(model, nn.Module)
        return Skeleton(model.eval(), model_type)
    raise IncompatibleArtifactError(f"{path}: no model could be built from the config ({'; '.join(errors)})")


def _takes_verify() -> bool:
    return "verify" in inspect.signature(find_moes).parameters


def discover_moes(skeleton: Skeleton, *, verify: bool = True, seed: int = 0) -> list[MoE]:
    """The MoE views of ``skeleton.model``, refused exactly where a live model's would be.

    Args:
        skeleton: the meta-device model.
        verify: check one real copy of each kind of block (holds one block's parameters, in the
            checkpoint's dtype, in memory for the check); ``False`` trusts discovery without weights,
            like ``find_moes(..., verify=False)``.
        seed: of the copy's random weights.

    Raises:
        UnsupportedModuleError: discovery finds no MoE block, or refuses one (the reason is the
            live discovery's own).
    """
    discover: Any = find_moes  # ``verify=`` is newer than some versions of core
    try:
        moes: list[MoE] = discover(skeleton.model, verify=False) if _takes_verify() else find_moes(skeleton.model)
    except RuntimeError as e:  # a part of discovery that computes, which a meta model cannot
        raise UnsupportedModuleError(
            f"{type(skeleton.model).__name__} ({skeleton.model_type}): discovering its MoE blocks needs a "
            f"computation the weightless model cannot run ({str(e).splitlines()[0]})"
        ) from e
    if not verify or not _takes_verify():
        return moes
    checked: set[tuple[Any, ...]] = set()
    for moe in moes:
        kind = (type(moe.module), tuple((n, tuple(p.shape)) for n, p in moe.module.named_parameters()))
        if kind not in checked:
            _verify_block(moe, seed)
            checked.add(kind)
    return moes


def _verify_block(moe: MoE, seed: int) -> None:
    """Build ``moe``'s block on the CPU with random weights, discover it with the forward check, and
    require the verified view to read the same tensors, in the same places, as the weightless one."""
    block = copy.deepcopy(moe.module).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*block.parameters(), *block.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * 0.1)
            else:
                t.zero_()
    discover: Any = find_moes
    where = f"{moe.path} ({type(moe.module).__name__})"
    try:
        verified = discover(block, verify=True)
    except UnsupportedModuleError as e:
        raise UnsupportedModuleError(f"{where}: {e}") from None
    own = [v for v in verified if v.module is block]
    if len(own) != 1 or geometry(own[0]) != geometry(moe):
        raise UnsupportedModuleError(
            f"{where}: the view verified on a real copy of the block reads other tensors than the one "
            "discovered without weights; streaming it could read the experts differently from a live model"
        )


def geometry(moe: MoE) -> list[tuple[str, str, str, Footprint | None]]:
    """What ``moe``'s members are made of: ``(member, matrix, parameter of the block, footprint)``,
    the router last (parameter names relative to the block).

    Example:
        >>> from modulart.introspect.toy import toy_moe
        >>> from modulart.core.moe import find_moes
        >>> geometry(find_moes(toy_moe())[0])[0][:3]
        ('e0', 'act', 'experts.0.gate_proj.weight')
    """
    owner = {id(t): n for n, t in [*moe.module.named_parameters(), *moe.module.named_buffers()]}
    rows = [(m.name, k, t) for m, mats in moe_members(moe) for k, t in mats.items()]
    rows.append(("router", "weight", moe.router_weight))
    out: list[tuple[str, str, str, Footprint | None]] = []
    for name, k, t in rows:
        base = t._base if t._base is not None else t
        try:
            fp: Footprint | None = footprint(t, base)
        except ValueError:
            fp = None
        out.append((name, k, owner.get(id(base), "?"), fp))
    return out
