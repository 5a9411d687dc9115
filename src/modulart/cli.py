"""The ``modulart`` command line.

Commands: ``tour``, ``inspect``, ``grow``, ``emoe``, ``bench``, ``operators``, ``version`` (each
with ``--help``; ``docs/cli.md`` describes them). Every command exits with the same status for the
same kind of failure (:data:`EXIT_CODES`): 0 success, 1 runtime failure, 2 usage error, 130
interrupted. A failure prints one line, ``modulart: error: <command>: <message>``, on stderr; the
message names command-line flags (``--overwrite``), never the Python arguments behind them. Only a
bug (an exception that is not a :class:`~modulart.core.errors.ModulartError`) prints a traceback.

Where a command reads a checkpoint folder it also accepts a Hugging Face Hub repo id
(``org/name`` or ``org/name@revision``), resolved offline from the local Hub cache
(:func:`resolve_input`): nothing is downloaded.

Example:
    $ modulart tour        # the guided run on the embedded real model
    $ modulart version
    $ modulart operators   # registered operators (built-in and plug-ins)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from modulart._version import __version__
from modulart.core.errors import (
    ArtifactNotFoundError,
    ConfigError,
    IncompatibleArtifactError,
    InvalidArgumentError,
    KeyNotFoundError,
    ModulartError,
    OperatorNotFoundError,
    OutOfRangeError,
    SelectorError,
    UnsafePathError,
)

__all__ = [
    "EXIT_CODES",
    "UsageError",
    "check_output_path",
    "exit_code",
    "input_name",
    "main",
    "nonnegative_int",
    "one_line",
    "positive_int",
    "positive_number",
    "resolve_input",
]

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "runtime failure: the command line is valid but the work failed: an input checkpoint / artefact that is "
    "unreadable, corrupt or inconsistent (e.g. a shard index naming a file outside its folder), a model without "
    "the structure the command needs (e.g. no MoE layers), a failed benchmark, a missing optional dependency; "
    "or a bug in modulart (the only case that prints a traceback; please report it)",
    2: "usage error: unknown command or option, a malformed or out-of-range value, a bad layer specification "
    "or plan, an input path that does not exist (or a Hub repo id not in the local cache), an output refused "
    "before anything is written (it exists without --overwrite, holds files modulart did not write, or is, "
    "holds or lies inside an input)",
    130: "interrupted (Ctrl-C); outputs are written atomically, so nothing half-written is left",
}
"""Exit status of ``modulart`` -> meaning, the same for every command (also the table in ``docs/errors.md``)."""


class UsageError(ConfigError):
    """A command line that cannot run as given (exit status 2); the message names the flag or argument."""


#: errors that mean "the command line asked for something that does not exist or cannot be" (status 2)
_USAGE: tuple[type[ModulartError], ...] = (
    ConfigError,
    SelectorError,
    OutOfRangeError,
    InvalidArgumentError,
    KeyNotFoundError,
    OperatorNotFoundError,
)


def exit_code(error: BaseException) -> int:
    """The exit status of ``modulart`` for ``error`` (see :data:`EXIT_CODES`).

    A usage error (:class:`UsageError`, a bad value: ``ConfigError``, ``SelectorError``,
    ``OutOfRangeError``, ...; a missing input: ``ArtifactNotFoundError``) is 2; a bad or
    unsupported input file, any other failure and a bug are 1; Ctrl-C is 130. The commands check
    their outputs up front (:func:`check_output_path`), so a refused output is a :class:`UsageError`;
    an ``UnsafePathError`` that reaches here comes from reading a file (an index naming a path
    outside its folder): a bad file, 1.

    Example:
        >>> from modulart.core.errors import ConfigError, IncompatibleArtifactError, UnsupportedModuleError
        >>> exit_code(ConfigError("x")), exit_code(IncompatibleArtifactError("x")), exit_code(KeyError("x"))
        (2, 1, 1)
        >>> exit_code(UnsupportedModuleError("x")), exit_code(KeyboardInterrupt())
        (1, 130)
    """
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, (UsageError, ArtifactNotFoundError)):
        return 2
    if isinstance(error, (IncompatibleArtifactError, UnsafePathError)):
        return 1  # a bad file (an unknown operator named by an artefact included)
    if isinstance(error, _USAGE):
        return 2
    return 1


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
    tour.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the tour's files: new, empty or an earlier tour's, kept (default: a temporary folder, "
        "removed at the end)",
    )
    tour.add_argument("--keep", action="store_true", help="keep the temporary folder and print where it is")
    tour.add_argument(
        "--quick",
        action="store_true",
        help="smaller inputs, fewer training steps and no figures; every operator still runs",
    )
    sub.add_parser("version", help="print the version", description="Print the installed modulart version.")
    sub.add_parser(
        "operators",
        help="list registered operators",
        description="List the operators registered now: the built-in ones and plug-ins found through the "
        "'modulart.operators' entry point.",
    )
    from modulart.bench import add_bench_parser
    from modulart.emoe.cli import add_emoe_parser
    from modulart.introspect.cli import add_inspect_parser
    from modulart.stacking.cli import add_grow_parser

    add_grow_parser(sub)
    add_inspect_parser(sub)
    add_emoe_parser(sub)
    add_bench_parser(sub)
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
        from modulart.tour import check_tour_folder, run_tour

        if args.out is not None:
            try:  # a refused --out is a usage error, found before any work
                check_tour_folder(args.out)
            except UnsafePathError as e:
                raise UsageError(one_line(e)) from e
        run_tour(print, out=args.out, quick=args.quick, keep=args.keep)
    elif args.command == "inspect":
        from modulart.introspect.cli import run_inspect

        return run_inspect(args, print, errors=_error)
    elif args.command == "grow":
        from modulart.stacking.cli import run_grow

        return run_grow(args, print, errors=_error)
    elif args.command == "emoe":
        from modulart.emoe.cli import run_emoe

        return run_emoe(args, print)
    elif args.command == "bench":
        from modulart.bench import run_bench

        return run_bench(args, print, errors=_error)
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
        _error(f"modulart: error: {args.command}: {one_line(e, getattr(args, 'flags', None))}")
        return exit_code(e)
    except KeyboardInterrupt:
        _error("modulart: interrupted")
        return 130
    except Exception as e:  # a bug: keep the traceback
        traceback.print_exc()
        _error(f"modulart: internal error (a bug in modulart {__version__}, please report it): {type(e).__name__}")
        return 1


def one_line(error: BaseException, flags: Mapping[str, str] | None = None) -> str:
    """The error's message on one line, naming command-line flags instead of Python arguments.

    ``overwrite=True`` becomes ``--overwrite``; each ``name`` of ``flags`` written as ``name = v``,
    ``name=v`` or ``Config.name = v`` (how modulart's Python errors name an argument or a config
    field) becomes ``FLAG v``, and a bare ``name`` with an underscore (``top_k``, never an English
    word) becomes ``FLAG``.

    Example:
        >>> one_line(ValueError("a\\n  b: pass overwrite=True"))
        'a b: pass --overwrite'
        >>> one_line(ValueError("max_shard_size = 'huge': expected a size"), {"max_shard_size": "--max-shard-size"})
        "--max-shard-size 'huge': expected a size"
        >>> one_line(ValueError("EMoEConfig.top_k = 5: must be <= num_experts"), {"top_k": "-k", "num_experts": "-n"})
        '-k 5: must be <= -n'
    """
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.replace("overwrite=True", "--overwrite")
    for name, flag in (flags or {}).items():
        text = re.sub(rf"(?<![\w.\-])(?:[A-Z]\w*\.)?{re.escape(name)} ?= ?(?=\S)", f"{flag} ", text)
        if "_" in name:
            text = re.sub(rf"(?<![\w.\-]){re.escape(name)}(?![\w\-])", flag, text)
    return text


def _hub_cache() -> str | None:
    """The Hub cache folder named by the environment now (``HF_HUB_CACHE``, then ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(?:@[\w.\-/]+)?")


def resolve_input(text: str, *, flag: str) -> Path:
    """The local path of a command's input: ``text`` as a path if it exists, else a Hub repo id.

    A repo id (``org/name``, or ``org/name@revision``) is resolved offline from the local Hugging
    Face cache (``HF_HUB_CACHE``, ``HF_HOME``, else ``~/.cache/huggingface/hub``) to its snapshot
    folder: nothing is downloaded.

    Args:
        text: the path or repo id as typed.
        flag: how the command line names the input (``SRC``, ``PATH``, ``--dense``), for the error.

    Raises:
        ArtifactNotFoundError: neither an existing path nor a repo in the local cache (exit status 2).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> resolve_input(d, flag="SRC") == Path(d)
        True
        >>> resolve_input(d + "/nope", flag="SRC")
        Traceback (most recent call last):
        ...
        modulart.core.errors.ArtifactNotFoundError: SRC '...nope': no such file or directory
    """
    path = Path(text)
    if path.exists():
        return path
    if not _REPO_ID.fullmatch(text) or text.startswith("."):
        raise ArtifactNotFoundError(f"{flag} {text!r}: no such file or directory")
    from huggingface_hub import snapshot_download

    repo, _, revision = text.partition("@")
    cache = _hub_cache()
    try:
        local = snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed id: the same advice
        from huggingface_hub import constants

        where = cache or constants.HF_HUB_CACHE
        raise ArtifactNotFoundError(
            f"{flag} {text!r}: no such file or directory, and no Hub repo {repo!r}"
            f"{f' at revision {revision!r}' if revision else ''} in the local Hugging Face cache ({where}); "
            f"modulart never downloads: fetch it first (hf download {repo}) or pass a local folder"
        ) from None
    return Path(local)


def input_name(text: str) -> str:
    """A short name for an input given as a path or a Hub repo id (for default output folders).

    Example:
        >>> input_name("org/tiny-llama@main")  # a repo id (no such path here)
        'tiny-llama'
        >>> import tempfile
        >>> input_name(tempfile.mkdtemp(prefix="ckpt-")).startswith("ckpt-")
        True
    """
    path = Path(text)
    if path.exists():
        return path.resolve().name
    return text.partition("@")[0].rstrip("/").split("/")[-1]


def check_output_path(
    target: str | os.PathLike[str],
    *,
    sources: Sequence[str | os.PathLike[str]],
    kind: str,
    overwrite: bool,
    flag: str,
    must_not_exist: bool = False,
    foreign_ok: bool = True,
) -> None:
    """Refuse a command's output before any work, as a :class:`UsageError` (exit status 2).

    The rules of :func:`modulart.core.io.check_output` (a new or empty folder, or an output of the same
    ``kind``; another folder only with ``--overwrite``, keeping its other files; never an input, a
    folder inside one or one holding one); with ``must_not_exist``, any existing ``target`` needs
    ``--overwrite``; without ``foreign_ok``, a folder holding files modulart did not write is refused
    even with ``--overwrite`` (a grown checkpoint: stray shards beside it would change what loads).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> check_output_path(d / "out", sources=[d / "in"], kind="artifact", overwrite=False, flag="DST")
        >>> check_output_path(d, sources=[], kind="artifact", overwrite=False, flag="DST", must_not_exist=True)
        Traceback (most recent call last):
        ...
        modulart.cli.UsageError: DST '...' exists; pass --overwrite to replace it
    """
    from modulart.core.io import check_output, output_kind

    path = Path(target)
    if must_not_exist and path.exists() and not overwrite:
        raise UsageError(f"{flag} {str(path)!r} exists; pass --overwrite to replace it")
    try:
        check_output(path, sources=sources, kind=kind, overwrite=overwrite)
    except UnsafePathError as e:
        raise UsageError(f"{flag}: {one_line(e)}") from e
    if not foreign_ok and path.is_dir() and any(path.iterdir()) and output_kind(path) != kind:
        shown = sorted(p.name for p in path.iterdir())[:5]
        raise UsageError(
            f"{flag} {str(path)!r} holds files modulart did not write ({shown}): choose a new or empty folder "
            f"(--overwrite replaces only an empty folder or an earlier modulart {kind})"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
