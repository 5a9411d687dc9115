"""Artefacts saved from a PEFT-wrapped model load onto the merged model, and fingerprints see LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modulart as mt
from families import tiny_llama as _llama
from modulart.core.unwrap import unwrap_model

peft = pytest.importorskip("peft")


def _peft(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter: B is no longer zero, so merging changes the weights
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return wrapped.eval()


IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]])
def test_fingerprint_of_the_adapted_model_is_that_of_the_merged_model(targets: list[str]) -> None:
    wrapped = _peft(_llama(), targets)
    adapted = mt.fingerprint(unwrap_model(wrapped))
    merged = wrapped.merge_and_unload()
    assert mt.fingerprint(merged).diff(adapted) == []
    base = _llama()  # the same weights without the adapter's delta
    assert any("values differ" in d for d in mt.fingerprint(base).diff(adapted))


def test_an_artefact_saved_from_a_peft_model_loads_onto_the_merged_model(tmp_path: Path) -> None:
    wrapped = _peft(_llama(), ["q_proj", "v_proj"])
    handle = mt.emoe.apply(wrapped, num_experts=4, top_k=1, layers="all")
    assert handle.model is wrapped.base_model.model
    assert handle.plan.targets == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with torch.no_grad():
        routed = wrapped(input_ids=IDS).logits
    handle.save(tmp_path / "emoe")
    handle.remove()
    merged = wrapped.merge_and_unload()
    again = mt.load(merged, tmp_path / "emoe")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, routed, rtol=1e-5, atol=1e-5)
    again.remove()
    with pytest.raises(mt.IncompatibleArtifactError, match="values differ"):
        mt.load(_llama(), tmp_path / "emoe")  # the base model without the adapter is another model
