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
    how.add_argument("--factor", type=int, help="G_stack: repeat all layers N times in order (0..L-1, 0..L-1, ...)")
    how.add_argument("--plan", help="explicit plan of source layers, e.g. '0-5,0-5' (inclusive ranges)")
    how.add_argument("--interleave", type=int, metavar="N", help="repeat each layer N times in place (0,0,1,1,...)")
    how.add_argument("--dus", type=int, metavar="DROP", help="SOLAR depth up-scaling: [0, L-DROP) + [DROP, L)")
    p.add_argument("--operator", default="direct", choices=["direct", "zero"], help="growth operator")
    p.add_argument("--max-shard-size", default="5GB", help="cap of an output shard (e.g. 2GB, 500MB)")
    p.add_argument("--blocks", default=None, help="tensor-name prefix of the block list (default: discovered)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_grow(args: argparse.Namespace, echo: Callable[[str], None]) -> int:
    """Run ``modulart grow``; returns the exit status (2 on bad input, with the reason echoed)."""
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
        echo(f"error: {e}")
        return 2
    n = len(list(out.glob("*.safetensors")))
    echo(f"wrote {out} ({n} shard{'s' if n != 1 else ''})")
    return 0
