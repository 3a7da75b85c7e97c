"""The spec-only variant and DeepSeek-V3 planning examples, run as a user would (small sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 240.0) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_new_moe_variant_example():
    out = _run("examples/new_moe_variant.py", "--tokens", "96", "--rounds", "2")
    assert "matches the plain reference: outputs and 7 gradients within 1e-5" in out
    assert "speed-up" in out


def test_plan_deepseek_v3_example(tmp_path):
    out = _run("examples/plan_deepseek_v3.py", "--tokens", "1024", "-o", str(tmp_path / "plan.json"))
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["physical_to_logical_map"]) == 58
    assert all(len(row) == 288 for row in plan["physical_to_logical_map"])
    assert "synthetic (not real data)" in out and "load_only" in out
