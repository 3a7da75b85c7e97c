"""``moegraph plan`` and ``moegraph trace import|stats``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from ..errors import TraceError
from ..loader import load_spec, placement_traces
from . import app, console, err_console
from .checks import finite, move_share, output_file, slot_budget
from .output import say
from .progress import counted

trace_app = typer.Typer(help="Import routing traces and summarise them.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")

TraceOpt = Annotated[
    list[str] | None,
    typer.Option("--trace", "--traces", "-t", help="Trace file, folder or bundled name (repeat for several "
                 "sources, e.g. tasks); default: the spec's placement.traces (relative to the spec file)."),
]


#: figure formats matplotlib writes without extra packages
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def _metrics_table(metrics: dict, title: str) -> Table:
    from ..planner.cost import METRICS

    t = Table(title=title, show_header=True)
    t.add_column("metric (mean over layers)")
    for col in ("plan", "load-only", "contiguous", "plan vs load-only"):
        t.add_column(col, justify="right")
    plan_m, base_m, cont_m = (metrics[k]["mean"] for k in ("plan", "load_only", "contiguous"))
    for key, (label, fmt) in METRICS.items():
        if key not in plan_m:
            continue
        p, b, c = plan_m[key], base_m[key], cont_m[key]
        rel = "" if b == 0 else f"{(p / b - 1) * 100:+.1f}%"
        if key == "max_mean_load":
            rel = f"{p - b:+.3f}"
        t.add_row(label, fmt.format(p), fmt.format(b), fmt.format(c), rel)
    worst = [metrics[k]["worst_layer_max_mean_load"] for k in ("plan", "load_only", "contiguous")]
    t.add_row("worst layer max/mean load", *(f"{w:.3f}" for w in worst), f"{worst[0] - worst[1]:+.3f}")
    return t


def _traffic_words(tokens: int | None) -> str:
    """How a report names its traffic: a token count, or counts only (scored with tokens starting evenly on every GPU)."""
    return f"{tokens} tokens" if tokens is not None else "expert counts only: tokens taken to start evenly on every GPU"


def _placement_traces(s, spec_arg: str) -> list[str]:
    """The spec's placement.traces as ``placement_traces`` finds them; an entry found nowhere is refused naming
    the spec file, the field and where it was looked for (the trace reader's message named the entry alone)."""
    import os

    from ..traces import bundled_traces

    entries = placement_traces(s, spec_arg)
    bundled = bundled_traces()
    for entry in entries:
        if os.path.exists(entry) or entry.partition("/")[0] in bundled:
            continue  # on disk, or a bundled set (whose reader names its tasks)
        if Path(entry).is_absolute():
            looked = "no such file or folder"
        else:
            beside = f"beside the spec file in {Path(spec_arg).resolve().parent}, " if Path(spec_arg).is_file() else ""
            looked = (f"looked {beside}in the working directory {Path.cwd()} and among the bundled traces "
                      f"({', '.join(bundled) or 'none'})")
        raise TraceError(f"{spec_arg}: placement.traces: {entry!r} was not found ({looked}); correct the entry, or "
                         "give the traffic with --trace")
    return entries


def _check_layer(layer: int | None, num_layers: int, what: str) -> None:
    """--layer within the MoE layers, checked before any work (the plan was written before the plot refused it)."""
    if layer is not None and layer >= num_layers:
        raise typer.BadParameter(f"--layer {layer} is outside the MoE layers of {what} (0..{num_layers - 1}); give "
                                 f"one of them")


@app.command(name="plan")
def plan_cmd(
    spec: Annotated[str | None, typer.Argument(help="Spec file or preset name (optional with --evaluate).")] = None,
    trace: TraceOpt = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the plan (JSON) here.")] = None,
    nodes: Annotated[int | None, typer.Option("--nodes", min=1, max=4096, help="What-if: hosts in the (uniform) cluster.")] = None,
    gpus_per_node: Annotated[int | None, typer.Option("--gpus-per-node", min=1, max=64, help="What-if: GPUs per host.")] = None,
    slots: Annotated[int | None, typer.Option("--slots", min=1, max=1 << 20, help="What-if: expert slots in total (experts + "
                                              "redundant).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, max=(1 << 63) - 1, help="Seed (default: placement.seed).")] = None,
    max_imbalance: Annotated[float | None, typer.Option("--max-imbalance", callback=finite(1.0, 1e6), help="Target max/mean GPU load on the "
                                                        "traces (default: placement.max_imbalance; with --from, the "
                                                        "current plan's spec's, less 0.02).")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", min=0, max=10000, help="Perturbation rounds of the local search (default: 6 in layers of up to 128 slots, 12 there without redundant slots, else 0).")] = None,
    robust: Annotated[bool | None, typer.Option("--robust/--no-robust", help="Bound each GPU's load covariance by "
                                                "the load-only plan's (balance on unseen traffic; default on).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Save a figure: load per GPU, co-activation, "
                                              "placement.")] = None,
    layer: Annotated[int | None, typer.Option("--layer", min=0, help="MoE layer shown by --plot (default 0; "
                                              "counted among MoE layers only).")] = None,
    evaluate: Annotated[Path | None, typer.Option("--evaluate", help="Score this existing plan file on --trace "
                                                  "instead of planning (with --plot and --layer only).")] = None,
    plan_from: Annotated[Path | None, typer.Option("--from", help="Re-plan this current plan for the traffic in "
                                                   "--trace, moving few expert weights (cluster and slots from it).")] = None,
    max_moves: Annotated[str | None, typer.Option("--max-moves", callback=slot_budget, metavar="N|P%",
                                                  help="With --from: move at most N slots (all layers), or P% of "
                                                  "them.")] = None,
    move_target: Annotated[str | None, typer.Option("--move-target", callback=move_share, metavar="P%|off",
                                                    help="With --from: aim to move at most P% of the slots (default "
                                                    "15%), giving up co-activation savings for it, never balance; "
                                                    "off: moves priced only.")] = None,
    max_move_gib: Annotated[float | None, typer.Option("--max-move-gib", callback=finite(0.0), help="With --from: move at most X GiB of "
                                                       "expert weights.")] = None,
    compare_full: Annotated[bool, typer.Option("--compare-full", help="With --from: also report a full moegraph "
                                               "re-plan from scratch (slower).")] = False,
    horizon_tokens: Annotated[float | None, typer.Option("--horizon-tokens", callback=finite(0.0), help="With --from: "
                                                         "tokens the new plan will serve until the next re-plan; a move "
                                                         "must pay for itself in dispatch + combine copies within them "
                                                         "(default 25,000; 0: balance alone).")] = None,
) -> None:
    """Plan which GPU holds which expert (and replicas) for every MoE layer; compare with the baselines."""
    from ..planner import Plan, evaluate_plan, plan

    if evaluate is not None and plan_from is None:
        # scoring takes the plan as it is: options that would shape a new plan (or write one) have no effect
        given = (("-o/--output", output), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--slots", slots),
                 ("--seed", seed), ("--max-imbalance", max_imbalance), ("--rounds", rounds),
                 ("--robust/--no-robust", robust))
        unused = [name for name, value in given if value is not None]
        if unused:
            raise typer.BadParameter(f"--evaluate scores the plan file as it is and writes no plan: drop "
                                     f"{', '.join(unused)} (to change the plan, plan again without --evaluate)")
    if layer is not None and plot is None and plan_from is None:
        raise typer.BadParameter("--layer picks the MoE layer --plot draws: add --plot FILE, or drop --layer")
    inputs = [*(trace or []), plan_from, evaluate, spec]
    if output is not None:
        output_file(output, "plan", inputs=inputs, example=".json")
    if plot is not None:
        output_file(plot, "plot", PLOT_SUFFIXES, inputs=inputs, outputs=[(output, "plan")])
    if plan_from is not None:
        from .replan_cmds import replan_command

        if any(v is not None for v in (nodes, gpus_per_node, slots, evaluate, rounds, plot, robust, layer)):
            raise typer.BadParameter("with --from the cluster and slots come from the current plan: drop --nodes, "
                                     "--gpus-per-node, --slots, --rounds, --robust/--no-robust, --plot, --layer and "
                                     "--evaluate")

        replan_command(spec=spec, plan_from=plan_from, trace=trace, output=output, max_moves=max_moves,
                       max_move_gib=max_move_gib, seed=seed, max_imbalance=max_imbalance, compare_full=compare_full,
                       horizon_tokens=horizon_tokens, move_target=move_target)
        return
    if (max_moves is not None or max_move_gib is not None or compare_full or horizon_tokens is not None
            or move_target is not None):
        raise typer.BadParameter("--max-moves, --max-move-gib, --move-target, --horizon-tokens and --compare-full "
                                 "apply to a re-plan: add --from CURRENT_PLAN.json")
    if evaluate is not None:
        given = load_spec(spec) if spec is not None else None
        p = Plan.load(evaluate, spec=given)
        if not trace:
            raise TraceError("--evaluate needs traffic to score the plan on: pass --trace FILE|FOLDER|NAME")
        from ..traces import load_traces

        _check_layer(layer, p.num_layers, f"the plan {evaluate}")
        ts = load_traces(trace, spec=p.spec)
        # Baselines are planned from what the plan was planned from (a fair what-if), when that is
        # still loadable; else from the scored traffic itself (the load-only baseline then knows it).
        base_from, base_label = None, "the scored traffic itself (planning traces not recorded or not found)"
        used = p.policy.get("trace_inputs")
        if used:
            try:
                base_from, base_label = load_traces(used, spec=p.spec), f"the plan's own traces {used}"
            except TraceError as exc:  # moved or deleted since: said on stderr, not only in the report's title
                say(f"the traces the plan was made from cannot be loaded ({exc}); its baselines are planned from "
                    "the scored traffic instead", prefix="warning:", style="bold yellow", err=True)
        metrics = evaluate_plan(p, ts, baselines_from=base_from)
        console.print(f"plan {evaluate} ({p.spec.name}, {p.num_gpus} GPUs, {p.num_slots} slots) scored on {ts.name} "
                      f"({_traffic_words(None if ts.load_only else ts.num_tokens)}); baselines planned from "
                      f"{base_label}", highlight=False)
        console.print(_metrics_table(metrics, "evaluation"))
        if plot is not None:
            from ..planner.plot import plot_plan

            plot_plan(p, ts, plot, layer=layer or 0, metrics=metrics, baselines_from=base_from)
            console.print(f"wrote {plot}")
        return
    if spec is None:
        raise typer.BadParameter("give a SPEC to plan for (or --evaluate PLAN.json)")
    from ..traces import load_traces

    s = load_spec(spec)
    _check_layer(layer, s.model.num_moe_layers, f"{s.name}")
    with counted(err_console, "planning layers", s.model.num_moe_layers) as advance:
        p = plan(s, trace or _placement_traces(s, spec) or None, seed=seed, slots=slots, nodes=nodes,
                 gpus_per_node=gpus_per_node, max_imbalance=max_imbalance, robust=robust is not False, rounds=rounds,
                 progress=advance)
    if output is not None:  # files written before the report: a closed stdout (`| head`) must not lose them
        p.save(output)
    if plot is not None:
        from ..planner.plot import plot_plan

        used = p.policy.get("trace_inputs")
        plot_plan(p, load_traces(used, spec=s) if used else None, plot, layer=layer or 0)
    cl = p.cluster
    console.print(
        f"{p.spec.name} (hash {p.spec.short_hash}): {p.num_layers} MoE layers, {p.num_experts} experts, "
        f"{p.num_slots} slots on {p.num_gpus} GPUs ({cl.num_nodes} host(s)), {p.slots_per_gpu} per GPU",
        highlight=False,
    )
    console.print(f"policy: {p.policy['name']}: {p.policy['why']}", highlight=False)
    for note in p.notes:
        say(note, prefix="note:", style="yellow")
    if p.metrics:
        console.print(_metrics_table(p.metrics, f"predicted on {p.metrics['traces']} ({_traffic_words(p.metrics['tokens'])})"))
    if output is not None:
        console.print(f"wrote {output}")
    if plot is not None:
        console.print(f"wrote {plot}")


# ------------------------------------------------------------------------------------------------
# trace import / stats
# ------------------------------------------------------------------------------------------------


@trace_app.command(name="import")
def trace_import(
    paths: Annotated[list[Path], typer.Argument(help="ESFT folder(s), or SGLang .pt dump(s).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="esft or sglang.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Native trace file to write (.npz).")],
    spec: Annotated[str | None, typer.Option("--spec", help="Check against (and take top_k, experts, MoE layers "
                                             "from) this spec.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, max=1024, help="Experts per token (ESFT; inferred if omitted).")] = None,
) -> None:
    """Convert ESFT expert_scores or SGLang expert-distribution dumps into moegraph's native .npz."""
    from ..traces import TraceSet, read_esft, read_sglang

    output_file(output, "trace", (".npz",), inputs=paths)
    s = load_spec(spec) if spec is not None else None
    if fmt == "esft":
        k = top_k if top_k is not None else (getattr(s.moe.router, "top_k", None) if s is not None else None)
        e = s.moe.experts.num_experts if s is not None else None
        ts = TraceSet.concat([read_esft(p, top_k=k, num_experts=e) for p in paths])
    elif fmt == "sglang":
        ts = read_sglang(paths, spec=s)
    else:
        raise TraceError(f"--format {fmt!r} is not known; use esft or sglang")
    if s is not None:
        ts.check_spec(s)
        ts = ts.with_experts(s.moe.experts.num_experts)
    ts.save(output)
    kind = "counts only (load-only)" if ts.load_only else f"{ts.num_tokens} tokens x top-{ts.top_k}, {ts.num_samples} samples"
    console.print(f"wrote {output}: {ts.num_layers} layers, {ts.num_experts} experts, {kind}, "
                  f"sources {list(ts.sources)} ({output.stat().st_size / 1024:.0f} KiB)", highlight=False)


@trace_app.command(name="stats")
def trace_stats_cmd(
    traces: Annotated[list[str], typer.Argument(help="Trace files, folders or bundled names.")],
    spec: Annotated[str | None, typer.Option("--spec", help="Check the traces against this spec.")] = None,
) -> None:
    """Loads, skew, co-activation summary and cross-layer affinity, per MoE layer."""
    from ..traces import load_traces, trace_stats

    s = load_spec(spec) if spec is not None else None
    ts = load_traces(traces, spec=s)
    st = trace_stats(ts)
    kind = "counts only" if ts.load_only else f"{ts.num_tokens} tokens x top-{ts.top_k}, {ts.num_samples} samples"
    console.print(f"{ts.name}: {ts.num_layers} MoE layers, {ts.num_experts} experts, {kind}; sources "
                  f"{list(ts.sources)}", highlight=False)
    t = Table(show_header=True)
    for col in ("layer", "hottest expert (max/mean)", "load CV", "co-act share of top 10% pairs",
                "top pair (tokens, lift)", "affinity to next layer"):
        t.add_column(col, justify="right")
    for i in range(ts.num_layers):
        hot = int(np.argmax(st.loads[i]))
        pair = ""
        if st.top_pairs:
            a, b, n, lift = st.top_pairs[i][0]
            pair = f"{a}+{b} ({n:.0f}, x{lift:.1f})"
        aff = "" if st.affinity is None or i >= len(st.affinity) else f"{st.affinity[i]:.3f}"
        conc = "" if ts.load_only else f"{st.pair_concentration[i]:.2f}"
        label = str(ts.layer_ids[i]) if ts.layer_ids is not None else str(i)
        t.add_row(label, f"{hot} ({st.skew[i]:.2f})", f"{st.cv[i]:.2f}", conc, pair, aff)
    console.print(t)
    summary = f"mean over layers: hottest expert {st.skew.mean():.2f}x the mean load, CV {st.cv.mean():.2f}"
    if not ts.load_only:
        summary += (f"; top 10% of expert pairs hold {st.pair_concentration.mean():.0%} of co-activations "
                    f"(uniform: 10%)")
    if st.affinity is not None:
        summary += f"; cross-layer affinity (NMI) {st.affinity.mean():.3f}"
    console.print(summary, highlight=False)
    for note in st.notes:
        say(note, prefix="note:", style="yellow")
