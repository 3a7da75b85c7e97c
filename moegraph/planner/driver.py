"""The planner's driver: ``plan(spec, traces) -> Plan`` over every MoE layer, and its what-if checks.

For each MoE layer it builds the layer's problem from the routing traces (``graph.layer_arrays``),
chooses replica counts (the load-only rule, then in small layers one replica moved to another expert
when that serves the planning traffic better, ``_move_replicas``), places the replicas with the
constrained search (``search.solve_layer``) and records the policy, the dispatch rule and the
predicted metrics beside the baselines. See the package docstring for the whole.

A layer's problem and search read nothing of the other layers (its seed is the plan's seed and the
layer index), so the layers of a large plan are solved in forked processes, one per usable core
(``forked.map_forked``; ``plan(processes=...)``), and combined in layer order: the plan of one
process, bit for bit. On this 2-core machine DeepSeek-V2-Lite's 26 layers plan in about half the
wall time, at the same CPU time (figures: ``benchmarks/results/planner_design.md``, section s26).

Routing traces are checked against the spec once, where they enter (``traces_for_spec``); nothing
after that re-checks them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PlanInfeasible, SpecError, TraceError, is_integer, is_number, short_repr
from ..limits import check_memory
from ..loader import load_spec
from ..spec import ExplicitTopology, MoESpec
from ..summary import summarize
from ..topology import Cluster, cluster_of
from ..traces import TraceSet, traces_for_spec
from .baselines import evaluate_checked, replicate_by_load
from .blas import one_blas_thread
from .cost import cost_matrix
from .dispatch import counts_from_slots, replica_table, source_gpus
from .forked import fork_workers, map_forked
from .graph import layer_arrays, window_ids
from .planfile import Plan
from .search import EXACT_MAX_ITEMS, LayerProblem, LayerResult, solve_layer

__all__ = [
    "plan",
    "override_spec",
    "check_feasible",
    "DEFAULT_ROUNDS",
    "DEFAULT_ROUNDS_NO_REPLICAS",
    "REPLICA_MOVE_MAX_SLOTS",
    "REPLICA_CANDIDATES",
    "PARALLEL_WORK",
]

#: perturbation rounds of the iterated local search by default, in layers of at most EXACT_MAX_ITEMS
#: slots (larger layers: none, for time). Each round is scored by the exact copies and kept only when
#: the GPUs' total variance does not grow, so more rounds trade time for communication, not balance
#: (figures: ``benchmarks/results/planner_design.md``).
DEFAULT_ROUNDS = 6
#: the same in layers without redundant slots, which skip the replica-move search (nine trial searches
#: per layer) and so can afford twice the rounds; with redundant slots extra rounds did not pay for
#: their time.
DEFAULT_ROUNDS_NO_REPLICAS = 12

#: layers x slots x GPUs of token-traffic planning from which ``plan`` searches its layers in several forked
#: processes (``forked``): DeepSeek-V2-Lite's 26 x 64 x 8 does (about a second of search per layer), a tiny
#: test spec's few layers (milliseconds each) stay in one process
PARALLEL_WORK = 4096

#: layers of at most this many slots (with redundant ones) try moving one replica to another expert
#: (``_move_replicas``): each try is a full search, affordable for small layers only (the DeepSeek-V3
#: sized plan, 288 slots, keeps the load-only replica counts and its time)
REPLICA_MOVE_MAX_SLOTS = 128
#: donors and takers tried by ``_move_replicas`` (REPLICA_CANDIDATES ** 2 searches per layer at most)
REPLICA_CANDIDATES = 3

Progress = Callable[[int, int], None]


def override_spec(
    spec: MoESpec, *, nodes: int | None = None, gpus_per_node: int | None = None, slots: int | None = None
) -> MoESpec:
    """The spec with its cluster or slot count replaced (for what-ifs); the plan records the result."""
    if nodes is None and gpus_per_node is None and slots is None:
        return spec
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("slots", slots)):
        if value is not None and not is_integer(value, 1):
            raise PlanInfeasible(f"{name} must be a whole number >= 1 (--{name.replace('_', '-')}), got "
                                 f"{short_repr(value)}")
    data = spec.to_dict()
    if nodes is not None or gpus_per_node is not None:
        if isinstance(spec.topology, ExplicitTopology):
            raise PlanInfeasible(
                f"spec {spec.name!r} lists its devices explicitly (topology.devices); --nodes/--gpus-per-node "
                "apply to uniform clusters only: edit topology.devices instead"
            )
        if nodes is not None:
            data["topology"]["nodes"] = nodes
        if gpus_per_node is not None:
            data["topology"]["gpus_per_node"] = gpus_per_node
    e = spec.moe.experts.num_experts
    if slots is not None:
        if slots < e:
            raise PlanInfeasible(
                f"--slots {slots} is fewer than the {e} experts (moe.experts.num_experts); every expert needs a "
                f"slot: use at least {e}"
            )
        data["placement"]["redundant_slots"] = slots - e
    try:
        return load_spec(data, source=f"{spec.name} (overridden)")
    except SpecError as exc:
        gpus = data["topology"].get("nodes", 1) * data["topology"].get("gpus_per_node", 1)
        total = e + data["placement"]["redundant_slots"]
        raise PlanInfeasible(
            f"{exc.render()}\n{total} slots on {gpus} GPUs: choose --slots as a multiple of {gpus} "
            f"(e.g. {-(-total // gpus) * gpus}) or another GPU count"
        ) from None


def check_feasible(spec: MoESpec, cluster: Cluster | None = None) -> None:
    """Raise PlanInfeasible (saying what to change) unless the spec's slots and memory can hold a plan."""
    cl = cluster or cluster_of(spec)
    e = spec.moe.experts.num_experts
    s = e + spec.placement.redundant_slots
    g = cl.num_gpus
    if s % g:
        raise PlanInfeasible(
            f"{s} slots do not split evenly over {g} GPUs; set placement.redundant_slots (or --slots) so that "
            f"experts + redundant slots is a multiple of {g}"
        )
    spg = s // g
    if spg > e:
        raise PlanInfeasible(
            f"{spg} slots per GPU but only {e} experts: a GPU would hold one expert twice; lower "
            f"placement.redundant_slots to at most {e * g - e} or use more GPUs"
        )
    m = summarize(spec)
    need = spg * m.num_moe_layers * m.routed_expert_bytes / 2**30  # as stored: FP8 + scales when quantized
    short = np.flatnonzero(cl.memory_gib < need)
    if len(short):
        gpu = int(short[0])
        raise PlanInfeasible(
            f"each GPU holds {spg} experts x {m.num_moe_layers} MoE layers = {need:.1f} GiB of expert weights, but "
            f"{cl.names[gpu]} has {cl.memory_gib[gpu]:g} GiB (topology memory); use more GPUs, fewer redundant "
            "slots, or GPUs with more memory"
        )


def _planning_traces(spec: MoESpec, traces: Any) -> TraceSet | None:
    """The routing traces to plan from (default: the spec's ``placement.traces``), checked once, here."""
    if traces is None:
        traces = list(spec.placement.traces)
        if not traces:
            return None
    return traces_for_spec(traces, spec)


def _trace_items(traces: Any) -> Any:
    """``traces`` as given (None, one trace), or its items as a list: any iterable (a set of names, a generator)
    is read once, here; anything else is refused naming the argument."""
    if traces is None or isinstance(traces, (str, os.PathLike, TraceSet)):
        return traces
    if isinstance(traces, Mapping) or isinstance(traces, np.ndarray) or not isinstance(traces, Iterable):
        raise TraceError(f"traces must be a trace file, folder or bundled name, a TraceSet, or a list of those; got "
                         f"{type(traces).__name__}")
    return list(traces)


def _trace_inputs(spec: MoESpec, traces: Any) -> list[str] | None:
    """The trace paths / bundled names a plan was made from (``traces`` as ``_trace_items`` gave it), when given
    as such (to re-load them later, from any working directory): an entry that names a file or folder on disk as
    its absolute path (links resolved; a relative one read from another folder named other traffic), a bundled
    trace name as it is."""
    if traces is None:
        items = list(spec.placement.traces)
        if not items:
            return None
    else:
        items = traces if isinstance(traces, list) else [traces]
    if all(isinstance(t, (str, Path)) for t in items):
        return [str(Path(t).resolve()) if os.path.exists(t) else str(t) for t in items]
    return None


def _check_arguments(**kwargs: Any) -> None:
    """Range and type of the planner's numeric arguments (the spec's own values are validated there)."""
    bounds = {"seed": (0, 2**63 - 1), "max_imbalance": (1.0, 1e6), "rounds": (0, 10000), "risk_slack": (0.0, 1e6)}
    for key, value in kwargs.items():
        if value is None:
            continue
        lo, hi = bounds[key]
        integer = isinstance(lo, int)
        if not (is_integer if integer else is_number)(value, lo, hi):
            kind = "an integer" if integer else "a finite number"
            raise PlanInfeasible(f"{key}={short_repr(value)}: expected {kind} in [{lo}, {hi}]")


def plan(
    spec: MoESpec | str | Path | dict,
    traces: Any = None,
    *,
    seed: int | None = None,
    slots: int | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    max_imbalance: float | None = None,
    robust: bool = True,
    risk_slack: float = 0.0,
    rounds: int | None = None,
    progress: Progress | None = None,
    processes: int | None = None,
) -> Plan:
    """Plan expert placement and replication for every MoE layer of ``spec`` from routing traces.

    traces: a TraceSet, a list of TraceSets (one per source), or what ``load_traces`` accepts
        (paths, bundled names); default: the spec's ``placement.traces``. Several sources (tasks,
        files) are each kept in balance and weigh equally.
    seed: seeds the perturbation rounds (default ``placement.seed``); same inputs + seed, same plan.
    slots / nodes / gpus_per_node: what-if overrides of the spec (the plan records the changed spec).
    max_imbalance: target max/mean GPU load on the traffic seen (default ``placement.max_imbalance``).
    robust: also bound every GPU's load covariance, and the loads expected on unseen traffic (largest and
        spread over the GPUs), by the load-only plan's (see ``search``).
    rounds: perturbation rounds of iterated local search per layer (default: DEFAULT_ROUNDS in layers of at
        most EXACT_MAX_ITEMS slots, DEFAULT_ROUNDS_NO_REPLICAS there without redundant slots, none in larger
        layers).
    progress: called as progress(layers_done, num_layers).
    processes: how many processes plan the layers and measure the plan's metrics (each layer is independent
        of the others, so the plan is the same bit for bit on any number: ``forked``). None: one per usable
        core on Linux where the plan searches token traffic of at least PARALLEL_WORK layers x slots x GPUs
        (the metrics: ``cost.evaluate_plans``), else 1. A caller that is one of several processes per host
        (a rank) passes 1.
    """
    _check_arguments(seed=seed, max_imbalance=max_imbalance, rounds=rounds, risk_slack=risk_slack)
    if processes is not None and not is_integer(processes, 1):
        raise PlanInfeasible(f"processes is a count of processes (>= 1, or None for automatic), got "
                             f"{short_repr(processes)}")
    spec = override_spec(load_spec(spec), nodes=nodes, gpus_per_node=gpus_per_node, slots=slots)
    e_, s_ = spec.moe.experts.num_experts, spec.moe.experts.num_experts + spec.placement.redundant_slots
    check_memory(8.0 * (3 * e_ * e_ + 2 * s_ * s_), f"planning {e_} experts in {s_} slots",
                 "plan fewer experts or slots (--slots)")
    cl = cluster_of(spec)
    check_feasible(spec, cl)
    traces = _trace_items(traces)
    trace_inputs = _trace_inputs(spec, traces)
    ts = _planning_traces(spec, traces)
    e = spec.moe.experts.num_experts
    n_slots = e + spec.placement.redundant_slots
    g = cl.num_gpus
    n_layers = spec.model.num_moe_layers
    seed = spec.placement.seed if seed is None else int(seed)
    imb = spec.placement.max_imbalance if max_imbalance is None else float(max_imbalance)
    if rounds is None:
        rounds = 0 if n_slots > EXACT_MAX_ITEMS else DEFAULT_ROUNDS_NO_REPLICAS if n_slots == e else DEFAULT_ROUNDS
    rounds = int(rounds)
    cost = cost_matrix(cl)
    notes: list[str] = []
    if ts is None:
        sources = None
        policy_name = "balanced-default"
        why = "no traces given"
        notes.append("no traces given: every expert assumed equally loaded; plan from traces for a real placement")
    else:
        sources = ts.split_sources()
        notes.extend(ts.notes)
        if ts.load_only:
            policy_name = "load-only"
            why = "the traces hold token counts only (no co-activation): balanced packing with replication"
            notes.append("communication was not optimised: the traces have no co-activation")
        else:
            policy_name = "coactivation-swap-search"
            why = ("co-activation graph mapped onto the topology by constrained 2-opt swap search"
                   + (", refined by exact expected copies per token" if n_slots <= EXACT_MAX_ITEMS else "")
                   + (f", with {rounds} seeded perturbation rounds" if rounds else "")
                   + "; balanced on the traffic seen (each trace source no worse than load-only)"
                   + ("; each GPU's load covariance and the uninformed-prior loads (largest and spread) bounded by "
                      "the load-only plan's" if robust else ""))
    windows = None if sources is None or ts.load_only else [window_ids(s.sample_ids) for s in sources]

    def solve(layer: int) -> LayerResult:
        """One layer's placement (in this process or a forked one: the same result)."""
        arr = None if sources is None else layer_arrays(sources, layer, g, windows)
        prob = LayerProblem(
            loads=np.ones((1, e)) if arr is None else arr.loads,
            coact=np.zeros((e, e)) if arr is None else arr.coact,
            risk=np.zeros((e, e)) if arr is None else arr.risk,
            src_counts=None if arr is None else arr.src_counts,
            topk=None if arr is None else arr.topk, token_weight=None if arr is None else arr.token_weight,
            cost=cost, node_of_gpu=cl.node_of_gpu, num_slots=n_slots, max_imbalance=imb, robust=robust,
            risk_slack=risk_slack, rounds=rounds, seed=seed * 1_000_003 + layer,
        )
        if arr is not None and not ts.load_only and e < n_slots <= REPLICA_MOVE_MAX_SLOTS:
            # Choose replica counts on the pairwise search alone, then refine the chosen layout once.
            coarse = dataclasses.replace(prob, exact=False, rounds=0)
            res = _move_replicas(coarse, solve_layer(coarse), sources, layer, cl)
            fin = solve_layer(dataclasses.replace(prob, replicas=res.replicas))
            return dataclasses.replace(fin, baseline_row=res.baseline_row, baseline_objective=res.baseline_objective)
        return solve_layer(prob)

    workers = processes
    if workers is None:
        # Only token traffic runs the search (seconds per layer); without it a layer is a packing (milliseconds).
        workers = 1 if windows is None else fork_workers(n_layers, n_layers * n_slots * g, PARALLEL_WORK)
    done = None if progress is None else (lambda n: progress(n, n_layers))
    stats = {"swaps": 0, "refine_swaps": 0, "repair_swaps": 0, "objective": 0.0, "baseline_objective": 0.0}
    with one_blas_thread():
        results = map_forked(solve, range(n_layers), workers, done)
        rows = [res.row for res in results]
        for res in results:  # summed in layer order, whatever process computed each
            stats["swaps"] += res.swaps
            stats["refine_swaps"] += res.refined
            stats["repair_swaps"] += res.repaired
            stats["objective"] += res.objective
            stats["baseline_objective"] += res.baseline_objective
        policy = {
            "name": policy_name,
            "why": why,
            "seed": seed,
            "max_imbalance": imb,
            "robust": robust,
            "risk_slack": risk_slack,
            "rounds": rounds,
            "cost_matrix": "inverse link bandwidth, 1 for the fastest link",
            "traces": None if ts is None else ts.name,
            "trace_inputs": trace_inputs,
            "sources": None if ts is None else list(ts.sources),
            **{k: round(float(v), 6) if isinstance(v, float) else v for k, v in stats.items()},
        }
        p = Plan(np.stack(rows), spec, policy=policy, notes=notes)
        if ts is not None:
            p.metrics = evaluate_checked(p, ts, processes=processes)  # ts was checked at the boundary
    return p


def _rule_scores(row: np.ndarray, layer: int, traffic: list[tuple[np.ndarray, np.ndarray]], e: int, spg: int,
                 cl: Cluster) -> tuple[float, np.ndarray]:
    """Remote GPU copies per token (mean over sources) and max/mean GPU load per source [Sc] of one
    layer's row on the planning traffic, under the dispatch rule. traffic: (topk [T, K], source GPU [T]) per source."""
    cand, n = replica_table(row, e, spg, cl.node_of_gpu)
    remote, ratio = [], []
    for ids, src in traffic:
        j = np.arange(ids.shape[0])[:, None] % n[src[:, None], ids]
        c = counts_from_slots(cand[src[:, None], ids, j] // spg, src, cl)
        remote.append(c.remote_gpu_copies / max(len(src), 1))
        ratio.append(c.gpu_load.max() / max(c.gpu_load.mean(), 1e-12))
    return float(np.mean(remote)), np.array(ratio)


def _move_replicas(prob: LayerProblem, res: LayerResult, sources: list[TraceSet], layer: int, cl: Cluster) -> LayerResult:
    """Give one redundant slot to another expert if that serves the planning traffic better.

    Tries moving one replica from each of the REPLICA_CANDIDATES replicated experts the load-only rule
    values least (lowest load per replica were they one replica short) to each of the
    REPLICA_CANDIDATES experts next in line (highest load per replica), re-runs the search for each
    and keeps the move that lowers the remote GPU copies per token on the planning traffic (rule-exact)
    the most, provided no source's rule-exact max/mean load rises. The search keeps the load-only
    plan's covariance bound. Why this guard: letting the move spend balance slack up to
    ``max_imbalance`` gains more remote copies on the task planned for but loses balance on traffic
    the plan never saw (figures: ``benchmarks/results/planner_design.md``). Not used without
    redundant slots (nothing to move).
    """
    e = prob.loads.shape[1]
    g = prob.cost.shape[0]
    spg = prob.num_slots // g
    traffic = [(np.asarray(s.topk[layer], np.int64), source_gpus(s, g)) for s in sources]
    mean_load = prob.loads.mean(axis=0)
    r = replicate_by_load(mean_load, prob.num_slots, g)
    best_remote, ratio = _rule_scores(res.row, layer, traffic, e, spg, cl)
    cap = ratio + 1e-9
    donors = [int(a) for a in np.argsort(mean_load / np.maximum(r - 1, 1), kind="stable") if r[a] > 1]
    takers = [int(b) for b in np.argsort(-mean_load / r, kind="stable") if r[b] < g]
    best = res
    for a in donors[:REPLICA_CANDIDATES]:
        for b in takers[:REPLICA_CANDIDATES]:
            if a == b:
                continue
            rr = r.copy()
            rr[a] -= 1
            rr[b] += 1
            cand = solve_layer(dataclasses.replace(prob, replicas=rr))
            remote, ratio = _rule_scores(cand.row, layer, traffic, e, spg, cl)
            if remote < best_remote - 1e-9 and (ratio <= cap).all():
                best, best_remote = cand, remote
    if best is not res:
        best = dataclasses.replace(best, baseline_row=res.baseline_row, baseline_objective=res.baseline_objective)
    return best
