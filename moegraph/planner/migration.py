"""What changes between two plans, and a plan renamed to change least.

    migration(current_plan, new_plan) -> Migration        # which slots change, from where, bytes, time
    relabel(plan, current_plan) -> Plan                   # any plan, matched to where weights are

A slot whose expert changes is an expert's weights crossing the cluster: ``migration`` lists those
transfers (source chosen by link cost) with their bytes and predicted time, and is what the
distributed runtime executes. ``relabel`` makes any plan (from scratch, load-only or not) cheap to
switch to.

Relabelling (``relabel``): each MoE layer's ranks are named independently (a rank holds one set of
experts per layer) and GPUs of the same shape are interchangeable, so any plan (from scratch,
load-only or not) can be renamed, layer by layer, so that its GPUs hold as many of the experts they
already hold as possible: a linear assignment between new and current GPUs
(``scipy.optimize.linear_sum_assignment``) on the number of experts they share, first between hosts
(each pair of hosts scored by the best matching of their GPUs), then between the GPUs of each
matched pair, kept only when the renaming preserves every link's bandwidth and latency. Slots inside
a GPU follow (``_align_slots``).

Legend: E experts, G GPUs, N hosts, S slots of one layer, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import PlanFileError
from ..spec import MoESpec
from ..summary import summarize
from ..topology import Cluster
from .cost import cost_matrix, link_time_us
from .planfile import Plan

__all__ = ["Migration", "expert_bytes", "migration", "relabel"]


def expert_bytes(spec: MoESpec) -> int:
    """Bytes of one routed expert's weights (one slot) as stored: the spec's dtype, or FP8 + block scales."""
    return summarize(spec).routed_expert_bytes


def _move_cost(cluster: Cluster) -> np.ndarray:
    """[G, G] relative cost of moving one expert between GPUs: the planner's per-copy cost (inverse
    bandwidth, 1 for the fastest link), so that weights and tokens are priced alike."""
    return cost_matrix(cluster)


# ------------------------------------------------------------------------------------------------
# migration: what changes between two plans
# ------------------------------------------------------------------------------------------------


@dataclass
class Migration:
    """The weight transfers that turn one plan into another.

    ``moves``: [M, 5] int64 rows (layer, destination slot, expert, source GPU, source slot), in layer
    and slot order: the destination slot's new expert is copied from that slot of the current plan
    (the nearest GPU holding the expert, by link cost; ties: the source used least so far, then the
    lowest index). A slot whose GPU already holds its new expert in another slot is a local copy and
    not a move (``slots_changed`` counts those too: what a runtime reloading every changed slot moves).
    """

    moves: np.ndarray  # [M, 5]
    num_layers: int
    num_slots: int
    slots_per_gpu: int
    expert_bytes: int  # bytes of one slot's weights in the spec's dtype
    link_bytes: np.ndarray  # [G, G] bytes sent from GPU a to GPU b over all layers
    time_us: float  # predicted transfer time (alpha-beta model of ``cost``), all layers at once
    slots_changed: int = 0  # slots holding another expert than before, local copies included

    @property
    def slots_moved(self) -> int:
        return int(len(self.moves))

    @property
    def fraction(self) -> float:
        return self.slots_moved / max(self.num_layers * self.num_slots, 1)

    @property
    def bytes(self) -> int:
        return self.slots_moved * self.expert_bytes

    def per_layer(self) -> np.ndarray:
        """[L] slots moved in each MoE layer."""
        return np.bincount(self.moves[:, 0], minlength=self.num_layers) if len(self.moves) else np.zeros(
            self.num_layers, np.int64)

    def summary(self) -> dict[str, Any]:
        return {
            "slots_moved": self.slots_moved,
            "slots_total": self.num_layers * self.num_slots,
            "slots_changed": self.slots_changed,
            "fraction_moved": round(self.fraction, 6),
            "bytes_moved": self.bytes,
            "gib_moved": round(self.bytes / 2**30, 6),
            "transfer_time_ms": round(self.time_us / 1e3, 6),
            "slots_moved_per_layer": self.per_layer().tolist(),
        }


def migration(current: Plan, new: Plan) -> Migration:
    """Which slots of ``new`` hold another expert than in ``current``, where each one's weights come from,
    and the bytes and predicted time of moving them (every layer at once)."""
    _check_same_shape(current, new)
    spg, g = current.slots_per_gpu, current.num_gpus
    cost = _move_cost(current.cluster)
    nbytes = expert_bytes(current.spec)
    link = np.zeros((g, g), np.int64)
    rows = []
    changed = int((current.physical_to_logical_map != new.physical_to_logical_map).sum())
    for layer in range(current.num_layers):
        old, cur = current.physical_to_logical_map[layer], new.physical_to_logical_map[layer]
        used = np.zeros(g, np.int64)  # transfers each source GPU serves in this layer
        for s in np.flatnonzero(old != cur):
            e, dst = int(cur[s]), int(s // spg)
            if (old[dst * spg:(dst + 1) * spg] == e).any():
                continue  # the GPU holds e in another slot already: a local copy, nothing crosses a link
            holders = np.flatnonzero(old == e)  # slots of the current plan holding e
            hg = holders // spg
            pick = int(np.lexsort((hg, used[hg], cost[hg, dst]))[0])
            src_slot, src = int(holders[pick]), int(hg[pick])
            used[src] += 1
            link[src, dst] += 1
            rows.append((layer, int(s), e, src, src_slot))
    moves = np.array(rows, np.int64).reshape(-1, 5)
    return Migration(moves=moves, num_layers=current.num_layers, num_slots=current.num_slots, slots_per_gpu=spg,
                     expert_bytes=nbytes, link_bytes=link * nbytes,
                     time_us=link_time_us(link.astype(np.float64) * nbytes, current.cluster), slots_changed=changed)


def _check_same_shape(current: Plan, new: Plan) -> None:
    a, b = current, new
    for what, x, y in (("MoE layers", a.num_layers, b.num_layers), ("experts", a.num_experts, b.num_experts),
                       ("GPUs", a.num_gpus, b.num_gpus), ("slots", a.num_slots, b.num_slots)):
        if x != y:
            raise PlanFileError(
                f"the new plan has {y} {what} but the current plan has {x}: a migration needs plans of the same "
                f"model and cluster; re-plan with --from CURRENT_PLAN so that both share them"
            )
    if not np.array_equal(a.node_of_gpu, b.node_of_gpu):
        raise PlanFileError("the new plan's GPUs are grouped into hosts differently from the current plan's; "
                            "re-plan with --from CURRENT_PLAN so that both share the cluster")


# ------------------------------------------------------------------------------------------------
# relabelling
# ------------------------------------------------------------------------------------------------


def _holds(row: np.ndarray, g: int, e: int) -> np.ndarray:
    """[G, E] which GPU holds which expert, from one layer's row [S]."""
    h = np.zeros((g, e), bool)
    h[np.arange(len(row)) // (len(row) // g), row] = True
    return h


def _align_slots(row_new: np.ndarray, row_old: np.ndarray, g: int) -> np.ndarray:
    """[S] ``row_new`` with each GPU's experts put back into the slots that hold them in ``row_old``
    (kept experts stay where their weights are; the others fill the freed slots in ascending id)."""
    spg = len(row_new) // g
    out = np.empty_like(row_new)
    for gpu in range(g):
        sl = slice(gpu * spg, (gpu + 1) * spg)
        old, new = row_old[sl], row_new[sl]
        keep = np.isin(old, new)
        fresh = np.sort(new[~np.isin(new, old)])
        res = old.copy()
        res[~keep] = fresh
        out[sl] = res
    return out


def _gpu_permutation(new_rows: np.ndarray, old_rows: np.ndarray, cluster: Cluster, e: int) -> np.ndarray:
    """[G] perm: GPU x of the renamed plan holds what the new plan's GPU perm[x] holds (see ``relabel``).

    new_rows, old_rows: [L, S] rows of the new and the current plan (the layers scored together).
    """
    g = cluster.num_gpus
    # overlap[a, b]: experts (over the layers given) that the new plan's GPU a shares with the current plan's GPU b.
    overlap = np.zeros((g, g))
    for rn, ro in zip(new_rows, old_rows):
        overlap += _holds(rn, g, e).astype(np.float64) @ _holds(ro, g, e).T.astype(np.float64)
    node = cluster.node_of_gpu
    n = cluster.num_nodes
    gpus = [np.flatnonzero(node == m) for m in range(n)]
    # Step 1: hosts, each pair scored by the best matching of their GPUs (hosts of another size never match).
    score = np.full((n, n), -1e18)
    inner: dict[tuple[int, int], np.ndarray] = {}
    for a in range(n):
        for b in range(n):
            if len(gpus[a]) != len(gpus[b]):
                continue
            sub = overlap[np.ix_(gpus[a], gpus[b])]
            r, c = linear_sum_assignment(sub, maximize=True)
            score[a, b] = sub[r, c].sum()
            inner[a, b] = c[np.argsort(r)]  # inner[a, b][i]: local index in host b for host a's GPU i
    hr, hc = linear_sum_assignment(score, maximize=True)
    perm = np.arange(g)
    for a, b in zip(hr, hc):
        # Step 2: the GPUs of the matched hosts.
        for i, j in enumerate(inner[a, b]):
            perm[gpus[b][j]] = gpus[a][i]
    # Keep the renaming only if it preserves every link (explicit topologies may not be symmetric).
    if not (np.array_equal(cluster.bandwidth[np.ix_(perm, perm)], cluster.bandwidth)
            and np.array_equal(cluster.latency[np.ix_(perm, perm)], cluster.latency)
            and np.array_equal(node[perm] == node[perm][:, None], node == node[:, None])):
        return np.arange(g)
    return perm


def relabel(plan: Plan, current: Plan) -> Plan:
    """``plan`` with its GPUs renamed (within the topology's symmetry) and slots ordered so that as few
    slots as possible hold another expert than in ``current``. The placement is the same up to names:
    per GPU, the same groups of experts; its metrics stay as computed (under the same dispatch rule
    they differ only through which GPU each sequence starts on)."""
    _check_same_shape(current, plan)
    g, spg = plan.num_gpus, plan.slots_per_gpu
    rows, perms = [], []
    for rn, ro in zip(plan.physical_to_logical_map, current.physical_to_logical_map):
        # Each MoE layer's ranks are named independently: a rank holds one set of experts per layer.
        perm = _gpu_permutation(rn[None], ro[None], plan.cluster, plan.num_experts)
        perms.append(perm.tolist())
        rows.append(_align_slots(rn.reshape(g, spg)[perm].reshape(-1), ro, g))
    policy = dict(plan.policy)
    policy["relabelled"] = {"to_match": "current plan", "gpu_permutation_per_layer": perms}
    return Plan(np.stack(rows), plan.spec, metrics=dict(plan.metrics), policy=policy, notes=list(plan.notes))
