"""Shared test helpers (kept generic: anything stage-specific lives in that stage's test file)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bytecode caches on, for this process and every process it starts. The suite starts a few hundred
# Python processes (CLI commands, ranks, the Triton module's own interpreter), and with caching off
# (PYTHONDONTWRITEBYTECODE=1, as on some CI machines) each of them compiled moegraph's modules again
# (0.3-0.4 s) and each xdist worker rewrote every test module's asserts again (collection 18.6 s ->
# 11.6 s with caches, measured on a 2-core EPYC). The caches land in __pycache__/ (git-ignored).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker gets its share of the cores as torch threads: two workers of two threads each
    on two cores ran test_layer + test_strategies in 105 s, of one thread each in 82 s (OpenMP threads of two
    processes time-slicing one core wait on each other). Processes a test starts keep torch's default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow are spread over the first half of the run, a module's together (its module-scoped
    fixtures are then built once). xdist hands the collection out in order, so a long test near the end
    (the Triton module's own interpreter, two minutes, sorts late) kept one worker busy while the other
    had nothing left; early, and spread over both workers' first batches, short tests fill in around
    them. The order is the same on every worker, as xdist requires."""
    units: dict[str, list[pytest.Item]] = {}
    rest = []
    for item in items:
        if item.get_closest_marker("slow") is None:
            rest.append(item)
        else:
            units.setdefault(item.nodeid.split("::")[0], []).append(item)
    if not units or not rest:
        return
    step = max(1, len(rest) // 2 // len(units))
    slow = iter(units.values())
    out: list[pytest.Item] = []
    for k, item in enumerate(rest):
        if k % step == 0:
            out.extend(next(slow, []))
        out.append(item)
    for unit in slow:
        out.extend(unit)
    items[:] = out


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``moegraph <args>`` in-process through ``moegraph.cli.main``; return (exit code, stdout, stderr)."""
    from moegraph.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before this call
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture(autouse=True)
def _fixed_expert_strategy_rule():
    """Tests run the expert op through the fixed rule (and the paths they pin), not by measurement,
    so that which strategy a test exercises never depends on this machine's timings (the CLI turns
    tuning on when a test runs it in-process; this turns it off again for the next test)."""
    from moegraph import tuning

    tuning.disable_tuning()
    yield
    tuning.disable_tuning()
