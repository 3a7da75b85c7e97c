"""The traffic model: what a plan costs on given traffic, under THE dispatch rule.

For every MoE layer the tokens of the traces are dispatched exactly as the runtime would
(``dispatch.dispatch_counts``) and measured:

- ``max_mean_load``: max / mean (token, expert) pairs computed per GPU;
- ``distinct_gpus``: distinct GPUs serving a token, per token;
- ``remote_gpu``: distinct GPUs other than the token's own serving it, per token (= copies sent to
  other GPUs, before host-level forwarding);
- ``remote_node``: distinct hosts other than the token's own serving it, per token;
- ``a2a_bytes``: bytes on all links per token, dispatch + combine (forwarding hops included;
  a copy is a row as wide as the experts' input (``hidden_size``, or ``expert_projection.size``) in
  the spec's dtype, or, with FP8 dispatch (``moe.quantization.dispatch: fp8``), ``hidden_size`` FP8
  bytes plus one float32 scale per activation tile on the way out and the spec's dtype on the way
  back: ``copy_bytes``);
- ``a2a_us``: predicted dispatch + combine time of the layer for the whole trace as one batch, by
  an alpha-beta model: each GPU sends and receives its bytes over its intra-host and inter-host
  links at the link bandwidth, plus the largest latency of a link it uses; intra- and inter-host
  traffic overlap (NVLink forwarding is pipelined with RDMA as in DeepEP); the slowest GPU sets
  the time; combine mirrors dispatch.

Load-only traces (counts, no tokens) give the expected ``max_mean_load`` (tokens assumed to start on
every GPU equally) and no communication figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..semantics import DTYPE_BYTES
from .dispatch import DispatchCounts, choose_replicas, counts_from_slots, source_gpus
from .forked import fork_workers, map_forked

if TYPE_CHECKING:
    from ..spec import MoESpec
    from ..topology import Cluster
    from ..traces import TraceSet
    from .planfile import Plan

__all__ = [
    "METRICS", "evaluate", "token_bytes", "copy_bytes", "a2a_time_us", "link_time_us", "expected_gpu_load", "cost_matrix",
]

#: metric key -> (label, format); every metric is better when lower.
METRICS: dict[str, tuple[str, str]] = {
    "max_mean_load": ("max/mean GPU load", "{:.3f}"),
    "distinct_gpus": ("distinct GPUs / token", "{:.3f}"),
    "remote_gpu": ("remote GPU copies / token", "{:.3f}"),
    "remote_node": ("remote node copies / token", "{:.3f}"),
    "a2a_bytes": ("a2a bytes / token (disp+comb)", "{:,.0f}"),
    "a2a_us": ("a2a time / layer, µs (trace batch)", "{:,.1f}"),
}

_DTYPE_BYTES = DTYPE_BYTES  # the one dtype table (moegraph.semantics.dtypes)


def token_bytes(spec: MoESpec) -> int:
    """Bytes of one token copy: a row as wide as the experts' input (the hidden size, or the experts' own
    space, ``moe.expert_projection``) in the spec's dtype."""
    return spec.moe.expert_width * _DTYPE_BYTES[spec.moe.dtype]


def copy_bytes(spec: MoESpec) -> tuple[int, int]:
    """Bytes of one token copy (dispatch, combine): FP8 dispatch sends FP8 values and their tile scales
    (``moe.quantization.dispatch: fp8``), the combine returns the spec's dtype (as DeepEP does)."""
    q = spec.moe.quantization
    combine = token_bytes(spec)
    if q is None or q.dispatch != "fp8":
        return combine, combine
    d = spec.moe.hidden_size
    return d + 4 * (d // q.activation_tile[1]), combine


def cost_matrix(cl: Cluster) -> np.ndarray:
    """[G, G] relative cost of one token copy between two GPUs: inverse bandwidth, 1 for the fastest link.

    The planner's search and the re-plan's move prices both use it, so weights and tokens are priced alike.
    """
    inv = 1.0 / cl.bandwidth  # inf on the diagonal -> 0
    off = inv[~np.eye(cl.num_gpus, dtype=bool)]
    return inv / off.min() if off.size else inv


def a2a_time_us(counts: DispatchCounts, cluster: Cluster, nbytes: int, combine_bytes: int | None = None) -> float:
    """Dispatch + combine time (µs) of one layer under the alpha-beta model of the module docstring
    (``nbytes`` per dispatched copy, ``combine_bytes`` per returned one; default the same)."""
    copies = counts.link_copies.astype(np.float64)
    back = nbytes if combine_bytes is None else combine_bytes
    return link_time_us(copies * nbytes, cluster) + link_time_us(copies * back, cluster)


def link_time_us(bytes_GG: np.ndarray, cluster: Cluster) -> float:
    """Time (µs) to send ``bytes_GG`` [G, G] (src -> dst) at once under the alpha-beta model of the module
    docstring (one phase: the dispatch alone, or a batch of weight transfers)."""
    b = np.asarray(bytes_GG, np.float64)
    same = cluster.node_of_gpu[:, None] == cluster.node_of_gpu[None, :]
    t_us = np.where(b > 0, b / (cluster.bandwidth * 1e3), 0.0)  # GB/s -> bytes per µs is bw * 1e3
    lat = np.where(b > 0, cluster.latency, 0.0)
    phase = 0.0
    for mask in (same, ~same):
        tt, ll = np.where(mask, t_us, 0.0), np.where(mask, lat, 0.0)
        send = tt.sum(axis=1) + ll.max(axis=1)
        recv = tt.sum(axis=0) + ll.max(axis=0)
        phase = max(phase, float(send.max(initial=0.0)), float(recv.max(initial=0.0)))
    return phase


def expected_gpu_load(plan: Plan, layer: int, counts_E: np.ndarray) -> np.ndarray:
    """[G] expected work per GPU from expert counts [E], tokens starting on every GPU equally."""
    cand, n = plan.replica_table(layer)
    g = plan.num_gpus
    load = np.zeros(g)
    spg = plan.slots_per_gpu
    for src in range(g):
        share = counts_E / g / np.maximum(n[src], 1)  # [E] per candidate
        for r in range(cand.shape[2]):
            ok = cand[src, :, r] >= 0
            np.add.at(load, cand[src, ok, r] // spg, share[ok])
    return load


def evaluate(plan: Plan, traces: TraceSet) -> dict[str, Any]:
    """Metrics of ``plan`` on ``traces``: {"mean": {metric: value}, "per_layer": {metric: [L]}, ...}."""
    return evaluate_plans({"plan": plan}, traces, processes=1)["plan"]


def evaluate_plans(plans: dict[str, Plan], traces: TraceSet, processes: int | None = None) -> dict[str, dict[str, Any]]:
    """``evaluate`` of each of ``plans`` (one spec's plans: the same layers and cluster) on ``traces``.

    Layers are measured independently, so large evaluations (PARALLEL_WORK and up: layers x tokens x top-k
    x plans) run their layers in forked processes (``forked``), one per usable core unless ``processes`` says;
    every figure is the one a single process computes.
    """
    first = next(iter(plans.values()))
    n_layers = first.num_layers
    if traces.load_only:
        def measure(plan: Plan, layer: int) -> dict[str, float]:
            load = expected_gpu_load(plan, layer, traces.counts[layer].astype(np.float64))
            return {"max_mean_load": float(load.max() / max(load.mean(), 1e-12))}
        work = 0
    else:
        src = source_gpus(traces, first.num_gpus)
        nbytes, back = copy_bytes(first.spec)
        cl = first.cluster
        t = max(traces.num_tokens, 1)

        def measure(plan: Plan, layer: int) -> dict[str, float]:
            phys = choose_replicas(plan, layer, traces.topk[layer], src)
            c = counts_from_slots(phys // plan.slots_per_gpu, src, cl)
            return {"max_mean_load": float(c.gpu_load.max() / max(c.gpu_load.mean(), 1e-12)),
                    "distinct_gpus": c.distinct_gpus / t, "remote_gpu": c.remote_gpu_copies / t,
                    "remote_node": c.remote_node_copies / t,
                    "a2a_bytes": float(c.link_copies.sum()) * (nbytes + back) / t,
                    "a2a_us": a2a_time_us(c, cl, nbytes, back)}
        work = n_layers * traces.num_tokens * traces.topk[0].shape[1] * len(plans) if n_layers else 0

    def layer_metrics(layer: int) -> dict[str, dict[str, float]]:
        return {name: measure(plan, layer) for name, plan in plans.items()}

    if processes is None:
        processes = fork_workers(n_layers, work, PARALLEL_WORK)
    per_layer = map_forked(layer_metrics, range(n_layers), processes)
    summaries = {}
    for name in plans:
        per: dict[str, list[float]] = {k: [] for k in METRICS}
        for m in per_layer:
            for k, v in m[name].items():
                per[k].append(v)
        per = {k: v for k, v in per.items() if v}
        summaries[name] = _summary(per, traces, load_only=traces.load_only)
    return summaries


#: layers x tokens x top-k x plans from which ``evaluate_plans`` measures its layers in several processes: the
#: metrics of DeepSeek-V3-sized plans (58 layers x 8k tokens x top-8 x 3 plans) take seconds, those of a tiny spec
#: milliseconds
PARALLEL_WORK = 2_000_000


def _summary(per: dict[str, list[float]], traces: TraceSet, load_only: bool) -> dict[str, Any]:
    return {
        "traces": traces.name,
        "tokens": None if load_only else traces.num_tokens,
        "load_only": load_only,
        "mean": {k: float(np.mean(v)) for k, v in per.items()},
        "worst_layer_max_mean_load": float(np.max(per["max_mean_load"])),
        "per_layer": {k: [round(float(x), 5) for x in v] for k, v in per.items()},
    }
