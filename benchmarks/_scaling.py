"""Scaling curves for the benchmarks: measured points, a fitted power law, a JSON record and a PNG.

Each benchmark that sweeps a size (d_ff, experts, tokens, layers, checkpoint bytes) records the
sweep as a *curve*: ``y`` measured at each ``x``, and the exponent ``b`` of the least-squares fit
``log y = log a + b log x`` (how cost grows as work grows: ``b = 1`` is linear, ``b = 0`` flat).
``scripts/gen_benchmarks_doc.py`` renders every curve in a results file as a table row with its
exponent and links the PNG.

Record schema (one entry of a results file's ``"curves"`` list)::

    {"name": "...", "x_label": "...", "y_label": "...", "x": [...], "y": [...],
     "exponent": b, "prefactor": a, "r2": R^2 of the log-log fit, "note": "..."}

Example:
    >>> c = curve("time vs d_ff", "d_ff", "seconds", [1024, 2048, 4096], [0.1, 0.2, 0.4])
    >>> round(c["exponent"], 3), round(c["r2"], 3)
    (1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least squares of ``log y`` on ``log x``: returns ``(prefactor a, exponent b, R^2)``.

    Needs at least two distinct positive ``x`` and positive ``y``.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"a curve needs >= 2 points with one y per x, got {len(x)} x and {len(y)} y")
    if min(x) <= 0 or min(y) <= 0:
        raise ValueError("a power-law fit needs positive x and y")
    lx = [math.log(v) for v in x]
    ly = [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("a power-law fit needs at least two distinct x")
    b = sum((a - mx) * (c - my) for a, c in zip(lx, ly, strict=True)) / sxx
    a0 = my - b * mx
    ss_tot = sum((c - my) ** 2 for c in ly)
    ss_res = sum((c - (a0 + b * a)) ** 2 for a, c in zip(lx, ly, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return math.exp(a0), b, r2


def curve(
    name: str, x_label: str, y_label: str, x: Sequence[float], y: Sequence[float], note: str = ""
) -> dict[str, Any]:
    """One curve record (see the module docstring) with its fitted exponent."""
    a, b, r2 = fit_power_law(x, y)
    return {
        "name": name,
        "x_label": x_label,
        "y_label": y_label,
        "x": [float(v) for v in x],
        "y": [float(v) for v in y],
        "exponent": b,
        "prefactor": a,
        "r2": r2,
        "note": note,
    }


def plot_curves(curves: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Draw each curve (log-log, points and fit) in its own panel; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    n = len(curves)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, c in zip(axes.flat, curves, strict=False):
        ax.loglog(c["x"], c["y"], "o-", label="measured")
        lo, hi = min(c["x"]), max(c["x"])
        xs = [lo * (hi / lo) ** (i / 20) for i in range(21)]
        ax.loglog(
            xs,
            [c["prefactor"] * v ** c["exponent"] for v in xs],
            "--",
            color="gray",
            label=f"fit, b = {c['exponent']:.2f}",
        )
        ax.set_xlabel(c["x_label"])
        ax.set_ylabel(c["y_label"])
        ax.set_title(c["name"], fontsize=9)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
