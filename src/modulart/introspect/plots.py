"""PNG figures of a :class:`~modulart.introspect.Report` (matplotlib, imported lazily, Agg backend).

Figures: ``s1_grid.png`` / ``s2_grid.png`` (heat maps, matrix types × layers), ``s4_gate_vs_experts.png``
(router-row cosine against mean-neuron cosine per layer, with the fit and R), ``pca_experts.png``,
``depth_trends.png`` (mean similarity per layer, the last layer marked), and with inputs
``d1_output_similarity.png``, ``d2_rank_counts.png`` (stacked bars) and ``d4_routing_map.png``.

Example:
    >>> from modulart.introspect.plots import plot_report  # doctest: +SKIP
    >>> paths = plot_report(report, Path("figures"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from modulart.introspect.reporting import Report

__all__ = ["plot_report"]

MAX_PANELS = 8


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        from modulart.core.errors import ModulartError

        raise ModulartError("plots need matplotlib: pip install 'modulart[plot]'") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _pick(n: int) -> list[int]:
    """At most MAX_PANELS layer positions, evenly spaced, first and last included."""
    if n <= MAX_PANELS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_PANELS - 1)) for i in range(MAX_PANELS)})


def _save(fig: Any, path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        fig.savefig(tmp, dpi=90)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        _plt().close(fig)
    return path


def _heat(ax: Any, m: torch.Tensor, labels: list[str], title: str, vmin: float = -1.0, vmax: float = 1.0) -> Any:
    im = ax.imshow(m.numpy(), cmap="coolwarm", vmin=vmin, vmax=vmax)
    step = 1 if len(labels) <= 10 else max(1, len(labels) // 6)
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=7)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
    ax.set_title(title, fontsize=9)
    if len(labels) <= 6:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = float(m[i, j])
                if v == v:
                    color = "white" if abs(v - (vmin + vmax) / 2) > 0.35 * (vmax - vmin) else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
    return im


def _grid(rep: Report, prefix: str, title: str, path: Path) -> Path | None:
    plt = _plt()
    mats = [m for m in ("act", "up", "down") if f"{prefix}.{m}" in rep.arrays]
    if not mats:
        return None
    cols = _pick(len(rep.layers))
    fig, axes = plt.subplots(
        len(mats), len(cols), figsize=(2.6 * len(cols) + 1, 2.6 * len(mats)), squeeze=False, layout="constrained"
    )
    im = None
    for r, m in enumerate(mats):
        for c, p in enumerate(cols):
            im = _heat(axes[r][c], rep.arrays[f"{prefix}.{m}"][p], rep.members, f"layer {rep.layers[p]} · {m}")
    fig.suptitle(title)
    fig.colorbar(im, ax=axes, shrink=0.7, label="cosine")
    return _save(fig, path)


def _s4(rep: Report, path: Path) -> Path:
    plt = _plt()
    cols = _pick(len(rep.layers))
    fig, axes = plt.subplots(2, len(cols), figsize=(2.8 * len(cols), 5.4), squeeze=False, layout="constrained")
    rc = rep.arrays["s4.router_cosine"]
    e = rc.shape[1]
    iu = torch.triu_indices(e, e, 1)
    mat = "act" if "s4.expert_cosine.act" in rep.arrays else "down"
    ec = rep.arrays[f"s4.expert_cosine.{mat}"]
    for c, p in enumerate(cols):
        _heat(axes[0][c], rc[p], [f"e{i}" for i in range(e)], f"layer {rep.layers[p]} · router rows")
        x, y = ec[p][iu[0], iu[1]], rc[p][iu[0], iu[1]]
        ax = axes[1][c]
        ax.scatter(x.numpy(), y.numpy(), s=10)
        if len(x) > 1 and float(x.std()) > 0:
            a = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
            xs = torch.linspace(float(x.min()), float(x.max()), 2)
            ax.plot(xs.numpy(), (a * (xs - x.mean()) + y.mean()).numpy(), color="C3", label="least-squares fit")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(f"layer {rep.layers[p]} · R = {float(rep.arrays[f's4.r.{mat}'][p]):.2f}", fontsize=9)
        ax.set_xlabel(f"mean-neuron cosine ({mat})", fontsize=8)
        if c == 0:
            ax.set_ylabel("router-row cosine", fontsize=8)
    fig.suptitle(
        "S4: router rows vs experts' mean neurons\ntop: router-row cosine; bottom: one point per expert pair",
        fontsize=10,
    )
    return _save(fig, path)


def _pca(rep: Report, path: Path) -> Path:
    plt = _plt()
    cols = _pick(len(rep.layers))
    fig, axes = plt.subplots(1, len(cols), figsize=(2.8 * len(cols), 2.9), squeeze=False, layout="constrained")
    coords, expl = rep.arrays["s5.experts"], rep.arrays["s5.explained"]
    labels = list(rep.meta.get("s5_labels") or [f"e{i}" for i in range(coords.shape[1])])
    for c, p in enumerate(cols):
        ax = axes[0][c]
        xy = coords[p]
        y = xy[:, 1] if xy.shape[1] > 1 else torch.zeros(xy.shape[0])
        ax.scatter(xy[:, 0].numpy(), y.numpy(), c=range(xy.shape[0]), cmap="tab10", s=30)
        for i in range(xy.shape[0]):
            ax.annotate(labels[i] if i < len(labels) else f"e{i}", (float(xy[i, 0]), float(y[i])), fontsize=7)
        pcs = "PC1+PC2 explain" if expl.shape[-1] > 1 else "PC1 explains"
        ax.set_title(f"layer {rep.layers[p]} ({pcs} {100 * float(expl[p].sum()):.0f}%)", fontsize=9)
        ax.set_xlabel("PC1", fontsize=8)
        if c == 0:
            ax.set_ylabel("PC2", fontsize=8)
    fig.suptitle("S5: PCA of the experts (flattened, z-scored)")
    return _save(fig, path)


def _trends(rep: Report, path: Path) -> Path:
    plt = _plt()
    trends: dict[str, list[float]] = rep.meta["trends"]
    panels = [
        ("weights: expert-expert", [k for k in trends if k.startswith(("s1.", "s2."))]),
        ("weights: expert-F", [k for k in trends if k.startswith("s1_dense.")]),
        ("outputs (D1, angular)", [k for k in trends if k == "d1"]),
    ]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, layout="constrained")
    x = rep.layers
    colors = {"act": "C0", "up": "C1", "down": "C2"}  # one colour per matrix: S1 solid, S2 dashed
    rings = 0
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        ringed = False
        for k in keys:
            style = "--" if k.startswith("s2.") else "-"
            label = {"s1": "S1 ", "s2": "S2 ", "s1_dense": "S1 ", "d1": "D1"}[k.split(".")[0]] + k.partition(".")[2]
            color = colors.get(k.partition(".")[2], "C4")  # D1: not red, the colour of the ring
            ax.plot(x, trends[k], style, marker="o", label=label, color=color)
            if rep.meta["outliers"].get(k, {}).get("outlier"):
                rings += 1
                ax.scatter(
                    [x[-1]],
                    [trends[k][-1]],
                    s=160,
                    facecolors="none",
                    edgecolors="red",
                    linewidths=2,
                    label=None if ringed else "last layer: outlier",
                )
                ringed = True
        values = [v for k in keys for v in trends[k] if v == v]
        if values and max(values) - min(values) < 0.1:  # a flat series stays flat on screen
            mid = (max(values) + min(values)) / 2
            ax.set_ylim(mid - 0.06, mid + 0.06)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(x if len(x) <= 16 else x[:: max(1, len(x) // 8)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean off-diagonal similarity")
    if rings:
        note = "red ring: the last layer is an outlier"
    elif len(x) < 3:
        note = f"{len(x)} layers: too few for the last-layer outlier check"
    else:
        note = "the last layer is no outlier"
    fig.suptitle(f"Diversity across depth ({note})")
    return _save(fig, path)


def _d1(rep: Report, path: Path) -> Path:
    plt = _plt()
    cols = _pick(len(rep.layers))
    d1 = rep.arrays["d1.angular"]
    names = list(rep.meta.get("d1_members") or [f"e{i}" for i in range(d1.shape[1])])
    fig, axes = plt.subplots(1, len(cols), figsize=(2.8 * len(cols) + 1, 2.9), squeeze=False, layout="constrained")
    im = None
    for c, p in enumerate(cols):
        im = _heat(axes[0][c], d1[p], names, f"layer {rep.layers[p]}", 0.0, 1.0)
    fig.suptitle("D1: token-averaged angular similarity of expert outputs")
    fig.colorbar(im, ax=axes, shrink=0.8, label="0.5: orthogonal, 1: identical")
    return _save(fig, path)


def _d2(rep: Report, path: Path) -> Path:
    plt = _plt()
    cols = _pick(len(rep.layers))
    counts = rep.arrays["d2.counts"]
    e = counts.shape[1]
    order = "1 = smallest" if rep.meta.get("d2_ranks") == "ascending" else "1 = largest"
    fig, axes = plt.subplots(1, len(cols), figsize=(3.0 * len(cols), 3.2), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis", e)
    for c, p in enumerate(cols):
        ax = axes[0][c]
        bottom = torch.zeros(e)
        for nr in range(e):
            h = counts[p][:, nr].float()
            ax.bar(range(1, e + 1), h.numpy(), bottom=bottom.numpy(), color=cmap(nr), label=f"{nr + 1}")
            bottom += h
        ax.set_xlabel(f"rank by router score ({order})", fontsize=8)
        ticks = list(range(1, e + 1)) if e <= 8 else list(range(1, e + 1, max(1, e // 8)))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.set_title(f"layer {rep.layers[p]} (ρ = {float(rep.arrays['d2.spearman'][p]):.2f})", fontsize=9)
        if c == 0:
            ax.set_ylabel("tokens", fontsize=8)
    axes[0][-1].legend(
        fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left", title=f"output-norm rank ({order})", title_fontsize=7
    )
    fig.suptitle("D2: for each score rank, the output-norm rank of that expert")
    return _save(fig, path)


def _d4(rep: Report, path: Path) -> Path:
    plt = _plt()
    maps = rep.arrays["d4.map"]
    rows = sorted({0, len(rep.layers) - 1})
    fig, axes = plt.subplots(
        len(rows),
        1,
        figsize=(max(6.0, maps.shape[2] * 0.12), 1.6 + 0.35 * maps.shape[1] * len(rows)),
        squeeze=False,
        layout="constrained",
    )
    for r, p in enumerate(rows):
        ax = axes[r][0]
        im = ax.imshow(maps[p].numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=max(1e-6, float(maps[p].max())))
        ax.set_ylabel("expert")
        if "d4.seq" in rep.arrays:
            seq = rep.arrays["d4.seq"][: maps.shape[2]]
            for t in torch.nonzero(seq[1:] != seq[:-1]).flatten().tolist():
                ax.axvline(t + 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(
            f"layer {rep.layers[p]}: top-k routing weights (consecutive-token overlap "
            f"{float(rep.arrays['d4.consecutive'][p]):.2f}, "
            f"chance {float(rep.arrays['d4.consecutive_chance'][p]):.2f})",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax, shrink=0.8, label="routing weight")
    ids = rep.arrays.get("d4.seq")
    starts = ids is not None and bool((ids[1 : maps.shape[2]] != ids[: maps.shape[2] - 1]).any())
    seqs = "\ndashed lines: where the next input sequence starts" if starts else ""
    fig.suptitle(f"D4: routing weight of each expert per token (0: not selected){seqs}", fontsize=10)
    axes[-1][0].set_xlabel("token")
    return _save(fig, path)


def plot_report(rep: Report, directory: Path) -> list[Path]:
    """Write every figure the report has data for into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    out = [
        _grid(rep, "s1", "S1: cosine between flattened expert matrices", directory / "s1_grid.png"),
        _grid(rep, "s2", "S2: cosine between experts' mean neurons", directory / "s2_grid.png"),
        _s4(rep, directory / "s4_gate_vs_experts.png"),
        _pca(rep, directory / "pca_experts.png"),
        _trends(rep, directory / "depth_trends.png"),
    ]
    if "d1.angular" in rep.arrays:
        out += [
            _d1(rep, directory / "d1_output_similarity.png"),
            _d2(rep, directory / "d2_rank_counts.png"),
            _d4(rep, directory / "d4_routing_map.png"),
        ]
    return [p for p in out if p is not None]
