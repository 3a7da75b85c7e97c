"""Baseline placements every plan report compares against.

- ``contiguous``: slot p holds expert p % E (what a runtime does without a plan; SGLang's default).
- ``load_only``: in the spirit of DeepSeek's EPLB: give each redundant slot to the expert with the
  highest load per replica, then pack the replicas (heaviest first) onto the least loaded GPU that
  has a free slot. It sees per-expert token counts only: not which experts are chosen together,
  where tokens come from, or what links cost. Unlike EPLB it never puts two replicas of one expert
  on one GPU (such a replica would never be used by the dispatch rule).

Each of these functions returns one layer's ``physical_to_logical_map`` row [S];
``baseline_plans`` makes whole Plans of both for a spec, and ``evaluate_plan`` scores a plan beside
them on the same traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .cost import evaluate_plans
from .planfile import Plan

if TYPE_CHECKING:
    from ..spec import MoESpec
    from ..traces import TraceSet

__all__ = [
    "contiguous", "load_only", "replicate_by_load", "pack_balanced", "rows_from_gpu_lists", "baseline_plans",
    "evaluate_plan", "evaluate_checked",
]


def contiguous(num_experts: int, num_slots: int) -> np.ndarray:
    """[S] slot p holds expert p % E."""
    return np.arange(num_slots, dtype=np.int64) % num_experts


def replicate_by_load(load_E: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """[E] replicas per expert: each redundant slot goes to the expert with the largest load / replicas.

    load_E: [E] expected tokens per expert. No expert gets more replicas than there are GPUs.
    Ties go to the lower expert id.
    """
    e = len(load_E)
    r = np.ones(e, np.int64)
    load = np.asarray(load_E, np.float64)
    for _ in range(num_slots - e):
        score = np.where(r < num_gpus, load / r, -np.inf)
        r[int(np.argmax(score))] += 1
    return r


def pack_balanced(weights: np.ndarray, experts: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """[n] GPU of each item: heaviest first onto the least loaded GPU with a free slot and no copy of the expert.

    weights: [n] load of each item (replica); experts: [n] its logical expert.
    """
    n = len(weights)
    # Heaviest first; among equal weights, experts with more replicas first so that they still find
    # GPUs without a copy of themselves; then by expert id for determinism.
    reps = np.bincount(experts)[experts]
    order = np.lexsort((experts, -reps, -np.asarray(weights, np.float64)))
    gpu_load = np.zeros(num_gpus)
    free = np.full(num_gpus, slots_per_gpu)
    holds = np.zeros((num_gpus, int(experts.max()) + 1), bool)
    out = np.full(n, -1, np.int64)
    for i in order:
        ok = (free > 0) & ~holds[:, experts[i]]
        if not ok.any():  # only free GPUs already hold this expert: repaired below
            ok = free > 0
        g = int(np.argmin(np.where(ok, gpu_load, np.inf)))  # least loaded allowed GPU, lowest index on ties
        out[i] = g
        gpu_load[g] += weights[i]
        free[g] -= 1
        holds[g, experts[i]] = True
    return _repair_duplicates(out, experts, num_gpus)


def _repair_duplicates(gpu_of: np.ndarray, experts: np.ndarray, num_gpus: int) -> np.ndarray:
    """Swap items so that no GPU holds two copies of one expert (keeps per-GPU item counts)."""
    gpu_of = gpu_of.copy()
    for _ in range(len(gpu_of)):
        seen: dict[tuple[int, int], int] = {}
        dup = None
        for i in range(len(gpu_of)):
            key = (int(gpu_of[i]), int(experts[i]))
            if key in seen:
                dup = i
                break
            seen[key] = i
        if dup is None:
            return gpu_of
        g = gpu_of[dup]
        for j in range(len(gpu_of)):
            h = gpu_of[j]
            if h != g and experts[dup] not in experts[gpu_of == h] and experts[j] not in experts[gpu_of == g]:
                gpu_of[dup], gpu_of[j] = h, g
                break
        else:  # pragma: no cover - needs an expert with more replicas than GPUs, excluded by callers
            raise AssertionError("cannot place replicas without duplicating an expert on a GPU")
    return gpu_of


def rows_from_gpu_lists(gpu_of: np.ndarray, experts: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """[S] physical_to_logical row from items' GPUs: each GPU's experts in ascending id order."""
    row = np.empty(num_gpus * slots_per_gpu, np.int64)
    for g in range(num_gpus):
        mine = np.sort(experts[gpu_of == g])
        assert len(mine) == slots_per_gpu, f"GPU {g} got {len(mine)} items for {slots_per_gpu} slots"
        row[g * slots_per_gpu : (g + 1) * slots_per_gpu] = mine
    return row


def load_only(load_E: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """[S] EPLB-style row: replicate by load, then balanced packing of the replicas, each weighing its expert's
    load / r as serving engines pack them. Under moegraph's local-first dispatch a replica alone on its host
    takes more than that on several hosts; the baseline is kept as the engines run it (the planner's own
    count-only plans are repaired for the rule: ``search``)."""
    r = replicate_by_load(load_E, num_slots, num_gpus)
    experts = np.repeat(np.arange(len(load_E)), r)
    weights = (np.asarray(load_E, np.float64) / r)[experts]
    spg = num_slots // num_gpus
    return rows_from_gpu_lists(pack_balanced(weights, experts, num_gpus, spg), experts, num_gpus, spg)


def baseline_plans(spec: MoESpec, traces: TraceSet | None) -> dict[str, Plan]:
    """The contiguous and load-only (EPLB-style) plans for ``spec`` from the same traces.

    The load-only plan sees the per-expert loads of each trace source scaled to mean 1 and averaged
    (sources weigh equally, as in the planner), so it is exactly the planner's starting point.
    """
    e = spec.moe.experts.num_experts
    s = e + spec.placement.redundant_slots
    g = spec.topology.num_gpus
    n = spec.model.num_moe_layers
    if traces is None:
        loads = np.ones((n, e))
    else:
        c = traces.with_experts(e).counts_by_source.astype(np.float64)  # [S, L, E]
        loads = (c / np.maximum(c.mean(axis=2, keepdims=True), 1e-12)).mean(axis=0)
    return {
        "contiguous": Plan(np.stack([contiguous(e, s)] * n), spec, policy={"name": "contiguous"}),
        "load_only": Plan(np.stack([load_only(loads[i], s, g) for i in range(n)]), spec,
                          policy={"name": "load-only (EPLB-style)"}),
    }


def evaluate_plan(p: Plan, traces: TraceSet, baselines_from: TraceSet | None = None) -> dict[str, Any]:
    """Metrics of ``p`` on ``traces`` beside the baselines (planned from ``baselines_from``, default the same traces).

    ``traces`` is checked against the plan's spec here (this is a boundary: any TraceSet may be passed).
    """
    traces = traces.with_experts(p.num_experts)
    traces.check_spec(p.spec)
    return evaluate_checked(p, traces, baselines_from)


def evaluate_checked(p: Plan, traces: TraceSet, baselines_from: TraceSet | None = None,
                     processes: int | None = None) -> dict[str, Any]:
    """``evaluate_plan`` for traces already checked against ``p.spec`` and declared over its experts (its layers
    measured by ``processes`` processes: ``cost.evaluate_plans``)."""
    base = baseline_plans(p.spec, baselines_from if baselines_from is not None else traces)
    out: dict[str, Any] = evaluate_plans({"plan": p, **base}, traces, processes)
    out["traces"] = traces.name
    out["tokens"] = out["plan"]["tokens"]
    return out
