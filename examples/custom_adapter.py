"""Teach modulart a hand-written FFN whose activation no catalogue knows, then check the adapter.

modulart finds most FFNs by data flow (any classes, child order, activation modules or functions
it can identify by their values). An activation written inline that matches no catalogue entry
cannot be named, so the block needs a three-line adapter; the adapter is then verified against
the block's own forward like every other view.

Run: python examples/custom_adapter.py
"""

import torch
from torch import nn

import modulart as mt


class MyMLP(nn.Module):
    def __init__(self, d: int = 16, f: int = 64) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(squared_gelu(self.inp(x)))


def squared_gelu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x).square()


model = nn.Sequential(MyMLP(), nn.LayerNorm(16), MyMLP())
try:
    mt.find_ffns(model)
except mt.UnsupportedModuleError as e:
    print("before the adapter:", str(e).splitlines()[0])
mt.register_ffn_layout(MyMLP, mt.FFNLayout(key="inp", value="out", activation=squared_gelu))
x = torch.randn(4, 16)
for f in mt.find_ffns(model):
    q = x if f.path == "0" else model[1](model[0](x))
    err = float((f.forward(q) - f.module(q)).abs().max())
    print(f"{f.path}: d_model={f.d_model} d_ff={f.d_ff} max |error| = {err:.1e}")
    assert err < 1e-6
