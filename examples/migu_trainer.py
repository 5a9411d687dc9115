"""MIGU with the Hugging Face Trainer: one callback, no change to the training code.

``MIGUCallback`` applies MIGU to the trainer's model and optimizer when training begins, masks the
gradients right before every optimizer step (after gradient clipping) and removes itself when
training ends. A second callback here checks, at every step, that the output units MIGU masked kept
their weights exactly.

Run: python examples/migu_trainer.py   (needs transformers and accelerate: pip install "modulart[hf]")
"""

import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from modulart.migu import MIGUCallback
from modulart.text import topic_sentences

logging.set_verbosity_error()
torch.manual_seed(0)
cfg = AutoConfig.for_model(
    "llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
)
model = AutoModelForCausalLM.from_config(cfg)
rows = [torch.tensor(list(s.encode()[:48])) for s in topic_sentences()["compound"][:32]]
dataset = [{"input_ids": r, "labels": r} for r in rows if len(r) == 48]

migu = MIGUCallback(keep_ratio=0.3)


class MaskedRowsStandStill(TrainerCallback):
    """Snapshot the weights after MIGU masked the gradients; compare after the step."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.worst, self.steps = 0.0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # runs after MIGUCallback's
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        params = dict(model.named_parameters())
        for path, keep in migu.handle.masks().items():
            delta = (params[f"{path}.weight"].detach() - self.before[f"{path}.weight"]).abs().amax(dim=1)
            if (~keep).any():
                self.worst = max(self.worst, float(delta[~keep].max()))
        self.steps += 1


check = MaskedRowsStandStill()
with tempfile.TemporaryDirectory() as tmp:
    args = TrainingArguments(
        output_dir=tmp,
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[migu, check])
    result = trainer.train()
print(f"trained {result.global_step} steps, final training loss {result.training_loss:.3f}")
print("loss per logging step:", [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h])
stats = migu.handle.stats()  # the handle is removed at the end of training but stays readable
path = next(iter(stats))
print(
    f"{len(stats)} layers gated; {path}: kept {stats[path].kept_fraction:.2f} of units, Jaccard with the "
    f"previous step {stats[path].jaccard_prev:.2f}"
)
print(f"removed after training: {migu.handle.removed}; checked {check.steps} steps")
print(f"max |change of masked rows| over all steps = {check.worst:.1e}")
assert check.steps == 8 and check.worst == 0.0
