"""The label cache of :func:`modulart.emoe.cluster.balanced_kmeans`: an in-memory LRU plus optional files.

Keys are computed by the caller from the vectors' bytes and every argument that changes the answer
(never from shapes alone). Files are safetensors written atomically (temp file, then rename);
unreadable or ill-fitting files are ignored with a warning, never trusted.

Example:
    >>> import torch
    >>> from modulart.emoe.label_cache import cache_get, cache_put, clear_cluster_cache
    >>> cache_put("demo-key", torch.tensor([0, 1, 0, 1]), 4, 2, None, algorithm="demo")
    >>> cache_get("demo-key", 4, 2, None).tolist()
    [0, 1, 0, 1]
    >>> clear_cluster_cache()
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["cache_file", "cache_get", "cache_put", "clear_cluster_cache", "memory_put", "valid_labels"]

_CACHE_SIZE = 32
_MEMORY_CACHE: OrderedDict[str, torch.Tensor] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def clear_cluster_cache() -> None:
    """Empty the in-memory label cache of :func:`balanced_kmeans` (on-disk caches are untouched).

    Example:
        >>> from modulart.emoe.cluster import clear_cluster_cache
        >>> clear_cluster_cache()
    """
    with _CACHE_LOCK:
        _MEMORY_CACHE.clear()


def cache_file(cache_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(cache_dir) / f"emoe_kmeans_{key}.safetensors"


def valid_labels(labels: torch.Tensor, n: int, k: int) -> bool:
    if labels.dtype != torch.int64 or labels.shape != (n,):
        return False
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        return False
    sizes = torch.bincount(labels, minlength=k)
    return int(sizes.min()) == n // k and int(sizes.max()) == -(-n // k)


def cache_get(key: str, n: int, k: int, cache_dir: str | os.PathLike[str] | None) -> torch.Tensor | None:
    with _CACHE_LOCK:
        hit = _MEMORY_CACHE.get(key)
        if hit is not None:
            _MEMORY_CACHE.move_to_end(key)
            return hit
    if cache_dir is None:
        return None
    path = cache_file(cache_dir, key)
    if not path.is_file():
        return None
    try:
        labels = load_file(str(path))["labels"]
    except Exception as exc:  # corrupt or foreign file: recompute, never fail on a cache
        warnings.warn(f"ignoring unreadable cluster cache file {path}: {exc}", RuntimeWarning, stacklevel=3)
        return None
    if not valid_labels(labels, n, k):
        warnings.warn(
            f"ignoring cluster cache file {path}: labels do not fit n={n}, k={k}", RuntimeWarning, stacklevel=3
        )
        return None
    memory_put(key, labels)
    return labels


def memory_put(key: str, labels: torch.Tensor) -> None:
    with _CACHE_LOCK:
        _MEMORY_CACHE[key] = labels.detach().to("cpu", copy=True)
        _MEMORY_CACHE.move_to_end(key)
        while len(_MEMORY_CACHE) > _CACHE_SIZE:
            _MEMORY_CACHE.popitem(last=False)


def cache_put(
    key: str, labels: torch.Tensor, n: int, k: int, cache_dir: str | os.PathLike[str] | None, *, algorithm: str
) -> None:
    memory_put(key, labels)
    if cache_dir is None:
        return
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".emoe_kmeans_", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        meta = {"algorithm": algorithm, "key": key, "n": str(n), "k": str(k)}
        save_file({"labels": labels.detach().to("cpu").contiguous()}, tmp, metadata=meta)
        Path(tmp).replace(cache_file(directory, key))  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
