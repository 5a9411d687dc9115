"""``modulart grow SRC DST --factor 4`` (or ``--plan 0-5,0-5``): grow a checkpoint on disk.

Example:
    >>> import argparse
    >>> from modulart.stacking.cli import add_grow_parser
    >>> parser = argparse.ArgumentParser(prog="modulart"); sub = parser.add_subparsers(dest="command")
    >>> add_grow_parser(sub)
    >>> args = parser.parse_args(["grow", "small/", "big/", "--factor", "4"])
    >>> args.factor, args.operator, args.max_shard_size
    (4, 'direct', '5GB')
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from modulart.cli import exit_code, nonnegative_int, one_line, positive_int
from modulart.core.errors import ModulartError
from modulart.stacking.checkpoint import grow_checkpoint, source_config, source_layers
from modulart.stacking.plan import LayerPlan
from modulart.stacking.source import open_source

__all__ = ["add_grow_parser", "run_grow"]


def add_grow_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``grow`` sub-command to a ``modulart`` sub-parser set."""
    p = sub.add_parser(
        "grow",
        help="grow a checkpoint's depth (G_stack and friends), streaming tensor by tensor",
        description="Grow a sharded safetensors checkpoint (or a .safetensors / lit-gpt .pth file) on disk: "
        "block i of the output is a copy of source block plan[i].",
    )
    p.add_argument("src", help="checkpoint directory, .safetensors file or lit-gpt .pth")
    p.add_argument("dst", help="output directory (written atomically)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--factor", type=positive_int, help="G_stack: repeat all layers N >= 1 times in order (0..L-1, 0..L-1, ...)"
    )
    how.add_argument("--plan", help="explicit plan of source layers, e.g. '0-5,0-5' (inclusive ranges)")
    how.add_argument(
        "--interleave", type=positive_int, metavar="N", help="repeat each layer N >= 1 times in place (0,0,1,1,...)"
    )
    how.add_argument(
        "--dus", type=nonnegative_int, metavar="DROP", help="SOLAR depth up-scaling: [0, L-DROP) + [DROP, L)"
    )
    p.add_argument("--operator", default="direct", choices=["direct", "zero"], help="growth operator")
    p.add_argument("--max-shard-size", default="5GB", help="cap of an output shard (e.g. 2GB, 500MB)")
    p.add_argument("--blocks", default=None, help="tensor-name prefix of the block list (default: discovered)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_grow(
    args: argparse.Namespace, echo: Callable[[str], None], *, errors: Callable[[str], None] | None = None
) -> int:
    """Run ``modulart grow``; returns the exit status (``modulart.cli.EXIT_CODES``).

    A bad input is reported as one line ``modulart: error: <reason>`` through ``errors`` (default:
    ``echo``) before anything is written: status 2 for a bad plan / option or a missing source, 3 for
    an unreadable source or an output that would destroy files, 4 for a checkpoint without blocks.
    """
    report = errors or echo
    if not Path(args.src).exists():
        report(f"modulart: error: grow: {args.src}: no such checkpoint file or directory")
        return 2
    try:
        source = open_source(args.src)
        prefix, layers, _ = source_layers(source, args.blocks, source_config(source))
        depth = len(layers)
        if args.factor is not None:
            plan = LayerPlan.stack(depth, args.factor)
        elif args.interleave is not None:
            plan = LayerPlan.interleave(depth, args.interleave)
        elif args.dus is not None:
            plan = LayerPlan.dus(depth, args.dus)
        else:
            plan = LayerPlan.parse(args.plan, depth)
        echo(f"plan: {plan.describe()} over {prefix!r}, operator {args.operator!r}")
        out = grow_checkpoint(
            args.src,
            args.dst,
            plan,
            operator=args.operator,
            max_shard_size=args.max_shard_size,
            blocks=prefix,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
        )
    except ModulartError as e:
        report(f"modulart: error: grow: {one_line(e)}")
        return exit_code(e)
    n = len(list(out.glob("*.safetensors")))
    echo(f"wrote {out} ({n} shard{'s' if n != 1 else ''})")
    return 0
