"""The ``modulart`` command line.

Example:
    $ modulart tour        # the guided run on the embedded real model
    $ modulart version
    $ modulart operators   # registered operators (built-in and plug-ins)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from modulart._version import __version__
from modulart.core.errors import ModulartError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modulart", description="Operators over the modular structure of transformers.")
    p.add_argument("--version", action="version", version=f"modulart {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="run the guided tour on the embedded all-MiniLM-L6-v2 and a tiny Mixtral")
    tour.add_argument("--out", default=None, help="folder for the tour's files (default: a new temporary folder)")
    sub.add_parser("version", help="print the version")
    sub.add_parser("operators", help="list registered operators")
    from modulart.introspect.cli import add_inspect_parser
    from modulart.stacking.cli import add_grow_parser

    add_grow_parser(sub)
    add_inspect_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``modulart`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"modulart {__version__}")
        elif args.command == "operators":
            from modulart.core.operator import available_operators

            names = available_operators()
            print("\n".join(names) if names else "(no operators registered yet)")
        elif args.command == "tour":
            from modulart.tour import run_tour

            run_tour(print, out=args.out)
        elif args.command == "inspect":
            from modulart.introspect.cli import run_inspect

            return run_inspect(args, print)
        elif args.command == "grow":
            from modulart.stacking.cli import run_grow

            return run_grow(args, print)
    except ModulartError as e:
        print(f"modulart: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
