"""The placement search: one MoE layer's replicas onto GPUs, minimising dispatch cost, robustly balanced.

Problem. Items are the replicas of the layer's experts (expert e has r_e >= 1 of them, sum r_e = S
slots). Assign every item to a GPU so that each GPU holds exactly S/G items and never two copies of
one expert, minimising the communication cost

    J = sum over item pairs (i, j) of  A[e_i, e_j] / (r_i r_j) * C[g_i, g_j]

where A is the co-activation graph (tokens that chose both experts, per token) and C the per-copy
cost between two GPUs from the topology (0 on one GPU, 1 inside a host, bandwidth ratio across
hosts), subject to

1. balance on the traffic seen: every GPU's load (replica load = expert load / r_e) stays within
   ``max_imbalance`` x the mean on the sources together (each weighing equally), and with several
   sources on each source alone no worse than in the load-only plan (or ``max_imbalance``);
2. balance on traffic not seen: a GPU's load variance across windows of 16 consecutive tokens,
   ``V_g = 1_g' Sigma 1_g``, stays within the largest ``V_g`` of the load-only plan; and its load
   under the uninformed prior (every expert equally loaded, so a replica weighs 1/r_e) no worse than
   the load-only plan's most loaded GPU, with those prior loads no more spread over the GPUs (sum of
   squares) than in the load-only plan.

Then, in layers of at most EXACT_MAX_ITEMS items, the exact refinement (``exact``) swaps
unreplicated experts by the exact change of expected remote copies per token, under the same
constraints.

Why these choices.

- The pairwise cut is the classic proxy of "distinct GPUs per token" used by graph partitioning,
  and a good global guide: its gain matrix is cheap and smooth. The quadratic form with a topology
  cost matrix is a quadratic assignment problem; for 64..288 items a 2-opt swap local search with an
  [items, items] gain matrix (recomputed in numpy each step, several disjoint swaps applied per
  step; in layers of more than 128 items only the most promising items' rows) is fast. The proxy
  over-counts tokens whose experts share a GPU, so in small layers the exact refinement continues
  from its optimum on the quantity the wire carries. Seeded perturbation rounds (iterated local
  search: kick, descend, refine) escape poor local optima deterministically; with 8 rounds the
  search reaches the brute-force optimum on every tiny case the tests try. A round's result is kept
  only if it lowers the objective (the exact copies where refined, else J) *and* does not raise the
  GPUs' total variance: a stronger search otherwise spends the risk bound's slack on every GPU
  (worse balance on unseen traffic). The planner runs DEFAULT_ROUNDS of them in small layers
  (DEFAULT_ROUNDS_NO_REPLICAS where there are no redundant slots).
- Constraint 2 is what makes the plan hold up on other tasks. A plan that packs co-activated experts
  together also packs experts that are hot *together*: on a task where that group is popular its
  GPU overloads, while the load-only plan's per-expert loads do not transfer between tasks either.
  Load variation across short token windows of the
  planning traffic reveals which experts rise and fall together; bounding each GPU's variance by the
  load-only plan's worst GPU keeps the plan no more exposed than the baseline to a shift of topic,
  at a cost of some of the co-activation gain on the task planned for. Cross-layer affinity does not enter J:
  tokens return to their own GPU after every layer, so consecutive layers' placements do not
  interact under this dispatch (it is reported by ``trace stats``).
- The uninformed-prior balance in constraint 2 matters with replicas: per-expert loads barely
  transfer between tasks, so on unseen traffic a GPU's expected load is about its count of items
  weighted 1/r_e. The load-only packing spreads replicas one or two per GPU; a search free to trade
  a replica for an unreplicated expert ends up with GPUs of nine full experts beside GPUs of seven
  and two halves, which loses balance on held-out traffic. Bounding the most loaded GPU alone lets
  the search bring several GPUs up to it; the sum of squares bounds that too. With no redundant
  slots every item weighs 1 and it never binds.
- Replica counts follow the load-only rule (each redundant slot to the highest load per replica)
  unless ``LayerProblem.replicas`` gives others (the planner tries moving one replica in small
  layers: ``moegraph.planner.driver._move_replicas``); the dispatch rule's local-first choice makes
  a replica's real load depend on where tokens start, so a final repair step swaps items until the
  exact rule-based loads (``dispatch``) meet ``max_imbalance`` on the traffic seen, each time by the
  swap that meets it at the smallest rise of the exact expected copies (in small layers; replicated
  items priced by ``ExactCopies.swap_delta``), not by the most balancing one, which overshoots.
  Count-only traces (no source ranks) get the same repair with tokens starting on every GPU equally,
  the assumption the report scores them by: on one host that is the even split, on several it is not.

The measurements behind these choices are in ``benchmarks/results/planner_design.md``.

Everything is deterministic: stable tie-breaks (lowest index), perturbations from
``numpy.random.default_rng(seed)``.

Legend: E experts, R items (replicas), G GPUs, Sc trace sources (scenarios). In ``_State`` the
docstring's A is ``coact_RR``, C is ``cost_GG``, the window covariance is ``risk_RR`` (its diagonal
``risk_diag_R``), and ``coact_to_gpu_RG`` / ``risk_to_gpu_RG`` are their sums over each GPU's items.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .baselines import pack_balanced, replicate_by_load, rows_from_gpu_lists
from .exact import ExactCopies, refine

__all__ = ["LayerProblem", "LayerResult", "solve_layer", "rule_loads", "pair_cost"]

_TOL = 1e-9


@dataclass
class LayerProblem:
    """Inputs of one layer's search (see the module docstring)."""

    loads: np.ndarray  # [Sc, E] tokens per expert for each trace source, each scaled to mean 1
    coact: np.ndarray  # [E, E] co-activation per token (mean over sources); zeros for load-only traces
    risk: np.ndarray  # [E, E] covariance of expert load over token windows (normalised); zeros if unknown
    src_counts: np.ndarray | None  # [Sc, G, E] tokens per (source GPU, expert), for rule-exact loads; None
    # (count-only traces): every GPU starts loads / G of each expert
    cost: np.ndarray  # [G, G] per-copy cost between GPUs (0 on the diagonal)
    node_of_gpu: np.ndarray  # [G]
    num_slots: int
    max_imbalance: float
    robust: bool = True  # apply constraint 2
    risk_slack: float = 0.0  # constraint 2 allows the load-only plan's largest V_g times (1 + risk_slack)
    rounds: int = 8  # perturbation rounds of the iterated local search
    seed: int = 0
    replicas: np.ndarray | None = None  # [E] replica counts (default: the load-only rule); constraint 2 keeps
    # the bound of the load-only rule's packing
    topk: np.ndarray | None = None  # [T, K] experts each planning token chose (enables the exact refinement)
    token_weight: np.ndarray | None = None  # [T] weight of each token (sources weigh equally)
    exact: bool = True  # refine by exact expected copies (``exact``) after the pairwise descent
    host_weight: float = 1.0  # a remote host copy's weight relative to a remote GPU copy in the refinement


@dataclass
class LayerResult:
    row: np.ndarray  # [S] physical_to_logical row
    baseline_row: np.ndarray  # [S] the load-only placement (also the start point)
    objective: float  # J of the plan
    baseline_objective: float
    swaps: int
    repaired: int  # swaps made by the rule-exact balance repair
    replicas: np.ndarray  # [E] replica count of each expert
    refined: int = 0  # swaps made by the exact refinement


def pair_cost(coact_RR: np.ndarray, cost_GG: np.ndarray, gpu_R: np.ndarray) -> float:
    """J = sum over item pairs of coact * cost (coact_RR symmetric with zero diagonal)."""
    return float(0.5 * (coact_RR * cost_GG[gpu_R][:, gpu_R]).sum())


def rule_contrib(cnt_SG: np.ndarray, hold_G: np.ndarray, node_of_gpu: np.ndarray) -> np.ndarray:
    """[..., Sc, G] load one expert puts on each GPU under the dispatch rule.

    cnt_SG: [..., Sc, G] tokens choosing the expert per source GPU; hold_G: [..., G] which GPUs hold
    a replica (leading dimensions broadcast: many experts or placements at once). Tokens on a GPU
    with a replica stay there; else they split evenly over the replicas of their host; else evenly
    over all replicas (the round-robin by token index splits evenly in expectation).
    """
    onehot = (node_of_gpu[:, None] == np.arange(int(node_of_gpu.max()) + 1)[None, :]).astype(np.float64)  # [G, N]
    h = np.asarray(hold_G, np.float64)[..., None, :]  # [..., 1, G]
    per_host = (h @ onehot) @ onehot.T  # replicas in each GPU's host
    away = cnt_SG * (1.0 - h)  # tokens whose own GPU has no replica
    in_host = np.where(per_host > 0, away / np.maximum(per_host, 1.0), 0.0)
    spread = (in_host @ onehot) @ onehot.T
    far = np.where(per_host > 0, 0.0, away).sum(axis=-1, keepdims=True)
    return cnt_SG * h + spread * h + far * h / np.maximum(h.sum(axis=-1, keepdims=True), 1.0)


def rule_loads(gpu_R: np.ndarray, experts_R: np.ndarray, src_counts: np.ndarray, node_of_gpu: np.ndarray) -> np.ndarray:
    """[Sc, G] load per GPU under the dispatch rule (own GPU, own host, any; ties split evenly).

    gpu_R, experts_R: [R] GPU and expert of each item; src_counts: [Sc, G, E] tokens per (source, expert).
    """
    sc, g, e = src_counts.shape
    reps = np.bincount(experts_R, minlength=e)
    single = reps[experts_R] == 1
    total = src_counts.sum(axis=1)  # [Sc, E]
    # An expert with one replica takes all its tokens wherever they start.
    out = np.stack([np.bincount(gpu_R[single], weights=total[s, experts_R[single]], minlength=g) for s in range(sc)])
    out = out.astype(np.float64)
    hold = np.zeros((e, g), bool)
    hold[experts_R, gpu_R] = True
    for ex in np.flatnonzero(reps > 1):
        out += rule_contrib(src_counts[:, :, ex], hold[ex], node_of_gpu)
    return out


class _State:
    """Items on GPUs with the running sums the swap gains need."""

    def __init__(self, experts, gpu, w_SR, coact_RR, risk_RR, risk_diag, cost, num_experts):
        self.experts, self.gpu = experts, gpu.copy()
        self.w = w_SR  # [Sc, R] each item's load in each balance scenario
        self.coact_RR = coact_RR  # co-activation between items (per token, replicas' shares)
        self.risk_RR = risk_RR  # load covariance between items over token windows (diagonal excluded)
        self.risk_diag_R = risk_diag  # each item's own load variance
        self.cost_GG = cost  # per-copy cost between GPUs
        g = cost.shape[0]
        r = len(experts)
        p = np.zeros((r, g))
        p[np.arange(r), self.gpu] = 1.0
        self.coact_to_gpu_RG = coact_RR @ p  # co-activation of each item with each GPU's items
        self.risk_to_gpu_RG = risk_RR @ p  # covariance of each item with each GPU's items (self excluded)
        self.load = w_SR @ p  # [Sc, G]
        self.var = np.bincount(self.gpu, weights=self.risk_to_gpu_RG[np.arange(r), self.gpu] + risk_diag, minlength=g)
        self.hold = np.zeros((num_experts, g), bool)
        self.hold[experts, self.gpu] = True
        #: cap on the sum over GPUs of the squared load of the last balance scenario (the uninformed
        #: prior in robust plans): how unevenly the GPUs' expected loads on unseen traffic spread
        self.prior_sq_cap = np.inf

    def objective(self) -> float:
        return float(0.5 * (self.coact_to_gpu_RG @ self.cost_GG.T)[np.arange(len(self.gpu)), self.gpu].sum())

    def swap(self, i: int, j: int) -> None:
        a, b = self.gpu[i], self.gpu[j]
        s_ij = self.risk_RR[i, j]
        to_gpu, own = self.risk_to_gpu_RG, self.risk_diag_R
        self.var[a] += 2.0 * (to_gpu[j, a] - to_gpu[i, a] - s_ij) + own[j] - own[i]
        self.var[b] += 2.0 * (to_gpu[i, b] - to_gpu[j, b] - s_ij) + own[i] - own[j]
        for d, m in ((self.coact_to_gpu_RG, self.coact_RR), (self.risk_to_gpu_RG, self.risk_RR)):
            delta = m[:, j] - m[:, i]
            d[:, a] += delta
            d[:, b] -= delta
        dw = self.w[:, j] - self.w[:, i]
        self.load[:, a] += dw
        self.load[:, b] -= dw
        self.hold[self.experts[i], a] = self.hold[self.experts[j], b] = False
        self.hold[self.experts[i], b] = self.hold[self.experts[j], a] = True
        self.gpu[i], self.gpu[j] = b, a

    def candidates(self, cap_S: np.ndarray, cap_var: float, rows: np.ndarray | None = None,
                   below: float | None = None) -> np.ndarray:
        """[M, R] change of J for swapping item rows[m] with item j; +inf where the swap is not allowed.

        rows: the items to consider as the first of the pair (default all R items). below: only the
        swaps whose change is below this are wanted; every other entry is +inf too, and the constraints
        are checked on the wanted ones only (``allowed_pairs``: the same arithmetic, on a few pairs).
        """
        gpu, r = self.gpu, len(self.gpu)
        rows = np.arange(r) if rows is None else rows
        gr = gpu[rows]
        f = self.coact_to_gpu_RG @ self.cost_GG.T  # [R, G] cost of item i if it sat on GPU g
        fs = f[np.arange(r), gpu]
        coact, cost = self.coact_RR, self.cost_GG
        d_j = f[rows][:, gpu] - fs[rows, None] + f[:, gr].T - fs[None, :] + 2.0 * coact[rows] * cost[gr][:, gpu]
        if below is None:
            return np.where(self.allowed(cap_S, cap_var, rows), d_j, np.inf)
        mi, jj = np.nonzero(d_j < below)
        ok = self.allowed_pairs(cap_S, cap_var, rows[mi], jj)
        out = np.full_like(d_j, np.inf)
        out[mi[ok], jj[ok]] = d_j[mi[ok], jj[ok]]
        return out

    def allowed(self, cap_S: np.ndarray, cap_var: float, rows: np.ndarray | None = None) -> np.ndarray:
        """[M, R] whether swapping item rows[m] with item j keeps every constraint (see ``candidates``)."""
        rows = np.arange(len(self.gpu)) if rows is None else rows
        return self.allowed_pairs(cap_S, cap_var, rows[:, None], np.arange(len(self.gpu))[None, :])

    def allowed_pairs(self, cap_S: np.ndarray, cap_var: float, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Whether swapping item i with item j keeps every constraint, for arrays of items i and j (broadcast
        together: a few pairs, or every pair of ``allowed``). Constraints: the two GPUs differ and neither
        holds the other's expert already; each balance scenario's load on the two GPUs stays within the
        larger of its cap and their current loads; the prior spread (sum of squared loads) and the
        GPUs' load variances likewise."""
        gi, gj = self.gpu[i], self.gpu[j]
        ok = (gi != gj) & ~self.hold[self.experts[i], gj] & ~self.hold[self.experts[j], gi]
        for s in range(self.w.shape[0]):
            li, lj = self.load[s, gi], self.load[s, gj]
            dw = self.w[s][j] - self.w[s][i]
            lim = np.maximum(cap_S[s], np.maximum(li, lj)) + _TOL
            ok &= (li + dw <= lim) & (lj - dw <= lim)
        if self.prior_sq_cap < np.inf:
            # Sum of squares after the swap: the two GPUs' loads move by +dw and -dw.
            li, lj = self.load[-1, gi], self.load[-1, gj]
            dw = self.w[-1][j] - self.w[-1][i]
            sq = float(self.load[-1] @ self.load[-1])
            after = sq + 2.0 * dw * (li - lj + dw)
            ok &= after <= max(self.prior_sq_cap, sq) + _TOL
        if cap_var < np.inf:
            vi, vj = self.var[gi], self.var[gj]
            to_gpu, sd, risk = self.risk_to_gpu_RG, self.risk_diag_R, self.risk_RR
            own_i, own_j = to_gpu[i, gi], to_gpu[j, gj]
            va = vi - 2.0 * own_i - sd[i] + 2.0 * to_gpu[j, gi] - 2.0 * risk[i, j] + sd[j]
            vb = vj - 2.0 * own_j - sd[j] + 2.0 * to_gpu[i, gj] - 2.0 * risk[i, j] + sd[i]
            lim = np.maximum(cap_var, np.maximum(vi, vj)) + _TOL
            ok &= (va <= lim) & (vb <= lim)
        return ok

    def move_potential(self) -> np.ndarray:
        """[R] how much J would drop if each item alone moved to its best GPU (constraints ignored)."""
        f = self.coact_to_gpu_RG @ self.cost_GG.T
        return f[np.arange(len(self.gpu)), self.gpu] - f.min(axis=1)


#: layers of at most this many items get the exact refinement (``exact``) after the pairwise descent;
#: in larger ones (DeepSeek-V3 sized) refinement steps cost too much for the plan's time budget
EXACT_MAX_ITEMS = 128

#: items per step whose swaps are evaluated in large layers (all items when R <= 2 * this);
#: taken as the best ROWS_PER_STEP // G of every GPU
ROWS_PER_STEP = 64


#: swaps that lower J by less than this fraction of the load-only plan's J are not worth a step in
#: large layers (more than 2 * ROWS_PER_STEP items); small layers take every improving swap
MIN_GAIN = 1e-4


def _descend(st: _State, cap_S, cap_var, min_gain: float = 0.0, max_steps: int = 100000) -> int:
    """Greedy 2-opt: apply the best improving swaps (several on disjoint GPUs per step) until none is left.

    In large layers each step looks at the swaps of the ROWS_PER_STEP items with the largest move
    potential only, and at all items once before stopping.
    """
    swaps = 0
    g = st.cost_GG.shape[0]
    r = len(st.gpu)
    restrict = r > 2 * ROWS_PER_STEP
    full = not restrict
    for _ in range(max_steps):
        if full:
            rows = np.arange(r)
        else:
            # The items with the largest move potential, spread over GPUs so that one step can
            # apply swaps on many disjoint GPU pairs.
            pot = st.move_potential()
            per_gpu = max(1, ROWS_PER_STEP // g)
            by_gpu = np.lexsort((np.arange(r), -pot, st.gpu))  # by GPU, best potential first
            first = np.searchsorted(st.gpu[by_gpu], np.arange(g))
            rank = np.arange(r) - np.repeat(first, np.diff(np.r_[first, r]))
            rows = np.sort(by_gpu[rank < per_gpu])
        d = st.candidates(cap_S, cap_var, rows, below=-max(min_gain, _TOL))
        mi, jj = np.nonzero(d < -max(min_gain, _TOL))
        if len(mi) == 0:
            if full:
                break
            full = True  # nothing among the restricted rows: look at every item before stopping
            continue
        full = not restrict
        vals = d[mi, jj]
        order = np.lexsort((jj, rows[mi], vals))[: 8 * g]  # best first; ties by index
        used: set[int] = set()
        batch = []
        for k in order:
            i, j = int(rows[mi[k]]), int(jj[k])
            a, b = int(st.gpu[i]), int(st.gpu[j])
            if a in used or b in used:
                continue
            used.update((a, b))
            batch.append((i, j))
        before = st.objective()
        snapshot = _snapshot(st)
        for i, j in batch:
            st.swap(i, j)
        if len(batch) > 1 and st.objective() >= before - _TOL:
            # Swaps on disjoint GPUs interact through the pairs they share; if together they did
            # not help, keep only the single best one.
            _restore(st, snapshot)
            st.swap(*batch[0])
            batch = batch[:1]
        swaps += len(batch)
    return swaps


def _snapshot(st: _State):
    return (st.gpu.copy(), st.coact_to_gpu_RG.copy(), st.risk_to_gpu_RG.copy(), st.load.copy(), st.var.copy(),
            st.hold.copy())


def _restore(st: _State, snap) -> None:
    st.gpu, st.coact_to_gpu_RG, st.risk_to_gpu_RG, st.load, st.var, st.hold = (x.copy() for x in snap)


def solve_layer(p: LayerProblem) -> LayerResult:
    """Plan one layer: replicas by load, start from the load-only packing, then constrained local search."""
    sc, e = p.loads.shape
    g = p.cost.shape[0]
    spg = p.num_slots // g
    mean_load = p.loads.mean(axis=0)
    r = replicate_by_load(mean_load, p.num_slots, g)
    r_base = r
    if p.replicas is not None:
        r = np.asarray(p.replicas, np.int64)
    experts = np.repeat(np.arange(e), r)
    start = pack_balanced((mean_load / r)[experts], experts, g, spg)
    rr = np.outer(r[experts], r[experts]).astype(np.float64)
    a_rr = p.coact[experts][:, experts] / rr
    np.fill_diagonal(a_rr, 0.0)
    s_full = p.risk[experts][:, experts] / rr
    s_diag = np.diag(s_full).copy()
    s_rr = s_full.copy()
    np.fill_diagonal(s_rr, 0.0)
    # Balance scenarios: the sources together (each weighing equally) within max_imbalance; with
    # several sources each source alone no worse than in the load-only packing (or max_imbalance);
    # robust plans also the uninformed prior (every expert equally loaded) no worse than that packing.
    loads = p.loads if sc == 1 else np.concatenate([mean_load[None], p.loads])
    if p.robust:
        loads = np.concatenate([loads, np.ones((1, e))])
    w = (loads / r)[:, experts]  # [Sc', R] even-split load of each item
    st = _State(experts, start, w, a_rr, s_rr, s_diag, p.cost, e)
    base_obj = st.objective()
    start_ratio = st.load.max(axis=1) / np.maximum(st.load.mean(axis=1), 1e-12)
    ratio_cap = np.full(len(w), p.max_imbalance)
    ratio_cap[1:] = np.maximum(ratio_cap[1:], start_ratio[1:])
    if p.robust:
        ratio_cap[-1] = start_ratio[-1]
    cap_s = ratio_cap * st.load.mean(axis=1)
    cap_var = float(st.var.max()) * (1.0 + p.risk_slack) if p.robust and np.any(p.risk) else np.inf
    if p.replicas is not None and cap_var < np.inf:
        eb = np.repeat(np.arange(e), r_base)
        gb = pack_balanced((mean_load / r_base)[eb], eb, g, spg)
        sb = p.risk[eb][:, eb] / np.outer(r_base[eb], r_base[eb])
        v_g = np.bincount(gb, weights=(sb * (gb[:, None] == gb[None, :])).sum(axis=1), minlength=g)
        cap_var = float(v_g.max()) * (1.0 + p.risk_slack)
    if p.robust:
        st.prior_sq_cap = float(st.load[-1] @ st.load[-1])
    # Small layers (every step already looks at all items) descend to a true 2-opt local optimum: the
    # many tiny-gain swaps there add up, and cost little; large layers stop early to keep the time bounded.
    min_gain = MIN_GAIN * base_obj if len(experts) > 2 * ROWS_PER_STEP else 0.0
    swaps = refined = 0
    # The exact copies (small layers with token traffic): the refinement's objective when p.exact; the
    # balance repair prices its swaps by them either way, building them on first use (most repairs of
    # the replica-move search's trial layouts need none).
    copies = None
    if p.topk is not None and len(p.topk) and np.any(p.coact) and len(experts) <= EXACT_MAX_ITEMS:
        copies = functools.cache(lambda: ExactCopies(p.topk, p.token_weight, experts, p.node_of_gpu, p.host_weight))
    model = copies() if copies is not None and p.exact else None

    def local_search() -> tuple[int, int]:
        """Pairwise descent, then exact refinement; returns the swaps each made."""
        n = _descend(st, cap_s, cap_var, min_gain)
        return n, (refine(st, model, cap_s, cap_var) if model is not None else 0)

    def score() -> float:
        return model.value(st.gpu) if model is not None else st.objective()

    if np.any(p.coact):
        a, b = local_search()
        swaps, refined = swaps + a, refined + b
        best = _snapshot(st)
        best_obj = score()
        var_sum = float(st.var.sum())
        rng = np.random.default_rng(p.seed)
        for _ in range(p.rounds):
            # Kick: a few random allowed swaps, then descend again; keep the result if it is better.
            for _k in range(max(2, g // 2)):
                d = st.candidates(cap_s, cap_var)
                allowed = np.argwhere(np.isfinite(np.triu(d, 1)) & (np.triu(np.ones_like(d), 1) > 0))
                if len(allowed) == 0:
                    break
                i, j = allowed[rng.integers(len(allowed))]
                st.swap(int(i), int(j))
            a, b = local_search()
            swaps, refined = swaps + a, refined + b
            obj = score()
            # Keep a better result only if the GPUs' load variance did not grow in total: a stronger
            # search otherwise spends the risk bound's slack on every GPU (worse balance on unseen traffic).
            if obj < best_obj - _TOL and st.var.sum() <= var_sum + _TOL:
                best, best_obj = _snapshot(st), obj
            else:
                _restore(st, best)
    repaired = 0
    if (r > 1).any():
        repaired = _repair_rule_balance(st, p, experts, copies)
    row = rows_from_gpu_lists(st.gpu, experts, g, spg)
    return LayerResult(row=row, baseline_row=rows_from_gpu_lists(start, experts, g, spg),
                       objective=st.objective(), baseline_objective=base_obj, swaps=swaps, repaired=repaired,
                       replicas=r, refined=refined)


def _repair_rule_balance(st: _State, p: LayerProblem, experts: np.ndarray,
                         copies: Callable[[], ExactCopies] | None = None, max_steps: int = 64) -> int:
    """Swap items until the rule-exact loads on the traffic seen meet max_imbalance (or nothing helps).

    Each step tries the swaps of an item on the most loaded GPU (for the worst source) with any item
    elsewhere. If some of them bring the worst max/mean within max_imbalance, it takes the one that
    costs the least: the smallest rise of the exact expected copies (``copies()``; J without). Else
    it takes the one that lowers the worst max/mean the most, then the smallest rise of J. (Taking
    the most balancing swap every time overshoots, giving back more of the communication saving.)
    Moving an unreplicated expert moves its whole
    load; only replicated experts need the rule. The other balance caps do not apply here (they
    count replicas' loads split evenly, which is what this step corrects), the prior-spread cap
    (``_State.prior_sq_cap``) does.
    """
    src_counts = p.src_counts
    if src_counts is None:
        # Count-only traffic: tokens assumed to start on every GPU equally, as the report scores it
        # (``cost.expected_gpu_load``). On several hosts the rule still matters: a replica alone on its
        # host takes that host's whole share of its expert, not load / r.
        g = len(p.node_of_gpu)
        src_counts = np.repeat(p.loads[:, None, :] / g, g, axis=1)
    # The sources together, each weighing equally, as the runtime would see them mixed: [1, G, E].
    sc = (src_counts / np.maximum(src_counts.sum(axis=(1, 2), keepdims=True), 1e-12)).sum(axis=0, keepdims=True)
    total = sc.sum(axis=1)  # [1, E]
    reps = np.bincount(experts, minlength=sc.shape[2])
    n_s, g = sc.shape[0], sc.shape[1]

    def moved(ex_n: np.ndarray, frm_n: np.ndarray, to_n: np.ndarray) -> np.ndarray:
        """[n, Sc, G] change of rule-exact load when the replica of expert ex_n[k] on frm_n[k] moves to to_n[k]."""
        n = len(ex_n)
        k = np.arange(n)
        out = np.zeros((n, n_s, g))
        tot = total[:, ex_n].T  # [n, Sc]
        out[k, :, frm_n] -= tot
        out[k, :, to_n] += tot
        rep = np.flatnonzero(reps[ex_n] > 1)
        if len(rep):
            cnt = np.moveaxis(sc[:, :, ex_n[rep]], 2, 0)  # [r, Sc, G]
            before = st.hold[ex_n[rep]]
            after = before.copy()
            after[np.arange(len(rep)), frm_n[rep]] = False
            after[np.arange(len(rep)), to_n[rep]] = True
            out[rep] = rule_contrib(cnt, after, p.node_of_gpu) - rule_contrib(cnt, before, p.node_of_gpu)
        return out

    def worst(ld: np.ndarray) -> np.ndarray:
        return (ld.max(axis=-1) / np.maximum(ld.mean(axis=-1), 1e-12)).max(axis=-1)

    steps = 0
    ld = rule_loads(st.gpu, experts, sc, p.node_of_gpu)
    while worst(ld) > p.max_imbalance + _TOL and steps < max_steps:
        cur = float(worst(ld))
        ratio = ld.max(axis=1) / np.maximum(ld.mean(axis=1), 1e-12)
        hot = int(ld[int(ratio.argmax())].argmax())
        mine = np.flatnonzero(st.gpu == hot)
        d = st.candidates(np.full(st.w.shape[0], np.inf), np.inf, mine)  # J change of every valid swap (structure, prior spread)
        cols = np.flatnonzero(np.isfinite(d).any(axis=0))
        if len(cols) == 0:
            break
        into = moved(experts[cols], st.gpu[cols], np.full(len(cols), hot))  # [n, Sc, G]
        better = []  # (worst ratio after, J change, item on hot, other item) of every swap that lowers it
        for m, i in enumerate(mine):
            ok = np.isfinite(d[m, cols])
            if not ok.any():
                continue
            js = cols[ok]
            out = moved(np.full(g, experts[i]), np.full(g, hot), np.arange(g))  # [G dest, Sc, G]
            vals = worst(ld[None] + out[st.gpu[js]] + into[ok])
            better += [(round(float(v), 9), float(d[m, j]), int(i), int(j)) for v, j in zip(vals, js) if v < cur - _TOL]
        if not better:
            break
        fixes = [c for c in better if c[0] <= p.max_imbalance + _TOL]
        if fixes:
            i, j = _cheapest([(i, j) for _, _, i, j in fixes], [dj for _, dj, _, _ in fixes], st.gpu, experts,
                             None if copies is None else copies())
        else:
            _, _, i, j = min(better)  # lowest worst ratio, then smallest change of J, then lowest index
        b = int(st.gpu[j])
        ld = ld + moved(experts[[i, j]], np.array([hot, b]), np.array([b, hot])).sum(axis=0)
        st.swap(i, j)
        steps += 1
    return steps


def _cheapest(pairs: list[tuple[int, int]], dj: list[float], gpu: np.ndarray, experts: np.ndarray,
              model: ExactCopies | None) -> tuple[int, int]:
    """The swap of ``pairs`` that raises the exact expected copies the least (J, ``dj``, without a
    model); ties: lowest index. Swaps of two unreplicated items are priced from one ``swap_gains``."""
    if model is None:
        cost = dj
    else:
        single = model.reps[experts] == 1
        gains = model.swap_gains(gpu) if any(single[i] and single[j] for i, j in pairs) else None
        cost = [gains[i, j] if single[i] and single[j] else model.swap_delta(gpu, i, j) for i, j in pairs]
    return min(zip(np.round(cost, 12).tolist(), pairs))[1]

