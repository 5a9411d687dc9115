"""A small but real operator used to test the lifecycle: a learnable per-neuron gain on FFN hidden units.

``h -> h * gain`` at every selected FFN's hidden site; ``gain`` (one vector per FFN, owned by the
handle) is what gets saved; ``merge_()`` bakes it into the value projection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

import modulart as mt
from modulart.core.operator import Plan, option


@dataclasses.dataclass
class GainConfig(mt.OperatorConfig):
    init: float = option(1.0, "initial gain of every hidden unit")
    layers: str = option("all", "which FFNs (layer specification)")

    def validate(self) -> None:
        self.require(self.init > 0, "init", "must be positive")


class GainHandle(mt.Handle):
    gains: dict[str, nn.Parameter]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {p: g.detach() for p, g in self.gains.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.gains):
            raise mt.IncompatibleArtifactError(f"expected gains for {sorted(self.gains)}, got {sorted(state)}")
        with torch.no_grad():
            for p, g in self.gains.items():
                g.copy_(state[p])

    def merge_(self) -> nn.Module:
        self._check_live()
        for f in self.plan.data["ffns"]:
            f.values = f.values * self.gains[f.path].detach()
        self.remove()
        return self.model


class Gain(mt.Operator):
    name = "test-gain"
    config_class = GainConfig
    handle_class = GainHandle

    @classmethod
    def plan(cls, model: nn.Module, config: mt.OperatorConfig) -> Plan:
        assert isinstance(config, GainConfig)
        ffns = mt.find_ffns(model)
        keep = set(mt.select_layers(config.layers, len(ffns)))
        chosen = [f for i, f in enumerate(ffns) if i in keep]
        return Plan(targets=[f.path for f in chosen], selector=config.layers, data={"ffns": chosen})

    @classmethod
    def install(cls, handle: mt.Handle, plan: Plan) -> None:
        assert isinstance(handle, GainHandle) and isinstance(handle.config, GainConfig)
        handle.gains = {}
        for f in plan.data["ffns"]:
            g = nn.Parameter(torch.full((f.d_ff,), handle.config.init))
            handle.gains[f.path] = g
            handle.registry.at(f.hidden_site, lambda h, g=g: h * g, priority=mt.Priority.INTERVENE)
