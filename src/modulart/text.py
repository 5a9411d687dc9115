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

import re
from functools import lru_cache

__all__ = ["reference_paragraphs", "reference_sentences"]


@lru_cache(maxsize=1)
def reference_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs (code blocks, grammar rules and headings removed), in topic order."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.splitlines()
            if not lines or lines[0].startswith((" ", "\t")) or re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
                continue  # indented code / grammar, or a heading
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 8 and "::=" not in text and ">>>" not in text:
                out.append(text)
    return tuple(out)


def reference_sentences(n: int | None = None, *, min_words: int = 8, max_words: int = 40) -> list[str]:
    """Up to ``n`` distinct prose sentences of ``min_words``..``max_words`` words, deterministic order."""
    out: list[str] = []
    seen: set[str] = set()
    for para in reference_paragraphs():
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z\"*])", para):
            sent = sent.removeprefix("* ").strip()
            words = sent.split()
            if min_words <= len(words) <= max_words and sent.endswith(".") and sent not in seen:
                seen.add(sent)
                out.append(sent)
                if n is not None and len(out) >= n:
                    return out
    return out
