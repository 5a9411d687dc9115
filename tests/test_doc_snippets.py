"""The docs are executable: every Python code block of README.md and docs/*.md runs as written.

Each page's ```python blocks are extracted in order and executed in one fresh interpreter, in one
namespace (like a notebook: a page's later blocks use what its earlier ones built, so each page
says on itself where its ``model`` comes from), in an empty working folder, offline. Blocks made of
``>>>`` lines run as doctests. Two kinds of block do not run here, and each is checked instead:

- ``# recipe: <name>`` blocks of docs/distributed.md, which tests/test_distributed_recipes.py
  launches on two processes (this file checks it knows every one of them);
- a block right after ``<!-- snippet: skip <reason> -->``: the reason is required, and so is
  keeping them few (``MAX_SKIPS``).

Also here: every relative link of README.md and docs/ resolves to a file inside the repository (and
every ``#anchor`` to a heading of its page), and every public name (``modulart.__all__`` and each
subpackage's ``__all__``) has an entry in the API reference under docs/api/.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
REPO_URL = re.compile(r"^https://github\.com/modulart/modulart/(?:blob|tree)/main/(?P<path>[^#?]*)(?:#.*)?$")
MAX_SKIPS = 4

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)
SKIP = re.compile(r"<!--\s*snippet:\s*skip\b(?P<why>.*?)-->\s*\Z", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason given in <!-- snippet: skip ... -->, or None

    @property
    def recipe(self) -> str | None:
        first = self.code.split("\n", 1)[0]
        return first.removeprefix("# recipe: ").strip() if first.startswith("# recipe: ") else None

    @property
    def doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")


def python_blocks(page: Path, name: str | None = None) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip()
        skip = SKIP.search(before)
        code = textwrap.dedent(m.group("body"))
        out.append(
            Block(
                page=name or str(page.relative_to(ROOT)),
                line=text.count("\n", 0, m.start()) + 1,
                code=code,
                skip=skip.group("why").strip() if skip else None,
            )
        )
    return out


ALL_BLOCKS = [b for page in PAGES for b in python_blocks(page)]
RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if b.skip is None and b.recipe is None})

# Runs in one fresh interpreter: torch, transformers and modulart are imported once (that import is
# most of a page's time), then each page runs in a forked child of its own — its own process state
# and working folder, as if in a fresh interpreter — its blocks in order, one namespace, doctests
# with doctest. Each child writes its output to <page folder>/log.txt.
RUNNER = r"""
import doctest, json, os, sys, time, traceback
import torch, modulart
spec = json.load(open(sys.argv[1], encoding="utf-8"))
if spec["preload"]:
    for _name in ("emoe", "kv", "migu", "patcher", "stacking", "introspect"):
        __import__(f"modulart.{_name}")
    for _name in ("llama", "bert", "mixtral", "mistral"):
        __import__(f"transformers.models.{_name}.modeling_{_name}")

def run(blocks):
    ns = {"__name__": "__main__"}
    for b in blocks:
        where = f"{b['page']}:{b['line']}"
        try:
            if b["doctest"]:
                test = doctest.DocTestParser().get_doctest(b["code"], ns, where, where, b["line"])
                runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
                runner.run(test, clear_globs=False)
                if runner.failures:
                    print(f"SNIPPET FAILED: {where}: {runner.failures} doctest example(s) failed", flush=True)
                    return 1
            else:
                exec(compile(b["code"], where, "exec"), ns)
        except BaseException:
            traceback.print_exc()
            print(f"SNIPPET FAILED: {where}", flush=True)
            return 1
        print(f"SNIPPET OK: {where}", flush=True)
    return 0

results = {}
for page, item in spec["pages"].items():
    start = time.perf_counter()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(os.path.join(item["folder"], "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1); os.dup2(fd, 2)
            os.chdir(os.path.join(item["folder"], "work"))
            code = run(item["blocks"])
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    results[page] = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}
json.dump(results, open(sys.argv[2], "w", encoding="utf-8"))
"""


@dataclasses.dataclass(frozen=True)
class PageRun:
    rc: int
    seconds: float
    log: str
    blocks: int


def _run_pages(pages: dict[str, list[Block]], base: Path) -> dict[str, PageRun]:
    """Run each page's blocks (see ``RUNNER``) in one interpreter, a forked child per page.

    transformers and every subpackage are imported before the first fork when a page needs them.
    """
    if not hasattr(os, "fork"):
        pytest.skip("the snippet runner forks one child per page (POSIX only)")
    spec: dict[str, dict[str, object]] = {}
    for i, (page, blocks) in enumerate(pages.items()):
        folder = base / f"page{i}"
        (folder / "work").mkdir(parents=True)
        spec[page] = {
            "folder": str(folder),
            "blocks": [{**dataclasses.asdict(b), "doctest": b.doctest} for b in blocks],
        }
    preload = any(_heavy_code(blocks) for blocks in pages.values())
    (base / "spec.json").write_text(json.dumps({"preload": preload, "pages": spec}), encoding="utf-8")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(base / "spec.json"), str(base / "results.json")],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, f"the snippet runner failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    results = json.loads((base / "results.json").read_text(encoding="utf-8"))
    return {
        page: PageRun(
            rc=r["rc"],
            seconds=r["seconds"],
            log=(Path(str(spec[page]["folder"])) / "log.txt").read_text(encoding="utf-8", errors="replace"),
            blocks=len(pages[page]),
        )
        for page, r in results.items()
    }


def _runnable(page: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.page == page and b.skip is None and b.recipe is None]


def _heavy_code(blocks: list[Block]) -> bool:
    code = "\n".join(b.code for b in blocks)
    return "transformers" in code or "torch.compile" in code


def _heavy(page: str) -> bool:
    """A page whose snippets import transformers or compile takes more than a few seconds: slow."""
    return _heavy_code(_runnable(page))


@pytest.fixture(scope="session")
def page_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PageRun]:
    """Every selected page of this session, run once, together (one import of torch and transformers)."""
    pytest.importorskip("transformers")
    wanted = sorted(
        {
            item.callspec.params["page"]
            for item in request.session.items
            if getattr(item, "originalname", None) == "test_page_snippets_run_as_written"
        }
    )
    return _run_pages({page: _runnable(page) for page in wanted}, tmp_path_factory.mktemp("doc-snippets"))


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if _heavy(p) else p for p in RUN_PAGES])
def test_page_snippets_run_as_written(page: str, page_runs: dict[str, PageRun]) -> None:
    run = page_runs[page]
    print(f"{page}: {run.blocks} blocks in {run.seconds:.1f} s")
    assert run.rc == 0, f"{page}:\n{run.log[-8000:]}"
    assert run.log.count("SNIPPET OK:") == run.blocks, run.log[-8000:]


def test_snippets_are_found_and_nearly_all_run() -> None:
    assert len(ALL_BLOCKS) >= 30, len(ALL_BLOCKS)
    skipped = [b for b in ALL_BLOCKS if b.skip is not None]
    assert all(b.skip for b in skipped), [f"{b.page}:{b.line}" for b in skipped if not b.skip]  # a reason each
    assert len(skipped) <= MAX_SKIPS, [f"{b.page}:{b.line}: {b.skip}" for b in skipped]
    # the README's quick start runs here, not only in a recipe or a skip
    assert any(b.page == "README.md" and b.skip is None for b in ALL_BLOCKS)


def test_every_recipe_block_is_launched_by_the_recipe_tests() -> None:
    import test_distributed_recipes as recipes_test

    found = {b.recipe for b in ALL_BLOCKS if b.recipe is not None}
    assert {b.page for b in ALL_BLOCKS if b.recipe is not None} <= {"docs/distributed.md"}
    assert found == set(recipes_test.recipes()), found
    assert found == set(recipes_test.LAUNCHED) | {"kv"}, found  # "kv" is spliced into the launched ones


def test_the_fence_parser_sees_indented_skipped_and_doctest_blocks(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n<!-- snippet: skip needs a GPU -->\n```python\ny = 2\n```\n"
        "<details>\n\n  ```python\n  z = 3\n  ```\n\n</details>\n```text\nnot python\n```\n"
        "```python\n>>> 1 + 1\n2\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page, "p.md")
    assert [(b.code, b.skip, b.doctest) for b in blocks] == [
        ("x = 1\n", None, False),
        ("y = 2\n", "needs a GPU", False),
        ("z = 3\n", None, False),
        (">>> 1 + 1\n2\n", None, True),
    ]


def test_a_failing_snippet_fails_its_page_only(tmp_path: Path) -> None:
    broken = Block(page="broken.md", line=3, code="x = 1\nraise ValueError('boom')\n", skip=None)
    fine = Block(page="fine.md", line=1, code="import torch\nassert torch.ones(2).sum() == 2\n", skip=None)
    doc = Block(page="doc.md", line=5, code=">>> 1 + 1\n3\n", skip=None)
    runs = _run_pages({"broken.md": [broken], "fine.md": [fine], "doc.md": [doc]}, tmp_path)
    assert runs["broken.md"].rc != 0 and "SNIPPET FAILED: broken.md:3" in runs["broken.md"].log
    assert "ValueError: boom" in runs["broken.md"].log
    assert runs["fine.md"].rc == 0 and runs["fine.md"].log.count("SNIPPET OK:") == 1
    assert runs["doc.md"].rc != 0 and "SNIPPET FAILED: doc.md:5" in runs["doc.md"].log


# --- links ----------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)|(?:href|src)=\"(?P<html>[^\"]+)\"")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$", re.MULTILINE)


def _slug(title: str) -> str:
    """The anchor Python-Markdown's toc extension (mkdocs) gives a heading."""
    title = re.sub(r"`([^`]*)`", r"\1", title)
    title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    title = re.sub(r"[^\w\s-]", "", title).strip().lower()
    return re.sub(r"[-\s]+", "-", title)


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group("title")) for m in HEADING.finditer(text)}


def _links(page: Path) -> list[str]:
    return _links_in(FENCE.sub("", page.read_text(encoding="utf-8")))


def _links_in(text: str) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group("target") or m.group("html") for m in LINK.finditer(text)]


def _link_problem(page: Path, target: str) -> str | None:
    repo = REPO_URL.match(target)
    if repo:  # an absolute link into this repository (README on the package index): the file must exist
        path = (ROOT / repo.group("path")).resolve()
        return None if path.exists() and path.is_relative_to(ROOT) else "no such file in the repository"
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http(s):, mailto: ... to elsewhere
        return None
    if target.startswith("/"):
        return "absolute path"
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.is_relative_to(ROOT):
        return "leaves the repository"
    if not dest.exists():
        return "no such file"
    if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        return f"no heading #{anchor} in {dest.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_link_stays_in_the_repository_and_resolves(page: Path) -> None:
    bad = [f"{t}: {why}" for t in _links(page) if (why := _link_problem(page, t))]
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_the_link_check_catches_links_that_leave(tmp_path: Path) -> None:
    page = DOCS / "index.md"
    assert _link_problem(page, "../../shared/x.md") == "leaves the repository"
    assert _link_problem(page, "/etc/passwd") == "absolute path"
    assert _link_problem(page, "missing.md") == "no such file"
    assert _link_problem(page, "views.md#no-such-heading") is not None
    assert _link_problem(page, "https://github.com/modulart/modulart/blob/main/nope.md") is not None
    assert _link_problem(page, "views.md#every-view-is-verified") is None
    assert _link_problem(page, "https://github.com/modulart/modulart/blob/main/README.md") is None
    assert _links_in('[a](x.md) ![img](y.png) `[b](z.md)` <a href="w.md">') == ["x.md", "w.md"]


# --- API reference --------------------------------------------------------------------------------

DIRECTIVE = re.compile(r"^:::\s+(?P<path>[\w.]+)\s*$", re.MULTILINE)


def _documented() -> set[str]:
    return {m.group("path") for page in (DOCS / "api").glob("*.md") for m in DIRECTIVE.finditer(page.read_text())}


def _public() -> set[str]:
    import modulart

    names = {f"modulart.{n}" for n in modulart.__all__}
    for info in pkgutil.iter_modules(modulart.__path__):
        if info.ispkg:
            sub = importlib.import_module(f"modulart.{info.name}")
            names |= {f"modulart.{info.name}.{n}" for n in getattr(sub, "__all__", ())}
    return names


def test_every_public_name_has_an_api_reference_entry() -> None:
    missing = sorted(_public() - _documented())
    assert not missing, "public names without a `::: <name>` entry in docs/api/*.md:\n" + "\n".join(missing)
    assert len(_public()) > 150


@pytest.mark.slow  # imports every subpackage, transformers included (MIGUCallback)
def test_every_api_reference_entry_resolves() -> None:
    for path in sorted(_documented()):
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)  # AttributeError names the entry that does not resolve
            break
        else:
            pytest.fail(f"{path}: not importable")


def test_api_pages_are_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in sorted((DOCS / "api").glob("*.md")):
        assert f"api/{page.name}" in nav, page.name
    for page in sorted(DOCS.glob("*.md")):
        assert re.search(rf":\s+{re.escape(page.name)}\s*$", nav, re.MULTILINE), f"{page.name} is not in the nav"
