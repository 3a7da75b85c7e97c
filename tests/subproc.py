"""Run a script as a user would, in its own session, killed with its children at a deadline; and the
helpers of tests that spawn ranks (a free port, joining them by a deadline and reading their results)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moegraph.distributed.local import free_port, stop_running

__all__ = ["ROOT", "run_script", "free_port", "join_ranks", "rank_context"]

ROOT = Path(__file__).resolve().parent.parent


def run_script(cmd: list[str], what: str, timeout: float, **env: str) -> str:
    """Run ``cmd`` from the repository root with ``env`` added; return stdout and stderr together.

    Fails the test with the output's tail when it exits non-zero or outlives ``timeout`` seconds (then
    it is killed with every process it started, e.g. torchrun's workers).
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout}s; output:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def rank_context():
    """The multiprocessing context test ranks start from: a fork server that imports torch and moegraph
    once per test process, so a rank starts by forking it instead of importing them again (about 3 s of
    CPU a rank, a tenth of the suite's). Its ranks see the environment the server started with, so a test
    that sets variables for its ranks (``monkeypatch.setenv``) starts them with ``spawn`` instead."""
    import torch.multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Has no effect once the server runs (the first test to start ranks started it with the same list).
    ctx.set_forkserver_preload(["torch", "moegraph", "moegraph.planner", "moegraph.distributed.layer"])
    return ctx


def join_ranks(procs: list, out_dir: Path, end: float, what: str) -> list[dict]:
    """Join spawned rank processes until the monotonic time ``end``, kill the ones still running (the
    test then fails, naming them), and return each rank's saved ``rank{r}.pt`` (``{"exitcode": ...}``
    for a rank that wrote none)."""
    import torch

    try:
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
    finally:
        hung = stop_running(procs)
    assert not hung, f"{what}: ranks {hung} still running after the deadline (killed)"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) if (out_dir / f"rank{r}.pt").exists()
            else {"exitcode": p.exitcode} for r, p in enumerate(procs)]
