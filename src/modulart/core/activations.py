"""Activations identified by what they compute, not by their class name.

A feed-forward block's activation may be a module of any class (``nn.GELU``, transformers'
``GELUTanh``, a parametrised xIELU), a plain function kept as an attribute (``F.relu`` in
``nn.TransformerEncoderLayer``) or code inside ``forward``. :func:`identify_activation` evaluates a
callable on a fixed grid and names the :data:`CATALOGUE` entry it equals (or None: it is then used
as the opaque callable it is). :func:`is_elementwise_nonlinear` is the test every FFN activation
must pass: it acts on each neuron alone, and it is not (numerically) linear.

Example:
    >>> import torch
    >>> from modulart.core.activations import identify_activation
    >>> identify_activation(torch.nn.GELU(approximate="tanh")), identify_activation(torch.nn.functional.relu)
    ('gelu_tanh', 'relu')
    >>> identify_activation(lambda x: torch.relu(x) ** 2), identify_activation(lambda x: x.sin()) is None
    ('relu2', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["CATALOGUE", "Activation", "identify_activation", "is_elementwise_nonlinear"]

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


def _gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(math.sqrt(8 / math.pi) * x)


CATALOGUE: dict[str, Activation] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
    "relu2": _relu2,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "elu": F.elu,
    "selu": F.selu,
    "celu": F.celu,
    "leaky_relu": _leaky_relu,
    "softplus": F.softplus,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "gelu_sigmoid": _gelu_sigmoid,
}
"""Named activations, in the order they are tried."""

_GRID = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float64)


def _evaluate(fn: Activation, x: torch.Tensor, like: torch.Tensor | None) -> tuple[torch.Tensor, bool] | None:
    """``(fn(x), exact)``: in float64 when ``fn`` accepts it (``exact``), else in ``like``'s
    dtype/device; None if it fails."""
    tries = [(torch.float64, x.device, True)]
    if like is not None:
        tries.append((like.dtype, like.device, False))
    for dtype, device, exact in tries:
        try:
            out = fn(x.to(dtype=dtype, device=device))
        except Exception:  # user code: any failure means "cannot evaluate here"
            continue
        if isinstance(out, torch.Tensor) and out.shape == x.shape:
            return out.detach().to(torch.float64).cpu(), exact and out.dtype == torch.float64
    return None


def identify_activation(fn: Activation, like: torch.Tensor | None = None) -> str | None:
    """The :data:`CATALOGUE` name of the function ``fn`` computes, or None.

    Args:
        fn: a module or function ``[...] -> [...]``.
        like: a tensor of the dtype/device to evaluate ``fn`` in when it refuses float64 on CPU.

    Returns:
        The name whose values agree with ``fn`` on ``[-8, 8]`` to 1e-5 (relative), else None.
    """
    evaluated = _evaluate(fn, _GRID, like)
    if evaluated is None:
        return None
    got, exact = evaluated
    tol = 1e-5 if exact else 1e-2
    scale = float(got.abs().max().clamp_min(1.0))
    for name, ref in CATALOGUE.items():
        if float((ref(_GRID) - got).abs().max()) <= tol * scale:
            return name
    return None


def is_elementwise_nonlinear(fn: Activation, sample: torch.Tensor) -> bool:
    """Whether ``fn`` maps each element on its own (changing other columns leaves a column
    unchanged) and is not an affine map of its input — what a neuron's activation must be.

    Args:
        fn: the candidate activation.
        sample: a typical input ``[..., d_ff]`` (e.g. the pre-activations of a probe).
    """
    with torch.no_grad():
        try:
            base = fn(sample)
            other = sample.clone()
            other[..., 1:] = sample[..., 1:].flip(-1) * 1.5 + 0.25
            moved = fn(other)
        except Exception:  # user code: any failure means "not an activation"
            return False
        if not (isinstance(base, torch.Tensor) and isinstance(moved, torch.Tensor)) or base.shape != sample.shape:
            return False
        if not torch.allclose(moved[..., :1].double(), base[..., :1].double(), rtol=1e-4, atol=1e-6):
            return False
        grid = _GRID.to(sample.dtype)
        evaluated = _evaluate(fn, grid, sample)
        if evaluated is None:
            return False
        out = evaluated[0]
        a = torch.stack([grid.double(), torch.ones_like(grid, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(a, out.unsqueeze(1)).solution
        residual = float((a @ coef - out.unsqueeze(1)).abs().max())
        return residual > 1e-3 * float(out.abs().max().clamp_min(1.0))
