"""Artefacts on disk and on the Hub: JSON metadata + safetensors, atomic, fingerprinted.

An artefact is a directory holding

- ``modulart_config.json``: operator name, library version, the config, the selector as written
  and as resolved, the :class:`Fingerprint` of the model it was saved from, the dtype, shape and
  sha256 of every saved tensor and the JSON part of the handle state (provenance, counters);
- ``modulart_state.safetensors``: only the tensors the operator owns (no pickle anywhere);
- ``.modulart-output``: the marker saying modulart wrote the folder, and what kind of output it is.

Writes go to a temporary sibling directory that is swapped into place at the end, so a crash or
an interrupt never leaves a half-written artefact, nor a moment without one. Loading verifies every
tensor against the JSON, and checks the fingerprint of the model it is loaded into, refusing a
mismatch with a message that says which tensors differ.

Example:
    >>> import tempfile, torch
    >>> from modulart.core.io import fingerprint, load_artifact, save_artifact
    >>> model = torch.nn.Linear(4, 4)
    >>> d = tempfile.mkdtemp() + "/art"
    >>> _ = save_artifact(d, operator="demo", config={"version": 1}, tensors={"s": torch.ones(3)},
    ...                   fingerprint=fingerprint(model))
    >>> art = load_artifact(d)
    >>> art.operator, art.tensors["s"].tolist()
    ('demo', [1.0, 1.0, 1.0])
    >>> art.check_fingerprint(model)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from modulart._version import __version__
from modulart.core.errors import ConfigError, IncompatibleArtifactError, UnsafePathError
from modulart.core.fingerprint import Fingerprint, TensorPrint, fingerprint
from modulart.core.types import JSONValue, StateDict

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "OUTPUT_KINDS",
    "OUTPUT_MARKER",
    "STATE_NAME",
    "Artifact",
    "Fingerprint",
    "atomic_directory",
    "check_output",
    "fingerprint",
    "inside",
    "load_artifact",
    "output_kind",
    "push_to_hub",
    "recover",
    "resolve_artifact",
    "save_artifact",
    "split_state",
    "tensor_digest",
]

CONFIG_NAME = "modulart_config.json"
STATE_NAME = "modulart_state.safetensors"
FORMAT = "modulart-artifact"
FORMAT_VERSION = 3  # 2: sampled fingerprints, JSON handle state; 3: dtype, shape, sha256 per tensor


# --- atomic directories -------------------------------------------------------------------------
OUTPUT_MARKER = ".modulart-output"
_STALE_KINDS = ("tmp", "old")
#: The kinds of output modulart writes (recorded in the marker): a folder is replaced without
#: ``overwrite=True`` only by an output of the same kind.
OUTPUT_KINDS = ("artifact", "report", "checkpoint")  # `modulart inspect --out` writes a report
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _load_renameat2() -> Any:
    """``renameat2`` from the C library (glibc >= 2.28, Linux), or ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2: Any = _load_renameat2()


def _crash_point(name: str) -> None:
    """A no-op the crash tests replace (in a child process) to die at ``name``."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (``renameat2(RENAME_EXCHANGE)``); ``False`` if unsupported."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # the filesystem (or a seccomp filter) does not support the exchange
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _exchange_or_clean(tmp: Path, target: Path) -> bool:
    """:func:`_exchange`; on an error nothing was swapped, so the new folder is deleted."""
    try:
        return _exchange(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The parsed marker of ``path`` (``{}`` for a marker written before kinds were recorded)."""
    marker = path / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_artifact(path: Path) -> bool:
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def output_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind of modulart output ``path`` is (one of :data:`OUTPUT_KINDS`), or ``None``.

    The kind comes from the :data:`OUTPUT_MARKER` file; a folder without one (or with a marker of
    an older modulart) whose ``modulart_config.json`` is an artefact is of kind ``"artifact"``.

    Example:
        >>> import tempfile, torch
        >>> d = save_artifact(tempfile.mkdtemp() + "/a", operator="demo", config={}, tensors={})
        >>> output_kind(d), output_kind(tempfile.mkdtemp())
        ('artifact', None)
    """
    p = Path(path)
    if not p.is_dir():
        return None
    marker = _read_marker(p)
    kind = None if marker is None else marker.get("kind")
    if isinstance(kind, str) and kind in OUTPUT_KINDS:
        return kind
    if _is_artifact(p):
        return "artifact"
    if marker is not None:  # a marker of a modulart that did not record the kind: from the files
        if (p / "modulart_growth.json").is_file():
            return "checkpoint"
        if (p / "report.json").is_file():
            return "report"
    return None


def _own_files(path: Path, kind: str) -> set[str]:
    """The top-level names modulart wrote into the output ``path`` of ``kind`` (the marker's list)."""
    marker = _read_marker(path) or {}
    files = marker.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return {*files, OUTPUT_MARKER}
    if kind == "artifact":
        return {CONFIG_NAME, STATE_NAME, OUTPUT_MARKER}
    return {p.name for p in path.iterdir()}  # a marker without a list (older modulart): all of it


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(parent: Path, name: str, kind: str) -> list[Path]:
    """Temp (``tmp``) or backup (``old``) siblings of ``name`` whose writing process is gone."""
    out = []
    for stale in parent.glob(f".{glob.escape(name)}.{kind}-*"):
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if stale.is_dir() and not _pid_alive(pid):
            out.append(stale)
    return out


def recover(target: str | os.PathLike[str]) -> None:
    """Repair what a killed write of ``target`` left: restore a backup, delete temp folders.

    A write killed between its two renames (where no atomic exchange is available) leaves the old
    output as ``.<name>.old-<pid>-*`` and no ``target``: it is renamed back. Temp folders
    (``.<name>.tmp-<pid>-*``) and backups of writes whose process is gone are deleted. Called by
    every write and every load of ``target``; failures to clean up (a read-only folder) are ignored.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> (d / ".a.old-999999999-00000000").mkdir()  # a write killed between its renames
        >>> recover(d / "a"); sorted(p.name for p in d.iterdir())
        ['a']
    """
    t = Path(target)
    parent = t.parent
    if not parent.is_dir():
        return
    try:
        backups = _stale(parent, t.name, "old")
        if not t.exists() and backups:
            newest = max(backups, key=lambda b: b.stat().st_mtime)
            newest.rename(t)
            backups.remove(newest)
        for stale in backups + _stale(parent, t.name, "tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    except OSError:
        pass


def _link_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` without touching ``src``: hard links where possible, else a copy."""
    if src.is_symlink():
        dst.symlink_to(src.readlink())
    elif src.is_dir():
        dst.mkdir()
        shutil.copystat(src, dst)
        for child in src.iterdir():
            _link_copy(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``: at every instant one of the two folders is at ``target``."""
    parent = target.parent
    if not target.exists():
        tmp.rename(target)
    elif _exchange_or_clean(tmp, target):
        _crash_point("after-exchange")
        shutil.rmtree(tmp, ignore_errors=True)  # the old output, now under the temp name
    else:  # no atomic exchange: a crash between the renames is repaired by :func:`recover`
        backup = parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        target.rename(backup)
        _crash_point("after-first-rename")
        try:
            tmp.rename(target)
        except BaseException:
            backup.rename(target)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    _fsync_dir(parent)


def check_output(
    target: str | os.PathLike[str],
    *,
    sources: Sequence[str | os.PathLike[str]] = (),
    kind: str = "artifact",
    overwrite: bool = False,
) -> set[str]:
    """Refuse an output folder :func:`atomic_directory` would refuse, before any work is done.

    Commands that compute for long before they write (a report over a large checkpoint) call this
    first. Also repairs a write of ``target`` that was killed (:func:`recover`).

    Returns:
        The names of the files in ``target`` that are not modulart's own and are kept as they are.

    Raises:
        UnsafePathError: see :func:`atomic_directory`.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> src = Path(tempfile.mkdtemp())
        >>> check_output(src / "new-out", sources=[src / "model.safetensors"])
        set()
    """
    if kind not in OUTPUT_KINDS:
        raise ConfigError(f"kind = {kind!r}: expected one of {OUTPUT_KINDS}")
    target = Path(target)
    resolved = target.resolve()
    for src in sources:
        if _related(resolved, Path(src).resolve()):
            raise UnsafePathError(
                f"output {str(target)!r} is the input {str(src)!r}, inside it, or contains it: choose another folder"
            )
    recover(target)
    if target.exists() and not target.is_dir():
        raise UnsafePathError(f"{target} exists and is not a directory: modulart will not replace it")
    keep: set[str] = set()  # names in target that are not ours: carried over into the new folder
    if target.is_dir() and any(target.iterdir()):
        found = output_kind(target)
        names = {p.name for p in target.iterdir()}
        if found == kind:
            keep = names - _own_files(target, kind)
        elif overwrite:
            keep = names - {OUTPUT_MARKER}
        else:
            shown = sorted(names)[:5]
            what = f"a modulart {found} output, not an {kind}" if found else "files modulart did not write"
            raise UnsafePathError(
                f"{target} holds {what} ({shown}): choose a new or empty folder, or pass overwrite=True to "
                "replace only the files modulart writes there (every other file is kept)"
            )
    return keep


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str],
    *,
    sources: Sequence[str | os.PathLike[str]] = (),
    kind: str = "artifact",
    overwrite: bool = False,
) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block completes.

    Safe for the user's files:

    - ``target`` may be new, empty, or a modulart output of the same ``kind`` (the
      :data:`OUTPUT_MARKER` records it; an unmarked artefact counts as kind ``"artifact"``): it
      is replaced whole, except files modulart did not write there, which are kept as they are;
    - any other non-empty folder is refused with :class:`~modulart.core.errors.UnsafePathError`
      before anything is written, unless ``overwrite=True``: then only the files the block writes
      are replaced and every other file in the folder is kept byte for byte;
    - a ``target`` equal to, inside or containing one of ``sources`` (the inputs being read) is
      refused, ``overwrite`` or not;
    - at every instant ``target`` holds the old output or the new one: on Linux the two folders
      are swapped with one ``renameat2(RENAME_EXCHANGE)``; elsewhere a write killed between its
      two renames is repaired by the next write or load (:func:`recover`);
    - on any exception (including ``KeyboardInterrupt``) the temporary directory is deleted and an
      existing ``target`` is left exactly as it was; temporary folders of writes killed outright are
      removed by the next write or load of the same target;
    - new folders honour the umask.

    Args:
        target: the output folder.
        sources: the inputs being read (files or folders).
        kind: what is written, one of :data:`OUTPUT_KINDS`.
        overwrite: write into a non-empty folder that is not an output of this ``kind``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_directory(d, kind="report") as tmp:
        ...     _ = (tmp / "report.json").write_text("{}")
        >>> output_kind(d), sorted(p.name for p in d.iterdir())
        ('report', ['.modulart-output', 'report.json'])
    """
    target = Path(target)
    keep = check_output(target, sources=sources, kind=kind, overwrite=overwrite)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
    try:
        yield tmp
        written = sorted(p.name for p in tmp.iterdir() if p.name != OUTPUT_MARKER)
        marker = {"written_by": "modulart", "version": __version__, "kind": kind, "files": written}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        for name in sorted(keep - set(written)):
            _link_copy(target / name, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, target)


def inside(root: str | os.PathLike[str], entry: str, *, index: str | os.PathLike[str] | None = None) -> Path:
    """``root / entry``, refusing an ``entry`` that leaves ``root`` before anything is read.

    Absolute paths, ``..`` and symlinks that resolve outside ``root`` are refused with
    :class:`~modulart.core.errors.UnsafePathError`. One exception: in a Hugging Face cache
    snapshot (``.../snapshots/<revision>/``) files are symlinks into the repo's ``blobs/``
    folder, which is allowed.

    Args:
        root: the folder being read.
        entry: a file name read from a file (an index, a config).
        index: the file ``entry`` was read from, named in the error.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> inside(d, "model.safetensors").name
        'model.safetensors'
        >>> inside(d, "../x", index="model.safetensors.index.json")
        Traceback (most recent call last):
        ...
        modulart.core.errors.UnsafePathError: model.safetensors.index.json names '../x', which leaves ...
    """
    base = Path(root)
    where = f"{index} names {entry!r}" if index is not None else f"{entry!r}"
    if not isinstance(entry, str) or not entry or Path(entry).is_absolute() or ".." in Path(entry).parts:
        raise UnsafePathError(f"{where}, which leaves the folder {base}: only files inside it are read")
    path = base / entry
    real_base = base.resolve()
    real = path.resolve()
    if real != real_base and real_base not in real.parents:
        hub = real_base.parent.parent / "blobs" if real_base.parent.name == "snapshots" else None
        if hub is None or hub not in real.parents:
            raise UnsafePathError(
                f"{where}, which resolves to {real}, outside the folder {base}: only files inside it are read"
            )
    return path


# --- artefacts ----------------------------------------------------------------------------------
def _legacy_fingerprint(data: Mapping[str, Any]) -> Fingerprint:
    """A format-1 fingerprint (``"dtype|shape|hash"`` strings): names, dtypes and shapes are kept."""
    prints: dict[str, TensorPrint] = {}
    for name, entry in data.get("tensors", {}).items():
        dtype, shape, _ = str(entry).split("|", 2)
        prints[str(name)] = TensorPrint(dtype, tuple(int(s) for s in shape.split("x") if s), ())
    return Fingerprint(prints)


@dataclass
class Artifact:
    """A loaded artefact: metadata, tensors and the JSON part of the handle state.

    Attributes:
        path: the local directory.
        meta: the parsed ``modulart_config.json``.
        tensors: the saved tensors, by state key.
    """

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def operator(self) -> str:
        return str(self.meta["operator"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config", {}))

    @property
    def state(self) -> StateDict:
        """The full handle state: the tensors and the JSON values saved beside them."""
        out: StateDict = dict(self.meta.get("state", {}))
        out.update(self.tensors)
        return out

    @property
    def library_version(self) -> str:
        return str(self.meta.get("library_version", "unknown"))

    @property
    def base_model(self) -> Fingerprint | None:
        fp = self.meta.get("base_model")
        if not fp:
            return None
        if fp.get("kind") == "sampled":
            return Fingerprint.from_dict(fp)
        return _legacy_fingerprint(fp)

    def check_fingerprint(self, model: nn.Module) -> None:
        """Raise :class:`IncompatibleArtifactError` if ``model`` is not the model it was saved from."""
        saved = self.base_model
        if saved is None:
            return
        diffs = fingerprint(model).diff(saved)
        if diffs:
            lines = "\n".join(f"  - {d}" for d in diffs)
            raise IncompatibleArtifactError(
                f"artefact {self.path} ({self.operator}) was saved from a different model:\n{lines}\n"
                "Load it into the model it was made for, or pass check_fingerprint=False to override."
            )


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, JSONValue]]:
    """Split a handle state into tensors (for safetensors) and JSON values (for the metadata)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    values: dict[str, JSONValue] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            continue
        try:
            values[k] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            raise IncompatibleArtifactError(
                f"state entry {k!r} is a {type(v).__name__}: a handle state holds tensors and JSON values only"
            ) from None
    return tensors, values


def tensor_digest(t: torch.Tensor) -> str:
    """The sha256 of a tensor's raw bytes (C order, as safetensors stores them), hex.

    sha256 rather than a faster non-cryptographic hash: it is the standard, ``hashlib`` runs it
    with the CPU's SHA instructions (~1-2 GB/s), and artefacts hold an operator's state (labels,
    centroids, adapters, patches), megabytes, not the model's weights.

    Example:
        >>> import hashlib
        >>> tensor_digest(torch.zeros(2)) == hashlib.sha256(bytes(8)).hexdigest()  # 2 x fp32 zero
        True
    """
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.element_size() > 0 and flat.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_artifact(
    directory: str | os.PathLike[str],
    *,
    operator: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    fingerprint: Fingerprint | None = None,
    selector: str | None = None,
    resolved: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an artefact atomically; returns its path.

    The JSON records every tensor's dtype, shape and :func:`tensor_digest`, which
    :func:`load_artifact` checks (format version 3).

    Args:
        directory: the artefact directory: new, empty or an artefact (replaced atomically).
        operator: the operator's registered name.
        config: JSON-serialisable config.
        tensors: the handle state: tensors go to safetensors (copied, so shared storage is fine),
            JSON values to the metadata's ``state``.
        fingerprint: of the model the artefact belongs to.
        selector: the selector as written; resolved: the paths it resolved to.
        extra: more JSON-serialisable metadata.
        overwrite: write into a non-empty folder that is not an artefact: only the artefact's own
            files are replaced, every other file is kept (see :func:`atomic_directory`).

    Raises:
        UnsafePathError: ``directory`` holds files modulart did not write (and not ``overwrite``).
    """
    arrays, values = split_state(tensors)
    cpu = {k: v.detach().to("cpu").clone().contiguous() for k, v in arrays.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "operator": operator,
        "library_version": __version__,
        "config": dict(config),
        "selector": {"written": selector, "resolved": list(resolved or [])},
        "base_model": fingerprint.to_dict() if fingerprint is not None else None,
        "tensors": {
            k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_digest(t)}
            for k, t in sorted(cpu.items())
        },
        "state": values,
        "extra": dict(extra or {}),
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    with atomic_directory(directory, kind="artifact", overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        if cpu:
            save_file(cpu, str(tmp / STATE_NAME), metadata={"format": "pt", "operator": operator})
    return Path(directory)


def _bad(cfg: Path, field: str, expected: str, got: Any) -> IncompatibleArtifactError:
    shown = repr(got) if len(repr(got)) < 60 else f"a {type(got).__name__}"
    return IncompatibleArtifactError(f"{cfg}: field {field!r} must be {expected}, got {shown}")


def _check_meta(cfg: Path, meta: Any) -> dict[str, Any]:
    """The metadata, every field of the right type, or :class:`IncompatibleArtifactError`."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IncompatibleArtifactError(f'{cfg} is not a modulart artefact (no "format": {FORMAT!r})')
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(cfg, "format_version", "an int >= 1", version)
    if version > FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{cfg} has format version {version} (written by modulart "
            f"{meta.get('library_version', '?')}); this modulart ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade modulart"
        )
    op = meta.get("operator")
    if not isinstance(op, str) or not op:
        raise _bad(cfg, "operator", "a non-empty string", op)
    for field, types, expected in (
        ("config", (dict,), "an object"),
        ("state", (dict,), "an object"),
        ("extra", (dict,), "an object"),
        ("selector", (dict, type(None)), "an object or null"),
        ("base_model", (dict, type(None)), "an object or null"),
        ("library_version", (str,), "a string"),
    ):
        if field in meta and not isinstance(meta[field], types):
            raise _bad(cfg, field, expected, meta[field])
    tensors = meta.get("tensors", {} if version >= 3 else [])
    if version >= 3:
        if not isinstance(tensors, dict):
            raise _bad(cfg, "tensors", "an object of {dtype, shape, sha256} per tensor", tensors)
        for name, entry in tensors.items():
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"])
                and isinstance(entry.get("sha256"), str)
            )
            if not ok:
                raise _bad(cfg, f"tensors.{name}", "{dtype: str, shape: [int >= 0], sha256: str}", entry)
    elif not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise _bad(cfg, "tensors", "a list of tensor names", tensors)
    try:
        fp = meta.get("base_model")
        if fp:
            art = Artifact(path=cfg.parent, meta=meta, tensors={})
            _ = art.base_model
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise IncompatibleArtifactError(f"{cfg}: field 'base_model' is not a model fingerprint ({e!r})") from None
    return meta


def _read_tensors(state: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(state))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise IncompatibleArtifactError(f"{state}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _verify(state: Path, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Names (missing and extra), then per tensor dtype, shape and (format 3) content hash."""
    listed = meta.get("tensors", [])
    names = set(listed)
    missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
    if missing:
        raise IncompatibleArtifactError(f"artefact {state.parent} is incomplete: tensors {missing[:10]} are missing")
    if extra:
        raise IncompatibleArtifactError(f"{state} holds tensors {extra[:10]} that {CONFIG_NAME} does not list")
    if not isinstance(listed, dict):
        return  # format 2: names only
    for name, entry in listed.items():
        t = tensors[name]
        if _dtype_name(t.dtype) != entry["dtype"] or list(t.shape) != entry["shape"]:
            raise IncompatibleArtifactError(
                f"{state}: tensor {name!r} is {_dtype_name(t.dtype)} {list(t.shape)}, "
                f"{CONFIG_NAME} says {entry['dtype']} {entry['shape']}"
            )
        if tensor_digest(t) != entry["sha256"]:
            raise IncompatibleArtifactError(
                f"{state}: tensor {name!r} does not match the sha256 saved in {CONFIG_NAME} "
                "(the file was altered or corrupted)"
            )


def load_artifact(directory: str | os.PathLike[str]) -> Artifact:
    """Read and verify an artefact written by :func:`save_artifact` (local directory).

    Every field of ``modulart_config.json`` is type-checked and every tensor checked against it
    (names, and from format 3 dtypes, shapes and sha256), so a truncated, corrupted or edited
    artefact raises :class:`IncompatibleArtifactError` naming the file and the tensor. Artefacts of
    format 2 (modulart 0.2) are checked by name. A write of this folder that was killed is repaired
    first (:func:`recover`); a file that is a symlink out of the folder raises
    :class:`~modulart.core.errors.UnsafePathError`.
    """
    path = Path(directory)
    recover(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise IncompatibleArtifactError(f"{path} is not a modulart artefact: {CONFIG_NAME} is missing")
    for name in (CONFIG_NAME, STATE_NAME):  # a symlink out of the folder is not read
        if (path / name).exists():
            inside(path, name)
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IncompatibleArtifactError(f"{cfg} is not valid JSON: {e}") from None
    meta = _check_meta(cfg, raw)
    state = path / STATE_NAME
    tensors = _read_tensors(state) if state.is_file() else {}
    _verify(state, meta, tensors)
    return Artifact(path=path, meta=meta, tensors=tensors)


# --- the Hub ------------------------------------------------------------------------------------
def push_to_hub(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload modulart artefact",
) -> str:
    """Upload an artefact directory to a Hub model repo (created if needed); returns the commit URL."""
    load_artifact(directory)  # refuse to upload something that is not an artefact
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(directory),
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=[CONFIG_NAME, "*.safetensors", "*.md"],
    )
    return str(getattr(info, "commit_url", info))


def resolve_artifact(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> Path:
    """Resolve an artefact to a local directory: a local path as is, else a Hub repo id via the cache.

    Works offline: a local folder needs no network, and a repo already in the Hugging Face cache is
    found with ``local_files_only=True`` or ``HF_HUB_OFFLINE=1``.
    """
    p = Path(repo_id_or_path)
    recover(p)  # a local artefact whose write was killed between its renames is put back first
    if p.is_dir():
        load_artifact(p)
        return p
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = bool(constants.HF_HUB_OFFLINE) if local_files_only is None else local_files_only
    try:
        local = snapshot_download(
            str(repo_id_or_path),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            allow_patterns=[CONFIG_NAME, "*.safetensors", "*.md"],
        )
    except HFValidationError:
        raise IncompatibleArtifactError(
            f"{str(repo_id_or_path)!r} is neither an artefact directory nor a valid Hub repo id"
        ) from None
    except Exception as e:  # network, auth, not found, not cached: all mean "cannot get it"
        raise IncompatibleArtifactError(
            f"cannot get artefact {str(repo_id_or_path)!r} "
            f"({'offline, not in the cache' if offline else 'from the Hub'}): "
            f"{type(e).__name__}: {e}"
        ) from None
    load_artifact(local)
    return Path(local)
