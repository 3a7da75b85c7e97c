"""``moegraph compile`` and ``moegraph bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..loader import load_spec
from . import app, console, err_console
from .output import say
from .progress import waiting


@app.command(name="compile")
def compile_cmd(
    spec: Annotated[str, typer.Argument(help="Spec file or preset name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the generated source.")] = Path("moegraph-out"),
    backend: Annotated[str, typer.Option(help="torch or triton (default: the spec's codegen.backend).")] = "",
    smoke: Annotated[int, typer.Option(min=0, max=1 << 24, help="Run a forward on this many random tokens after compiling (0 = no).")] = 0,
) -> None:
    """Generate the layer's source into a directory and build the executable layer."""
    import torch

    from ..codegen import check_backend, write_source
    from ..compiler import compile as mg_compile
    from ..compiler import layer_bytes, smoke_bytes
    from ..limits import check_memory
    from ..runtime import torch_dtype

    s = load_spec(spec)
    be = check_backend(backend or s.codegen.backend)
    # refused before writing anything, with advice this command can follow (compile's own check, in the Python
    # API, names its dtype= and plan= arguments, which the command does not have)
    smaller = _smaller_spec(s)
    check_memory(layer_bytes(s, torch_dtype(s.moe.dtype)), f"compiling the layer of spec {s.name!r} ({s.moe.dtype} "
                 "weights, the spec's moe.dtype)", f"use {smaller}, or compile it where more memory is free; nothing "
                 "was written")
    if smoke:
        check_memory(smoke_bytes(s, smoke), f"--smoke {smoke} on spec {s.name!r} (float32)",
                     f"use fewer --smoke tokens, {smaller}, or compile without --smoke; nothing was written")
    gen = write_source(s, output, be)
    state = "written" if gen.written else "unchanged"
    console.print(f"{gen.path} ({state}, {len(gen.source.splitlines())} lines, sha256 {gen.digest[:12]})", highlight=False)
    layer = mg_compile(s, backend=be, out_dir=output, dtype=torch.float32 if smoke else None, seed=0 if smoke else None)
    if smoke:
        layer.eval()
        x = torch.randn(smoke, layer.HIDDEN)
        tid = torch.randint(0, max(layer.HASH_VOCAB, 1), (smoke,)) if layer.NEEDS_TOKEN_IDS else None
        # a router network with a state step takes the previous layer's state (random here) and returns its own
        prev = torch.randn(smoke, layer.ROUTER_STATE) if layer.RECEIVES_ROUTER_STATE else None
        with torch.inference_mode():
            y = layer(x, tid, router_state=prev)
        y, *state = y if layer.ROUTER_STATE else (y,)
        finite = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(t).all()) for t in state)
        shapes = " + ".join(str(tuple(t.shape)) for t in (y, *state))
        rep = layer.pass_report["eval"]
        console.print(f"smoke forward: {tuple(x.shape)} -> {shapes}, finite={finite}; "
                      f"FX passes applied: {', '.join(rep.applied) or 'none'} "
                      f"({rep.nodes_before} -> {rep.nodes_after} nodes)", highlight=False)


def _smaller_spec(s) -> str:
    """Advice naming a smaller spec: the spec's own -tiny preset where there is one."""
    from ..loader import presets

    tiny = f"{s.name}-tiny"
    return f"a smaller spec (e.g. the preset {tiny})" if tiny in presets() else "a smaller spec (e.g. a -tiny preset)"


@app.command()
def bench(
    spec: Annotated[str, typer.Argument(help="Spec file or preset name; 'default' = the DeepSeek-V3-shaped CPU layer.")] = "default",
    tokens: Annotated[list[int] | None, typer.Option("--tokens", "-t", min=1, max=1 << 20, help="Token counts (repeatable).")] = None,
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Interleaved timing rounds (median reported).")] = 7,
    no_hf: Annotated[bool, typer.Option("--no-hf", help="Skip the Hugging Face comparison.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (HF runs in the same dtype).")] = "float32",
    train: Annotated[bool, typer.Option("--train", help="Time training steps (forward + backward).")] = False,
    strategy: Annotated[str, typer.Option(help="Pin the expert strategy ('auto': tuned on this machine).")] = "auto",
) -> None:
    """Time the compiled layer against HF transformers' DeepseekV3MoE (eager, grouped_mm), side by side."""
    from ..bench import BENCH_SPEC, format_rows, hf_incompatibility, machine_line, run_layer_bench
    from ..runtime import torch_dtype

    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype {dtype!r}: choose float32 or bfloat16")
    s = load_spec(BENCH_SPEC if spec == "default" else spec)
    with_hf = not no_hf
    if with_hf:
        from ..errors import require

        require("transformers", "hf", "the comparison with Hugging Face", "or pass --no-hf to time moegraph alone")
    why = hf_incompatibility(s) if with_hf else None
    if why:
        say(f"no HF comparison for {s.name}: {why}; timing moegraph only", text_style="yellow")
        with_hf = False
    _check_bench_memory(s, torch_dtype(dtype), with_hf)
    with waiting(err_console, "benchmarking") as update:
        rows = run_layer_bench(s, tuple(tokens or (1, 16, 64, 128, 2048)), rounds=rounds, with_hf=with_hf,
                               progress=update, dtype=torch_dtype(dtype), train=train, expert_strategy=strategy)
    console.print(machine_line(torch_dtype(dtype), train), highlight=False, soft_wrap=True)
    t = Table(title=f"ms, median of {rounds} interleaved rounds")
    t.add_column("tokens", justify="right")
    for name in rows[0].times:
        t.add_column(name, justify="right")
    t.add_column("limit", justify="right")
    t.add_column("vs best HF", justify="right")
    t.add_column("vs limit", justify="right")
    t.add_column("strategy")
    for cells in format_rows(rows):
        t.add_row(*cells)
    console.print(t)
    console.print("limit = max(time of the same FLOPs as one matmul, time to read the touched expert weights); "
                  "'vs best HF' > 1 means moegraph is faster; 'vs limit' = moegraph time / limit; strategy = "
                  "the expert-compute strategy moegraph ran (tuned on this machine unless pinned; a pinned "
                  "strategy that cannot run here is named after the one it fell back to).")


def _check_bench_memory(s, dtype, with_hf: bool, doing: str = "benchmarking") -> None:
    """Refuse a benchmark (or tuning run) whose weights do not fit, before building anything, with advice in the
    command's options (compile's own check, which it would reach first, names the Python API's dtype= and plan=)."""
    import torch

    from ..compiler import layer_bytes
    from ..limits import check_memory

    layer = layer_bytes(s, dtype)
    # The HF blocks are built in float32 (both, before either is cast to --dtype), beside the compiled layer.
    hf = 2 * layer_bytes(s, torch.float32) if with_hf else 0
    need = max(layer_bytes(s, dtype, seeded=True), layer + hf)
    name = str(dtype).replace("torch.", "")
    hf_copies = ", and two float32 copies for the Hugging Face blocks" if with_hf else ""
    what = f"{doing} spec {s.name!r} ({name} weights{hf_copies})"
    fixes = [f"use {_smaller_spec(s)}"] + (["pass --dtype bfloat16"] if dtype.itemsize > 2 else []) + (
        ["pass --no-hf (time moegraph alone, without the HF copies)"] if with_hf else [])
    check_memory(need, what, ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0])
