"""Shared test helpers (kept generic: anything stage-specific lives in that stage's test file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
