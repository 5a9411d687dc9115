"""``modulart bench [NAME ...] [--quick]``: run the repository's benchmarks, write JSON and a Markdown table.

The benchmarks are scripts in a source checkout's ``benchmarks/`` folder (they are not in the
wheel). ``bench`` looks for them in ``--dir`` (default ``./benchmarks``, so run it from the
repository root); a missing folder is a usage error (exit status 2) that says so.

A benchmark is any ``DIR/<name>.py`` (not starting with ``_``) with an
``if __name__ == "__main__":`` block; it runs as its own process, ``python DIR/<name>.py``, from
the folder above ``DIR``, with ``--quick`` added when ``bench --quick`` is given (a script whose
source has no ``--quick`` option is skipped then, or refused when named). Whatever JSON files it
writes or rewrites in ``DIR/results/`` are its results. ``bench`` collects them, with the command,
the exit status and the wall time of each run, into ``OUT/bench.json`` and renders them as
``OUT/bench.md`` (``bench_quick.*`` with ``--quick``; ``OUT`` defaults to ``DIR/results``): one
summary table, then the numbers of each result file. Those two files are replaced only if an
earlier ``bench`` wrote them (or with ``--overwrite``).

Exit status: 0 when every benchmark that ran succeeded, 1 when one failed or timed out (the
others still run and are recorded), 2 for a usage error.

Example:
    $ modulart bench --list
    $ modulart bench growth_checkpoint --quick
    $ modulart bench --quick --out /tmp/bench    # the whole suite at CI size
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from modulart._version import __version__
from modulart.cli import UsageError, positive_number

__all__ = [
    "MARKER",
    "BenchRun",
    "Benchmark",
    "add_bench_parser",
    "discover",
    "flatten",
    "render_markdown",
    "run_bench",
    "run_benchmark",
]

MARKER = "modulart bench"
"""The ``generator`` of the files ``bench`` writes (what lets a later run replace them)."""

_MAX_ROWS = 40  # numbers shown per result file in the Markdown (all are in the JSON)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: its ``name`` (the file stem), ``path``, and whether it has a ``--quick`` mode."""

    name: str
    path: Path
    quick: bool


@dataclass
class BenchRun:
    """What one run of a benchmark gave.

    ``status`` is ``"ok"``, ``"failed"`` (non-zero exit), ``"timeout"`` or ``"skipped"``;
    ``results`` maps each JSON file it wrote in ``results/`` (name relative to it) to its content.
    """

    name: str
    command: list[str]
    status: str
    returncode: int | None = None
    seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    output_tail: list[str] = field(default_factory=list)


def _has_main(text: str) -> bool:
    return 'if __name__ == "__main__":' in text or "if __name__ == '__main__':" in text


def discover(directory: str | os.PathLike[str]) -> list[Benchmark]:
    """The benchmark scripts of ``directory``, sorted by name.

    Raises:
        UsageError: ``directory`` is not a folder (exit status 2).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> main_block = 'if __name__ == "__main__":\\n    print("--quick" in sys.argv)\\n'
        >>> _ = (d / "speed.py").write_text("import sys\\n" + main_block)
        >>> _ = (d / "_helpers.py").write_text("X = 1\\n")
        >>> [(b.name, b.quick) for b in discover(d)]
        [('speed', True)]
    """
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(
            f"--dir {str(directory)!r}: no such folder. The benchmarks are scripts in a source checkout's "
            "benchmarks/ folder (not in the wheel): run modulart bench from the repository root, or pass "
            "--dir PATH/TO/benchmarks"
        )
    found = []
    for path in sorted(root.glob("*.py")):
        if path.name.startswith("_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if _has_main(text):
            found.append(Benchmark(path.stem, path, '"--quick"' in text or "'--quick'" in text))
    return found


def _json_files(results: Path, skip: set[str]) -> dict[str, tuple[int, int]]:
    if not results.is_dir():
        return {}
    return {
        str(p.relative_to(results)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in results.rglob("*.json")
        if p.is_file() and str(p.relative_to(results)) not in skip
    }


def run_benchmark(
    bench: Benchmark,
    *,
    quick: bool,
    timeout: float | None = None,
    skip: Sequence[str] = (),
    python: str = sys.executable,
) -> BenchRun:
    """Run one benchmark as a subprocess and collect the JSON it wrote in ``results/`` beside it.

    Args:
        bench: from :func:`discover`.
        quick: add ``--quick`` (the benchmark must have that mode).
        timeout: seconds before the run is killed (None: no limit).
        skip: names under ``results/`` that are not the benchmark's (``bench``'s own outputs).
        python: the interpreter to run it with.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "one.py").write_text(
        ...     "import json, pathlib\\nif __name__ == '__main__':\\n"
        ...     "    r = pathlib.Path(__file__).parent / 'results'; r.mkdir(exist_ok=True)\\n"
        ...     "    (r / 'one.json').write_text(json.dumps({'seconds': 0.5}))\\n")
        >>> run = run_benchmark(discover(d)[0], quick=False)
        >>> run.status, run.results
        ('ok', {'one.json': {'seconds': 0.5}})
    """
    results = bench.path.parent / "results"
    before = _json_files(results, set(skip))
    command = [python, str(bench.path), *(["--quick"] if quick else [])]
    shown = ["python", f"{bench.path.parent.name}/{bench.path.name}", *command[2:]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            cwd=bench.path.parent.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") if isinstance(e.stdout, str) else ""
        return BenchRun(
            bench.name,
            shown,
            "timeout",
            None,
            time.perf_counter() - start,
            note=f"killed after {timeout:g} s (--timeout)",
            output_tail=out.splitlines()[-20:],
        )
    seconds = time.perf_counter() - start
    after = _json_files(results, set(skip))
    got: dict[str, Any] = {}
    for name, stamp in sorted(after.items()):
        if before.get(name) == stamp:
            continue
        try:
            got[name] = json.loads((results / name).read_text())
        except ValueError as e:
            got[name] = {"error": f"not valid JSON: {e}"}
    status = "ok" if proc.returncode == 0 else "failed"
    note = "" if got or status != "ok" else "wrote no JSON in results/"
    tail = (proc.stdout + proc.stderr).splitlines()[-20:] if status != "ok" else []
    return BenchRun(bench.name, shown, status, proc.returncode, seconds, got, note, tail)


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The scalar leaves of a JSON value as ``(dotted.key, value)`` pairs, in document order.

    Example:
        >>> list(flatten({"a": {"b": 1.5, "c": [True, "x"]}, "d": None}))
        [('a.b', 1.5), ('a.c[0]', True), ('a.c[1]', 'x'), ('d', None)]
    """
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, str) and len(value) > 60:
        text = value[:57] + "..."
    else:
        text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The Markdown page of a ``bench.json`` summary: a table of runs, then each result file's numbers.

    Example:
        >>> page = render_markdown({"command": "modulart bench", "date": "2026-01-01T00:00:00Z",
        ...     "machine": {"platform": "Linux", "cpus": 2}, "versions": {"modulart": "0.4.0"},
        ...     "runs": [{"name": "one", "status": "ok", "seconds": 1.0, "command": ["python", "b/one.py"],
        ...               "results": {"one.json": {"seconds": 0.5}}, "note": ""}]})
        >>> "| one | ok | 1.0 | `one.json` | `python b/one.py` |" in page
        True
    """
    machine = ", ".join(f"{k} {v}" for k, v in summary.get("machine", {}).items())
    versions = ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())
    out = [
        f"<!-- written by {MARKER}: regenerate with `{summary.get('command', 'modulart bench')}` -->",
        "# Benchmark results",
        "",
        f"`{summary.get('command', 'modulart bench')}`, {summary.get('date', '')}; machine: {machine}; {versions}.",
        "",
        "| benchmark | status | seconds | results | command |",
        "|---|---|---|---|---|",
    ]
    for run in summary.get("runs", []):
        files = ", ".join(f"`{n}`" for n in run.get("results", {})) or run.get("note", "")
        status = run["status"] + (f" ({run['note']})" if run.get("note") and run["status"] != "ok" else "")
        out.append(
            f"| {run['name']} | {_cell(status)} | {run.get('seconds', 0):.1f} | {files} | "
            f"`{' '.join(run.get('command', []))}` |"
        )
    for run in summary.get("runs", []):
        for name, data in run.get("results", {}).items():
            leaves = list(flatten(data))
            out += ["", f"## {run['name']}: `{name}`", "", "| key | value |", "|---|---|"]
            out += [f"| `{_cell(k)}` | {_cell(v)} |" for k, v in leaves[:_MAX_ROWS]]
            if len(leaves) > _MAX_ROWS:
                out += ["", f"The first {_MAX_ROWS} of {len(leaves)} values; all are in the JSON."]
    return "\n".join(out) + "\n"


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` sub-command to a ``modulart`` sub-parser set.

    Example:
        >>> p = argparse.ArgumentParser(prog="modulart")
        >>> add_bench_parser(p.add_subparsers(dest="command"))
        >>> a = p.parse_args(["bench", "editing", "--quick"])
        >>> a.names, a.quick, a.dir, a.out
        (['editing'], True, 'benchmarks', None)
    """
    p = sub.add_parser(
        "bench",
        help="run the repository's benchmarks (all, or those named) and write JSON + a Markdown table",
        description="Run the benchmark scripts of a source checkout's benchmarks/ folder (not in the wheel) one "
        "process each, collect the JSON each writes in benchmarks/results/, and write bench.json and bench.md "
        "(bench_quick.* with --quick) to --out.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (file stems; default: all)")
    p.add_argument("--quick", action="store_true", help="run each at CI size (skips benchmarks without --quick)")
    p.add_argument("--dir", default="benchmarks", help="the benchmarks folder (default: ./benchmarks)")
    p.add_argument("--out", default=None, help="folder for bench.json / bench.md (default: DIR/results)")
    p.add_argument("--timeout", type=positive_number, default=None, metavar="S", help="seconds per benchmark, > 0")
    p.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    p.add_argument("--overwrite", action="store_true", help="replace bench.json / bench.md not written by bench")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(flags={"timeout": "--timeout"})


def _ours(path: Path) -> bool:
    if path.suffix == ".json":
        try:
            return bool(json.loads(path.read_text()).get("generator") == MARKER)
        except (ValueError, AttributeError, OSError):
            return False
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().startswith(f"<!-- written by {MARKER}")
    except (OSError, UnicodeDecodeError):
        return False


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        Path(tmp).chmod(0o666 & ~_umask())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def _versions() -> dict[str, str]:
    out = {"modulart": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _select(found: list[Benchmark], names: Sequence[str], quick: bool) -> list[Benchmark]:
    by_name = {b.name: b for b in found}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"NAME {unknown[0]!r}: no such benchmark; found {sorted(by_name)}")
    chosen = [by_name[n] for n in dict.fromkeys(names)] if names else found
    if quick and names:
        slow = [b.name for b in chosen if not b.quick]
        if slow:
            raise UsageError(f"NAME {slow[0]!r} has no --quick mode: run it without --quick")
    return chosen


def run_bench(
    args: argparse.Namespace, echo: Callable[[str], None], *, errors: Callable[[str], None] | None = None
) -> int:
    """Run ``modulart bench`` with parsed ``args``; print through ``echo``; returns the exit status.

    Usage errors (no benchmarks folder, an unknown NAME, a refused output) raise
    :class:`~modulart.cli.UsageError` before anything runs. A failed benchmark is reported through
    ``errors`` (default ``echo``) as one line after all have run, exit status 1.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "benchmarks"; d.mkdir()
        >>> _ = (d / "one.py").write_text(
        ...     "import json, pathlib, sys\\nif __name__ == '__main__':\\n"
        ...     "    r = pathlib.Path(__file__).parent / 'results'; r.mkdir(exist_ok=True)\\n"
        ...     "    (r / 'one.json').write_text(json.dumps({'quick': '--quick' in sys.argv}))\\n")
        >>> p = argparse.ArgumentParser(prog="modulart")
        >>> add_bench_parser(p.add_subparsers(dest="command"))
        >>> lines = []
        >>> run_bench(p.parse_args(["bench", "--quick", "--dir", str(d), "--no-progress"]), lines.append)
        0
        >>> json.loads((d / "results" / "bench_quick.json").read_text())["runs"][0]["results"]
        {'one.json': {'quick': True}}
    """
    found = discover(args.dir)
    if args.list:
        for b in found:
            echo(f"{b.name}{'' if b.quick else '  (no --quick mode)'}")
        return 0
    if not found:
        raise UsageError(f"--dir {args.dir!r}: no benchmark scripts (*.py with a __main__ block) in it")
    chosen = _select(found, args.names, args.quick)
    out_dir = Path(args.out) if args.out else Path(args.dir) / "results"
    stem = "bench_quick" if args.quick else "bench"
    targets = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} exists and is not a folder")
    for t in targets:
        if t.exists() and not args.overwrite and not _ours(t):
            raise UsageError(f"--out: {t} exists and was not written by modulart bench; pass --overwrite to replace it")
    skip = {t.name for t in targets} if out_dir.resolve() == (Path(args.dir) / "results").resolve() else set()
    quiet = bool(args.no_progress)
    tty = sys.stderr.isatty()
    bar = None
    if not quiet and tty:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc="bench", unit="benchmark", file=sys.stderr)
    say: Callable[[str], None] = (lambda _line: None) if quiet else (bar.write if bar is not None else echo)
    runs: list[BenchRun] = []
    for i, b in enumerate(chosen, 1):
        if args.quick and not b.quick:
            runs.append(BenchRun(b.name, [], "skipped", note="no --quick mode"))
            say(f"bench [{i}/{len(chosen)}] {b.name}: skipped (no --quick mode)")
            continue
        if bar is not None:
            bar.set_postfix_str(b.name)
        elif not quiet:
            say(f"bench [{i}/{len(chosen)}] {b.name} ...")
        run = run_benchmark(b, quick=args.quick, timeout=args.timeout, skip=sorted(skip))
        runs.append(run)
        files = ", ".join(run.results) or run.note or "no JSON"
        say(f"bench [{i}/{len(chosen)}] {b.name}: {run.status} in {run.seconds:.1f} s ({files})")
        for line in run.output_tail:
            echo(f"    {line}")
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    summary = {
        "generator": MARKER,
        "command": " ".join(["modulart bench", *args.names, *(["--quick"] if args.quick else [])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": _machine(),
        "versions": _versions(),
        "runs": [asdict(r) for r in runs],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(targets[0], json.dumps(summary, indent=2, default=str) + "\n")
    _write(targets[1], render_markdown(summary))
    echo(f"wrote {targets[0]} + {targets[1]}")
    bad = [r for r in runs if r.status in ("failed", "timeout")]
    if bad:
        what = ", ".join(f"{r.name} ({r.status}{f', exit {r.returncode}' if r.returncode else ''})" for r in bad)
        (errors or echo)(f"modulart: error: bench: {len(bad)} of {len(runs)} benchmarks did not succeed: {what}")
        return 1
    return 0
