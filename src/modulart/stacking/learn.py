"""G_learn depthwise (LiGO): every grown block is a learned linear mix of the source blocks.

Each tensor of grown block ``i`` is ``Σ_j A[i, j] · W_j`` over the source blocks ``j``, with the
mixing matrix ``A [grown, source]`` initialised to stacking (``A[i, plan[i]] = 1``) and fitted by
Adam for a few steps on the caller's loss; then the mixed weights are written into the model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import modulart.stacking as st
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    ...     def forward(self, x):
    ...         for b in self.layers: x = x + b(x)
    ...         return x
    >>> _ = torch.manual_seed(0); small, x = Net(), torch.randn(8, 4)
    >>> target = small(x).detach()
    >>> loss = lambda m: (m(x) - target).pow(2).mean()
    >>> big = st.grow(small, 2, operator="learn", loss_fn=loss, learn_steps=30)
    >>> float(loss(big).detach()) < float(loss(st.grow(small, 2)).detach())
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from modulart.core.errors import NonFiniteError, ShapeError
from modulart.stacking.plan import LayerPlan

__all__ = ["learn_mix"]


class _Mixed(nn.Module):
    """Calls the grown model with the mixed block tensors substituted (the loss sees this)."""

    def __init__(self, model: nn.Module, params: Callable[[], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)
        object.__setattr__(self, "params", params)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.inner, self.params(), args, kwargs, strict=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "inner"), name)


def learn_mix(
    grown: nn.Module,
    path: str,
    source_blocks: nn.ModuleList,
    plan: LayerPlan,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    group: Any = None,
) -> torch.Tensor:
    """Fit the mixing matrix and write the mixed weights into ``grown`` (in place).

    Args:
        grown: the model grown by stacking (its blocks are overwritten).
        path: dotted path of its block list.
        source_blocks: the source model's blocks (read only).
        plan: the plan ``grown`` was built with (the initial mix).
        loss_fn: ``loss_fn(model) -> scalar``; ``model`` behaves like ``grown`` with mixed weights.
        steps: Adam steps; lr: learning rate.
        group: a process group (DDP's) over which the mixing matrix's gradient is averaged every
            step, so that every rank fits the same matrix on its own share of the batch; None: local.

    Returns:
        The fitted mixing matrix ``[grown_layers, source_layers]``.
    """
    names = [n for n, _ in source_blocks[0].named_parameters()]
    for i, b in enumerate(source_blocks):
        differ = sorted(set(names) ^ {n for n, _ in b.named_parameters()})
        if differ:
            raise ShapeError(
                f"{path}: blocks 0 and {i} hold different parameters (e.g. {differ[0]!r}: dense and MoE or attention "
                "and Mamba layers); the 'learn' operator mixes equal blocks only"
            )
    stacked: dict[str, torch.Tensor] = {}
    for n in names:
        ts = [dict(b.named_parameters())[n].detach() for b in source_blocks]
        if len({t.shape for t in ts}) != 1:
            raise ShapeError(f"{path}: parameter {n!r} has different shapes across blocks; cannot mix them")
        stacked[n] = torch.stack(ts).float()
    a0 = torch.zeros(plan.grown_layers, plan.num_layers)
    a0[torch.arange(plan.grown_layers), torch.tensor(plan.indices)] = 1.0
    mix = nn.Parameter(a0)
    dtypes = {n: t.dtype for n, t in source_blocks[0].named_parameters()}

    def params() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n, s in stacked.items():
            mixed = torch.einsum("gl,l...->g...", mix, s)
            for i in range(plan.grown_layers):
                out[f"{path}.{i}.{n}"] = mixed[i].to(dtypes[n])
        return out

    wrapper = _Mixed(grown, params)
    opt = torch.optim.Adam([mix], lr=lr)
    for step in range(steps):
        loss = loss_fn(wrapper)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        if group is not None and mix.grad is not None:
            torch.distributed.all_reduce(mix.grad, group=group)
            mix.grad /= torch.distributed.get_world_size(group)
        if not (bool(torch.isfinite(loss.detach()).all()) and (mix.grad is None or bool(mix.grad.isfinite().all()))):
            raise NonFiniteError(
                f"learn_mix: loss_fn gave a NaN or inf loss ({float(loss.detach().float().sum())}) or gradient "
                f"at step {step}; the source model is unchanged (check the batch and learn_lr)"
            )
        opt.step()
    with torch.no_grad():
        final = params()
        for name, p in grown.named_parameters():
            if name in final:
                p.copy_(final[name])
    return mix.detach()
