"""The re-plan beside its alternatives: keep, load-only from scratch (raw and relabelled), a full
re-plan relabelled, and the incremental re-plan, each scored on the window it was made from.

``moegraph plan --from`` prints this table and stores it as ``metrics["replan"]`` in the new plan.
"""

from __future__ import annotations

from typing import Any

from .baselines import baseline_plans
from .cost import evaluate
from .migration import _check_plans, migration, relabel
from .planfile import Plan
from .replan import _window

__all__ = ["REPORT_PLANS", "replan_report"]


#: columns of ``replan_report``, in order: key -> label
REPORT_PLANS = {
    "keep": "keep",
    "load_only": "load-only",
    "load_only_relabelled": "load-only relabelled",
    "full": "full relabelled",
    "replan": "incremental",
}


def replan_report(current: Plan, new: Plan, traces: Any, *, full: Plan | None = None) -> dict[str, Any]:
    """The re-plan ``new`` beside the alternatives, on the window ``traces`` it was made from.

    For each of (``REPORT_PLANS``): keeping ``current``; a load-only (EPLB-style) re-plan from scratch on the window; the
    same relabelled to move least (``relabel``); ``full`` (a moegraph re-plan from scratch, relabelled;
    omitted when None); and ``new``: slots and bytes moved, predicted transfer time, and max/mean
    GPU load, remote GPU and remote node copies per token on the window (``cost.evaluate``).
    Returns {"window", "tokens", "plans": {key: {...}}} (plain JSON; stored as ``metrics["replan"]``).
    """
    _check_plans(current, new, "new")  # before any work: plans of one spec, model and cluster (PlanFileError)
    if full is not None:
        _check_plans(current, full, "full")
    ts = _window(current.spec, traces)
    lo = baseline_plans(current.spec, ts)["load_only"]
    cands = {"keep": current, "load_only": lo, "load_only_relabelled": relabel(lo, current, ts)}
    if full is not None:
        cands["full"] = relabel(full, current, ts)
    cands["replan"] = new
    out: dict[str, Any] = {"window": ts.name, "tokens": ts.num_tokens, "plans": {}}
    for key, p in cands.items():
        m = evaluate(p, ts)["mean"]
        mig = migration(current, p)
        out["plans"][key] = {
            "label": REPORT_PLANS[key],
            **{k: v for k, v in mig.summary().items() if k != "slots_moved_per_layer"},
            "max_mean_load": round(m["max_mean_load"], 6),
            "remote_gpu": round(m["remote_gpu"], 6),
            "remote_node": round(m["remote_node"], 6),
        }
    return out
