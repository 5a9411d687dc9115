"""The KV operator: train FFN keys, values or both — fully, with LoRA, or through neuron masks.

Example:
    >>> import torch
    >>> import modulart.kv
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> h = modulart.kv.apply(model, target="keys")
    >>> [n for n, p in model.named_parameters() if p.requires_grad]
    ['0.weight']
    >>> h.remove(); all(p.requires_grad for p in model.parameters())
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from modulart.core.errors import IncompatibleArtifactError, UnsupportedOperationError
from modulart.core.grad_mask import GradientMasker
from modulart.core.operator import Handle, Operator, OperatorConfig, Plan
from modulart.kv.config import KVConfig
from modulart.kv.expert_lora import ExpertLoRA, FusedDelta, parametrize_param, unparametrize_param
from modulart.kv.lora import LoRA
from modulart.kv.report import KVReport, ReportRow
from modulart.kv.targets import Part, choose_blocks, neuron_keep, resolve_parts

__all__ = ["KV", "KVHandle", "apply"]


class KVHandle(Handle):
    """A live KV tuning setup: ``param_groups()``, ``report()``, ``peft_target_modules()``,
    ``mask_()`` / ``attach_optimizer()`` (mask mode), ``state_dict()`` (LoRA tensors), ``merge_()``.
    """

    def __init__(self, model: nn.Module, operator: type[Operator], config: OperatorConfig, plan: Plan) -> None:
        super().__init__(model, operator, config, plan)
        self.parts: list[Part] = list(plan.data.get("parts", []))
        self.lora: dict[str, LoRA] = {}
        self.expert_lora: dict[str, ExpertLoRA] = {}  # "<param name>.<role>" -> delta on fused experts
        self._parametrized: list[tuple[nn.Module, str]] = []
        self.keep: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # id(param) -> (param, keep, axis)
        self.masker: GradientMasker | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._flags: list[tuple[torch.Tensor, bool]] = []

    @property
    def kv_config(self) -> KVConfig:
        assert isinstance(self.config, KVConfig)
        return self.config

    # --- lifecycle ----------------------------------------------------------------------------
    def _teardown(self) -> None:
        for owner, name in reversed(self._parametrized):
            unparametrize_param(owner, name, merge=False)
        self._parametrized = []
        self.expert_lora = {}
        if self.masker is not None:
            self.masker.remove()
            self.masker = None
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._flags = []
        self.lora = {}
        self.keep = {}

    def merge_(self) -> nn.Module:
        """LoRA: add every delta into its base weight, then remove (no hooks remain, flags restored).

        In modes ``full`` and ``mask`` the training already happened in the weights: this just removes.
        """
        self._check_live()
        for lora in self.lora.values():
            lora.merge_()
        for owner, name in reversed(self._parametrized):
            unparametrize_param(owner, name, merge=True)
        self._parametrized = []
        self.remove()
        return self.model

    # --- training helpers ---------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of everything that trains now: model parameters with requires_grad + LoRA."""
        out: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        for path, lora in self.lora.items():
            out += [(f"{path}.lora_A", lora.lora_A), (f"{path}.lora_B", lora.lora_B)]
        return out  # fused-expert deltas live in the model's parametrisations: named_parameters lists them

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups: matrices with ``weight_decay``; biases and 1-D tensors without (empty groups dropped).

        Example:
            >>> import torch, modulart.kv
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
            >>> h = modulart.kv.apply(model, target="both", train_biases=True)
            >>> [(len(g["params"]), g["weight_decay"]) for g in h.param_groups(0.01)]
            [(2, 0.01), (2, 0.0)]
        """
        self._check_live()
        decay = [p for n, p in self.trainable() if p.dim() >= 2 and not n.endswith("bias")]
        ids = {id(p) for p in decay}
        rest = [p for _, p in self.trainable() if id(p) not in ids]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mask mode: also keep masked slices fixed through ``optimizer.step()`` (momentum, weight decay).

        Gradients are masked right after backward anyway; with an optimizer attached the masked slices
        are additionally restored after each step (``GradientMasker(freeze=True)``).
        """
        self._check_live()
        self.optimizer = optimizer
        if self.kv_config.mode != "mask":
            return
        masker = GradientMasker(self.model, optimizer, freeze=True, registry=self.registry.scope("mask-step"))
        for p, keep, axis in self.keep.values():
            masker.set(p, keep, axis=axis)
        if self.masker is not None:
            self.masker.remove()
        self.masker = masker

    def mask_(self) -> None:
        """Mask mode: zero the gradient slices of unselected neurons now (already done after backward)."""
        self._check_live()
        if self.masker is not None:
            self.masker.mask_()

    # --- inspection ---------------------------------------------------------------------------
    def report(self) -> KVReport:
        """Trainable elements of every tensor KV tuning owns, by block and matrix (``print()`` it)."""
        total = sum(p.numel() for p in self.model.parameters())
        rows: list[ReportRow] = []
        if self.kv_config.mode == "lora":
            for part in self.parts:
                if part.is_bias:
                    rows.append(_row(part, part.role, part.param.numel()))
                    continue
                key = part.module or _expert_key(part)
                source = self.lora[key] if part.module is not None else self.expert_lora[key]
                for which in ("lora_A", "lora_B"):
                    t = getattr(source, which)
                    rows.append(
                        ReportRow(
                            part.block,
                            f"{key}.{which}",
                            f"{part.role}.{which}",
                            tuple(t.shape),
                            t.numel(),
                            t.numel(),
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
        out: list[str] = []
        for part in self.parts:
            if part.is_bias:
                continue
            if part.module is None:
                raise UnsupportedOperationError(
                    f"{part.name}: fused expert storage has no per-matrix module for PEFT target_modules"
                )
            if part.module not in out:
                out.append(part.module)
        return out

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA mode: ``<module>.lora_A [r, in]`` / ``<module>.lora_B [out, r]``; otherwise empty."""
        return {k: v.detach().cpu() for k, v in self._lora_tensors().items()}

    def _lora_tensors(self) -> dict[str, torch.Tensor]:
        loras: dict[str, LoRA | ExpertLoRA] = {**self.lora, **self.expert_lora}
        return {f"{path}.{w}": getattr(lora, w) for path, lora in loras.items() for w in ("lora_A", "lora_B")}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if not self.lora and not self.expert_lora:
            super().load_state_dict(state)
            return
        own = self._lora_tensors()
        if set(state) != set(own):
            raise IncompatibleArtifactError(
                f"KV LoRA state keys differ: missing {sorted(set(own) - set(state))[:6]}, "
                f"unexpected {sorted(set(state) - set(own))[:6]}"
            )
        for key, param in own.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise IncompatibleArtifactError(
                    f"{key}: saved shape {tuple(state[key].shape)}, expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(state[key])


def _row(part: Part, role: str, trainable: int) -> ReportRow:
    return ReportRow(part.block, part.name, role, tuple(part.param.shape), trainable, part.param.numel())


class KV(Operator):
    """FFN key/value tuning (arXiv 2402.12233): train exactly the keys and/or values of chosen FFNs."""

    name = "kv"
    config_class = KVConfig
    handle_class = KVHandle

    @classmethod
    def plan(cls, model: nn.Module, config: OperatorConfig) -> Plan:
        assert isinstance(config, KVConfig)
        blocks = choose_blocks(model, config)
        parts = resolve_parts(model, config, blocks)
        if config.mode == "lora" and config.lora_dropout > 0:
            fused = sorted({p.name for p in parts if p.ref is None and not p.is_bias})
            if fused:
                raise UnsupportedOperationError(
                    f"KV mode='lora' on fused expert storage {fused[:4]} keeps its deltas in weight space, where "
                    f"input dropout has no place: lora_dropout = {config.lora_dropout} needs linear modules (use 0)"
                )
        neurons = neuron_keep(blocks, config) if config.mode == "mask" else {}
        return Plan(
            targets=[b.path for b in blocks],
            selector=str(config.layers),
            data={"parts": parts, "neurons": neurons},
        )

    @classmethod
    def install(cls, handle: Handle, plan: Plan) -> None:
        assert isinstance(handle, KVHandle)
        cfg = handle.kv_config
        model = handle.model
        handle._flags = [(p, p.requires_grad) for p in model.parameters()]
        if cfg.freeze_rest:
            for p in model.parameters():
                p.requires_grad_(False)
        parts: list[Part] = plan.data["parts"]
        for part in parts:
            part.param.requires_grad_(cfg.mode != "lora" or part.is_bias)
        if cfg.mode == "lora":
            gen = torch.Generator().manual_seed(cfg.seed)
            fused: dict[str, list[tuple[Part, ExpertLoRA]]] = {}
            for part in parts:
                if part.is_bias:
                    continue
                if part.ref is None:  # fused experts: a per-expert delta on the stored 3-D tensor
                    assert part.axis is not None
                    index = torch.nonzero(part.keep(torch.ones(part.d_ff, dtype=torch.bool))).flatten()
                    delta = ExpertLoRA(
                        part.param, axis=part.axis, index=index, rank=cfg.rank, alpha=cfg.alpha, generator=gen
                    )
                    fused.setdefault(part.name, []).append((part, delta))
                    continue
                assert part.module is not None
                lora = LoRA(part.ref, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, generator=gen)
                lora.install(handle.registry)
                handle.lora[part.module] = lora
            for name, pairs in fused.items():
                owner_path, _, pname = name.rpartition(".")
                owner = model.get_submodule(owner_path)
                parametrize_param(owner, pname, FusedDelta([d for _, d in pairs]))
                handle._parametrized.append((owner, pname))
                handle.expert_lora.update({_expert_key(p): d for p, d in pairs})
        elif cfg.mode == "mask":
            _install_masks(handle, parts, plan.data["neurons"])


def _expert_key(part: Part) -> str:
    """The state-dict prefix of a fused part's LoRA: ``<parameter name>.<role>``."""
    return f"{part.name}.{part.role}"


def _install_masks(handle: KVHandle, parts: list[Part], neurons: dict[str, torch.Tensor]) -> None:
    for part in parts:
        if part.axis is None:
            continue
        keep = part.keep(neurons[part.block].to(part.param.device))
        if id(part.param) in handle.keep:  # fused gate and up: one tensor, the union of both slices
            keep = keep | handle.keep[id(part.param)][1]
        handle.keep[id(part.param)] = (part.param, keep, part.axis)
    handle.keep = {k: v for k, v in handle.keep.items() if not bool(v[1].all())}
    handle.masker = GradientMasker(handle.model, registry=handle.registry.scope("mask"))
    for param, keep, axis in handle.keep.values():
        handle.masker.set(param, keep, axis=axis)
        shape = [1] * param.dim()
        shape[axis] = -1
        handle.registry.post_accumulate_grad(param, _grad_mask(keep.view(shape)))


def _grad_mask(keep: torch.Tensor) -> Any:
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.mul_(keep.to(param.grad.dtype))

    return hook


def apply(
    model: nn.Module,
    config: KVConfig | Mapping[str, Any] | None = None,
    /,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    **overrides: Any,
) -> KVHandle:
    """Make exactly the chosen FFN keys / values trainable; see :class:`KVConfig`.

    Args:
        model: any model whose FFN or MoE blocks modulart finds.
        config: a :class:`KVConfig` (or dict); keyword overrides win.
        optimizer: mode ``mask``: keep masked slices fixed through its steps (see
            :meth:`KVHandle.attach_optimizer`); remembered as ``handle.optimizer`` in every mode.

    Returns:
        The handle: ``param_groups()``, ``report()``, ``peft_target_modules()``, ``remove()``, ``merge_()``.

    Example:
        >>> import torch, modulart.kv
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> h = modulart.kv.apply(model, target="values", mode="lora", rank=2)
        >>> sorted(h.state_dict())
        ['2.lora_A', '2.lora_B']
        >>> _ = h.merge_()
    """
    handle = KV.apply(model, config, **overrides)
    assert isinstance(handle, KVHandle)
    if optimizer is not None:
        try:
            handle.attach_optimizer(optimizer)
        except BaseException:
            handle.remove()
            raise
    return handle
