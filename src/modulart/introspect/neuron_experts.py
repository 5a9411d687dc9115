"""Dense FFNs analysed as experts: what ``experts=`` accepts, read through the core protocol.

``experts=`` is any :class:`~modulart.core.neuron_groups.NeuronExperts` (an EMoE handle, for one:
``expert_groups() -> {ffn_path: NeuronExpertSplit}``) or a plain mapping
``{ffn_path: ExpertGroups}``. Introspect never imports an operator package: it only reads the
protocol.

Example:
    >>> import torch
    >>> from modulart.core.neuron_groups import ExpertGroups
    >>> splits = neuron_splits({"": ExpertGroups(torch.arange(8) % 2, 2)})
    >>> splits[""].groups.num_experts, splits[""].centroids is None
    (2, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

from modulart.core.errors import InvalidArgumentError
from modulart.core.neuron_groups import ExpertGroups, NeuronExperts, NeuronExpertSplit

__all__ = ["ExpertsSpec", "neuron_splits"]

ExpertsSpec: TypeAlias = NeuronExperts | Mapping[str, ExpertGroups]
"""What ``experts=`` accepts: a :class:`NeuronExperts` or ``{ffn_path: ExpertGroups}``."""


def neuron_splits(experts: ExpertsSpec) -> dict[str, NeuronExpertSplit]:
    """``{ffn_path: NeuronExpertSplit}`` of ``experts``.

    Raises:
        InvalidArgumentError: ``experts`` is neither a :class:`NeuronExperts` nor a mapping of
            :class:`ExpertGroups`.
    """
    source: object = experts
    if isinstance(source, NeuronExperts):
        splits = source.expert_groups()
        bad = [p for p, s in splits.items() if not isinstance(s, NeuronExpertSplit)]
        if bad:
            raise InvalidArgumentError(f"expert_groups(): values must be NeuronExpertSplit; not for {bad[:4]}")
        return {str(p): s for p, s in splits.items()}
    if isinstance(source, Mapping):
        bad = [p for p, g in source.items() if not isinstance(g, ExpertGroups)]
        if bad:
            raise InvalidArgumentError(f"experts mapping: values must be ExpertGroups; not for {bad[:4]}")
        return {str(p): NeuronExpertSplit(g) for p, g in source.items()}
    raise InvalidArgumentError(
        "experts must implement modulart.core.neuron_groups.NeuronExperts (e.g. an EMoE handle) or be a mapping "
        f"{{ffn_path: ExpertGroups}}, got {type(experts).__name__}"
    )
