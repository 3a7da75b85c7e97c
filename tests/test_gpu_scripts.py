"""The GPU benchmark and tuning scripts still run, in their CPU dry runs under Triton's interpreter.

CI has no GPU, so these scripts would otherwise only be exercised on the rare machine with one;
their dry runs go through the same code paths at tiny shapes (timings are meaningless there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not importorskip: importing triton here, before tests/test_triton.py turns its interpreter on, would
# make that module run in a subprocess instead (see its docstring).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_bench_dry_run_checks_every_implementation():
    r = _run("gpu_bench.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "correctness (rel. Frobenius error <= 0.02 vs torch backend at every size): PASS" in out
    for tokens in (1, 7, 33):
        line = next(x for x in out.splitlines() if x.startswith(f"[{tokens} tokens] check"))
        assert "routing agreement 100.00%" in line and line.endswith("PASS (tol 0.02)")


def test_tune_triton_dry_run_writes_a_table_the_backend_reads(tmp_path, monkeypatch):
    r = _run("tune_triton.py", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (table,) = tmp_path.glob("*.json")
    assert table.name == "E=16,N=32,device_name=dry-run,dtype=float32.json"
    entries = json.loads(table.read_text())
    assert set(entries) == {"1", "33"}
    import torch

    from moegraph.triton_backend import configs

    monkeypatch.setattr(configs, "_SEARCH_DIRS", list(configs._SEARCH_DIRS))
    configs.add_search_dir(tmp_path)
    try:
        cfg = configs.get_config(16, 32, 30, 30 * 4 / 16, torch.float32, "dry-run")
        assert cfg == configs.MoEConfig.from_json(entries["33"])
        assert configs.get_config(16, 32, 30, 30 * 4 / 16, torch.float32, "another-gpu") == \
            configs.default_config(30 * 4 / 16, torch.float32)
    finally:
        configs._load_table.cache_clear()
