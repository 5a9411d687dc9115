"""Grow a small Llama 2 -> 8 layers (G_stack and G_zero), its optimizer and its checkpoint on disk.

Run: python examples/grow_model.py   (needs transformers: pip install "modulart[hf]")
"""

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modulart.stacking as st

torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
)
small = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 256, (2, 16))

# train the small model a little (stand-in for the d tokens of gstack_schedule)
opt = torch.optim.AdamW(small.parameters(), lr=1e-3)
for _ in range(3):
    small(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()

plan = st.LayerPlan.stack(num_layers=2, factor=4)  # 0,1,0,1,0,1,0,1
stacked = st.grow(small, plan, operator="direct")  # G_stack: does not preserve the function
zero = st.grow(small, plan, operator="zero")  # new blocks are identities: preserves it
print("plan:", plan.describe(), "| layer_idx:", [b.self_attn.layer_idx for b in stacked.model.layers])
print("max |logits(G_stack) - logits(small)| =", st.function_difference(small, stacked, {"input_ids": ids}))
print("max |logits(G_zero) - logits(small)|  =", st.assert_function_preserved(small, zero, {"input_ids": ids}))

# generation with a KV cache works on the grown model (per-layer layer_idx re-indexed)
out = stacked.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
print("generated:", out[0, 4:].tolist())

# optimizer: the reference recipe resets it; "copy" / "zero_new" / "scaled" keep the moments
new_opt = st.grow_optimizer(opt, small, stacked, plan, policy="reset")
print("optimizer state entries after reset:", len(new_opt.state))

# the same growth on a sharded checkpoint, streamed tensor by tensor
with tempfile.TemporaryDirectory() as tmp:
    small.save_pretrained(Path(tmp) / "small", max_shard_size="200KB")
    st.grow_checkpoint(Path(tmp) / "small", Path(tmp) / "big", plan, max_shard_size="500KB", progress=False)
    big = LlamaForCausalLM.from_pretrained(Path(tmp) / "big").eval()
    print("max |checkpoint-grown - in-memory-grown| =", st.function_difference(stacked, big, {"input_ids": ids}))

sched = st.gstack_schedule(n_params=410e6, n_tokens=50e9, tokens_per_step=2**19)
print(
    f"G_stack guideline for 410M / 50B tokens: grow x{sched.growth_factor} after {sched.growth_tokens / 1e9:.2f}B "
    f"tokens ({sched.small_steps} steps), then lr {sched.grown_lr.peak} with {sched.grown_lr.warmup_steps} warmup"
)
