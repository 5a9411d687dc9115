"""One linear map read and written in canonical ``[out_features, in_features]`` orientation.

``nn.Linear`` stores its weight as ``[out, in]``; Hugging Face's ``Conv1D`` (GPT-2 and relatives)
stores the transpose ``[in, out]``. :class:`LinearRef` hides the difference: ``weight`` is always a
*view* of the stored parameter in ``[out, in]`` orientation, so in-place edits through it change the
model, and :meth:`LinearRef.set_weight` copies a canonical tensor back whatever the storage.

A reference can also cover a block of output rows of one layer (``rows``): the gate and the up
halves of a fused ``gate_up_proj [2·d_ff, d_model]`` are two :class:`LinearRef` over the same module.

PEFT tuner layers (``peft.tuners.lora.Linear`` and friends, recognised by duck typing: PEFT is
never imported) around an ``nn.Linear`` / ``Conv1D`` are linear maps too (:func:`is_linear_map`).
A reference to one keeps the *wrapper* as its ``module`` (hooks on it see the effective output,
LoRA delta included), ``param`` is the base layer's stored weight, and ``weight`` / ``bias`` are
the *effective* ones while adapters are active and unmerged: ``W + Σ scaling_a · B_a·A_a`` over the
active adapters (a fresh tensor then, not a view of storage: edit through :meth:`LinearRef.set_weight`).
Writing refuses with :class:`UnsupportedModuleError` while a delta is in effect (merge the adapters
first), so the base weight is never written as if it were the effective one. A reference also
follows a later wrap of its module (:mod:`modulart.core.rehome`).

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

from modulart.core import rehome
from modulart.core.errors import ShapeError, UnsupportedModuleError

__all__ = ["LinearRef", "base_linear", "is_conv1d", "is_linear_like", "is_linear_map", "is_peft_layer"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (weight stored ``[in, out]``), by duck typing."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    )


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (or a subclass, e.g. quantisation wrappers keeping ``weight``) or ``Conv1D``.

    A PEFT tuner layer is not one (its parameters live in its children); see :func:`is_linear_map`.
    """
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT tuner layer (class from a ``peft`` module, with a ``base_layer``)."""
    return type(module).__module__.startswith("peft") and isinstance(
        getattr(module, "_modules", {}).get("base_layer"), nn.Module
    )


def base_linear(module: nn.Module) -> nn.Module:
    """The innermost ``base_layer`` of nested PEFT tuner layers (``module`` itself for others)."""
    for _ in range(16):
        if not is_peft_layer(module):
            return module
        module = module._modules["base_layer"]  # type: ignore[assignment]
    return module


def is_linear_map(module: nn.Module) -> bool:
    """:func:`is_linear_like`, or a PEFT tuner layer whose (innermost) base layer is one."""
    return is_linear_like(module) or (is_peft_layer(module) and is_linear_like(base_linear(module)))


_MERGE_FIRST = "merge the adapters first (`merge_and_unload()`)"


def _lora_terms(layer: nn.Module, path: str) -> list[tuple[nn.Module, nn.Module, float, int]]:
    """``(lora_A, lora_B, scaling, sign)`` of every adapter whose delta ``forward`` adds (+1) to, or
    removes (-1, disabled but merged: PEFT unmerges) from, the base layer's weight.

    Raises:
        UnsupportedModuleError: a non-LoRA tuner, or a LoRA variant (DoRA...), with a delta in effect.
    """
    disabled = bool(getattr(layer, "disable_adapters", False))
    merged_names = list(getattr(layer, "merged_adapters", []) or [])
    if disabled:
        names, sign = merged_names, -1
    elif merged_names:  # PEFT's forward then runs the base layer alone
        return []
    else:
        active = getattr(layer, "active_adapters", [])
        names, sign = ([active] if isinstance(active, str) else list(active)), 1
    a_dict, b_dict = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not names:
        return []
    if not (isinstance(a_dict, nn.ModuleDict) and isinstance(b_dict, nn.ModuleDict)):
        raise UnsupportedModuleError(
            f"{path!r} is a PEFT {type(layer).__name__} with active adapters modulart cannot read as a "
            f"weight; {_MERGE_FIRST} or disable them"
        )
    variants = getattr(layer, "lora_variant", None) or {}
    dora = getattr(layer, "use_dora", None) or {}
    scaling = getattr(layer, "scaling", {})
    out = []
    for name in names:
        if name not in a_dict:
            continue
        if name in variants or dora.get(name, False):
            raise UnsupportedModuleError(
                f"{path!r}: adapter {name!r} is a LoRA variant ({type(variants.get(name)).__name__}, e.g. DoRA) whose "
                f"effective weight modulart does not compute; {_MERGE_FIRST}"
            )
        out.append((a_dict[name], b_dict[name], float(scaling[name]), sign))
    return out


def _effective(module: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canonical ``(weight [out, in], bias [out] | None)`` that ``module``'s forward applies."""
    if not is_peft_layer(module):
        w = module.weight
        assert isinstance(w, torch.Tensor)
        b = getattr(module, "bias", None)
        return (w.t() if is_conv1d(module) else w), (b if isinstance(b, torch.Tensor) else None)
    weight, bias = _effective(module._modules["base_layer"], path)  # type: ignore[arg-type]
    for lora_a, lora_b, scale, sign in _lora_terms(module, path):
        a, b = lora_a.weight, lora_b.weight
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        weight = weight + (sign * scale) * (b @ a).to(weight.dtype)  # B [out, r] · A [r, in]
        lb = getattr(lora_b, "bias", None)
        if isinstance(lb, torch.Tensor) and bias is not None:
            bias = bias + (sign * scale) * lb.to(bias.dtype)
    return weight, bias


def _delta_in_effect(module: nn.Module, path: str) -> bool:
    """Whether ``module`` is a PEFT layer whose forward applies something else than its base weight."""
    m = module
    while is_peft_layer(m):
        if _lora_terms(m, path):
            return True
        m = m._modules["base_layer"]  # type: ignore[assignment]
    return False


class LinearRef:
    """A linear layer seen as ``y = x @ weight.T + bias`` with ``weight`` of shape ``[out, in]``.

    Args:
        module: an ``nn.Linear``, HF ``Conv1D``, or a PEFT tuner layer around one.
        path: its dotted path in the model (for messages).
        rows: only these output rows of the layer (``slice(start, stop)``, step 1 or 2), or None for all.
        home: ``(parent, attribute name)`` the module was read from: the reference then follows a
            later wrap (or unwrap) of the module at that place (:func:`modulart.core.rehome.follow`).

    Example:
        >>> import torch
        >>> fused = torch.nn.Linear(3, 8)
        >>> up = LinearRef(fused, "gate_up", rows=slice(4, 8))
        >>> tuple(up.weight.shape), up.is_partial, torch.equal(up(torch.ones(3)), fused(torch.ones(3))[4:])
        ((4, 3), True, True)
    """

    __slots__ = ("_cache", "_module", "path", "rows", "transposed")

    def __init__(
        self,
        module: nn.Module,
        path: str,
        rows: slice | None = None,
        *,
        home: tuple[nn.Module, str] | None = None,
    ) -> None:
        if not is_linear_map(module):
            kind = f"PEFT {type(module).__name__} over a {type(base_linear(module)).__name__}"
            raise UnsupportedModuleError(
                f"{path!r} is a {kind if is_peft_layer(module) else type(module).__name__}; expected nn.Linear, "
                "a Hugging Face Conv1D or a PEFT tuner layer around one"
            )
        base = base_linear(module)
        w = base.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise UnsupportedModuleError(f"{path!r}: expected a 2-D weight, got {getattr(w, 'shape', None)}")
        _delta_in_effect(module, path)  # a tuner layer whose delta cannot be read is refused now
        if home is not None:
            rehome.remember(home[0], home[1], module)
        self._module = module
        self._cache: tuple[tuple[object, ...], torch.Tensor, torch.Tensor | None] | None = None
        self.path = path
        self.transposed = is_conv1d(base)
        self.rows = rows
        if rows is not None:
            n = int(w.shape[1] if self.transposed else w.shape[0])
            start, stop, step = rows.indices(n)
            if step not in (1, 2) or stop <= start:
                raise UnsupportedModuleError(f"{path!r}: bad row block {rows} of a layer with {n} output rows")

    @property
    def module(self) -> nn.Module:
        """The module the model calls (a PEFT wrapper that replaced the original one, once it did)."""
        m = rehome.follow(self._module)
        if m is not self._module and is_linear_map(m) and base_linear(m) is base_linear(self._module):
            self._module, self._cache = m, None
        return self._module

    @property
    def is_peft(self) -> bool:
        """Whether the module is a PEFT tuner layer (``param`` is then its base layer's weight)."""
        return is_peft_layer(self.module)

    @property
    def is_partial(self) -> bool:
        """Whether this reference covers only some output rows of its layer (fused projections)."""
        return self.rows is not None

    @property
    def param(self) -> torch.Tensor:
        """The stored weight parameter (storage orientation; the base layer's under PEFT)."""
        w = base_linear(self.module).weight
        assert isinstance(w, torch.Tensor)
        return w

    @property
    def weight(self) -> torch.Tensor:
        """``[out_features, in_features]`` weight (of the covered rows) that the module applies.

        A view of the stored weight, except under active unmerged PEFT adapters: then the effective
        ``W + Σ scaling·B·A`` (differentiable in the adapters; in-place edits of it are lost).
        """
        module = self.module
        if is_peft_layer(module) and _delta_in_effect(module, self.path):
            w = self._effective()[0]
        else:
            w = self.param.t() if self.transposed else self.param
        return w if self.rows is None else w[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        """``[out_features]`` bias (of the covered rows) that the module adds, or None."""
        module = self.module
        if is_peft_layer(module) and _delta_in_effect(module, self.path):
            b = self._effective()[1]
        else:
            raw = getattr(base_linear(module), "bias", None)
            b = raw if isinstance(raw, torch.Tensor) else None
        if b is None:
            return None
        return b if self.rows is None else b[self.rows]

    def _effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The full effective ``(weight [out, in], bias)``, cached while nothing changed and no
        gradient is needed (so repeated reads return the same tensor)."""
        module = self.module
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in module.parameters())
        if grad:
            return _effective(module, self.path)
        stamp = (torch.is_inference_mode_enabled(), self.stamp)
        if self._cache is None or self._cache[0] != stamp:
            weight, bias = _effective(module, self.path)
            self._cache = (stamp, weight, bias)
        return self._cache[1], self._cache[2]

    @property
    def stamp(self) -> tuple[object, ...]:
        """A token that changes whenever what :attr:`weight` / :attr:`bias` compute from may have
        changed: every parameter of the module (identity and in-place version) and, for a PEFT layer,
        its adapter state (caches of derived weights key on it; a computed effective weight's own
        storage address can be reused once it is freed)."""
        module = self.module
        params = tuple((id(t), t._version) for t in module.parameters())
        if not is_peft_layer(module):
            return (id(module), params)
        state = tuple(
            (
                repr(getattr(m, "scaling", None)),
                tuple(getattr(m, "merged_adapters", []) or []),
                bool(getattr(m, "disable_adapters", False)),
                repr(getattr(m, "active_adapters", None)),
            )
            for m in module.modules()
            if is_peft_layer(m)
        )
        return (id(module), params, state)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def set_weight(self, value: torch.Tensor) -> None:
        """Copy a canonical ``[out, in]`` tensor into the stored weight (no autograd tracking).

        Raises:
            UnsupportedModuleError: a PEFT layer whose adapters are active and unmerged (the stored
                weight is not the effective one).
        """
        self._check_writable("weight")
        _copy_into(self.weight, value, f"{self.path}.weight")

    def set_bias(self, value: torch.Tensor) -> None:
        """Copy a ``[out]`` tensor into the stored bias (refused like :meth:`set_weight`)."""
        self._check_writable("bias")
        if self.bias is None:
            raise ShapeError(f"{self.path!r} has no bias to set")
        _copy_into(self.bias, value, f"{self.path}.bias")

    @property
    def writable(self) -> bool:
        """Whether writing the stored weight sets the effective one (False under an active PEFT delta)."""
        return not _delta_in_effect(self.module, self.path)

    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise UnsupportedModuleError(
                f"{self.path!r} is a PEFT {type(self.module).__name__} with active unmerged adapters: its stored "
                f"{what} is not the effective one, so modulart will not write it; {_MERGE_FIRST}"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        kind = "Conv1D" if self.transposed else type(base_linear(self.module)).__name__
        kind = f"PEFT {type(self.module).__name__}({kind})" if self.is_peft else kind
        part = "" if self.rows is None else f", rows {self.rows.start}:{self.rows.stop}:{self.rows.step or 1}"
        return f"LinearRef({self.path!r}, {kind}, {self.in_features}->{self.out_features}{part})"


def _copy_into(dst: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(value.shape) != tuple(dst.shape):
        raise ShapeError(f"{what}: expected shape {tuple(dst.shape)}, got {tuple(value.shape)}")
    with torch.no_grad():
        dst.copy_(value)
