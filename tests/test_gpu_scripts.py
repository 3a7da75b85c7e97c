"""The GPU benchmark and tuning scripts still run, in their CPU dry runs under Triton's interpreter.

CI has no GPU, so these scripts would otherwise only be exercised on the rare machine with one;
their dry runs go through the same code paths at tiny shapes (timings are meaningless there).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from subproc import ROOT, run_script

# Not importorskip: importing triton here, before tests/test_triton.py turns its interpreter on, would
# make that module run in a subprocess instead (see its docstring).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(script: str, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--dry-run", *args]
    return run_script(cmd, script, 600, TRITON_INTERPRET="1")


def test_gpu_bench_dry_run_checks_every_implementation():
    out = _run("gpu_bench.py")
    assert "correctness (rel. Frobenius error <= 0.02 vs torch backend at every size): PASS" in out
    for tokens in (1, 7, 33):
        line = next(x for x in out.splitlines() if x.startswith(f"[{tokens} tokens] check"))
        assert "routing agreement 100.00%" in line and line.endswith("PASS (tol 0.02)")
    assert "dense_equiv" in out and "33 tokens, the same FLOPs as dense cuBLAS GEMMs, timed alongside peak" in out


def test_gpu_fp8_bench_dry_run_checks_the_fp8_layer():
    out = _run("gpu_fp8_bench.py")
    for tokens in (1, 7):
        line = next(x for x in out.splitlines() if x.startswith(f"[{tokens} tokens] check"))
        assert line.endswith("PASS"), line
    assert "correctness (FP8 layer equal to the torch-backend FP8 layer, bf16 within the format's error): PASS" in out
    assert "fp8 vs bf16" in out


def test_tune_triton_dry_run_writes_a_table_the_backend_reads(tmp_path, monkeypatch):
    _run("tune_triton.py", "--out", str(tmp_path))
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


def test_host_overhead_script_times_both_paths():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--iters", "10"]
    out = run_script(cmd, "host_overhead.py", 600, TRITON_INTERPRET="1")
    times = {}
    for line in out.splitlines():
        name, _, rest = line.strip().partition(":")
        if rest.strip().endswith("µs"):
            times[name] = float(rest.split()[0])
    assert set(times) == {"shipped", "lookups uncached"} and all(t > 0 for t in times.values())
    assert "uncached / shipped:" in out and "shipped path, top of the profile" in out
