"""A small honest classification task on the real MiniLM, and the patcher step of ``modulart tour``.

The task: which part of the Python language reference a sentence comes from (``pydoc_data.topics``,
shipped with CPython), four classes of topics. The classifier is the pretrained all-MiniLM-L6-v2
encoder with a linear head on the [CLS] position, the head trained on frozen features.

Example:
    >>> from modulart.patcher.demo import topic_dataset, TOPIC_CLASSES
    >>> train, test = topic_dataset()
    >>> len(TOPIC_CLASSES), len(train) > 600, len(test) > 150
    (4, True, True)
    >>> sorted({y for _, y in train})
    [0, 1, 2, 3]
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["TOPIC_CLASSES", "TopicClassifier", "patcher_tour_step", "topic_dataset", "train_head"]

TOPIC_CLASSES: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del",
        "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise", "return",
        "try", "while", "with", "yield",
    ),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
        "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "floating", "imaginary",
        "in", "integers", "lambda", "lists", "numbers", "operator-summary", "power", "shifting",
        "slicings", "subscriptions", "truth", "unary",
    ),
    "data model": (
        "attribute-access", "callable-types", "context-managers", "customization", "numeric-types",
        "objects", "sequence-types", "specialattrs", "specialnames", "types", "typesfunctions",
        "typesmapping", "typesmethods", "typesmodules", "typesseq", "typesseq-mutable",
    ),
    "strings and execution": (
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
        "debugger", "dynamic-features", "exceptions", "execmodel", "formatstrings", "id-classes",
        "identifiers", "naming", "string-methods", "strings",
    ),
}  # fmt: skip


def topic_dataset(test_fraction: float = 0.2) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, test)`` lists of ``(sentence, class)``; the split is a deterministic hash of the sentence."""
    from modulart.text import topic_sentences

    by_topic = topic_sentences()
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, topics in enumerate(TOPIC_CLASSES.values()):
        for topic in topics:
            for s in by_topic.get(topic, []):
                bucket = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
                (test if bucket < test_fraction else train).append((s, label))
    return train, test


class TopicClassifier(nn.Module):
    """A BERT-style encoder and a linear head on the [CLS] position: ``logits [B, n_classes]``."""

    def __init__(self, encoder: nn.Module, d_model: int, n_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(d_model, n_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_classes, d_model, generator=g) * d_model**-0.5)
            self.head.bias.zero_()

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """``[B, d_model]`` encoder output at [CLS]."""
        out: torch.Tensor = self.encoder(**inputs).last_hidden_state[:, 0]
        return out

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(**inputs))  # type: ignore[no-any-return]


@torch.no_grad()
def _features(
    model: TopicClassifier, encode: Callable[[list[str]], dict[str, torch.Tensor]], texts: Sequence[str]
) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(**encode(list(texts[i : i + 64]))) for i in range(0, len(texts), 64)])


def train_head(
    model: TopicClassifier,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    data: Sequence[tuple[str, int]],
    *,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
) -> float:
    """Fit the head on frozen [CLS] features of ``data`` (full-batch Adam); returns the train accuracy."""
    feats = _features(model, encode, [s for s, _ in data])
    labels = torch.tensor([y for _, y in data])
    opt = torch.optim.Adam(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model.head(feats), labels)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
    with torch.no_grad():
        return float((model.head(feats).argmax(-1) == labels).float().mean())


def patcher_tour_step(
    bert: nn.Module,
    tokenizer: Any,
    echo: Callable[[str], None],
    *,
    train_stride: int = 2,
    test_size: int = 120,
) -> dict[str, Any]:
    """Fix one mistake of a MiniLM topic classifier with one patch neuron, show locality, remove it.

    The head is trained on every ``train_stride``-th training sentence (which also form the
    patcher's memory) and evaluated on ``test_size`` evenly spaced test sentences.
    """
    from modulart.core.ffn import find_ffns
    from modulart.patcher.operator import apply
    from modulart.patcher.task import evaluate, make_example

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64))

    train, test = topic_dataset()
    # keep the tour short: evenly spaced subsets, so that every class is in both
    train, test = train[::train_stride], test[:: max(1, len(test) // test_size)][:test_size]
    clf = TopicClassifier(bert, find_ffns(bert)[-1].d_model, len(TOPIC_CLASSES)).eval()
    train_acc = train_head(clf, encode, train)
    names = list(TOPIC_CLASSES)
    pairs = [(encode([s]), y) for s, y in test]
    examples = [make_example(x, y, "classification") for x, y in pairs]
    right, before = evaluate(clf, examples, "classification")
    echo(
        f"  classifier: MiniLM [CLS] + linear head over {len(names)} parts of the language reference; "
        f"train acc {train_acc:.2f}, test acc {float(right.float().mean()):.2f} ({len(test)} sentences)"
    )
    wrong = int((~right).nonzero()[0])
    sentence, label = test[wrong]
    echo(f'  mistake: "{sentence[:90]}..." -> {names[int(before[wrong])]!r}, truth {names[label]!r}')
    patcher = apply(clf, task="classification")
    try:
        patcher.set_memory([encode([s for s, _ in train[i : i + 64]]) for i in range(0, len(train), 64)])
        n_memory = patcher.memory.shape[0] if patcher.memory is not None else 0
        start = time.perf_counter()
        result = patcher.edit(*pairs[wrong], text=sentence, target_text=names[label])
        seconds = time.perf_counter() - start
        after_right, after = evaluate(clf, examples, "classification")
        others = [i for i in range(len(test)) if i != wrong]
        unchanged = sum(bool(torch.equal(after[i], before[i])) for i in others) / len(others)
        acc_before = float(right[others].float().mean())
        acc_after = float(after_right[others].float().mean())
        m = result.margins[0] if result.margins else {"edit_activation": float("nan"), "max_memory_activation": 0.0}
        echo(
            f"  patched {patcher.ffn.path} with {len(result.patch_ids)} neuron in {result.steps} steps "
            f"({seconds:.1f} s): now {names[int(after[wrong])]!r}; pre-activation {m['edit_activation']:.1f} on "
            f"the edit, at most {m['max_memory_activation']:.1f} on the {n_memory} "
            "memory sentences"
        )
        echo(
            f"  locality on the other {len(others)} test sentences: accuracy {acc_before:.3f} -> {acc_after:.3f}, "
            f"predictions unchanged {unchanged:.1%}"
        )
        patcher.remove_patch(result.patch_ids)
        _, restored = evaluate(clf, examples, "classification")
        same = all(torch.equal(a, b) for a, b in zip(restored, before, strict=True))
        echo(f"  removed the patch: all {len(test)} predictions back to the original ones: {same}")
    finally:
        patcher.remove()
    return {
        "train_accuracy": train_acc,
        "test_accuracy": float(right.float().mean()),
        "fixed": bool(after_right[wrong]),
        "steps": result.steps,
        "locality_accuracy": (acc_before, acc_after),
        "unchanged": unchanged,
        "restored": same,
    }
