"""The optimize examples, run as a user would (subprocess, --small sizes): exit 0 and the key lines.

- ``examples/optimize_hf_model.py --small``: every MoE block of an HF model swapped and verified,
  same logits and greedy tokens, a speed table against transformers' own implementations;
- ``examples/naive_moe_swap.py --small``: a user's naive loop MoE matched by structure and swapped,
  same outputs, a measured speed-up.

Each subprocess runs in its own session and is killed (with any children) at its deadline.
"""

from __future__ import annotations

import re
import sys

import pytest
from subproc import ROOT, run_script

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow



def _run(script: str, *args: str, timeout: float = 180.0) -> str:
    return run_script([sys.executable, str(ROOT / "examples" / script), *args], script, timeout, COLUMNS="160")


def test_optimize_hf_model_example() -> None:
    # DeepSeek-V3 shape: a dense first layer, shared expert, sigmoid + bias + group-limited routing.
    out = _run("optimize_hf_model.py", "--small", "--model-type", "deepseek_v3", "--threads", "1")
    assert re.search(r"swapped (\d) of \1 MoE blocks", out), out  # DeepSeek: first layer dense
    assert "greedy tokens identical: True" in out, out
    diff = float(re.search(r"max \|logits diff\| = ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4, out
    assert re.search(r"prefill speed-up vs transformers eager: [0-9.]+x", out), out
    assert "hf eager" in out and "moegraph" in out, out


def test_naive_moe_swap_example() -> None:
    out = _run("naive_moe_swap.py", "--small", "--tokens", "48", "--threads", "1")  # an explicit size wins
    assert "swapped 2 of 2 naive MoE blocks" in out and "(2 layers, 48 tokens, 8 experts, top-2," in out, out
    assert "structure" in out and "top-2 softmax, normalised" in out, out
    diff = float(re.search(r"max \|output diff\| = ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4, out
    assert re.search(r"speed-up: [0-9.]+x", out), out
