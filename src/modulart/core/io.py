"""Artefacts on disk and on the Hub: JSON metadata + safetensors, atomic, fingerprinted.

An artefact is a directory holding

- ``modulart_config.json``: operator name, library version, the config, the selector as written
  and as resolved, the base-model :class:`Fingerprint`, and the names of the saved tensors;
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
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modulart._version import __version__
from modulart.core.errors import IncompatibleArtifactError

__all__ = [
    "CONFIG_NAME",
    "STATE_NAME",
    "Artifact",
    "Fingerprint",
    "atomic_directory",
    "fingerprint",
    "from_pretrained",
    "load_artifact",
    "push_to_hub",
    "save_artifact",
]

CONFIG_NAME = "modulart_config.json"
STATE_NAME = "modulart_state.safetensors"
FORMAT = "modulart-artifact"
FORMAT_VERSION = 1


# --- fingerprints -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fingerprint:
    """Identity of a model's weights: one short digest per state-dict entry, plus an overall digest.

    Each entry digest covers dtype, shape, a strided sample of the raw bytes and the fp64 sum of
    all elements, so it is cheap for large models yet changes when any weight changes in practice.

    Attributes:
        digest: digest of all entries (names included).
        tensors: state-dict name -> ``"dtype|shape|hash"``.
    """

    digest: str
    tensors: dict[str, str] = field(default_factory=dict)

    def diff(self, other: Fingerprint, *, limit: int = 10) -> list[str]:
        """Human-readable differences between ``self`` (the model) and ``other`` (the saved one)."""
        if self.digest == other.digest:
            return []
        out: list[str] = []
        missing = sorted(set(other.tensors) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(other.tensors))
        if missing:
            out.append(f"missing in the model: {missing[:limit]}" + (" ..." if len(missing) > limit else ""))
        if extra:
            out.append(f"not in the saved base model: {extra[:limit]}" + (" ..." if len(extra) > limit else ""))
        changed = [k for k in sorted(set(self.tensors) & set(other.tensors)) if self.tensors[k] != other.tensors[k]]
        for k in changed[:limit]:
            mine, theirs = self.tensors[k].split("|"), other.tensors[k].split("|")
            what = "dtype" if mine[0] != theirs[0] else "shape" if mine[1] != theirs[1] else "values"
            detail = (
                f" ({theirs[0 if what == 'dtype' else 1]} saved, {mine[0 if what == 'dtype' else 1]} now)"
                if what != "values"
                else ""
            )
            out.append(f"{k}: {what} differ{detail}")
        if len(changed) > limit:
            out.append(f"... and {len(changed) - limit} more tensors differ")
        return out or ["tensor order or naming differs"]

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "tensors": dict(self.tensors)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        return cls(digest=str(data["digest"]), tensors={str(k): str(v) for k, v in data.get("tensors", {}).items()})


def _chunked_sum(flat: torch.Tensor, chunk: int = 1 << 22) -> float | int:
    """Sum of all elements without materialising a widened copy of the whole tensor."""
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    floating = flat.is_floating_point()
    total: float | int = 0.0 if floating else 0
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        total += float(part.double().sum()) if floating else int(part.long().sum())
    return total


def _tensor_digest(t: torch.Tensor, sample: int) -> str:
    t = t.detach()
    flat = t.reshape(-1)
    h = hashlib.blake2b(digest_size=8)
    if flat.numel():
        step = max(1, flat.numel() // sample)
        picked = flat[::step][:sample].contiguous().cpu()
        h.update(
            picked.view(torch.uint8).numpy().tobytes()
            if picked.dtype != torch.bool
            else picked.to(torch.uint8).numpy().tobytes()
        )
        h.update(repr(_chunked_sum(flat)).encode())
    return f"{str(t.dtype).removeprefix('torch.')}|{'x'.join(map(str, t.shape))}|{h.hexdigest()}"


def fingerprint(model: nn.Module | Mapping[str, torch.Tensor], *, sample: int = 4096) -> Fingerprint:
    """Fingerprint a model (or a state dict).

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> fingerprint(a) == fingerprint(a), fingerprint(a) == fingerprint(b)
        (True, False)
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {name: _tensor_digest(t, sample) for name, t in state.items()}
    overall = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        overall.update(f"{name}={tensors[name]};".encode())
    return Fingerprint(digest=overall.hexdigest(), tensors=tensors)


# --- atomic directories -------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block completes.

    On any exception (including ``KeyboardInterrupt``) the temporary directory is deleted and an
    existing ``target`` is left exactly as it was.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise IncompatibleArtifactError(f"{target} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        backup = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
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
@dataclass
class Artifact:
    """A loaded artefact: metadata and tensors."""

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
    def base_model(self) -> Fingerprint | None:
        fp = self.meta.get("base_model")
        return Fingerprint.from_dict(fp) if fp else None

    def check_fingerprint(self, model: nn.Module) -> None:
        """Raise :class:`IncompatibleArtifactError` if ``model`` is not the base model it was saved from."""
        saved = self.base_model
        if saved is None:
            return
        diffs = fingerprint(model).diff(saved)
        if diffs:
            lines = "\n".join(f"  - {d}" for d in diffs)
            raise IncompatibleArtifactError(
                f"artefact {self.path} ({self.operator}) was saved from a different base model:\n{lines}\n"
                "Load it into the model it was made for, or pass check_fingerprint=False to override."
            )


def save_artifact(
    directory: str | os.PathLike[str],
    *,
    operator: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
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
        tensors: what the operator owns (copied, so shared storage is fine).
        fingerprint: of the base model.
        selector: the selector as written; resolved: the paths it resolved to.
        extra: more JSON-serialisable metadata.
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise IncompatibleArtifactError(f"tensor {name!r} to save is a {type(t).__name__}, not a tensor")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "operator": operator,
        "library_version": __version__,
        "config": dict(config),
        "selector": {"written": selector, "resolved": list(resolved or [])},
        "base_model": fingerprint.to_dict() if fingerprint is not None else None,
        "tensors": sorted(tensors),
        "extra": dict(extra or {}),
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        if tensors:
            save_file(
                {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()},
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
    if meta.get("format") != FORMAT or "operator" not in meta:
        raise IncompatibleArtifactError(f"{cfg} is not a modulart artefact (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{cfg} has format version {meta['format_version']}; this modulart "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade modulart"
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


def from_pretrained(
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
