"""Per-expert unit masks on fused 3-D expert parameters, applied to gradients and updates.

:class:`modulart.core.grad_mask.GradientMasker` keeps one boolean vector per parameter (the same
units for the whole tensor). A fused expert parameter ``[E, ., .]`` needs a different set of units
per expert, so :class:`ExpertMasker` keeps a ``keep [E, U]`` matrix over (expert axis 0, unit axis
1 or 2) with the same contract: masked gradient entries are zeroed in place right before
``optimizer.step()`` (or by an explicit :meth:`ExpertMasker.mask_`), and with ``freeze=True`` the
masked entries are saved before the step and written back after it, so momentum, Adam moments and
weight decay cannot move them either.

Example:
    >>> import torch
    >>> from modulart.migu.expert_mask import ExpertMasker
    >>> w = torch.nn.Parameter(torch.ones(2, 3, 4))  # [E=2, U=3, d=4]: units on axis 1
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> masker = ExpertMasker(w, opt)
    >>> masker.set(w, torch.tensor([[True, False, False], [False, False, True]]), axis=1)
    >>> w.sum().backward(); opt.step()
    >>> (w[:, :, 0] != 1).int().tolist()
    [[1, 0, 0], [0, 0, 1]]
    >>> masker.remove()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modulart.core.errors import ShapeError
from modulart.core.hooks import HookRegistry, Priority

__all__ = ["ExpertMasker", "ExpertSliceMask"]


@dataclass
class ExpertSliceMask:
    """Kept units per expert of one fused parameter: ``keep [E, U]`` over axes ``(0, axis)``."""

    param: torch.Tensor  # [E, U, d] (axis 1) or [E, d, U] (axis 2)
    keep: torch.Tensor  # [E, U] bool
    axis: int
    bias: torch.Tensor | None = None  # [E, U]

    def broadcast(self) -> torch.Tensor:
        """``keep`` shaped ``[E, U, 1]`` (axis 1) or ``[E, 1, U]`` (axis 2), on the parameter's device."""
        return self.keep.to(self.param.device).unsqueeze(3 - self.axis)

    def units_view(self) -> torch.Tensor:
        """The parameter's data as ``[E, U, d]`` (a view: writes reach the parameter)."""
        data = self.param.detach()
        return data if self.axis == 1 else data.transpose(1, 2)


class ExpertMasker:
    """Masks per-expert unit slices of fused expert parameters for the next optimizer step.

    Args:
        model: the module owning the parameters (root of the hook registry), or a parameter
            (for standalone use as in the example).
        optimizer: masks are applied right before its ``step()``; None to call :meth:`mask_` yourself.
        freeze: also restore masked entries after ``step()`` so they cannot move at all.
        registry: the hook registry to install into (default: a new one).
    """

    def __init__(
        self,
        model: nn.Module | torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        freeze: bool = False,
        registry: HookRegistry | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.freeze = freeze
        root = model if isinstance(model, nn.Module) else None
        self.registry = registry if registry is not None else HookRegistry(root, name="migu/experts")
        self.masks: dict[int, ExpertSliceMask] = {}
        self._masked_this_step = False
        # (mask, masked (expert, unit) pairs, their [n, d] weights, their [n] biases)
        self._saved: list[tuple[ExpertSliceMask, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None]] = []
        if optimizer is not None:
            self.registry.optimizer_step_pre(optimizer, self._before_step, priority=Priority.INTERVENE)
            self.registry.optimizer_step_post(optimizer, self._after_step, priority=Priority.INTERVENE)

    def set(self, param: torch.Tensor, keep: torch.Tensor, *, axis: int, bias: torch.Tensor | None = None) -> None:
        """Keep, for every expert ``e``, only the units ``keep[e]`` of ``param`` along ``axis`` (and of ``bias``).

        Raises:
            ShapeError: ``param`` is not 3-D, ``axis`` is not 1 or 2, or ``keep`` / ``bias`` do not
                fit; nothing is changed.
        """
        shape = tuple(param.shape)
        if param.dim() != 3 or axis not in (1, 2):
            raise ShapeError(f"expert mask: need a 3-D parameter and axis 1 or 2, got {shape} and axis {axis}")
        want = (shape[0], shape[axis])
        if keep.dtype != torch.bool or tuple(keep.shape) != want:
            raise ShapeError(f"expert mask of {shape}: keep must be bool {want}, got {keep.dtype} {tuple(keep.shape)}")
        if bias is not None and tuple(bias.shape) != want:
            raise ShapeError(f"expert mask of {shape}: bias of shape {tuple(bias.shape)} does not match {want}")
        self.masks[id(param)] = ExpertSliceMask(param, keep.detach().clone(), axis, bias)

    def clear(self, param: torch.Tensor | None = None) -> None:
        """Drop the mask of ``param`` (or all masks)."""
        if param is None:
            self.masks.clear()
        else:
            self.masks.pop(id(param), None)

    @torch.no_grad()
    def mask_(self) -> None:
        """Zero the masked gradient entries now (idempotent until the next optimizer step)."""
        for m in self.masks.values():
            if m.param.grad is not None:
                m.param.grad.mul_(m.broadcast().to(m.param.grad.dtype))
            if m.bias is not None and m.bias.grad is not None:
                m.bias.grad.mul_(m.keep.to(m.bias.grad))
        self._masked_this_step = True

    def _before_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._masked_this_step:
            self.mask_()
        if self.freeze:  # save only the masked units: they are all we must put back
            with torch.no_grad():
                self._saved = []
                for m in self.masks.values():
                    where = torch.nonzero(~m.keep.to(m.param.device), as_tuple=True)
                    if where[0].numel():
                        bias = m.bias.detach()[where] if m.bias is not None else None
                        self._saved.append((m, where, m.units_view()[where], bias))

    def _after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.freeze:
            with torch.no_grad():
                for m, where, weight, bias in self._saved:
                    m.units_view()[where] = weight
                    if m.bias is not None and bias is not None:
                        m.bias.detach()[where] = bias
            self._saved = []
        self._masked_this_step = False

    def remove(self) -> None:
        """Uninstall the optimizer hooks and forget the masks."""
        self.registry.remove()
        self.masks.clear()
        self._saved = []
