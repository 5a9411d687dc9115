"""Which trainable parameters MIGU leaves ungated, and the one warning that names them.

MIGU gates output units of linear maps: ``nn.Linear`` / ``Conv1D`` layers, MoE routers and the
per-expert projections of fused experts. Three kinds of trainable parameters are ungated *by
design* (as the reference method, which gates linear layers only) and never warned about:

- input embeddings (``nn.Embedding`` weights) and anything sharing storage with them;
- the LM head (``lm_head`` / ``get_output_embeddings()``);
- normalisation layers (modules whose class is a torch norm or whose class name contains "Norm").

Everything else that requires grad and is not gated (e.g. ``nn.MultiheadAttention.in_proj_weight``,
GPT-OSS attention sinks, fused experts of an unknown layout, or experts when ``moe=False``) trains
ungated, and :func:`warn_ungated` names every such parameter in one :class:`MIGUCoverageWarning`.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    >>> model.register_parameter("scale", torch.nn.Parameter(torch.ones(4)))
    >>> ungated(model, gated={id(model[2].weight), id(model[2].bias)})
    ['scale']
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from torch import nn

from modulart.migu.targets import Discovery, by_design_ungated

__all__ = ["MIGUCoverageWarning", "gated_params", "ungated", "warn_ungated"]

_RMS = getattr(nn, "RMSNorm", nn.LayerNorm)  # torch < 2.4 has no nn.RMSNorm
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, _RMS)


class MIGUCoverageWarning(UserWarning):
    """Some trainable parameters are not gated by MIGU and train with plain updates."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()


def gated_params(discovery: Discovery) -> set[int]:
    """``id`` of every parameter MIGU gates (weights and biases of targets, fused expert tensors)."""
    ids = {id(t.weight) for t in discovery.targets} | {id(t.bias) for t in discovery.targets if t.bias is not None}
    for fe in discovery.experts:
        ids |= {id(p) for p in fe.params()}
    return ids


def ungated(model: nn.Module, gated: set[int]) -> list[str]:
    """Names of the trainable parameters of ``model`` that are neither in ``gated`` nor ungated by design."""
    skip = by_design_ungated(model) | {
        id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)
    }
    ptrs = {p.data_ptr() for p in model.parameters() if id(p) in skip and p.numel()}
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in gated and id(p) not in skip and not (p.numel() and p.data_ptr() in ptrs)
    ]


def warn_ungated(model: nn.Module, discovery: Discovery, *, stacklevel: int = 2) -> list[str]:
    """Warn once (:class:`MIGUCoverageWarning`) naming every ungated trainable parameter; returns their names."""
    names = ungated(model, gated_params(discovery))
    if names:
        warnings.warn(_message(names, discovery.refused), MIGUCoverageWarning, stacklevel=stacklevel + 1)
    return names


def _message(names: list[str], refused: Mapping[str, str]) -> str:
    why = "".join(f"\n  {path}: {reason}" for path, reason in refused.items())
    return (
        f"MIGU leaves {len(names)} trainable parameter(s) ungated; they train with plain updates: "
        + ", ".join(names)
        + (f"\nfused experts MIGU could not gate exactly:{why}" if why else "")
        + "\n(embeddings, the LM head and norm layers are ungated by design and not listed)"
    )
