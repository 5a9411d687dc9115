"""Offline real text: language-reference prose and standard-library source."""

from __future__ import annotations

import pytest

from modulart.text import reference_paragraphs, reference_sentences, stdlib_source


def test_reference_text_is_prose() -> None:
    sents = reference_sentences(200)
    assert len(sents) == 200 and len(set(sents)) == 200
    assert all(8 <= len(s.split()) <= 40 and s.endswith(".") and "::=" not in s for s in sents)
    assert len(reference_paragraphs()) > 500


def test_stdlib_source_reads_packages_and_modules() -> None:
    email = stdlib_source("email")
    assert len(email) > 100_000 and "class Message" in email
    assert stdlib_source("argparse", max_bytes=1000) == stdlib_source("argparse")[:1000]
    with pytest.raises(FileNotFoundError, match="no_such_module"):
        stdlib_source("no_such_module")
