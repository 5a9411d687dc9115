"""A small but real plug-in operator used to test the contract: a learnable per-neuron gain on FFN hidden units.

``h -> h * gain`` at every selected FFN's hidden site; ``gain`` (one vector per FFN, owned by the
handle) is what gets saved; ``merge_()`` bakes it into the value projection (function-preserving).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

import modulart as mt
from modulart.core.operator import AnyOperator, Plan, option
from modulart.core.types import StateDict, StateValue


@dataclasses.dataclass
class GainConfig(mt.OperatorConfig):
    init: float = option(1.0, "initial gain of every hidden unit")
    layers: str = option("all", "which FFNs (layer specification)")

    def validate(self) -> None:
        self.require(self.init > 0, "init", "must be positive")


@dataclasses.dataclass
class GainPlan(Plan):
    ffns: list[mt.FFN] = dataclasses.field(default_factory=list)


class GainHandle(mt.Handle[GainConfig]):
    def __init__(self, model: nn.Module, operator: AnyOperator, config: GainConfig, plan: GainPlan) -> None:
        super().__init__(model, operator, config, plan)
        self.ffns = plan.ffns
        self.gains = {f.path: nn.Parameter(torch.full((f.d_ff,), config.init)) for f in plan.ffns}

    def state_dict(self) -> StateDict:
        return {p: g.detach() for p, g in self.gains.items()}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        if set(state) != set(self.gains):
            raise mt.IncompatibleArtifactError(f"expected gains for {sorted(self.gains)}, got {sorted(state)}")
        with torch.no_grad():
            for p, g in self.gains.items():
                value = state[p]
                assert isinstance(value, torch.Tensor)
                g.copy_(value)

    def merge_(self) -> nn.Module:
        self._check_live()
        for f in self.ffns:
            f.values = f.values * self.gains[f.path].detach()
        self.remove()
        return self.model


class Gain(mt.Operator[GainConfig, GainPlan, GainHandle]):
    name = "test-gain"

    @classmethod
    def plan(cls, model: nn.Module, config: GainConfig) -> GainPlan:
        ffns = mt.find_ffns(model)
        keep = set(mt.select_layers(config.layers, len(ffns)))
        chosen = [f for i, f in enumerate(ffns) if i in keep]
        return GainPlan(targets=[f.path for f in chosen], selector=config.layers, ffns=chosen)

    @classmethod
    def install(cls, handle: GainHandle, plan: GainPlan) -> None:
        for f in plan.ffns:
            g = handle.gains[f.path]
            handle.registry.at(f.hidden_site, lambda h, g=g: h * g, priority=mt.Priority.INTERVENE)
