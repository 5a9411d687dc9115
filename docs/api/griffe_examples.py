"""A griffe extension for the API reference: ``Example:`` sections render as ``Examples:``.

modulart's docstrings head their runnable doctests ``Example:``; griffe's Google-style parser knows
only the plural as a section of examples (the singular becomes an admonition whose ``>>>`` lines
render as running text). Loaded by mkdocs.yml (mkdocstrings ``extensions``); not part of the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename every ``Example:`` section header of a docstring to ``Examples:`` before it is parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
