"""The live patcher: edit, inspect, switch, remove, bake, save.

Example:
    >>> import torch
    >>> import modulart.patcher as mp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> class Clf(torch.nn.Module):  # embeddings -> one FFN -> logits read at position 0
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(50, 16)
    ...         self.ffn = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    ...         self.head = torch.nn.Linear(16, 3)
    ...     def forward(self, ids):
    ...         h = self.emb(ids)
    ...         return self.head((h + self.ffn(h))[:, 0])
    >>> model = Clf().eval()
    >>> patcher = mp.apply(model, task="classification")
    >>> patcher.set_memory(torch.randint(10, 50, (64, 6), generator=torch.Generator().manual_seed(1)))
    >>> x = torch.tensor([3, 4, 5, 6])
    >>> wrong = (int(model(x[None]).argmax()) + 1) % 3
    >>> result = patcher.edit(x, wrong)
    >>> result.success, len(patcher.patches), int(model(x[None]).argmax()) == wrong
    (True, 1, True)
    >>> patcher.disable_patch(result.patch_ids[0]); int(model(x[None]).argmax()) == wrong
    False
    >>> patcher.enable_patch(result.patch_ids[0])
    >>> with patcher.disabled():  # the whole patcher off
    ...     int(model(x[None]).argmax()) == wrong
    False
    >>> patcher.remove_patch(result.patch_ids[0]); len(patcher.patches)
    0
    >>> patcher.remove()
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modulart.core.dispatch import HookHandle
from modulart.core.errors import (
    CompositionError,
    ConfigError,
    IncompatibleArtifactError,
    ShapeError,
    UnsupportedOperationError,
)
from modulart.core.ffn import FFN
from modulart.core.fingerprint import Fingerprint
from modulart.core.operator import AnyOperator, Handle
from modulart.core.sharing import live_hooks, root_scope
from modulart.core.types import StateDict, StateValue
from modulart.patcher import memory as mem
from modulart.patcher.bake import widen
from modulart.patcher.bank import PatchBank
from modulart.patcher.config import PatcherConfig
from modulart.patcher.records import EditResult, FiringReport, Patch, content_hash
from modulart.patcher.task import (
    Example,
    Inputs,
    buckets,
    collate,
    evaluate,
    make_example,
    neuron_positions,
    run_model,
    token_errors,
)
from modulart.patcher.train import (
    CleanCheck,
    NeuronSet,
    agree_across_ranks,
    clean_check,
    init_neurons,
    model_digest,
    train_edits,
)

if TYPE_CHECKING:
    from modulart.patcher.operator import PatcherPlan

__all__ = ["PatcherHandle"]

Pair = tuple[Inputs, Any]
_TENSOR_KEYS = ("keys", "key_bias", "values", "enabled", "up", "up_bias")
_JSON_KEYS = ("layer", "patches", "next_patch", "next_edit")
_MEMORY_KEYS = ("memory", "validation_memory")


class PatcherHandle(Handle[PatcherConfig]):
    """Transformer-Patcher on one FFN of a model: see :func:`modulart.patcher.apply`.

    The verbs every handle has act on the whole patcher (``remove()``, ``disable()``,
    ``enable()``, ``disabled()``, ``merge_()``); the verbs on single patches are named for them
    (:meth:`remove_patch`, :meth:`disable_patch`, :meth:`enable_patch`, :meth:`is_patch_enabled`).

    Attributes:
        ffn: the patched FFN.
        bank: the patch neurons (fp32).
        memory: ``[N, d_model]`` FFN inputs the patches stay silent on (``None`` before
            :meth:`set_memory`).
        validation_memory: ``[N_v, d_model]`` FFN inputs of held-out ordinary inputs that
            ``stop_rule='validation'`` stops on (``None`` before :meth:`set_validation_memory`).
    """

    def __init__(self, model: nn.Module, operator: AnyOperator, config: PatcherConfig, plan: PatcherPlan) -> None:
        super().__init__(model, operator, config, plan)
        self.ffn: FFN = plan.ffn
        dev = self.ffn.key_proj.param.device
        self.bank = PatchBank(self.ffn.d_model, self.ffn.values.shape[0], self.ffn.gated, self.ffn.activation, dev)
        self.memory: torch.Tensor | None = None
        self.validation_memory: torch.Tensor | None = None
        self._patches: dict[str, Patch] = {}
        self._local = threading.local()  # in-flight state of the forward each thread runs
        self._baked: list[tuple[str, nn.Module]] | None = None
        self._next_patch = 1
        self._next_edit = 1
        self._save_memory = False

    # --- hooks --------------------------------------------------------------------------------
    @property
    def _q(self) -> torch.Tensor | None:
        """The patched FFN's input in the forward *this thread* is running (per thread: concurrent
        forwards on one model never see each other's input)."""
        q: torch.Tensor | None = getattr(self._local, "q", None)
        return q

    @_q.setter
    def _q(self, q: torch.Tensor | None) -> None:
        self._local.q = q

    def install_hooks(self) -> None:
        """Install the input and output hooks on the FFN (called once, by :class:`Patcher`)."""

        def keep_input(q: torch.Tensor) -> None:
            self._q = q

        def add_patches(y: torch.Tensor) -> torch.Tensor | None:
            q = self._q
            if q is None or self._baked is not None:
                return None
            delta = self.bank.contribution(q)
            return None if delta is None else y + delta.to(y.dtype)

        self.registry.at(self.ffn.input_site, keep_input, name="patcher.input")
        self.registry.at(self.ffn.output_site, add_patches, name="patcher.output")

    def _capture_q(self) -> torch.Tensor:
        """The patched FFN's input seen by the hooks during the forward that just ran."""
        q, self._q = self._q, None
        if q is None:
            raise UnsupportedOperationError(
                f"the patched FFN {self.ffn.path!r} did not run in the forward pass (hooks "
                f"{self.registry.counts()}); is the layer bypassed by a fused kernel?"
            )
        return q

    # --- patches ------------------------------------------------------------------------------
    @property
    def patches(self) -> list[Patch]:
        """The patch neurons in bank order, with provenance."""
        return [self._patches[i] for i in self.bank.ids]

    def patch(self, patch_id: str) -> Patch:
        """The provenance of one patch (``KeyNotFoundError`` for an unknown id)."""
        self.bank.index(patch_id)
        return self._patches[patch_id]

    def is_patch_enabled(self, patch_id: str) -> bool:
        """Whether one patch acts (see :meth:`disable_patch`; the whole patcher: :attr:`enabled`)."""
        return bool(self.bank.enabled[self.bank.index(patch_id)])

    def _check_editable(self, what: str) -> None:
        self._check_live()
        if self._baked is not None:
            raise UnsupportedOperationError(f"{what}: the patches are baked into {self.ffn.path!r}; unbake() first")

    def _check_running(self, what: str) -> None:
        """Editable, and the hooks run (they see the FFN input that editing and telemetry need)."""
        self._check_editable(what)
        if not self._enabled:
            raise UnsupportedOperationError(f"{what}: the patcher is disabled; enable() it first")

    def disable_patch(self, patch_id: str) -> None:
        """Switch one patch off (it stays stored)."""
        self._check_editable("disable_patch")
        self.bank.set_enabled(patch_id, False)

    def enable_patch(self, patch_id: str) -> None:
        """Switch one patch back on."""
        self._check_editable("enable_patch")
        self.bank.set_enabled(patch_id, True)

    def remove_patch(self, patch_ids: str | Sequence[str]) -> None:
        """Remove one patch (or several) exactly: patches are independent additive terms."""
        self._check_editable("remove_patch")
        ids = [patch_ids] if isinstance(patch_ids, str) else list(patch_ids)
        self.bank.remove(ids)
        for i in ids:
            del self._patches[i]

    # --- the whole patcher --------------------------------------------------------------------
    def _teardown(self) -> None:
        """Put the original layers back if baked, so the model is exactly what it was."""
        if self._baked is not None:
            self.unbake()
        self._q = None

    def disable(self) -> None:
        """Switch the whole patcher off (every patch stays stored); refused while baked."""
        if self._baked is not None and self._enabled:
            raise UnsupportedOperationError("disable(): the patches are baked; unbake() first")
        super().disable()

    # --- memory -------------------------------------------------------------------------------
    def _memory_policy(self) -> str:
        policy = self.config.position_policy
        return "all" if policy == "erroneous_target_tokens" else policy

    def _forward_inputs(self, batch: Inputs) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            ids = batch[None] if batch.dim() == 1 else batch
            return run_model(self.model, {"input_ids": ids}, True)
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ShapeError(f"memory inputs must be token tensors or tokenizer outputs, got {type(batch).__name__}")
        return run_model(self.model, {k: v for k, v in batch.items() if v is not None}, False)

    def _collect(self, inputs: Inputs | Iterable[Inputs]) -> torch.Tensor:
        batches: list[Inputs] = [inputs] if isinstance(inputs, (torch.Tensor, Mapping)) else list(inputs)

        def run(b: Inputs) -> torch.Tensor:
            self._forward_inputs(b)
            return self._capture_q()

        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                vectors = mem.gather(batches, run, self._memory_policy())
        finally:
            self.model.train(was)
        return vectors.to(self.bank.device)

    def set_memory(self, inputs: Inputs | Iterable[Inputs]) -> None:
        """Replace the memory with the FFN inputs of ``inputs`` (a batch, or an iterable of batches).

        Batches are token tensors ``[B, L]`` or tokenizer outputs (``attention_mask`` marks padding).
        Vectors are taken at the position policy's positions and capped at ``memory_size``.
        """
        self._check_running("set_memory")
        vectors = self._collect(inputs)
        self.memory = mem.cap_memory(vectors, self.config.memory_size, self.config.seed)

    def set_validation_memory(self, inputs: Inputs | Iterable[Inputs]) -> None:
        """Replace the validation memory with the FFN inputs of ``inputs`` (held-out ordinary inputs).

        ``stop_rule='validation'`` (the reference code's stopping) ends an edit once its memory loss
        on these vectors stops falling; finished edits' own vectors join it as they join the memory.
        Vectors are taken as for :meth:`set_memory` and capped at ``memory_size``.

        Example:
            >>> import torch, modulart.patcher as mp
            >>> ffn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
            >>> p = mp.apply(torch.nn.Sequential(torch.nn.Embedding(50, 8), ffn), config=mp.PatcherConfig.reference())
            >>> p.set_validation_memory(torch.randint(0, 50, (4, 5)))  # classification: the CLS position
            >>> p.validation_memory.shape
            torch.Size([4, 8])
            >>> p.remove()
        """
        self._check_running("set_validation_memory")
        vectors = self._collect(inputs)
        self.validation_memory = mem.cap_memory(vectors, self.config.memory_size, self.config.seed + 1)

    def add_memory(self, inputs: Inputs | Iterable[Inputs]) -> None:
        """Append the FFN inputs of ``inputs`` to the memory (capped at ``memory_size``)."""
        self._check_running("add_memory")
        vectors = self._collect(inputs)
        both = vectors if self.memory is None else torch.cat([self.memory, vectors])
        self.memory = mem.cap_memory(both, self.config.memory_size, self.config.seed)

    # --- predictions --------------------------------------------------------------------------
    def _clean(self, examples: Sequence[Example]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Eval-mode logits ``[1, ...]`` and FFN inputs ``[L, d]`` of each example, batched by length."""
        logits: list[torch.Tensor | None] = [None] * len(examples)
        qs: list[torch.Tensor | None] = [None] * len(examples)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for idx in buckets(examples, 64):
                    sub = [examples[i] for i in idx]
                    out = run_model(self.model, collate(sub), sub[0].positional)
                    q = mem.as_batch_seq(self._capture_q(), len(sub))
                    for j, i in enumerate(idx):
                        logits[i], qs[i] = out[j : j + 1], q[j]
        finally:
            self.model.train(was)
        return [x for x in logits if x is not None], [x for x in qs if x is not None]

    def is_correct(self, pairs: Sequence[Pair]) -> list[bool]:
        """Whether the model (with its patches) is right on each ``(inputs, target)`` pair."""
        right, _ = evaluate(self.model, [make_example(x, y, self.config.task) for x, y in pairs], self.config.task)
        return [bool(r) for r in right]

    def fired(self, inputs: Inputs) -> FiringReport:
        """Which patches fire where on ``inputs`` (a batch): pre-activations ``[B, L, P]`` above ``fire_threshold``."""
        self._check_running("fired")
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self._forward_inputs(inputs)
                q = self._capture_q()
        finally:
            self.model.train(was)
        q = mem.as_batch_seq(q, mem.batch_size(inputs))
        return FiringReport(list(self.bank.ids), self.bank.pre_activation(q), float(self.config.fire_threshold))

    # --- editing ------------------------------------------------------------------------------
    def edit(
        self, inputs: Inputs, target: Any, *, text: str | None = None, target_text: str | None = None
    ) -> EditResult:
        """Fix one mistake: train new neurons until the model gives ``target`` on ``inputs``.

        Nothing is trained when the model is already right (the result says ``skipped``).
        Raises before anything changes on a malformed input/target or a missing memory.
        """
        return self.edit_batch([(inputs, target)], texts=[(text, target_text)])[0]

    def edit_batch(
        self, pairs: Sequence[Pair], *, texts: Sequence[tuple[str | None, str | None]] | None = None
    ) -> list[EditResult]:
        """Fix several independent mistakes, training their neurons in one vectorised pass.

        Each edit is trained as if alone (own rows, loss, clipping, learning rate, stopping); none
        sees the others' neurons. Inputs of different lengths need an ``attention_mask`` to share a
        pass (otherwise they are trained in groups of equal length).
        """
        self._check_running("edit")
        cfg = self.config
        if not pairs:
            return []
        if texts is not None and len(texts) != len(pairs):
            raise ShapeError(f"texts has {len(texts)} entries for {len(pairs)} edits")
        examples = [make_example(x, y, cfg.task) for x, y in pairs]
        agree_across_ranks(self.model, examples)  # FSDP2: every rank edits the same pairs (no-op otherwise)
        if self.memory is None and cfg.mu > 0:
            raise ConfigError(
                "PatcherConfig.memory_weight > 0 needs a memory set: call set_memory(ordinary_inputs) before edit()"
            )
        if cfg.stop_rule == "validation" and not cfg.fixed_steps and self.validation_memory is None:
            raise ConfigError(
                "PatcherConfig.stop_rule = 'validation' stops on the memory loss of a validation memory: call "
                "set_validation_memory(held_out_ordinary_inputs) before edit() (or use stop_rule='margins')"
            )
        start = time.perf_counter()
        logits, qs = self._clean(examples)
        results: list[EditResult | None] = [None] * len(examples)
        todo: list[int] = []
        positions: dict[int, list[list[int]]] = {}
        for i, (lg, ex) in enumerate(zip(logits, examples, strict=True)):
            errors = token_errors(lg, ex, cfg.task)
            if not bool(errors.any()):
                results[i] = EditResult(self._new_edit_id(), [], True, skipped=True)
                continue
            positions[i] = neuron_positions(ex, cfg.position_policy, errors, cfg.max_neurons_per_edit)
            todo.append(i)
        groups = [todo] if all("attention_mask" in examples[i].inputs for i in todo) else _by_length(todo, examples)
        for group in (g for g in groups if g):
            for i, res in zip(group, self._train_group(group, examples, qs, positions, texts), strict=True):
                results[i] = res
        elapsed = time.perf_counter() - start
        out = [r for r in results if r is not None]
        for r in out:
            r.seconds = r.seconds or elapsed / len(out)
        return out

    def _new_edit_id(self) -> str:
        eid = f"e{self._next_edit:06d}"
        self._next_edit += 1
        return eid

    def _train_group(
        self,
        group: list[int],
        examples: Sequence[Example],
        qs: Sequence[torch.Tensor],
        positions: Mapping[int, list[list[int]]],
        texts: Sequence[tuple[str | None, str | None]] | None,
    ) -> list[EditResult]:
        cfg = self.config
        exs = [examples[i] for i in group]
        # seeds follow the edit's content, not its place in a batch or a stream
        seeds = [int(content_hash((ex.inputs, ex.target, cfg.seed)), 16) % (1 << 62) for ex in exs]
        ns = init_neurons([qs[i] for i in group], [positions[i] for i in group], self.bank, cfg, seeds)
        seed = seeds[0]
        # without a memory (memory_weight = 0) one zero vector keeps the margin arithmetic defined
        memory = self.memory if self.memory is not None else torch.zeros(1, self.ffn.d_model, device=self.bank.device)

        def run(batch: dict[str, torch.Tensor], positional: bool) -> torch.Tensor:
            return run_model(self.model, batch, positional)

        def check(idx: list[int]) -> CleanCheck:
            return clean_check(self.model, self.bank, [exs[i] for i in idx], idx, ns, cfg)

        outcomes = train_edits(self.model, self.bank, exs, ns, memory, cfg, run, check, seed, self.validation_memory)
        results = []
        for k, (i, out) in enumerate(zip(group, outcomes, strict=True)):
            edit_id = self._new_edit_id()
            keep = out.success or cfg.keep_failed
            ids: list[str] = []
            if keep:
                ids = self._commit(ns, out.rows, exs[k], edit_id, out, texts[i] if texts else (None, None))
                if cfg.append_edits_to_memory:
                    vec = self._edit_memory_vectors(qs[i], exs[k], positions[i], len(out.rows))
                    base = self.memory if self.memory is not None else vec[:0]
                    self.memory = mem.cap_memory(torch.cat([base, vec.to(base.device)]), cfg.memory_size, cfg.seed)
                    if self.validation_memory is not None:
                        both = torch.cat([self.validation_memory, vec.to(self.validation_memory.device)])
                        self.validation_memory = mem.cap_memory(both, cfg.memory_size, cfg.seed + 1)
            results.append(
                EditResult(edit_id, ids, out.success, False, out.steps, out.margins, out.losses, out.seconds)
            )
        return results

    def _edit_memory_vectors(
        self, q: torch.Tensor, ex: Example, positions: list[list[int]], n_neurons: int
    ) -> torch.Tensor:
        """``[M, d]`` clean FFN inputs of a finished edit (``q [L, d]``) that join the memory.

        ``memory_update='neurons'``: one per neuron, the mean over its positions. ``'reference'``
        (the reference code): its batch of ``views`` eval-mode copies, at the CLS position
        (classification) or at every position that predicts a target token, flattened copy by copy
        with the very first and last vector dropped (generation).
        """
        cfg = self.config
        if cfg.memory_update == "neurons":
            return torch.stack([q[positions[j]].float().mean(0) for j in range(n_neurons)])
        if cfg.task == "classification":
            return q[[0] * cfg.views].float()
        pos = [int(t) for t in ex.label_positions]
        return q[pos * cfg.views].float()[1:-1]

    def _commit(
        self, ns: NeuronSet, rows: list[int], ex: Example, edit_id: str, out: Any, text: tuple[str | None, str | None]
    ) -> list[str]:
        cfg = self.config
        ids = [f"p{self._next_patch + j:06d}" for j in range(len(rows))]
        self._next_patch += len(rows)
        r = torch.tensor(rows, device=self.bank.device)
        with torch.no_grad():
            self.bank.add(
                ids,
                keys=ns.keys[r],
                key_bias=ns.key_bias[r],
                values=ns.values[r],
                up=ns.up[r] if ns.up is not None else None,
                up_bias=ns.up_bias[r] if ns.up_bias is not None else None,
            )
        digest = model_digest(self.model)  # FSDP2: of the whole parameters
        hyper = {k: cfg.to_dict()[k] for k in ("init", "lr", "max_steps", "activation_weight", "views", "seed")}
        hyper |= {"memory_weight": cfg.mu, "label_smoothing": cfg.smoothing}
        hyper |= {"silence_margin": cfg.silence_margin, "edit_margin": cfg.edit_margin}
        for pid, j, m in zip(ids, rows, out.margins, strict=True):
            self._patches[pid] = Patch(
                id=pid,
                edit_id=edit_id,
                layer=self.ffn.path,
                position=int(ns.positions[j][0]) if len(ns.positions[j]) == 1 else -1,
                policy=cfg.position_policy,
                input_hash=content_hash(ex.inputs),
                target_hash=content_hash(ex.target),
                text=text[0],
                target_text=text[1],
                base_model=digest,
                hyperparameters=hyper,
                steps=out.steps,
                edit_activation=m["edit_activation"],
                max_memory_activation=m["max_memory_activation"],
                success=out.success,
            )
        return ids

    # --- baking -------------------------------------------------------------------------------
    @property
    def baked(self) -> bool:
        return self._baked is not None

    def _check_composable(self, what: str) -> None:
        """Refuse to replace the FFN's layers under another operator's hooks (they would stop running)."""
        own = self.registry

        def mine(h: HookHandle) -> bool:
            reg = h._registry
            while reg is not None:
                if reg is own:
                    return True
                reg = reg.parent
            return False

        foreign = [h for h in live_hooks([self.ffn.module], subtree=True) if not mine(h)]
        if foreign:
            ops = sorted({root_scope(h.scope) for h in foreign})
            paths = sorted({h.path for h in foreign})
            raise CompositionError(
                f"{what}: operator(s) {ops} hook {paths[:5]} in the patched FFN {self.ffn.path!r}; widening "
                f"replaces those layers and would silently bypass them. Remove (or merge_) "
                f"{ops[0]!r} first, or keep the patches as hooks (no bake)"
            )

    def bake(self) -> nn.Module:
        """Widen the patched FFN with the enabled patches (hook-free inference); returns the model.

        Raises:
            CompositionError: another operator hooks a module inside the FFN (widening would bypass it).
        """
        self._bake("bake")
        return self.model

    def _bake(self, what: str) -> None:
        self._check_running(what)
        self._check_composable(what)
        on = self.bank.enabled
        self._baked = widen(
            self.model,
            self.ffn,
            keys=self.bank.keys[on],
            key_bias=self.bank.key_bias[on],
            values=self.bank.values[on],
            up=self.bank.up[on] if self.bank.up is not None else None,
            up_bias=self.bank.up_bias[on] if self.bank.up_bias is not None else None,
        )

    def unbake(self) -> nn.Module:
        """Put the original (unwidened) layers back; the patches act through hooks again."""
        self._check_live()
        if self._baked is None:
            raise UnsupportedOperationError("unbake(): nothing is baked")
        for path, module in self._baked:
            self.model.set_submodule(path, module)
        self._baked = None
        return self.model

    def merge_(self) -> nn.Module:
        """Bake for good (function-preserving): the widened layers stay, the hooks go, the patcher is removed.

        Raises:
            CompositionError: another operator hooks a module inside the FFN.
            UnsupportedOperationError: the patcher is disabled (merging would change the function).
        """
        if self._baked is None:
            self._bake("merge_")
        self._baked = None  # the widened layers stay: nothing to put back on remove()
        self.remove()
        return self.model

    # --- state --------------------------------------------------------------------------------
    def state_dict(self, *, include_memory: bool = False) -> StateDict:
        """The patch tensors and their provenance: everything :meth:`load_state_dict` needs.

        Tensors: ``keys``, ``key_bias``, ``values``, ``enabled`` (+ ``up``, ``up_bias`` for gated
        FFNs; + ``memory`` and ``validation_memory``, when set, with ``include_memory``). JSON
        values: ``layer`` (the FFN path), ``patches`` (the :class:`Patch` records, in bank order),
        ``next_patch`` / ``next_edit`` (the id counters).
        """
        out: StateDict = dict(self.bank.state_dict())
        if (include_memory or self._save_memory) and self.memory is not None:
            out["memory"] = self.memory.detach().to("cpu").clone()
        if (include_memory or self._save_memory) and self.validation_memory is not None:
            out["validation_memory"] = self.validation_memory.detach().to("cpu").clone()
        out["layer"] = self.ffn.path
        out["patches"] = [p.to_dict() for p in self.patches]
        out["next_patch"] = self._next_patch
        out["next_edit"] = self._next_edit
        return out

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Replace the patches, their provenance, the counters (and the memory, if saved) with ``state``.

        Everything is checked before anything changes.

        Raises:
            IncompatibleArtifactError: the state belongs to another FFN, lacks entries, or does not fit.
        """
        self._check_editable("load_state_dict")
        unknown = sorted(set(state) - {*_TENSOR_KEYS, *_JSON_KEYS, *_MEMORY_KEYS})
        if unknown:
            raise IncompatibleArtifactError(f"patcher state has unknown entries {unknown[:5]}")
        layer = state.get("layer")
        if layer != self.ffn.path:
            raise IncompatibleArtifactError(
                f"the patches were made for FFN {layer!r}; this patcher's config resolves to {self.ffn.path!r}"
            )
        raw = state.get("patches")
        if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
            raise IncompatibleArtifactError("patcher state entry 'patches' must be a list of patch records")
        try:
            patches = [Patch.from_dict(p) for p in raw if isinstance(p, dict)]
        except TypeError as e:
            raise IncompatibleArtifactError(f"patcher state holds a malformed patch record: {e}") from None
        counters = {}
        for key, least in (("next_patch", len(patches) + 1), ("next_edit", 1)):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise IncompatibleArtifactError(f"patcher state entry {key!r} = {value!r}: must be an int >= {least}")
            counters[key] = value
        tensors = {k: v for k, v in state.items() if k in _TENSOR_KEYS}
        if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise IncompatibleArtifactError(f"patcher state entries {sorted(tensors)} must be tensors")
        memories = {k: state.get(k) for k in _MEMORY_KEYS}
        for key, memory in memories.items():
            if memory is not None and (
                not isinstance(memory, torch.Tensor) or memory.dim() != 2 or memory.shape[1] != self.ffn.d_model
            ):
                shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
                raise IncompatibleArtifactError(f"patcher {key} {shape} does not fit d_model = {self.ffn.d_model}")
        self.bank.load_state_dict(
            {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}, [p.id for p in patches]
        )
        self._patches = {p.id: p for p in patches}
        memory, validation = memories["memory"], memories["validation_memory"]
        if isinstance(memory, torch.Tensor):
            self.memory = memory.to(self.bank.device, torch.float32).clone()
        if isinstance(validation, torch.Tensor):
            self.validation_memory = validation.to(self.bank.device, torch.float32).clone()
        self._next_patch, self._next_edit = counters["next_patch"], counters["next_edit"]

    def fingerprint(self) -> Fingerprint:
        """The fingerprint of the model with the original (unwidened) layers, baked or not."""
        if self._baked is None:
            return super().fingerprint()
        widened = [(path, self.model.get_submodule(path)) for path, _ in self._baked]
        for path, module in self._baked:
            self.model.set_submodule(path, module)
        try:
            return super().fingerprint()
        finally:
            for path, module in widened:
                self.model.set_submodule(path, module)

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False, include_memory: bool = False) -> Path:
        """Write the patches (safetensors) and their provenance (JSON), atomically (see :meth:`Handle.save`).

        ``include_memory`` also stores the memory set, so editing can continue after loading.
        """
        self._save_memory = include_memory
        try:
            return super().save(directory, overwrite=overwrite)
        finally:
            self._save_memory = False


def _by_length(todo: list[int], examples: Sequence[Example]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i in todo:
        groups.setdefault(examples[i].length, []).append(i)
    return list(groups.values())
