"""``moegraph demo``: the whole pipeline on a preset and the bundled traces, in under a minute."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import MoegraphError
from ..loader import load_spec
from ..summary import human, summarize
from . import app, console, err_console
from .output import say
from .progress import waiting


@app.command()
def demo(
    spec: Annotated[str, typer.Option(help="Preset or spec file whose placement.traces name bundled traces.",
                                      envvar="MOEGRAPH_DEMO_SPEC")] = "deepseek-v2-lite",
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the plan, plot and generated code go.",
                                         envvar="MOEGRAPH_DEMO_OUTPUT")] = Path("moegraph-out"),
    tokens: Annotated[int, typer.Option(min=1, max=1 << 20, help="Tokens in the smoke forward.")] = 64,
) -> None:
    """Validate a preset, plan it on its bundled routing traces (table + plot), compile it, run it."""
    import importlib.util

    import torch

    from ..compiler import compile as mg_compile
    from .plan_cmds import plan_cmd

    t_start = time.perf_counter()
    if output.exists() and not output.is_dir():
        raise MoegraphError(f"{output}: is a file; -o names the folder for the plan, plot and generated code")
    output.mkdir(parents=True, exist_ok=True)

    # Step 1: validate and summarise.
    console.rule("1. validate")
    s = load_spec(spec)
    m = summarize(s)
    say(
        f"{s.name} (hash {s.short_hash}): {m.num_moe_layers} MoE layers x {s.moe.experts.num_experts} "
        f"experts, top-{s.moe.top_k}; {human(m.moe_total)} MoE params, {human(m.moe_active)} active per token"
        + (f"; whole model {human(m.model_total)} / {human(m.model_active)} active" if m.model_total else ""),
        prefix="ok", style="green",
    )

    # Step 2: plan on the spec's traces (the bundled ESFT traces for the DeepSeek-V2-Lite presets).
    console.rule("2. plan expert placement")
    plan_path = output / "plan.json"
    plot_path = output / "plan.png" if importlib.util.find_spec("matplotlib") else None
    if plot_path is None:
        say("matplotlib not installed (pip install 'moegraph[plot]'): skipping the plot", text_style="dim")
    plan_cmd(spec=spec, output=plan_path, plot=plot_path)

    # Step 3: compile with the plan and run a smoke forward.
    console.rule("3. compile and run")
    from ..planner import Plan

    plan = Plan.load(plan_path, spec=s)
    t0 = time.perf_counter()
    with waiting(err_console, f"compiling {s.name} with the plan (generate, build, initialise weights)"):
        layer = mg_compile(s, plan=plan, out_dir=output / "generated", dtype=torch.float32).eval()
    t_compile = time.perf_counter() - t0
    x = torch.randn(1, tokens, s.moe.hidden_size, generator=torch.Generator().manual_seed(0))
    tid = torch.randint(0, max(layer.HASH_VOCAB, 1), (1, tokens)) if layer.NEEDS_TOKEN_IDS else None
    with torch.inference_mode():
        t0 = time.perf_counter()
        with waiting(err_console, "first forward (trace the eval graph, run the FX passes, pack the weights)"):
            layer(x, tid)
        t_first = time.perf_counter() - t0
        rec = layer.start_recording()
        t0 = time.perf_counter()
        y = layer(x, tid)
        t_fwd = time.perf_counter() - t0
    rep = layer.pass_report["eval"]
    loads = rec.counts(s.moe.experts.num_experts)
    console.print(
        f"compiled {type(layer).__name__} ({sum(p.numel() for p in layer.parameters()) / 1e6:.1f}M params, float32) "
        f"in {t_compile:.1f}s; generated source in {output / 'generated'}",
        highlight=False,
    )
    console.print(f"FX passes (eval graph): {', '.join(rep.applied) or 'none'} ({rep.nodes_before} -> {rep.nodes_after} nodes)",
                  highlight=False)
    console.print(
        f"smoke forward: {tuple(x.shape)} -> {tuple(y.shape)} in {t_fwd * 1e3:.1f} ms (first call {t_first:.1f}s with "
        f"tracing and weight packing), finite={bool(torch.isfinite(y).all())}, "
        f"{int((loads > 0).sum())} of {s.moe.experts.num_experts} experts used",
        highlight=False,
    )
    console.rule()
    console.print(f"done in {time.perf_counter() - t_start:.1f}s: {plan_path}"
                  + (f", {plot_path}" if plot_path else ""), highlight=False)
