"""Configuration of FFN key/value tuning (spec: shared/specs/kv.md).

Example:
    >>> from modulart.kv import KVConfig
    >>> KVConfig(target="values", mode="lora", rank=4).scale
    4.0
    >>> KVConfig(target="queries")
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: KVConfig.target = 'queries': must be one of ('keys', 'values', 'both')
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeAlias

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
