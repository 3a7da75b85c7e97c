"""What a new user meets first: CLI conventions, install hints, the first call, export and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

import moegraph
from moegraph.errors import InputError, MissingDependency

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_version_and_short_help(run_cli):
    res = run_cli("--version")
    assert res.code == 0 and res.out.strip() == f"moegraph {moegraph.__version__}"
    for args in (("-h",), ("plan", "-h"), ("trace", "import", "-h")):
        res = run_cli(*args)
        assert res.code == 0 and "Usage: moegraph" in res.out, args


def test_python_dash_m_is_the_command():
    r = _python("", "-m", "moegraph", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"moegraph {moegraph.__version__}"


def test_the_cli_never_imports_click():
    # click is not a dependency (typer >= 0.29 vendors its own copy): the CLI must work without it.
    code = ("import sys; sys.modules['click'] = None\n"
            "from moegraph.cli import main\n"
            "raise SystemExit(main(['presets']))")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert "deepseek-v3-tiny" in r.stdout


def test_submodules_are_attributes():
    r = _python("import moegraph; print(moegraph.codegen.set_cache_dir.__name__)")
    assert r.returncode == 0 and r.stdout.strip() == "set_cache_dir", r.stderr


def test_install_hints_keep_their_extra(run_cli):
    with pytest.raises(MissingDependency, match=r"pip install 'moegraph\[plot\]'"):
        from moegraph.errors import require

        require("no_such_module_for_moegraph", "plot", "--plot")
    # The CLI prints the hint with its brackets (rich markup would eat "[hf]").
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from moegraph.cli import main\n"
            "raise SystemExit(main(['bench', '-t', '1']))")
    r = _python(code)
    assert r.returncode == 2
    assert "pip install 'moegraph[hf]'" in r.stderr and "--no-hf" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_first_forward_does_not_import_dynamo_and_compile_still_works():
    code = ("import sys, torch, moegraph\n"
            "s = moegraph.load_spec('deepseek-v3-tiny')\n"
            "layer = moegraph.compile(s, dtype=torch.float32, seed=0)\n"
            "x = torch.randn(2, 8, s.moe.hidden_size)\n"
            "y = layer(x)\n"
            "print('dynamo after first forward:', 'torch._dynamo' in sys.modules)\n"
            "yc = torch.compile(layer, backend='eager', fullgraph=True)(x)\n"
            "print('compiled matches:', bool(torch.allclose(y, yc, atol=1e-5)))\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dynamo after first forward: False" in r.stdout
    assert "compiled matches: True" in r.stdout


def test_progress_is_plain_lines_when_piped():
    from io import StringIO

    from rich.console import Console

    from moegraph.cli.progress import counted, waiting

    buf = StringIO()
    con = Console(file=buf, force_terminal=False, width=60)
    with waiting(con, "compiling [triton] layer") as update:
        update("step 1")
    with counted(con, "planning layers", 3) as advance:
        for i in range(1, 4):
            advance(i)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "compiling [triton] layer ..."  # brackets kept: no markup interpretation
    assert lines[1] == "  step 1"
    assert lines[2].startswith("compiling [triton] layer: ") and lines[2].endswith("s")
    assert len(lines) == 3  # a quick counted step prints nothing



def test_the_planning_bar_on_a_terminal_starts_no_thread():
    """The planner forks while its bar is shown; a refresh thread holding the terminal's lock at that moment could
    leave a child waiting on it. The bar is drawn on each update instead, every one of them."""
    import threading
    from io import StringIO

    from rich.console import Console

    from moegraph.cli.progress import counted

    buf = StringIO()
    con = Console(file=buf, force_terminal=True, width=60)
    before = threading.active_count()
    with counted(con, "planning layers", 3) as advance:
        assert threading.active_count() == before, threading.enumerate()
        for i in range(1, 4):
            advance(i)
            assert f"{i}/3" in buf.getvalue()
def test_export_sglang_expert_location(tmp_path, run_cli):
    from moegraph.planner import Plan

    assert run_cli("plan", "deepseek-v3-tiny", "-o", tmp_path / "plan.json").code == 0
    res = run_cli("export", "--format", "sglang", tmp_path / "plan.json", "-o", tmp_path / "loc.json")
    assert res.code == 0, res.err
    plan = Plan.load(tmp_path / "plan.json")
    data = json.loads((tmp_path / "loc.json").read_text())
    # SGLang passes the file's keys as keyword arguments to its mapping constructor: only this one.
    assert list(data) == ["physical_to_logical_map"]
    rows = np.array(data["physical_to_logical_map"])
    # deepseek-v3-tiny: 4 decoder layers, the first dense; 16 experts + 4 redundant slots on 4 GPUs.
    assert rows.shape == (4, 20)
    assert rows[0].tolist() == [p % 16 for p in range(20)]  # dense layer: SGLang's own trivial placement
    assert (rows[1:] == plan.physical_to_logical_map).all()
    assert "--ep-size 4 --ep-num-redundant-experts 4" in res.out
    res = run_cli("export", "--format", "vllm", tmp_path / "plan.json", "-o", tmp_path / "v.json")
    assert res.code == 2 and "vLLM reads no initial placement file" in res.err
    assert not (tmp_path / "v.json").exists()
    # a folder for -o: the hint names a file in it, with the extension the format writes
    res = run_cli("export", "--format", "sglang", tmp_path / "plan.json", "-o", tmp_path)
    assert res.code == 2 and f"give the sglang placement file to write, e.g. {tmp_path / 'out.json'}" in " ".join(res.err.split())


def test_saving_summary_states_the_saving():
    from moegraph.planner.plot import saving_summary

    m = {k: {"mean": {"remote_gpu": v, "max_mean_load": b}} for k, v, b in
         (("plan", 3.0, 1.04), ("load_only", 4.0, 1.01), ("contiguous", 3.75, 1.3))}
    assert saving_summary(m) == ("remote GPU copies per token: -25% vs load-only (3.00 vs 4.00), -20% vs "
                                 "contiguous (3.75); max/mean GPU load 1.040 (load-only 1.010)")


@pytest.mark.slow
def test_optimize_a_local_checkpoint(tmp_path, run_cli):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=32)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    ref.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        want = ref(ids).logits
    model = moegraph.optimize_pretrained(tmp_path / "ckpt")
    assert model.moegraph_report.swapped and len(model.moegraph_report.swapped) == 2
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    res = run_cli("optimize", tmp_path / "ckpt")
    assert res.code == 0 and "swapped 2 of 2 MoE blocks" in res.out
    with pytest.raises(InputError, match="no config.json"):
        moegraph.optimize_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["expert_mlp", "expert_mlp_packed"])
def test_ops_pass_torch_opcheck(name):
    # The ops are defined without torch.library.custom_op (moegraph/oplib.py): torch's own checker
    # confirms the schema, fake implementation, autograd registration and AOT dispatch still hold.
    import moegraph.ops  # noqa: F401  (registers torch.ops.moegraph)

    g = torch.Generator().manual_seed(0)
    E, D, F = 4, 8, 6
    x = torch.randn(5, D, generator=g, requires_grad=True)
    tok = torch.arange(5).repeat_interleave(2)
    exp = torch.randint(0, E, (10,), generator=g)
    wt = torch.rand(10, generator=g, requires_grad=True)
    w_up = torch.randn(E, 2 * F, D, generator=g, requires_grad=True)
    w_down = torch.randn(E, D, F, generator=g, requires_grad=True)
    args = (x, tok, exp, wt, w_up, w_down, None, None, "silu", True, None, None, None, None, None)
    torch.library.opcheck(getattr(torch.ops.moegraph, name).default, args)


def test_small_experts_with_unaligned_widths_match_a_loop():
    # F = 6 floats (24-byte rows): torch._grouped_mm refuses such strides, so the op must take its
    # per-expert path; checked against a plain loop over assignments.
    import moegraph.ops as ops

    g = torch.Generator().manual_seed(1)
    E, D, F, T = 4, 8, 6, 5
    x = torch.randn(T, D, generator=g)
    tok = torch.arange(T).repeat_interleave(2)
    exp = torch.randint(0, E, (2 * T,), generator=g)
    wt = torch.rand(2 * T, generator=g)
    w_up, w_down = torch.randn(E, 2 * F, D, generator=g), torch.randn(E, D, F, generator=g)
    want = torch.zeros(T, D)
    for t, e, w in zip(tok.tolist(), exp.tolist(), wt.tolist()):
        h = w_up[e] @ x[t]
        want[t] += w * (w_down[e] @ (torch.nn.functional.silu(h[:F]) * h[F:]))
    got = ops.expert_mlp(x, tok, exp, wt, w_up, w_down, None, None, "silu", True, None, None, None, None, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_cli_builds_its_command_once_per_process(run_cli, monkeypatch):
    """typer builds the click command by evaluating every command's annotations (40-50 ms); ``main`` keeps the one
    it built, so tools and tests that run many commands in one process pay it once (the input fuzzing: 90 s ->
    25 s). Every run still parses its own arguments."""
    import typer.main

    from moegraph import cli

    built = []
    real = typer.main.get_command
    monkeypatch.setattr(typer.main, "get_command", lambda app: built.append(app) or real(app))
    cli._command.cache_clear()
    try:
        first, second = run_cli("presets"), run_cli("show", "deepseek-v3-tiny")
        bad = run_cli("show", "no-such-preset")
    finally:
        cli._command.cache_clear()
    assert built == [cli.app]
    assert first.code == 0 and "deepseek-v3" in first.out
    assert second.code == 0 and "deepseek-v3-tiny" in second.out
    assert bad.code == 2 and "no-such-preset" in bad.err
