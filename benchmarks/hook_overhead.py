"""Forward-time overhead of the modulart HookRegistry, measured against baselines in the same run.

Two settings, each timed in interleaved rounds (the order alternates, so drift hits every
configuration alike) with the median of each configuration reported:

**tiny** (the fixed cost per hook): a randomly initialised 12-layer BERT (hidden 32, FFN 64) at
batch 1 x 4 tokens, eval, no grad, where a forward is short enough for the per-site cost of a hook
to show. ``--tiny-calls`` turns, each installing the configurations one after the other (in a fresh
random order per turn) and timing one forward under each (after one untimed forward), so the
per-site cost comes from that many side-by-side pairs of single forwards of the same model (blocks
of forwards per configuration left a whole forward's drift in each difference). Configurations:

- ``bare``: the model, no hooks;
- ``empty_scope``: inside an open ``HookRegistry(model).scope(...)`` with nothing installed;
- ``torch_capture``: a plain ``register_forward_hook`` on every FFN output module, storing the output;
- ``registry_capture``: the same capture through ``HookRegistry.at(ffn.output_site, ...)``.

The cost per captured site is ``(t_config - t_bare) / n_sites`` (the median of the per-forward
paired differences), and the target is ``registry per-site cost <= 1.2 x torch per-site cost``.
The same quantity is also measured on one site module called alone (``site_call``: the module's
forward with no hook / a raw hook / a registry hook), where the forward of the rest of the model
adds no noise. A sweep over 1, 2, 4, 8, 12 captured sites gives the scaling curves: the 12 site
modules called in turn with the first k of them hooked, overhead per pass against k, with the
fitted exponent (a whole forward's noise would hide a few microseconds per site).

**minilm** (the overhead at a realistic size): the real all-MiniLM-L6-v2 at ``--batch`` x
``--seq``, with the same four configurations; targets ``empty_scope / bare <= 1.03`` and
``registry_capture / torch_capture <= 1.05``.

Time is measured with the thread's CPU clock by default (``--clock thread``; torch runs on one
thread here, see ``--threads``), which a busy machine's scheduling does not inflate; ``--clock
wall`` uses ``time.perf_counter``.

Usage:
    python benchmarks/hook_overhead.py [--quick] [--tiny-calls 2000] [--batch 8] [--seq 128]
        [--minilm-rounds 30] [--clock thread|wall] [--no-curves] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _scaling import curve, plot_curves

import modulart as mt

Setup = Callable[[], Callable[[], None]]  # installs a configuration, returns its teardown


def tiny_bert(layers: int = 12) -> torch.nn.Module:
    """A random 12-layer BERT (hidden 32, FFN 64, 4 heads), eval; built from a config, no download."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
    )
    return BertModel(cfg).eval()


def configs_for(
    model: torch.nn.Module, sites: Sequence[mt.HookSite], store: dict[str, torch.Tensor]
) -> dict[str, Setup]:
    """The four configurations (bare, empty scope, raw torch capture, registry capture) on ``sites``."""

    def bare() -> Callable[[], None]:
        return lambda: None

    def empty_scope() -> Callable[[], None]:
        return mt.HookRegistry(model).scope("bench").remove

    return {
        "bare": bare,
        "empty_scope": empty_scope,
        "torch_capture": torch_capture(sites, store),
        "registry_capture": registry_capture(model, sites, store),
    }


def torch_capture(sites: Sequence[mt.HookSite], store: dict[str, torch.Tensor]) -> Setup:
    """Raw ``register_forward_hook`` per site storing ``output.detach()`` (the sites are forward outputs)."""

    def setup() -> Callable[[], None]:
        handles = []
        for s in sites:

            def hook(m: torch.nn.Module, a: Any, out: torch.Tensor, p: str = s.path) -> None:
                store[p] = out.detach()

            handles.append(s.module.register_forward_hook(hook))

        def teardown() -> None:
            for h in handles:
                h.remove()

        return teardown

    return setup


def registry_capture(
    model: torch.nn.Module | None, sites: Sequence[mt.HookSite], store: dict[str, torch.Tensor], *, bind: bool = False
) -> Setup:
    """``HookRegistry.at(site, ...)`` per site storing ``y.detach()``, as a recording (``Priority.RECORD``)."""

    def setup() -> Callable[[], None]:
        reg = mt.HookRegistry(model, name="bench", bind_thread=bind)
        for s in sites:

            def grab(y: torch.Tensor, p: str = s.path) -> None:
                store[p] = y.detach()

            reg.at(s, grab, priority=mt.Priority.RECORD)
        return reg.remove

    return setup


def measure(
    configs: dict[str, Setup], run: Callable[[], None], reps: int, rounds: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds per call of ``run`` under each configuration: one sample per round, ``reps`` calls each."""
    for _ in range(3):
        run()
    names = list(configs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            teardown = configs[name]()
            try:
                run()  # the first call after installing (path caches) stays out of the sample
                t0 = clock()
                for _ in range(reps):
                    run()
                times[name].append((clock() - t0) / reps)
            finally:
                teardown()
    return times


def interleaved(
    configs: dict[str, Setup], run: Callable[[], None], calls: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds of single calls of ``run``: ``calls`` turns, each installing every configuration in
    turn (in a fresh random order: each configuration takes every place in a turn equally often, as
    the place itself shifts a forward's time), calling ``run`` once untimed (path caches) and once
    timed, then removing it; ``times[a][i]`` and ``times[b][i]`` were taken side by side."""
    for _ in range(5):
        run()
    names = list(configs)
    times: dict[str, list[float]] = {k: [] for k in names}
    order = random.Random(0)
    # the cyclic garbage collector is paused during the turns (and run between blocks of them): the
    # objects a configuration allocates when it is installed would otherwise decide in which timed
    # forward a collection lands, a cost of the install-per-turn design, not of a hook
    gc.collect()
    gc.disable()
    try:
        for i in range(calls):
            for name in order.sample(names, len(names)):
                teardown = configs[name]()
                try:
                    run()
                    t0 = clock()
                    run()
                    times[name].append(clock() - t0)
                finally:
                    teardown()
            if i % 200 == 199:
                gc.collect()
    finally:
        gc.enable()
    return times


def paired_overhead(times: dict[str, list[float]], name: str, base: str = "bare") -> float:
    """Median over rounds of ``t_name - t_base`` (seconds per call; the two were timed side by side)."""
    return statistics.median(a - b for a, b in zip(times[name], times[base], strict=True))


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (a straight line, intercept free)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small setting (< 60 s) with the same JSON keys")
    ap.add_argument("--tiny-calls", type=int, default=2000, help="tiny model: timed forwards per configuration")
    ap.add_argument("--site-calls", type=int, default=2000, help="site_call: module calls per sample")
    ap.add_argument("--site-rounds", type=int, default=31)
    ap.add_argument("--sweep-rounds", type=int, default=15, help="rounds of the sites sweep (the curves)")
    ap.add_argument("--batch", type=int, default=8, help="MiniLM batch")
    ap.add_argument("--seq", type=int, default=128, help="MiniLM tokens per sequence")
    ap.add_argument("--minilm-rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread")
    ap.add_argument("--no-curves", action="store_true", help="skip the sites sweep")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hook_overhead.json")
    args = ap.parse_args()
    if args.quick:
        args.tiny_calls, args.site_calls, args.site_rounds, args.sweep_rounds = 100, 500, 7, 3
        args.batch, args.seq, args.minilm_rounds = 1, 16, 5
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    store: dict[str, torch.Tensor] = {}
    us = 1e6

    # --- tiny: the fixed cost per site -------------------------------------------------------------
    tiny = tiny_bert()
    sites = [f.output_site for f in mt.find_ffns(tiny)]
    n = len(sites)
    ids = torch.randint(0, 100, (1, 4), generator=torch.Generator().manual_seed(0))

    def tiny_forward() -> None:
        with torch.no_grad():
            tiny(input_ids=ids)

    tiny_times = interleaved(configs_for(tiny, sites, store), tiny_forward, args.tiny_calls, clock)
    tiny_med = {k: statistics.median(v) for k, v in tiny_times.items()}
    per_site = {k: paired_overhead(tiny_times, k) / n for k in ("torch_capture", "registry_capture")}
    empty_cost = paired_overhead(tiny_times, "empty_scope")

    # --- site_call: one site module alone ------------------------------------------------------------
    site = sites[0]
    x = torch.randn(1, 4, site.module.in_features, generator=torch.Generator().manual_seed(1))

    def site_call() -> None:
        site.module(x)

    site_configs: dict[str, Setup] = {
        "bare": lambda: lambda: None,
        "torch_capture": torch_capture([site], store),
        "registry_capture": registry_capture(tiny, [site], store),
        "registry_capture_bound": registry_capture(tiny, [site], store, bind=True),
    }
    with torch.no_grad():
        site_times = measure(site_configs, site_call, args.site_calls, args.site_rounds, clock)
    site_cost = {k: paired_overhead(site_times, k) for k in site_configs if k != "bare"}

    # --- the sweep: overhead per forward against the number of captured sites ------------------------
    curves: list[dict[str, Any]] = []
    notes: list[str] = []
    sweep: dict[str, dict[str, float]] = {}
    if not args.no_curves:
        ks = [k for k in (1, 2, 4, 8, 12) if k <= n]
        sweep_configs: dict[str, Setup] = {"bare": lambda: lambda: None}
        for k in ks:
            sweep_configs[f"torch_{k}"] = torch_capture(sites[:k], store)
            sweep_configs[f"registry_{k}"] = registry_capture(tiny, sites[:k], store)
        xs = torch.randn(1, 4, site.module.in_features, generator=torch.Generator().manual_seed(2))

        def all_sites_call() -> None:  # every site module of the model called in turn, k of them hooked
            for s in sites:
                s.module(xs)

        with torch.no_grad():
            sweep_times = measure(sweep_configs, all_sites_call, args.site_calls // n, args.sweep_rounds, clock)
        for kind in ("registry", "torch"):
            ys = [paired_overhead(sweep_times, f"{kind}_{k}") * us for k in ks]
            sweep[kind] = {str(k): y for k, y in zip(ks, ys, strict=True)}
            floor = 1e-3
            clamped = [k for k, y in zip(ks, ys, strict=True) if y <= floor]
            note = (
                f"{kind} capture; the {n} site modules called in turn, k hooked; median paired difference "
                f"to none hooked over {args.sweep_rounds} rounds"
            )
            if clamped:
                note += f"; sites {clamped} measured <= 0 (noise) and were clamped to {floor} us for the fit"
            curves.append(
                curve(
                    f"{kind} capture overhead vs captured sites (tiny BERT's site modules, 1x4 tokens)",
                    "captured sites",
                    "overhead per pass over the sites (us)",
                    ks,
                    [max(y, floor) for y in ys],
                    note,
                )
            )

    # --- minilm: the overhead at a realistic size ----------------------------------------------------
    from modulart.tour import load_minilm

    torch.manual_seed(0)
    minilm, _ = load_minilm()
    mids = torch.randint(1000, 20000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(mids)
    msites = [f.output_site for f in mt.find_ffns(minilm)]

    def minilm_forward() -> None:
        with torch.no_grad():
            minilm(input_ids=mids, attention_mask=mask)

    m_times = measure(configs_for(minilm, msites, store), minilm_forward, 1, args.minilm_rounds, clock)
    m_med = {k: statistics.median(v) for k, v in m_times.items()}

    ratios = {
        "tiny_registry_vs_torch_per_site": per_site["registry_capture"] / per_site["torch_capture"],
        "site_call_registry_vs_torch": site_cost["registry_capture"] / site_cost["torch_capture"],
        "site_call_registry_bound_vs_torch": site_cost["registry_capture_bound"] / site_cost["torch_capture"],
        "tiny_empty_scope_vs_bare": tiny_med["empty_scope"] / tiny_med["bare"],
        "tiny_registry_capture_vs_bare": tiny_med["registry_capture"] / tiny_med["bare"],
        "tiny_torch_capture_vs_bare": tiny_med["torch_capture"] / tiny_med["bare"],
        "empty_scope_vs_bare": m_med["empty_scope"] / m_med["bare"],
        "registry_capture_vs_bare": m_med["registry_capture"] / m_med["bare"],
        "registry_capture_vs_torch_capture": m_med["registry_capture"] / m_med["torch_capture"],
        "torch_capture_vs_bare": m_med["torch_capture"] / m_med["bare"],
    }
    if sweep:  # the per-site slope of overhead against hooked sites: the whole sweep in one number
        ks_swept = [float(k) for k in sweep["registry"]]
        slope = {kind: _slope(ks_swept, list(sweep[kind].values())) for kind in ("registry", "torch")}
        ratios["sweep_registry_vs_torch_per_site"] = slope["registry"] / slope["torch"]
        notes.append(
            f"sites sweep: least-squares slope of the overhead per pass, registry {slope['registry']:.2f} us per "
            f"hooked site vs raw torch hook {slope['torch']:.2f} us"
        )
    targets = {
        "tiny_registry_vs_torch_per_site": 1.2,
        "site_call_registry_vs_torch": 1.2,
        "empty_scope_vs_bare": 1.03,
        "registry_capture_vs_torch_capture": 1.05,
    }
    notes.insert(
        0,
        f"tiny: per captured site, registry {per_site['registry_capture'] * us:.2f} us vs raw torch hook "
        f"{per_site['torch_capture'] * us:.2f} us (forward {tiny_med['bare'] * us:.0f} us bare, {n} sites); "
        f"empty scope {empty_cost * us:.2f} us per forward",
    )
    notes.insert(
        1,
        f"site_call: one hooked module call costs registry {site_cost['registry_capture'] * us:.2f} us, "
        f"thread-bound registry {site_cost['registry_capture_bound'] * us:.2f} us, raw torch hook "
        f"{site_cost['torch_capture'] * us:.2f} us more than the bare call "
        f"({statistics.median(site_times['bare']) * us:.2f} us)",
    )
    result = {
        "benchmark": "hook_overhead",
        "setting": {k: v for k, v in vars(args).items() if k not in ("out", "no_curves") and not isinstance(v, Path)},
        "tiny_model": {"family": "bert", "layers": 12, "hidden": 32, "ffn": 64, "batch": 1, "tokens": 4},
        "minilm_model": "all-MiniLM-L6-v2",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "clock": args.clock,
        "median_seconds": {f"tiny_{k}": v for k, v in tiny_med.items()} | m_med,
        "site_call_median_seconds": {k: statistics.median(v) for k, v in site_times.items()},
        "per_site_us": {
            "tiny_torch_capture": per_site["torch_capture"] * us,
            "tiny_registry_capture": per_site["registry_capture"] * us,
            **{f"site_call_{k}": v * us for k, v in site_cost.items()},
        },
        "empty_scope_us_per_forward": {
            "tiny": empty_cost * us,
            "minilm": paired_overhead(m_times, "empty_scope") * us,
        },
        "sweep_overhead_us": sweep,
        "ratios": ratios,
        "targets": targets,
        "met": {k: ratios[k] <= v for k, v in targets.items()},
        "curves": curves,
        "notes": notes,
    }
    for k, v in result["per_site_us"].items():
        print(f"{k:>40}: {v:8.3f} us per site")
    for k, v in ratios.items():
        tgt = f"  (target <= {targets[k]:.2f}: {'met' if v <= targets[k] else 'MISSED'})" if k in targets else ""
        print(f"{k:>40}: {v:.4f}x{tgt}")
    for c in curves:
        print(f"curve {c['name']}: y={[round(y, 2) for y in c['y']]} exponent {c['exponent']:.2f} (R2 {c['r2']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if curves:
        plot_curves(curves, args.out.with_name(args.out.stem + "_curves.png"), "Hook registry overhead")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
