"""Real English text available offline: prose of the Python language reference (``pydoc_data``).

CPython ships its language reference as plain text (``pydoc_data.topics``, ~465 KB). This module
turns it into clean prose sentences for demos, calibration and benchmarks — nothing is downloaded.

Example:
    >>> from modulart.text import reference_sentences
    >>> s = reference_sentences(3)
    >>> len(s), all(x.endswith(".") for x in s)
    (3, True)
"""

from __future__ import annotations

import itertools
import re
import sysconfig
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

__all__ = ["reference_paragraphs", "reference_sentences", "stdlib_source", "topic_sentences"]


@lru_cache(maxsize=1)
def _topic_paragraphs() -> tuple[tuple[str, tuple[str, ...]], ...]:
    from pydoc_data.topics import topics

    out: list[tuple[str, tuple[str, ...]]] = []
    for name in sorted(topics):
        paras: list[str] = []
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.splitlines()
            if not lines or lines[0].startswith((" ", "\t")) or re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
                continue  # indented code / grammar, or a heading
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 8 and "::=" not in text and ">>>" not in text:
                paras.append(text)
        out.append((name, tuple(paras)))
    return tuple(out)


def reference_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs (code blocks, grammar rules and headings removed), in topic order."""
    return tuple(p for _, paras in _topic_paragraphs() for p in paras)


def _sentences(paragraphs: Iterable[str], min_words: int, max_words: int, seen: set[str]) -> Iterator[str]:
    for para in paragraphs:
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z\"*])", para):
            sent = sent.removeprefix("* ").strip()
            words = sent.split()
            if min_words <= len(words) <= max_words and sent.endswith(".") and sent not in seen:
                seen.add(sent)
                yield sent


def reference_sentences(n: int | None = None, *, min_words: int = 8, max_words: int = 40) -> list[str]:
    """Up to ``n`` distinct prose sentences of ``min_words``..``max_words`` words, deterministic order."""
    return list(itertools.islice(_sentences(reference_paragraphs(), min_words, max_words, set()), n))


def topic_sentences(*, min_words: int = 8, max_words: int = 40) -> dict[str, list[str]]:
    """The reference's prose sentences grouped by the topic (``pydoc_data.topics`` key) they come from.

    A sentence that occurs under several topics is kept only under the first (sorted topic order).

    Example:
        >>> by_topic = topic_sentences()
        >>> len(by_topic["compound"]) > 100, all(s.endswith(".") for s in by_topic["with"])
        (True, True)
    """
    seen: set[str] = set()
    return {name: list(_sentences(paras, min_words, max_words, seen)) for name, paras in _topic_paragraphs()}


def stdlib_source(package: str, max_bytes: int | None = None) -> str:
    """The source text of a standard-library package or module (``"email"``, ``"json"``, ``"argparse"``).

    Files are read in sorted path order and joined with newlines; ``max_bytes`` truncates.

    Example:
        >>> from modulart.text import stdlib_source
        >>> "def " in stdlib_source("json", max_bytes=20_000)
        True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    pkg = root / package
    files = sorted(pkg.rglob("*.py")) if pkg.is_dir() else [root / f"{package}.py"]
    files = [f for f in files if f.is_file() and "test" not in f.relative_to(root).parts[:2]]
    if not files:
        raise FileNotFoundError(f"no standard-library source for {package!r} under {root}")
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return text[:max_bytes] if max_bytes is not None else text
