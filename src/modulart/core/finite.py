"""Whether a tensor holds only finite values, in one cheap reduction.

A sum with a NaN or an infinity in it is never finite, so a finite sum proves every entry finite;
only a non-finite sum (a bad entry, or an overflow of the sum itself) needs the entrywise check.
The common case costs one read of the tensor and no ``[...]``-sized boolean temporary.

Example:
    >>> import torch
    >>> from modulart.core.finite import all_finite
    >>> all_finite(torch.ones(3, 4)), all_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
    >>> all_finite(torch.full((2,), 6e4, dtype=torch.float16))  # the sum overflows, the entries do not
    True
"""

from __future__ import annotations

import torch

__all__ = ["all_finite"]


def all_finite(t: torch.Tensor) -> bool:
    """``bool(t.isfinite().all())`` for a floating tensor ``[...]`` (any shape, any device), computed
    as one sum and, only when that sum is not finite, the entrywise check. Integer and bool
    tensors are always finite."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    t = t.detach()
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(t.isfinite().all())
