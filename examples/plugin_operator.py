"""Ship an operator of your own as a plug-in: modulart finds it through the "modulart.operators" entry point.

A plug-in package declares its operator class in its packaging metadata::

    # pyproject.toml of the package "modulart-gain"
    [project.entry-points."modulart.operators"]
    gain = "modulart_gain:Gain"

and, once it is installed, ``mt.get_operator("gain")``, ``modulart operators``, ``mt.apply`` with its
config and ``mt.load`` of its artefacts all find it, with no import in user code. This script writes
exactly what ``pip install`` would put on the path (the module and its ``.dist-info`` folder with
``entry_points.txt``) into a temporary folder, so it runs without installing anything.

Run: python examples/plugin_operator.py
"""

import importlib
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

import modulart as mt

PLUGIN = textwrap.dedent(
    '''
    """modulart-gain: a learnable gain on every hidden unit of the chosen FFNs (h -> h * g)."""
    import dataclasses

    import torch
    from torch import nn

    import modulart as mt
    from modulart.core.operator import Plan, option


    @dataclasses.dataclass
    class GainConfig(mt.OperatorConfig):
        init: float = option(1.0, "initial gain of every hidden unit")
        layers: str = option("all", "which FFNs (a layer specification)")

        def validate(self):
            self.require(self.init > 0, "init", "must be positive")


    @dataclasses.dataclass
    class GainPlan(Plan):
        ffns: list = dataclasses.field(default_factory=list)


    class GainHandle(mt.Handle[GainConfig]):
        def __init__(self, model, operator, config, plan):
            super().__init__(model, operator, config, plan)
            self.ffns = plan.ffns
            self.gains = {f.path: nn.Parameter(torch.full((f.d_ff,), config.init)) for f in plan.ffns}

        def state_dict(self):
            return {p: g.detach() for p, g in self.gains.items()}

        def load_state_dict(self, state):
            if set(state) != set(self.gains):
                raise mt.IncompatibleArtifactError(f"expected gains for {sorted(self.gains)}, got {sorted(state)}")
            with torch.no_grad():
                for p, g in self.gains.items():
                    g.copy_(state[p])

        def merge_(self):  # bake the gains into the value projections: the function is preserved
            for f in self.ffns:
                f.values = f.values * self.gains[f.path].detach()
            self.remove()
            return self.model


    class Gain(mt.Operator[GainConfig, GainPlan, GainHandle]):
        name = "gain"

        @classmethod
        def plan(cls, model, config):
            ffns = mt.find_ffns(model)
            keep = set(mt.select_layers(config.layers, len(ffns)))
            chosen = [f for i, f in enumerate(ffns) if i in keep]
            return GainPlan(targets=[f.path for f in chosen], selector=config.layers, ffns=chosen)

        @classmethod
        def install(cls, handle, plan):
            for f in plan.ffns:
                g = handle.gains[f.path]
                handle.registry.at(f.hidden_site, lambda h, g=g: h * g, priority=mt.Priority.INTERVENE)
    '''
)

with tempfile.TemporaryDirectory() as tmp:
    site = Path(tmp) / "site-packages"
    (site / "modulart_gain").mkdir(parents=True)
    (site / "modulart_gain" / "__init__.py").write_text(PLUGIN)
    info = site / "modulart_gain-0.1.0.dist-info"  # what pip writes for an installed distribution
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: modulart-gain\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[modulart.operators]\ngain = modulart_gain:Gain\n")

    # the command line lists it (a fresh process: only the entry point tells it about the plug-in)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run(
        [sys.executable, "-m", "modulart", "operators"], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    print("modulart operators:", listed)
    assert "gain" in listed

    # in this process: the plug-in is on the path as if installed; nothing imports modulart_gain by hand
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    Gain = mt.get_operator("gain")
    print("mt.get_operator('gain') ->", f"{Gain.__module__}.{Gain.__qualname__}")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8))
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    handle = mt.apply(model, Gain.config_class(init=1.0))  # dispatches on the plug-in's config class
    opt = torch.optim.Adam(list(handle.gains.values()), lr=0.05)
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        tuned = model(x)
    print(f"trained the gains: loss {loss.item():.3f}")

    folder = handle.save(Path(tmp) / "gain-artefact")  # the artefact names its operator: "gain"
    handle.remove()
    again = mt.load(model, folder)  # resolved through the entry point, never imported from the file
    with torch.no_grad():
        print(f"loaded: max |output(loaded) - output(trained)| = {(model(x) - tuned).abs().max():.1e}")
    again.merge_()
    with torch.no_grad():
        err = float((model(x) - tuned).abs().max())
    print(f"merged into the weights, no hooks left: max |output(merged) - output(trained)| = {err:.1e}")
    assert err < 1e-5 and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    sys.path.remove(str(site))
