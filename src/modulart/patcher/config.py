"""Configuration of Transformer-Patcher (Huang et al., ICLR 2023; reference code ZeroYuHuang/Transformer-Patcher).

Two presets: :meth:`PatcherConfig.reference` (the reference code's training for a task: its memory
and activation losses, entropy term, learning-rate plateau rule, stopping on a validation memory,
failed edits kept) and :meth:`PatcherConfig.llm` (the port used for GPT-2/Llama: zero-initialised
value, 75 fixed steps, small activation/memory weights). The defaults train the same loss shape
but stop as soon as the edit is right and both margins hold on the stored neurons.

Example:
    >>> from modulart.patcher import PatcherConfig
    >>> cfg = PatcherConfig.reference("generation")
    >>> cfg.position_policy, cfg.mu, cfg.smoothing
    ('erroneous_target_tokens', 10.0, 0.1)
    >>> cfg.memory_loss, cfg.pool_neurons, cfg.lr_schedule, cfg.stop_rule, cfg.keep_failed
    ('per_view', True, 'reference', 'validation', True)
    >>> PatcherConfig.reference("classification").entropy_weight, PatcherConfig().entropy_weight
    (0.1, 0.0)
    >>> PatcherConfig.llm().max_steps, PatcherConfig.llm().init
    (75, 'zero')
    >>> PatcherConfig(task="regression")
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: PatcherConfig.task = 'regression': must be one of ('classification', 'generation')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from modulart.core.operator import OperatorConfig, option

__all__ = [
    "INITS",
    "LR_SCHEDULES",
    "MEMORY_LOSSES",
    "MEMORY_UPDATES",
    "POSITIONS",
    "STOP_RULES",
    "TASKS",
    "PatcherConfig",
]

TASKS = ("classification", "generation")
POSITIONS = ("cls", "erroneous_target_tokens", "last_prompt", "all")
INITS = ("reference", "zero")
MEMORY_LOSSES = ("mean_view", "per_view")
MEMORY_UPDATES = ("neurons", "reference")
LR_SCHEDULES = ("train_plateau", "reference")
STOP_RULES = ("margins", "validation")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite int or float (not a bool): NaN and inf are refused for every numeric field."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass
class PatcherConfig(OperatorConfig):
    """Where patch neurons go, how they are initialised and how one edit is trained."""

    layer: Any = option("last", "the FFN to patch: 'last', an index into find_ffns(model) or an FFN path")
    task: str = option("classification", "'classification' (logits [B, C]) or 'generation' (logits [B, L, V])")
    positions: str | None = option(
        None,
        "where a patch neuron is trained to fire: 'cls' (position 0), 'erroneous_target_tokens' (generation: "
        "one neuron per wrongly predicted target token), 'last_prompt' or 'all'; None = the task's default",
    )
    max_neurons_per_edit: int = option(5, "erroneous_target_tokens: at most this many neurons per edit")
    init: str = option(
        "reference",
        "'reference': key q/|q|^2, bias 0, value u*s with s = value_scale; 'zero': same key, value 0 (s = 0)",
    )
    value_scale: float = option(10.0, "initial per-entry value scale s (reference init)")
    activation_weight: float = option(1.0, "alpha: weight of the activation loss l_a")
    memory_weight: float | None = option(None, "mu: weight of the memory loss l_m; None = 5 (classification) / 10")
    silence_margin: float = option(-3.0, "beta: pre-activations on memory vectors are pushed below this")
    edit_margin: float = option(3.0, "gamma: the edit's pre-activation must exceed memory ones by this")
    activation_top_k: int = option(5, "l_a averages the top-k of exp(-a_e) over views")
    memory_top_k: int = option(1000, "l_m averages the top-k of each memory term")
    memory_loss: str = option(
        "mean_view",
        "'mean_view': each memory term's top-k runs over the memory vectors, the margin term against the edit "
        "activation averaged over the views; 'per_view' (reference code): both top-k run over memory vectors x "
        "views, each view with its own edit activation (the silence term then covers top-k/views distinct vectors)",
    )
    pool_neurons: bool = option(
        False,
        "edits with several neurons: take the top-k of l_a and of each memory term over all the edit's neurons "
        "together (reference code) instead of per neuron and then averaging over the neurons",
    )
    entropy_weight: float = option(
        0.0,
        "classification: subtract this times the entropy of the predicted distribution from the edit loss "
        "(reference code: 0.1)",
    )
    label_smoothing: float | None = option(None, "label smoothing of the edit loss; None = 0 (classification) / 0.1")
    views: int = option(8, "the edit is repeated this many times per step")
    dropout_views: bool = option(True, "run the views in train mode so dropout makes them differ")
    lr: float = option(1e-2, "Adam learning rate")
    weight_decay: float = option(0.01, "Adam weight decay (L2 added to the gradient)")
    grad_clip: float = option(5.0, "clip the gradient norm of each edit's neurons to this (0 = off)")
    lr_schedule: str = option(
        "train_plateau",
        "'train_plateau': halve an edit's lr after plateau_patience steps in which its training loss did not fall "
        "by 0.01%, down to min_lr; 'reference' (reference code): every check_every steps, halve it when the "
        "eval-mode edit loss has not fallen 5% below its best at two checks in a row (no floor besides 1e-8 steps)",
    )
    plateau_patience: int = option(20, "halve an edit's learning rate after this many steps without improvement")
    min_lr: float = option(1e-5, "the plateau halving stops at this learning rate")
    stop_rule: str = option(
        "margins",
        "'margins': stop once the edit is right and both margins hold on the stored neurons (see stop_patience); "
        "'validation' (reference code): after every check_every-th step past check_start, while the edit is right "
        "stop when the memory loss on the validation memory did not fall 0.001 below its best",
    )
    check_every: int = option(25, "the reference lr schedule and the validation stop rule act every this many steps")
    check_start: int = option(100, "the validation stop rule checks only after steps past this one")
    max_steps: int = option(2000, "step cap per edit; an edit still wrong then counts as failed")
    fixed_steps: bool = option(False, "train exactly max_steps steps (LLM preset) instead of stopping early")
    require_margins: bool = option(True, "early stop needs the margins too, not only a correct edit")
    stop_patience: int = option(
        100,
        "once the edit is right, also stop when its loss has not fallen by 1% for this many steps even if the "
        "margins do not hold (the margins may be unreachable when ordinary inputs resemble the edit)",
    )
    keep_failed: bool = option(
        False, "keep the neurons of a failed edit (default: discard them; the reference code keeps them)"
    )
    memory_update: str = option(
        "neurons",
        "what a finished edit adds to the memory: 'neurons' (one vector per kept neuron, the mean FFN input over "
        "its positions) or 'reference' (reference code: its views' eval-mode FFN inputs at the CLS position, or "
        "at every target-predicting position with the first and last dropped for generation)",
    )
    memory_size: int = option(40000, "cap on memory vectors (a seeded random subset is kept beyond it)")
    append_edits_to_memory: bool = option(True, "each finished edit's own vectors join the memory")
    fire_threshold: float = option(0.0, "a patch counts as fired where its pre-activation exceeds this")
    seed: int = option(0, "seed of value directions, dropout views and memory sub-sampling")
    progress: bool | None = option(None, "progress bar over edit steps; None = only on a terminal")

    @property
    def position_policy(self) -> str:
        """``positions``, or the task's default (``cls`` / ``erroneous_target_tokens``) when unset."""
        if self.positions is not None:
            return self.positions
        return "cls" if self.task == "classification" else "erroneous_target_tokens"

    @property
    def mu(self) -> float:
        """``memory_weight``, or the task's default (5 / 10) when unset."""
        if self.memory_weight is not None:
            return float(self.memory_weight)
        return 5.0 if self.task == "classification" else 10.0

    @property
    def smoothing(self) -> float:
        """``label_smoothing``, or the task's default (0 / 0.1) when unset."""
        if self.label_smoothing is not None:
            return float(self.label_smoothing)
        return 0.0 if self.task == "classification" else 0.1

    @classmethod
    def reference(cls, task: str = "classification", **overrides: Any) -> PatcherConfig:
        """The reference code's editing for ``task``: every training difference switched to it.

        μ = 5 / 10, label smoothing 0 / 0.1, up to 2000 steps (the defaults), plus the memory loss
        over memory vectors × views (``memory_loss='per_view'``), top-k pooled over an edit's
        neurons (``pool_neurons``), the −0.1·entropy term of the classification loss
        (``entropy_weight``), the plateau rule on the eval-mode edit loss every 25 steps
        (``lr_schedule='reference'``), stopping on a validation memory from step 100
        (``stop_rule='validation'``: call ``handle.set_validation_memory`` before editing),
        failed edits' neurons kept (``keep_failed``) and the reference's memory update
        (``memory_update='reference'``). Margins: β = −3, γ = 3 for classification; the reference
        code's generation path never passes them on, so they are 0 there (pass
        ``silence_margin=-3.0, edit_margin=3.0`` for the paper's values).

        Example:
            >>> c = PatcherConfig.reference("generation")
            >>> c.silence_margin, c.edit_margin, c.mu, c.entropy_weight
            (0.0, 0.0, 10.0, 0.0)
        """
        base: dict[str, Any] = {
            "task": task,
            "memory_loss": "per_view",
            "pool_neurons": True,
            "entropy_weight": 0.1 if task == "classification" else 0.0,
            "lr_schedule": "reference",
            "stop_rule": "validation",
            "keep_failed": True,
            "memory_update": "reference",
        }
        if task == "generation":
            base |= {"silence_margin": 0.0, "edit_margin": 0.0}
        return cls(**(base | overrides))

    @classmethod
    def llm(cls, task: str = "generation", **overrides: Any) -> PatcherConfig:
        """The LLM preset: zero-initialised value, 75 fixed steps, λ_a = λ_m = 0.1."""
        base: dict[str, Any] = {
            "task": task,
            "init": "zero",
            "max_steps": 75,
            "fixed_steps": True,
            "activation_weight": 0.1,
            "memory_weight": 0.1,
        }
        return cls(**(base | overrides))

    def validate(self) -> None:
        self.require(self.task in TASKS, "task", f"must be one of {TASKS}")
        self.require(self.positions is None or self.positions in POSITIONS, "positions", f"must be one of {POSITIONS}")
        self.require(
            self.position_policy != "erroneous_target_tokens" or self.task == "generation",
            "positions",
            "'erroneous_target_tokens' needs task='generation'",
        )
        layer = self.layer
        self.require(
            layer == "last" or _is_int(layer) or (isinstance(layer, str) and layer != ""),
            "layer",
            "must be 'last', an int index into find_ffns(model) or an FFN path",
        )
        self.require(self.init in INITS, "init", f"must be one of {INITS}")
        names = ("max_neurons_per_edit", "activation_top_k", "memory_top_k", "views", "max_steps", "memory_size")
        for name in (*names, "stop_patience", "check_every"):
            v = getattr(self, name)
            self.require(_is_int(v) and v >= 1, name, "must be an int >= 1")
        self.require(_is_int(self.plateau_patience) and self.plateau_patience >= 1, "plateau_patience", "must be >= 1")
        self.require(_is_int(self.check_start) and self.check_start >= 0, "check_start", "must be an int >= 0")
        self.require(self.memory_loss in MEMORY_LOSSES, "memory_loss", f"must be one of {MEMORY_LOSSES}")
        self.require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}")
        self.require(self.stop_rule in STOP_RULES, "stop_rule", f"must be one of {STOP_RULES}")
        self.require(self.memory_update in MEMORY_UPDATES, "memory_update", f"must be one of {MEMORY_UPDATES}")
        ew = self.entropy_weight
        self.require(_is_num(ew) and ew >= 0, "entropy_weight", "must be a finite number >= 0")
        self.require(
            not (_is_num(ew) and ew > 0) or self.task == "classification",
            "entropy_weight",
            "the entropy term is defined for task='classification' only (use 0.0 for generation)",
        )
        for name in ("value_scale", "activation_weight", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            self.require(_is_num(v) and v >= 0, name, "must be a finite number >= 0")
        mw = self.memory_weight
        self.require(mw is None or (_is_num(mw) and mw >= 0), "memory_weight", "must be None or a number >= 0")
        for name in ("silence_margin", "edit_margin", "fire_threshold"):
            self.require(_is_num(getattr(self, name)), name, "must be a finite number")
        self.require(_is_num(self.lr) and self.lr > 0, "lr", "must be a finite number > 0")
        self.require(_is_num(self.min_lr) and 0 < self.min_lr <= self.lr, "min_lr", "must lie in (0, lr]")
        ls = self.label_smoothing
        self.require(ls is None or (_is_num(ls) and 0 <= ls < 1), "label_smoothing", "must be None or lie in [0, 1)")
        bools = ("dropout_views", "fixed_steps", "require_margins", "keep_failed", "append_edits_to_memory")
        for name in (*bools, "pool_neurons"):
            self.require(isinstance(getattr(self, name), bool), name, "must be a bool")
        self.require(self.progress is None or isinstance(self.progress, bool), "progress", "must be a bool or None")
        self.require(_is_int(self.seed), "seed", "must be an int")
