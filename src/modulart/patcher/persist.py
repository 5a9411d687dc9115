"""Save and load a patcher: the patch tensors as safetensors, provenance and counters as JSON.

The artefact is the common modulart one (``modulart_config.json`` + ``modulart_state.safetensors``,
written atomically, base-model fingerprint checked on load); the patches' provenance and the id
counters travel in its ``extra`` metadata, the memory set optionally as a ``memory`` tensor.

Example:
    >>> import tempfile, torch, modulart.patcher as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> p = mp.apply(model)
    >>> d = p.save(tempfile.mkdtemp() + "/patches"); p.remove()
    >>> q = mp.load(model, d); q.patches, q.ffn.path
    ([], '')
    >>> q.remove()
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from modulart.core.errors import IncompatibleArtifactError
from modulart.core.io import from_pretrained, load_artifact, save_artifact
from modulart.patcher.config import PatcherConfig
from modulart.patcher.handle import Patcher
from modulart.patcher.records import Patch

__all__ = ["load_patcher", "save_patcher"]


def save_patcher(patcher: Patcher, directory: str | os.PathLike[str], *, include_memory: bool = False) -> Path:
    """Write ``patcher``'s patches, provenance (and memory) to ``directory`` atomically."""
    tensors = patcher.state_dict()
    if include_memory and patcher.memory is not None:
        tensors["memory"] = patcher.memory
    extra = {
        "layer": patcher.ffn.path,
        "patches": [p.to_dict() for p in patcher.patches],
        "next_patch": patcher._next_patch,
        "next_edit": patcher._next_edit,
    }
    return save_artifact(
        directory,
        operator=patcher.operator.name,
        config=patcher.config.to_dict(),
        tensors=tensors,
        fingerprint=patcher.base_fingerprint,
        selector=str(patcher.cfg.layer),
        resolved=patcher.plan.targets,
        extra=extra,
    )


def load_patcher(model: nn.Module, directory: str | os.PathLike[str], *, check_fingerprint: bool = True) -> Patcher:
    """Apply the patcher saved in ``directory`` to ``model``; nothing stays applied if anything fails."""
    art = load_artifact(from_pretrained(directory))
    if art.operator != "patcher":
        raise IncompatibleArtifactError(f"{art.path} holds a {art.operator!r} artefact, not patcher patches")
    if check_fingerprint:
        art.check_fingerprint(model)
    from modulart.patcher.operator import PatcherOperator

    extra = art.meta.get("extra", {})
    patches = [Patch.from_dict(p) for p in extra.get("patches", [])]
    handle = PatcherOperator.apply(model, PatcherConfig.from_dict(art.config))
    assert isinstance(handle, Patcher)
    try:
        if extra.get("layer") != handle.ffn.path:
            raise IncompatibleArtifactError(
                f"{art.path}: patches were made for FFN {extra.get('layer')!r}, the config resolves to "
                f"{handle.ffn.path!r} on this model"
            )
        state = dict(art.tensors)
        memory = state.pop("memory", None)
        handle.bank.load_state_dict(state, [p.id for p in patches])
        handle._patches = {p.id: p for p in patches}
        handle.memory = memory.to(handle.bank.device) if memory is not None else None
        handle._next_patch = int(extra.get("next_patch", len(patches) + 1))
        handle._next_edit = int(extra.get("next_edit", 1))
    except BaseException:
        handle.remove()
        raise
    return handle
