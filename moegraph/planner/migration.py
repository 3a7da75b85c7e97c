"""What changes between two plans, and a plan renamed to change least.

    migration(current_plan, new_plan) -> Migration        # which slots change, from where, bytes, time
    relabel(plan, current_plan, traces=None) -> Plan      # any plan, matched to where weights are

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

With hosts, the renamings that preserve the topology are few (host swaps x GPU permutations inside
hosts), so given the traffic the plan is for (``traces``) ``relabel`` also tries renamings that
regroup the plan's GPUs into other hosts (every grouping of up to MAX_GROUPINGS, and the plain GPU
to GPU assignment), such that the plan does not get worse on that traffic: no layer's max/mean of the
dispatch rule's expected GPU loads rises, and the expected remote host copies per token
(``exact.ExactCopies``) summed over the layers do not rise (every GPU keeps its experts, so the remote
GPU copies cannot change). The copies are judged for the plan, not per layer, because that is what
the plan is scored by (the mean over its layers): a layer whose regrouping adds a few host copies
may take it where other layers' regroupings save more. Per layer the candidates are scored most
shared experts first, down to the first that adds no host copies; one candidate per layer is then
chosen by an exact dynamic program (most experts kept, copies summed over the layers not rising).
That is honest for any plan: the renamed plan is at least as good as the plan on what it was made
for, whatever that was. A plan that places by host (moegraph's) seldom passes; one that does not (the
load-only packing, whose grouping into hosts is an accident of its packing order) often does. Both are
judged with the traffic's tokens starting on every GPU alike (``_judge``): a renaming moves no token, and
which GPU a sequence starts on is not the plan's. The re-plan's report scores each sequence from the GPU
it started on, so there a renamed plan can come out slightly better or worse than the plan it renames.

Legend: E experts, G GPUs, N hosts, S slots of one layer, L MoE layers.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PlanFileError, describe
from ..spec import MoESpec
from ..summary import summarize
from ..topology import Cluster
from ..traces import traces_for_spec
from .cost import cost_matrix, link_time_us
from .exact import ExactCopies
from .planfile import Plan
from .search import rule_loads

if TYPE_CHECKING:
    from ..traces import TraceSet

__all__ = ["Migration", "expert_bytes", "host_copy_weight", "migration", "relabel"]


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
    and the bytes and predicted time of moving them (every layer at once). Both plans must be of one spec."""
    _check_plans(current, new)
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


def require_plan(name: str, value: Any) -> None:
    """Refuse (PlanFileError) an argument ``name`` that is not a Plan."""
    if not isinstance(value, Plan):
        raise PlanFileError(f"{name} must be a moegraph Plan (read a plan file with Plan.load), got {describe(value)}")


def _check_plans(current: Any, new: Any, new_name: str = "new_plan") -> None:
    """Refuse what is not a pair of plans of one spec, model and cluster (PlanFileError)."""
    require_plan("current", current)
    require_plan(new_name, new)
    _check_same_shape(current, new)
    if current.spec_hash != new.spec_hash:
        shown = current.spec.differences_shown(new.spec)
        raise PlanFileError(
            f"the plans were made for different specs ({current.spec.name!r}, hash {current.spec.short_hash}; "
            f"{new.spec.name!r}, hash {new.spec.short_hash}), which differ in {shown}: a migration is between plans "
            "of one spec; re-plan with --from CURRENT_PLAN (replan(None, current, window)) for its spec"
        )


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
    old, new = row_old.reshape(g, -1), row_new.reshape(g, -1)  # [G, slots per GPU]
    keep = (old[:, :, None] == new[:, None, :]).any(axis=-1)  # old expert still on its GPU
    arrived = ~(new[:, :, None] == old[:, None, :]).any(axis=-1)
    fresh = np.sort(np.where(arrived, new, np.iinfo(new.dtype).max), axis=1)  # arrivals first, ascending
    nth = np.maximum(np.cumsum(~keep, axis=1) - 1, 0)  # a freed slot takes the next arrival
    return np.where(keep, old, np.take_along_axis(fresh, nth, axis=1)).reshape(row_new.shape)


def _overlap(new_rows: np.ndarray, old_rows: np.ndarray, g: int, e: int) -> np.ndarray:
    """[G, G] experts (over the layers given) that the new plan's GPU a shares with the current plan's GPU b.

    new_rows, old_rows: [L, S] rows of the new and the current plan (the layers scored together).
    """
    overlap = np.zeros((g, g))
    for rn, ro in zip(new_rows, old_rows):
        overlap += _holds(rn, g, e).astype(np.float64) @ _holds(ro, g, e).T.astype(np.float64)
    return overlap


def _max_assignment(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the assignment with the largest total ``score`` [n, m]."""
    # Imported here: scipy.optimize takes longer to import than the rest of the planner together, and
    # only relabelling needs it.
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(score, maximize=True)


def _match_groups(overlap: np.ndarray, new_groups: list[np.ndarray], hosts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The renaming that sends each group of the new plan's GPUs onto one host, maximising the shared experts.

    Groups and hosts are matched by a linear assignment on the best matching of their GPUs (groups of
    another size never match), then the GPUs of each matched pair. Returns (perm [G]: GPU x of the
    renamed plan holds what the new plan's GPU perm[x] holds, experts kept).
    """
    n = len(hosts)
    score = np.full((n, n), -1e18)
    inner: dict[tuple[int, int], np.ndarray] = {}
    for a in range(n):
        for b in range(n):
            if len(new_groups[a]) != len(hosts[b]):
                continue
            sub = overlap[np.ix_(new_groups[a], hosts[b])]
            r, c = _max_assignment(sub)
            score[a, b] = sub[r, c].sum()
            inner[a, b] = c[np.argsort(r)]  # inner[a, b][i]: local index in host b for group a's GPU i
    hr, hc = _max_assignment(score)
    perm = np.arange(overlap.shape[0])
    for a, b in zip(hr, hc):
        for i, j in enumerate(inner[a, b]):
            perm[hosts[b][j]] = new_groups[a][i]
    return perm, float(score[hr, hc].sum())


def _renamings(new_rows: np.ndarray, old_rows: np.ndarray, cluster: Cluster, e: int,
               judge: Callable[[np.ndarray], float | None] | None = None) -> list[tuple[int, float, np.ndarray]]:
    """Candidate renamings of one layer's GPUs (see ``relabel``): [(experts kept more than the first, change
    of the expected host copies, perm [G])], perm[x] = the new plan's GPU whose experts GPU x takes.

    The first is the best renaming within the topology's symmetry (change 0). With ``judge`` (the change
    of expected host copies a renaming that regroups GPUs into other hosts makes, or None where it raises
    the balance), also those regroupings, most shared experts first, down to the first that does not add
    host copies (any below it keep fewer experts and the plan-wide choice never needs them).

    new_rows, old_rows: [L, S] rows of the new and the current plan (the layers scored together).
    """
    g = cluster.num_gpus
    overlap = _overlap(new_rows, old_rows, g, e)
    node = cluster.node_of_gpu
    hosts = [np.flatnonzero(node == m) for m in range(cluster.num_nodes)]
    # Hosts onto hosts whole (a renaming within the topology's symmetry), GPUs inside matched hosts.
    perm, best = _match_groups(overlap, hosts, hosts)
    if not (np.array_equal(cluster.bandwidth[np.ix_(perm, perm)], cluster.bandwidth)
            and np.array_equal(cluster.latency[np.ix_(perm, perm)], cluster.latency)
            and np.array_equal(node[perm] == node[perm][:, None], node == node[:, None])):
        perm = np.arange(g)  # explicit topologies may not be symmetric: keep the names
        best = float(np.trace(overlap))
    out = [(0, 0.0, perm)]
    if judge is None or not _two_level(cluster):
        return out
    # Other groupings of the new plan's GPUs into hosts; the assignment of GPUs to GPUs regardless of hosts
    # is always a candidate. Shared experts are whole numbers: a candidate must share at least one more.
    r, c = _max_assignment(overlap)
    free = np.empty(g, np.int64)
    free[c] = r
    cands = [(-float(overlap[r, c].sum()), free.tolist())] if overlap[r, c].sum() > best + 0.5 else []
    for groups in _groupings(g, len(hosts[0]), len(hosts)):
        p, score = _match_groups(overlap, groups, hosts)
        if score > best + 0.5:
            cands.append((-score, p.tolist()))
    for neg, p in sorted(cands):
        delta = judge(np.asarray(p))
        if delta is not None:
            out.append((int(round(-neg - best)), delta, np.asarray(p)))
            if delta <= 0.0:
                break
    return out


def _choose(cands: list[list[tuple[int, float, np.ndarray]]]) -> list[np.ndarray]:
    """One renaming per layer: the most experts kept over all layers such that the host copies, summed over
    the layers, do not rise (a multiple-choice knapsack, solved exactly by dynamic programming over the
    whole number of experts kept beyond each layer's first candidate)."""
    top = sum(max(k for k, _, _ in c) for c in cands)
    f = np.full(top + 1, np.inf)  # f[k]: least summed change of host copies keeping k more experts
    f[0] = 0.0
    picks = []
    for c in cands:
        nf = np.full(top + 1, np.inf)
        pick = np.zeros(top + 1, np.int64)
        for i, (k, d, _) in enumerate(c):
            shifted = np.full(top + 1, np.inf)
            shifted[k:] = f[: top + 1 - k] + d
            better = shifted < nf - 1e-15
            nf[better], pick[better] = shifted[better], i
        f = nf
        picks.append(pick)
    k = int(np.flatnonzero(f <= 1e-9)[-1])  # the first candidates alone (k = 0) change nothing
    out = []
    for c, pick in zip(reversed(cands), reversed(picks)):
        i = int(pick[k])
        out.append(c[i][2])
        k -= c[i][0]
    return out[::-1]


#: most groupings of the GPUs into hosts ``relabel`` tries; beyond (large clusters), only the grouping of
#: the assignment of GPUs to GPUs that shares most experts, regardless of hosts
MAX_GROUPINGS = 10_000


def _two_level(cluster: Cluster) -> bool:
    """Whether links depend only on whether two GPUs share a host (equal hosts): then a renaming that
    regroups GPUs changes only which experts share a host, which ``relabel``'s judge can price."""
    node = cluster.node_of_gpu
    sizes = np.bincount(node)
    if cluster.num_nodes < 2 or sizes.min() != sizes.max():
        return False
    same = node[:, None] == node[None, :]
    off = ~np.eye(len(node), dtype=bool)
    return all(len(np.unique(m[same & off])) <= 1 and len(np.unique(m[~same])) <= 1
               for m in (cluster.bandwidth, cluster.latency))


def _groupings(g: int, size: int, n: int) -> Iterator[list[np.ndarray]]:
    """Every partition of GPUs 0..g-1 into n groups of ``size`` (each group led by its lowest GPU), if there
    are at most MAX_GROUPINGS of them; else none (the caller's unrestricted candidate stands in)."""
    count = math.factorial(g) // (math.factorial(size) ** n * math.factorial(n))
    if count > MAX_GROUPINGS:
        return

    def rec(rest: tuple[int, ...]) -> Iterator[list[tuple[int, ...]]]:
        if not rest:
            yield []
            return
        head, tail = rest[0], rest[1:]
        for others in itertools.combinations(tail, size - 1):
            left = tuple(x for x in tail if x not in others)
            for more in rec(left):
                yield [(head, *others), *more]

    for groups in rec(tuple(range(g))):
        yield [np.array(x) for x in groups]


def host_copy_weight(cluster: Cluster) -> float:
    """Extra cost of a remote host copy over a remote GPU copy, in fastest-link copies (``cost_matrix``): a
    token sent to another host crosses one inter-host link (mean relative cost c) to its landing GPU in
    place of one intra-host copy, so c - 1 (its forwards inside that host count as GPU copies)."""
    node = cluster.node_of_gpu
    inter = node[:, None] != node[None, :]
    return float(cost_matrix(cluster)[inter].mean()) - 1.0 if inter.any() else 0.0


def _judge(plan: Plan, layer: int, traces: TraceSet) -> Callable[[np.ndarray], float | None]:
    """The change of the expected remote host copies per token (``exact.ExactCopies``) that renaming one
    layer's GPUs by perm makes to ``plan`` on ``traces``, or None where it raises the max/mean of the
    dispatch rule's expected GPU loads; tokens starting on every GPU equally (a renaming moves no token:
    which GPU a sequence starts on is not the plan's).

    A renaming keeps every GPU's experts, so the expected remote GPU copies stay as they are; only the
    host copies can change, so the copies are compared at host level (hosts as the locations).
    """
    row = plan.physical_to_logical_map[layer]
    cl, e = plan.cluster, plan.num_experts
    gpu_r = np.arange(len(row)) // plan.slots_per_gpu

    @functools.cache
    def scorers() -> tuple[Callable[[np.ndarray], float], Callable[[np.ndarray], float], tuple[float, float]]:
        # Built on the first call: most layers of a plan that places by host have no candidate to judge.
        topk = np.asarray(traces.topk[layer], np.int64)
        hosts = ExactCopies(topk, np.full(len(topk), 1.0 / max(len(topk), 1)), row, np.zeros(cl.num_nodes, np.int64))
        cnt = np.broadcast_to(np.bincount(topk.ravel(), minlength=e) / cl.num_gpus, (1, cl.num_gpus, e))

        def balance(gpu_R: np.ndarray) -> float:
            load = rule_loads(gpu_R, row, cnt, cl.node_of_gpu)[0]
            return float(load.max() / max(load.mean(), 1e-12))

        def copies(gpu_R: np.ndarray) -> float:
            return hosts.value(cl.node_of_gpu[gpu_R])

        return balance, copies, (balance(gpu_r), copies(gpu_r))

    def judge(perm: np.ndarray) -> float | None:
        balance, copies, (bal0, cop0) = scorers()
        gpu_R = np.argsort(perm)[gpu_r]
        if balance(gpu_R) > bal0 + 1e-9 * max(bal0, 1.0):
            return None
        d = copies(gpu_R) - cop0
        return 0.0 if abs(d) <= 1e-12 * max(abs(cop0), 1.0) else d

    return judge


def relabel(plan: Plan, current: Plan, traces: TraceSet | None = None) -> Plan:
    """``plan`` with its GPUs renamed and slots ordered so that as few slots as possible hold another expert
    than in ``current``. Per GPU the same groups of experts.

    Without ``traces`` only renamings within the topology's symmetry: the same placement up to names
    (its metrics stay as computed; under the same dispatch rule they differ only through which GPU
    each sequence starts on). With ``traces`` (token traces, e.g. the window ``plan`` was made from)
    and a two-level cluster, a renaming may also regroup the GPUs into hosts where that does not make
    the plan worse on them (no layer's expected balance rises, nor the expected host copies summed over
    the layers: ``_judge``, ``_choose``): with hosts, the renamings that preserve the topology are few
    (host swaps x GPU permutations inside hosts), while a plan that does not place by host (the
    load-only packing) is indifferent to its grouping.
    """
    _check_plans(current, plan, "plan")
    if traces is not None:  # checked against the spec where it enters, as the re-plan checks its window
        traces = traces_for_spec(traces, plan.spec)
    g, spg = plan.num_gpus, plan.slots_per_gpu
    regroup = traces is not None and not traces.load_only and _two_level(plan.cluster)
    cands = []
    for layer, (rn, ro) in enumerate(zip(plan.physical_to_logical_map, current.physical_to_logical_map)):
        # Each MoE layer's ranks are named independently: a rank holds one set of experts per layer.
        judge = _judge(plan, layer, traces) if regroup else None
        cands.append(_renamings(rn[None], ro[None], plan.cluster, plan.num_experts, judge))
    rows, perms = [], []
    for perm, rn, ro in zip(_choose(cands), plan.physical_to_logical_map, current.physical_to_logical_map):
        perms.append(perm.tolist())
        rows.append(_align_slots(rn.reshape(g, spg)[perm].reshape(-1), ro, g))
    policy = dict(plan.policy)
    policy["relabelled"] = {"to_match": "current plan", "gpu_permutation_per_layer": perms}
    return Plan(np.stack(rows), plan.spec, metrics=dict(plan.metrics), policy=policy, notes=list(plan.notes))
