"""``moegraph run``: a quick expert-parallel check of a plan on one machine (N local processes)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import DistributedError, PlanFileError
from ..limits import MAX_LOCAL_PROCESSES
from ..loader import load_spec
from . import app, console
from .checks import finite, output_file
from .output import say, styled


def _spec_and_plan(spec_arg: str, plan_path: Path):
    """The plan, checked against SPEC. A plan made with what-if overrides (``moegraph plan --nodes ...``)
    differs from SPEC in topology/placement only; it runs with its own (recorded) spec."""
    from ..planner import Plan

    spec = load_spec(spec_arg)
    plan = Plan.load(plan_path)
    if plan.spec_hash == spec.hash():
        return plan, None
    beyond = tuple(k for k in spec.to_dict() if k not in ("topology", "placement"))
    if spec.differences(plan.spec, beyond):
        raise PlanFileError(
            f"{plan_path}: planned for spec {plan.spec.name!r} (hash {plan.spec_hash[:12]}), which differs from "
            f"{spec_arg!r} (hash {spec.short_hash}) in more than topology and placement: "
            f"{plan.spec.differences_shown(spec, beyond, labels=('in the plan', f'in {spec_arg}'))}; re-plan with "
            f"`moegraph plan {shlex.quote(spec_arg)}`"
        )
    return plan, "the plan was made with topology/placement overrides; running with the plan's recorded spec"


def _overrides(spec, planned) -> str:
    """The `moegraph plan` what-if flags that turn ``spec`` into the plan's recorded spec ("" if none)."""
    flags = ""
    a, b = spec.topology, planned.topology
    if a != b and hasattr(b, "nodes"):
        flags += f" --nodes {b.nodes} --gpus-per-node {b.gpus_per_node}"
    if spec.placement.redundant_slots != planned.placement.redundant_slots:
        flags += f" --slots {planned.moe.experts.num_experts + planned.placement.redundant_slots}"
    return flags


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


@app.command(name="run")
def run_cmd(
    spec: Annotated[str, typer.Argument(help="Spec file or preset name the plan was made for.")],
    plan: Annotated[Path, typer.Option("--plan", help="Plan file (moegraph plan -o plan.json).")],
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, max=MAX_LOCAL_PROCESSES, help="Local processes (default: the plan's GPUs).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=0, max=1 << 24, help="Random tokens per rank per forward.")] = 256,
    steps: Annotated[int, typer.Option("--steps", min=1, max=100000, help="Measured forward(+backward) passes after one warm-up.")] = 3,
    backward: Annotated[bool, typer.Option("--backward/--no-backward", help="Also run the backward.")] = True,
    layer: Annotated[int | None, typer.Option("--layer", min=0, help="Run this MoE layer only (default: every MoE layer "
                                              "of the plan, as a residual stack).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Single-process checkpoint of the --layer "
                                                    "layer (default: seeded random weights).")] = None,
    record: Annotated[Path | None, typer.Option("--record", help="Save the gathered routing trace (.npz) here, "
                                                "for `moegraph plan SPEC --traces`.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu (gloo) or cuda (NCCL, one GPU per process).")] = "cpu",
    timeout: Annotated[float, typer.Option("--timeout", callback=finite(0.0, 86400.0, open_lo=True), help="Seconds a collective waits for peers.")] = 60.0,
    seed: Annotated[int, typer.Option("--seed", min=0, max=(1 << 31) - 1, help="Seeds weights and tokens.")] = 0,
    rebalance_every: Annotated[int | None, typer.Option("--rebalance-every", help="Instead of timing: --steps "
                                                        "inference forwards of a drifting synthetic stream, "
                                                        "re-planning and migrating every N steps.")] = None,
) -> None:
    """Run a plan's layer expert-parallel in N local processes; print per-rank timing and bytes vs the plan.

    Like `torchrun --nproc-per-node N` on one machine with gloo: every rank holds only its plan slots,
    dispatches with all-to-all and combines back. Bytes are token hidden states sent to other ranks,
    per forward, measured by the runtime and predicted by the planner's dispatch rule for the same
    routing.
    """
    if rebalance_every is not None and rebalance_every > steps:
        raise typer.BadParameter(f"--rebalance-every {rebalance_every} is more than --steps {steps}: no re-plan would "
                                 f"run; give --rebalance-every at most {steps}, or more --steps")
    from ..distributed.local import run_local

    # Paths are checked before any process starts (a bad --record once failed only after the run).
    if record is not None:
        output_file(record, "trace", (".npz",))
    if checkpoint is not None and not checkpoint.is_file():
        raise DistributedError(f"{checkpoint}: checkpoint file not found (or a folder); give the .safetensors or "
                               ".pt file of the --layer layer")
    p, note = _spec_and_plan(spec, plan)
    if note:
        say(note, prefix="note:", style="yellow")
    world = nproc or p.num_gpus
    with console.status(f"running {world} processes (gloo)" if device == "cpu" else f"running {world} processes"):
        res = run_local(p, nproc=nproc, tokens=tokens, steps=steps, backward=backward, layer_index=layer, seed=seed,
                        checkpoint=checkpoint, timeout=timeout, record=record, device=device,
                        rebalance_every=rebalance_every, fork_server=True)
    if res.drift is not None:
        from .replan_cmds import print_drift

        print_drift(res.drift, f"{p.spec.name}: {world} ranks x {tokens} tokens per layer per step, drifting "
                    f"stream, re-plan every {rebalance_every} steps")
        return
    which = f"MoE layer {layer}" if layer is not None else f"{len(res.layers)} MoE layers"
    title = (f"{p.spec.name}, {which}: {world} ranks x {tokens} tokens, mean of {steps} "
             f"forward{'+backward' if backward else ''} passes")
    tt = Table(title=title + " (ms per pass)")
    for col in ("rank", "dispatch", "compute", "combine", "backward a2a"):
        tt.add_column(col, justify="right")
    st = Table(title="KiB sent to other ranks per forward: measured / planner's prediction")
    for col in ("rank", "dispatch", "combine", "meta", "match"):
        st.add_column(col, justify="right")
    for r in range(world):
        ms = res.per_forward_ms(r)
        tt.add_row(str(r), f"{ms['dispatch']:.2f}", f"{ms['compute']:.2f}", f"{ms['combine']:.2f}",
                   f"{ms['backward_comm']:.2f}" if backward else "-")
        pred_d = int(res.predicted[:, r, :].sum()) * res.row_bytes
        pred_c = int(res.predicted[:, :, r].sum()) * (res.combine_row_bytes or res.row_bytes)
        got_d, got_c = res.sent_bytes(r, "dispatch"), res.sent_bytes(r, "combine")
        ok = got_d == pred_d and got_c == pred_c and bool((res.measured[:, r] == res.predicted[:, r]).all())
        st.add_row(str(r), f"{_kib(got_d)} / {_kib(pred_d)}", f"{_kib(got_c)} / {_kib(pred_c)}",
                   _kib(res.sent_bytes(r, "meta")), styled("yes", "green") if ok else styled("NO", "red"))
    console.print(tt)
    console.print(st)
    total = int(res.measured.sum())
    console.print(
        f"token copies per forward: measured {total}, predicted {int(res.predicted.sum())} "
        f"({'equal' if res.matches else 'DIFFERENT'} on every link of every layer); one copy = {res.row_bytes} bytes"
        + (f" out (FP8 + tile scales), {res.combine_row_bytes} back. "
           if res.combine_row_bytes not in (0, res.row_bytes) else ". ")
        + "meta = counts, routing weights and slot ids.", highlight=False)
    if res.trace_path:
        console.print(f"recorded trace: {res.trace_path}; re-plan from it: moegraph plan {shlex.quote(spec)} --traces "
                      f"{shlex.quote(str(res.trace_path))}{_overrides(load_spec(spec), p.spec)} -o plan.json", highlight=False)
    if not res.matches:
        raise typer.Exit(1)
