"""Grow a checkpoint from the command line: save a small Llama, run ``modulart grow``, load the result.

``modulart grow SRC DST --factor 2`` streams a safetensors checkpoint (sharded or not) tensor by
tensor into a deeper one (block i of the output copies source block plan[i]) and writes the config
to match, atomically. ``--operator zero`` makes the new blocks identities, so the grown model computes
exactly what the small one did; the default ``direct`` (G_stack) does not preserve the function.

Run: python examples/grow_cli.py   (needs transformers: pip install "modulart[hf]")
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

import modulart.stacking as st

logging.disable_progress_bar()
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

with tempfile.TemporaryDirectory() as tmp:
    src, stacked_dir, zero_dir = Path(tmp) / "small", Path(tmp) / "stacked", Path(tmp) / "zero"
    small.save_pretrained(src, max_shard_size="200KB")  # a sharded checkpoint, as big models come
    print("source shards:", len(list(src.glob("*.safetensors"))))

    def grow(*args: str) -> None:
        cmd = [sys.executable, "-m", "modulart", "grow", *args, "--no-progress"]
        print("$", "modulart", *cmd[3:])
        out = subprocess.run(cmd, capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip())
        assert out.returncode == 0, out.stderr

    grow(str(src), str(stacked_dir), "--factor", "2", "--max-shard-size", "300KB")  # G_stack: layers 0,1,0,1
    grow(str(src), str(zero_dir), "--factor", "2", "--operator", "zero")

    stacked = LlamaForCausalLM.from_pretrained(stacked_dir).eval()
    zero = LlamaForCausalLM.from_pretrained(zero_dir).eval()
    print("layers:", small.config.num_hidden_layers, "->", stacked.config.num_hidden_layers)
    in_memory = st.grow(small, st.LayerPlan.stack(num_layers=2, factor=2), operator="direct")
    batch = {"input_ids": ids}
    print("max |logits(CLI G_stack) - logits(in-memory G_stack)| =", st.function_difference(in_memory, stacked, batch))
    print("max |logits(CLI G_zero) - logits(small)| =", st.assert_function_preserved(small, zero, batch))
