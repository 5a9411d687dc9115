"""What a KV handle trains: rows per block and tensor, with counts of trainable elements.

Example:
    >>> from modulart.kv.report import KVReport, ReportRow
    >>> rep = KVReport([ReportRow("mlp", "mlp.fc.weight", "key", (8, 4), 16, 32)], model_total=100)
    >>> rep.trainable, round(rep.fraction, 2)
    (16, 0.16)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["KVReport", "ReportRow"]


@dataclass(frozen=True)
class ReportRow:
    """One trained tensor.

    Attributes:
        layer: the FFN / MoE block path.
        matrix: the trained tensor's name (a model parameter, or ``<module>.lora_A|B``).
        role: ``key`` / ``gate`` / ``up`` / ``value`` (``+`` joined when one fused tensor holds several),
            ``*_bias``, or ``lora_A`` / ``lora_B`` of a role.
        shape: the tensor's shape.
        trainable: elements that receive gradient (mask mode: only the kept neuron slices).
        total: elements of the tensor.
    """

    layer: str
    matrix: str
    role: str
    shape: tuple[int, ...]
    trainable: int
    total: int


@dataclass
class KVReport:
    """The rows plus totals; ``str(report)`` is a printable table."""

    rows: list[ReportRow] = field(default_factory=list)
    model_total: int = 0

    @property
    def trainable(self) -> int:
        """Trainable elements over all rows."""
        return sum(r.trainable for r in self.rows)

    @property
    def fraction(self) -> float:
        """``trainable`` / the model's parameter count."""
        return self.trainable / self.model_total if self.model_total else 0.0

    def by_layer(self) -> dict[str, int]:
        """Trainable elements per block."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.layer] = out.get(r.layer, 0) + r.trainable
        return out

    def __str__(self) -> str:
        head = ("layer", "matrix", "role", "shape", "trainable", "total")
        body = [
            (r.layer, r.matrix, r.role, "x".join(map(str, r.shape)), f"{r.trainable:,}", f"{r.total:,}")
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=False)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in (head, *body)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"trainable {self.trainable:,} of {self.model_total:,} model parameters ({100 * self.fraction:.3f}%)"
        )
        return "\n".join(lines)
