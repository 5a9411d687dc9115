"""Typed records of Transformer-Patcher: a patch neuron's provenance, an edit's result, firing telemetry.

Example:
    >>> from modulart.patcher.records import Patch, content_hash
    >>> import torch
    >>> p = Patch(id="p000001", edit_id="e000001", layer="encoder.layer.5", position=0, policy="cls",
    ...           input_hash=content_hash({"input_ids": torch.tensor([[101, 7, 102]])}), target_hash=content_hash(3))
    >>> Patch.from_dict(p.to_dict()) == p
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["EditResult", "FiringReport", "Patch", "content_hash"]


def content_hash(obj: Any) -> str:
    """A short sha256 of tensors / ints / strings / mappings of them (for provenance, not security).

    Example:
        >>> content_hash(torch.tensor([1, 2])) == content_hash(torch.tensor([1, 2]))
        True
        >>> content_hash(torch.tensor([1, 2])) == content_hash(torch.tensor([2, 1]))
        False
    """
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, Mapping):
            for k in sorted(o):
                h.update(str(k).encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            for x in o:
                feed(x)
        else:
            h.update(repr(o).encode())

    feed(obj)
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Patch:
    """One patch neuron and where it came from.

    Attributes:
        id: unique id within its patcher (``p000001``...).
        edit_id: the edit that created it (an edit may add several neurons).
        layer: path of the patched FFN.
        position: token position it was trained to fire at (in the edit's input).
        policy: the position policy (``cls``, ``erroneous_target_tokens``, ``last_prompt``, ``all``).
        input_hash / target_hash: :func:`content_hash` of the edit input and target.
        text / target_text: the edit's text and target text, when the caller gave them.
        base_model: digest of the base-model fingerprint.
        hyperparameters: the training settings that shaped it.
        steps: optimisation steps taken for its edit.
        edit_activation: its pre-activation on the (clean) edit input at ``position``.
        max_memory_activation: its largest pre-activation over the memory set.
        success: whether its edit was right after training.
    """

    id: str
    edit_id: str
    layer: str
    position: int
    policy: str
    input_hash: str
    target_hash: str
    text: str | None = None
    target_text: str | None = None
    base_model: str = ""
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    steps: int = 0
    edit_activation: float = 0.0
    max_memory_activation: float = 0.0
    success: bool = False

    @property
    def edit_margin(self) -> float:
        """``edit_activation − max_memory_activation`` (the γ margin achieved)."""
        return self.edit_activation - self.max_memory_activation

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Patch:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class EditResult:
    """What one call of :meth:`~modulart.patcher.PatcherHandle.edit` did.

    Attributes:
        edit_id: id of the edit.
        patch_ids: ids of the neurons it added (empty when skipped or failed and discarded).
        success: the edit is right after training (``True`` as well when it was skipped).
        skipped: the model was already right, so nothing was trained.
        steps: optimisation steps taken.
        margins: per neuron: ``edit_activation``, ``max_memory_activation``, ``edit_margin``
            (edit − max memory − γ: ≥ 0 when the γ margin holds) and ``silence_margin``
            (β − max memory: ≥ 0 when the β margin holds).
        losses: the total loss per step.
        seconds: wall time of the edit.
    """

    edit_id: str
    patch_ids: list[str]
    success: bool
    skipped: bool = False
    steps: int = 0
    margins: list[dict[str, float]] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def margins_hold(self) -> bool:
        """Every neuron reached both margins (vacuously true when no neuron was added)."""
        return all(m["edit_margin"] >= 0 and m["silence_margin"] >= 0 for m in self.margins)


@dataclasses.dataclass
class FiringReport:
    """Which patches fired where on a batch.

    Attributes:
        patch_ids: the patches, in bank order.
        activations: ``[batch, seq, n_patches]`` fp32 pre-activations at the patched FFN's input.
        threshold: a patch fired where its pre-activation exceeds this.
    """

    patch_ids: list[str]
    activations: torch.Tensor
    threshold: float

    @property
    def mask(self) -> torch.Tensor:
        """``[batch, seq, n_patches]`` bool: fired."""
        return self.activations > self.threshold

    def fired(self) -> dict[str, list[tuple[int, int]]]:
        """Patch id -> the (batch, position) pairs where it fired (patches that never fired left out)."""
        out: dict[str, list[tuple[int, int]]] = {}
        idx = self.mask.nonzero().tolist()
        for b, s, p in idx:
            out.setdefault(self.patch_ids[p], []).append((b, s))
        return out

    def counts(self) -> dict[str, int]:
        """Patch id -> number of positions it fired at (every patch listed)."""
        n = self.mask.sum(dim=(0, 1)).tolist()
        return dict(zip(self.patch_ids, (int(v) for v in n), strict=True))
