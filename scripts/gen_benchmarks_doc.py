"""Generate docs/benchmarks.md from the committed benchmark results in benchmarks/results/.

Every number on the page comes from a JSON file in ``benchmarks/results/``, and every file must say
which command produced it, on which machine and when: ``compare_operators`` writes that into its
JSON; for the older benchmarks, ``--run`` runs one and records it in ``benchmarks/results/provenance.json``.

Usage:
    python scripts/gen_benchmarks_doc.py                       # (re)write docs/benchmarks.md
    python scripts/gen_benchmarks_doc.py --check               # exit 1 if docs/benchmarks.md is stale
    python scripts/gen_benchmarks_doc.py --run growth_checkpoint --quick
                                                               # run benchmarks/growth_checkpoint.py --quick,
                                                               # record its provenance, rewrite the page
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PROVENANCE = "provenance.json"


class ProvenanceError(ValueError):
    """A results file does not say which command produced it, on which machine, or when."""


# --- formatting ----------------------------------------------------------------------------------
def _num(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def ci(iv: dict[str, Any], digits: int = 3, sign: bool = False, pct: bool = False) -> str:
    """``mean ± half-width`` of an interval dict (``mean`` alone for one value, ``-`` for none)."""
    if iv.get("mean") is None:
        return "-"
    scale = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    mean = _num(iv["mean"] * scale, digits, sign) + unit
    if iv.get("half_width") is None:
        return mean
    return f"{mean} ± {_num(iv['half_width'] * scale, digits)}{unit}"


def bracket(iv: dict[str, Any], digits: int = 3) -> str:
    """``[low, high]`` of an interval dict."""
    if iv.get("low") is None:
        return "[-]"
    return f"[{_num(iv['low'], digits, True)}, {_num(iv['high'], digits, True)}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def machine_line(m: dict[str, Any]) -> str:
    keys = ("platform", "processor", "cpus", "torch_threads", "OMP_NUM_THREADS", "python", "torch", "modulart")
    names = {"cpus": "CPUs", "torch_threads": "torch threads"}
    return ", ".join(f"{names.get(k, k)} {m[k]}" for k in keys if k in m) or "-"


def provenance_lines(prov: dict[str, Any]) -> list[str]:
    return [
        f"- Command: `{prov['command']}`",
        f"- Machine: {machine_line(prov['machine'])}",
        f"- Date: {prov['date']}",
        "",
    ]


# --- renderers -----------------------------------------------------------------------------------
CLAIM_TEXT = {
    "supported": "**Supported at this scale**: the interval excludes zero in the paper's direction.",
    "reversed": "**Reversed at this scale**: the interval excludes zero in the opposite direction to the paper's.",
    "within noise": "**Within noise at this scale**: the interval contains zero, so these runs neither "
    "confirm nor refute it.",
    "not enough seeds": "Not enough seeds for an interval.",
}


def _claims(claims: list[dict[str, Any]], seeds: int) -> list[str]:
    out = []
    for c in claims:
        iv = c["interval"]
        reached = (
            f"; the grown model reached the scratch loss within the budget in {c['reached']} seeds"
            if ("reached" in c)
            else ""
        )
        out.append(
            f"- *{c['claim']}* ({c['paper']}). `{c['quantity']}` = {ci(iv, 4, sign=True)}, 95% interval "
            f"{bracket(iv, 4)} over {iv['n']} paired seeds{reached}. {CLAIM_TEXT[c['verdict']]}"
        )
    return [*out, ""]


def render_compare(data: dict[str, Any], name: str) -> list[str]:
    out = [f"## Operator comparison (`{name}`)", ""]
    if data.get("quick"):
        out += ["*Quick (CI) size: a pipeline check, the numbers mean nothing.*", ""]
    out += provenance_lines(data)
    out += [
        f"Each cell is the mean ± the 95% Student-t half-width over {data['seeds']} seeds "
        f"(total {data['timings_s']['total'] / 60:.1f} min). The sizes are in the JSON (`size`).",
        "",
    ]
    if "continual" in data:
        c = data["continual"]
        s = c["size"]
        out += [
            "### Continual learning: base domain, then prose → `email` source → `unittest` source",
            "",
            f"A byte-level 3-layer Llama (width 128), {s['base_steps']} steps on the base domain, then "
            f"{s['steps']} steps per task (batch {s['batch']} × {s['seq']} bytes). Accuracy: next-byte top-1 on "
            "each task's held-out tenth. BWT (backward transfer) = mean over earlier tasks of (after the last "
            "task − right after that task): negative accuracy / positive loss BWT is forgetting. Methods (AdamW, "
            "lr 2e-3, the same batches): `full` plain fine-tuning; `migu` magnitude-gated updates, keep ratio 0.3, "
            "from the second task on; `kv_keys` / `kv_values` only the FFN keys / values train; `emoe` EMoE masks "
            "(8 experts, top 2) on every FFN, all weights train.",
            "",
        ]
        rows = []
        for m in c["methods"]:
            r = c["summary"][m]
            rows.append([f"`{m}`", ci(r["final_avg_acc"], 4), ci(r["final_avg_loss"], 3),
                         ci(r["bwt_acc"], 4, sign=True), ci(r["bwt_loss"], 3, sign=True)])  # fmt: skip
        out += table(["method", "final avg accuracy", "final avg loss", "BWT accuracy", "BWT loss"], rows)
        rows = []
        for m, r in c["paired_vs_full"].items():
            rows.append([f"`{m}` − `full`", f"{ci(r['bwt_acc'], 4, sign=True)} {bracket(r['bwt_acc'], 4)}",
                         f"{ci(r['bwt_loss'], 3, sign=True)} {bracket(r['bwt_loss'], 3)}"])  # fmt: skip
        out += ["Paired differences from plain fine-tuning (same seed, same base model and batches):", ""]
        out += table(["difference", "BWT accuracy [95% interval]", "BWT loss [95% interval]"], rows)
        out += _claims(c["claims"], data["seeds"])
    if "editing" in data:
        e = data["editing"]
        s = e["size"]
        out += [
            "### Sequential editing: new objects for facts a small LM learned",
            "",
            f"A 2-layer Llama trained {s['lm_steps']} steps on synthetic facts ({s['subjects']} subjects × 2 "
            f"relations, three templates each) mixed with language-reference prose (template-0 fact accuracy "
            f"{ci(e['lm']['fact_accuracy'], 3)}); then {s['edits']} edits one after the other. `patcher`: "
            f"Transformer-Patcher with its default config and a memory of {s['memory_size']} ordinary inputs; "
            "`ft_l`: its paper's baseline, fine-tuning the last FFN; the others fine-tune with that operator "
            "applied (`full`: every weight; `migu`: keep ratio 0.3, each edit a task; `kv_keys` / `kv_values`: "
            "only the FFN keys / values; `emoe`: 8 experts, top 2, every FFN). Every non-patcher editor trains "
            f"with Adam (lr 1e-4) until the edit is right or {s['edit_steps']} steps. Retention: "
            "edits still right on the final model; generalisation: the two other templates of each edit, on the "
            "final model; locality: accuracy relative to the unedited model on held-out untouched facts and on "
            "next-word prediction of held-out prose (1 = unchanged).",
            "",
        ]
        rows = []
        for name_ in e["editors"]:
            r = e["summary"][name_]
            rows.append([f"`{name_}`", ci(r["success_right_after"], 3), ci(r["edit_retain_final"], 3),
                         ci(r["generalisation_final"], 3), ci(r["locality_facts"], 3), ci(r["locality_prose"], 3),
                         ci(r["seconds_per_edit"], 2)])  # fmt: skip
        out += table(["editor", "success right after", "retention (final)", "generalisation (final)",
                      "locality: facts", "locality: prose", "s / edit"], rows)  # fmt: skip
    if "growth" in data:
        g = data["growth"]
        s = g["size"]
        sm = g["summary"]
        tokens = s["T"] * s["batch"] * s["seq"]
        out += [
            "### Growth: G_stack vs training from scratch",
            "",
            f"An 8-layer Llama (width {s['d_model']}) trained from scratch for {s['T']} steps ({tokens:,} tokens; "
            f"the better of peak LR 1e-3 and 3e-3) vs a 2-layer one trained {s['d_steps']} steps, grown ×4 with "
            "G_stack and trained on to the same total token count (the small model's tokens included).",
            "",
        ]
        out += table(
            ["scratch final loss", "G_stack final loss", "difference", "speedup where reached", "reached"],
            [[ci(sm["scratch_final_loss"], 4), ci(sm["gstack_final_loss"], 4),
              f"{ci(sm['final_loss_diff'], 4, sign=True)} {bracket(sm['final_loss_diff'], 4)}",
              ci(sm["speedup_pct_where_reached"], 1) + ("%" if sm["reached"] else ""),
              f"{sm['reached']} of {data['seeds']}"]],
        )  # fmt: skip
        out += _claims(g["claims"], data["seeds"])
    return out


def render_growth_pretrain(data: dict[str, Any], name: str) -> list[str]:
    out = [f"## Growth pre-training (`{name}`, one seed)", ""]
    out += provenance_lines(data["provenance"])
    m = data["model"]
    out += [
        f"{m['small_layers']} layers grown ×{m['factor']} (width {m['d_model']}, {data['target_params']:,} "
        f"parameters), T = {data['T_steps']} steps of {data['tokens_per_step']} tokens; scratch final loss "
        f"{data['scratch']['final_val_loss']:.4f} (best peak LR {data['scratch']['best_lr']:g}).",
        "",
    ]
    if data.get("quick"):
        out += [
            "*`--quick` (CI) size, one seed: a check that the pipeline runs, at a scale where one seed says "
            "little; the G_stack claim is tested over seeds, with intervals, in the comparison above.* "
            "(This script sets `torch.set_num_threads(min(2, CPUs))` itself.)",
            "",
        ]
    rows = []
    for op, r in data["runs"].items():
        reach = r["tokens_to_scratch_final_loss"]
        rows.append([f"`{op}`", f"{r['val_loss_at_growth']:.4f}", f"{r['final_val_loss']:.4f}",
                     "not reached" if reach is None else f"{reach:,.0f}",
                     "-" if r["speedup_pct"] is None else f"{r['speedup_pct']:.1f}%"])  # fmt: skip
    return out + table(["operator", "loss at growth", "final loss", "tokens to scratch loss", "speedup"], rows)


def render_growth_checkpoint(data: dict[str, Any], name: str) -> list[str]:
    out = [f"## Streaming checkpoint growth (`{name}`)", ""]
    out += provenance_lines(data["provenance"])
    d = data["dims"]
    s = data["summary"]
    out += [
        f"A synthetic Llama-shaped checkpoint (hidden {d['hidden']}, {d['layers']} layers, "
        f"{s['source_bytes']:,} bytes) grown ×{data['factor']} to {s['output_bytes']:,} bytes.",
        "",
    ]
    rows = [[f"`{k}`", f"{r['wall_s']:.2f}", f"{r['peak_rss_mib']:.0f}"] for k, r in data["results"].items()]
    out += table(["run", "wall s", "peak RSS MiB"], rows)
    out += [
        f"Time vs a plain copy: {s['time_ratio_vs_copy']:.2f}× ({s['time_ratio_vs_copy_excl_import']:.2f}× without "
        f"the import); RSS above the interpreter baseline: {s['rss_above_baseline_mib']:.1f} MiB "
        f"(target {s['rss_target_mib']:.1f} MiB: {'met' if s['rss_within_target'] else 'missed'}).",
        "",
    ]
    return out + _targets_table(data) + curves_section(data, name)


# --- performance benchmarks: ratios against a baseline in the same run, scaling curves ----------
PERF_TITLES = {
    "emoe_executors": "EMoE executors against the dense FFN",
    "emoe_clustering": "EMoE clustering",
    "migu_overhead": "MIGU step against plain AdamW",
    "hook_overhead": "Hook registry overhead",
    "introspect_streaming": "Streaming MoE introspection",
    "scale_7b": "A 7B-shaped end-to-end run",
}
ASSETS = ROOT / "docs" / "assets" / "benchmarks"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _targets_table(data: dict[str, Any]) -> list[str]:
    ratios: dict[str, Any] = data.get("ratios", {})
    upper: dict[str, Any] = data.get("targets", {})
    lower: dict[str, Any] = data.get("targets_min", {})
    met: dict[str, Any] = data.get("met", {})
    if not ratios:
        return []
    rows = []
    for k, v in ratios.items():
        target = f"≤ {upper[k]}" if k in upper else f"≥ {lower[k]}" if k in lower else "-"
        verdict = "-" if k not in met else ("met" if met[k] else "**missed**")
        rows.append([f"`{k}`", _value(v), target, verdict])
    return table(["ratio", "measured", "target", ""], rows)


def curves_section(data: dict[str, Any], name: str) -> list[str]:
    """The scaling curves of one results file: a table of fitted exponents and the PNG (if any)."""
    curves: list[dict[str, Any]] = data.get("curves", [])
    if not curves:
        return []
    out = ["Scaling curves (least-squares fit of log y on log x: y grows as x^b):", ""]
    rows = []
    for c in curves:
        xs = c["x"]
        rows.append([c["name"], f"{c['y_label']} vs {c['x_label']}", f"{_value(min(xs))}–{_value(max(xs))}",
                     str(len(xs)), f"{c['exponent']:.2f}", f"{c['r2']:.3f}", c.get("note", "")])  # fmt: skip
    out += table(["curve", "quantity", "x range", "points", "exponent b", "R²", "note"], rows)
    png = Path(name).stem + "_curves.png"
    if (ASSETS / png).is_file():
        out += [f"![{Path(name).stem} scaling curves](assets/benchmarks/{png})", ""]
    return out


def render_perf(data: dict[str, Any], name: str) -> list[str]:
    out = [f"## {PERF_TITLES[data['benchmark']]} (`{name}`)", ""]
    out += provenance_lines(data["provenance"])
    setting = data.get("setting", {})
    if setting:
        shown = ", ".join(f"{k} {v}" for k, v in setting.items() if k not in ("out",) and not isinstance(v, dict))
        out += [f"Setting: {shown}; torch threads {data.get('threads', '-')}.", ""]
    out += _targets_table(data)
    out += curves_section(data, name)
    notes: list[str] = data.get("notes", [])
    if notes:
        out += [f"- {n}" for n in notes] + [""]
    return out


def sync_assets(results: Path = RESULTS, check: bool = False) -> list[str]:
    """Copy each shown results file's ``*_curves.png`` into docs/assets/benchmarks/; the stale ones."""
    stale = []
    for _, name, _ in load(results):
        src = results / (Path(name).stem + "_curves.png")
        if not src.is_file():
            continue
        dst = ASSETS / src.name
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        stale.append(dst.name)
        if not check:
            ASSETS.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return stale


Renderer = Callable[[dict[str, Any], str], list[str]]
RENDERERS: dict[str, Renderer] = {
    "compare_operators": render_compare,
    "growth_pretrain": render_growth_pretrain,
    "growth_checkpoint": render_growth_checkpoint,
} | dict.fromkeys(PERF_TITLES, render_perf)
ORDER = ("compare_operators", "growth_pretrain", "growth_checkpoint", *PERF_TITLES)


def _kind(data: dict[str, Any], path: Path) -> str:
    kind = data.get("benchmark")
    if kind not in RENDERERS:
        raise ProvenanceError(f"{path.name}: 'benchmark' = {kind!r}; this page renders {sorted(RENDERERS)}")
    return str(kind)


def load(results: Path, include_quick: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
    """``(kind, file name, data)`` for every result the page shows, with its provenance checked.

    Shown: ``compare_operators*.json`` (they carry their own provenance; the ``--quick`` ones only
    with ``include_quick``) and every file recorded in ``provenance.json``. Other files (a local
    ``--quick`` run, a benchmark run by hand) are not shown: nothing says how they were made.
    """
    prov_path = results / PROVENANCE
    prov: dict[str, Any] = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    out = []
    for path in sorted(results.glob("compare_operators*.json")):
        data = json.loads(path.read_text())
        if data.get("quick") and not include_quick:
            continue
        out.append((_kind(data, path), path.name, data))
    for name, record in sorted(prov.items()):
        path = results / name
        if not path.is_file():
            raise ProvenanceError(f"{PROVENANCE} records {name}, which is not in {results.name}/")
        data = json.loads(path.read_text()) | {"provenance": record}
        out.append((_kind(data, path), name, data))
    for _, name, data in out:
        record = data.get("provenance", data)
        missing = [k for k in ("command", "machine", "date") if not record.get(k)]
        if missing:
            raise ProvenanceError(f"{name}: provenance lacks {missing}")
    out.sort(key=lambda x: (ORDER.index(x[0]), x[1]))
    return out


def render(results: Path = RESULTS, include_quick: bool = False) -> str:
    """The whole of docs/benchmarks.md for the results in ``results`` (see :func:`load`)."""
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python scripts/gen_benchmarks_doc.py` from benchmarks/results/*.json: do not edit. -->",
        "",
        "Every number below was measured by the command shown with it, on the machine and at the date shown; "
        "the JSON files in `benchmarks/results/` hold every per-seed value. Rerun a command, then "
        "`python scripts/gen_benchmarks_doc.py`, to reproduce or update a section. These are small models on "
        "CPU: they show how the operators compare at this scale, not what the papers measured at theirs.",
        "",
    ]
    entries = load(results, include_quick)
    if not entries:
        lines += ["No results are committed yet.", ""]
    for kind, name, data in entries:
        lines += RENDERERS[kind](data, name)
    return "\n".join(lines).rstrip() + "\n"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def run_benchmark(name: str, args: list[str], results: Path = RESULTS) -> list[str]:
    """Run ``benchmarks/NAME.py ARGS`` with OMP_NUM_THREADS=1 and record the files it wrote."""
    script = ROOT / "benchmarks" / f"{name}.py"
    if not script.is_file():
        raise SystemExit(f"error: --run {name}: no benchmarks/{name}.py")
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.exists() else {}
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, str(script), *args], check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    written = [
        p.name
        for p in sorted(results.glob("*.json"))
        if p.name != PROVENANCE and before.get(p.name) != p.stat().st_mtime_ns
    ]
    if not written:
        raise SystemExit(f"error: --run {name}: it wrote no JSON into benchmarks/results/")
    prov_path = results / PROVENANCE
    prov = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    command = f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} python benchmarks/{name}.py {' '.join(args)}".strip()
    for f in written:
        prov[f] = {
            "command": command,
            "machine": machine() | {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]},
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(wall, 1),
        }
    prov_path.write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md differs from the results")
    ap.add_argument("--run", metavar="NAME", help="run benchmarks/NAME.py first (extra arguments are passed on)")
    args, rest = ap.parse_known_args(argv)
    if rest and not args.run:
        ap.error(f"unrecognized arguments: {' '.join(rest)} (only --run NAME takes extra arguments)")
    if args.run:
        for f in run_benchmark(args.run, rest):
            print(f"recorded {f}")
    try:
        text = render()
    except ProvenanceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.check:
        stale = sync_assets(check=True)
        if not DOC.exists() or DOC.read_text() != text or stale:
            what = f" (and {', '.join(stale)} in docs/assets/benchmarks/)" if stale else ""
            print(f"docs/benchmarks.md is stale{what}: run python scripts/gen_benchmarks_doc.py", file=sys.stderr)
            return 1
        return 0
    sync_assets()
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
