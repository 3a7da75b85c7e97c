"""``moegraph tune``: measure the expert strategies for a spec on this machine, ahead of use."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from ..loader import load_spec
from . import app, console
from .checks import finite


@app.command()
def tune(
    spec: Annotated[str, typer.Argument(help="Spec file or preset name; 'default' = the benchmark layer.")],
    tokens: Annotated[list[int] | None, typer.Option("--tokens", "-t", min=1, max=1 << 20, help="Token counts (repeatable).")] = None,
    dtype: Annotated[list[str] | None, typer.Option("--dtype", help="float32 and/or bfloat16 (repeatable).")] = None,
    train: Annotated[bool, typer.Option("--train", help="Also tune the training step's forward and backward.")] = False,
    budget: Annotated[float, typer.Option(callback=finite(0.0, 3600.0), help="Seconds after which no more timing "
                                          "rounds start, per size.")] = 0.3,
) -> None:
    """Time each expert-compute strategy at each token count and store the winners in the tuned table.

    The table is keyed by this machine's identity (CPU model, cores, ISA flags, threads) and the
    torch version, under $XDG_CACHE_HOME/moegraph/tuned (else ~/.cache/moegraph/tuned); layers the
    moegraph command compiles with expert_strategy="auto" read it instead of measuring on first use (in
    Python, call moegraph.tuning.enable_tuning(that folder) first: library use tunes in memory).
    """
    import torch

    from .. import tuning
    from ..bench import BENCH_SPEC
    from ..compiler import compile as mg_compile
    from ..errors import InputError
    from ..runtime import torch_dtype
    from .compile_cmds import _check_bench_memory

    dtypes = dtype or ["float32"]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad:
        raise InputError(f"--dtype {bad[0]!r}: choose float32 or bfloat16")
    s = load_spec(BENCH_SPEC if spec == "default" else spec)
    # one layer at a time, the widest dtype asked for the largest (advice in this command's options)
    _check_bench_memory(s, max((torch_dtype(d) for d in dtypes), key=lambda d: d.itemsize), False, "tuning")
    tuner = tuning.active_tuner()  # the command's (its table read once)
    if tuner is None:
        tuner = tuning.enable_tuning(None)
    tuner.budget_s = budget
    t = Table(title=f"expert strategies on {tuning.cpu_model()}, {torch.get_num_threads()} threads "
                    f"(table: {tuner.path or 'memory only'})")
    for col in ("dtype", "tokens", "mode", "strategy", "times us", "tuned now"):
        t.add_column(col)
    t0 = time.perf_counter()
    for name in dtypes:
        layer = mg_compile(s, dtype=torch_dtype(name), seed=0)
        for T in tokens or (1, 16, 64, 128, 2048):
            x = torch.randn(T, s.moe.hidden_size).to(torch_dtype(name))
            tid = torch.randint(0, max(layer.HASH_VOCAB, 1), (T,)) if layer.NEEDS_TOKEN_IDS else None
            for mode in ("eval", "train") if train else ("eval",):
                before = len(tuner.tuned_now)
                tuner.last_key = None
                if mode == "eval":
                    with torch.inference_mode():
                        layer.eval()(x, tid)
                else:
                    layer.train()(x, tid).float().square().mean().backward()
                keys = [tuner.last_key] if tuner.last_key else []
                keys += [k for k in tuner.tuned_now[before:] if k not in keys]
                for key in keys:
                    entry = tuner.table[key]
                    times = ", ".join(f"{n} {v:.0f}" for n, v in entry["us"].items()) or "(only candidate)"
                    t.add_row(name, str(T), "backward" if "bwd" in key else mode, entry["strategy"], times,
                              "yes" if key in tuner.tuned_now[before:] else "no (table)")
    console.print(t)
    console.print(f"tuning took {tuner.tuning_seconds:.2f} s of {time.perf_counter() - t0:.2f} s in all", highlight=False)
