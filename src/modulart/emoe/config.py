"""Configuration of the emergent-MoE conversion (Qiu et al., arXiv 2310.10908; reference code qiuzh20/EMoE).

The defaults are modulart's: avg-k routing with weight-1 experts, no noise, no auxiliary loss, no
capacity limit, one shared output bias. :meth:`EMoEConfig.reference` switches to what the
reference code does for a model family: its BERT / GPT-2 path (gate noise, its balance loss,
capacity with token dropping, a copy of the output bias per expert, dropout 0.1 in converted
layers) or its Llama path (plain top-k masking, score modes ``up`` / ``up_abs`` / ``inter``).

Example:
    >>> from modulart.emoe import EMoEConfig
    >>> cfg = EMoEConfig(num_experts=64, top_k=16)
    >>> cfg.top_k / cfg.num_experts
    0.25
    >>> ref = EMoEConfig.reference("bert")
    >>> ref.layers, ref.capacity_factor, ref.balance_loss, ref.per_expert_bias, ref.dropout
    ([-2, -1], 1.5, 'reference', True, 0.1)
    >>> EMoEConfig.reference("llama", router="up").router
    'up'
    >>> EMoEConfig(num_experts=8, top_k=9)
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: EMoEConfig.top_k = 9: must satisfy 1 <= top_k <= num_experts (8)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from modulart.core.errors import ConfigError
from modulart.core.operator import OperatorConfig, option
from modulart.emoe.routing import available_routers

__all__ = [
    "BALANCE_LOSSES",
    "EXECUTORS",
    "FAMILIES",
    "PLACEMENTS",
    "ROUTERS",
    "SPLITS",
    "EMoEConfig",
    "default_layers",
]

SPLITS = ("kmeans", "random")
ROUTERS = ("avgk", "frozen", "cosine", "oracle", "random", "bottomk", "up", "up_abs", "inter")
HIDDEN_ROUTERS = ("oracle", "inter")  # need every hidden activation
GATED_ROUTERS = ("up", "up_abs")  # need an up projection
EXECUTORS = ("masked", "sparse")
BALANCE_LOSSES = ("counts", "reference")
FAMILIES = ("bert", "gpt2", "llama")
PLACEMENTS = ("every2", "every4")


def default_layers(depth: int) -> list[int]:
    """modulart's default placement: every 2nd layer of the last quarter, ending at the second-to-last.

    12 layers -> [8, 10] (layers L-4 and L-2); 6 -> [4]; 32 -> [23, 25, 27, 29]; 48 -> [35, 37, ..., 45];
    1 -> [0]. This is a rule of thumb for any depth, *not* the reference code's placement, which
    converts fixed layers of its models: BERT-base layers [10, 11] (its README's command: [10]),
    GPT2-XL [44] of 48, Llama-7B every 2nd layer from 28 ([28, 30]) or every 4th from 16
    ([16, 20, 24, 28]). :meth:`EMoEConfig.reference` uses those.

    Example:
        >>> default_layers(12), default_layers(6), default_layers(1)
        ([8, 10], [4], [0])
    """
    if depth < 3:
        return [depth - 1]
    quarter = max(1, depth // 4)
    return list(range(depth - 1 - quarter, depth - 1, 2))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


@dataclasses.dataclass
class EMoEConfig(OperatorConfig):
    """How dense FFNs are split into experts and how tokens are routed."""

    num_experts: int = option(64, "N: experts per converted FFN (d_ff neurons split into N balanced groups)")
    top_k: int = option(16, "k: experts each token uses (1 <= k <= N; the paper recommends k/N in 0.25-0.5)")
    layers: Any = option(
        "default",
        "which FFNs (indices into find_ffns(model)): 'default' (every 2nd layer of the last quarter), a layer "
        "specification accepted by select_layers, or a list of FFN paths",
    )
    every: int = option(1, "keep every n-th of the selected layers")
    start: int | None = option(None, "with every: count from this layer")
    split: str = option("kmeans", "how neurons are grouped: 'kmeans' (balanced k-means of keys) or 'random'")
    router: str = option(
        "avgk",
        "'avgk' (mean key of each expert, tied to the live weights), 'frozen' (avgk at conversion), 'cosine', "
        "'oracle' (actual activation mass), 'random' / 'bottomk' (ablations); gated FFNs also 'up', 'up_abs', "
        "'inter' (mean up projection, mean |up projection|, mean hidden activation: the reference Llama path's "
        "score modes); or the name of a router registered with modulart.emoe.register_router",
    )
    executor: str = option("masked", "'masked' (dense compute, unselected neurons zeroed) or 'sparse'")
    seed: int = option(0, "seed of clustering and of random routing/splits")
    max_iter: int = option(100, "k-means iterations at most")
    gate_noise: float = option(0.0, "training-time gate noise std, times 1/N (reference BERT/GPT-2 path: 1.0)")
    balance_loss_weight: float = option(
        0.0, "weight of the balance loss returned by handle.balance_loss() (reference BERT/GPT-2 path: 0.01)"
    )
    cache_dir: str | None = option(None, "directory to cache cluster labels on disk (keyed by weights + config)")
    balance_loss: str = option(
        "counts",
        "which loss handle.balance_loss() returns: 'counts' (modulart: 0.5*(CV^2(importance)+CV^2(load)), load = "
        "selection counts, importance from the noisy scores, gradient into the FFN input and keys) or 'reference' "
        "(the reference code's: smooth load estimate under the gate noise, clean importance, sample variance, no "
        "gradient into the keys; needs gate_noise > 0)",
    )
    capacity_factor: float | None = option(
        None,
        "None: no capacity limit (modulart). A number f > 0: each expert takes at most k*floor(f*ceil(T/N)) of a "
        "forward's T tokens' assignments, filled first choices first, tokens with a higher top probability first; "
        "the rest are dropped (the reference code's BERT/GPT-2 path: 1.5), in training and evaluation alike",
    )
    per_expert_bias: bool = option(
        False,
        "give every expert its own copy of the FFN output bias (initialised to b_out / k, trained instead of b_out); "
        "a token gets the sum of its kept experts' copies (the reference code's BERT/GPT-2 path)",
    )
    dropout: float = option(
        0.0,
        "dropout p on the pre-activation of converted FFNs in training, sigma(dropout(x W_in^T + b_in)) (the "
        "reference code's BERT/GPT-2 path: 0.1); 0 = off",
    )

    @classmethod
    def reference(cls, family: str, *, placement: str = "every2", **overrides: Any) -> EMoEConfig:
        """The reference code's conversion for a model family; keyword overrides win.

        - ``"bert"`` (BERT/MiniLM, full fine-tuning): N = 64, k = 16, the last two layers (``[10,
          11]`` of BERT-base's 12), gate noise 1.0, the reference balance loss with weight 0.01,
          capacity factor 1.5 with token dropping, a trained output-bias copy per expert, dropout
          0.1 before the activation of converted layers.
        - ``"gpt2"`` (GPT2-XL with LoRA): the same GELU path with N = 64, k = 32 and the 4th-last
          layer (``[44]`` of 48). The bias copies train only if the FFN's output bias trained when
          EMoE was applied (in the reference's LoRA runs it is frozen).
        - ``"llama"``: the Llama path: N = 64, k = 16, every 2nd layer from the 4th-last
          (``[28, 30]`` of 32; ``placement="every4"``: every 4th layer of the last half,
          ``[16, 20, 24, 28]`` of 32), top-k masking of the gate-projection score (``avgk``; pass
          ``router="up"``, ``"up_abs"`` or ``"inter"`` for its other score modes, ``"oracle"`` for
          ``inter_abs``), no noise, no auxiliary loss, no capacity, no dropout.

        Layers are given relative to the depth, so they are the reference's indices on the
        reference's models and the same positions from the end on others. Passing ``layers``
        replaces the preset's ``every`` / ``start`` too (unless they are passed as well).

        Args:
            family: ``"bert"``, ``"gpt2"`` or ``"llama"``.
            placement: ``"llama"`` only: ``"every2"`` (default) or ``"every4"``.
            overrides: any :class:`EMoEConfig` field.

        Raises:
            ConfigError: an unknown family, placement or field, or an invalid value.

        Example:
            >>> cfg = EMoEConfig.reference("gpt2")
            >>> cfg.num_experts, cfg.top_k, cfg.layers, cfg.gate_noise, cfg.balance_loss_weight
            (64, 32, [-4], 1.0, 0.01)
            >>> EMoEConfig.reference("llama", placement="every4").layers
            'last_half'
            >>> EMoEConfig.reference("t5")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            modulart.core.errors.ConfigError: EMoEConfig.reference: family = 't5': must be one of ...
        """
        if family not in FAMILIES:
            raise ConfigError(f"EMoEConfig.reference: family = {family!r}: must be one of {FAMILIES}")
        if placement not in PLACEMENTS or (placement != "every2" and family != "llama"):
            raise ConfigError(
                f"EMoEConfig.reference: placement = {placement!r}: must be one of {PLACEMENTS} ('every4' for the "
                "'llama' family only)"
            )
        base: dict[str, Any]
        if family == "llama":
            layers: dict[str, Any] = (
                {"layers": "all", "every": 2, "start": -4}
                if placement == "every2"
                else {"layers": "last_half", "every": 4, "start": None}
            )
            base = {"num_experts": 64, "top_k": 16, "router": "avgk"} | layers
        else:
            base = {
                "num_experts": 64,
                "top_k": 16 if family == "bert" else 32,
                "layers": [-2, -1] if family == "bert" else [-4],
                "router": "avgk",
                "gate_noise": 1.0,
                "balance_loss": "reference",
                "balance_loss_weight": 0.01,
                "capacity_factor": 1.5,
                "per_expert_bias": True,
                "dropout": 0.1,
            }
        if "layers" in overrides:  # a layer choice of the caller's own: no leftover every/start of the preset's
            base.pop("every", None)
            base.pop("start", None)
        return cls(**base).replace(**overrides)

    def validate(self) -> None:
        self.require(isinstance(self.num_experts, int) and self.num_experts >= 1, "num_experts", "must be an int >= 1")
        self.require(
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
            "top_k",
            f"must satisfy 1 <= top_k <= num_experts ({self.num_experts})",
        )
        self.require(self.split in SPLITS, "split", f"must be one of {SPLITS}")
        self.require(
            isinstance(self.router, str) and (self.router in ROUTERS or self.router in available_routers()),
            "router",
            f"must be one of {ROUTERS} or a name registered with modulart.emoe.register_router (registered: "
            f"{available_routers()[len(ROUTERS) :]}; names in artefacts are looked up there, never imported)",
        )
        self.require(self.executor in EXECUTORS, "executor", f"must be one of {EXECUTORS}")
        self.require(isinstance(self.every, int) and self.every >= 1, "every", "must be an int >= 1")
        self.require(isinstance(self.max_iter, int) and self.max_iter >= 1, "max_iter", "must be an int >= 1")
        for name in ("gate_noise", "balance_loss_weight"):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            self.require(ok, name, "must be a finite number >= 0")
        self.require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an int")
        ok_start = self.start is None or (isinstance(self.start, int) and not isinstance(self.start, bool))
        self.require(ok_start, "start", "must be None or an int (a layer index, negative from the end)")
        self.require(
            not (self.executor == "sparse" and self.router in HIDDEN_ROUTERS),
            "router",
            f"{self.router!r} needs every neuron's activation, which the sparse executor does not compute",
        )
        self.require(self.balance_loss in BALANCE_LOSSES, "balance_loss", f"must be one of {BALANCE_LOSSES}")
        self.require(
            self.balance_loss != "reference" or _positive(self.gate_noise),
            "balance_loss",
            "'reference' needs gate_noise > 0 (its load term is a probability under the gate noise)",
        )
        cf = self.capacity_factor
        self.require(cf is None or _positive(cf), "capacity_factor", "must be None (no limit) or a finite number > 0")
        self.require(isinstance(self.per_expert_bias, bool), "per_expert_bias", "must be a bool")
        p = self.dropout
        ok_p = _number(p) and 0.0 <= p < 1.0
        self.require(ok_p, "dropout", "must be a number in [0, 1)")
