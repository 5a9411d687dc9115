"""The ``modulart`` command line.

A user error (a bad argument, a missing or corrupt file, an unsupported model) prints one line,
``modulart: error: <message>``, on stderr and exits with a documented status (:data:`EXIT_CODES`);
only a bug (an exception that is not a :class:`~modulart.core.errors.ModulartError`) prints a
traceback.

Example:
    $ modulart tour        # the guided run on the embedded real model
    $ modulart version
    $ modulart operators   # registered operators (built-in and plug-ins)
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from modulart._version import __version__
from modulart.core.errors import (
    ArtifactNotFoundError,
    IncompatibleArtifactError,
    ModulartError,
    UnsafePathError,
    UnsupportedModuleError,
)

__all__ = ["EXIT_CODES", "exit_code", "main", "nonnegative_int", "one_line", "positive_int", "positive_number"]

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error: a bug in modulart (the only case that prints a traceback; please report it)",
    2: "bad command line: unknown command or option, a malformed or out-of-range value, a bad layer "
    "specification or plan, an input path that does not exist, an output that exists without --overwrite",
    3: "bad file: an input checkpoint / artefact that is unreadable, corrupt or inconsistent, or an output "
    "refused because writing it could destroy files (user files in it, or it holds or lies inside the input)",
    4: "unsupported model: the checkpoint has no structure the command can read (e.g. no MoE layers)",
    130: "interrupted (Ctrl-C); outputs are written atomically, so nothing half-written is left",
}
"""Exit status of ``modulart`` -> meaning (also the table in ``docs/errors.md``)."""


def exit_code(error: BaseException) -> int:
    """The exit status of ``modulart`` for ``error`` (see :data:`EXIT_CODES`).

    Example:
        >>> from modulart.core.errors import ConfigError, UnsafePathError
        >>> exit_code(ConfigError("x")), exit_code(UnsafePathError("x")), exit_code(KeyError("x"))
        (2, 3, 1)
    """
    if isinstance(error, KeyboardInterrupt):
        return 130
    if not isinstance(error, ModulartError):
        return 1
    if isinstance(error, ArtifactNotFoundError):
        return 2
    if isinstance(error, (IncompatibleArtifactError, UnsafePathError)):
        return 3
    if isinstance(error, UnsupportedModuleError):
        return 4
    return 2


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_number(text: str) -> float:
    """``argparse`` type: a finite number > 0.

    Example:
        >>> positive_number("2.5")
        2.5
        >>> positive_number("-1")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a finite number > 0, got '-1'
    """
    v = _number(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1.

    Example:
        >>> positive_int("4")
        4
    """
    v = _integer(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0.

    Example:
        >>> nonnegative_int("0")
        0
    """
    v = _integer(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return v


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``modulart: error: ...`` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("modulart").strip()
        hint = f" (see modulart {where + ' ' if where else ''}--help)"
        self.exit(2, f"modulart: error: {where + ': ' if where else ''}{message}{hint}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modulart", description="Operators over the modular structure of transformers.")
    p.add_argument("--version", action="version", version=f"modulart {__version__}")
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = p.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    tour = sub.add_parser("tour", help="run the guided tour on the embedded all-MiniLM-L6-v2 and a tiny Mixtral")
    tour.add_argument("--out", default=None, help="folder for the tour's files (default: a new temporary folder)")
    sub.add_parser("version", help="print the version")
    sub.add_parser("operators", help="list registered operators")
    from modulart.introspect.cli import add_inspect_parser
    from modulart.stacking.cli import add_grow_parser

    add_grow_parser(sub)
    add_inspect_parser(sub)
    return p


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
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

        return run_inspect(args, print, errors=_error)
    elif args.command == "grow":
        from modulart.stacking.cli import run_grow

        return run_grow(args, print, errors=_error)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``modulart`` console script; returns the exit status (:data:`EXIT_CODES`).

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     code = main(["grow", "no/such/dir", "out", "--factor", "0"])
        >>> code, err.getvalue().splitlines()[0].startswith("modulart: error: grow: argument --factor")
        (2, True)
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return _run(args)
    except ModulartError as e:
        _error(f"modulart: error: {args.command}: {one_line(e)}")
        return exit_code(e)
    except KeyboardInterrupt:
        _error("modulart: interrupted")
        return 130
    except Exception as e:  # a bug: keep the traceback
        traceback.print_exc()
        _error(f"modulart: internal error (a bug in modulart {__version__}, please report it): {type(e).__name__}")
        return 1


def one_line(error: BaseException) -> str:
    """The error's message on one line, with the API's ``overwrite=True`` advice as the CLI flag.

    Example:
        >>> one_line(ValueError("a\\n  b: pass overwrite=True"))
        'a b: pass --overwrite'
    """
    text = " ".join(str(error).split()) or type(error).__name__
    return text.replace("pass overwrite=True", "pass --overwrite")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
