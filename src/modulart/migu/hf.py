"""Hugging Face ``Trainer`` integration of MIGU (imports transformers; ``modulart.migu`` does not).

Example:
    >>> from modulart.migu.hf import MIGUCallback
    >>> cb = MIGUCallback(keep_ratio=0.3)
    >>> cb.config.keep_ratio, cb.handle is None
    (0.3, True)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from modulart.core.errors import InvalidStateError
from modulart.core.types import JSONValue
from modulart.migu.config import MIGUConfig
from modulart.migu.handle import MIGUHandle
from modulart.migu.operator import MIGU, apply

__all__ = ["MIGUCallback"]


class MIGUCallback(TrainerCallback):  # type: ignore[misc]
    """Applies MIGU for the duration of ``Trainer.train()``.

    - ``on_train_begin``: applies MIGU to the trainer's model with the trainer's optimizer;
    - ``on_pre_optimizer_step``: :meth:`MIGUHandle.mask_` (in transformers 5 this event comes
      *after* gradient clipping, so the clip norm is computed on the unmasked gradients);
    - ``on_train_end``: removes MIGU again (the handle stays readable for ``stats()``).

    Args:
        config: a :class:`MIGUConfig` (or dict); keyword overrides win.
        use_attention_mask: read ``attention_mask`` from the model's forward kwargs as the token mask,
            so padding does not vote.
    """

    def __init__(
        self,
        config: MIGUConfig | Mapping[str, JSONValue] | None = None,
        /,
        *,
        use_attention_mask: bool = False,
        **overrides: object,
    ) -> None:
        self.config: MIGUConfig = MIGU.make_config(config, overrides)
        self.use_attention_mask = use_attention_mask
        self.handle: MIGUHandle | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not isinstance(model, nn.Module) or optimizer is None:
            raise InvalidStateError("MIGUCallback: the Trainer passed no model/optimizer to on_train_begin")
        if self.handle is not None and not self.handle.removed:
            self.handle.remove()
        handle = apply(model, self.config, optimizer=optimizer)
        if self.use_attention_mask:

            def grab(module: nn.Module, args: tuple[object, ...], kw: dict[str, object]) -> None:
                mask = kw.get("attention_mask")
                handle.set_token_mask(mask if isinstance(mask, torch.Tensor) else None)

            handle.registry.forward_pre(model, grab, with_kwargs=True, name="migu/attention_mask")
        self.handle = handle

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        if self.handle is not None and not self.handle.removed:
            self.handle.mask_()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        if self.handle is not None:
            self.handle.remove()
