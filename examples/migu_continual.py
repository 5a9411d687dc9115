"""Continual fine-tuning with MIGU in a plain PyTorch loop: learn task B after task A, with and without MIGU.

A 2-layer Llama built from a config (random init, no download) first learns task A (byte-level
next-token prediction on sentences of one topic of the Python reference), then task B (another
topic), once with plain AdamW and once with MIGU (each step updates only the 30% of output units
of every linear layer with the largest activations; the other units' rows stay exactly as they
were). The script reports how much of task A each run forgets and checks, at every MIGU step, that
the masked rows did not move. One seed of a tiny model says nothing general about MIGU's claim
(that it forgets less than plain fine-tuning); it shows the mechanics.

Run: python examples/migu_continual.py
"""

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modulart.migu
from modulart.text import topic_sentences


def batch_of(sentences: list[str]) -> torch.Tensor:
    rows = [torch.tensor(list(s.encode()[:48])) for s in sentences]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


topics = topic_sentences()
task_a, task_b = batch_of(topics["types"][:24]), batch_of(topics["compound"][:24])

torch.manual_seed(0)
cfg = AutoConfig.for_model(
    "llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
)
model = AutoModelForCausalLM.from_config(cfg)


def loss_on(m: torch.nn.Module, batch: torch.Tensor) -> float:
    m.eval()
    with torch.no_grad():
        out = m(input_ids=batch, labels=batch).loss.item()
    m.train()
    return out


def train(m: torch.nn.Module, batch: torch.Tensor, steps: int, opt: torch.optim.Optimizer, check=None) -> None:
    for _ in range(steps):
        loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        before = {n: p.detach().clone() for n, p in m.named_parameters()} if check else None
        opt.step()
        opt.zero_grad()
        if check:
            check(before)


train(model, task_a, 30, torch.optim.AdamW(model.parameters(), lr=3e-3))  # task A, plain
a_before = loss_on(model, task_a)
print(f"after task A: loss A {a_before:.3f}, loss B {loss_on(model, task_b):.3f}")

# task B, plain fine-tuning
plain = copy.deepcopy(model)
train(plain, task_b, 20, torch.optim.AdamW(plain.parameters(), lr=3e-3))

# task B, MIGU: apply with the optimizer; masks are computed and applied inside opt.step()
gated = copy.deepcopy(model)
opt = torch.optim.AdamW(gated.parameters(), lr=3e-3)
migu = modulart.migu.apply(gated, keep_ratio=0.3, optimizer=opt)
params = dict(gated.named_parameters())
worst = 0.0


def masked_rows_stood_still(before: dict[str, torch.Tensor]) -> None:
    global worst
    for path, keep in migu.masks().items():  # True = output unit updated this step
        name = f"{path}.weight"
        delta = (params[name].detach() - before[name]).abs().amax(dim=1)  # per output unit (row)
        worst = max(worst, float(delta[~keep].max()) if (~keep).any() else 0.0)


train(gated, task_b, 20, opt, check=masked_rows_stood_still)
stats = migu.stats()
first = next(iter(stats))
print(f"MIGU gated {len(stats)} layers; {first}: kept fraction {stats[first].kept_fraction:.2f} of units last step")
migu.remove()  # hooks gone; the trained weights stay

for name, m in (("plain", plain), ("MIGU", gated)):
    a, b = loss_on(m, task_a), loss_on(m, task_b)
    print(f"{name:5s} after task B: loss B {b:.3f}, loss A {a:.3f} (forgetting: {a - a_before:+.3f})")
print(f"max |change of masked rows| over all MIGU steps = {worst:.1e}")
assert worst == 0.0
