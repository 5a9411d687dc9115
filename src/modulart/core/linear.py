"""One linear map read and written in canonical ``[out_features, in_features]`` orientation.

``nn.Linear`` stores its weight as ``[out, in]``; Hugging Face's ``Conv1D`` (GPT-2 and relatives)
stores the transpose ``[in, out]``. :class:`LinearRef` hides the difference: ``weight`` is always a
*view* of the stored parameter in ``[out, in]`` orientation, so in-place edits through it change the
model, and :meth:`LinearRef.set_weight` copies a canonical tensor back whatever the storage.

A reference can also cover a block of output rows of one layer (``rows``): the gate and the up
halves of a fused ``gate_up_proj [2·d_ff, d_model]`` are two :class:`LinearRef` over the same module.

Example:
    >>> import torch
    >>> from modulart.core.linear import LinearRef
    >>> ref = LinearRef(torch.nn.Linear(3, 5), "fc")
    >>> tuple(ref.weight.shape), ref.in_features, ref.out_features
    ((5, 3), 3, 5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import ShapeError, UnsupportedModuleError

__all__ = ["LinearRef", "is_conv1d", "is_linear_like"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (weight stored ``[in, out]``), by duck typing."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass, e.g. PEFT/quantisation wrappers keeping ``weight``) or ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LinearRef:
    """A linear layer seen as ``y = x @ weight.T + bias`` with ``weight`` of shape ``[out, in]``.

    Args:
        module: an ``nn.Linear`` or HF ``Conv1D``.
        path: its dotted path in the model (for messages).
        rows: only these output rows of the layer (``slice(start, stop)``, step 1 or 2), or None for all.

    Example:
        >>> import torch
        >>> fused = torch.nn.Linear(3, 8)
        >>> up = LinearRef(fused, "gate_up", rows=slice(4, 8))
        >>> tuple(up.weight.shape), up.is_partial, torch.equal(up(torch.ones(3)), fused(torch.ones(3))[4:])
        ((4, 3), True, True)
    """

    __slots__ = ("module", "path", "rows", "transposed")

    def __init__(self, module: nn.Module, path: str, rows: slice | None = None) -> None:
        if not is_linear_like(module):
            raise UnsupportedModuleError(
                f"{path!r} is a {type(module).__name__}; expected nn.Linear or a Hugging Face Conv1D"
            )
        w = module.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise UnsupportedModuleError(f"{path!r}: expected a 2-D weight, got {getattr(w, 'shape', None)}")
        self.module = module
        self.path = path
        self.transposed = is_conv1d(module)
        self.rows = rows
        if rows is not None:
            n = int(w.shape[1] if self.transposed else w.shape[0])
            start, stop, step = rows.indices(n)
            if step not in (1, 2) or stop <= start:
                raise UnsupportedModuleError(f"{path!r}: bad row block {rows} of a layer with {n} output rows")

    @property
    def is_partial(self) -> bool:
        """Whether this reference covers only some output rows of its layer (fused projections)."""
        return self.rows is not None

    @property
    def param(self) -> torch.Tensor:
        """The stored weight parameter (storage orientation)."""
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w

    @property
    def weight(self) -> torch.Tensor:
        """``[out_features, in_features]`` view of the stored weight (of the covered rows)."""
        w = self.param.t() if self.transposed else self.param
        return w if self.rows is None else w[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        """``[out_features]`` bias (of the covered rows), or None."""
        b = getattr(self.module, "bias", None)
        if not isinstance(b, torch.Tensor):
            return None
        return b if self.rows is None else b[self.rows]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def set_weight(self, value: torch.Tensor) -> None:
        """Copy a canonical ``[out, in]`` tensor into the stored weight (no autograd tracking)."""
        _copy_into(self.weight, value, f"{self.path}.weight")

    def set_bias(self, value: torch.Tensor) -> None:
        """Copy a ``[out]`` tensor into the stored bias."""
        if self.bias is None:
            raise ShapeError(f"{self.path!r} has no bias to set")
        _copy_into(self.bias, value, f"{self.path}.bias")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        kind = "Conv1D" if self.transposed else type(self.module).__name__
        part = "" if self.rows is None else f", rows {self.rows.start}:{self.rows.stop}:{self.rows.step or 1}"
        return f"LinearRef({self.path!r}, {kind}, {self.in_features}->{self.out_features}{part})"


def _copy_into(dst: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(value.shape) != tuple(dst.shape):
        raise ShapeError(f"{what}: expected shape {tuple(dst.shape)}, got {tuple(value.shape)}")
    with torch.no_grad():
        dst.copy_(value)
