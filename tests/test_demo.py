"""The README's main job, on the tiny DeepSeek-V2-Lite preset (same pipeline, tiny width)."""

from __future__ import annotations

import json

import pytest

from moegraph.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    assert main(["demo", "--spec", "deepseek-v2-lite-tiny", "-o", str(tmp_path), "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["physical_to_logical_map"]) == 26 and len(plan["physical_to_logical_map"][0]) == 72
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    assert list((tmp_path / "generated").glob("moe_deepseek_v2_lite_tiny_*_torch.py"))
    assert "finite=True" in out and "UsePrepackedExperts" in out
