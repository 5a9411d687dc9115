"""No pickle in ``src/``: nothing that can run code while reading a file (an artefact, a checkpoint).

Python files are checked on their syntax tree (imports, calls, keyword values), other files under
``src/`` by text. The checker itself is tested on planted examples.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# modules that deserialise to arbitrary objects (or code)
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_TEXT = re.compile(
    r"\bimport\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib|marshal|shelve)\b"
    r"|\bfrom\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib|marshal|shelve)\s+import\b"
    r"|\bpickle\.loads?\b|\btorch\.save\(|allow_pickle\s*=\s*True"
)


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name / Attribute chain, else ``""``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def python_findings(path: Path, text: str) -> list[str]:
    """``file:line: what`` for every pickle-capable use in the Python source ``text``."""
    tree = ast.parse(text, filename=str(path))
    aliases: dict[str, str] = {}  # local name -> what it is (``from torch import load as tl``)
    out: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        out.append(f"{path}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    hit(node, f"import {a.name}")
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                hit(node, f"from {node.module} import ...")
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if full == "torch.load" and not _is_true(kw.get("weights_only")):
                hit(node, "torch.load(...) without weights_only=True")
            elif full == "torch.save":
                hit(node, "torch.save(...) (pickle)")
            elif full in ("numpy.load", "np.load") and _is_true(kw.get("allow_pickle")):
                hit(node, "numpy.load(..., allow_pickle=True)")
            elif full in ("importlib.import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in BANNED_MODULES:
                    hit(node, f"imports {arg.value!r} dynamically")
        elif isinstance(node, ast.Attribute) and _dotted(node).split(".")[0] in BANNED_MODULES:
            hit(node, f"uses {_dotted(node)}")
    return out


def findings(root: Path) -> list[str]:
    """Every pickle-capable use in the files under ``root`` (Python by syntax tree, others by text)."""
    out: list[str] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".so", ".png"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if path.suffix == ".py":
            out += python_findings(path, text)
        else:
            out += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in _TEXT.finditer(text)]
    return out


def test_src_holds_no_pickle() -> None:
    assert SRC.is_dir()
    assert sum(1 for _ in SRC.rglob("*.py")) > 20  # the tree is really there
    found = findings(SRC)
    assert not found, "pickle-capable code in src/:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("import pickle", "import pickle"),
        ("import cPickle as cp", "import cPickle"),
        ("from dill import loads", "from dill import"),
        ("import cloudpickle", "import cloudpickle"),
        ("import joblib", "import joblib"),
        ("import marshal", "import marshal"),
        ("import torch\nx = torch.load('f.pt')", "without weights_only=True"),
        ("import torch\nx = torch.load('f.pt', weights_only=False)", "without weights_only=True"),
        ("from torch import load\nx = load('f.pt')", "without weights_only=True"),
        ("import torch\ntorch.save({}, 'f.pt')", "torch.save"),
        ("import numpy as np\nnp.load('f.npy', allow_pickle=True)", "allow_pickle=True"),
        ("import importlib\nimportlib.import_module('pickle')", "dynamically"),
        ("import pickle as p\np.loads(b'')", "import pickle"),
    ],
)
def test_the_checker_finds_planted_examples(tmp_path: Path, line: str, what: str) -> None:
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "ok.py").write_text("import torch\nx = torch.load('f', map_location='cpu', weights_only=True)\n")
    (pkg / "bad.py").write_text("'''doc'''\n" + line + "\n")
    found = findings(tmp_path / "src")
    assert found and all(f.startswith(f"{pkg / 'bad.py'}:") for f in found), found
    assert any(what in f for f in found), found
    assert re.match(rf"{re.escape(str(pkg / 'bad.py'))}:[23]: ", found[0])


def test_the_checker_reads_non_python_files_by_text(tmp_path: Path) -> None:
    (tmp_path / "tool.pyi").write_text("x = 1\nimport pickle\n")
    assert findings(tmp_path) == [f"{tmp_path / 'tool.pyi'}:2: import pickle"]
