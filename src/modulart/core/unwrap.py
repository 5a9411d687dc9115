"""The model and optimizer a user holds, unwrapped to the ones modulart acts on.

Training code hands modulart wrapped objects. :func:`unwrap_model` peels, repeatedly:

- ``DistributedDataParallel`` / ``DataParallel`` / FSDP1 and accelerate's wrappers: ``.module``;
- ``torch.compile``: ``._orig_mod`` (the compiled wrapper shares the original's parameters);
- PEFT's ``PeftModel`` / ``LoraModel``: ``.base_model.model`` (the model with adapters injected,
  whose module paths equal those of the merged model).

Module paths in plans and artefacts are relative to the unwrapped model, so an artefact saved
from a wrapped model applies to the bare one and back. :func:`unwrap_optimizer` peels
``.optimizer`` attributes (accelerate's ``AcceleratedOptimizer``) down to the
``torch.optim.Optimizer`` whose ``step()`` runs. :func:`is_distributed` says whether a model is
really distributed (wrapped by DDP / FSDP, or holding ``DTensor`` parameters): operators run
collectives only then, never merely because a process group exists. :class:`ShardAwareMasker` is
the shared gradient masker acting on each rank's local shard of FSDP2-sharded parameters.

Example:
    >>> import torch
    >>> from modulart.core.unwrap import unwrap_model
    >>> inner = torch.nn.Linear(2, 2)
    >>> compiled = torch.compile(inner)
    >>> unwrap_model(compiled) is inner
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from modulart.core.errors import InvalidArgumentError, ShardedModelError, UnsupportedModuleError
from modulart.core.grad_mask import GradientMasker, SliceMask
from modulart.core.types import OptimizerLike

__all__ = [
    "ShardAwareMasker",
    "active_ddp_wrapper",
    "has_dtensor_parameters",
    "is_distributed",
    "is_dtensor",
    "is_peft_model",
    "local_keep",
    "local_tensor",
    "refuse_sharded",
    "unwrap_model",
    "unwrap_optimizer",
]

_WRAPPER_NAMES = frozenset(
    {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine", "PipelineModule"}
)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT ``PeftModel`` (checked by class name: PEFT is never imported)."""
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__)


def _peel(model: nn.Module) -> nn.Module | None:
    orig = model.__dict__.get("_orig_mod") or model._modules.get("_orig_mod")
    if isinstance(orig, nn.Module):  # torch.compile's OptimizedModule
        return orig
    if type(model).__name__ in _WRAPPER_NAMES or any(c.__name__ in _WRAPPER_NAMES for c in type(model).__mro__):
        inner = getattr(model, "module", None)
        return inner if isinstance(inner, nn.Module) else None
    if is_peft_model(model):
        base = getattr(model, "base_model", None)
        inner = getattr(base, "model", None)
        return inner if isinstance(inner, nn.Module) else None
    return None


def unwrap_model(model: object) -> nn.Module:
    """The module modulart acts on, with every known wrapper peeled off.

    Raises:
        UnsupportedModuleError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"expected a torch.nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = _peel(model)
        if inner is None:
            break
        model = inner
    return model


def _class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def has_dtensor_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel).

    Checked by class name, so ``torch.distributed.tensor`` is never imported.

    Example:
        >>> import torch
        >>> has_dtensor_parameters(torch.nn.Linear(2, 2))
        False
    """
    return any("DTensor" in _class_names(p) for p in model.parameters())


def refuse_sharded(model: nn.Module, operator: str, recipe: str) -> None:
    """Raise :class:`~modulart.core.errors.ShardedModelError` if ``model`` already holds ``DTensor`` parameters.

    For operators that must be applied before ``fully_shard``: ``recipe`` says the order that works.

    Example:
        >>> import torch
        >>> refuse_sharded(torch.nn.Linear(2, 2), "MIGU", "apply, then fully_shard")  # a plain model passes
    """
    sharded = [n for n, p in model.named_parameters() if "DTensor" in _class_names(p)]
    if sharded:
        raise ShardedModelError(
            f"{operator}: {type(model).__name__} is already sharded (FSDP2 / DTensor parameters, e.g. "
            f"{sharded[0]!r}); apply {operator} before fully_shard: {recipe} (see docs/distributed.md)"
        )


def is_distributed(model: object) -> bool:
    """Whether ``model`` is really distributed: a collective over it is something every rank runs.

    True iff ``model`` — or a wrapper peeled on the way to the inner model, or a submodule — is a
    ``DistributedDataParallel`` / FSDP1 ``FullyShardedDataParallel`` / FSDP2 ``FSDPModule``, or
    holds ``DTensor`` parameters (FSDP2, tensor parallel). An initialised process group alone does
    not count: a model that is local to one rank of a distributed job is not distributed. A model
    wrapped by DDP *after* an operator was applied is invisible from the inner model; operators
    also check :func:`active_ddp_wrapper` while their hooks run.

    Example:
        >>> import torch
        >>> is_distributed(torch.nn.Linear(2, 2)), is_distributed("not a module")
        (False, False)
    """
    if not isinstance(model, nn.Module):
        return False
    seen: set[int] = set()
    current: nn.Module = model
    while id(current) not in seen:
        seen.add(id(current))
        names = _class_names(current)
        if names & {"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule"}:
            return True
        inner = _peel(current)
        if inner is None:
            break
        current = inner
    for module in current.modules():
        if _class_names(module) & {"FullyShardedDataParallel", "FSDPModule", "DistributedDataParallel"}:
            return True
    return has_dtensor_parameters(current)


def active_ddp_wrapper(model: nn.Module) -> nn.Module | None:
    """The ``DistributedDataParallel`` whose forward is running now and contains ``model``, if any.

    Call it from a hook inside the forward: it finds a DDP wrapper put around the model after an
    operator was applied (the operator only holds the inner model). Outside a DDP forward: None.

    Example:
        >>> import torch
        >>> active_ddp_wrapper(torch.nn.Linear(2, 2)) is None
        True
    """
    parallel = getattr(torch.nn, "parallel", None)
    ddp_class = getattr(parallel, "DistributedDataParallel", None)
    active = getattr(ddp_class, "_active_ddp_module", None)
    if not isinstance(active, nn.Module):
        return None
    inner = getattr(active, "module", None)
    if not isinstance(inner, nn.Module):
        return None
    if inner is model or unwrap_model(inner) is model or any(m is model for m in inner.modules()):
        return active
    return None


def unwrap_optimizer(optimizer: OptimizerLike) -> Optimizer:
    """The ``torch.optim.Optimizer`` whose ``step()`` really runs (``.optimizer`` wrappers peeled).

    Raises:
        InvalidArgumentError: nothing inside is a ``torch.optim.Optimizer``.
    """
    current: object = optimizer
    for _ in range(8):
        if isinstance(current, Optimizer) and not isinstance(getattr(current, "optimizer", None), Optimizer):
            return current
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    if isinstance(current, Optimizer):
        return current
    raise InvalidArgumentError(
        f"optimizer: expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}"
    )


# --- FSDP2: masks on the local shards of DTensor parameters ----------------------------------
def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (checked by class name: nothing distributed is imported)."""
    return any(c.__name__ == "DTensor" for c in type(t).__mro__)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (an alias: writes reach the parameter); ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    out = to_local() if callable(to_local) else t
    return out if isinstance(out, torch.Tensor) else t


def local_keep(like: torch.Tensor, keep_full: torch.Tensor) -> torch.Tensor:
    """``keep_full`` (bool, broadcastable to ``like``'s global shape) cut to ``like``'s local shard.

    For a plain tensor: ``keep_full`` expanded to ``like.shape``. For a ``DTensor``: the same
    slice of it that this rank holds of ``like`` (same mesh and placements; split locally, so no
    rank waits for another).
    """
    full = keep_full.to(local_tensor(like).device).expand(like.shape)
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    mesh: Any = getattr(like, "device_mesh", None)
    placements: Any = getattr(like, "placements", None)
    return distribute_tensor(full.contiguous(), mesh, placements, src_data_rank=None).to_local()


def _keep_for(m: SliceMask, t: torch.Tensor) -> torch.Tensor:
    """The full-shaped bool keep of ``t`` (the mask's parameter or its bias)."""
    return m.broadcast(t) if t is m.param else m.keep.to(local_tensor(t).device)


class ShardAwareMasker(GradientMasker):
    """A :class:`~modulart.core.grad_mask.GradientMasker` that also masks ``DTensor`` parameters.

    Masks on ``DTensor`` (FSDP2-sharded) parameters are applied to the local shard of the
    gradient and, with ``freeze``, the masked local slices are saved before ``step()`` and written
    back after it; every other mask is handled by the base class. (``fully_shard`` writes the
    reduce-scattered gradient straight into the sharded parameter's ``.grad``, which neither a
    plain ``[units]`` mask nor a post-accumulate-grad hook of the replaced parameter reaches: MIGU
    and KV mode ``mask`` therefore mask on the optimizer step through this class.)

    Example (plain tensors behave exactly as in ``GradientMasker``):
        >>> import torch
        >>> lin = torch.nn.Linear(3, 4)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> masker = ShardAwareMasker(lin, opt, freeze=True)
        >>> masker.set(lin.weight, torch.tensor([True, False, True, False]), axis=0, bias=lin.bias)
        >>> before = lin.weight.detach().clone()
        >>> lin(torch.randn(2, 3)).sum().backward(); opt.step()
        >>> torch.equal(lin.weight[1], before[1]), is_dtensor(lin.weight)
        (True, False)
        >>> masker.remove()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._saved_local: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _split(self) -> tuple[dict[int, SliceMask], list[SliceMask]]:
        plain = {k: m for k, m in self.masks.items() if not is_dtensor(m.param)}
        sharded = [m for m in self.masks.values() if is_dtensor(m.param)]
        return plain, sharded

    def _plain(self, plain: dict[int, SliceMask], method: Any, *args: Any) -> None:
        everything = self.masks
        self.masks = plain
        try:
            method(*args)
        finally:
            self.masks = everything

    @torch.no_grad()
    def mask_(self) -> None:
        """Zero the masked gradient slices now (local shards of ``DTensor`` gradients included)."""
        plain, sharded = self._split()
        for m in sharded:
            for t in (m.param, m.bias):
                if t is not None and t.grad is not None:
                    grad = local_tensor(t.grad)
                    grad.mul_(local_keep(t.grad, _keep_for(m, t)).to(grad.dtype))
        self._plain(plain, super().mask_)

    def _before_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        plain, sharded = self._split()
        if not self._masked_this_step:
            self.mask_()
        self._saved_local = []
        if self.freeze:
            with torch.no_grad():
                for m in sharded:
                    for t in (m.param, m.bias):
                        if t is None:
                            continue
                        local = local_tensor(t.detach())
                        frozen = ~local_keep(t, _keep_for(m, t))
                        self._saved_local.append((local, frozen, local[frozen].clone()))
        self._masked_this_step = True  # the base class must not mask again
        self._plain(plain, super()._before_step, opt, args, kwargs)

    def _after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for local, frozen, values in self._saved_local:
                local[frozen] = values
        self._saved_local = []
        plain, _ = self._split()
        self._plain(plain, super()._after_step, opt, args, kwargs)

    def reset_step(self) -> None:
        """Forget this step's bookkeeping, the saved local slices of sharded masks included."""
        super().reset_step()
        self._saved_local = []

    def remove(self) -> None:
        """Uninstall the optimizer hooks and forget the masks."""
        super().remove()
        self._saved_local = []
