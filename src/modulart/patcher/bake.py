"""Bake patch neurons into a widened FFN (hook-free inference) and put the original layers back.

The key projection (and the up projection of gated FFNs) gains one output row per enabled patch
(a fused gate/up layer one row at the end of each half),
the value projection one input column; a key/up projection without a bias gets one (zero on the
original rows) when a patch bias is non-zero. ``nn.Linear`` and Hugging Face ``Conv1D`` (transposed
storage) are both handled; the widened layers are new modules, the originals are kept untouched
for :func:`unbake`.

Example:
    >>> import torch
    >>> from modulart.core.ffn import find_ffns
    >>> from modulart.patcher.bake import widen
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> ffn = find_ffns(model)[0]
    >>> saved = widen(model, ffn, keys=torch.randn(2, 4), key_bias=torch.zeros(2), values=torch.randn(2, 4))
    >>> model[0].out_features, model[2].in_features
    (10, 10)
    >>> for path, module in saved: _ = model.set_submodule(path, module)
    >>> model[0].out_features
    8
"""

from __future__ import annotations

import torch
from torch import nn

from modulart.core.errors import UnsupportedModuleError
from modulart.core.ffn import FFN
from modulart.core.linear import LinearRef, is_conv1d

__all__ = ["widen", "widened_linear"]


def widened_linear(ref: LinearRef, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new ``nn.Linear`` (or ``Conv1D`` for a ``Conv1D``) with canonical ``weight [out, in]`` and ``bias``.

    Subclasses of ``nn.Linear`` (quantisation or adapter wrappers) become plain ``nn.Linear``.
    """
    old = ref.module
    dtype, device = ref.param.dtype, ref.param.device
    grad = ref.param.requires_grad
    out_f, in_f = weight.shape
    new: nn.Module
    if is_conv1d(old):
        new = type(old)(out_f, in_f)
        new.weight = nn.Parameter(weight.T.to(device, dtype).contiguous(), requires_grad=grad)
        b = bias if bias is not None else torch.zeros(out_f)
        new.bias = nn.Parameter(b.to(device, dtype).clone(), requires_grad=grad)
        return new
    new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.to(device, dtype).contiguous(), requires_grad=grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(device, dtype).clone(), requires_grad=grad)
    return new


def _grow_rows(ref: LinearRef, rows: torch.Tensor, row_bias: torch.Tensor) -> nn.Module:
    w = torch.cat([ref.weight.detach(), rows.to(ref.weight.dtype)])
    old_b = ref.bias
    if old_b is None and not bool((row_bias != 0).any()):
        b = None
    else:
        base = old_b.detach() if old_b is not None else ref.weight.new_zeros(ref.out_features)
        b = torch.cat([base, row_bias.to(base.dtype)])
    return widened_linear(ref, w, b)


def _grow_fused(
    ffn: FFN, keys: torch.Tensor, key_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor
) -> nn.Module:
    """One fused gate/up layer with ``P`` rows appended to each half (the block splits it in two)."""
    gate_ref, up_ref = ffn.key_proj, ffn.up_proj
    assert up_ref is not None
    halves = []
    biases = []
    for ref, rows, rb in ((gate_ref, keys, key_bias), (up_ref, up, up_bias)):
        halves.append(torch.cat([ref.weight.detach(), rows.to(ref.weight.dtype)]))
        old_b = ref.bias
        biases.append(torch.cat([old_b.detach() if old_b is not None else rb.new_zeros(ref.out_features), rb]))
    order = (0, 1) if ffn.layout.fused_gate_up == "gate_first" else (1, 0)
    w = torch.cat([halves[i] for i in order])
    has_bias = gate_ref.bias is not None or bool(torch.cat(biases).ne(0).any())
    b = torch.cat([biases[i] for i in order]).to(w.dtype) if has_bias else None
    return widened_linear(LinearRef(gate_ref.module, gate_ref.path), w, b)


def widen(
    model: nn.Module,
    ffn: FFN,
    *,
    keys: torch.Tensor,
    key_bias: torch.Tensor,
    values: torch.Tensor,
    up: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
) -> list[tuple[str, nn.Module]]:
    """Swap in widened projections; returns ``[(path, original module)]`` to restore them.

    Shapes: ``keys``/``up`` ``[P, d_model]``, ``key_bias``/``up_bias`` ``[P]``, ``values [P, d_out]``.

    Raises:
        UnsupportedModuleError: a projection is a PEFT tuner layer (a widened plain layer would drop
            its adapters); nothing is changed.
    """
    peft = [r.path for r in (ffn.key_proj, ffn.up_proj, ffn.value_proj) if r is not None and r.is_peft]
    if peft:
        raise UnsupportedModuleError(
            f"cannot bake patches into {ffn.path!r}: {sorted(set(peft))} are PEFT tuner layers, which a widened "
            "plain layer would replace, dropping their adapters; merge the adapters first (`merge_and_unload()`) "
            "or keep the patches as hooks (no bake)"
        )
    if ffn.fused:
        assert ffn.up_proj is not None and up is not None and up_bias is not None
        plan = [(ffn.key_proj.path, _grow_fused(ffn, keys, key_bias, up, up_bias))]
    else:
        plan = [(ffn.key_proj.path, _grow_rows(ffn.key_proj, keys, key_bias))]
        if ffn.up_proj is not None:
            assert up is not None and up_bias is not None
            plan.append((ffn.up_proj.path, _grow_rows(ffn.up_proj, up, up_bias)))
    vref = ffn.value_proj
    w = torch.cat([vref.weight.detach(), values.T.to(vref.weight.dtype)], dim=1)
    plan.append((vref.path, widened_linear(vref, w, vref.bias.detach() if vref.bias is not None else None)))
    saved = [(path, model.get_submodule(path)) for path, _ in plan]
    for path, module in plan:
        model.set_submodule(path, module)
    return saved
