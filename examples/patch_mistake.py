"""Fix one wrong prediction of a small causal LM with Transformer-Patcher, then undo it.

Run: python examples/patch_mistake.py
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modulart as mt

torch.manual_seed(0)
cfg = AutoConfig.for_model(
    "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
)
model = AutoModelForCausalLM.from_config(cfg).eval()
prompt = torch.tensor([5, 17, 42, 9])
with torch.no_grad():
    original = model(prompt[None]).logits
    wrong = int(original[0, -1].argmax())
target = torch.tensor([(wrong + 1) % 256])  # the continuation we want instead

patcher = mt.patcher.apply(model, task="generation")
patcher.set_memory(torch.randint(0, 256, (32, 12), generator=torch.Generator().manual_seed(1)))
result = patcher.edit(prompt, target)
print(f"edit success={result.success} after {result.steps} steps; neurons {result.patch_ids}")
with torch.no_grad():
    print("next token now", int(model(prompt[None]).logits[0, -1].argmax()), "wanted", int(target[0]))
print(patcher.patches[0])
patcher.remove()
with torch.no_grad():
    restored = model(prompt[None]).logits
print(f"after remove(): max |logits - original| = {(restored - original).abs().max():.1e}")
