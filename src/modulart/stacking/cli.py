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
import re
import sys
import time
from collections.abc import Callable

from modulart.cli import (
    UsageError,
    check_output_path,
    exit_code,
    nonnegative_int,
    one_line,
    positive_int,
    resolve_input,
)
from modulart.core.errors import ConfigError, IncompatibleArtifactError, ModulartError
from modulart.stacking.checkpoint import grow_checkpoint, source_config, source_layers
from modulart.stacking.plan import LayerPlan
from modulart.stacking.sfio import parse_size
from modulart.stacking.source import Source, open_source

__all__ = ["GROW_FLAGS", "add_grow_parser", "run_grow"]

GROW_FLAGS: dict[str, str] = {
    "max_shard_size": "--max-shard-size",
    "blocks": "--blocks",
    "operator": "--operator",
    "dst": "DST",
    "src": "SRC",
}
"""Python argument of :func:`~modulart.stacking.checkpoint.grow_checkpoint` -> the ``grow`` flag it comes from."""


def add_grow_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``grow`` sub-command to a ``modulart`` sub-parser set."""
    p = sub.add_parser(
        "grow",
        help="grow a checkpoint's depth (G_stack and friends), streaming tensor by tensor",
        description="Grow a sharded safetensors checkpoint (or a .safetensors / lit-gpt .pth file) on disk: "
        "block i of the output is a copy of source block plan[i]. SRC may be a Hugging Face Hub repo id in the "
        "local cache (nothing is downloaded).",
    )
    p.add_argument("src", help="checkpoint directory, .safetensors file, lit-gpt .pth, or a cached Hub repo id")
    p.add_argument("dst", help="output directory (written atomically; must not exist unless --overwrite)")
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it exists (an empty folder or a checkpoint grown by modulart; other files are kept)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(flags=GROW_FLAGS)


def _plan_error(e: ConfigError, flag: str, value: object) -> UsageError:
    """A :class:`~modulart.stacking.plan.LayerPlan` error as the flag that built the plan."""
    text = one_line(e)
    text = re.sub(r"^plan '[^']*': ", "", text)
    text = re.sub(r"^LayerPlan\.indices\[(\d+)\] = (\S+): ", r"position \1 names layer \2: ", text)
    text = re.sub(r"^LayerPlan[.\w ]* = \S+: ", "", text)
    return UsageError(f"{flag} {value!r}: {text}" if isinstance(value, str) else f"{flag} {value}: {text}")


def _layers(source: Source, blocks: str | None, name: str) -> tuple[str, dict[int, set[str]]]:
    """The source's block list; a checkpoint without a usable one is a runtime failure (status 1)."""
    try:
        prefix, layers, _ = source_layers(source, blocks, source_config(source))
    except ConfigError as e:
        text = str(e)
        if text.startswith("blocks=") or "pass blocks=" in text:  # the --blocks flag at fault: a usage error
            raise UsageError(one_line(e, GROW_FLAGS)) from e
        raise IncompatibleArtifactError(f"SRC {name!r}: {text}") from e  # no block list, a missing tensor
    return prefix, layers


def _plan(args: argparse.Namespace, depth: int) -> LayerPlan:
    try:
        if args.factor is not None:
            return LayerPlan.stack(depth, args.factor)
        if args.interleave is not None:
            return LayerPlan.interleave(depth, args.interleave)
        if args.dus is not None:
            return LayerPlan.dus(depth, args.dus)
        return LayerPlan.parse(args.plan, depth)
    except ConfigError as e:
        for flag in ("factor", "interleave", "dus", "plan"):
            if getattr(args, flag) is not None:
                raise _plan_error(e, f"--{flag}", getattr(args, flag)) from e
        raise  # pragma: no cover - argparse requires one of the four


def run_grow(
    args: argparse.Namespace, echo: Callable[[str], None], *, errors: Callable[[str], None] | None = None
) -> int:
    """Run ``modulart grow``; returns the exit status (``modulart.cli.EXIT_CODES``).

    A bad input is reported as one line ``modulart: error: grow: <reason>`` through ``errors``
    (default: ``echo``) before anything is written, naming the flag at fault: status 2 for a usage
    error (a bad plan or option, a missing source, a refused DST), 1 for a runtime failure (an
    unreadable source, a checkpoint without blocks). Off a terminal, progress is a few plain lines
    through ``echo`` (on one, a tqdm bar); ``--no-progress`` silences both.
    """
    report = errors or echo
    quiet = bool(getattr(args, "no_progress", False))
    try:
        src = resolve_input(args.src, flag="SRC")
        check_output_path(
            args.dst,
            sources=[src],
            kind="checkpoint",
            overwrite=args.overwrite,
            flag="DST",
            must_not_exist=True,
            foreign_ok=False,
        )
        if src.is_dir() and not any(src.glob("*.safetensors")) and not (src / "model.safetensors.index.json").exists():
            raise UsageError(
                f"SRC {args.src!r} is not a checkpoint: no model.safetensors.index.json and no *.safetensors"
            )
        try:
            parse_size(args.max_shard_size)
        except ConfigError as e:
            raise UsageError(one_line(e, GROW_FLAGS)) from e
        source = open_source(src)
        prefix, layers = _layers(source, args.blocks, args.src)
        plan = _plan(args, len(layers))
        echo(f"plan: {plan.describe()} over {prefix!r}, operator {args.operator!r}")
        tty = sys.stderr.isatty()
        if not quiet and not tty:
            echo(f"grow: writing {len(plan.indices)} blocks to {args.dst} ...")
        start = time.perf_counter()
        try:
            out = grow_checkpoint(
                src,
                args.dst,
                plan,
                operator=args.operator,
                max_shard_size=args.max_shard_size,
                blocks=prefix,
                overwrite=args.overwrite,
                progress=False if quiet or not tty else None,
            )
        except ConfigError as e:  # the flags are checked above: what is left is the model (its config, its tensors)
            raise IncompatibleArtifactError(f"SRC {args.src!r}: {one_line(e, GROW_FLAGS)}") from e
    except ModulartError as e:
        report(f"modulart: error: grow: {one_line(e, GROW_FLAGS)}")
        return exit_code(e)
    n = len(list(out.glob("*.safetensors")))
    took = f" in {time.perf_counter() - start:.1f} s" if not quiet else ""
    echo(f"wrote {out} ({n} shard{'s' if n != 1 else ''}){took}")
    return 0
