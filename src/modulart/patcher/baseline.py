"""The paper's baseline editor: plain fine-tuning of one FFN's own weights on each edit (FT-L).

Only the chosen FFN's parameters (keys, up, values and their biases) train, with Adam, on the edit
alone, until the edit is right or ``max_steps`` is reached; ``remove()`` restores the weights
exactly. It has the same ``edit`` interface as :class:`~modulart.patcher.PatcherHandle`, so
:func:`~modulart.patcher.sequential_edit` can compare the two in one run.

Example:
    >>> import torch
    >>> from modulart.patcher.baseline import FineTuneEditor
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Embedding(20, 8),
    ...     torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)),
    ...     torch.nn.Flatten(), torch.nn.Linear(24, 3))
    >>> ft = FineTuneEditor(model, task="classification", lr=1e-2)
    >>> x = torch.tensor([1, 2, 3])
    >>> target = (int(model(x[None]).argmax()) + 1) % 3
    >>> ft.edit(x, target).success
    True
    >>> ft.remove(); int(model(x[None]).argmax()) == target
    False
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from modulart.patcher.layer import resolve_ffn
from modulart.patcher.records import EditResult
from modulart.patcher.task import Inputs, correct, make_example, per_example_loss, run_model

__all__ = ["FineTuneEditor"]


class FineTuneEditor:
    """Fine-tune one FFN's weights on each edit (the baseline of arXiv 2301.09785).

    Args:
        model: the model (edited in place; :meth:`remove` restores it).
        layer: which FFN (``'last'``, index or path).
        task: ``'classification'`` or ``'generation'``.
        lr: Adam learning rate; max_steps: step cap per edit; smoothing: label smoothing.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: Any = "last",
        task: str = "classification",
        lr: float = 1e-3,
        max_steps: int = 100,
        smoothing: float = 0.0,
    ) -> None:
        self.model, self.task, self.lr, self.max_steps, self.smoothing = model, task, lr, max_steps, smoothing
        self.ffn = resolve_ffn(model, layer)
        self.params = list(dict.fromkeys(self.ffn.parameters().values()))
        self._saved = [p.detach().clone() for p in self.params]
        self._n = 0

    def edit(
        self, inputs: Inputs, target: Any, *, text: str | None = None, target_text: str | None = None
    ) -> EditResult:
        """Train the FFN on this one example until it is right (or ``max_steps``)."""
        ex = make_example(inputs, target, self.task)
        batch = dict(ex.inputs)
        self._n += 1
        eid = f"ft{self._n:06d}"
        start = time.perf_counter()
        flags = {id(p): p.requires_grad for p in self.model.parameters()}
        was = self.model.training
        self.model.eval()
        opt = torch.optim.Adam(self.params, lr=self.lr)
        losses: list[float] = []
        ok = False
        steps = 0
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for t in self.params:
                t.requires_grad_(True)
            for steps in range(self.max_steps + 1):
                logits = run_model(self.model, batch, ex.positional)
                ok = bool(correct(logits.detach(), [ex], self.task)[0])
                if ok or steps == self.max_steps:
                    break
                loss = per_example_loss(logits, [ex], self.task, self.smoothing).sum()
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            self.model.train(was)
            for p in self.model.parameters():
                p.requires_grad_(flags[id(p)])
        skipped = ok and steps == 0
        return EditResult(eid, [], ok, skipped, steps, [], losses, time.perf_counter() - start)

    def remove(self) -> None:
        """Restore the FFN's original weights exactly."""
        with torch.no_grad():
            for p, saved in zip(self.params, self._saved, strict=True):
                p.copy_(saved)
