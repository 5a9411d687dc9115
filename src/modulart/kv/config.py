"""Configuration of FFN key/value tuning (Qiu et al., arXiv 2402.12233).

:meth:`KVConfig.reference` is the paper's recipe (github.com/qiuzh20/Tuning-keys-v.s.-values): PEFT
LoRA ``r=8``, ``lora_alpha=16``, ``lora_dropout=0.1``, ``bias="none"`` on ``q_proj`` and ``v_proj``
(always) plus the one FFN matrix under study (``up_proj`` or ``gate_proj`` for keys, ``down_proj``
for values).

Example:
    >>> from modulart.kv import KVConfig
    >>> KVConfig(target="values", mode="lora", rank=4).scale
    4.0
    >>> ref = KVConfig.reference()
    >>> ref.mode, ref.rank, ref.alpha, ref.lora_dropout, ref.extra_lora, ref.keys
    ('lora', 8, 16.0, 0.1, ('q_proj', 'v_proj'), 'up')
    >>> KVConfig(target="queries")
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: KVConfig.target = 'queries': must be one of ('keys', 'values', 'both')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeAlias

from modulart.core.operator import OperatorConfig, option
from modulart.core.select import LayersArg

__all__ = ["KEY_SIDES", "MODES", "TARGETS", "KVConfig", "NeuronsArg"]

NeuronsArg: TypeAlias = "float | dict[str, list[int]]"
"""Mode ``mask``: a fraction of neurons per block, or block path -> neuron indices."""

TARGETS = ("keys", "values", "both")
KEY_SIDES = ("gate", "up", "both")
MODES = ("full", "lora", "mask")


@dataclasses.dataclass
class KVConfig(OperatorConfig):
    """Which FFN matrices are tuned (keys = first layer, values = second layer) and how."""

    target: str = option("keys", "'keys' (first layer), 'values' (second layer) or 'both'")
    keys: str = option(
        "gate",
        "gated FFNs / experts: which key-side matrix counts as keys: 'gate', 'up' or 'both' "
        "(ignored for plain FFNs, whose keys are the first layer)",
    )
    layers: LayersArg = option(
        "all",
        "which blocks: a select_layers specification over the FFN / MoE blocks in depth order "
        "(on dense models: the indices of find_ffns(model)), or a list of block paths",
    )
    mode: str = option("full", "'full' (unfreeze the matrices), 'lora' (low-rank deltas) or 'mask' (neuron masks)")
    train_biases: bool = option(False, "also train the biases of the chosen matrices")
    freeze_rest: bool = option(True, "set requires_grad=False on every other parameter of the model")
    rank: int = option(8, "lora: rank r of the deltas")
    alpha: float = option(16.0, "lora: the delta is scaled by alpha / rank")
    lora_dropout: float = option(0.0, "lora: dropout on the input of the delta path (training mode only)")
    neurons: NeuronsArg = option(
        1.0,
        "mask: a fraction in (0, 1] of neurons per block kept trainable (chosen at random with seed), or a "
        "dict block path -> list of neuron indices (blocks left out keep every neuron)",
    )
    seed: int = option(0, "seed of the random neuron choice (mask) and of the LoRA A initialisation")
    extra_lora: tuple[str, ...] = option(
        (),
        "lora: further linear maps (path suffixes, 're:<regex>', 'type:<Class>' or '=<path>') that get a LoRA "
        "delta too (same rank, alpha, dropout), besides the chosen FFN matrices, in every layer whatever 'layers' "
        "says; the paper's recipe adapts the attention ('q_proj', 'v_proj'); a pattern matching nothing raises",
    )

    @classmethod
    def reference(cls, keys: str = "up", **overrides: Any) -> KVConfig:
        """The paper's recipe: LoRA r=8, alpha=16, dropout 0.1 on ``q_proj`` / ``v_proj`` plus one FFN matrix.

        The reference trains ``target_modules=[q_proj, v_proj, <one of up_proj, gate_proj, down_proj>]``
        with PEFT LoRA (``bias="none"``) on a 4-bit Llama; every other parameter is frozen. The FFN
        matrix follows ``target`` / ``keys``: keys ``"up"`` (default) or ``"gate"``, or
        ``target="values"`` for ``down_proj``. Its optimiser (not part of the config): lr 2e-4,
        constant after a 3% warmup, 5 epochs.

        Args:
            keys: ``"up"`` or ``"gate"``, the key matrix of the gated FFN.
            overrides: any other field (e.g. ``target="values"``, ``layers=...``), validated.

        Raises:
            ConfigError: an unknown field or a bad value.

        Example:
            >>> KVConfig.reference(target="values").target
            'values'
        """
        base = cls(
            target="keys",
            keys=keys,
            layers="all",
            mode="lora",
            train_biases=False,
            freeze_rest=True,
            rank=8,
            alpha=16.0,
            lora_dropout=0.1,
            extra_lora=("q_proj", "v_proj"),
        )
        return base.replace(**overrides) if overrides else base

    @property
    def scale(self) -> float:
        """The LoRA scale ``alpha / rank``."""
        return self.alpha / self.rank

    def validate(self) -> None:
        self.require(self.target in TARGETS, "target", f"must be one of {TARGETS}")
        self.require(self.keys in KEY_SIDES, "keys", f"must be one of {KEY_SIDES}")
        self.require(self.mode in MODES, "mode", f"must be one of {MODES}")
        self.require(isinstance(self.train_biases, bool), "train_biases", "must be a bool")
        self.require(isinstance(self.freeze_rest, bool), "freeze_rest", "must be a bool")
        self.require(
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
            "rank",
            "must be an int >= 1",
        )
        ok_alpha = isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
        self.require(ok_alpha and math.isfinite(self.alpha) and self.alpha > 0, "alpha", "must be a finite number > 0")
        self.require(
            isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
            "lora_dropout",
            "must lie in [0, 1)",
        )
        self.require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an int")
        ex = self.extra_lora
        self.require(
            isinstance(ex, (list, tuple)) and all(isinstance(e, str) and e for e in ex),
            "extra_lora",
            "must be a list of non-empty selector strings (path suffixes, 're:...', 'type:...', '=path')",
        )
        self.require(not ex or self.mode == "lora", "extra_lora", "only mode='lora' adds LoRA to further linear maps")
        n = self.neurons
        if isinstance(n, dict):
            ok = all(
                isinstance(k, str)
                and isinstance(v, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
                for k, v in n.items()
            )
            self.require(ok, "neurons", "a dict must map block paths to lists of non-negative neuron indices")
        else:
            self.require(
                isinstance(n, (int, float)) and not isinstance(n, bool) and 0 < n <= 1,
                "neurons",
                "must be a fraction in (0, 1] or a dict block path -> neuron indices",
            )
        self.require(
            self.mode == "mask" or (not isinstance(n, dict) and n == 1),
            "neurons",
            "only mode='mask' restricts training to some neurons",
        )
