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

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modulart.core.errors import UnsupportedModuleError, UnsupportedOperationError
from modulart.core.grad_mask import GradientMasker
from modulart.core.hooks import Priority
from modulart.core.linear import is_conv1d, is_linear_like
from modulart.core.operator import Handle, Operator, OperatorConfig, Plan
from modulart.core.select import as_selector
from modulart.migu.config import MIGUConfig
from modulart.migu.stats import LayerStats, MaskHistory, UnitStats, random_mask, select_mask

__all__ = ["MIGU", "MIGUHandle", "Target", "apply", "find_targets"]


@dataclass
class Target:
    """One gated layer: its weight, the output-unit axis of that weight (0, or 1 for Conv1D), its bias."""

    path: str
    module: nn.Module
    weight: torch.Tensor
    axis: int
    bias: torch.Tensor | None

    @property
    def units(self) -> int:
        return int(self.weight.shape[self.axis])


def _roots(model: nn.Module) -> list[nn.Module]:
    """The model and the modules it wraps (DDP / PEFT ``.module`` / ``.base_model``)."""
    out, m = [model], model
    for attr in ("module", "base_model", "model"):
        inner = getattr(m, attr, None)
        if isinstance(inner, nn.Module) and inner is not m:
            out.append(inner)
    return out


def _lm_heads(model: nn.Module) -> set[int]:
    heads: set[int] = set()
    for root in _roots(model):
        get = getattr(root, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    return heads


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} | {
        m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)
    }


def _is_tied(weight: torch.Tensor, embeddings: set[int]) -> bool:
    return id(weight) in embeddings or weight.data_ptr() in embeddings


def _target(path: str, module: nn.Module) -> Target:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if weight.dim() != 2:
        raise UnsupportedModuleError(f"{path!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    bias = getattr(module, "bias", None)
    return Target(path, module, weight, 1 if is_conv1d(module) else 0, bias if isinstance(bias, torch.Tensor) else None)


def _lora_parts(path: str, module: nn.Module) -> list[Target] | None:
    """PEFT-style LoRA layer (``lora_A`` / ``lora_B`` ModuleDicts): one target per adapter matrix."""
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not (isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict)):
        return None
    out = []
    for side, parts in (("lora_A", a), ("lora_B", b)):
        for key, sub in parts.items():
            if not is_linear_like(sub):
                raise UnsupportedModuleError(f"{path}.{side}.{key} is a {type(sub).__name__}; expected nn.Linear")
            out.append(_target(f"{path}.{side}.{key}", sub))
    return out


def find_targets(model: nn.Module, targets: Any = None) -> list[Target]:
    """The layers MIGU gates (see ``MIGUConfig.targets``), in model order, each weight once.

    Default: every ``nn.Linear`` / HF ``Conv1D`` whose weight requires grad, except the LM head
    (``lm_head`` or ``get_output_embeddings()``) and layers whose weight is an ``nn.Embedding``
    weight. A user selector may pick linears (tied ones warn) or PEFT LoRA layers (expanded to
    their ``lora_A`` / ``lora_B`` linears); anything else raises :class:`UnsupportedModuleError`.
    """
    heads, embeddings = _lm_heads(model), _embedding_weights(model)
    found: list[Target] = []
    if targets is None:
        for path, m in model.named_modules():
            if not path or not is_linear_like(m) or not m.weight.requires_grad:
                continue
            if id(m) in heads or path.rsplit(".", 1)[-1] == "lm_head" or _is_tied(m.weight, embeddings):
                continue
            found.append(_target(path, m))
    else:
        for path, m in as_selector(targets).select(model):
            lora = _lora_parts(path, m)
            if lora is not None:
                found.extend(lora)
                continue
            if not is_linear_like(m):
                raise UnsupportedModuleError(
                    f"MIGUConfig.targets selects {path!r}, a {type(m).__name__}; expected nn.Linear, a HF Conv1D "
                    "or a PEFT LoRA layer (lora_A / lora_B ModuleDicts)"
                )
            if _is_tied(_target(path, m).weight, embeddings):
                warnings.warn(
                    f"MIGU: {path!r} shares its weight with an input embedding; masking its rows also masks "
                    "embedding rows",
                    UserWarning,
                    stacklevel=3,
                )
            found.append(_target(path, m))
    unique: dict[int, Target] = {}
    for t in found:
        unique.setdefault(id(t.weight), t)
    if not unique:
        raise UnsupportedModuleError(f"MIGU found no trainable linear layer to gate in {type(model).__name__}")
    return list(unique.values())


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
    masker: GradientMasker | None = None
    optimizer: torch.optim.Optimizer | None = None

    def _init_state(self) -> None:
        cfg = self.config
        assert isinstance(cfg, MIGUConfig)
        self.cfg = cfg
        self.layers = {}
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
            self.registry.optimizer_step_post(opt, self._post_step, priority=Priority.RECORD, name="migu/reset")
        self.optimizer = opt

    def _record(self, layer: _Layer) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._active and torch.is_grad_enabled():
                out = output[0] if isinstance(output, tuple) else output
                layer.acc.record(out, self._token_mask, path=layer.target.path)

        return hook

    # --- the step boundary --------------------------------------------------------------------
    def _all_reduce(self) -> None:
        """Average every layer's statistics across DDP ranks in one flat fp32 buffer."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        layers = list(self.layers.values())
        device = layers[0].target.weight.device
        parts = []
        for layer in layers:
            acc = layer.acc
            total = acc.total if acc.total is not None else torch.zeros(acc.units, device=device)
            tokens = acc.tokens if acc.tokens is not None else torch.zeros((), device=device)
            seen = torch.ones(1, device=device) if acc.seen else torch.zeros(1, device=device)
            parts += [total.to(device), tokens.to(device).reshape(1), seen]
        flat = torch.cat(parts)
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        i = 0
        for layer in layers:
            n = layer.acc.units
            total, tokens, seen = flat[i : i + n], flat[i + n], flat[i + n + 1]
            i += n + 2
            if float(seen) > 0:
                dev = layer.target.weight.device
                layer.acc.total, layer.acc.tokens = total.clone().to(dev), tokens.clone().to(dev)
            else:
                layer.acc.reset()

    def _decide(self) -> None:
        masker = self.masker
        if masker is None:
            raise UnsupportedOperationError("MIGU has no optimizer: pass optimizer= to apply() or call attach()")
        if self._decided:
            return
        self._decided = True
        if not self._active:
            masker.clear()
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

    def _pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._decide()

    def _post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for layer in self.layers.values():
            layer.acc.reset()
        self._decided = False

    # --- public controls ----------------------------------------------------------------------
    def mask_(self) -> None:
        """Decide this step's masks now and zero the masked gradients (call before clipping)."""
        self._check_live()
        self._decide()
        assert self.masker is not None
        self.masker.mask_()

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """``[batch, seq]`` mask (nonzero = real token) for the next forwards; None: every position votes."""
        self._token_mask = None if mask is None else mask.detach()

    def task_boundary(self) -> None:
        """Close the current task: its most-kept units become an entry of ``stats().task_jaccard``."""
        self._check_live()
        for layer in self.layers.values():
            layer.history.end_task()
        self._tasks_done += 1

    def disable(self) -> None:
        """Stop recording and masking (pending statistics are dropped)."""
        self._active = False
        for layer in self.layers.values():
            layer.acc.reset()
        if self.masker is not None:
            self.masker.clear()

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
        """Per layer: kept fraction of the last step, Jaccard with the previous step and with earlier tasks."""
        return {p: layer.history.report() for p, layer in self.layers.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        """The last step's bool ``[units]`` mask per layer that has one (True = updated)."""
        return {p: layer.history.last.clone() for p, layer in self.layers.items() if layer.history.last is not None}

    def _teardown(self) -> None:
        if self.masker is not None:
            self.masker.remove()
        self._token_mask = None


class MIGU(Operator):
    """MIGU (arXiv 2406.17245): per step, update only the output units with the largest magnitude."""

    name = "migu"
    config_class = MIGUConfig
    handle_class = MIGUHandle

    @classmethod
    def plan(cls, model: nn.Module, config: OperatorConfig) -> Plan:
        assert isinstance(config, MIGUConfig)
        targets = find_targets(model, config.targets)
        sel = None if config.targets is None else str(config.targets)
        return Plan(targets=[t.path for t in targets], selector=sel, data={"targets": targets})

    @classmethod
    def install(cls, handle: Handle, plan: Plan) -> None:
        assert isinstance(handle, MIGUHandle)
        handle._init_state()
        for t in plan.data["targets"]:
            layer = _Layer(t, handle.cfg)
            handle.layers[t.path] = layer
            handle.registry.forward(t.module, handle._record(layer), priority=Priority.RECORD)


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
