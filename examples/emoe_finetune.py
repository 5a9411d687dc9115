"""Fine-tune a small causal LM with emergent experts, watch the routing, then go back to dense.

A 4-layer Llama built from a config (random init, no download) learns byte-level next-token prediction
on sentences of the Python language reference, with its last FFNs split into 16 experts (top-4).

Run: python examples/emoe_finetune.py
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modulart as mt
from modulart.text import reference_sentences

torch.manual_seed(0)
cfg = AutoConfig.for_model(
    "llama",
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
)
model = AutoModelForCausalLM.from_config(cfg)
data = [torch.tensor(list(s.encode()[:64])) for s in reference_sentences(64)]
batch = torch.nn.utils.rnn.pad_sequence(data, batch_first=True)

handle = mt.emoe.apply(model, num_experts=16, top_k=4)  # default layers: every 2nd of the last quarter
print("converted:", list(handle.layers))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(30):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 10 == 0:
        stats = handle.routing_stats()
        s = next(iter(stats.values()))
        print(f"step {step:2d} loss {loss.item():.3f}  expert-use entropy {s.entropy:.3f}  stability {s.stability}")

model.eval()
with torch.no_grad():
    routed = model(input_ids=batch, labels=batch).loss.item()
handle.to_dense()  # a stock dense model again (the function changes: k < N): no hooks, same state_dict layout
with torch.no_grad():
    dense = model(input_ids=batch, labels=batch).loss.item()
full = mt.emoe.apply(model, num_experts=16, top_k=16)  # k = N is exactly the dense model
with torch.no_grad():
    check = model(input_ids=batch, labels=batch).loss.item()
full.remove()
print(f"loss with routing {routed:.4f}, back to dense {dense:.4f}; max |error| k=N vs dense = {abs(check - dense):.1e}")
