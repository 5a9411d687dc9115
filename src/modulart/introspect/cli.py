"""``modulart inspect PATH``: the introspection report of a checkpoint directory, printed and plotted.

The weights are streamed one layer at a time (static analyses S1–S5); the per-layer table is
printed, and the report (``arrays.safetensors`` + ``report.json``) and the figures are written to
``--out``. Everything is validated (keys, shapes, layer specification) before anything is written.

``--reference`` computes S3–S5 as the paper's reference notebooks do
(:meth:`~modulart.introspect.options.IntrospectOptions.reference`).

PATH and ``--dense`` may be Hugging Face Hub repo ids in the local cache (nothing is downloaded).

Example:
    $ modulart inspect ./mixtral-ckpt --out ./mixtral-introspect --dense ./mistral-ckpt
    $ modulart inspect mistralai/Mixtral-8x7B-v0.1 --layers last_half   # from the local Hub cache
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from modulart.cli import (
    check_output_path,
    input_name,
    nonnegative_int,
    one_line,
    positive_number,
    resolve_input,
)
from modulart.core.errors import ArtifactNotFoundError, OutOfRangeError, SelectorError

if TYPE_CHECKING:
    from modulart.introspect.weight_analysis import LayerDone

__all__ = ["INSPECT_FLAGS", "add_inspect_parser", "progress_line", "run_inspect"]

INSPECT_FLAGS: dict[str, str] = {
    "layers": "--layers",
    "dense": "--dense",
    "budget_mb": "--budget-mb",
    "reorder_neurons": "--reorder-neurons",
    "directory": "--out",
    "path": "PATH",
}
"""Python argument of :func:`~modulart.introspect.reporting.report` -> the ``inspect`` flag it comes from."""


def add_inspect_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``inspect`` sub-command to a sub-parser set.

    Example:
        >>> p = argparse.ArgumentParser(prog="modulart")
        >>> add_inspect_parser(p.add_subparsers(dest="command"))
        >>> a = p.parse_args(["inspect", "ckpt", "--layers", "0-3"])
        >>> a.command, a.path, a.layers, a.budget_mb, a.reference
        ('inspect', 'ckpt', '0-3', 128, False)
    """
    p = sub.add_parser(
        "inspect",
        help="MoE introspection of a safetensors checkpoint: per-layer table, report and figures",
        description="Stream a MoE checkpoint one layer at a time; print the headline numbers per layer "
        "(expert similarity, router vs experts, depth trends) and write the report and PNG figures. PATH and "
        "--dense may be Hugging Face Hub repo ids in the local cache (nothing is downloaded).",
    )
    p.add_argument(
        "path", help="checkpoint directory (*.safetensors, sharded with an index or not) or a cached Hub repo id"
    )
    p.add_argument("--out", default=None, help="output folder (default: ./<checkpoint name>-introspect)")
    p.add_argument(
        "--dense", default=None, help="dense reference checkpoint directory or cached Hub repo id (adds the F column)"
    )
    p.add_argument("--layers", default=None, help="MoE layers to analyse, e.g. '0-3,-1' or 'last_half'")
    p.add_argument(
        "--budget-mb", type=positive_number, default=128, help="fp32 MB per chunk, > 0 (two in flight; default 128)"
    )
    p.add_argument(
        "--reorder-neurons", type=nonnegative_int, default=256, help="S3 sampled neurons per layer, >= 0 (0: skip)"
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="compute as the paper's reference notebooks (per-matrix S3, S4 R² rounded to 2 decimals, F in the "
        "S5 PCA with sample-std z-scores); see IntrospectOptions.reference()",
    )
    p.add_argument("--no-plots", action="store_true", help="write the report only, no figures")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds other files (only the report's own files are replaced)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(flags=INSPECT_FLAGS)


def progress_line(event: LayerDone) -> None:
    """One progress line per analysed layer, on stderr (off a terminal; on one, a tqdm bar instead).

    Example:
        >>> import contextlib, io
        >>> from modulart.introspect.weight_analysis import LayerDone
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     progress_line(LayerDone(3, 32, 5, 0.84))
        >>> err.getvalue()
        'inspect: layer 3/32 (block 5) done in 0.8 s\\n'
    """
    print(
        f"inspect: layer {event.done}/{event.total} (block {event.layer}) done in {event.seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def _layers(spec: str | None) -> int | str | None:
    if spec is None:
        return None
    try:
        return int(spec)
    except ValueError:
        return spec


def run_inspect(
    args: argparse.Namespace, echo: Callable[[str], None], *, errors: Callable[[str], None] | None = None
) -> int:
    """Run ``modulart inspect`` with parsed ``args``; print through ``echo``; returns the exit status.

    ``args.path`` (and ``args.dense``) may be a Hub repo id in the local cache
    (:func:`~modulart.cli.resolve_input`). A checkpoint path that is missing (or a repo id that is
    not cached) or is not a directory is reported through ``errors`` (default: ``echo``) as one
    line, exit status 2; every other bad input raises its typed error before anything is written
    (``modulart.cli.main`` turns it into one line and an exit status): a refused ``--out`` as a
    :class:`~modulart.cli.UsageError`, a bad ``--layers`` as the selector error naming the flag.
    Off a terminal, progress is plain lines: the start and the total through ``echo``, one line per
    analysed layer on stderr (:func:`progress_line`); on a terminal, a tqdm bar.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/out"
        >>> t = {"model.layers.0.mlp.gate.weight": torch.randn(2, 4)}
        >>> for e in range(2):
        ...     for n, s in (("gate_proj", (6, 4)), ("up_proj", (6, 4)), ("down_proj", (4, 6))):
        ...         t[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = torch.randn(*s)
        >>> save_file(t, f"{d}/model.safetensors")
        >>> p = argparse.ArgumentParser(prog="modulart")
        >>> add_inspect_parser(p.add_subparsers(dest="command"))
        >>> lines = []
        >>> run_inspect(p.parse_args(["inspect", d, "--out", out, "--no-plots", "--no-progress"]), lines.append)
        0
        >>> lines[0].endswith("1 MoE layers, members ['e0', 'e1']")
        True
    """
    from modulart.introspect.reporting import report

    try:
        path = resolve_input(args.path, flag="PATH")
    except ArtifactNotFoundError as e:
        said, head = one_line(e), f"PATH {args.path!r}: "
        (errors or echo)(
            f"modulart: error: inspect: PATH {args.path!r} is not a checkpoint directory: {said[len(head) :]}"
        )
        return 2
    if not path.is_dir():
        (errors or echo)(f"modulart: error: inspect: {args.path} is not a checkpoint directory")
        return 2
    dense = resolve_input(args.dense, flag="--dense") if args.dense is not None else None
    out = Path(args.out) if args.out else Path.cwd() / f"{input_name(args.path)}-introspect"
    overwrite = bool(getattr(args, "overwrite", False))
    sources = [path, *([dense] if dense is not None else [])]
    check_output_path(out, sources=sources, kind="report", overwrite=overwrite, flag="--out")  # before the long read
    quiet = bool(getattr(args, "no_progress", False))
    tty = sys.stderr.isatty()
    if not quiet and not tty:
        echo(f"inspect: streaming {path} one layer at a time (chunks of {args.budget_mb:g} MB) ...")
    start = time.perf_counter()
    try:
        rep = report(
            path,
            dense=dense,
            layers=_layers(args.layers),
            budget_mb=args.budget_mb,
            progress=False if quiet or not tty else None,
            reorder_neurons=args.reorder_neurons or None,
            options="reference" if getattr(args, "reference", False) else None,
            on_layer=progress_line if not quiet and not tty else None,
        )
    except (SelectorError, OutOfRangeError) as e:
        if args.layers is None:
            raise
        raise type(e)(f"--layers {args.layers!r}: {e}") from e
    took = f" in {time.perf_counter() - start:.1f} s" if not quiet else ""
    echo(f"{path}: {len(rep.layers)} MoE layers, members {rep.members}{took}")
    echo(rep.table())
    rep.save(out, overwrite=overwrite, sources=sources)
    echo(f"report: {out / 'report.json'} + {out / 'arrays.safetensors'}")
    if not args.no_plots:
        for f in rep.plot(out):
            echo(f"figure: {f}")
    return 0
