"""The live KV tuning handle: LoRA holders, neuron masks, reports, state.

Everything the handle owns is built in :meth:`KVHandle.__init__` from the plan (the LoRA tensors
with the config's seed, the fused-expert deltas, the neuron keep masks); :meth:`KV.install
<modulart.kv.operator.KV.install>` only puts it into the model. In mode ``lora`` the tensors are
real parameters *of the model* while the handle lives: each :class:`~modulart.kv.lora.LoRA` is a
child ``modulart_kv_lora`` of the linear module it adapts, each fused-expert delta sits in the
parametrisation of its stored tensor; so ``model.named_parameters()`` — any optimizer, the HF
Trainer, DDP, FSDP2, ``save_pretrained`` — sees them. ``remove()`` unregisters them and leaves
the model's ``state_dict()`` keys, hooks and ``requires_grad`` flags exactly as before.

Example:
    >>> import torch, modulart.kv
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> keys = list(model.state_dict())
    >>> h = modulart.kv.apply(model, target="keys", mode="lora", rank=2)
    >>> sorted(k for k in model.state_dict() if "lora" in k)
    ['0.modulart_kv_lora.lora_A', '0.modulart_kv_lora.lora_B']
    >>> h.remove(); list(model.state_dict()) == keys
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from modulart.core.errors import IncompatibleArtifactError, UnsupportedOperationError
from modulart.core.grad_mask import GradientMasker
from modulart.core.operator import AnyOperator, Handle
from modulart.core.types import OptimizerLike, StateDict, StateValue
from modulart.core.unwrap import ShardAwareMasker, is_dtensor, unwrap_optimizer
from modulart.kv.config import KVConfig
from modulart.kv.expert_lora import ExpertLoRA, FusedDelta, unparametrize_param
from modulart.kv.lora import LoRA
from modulart.kv.peft_targets import module_paths
from modulart.kv.report import KVReport, ReportRow
from modulart.kv.targets import Part

if TYPE_CHECKING:
    from modulart.kv.operator import KVPlan

__all__ = ["HOLDER", "KVHandle", "ParamGroup", "neurons_key", "owned_parameters"]

HOLDER = "modulart_kv_lora"
"""The attribute under which a LoRA is registered on the linear module it adapts (``_<role>`` for a
row block of a fused gate/up layer; ``_2``, ``_3``... when another handle's LoRA sits there)."""

ParamGroup = dict[str, list[torch.Tensor] | float]
"""An optimizer parameter group: ``{"params": [...], "weight_decay": float}``."""


def neurons_key(block: str) -> str:
    """The state-dict key of a block's kept-neuron vector in mode ``mask``."""
    return f"neurons.{block}"


def owned_parameters(model: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters of modules modulart registered into ``model`` (``_modulart_owned = True``)."""
    for module in model.modules():
        if getattr(module, "_modulart_owned", False):
            yield from module.parameters()


def _lora_key(part: Part) -> str:
    """The state-dict prefix of a part's LoRA: the module path (``.<role>`` for a row block)."""
    if part.ref is None:
        return f"{part.name}.{part.role}"  # fused experts: <parameter name>.<role>
    return part.ref.path if part.ref.rows is None else f"{part.ref.path}.{part.role}"


class KVHandle(Handle[KVConfig]):
    """A live KV tuning setup: ``param_groups()``, ``report()``, ``peft_target_modules()``,
    ``attach(optimizer)`` / ``mask_()`` (mask mode), ``state_dict()``, ``merge_()``, ``disable()``.

    Attributes:
        parts: the trained tensors (from the plan).
        lora: mode ``lora``, linear modules: state-dict prefix -> :class:`LoRA` (a model submodule
            while the handle lives).
        expert_lora: mode ``lora``, fused experts: ``<parameter name>.<role>`` -> :class:`ExpertLoRA`.
        neurons: mode ``mask``: block path -> ``[d_ff]`` bool vector of kept neurons.
        keep: mode ``mask``: ``id(param) -> (param, keep, axis)``, the stored-orientation masks.
        optimizer: the optimizer given to :meth:`attach` (unwrapped), if any.
    """

    def __init__(self, model: nn.Module, operator: AnyOperator, config: KVConfig, plan: KVPlan) -> None:
        super().__init__(model, operator, config, plan)
        self.parts: list[Part] = list(plan.parts)
        self.neurons: dict[str, torch.Tensor] = {k: v.clone() for k, v in plan.neurons.items()}
        self.lora: dict[str, LoRA] = {}
        self.roles: dict[str, str] = {}
        self.expert_lora: dict[str, ExpertLoRA] = {}
        self.fused: list[tuple[nn.Module, str, FusedDelta]] = []  # (owner, parameter name, parametrisation)
        self.holders: list[tuple[nn.Module, str, LoRA]] = []  # registered by install
        self.parametrized: list[tuple[nn.Module, str, list[str]]] = []  # by install: owner, name, order
        self.keep: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.masker: GradientMasker | None = None
        self.step_masker: GradientMasker | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if config.mode == "lora":
            self._build_lora()
        elif config.mode == "mask":
            self.keep = self._keep_masks(self.neurons)
            self.masker = ShardAwareMasker(model, registry=self.registry.scope("mask"))
            for param, keep, axis in self.keep.values():
                self.masker.set(param, keep, axis=axis)

    def _build_lora(self) -> None:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        fused: dict[str, list[ExpertLoRA]] = {}
        for part in self.parts:
            if part.is_bias:
                continue
            key = _lora_key(part)
            if part.ref is None:  # fused experts: a per-expert delta on the stored 3-D tensor
                if part.axis is None:  # pragma: no cover - resolve_parts gives every matrix an axis
                    raise UnsupportedOperationError(f"{part.name}: fused expert part without a neuron axis")
                index = torch.nonzero(part.keep(torch.ones(part.d_ff, dtype=torch.bool))).flatten()
                delta = ExpertLoRA(
                    part.param, axis=part.axis, index=index, rank=cfg.rank, alpha=cfg.alpha, generator=gen
                )
                fused.setdefault(part.name, []).append(delta)
                self.expert_lora[key] = delta
                continue
            self.lora[key] = LoRA(part.ref, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, generator=gen)
            self.roles[key] = part.role
        for name, deltas in fused.items():
            owner_path, _, pname = name.rpartition(".")
            self.fused.append((self.model.get_submodule(owner_path), pname, FusedDelta(deltas)))

    def _keep_masks(self, neurons: Mapping[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
        out: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for part in self.parts:
            if part.axis is None:
                continue
            keep = part.keep(neurons[part.block].to(part.param.device))
            if id(part.param) in out:  # fused gate and up: one tensor, the union of both slices
                keep = keep | out[id(part.param)][1]
            out[id(part.param)] = (part.param, keep, part.axis)
        return out

    # --- lifecycle ----------------------------------------------------------------------------
    def _teardown(self) -> None:
        while self.parametrized:  # one entry at a time, forgotten once undone: a retried remove() resumes
            owner, name, order = self.parametrized[-1]
            unparametrize_param(owner, name, merge=False, order=order)
            self.parametrized.pop()
        while self.holders:
            module, name, lora = self.holders[-1]
            if module._modules.get(name) is lora:
                _drop_holder(module, name)
            self.holders.pop()
        for masker in (self.step_masker, self.masker):
            if masker is not None:
                masker.remove()
        self.masker = self.step_masker = None
        self.lora, self.expert_lora, self.fused, self.keep = {}, {}, [], {}

    def _set_enabled(self, enabled: bool) -> None:
        """LoRA hooks follow the registry; fused-expert parametrisations read the stored weight when off."""
        for _, _, delta in self.fused:
            delta.active = enabled

    def merge_(self) -> nn.Module:
        """Make the tuning permanent without changing the function; the handle is removed.

        Mode ``lora``: every delta is added into its base weight (fused experts: into the stored
        tensor), then the holders, hooks and ``requires_grad`` changes go. Modes ``full`` and
        ``mask`` trained the weights themselves and leave the forward unchanged: ``merge_()`` is
        :meth:`remove` (weights kept, flags restored). A disabled handle merges its deltas too.
        """
        self._check_live()
        with torch.no_grad():
            for lora in self.lora.values():
                lora.merge_()
        for owner, name, order in reversed(self.parametrized):
            unparametrize_param(owner, name, merge=True, order=order)
        self.parametrized = []
        self.remove()
        return self.model

    # --- training helpers ---------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of every model parameter that trains now (the LoRA tensors are model parameters)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float = 0.0) -> list[ParamGroup]:
        """Optimizer groups: matrices with ``weight_decay``; biases and 1-D tensors without (empty groups dropped).

        Example:
            >>> import torch, modulart.kv
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
            >>> h = modulart.kv.apply(model, target="both", train_biases=True)
            >>> [(len(g["params"]), g["weight_decay"]) for g in h.param_groups(0.01)]
            [(2, 0.01), (2, 0.0)]
        """
        self._check_live()
        named = self.trainable()
        decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("bias")]
        ids = {id(p) for p in decay}
        rest = [p for _, p in named if id(p) not in ids]
        groups: list[ParamGroup] = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def attach(self, optimizer: OptimizerLike) -> None:
        """Remember ``optimizer`` (accelerate's wrappers unwrapped); mode ``mask``: also keep masked
        slices fixed through its ``step()`` (momentum, decoupled weight decay).

        Gradients are masked right after backward anyway; with an optimizer attached the masked
        slices are additionally restored after each step (``GradientMasker(freeze=True)``).
        Attaching another optimizer replaces the previous one.
        """
        self._check_live()
        opt = unwrap_optimizer(optimizer)
        self.optimizer = opt
        if self.config.mode != "mask":
            return
        self._rebind()
        masker = ShardAwareMasker(self.model, opt, freeze=True, registry=self.registry.scope("mask-step"))
        for p, keep, axis in self.keep.values():
            masker.set(p, keep, axis=axis)
        if self.step_masker is not None:
            self.step_masker.remove()
        self.step_masker = masker
        self._sync_hooks()

    @property
    def sharded(self) -> bool:
        """Whether a trained tensor is FSDP2-sharded now (``fully_shard`` after ``apply``)."""
        return any(is_dtensor(self._current(part)) for part in self.parts)

    def _current(self, part: Part) -> torch.Tensor:
        """The part's parameter as the model holds it now (FSDP2 replaces parameters by sharded ones)."""
        try:
            return self.model.get_parameter(part.name)
        except AttributeError:
            return part.param

    def _rebind(self) -> None:
        """Point parts and masks at the model's current parameters (after ``fully_shard`` replaced them).

        FSDP2 writes reduce-scattered gradients straight into the sharded parameters, so the
        post-accumulate-grad masks of the old ones never run: a sharded model masks on the optimizer
        step (``attach``), on each rank's local shard.
        """
        changed = False
        for i, part in enumerate(self.parts):
            current = self._current(part)
            if current is not part.param:
                self.parts[i] = dataclasses.replace(part, param=current)
                changed = True
        if changed:
            for masker in (self.masker, self.step_masker):
                if masker is not None:
                    masker.clear()  # the masks of the replaced parameters
            self._set_neurons(self.neurons)

    def check_masking(self) -> None:
        """Mode ``mask`` on a sharded model: refuse to train without an attached optimizer.

        Raises:
            UnsupportedOperationError: the trained tensors were replaced since apply (FSDP2
                ``fully_shard``) and no optimizer was attached (the gradients would not be masked).
        """
        if self.config.mode != "mask" or self.step_masker is not None:
            return
        # FSDP2 swaps the registered parameters (sharded between steps, unsharded inside the forward)
        replaced = [part.name for part in self.parts if self._current(part) is not part.param]
        if replaced:
            raise UnsupportedOperationError(
                f"KV mode='mask': the parameters {replaced[:2]} were replaced since apply (FSDP2 fully_shard), where "
                "gradients bypass the post-backward masks: build the optimizer after fully_shard and call "
                "handle.attach(optimizer) before training (see docs/distributed.md)"
            )

    def mask_(self) -> None:
        """Mask mode: zero the gradient slices of unselected neurons now (already done after backward)."""
        self._check_live()
        self._rebind()
        if self.masker is not None:
            self.masker.mask_()

    # --- inspection ---------------------------------------------------------------------------
    def report(self) -> KVReport:
        """Trainable elements of every tensor KV tuning owns, by block and matrix (``print()`` it)."""
        owned = {id(p) for p in owned_parameters(self.model)}
        total = sum(p.numel() for p in self.model.parameters() if id(p) not in owned)
        rows: list[ReportRow] = []
        if self.config.mode == "lora":
            for part in self.parts:
                if part.is_bias:
                    rows.append(_row(part, part.role, part.param.numel()))
                    continue
                key = _lora_key(part)
                source = self.lora[key] if part.ref is not None else self.expert_lora[key]
                for which in ("lora_A", "lora_B"):
                    t = getattr(source, which)
                    rows.append(
                        ReportRow(
                            part.block, f"{key}.{which}", f"{part.role}.{which}", tuple(t.shape), t.numel(), t.numel()
                        )
                    )
            return KVReport(rows, total)
        seen: dict[int, int] = {}
        for part in self.parts:
            if id(part.param) in seen:  # fused gate + up in one tensor: one row
                i = seen[id(part.param)]
                rows[i] = ReportRow(**{**rows[i].__dict__, "role": f"{rows[i].role}+{part.role}"})
                continue
            n = part.param.numel()
            if id(part.param) in self.keep:
                _, keep, axis = self.keep[id(part.param)]
                n = int(keep.sum()) * (n // int(part.param.shape[axis]))
            seen[id(part.param)] = len(rows)
            rows.append(_row(part, part.role, n))
        return KVReport(rows, total)

    def peft_target_modules(self) -> list[str]:
        """Full module paths of the chosen linear maps, for ``peft.LoraConfig(target_modules=...)``.

        Raises:
            UnsupportedOperationError: fused experts are parameters, not modules (PEFT's
                ``target_parameters`` would be needed).
        """
        return module_paths(self.parts)

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> StateDict:
        """Mode ``lora``: ``<module>.lora_A [r, in]`` / ``<module>.lora_B [out, r]`` (fused experts:
        ``<parameter>.<role>.lora_A|B``); mode ``mask``: ``neurons.<block>`` bool vectors; ``full``: empty.

        Under FSDP2 (``fully_shard``) the LoRA tensors are sharded: they are gathered whole, a
        collective every rank must call.
        """
        out: StateDict = {k: _full(v).cpu().clone() for k, v in self._lora_tensors().items()}
        out.update({neurons_key(b): keep.cpu().clone() for b, keep in self.neurons.items()})
        return out

    def _lora_tensors(self) -> dict[str, torch.Tensor]:
        loras: dict[str, LoRA | ExpertLoRA] = {**self.lora, **self.expert_lora}
        return {f"{path}.{w}": getattr(lora, w) for path, lora in loras.items() for w in ("lora_A", "lora_B")}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore what :meth:`state_dict` returned (mode ``mask`` also accepts an empty state: the
        neuron choice then comes from the config, as artefacts of older versions have it)."""
        self._check_live()
        if self.config.mode == "mask" and not state:
            return
        own: dict[str, torch.Tensor] = {**self._lora_tensors()}
        own.update({neurons_key(b): keep for b, keep in self.neurons.items()})
        if set(state) != set(own):
            raise IncompatibleArtifactError(
                f"KV state keys differ: missing {sorted(set(own) - set(state))[:6]}, "
                f"unexpected {sorted(set(state) - set(own))[:6]}"
            )
        tensors: dict[str, torch.Tensor] = {}
        for key, mine in own.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(mine.shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise IncompatibleArtifactError(f"{key}: saved {got}, expected a tensor of shape {tuple(mine.shape)}")
            tensors[key] = value
        with torch.no_grad():
            for key, param in self._lora_tensors().items():
                _copy_into(param, tensors[key])
        if self.neurons:
            self._set_neurons({b: tensors[neurons_key(b)].to(torch.bool).clone() for b in self.neurons})

    def _set_neurons(self, neurons: dict[str, torch.Tensor]) -> None:
        self.neurons = neurons
        self.keep = self._keep_masks(neurons)
        for masker in (self.masker, self.step_masker):
            if masker is not None:
                for p, keep, axis in self.keep.values():
                    masker.set(p, keep, axis=axis)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: an FSDP2-sharded ``DTensor`` is gathered."""
    t = t.detach()
    gather = getattr(t, "full_tensor", None)
    whole = gather() if callable(gather) else t
    return whole if isinstance(whole, torch.Tensor) else t


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)``; an FSDP2-sharded parameter takes its shard of ``value``."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), mesh, getattr(param, "placements", None))
    param.copy_(value)


def _row(part: Part, role: str, trainable: int) -> ReportRow:
    return ReportRow(part.block, part.name, role, tuple(part.param.shape), trainable, part.param.numel())


def _drop_holder(module: nn.Module, name: str) -> None:
    """Unregister the LoRA holder ``name`` of ``module`` (one resumable step of ``remove()``)."""
    del module._modules[name]
