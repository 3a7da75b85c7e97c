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

import pytest
from subproc import ROOT, run_script

# Not importorskip: importing triton here, before tests/test_triton.py turns its interpreter on, would
# make that module run in a subprocess instead (see its docstring).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _load(script: str):
    """A benchmark script as a module (its top level imports only the standard library and moegraph.argtypes)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "benchmarks" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_timer_starts_every_call_synchronised(monkeypatch):
    """On CUDA each call's start event is recorded right after a device synchronisation, so the
    events cover the call's host time: none of it hides behind work the previous call queued."""
    import torch

    gb = _load("gpu_bench.py")
    log, clock = [], [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]
            log.append("record")

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))

    def work(ms):
        def fn():
            clock[0] += ms
            log.append("call")
        return fn

    times = gb.time_interleaved({"a": work(1.0), "b": work(3.0)}, iters=3, warmup=1, device=torch.device("cuda"))
    assert times == {"a": 1.0, "b": 3.0}
    timed = log[log.index("sync") + 1:]  # after the warm-up calls and their synchronisation
    assert timed == ["sync", "record", "call", "record"] * 6 + ["sync"]
    assert gb.time_isolated({"a": work(2.0)}, iters=2, warmup=0, device=torch.device("cuda")) == {"a": 2.0}


def test_gpu_speed_verdict_counts_a_tie_as_no_win():
    gb = _load("gpu_bench.py")
    assert gb.TIE == 0.03
    assert gb.speed_verdict([(1, 1.04), (1024, 1.44)]) == "YES"
    assert gb.speed_verdict([(1, 1.00), (1024, 1.44), (8192, 1.34)]) == "NO: a tie at [1]"
    assert gb.speed_verdict([(1, 0.97), (16, 1.03), (128, 0.96)]) == "NO: a tie at [1, 16]; slower at [128]"


def _run(script: str, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--dry-run", *args]
    return run_script(cmd, script, 600, TRITON_INTERPRET="1")


@pytest.mark.slow
def test_gpu_bench_dry_run_checks_every_implementation():
    out = _run("gpu_bench.py")
    assert "correctness (rel. Frobenius error <= 0.02 vs torch backend at every size): PASS" in out
    for tokens in (1, 7, 33):
        line = next(x for x in out.splitlines() if x.startswith(f"[{tokens} tokens] check"))
        assert "routing agreement 100.00%" in line and line.endswith("PASS (tol 0.02)")
    assert "dense_equiv" in out and "33 tokens, the same FLOPs as dense cuBLAS GEMMs, timed alongside peak" in out


@pytest.mark.slow
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


TUNE_FAILING = """
import runpy, sys
sys.path.insert(0, "benchmarks")
from moegraph.triton_backend import kernels
real, fail_at = kernels.prepare, {int(b) for b in sys.argv[2].split(",")}
def prepare(*a, **k):  # every gate_up GEMM with a BLOCK_M in fail_at raises, as one out of resources would
    launch, rest = real(*a, **k)
    class Failing:
        def __getattr__(self, name):
            return getattr(launch, name)
        def gate_up(self, aligned, bm, *r):
            if bm in fail_at:
                raise RuntimeError("out of resources")
            return launch.gate_up(aligned, bm, *r)
    return Failing(), rest
kernels.prepare = prepare
sys.argv = ["tune_triton.py", "--dry-run", "--out", sys.argv[1], "--block-m", "16", "32"]
runpy.run_path("benchmarks/tune_triton.py", run_name="__main__")
"""


def test_tune_triton_skips_a_block_size_whose_candidates_all_fail(tmp_path):
    out = run_script([sys.executable, "-c", TUNE_FAILING, str(tmp_path / "a"), "16"], "tune_triton.py", 600,
                     TRITON_INTERPRET="1")
    assert "every gate_up candidate failed at BLOCK_M=16: BLOCK_M=16 skipped" in out
    (table,) = (tmp_path / "a").glob("*.json")
    assert {e["BLOCK_M"] for e in json.loads(table.read_text()).values()} == {32}
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TUNE_FAILING, str(tmp_path / "b"), "16,32"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().endswith("tune_triton.py: no configuration ran at any token count; no table written")
    assert "every candidate failed at every BLOCK_M: no entry for 33 tokens" in r.stdout
    assert not (tmp_path / "b").exists()


def test_host_overhead_script_times_both_paths():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--iters", "10"]
    out = run_script(cmd, "host_overhead.py", 600, TRITON_INTERPRET="1")
    times = {}
    for line in out.splitlines():
        name, _, rest = line.strip().partition(":")
        if rest.strip().endswith("µs"):
            times[name] = float(rest.split()[0])
    assert set(times) == {"shipped", "lookups uncached", "uncached + check"} and all(t > 0 for t in times.values())
    assert "uncached / shipped:" in out and "shipped path, top of the profile" in out
