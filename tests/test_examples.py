"""The spec-only variant and DeepSeek-V3 planning examples, run as a user would (small sizes)."""

from __future__ import annotations

import json
import sys

from subproc import run_script


def _run(*args: str, timeout: float = 240.0) -> str:
    return run_script([sys.executable, *args], args[0], timeout)


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
