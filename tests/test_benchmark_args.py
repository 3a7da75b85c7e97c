"""The benchmark and example scripts refuse bad arguments in their parsers: a one-line usage error naming
the option (exit status 2, no traceback), before any work; and ``--help`` only prints the usage."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest
from subproc import ROOT


def _run(path: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / path), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _refused(path: str, *args: str, option: str) -> str:
    r = _run(path, *args)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and not r.stdout, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{path.rpartition('/')[2]}: error: argument {option}: "), last
    return last


def test_ep_fault_timing_help_prints_usage_only():
    r = _run("benchmarks/ep_fault_timing.py", "--help", timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage: ep_fault_timing.py") and "--timeout" in r.stdout
    assert "reported" not in r.stdout
    assert "must be a positive number, got '0'" in _refused("benchmarks/ep_fault_timing.py", "--timeout", "0",
                                                             option="--timeout")
    _refused("benchmarks/ep_fault_timing.py", "--faults", "freeze", option="--faults")


def test_shared_argument_types():
    import argparse

    from moegraph import argtypes as _args

    assert _args.positive_int("3") == 3 and _args.nonnegative_int("0") == 0 and _args.positive_float("0.5") == 0.5
    for fn, bad in ((_args.positive_int, ["0", "-1", "1.5", "x"]), (_args.nonnegative_int, ["-1", "x"]),
                    (_args.positive_float, ["0", "-2", "nan", "inf", "x"])):
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError, match="must be"):
                fn(text)


def test_first_call_reports_the_childs_error_and_refuses_zero_runs():
    r = _run("benchmarks/first_call.py", "--spec", "nosuch", "--runs", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "CHILD" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0] == "first_call.py: run 1 failed (exit status 1):"
    assert r.stderr.splitlines()[1].startswith("error: nosuch: <root>: no spec file or preset named 'nosuch'")
    _refused("benchmarks/first_call.py", "--runs", "0", option="--runs")
    _refused("benchmarks/first_call.py", "--threads", "-1", option="--threads")


BAD = [  # (script, arguments, the option the error names, text in the message)
    ("benchmarks/layer_bench.py", ["--tokens", "1", "-5"], "--tokens", "must be a positive integer, got '-5'"),
    ("benchmarks/layer_bench.py", ["--rounds", "0"], "--rounds", "positive integer"),
    ("benchmarks/layer_bench.py", ["--threads", "-1"], "--threads", "integer >= 0"),
    ("benchmarks/layer_bench.py", ["--strategy", "bogus"], "--strategy", "invalid choice: 'bogus'"),
    ("benchmarks/fp8_bench.py", ["--tokens", "0"], "--tokens", "positive integer"),
    ("benchmarks/backward_bench.py", ["--tokens", "0"], "--tokens", "positive integer"),
    ("benchmarks/autocast_bench.py", ["--dtype", "float8"], "--dtype", "invalid choice: 'float8'"),
    ("benchmarks/host_overhead.py", ["--spec", "nosuch"], "--spec", "no spec file or preset named 'nosuch'"),
    ("benchmarks/host_overhead.py", ["--iters", "0"], "--iters", "positive integer"),
    ("benchmarks/plan_bench.py", ["--configs", "foo"], "--configs", "must be NODESxGPUS:SLOTS"),
    ("benchmarks/plan_bench.py", ["--configs", "1x8:32"], "--configs", "at least the 64 experts"),
    ("benchmarks/replan_window_size.py", ["--windows", "0"], "--windows", "positive integer"),
    ("benchmarks/replan_window_size.py", ["--windows", "100000"], "--windows", "at most 5888, got 100000"),
    ("benchmarks/replan_bench.py", ["--seed", "-1"], "--seed", "integer >= 0"),
    ("benchmarks/replan_bench.py", ["--plot", "/proc/nosuch/plot.png"], "--plot",
     "cannot make its folder /proc/nosuch"),
    ("benchmarks/rebalance_threshold.py", ["--ranks", "0"], "--ranks", "positive integer"),
    ("benchmarks/rebalance_threshold.py", ["--ranks", "3"], "--ranks", "20 expert slots split evenly over 2, 4, 5"),
    ("benchmarks/gpu_bench.py", ["--iters", "0"], "--iters", "positive integer"),
    ("benchmarks/gpu_fp8_bench.py", ["--tokens", "-1"], "--tokens", "positive integer"),
    ("benchmarks/tune_triton.py", ["--budget-s", "0"], "--budget-s", "positive number"),
    ("examples/plan_deepseek_v3.py", ["--tokens", "-5"], "--tokens", "positive integer"),
    ("examples/plan_deepseek_v3.py", ["--trace", "/nonexistent"], "--trace", "no such trace file or folder"),
    ("examples/new_moe_variant.py", ["--rounds", "0"], "--rounds", "positive integer"),
    ("examples/naive_moe_swap.py", ["--small", "--top-k", "9"], "--top-k", "at most --experts (8), got 9"),
    ("examples/optimize_hf_model.py", ["--seq", "0"], "--seq", "positive integer"),
    # Under torchrun every rank refuses alike, before any collective (rank 1 used to report a missing
    # checkpoint after rank 0 failed); one process shows the message.
    ("examples/expert_parallel.py", ["--tokens", "-3"], "--tokens", "must be a positive integer, got '-3'"),
    ("examples/replan_loop.py", ["--timeout", "0"], "--timeout", "positive number of seconds"),
]


@pytest.mark.parametrize("script, args, option, text", BAD,
                         ids=[f"{s.split('/')[1]} {' '.join(a)}" for s, a, _, _ in BAD])
def test_a_bad_argument_is_one_line_naming_its_option(script, args, option, text, monkeypatch, capsys):
    """Run in this process as ``python script args`` would (its folder first on sys.path), to the parser's exit: a
    fresh interpreter per case (importing torch) cost about 3 s each; the subprocess tests above keep the whole path."""
    path = ROOT / script
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    monkeypatch.syspath_prepend(str(path.parent))
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(path), run_name="__main__")
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and not out and "Traceback" not in err, (exc.value.code, out[-2000:], err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{path.name}: error: argument {option}: ") and text in last, last


def test_autocast_bench_checks_the_layer_made_in_its_dtype(monkeypatch, capsys):
    """The mixed-precision bench runs end to end on a few tokens and finds the float32 layer under autocast equal to
    the layer made in bfloat16 (its exit status says so too)."""
    path = ROOT / "benchmarks" / "autocast_bench.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--tokens", "8", "--rounds", "1", "--threads", "1"])
    monkeypatch.syspath_prepend(str(path.parent))
    import torch

    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(path), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the script sets this process's count
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "8" and row[-1] == "yes", out
