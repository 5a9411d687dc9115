"""The live MIGU application: statistics hooks, the step-boundary mask, overlap reports, its state.

Example:
    >>> import torch, modulart.migu
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> migu = modulart.migu.apply(model, keep_ratio=0.3, select="topk", optimizer=opt)
    >>> with migu.disabled():  # plain fine-tuning inside: no statistics, no masks
    ...     model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    >>> migu.stats()["0"].steps
    0
    >>> migu.remove()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from modulart.core.errors import (
    ConcurrentUseError,
    IncompatibleArtifactError,
    InvalidArgumentError,
    InvalidStateError,
    NonFiniteError,
    UnsupportedModuleError,
    UnsupportedOperationError,
)
from modulart.core.grad_mask import GradientMasker
from modulart.core.hooks import Priority
from modulart.core.operator import AnyOperator, Handle
from modulart.core.types import OptimizerLike, StateDict, StateValue
from modulart.core.unwrap import (
    ShardAwareMasker,
    active_ddp_wrapper,
    is_distributed,
    is_dtensor,
    local_tensor,
    unwrap_optimizer,
)
from modulart.migu.config import MIGUConfig
from modulart.migu.expert_group import ExpertGroup
from modulart.migu.expert_stats import ExpertHistory, ExpertStats
from modulart.migu.state import history_state, load_history_state
from modulart.migu.stats import LayerStats, MaskHistory, UnitStats, random_mask, select_masks
from modulart.migu.targets import Target

if TYPE_CHECKING:
    from modulart.migu.operator import MIGUPlan

__all__ = ["MIGUHandle"]

ForwardHook: TypeAlias = Callable[[nn.Module, tuple[object, ...], object], None]
ForwardKwargsHook: TypeAlias = Callable[[nn.Module, tuple[object, ...], dict[str, object], object], None]
_TASKS_DONE = "tasks_done"
_GENERATOR = "generator"


def _weight(t: Target) -> torch.Tensor:
    """The target's weight as the module holds it now (FSDP2 swaps parameters for sharded ones)."""
    w = getattr(t.module, "weight", None)
    return w if isinstance(w, torch.Tensor) else t.weight


def _bias(t: Target) -> torch.Tensor | None:
    if t.bias is None:
        return None
    b = getattr(t.module, "bias", None)
    return b if isinstance(b, torch.Tensor) else t.bias


class _Layer:
    def __init__(self, target: Target, config: MIGUConfig) -> None:
        self.target = target
        self.acc = UnitStats(target.units, config.stat)
        self.history = MaskHistory(target.units, config.keep_ratio)


class MIGUHandle(Handle[MIGUConfig]):
    """A live MIGU application: statistics hooks, the step-boundary mask, overlap reports.

    The operator-wide verbs of every handle keep their one meaning here:

    - :meth:`disable` / :meth:`enable` / :meth:`disabled`: no statistics are recorded and nothing
      is masked while disabled (the optimizer steps as without MIGU); the statistics of a running
      step are dropped at the switch, so a step never mixes the two;
    - :meth:`merge_`: MIGU never changes the forward, only which updates reach the weights, so
      merging is function-preserving by construction: the hooks go, the weights are what
      training made them, and the model is returned;
    - :meth:`state_dict`: the task counter, every layer's mask history (so ``stats()`` after
      :func:`modulart.load` equals ``stats()`` at save time, ``task_jaccard`` included) and the
      random control's generator. Not carried: the statistics of a step in progress (save
      between steps), the token mask, the enabled state and the optimizer (call :meth:`attach`
      again after loading).

    Attributes:
        layers: gated linear layers by path; expert_groups: fused experts modules by path.
        masker / expert_masker: the gradient maskers (None until :meth:`attach`).
        optimizer: the unwrapped optimizer (None until :meth:`attach`).
    """

    def __init__(self, model: nn.Module, operator: AnyOperator, config: MIGUConfig, plan: MIGUPlan) -> None:
        super().__init__(model, operator, config, plan)
        self.layers: dict[str, _Layer] = {t.path: _Layer(t, config) for t in plan.targets_found}
        self.expert_groups: dict[str, ExpertGroup] = {
            fe.path: ExpertGroup(fe, config.stat, config.keep_ratio) for fe in plan.experts
        }
        self.masker: GradientMasker | None = None
        self.expert_masker: GradientMasker | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._decided = False
        self._tasks_done = 0
        self._token_mask: torch.Tensor | None = None
        self._step_thread: int | None = None
        self._generator = torch.Generator().manual_seed(config.seed)
        self._ddp: nn.Module | None = None  # the DDP wrapper whose forward ran this step, if any
        self._ddp_checked = False

    @property
    def tasks_done(self) -> int:
        """How many :meth:`task_boundary` calls closed a task (restored by :func:`modulart.load`)."""
        return self._tasks_done

    # --- wiring -------------------------------------------------------------------------------
    def attach(self, optimizer: OptimizerLike) -> None:
        """Mask right before every ``optimizer.step()`` (and freeze masked units, if configured).

        ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer``: ``.optimizer``).

        Raises:
            UnsupportedOperationError: the handle was removed or already has an optimizer.
            InvalidArgumentError: ``optimizer`` holds no ``torch.optim.Optimizer``.
        """
        self._check_live()
        if self.optimizer is not None:
            raise UnsupportedOperationError("this MIGU handle already has an optimizer")
        opt = unwrap_optimizer(optimizer)
        freeze = self.config.freeze_masked_rows
        with self.registry.atomic():
            self.registry.optimizer_step_pre(opt, self._pre_step, priority=Priority.INTERVENE - 1, name="migu/decide")
            self.masker = ShardAwareMasker(self.model, opt, freeze=freeze, registry=self.registry.scope("mask"))
            if self.expert_groups:
                scope = self.registry.scope("expert-mask")
                self.expert_masker = GradientMasker(self.model, opt, freeze=freeze, registry=scope)
            self.registry.optimizer_step_post(opt, self._post_step, priority=Priority.RECORD, name="migu/reset")
        self.optimizer = opt
        self._sync_hooks()  # attached while disabled: the new hooks stay off until enable()

    def install_hooks(self) -> None:
        """Install the statistics hooks of every layer and experts module (called by ``MIGU.install``)."""
        for layer in self.layers.values():
            self.registry.forward(layer.target.module, self._record(layer), priority=Priority.RECORD)
        for group in self.expert_groups.values():
            hook = self._record_experts(group)
            self.registry.forward(group.experts.module, hook, priority=Priority.RECORD, with_kwargs=True)

    def _record(self, layer: _Layer) -> ForwardHook:
        t = layer.target

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            if not torch.is_grad_enabled():
                return
            self._note_forward()
            if t.from_input:  # routers: the logits x @ W.T + b, whatever the forward returns
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor):
                    raise UnsupportedModuleError(f"MIGU: router {t.path!r} was called without a tensor input")
                with torch.no_grad():
                    w, b = _weight(t), _bias(t)  # under FSDP2: the unsharded tensors of this forward
                    out = F.linear(x.detach().to(w.dtype), w, b)
                mask = self._token_mask
                if mask is not None and mask.numel() == out[..., 0].numel():
                    mask = mask.reshape(out.shape[:-1])
                layer.acc.record(out, mask, path=t.path)
                return
            out_t = output[0] if isinstance(output, tuple) else output
            if not isinstance(out_t, torch.Tensor):
                raise UnsupportedModuleError(f"MIGU: {t.path!r} returned a {type(out_t).__name__}, not a tensor")
            layer.acc.record(out_t, self._token_mask, path=t.path)

        return hook

    def _record_experts(self, group: ExpertGroup) -> ForwardKwargsHook:
        def hook(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object) -> None:
            if torch.is_grad_enabled():
                self._note_forward()
                group.record(args, kwargs, self._token_mask)

        return hook

    # --- the step boundary --------------------------------------------------------------------
    def _note_forward(self) -> None:
        """In every recording hook: one thread per step; once per step: is a DDP forward running?"""
        thread = threading.get_ident()
        if self._step_thread is None:
            self._step_thread = thread
        elif self._step_thread != thread:
            raise ConcurrentUseError(
                "MIGU: two threads ran grad-enabled forwards in the same training step; the step's "
                "statistics belong to one training loop: run training forwards from one thread (forwards "
                "under torch.no_grad() are not recorded and may run anywhere)"
            )
        if not self._ddp_checked:
            self._ddp_checked = True
            self._ddp = active_ddp_wrapper(self.model)

    def _all_reduce(self) -> None:
        """Average every layer's statistics across the ranks in one flat fp32 buffer.

        Only for a model that is really distributed (a DDP forward ran this step, or the model is
        DDP / FSDP wrapped or holds DTensor parameters): a process group alone is not enough, so a
        model local to one rank of a distributed job never waits for ranks that do not join.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if self._ddp is None and not is_distributed(self.model):
            return
        group = getattr(self._ddp, "process_group", None)
        accs: list[UnitStats | ExpertStats] = [layer.acc for layer in self.layers.values()]
        accs += [a for g in self.expert_groups.values() for a in g.accumulators()]
        first = next(iter(self.layers.values()), None)
        device = (
            local_tensor(_weight(first.target)).device
            if first
            else next(iter(self.expert_groups.values())).experts.down.device
        )
        chunks = [acc.to_flat(device) for acc in accs]
        flat = torch.cat(chunks)
        torch.distributed.all_reduce(flat, group=group)
        flat /= torch.distributed.get_world_size(group)
        start = 0
        for acc, chunk in zip(accs, chunks, strict=True):
            acc.load_flat(flat[start : start + chunk.numel()], device)
            start += chunk.numel()

    def _decide(self, masker: GradientMasker) -> None:
        if self._decided:
            return
        self._check_sharded()
        self._decided = True
        self._all_reduce()
        cfg = self.config
        masking = not (cfg.skip_first_task and self._tasks_done == 0)
        # the magnitude masks of all seen layers at once (one quantile per layer width, not per layer)
        seen = [layer for layer in self.layers.values() if layer.acc.seen]
        chosen: dict[int, torch.Tensor] = {}
        if cfg.control != "random":
            masks = select_masks([layer.acc.score() for layer in seen], cfg.keep_ratio, cfg.select)
            chosen = {id(layer): keep for layer, keep in zip(seen, masks, strict=True)}
        for layer in self.layers.values():
            t = layer.target
            weight = _weight(t)
            if not layer.acc.seen:
                layer.history.push(None)
                masker.clear(weight)
                continue
            if cfg.control == "random":
                keep = random_mask(t.units, cfg.keep_ratio, self._generator, local_tensor(weight).device)
            else:
                keep = chosen[id(layer)]
            layer.history.push(keep)
            if masking:
                masker.set(weight, keep, axis=t.axis, bias=_bias(t) if cfg.mask_bias else None)
            else:
                masker.clear(weight)
        if self.expert_masker is not None:
            for group in self.expert_groups.values():
                self._decide_experts(self.expert_masker, group, masking)

    def _check_sharded(self) -> None:
        """Under FSDP2, refuse a step whose optimizer holds the parameters from before ``fully_shard``."""
        sharded = [layer.target for layer in self.layers.values() if is_dtensor(_weight(layer.target))]
        if not sharded:
            return
        if self.expert_groups:
            raise InvalidStateError(
                f"MIGU: fused experts {sorted(self.expert_groups)[:3]} cannot be gated on FSDP2-sharded parameters; "
                "apply MIGU with moe=False (or targets without fused experts) before fully_shard"
            )
        opt = self.optimizer
        held = {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else set()
        stale = [t.path for t in sharded if _weight(t).requires_grad and id(_weight(t)) not in held]
        if stale:
            raise InvalidStateError(
                f"MIGU: the attached optimizer does not hold the FSDP2-sharded weights of {stale[:3]}: it was built "
                "before fully_shard replaced the parameters. Apply MIGU, call fully_shard, build the optimizer over "
                "the sharded parameters, then handle.attach(optimizer)"
            )

    def _decide_experts(self, masker: GradientMasker, group: ExpertGroup, masking: bool) -> None:
        for p in group.experts.params():
            masker.clear(p)
        random = self.config.control == "random"
        for param, keep, axis, bias in group.decide(self.config.select, random=random, generator=self._generator):
            if masking:
                masker.set(param, keep, axis=axis, bias=bias if self.config.mask_bias else None)

    def _require_masker(self) -> GradientMasker:
        if self.masker is None:
            raise UnsupportedOperationError("MIGU has no optimizer: pass optimizer= to apply() or call attach()")
        return self.masker

    def _pre_step(self, opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._check_finite_grads()
        self._decide(self._require_masker())

    def _check_finite_grads(self) -> None:
        """Refuse the step (before any parameter moves) when a gated gradient holds NaN or inf."""
        named = [(layer.target.path, _weight(layer.target)) for layer in self.layers.values()]
        named += [(g.experts.path, p) for g in self.expert_groups.values() for p in g.experts.params()]
        grads = [(path, p.grad) for path, p in named if p.grad is not None]
        if not grads:
            return
        local: list[torch.Tensor] = [getattr(g, "to_local", lambda g=g: g)() for _, g in grads]  # DTensor: local shard
        # one reduction per gradient and one host read per step: a NaN or inf element makes the sum
        # NaN or inf, so finite sums prove finite gradients; a non-finite sum (also a finite overflow)
        # is settled element by element below
        sums = torch.stack([t.detach().sum(dtype=torch.float32).to(local[0].device) for t in local])
        if bool(sums.isfinite().all()):
            return
        ok = torch.stack([t.detach().isfinite().all().to(local[0].device) for t in local])
        if bool(ok.all()):
            return
        bad = [path for (path, _), good in zip(grads, ok.tolist(), strict=True) if not good]
        self._reset_step()  # the refused batch's statistics do not vote in the next step
        raise NonFiniteError(
            f"MIGU: the gradient of {bad[:4]} holds NaN or inf (a non-finite loss?); the optimizer step was refused "
            "and no parameter changed (zero the gradients and skip the batch, or use a GradScaler)"
        )

    def _post_step(self, opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self._reset_step()

    def _reset_step(self) -> None:
        """Drop the running step's statistics and decision."""
        for layer in self.layers.values():
            layer.acc.reset()
        for group in self.expert_groups.values():
            group.reset()
        self._decided = False
        self._ddp, self._ddp_checked = None, False
        self._step_thread = None

    def _set_enabled(self, enabled: bool) -> None:
        # the registry's hooks (statistics, decision, maskers) are switched by the base class; what
        # is pending is dropped, so the first step after the switch is decided on its own forwards
        self._reset_step()
        for m in (self.masker, self.expert_masker):
            if m is not None:
                m.clear()
                m.reset_step()  # a mask_() right before disable() must not carry over

    # --- public controls ----------------------------------------------------------------------
    def mask_(self) -> None:
        """Decide this step's masks now and zero the masked gradients (call before clipping).

        Does nothing while the handle is disabled.

        Raises:
            UnsupportedOperationError: no optimizer attached, or the handle was removed.
        """
        self._check_live()
        masker = self._require_masker()
        if not self.enabled:
            return
        self._decide(masker)
        masker.mask_()
        if self.expert_masker is not None:
            self.expert_masker.mask_()

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """``[batch, seq]`` mask (nonzero = real token) for the next forwards; None: every position votes."""
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise InvalidArgumentError(f"set_token_mask: expected a [batch, seq] tensor or None, got {type(mask)}")
        self._token_mask = None if mask is None else mask.detach()

    def task_boundary(self) -> None:
        """Close the current task: its most-kept units become an entry of ``stats().task_jaccard``."""
        self._check_live()
        for layer in self.layers.values():
            layer.history.end_task()
        for group in self.expert_groups.values():
            group.end_task()
        self._tasks_done += 1

    def merge_(self) -> nn.Module:
        """Finish MIGU: remove its hooks and return the model, whose function is unchanged.

        MIGU never changes the forward (it only decides which units an optimizer step updates), so
        this is function-preserving by construction: the weights are what training made them.
        Read :meth:`stats` before merging if you need it (it stays readable afterwards).
        """
        self._check_live()
        self.remove()
        return self.model

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

    # --- state --------------------------------------------------------------------------------
    def _histories(self) -> dict[str, MaskHistory | ExpertHistory]:
        out: dict[str, MaskHistory | ExpertHistory] = {p: layer.history for p, layer in self.layers.items()}
        for path, group in self.expert_groups.items():
            out.update({f"{path}.{s.part.name}": s.history for s in group.parts})
        return out

    def state_dict(self) -> StateDict:
        """The task counter (JSON), every layer's mask history and the random control's generator state.

        Keys: ``"tasks_done"``, ``"generator"`` and ``"history/<layer>.<field>"`` (fused experts:
        ``<layer>`` is ``"<experts path>.<gate|up|down>"``). The running step's statistics are
        not included (save between optimizer steps).
        """
        state: StateDict = {_TASKS_DONE: self._tasks_done, _GENERATOR: self._generator.get_state()}
        for path, history in self._histories().items():
            state.update(history_state(history, f"history/{path}"))
        return state

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore what :meth:`state_dict` returned (an empty state, as older artefacts hold, is accepted).

        Raises:
            IncompatibleArtifactError: a value of the wrong type or shape, or a key for a layer
                this handle does not gate.
        """
        tasks = state.get(_TASKS_DONE, 0)
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            raise IncompatibleArtifactError(f"MIGU state: tasks_done = {tasks!r} is not an int >= 0")
        gen = state.get(_GENERATOR)
        if gen is not None and not isinstance(gen, torch.Tensor):
            raise IncompatibleArtifactError("MIGU state: generator must be a tensor (torch.Generator.get_state())")
        histories = self._histories()
        used = {_TASKS_DONE, _GENERATOR}
        for path, history in histories.items():
            used |= load_history_state(history, f"history/{path}", state)
        unknown = sorted(set(state) - used)
        if unknown:
            raise IncompatibleArtifactError(
                f"MIGU state has keys for layers this handle does not gate: {unknown[:5]}; "
                f"gated: {sorted(histories)[:5]}"
            )
        self._tasks_done = tasks
        if gen is not None:
            self._generator.set_state(gen.to(torch.uint8))

    def _teardown(self) -> None:
        for m in (self.masker, self.expert_masker):
            if m is not None:
                m.remove()
        self._token_mask = None
