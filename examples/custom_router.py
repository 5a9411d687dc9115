"""Route emergent experts with a router of your own: register it by name, fine-tune, save, load.

``mt.emoe.register_router(name, fn)`` is the extension point: ``fn(x, ctx, config)`` maps the FFN
input ``x [T, d_model]`` and a ``RouterContext`` (the expert groups, the live keys, the centroids
at conversion) to scores ``[T, N]``, and ``EMoEConfig(router=name)`` uses it. Here: a "nearest
mean key" router (minus the Euclidean distance instead of avg-k's dot product). The
artefact stores only the name; loading looks it up in the registry and never imports code.

Run: python examples/custom_router.py
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modulart as mt
from modulart.emoe import EMoEConfig, RouterContext
from modulart.text import reference_sentences


def nearest_mean_key(x: torch.Tensor, ctx: RouterContext, config: EMoEConfig) -> torch.Tensor:
    """Scores [T, N]: minus the distance from each token to each expert's mean live key row."""
    centroids = ctx.groups.centroids(ctx.keys.float())  # [N, d_model], follows fine-tuning
    return -torch.cdist(x, centroids)


mt.emoe.register_router("nearest_mean_key", nearest_mean_key)
print("routers:", mt.emoe.available_routers())

torch.manual_seed(0)
cfg = AutoConfig.for_model(
    "llama", hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=256
)
model = AutoModelForCausalLM.from_config(cfg)
data = [torch.tensor(list(s.encode()[:48])) for s in reference_sentences(32)]
batch = torch.nn.utils.rnn.pad_sequence(data, batch_first=True)

config = EMoEConfig(num_experts=16, top_k=4, router="nearest_mean_key")
handle = mt.apply(model, config)  # the same as mt.emoe.apply(model, config)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for _ in range(10):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
stats = next(iter(handle.routing_stats().values()))
print(f"after 10 steps: loss {loss.item():.3f}, expert-use entropy {stats.entropy:.3f}")

# the same selection, recomputed by hand from the public context: the router really decides
ffn = handle.layers[next(iter(handle.layers))].ffn
seen: dict[str, torch.Tensor] = {}
with mt.HookRegistry(model) as reg:
    reg.at(ffn.input_site, lambda q: seen.__setitem__("q", q.detach()), priority=mt.Priority.RECORD)
    reg.at(ffn.hidden_site, lambda h: seen.__setitem__("h", h.detach()), priority=mt.Priority.RECORD)
    model.eval()
    with torch.no_grad():
        routed = model(input_ids=batch).logits
q = seen["q"].reshape(-1, ffn.d_model).float()
labels = handle.labels()[ffn.path]
scores = -torch.cdist(q, torch.stack([ffn.keys.detach()[labels == j].mean(0) for j in range(16)]))
chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(4, dim=-1).indices, True)
active = torch.zeros_like(chosen).index_add_(1, labels, (seen["h"].reshape(-1, ffn.d_ff) != 0).to(torch.bool))
same = torch.equal(active, chosen)
print(f"experts active in the model = top-4 of the router recomputed by hand: {same} ({q.shape[0]} tokens)")
assert same

with tempfile.TemporaryDirectory() as tmp:
    folder = handle.save(Path(tmp) / "emoe")  # config (router="nearest_mean_key") + labels and centroids
    handle.remove()
    again = mt.load(model, folder)  # finds "nearest_mean_key" in the registry
    with torch.no_grad():
        err = float((model(input_ids=batch).logits - routed).abs().max())
    print(f"reloaded router {again.config.router!r}: max |logits(loaded) - logits(before save)| = {err:.1e}")
    assert err == 0.0
    again.remove()

# a router that returns the wrong shape is caught at its first call, with its name
mt.emoe.register_router("broken", lambda x, ctx, config: x.sum(-1))
broken = mt.emoe.apply(model, num_experts=16, top_k=4, router="broken")
try:
    model(input_ids=batch[:1])
except mt.ShapeError as e:
    print("ShapeError:", e)
broken.remove()
