"""Configuration of the emergent-MoE conversion (spec: shared/specs/emoe.md).

Example:
    >>> from modulart.emoe import EMoEConfig
    >>> cfg = EMoEConfig(num_experts=64, top_k=16)
    >>> cfg.top_k / cfg.num_experts
    0.25
    >>> EMoEConfig(num_experts=8, top_k=9)
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: EMoEConfig.top_k = 9: must satisfy 1 <= top_k <= num_experts (8)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from modulart.core.operator import OperatorConfig, option

__all__ = ["EXECUTORS", "ROUTERS", "SPLITS", "EMoEConfig", "default_layers"]

SPLITS = ("kmeans", "random")
ROUTERS = ("avgk", "frozen", "cosine", "oracle", "random", "bottomk")
EXECUTORS = ("masked", "sparse")


def default_layers(depth: int) -> list[int]:
    """The paper's placement: every 2nd layer of the last quarter, ending at the second-to-last.

    12 layers -> [8, 10] (the spec's L-4 and L-2); 6 -> [4]; 32 -> [23, 25, 27, 29]; 1 -> [0].

    Example:
        >>> default_layers(12), default_layers(6), default_layers(1)
        ([8, 10], [4], [0])
    """
    if depth < 3:
        return [depth - 1]
    quarter = max(1, depth // 4)
    return list(range(depth - 1 - quarter, depth - 1, 2))


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
        "'oracle' (actual activation mass), 'random' / 'bottomk' (ablations)",
    )
    executor: str = option("masked", "'masked' (dense compute, unselected neurons zeroed) or 'sparse'")
    seed: int = option(0, "seed of clustering and of random routing/splits")
    max_iter: int = option(100, "k-means iterations at most")
    gate_noise: float = option(0.0, "training-time gate noise std, times 1/N (paper parity: 1.0)")
    balance_loss_weight: float = option(
        0.0, "weight of the 0.5*(CV^2(importance)+CV^2(load)) loss returned by handle.balance_loss() (parity: 0.01)"
    )
    cache_dir: str | None = option(None, "directory to cache cluster labels on disk (keyed by weights + config)")

    def validate(self) -> None:
        self.require(isinstance(self.num_experts, int) and self.num_experts >= 1, "num_experts", "must be an int >= 1")
        self.require(
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
            "top_k",
            f"must satisfy 1 <= top_k <= num_experts ({self.num_experts})",
        )
        self.require(self.split in SPLITS, "split", f"must be one of {SPLITS}")
        self.require(self.router in ROUTERS, "router", f"must be one of {ROUTERS}")
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
            not (self.executor == "sparse" and self.router == "oracle"),
            "router",
            "'oracle' needs every neuron's activation, which the sparse executor does not compute",
        )
