"""Balanced k-means for EMoE: speed and quality against an exact size-constrained solver, same run.

Workload: a Llama-7B-shaped key matrix (``gate_proj`` rows: 11008 × 4096) split into k = 64 experts,
rows L2-normalised as EMoE does. Two inputs:

- ``random_normal``: i.i.d. N(0, 1) entries (no structure: every balanced split is nearly as good);
- ``mixture``: 64 random centres plus isotropic noise of the same scale, with unequal natural cluster
  sizes (weights ``U(0.2, 1.2)``), so the balance constraint has to split and merge groups.

Solvers, on the same normalised input:

- ``ours``: :func:`modulart.emoe.cluster.balanced_kmeans` (``cache=False``);
- ``exact``: the PyPI package ``k-means-constrained`` (size-constrained k-means whose assignment
  step is an exact min-cost flow, as in the EMoE reference), ``size_min = n // k``,
  ``size_max = ceil(n / k)``, one k-means++ initialisation (``n_init=1``), ``max_iter=300``. It runs
  in a child process with a time limit (``--exact-timeout``); when it cannot finish at full size,
  both solvers are compared on a row subsample (``--subsample``) and our full-size time is reported
  separately. Without the package, unconstrained Lloyd k-means (a lower bound on what a size
  constraint allows, up to local optima) stands in as the reference.

Also reported for context: the inertia of a random balanced split and of unconstrained Lloyd.
Targets: ``time_ours < 60 s`` at full size and ``inertia_ours / inertia_exact <= 1.05``.

Install the exact solver for this benchmark only (it is not a modulart dependency)::

    pip install k-means-constrained

Conversion measurement (``conversion_structured``): keys drawn as ``benchmarks/scale_7b.py`` draws a
7B FFN's gate rows (one of 64 random centres plus noise of half their scale, times 0.02, in bf16),
clustered exactly as ``modulart.emoe.apply`` does (bf16 in, label cache on but emptied first, so
the fp32 copy, the finiteness check and the cache key's hash are included); median of
``--convert-repeats`` runs, with the k-means++ initialisation timed on its own for the profile.
Target: ``<= 2.5 s`` per FFN (``--convert-budget``).

Scaling curves (``--no-curves`` skips them): the time of ``balanced_kmeans`` on i.i.d. normal rows
against ``d_ff`` (the number of rows, 1024 ... 11008 at ``--sweep-d`` columns and k = 64) and
against k (8 ... 128 experts at 4096 rows), median of ``--sweep-repeats`` runs, each with its
fitted exponent.

Usage:
    python benchmarks/emoe_clustering.py [--n 11008] [--d 4096] [--k 64] [--seed 0]
        [--exact-timeout 600] [--subsample 2048] [--sweep-d 1024] [--quick] [--no-curves]
        [--device cpu] [--out benchmarks/results/emoe_clustering.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _scaling import curve, plot_curves

from modulart.emoe import cluster as cl

TIME_TARGET_S = 60.0
RATIO_TARGET = 1.05


def make_data(kind: str, n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[n, d]`` fp32 rows of the named kind, plus a description."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random_normal":
        return torch.randn(n, d, generator=g), {"kind": kind}
    centres = torch.randn(k, d, generator=g)
    weights = torch.rand(k, generator=g) + 0.2
    assign = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    x = centres[assign] + torch.randn(n, d, generator=g)
    sizes = torch.bincount(assign, minlength=k)
    return x, {"kind": kind, "natural_size_min": int(sizes.min()), "natural_size_max": int(sizes.max())}


def unconstrained_lloyd(x: torch.Tensor, k: int, seed: int, max_iter: int = 100) -> torch.Tensor:
    """Plain Lloyd k-means (same greedy k-means++ initialisation) on normalised rows; labels ``[n]``."""
    u = F.normalize(x.float(), dim=1)
    centres = cl._kmeans_pp(u, k, torch.Generator().manual_seed(seed))
    labels = torch.full((u.shape[0],), -1, dtype=torch.int64)
    for _ in range(max_iter):
        new = (centres.square().sum(1)[None, :] - 2.0 * (u @ centres.T)).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k).clamp_min(1).float()
        fresh = torch.zeros_like(centres).index_add_(0, labels, u) / counts[:, None]
        centres = torch.where((torch.bincount(labels, minlength=k) > 0)[:, None], fresh, centres)
    return labels


def _exact_child(path: str, k: int, seed: int, out: str) -> None:
    from k_means_constrained import KMeansConstrained

    x = np.load(path)
    n = x.shape[0]
    t0 = time.perf_counter()
    km = KMeansConstrained(
        n_clusters=k, size_min=n // k, size_max=-(-n // k), n_init=1, max_iter=300, random_state=seed
    )
    km.fit(x)
    elapsed = time.perf_counter() - t0
    np.save(out, np.asarray(km.labels_, dtype=np.int64))
    Path(out + ".json").write_text(json.dumps({"time": elapsed, "n_iter": int(km.n_iter_)}))


def run_exact(u: torch.Tensor, k: int, seed: int, timeout: float) -> dict[str, Any] | None:
    """k-means-constrained in a child process; ``None`` if it did not finish within ``timeout``."""
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "x.npy")
        out = str(Path(tmp) / "labels.npy")
        np.save(data, u.double().numpy())
        proc = mp.get_context("spawn").Process(target=_exact_child, args=(data, k, seed, out))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            return None
        if proc.exitcode != 0 or not Path(out).is_file():
            raise RuntimeError(f"k-means-constrained failed (exit code {proc.exitcode})")
        info = json.loads(Path(out + ".json").read_text())
        info["labels"] = torch.from_numpy(np.load(out))
        return info


def exact_available() -> str | None:
    try:
        from importlib.metadata import version

        import k_means_constrained  # noqa: F401
    except ImportError:
        return None
    return version("k-means-constrained")


DEVICE = torch.device("cpu")  # set by --device: where our solver runs (the exact solver always on CPU)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed_ours(x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, float]:
    """Our labels (on CPU) for the CPU rows ``x`` clustered on :data:`DEVICE`, and the seconds it took
    (the copy to the device is not timed)."""
    xd = x.to(DEVICE)
    _sync()
    t0 = time.perf_counter()
    labels = cl.balanced_kmeans(xd, k, seed=seed, cache=False, progress=False)
    _sync()
    return labels.cpu(), time.perf_counter() - t0


def conversion_keys(n: int, d: int, centres: int, seed: int) -> torch.Tensor:
    """``[n, d]`` bf16 rows around ``centres`` random directions, drawn as scale_7b.py draws gate rows."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    which = torch.randint(0, centres, (n,), generator=g)
    return ((c[which] + 0.5 * torch.randn(n, d, generator=g)) * 0.02).to(torch.bfloat16)


def bench_conversion(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to cluster one conversion-shaped key matrix as ``emoe.apply`` does, plus a split."""
    x = conversion_keys(args.n, args.d, args.k, args.seed)
    xd = x.to(DEVICE)
    total, init = [], []
    labels = None
    for _ in range(args.convert_repeats):
        cl.clear_cluster_cache()
        _sync()
        t0 = time.perf_counter()
        labels = cl.balanced_kmeans(xd, args.k, seed=args.seed, progress=False)
        _sync()
        total.append(time.perf_counter() - t0)
        u = F.normalize(xd.float(), dim=1)
        _sync()
        t0 = time.perf_counter()
        cl._kmeans_pp(u, args.k, torch.Generator().manual_seed(args.seed))
        _sync()
        init.append(time.perf_counter() - t0)
    cl.clear_cluster_cache()
    assert labels is not None
    labels = labels.cpu()
    t, t_init = statistics.median(total), statistics.median(init)
    print(f"conversion_structured: {t:.2f} s per FFN (k-means++ {t_init:.2f} s)", flush=True)
    return {
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "seconds": t,
        "seconds_all": total,
        "seconds_kmeans_pp": t_init,
        "seconds_rest": t - t_init,
        "inertia_random_over_ours": cl.inertia(x, cl.random_balanced_labels(args.n, args.k, seed=1), args.k)
        / cl.inertia(x, labels, args.k),
    }


def bench_one(kind: str, args: argparse.Namespace, exact_version: str | None) -> dict[str, Any]:
    n, d, k, seed = args.n, args.d, args.k, args.seed
    x, info = make_data(kind, n, d, k, seed)
    u = F.normalize(x, dim=1)
    row: dict[str, Any] = {**info, "n": n, "d": d, "k": k, "seed": seed}

    labels, t_ours = timed_ours(x, k, seed)
    sizes = cl.cluster_sizes(labels, k)
    row.update(
        time_ours=t_ours,
        inertia_ours=cl.inertia(x, labels, k),
        ours_sizes=[int(sizes.min()), int(sizes.max())],
        inertia_random_split=cl.inertia(x, cl.random_balanced_labels(n, k, seed=seed), k),
        cosine_ours=cl.within_cluster_cosine(x, labels, k),
        cosine_random_split=cl.within_cluster_cosine(x, cl.random_balanced_labels(n, k, seed=seed), k),
    )
    t0 = time.perf_counter()
    row["inertia_unconstrained"] = cl.inertia(x, unconstrained_lloyd(x, k, seed), k)
    row["time_unconstrained"] = time.perf_counter() - t0

    if exact_version is None:
        row.update(
            exact_solver="unconstrained Lloyd (lower bound; k-means-constrained not installed)",
            exact_scope="full",
            exact_rows=n,
            inertia_exact=row["inertia_unconstrained"],
            time_exact=row["time_unconstrained"],
        )
    else:
        print(f"  [{kind}] exact solver at full size (limit {args.exact_timeout:.0f} s) ...", flush=True)
        res = run_exact(u, k, seed, args.exact_timeout)
        scope_x, scope_u, scope = x, u, "full"
        if res is None:
            m = min(args.subsample, n)
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values
            scope_x, scope_u, scope = (
                x[pick],
                u[pick],
                f"subsample n={m} (full size exceeded {args.exact_timeout:.0f} s)",
            )
            print(f"  [{kind}] exact solver timed out; comparing on a {m}-row subsample", flush=True)
            res = run_exact(scope_u, k, seed, args.exact_timeout)
            if res is None:
                raise RuntimeError("k-means-constrained did not finish even on the subsample")
            sub_labels, t_sub = timed_ours(scope_x, k, seed)
            row.update(time_ours_scope=t_sub, inertia_ours_scope=cl.inertia(scope_x, sub_labels, k))
        else:
            row.update(time_ours_scope=t_ours, inertia_ours_scope=row["inertia_ours"])
        exact_sizes = cl.cluster_sizes(res["labels"], k)
        row.update(
            exact_solver=f"k-means-constrained {exact_version} (n_init=1, max_iter=300)",
            exact_scope=scope,
            exact_rows=scope_x.shape[0],
            time_exact=res["time"],
            exact_iterations=res["n_iter"],
            exact_sizes=[int(exact_sizes.min()), int(exact_sizes.max())],
            inertia_exact=cl.inertia(scope_x, res["labels"], k),
        )
    ours_scope = row.get("inertia_ours_scope", row["inertia_ours"])
    row["ratio_inertia_ours_over_exact"] = ours_scope / row["inertia_exact"]
    row["speedup_vs_exact"] = row["time_exact"] / row.get("time_ours_scope", t_ours)
    row["meets_time_target"] = t_ours < TIME_TARGET_S
    row["meets_ratio_target"] = row["ratio_inertia_ours_over_exact"] <= RATIO_TARGET
    return row


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Clustering time against d_ff (rows) at fixed d and k, and against k at fixed rows: two curves."""

    def seconds(n: int, d: int, k: int) -> float:
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(args.seed))
        return statistics.median(timed_ours(x, k, args.seed)[1] for _ in range(args.sweep_repeats))

    d, k = args.sweep_d, args.sweep_k
    d_ffs = args.sweep_d_ff
    by_n = [seconds(n, d, k) for n in d_ffs]
    print("  time vs d_ff:", [f"{n}: {t:.3f}s" for n, t in zip(d_ffs, by_n, strict=True)], flush=True)
    ks = args.sweep_ks
    n_k = args.sweep_rows
    by_k = [seconds(n_k, d, kk) for kk in ks]
    print("  time vs k:", [f"{kk}: {t:.3f}s" for kk, t in zip(ks, by_k, strict=True)], flush=True)
    return [
        curve("balanced_kmeans time vs d_ff", "d_ff", "seconds", d_ffs, by_n, f"i.i.d. normal rows, d {d}, k {k}"),
        curve("balanced_kmeans time vs k", "experts", "seconds", ks, by_k, f"i.i.d. normal rows, d_ff {n_k}, d {d}"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", default=["random_normal", "mixture"], choices=["random_normal", "mixture"])
    ap.add_argument("--exact-timeout", type=float, default=600.0, help="seconds per exact-solver run")
    ap.add_argument("--subsample", type=int, default=2048, help="rows for the comparison if full size times out")
    ap.add_argument("--sweep-d", type=int, default=1024, help="columns of the scaling sweeps")
    ap.add_argument("--sweep-k", type=int, default=64, help="experts of the d_ff sweep")
    ap.add_argument("--sweep-d-ff", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 11008])
    ap.add_argument("--sweep-ks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--sweep-rows", type=int, default=4096, help="rows (d_ff) of the k sweep")
    ap.add_argument("--sweep-repeats", type=int, default=3)
    ap.add_argument("--convert-repeats", type=int, default=3, help="runs of the conversion measurement")
    ap.add_argument("--convert-budget", type=float, default=2.5, help="target seconds per converted FFN")
    ap.add_argument("--quick", action="store_true", help="a small setting (< 60 s) with every measured path")
    ap.add_argument("--no-curves", action="store_true", help="skip the scaling sweeps")
    ap.add_argument("--device", default="cpu", help="torch device our solver runs on (e.g. cuda)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "emoe_clustering.json")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.quick:
        args.n, args.d, args.k, args.subsample, args.exact_timeout = 512, 64, 8, 256, 60.0
        args.sweep_d, args.sweep_k, args.sweep_d_ff = 64, 8, [128, 256, 512]
        args.sweep_ks, args.sweep_rows, args.sweep_repeats = [4, 8, 16], 256, 1
        args.convert_repeats = 1

    exact_version = exact_available()
    load_before = os.getloadavg()
    rows = {}
    for kind in args.kinds:
        print(f"{kind}: {args.n} x {args.d}, k = {args.k}", flush=True)
        rows[kind] = bench_one(kind, args, exact_version)
    conversion = bench_conversion(args)
    curves = [] if args.no_curves else sweep(args)
    load_after = os.getloadavg()

    print()
    head = f"{'input':<14} {'t_ours[s]':>9} {'t_exact[s]':>10} {'scope':<10} {'I_ours':>11} {'I_exact':>11}"
    print(head + f" {'ratio':>7} {'I_random':>11} {'I_unconstr':>11} {'cos ours/rand':>14}")
    for kind, r in rows.items():
        scope = "full" if r["exact_rows"] == r["n"] else f"n={r['exact_rows']}"
        print(
            f"{kind:<14} {r['time_ours']:>9.2f} {r['time_exact']:>10.2f} {scope:<10} "
            f"{r.get('inertia_ours_scope', r['inertia_ours']):>11.2f} {r['inertia_exact']:>11.2f} "
            f"{r['ratio_inertia_ours_over_exact']:>7.4f} {r['inertia_random_split']:>11.2f} "
            f"{r['inertia_unconstrained']:>11.2f} {r['cosine_ours']:>6.4f}/{r['cosine_random_split']:.4f}"
        )
    print(f"exact solver: {next(iter(rows.values()))['exact_solver']}")
    print(f"targets: time_ours < {TIME_TARGET_S:.0f} s, ratio <= {RATIO_TARGET}")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs")

    ratios: dict[str, float] = {}
    targets: dict[str, float] = {}
    for kind, r in rows.items():
        ratios[f"{kind}_inertia_ours_over_exact"] = r["ratio_inertia_ours_over_exact"]
        ratios[f"{kind}_time_ours_over_budget"] = r["time_ours"] / TIME_TARGET_S
        targets[f"{kind}_inertia_ours_over_exact"] = RATIO_TARGET
        targets[f"{kind}_time_ours_over_budget"] = 1.0
    ratios["conversion_structured_time_over_budget"] = conversion["seconds"] / args.convert_budget
    targets["conversion_structured_time_over_budget"] = 1.0
    notes = [
        f"time budget {TIME_TARGET_S:.0f} s at full size; inertia ratio against "
        f"{next(iter(rows.values()))['exact_solver']}",
        f"conversion_structured ({conversion['n']} x {conversion['d']} bf16, k {conversion['k']}): "
        f"{conversion['seconds']:.2f} s per FFN, of which k-means++ {conversion['seconds_kmeans_pp']:.2f} s "
        f"(one blocked [trials, d] x [d, n] product per centre, memory-bound) and the rest (fp32 copy, finiteness "
        f"check, cache-key hash, Lloyd iterations with the exact capacitated assignment) "
        f"{conversion['seconds_rest']:.2f} s; budget {args.convert_budget:g} s",
        *(
            f"{c['name']}: exponent {c['exponent']:.2f} (R² {c['r2']:.3f}) over {c['x_label']} "
            f"{c['x'][0]:g}..{c['x'][-1]:g}"
            for c in curves
        ),
    ]
    result = {
        "benchmark": "emoe_clustering",
        "setting": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(DEVICE) if DEVICE.type != "cuda" else f"{DEVICE} ({torch.cuda.get_device_name(DEVICE)})",
        "median_seconds": {kind: r["time_ours"] for kind, r in rows.items()}
        | {"conversion_structured": conversion["seconds"]},
        "ratios": ratios,
        "targets": targets,
        "met": {k_: ratios[k_] <= v for k_, v in targets.items()},
        "curves": curves,
        "notes": notes,
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "algorithm_version": cl.ALGORITHM_VERSION,
        },
        "results": rows,
        "conversion": conversion,
        "all_targets_met": all(r["meets_time_target"] and r["meets_ratio_target"] for r in rows.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if curves:
        plot_curves(curves, args.out.with_name(args.out.stem + "_curves.png"), "EMoE balanced k-means scaling")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
