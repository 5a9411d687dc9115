"""The MIGU operator: update only the output units with the largest activation magnitude each step.

Example:
    >>> import torch, modulart.migu
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> migu = modulart.migu.apply(model, keep_ratio=0.3, select="topk", optimizer=opt)
    >>> model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    >>> {p: s.kept_fraction for p, s in migu.stats().items()}
    {'0': 0.3, '2': 0.5}
    >>> migu.remove()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import UnsupportedOperationError
from modulart.core.grad_mask import GradientMasker
from modulart.core.hooks import Priority
from modulart.core.operator import Handle, Operator, OperatorConfig, Plan
from modulart.migu.config import MIGUConfig
from modulart.migu.coverage import warn_ungated
from modulart.migu.expert_group import ExpertGroup
from modulart.migu.stats import LayerStats, MaskHistory, UnitStats, random_mask, select_mask
from modulart.migu.targets import Target, discover, find_targets

__all__ = ["MIGU", "MIGUHandle", "Target", "apply", "find_targets"]  # Target, find_targets: from .targets


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose ``step()`` really runs (accelerate wraps it as ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"MIGU needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class _Layer:
    def __init__(self, target: Target, config: MIGUConfig) -> None:
        self.target = target
        self.acc = UnitStats(target.units, config.stat)
        self.history = MaskHistory(target.units, config.keep_ratio)


class MIGUHandle(Handle):
    """A live MIGU application: statistics hooks, the step-boundary mask, overlap reports."""

    layers: dict[str, _Layer]
    expert_groups: dict[str, ExpertGroup]
    masker: GradientMasker | None = None
    expert_masker: GradientMasker | None = None
    optimizer: torch.optim.Optimizer | None = None

    def _init_state(self) -> None:
        cfg = self.config
        assert isinstance(cfg, MIGUConfig)
        self.cfg = cfg
        self.layers = {}
        self.expert_groups = {}
        self._active = True
        self._was_active = True
        self._decided = False
        self._tasks_done = 0
        self._token_mask: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(cfg.seed)

    # --- wiring -------------------------------------------------------------------------------
    def attach(self, optimizer: Any) -> None:
        """Mask right before every ``optimizer.step()`` (and freeze masked units, if configured)."""
        self._check_live()
        if self.optimizer is not None:
            raise UnsupportedOperationError("this MIGU handle already has an optimizer")
        opt = _unwrap(optimizer)
        with self.registry.atomic():
            self.registry.optimizer_step_pre(opt, self._pre_step, priority=Priority.INTERVENE - 1, name="migu/decide")
            self.masker = GradientMasker(
                self.model, opt, freeze=self.cfg.freeze_masked_rows, registry=self.registry.scope("mask")
            )
            if self.expert_groups:
                scope = self.registry.scope("expert-mask")
                self.expert_masker = GradientMasker(self.model, opt, freeze=self.cfg.freeze_masked_rows, registry=scope)
            self.registry.optimizer_step_post(opt, self._post_step, priority=Priority.RECORD, name="migu/reset")
        self.optimizer = opt

    def _record(self, layer: _Layer) -> Any:
        t = layer.target

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._active and torch.is_grad_enabled():
                if t.from_input:  # routers: the logits x @ W.T + b, whatever the forward returns
                    x = args[0].detach()
                    with torch.no_grad():
                        out = F.linear(x.to(t.weight.dtype), t.weight, t.bias)
                    mask = self._token_mask
                    if mask is not None and mask.numel() == out[..., 0].numel():
                        mask = mask.reshape(out.shape[:-1])
                    layer.acc.record(out, mask, path=t.path)
                    return
                out = output[0] if isinstance(output, tuple) else output
                layer.acc.record(out, self._token_mask, path=t.path)

        return hook

    def _record_experts(self, group: ExpertGroup) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self._active and torch.is_grad_enabled():
                group.record(args, kwargs, self._token_mask)

        return hook

    # --- the step boundary --------------------------------------------------------------------
    def _all_reduce(self) -> None:
        """Average every layer's statistics across DDP ranks in one flat fp32 buffer."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        accs: list[Any] = [layer.acc for layer in self.layers.values()]
        accs += [a for g in self.expert_groups.values() for a in g.accumulators()]
        first = next(iter(self.layers.values()), None)
        device = first.target.weight.device if first else next(iter(self.expert_groups.values())).experts.down.device
        chunks = [acc.to_flat(device) for acc in accs]
        flat = torch.cat(chunks)
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        start = 0
        for acc, chunk in zip(accs, chunks, strict=True):
            acc.load_flat(flat[start : start + chunk.numel()], device)
            start += chunk.numel()

    def _decide(self) -> None:
        masker = self.masker
        if masker is None:
            raise UnsupportedOperationError("MIGU has no optimizer: pass optimizer= to apply() or call attach()")
        if self._decided:
            return
        self._decided = True
        if not self._active:
            masker.clear()
            if self.expert_masker is not None:
                self.expert_masker.clear()
            return
        self._all_reduce()
        masking = not (self.cfg.skip_first_task and self._tasks_done == 0)
        for layer in self.layers.values():
            t = layer.target
            if not layer.acc.seen:
                layer.history.push(None)
                masker.clear(t.weight)
                continue
            if self.cfg.control == "random":
                keep = random_mask(t.units, self.cfg.keep_ratio, self._generator, t.weight.device)
            else:
                keep = select_mask(layer.acc.score(), self.cfg.keep_ratio, self.cfg.select)
            layer.history.push(keep)
            if masking:
                masker.set(t.weight, keep, axis=t.axis, bias=t.bias if self.cfg.mask_bias else None)
            else:
                masker.clear(t.weight)
        for group in self.expert_groups.values():
            self._decide_experts(group, masking)

    def _decide_experts(self, group: ExpertGroup, masking: bool) -> None:
        masker = self.expert_masker
        assert masker is not None
        for p in group.experts.params():
            masker.clear(p)
        random = self.cfg.control == "random"
        for param, keep, axis, bias in group.decide(self.cfg.select, random=random, generator=self._generator):
            if masking:
                masker.set(param, keep, axis=axis, bias=bias if self.cfg.mask_bias else None)

    def _pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._decide()

    def _post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for layer in self.layers.values():
            layer.acc.reset()
        for group in self.expert_groups.values():
            group.reset()
        self._decided = False

    # --- public controls ----------------------------------------------------------------------
    def mask_(self) -> None:
        """Decide this step's masks now and zero the masked gradients (call before clipping)."""
        self._check_live()
        self._decide()
        assert self.masker is not None
        self.masker.mask_()
        if self.expert_masker is not None:
            self.expert_masker.mask_()

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """``[batch, seq]`` mask (nonzero = real token) for the next forwards; None: every position votes."""
        self._token_mask = None if mask is None else mask.detach()

    def task_boundary(self) -> None:
        """Close the current task: its most-kept units become an entry of ``stats().task_jaccard``."""
        self._check_live()
        for layer in self.layers.values():
            layer.history.end_task()
        for group in self.expert_groups.values():
            group.end_task()
        self._tasks_done += 1

    def disable(self) -> None:
        """Stop recording and masking (pending statistics are dropped)."""
        self._active = False
        for layer in self.layers.values():
            layer.acc.reset()
        for group in self.expert_groups.values():
            group.reset()
        for m in (self.masker, self.expert_masker):
            if m is not None:
                m.clear()

    def enable(self) -> None:
        self._active = True

    @property
    def enabled(self) -> bool:
        return self._active

    def _set_enabled(self, enabled: bool) -> None:
        if not enabled:
            self._was_active = self._active
            self.disable()
        elif self._was_active:
            self.enable()

    def stats(self) -> dict[str, LayerStats]:
        """Per layer: kept fraction of the last step, Jaccard with the previous step and with earlier tasks.

        Fused experts report every expert projection as a layer: ``"<experts path>.<e>.<gate|up|down>"``.
        """
        out = {p: layer.history.report() for p, layer in self.layers.items()}
        for group in self.expert_groups.values():
            out.update(group.stats())
        return out

    def masks(self) -> dict[str, torch.Tensor]:
        """The last step's bool ``[units]`` mask per layer that has one (True = updated)."""
        out = {p: layer.history.last.clone() for p, layer in self.layers.items() if layer.history.last is not None}
        for group in self.expert_groups.values():
            out.update(group.masks())
        return out

    def scores(self) -> dict[str, torch.Tensor]:
        """The statistic accumulated so far in the running step: fp32 ``[units]`` per layer that ran.

        Read it between ``backward()`` and ``optimizer.step()`` (the step resets it).
        """
        out = {p: layer.acc.score().clone() for p, layer in self.layers.items() if layer.acc.seen}
        for group in self.expert_groups.values():
            out.update(group.scores())
        return out

    def _teardown(self) -> None:
        for m in (self.masker, self.expert_masker):
            if m is not None:
                m.remove()
        self._token_mask = None


class MIGU(Operator):
    """MIGU (arXiv 2406.17245): per step, update only the output units with the largest magnitude."""

    name = "migu"
    config_class = MIGUConfig
    handle_class = MIGUHandle

    @classmethod
    def plan(cls, model: nn.Module, config: OperatorConfig) -> Plan:
        assert isinstance(config, MIGUConfig)
        found = discover(model, config.targets, moe=config.moe)
        if config.targets is None:
            warn_ungated(model, found, stacklevel=5)  # the caller of modulart.migu.apply
        sel = None if config.targets is None else str(config.targets)
        paths = [t.path for t in found.targets] + [fe.path for fe in found.experts]
        return Plan(targets=paths, selector=sel, data={"targets": found.targets, "experts": found.experts})

    @classmethod
    def install(cls, handle: Handle, plan: Plan) -> None:
        assert isinstance(handle, MIGUHandle)
        handle._init_state()
        for t in plan.data["targets"]:
            layer = _Layer(t, handle.cfg)
            handle.layers[t.path] = layer
            handle.registry.forward(t.module, handle._record(layer), priority=Priority.RECORD)
        for fe in plan.data["experts"]:
            group = ExpertGroup(fe, handle.cfg.stat, handle.cfg.keep_ratio)
            handle.expert_groups[fe.path] = group
            hook = handle._record_experts(group)
            handle.registry.forward(fe.module, hook, priority=Priority.RECORD, with_kwargs=True)


def apply(
    model: nn.Module,
    config: MIGUConfig | Mapping[str, Any] | None = None,
    /,
    *,
    optimizer: Any = None,
    **overrides: Any,
) -> MIGUHandle:
    """Gate the updates of ``model``'s linear layers by output magnitude; see :class:`MIGUConfig`.

    Args:
        model: any model with ``nn.Linear`` / HF ``Conv1D`` layers (DDP-wrapped or not).
        config: a :class:`MIGUConfig` (or dict); keyword overrides win.
        optimizer: masks are built and applied right before its ``step()``; without it, call
            :meth:`MIGUHandle.attach` before training.

    Returns:
        The handle: ``stats()``, ``task_boundary()``, ``mask_()``, ``enable()`` / ``disable()``,
        ``set_token_mask()``, ``remove()``.
    """
    handle = MIGU.apply(model, config, **overrides)
    assert isinstance(handle, MIGUHandle)
    if optimizer is not None:
        try:
            handle.attach(optimizer)
        except BaseException:
            handle.remove()
            raise
    return handle
