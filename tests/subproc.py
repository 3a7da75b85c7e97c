"""Run a script as a user would, in its own session, killed with its children at a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

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
