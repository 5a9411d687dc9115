"""The docs and docstrings stand alone: nothing points at files outside the repository and the wheel."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHIPPED += sorted((ROOT / "src" / "modulart").rglob("*.py"))
SHIPPED += sorted((ROOT / "examples").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))

# A citation of the development specs ("shared/specs/emoe.md", "the spec's ...", "(spec: ...)").
OUTSIDE = re.compile(r"shared/specs|specs/[a-z]+\.md|\bthe spec\b|DESIGN\.md", re.IGNORECASE)


def test_no_file_cites_the_development_specs() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in SHIPPED
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "docs must stand alone; these lines cite files that are not shipped:\n" + "\n".join(hits)


def test_the_pattern_catches_each_form_of_citation() -> None:
    for line in ("(spec: shared/specs/emoe.md)", "see specs/kv.md", "the spec's L-4", "../shared/DESIGN.md"):
        assert OUTSIDE.search(line), line
    for line in ("a Selector spec", "HookSpec", "layer specification", "def _resolve(spec: Any, depth: int)"):
        assert not OUTSIDE.search(line), line
