"""The recipes of docs/distributed.md, run as written: each ``# recipe: <name>`` code block is
extracted from the page, a short harness is appended (it saves every rank's parameters), and the
script is launched on 2 CPU processes (gloo) with ``torchrun`` or ``accelerate launch``. Editing a
recipe in the doc changes what runs here, so a recipe that stops working fails this test.

The KV variant of each recipe replaces the MIGU apply line by the doc's ``# recipe: kv`` line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from distributed import free_port, max_difference, requires_gloo

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
MIGU_LINE = "handle = mt.migu.apply(model, keep_ratio=0.3)"
LAUNCHED = ("ddp", "fsdp2", "accelerate", "trainer", "trainer-kv")

HARNESS = """

# --- appended by tests/test_distributed_recipes.py: save what every rank holds -------------
import json as _json
import os as _os

import torch.distributed as _dist
from safetensors.torch import save_file as _save_file

_out = _os.environ["RECIPE_OUT"]
_rank, _world = _dist.get_rank(), _dist.get_world_size()
_params = {}
for _name, _p in model.named_parameters():
    _t = _p.detach()
    _params[_name] = (_t.full_tensor() if hasattr(_t, "full_tensor") else _t).contiguous().clone()
_neurons = {f"neurons/{k}": v.contiguous().clone() for k, v in getattr(handle, "neurons", {}).items()}
_save_file({**_params, **_neurons}, f"{_out}/rank{_rank}.safetensors")
_steps = sorted({s.steps for s in handle.stats().values()}) if hasattr(handle, "stats") else []
with open(f"{_out}/rank{_rank}.json", "w", encoding="utf-8") as _f:
    _json.dump({"world": _world, "operator": handle.operator.name, "steps": _steps}, _f)
_dist.barrier()
"""


def recipes() -> dict[str, str]:
    """Every ``# recipe: <name>`` python block of docs/distributed.md, by name."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    out: dict[str, str] = {}
    for block in blocks:
        first = block.split("\n", 1)[0]
        if first.startswith("# recipe: "):
            out[first.removeprefix("# recipe: ").strip()] = block
    return out


def _script(name: str, operator: str) -> str:
    code = recipes()[name]
    if operator == "kv" and name != "trainer-kv":
        kv_line = recipes()["kv"].splitlines()[1]
        assert code.count(MIGU_LINE + "  #") == 1 or code.count(MIGU_LINE + "\n") == 1, name
        code = code.replace(MIGU_LINE, kv_line, 1)
    return code + HARNESS


def test_the_doc_has_every_recipe_and_each_compiles() -> None:
    found = recipes()
    assert set(LAUNCHED) | {"kv"} <= set(found), sorted(found)
    for name in ("ddp", "fsdp2", "accelerate"):
        assert MIGU_LINE in found[name] and "handle.attach(opt)" in found[name], name
        compile(_script(name, "kv"), f"{name}-kv", "exec")
    assert "MIGUCallback" in found["trainer"]
    for name in LAUNCHED:
        compile(_script(name, "migu"), name, "exec")


def _launch(name: str, operator: str, tmp_path: Path) -> list[dict[str, Any]]:
    script = tmp_path / f"{name}-{operator}.py"
    script.write_text(_script(name, operator), encoding="utf-8")
    port = str(free_port())
    if name == "accelerate":
        pytest.importorskip("accelerate")
        launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launcher += ["--main_process_port", port]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    env = {**os.environ, "RECIPE_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [*launcher, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    from safetensors.torch import load_file

    ranks = []
    for r in range(2):
        values = json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8"))
        ranks.append({**values, "tensors": load_file(str(tmp_path / f"rank{r}.safetensors"))})
    return ranks


def _initial() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = AutoModelForCausalLM.from_config(config)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@requires_gloo
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "operator"),
    [(n, op) for n in ("ddp", "fsdp2", "accelerate") for op in ("migu", "kv")]
    + [("trainer", "migu"), ("trainer-kv", "kv")],
)
def test_recipe_runs_on_two_ranks_and_the_ranks_agree(tmp_path: Path, name: str, operator: str) -> None:
    pytest.importorskip("transformers")
    if name == "fsdp2":
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("no FSDP2")
    a, b = _launch(name, operator, tmp_path)
    assert a["world"] == b["world"] == 2 and a["operator"] == b["operator"] == operator
    assert max_difference(a["tensors"], b["tensors"]) == 0.0  # identical on both ranks
    start = _initial()
    trained = a["tensors"]
    changed = sorted(k for k, v in start.items() if not torch.equal(trained[k], v))
    assert any(".mlp." in k for k in changed), changed  # it trained
    if operator == "migu" and name != "trainer":
        assert a["steps"] == [3]  # MIGU masked every one of the 3 steps
    if operator == "kv":  # mode="mask": only the chosen key rows of the gate projections moved
        assert changed and all(k.endswith("mlp.gate_proj.weight") for k in changed), changed
        for layer in range(2):
            keep = trained[f"neurons/model.layers.{layer}.mlp"]
            name_ = f"model.layers.{layer}.mlp.gate_proj.weight"
            assert 0 < int(keep.sum()) < keep.numel()
            assert torch.equal(trained[name_][~keep], start[name_][~keep])
            assert not torch.equal(trained[name_][keep], start[name_][keep])
