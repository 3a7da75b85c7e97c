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


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


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
