"""Fix three mistakes of a small causal LM one after another with Transformer-Patcher, save the patches, load them back.

Sequential editing: each mistake gets its own neuron, trained with the base model frozen; earlier
edits must keep working while new ones are added. The patches are saved (safetensors + JSON
provenance) and loaded onto the model again with ``mt.load``, which checks first that the model is
the one they were made for.

Run: python examples/patch_sequence.py
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modulart as mt

torch.manual_seed(0)
cfg = AutoConfig.for_model(
    "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
)
model = AutoModelForCausalLM.from_config(cfg).eval()
gen = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, 256, (5,), generator=gen) for _ in range(3)]


def next_token(ids: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(ids[None]).logits[0, -1].argmax())


probe = torch.stack(prompts)
with torch.no_grad():
    original = model(probe).logits
targets = [torch.tensor([(next_token(p) + 1) % 256]) for p in prompts]  # continuations the model gets wrong

patcher = mt.patcher.apply(model, task="generation", lr=0.1, views=2)  # tiny model: larger steps, fewer views
patcher.set_memory(torch.randint(0, 256, (32, 12), generator=gen))  # ordinary inputs the patches stay silent on
for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
    r = patcher.edit(p, t)
    held = [next_token(q) == int(u) for q, u in zip(prompts[: i + 1], targets[: i + 1], strict=True)]
    print(f"edit {i}: success={r.success} in {r.steps} steps, patch {r.patch_ids}; edits holding so far: {held}")
    assert all(held)
print(f"{len(patcher.patches)} patches on {patcher.patches[0].layer}")
with torch.no_grad():
    patched = model(probe).logits

with tempfile.TemporaryDirectory() as tmp:
    folder = patcher.save(Path(tmp) / "patches")
    print("saved:", sorted(f.name for f in Path(folder).iterdir()))
    patcher.remove()
    with torch.no_grad():
        print(f"after remove(): max |logits - original| = {(model(probe).logits - original).abs().max():.1e}")
    again = mt.load(model, folder)  # a PatcherHandle with the same patches, ids and provenance
    with torch.no_grad():
        err = float((model(probe).logits - patched).abs().max())
    print(f"loaded {[p.id for p in again.patches]}: max |logits(loaded) - logits(patched)| = {err:.1e}")
    assert err == 0.0 and [next_token(p) for p in prompts] == [int(t) for t in targets]
    again.remove()

    other = AutoModelForCausalLM.from_config(cfg).eval()  # another random init: not the model the patches fit
    try:
        mt.load(other, folder)
    except mt.IncompatibleArtifactError as e:
        print("onto another model:", type(e).__name__, "-", " ".join(str(e).split())[:160], "...")
