"""Tune only the FFN keys, or only the FFN values, of a small causal LM, and compare.

FFNs act as key-value memories: the rows of the first layer (keys; the gate projection of a gated
FFN) decide when a neuron fires, the columns of the second layer (values) what it writes.
``modulart.kv`` makes exactly the chosen matrices trainable and freezes the rest. A 2-layer Llama
built from a config (random init, no download) first learns task A (one topic of the Python
reference, all weights), then is fine-tuned on task B twice from the same state: keys only, then
values only. The script reports trainable parameters, how well each learns B and how much of A it
keeps, checks that nothing but the chosen matrices moved, and finishes with a LoRA on the values
merged back into the weights. One seed of a tiny model shows the mechanics, not which side is better.

Run: python examples/kv_keys_vs_values.py
"""

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modulart.kv
from modulart.text import topic_sentences


def batch_of(sentences: list[str]) -> torch.Tensor:
    rows = [torch.tensor(list(s.encode()[:48])) for s in sentences]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def loss_on(m: torch.nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return m(input_ids=batch, labels=batch).loss.item()


def train(m: torch.nn.Module, batch: torch.Tensor, steps: int, opt: torch.optim.Optimizer) -> None:
    for _ in range(steps):
        m(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()


topics = topic_sentences()
task_a, task_b = batch_of(topics["types"][:24]), batch_of(topics["compound"][:24])
torch.manual_seed(0)
cfg = AutoConfig.for_model(
    "llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
)
base = AutoModelForCausalLM.from_config(cfg)
train(base, task_a, 30, torch.optim.AdamW(base.parameters(), lr=3e-3))
a0, b0 = loss_on(base, task_a), loss_on(base, task_b)
print(f"after task A: loss A {a0:.3f}, loss B {b0:.3f}")

worst = 0.0
for target in ("keys", "values"):
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = modulart.kv.apply(model, target=target, mode="full")  # every FFN; the rest frozen
    report = handle.report()
    chosen = {name for name, _ in handle.trainable()}
    train(model, task_b, 20, torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=3e-3))
    handle.remove()  # requires_grad flags restored; the trained weights stay
    moved = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    frozen = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n not in chosen)
    worst = max(worst, frozen)
    print(
        f"{target:6s} ({', '.join(sorted({n.split('.')[-2] for n in chosen}))}): {report.trainable:,} trainable "
        f"({100 * report.fraction:.1f}%); "
        f"loss B {b0:.3f} -> {loss_on(model, task_b):.3f}, loss A {a0:.3f} -> {loss_on(model, task_a):.3f}"
    )
    assert set(moved) <= chosen

# the same on the values with a LoRA (rank 4), merged back: the merged model computes what the hooks did
model = copy.deepcopy(base)
lora = modulart.kv.apply(model, target="values", mode="lora", rank=4)
train(model, task_b, 10, torch.optim.AdamW(lora.param_groups(), lr=1e-2))
with torch.no_grad():
    hooked = model(input_ids=task_b).logits
    lora.merge_()
    err = float((model(input_ids=task_b).logits - hooked).abs().max())
print(f"LoRA on values: loss B {loss_on(model, task_b):.3f}; max |logits(merged) - logits(LoRA hooks)| = {err:.1e}")
print(f"max |change of every parameter outside the chosen matrices| = {worst:.1e}")
assert worst == 0.0 and err < 1e-4
