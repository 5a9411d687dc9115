"""Sequential editing benchmarks: Transformer-Patcher vs fine-tuning the last FFN (FT-L), same run.

1. Classification on the real all-MiniLM-L6-v2: a linear head on [CLS] is trained (frozen encoder)
   to tell which of four parts of the Python language reference a sentence comes from
   (``pydoc_data.topics``; 40% of the sentences train the head). The remaining sentences are split by
   a hash into an edit pool and a locality test set; edits are the classifier's mistakes on the edit
   pool (target = the true part). Equivalent inputs are two deterministic rewritings of each
   sentence: (a) ``"Note that " + sentence`` with its first letter lower-cased, (b) the sentence
   without its final period followed by ``", as the reference says."``. Memory: the training
   sentences. Locality: TrainR on 300 training sentences, TestR on the locality test set.
2. Generation on a small causal LM (Llama, 2 layers) trained here from scratch on synthetic facts
   (``subject relation -> object``) rendered through three templates per relation, mixed with
   ordinary prose (word-level, the language reference). Edits change a fact's object (prompt of
   template 0); equivalent inputs are the other two templates.
   Memory: the prompts (all templates) of half of the untouched facts, and training prose.
   Locality: accuracy on untouched facts in the memory (TrainR-like) and not in it (TestR-like),
   and next-word accuracy on held-out prose.
3. Forward-time overhead of 1000 patches vs none (hooks) and baked, on both models.

Run: python benchmarks/editing.py [--quick] [--edits N]; writes benchmarks/results/editing.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modulart.patcher as mp
from modulart.patcher.demo import TopicClassifier, topic_dataset, train_head
from modulart.patcher.task import evaluate, make_example
from modulart.text import reference_sentences

RESULTS = Path(__file__).resolve().parent / "results"


def _h(s: str) -> float:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def rewrite(sentence: str) -> list[str]:
    """The two documented, deterministic rewritings used as equivalent inputs."""
    a = "Note that " + sentence[0].lower() + sentence[1:]
    b = sentence.rstrip(".") + ", as the reference says."
    return [a, b]


def compare(
    model: nn.Module,
    edits: list[mp.EditCase],
    sets: dict[str, Any],
    cfg: mp.PatcherConfig,
    memory: list[Any],
    finetune: dict[str, Any],
    log: Any,
) -> dict[str, Any]:
    """The same edit stream through the patcher and the FT-L baseline; their reports as dicts."""
    out: dict[str, Any] = {}
    for editor in ("patcher", "finetune"):
        t = time.perf_counter()
        rep = mp.sequential_edit(
            model, edits, sets, editor=editor, config=cfg, memory=memory,
            locality_every=max(1, len(edits) // 4), finetune=finetune,
        )  # fmt: skip
        log(rep.table() + f"\n  wall {time.perf_counter() - t:.0f} s")
        out[editor] = rep.to_dict() | {"wall_seconds": time.perf_counter() - t}
    return out


# --- 1. classification on MiniLM -----------------------------------------------------------------
def classification(n_edits: int, log: Any) -> dict[str, Any]:
    from modulart.tour import load_minilm

    bert, tok = load_minilm()

    def enc(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(texts, return_tensors="pt", padding=True))

    train, held = topic_dataset(test_fraction=0.6)
    pool = [(s, y) for s, y in held if _h("pool" + s) < 0.65]
    loc_test = [(s, y) for s, y in held if _h("pool" + s) >= 0.65]
    clf = TopicClassifier(bert, 384, 4).eval()
    train_acc = train_head(clf, enc, train)
    with torch.no_grad():
        preds = [int(clf(**enc([s])).argmax()) for s, _ in pool]
    mistakes = [(s, y) for (s, y), p in zip(pool, preds, strict=True) if p != y]
    log(f"classification: head train acc {train_acc:.3f}; {len(mistakes)} mistakes in a pool of {len(pool)}")
    edits = [
        mp.EditCase(enc([s]), y, equivalents=[enc([r]) for r in rewrite(s)], text=s) for s, y in mistakes[:n_edits]
    ]
    sets = {
        "train": [(enc([s]), y) for s, y in train[:300]],
        "test": [(enc([s]), y) for s, y in loc_test],
    }
    memory = [enc([s for s, _ in train[i : i + 64]]) for i in range(0, len(train), 64)]
    cfg = mp.PatcherConfig(task="classification")
    out: dict[str, Any] = {"train_accuracy": train_acc, "mistakes": len(mistakes), "pool": len(pool)}
    out |= compare(clf, edits, sets, cfg, memory, {"lr": 1e-4, "max_steps": 100}, log)
    out["overhead"] = overhead(clf, enc([s for s, _ in loc_test[:32]]), memory[0], "classification", log)
    return out


# --- 2. generation on a small LM trained on synthetic facts --------------------------------------
TEMPLATES = {
    "capital": ["the capital of {s} is", "{s} has its capital in the city of", "people in {s} call their capital"],
    "language": ["the language of {s} is", "in {s} people mostly speak", "the main tongue spoken in {s} is"],
}


def facts_lm(n_subjects: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    subjects = [f"land{i}" for i in range(n_subjects)]
    objects = {"capital": [f"city{i}" for i in range(40)], "language": [f"lang{i}" for i in range(20)]}
    facts = {(s, r): rng.choice(objects[r]) for s in subjects for r in TEMPLATES}
    prose = [" ".join(x.lower().rstrip(".").split()) for x in reference_sentences(1200, max_words=20)]
    counts: dict[str, int] = {}
    for p in prose:
        for w in p.split():
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= 3)
    vocab = ["<pad>", "<unk>", *sorted({w for t in TEMPLATES.values() for x in t for w in x.split() if w != "{s}"})]
    vocab += subjects + [o for r in objects.values() for o in r] + [w for w in words if w not in vocab]
    index = {w: i for i, w in enumerate(dict.fromkeys(vocab))}

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([index.get(w, 1) for w in text.split()])

    fact_lines = [t.format(s=s) + " " + o for (s, r), o in facts.items() for t in TEMPLATES[r]]
    prose_train = [p for p in prose if _h(p) < 0.8]
    prose_test = [p for p in prose if _h(p) >= 0.8]
    return {
        "facts": facts,
        "objects": objects,
        "ids": ids,
        "vocab": len(index),
        "train_lines": fact_lines + prose_train,
        "prose_test": prose_test,
    }


def train_lm(data: dict[str, Any], steps: int, log: Any, seed: int = 0) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=data["vocab"],
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    lines = [data["ids"](x) for x in data["train_lines"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = [lines[g.randrange(len(lines))] for _ in range(64)]
        width = max(len(b) for b in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, b in enumerate(batch):
            x[i, : len(b)], mask[i, : len(b)] = b, 1
        labels = x.masked_fill(mask == 0, -100)
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"  LM step {step}: loss {loss.item():.3f}")
    return model.eval()


def generation(n_edits: int, lm_steps: int, log: Any) -> dict[str, Any]:
    data = facts_lm(n_subjects=150)
    ids = data["ids"]
    t = time.perf_counter()
    model = train_lm(data, lm_steps, log)
    train_s = time.perf_counter() - t
    facts = list(data["facts"].items())
    rng = random.Random(1)
    rng.shuffle(facts)

    def pair(s: str, r: str, k: int, o: str) -> tuple[torch.Tensor, torch.Tensor]:
        return ids(TEMPLATES[r][k].format(s=s)), ids(o)

    known = [(s, r, o) for (s, r), o in facts]
    fact_pairs = [pair(s, r, 0, o) for s, r, o in known]
    right, _ = evaluate(model, [make_example(x, y, "generation") for x, y in fact_pairs], "generation")
    log(f"generation: LM trained in {train_s:.0f} s; fact accuracy (template 0) {float(right.float().mean()):.3f}")
    edited = known[:n_edits]
    edits = []
    for s, r, o in edited:
        new = rng.choice([x for x in data["objects"][r] if x != o])
        edits.append(mp.EditCase(*pair(s, r, 0, new), equivalents=[pair(s, r, k, new)[0] for k in (1, 2)]))
    ok = right.tolist()
    # untouched facts the model knows: half join the memory (TrainR-like), half stay out of it (TestR-like)
    untouched = [(s, r, o) for i, (s, r, o) in enumerate(known) if i >= n_edits and ok[i]]
    in_memory = [(s, r, o) for s, r, o in untouched if _h(s + r) < 0.5]
    held_out = [(s, r, o) for s, r, o in untouched if _h(s + r) >= 0.5]
    prose = []
    for line in data["prose_test"][:150]:
        w = ids(line)
        if len(w) >= 4:
            prose.append((w[:-1], w[-1:]))
    sets = {
        "facts_in_memory": [pair(s, r, 0, o) for s, r, o in in_memory[:200]],
        "facts_held_out": [pair(s, r, 0, o) for s, r, o in held_out[:200]],
        "prose": prose,
    }
    # memory: ordinary inputs = prompts (every template) of the in-memory facts + training prose
    memory = [ids(TEMPLATES[r][k].format(s=s))[None] for s, r, _ in in_memory for k in range(3)]
    memory += [ids(x)[None] for x in data["train_lines"][-300:] if len(x.split()) >= 2]
    cfg = mp.PatcherConfig(task="generation", memory_size=6000)
    out: dict[str, Any] = {"fact_accuracy": float(right.float().mean()), "lm_train_seconds": train_s}
    out |= compare(model, edits, sets, cfg, memory, {"lr": 1e-4, "max_steps": 100, "smoothing": 0.1}, log)
    batch = torch.stack([ids(TEMPLATES["capital"][0].format(s=f"land{i}")) for i in range(32)])
    out["overhead"] = overhead(model, batch, memory[0], "generation", log)
    return out


# --- 3. forward overhead of 1000 patches --------------------------------------------------------
def _time(fn: Any, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def overhead(model: nn.Module, batch: Any, memory: Any, task: str, log: Any, n: int = 1000) -> dict[str, float]:
    """Median forward time with ``n`` random, silent patches (hooks and baked) over the bare model."""

    def run() -> None:
        with torch.no_grad():
            model(**batch) if isinstance(batch, dict) else model(batch)

    p = mp.apply(model, task=task)
    d = p.ffn.d_model
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(n, d, generator=g) / d
    kw: dict[str, torch.Tensor] = {}
    if p.bank.gated:
        kw = {"up": torch.randn(n, d, generator=g) / d, "up_bias": torch.zeros(n)}
    p.bank.add(
        [f"r{i}" for i in range(n)],
        keys=keys,
        key_bias=torch.full((n,), -4.0),
        values=torch.randn(n, d, generator=g),
        **kw,
    )
    reps = 30
    times = {"bare": [], "hooks": [], "baked": []}
    for _ in range(3):  # interleave the three to spread machine noise
        with p.disabled():
            times["bare"].append(_time(run, reps))
        times["hooks"].append(_time(run, reps))
        p.bake()
        times["baked"].append(_time(run, reps))
        p.unbake()
    p.remove()
    bare = statistics.median(times["bare"])
    res = {
        "patches": n,
        "bare_ms": bare * 1e3,
        "hooks_ratio": statistics.median(times["hooks"]) / bare,
        "baked_ratio": statistics.median(times["baked"]) / bare,
    }
    log(
        f"  overhead of {n} patches: hooks {res['hooks_ratio']:.3f}x, baked {res['baked_ratio']:.3f}x "
        f"(bare {res['bare_ms']:.1f} ms)"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 edits per setting, a shorter LM training (CI)")
    ap.add_argument("--edits", type=int, default=100, help="sequential edits per setting (default 100)")
    ap.add_argument("--lm-steps", type=int, default=1500, help="training steps of the facts LM")
    ap.add_argument("--only", choices=("classification", "generation"), default=None)
    args = ap.parse_args(argv)
    n = 10 if args.quick else args.edits
    lm_steps = 300 if args.quick else args.lm_steps
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {"edits": n, "torch_threads": torch.get_num_threads()}
    if args.only in (None, "classification"):
        results["classification"] = classification(n, log)
    if args.only in (None, "generation"):
        results["generation"] = generation(n, lm_steps, log)
    RESULTS.mkdir(exist_ok=True)
    name = "editing" + (f"_{args.only}" if args.only else "") + ("_quick" if args.quick else "") + ".json"
    (RESULTS / name).write_text(json.dumps(results, indent=2, default=float))
    log(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
