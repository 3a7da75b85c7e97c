"""Re-planning while running: follow drifting traffic, move few expert weights.

    replan(spec, current_plan, window) -> Plan            # warm-started, moves priced
    relabel(plan, current_plan) -> Plan                   # any plan, matched to where weights are
    migration(current_plan, new_plan) -> Migration        # which slots change, from where, bytes, time

Why. A plan is fit once and then meets traffic it never saw: on another task the per-expert loads
hardly transfer, so every static plan ends far from balanced. Re-planning from scratch on a recent
window of traffic (what serving engines do periodically, by load alone) fixes the balance but
changes almost every slot, and every changed slot is an expert's weights crossing the cluster. Here
the current placement is the starting point and a changed slot is a cost, priced like the
all-to-all: the expert's bytes over the link from the nearest GPU that holds it now (relative cost
``1 / bandwidth``, 1 for the fastest link), traded against balance and the predicted dispatch +
combine cost on the new window.

Algorithm, per MoE layer (GPU sets, not slot positions: a slot keeps its weights whenever its GPU
kept its expert; ``_align_slots`` puts kept experts back into their old slots):

1. Balance repair. While the most loaded GPU exceeds ``max_imbalance`` x the mean, under the
   dispatch rule's exact expected loads on the window (own GPU, own host, any; ties split evenly):
   among the swaps of an item on that GPU with an item elsewhere, and the re-assignments of a
   replica of a replicated expert elsewhere to a hot expert of that GPU (a redundant slot follows
   the load), take the change that lowers the peak the most per unit of move cost (a change that
   undoes an earlier move is free). Greedy and priced, so the few changes that matter come first.
2. Communication. Swaps that lower the expected dispatch + combine cost on the window (the pairwise
   co-activation cut of ``search``, weighted by the topology's per-copy cost) by more than they cost
   to move, the saving counted over ``horizon_tokens`` tokens (the traffic the new plan is expected
   to serve before the next re-plan), keeping every GPU within the balance reached in step 1.
3. Budget. ``max_moves`` / ``max_move_bytes`` cap the slots / bytes moved over all layers: the layers
   are repaired in turn, worst balance first, each change admitted only while the budget lasts.

Relabelling (``relabel``): GPUs of the same shape are interchangeable, so any plan (from scratch,
load-only or not) can be renamed so that its GPUs hold as many of the experts they already hold as
possible: a linear assignment between new and current GPUs (``scipy.optimize.linear_sum_assignment``)
on the number of experts they share, first between hosts (each pair of hosts scored by the best
matching of their GPUs), then between the GPUs of each matched pair, kept only when the renaming
preserves every link's bandwidth and latency. Slots inside a GPU follow (``_align_slots``).

Everything is deterministic (stable tie-breaks by index; ``seed`` is recorded for the policy and
used by nothing random here).

Legend: E experts, G GPUs, N hosts, S slots, R items (slots of one layer), T tokens, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import PlanFileError, PlanInfeasible, TraceError
from ..spec import MoESpec
from ..summary import summarize
from ..topology import Cluster
from ..traces import TraceSet, coactivation, load_traces
from .cost import _DTYPE_BYTES, link_time_us, token_bytes
from .dispatch import source_gpus
from .planfile import Plan
from .search import rule_contrib

__all__ = [
    "DEFAULT_HORIZON_TOKENS",
    "WINDOW_MARGIN",
    "Migration",
    "expert_bytes",
    "migration",
    "relabel",
    "replan",
    "replan_report",
    "REPORT_PLANS",
]

#: tokens over which a change's dispatch + combine saving is counted against its move cost, by
#: default. The saving is measured on the pairwise co-activation cut, which counts every split pair
#: of a token's experts (up to K(K-1)/2 per token) where the wire carries one copy per remote GPU, so
#: the figure is a calibration rather than a forecast of tokens served: on the bundled ESFT traces a
#: re-plan after a task switch then moves about 15% of the slots and keeps about 13-15% fewer remote
#: copies than a load-only re-plan (``benchmarks/replan_bench.py``); larger values buy fewer remote
#: copies with more moves.
DEFAULT_HORIZON_TOKENS = 10_000

#: the re-plan balances the window to the spec's ``max_imbalance`` minus this margin by default: the
#: window is a sample of the traffic to come, and on traffic it was not fit to a plan loses a few
#: hundredths of balance (a load-only re-plan as well); fitting a little tighter keeps the plan
#: within the spec's target on what follows, at a few more moves.
WINDOW_MARGIN = 0.02

_TOL = 1e-9
#: added to a change's move cost (in experts over the fastest link) when ranking repair steps, so
#: that free changes (undoing an earlier move) are preferred without dividing by zero
_FREE = 0.25


def expert_bytes(spec: MoESpec) -> int:
    """Bytes of one routed expert's weights (one slot) in the spec's dtype."""
    return summarize(spec).layer.routed_expert * _DTYPE_BYTES[spec.moe.dtype]


def _move_cost(cluster: Cluster) -> np.ndarray:
    """[G, G] relative cost of moving one expert between GPUs: the planner's per-copy cost (inverse
    bandwidth, 1 for the fastest link), so that weights and tokens are priced alike."""
    from . import _cost_matrix

    return _cost_matrix(cluster)


# ------------------------------------------------------------------------------------------------
# migration: what changes between two plans
# ------------------------------------------------------------------------------------------------


@dataclass
class Migration:
    """The weight transfers that turn one plan into another.

    ``moves``: [M, 5] int64 rows (layer, destination slot, expert, source GPU, source slot): the
    destination slot's new expert is copied from that slot of the current plan (the nearest GPU
    holding the expert, by link cost; ties: the source used least so far, then the lowest index).
    """

    moves: np.ndarray  # [M, 5]
    num_layers: int
    num_slots: int
    slots_per_gpu: int
    expert_bytes: int  # bytes of one slot's weights in the spec's dtype
    link_bytes: np.ndarray  # [G, G] bytes sent from GPU a to GPU b over all layers
    time_us: float  # predicted transfer time (alpha-beta model of ``cost``), all layers at once

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
    for layer in range(current.num_layers):
        old, cur = current.physical_to_logical_map[layer], new.physical_to_logical_map[layer]
        used = np.zeros(g, np.int64)  # transfers each source GPU serves in this layer
        for s in np.flatnonzero(old != cur):
            e, dst = int(cur[s]), int(s // spg)
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
                     time_us=link_time_us(link.astype(np.float64) * nbytes, current.cluster))


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
    """[G] perm: new GPU perm[x] takes the contents of the new plan's GPU x... (see ``relabel``).

    Returns perm with perm[old_gpu] = the new plan's GPU whose experts go there.
    """
    g = cluster.num_gpus
    # overlap[a, b]: experts (over all layers) that the new plan's GPU a shares with the current plan's GPU b.
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


# ------------------------------------------------------------------------------------------------
# the incremental re-plan
# ------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One layer's repair state: which GPU holds which expert, and the rule-exact loads on the window."""

    hold: np.ndarray  # [E, G] bool
    old: np.ndarray  # [E, G] bool: the current plan's
    cnt: np.ndarray  # [G, E] window tokens per (source GPU, expert)
    node: np.ndarray  # [G]
    price: np.ndarray  # [E, G] cost of bringing expert e to GPU g (0 where it is now), in fastest-link experts
    contrib: np.ndarray = field(init=False)  # [E, G] load each expert puts on each GPU

    def __post_init__(self) -> None:
        self.contrib = self.contrib_of(np.arange(self.hold.shape[0]), self.hold)

    def contrib_of(self, experts: np.ndarray, hold_XG: np.ndarray) -> np.ndarray:
        """[..., G] load of ``experts`` [...] under holdings ``hold_XG`` [..., G] (the dispatch rule)."""
        c = self.cnt[:, experts]  # [G, ...]
        c = np.moveaxis(c, 0, -1)[..., None, :]  # [..., 1, G]
        return rule_contrib(c, hold_XG, self.node)[..., 0, :]

    @property
    def load(self) -> np.ndarray:
        return self.contrib.sum(axis=0)

    def cost(self) -> float:
        """Move cost of the current holdings (experts over the fastest link)."""
        return float(self.price[self.hold].sum())

    def moves(self) -> int:
        return int((self.hold & ~self.old).sum())

    def set(self, e: int, hold_G: np.ndarray) -> None:
        self.hold[e] = hold_G
        self.contrib[e] = self.contrib_of(np.array(e), hold_G)


def _prices(old: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """[E, G] cost of bringing each expert to each GPU from its nearest current holder (0 if held there)."""
    big = np.where(old[:, :, None], cost[None, :, :], np.inf)  # [E, src G, dst G]
    p = big.min(axis=1)
    p[old] = 0.0
    return p


def _repair_balance(st: _Layer, target: float, budget: _Budget, coact: np.ndarray, cost: np.ndarray,
                    value_per_j: float, hot_gpus: int = 2, max_steps: int = 1000) -> int:
    """Step 1 of the module docstring; returns the changes made.

    Each step scores the changes that involve one of the ``hot_gpus`` most loaded GPUs by how much
    they lower the excess load (the sum over GPUs of the load above ``target`` x the mean; a peak
    alone would stall when two GPUs tie) per unit of cost, and applies the best one. The cost is the
    move cost plus the change of the co-activation cut (``_cut_rows``) valued over the horizon, so that
    among equally balancing swaps those that keep co-activated experts together win.
    """
    e, g = st.hold.shape
    steps = 0
    for _ in range(max_steps):
        load = st.load
        cap = target * max(load.mean(), 1e-12)
        excess = float(np.maximum(load - cap, 0.0).sum())
        if excess <= _TOL:
            return steps
        hot = [int(x) for x in np.argsort(-load, kind="stable")[:hot_gpus] if load[x] > cap + _TOL]
        it_e, it_g = np.nonzero(st.hold)  # every item (expert, GPU)
        reps = st.hold.sum(axis=1)
        a_ee, f_eg = _cut_rows(st.hold, coact, cost)
        best = None
        for h in hot:
            on_h = np.flatnonzero(st.hold[:, h])
            sel = it_g != h
            b_e, b_g = it_e[sel], it_g[sel]
            # (a) swaps: a (on h) goes to GPU y = b_g, b comes to h.
            hold_b = st.hold[b_e].copy()
            hold_b[np.arange(len(b_e)), b_g] = False
            hold_b[:, h] = True
            delta_b = st.contrib_of(b_e, hold_b) - st.contrib[b_e]  # [Nb, G]
            for a in on_h:
                hold_a = np.repeat(st.hold[a][None], g, axis=0)  # [destination, G]
                hold_a[:, h] = False
                hold_a[np.arange(g), np.arange(g)] = True
                delta_a = st.contrib_of(np.full(g, a), hold_a) - st.contrib[a]  # [G, G]
                ok = ~st.hold[b_e, h] & ~st.hold[a, b_g] & (b_e != a)
                dm = (~st.old[a, b_g]).astype(int) + (~st.old[b_e, h]) - (~st.old[a, h]) - (~st.old[b_e, b_g])
                dp = st.price[a, b_g] + st.price[b_e, h] - st.price[a, h] - st.price[b_e, b_g]
                dj = f_eg[a, b_g] - f_eg[a, h] + f_eg[b_e, h] - f_eg[b_e, b_g] + 2.0 * a_ee[a, b_e] * cost[h, b_g]
                # Comm damage costs (in units of the slowest link, so that hosts far apart do not make every
                # balancing swap look expensive); comm gains do not pay here (step 2 takes them).
                dp = np.maximum(dp, 0.0) + value_per_j * np.maximum(dj, 0.0) / cost.max()
                best = _better(best, load[None] + delta_a[b_g] + delta_b, ok, cap, excess, dm, dp, budget,
                               ("swap", int(a), h), b_e, b_g)
                # (b) a replica of a replicated expert b (on y) becomes one of a: a redundant slot follows the load.
                rep = (reps[b_e] > 1) & ~st.hold[a, b_g] & (b_e != a)
                if rep.any():
                    r_e, r_g = b_e[rep], b_g[rep]
                    hold_a2 = np.repeat(st.hold[a][None], len(r_e), axis=0)
                    hold_a2[np.arange(len(r_e)), r_g] = True
                    hold_b2 = st.hold[r_e].copy()
                    hold_b2[np.arange(len(r_e)), r_g] = False
                    new = (load[None] + st.contrib_of(np.full(len(r_e), a), hold_a2) - st.contrib[a]
                           + st.contrib_of(r_e, hold_b2) - st.contrib[r_e])
                    dm = (~st.old[a, r_g]).astype(int) - (~st.old[r_e, r_g])
                    dp = np.maximum(st.price[a, r_g] - st.price[r_e, r_g], 0.0) + value_per_j * np.maximum(
                        (f_eg[a, r_g] - f_eg[r_e, r_g]) / 2.0, 0.0) / cost.max()
                    best = _better(best, new, np.ones(len(r_e), bool), cap, excess, dm, dp, budget,
                                   ("replica", int(a), h), r_e, r_g)
        if best is None:
            return steps
        _, _, dm, act = best
        _apply(st, act)
        budget.spend(dm)
        steps += 1
    return steps


def _cut_rows(hold_EG: np.ndarray, coact: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The co-activation cut of ``search`` at expert level: (A [E, E] = coact / (r_a r_b), F [E, G] = the cut
    of one replica of expert e if it sat on GPU g, against every replica where it is now)."""
    r = np.maximum(hold_EG.sum(axis=1), 1).astype(np.float64)
    a_ee = coact / np.outer(r, r)
    return a_ee, (a_ee @ hold_EG.astype(np.float64)) @ cost.T


def _better(best, new_NG, ok_N, cap, excess, dm_N, dp_N, budget, head, b_e, b_g):
    """Fold candidates [N] into ``best``: the largest drop of the excess load per unit of move cost, then the
    lowest resulting peak; only changes the budget allows and that lower the excess."""
    drop = excess - np.maximum(new_NG - cap, 0.0).sum(axis=1)
    ok = ok_N & (drop > 1e-6 * max(excess, 1.0)) & budget.allows(dm_N)
    if not ok.any():
        return best
    eff = drop / (np.maximum(dp_N, 0.0) + _FREE)
    peak = new_NG.max(axis=1)
    idx = np.flatnonzero(ok)
    k = idx[np.lexsort((idx, peak[idx], -eff[idx]))[0]]
    cand = (-float(eff[k]), float(peak[k]), int(dm_N[k]), (head[0], head[1], head[2], int(b_e[k]), int(b_g[k])))
    if best is None or cand[:2] < best[:2]:
        return cand
    return best


def _dmoves(st: _Layer, act) -> int:
    """Change in slots moved (expert held where the current plan does not hold it) an action makes."""
    kind, a, h, b, y = act
    if kind == "swap":
        return int(~st.old[a, y]) + int(~st.old[b, h]) - int(~st.old[a, h]) - int(~st.old[b, y])
    return int(~st.old[a, y]) - int(~st.old[b, y])


def _apply(st: _Layer, act) -> None:
    kind, a, h, b, y = act
    ha, hb = st.hold[a].copy(), st.hold[b].copy()
    if kind == "swap":
        ha[h], ha[y], hb[y], hb[h] = False, True, False, True
    else:
        ha[y], hb[y] = True, False
    st.set(a, ha)
    st.set(b, hb)


@dataclass
class _Budget:
    """Slots still allowed to move (None: no limit); a byte budget is counted in whole experts."""

    moves: float | None

    def allows(self, dmoves: Any) -> Any:
        dm = np.asarray(dmoves)
        return (dm <= 0) if self.moves is not None and self.moves < 1 else (
            np.ones(dm.shape, bool) if self.moves is None else dm <= self.moves + _TOL)

    def spend(self, dmoves: int) -> None:
        if self.moves is not None:
            self.moves -= dmoves


def _improve_comm(st: _Layer, coact: np.ndarray, cost: np.ndarray, value_per_j: float, cap: float,
                  budget: _Budget, max_steps: int = 64) -> int:
    """Step 2 of the module docstring: priced swaps that lower the co-activation cut; returns swaps made."""
    e, g = st.hold.shape
    steps = 0
    for _ in range(max_steps):
        it_e, it_g = np.nonzero(st.hold)  # items (expert, gpu), one per slot
        r = st.hold.sum(axis=1)[it_e].astype(np.float64)
        a_rr = coact[np.ix_(it_e, it_e)] / np.outer(r, r)
        np.fill_diagonal(a_rr, 0.0)
        onehot = np.zeros((len(it_e), g))
        onehot[np.arange(len(it_e)), it_g] = 1.0
        f = (a_rr @ onehot) @ cost.T  # [R, G] cut of item i if it sat on GPU x
        fs = f[np.arange(len(it_e)), it_g]
        dj = f[:, it_g] - fs[:, None] + f[:, it_g].T - fs[None, :] + 2.0 * a_rr * cost[np.ix_(it_g, it_g)]
        # Moves: i goes to gpu_j, j goes to gpu_i.
        dprice = (st.price[it_e[:, None], it_g[None, :]] + st.price[it_e[None, :], it_g[:, None]]
                  - st.price[it_e, it_g][:, None] - st.price[it_e, it_g][None, :])
        net = dj * value_per_j + dprice  # lower is better (negative: worth it)
        valid = it_g[:, None] != it_g[None, :]
        valid &= ~st.hold[it_e[:, None], it_g[None, :]] & ~st.hold[it_e[None, :], it_g[:, None]]
        valid &= np.triu(np.ones_like(valid), 1).astype(bool)
        cand = np.argwhere(valid & (net < -_TOL))
        if not len(cand):
            return steps
        order = np.lexsort((cand[:, 1], cand[:, 0], net[cand[:, 0], cand[:, 1]]))
        load = st.load
        limit = max(cap * load.mean(), load.max()) + _TOL
        done = False
        for k in order[:64]:
            i, j = (int(x) for x in cand[k])
            act = ("swap", int(it_e[i]), int(it_g[i]), int(it_e[j]), int(it_g[j]))
            dm = _dmoves(st, act)
            if not budget.allows(dm):
                continue
            before = (st.hold[act[1]].copy(), st.hold[act[3]].copy())
            _apply(st, act)
            if st.load.max() <= limit:
                budget.spend(dm)
                steps += 1
                done = True
                break
            st.set(act[1], before[0])
            st.set(act[3], before[1])
        if not done:
            return steps
    return steps


def _same_model(spec: MoESpec, current: Plan) -> None:
    a, b = spec, current.spec
    if (a.moe.model_dump() != b.moe.model_dump() or a.model.model_dump() != b.model.model_dump()):
        raise PlanFileError(
            f"the current plan was made for spec {b.name!r} ({b.model.num_moe_layers} MoE layers, "
            f"{b.moe.experts.num_experts} experts) but the given spec {a.name!r} describes another model "
            f"({a.model.num_moe_layers} MoE layers, {a.moe.experts.num_experts} experts); pass the spec the plan "
            "was made for"
        )


def _window(spec: MoESpec, traces: Any) -> TraceSet:
    ts = traces if isinstance(traces, TraceSet) else (
        TraceSet.concat(list(traces)) if isinstance(traces, (list, tuple)) and traces
        and all(isinstance(t, TraceSet) for t in traces) else load_traces(traces, spec=spec))
    ts.check_spec(spec)
    ts = ts.with_experts(spec.moe.experts.num_experts)
    if ts.load_only:
        raise TraceError(f"{ts.name}: a re-plan needs token traces (top-k ids per token), not counts only; record "
                         "the window with layer.start_recording() or moegraph.distributed.gather_trace")
    if ts.num_tokens == 0:
        raise TraceError(f"{ts.name}: the traffic window has no tokens; record some traffic before re-planning "
                         "(or keep the current plan)")
    return ts


def replan(
    spec: MoESpec | None,
    current_plan: Plan,
    traces: Any,
    *,
    max_moves: int | None = None,
    max_move_bytes: float | None = None,
    seed: int | None = None,
    max_imbalance: float | None = None,
    horizon_tokens: float | None = None,
) -> Plan:
    """A new plan for the traffic ``traces`` (a window), warm-started from ``current_plan``, moves priced.

    spec: the model's spec (checked against the plan's); None: the plan's own. The cluster and slot
        count are the current plan's.
    traces: a TraceSet (or what ``load_traces`` accepts) of the recent traffic, with tokens.
    max_moves / max_move_bytes: budget of slots / bytes moved over all layers (None: priced only).
    seed: recorded in the policy (the re-plan draws nothing random).
    max_imbalance: target max/mean GPU load on the window (default: the spec's placement.max_imbalance
        less WINDOW_MARGIN).
    horizon_tokens: tokens the new plan is expected to serve (default DEFAULT_HORIZON_TOKENS): a swap's
        dispatch + combine saving is counted over them against its move cost.

    The Plan's ``policy["migration"]`` holds what moves (``Migration.summary``).
    """
    if not isinstance(current_plan, Plan):
        raise PlanFileError(f"current_plan must be a moegraph Plan, got {type(current_plan).__name__}")
    if spec is not None:
        _same_model(spec, current_plan)
    spec = current_plan.spec
    for name, v in (("max_moves", max_moves), ("max_move_bytes", max_move_bytes)):
        if v is not None and not (v >= 0 and np.isfinite(v)):
            raise PlanInfeasible(f"{name} must be a finite number >= 0, got {v!r}")
    nbytes = expert_bytes(spec)
    if (max_moves is not None and max_moves < 1) or (max_move_bytes is not None and max_move_bytes < nbytes):
        got = f"max_moves={max_moves}" if max_moves is not None and max_moves < 1 else \
            f"max_move_bytes={max_move_bytes:g} ({max_move_bytes / 2**30:.4f} GiB)"
        raise PlanInfeasible(
            f"the move budget {got} allows no slot to move: one expert of {spec.name!r} weighs {nbytes:,} bytes "
            f"({nbytes / 2**30:.4f} GiB); the current plan stays. Allow at least 1 move (--max-moves 1) or "
            f"{nbytes / 2**30:.4f} GiB (--max-move-gib)"
        )
    ts = _window(spec, traces)
    imb = max(1.0, spec.placement.max_imbalance - WINDOW_MARGIN) if max_imbalance is None else float(max_imbalance)
    horizon = DEFAULT_HORIZON_TOKENS if horizon_tokens is None else float(horizon_tokens)
    cl = current_plan.cluster
    g, e, spg = cl.num_gpus, spec.moe.experts.num_experts, current_plan.slots_per_gpu
    cost = _move_cost(cl)
    src = source_gpus(ts, g)
    k = ts.top_k
    tb = token_bytes(spec)
    # A unit of J (one cost-weighted pair split, per token) over the horizon, dispatch + combine, in experts
    # moved over the fastest link.
    value_per_j = 2.0 * horizon * tb / nbytes
    limits = [x for x in (max_moves, None if max_move_bytes is None else max_move_bytes // nbytes) if x is not None]
    budget = _Budget(float(min(limits)) if limits else None)
    states = []
    for layer in range(current_plan.num_layers):
        ids = np.asarray(ts.topk[layer], np.int64)
        cnt = np.bincount(np.repeat(src, k) * e + ids.ravel(), minlength=g * e).reshape(g, e).astype(np.float64)
        old = _holds(current_plan.physical_to_logical_map[layer], g, e).T.copy()  # [E, G]
        states.append(_Layer(hold=old.copy(), old=old, cnt=cnt, node=cl.node_of_gpu, price=_prices(old, cost)))
    coacts = [coactivation(np.asarray(ts.topk[layer], np.int64), e) / max(ts.num_tokens, 1)
              for layer in range(current_plan.num_layers)]
    # Worst layers first, so that a budget goes where balance is worst.
    ratio = np.array([s.load.max() / max(s.load.mean(), 1e-12) for s in states])
    order = np.lexsort((np.arange(len(states)), -ratio))
    repairs = swaps = 0
    for layer in order:
        repairs += _repair_balance(states[layer], imb, budget, coacts[layer], cost, value_per_j)
    for layer in order:
        st = states[layer]
        swaps += _improve_comm(st, coacts[layer], cost, value_per_j, imb, budget)
    rows = []
    for layer, st in enumerate(states):
        row = np.concatenate([np.flatnonzero(st.hold[:, gg]) for gg in range(g)])
        assert len(row) == g * spg, "internal: a GPU lost or gained a slot"
        rows.append(_align_slots(row, current_plan.physical_to_logical_map[layer], g))
    notes = [f"re-planned from the current plan ({current_plan.policy.get('name', 'unnamed')}) on {ts.name} "
             f"({ts.num_tokens} tokens)"]
    after = np.array([s.load.max() / max(s.load.mean(), 1e-12) for s in states])
    if (after > imb + 1e-6).any():
        why = "the move budget" if (max_moves is not None or max_move_bytes is not None) else "the allowed changes"
        notes.append(f"{int((after > imb + 1e-6).sum())} of {len(states)} layers stay above max/mean {imb:g} on the "
                     f"window (worst {after.max():.3f}) within {why}")
    policy = {
        "name": "incremental-replan",
        "why": "warm-started from the current plan: priced balance repair (dispatch rule's expected loads on the "
               "window), then priced co-activation swaps; moves cost their weight bytes over the topology's links",
        "seed": spec.placement.seed if seed is None else int(seed),
        "max_imbalance": imb,
        "horizon_tokens": horizon,
        "max_moves": max_moves,
        "max_move_bytes": max_move_bytes,
        "from_policy": current_plan.policy.get("name"),
        "traces": ts.name,
        "balance_changes": int(repairs),
        "comm_swaps": int(swaps),
    }
    p = Plan(np.stack(rows), spec, policy=policy, notes=notes)
    p.policy["migration"] = migration(current_plan, p).summary()
    return p


# ------------------------------------------------------------------------------------------------
# the report beside baselines
# ------------------------------------------------------------------------------------------------

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
    from . import baseline_plans
    from .cost import evaluate

    ts = _window(current.spec, traces)
    lo = baseline_plans(current.spec, ts)["load_only"]
    cands = {"keep": current, "load_only": lo, "load_only_relabelled": relabel(lo, current)}
    if full is not None:
        cands["full"] = relabel(full, current)
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
