"""G_learn widthwise (LiGO) for the FFN width: learned expansion matrices, briefly trained.

Every FFN gets an expansion ``B [d_ff_new, d_ff_old]`` initialised to ``[I; N(0, 1/d_ff_new)]``:
keys (and up rows, and their biases) become ``B·K``, values ``V·Bᵀ``. The ``B`` are fitted by Adam on
the caller's loss for a few steps, then the expanded weights are written into the model. Not
function-preserving (the new value columns start nonzero).

Example:
    >>> import torch
    >>> import modulart.stacking as st
    >>> _ = torch.manual_seed(0)
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> x = torch.randn(16, 4); y = torch.randn(16, 4)
    >>> loss = lambda m: (m(x) - y).pow(2).mean()
    >>> fitted = st.grow_width(mlp, d_ff=12, operator="learn", loss_fn=loss, learn_steps=25)
    >>> start = st.grow_width(mlp, d_ff=12, operator="learn", loss_fn=loss, learn_steps=0)
    >>> fitted[0].weight.shape, float(loss(fitted).detach()) < float(loss(start).detach())
    (torch.Size([12, 4]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from modulart.core.errors import NonFiniteError
from modulart.core.ffn import find_ffns
from modulart.core.linear import LinearRef, is_conv1d
from modulart.stacking.learn import _Mixed

__all__ = ["learn_ffn_width"]


def learn_ffn_width(
    source: nn.Module,
    grown: nn.Module,
    d_ff: int,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    *,
    steps: int,
    lr: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Fit the expansions and write ``B·K`` / ``V·Bᵀ`` into ``grown`` (already resized to ``d_ff``).

    Returns the fitted expansion matrices, one ``[d_ff, d_ff_old]`` per FFN.
    """
    pairs = list(zip(find_ffns(source), find_ffns(grown), strict=True))
    expansions: list[nn.Parameter] = []
    for fs, _ in pairs:
        old = fs.d_ff
        noise = torch.randn(d_ff - old, old, generator=generator) / math.sqrt(d_ff)
        expansions.append(nn.Parameter(torch.cat([torch.eye(old), noise])))

    def params() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for (fs, fb), b in zip(pairs, expansions, strict=True):
            sides: list[tuple[LinearRef | None, LinearRef | None, bool]] = [
                (fs.key_proj, fb.key_proj, True),
                (fs.up_proj, fb.up_proj, True),
                (fs.value_proj, fb.value_proj, False),
            ]
            for ref_s, ref_b, first in sides:
                if ref_s is None or ref_b is None:
                    continue
                w = ref_s.weight.detach().float()
                new = b @ w if first else w @ b.T
                dtype = ref_b.weight.dtype
                out[f"{ref_b.path}.weight"] = (new.T if is_conv1d(ref_b.module) else new).to(dtype)
                bias = ref_s.bias
                if first and bias is not None:
                    out[f"{ref_b.path}.bias"] = (b @ bias.detach().float()).to(dtype)
        return out

    wrapper = _Mixed(grown, params)
    opt = torch.optim.Adam(expansions, lr=lr)
    for step in range(steps):
        loss = loss_fn(wrapper)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        if not (
            bool(torch.isfinite(loss.detach()).all())
            and all(bool(e.grad.isfinite().all()) for e in expansions if e.grad is not None)
        ):
            raise NonFiniteError(
                f"learn_ffn_width: loss_fn gave a NaN or inf loss ({float(loss.detach().float().sum())}) or "
                f"gradient at step {step}; the source model is unchanged (check the batch and learn_lr)"
            )
        opt.step()
    with torch.no_grad():
        for name, value in params().items():
            grown.get_parameter(name).copy_(value)
    return [b.detach() for b in expansions]
