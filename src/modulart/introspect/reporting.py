"""``modulart.introspect.reporting``: headline numbers per layer, depth trends and the last-layer outlier check.

A :class:`Report` is tidy arrays (``s1.act [L, M, M]``, ``d2.counts [L, E, E]``, ...) plus JSON
metadata; :meth:`Report.save` writes both atomically (``arrays.safetensors`` + ``report.json``),
:meth:`Report.load` reads them back, :meth:`Report.plot` renders the figures (needs matplotlib).

Example:
    >>> import torch, modulart.introspect as mi
    >>> from modulart.core.neuron_groups import ExpertGroups
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> rep = mi.report(model, experts={"": ExpertGroups(torch.arange(32) % 4, 4)}, progress=False)
    >>> sorted(k for k in rep.arrays if k.startswith("s1."))
    ['s1.act', 's1.down']
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from modulart._version import __version__
from modulart.core.errors import ConfigError, IncompatibleArtifactError
from modulart.core.io import atomic_directory, inside, recover
from modulart.core.select import LayersArg
from modulart.core.types import ModelInputs
from modulart.introspect.live import DenseSpec
from modulart.introspect.neuron_experts import ExpertsSpec
from modulart.introspect.options import IntrospectOptions, OptionsArg, resolve_options
from modulart.introspect.routing_analysis import routing
from modulart.introspect.weight_analysis import LayerDone, Weights, offdiag_mean, weights

__all__ = ["Report", "outlier_check", "report"]

FORMAT = "modulart.introspect.report/1"
HEADLINE = [
    "S1 act",
    "S1 act-F",
    "S2 act",
    "S3 tau",
    "S4 R act",
    "D1 angular",
    "D1 selected",
    "D1 other",
    "D2 spearman",
    "D2 hit",
    "D3 active",
    "D4 consec",
]


def outlier_check(series: list[float], z_limit: float = 2.0, min_gap: float = 0.05) -> dict[str, float | bool | str]:
    """Is the last value of a per-layer series an outlier against the others?

    Returns the last value, the others' mean and std, the z-score, whether the last value lies
    outside the others' range, the verdict (``|z| > z_limit``, outside the range, and at least
    ``min_gap`` from the others' mean, so that a tiny spread cannot make noise an outlier) and the
    depth trend (slope of a least-squares line over the layers but the last, per layer).

    Example:
        >>> outlier_check([0.1, 0.12, 0.11, 0.9])["outlier"]
        True
    """
    vals = [v for v in series if not math.isnan(v)]
    out: dict[str, float | bool | str] = {"last": series[-1] if series else float("nan")}
    if len(vals) < 3 or math.isnan(series[-1]):
        return out | {"outlier": False, "z": float("nan"), "slope": float("nan"), "note": "needs 3+ layers"}
    others = torch.tensor(series[:-1], dtype=torch.float64)
    others = others[~others.isnan()]
    mean, std = float(others.mean()), float(others.std(unbiased=False))
    z = (series[-1] - mean) / max(std, 1e-6 * max(abs(mean), 1e-12), 1e-12)
    outside = series[-1] > float(others.max()) or series[-1] < float(others.min())
    x = torch.arange(len(others), dtype=torch.float64)
    slope = float(((x - x.mean()) * (others - mean)).sum() / ((x - x.mean()) ** 2).sum()) if len(others) > 1 else 0.0
    return out | {
        "mean_others": mean,
        "std_others": std,
        "z": z,
        "outside_range": outside,
        "outlier": bool(abs(z) > z_limit and outside and abs(series[-1] - mean) >= min_gap),
        "slope": slope,
    }


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _none_to_nan(x: Any) -> Any:
    if x is None:
        return float("nan")
    if isinstance(x, dict):
        return {k: _none_to_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return x


@dataclass
class Report:
    """Introspection results: tidy arrays and metadata (see the module docstring).

    Attributes:
        source: what was analysed.
        layers: block indices of the ``L`` MoE layers.
        members / kinds: the ``M`` members of S1/S2 maps (``e{i}``, ``s{i}``, ``F``).
        arrays: name -> tensor (fp32 / int64).
        meta: per-layer rows, headline numbers, trends, outlier checks, suggestions.
    """

    source: str
    layers: list[int]
    members: list[str]
    kinds: list[str]
    arrays: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, float]]:
        """One dict of headline numbers per layer."""
        rows: list[dict[str, float]] = self.meta["rows"]
        return rows

    def table(self, columns: list[str] | None = None) -> str:
        """The per-layer table as text (default: the headline columns; all are in ``meta["columns"]``)."""
        wanted = HEADLINE if columns is None else columns
        unknown = [c for c in wanted if columns is not None and c not in self.meta["columns"]]
        if unknown:
            raise ConfigError(f"unknown report column(s) {unknown}; available: {self.meta['columns']}")
        cols = [c for c in wanted if any(not math.isnan(r.get(c, float("nan"))) for r in self.rows)]
        head = f"{'layer':>5} " + " ".join(f"{c:>11}" for c in cols)
        lines = [head]
        for r in self.rows:
            lines.append(f"{int(r['layer']):>5} " + " ".join(f"{r.get(c, float('nan')):>11.4f}" for c in cols))
        lines.append("")
        for name, chk in self.meta["outliers"].items():
            if chk.get("outlier"):
                lines.append(
                    f"last layer is an outlier in {name}: {chk['last']:.4f} vs {chk['mean_others']:.4f} "
                    f"± {chk['std_others']:.4f} (z = {chk['z']:.1f})"
                )
        lines += [f"- {s}" for s in self.meta["suggestions"]]
        return "\n".join(lines)

    def save(
        self, directory: str | PathLike[str], *, overwrite: bool = False, sources: Sequence[str | PathLike[str]] = ()
    ) -> Path:
        """Write ``arrays.safetensors`` and ``report.json`` atomically into ``directory``.

        ``directory`` may be new, empty or a report modulart wrote (replaced atomically; files
        modulart did not write there, such as the figures, are kept). Any other non-empty folder
        raises :class:`~modulart.core.errors.UnsafePathError` unless ``overwrite=True``, which
        replaces only the report's two files and keeps every other file byte for byte. A
        ``directory`` equal to, inside or containing one of ``sources`` (the checkpoint the report
        was made from) is refused, ``overwrite`` or not.

        Example:
            >>> import tempfile
            >>> from modulart.introspect.toy import toy_moe
            >>> rep = report(toy_moe(), progress=False)
            >>> back = Report.load(rep.save(tempfile.mkdtemp() + "/rep"))
            >>> back.layers, torch.equal(back.arrays["s1.act"], rep.arrays["s1.act"])
            ([0, 1], True)
        """
        with atomic_directory(directory, kind="report", overwrite=overwrite, sources=sources) as tmp:
            save_file({k: v.contiguous() for k, v in self.arrays.items()}, str(tmp / "arrays.safetensors"))
            meta = {
                "format": FORMAT,
                "version": __version__,
                "source": self.source,
                "layers": self.layers,
                "members": self.members,
                "kinds": self.kinds,
            } | {"meta": _nan_to_none(self.meta)}
            (tmp / "report.json").write_text(json.dumps(meta, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | PathLike[str]) -> Report:
        """Read a report written by :meth:`save`.

        Raises:
            IncompatibleArtifactError: no ``report.json``, not JSON, a field of the wrong type, or an
                ``arrays.safetensors`` that is not a readable safetensors file.
            UnsafePathError: one of the two files is a symlink that leaves the folder.
        """
        d = Path(directory)
        recover(d)
        for name in ("report.json", "arrays.safetensors"):  # a symlink out of the folder is not read
            if (d / name).exists():
                inside(d, name)
        meta_path = d / "report.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IncompatibleArtifactError(f"{d}: no report.json (not an introspection report)") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise IncompatibleArtifactError(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise IncompatibleArtifactError(f"{meta_path}: format {got!r}, expected {FORMAT!r}")
        for name, kind in (("source", str), ("layers", list), ("members", list), ("kinds", list), ("meta", dict)):
            if not isinstance(meta.get(name), kind):
                raise IncompatibleArtifactError(
                    f"{meta_path}: field {name!r} must be a {kind.__name__}, got {type(meta.get(name)).__name__}"
                )
        arrays_path = d / "arrays.safetensors"
        try:
            arrays = load_file(str(arrays_path))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
            raise IncompatibleArtifactError(f"{arrays_path}: not a readable safetensors file ({e})") from None
        return cls(meta["source"], meta["layers"], meta["members"], meta["kinds"], arrays, _none_to_nan(meta["meta"]))

    def plot(self, directory: str | PathLike[str]) -> list[Path]:
        """Render the figures as PNG files into ``directory`` (needs matplotlib, the ``plot`` extra)."""
        from modulart.introspect.plots import plot_report

        return plot_report(self, Path(directory))


def _static(
    w: Weights,
    arrays: dict[str, torch.Tensor],
    rows: list[dict[str, float]],
    trends: dict[str, list[float]],
    meta: dict[str, Any],
) -> tuple[list[str], list[str]]:
    mats = w.matrices
    w.scan(mats, pca=mats[:1])  # one pass: S1, S2, S4 and the S5 expert PCA of the first matrix
    members, kinds = [], []
    for m in mats:
        s1, s2 = w.expert_similarity(m, "matrix"), w.expert_similarity(m, "neuron_mean")
        members, kinds = s1.members, s1.kinds
        arrays[f"s1.{m}"], arrays[f"s2.{m}"] = s1.values, s2.values
        trends[f"s1.{m}"] = s1.expert_mean().tolist()
        trends[f"s2.{m}"] = s2.expert_mean().tolist()
        if "F" in s1.members:
            trends[f"s1_dense.{m}"] = s1.dense_mean().tolist()
    gve = w.gate_vs_experts(mats)
    arrays["s4.router_cosine"] = gve.router_cosine
    for m in mats:
        arrays[f"s4.expert_cosine.{m}"] = gve.expert_cosine[m]
        arrays[f"s4.r.{m}"] = gve.r[m]
    pca = w.pca(mats[0], level="experts")
    arrays["s5.experts"], arrays["s5.explained"] = pca.coords, pca.explained
    meta["s5_labels"] = pca.labels
    meta["headline"] = {"mean_r2": dict(gve.mean_r2)}
    for i in range(len(w.layers)):
        row = rows[i]
        for m in mats:
            row[f"S1 {m}"] = trends[f"s1.{m}"][i]
            if f"s1_dense.{m}" in trends:
                row[f"S1 {m}-F"] = trends[f"s1_dense.{m}"][i]
            row[f"S2 {m}"] = trends[f"s2.{m}"][i]
            row[f"S4 R {m}"] = float(gve.r[m][i])
    return members, kinds


def _dynamic(
    model: nn.Module,
    inputs: ModelInputs,
    experts: ExpertsSpec | None,
    layers: list[int],
    arrays: dict[str, torch.Tensor],
    rows: list[dict[str, float]],
    trends: dict[str, list[float]],
    meta: dict[str, Any],
    dense: nn.Module | None,
    options: IntrospectOptions,
) -> None:
    r = routing(model, inputs, experts=experts, layers=layers, dense=dense, options=options)
    meta["d1_members"], meta["d2_ranks"] = r.members, options.d2_ranks
    d1 = r.output_similarity()
    sel, oth = r.selected_similarity()
    c = r.norm_score_correlation()
    cons, chance = r.consecutive_same_expert()
    arrays |= {
        "d1.angular": d1,
        "d1.selected": sel,
        "d1.other": oth,
        "d2.counts": r.norm_score_counts(),
        "d2.spearman": c.spearman,
        "d2.kendall": c.kendall,
        "d2.hit_rate": c.hit_rate,
        "d2.chance": c.chance,
        "d3.ratio": r.activation_ratio(),
        "d4.consecutive": cons,
        "d4.consecutive_chance": chance,
        "d4.map": torch.stack([r.routing_map(i) for i in r.layers]),
        "d4.seq": r.records[-1].seq[:64].clone(),
    }
    n_routed = int(arrays["d2.counts"].shape[1])
    trends["d1"] = [offdiag_mean(x, range(n_routed)) for x in d1]  # routed experts (as without F / shared)
    for i, row in enumerate(rows):
        row |= {
            "D1 angular": trends["d1"][i],
            "D1 selected": float(sel[i]),
            "D1 other": float(oth[i]),
            "D2 spearman": float(c.spearman[i]),
            "D2 hit": float(c.hit_rate[i]),
            "D3 active": float(arrays["d3.ratio"][i]),
            "D4 consec": float(cons[i]),
        }


def _suggestions(
    rows: list[dict[str, float]], trends: dict[str, list[float]], outliers: dict[str, Any], emoe: bool, experts: int
) -> list[str]:
    out = []
    s1 = trends.get("s1.act", [])
    if s1:
        mean = sum(s1) / len(s1)
        if mean > 0.5:
            out.append(
                f"experts are alike (mean act-matrix cosine {mean:.2f}): they look upcycled from one FFN; "
                "training from scratch gives more diverse experts"
            )
        else:
            out.append(f"experts are distinct (mean act-matrix cosine {mean:.2f})")
    slope = outliers.get("s1.act", {}).get("slope", float("nan"))
    if not math.isnan(slope) and slope * (len(s1) - 2) < -0.05:  # a drop of 0.05+ over depth, not noise
        out.append(
            f"weight similarity falls with depth (slope {slope:.3f}/layer): deeper layers are more diverse; "
            "consider more experts in deeper layers"
        )
    if any(chk.get("outlier") for chk in outliers.values()):
        out.append("the last layer is an outlier: consider a different (e.g. smaller) expert count there")
    sp = [r["D2 spearman"] for r in rows if "D2 spearman" in r]
    if sp:
        m = sum(sp) / len(sp)
        verdict = (
            "the router tends to pick large-norm experts: norm-aware routing is worth trying"
            if m > 0.3
            else ("router scores and expert output norms are only weakly related")
        )
        out.append(f"D2 mean per-token Spearman(norm, score) = {m:.2f}: {verdict}")
    r4 = [r["S4 R act"] ** 2 for r in rows if "S4 R act" in r and not math.isnan(r["S4 R act"])]
    if emoe:
        out.append("S4 act is 1 by construction here: EMoE's avg-k router rows are the experts' mean key rows")
    elif r4 and experts * (experts - 1) // 2 < 20:
        out.append(f"S4 over {experts * (experts - 1) // 2} expert pairs per layer is too few to judge")
    elif r4 and sum(r4) / len(r4) > 0.2:
        out.append(
            f"router rows follow the experts' mean act neurons (mean R² {sum(r4) / len(r4):.2f}): neurons act "
            "like fine-grained experts; neuron-level expert operations are promising"
        )
    return out


def report(
    model_or_dir: nn.Module | str | PathLike[str],
    inputs: ModelInputs | None = None,
    *,
    dense: DenseSpec = None,
    experts: ExpertsSpec | None = None,
    layers: LayersArg = None,
    budget_mb: float = 128,
    progress: bool | None = None,
    reorder_neurons: int | None = 256,
    options: OptionsArg = None,
    on_layer: Callable[[LayerDone], None] | None = None,
) -> Report:
    """All static analyses (and the dynamic ones when ``inputs`` are given) with trends and the outlier check.

    Args:
        model_or_dir: a live model or a safetensors checkpoint directory (static analyses only).
        inputs: model inputs for D1–D4 (live models only); see :func:`~modulart.introspect.routing`.
        dense, experts, layers, budget_mb, progress: as for :func:`~modulart.introspect.weights`.
        reorder_neurons: S3 on experts (0, 1) of every layer with this many sampled neurons (linear
            assignment when scipy is installed, else the nearest-neuron proxy); None skips S3.
        options: an :class:`~modulart.introspect.options.IntrospectOptions`, ``"reference"`` (the
            reference notebooks' computations: per-matrix S3, rounded S4 mean, F in S5 and, with a
            live ``dense`` model and ``inputs``, in D1; shared experts in D1; ascending D2 ranks) or
            None (modulart's defaults).
        on_layer: called with a :class:`~modulart.introspect.weight_analysis.LayerDone` after each
            layer of the streaming weight pass (the CLI prints one progress line per layer with it).

    Example:
        >>> from modulart.introspect.toy import toy_moe
        >>> rep = report(toy_moe(), torch.randn(2, 6, 16), progress=False)
        >>> rep.layers, rep.rows[0]["D3 active"] > 0.9, tuple(rep.arrays["d2.counts"].shape)
        ([0, 1], True, (2, 4, 4))
    """
    rn = reorder_neurons
    if rn is not None and not (isinstance(rn, int) and not isinstance(rn, bool) and rn >= 0):
        raise ConfigError(f"reorder_neurons = {rn!r}: must be None or an int >= 0 (0 or None: skip S3)")
    if inputs is not None and not isinstance(model_or_dir, torch.nn.Module):
        raise ConfigError("inputs= needs a live model: the dynamic analyses run the model (a directory is streamed)")
    opts = resolve_options(options)
    if opts.d1_dense and inputs is not None and dense is not None and not isinstance(dense, nn.Module):
        raise ConfigError(
            "options.d1_dense: D1 runs the dense reference on the inputs, so dense= must be a live model "
            f"(got {type(dense).__name__}); pass the model or set d1_dense=False"
        )
    w = weights(
        model_or_dir,
        dense=dense,
        experts=experts,
        layers=layers,
        budget_mb=budget_mb,
        progress=progress,
        options=opts,
        on_layer=on_layer,
    )
    arrays: dict[str, torch.Tensor] = {}
    rows: list[dict[str, float]] = [{"layer": float(i)} for i in w.layers]
    trends: dict[str, list[float]] = {}
    extra: dict[str, Any] = {}
    members, kinds = _static(w, arrays, rows, trends, extra)
    s3_method = None
    per_matrix: dict[str, list[float]] = {}
    if reorder_neurons:
        s3_method = "assignment" if importlib.util.find_spec("scipy") is not None else "nearest"
        taus, after = [], []
        for i, layer in enumerate(w.layers):
            res = w.reorder_similarity(layer, (0, 1), max_neurons=reorder_neurons, method=s3_method)
            taus.append(res.tau)
            after.append(sum(res.after.values()) / len(res.after))
            rows[i] |= {"S3 tau": res.tau, "S3 after": after[-1]}
            if res.per_matrix:
                rows[i] |= {f"S3 tau {m}": t for m, t in res.taus.items()}
                for m, t in res.taus.items():
                    per_matrix.setdefault(m, []).append(t)
        arrays["s3.tau"], arrays["s3.after"] = torch.tensor(taus), torch.tensor(after)
        arrays |= {f"s3.tau.{m}": torch.tensor(v) for m, v in per_matrix.items()}
    if inputs is not None and isinstance(model_or_dir, nn.Module):  # checked above
        d1_dense = dense if opts.d1_dense and isinstance(dense, nn.Module) else None
        _dynamic(model_or_dir, inputs, experts, w.layers, arrays, rows, trends, extra, d1_dense, opts)
    for k, v in trends.items():
        arrays[f"trend.{k}"] = torch.tensor(v)
    outliers = {k: outlier_check(v) for k, v in trends.items()}
    columns = [c for c in rows[0] if c != "layer"]
    n_experts = int(arrays["s4.router_cosine"].shape[1])
    source = str(model_or_dir) if not isinstance(model_or_dir, torch.nn.Module) else type(model_or_dir).__name__
    meta = {
        "rows": rows,
        "columns": columns,
        "trends": trends,
        "outliers": outliers,
        "suggestions": _suggestions(rows, trends, outliers, experts is not None, n_experts),
        "s3_method": s3_method,
        "options": opts.to_dict(),
        **extra,
    }
    return Report(source, list(w.layers), members, kinds, arrays, meta)
