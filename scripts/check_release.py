"""Release check: build the sdist and wheel, inspect them, install the wheel into a clean virtual
environment and run ``modulart tour --quick`` from it (outside the source tree).

Run: python scripts/check_release.py [--keep DIR]   (CI runs it; about two minutes)

Checks: the wheel holds the package with ``py.typed`` and the LICENSE and no tests; its README (the
package index page) has no relative link; the sdist holds the sources and tests; the installed
wheel imports without transformers and its tour runs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU build the README pins (an unpinned torch pulls a multi-GB CUDA build)


def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def fail(message: str) -> None:
    sys.exit(f"check_release: {message}")


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
    if "modulart/py.typed" not in names:
        fail("the wheel has no modulart/py.typed")
    if not any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names):
        fail("the wheel has no LICENSE")
    if any(n.startswith("tests/") or "/tests/" in n for n in names):
        fail("the wheel ships tests")
    body = metadata.split("\n\n", 1)[1]
    relative = [link for link in re.findall(r"\]\(([^)\s]+)\)", body) if not link.startswith(("http", "#"))]
    if relative:
        fail(f"the package index README has relative links (they break there): {relative[:5]}")
    absolute = len(re.findall(r"\]\(http", body))
    print(f"wheel ok: {len(names)} files, {absolute} absolute README links")


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as t:
        names = t.getnames()
    for needed in ("src/modulart/__init__.py", "tests/conftest.py", "README.md", "LICENSE"):
        if not any(n.endswith(needed) for n in names):
            fail(f"the sdist has no {needed}")
    print(f"sdist ok: {len(names)} files")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="build and install here and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="modulart-release-"))
    try:
        dist = work / "dist"
        run([sys.executable, "-m", "build", "-q", "-o", str(dist), str(ROOT)])
        (wheel,) = dist.glob("*.whl")
        (sdist,) = dist.glob("*.tar.gz")
        check_wheel(wheel)
        check_sdist(sdist)
        venv = work / "venv"
        run([sys.executable, "-m", "venv", str(venv)])
        py = venv / "bin" / "python"
        run([str(py), "-m", "pip", "install", "-q", TORCH])
        run([str(py), "-m", "pip", "install", "-q", f"{wheel}[demo]"])
        outside = work / "run"
        outside.mkdir(exist_ok=True)
        light = "import sys, modulart; sys.exit(sorted({'transformers', 'matplotlib'} & set(sys.modules)) or 0)"
        run([str(py), "-c", light], cwd=outside)
        run([str(venv / "bin" / "modulart"), "version"], cwd=outside)
        run([str(venv / "bin" / "modulart"), "tour", "--quick"], cwd=outside)
        print("release check passed")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
