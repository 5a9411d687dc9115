"""Models and data for the patcher tests: a MiniLM classifier, tiny causal LMs, edit pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from families import _CAUSAL, build, minilm


class CLSClassifier(nn.Module):
    """A BERT encoder with a linear head on the [CLS] position: ``logits [B, n_classes]``."""

    def __init__(self, encoder: nn.Module, d_model: int, n_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(**inputs).last_hidden_state[:, 0])  # type: ignore[no-any-return]


@dataclass
class Setup:
    """A model, the task, memory batches and a few edit pairs it gets wrong."""

    model: nn.Module
    task: str
    memory: list[Any]
    edits: list[tuple[Any, Any]]
    probe: Any  # a batch to compare outputs on


_MINILM: tuple[nn.Module, Any] | None = None


def minilm_classifier() -> Setup:
    global _MINILM
    if _MINILM is None:
        _MINILM = minilm()
    enc, encode = _MINILM
    from modulart.text import reference_sentences

    sents = reference_sentences()
    model = CLSClassifier(enc, 384).eval()
    memory = [encode(sents[i : i + 32]) for i in range(0, 64, 32)]
    edits = []
    for s in sents[300:304]:
        x = encode([s])
        with torch.no_grad():
            pred = int(model(**x).argmax())
        edits.append((x, (pred + 1) % 3))
    return Setup(model, "classification", memory, edits, encode(sents[200:206]))


def causal_lm(name: str, seed: int = 0) -> Setup:
    """A tiny random causal LM of family ``name`` ('gpt2', 'llama', 'plain') with generation edits.

    HF models keep their own initialisation here (the large random weights of ``families.build``
    collapse a tiny GPT-2's hidden states: cosine 0.98 between unrelated positions, so no neuron could
    tell an edit from the memory).
    """
    if name == "plain":
        model = build(name, seed).model
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **_CAUSAL[name])).eval()
    g = torch.Generator().manual_seed(seed + 1)
    memory = [torch.randint(1, 100, (16, 8), generator=g)]

    def call(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(ids) if name == "plain" else model(input_ids=ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    edits = []
    for _ in range(3):
        prompt = torch.randint(100, 128, (6,), generator=g)
        greedy = int(call(prompt[None])[0, -1].argmax())
        first = int(torch.randint(0, 127, (1,), generator=g))
        target = torch.tensor([first + (first >= greedy), int(torch.randint(0, 128, (1,), generator=g))])
        edits.append((prompt, target))
    probe = torch.randint(1, 128, (3, 9), generator=g)
    return Setup(model, "generation", memory, edits, probe)


def outputs(setup: Setup, batch: Any | None = None) -> torch.Tensor:
    """The model's logits on ``batch`` (default: the probe), in eval mode without grad."""
    b = setup.probe if batch is None else batch
    with torch.no_grad():
        out = setup.model(b) if isinstance(b, torch.Tensor) and not _is_hf(setup.model) else _call(setup.model, b)
    return out if isinstance(out, torch.Tensor) else out.logits


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config")


def _call(model: nn.Module, b: Any) -> Any:
    if isinstance(b, torch.Tensor):
        return model(input_ids=b)
    return model(**b)
