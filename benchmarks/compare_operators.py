"""Operator comparison: every operator on the same continual-learning and the same editing data, over seeds.

Three settings, each repeated over ``--seeds`` seeds (default 5) and reported as mean ± the 95%
Student-t interval (``mean ± t_{0.975, n-1} · sd / sqrt(n)``); a claim is tested on the paired
per-seed differences (same seed = same initial model and data for both methods):

1. **Continual learning** (the data of ``benchmarks/continual.py``): a byte-level 3-layer Llama is
   trained on a base domain, then on three real-text tasks in sequence (language-reference prose,
   the ``email`` package's source, ``unittest``'s source). After every task it is evaluated on every
   task; reported: final average accuracy and loss, and backward transfer
   ``BWT = mean_j<last (m[last][j] - m[j][j])`` (accuracy: negative = forgetting; loss: positive =
   forgetting). Methods: ``full`` (plain fine-tuning), ``migu``, ``kv_keys``, ``kv_values``, ``emoe``
   (the patcher adds neurons per edit, it is not a training method, so it is only in setting 2).
2. **Sequential editing** (the facts LM of ``benchmarks/editing.py``): a 2-layer Llama trained here
   on synthetic facts rendered through three templates plus language-reference prose; ``--edits``
   facts get a new object, one edit after the other (prompt of template 0; the other two templates
   are the equivalent inputs). Editors: ``patcher`` (Transformer-Patcher), ``ft_l`` (its paper's
   baseline: fine-tune the last FFN), and the same edit loop (Adam, until the edit is right or
   ``--edit-steps`` steps) with each operator: ``full`` (all weights), ``migu``, ``kv_keys``,
   ``kv_values``, ``emoe``. Reported: final edit retention and generalisation (on the final model),
   and locality (accuracy relative to the unedited model) on held-out facts and on prose.
3. **Growth** (the protocol of ``benchmarks/growth_pretrain.py``, smaller): a 2-layer Llama trained
   for ``d`` steps, grown x4 with G_stack (``operator='direct'``) and trained to ``T`` steps, against
   an 8-layer model trained from scratch on the same batches for ``T`` steps at two peak LRs (the
   better one is the target). Reported: tokens the grown model needs to reach the scratch model's
   final loss, the speedup, and the final-loss difference at equal tokens.

Claims checked against the intervals (written into the JSON and into ``docs/benchmarks.md``):
MIGU forgets less than plain fine-tuning (arXiv 2406.17245); G_stack reaches the scratch model's
loss with fewer tokens (arXiv 2405.15319).

Run:  OMP_NUM_THREADS=1 python benchmarks/compare_operators.py           (16.5 min measured, 1 thread, busy CPU)
      OMP_NUM_THREADS=1 python benchmarks/compare_operators.py --quick   (CI size, about 15 s)
Writes ``benchmarks/results/compare_operators[_quick].json`` (or ``--out``); render the docs page
with ``python scripts/gen_benchmarks_doc.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import continual
import editing
import growth_pretrain as gp

import modulart as mt
import modulart.patcher as mp
from modulart.patcher.records import EditResult
from modulart.patcher.task import Inputs, correct, evaluate, make_example, per_example_loss, run_model

RESULTS = Path(__file__).resolve().parent / "results"
CONTINUAL_METHODS = ("full", "migu", "kv_keys", "kv_values", "emoe")
EDITORS = ("patcher", "ft_l", "full", "migu", "kv_keys", "kv_values", "emoe")

# sizes: the full run took 16.5 min on one thread of a shared 2-core machine (load average ~3)
FULL = {
    "continual": {"batch": 8, "seq": 64, "steps": 40, "base_steps": 80, "eval_bytes": 32 * 128 + 1},
    "editing": {"subjects": 80, "lm_steps": 200, "edits": 10, "edit_steps": 100, "memory_size": 400},
    "growth": {"d_model": 64, "seq": 64, "batch": 16, "T": 100},
}
QUICK = {
    "continual": {"batch": 2, "seq": 32, "steps": 3, "base_steps": 3, "eval_bytes": 4 * 128 + 1},
    "editing": {"subjects": 20, "lm_steps": 15, "edits": 2, "edit_steps": 5, "memory_size": 32, "patcher_max_steps": 5},
    "growth": {"d_model": 32, "seq": 32, "batch": 4, "T": 8},
}


# --- statistics -----------------------------------------------------------------------------------
def interval(xs: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval of ``xs`` (half-width ``t_{0.975, n-1} sd / sqrt(n)``)."""
    vals = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "half_width": None, "low": None, "high": None}
    mean = statistics.fmean(vals)
    if n == 1:
        return {"n": 1, "mean": mean, "half_width": None, "low": None, "high": None}
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * statistics.stdev(vals) / math.sqrt(n)
    return {"n": n, "mean": mean, "half_width": half, "low": mean - half, "high": mean + half}


def verdict(diff: dict[str, Any], better: str) -> str:
    """``supported`` / ``reversed`` / ``within noise`` for a paired-difference interval.

    ``better`` is ``'positive'`` when the claim says the difference is > 0, ``'negative'`` when < 0.
    """
    if diff["low"] is None or diff["high"] is None:
        return "not enough seeds"
    sign = 1.0 if better == "positive" else -1.0
    lo, hi = sorted((sign * diff["low"], sign * diff["high"]))
    if lo > 0:
        return "supported"
    if hi < 0:
        return "reversed"
    return "within noise"


# --- 1. continual learning -----------------------------------------------------------------------
def _train(
    model: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, steps: int, size: dict[str, int], seed: int
) -> None:
    """``continual._train`` with the batch size and training window length of ``size``."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = size["batch"], size["seq"]
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        ids = torch.stack([data[s : s + seq] for s in starts.tolist()])
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def continual_seed(seed: int, size: dict[str, int], data: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    base = continual._model(seed)
    opt = torch.optim.AdamW(base.parameters(), lr=continual.LR, weight_decay=0.01)
    _train(base, opt, data["base"][0], size["base_steps"], size, seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    tasks = ["prose", "email", "unittest"]
    out: dict[str, Any] = {}
    for name in CONTINUAL_METHODS:
        t0 = time.perf_counter()
        model = continual._model(seed)
        model.load_state_dict(state)
        opt, boundary, finish = continual.METHODS[name](model)
        losses, accs = [], []
        for i, task in enumerate(tasks):
            _train(model, opt, data[task][0], size["steps"], size, seed * 100 + i)
            boundary()
            row = [continual._evaluate(model, data[t][1][: size["eval_bytes"]]) for t in tasks]
            losses.append([r[0] for r in row])
            accs.append([r[1] for r in row])
        finish()
        last = len(tasks) - 1
        out[name] = {
            "acc": accs,
            "loss": losses,
            "final_avg_acc": statistics.fmean(accs[last]),
            "final_avg_loss": statistics.fmean(losses[last]),
            "bwt_acc": statistics.fmean(accs[last][j] - accs[j][j] for j in range(last)),
            "bwt_loss": statistics.fmean(losses[last][j] - losses[j][j] for j in range(last)),
            "seconds": time.perf_counter() - t0,
        }
        r = out[name]
        log(
            f"  continual seed {seed} {name:>9}: final acc {r['final_avg_acc']:.4f} BWT acc {r['bwt_acc']:+.4f} "
            f"BWT loss {r['bwt_loss']:+.4f} ({r['seconds']:.0f} s)"
        )
    return out


def continual_setting(seeds: int, size: dict[str, int], log: Callable[[str], None]) -> dict[str, Any]:
    data = {k: continual._split(v) for k, v in continual._domains().items()}
    runs = [continual_seed(s, size, data, log) for s in range(seeds)]
    metrics = ("final_avg_acc", "final_avg_loss", "bwt_acc", "bwt_loss")
    summary = {m: {k: interval([r[m][k] for r in runs]) for k in metrics} for m in CONTINUAL_METHODS}
    diffs = {
        m: {k: interval([r[m][k] - r["full"][k] for r in runs]) for k in metrics}
        for m in CONTINUAL_METHODS
        if m != "full"
    }
    # "MIGU forgets less": BWT(acc) higher (less negative) and BWT(loss) lower than plain fine-tuning
    claims = [
        {
            "claim": "MIGU forgets less than plain fine-tuning (backward transfer of accuracy)",
            "paper": "arXiv 2406.17245",
            "quantity": "bwt_acc(migu) - bwt_acc(full)",
            "interval": diffs["migu"]["bwt_acc"],
            "verdict": verdict(diffs["migu"]["bwt_acc"], "positive"),
        },
        {
            "claim": "MIGU forgets less than plain fine-tuning (backward transfer of loss)",
            "paper": "arXiv 2406.17245",
            "quantity": "bwt_loss(migu) - bwt_loss(full)",
            "interval": diffs["migu"]["bwt_loss"],
            "verdict": verdict(diffs["migu"]["bwt_loss"], "negative"),
        },
    ]
    return {
        "size": size,
        "methods": list(CONTINUAL_METHODS),
        "summary": summary,
        "paired_vs_full": diffs,
        "claims": claims,
        "runs": runs,
    }


# --- 2. sequential editing -----------------------------------------------------------------------
class OperatorEditor:
    """Edit by training the model with one operator applied: Adam until the edit is right.

    ``method`` is one of ``full`` (every weight), ``migu`` (magnitude-gated updates, keep 0.3; each
    edit is a task), ``kv_keys`` / ``kv_values`` (only the FFN keys / values train), ``emoe`` (EMoE
    masks on every FFN, N = 8, k = 2). :meth:`remove` removes the operator and restores every weight.
    """

    def __init__(self, model: nn.Module, method: str, *, task: str, lr: float, max_steps: int) -> None:
        self.model, self.method, self.task, self.lr, self.max_steps = model, method, task, lr, max_steps
        self._saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._flags = {id(p): p.requires_grad for p in model.parameters()}
        self._n = 0
        self._boundary: Callable[[], None] = lambda: None
        self._remove: Callable[[], None] = lambda: None
        if method == "emoe":
            self._remove = mt.emoe.apply(model, num_experts=8, top_k=2, layers="all").remove
        if method in ("kv_keys", "kv_values"):
            import modulart.kv

            handle = modulart.kv.apply(model, target=method.removeprefix("kv_"), mode="full")
            self._remove = handle.remove
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        if method == "migu":
            import modulart.migu

            handle = modulart.migu.apply(model, keep_ratio=0.3, optimizer=self.opt)
            self._boundary, self._remove = handle.task_boundary, handle.remove

    def edit(
        self, inputs: Inputs, target: Any, *, text: str | None = None, target_text: str | None = None
    ) -> EditResult:
        ex = make_example(inputs, target, self.task)
        batch = dict(ex.inputs)
        self._n += 1
        start = time.perf_counter()
        self.opt.state.clear()  # fresh Adam moments per edit, as the FT-L baseline
        was = self.model.training
        self.model.eval()
        losses: list[float] = []
        ok, steps = False, 0
        try:
            for steps in range(self.max_steps + 1):
                logits = run_model(self.model, batch, ex.positional)
                ok = bool(correct(logits.detach(), [ex], self.task)[0])
                if ok or steps == self.max_steps:
                    break
                loss = per_example_loss(logits, [ex], self.task, 0.0).sum()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                losses.append(float(loss.detach()))
        finally:
            self.model.train(was)
        self._boundary()
        return EditResult(f"{self.method}{self._n:06d}", [], ok, ok and steps == 0, steps, [], losses,
                          time.perf_counter() - start)  # fmt: skip

    def remove(self) -> None:
        self._remove()
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self._saved[k])
        for p in self.model.parameters():
            p.requires_grad_(self._flags.get(id(p), True))


def editing_seed(seed: int, size: dict[str, int], log: Callable[[str], None]) -> dict[str, Any]:
    """One seed: facts and LM init from ``seed``, an edit stream of ``size['edits']`` new objects."""
    data = editing.facts_lm(n_subjects=size["subjects"], seed=seed)
    ids = data["ids"]
    t0 = time.perf_counter()
    model = editing.train_lm(data, size["lm_steps"], lambda _: None, seed=seed)
    lm_s = time.perf_counter() - t0
    log(f"  editing seed {seed}: facts LM trained in {lm_s:.0f} s")
    facts = list(data["facts"].items())
    rng = random.Random(1000 + seed)
    rng.shuffle(facts)

    def pair(s: str, r: str, k: int, o: str) -> tuple[torch.Tensor, torch.Tensor]:
        return ids(editing.TEMPLATES[r][k].format(s=s)), ids(o)

    known = [(s, r, o) for (s, r), o in facts]
    right, _ = evaluate(model, [make_example(*pair(s, r, 0, o), "generation") for s, r, o in known],
                                "generation")  # fmt: skip
    ok = right.tolist()
    log(f"  editing seed {seed}: fact accuracy (template 0) {float(right.float().mean()):.3f}")
    n = size["edits"]
    edits = []
    for s, r, o in known[:n]:
        new = rng.choice([x for x in data["objects"][r] if x != o])
        edits.append(mp.EditCase(*pair(s, r, 0, new), equivalents=[pair(s, r, k, new)[0] for k in (1, 2)]))
    untouched = [(s, r, o) for i, (s, r, o) in enumerate(known) if i >= n and ok[i]]
    in_memory = [x for x in untouched if editing._h(x[0] + x[1]) < 0.5]
    held_out = [x for x in untouched if editing._h(x[0] + x[1]) >= 0.5]
    prose = []
    for line in data["prose_test"][:100]:
        w = ids(line)
        if len(w) >= 4:
            prose.append((w[:-1], w[-1:]))
    sets = {
        "facts_held_out": [pair(s, r, 0, o) for s, r, o in held_out[:100]] or [pair(*known[-1][:2], 0, known[-1][2])],
        "prose": prose,
    }
    memory = [ids(editing.TEMPLATES[r][k].format(s=s))[None] for s, r, _ in in_memory for k in range(3)]
    memory += [ids(x)[None] for x in data["train_lines"][-200:] if len(x.split()) >= 2]
    memory = memory[: size["memory_size"]]
    caps = {"max_steps": size["patcher_max_steps"]} if "patcher_max_steps" in size else {}
    cfg = mp.PatcherConfig(task="generation", memory_size=size["memory_size"], **caps)
    lr, max_steps = 1e-4, size["edit_steps"]
    out: dict[str, Any] = {"fact_accuracy": float(right.float().mean()), "lm_train_seconds": lm_s}
    for name in EDITORS:
        t = time.perf_counter()
        if name == "patcher":
            rep = mp.sequential_edit(model, edits, sets, editor="patcher", config=cfg, memory=memory)
        elif name == "ft_l":
            rep = mp.sequential_edit(model, edits, sets, editor="finetune", config=cfg,
                                     finetune={"lr": lr, "max_steps": max_steps})  # fmt: skip
        else:

            def make(m: nn.Module, name: str = name) -> OperatorEditor:
                return OperatorEditor(m, name, task="generation", lr=lr, max_steps=max_steps)

            rep = mp.sequential_edit(model, edits, sets, editor=make, config=cfg)
        d = rep.to_dict()
        out[name] = {
            "attempted": d["attempted"],
            "right_after": d["right_after"],
            "final": d["final"],
            "locality": d["locality"],
            "seconds_per_edit": d["seconds_per_edit"],
            "steps_per_edit": d["steps_per_edit"],
            "neurons_added": d["neurons_added"],
            "wall_seconds": time.perf_counter() - t,
        }
        r = out[name]
        log(
            f"  editing seed {seed} {name:>9}: retain {r['final']['edit_retain']:.3f} "
            f"gen {r['final']['generalisation']:.3f} loc(held-out facts) "
            f"{r['locality']['facts_held_out']['ratio']:.3f} loc(prose) {r['locality']['prose']['ratio']:.3f} "
            f"({r['wall_seconds']:.0f} s)"
        )
    return out


def editing_setting(seeds: int, size: dict[str, int], log: Callable[[str], None]) -> dict[str, Any]:
    runs = [editing_seed(s, size, log) for s in range(seeds)]
    pick: dict[str, Callable[[dict[str, Any]], float]] = {
        "success_right_after": lambda r: r["right_after"]["success"],
        "edit_retain_final": lambda r: r["final"]["edit_retain"],
        "generalisation_final": lambda r: r["final"]["generalisation"],
        "locality_facts": lambda r: r["locality"]["facts_held_out"]["ratio"],
        "locality_prose": lambda r: r["locality"]["prose"]["ratio"],
        "seconds_per_edit": lambda r: r["seconds_per_edit"],
    }
    summary = {e: {k: interval([f(r[e]) for r in runs]) for k, f in pick.items()} for e in EDITORS}
    summary_meta = {"fact_accuracy": interval([r["fact_accuracy"] for r in runs])}
    return {"size": size, "editors": list(EDITORS), "summary": summary, "lm": summary_meta, "runs": runs}


# --- 3. growth -----------------------------------------------------------------------------------
def growth_seed(seed: int, size: dict[str, int], corpus: Any, log: Callable[[str], None]) -> dict[str, Any]:
    import modulart.stacking as st

    d_model, seq, batch, T = size["d_model"], size["seq"], size["batch"], size["T"]
    train_data, val_data = corpus
    batches = gp.Batches(train_data, batch, seq, seed)
    val = [gp.Batches(val_data, batch, seq, seed + 1)(i) for i in range(4)]
    tps = batch * seq
    d_steps = max(1, T // 4)
    eval_every = max(1, T // 20)
    warm = max(1, T // 20)
    scratch: dict[str, float] = {}
    for lr in (1e-3, 3e-3):
        model = gp.make_model(8, d_model, seq, seed)
        curve, _ = gp.train(model, batches, range(T), lr, warm, val, eval_every, tps, 0)
        scratch[f"{lr:g}"] = curve[-1][1]
    best_lr = min(scratch, key=lambda k: scratch[k])
    target = scratch[best_lr]
    small = gp.make_model(2, d_model, seq, seed + 7)
    _, small_opt = gp.train(small, batches, range(d_steps), 3e-3, warm, val, eval_every, tps, 0)
    plan = st.LayerPlan.stack(2, 4)
    big = st.grow(small, plan, operator="direct", seed=seed)
    opt = st.grow_optimizer(small_opt, small, big, plan, policy="reset")
    curve, _ = gp.train(big, batches, range(d_steps, T), float(best_lr), warm, val, eval_every, tps,
                        d_steps * tps, optimizer=opt)  # fmt: skip
    reach = gp.tokens_to_reach(curve, target)
    out = {
        "scratch_final_loss": scratch,
        "best_lr": float(best_lr),
        "gstack_final_loss": curve[-1][1],
        "final_loss_diff": curve[-1][1] - target,
        "tokens_to_scratch_loss": reach,
        "speedup_pct": None if reach is None else 100 * (T * tps / reach - 1),
        "total_tokens": T * tps,
    }
    speed = "not reached" if reach is None else f"{100 * (T * tps / reach - 1):.1f}%"
    log(f"  growth seed {seed}: scratch {target:.4f} (lr {best_lr}), G_stack {curve[-1][1]:.4f}, speedup {speed}")
    return out


def growth_setting(seeds: int, size: dict[str, int], log: Callable[[str], None]) -> dict[str, Any]:
    corpus = gp.corpus()
    runs = [growth_seed(s, size, corpus, log) for s in range(seeds)]
    diff = interval([r["final_loss_diff"] for r in runs])
    reached = [r["speedup_pct"] for r in runs if r["speedup_pct"] is not None]
    claims = [
        {
            "claim": "G_stack reaches the scratch model's loss with fewer tokens "
            "(final loss of the grown model minus the scratch model's, at equal tokens)",
            "paper": "arXiv 2405.15319",
            "quantity": "final_loss(G_stack) - final_loss(scratch)",
            "interval": diff,
            "reached": f"{len(reached)} of {len(runs)}",
            "verdict": verdict(diff, "negative"),
        }
    ]
    return {
        "size": size | {"d_steps": max(1, size["T"] // 4), "small_layers": 2, "factor": 4},
        "summary": {
            "scratch_final_loss": interval([min(r["scratch_final_loss"].values()) for r in runs]),
            "gstack_final_loss": interval([r["gstack_final_loss"] for r in runs]),
            "final_loss_diff": diff,
            "speedup_pct_where_reached": interval(reached),
            "reached": len(reached),
        },
        "claims": claims,
        "runs": runs,
    }


# --- driver --------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "modulart": mt.__version__,
    }


SETTINGS = {"editing": editing_setting, "continual": continual_setting, "growth": growth_setting}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size (2 seeds, a few steps): checks the pipeline only")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 5; 2 with --quick)")
    ap.add_argument("--only", choices=tuple(SETTINGS), action="append", help="run only this setting (repeatable)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/compare_operators[_quick].json)"
    )
    args = ap.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if seeds < 2:
        ap.error(f"--seeds {seeds}: need at least 2 seeds for an interval")
    sizes = QUICK if args.quick else FULL
    out = args.out or RESULTS / f"compare_operators{'_quick' if args.quick else ''}.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        return _run(args, seeds, sizes, out, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, seeds: int, sizes: dict[str, Any], out: Path, argv: list[str] | None) -> int:

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    flags = shlex.join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "compare_operators",
        "quick": args.quick,
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/compare_operators.py {flags}".strip(),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "seeds": seeds,
        "interval": "mean ± 95% Student-t interval over seeds",
    }
    timings: dict[str, float] = {}
    for name in args.only or SETTINGS:
        t = time.perf_counter()
        log(f"{name}: {seeds} seeds")
        report[name] = SETTINGS[name](seeds, sizes[name], log)
        timings[name] = time.perf_counter() - t
        log(f"{name}: {timings[name]:.0f} s")
    report["timings_s"] = timings | {"total": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"total {report['timings_s']['total'] / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
