"""The patcher operator: resolve the FFN to patch, install the two hooks, hand back a :class:`PatcherHandle`.

Example:
    >>> import torch
    >>> import modulart.patcher as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> p = mp.apply(model, layer="last")
    >>> p.ffn.path, len(p.registry)
    ('', 2)
    >>> mp.apply(model, layer="blocks.9.mlp")
    Traceback (most recent call last):
    ...
    modulart.core.errors.SelectorError: PatcherConfig.layer = 'blocks.9.mlp': no FFN at that path; FFNs: ['']
    >>> p.remove()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from modulart.core.ffn import FFN
from modulart.core.operator import Operator, Plan
from modulart.core.unwrap import refuse_sharded
from modulart.patcher.config import PatcherConfig
from modulart.patcher.handle import PatcherHandle
from modulart.patcher.layer import resolve_ffn

__all__ = ["Patcher", "PatcherPlan", "apply", "load"]


@dataclass(kw_only=True)
class PatcherPlan(Plan):
    """The FFN the patcher acts on (resolved from ``PatcherConfig.layer``).

    Attributes:
        ffn: the resolved FFN view; ``targets`` holds its path.
    """

    ffn: FFN


class Patcher(Operator[PatcherConfig, PatcherPlan, PatcherHandle]):
    """Transformer-Patcher as a modulart operator (registered as ``"patcher"``)."""

    name = "patcher"

    @classmethod
    def plan(cls, model: nn.Module, config: PatcherConfig) -> PatcherPlan:
        refuse_sharded(model, "Transformer-Patcher", "apply, then fully_shard the blocks and the root")
        ffn = resolve_ffn(model, config.layer, field="PatcherConfig.layer")
        return PatcherPlan(targets=[ffn.path], selector=str(config.layer), ffn=ffn)

    @classmethod
    def install(cls, handle: PatcherHandle, plan: PatcherPlan) -> None:
        handle.install_hooks()


def apply(model: nn.Module, config: PatcherConfig | Mapping[str, Any] | None = None, **overrides: Any) -> PatcherHandle:
    """Attach Transformer-Patcher to one FFN of ``model`` (the last by default).

    Args:
        model: any model whose FFNs modulart finds (BERT, GPT-2, Llama, T5, a plain ``nn.Module``...).
        config: a :class:`PatcherConfig` (or dict, or a preset such as ``PatcherConfig.llm()``);
            keyword overrides win (``layer=``, ``task=``, ...).

    Returns:
        The :class:`PatcherHandle`: ``set_memory``, ``edit``, ``edit_batch``, ``patches``, ``fired``,
        ``remove_patch``/``disable_patch``/``enable_patch``, ``bake``/``unbake``, ``save``, and the
        verbs every handle has (``remove``/``disable``/``enable`` act on the whole patcher).

    Example:
        >>> import torch, modulart.patcher as mp
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
        >>> p = mp.apply(model, task="generation")
        >>> p.config.position_policy
        'erroneous_target_tokens'
        >>> p.remove()
    """
    return Patcher.apply(model, config, **overrides)


def load(model: nn.Module, path_or_repo_id: str | os.PathLike[str], *, check_fingerprint: bool = True) -> PatcherHandle:
    """Re-apply patches saved with :meth:`PatcherHandle.save` (sugar for :meth:`PatcherHandle.load`).

    The base-model fingerprint is checked first; the artefact is the common one, so
    ``modulart.load(model, path)`` gives the same handle.

    Example:
        >>> import tempfile, torch, modulart.patcher as mp
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
        >>> p = mp.apply(model)
        >>> d = p.save(tempfile.mkdtemp() + "/patches"); p.remove()
        >>> q = mp.load(model, d); q.patches, q.ffn.path
        ([], '')
        >>> q.remove()
    """
    return PatcherHandle.load(model, path_or_repo_id, check_fingerprint=check_fingerprint)
