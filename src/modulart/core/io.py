"""Artefacts on disk and on the Hub: JSON metadata + safetensors, atomic, fingerprinted.

An artefact is a directory holding

- ``modulart_config.json``: operator name, library version, the config, the selector as written
  and as resolved, the :class:`Fingerprint` of the model it was saved from, the names of the saved
  tensors and the JSON part of the handle state (provenance, counters);
- ``modulart_state.safetensors``: only the tensors the operator owns (no pickle anywhere).

Writes go to a temporary sibling directory that is renamed into place at the end, so a crash or
an interrupt never leaves a half-written artefact. Loading checks the fingerprint of the model it is
loaded into and refuses a mismatch with a message that says which tensors differ.

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
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modulart._version import __version__
from modulart.core.errors import IncompatibleArtifactError, UnsafePathError
from modulart.core.fingerprint import Fingerprint, TensorPrint, fingerprint
from modulart.core.types import JSONValue, StateDict

__all__ = [
    "CONFIG_NAME",
    "OUTPUT_MARKER",
    "STATE_NAME",
    "Artifact",
    "Fingerprint",
    "atomic_directory",
    "fingerprint",
    "load_artifact",
    "push_to_hub",
    "resolve_artifact",
    "save_artifact",
    "split_state",
]

CONFIG_NAME = "modulart_config.json"
STATE_NAME = "modulart_state.safetensors"
FORMAT = "modulart-artifact"
FORMAT_VERSION = 2  # 2: sampled fingerprints, JSON handle state


# --- atomic directories -------------------------------------------------------------------------
OUTPUT_MARKER = ".modulart-output"
_STALE_KINDS = ("tmp", "old")


def _written_by_modulart(path: Path) -> bool:
    """Whether ``path`` is a folder modulart wrote: it has the output marker, or is an artefact."""
    if (path / OUTPUT_MARKER).is_file():
        return True
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


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


def _remove_stale(parent: Path, name: str) -> None:
    """Delete temp / backup siblings of ``name`` left by writes whose process is gone."""
    for kind in _STALE_KINDS:
        for stale in parent.glob(f".{name}.{kind}-*"):
            try:
                pid = int(stale.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                continue
            if stale.is_dir() and not _pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str], *, sources: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block completes.

    Safe for the user's files:

    - ``target`` may be new, empty, or a folder modulart wrote (it carries the
      :data:`OUTPUT_MARKER` file, or is an artefact); anything else is refused with
      :class:`~modulart.core.errors.UnsafePathError` before anything is written;
    - a ``target`` equal to, inside or containing one of ``sources`` (the inputs being read) is
      refused the same way;
    - on any exception (including ``KeyboardInterrupt``) the temporary directory is deleted and an
      existing ``target`` is left exactly as it was; temporary folders of writes killed outright are
      removed by the next write to the same target;
    - new folders honour the umask.
    """
    target = Path(target)
    resolved = target.resolve()
    for src in sources:
        if _related(resolved, Path(src).resolve()):
            raise UnsafePathError(
                f"output {str(target)!r} is the input {str(src)!r}, inside it, or contains it: choose another folder"
            )
    if target.exists() and not target.is_dir():
        raise UnsafePathError(f"{target} exists and is not a directory: modulart will not replace it")
    if target.is_dir() and any(target.iterdir()) and not _written_by_modulart(target):
        shown = sorted(p.name for p in target.iterdir())[:5]
        raise UnsafePathError(
            f"{target} holds files modulart did not write ({shown}); it would be replaced whole: "
            "choose a new or empty folder, or delete it yourself"
        )
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent, target.name)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by modulart; the folder may be replaced by modulart\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        backup = parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        target.rename(backup)
        try:
            tmp.rename(target)
        except BaseException:
            backup.rename(target)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(target)


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
) -> Path:
    """Write an artefact atomically; returns its path.

    Args:
        directory: the artefact directory (replaced atomically if it exists).
        operator: the operator's registered name.
        config: JSON-serialisable config.
        tensors: the handle state: tensors go to safetensors (copied, so shared storage is fine),
            JSON values to the metadata's ``state``.
        fingerprint: of the model the artefact belongs to.
        selector: the selector as written; resolved: the paths it resolved to.
        extra: more JSON-serialisable metadata.
    """
    arrays, values = split_state(tensors)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "operator": operator,
        "library_version": __version__,
        "config": dict(config),
        "selector": {"written": selector, "resolved": list(resolved or [])},
        "base_model": fingerprint.to_dict() if fingerprint is not None else None,
        "tensors": sorted(arrays),
        "state": values,
        "extra": dict(extra or {}),
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        if arrays:
            save_file(
                {k: v.detach().to("cpu").clone().contiguous() for k, v in arrays.items()},
                str(tmp / STATE_NAME),
                metadata={"format": "pt", "operator": operator},
            )
    return Path(directory)


def load_artifact(directory: str | os.PathLike[str]) -> Artifact:
    """Read an artefact written by :func:`save_artifact` (local directory)."""
    path = Path(directory)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise IncompatibleArtifactError(f"{path} is not a modulart artefact: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise IncompatibleArtifactError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "operator" not in meta:
        raise IncompatibleArtifactError(f"{cfg} is not a modulart artefact")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{cfg} has format version {meta['format_version']} (written by modulart "
            f"{meta.get('library_version', '?')}); this modulart ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade modulart"
        )
    state = path / STATE_NAME
    tensors = load_file(str(state)) if state.is_file() else {}
    missing = sorted(set(meta.get("tensors", [])) - set(tensors))
    if missing:
        raise IncompatibleArtifactError(f"artefact {path} is incomplete: tensors {missing[:10]} are missing")
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
