"""Shared test set-up: offline mode, hypothesis profiles, deterministic torch, fidelity records."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tests/families.py

settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A 1-process gloo group in this process (for fast in-process distributed tests)."""
    import datetime

    import torch.distributed as dist

    from distributed import free_port

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- fidelity records -------------------------------------------------------------------------------
# Tests comparing a reference preset with an independent re-implementation of the paper's code call
# ``agreement(operator, aspect, measured, tol)``: it asserts ``measured <= tol`` and records the number.
# ``python -m pytest tests/test_fidelity_*.py --fidelity-json=fidelity.json`` writes every record and
# prints them as the "agreement measured" column of docs/fidelity.md.

_FIDELITY: list[dict[str, object]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fidelity-json", default=None, help="write the measured reference agreements to this file")


Agreement = Callable[[str, str, float, float], None]


@pytest.fixture
def agreement(request: pytest.FixtureRequest) -> Agreement:
    """``agreement(operator, aspect, measured, tol)``: assert ``measured <= tol`` and record it."""

    def check(operator: str, aspect: str, measured: float, tol: float) -> None:
        value = float(measured)
        _FIDELITY.append(
            {"operator": operator, "aspect": aspect, "measured": value, "tol": tol, "test": request.node.nodeid}
        )
        assert math.isfinite(value) and value <= tol, (
            f"{operator} / {aspect}: measured {value:.3g} > tolerance {tol:.3g}"
        )

    return check


def pytest_terminal_summary(terminalreporter: object, config: pytest.Config) -> None:
    path = config.getoption("--fidelity-json")
    if not path or not _FIDELITY:
        return
    Path(path).write_text(json.dumps(_FIDELITY, indent=1) + "\n")
    write = terminalreporter.write_line  # type: ignore[attr-defined]
    write(f"fidelity: {len(_FIDELITY)} agreements -> {path}")
    for r in sorted(_FIDELITY, key=lambda r: (str(r["operator"]), str(r["aspect"]))):
        write(f"  {r['operator']:<11} {r['aspect']:<60} {float(r['measured']):.3g}  (tol {float(r['tol']):.3g})")  # type: ignore[arg-type]
