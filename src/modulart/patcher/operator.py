"""The patcher operator: resolve the FFN to patch, install the two hooks, hand back a :class:`Patcher`.

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
from typing import Any

from torch import nn

from modulart.core.operator import Handle, Operator, OperatorConfig, Plan
from modulart.patcher.config import PatcherConfig
from modulart.patcher.handle import Patcher
from modulart.patcher.layer import resolve_ffn

__all__ = ["PatcherOperator", "apply", "load"]


class PatcherOperator(Operator):
    """Transformer-Patcher as a modulart operator (registered as ``"patcher"``)."""

    name = "patcher"
    config_class = PatcherConfig
    handle_class = Patcher

    @classmethod
    def plan(cls, model: nn.Module, config: OperatorConfig) -> Plan:
        assert isinstance(config, PatcherConfig)
        ffn = resolve_ffn(model, config.layer, field="PatcherConfig.layer")
        return Plan(targets=[ffn.path], selector=str(config.layer), data={"ffn": ffn})

    @classmethod
    def install(cls, handle: Handle, plan: Plan) -> None:
        assert isinstance(handle, Patcher)
        handle._install()


def apply(model: nn.Module, config: PatcherConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Patcher:
    """Attach Transformer-Patcher to one FFN of ``model`` (the last by default).

    Args:
        model: any model whose FFNs modulart finds (BERT, GPT-2, Llama, T5, a plain ``nn.Module``...).
        config: a :class:`PatcherConfig` (or dict, or a preset such as ``PatcherConfig.llm()``);
            keyword overrides win (``layer=``, ``task=``, ...).

    Returns:
        The :class:`Patcher`: ``set_memory``, ``edit``, ``edit_batch``, ``patches``, ``fired``,
        ``remove``/``disable``/``enable``, ``bake``/``unbake``, ``save``.

    Example:
        >>> import torch, modulart.patcher as mp
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
        >>> p = mp.apply(model, task="generation")
        >>> p.cfg.position_policy
        'erroneous_target_tokens'
        >>> p.remove()
    """
    handle = PatcherOperator.apply(model, config, **overrides)
    assert isinstance(handle, Patcher)
    return handle


def load(model: nn.Module, directory: str | os.PathLike[str], *, check_fingerprint: bool = True) -> Patcher:
    """Re-apply patches saved with :meth:`Patcher.save` (checks the base-model fingerprint first)."""
    return Patcher.load(model, directory, check_fingerprint=check_fingerprint)
