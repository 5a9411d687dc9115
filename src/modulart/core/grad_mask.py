"""Row / column masks on gradients and on optimizer updates — the mechanism MIGU and KV share.

A :class:`GradientMasker` holds, per parameter, a boolean ``keep`` vector over one axis (the output
units of a linear layer: rows of an ``nn.Linear`` weight, columns of a HF ``Conv1D`` weight, or
any axis you name) — or, for fused expert parameters ``[E, ...]`` whose experts each keep their own
units, a ``keep [E, U]`` matrix over the expert axis 0 and the unit axis — and

- zeroes the gradient slices that are not kept (:meth:`GradientMasker.mask_`), once per optimizer
  step, right before ``optimizer.step()`` through a step pre-hook, or earlier by an explicit call
  (loops that clip gradients call ``mask_()`` before clipping; the pre-hook then does nothing);
- with ``freeze=True`` also guarantees that masked slices do not move in that step even when the
  optimizer would move them anyway (momentum, Adam moments, decoupled weight decay): their values are
  saved before the step and written back after it.

Masks are applied in place on ``.grad`` (the same tensor the optimizer reads), so they also reach
mixed-precision optimizers that copy gradients to fp32 masters inside ``step()``.

Example:
    >>> import torch
    >>> from modulart.core.grad_mask import GradientMasker
    >>> lin = torch.nn.Linear(3, 4)
    >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    >>> masker = GradientMasker(lin, opt)
    >>> masker.set(lin.weight, torch.tensor([True, False, True, False]), axis=0, bias=lin.bias)
    >>> before = lin.weight.detach().clone()
    >>> lin(torch.randn(2, 3)).sum().backward(); opt.step()
    >>> torch.equal(lin.weight[1], before[1]), torch.equal(lin.weight[0], before[0])
    (True, False)
    >>> masker.remove()

    Per expert, on a fused ``[E, U, d]`` parameter (each expert keeps its own units):

    >>> w = torch.nn.Parameter(torch.ones(2, 3, 4))
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> masker = GradientMasker(torch.nn.ParameterList([w]), opt)
    >>> masker.set(w, torch.tensor([[True, False, False], [False, False, True]]), axis=1)
    >>> w.sum().backward(); opt.step()
    >>> (w[:, :, 0] != 1).int().tolist()
    [[1, 0, 0], [0, 0, 1]]
    >>> masker.remove()
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modulart.core.errors import ShapeError
from modulart.core.hooks import HookRegistry, Priority

__all__ = ["GradientMasker", "SliceMask"]


@dataclass
class SliceMask:
    """The kept slices of one parameter along ``axis`` (and of its bias, whose only axis matches)."""

    param: torch.Tensor
    keep: torch.Tensor  # [param.shape[axis]] bool, or [param.shape[0], param.shape[axis]] per expert
    axis: int
    bias: torch.Tensor | None = None  # shaped like keep
    # keep as the multiplier / selector of a tensor, per (is bias, device, dtype): built once per mask
    _cache: dict[tuple[bool, torch.device, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def per_expert(self) -> bool:
        """``keep`` is ``[E, U]``: each slice along axis 0 (an expert) keeps its own units."""
        return self.keep.dim() == 2

    def broadcast(self, like: torch.Tensor) -> torch.Tensor:
        """``keep`` shaped to broadcast against ``like`` (the parameter or its gradient)."""
        shape = [1] * like.dim()
        shape[self.axis] = int(self.keep.shape[-1])
        if self.per_expert:
            shape[0] = int(self.keep.shape[0])
        return self.keep.to(like.device).view(shape)

    def keep_like(self, t: torch.Tensor, dtype: torch.dtype | None = None, *, bias: bool = False) -> torch.Tensor:
        """``keep`` for ``t`` on ``t``'s device as ``dtype`` (default bool): broadcast along ``axis``
        for the parameter (or its gradient), ``keep`` itself for the bias (``bias=True``).

        Cached per mask: a mask's ``keep`` is never changed in place (:meth:`GradientMasker.set` copies it).
        """
        key = (bias, t.device, dtype or torch.bool)
        got = self._cache.get(key)
        if got is None:
            got = self.keep.to(t.device) if bias else self.broadcast(t)
            got = got.to(dtype) if dtype is not None else got
            self._cache[key] = got
        return got

    def masked(self) -> tuple[torch.Tensor, ...]:
        """Indices of the masked slices: ``(units,)``, or ``(experts, units)`` when per expert."""
        idx = torch.nonzero(~self.keep.to(self.param.device))
        return (idx[:, 0],) if not self.per_expert else (idx[:, 0], idx[:, 1])

    def units_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the parameter's data) with the unit axis first (after the expert axis, when per
        expert): a view, so writes through it reach the parameter."""
        return t.movedim(self.axis, 1 if self.per_expert else 0)

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.float().mean())


class GradientMasker:
    """Masks gradient (and, with ``freeze``, update) slices of parameters for the next optimizer step.

    Args:
        model: the model (for parameter names in messages and path lookups).
        optimizer: masks are applied right before its ``step()``; None to call :meth:`mask_` yourself.
        freeze: also restore masked slices after ``step()`` so they cannot move at all.
        registry: the hook registry to install into (default: a new one on ``model``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        freeze: bool = False,
        registry: HookRegistry | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.freeze = freeze
        self.registry = registry if registry is not None else HookRegistry(model, name="grad_mask")
        self.masks: dict[int, SliceMask] = {}
        self._masked_this_step = False
        self._saved: list[tuple[SliceMask, torch.Tensor, torch.Tensor | None]] = []
        self._names = {id(p): n for n, p in model.named_parameters()}
        if optimizer is not None:
            self.registry.optimizer_step_pre(optimizer, self._before_step, priority=Priority.INTERVENE)
            self.registry.optimizer_step_post(optimizer, self._after_step, priority=Priority.INTERVENE)

    # --- masks --------------------------------------------------------------------------------
    def set(self, param: torch.Tensor, keep: torch.Tensor, *, axis: int = 0, bias: torch.Tensor | None = None) -> None:
        """Keep only the ``keep``-selected slices of ``param`` along ``axis`` (and of ``bias``).

        ``keep`` is a bool vector ``[param.shape[axis]]``, or a bool matrix ``[E, U]`` for a fused
        expert parameter (axis 0 holds the experts, ``axis`` their units; ``bias`` is then
        ``[E, U]`` too).

        Raises:
            ShapeError: ``keep`` does not match the axis (or the experts), or the bias does not fit;
                nothing is changed.
        """
        name = self._names.get(id(param), "<parameter>")
        if not -param.dim() <= axis < param.dim():
            raise ShapeError(f"{name}: axis {axis} out of range for shape {tuple(param.shape)}")
        axis %= param.dim()
        want = (param.shape[axis],) if keep.dim() != 2 else (param.shape[0], param.shape[axis])
        if keep.dtype != torch.bool or tuple(keep.shape) != want or (keep.dim() == 2 and axis == 0):
            raise ShapeError(
                f"{name}: keep must be a bool vector of length {param.shape[axis]} (axis {axis} of "
                f"{tuple(param.shape)}) or a per-expert bool matrix [{param.shape[0]}, {param.shape[axis]}] "
                f"(axis 0: experts), got {keep.dtype} {tuple(keep.shape)}"
            )
        if bias is not None and tuple(bias.shape) != want:
            raise ShapeError(f"{name}: bias of shape {tuple(bias.shape)} does not match {list(want)}")
        self.masks[id(param)] = SliceMask(param, keep.detach().clone(), axis, bias)

    def clear(self, param: torch.Tensor | None = None) -> None:
        """Drop the mask of ``param`` (or all masks)."""
        if param is None:
            self.masks.clear()
        else:
            self.masks.pop(id(param), None)

    def __iter__(self) -> Iterator[SliceMask]:
        return iter(self.masks.values())

    # --- applying -----------------------------------------------------------------------------
    @torch.no_grad()
    def mask_(self) -> None:
        """Zero the masked gradient slices now (idempotent until the next optimizer step).

        One ``torch._foreach_mul_`` over every masked gradient (weights and biases) with its cached
        ``keep`` multiplier: multiplying by 1 or 0 is exact, so this is the per-tensor ``mul_``.
        """
        grads: list[torch.Tensor] = []
        factors: list[torch.Tensor] = []
        for m in self.masks.values():
            for t in (m.param, m.bias):
                if t is not None and t.grad is not None:
                    grads.append(t.grad)
                    factors.append(m.keep_like(t.grad, t.grad.dtype, bias=t is not m.param))
        if grads:
            torch._foreach_mul_(grads, factors)
        self._masked_this_step = True

    def _before_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._masked_this_step:
            self.mask_()
        if self.freeze:  # a copy of every masked tensor: no index lists, so no host-device sync
            with torch.no_grad():
                self._saved = [
                    (m, m.param.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                    for m in self.masks.values()
                ]

    def _after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.freeze:  # kept slices as the optimizer left them, masked ones as they were (a selection: exact)
            with torch.no_grad():
                for m, weight, bias in self._saved:
                    w = m.param.detach()
                    torch.where(m.keep_like(w), w, weight, out=w)
                    if m.bias is not None and bias is not None:
                        b = m.bias.detach()
                        torch.where(m.keep_like(b, bias=True), b, bias, out=b)
            self._saved = []
        self._masked_this_step = False

    def reset_step(self) -> None:
        """Forget this step's bookkeeping (a ``mask_()`` already done, slices saved for ``freeze``)."""
        self._masked_this_step = False
        self._saved = []

    def remove(self) -> None:
        """Uninstall the optimizer hooks and forget the masks."""
        self.registry.remove()
        self.masks.clear()
        self._saved = []
