"""Cheap, honest identities of a model's weights: names, shapes, dtypes and a sample of values.

A :class:`Fingerprint` costs O(number of tensors), not O(number of parameters): for every
state-dict entry it keeps the dtype, the shape and :data:`SAMPLE` values read at positions drawn
deterministically from the entry's name and size (the same positions on every model, so two
fingerprints compare value by value). A model with 1B parameters is fingerprinted in milliseconds.

What it sees, and what it can miss:

- a different model (another checkpoint, another initialisation, another architecture): always,
  by name, shape, dtype, or by the sampled values;
- fine-tuning that moved the weights by more than ``rtol`` (default 1e-3) of a tensor's sampled
  scale at the sampled positions: yes; smaller changes, and changes confined to positions outside
  the sample (a single edited row of a large matrix, say), can go unnoticed. It is an identity
  check against loading an artefact onto the wrong model, not a checksum.

Names are canonical, so the same weights fingerprint the same whatever wraps them: PEFT's
``.base_layer`` segment is dropped and a PEFT LoRA layer's sampled values are those of the
effective weight ``W + scaling·B·A`` (the merged model matches the adapted one); a parametrised
tensor is named as the plain attribute (``X.parametrizations.W.original`` → ``X.W``); tensors of
modules modulart owns (marked ``_modulart_owned = True``) and PEFT's adapter tensors are left out.

Example:
    >>> import torch
    >>> from modulart.core.fingerprint import fingerprint
    >>> a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    >>> fingerprint(a).matches(fingerprint(a)), fingerprint(a).matches(fingerprint(b))
    (True, False)
    >>> fingerprint(a).diff(fingerprint(b))[0]
    'bias: values differ'
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modulart.core.errors import InvalidArgumentError
from modulart.core.ranks import whole

__all__ = ["SAMPLE", "Fingerprint", "TensorPrint", "canonical_tensors", "fingerprint"]

SAMPLE = 16
_PEFT_ADAPTER_ATTRS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class TensorPrint:
    """One tensor's entry: dtype, shape and the sampled values (as float64 Python floats)."""

    dtype: str
    shape: tuple[int, ...]
    sample: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "sample": [_json_float(v) for v in self.sample]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorPrint:
        return cls(str(data["dtype"]), tuple(int(s) for s in data["shape"]), tuple(float(v) for v in data["sample"]))

    def differs(self, other: TensorPrint, rtol: float) -> str | None:
        """What differs from ``other`` (``"dtype"``, ``"shape"``, ``"values"``), or None."""
        if self.dtype != other.dtype:
            return "dtype"
        if self.shape != other.shape:
            return "shape"
        if not self.sample or not other.sample:  # an empty tensor, or a format-1 entry without values
            return None
        if len(self.sample) != len(other.sample):
            return "values"
        scale = max((abs(v) for v in (*self.sample, *other.sample) if math.isfinite(v)), default=0.0)
        for a, b in zip(self.sample, other.sample, strict=True):
            if math.isnan(a) and math.isnan(b):
                continue
            if not abs(a - b) <= rtol * scale:
                return "values"
        return None


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else repr(v)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a model's weights (see the module docstring for what it covers).

    Attributes:
        tensors: canonical state-dict name -> :class:`TensorPrint`.
        digest: a short digest of names, dtypes, shapes and sampled values (provenance labels).
    """

    tensors: dict[str, TensorPrint] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}|{t.dtype}|{t.shape}|{[f'{v:.6g}' for v in t.sample]};".encode())
        return h.hexdigest()

    def matches(self, other: Fingerprint, *, rtol: float = 1e-3) -> bool:
        """Same names, dtypes and shapes, and sampled values within ``rtol`` of each tensor's scale."""
        return not self.diff(other, rtol=rtol, limit=1)

    def diff(self, other: Fingerprint, *, rtol: float = 1e-3, limit: int = 10) -> list[str]:
        """Human-readable differences between ``self`` (the model now) and ``other`` (the saved one)."""
        out: list[str] = []
        missing = sorted(set(other.tensors) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(other.tensors))
        if missing:
            out.append(f"missing in the model: {missing[:limit]}" + (" ..." if len(missing) > limit else ""))
        if extra:
            out.append(f"not in the saved base model: {extra[:limit]}" + (" ..." if len(extra) > limit else ""))
        changed = 0
        for name in sorted(set(self.tensors) & set(other.tensors)):
            mine, theirs = self.tensors[name], other.tensors[name]
            what = mine.differs(theirs, rtol)
            if what is None:
                continue
            changed += 1
            if changed > limit:
                continue
            detail = {
                "dtype": f" ({theirs.dtype} saved, {mine.dtype} now)",
                "shape": f" ({theirs.shape} saved, {mine.shape} now)",
            }
            out.append(f"{name}: {what} differ{detail.get(what, '')}")
        if changed > limit:
            out.append(f"... and {changed - limit} more tensors differ")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "sampled",
            "sample": SAMPLE,
            "digest": self.digest,
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        return cls({str(k): TensorPrint.from_dict(v) for k, v in data.get("tensors", {}).items()})


# --- canonical tensors -------------------------------------------------------------------------
def _is_peft_lora_layer(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "base_layer", None), nn.Module)
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and type(module).__module__.startswith("peft")
    )


def _canonical(name: str) -> str:
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p == "base_layer":
            i += 1
            continue
        if p == "parametrizations" and i + 2 < len(parts) and parts[i + 2] == "original":
            out.append(parts[i + 1])
            i += 3
            continue
        out.append(p)
        i += 1
    return ".".join(out)


def canonical_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, nn.Module | None]]:
    """``(canonical name, tensor, PEFT LoRA layer owning it as ``weight`` or None)`` of a model's state.

    Persistent buffers and parameters, as in ``state_dict()``, without tensors of modules modulart
    owns and without PEFT adapter tensors.
    """
    skip: list[str] = []
    lora_weights: dict[str, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        if getattr(module, "_modulart_owned", False):
            skip.append(prefix)
        elif _is_peft_lora_layer(module):
            skip.extend(f"{prefix}{a}." for a in _PEFT_ADAPTER_ATTRS)
            lora_weights[f"{prefix}base_layer.weight"] = module
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(name.startswith(s) for s in skip) or (".parametrizations." in name and not name.endswith(".original")):
            continue
        yield _canonical(name), tensor, lora_weights.get(name)


def _positions(name: str, shape: tuple[int, ...], count: int) -> tuple[torch.Tensor, ...]:
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}|{shape}".encode()))
    flat = torch.randint(numel, (min(count, numel),), generator=gen)
    return torch.unravel_index(flat, shape) if shape else ()


def _lora_delta(layer: nn.Module, index: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The active, unmerged PEFT LoRA delta of ``layer``'s base weight at ``index``."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False) or len(index) != 2:
        return None
    active = getattr(layer, "active_adapters", None) or []
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    rows, cols = (index[1], index[0]) if fan_in_fan_out else index
    total: torch.Tensor | None = None
    lora_a, lora_b, scaling = getattr(layer, "lora_A"), getattr(layer, "lora_B"), getattr(layer, "scaling")  # noqa: B009
    for name in active:
        if name not in lora_a:
            continue
        a = whole(lora_a[name].weight.detach())  # [r, in]
        b = whole(lora_b[name].weight.detach())  # [out, r]
        scale = float(scaling[name])
        d = (b[rows.to(b.device)].float() * a[:, cols.to(a.device)].t().float()).sum(-1) * scale
        total = d if total is None else total + d
    return total


def _sample(name: str, tensor: torch.Tensor, lora: nn.Module | None, count: int) -> tuple[float, ...]:
    t = tensor.detach()
    if t.numel() == 0 or t.is_meta:
        return ()
    t = whole(t)
    shape = tuple(t.shape)
    index = _positions(name, shape, count)
    with torch.no_grad():
        values = t[tuple(i.to(t.device) for i in index)] if index else t.reshape(1)
        if values.is_complex():
            values = torch.view_as_real(values).reshape(-1)
        values = values.double() if values.is_floating_point() or values.is_complex() else values.long().double()
        if lora is not None:
            delta = _lora_delta(lora, index)
            if delta is not None:
                values = values + delta.double().to(values.device)
    return tuple(float(v) for v in values.cpu().tolist())


def fingerprint(model: nn.Module | Mapping[str, torch.Tensor], *, sample: int = SAMPLE) -> Fingerprint:
    """Fingerprint a model (canonical names, see the module docstring) or a plain state dict.

    Example:
        >>> import torch
        >>> fp = fingerprint(torch.nn.Linear(2, 3))
        >>> sorted(fp.tensors), fp.tensors["weight"].shape
        (['bias', 'weight'], (3, 2))
    """
    if isinstance(model, nn.Module):
        items = list(canonical_tensors(model))
    elif isinstance(model, Mapping) and all(isinstance(t, torch.Tensor) for t in model.values()):
        items = [(name, t, None) for name, t in model.items()]
    else:
        raise InvalidArgumentError(f"fingerprint: expected an nn.Module or a state dict, got {type(model).__name__}")
    prints: dict[str, TensorPrint] = {}
    for name, tensor, lora in items:
        dtype = str(tensor.dtype).removeprefix("torch.")
        prints[name] = TensorPrint(dtype, tuple(int(s) for s in tensor.shape), _sample(name, tensor, lora, sample))
    return Fingerprint(prints)
