"""modulart.kv under the HF Trainer: the KV LoRA tensors are model parameters, so the Trainer trains them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modulart.kv
from families import tiny_llama as _tiny_llama

transformers = pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 8, length: int = 6, vocab: int = 100) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_every_kv_lora_tensor_and_no_base_weight(tmp_path: Path) -> None:
    model = _tiny_llama()
    handle = modulart.kv.apply(model, target="keys", mode="lora", rank=2)
    lora = {k: v.detach().clone() for k, v in handle.state_dict().items() if isinstance(v, torch.Tensor)}
    assert len(lora) == 4  # gate_proj of 2 layers, A and B
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if "modulart_kv_lora" not in k}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    after = handle.state_dict()
    changed = sorted(k for k, v in lora.items() if not torch.equal(v, after[k]))
    assert changed == sorted(lora), f"the Trainer trained {len(changed)} of {len(lora)} LoRA tensors"
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"model.layers.{i}.mlp.gate_proj.modulart_kv_lora.lora_{w}" for i in range(2) for w in "AB"}
    model.save_pretrained(tmp_path / "saved")  # save_pretrained sees them too
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert trained <= set(f.keys())
    handle.remove()
    assert sorted(model.state_dict()) == sorted(base)
