"""``moegraph plan SPEC --from CURRENT.json --trace WINDOW``: the incremental re-plan and its report.

Kept apart from ``plan_cmds`` (which only routes ``--from`` here) so that the re-plan's table and
checks live in one place.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..errors import PlanInfeasible, TraceError
from ..loader import load_spec
from . import console
from .checks import resolve_move_share, resolve_slot_budget
from .output import say

__all__ = ["replan_command", "replan_table", "print_drift"]


def replan_table(report: dict, title: str) -> Table:
    """The rich table of ``moegraph.planner.replan_report.replan_report``: one row per alternative."""
    t = Table(title=title, show_header=True)
    cols = (
        ("plan", "left", lambda p: p["label"]),
        ("moved", "right", lambda p: f"{p['slots_moved']:,} {p['fraction_moved']:.1%}"),
        ("GiB", "right", lambda p: f"{p['gib_moved']:.3g}"),
        ("move ms", "right", lambda p: f"{p['transfer_time_ms']:.1f}"),
        ("max/mean", "right", lambda p: f"{p['max_mean_load']:.3f}"),
        ("remote GPU", "right", lambda p: f"{p['remote_gpu']:.3f}"),
        ("remote host", "right", lambda p: f"{p['remote_node']:.3f}"),
    )
    for name, justify, _ in cols:
        t.add_column(name, justify=justify, no_wrap=name == "plan")
    for p in report["plans"].values():
        t.add_row(*(fmt(p) for _, _, fmt in cols))
    t.caption = ("load-only: an EPLB-style re-plan from scratch; full: a moegraph re-plan from scratch; relabelled: "
                 "GPUs and slots matched to where the weights are; moved: slots; move ms: predicted transfer time; max/mean GPU "
                 "load and remote GPU / node copies per token on the window")
    return t


def replan_command(*, spec: str | None, plan_from: Path, trace: list[str] | None, output: Path | None,
                   max_moves: str | None, max_move_gib: float | None, seed: int | None,
                   max_imbalance: float | None, compare_full: bool, horizon_tokens: float | None = None,
                   move_target: str | None = None) -> None:
    """Re-plan ``plan_from`` for the traffic ``trace``; print the report; write ``output``."""
    import math
    import time

    from ..planner import Plan, evaluate_plan, plan
    from ..planner.replan import DEFAULT_MOVE_TARGET, check_model, replan
    from ..planner.replan_report import replan_report
    from ..traces import load_traces

    if max_moves is not None and max_move_gib is not None:
        raise PlanInfeasible("give one move budget: --max-moves N or --max-move-gib X, not both")
    if not trace:
        raise TraceError("--from needs the recent traffic to re-plan for: pass --trace WINDOW.npz (a recorded window)")
    given = load_spec(spec) if spec is not None else None
    current = Plan.load(plan_from)
    if given is not None:
        check_model(given, current)  # first: a plan of another model would make the window look wrong
    ts = load_traces(trace, spec=current.spec)
    budget = resolve_slot_budget(max_moves, current.num_layers * current.num_slots)
    if max_moves is not None and max_moves.endswith("%"):
        console.print(f"move budget: {max_moves} of {current.num_layers * current.num_slots:,} slots = {budget:,} slots")
    max_move_bytes = None if max_move_gib is None else max_move_gib * 2**30
    if max_move_bytes is not None and not math.isfinite(max_move_bytes):
        max_move_bytes = int(max_move_gib) * 2**30  # beyond a float in bytes: no practical limit, as an integer
    t0 = time.perf_counter()
    target = DEFAULT_MOVE_TARGET if move_target is None else resolve_move_share(move_target)
    new = replan(given, current, ts, max_moves=budget, max_move_bytes=max_move_bytes, seed=seed,
                 max_imbalance=max_imbalance, horizon_tokens=horizon_tokens, move_target=target)
    took = time.perf_counter() - t0
    full = plan(current.spec, ts, seed=seed) if compare_full else None
    new.metrics = evaluate_plan(new, ts)
    new.metrics["replan"] = replan_report(current, new, ts, full=full)
    new.policy["replan_seconds"] = round(took, 3)
    if output is not None:  # written before the report: a closed stdout (`| head`) must not lose the plan
        new.save(output)
    mig = new.policy["migration"]
    console.print(
        f"{new.spec.name}: re-planned {plan_from} ({current.num_layers} MoE layers, {current.num_slots} slots on "
        f"{current.num_gpus} GPUs) for {ts.name} ({ts.num_tokens} tokens) in {took:.2f}s: {mig['slots_moved']} of "
        f"{mig['slots_total']} slots move ({mig['fraction_moved']:.1%}, {mig['gib_moved']:.2f} GiB, "
        f"{mig['transfer_time_ms']:.1f} ms predicted)", highlight=False)
    for note in new.notes:
        say(note, prefix="note:", style="yellow")
    console.print(replan_table(new.metrics["replan"], f"re-plan beside the alternatives, on {ts.name}"))
    if output is not None:
        console.print(f"wrote {output}")


def print_drift(drift: list[dict], title: str) -> None:
    """``moegraph run --rebalance-every``: measured balance per step and every re-plan (slots, bytes)."""
    t = Table(title=title, show_header=True)
    for col in ("step", "measured max/mean", "re-plan", "slots moved", "MiB moved", "predicted max/mean after"):
        t.add_column(col, justify="right")
    moved = predicted = 0
    for row in drift:
        ev = row.get("event")
        cells = ["", "", "", ""]
        if ev is not None:
            if ev.get("skipped"):
                cells = ["skipped", "0", "0", ""]
            else:
                moved += ev["bytes_moved"]
                predicted += ev["predicted_bytes_moved"]
                cells = [f"{ev['seconds']:.2f}s", str(ev["slots_moved"]), f"{ev['bytes_moved'] / 2**20:.2f}",
                         f"{ev['predicted_max_mean_after']:.3f}"]
        t.add_row(str(row["step"]), f"{row['measured_max_mean']:.3f}", *cells)
    console.print(t)
    before = [r["measured_max_mean"] for r in drift]
    agree = "equal to the planner's migrations" if moved == predicted else \
        f"NOT equal to the planner's migrations: {predicted:,} bytes predicted, {moved:,} sent"
    console.print(f"measured max/mean GPU load, mean over steps: {sum(before) / max(len(before), 1):.3f}; weight bytes "
                  f"moved in all: {moved / 2**20:.2f} MiB (the runtime's count, {agree})", highlight=False)
