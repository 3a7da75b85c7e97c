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

Algorithm, per MoE layer (what counts is which GPU holds which expert: a slot keeps its weights
whenever its GPU kept its expert, and ``_align_slots`` puts kept experts back into their old slots):

0. Noise. A layer whose max/mean load on the window is within ``noise_floor`` of the target keeps its
   placement: sampling alone puts even a perfectly balanced layer up to about sqrt(2 ln G) binomial
   standard deviations above 1 on a window of T tokens, so such an excess is as likely noise as drift,
   and re-planning it moves weights after noise. So does a layer within the spec's own
   ``placement.max_imbalance`` (when no ``max_imbalance`` is given), where the floor is smaller than
   ``WINDOW_MARGIN`` (long windows, few GPUs): it meets what a plan is made to meet (a plan re-planned on
   the very traffic it was made from moved 16-18% of the slots there, for layers at 1.03-1.05). Keeping
   every layer within the spec's target plus the floor was tried and not kept: on gradual mixes it left
   layers at 1.07-1.09 on the window and lost the balance check on two of the robustness harness's
   switches (max/mean +0.034 and +0.032 over the load-only re-plan). A spec of expert-choice routing
   keeps every layer: each expert takes the same number of each batch's tokens (its capacity), so the
   load is balanced by construction, and its traces hold a top-k proxy of the scores, not the
   assignments (the Rebalancer moved 1-3 slots per re-plan on a layer it measured at max/mean 1.000). (Re-planned after every ~1k-token window of one task,
   without this rule 5.2-8.3% of the slots moved per re-plan for no better balance on the next window;
   with it 1.8-7.3%, balance on the next window within +0.008 and fewer remote copies in 7 of 8
   streams. The bench's switches, re-planned from 3.7k tokens, are unchanged: every layer is far above
   the floor there; ``benchmarks/results/planner_design.md``.)
1. Balance repair. While GPUs exceed the target max/mean load on the window (the dispatch rule's
   expected loads: own GPU, own host, any; ties split evenly), score the changes that involve the
   most loaded GPUs: swaps of an item there with an item on a GPU below the target, and the
   re-assignment of a replica of a replicated expert to a hot expert (a redundant slot follows the
   load; one slot changes). Take the change that lowers the excess load (sum over GPUs of the load
   above the target) the most per unit of cost: the move cost (a change that undoes an earlier move
   is free) plus any rise of the co-activation cut it causes, valued over the horizon. Greedy and
   priced, so the few changes that matter come first. The default target is the spec's
   ``max_imbalance`` less ``WINDOW_MARGIN``: the window is a sample of the traffic to come.
   The redundant slots went to the experts the old traffic made hot, and the repair moves a replica
   only where that change alone lowers the excess: on traffic whose hot experts are new it can stop
   above the target (a hot expert needs several more replicas at once), and where it does reach the
   target the old replicas still serve experts that are no longer hot, while a replica of a hot
   expert saves copies (its tokens on that GPU stay there) and spreads the load that varies most.
   So a layer with redundant slots is also repaired a second time from the current plan, its
   redundant slots first given out as the load-only planner would give them on the window
   (``baselines.replicate_by_load``, one slot changed per replica), and both results go through
   step 2. The second is kept if the first stays above the target and the second is better
   balanced, or if both are within the target and the second costs less by the re-plan's own
   measure (moves by link plus the cut over the horizon). That second pass about doubles a layer's
   time, so layers larger than ``search.EXACT_MAX_ITEMS`` slots (where the search skips its costly
   refinement too) take it only where the first stops above the target. With a move budget (shared
   by the layers in turn) there is no second pass.
2. Communication. Swaps that lower the expected dispatch + combine cost on the window (the pairwise
   co-activation cut of ``search``, weighted by the topology's per-copy cost) by more than they cost
   to move, the saving counted over ``horizon_tokens`` tokens, keeping every GPU within the balance
   reached in step 1. A swap keeps every expert's replica count, and the redundant slots were given
   to experts for balance (by the current plan or the repair); so when no swap is worth it, the
   step also tries re-assigning a replica (a redundant slot takes a replica of another expert: one
   slot changes), scored the same way with the exact change of the cut in closed form, and then
   resumes the swaps. On new traffic a replica beside the experts it is co-activated with saves
   copies that no swap can.
3. Budget. ``max_moves`` / ``max_move_bytes`` cap the slots / bytes moved over all layers. A budget that
   the re-plan without one (steps 1, 2, 4 and 5) fits in does not bind, and that plan is returned (the
   budgeted steps below share the budget out and differed from it even where it was never reached:
   every slot of DeepSeek-V2-Lite as a budget moved 197 slots against 191 unbudgeted). Otherwise the layers
   are repaired in turn, worst balance first, each change admitted only while the budget lasts; then
   step 2 and step 4 (within the slots a layer moves plus what the budget has left) in the same order,
   and what they give back (a change undoing a move refunds it) repairs the layers still above the
   target, worst first: a budget too small for the drift is spent, not left over. Shared out so, the
   worst layer can take the whole budget for less than the unbudgeted re-plan spends on it (on skewed
   synthetic switches a budget of 44 slots left a layer at 2.08 that the unbudgeted re-plan's 45 slots
   brought to 1.03), so two more allocations are made: whole layers of the unbudgeted re-plan, the most
   balance per slot first, while they fit, the rest repairing the other layers either worst first (from
   the window's replica counts too, as step 1's second pass) or a change at a time to whichever layer is
   worst balanced then; the one best balanced on the window (mean over layers) is returned.
4. Polish (in layers of at most ``POLISH_MAX_SLOTS`` slots). Steps 1 and 2 are
   greedy: each takes the best change in sight, and where they stop depends on the order of their
   choices (an exact solver finds placements of the same balance that cost less and move fewer
   slots, at seconds per layer). An iterated local search spends a few more of them: ``POLISH_ROUNDS``
   times, from the best result so far, ``POLISH_KICK`` moved experts (drawn at random) go back to a
   GPU that held them, and steps 1 and 2 run again; a result replaces the best where it is no worse
   balanced on the window than steps 1-2 left the layer and cheaper by the re-plan's own measure
   (moves by link plus the cut over the horizon); it stops after ``POLISH_PATIENCE`` rounds in a row
   without one. On the bundled switches it moves fewer slots in every case, at about the same
   balance and remote copies (``benchmarks/results/planner_design.md``). Under a budget a round's
   steps stay within the layer's share, and a layer the budget holds above the target takes any
   better balanced result first (the repair's own order): there the slots are fixed and balance is
   what they can still buy.
5. Move target (``move_target``, default ``DEFAULT_MOVE_TARGET``: 15% of the slots; not under a binding
   budget). Priced moves are weighed against the cut, and on some switches their sum buys a few more
   moves than a deployment wants to migrate at once (the bench's 2x4 GPUs / 64 slots law -> intent switch:
   15.7%, where sending 12 of them home costs 0.3 points of its remote GPU copies). Where the re-plan
   moves more than the target, each layer offers to send moved experts home: its moved one-replica experts
   are re-assigned among the slots they hold, fewer moving, no GPU above the layer's most loaded one on the
   window (so balance is never what pays), the cheapest assignment for each count of moves found by an
   exact solver (``_send_home``); the offers that reach the target at the least rise of the re-plan's own
   measure are taken (a multiple-choice knapsack, solved exactly: ``_meet_move_target``). The target is soft:
   where balance needs more moves, they are made and a note says so. (On the robustness harness's 64 ESFT
   switches: moves within 15% in 61 against 57, every other check as without it, remote GPU copies
   0.02-0.44 points closer to the load-only re-plan's in 7; ``benchmarks/results/planner_design.md``.)

Pricing. A moved expert costs its bytes times the link's relative cost; a token copy costs its
bytes times the same. The cut guides the search (its gains are cheap and smooth, while the exact
copies of a few thousand window tokens are noisy), but it counts split pairs of a token's experts,
not copies: how many copies one unit of cut is worth depends on the topology (a pair across hosts
weighs the inter-host link's cost, several times what the copy it causes adds) and on the traffic.
So the rate is measured on the window (``_copies_per_cut``: the least-squares slope of the exact
change of expected copies, ``exact.ExactCopies``, on the cut's change over the current placement's
swaps), and a cut change is priced as that many copies over the horizon. The horizon is then a real
number of tokens on every topology (a move pays for itself within them), not a constant whose
meaning changes with the cluster.

Candidates are scored from per-slot tables of how the loads would change (``_Layer``), refreshed
only for the experts a change touches, so a step costs a few array operations.

Relabelling (``relabel``) and the weight transfers between two plans (``migration``) live in
``migration`` and are re-exported here.

Everything is deterministic for a seed: ties are broken by index, and the polish draws from a
generator seeded with ``seed`` (default: the spec's ``placement.seed``) and the layer index alone.
Without a move budget the layers do not interact, so a large re-plan (DeepSeek-V3-sized) repairs
them in forked processes, one per usable core, with the same result.

Legend: E experts, G GPUs, N hosts, S slots of one layer, T tokens, K top-k; A, B candidate slots.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import PlanFileError, PlanInfeasible, TraceError, describe, is_integer, short_repr
from ..loader import load_spec
from ..spec import MoESpec
from ..summary import human_bytes
from ..traces import TraceSet, coactivation, traces_for_spec
from .baselines import replicate_by_load
from .blas import one_blas_thread
from .cost import copy_bytes
from .dispatch import source_gpus
from .exact import ExactCopies
from .forked import fork_workers, map_forked
from .migration import (Migration, _align_slots, _holds, _move_cost, expert_bytes, host_copy_weight, migration, relabel,
                        require_plan)
from .planfile import Plan
from .search import EXACT_MAX_ITEMS, rule_contrib

__all__ = [
    "DEFAULT_HORIZON_TOKENS",
    "DEFAULT_MOVE_TARGET",
    "WINDOW_MARGIN",
    "Migration",
    "expert_bytes",
    "migration",
    "relabel",
    "replan",
]

#: tokens of the layer's traffic over which a change's dispatch + combine saving (in copies, each priced
#: by the links it crosses, like a moved expert) is counted against its move cost, by default: a move
#: has to pay for its weight bytes within them. A deployment that re-plans every N tokens would pass
#: about N; the default is the choice behind the figures of ``benchmarks/results/`` (larger values buy
#: fewer remote copies with more moves).
DEFAULT_HORIZON_TOKENS = 25_000

#: the re-plan balances the window to the spec's ``max_imbalance`` minus this margin by default: the
#: window is a sample of the traffic to come, and on traffic it was not fit to a plan loses a few
#: hundredths of balance (a load-only re-plan as well); fitting a little tighter keeps the plan
#: within the spec's target on what follows, at a few more moves.
WINDOW_MARGIN = 0.02

#: the share of the slots a re-plan without a binding budget aims to move at most, by default (step 5 of the
#: module docstring): a soft target, met by giving up co-activation savings, never balance. 15% is the share the
#: re-planning issue asks of a re-plan after a task switch; without it the priced re-plan moved 15.7% on one of the
#: bench's switches (``benchmarks/results/planner_design.md``). None: no target, moves priced only.
DEFAULT_MOVE_TARGET = 0.15


def noise_floor(gpus: int, tokens: int, top_k: int) -> float:
    """How far above 1 sampling alone puts the max/mean GPU load of a perfectly balanced layer on a window of
    ``tokens`` x ``top_k`` assignments, on most windows: each GPU's share is Binomial(n = T K, 1/G), of relative
    standard deviation sqrt((G - 1) / n); the largest of G such deviations exceeds sqrt(2 ln G) of them on
    about one window in six (the union bound G P(Z > sqrt(2 ln G)): 14-20% for 4-32 GPUs, checked by
    simulation in the tests). The floor is that level's quantile of the binomial itself (the smallest
    count x with G P(X > x) within it, as x G / n - 1): the Gaussian's sqrt(2 ln G) sqrt((G - 1) / n) on
    windows of thousands of assignments, but not below the binomial's longer tail on a few (a 1-token
    window of 6 picks on 8 GPUs: 3.0 where the Gaussian says 2.2, which sampling exceeds on a quarter of
    such windows). Tokens of one sequence route alike, so real windows vary more: a lower bound. A layer
    the window puts within this of its target is not re-planned (step 0 of the module docstring)."""
    # P(X > x) of a binomial is the regularised incomplete beta I_p(x + 1, n - x) (scipy.special.bdtrc gives NaN
    # from n = 2**31 on; betainc does not); scipy.optimize, which the planner uses, loads scipy.special anyway
    from scipy.special import betainc

    if gpus < 2:
        return 0.0
    n = max(int(tokens) * int(top_k), 1)
    level = gpus * 0.5 * math.erfc(math.sqrt(math.log(gpus)))  # G P(Z > sqrt(2 ln G))
    lo, hi = 0, n  # the smallest x with G P(X > x) <= level: P(X > n) = 0, so hi qualifies
    while lo < hi:
        mid = (lo + hi) // 2
        if gpus * float(betainc(mid + 1, n - mid, 1.0 / gpus)) <= level:
            hi = mid
        else:
            lo = mid + 1
    return lo * gpus / n - 1.0

_TOL = 1e-9
#: added to a change's move cost (in experts over the fastest link) when ranking repair steps, so
#: that free changes (undoing an earlier move) are preferred without dividing by zero
_FREE = 0.25


# ------------------------------------------------------------------------------------------------
# the incremental re-plan
# ------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One layer's repair state: the expert in every slot, and the dispatch rule's expected loads on the
    window, with the change tables every candidate is scored from (refreshed for the experts a change touches).

    ``d_move[s, y]`` [S, G, G]: load change if slot s's replica moved to GPU y; ``d_add[e, y]`` [E, G, G]:
    if expert e gained a replica on y (read through ``adds``); ``d_rem[s]`` [S, G]: if slot s's replica were dropped.
    """

    ex: np.ndarray  # [S] expert of each slot
    gpu: np.ndarray  # [S] GPU of each slot (fixed)
    old: np.ndarray  # [E, G] bool: the current plan's holdings
    cnt: np.ndarray  # [G, E] window tokens per (source GPU, expert)
    node: np.ndarray  # [G]
    price: np.ndarray  # [E, G] cost of bringing expert e to GPU g (0 where it is now), in fastest-link experts

    def __post_init__(self) -> None:
        e, g = self.old.shape
        self.hold = np.zeros((e, g), bool)
        self.hold[self.ex, self.gpu] = True
        self.contrib = self._contrib(np.arange(e), self.hold)  # [E, G] load each expert puts on each GPU
        self.d_move = np.zeros((len(self.ex), g, g))
        self.d_add = np.zeros((e, g, g))
        self.stale_add = np.ones(e, bool)  # d_add rows not computed since the expert's holdings changed
        self.d_rem = np.zeros((len(self.ex), g))
        self._refresh(np.arange(e))

    def _contrib(self, experts: np.ndarray, hold_XG: np.ndarray) -> np.ndarray:
        """[..., G] load of ``experts`` [...] under holdings ``hold_XG`` [..., G] (the dispatch rule)."""
        c = np.moveaxis(self.cnt[:, experts], 0, -1)[..., None, :]  # [..., 1, G]
        return rule_contrib(c, hold_XG, self.node)[..., 0, :]

    def _refresh(self, experts: np.ndarray, contrib_too: bool = False) -> None:
        """Recompute the change tables of ``experts`` (and their ``contrib`` rows) for the current holdings.

        An expert with one replica takes all its tokens wherever it is, so its rows are written in closed
        form; the others go through one batched rule call. ``d_add`` rows are only marked stale: the
        repair reads them for the few experts on its hot GPUs (``adds``), so most would never be read.
        """
        g = self.hold.shape[1]
        experts = np.unique(experts)
        self.stale_add[experts] = True
        diag = np.arange(g)
        reps = self.hold[experts].sum(axis=1)
        multi = experts[reps > 1]
        single = experts[reps == 1]
        is_multi = np.zeros(len(self.hold), bool)  # a mask, not np.isin: this runs once per change
        is_multi[multi] = True
        slots = np.flatnonzero(is_multi[self.ex])
        es, gs = self.ex[slots], self.gpu[slots]
        m = len(slots)
        if len(multi):
            move = np.repeat(self.hold[es][:, None, :], g, axis=1)  # [m, y, G]: slot's replica goes to y
            move[np.arange(m), :, gs] = False
            move[:, diag, diag] = True
            rem = self.hold[es].copy()  # [m, G]: slot's replica dropped
            rem[np.arange(m), gs] = False
            out = self._contrib(np.concatenate([np.repeat(es, g), es, multi]),
                                np.concatenate([move.reshape(-1, g), rem, self.hold[multi]]))
            if contrib_too:
                self.contrib[multi] = out[m * g + m:]
            base_m = self.contrib[es]
            self.d_move[slots] = out[: m * g].reshape(m, g, g) - base_m[:, None]
            self.d_rem[slots] = out[m * g : m * g + m] - base_m
        if contrib_too and len(single):
            self.contrib[single] = 0.0
            self.contrib[single, self.hold[single].argmax(axis=1)] = self.cnt[:, single].sum(axis=0)
        # One replica: moving it to y moves its whole load from its GPU to y; dropping it is never allowed.
        is_single = np.zeros(len(self.hold), bool)
        is_single[single] = True
        s1 = np.flatnonzero(is_single[self.ex])
        tot = self.cnt[:, self.ex[s1]].sum(axis=0)  # [m1]
        d = np.zeros((len(s1), g, g))
        d[:, diag, diag] = tot[:, None]
        d[np.arange(len(s1)), :, self.gpu[s1]] -= tot[:, None]
        self.d_move[s1] = d
        self.d_rem[s1] = -self.contrib[self.ex[s1]]

    def adds(self, experts: np.ndarray) -> np.ndarray:
        """``d_add[experts]`` [n, G, G], computing the stale rows first (replicated experts in one batched rule
        call, one-replica experts in closed form)."""
        stale = np.unique(experts[self.stale_add[experts]])
        if not len(stale):
            return self.d_add[experts]
        g = self.hold.shape[1]
        diag = np.arange(g)
        reps = self.hold[stale].sum(axis=1)
        multi, single = stale[reps > 1], stale[reps == 1]
        if len(multi):
            add = np.repeat(self.hold[multi][:, None, :], g, axis=1)  # [n, y, G]: e gains a replica on y
            add[:, diag, diag] = True
            out = self._contrib(np.repeat(multi, g), add.reshape(-1, g))
            self.d_add[multi] = out.reshape(len(multi), g, g) - self.contrib[multi][:, None]
        if len(single):
            # One replica on x, a second on y: tokens on y stay there; the others go to y if y is their host's
            # only replica, half of them if both or neither replica is in their host (``_to_second``).
            x = self.hold[single].argmax(axis=1)
            c = self.cnt[:, single].T  # [n, G sources]
            to_y = c + np.einsum("nys,ns->ny", self._to_second[x], c)  # [n, y]
            to_y[np.arange(len(single)), x] = 0.0
            d = np.zeros((len(single), g, g))
            d[:, diag, diag] = to_y
            d[np.arange(len(single)), :, x] -= to_y
            self.d_add[single] = d
        self.stale_add[stale] = False
        return self.d_add[experts]

    @functools.cached_property
    def _to_second(self) -> np.ndarray:
        """[x, y, s] share of the tokens of source GPU s (not x or y) that go to y once an expert on x alone
        gains a replica on y (the dispatch rule): 1 if only y is in s's host, 0 if only x, else 1/2."""
        g = len(self.node)
        same = (self.node[:, None] == self.node[None, :]).astype(np.float64)  # [a, s]
        share = 0.5 * (1.0 + same[None, :, :] - same[:, None, :])  # [x, y, s]
        idx = np.arange(g)
        share[idx, :, idx] = 0.0  # s == x: stays on x
        share[:, idx, idx] = 0.0  # s == y: counted as its own (c[y])
        return share

    @property
    def load(self) -> np.ndarray:
        return self.contrib.sum(axis=0)

    def copy(self) -> _Layer:
        """An independent copy of the repair state (the window, prices and GPUs are shared: nothing changes them)."""
        new = object.__new__(_Layer)
        new.__dict__.update(self.__dict__)
        for name in ("ex", "hold", "contrib", "d_move", "d_add", "stale_add", "d_rem"):
            setattr(new, name, getattr(self, name).copy())
        return new

    def _update(self, experts: list[int]) -> None:
        self.hold[experts] = False
        for x in experts:
            self.hold[x, self.gpu[self.ex == x]] = True
        self._refresh(np.array(experts), contrib_too=True)

    def swap(self, s: int, t: int) -> None:
        """Slots s and t (on different GPUs) trade experts."""
        self.ex[s], self.ex[t] = self.ex[t], self.ex[s]
        self._update([int(self.ex[s]), int(self.ex[t])])

    def reassign(self, t: int, a: int) -> None:
        """Slot t (a replica of a replicated expert) takes a replica of expert a instead."""
        b = int(self.ex[t])
        self.ex[t] = a
        self._update([a, b])


def _prices(old: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """[E, G] cost of bringing each expert to each GPU from its nearest current holder (0 if held there)."""
    big = np.where(old[:, :, None], cost[None, :, :], np.inf)  # [E, src G, dst G]
    p = big.min(axis=1)
    p[old] = 0.0
    return p


def _cut_rows(hold_EG: np.ndarray, coact: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The co-activation cut of ``search`` at expert level: (A [E, E] = coact / (r_a r_b), F [E, G] = the cut
    of one replica of expert e if it sat on GPU g, against every replica where it is now)."""
    r = np.maximum(hold_EG.sum(axis=1), 1).astype(np.float64)
    a_ee = coact / np.outer(r, r)
    return a_ee, (a_ee @ hold_EG.astype(np.float64)) @ cost.T


def _repair_balance(st: _Layer, target: float, budget: _Budget, coact: np.ndarray, cost: np.ndarray,
                    value_per_j: float, max_steps: int = 2000) -> int:
    """Step 1 of the module docstring; returns the changes made.

    Each step scores, for each of the most loaded GPUs above the target (two, or a quarter of the
    GPUs in larger clusters), the changes that involve it by how much they lower the excess load (the
    sum over GPUs of the load above ``target`` x the mean; a peak alone would stall when two GPUs tie)
    per unit of cost (partners on GPUs below the target), and applies the best change of each such GPU, best first, as long as they touch
    disjoint GPUs and still lower the excess (large clusters repair several GPUs per step). The cost
    is the move cost plus the rise of the co-activation cut (``_cut_rows``) valued over the horizon,
    so that among equally balancing changes those that keep co-activated experts together win; a
    fall of the cut earns nothing here (step 2 takes those).
    """
    old, price = st.old, st.price
    g = st.hold.shape[1]
    n_hot = max(2, g // 4)
    steps = 0
    while steps < max_steps:
        load = st.load
        cap = target * max(load.mean(), 1e-12)
        excess = float(np.maximum(load - cap, 0.0).sum())
        if excess <= _TOL:
            return steps
        hot = [int(x) for x in np.argsort(-load, kind="stable")[:n_hot] if load[x] > cap + _TOL]
        reps = st.hold.sum(axis=1)
        if (reps > 1).any():  # the replica changes below read d_add of the hot GPUs' experts: one rule call
            st.adds(st.ex[np.isin(st.gpu, hot)])
        a_ee, f_eg = _cut_rows(st.hold, coact, cost)
        one_S = reps[st.ex] == 1  # [S] slots of one-replica experts
        picks = []
        for h in hot:
            best = None
            sa = np.flatnonzero(st.gpu == h)
            # Partners on GPUs below the target only: a GPU above it cannot take load without raising the excess
            # as much as h sheds (its own turn comes as a hot GPU).
            sb = np.flatnonzero(load[st.gpu] < cap)
            if not len(sb):
                continue
            ea, eb, gb = st.ex[sa][:, None], st.ex[sb][None, :], st.gpu[sb][None, :]
            # (a) swaps: slot sa[i] (on h) and slot sb[j] (on gb[j]) trade experts.
            drop, after = _swap_drops(st, load, cap, excess, h, sa, sb, one_S)
            ok = ~st.hold[eb, h] & ~st.hold[ea, gb] & (ea != eb)
            dm = (~old[ea, gb]).astype(np.int64) + ~old[eb, h] - ~old[ea, h] - ~old[eb, gb]
            dp = price[ea, gb] + price[eb, h] - price[ea, h] - price[eb, gb]
            dj = f_eg[ea, gb] - f_eg[ea, h] + f_eg[eb, h] - f_eg[eb, gb] + 2.0 * a_ee[ea, eb] * cost[h, gb]
            c = np.maximum(dp, 0.0) + value_per_j * np.maximum(dj, 0.0)
            best = _better(best, drop, after, ok, excess, dm, c, budget, ("swap", sa, sb))
            # (b) a replica of a replicated expert (slot sb[j]) becomes one of expert ea[i]: a redundant
            # slot follows the load, one slot changes.
            rep = reps[st.ex[sb]] > 1
            if rep.any():
                st_b = sb[rep]
                eb2, gb2 = st.ex[st_b][None, :], st.gpu[st_b][None, :]
                new = load + st.adds(st.ex[sa])[:, st.gpu[st_b], :] + st.d_rem[st_b][None]
                ok = ~st.hold[ea, gb2] & (ea != eb2)
                dm = (~old[ea, gb2]).astype(np.int64) - ~old[eb2, gb2]
                dp = price[ea, gb2] - price[eb2, gb2]
                dj = (f_eg[ea, gb2] - f_eg[eb2, gb2]) / 2.0
                c = np.maximum(dp, 0.0) + value_per_j * np.maximum(dj, 0.0)
                drop = excess - np.maximum(new - cap, 0.0).sum(axis=-1)
                best = _better(best, drop, lambda i, j, new=new: new[i, j], ok, excess, dm, c, budget,
                               ("replica", sa, st_b))
            if best is not None:
                picks.append(best)
        if not picks:
            return steps
        used: set[int] = set()
        applied = 0
        for _, _, _, (kind, s, t) in sorted(picks, key=lambda c: c[:2]):
            touched = {int(st.gpu[s]), int(st.gpu[t])}
            if used & touched or not _valid(st, kind, s, t):
                continue
            # Re-check against the loads as they are now (an earlier change of this step may have moved them).
            dm = _dmoves(st, kind, s, t)
            if applied and not budget.allows(dm):
                continue
            before = float(np.maximum(st.load - cap, 0.0).sum())
            after = st.load + (st.d_move[s, st.gpu[t]] + st.d_move[t, st.gpu[s]] if kind == "swap"
                               else st.adds(st.ex[s:s + 1])[0, st.gpu[t]] + st.d_rem[t])
            if applied and float(np.maximum(after - cap, 0.0).sum()) >= before - _TOL:
                continue
            if kind == "swap":
                st.swap(s, t)
            else:
                st.reassign(t, int(st.ex[s]))
            budget.spend(dm)
            used |= touched
            applied += 1
            steps += 1
    return steps


def _valid(st: _Layer, kind: str, s: int, t: int) -> bool:
    """Whether a change keeps the placement valid now (no GPU holds an expert twice, every expert a slot)."""
    a, b, h, y = int(st.ex[s]), int(st.ex[t]), int(st.gpu[s]), int(st.gpu[t])
    if a == b or st.hold[a, y]:
        return False
    return not st.hold[b, h] if kind == "swap" else int(st.hold[b].sum()) > 1


def _dmoves(st: _Layer, kind: str, s: int, t: int) -> int:
    """Change of the slots moved (expert held where the current plan does not hold it) a change makes."""
    a, b, h, y = int(st.ex[s]), int(st.ex[t]), int(st.gpu[s]), int(st.gpu[t])
    moved = [int(not st.old[a, y]) - int(not st.old[b, y])]  # a arrives on y, b leaves y
    if kind == "swap":
        moved.append(int(not st.old[b, h]) - int(not st.old[a, h]))  # b arrives on h, a leaves h
    return sum(moved)


def _swap_drops(st: _Layer, load: np.ndarray, cap: float, excess: float, h: int, sa: np.ndarray, sb: np.ndarray,
                single_S: np.ndarray) -> tuple[np.ndarray, Any]:
    """How much each swap of slot sa[i] (on the hot GPU h) with slot sb[j] (on a GPU below ``cap``) lowers
    the excess load: [A, B], and ``after(i, j)`` [n, G], the loads after the swaps (i, j).

    Two experts with one replica each that trade GPUs change those two GPUs' loads only, so their drop
    is read from two entries; a swap that involves a replicated expert re-spreads its tokens (the
    dispatch rule) and is scored on every GPU.
    """
    gb = st.gpu[sb]

    def after(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return load + st.d_move[sa[i], gb[j]] + st.d_move[sb[j], h]

    drop = np.empty((len(sa), len(sb)))
    one_a, one_b = single_S[sa], single_S[sb]
    ia, jb = np.flatnonzero(one_a), np.flatnonzero(one_b)
    if len(ia) and len(jb):
        a_, b_, g_ = sa[ia][:, None], sb[jb][None, :], gb[jb][None, :]
        new_h = load[h] + st.d_move[a_, g_, h] + st.d_move[b_, h, h]
        new_g = load[g_] + st.d_move[a_, g_, g_] + st.d_move[b_, h, g_]
        # Every other GPU keeps its load; gb was below the cap, h above it.
        drop[np.ix_(ia, jb)] = (load[h] - cap) - np.maximum(new_h - cap, 0.0) - np.maximum(new_g - cap, 0.0)
    for rows, cols in ((np.flatnonzero(~one_a), np.arange(len(sb))), (ia, np.flatnonzero(~one_b))):
        if len(rows) and len(cols):
            new = after(rows[:, None], cols[None, :])  # [a, b, G]
            drop[np.ix_(rows, cols)] = excess - np.maximum(new - cap, 0.0).sum(axis=-1)
    return drop, after


def _better(best, drop_AB, after, ok_AB, excess, dm_AB, cost_AB, budget, head):
    """Fold candidates [A, B] into ``best``: the largest drop of the excess load per unit of cost, then the
    lowest resulting peak (``after(i, j)``: the loads after those candidates), then the lowest slots; only
    changes the budget allows and that lower the excess."""
    ok = ok_AB & (drop_AB > 1e-6 * max(excess, 1.0)) & budget.allows(dm_AB)
    if not ok.any():
        return best
    eff = np.where(ok, drop_AB / (cost_AB + _FREE), -np.inf)
    i, j = np.nonzero(eff == eff.max())  # the peak breaks ties only: computed for the tied few
    peak = after(i, j).max(axis=-1)
    k = np.lexsort((head[2][j], head[1][i], peak))[0]
    cand = (-float(eff[i[k], j[k]]), float(peak[k]), int(dm_AB[i[k], j[k]]),
            (head[0], int(head[1][i[k]]), int(head[2][j[k]])))
    if best is None or cand[:2] < best[:2]:
        return cand
    return best


def _slots_moved(st: _Layer) -> int:
    """Slots of the layer whose GPU did not hold their expert under the current plan (what a budget counts)."""
    return int((~st.old[st.ex, st.gpu]).sum())


@dataclass
class _Budget:
    """Slots still allowed to move (None: no limit); a byte budget is counted in whole experts."""

    moves: float | None

    def allows(self, dmoves: Any) -> Any:
        dm = np.asarray(dmoves)
        return np.ones(dm.shape, bool) if self.moves is None else dm <= self.moves + _TOL

    def spend(self, dmoves: int) -> None:
        if self.moves is not None:
            self.moves -= dmoves


def _slot_cut_deltas(st: _Layer, coact: np.ndarray, cost: np.ndarray, pairs: tuple | None = None) -> np.ndarray:
    """[S, S] change of the pairwise co-activation cut J if slots s and t traded experts; for ``pairs`` (I, J,
    their GPUs, the cost between those) only, [P] (the same values)."""
    g = st.hold.shape[1]
    ex, gp = st.ex, st.gpu
    r = st.hold.sum(axis=1)[ex].astype(np.float64)
    a_rr = coact[np.ix_(ex, ex)] / np.outer(r, r)
    np.fill_diagonal(a_rr, 0.0)
    onehot = np.zeros((len(ex), g))
    onehot[np.arange(len(ex)), gp] = 1.0
    f = (a_rr @ onehot) @ cost.T  # [R, G] cut of slot i's replica if it sat on GPU x
    fs = f[np.arange(len(ex)), gp]
    if pairs is not None:
        i, j, gi, gj, cost_p = pairs  # slots, their GPUs, cost[gi, gj]
        return f[i, gj] - fs[i] + f[j, gi] - fs[j] + 2.0 * a_rr[i, j] * cost_p
    return f[:, gp] - fs[:, None] + f[:, gp].T - fs[None, :] + 2.0 * a_rr * cost[np.ix_(gp, gp)]


def _reassign_cut_deltas(st: _Layer, coact: np.ndarray, cost: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """[n, E] exact change of the pairwise co-activation cut J (``_slot_cut_deltas``' J: coact / (r_a r_b) times
    the cost between the two slots' GPUs, over slot pairs) if slot ``slots[i]`` (a replica of a replicated
    expert b, on GPU y) held a replica of expert a instead; entries where a == b are meaningless.

    Only the pairs that involve a or b change: with K[x, z] = coact[x, z] / (r_x r_z) * P[x, z] and
    P = H cost H^T (H [E, G]: replicas of x on g), a gains y (r_a + 1), b loses it (r_b - 1), so rows a and b
    of K are rewritten from M = H cost^T ([z, y]: the cost from y to z's replicas) in closed form, for all
    slots at once (coact and cost are symmetric: co-activation counts pairs, links are undirected).
    """
    hold = st.hold.astype(np.float64)
    e = hold.shape[0]
    r = hold.sum(axis=1)
    w = 1.0 / np.maximum(r, 1.0)
    p_ee = hold @ cost @ hold.T  # [E, E]
    m_eg = hold @ cost.T  # [E, G]: m[z, y] = sum_h cost[y, h] H[z, h]
    q_e = (coact * p_ee) @ w  # [E]: sum_z A[a, z] w_z P[a, z]
    rv_eg = (coact * w[None, :]) @ m_eg  # [E, G]: sum_z A[a, z] w_z M[z, y]
    ar = np.arange(e)
    diag_a, diag_p = coact[ar, ar], p_ee[ar, ar]
    wa2 = 1.0 / (r + 1.0)  # [E] a's weight after gaining a replica
    bs, ys = st.ex[slots], st.gpu[slots]  # [n]
    wb, wb2 = w[bs][:, None], (1.0 / np.maximum(r[bs] - 1.0, 1.0))[:, None]  # [n, 1] b's weight before, after
    m_y = m_eg[:, ys].T  # [n, E] over z
    mb = m_y[np.arange(len(bs)), bs][:, None]  # [n, 1]
    a_b, p_b = coact[bs], p_ee[bs]  # [n, E]: A[b, z], P[b, z] (symmetric: also A[a, b], P[a, b] over a)
    dab, dpb = diag_a[bs][:, None], diag_p[bs][:, None]
    # row a over z not in {a, b}: all z, less z = a and z = b
    row_a = wa2 * (q_e + rv_eg[:, ys].T) - w * q_e
    row_a -= diag_a * w * (wa2 * (diag_p + m_y) - w * diag_p)
    row_a -= a_b * wb * (wa2 * (p_b + mb) - w * p_b)
    # row b over z not in {a, b}: all z, less z = a and z = b
    all_b = (a_b * w * (wb2 * (p_b - m_y) - wb * p_b)).sum(axis=1, keepdims=True)
    row_b = all_b - a_b * w * (wb2 * (p_b - m_y) - wb * p_b)
    row_b -= dab * wb * (wb2 * (dpb - mb) - wb * dpb)
    # the a-a and b-b pairs (each pair once), and the a-b pair
    self_a = 0.5 * diag_a * (wa2 * wa2 * (diag_p + 2.0 * m_y) - w * w * diag_p)
    self_b = 0.5 * dab * (wb2 * wb2 * (dpb - 2.0 * mb) - wb * wb * dpb)
    cross = a_b * (wa2 * wb2 * (p_b - m_y + mb) - w * wb * p_b)
    out = row_a + row_b + self_a + self_b + cross
    return out


def _cut_rate(st: _Layer, coact: np.ndarray, cost: np.ndarray, topk_TK: np.ndarray, host_weight: float) -> float:
    """Copies per unit of the pairwise cut on this layer's window: the least-squares slope (through 0) of the
    exact change of expected copies (``exact.ExactCopies``, a host copy weighted by ``host_weight``) on the
    cut's change, over every swap of two unreplicated experts on different GPUs of the current placement.

    The cut counts split pairs of a token's experts, the wire one copy per remote GPU and host; how
    many pairs make a copy depends on the topology (a pair across hosts weighs the link's cost) and on
    the traffic, so the rate is measured where it is used."""
    model = ExactCopies(topk_TK, np.full(len(topk_TK), 1.0 / max(len(topk_TK), 1)), st.ex.copy(), st.node,
                        host_weight=host_weight)
    x = model.swap_gains(st.gpu)
    y = _slot_cut_deltas(st, coact, cost)
    ok = np.triu(x != 0.0, 1)
    xx, yy = x[ok], y[ok]
    den = float(yy @ yy)
    return float(xx @ yy) / den if den > 0 and float(xx @ yy) > 0 else 0.0


#: ``_copies_per_cut`` measures the rate on at most this many layers (evenly spread) and tokens per layer
RATE_LAYERS = 4
RATE_TOKENS = 2048


def _copies_per_cut(states: list[_Layer], ts: TraceSet, cost: np.ndarray, host_weight: float) -> float:
    """The median of ``_cut_rate`` over RATE_LAYERS layers, each on RATE_TOKENS tokens of the window
    (evenly spread): the rate varies little between layers of one model, far more between topologies."""
    n = len(states)
    e = states[0].hold.shape[0]
    rates = []
    for layer in np.unique(np.linspace(0, n - 1, min(n, RATE_LAYERS)).round().astype(int)):
        topk = np.asarray(ts.topk[layer], np.int64)
        topk = topk[np.unique(np.linspace(0, len(topk) - 1, min(len(topk), RATE_TOKENS)).astype(int))]
        st = states[layer]
        rates.append(_cut_rate(st, coactivation(topk, e) / len(topk), cost, topk, host_weight))
    return float(np.median(rates))


def _improve_comm(st: _Layer, coact: np.ndarray, cost: np.ndarray, value_per_j: float, cap: float,
                  budget: _Budget, max_steps: int = 256, tries: int = 256) -> int:
    """Step 2 of the module docstring: priced changes that lower the co-activation cut; returns changes made.

    Each step ranks every swap of two slots by its net value (cut change valued over the horizon plus
    move cost) and applies, best first among the ``tries`` best, those on GPUs no earlier swap of the
    step touched that the budget allows and that keep every GPU within ``cap`` x the mean load (or the
    current peak, if higher). When no swap is worth it, the best re-assignment of a replica
    (``_reassign_comm``) is made, if any, and the swaps resume.
    """
    steps = 0
    gp = st.gpu
    pi, pj = np.nonzero(gp[:, None] < gp[None, :])  # the slot pairs on different GPUs, each once, row-major
    gi, gj = gp[pi], gp[pj]
    pairs = (pi, pj, gi, gj, cost[gi, gj])
    for _ in range(max_steps):
        made = _swap_comm(st, coact, cost, value_per_j, cap, budget, pairs, tries)
        if not made:
            made = _reassign_comm(st, coact, cost, value_per_j, cap, budget)
        if not made:
            return steps
        steps += made
    return steps


def _swap_comm(st: _Layer, coact: np.ndarray, cost: np.ndarray, value_per_j: float, cap: float, budget: _Budget,
               pairs: tuple, tries: int) -> int:
    """One step of ``_improve_comm``'s swaps (several on disjoint GPUs); returns the swaps made."""
    g = st.hold.shape[1]
    old, price, gp = st.old, st.price, st.gpu
    pi, pj, gi, gj, _ = pairs
    ex = st.ex
    dj = _slot_cut_deltas(st, coact, cost, pairs)
    ei, ej = ex[pi], ex[pj]
    dp = price[ei, gj] + price[ej, gi] - price[ei, gi] - price[ej, gj]
    net = dj * value_per_j + dp  # negative: worth it
    valid = np.flatnonzero(~st.hold[ei, gj] & ~st.hold[ej, gi] & (net < -_TOL))
    if not len(valid):
        return 0
    valid = valid[np.lexsort((pj[valid], pi[valid], net[valid]))[:tries]]
    cand = np.stack([pi[valid], pj[valid]], axis=1)
    load = st.load
    limit = max(cap * load.mean(), load.max()) + _TOL
    # Screen on the state at the start of the step (budget, balance), in one go.
    i, j = cand[:, 0], cand[:, 1]
    dm0 = ((~old[ex[i], gp[j]]).astype(np.int64) + ~old[ex[j], gp[i]] - ~old[ex[i], gp[i]]
           - ~old[ex[j], gp[j]])
    after0 = (load + st.d_move[i, gp[j]] + st.d_move[j, gp[i]]).max(axis=1)
    cand = cand[budget.allows(dm0) & (after0 <= limit)]
    used: set[int] = set()
    made = 0
    # Best first; several swaps on disjoint GPUs per step (each checked against the state as it is then).
    for i, j in cand.tolist():
        a, b = int(gp[i]), int(gp[j])
        if a in used or b in used or not _valid(st, "swap", i, j):
            continue
        dm = _dmoves(st, "swap", i, j)
        after = st.load + st.d_move[i, b] + st.d_move[j, a]
        if not budget.allows(dm) or after.max() > limit:
            continue
        st.swap(i, j)
        budget.spend(dm)
        used |= {a, b}
        made += 1
        if len(used) >= g:
            break
    return made


def _reassign_comm(st: _Layer, coact: np.ndarray, cost: np.ndarray, value_per_j: float, cap: float,
                   budget: _Budget) -> int:
    """The best re-assignment of a replica for communication: a slot holding a replica of a replicated expert
    takes a replica of another expert where that lowers the cut (``_reassign_cut_deltas``, exact) by more
    than the move costs, within the budget and ``_improve_comm``'s balance limit; returns 1 if one was made.

    Swaps keep every expert's replica count; which experts get the redundant slots was chosen for
    balance (the current plan, or the repair), and on new traffic a replica of an expert that is
    co-activated with the experts of the slot's GPU can save copies the swaps cannot.
    """
    reps = st.hold.sum(axis=1)
    slots = np.flatnonzero(reps[st.ex] > 1)
    if not len(slots):
        return 0
    b, y = st.ex[slots], st.gpu[slots]
    net = value_per_j * _reassign_cut_deltas(st, coact, cost, slots) + st.price[:, y].T - st.price[b, y][:, None]
    dm = (~st.old[:, y].T).astype(np.int64) - (~st.old[b, y])[:, None]  # [n, E]
    ok = ~st.hold[:, y].T & (net < -_TOL) & budget.allows(dm)  # a on y already (a == b too): not a change
    ti, ta = np.nonzero(ok)
    if not len(ti):
        return 0
    load = st.load
    limit = max(cap * load.mean(), load.max()) + _TOL
    order = np.lexsort((ta, slots[ti], net[ti, ta]))
    for lo in range(0, len(order), 64):  # best first, the balance checked 64 candidates at a time
        k = order[lo:lo + 64]
        t, a = slots[ti[k]], ta[k]
        fits = np.flatnonzero((load + st.adds(a)[np.arange(len(k)), st.gpu[t]] + st.d_rem[t]).max(axis=1) <= limit)
        if len(fits):
            f = k[fits[0]]
            st.reassign(int(slots[ti[f]]), int(ta[f]))
            budget.spend(int(dm[ti[f], ta[f]]))
            return 1
    return 0


def check_model(spec: MoESpec, current: Plan) -> None:
    """Raise PlanFileError unless ``spec`` describes the model ``current`` was planned for (``model`` and ``moe``
    alike; the topology and placement may differ: a re-plan keeps the plan's)."""
    if spec.differences(current.spec, ("model", "moe")):
        labels = ("in the given spec", "in the plan's")
        raise PlanFileError(
            f"the current plan was made for spec {current.spec.name!r} but the given spec {spec.name!r} describes "
            f"another model: {spec.differences_shown(current.spec, ('model', 'moe'), labels=labels)}; pass the spec "
            "the plan was made for"
        )


def _not_applied(spec: MoESpec, current: Plan) -> str | None:
    """A note naming the given spec's topology and placement fields that the re-plan does not apply, or None."""
    diff = [d for d in spec.differences(current.spec, ("topology", "placement")) if d[0] != "placement.traces"]
    if not diff:
        return None
    shown = ", ".join(f"{key} ({mine}; the plan's: {theirs})" for key, mine, theirs in diff[:4])
    more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
    return (f"the given spec {spec.name!r} differs from the current plan's in {shown}{more}: not applied. The cluster "
            "and slots are the current plan's (the running layers must be able to load the new plan), and the balance "
            "target and seed its spec's; pass max_imbalance / seed (--max-imbalance, --seed) to change them, or plan "
            "from scratch for another cluster")


def _count(name: str, value: Any) -> int | None:
    """``value`` checked as a whole number >= 0 (None passes); huge ones are fine: no practical limit."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise PlanInfeasible(f"{name} must be an integer >= 0, got {_shown(value)}")
    return int(value)


class ReplanArgs(NamedTuple):
    """``replan``'s tuning arguments, checked (``check_replan_args``)."""

    max_moves: int | None
    max_move_bytes: float | None
    horizon_tokens: float | None
    max_imbalance: float | None
    seed: int | None
    move_target: float | None


def check_replan_args(*, max_moves: Any = None, max_move_bytes: Any = None, horizon_tokens: Any = None,
                      max_imbalance: Any = None, seed: Any = None,
                      move_target: Any = DEFAULT_MOVE_TARGET) -> ReplanArgs:
    """``replan``'s tuning arguments checked (PlanInfeasible naming the argument) and normalised; None passes. For
    callers that store them for later re-plans (``Rebalancer``): refused when given, not at the first re-plan."""
    if seed is not None and not is_integer(seed, 0, 2**63 - 1):  # the spec's and the CLI's range
        raise PlanInfeasible(f"seed must be an integer in [0, 2**63) (it seeds the re-plan's polish), got "
                             f"{_shown(seed)}")
    target = _real("move_target", move_target, 0.0, "a share of the slots, 0 to 1, or None for no target")
    if target is not None and target > 1.0:
        raise PlanInfeasible(f"move_target is a share of the slots, 0 to 1 (0.15: 15%), or None for no target; got "
                             f"{_shown(move_target)}")
    return ReplanArgs(move_target=target, max_moves=_count("max_moves", max_moves),
                      max_move_bytes=_real("max_move_bytes", max_move_bytes, 0.0,
                                           "bytes of expert weights moved over all layers"),
                      horizon_tokens=_real("horizon_tokens", horizon_tokens, 0.0, "tokens the new plan will serve"),
                      max_imbalance=_real("max_imbalance", max_imbalance, 1.0, "a target max/mean GPU load"),
                      seed=None if seed is None else int(seed))


def check_budget_allows_a_move(current: Plan, max_moves: int | None, max_move_bytes: float | None) -> None:
    """PlanInfeasible when a move budget (checked by ``check_replan_args``) cannot pay for the smallest change of
    ``current``: one slot where there are redundant slots (a replica re-assigned), else two (a swap of two
    experts). Such a re-plan keeps the current plan, so callers that store a budget refuse it at once."""
    spec = current.spec
    nbytes = expert_bytes(spec)
    least = 1 if current.num_slots > current.num_experts else 2
    if (max_moves is not None and max_moves < least) or (max_move_bytes is not None and
                                                          max_move_bytes < least * nbytes):
        got = f"max_moves={max_moves}" if max_moves is not None and max_moves < least else \
            f"max_move_bytes={max_move_bytes:g} ({max_move_bytes / 2**30:.3g} GiB)"
        why = "" if least == 1 else (f" (with no redundant slots every change swaps two experts: {least} slots)")
        raise PlanInfeasible(
            f"the move budget {got} allows no change{why}: one expert of {spec.name!r} weighs {nbytes:,} bytes "
            f"({human_bytes(nbytes)}); the current plan stays. Allow at least {least} move{'s' if least > 1 else ''} "
            f"(--max-moves {least}) or {_gib_at_least(least * nbytes)} GiB "
            f"(--max-move-gib {_gib_at_least(least * nbytes)})"
        )


#: where an integer argument stops counting (``_real``): far beyond any budget or horizon, far below overflow
_HUGE = 1e300

#: the most a unit of the co-activation cut is worth in moves (``replan``): far above any move price (link costs
#: are at most 1e9 / 1e-6, the spec's bandwidth range), far below overflow when multiplied by a cut change
_MAX_VALUE_PER_J = 1e100


def _real(name: str, value: Any, lo: float, what: str) -> float | None:
    """``value`` checked as a finite real number >= ``lo`` (None passes); an integer too large for a float
    counts as ``_HUGE`` (no practical limit)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PlanInfeasible(f"{name} must be a number ({what}), got {_shown(value)}")
    if isinstance(value, (int, np.integer)):
        value = float(min(int(value), _HUGE))
    if not (math.isfinite(value) and value >= lo):
        raise PlanInfeasible(f"{name} must be a finite number >= {lo:g} ({what}), got {_shown(value)}")
    return float(value)


def _gib_at_least(nbytes: int) -> str:
    """The shortest decimal number of GiB (3 significant digits) that holds ``nbytes``: rounded up, so that
    ``--max-move-gib`` given it allows the move (a value rounded to nearest could fall just short)."""
    x = nbytes / 2**30
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    value = math.ceil(x / step) * step
    while float(f"{value:.3g}") * 2**30 < nbytes:
        value += step
    return f"{value:.3g}"


def _shown(value: Any) -> str:
    """A wrong argument in a message: a number as given (a huge one by its digit count), anything else as
    ``errors.describe`` shows it."""
    return short_repr(value, 40) if isinstance(value, (int, float, np.number)) else describe(value)


#: layers x experts x GPUs from which a re-plan without a budget repairs its layers in several processes
#: (``forked``): a process starts in milliseconds, a DeepSeek-V3-sized layer takes tens of them
_PARALLEL_WORK = 100_000


def _ratio(st: _Layer) -> float:
    """The layer's max/mean GPU load on the window."""
    load = st.load
    return float(load.max() / max(load.mean(), 1e-12))


def _reallocate_replicas(st: _Layer) -> int:
    """Give the redundant slots to the experts the window's loads call for; returns the slots changed.

    The counts are the load-only planner's (``baselines.replicate_by_load`` of the window's tokens per
    expert); an expert with more replicas than that gives one up (its replica on the least loaded GPU
    that does not hold the receiver) to each expert below its count, the hottest per replica first.
    One slot changes per replica.
    """
    e, g = st.hold.shape
    tokens = st.cnt.sum(axis=0)
    want = replicate_by_load(tokens, len(st.ex), g)
    have = st.hold.sum(axis=1).astype(np.int64)
    changes = 0
    for a in np.lexsort((np.arange(e), -tokens / np.maximum(have, 1))):
        while have[a] < want[a]:
            load = st.load
            donor = (have[st.ex] > want[st.ex]) & ~st.hold[a, st.gpu]  # [S] slots that may take a replica of a
            if not donor.any():
                break
            t = int(np.flatnonzero(donor)[np.argmin(load[st.gpu[donor]])])
            b = int(st.ex[t])
            st.reassign(t, int(a))
            have[a] += 1
            have[b] -= 1
            changes += 1
    return changes


def _priced(st: _Layer, coact: np.ndarray, cost: np.ndarray, value_per_j: float) -> float:
    """What the re-plan minimises within the balance target, for one layer: the link price of its moves
    (in experts over the fastest link) plus its co-activation cut (``_slot_cut_deltas``' J) over the horizon."""
    return _priced_slots(st.ex, st.gpu, st.price, coact, cost, value_per_j)


def _priced_slots(ex: np.ndarray, gpu: np.ndarray, price: np.ndarray, coact: np.ndarray, cost: np.ndarray,
                  value_per_j: float) -> float:
    """``_priced`` of the slot experts ``ex`` [S] on GPUs ``gpu`` [S] (no GPU holds an expert twice), with move
    prices ``price`` [E, G]: for a placement that has no repair state (step 5's options)."""
    r = np.bincount(ex, minlength=len(coact))[ex].astype(np.float64)
    a_rr = coact[np.ix_(ex, ex)] / np.outer(r, r)
    a_rr[ex[:, None] == ex[None, :]] = 0.0  # replicas of one expert are not a pair
    j = 0.5 * float((a_rr * cost[np.ix_(gpu, gpu)]).sum())
    return float(price[ex, gpu].sum()) + value_per_j * j


#: ``_polish``: at most POLISH_ROUNDS rounds per layer (0: no polish), each sending POLISH_KICK moved experts
#: back, stopping after POLISH_PATIENCE rounds in a row that found nothing cheaper. Measured on the robustness
#: harness's ESFT switches (``benchmarks/results/planner_design.md``): 16 rounds without the stop and with it
#: after 5 idle rounds meet the same checks, the stop at about 60% of the CPU; 8 rounds as well; a stop after 3
#: idle rounds loses some.
POLISH_ROUNDS = 16
POLISH_KICK = 2
POLISH_PATIENCE = 5
#: layers of more slots are not polished: a round re-runs steps 1 and 2, whose cost grows faster than the slots
#: squared. A 48-layer model with 128 experts on 2 x 8 GPUs re-planned in 1.0-1.6 s without the polish and 8.7-9.4 s
#: with it, for 5.7% -> 5.6% of the slots moved; the Lite layers (64-72 slots) take 0.37-1.06 s with it.
POLISH_MAX_SLOTS = 96


def _kick(st: _Layer, rng: np.random.Generator, kick: int) -> None:
    """Send ``kick`` moved experts (drawn at random) back to a GPU the current plan holds them on, each by a swap
    with a slot there that holds a newcomer too where there is one (else any slot there)."""
    for s in rng.permutation(np.flatnonzero(~st.old[st.ex, st.gpu]))[:kick]:
        x = int(st.ex[s])
        homes = np.flatnonzero(st.old[x] & ~st.hold[x])
        if st.old[x, st.gpu[s]] or not len(homes):  # an earlier swap of this round sent it home already
            continue
        on_y = np.flatnonzero(st.gpu == homes[rng.integers(len(homes))])
        newcomers = on_y[~st.old[st.ex[on_y], st.gpu[on_y]]]
        pool = newcomers if len(newcomers) else on_y
        t = int(pool[rng.integers(len(pool))])
        if _valid(st, "swap", int(s), t):
            st.swap(int(s), t)


def _polish(st: _Layer, coact: np.ndarray, imb: float, cost: np.ndarray, value_per_j: float,
            rng: np.random.Generator, rounds: int | None = None, kick: int | None = None,
            budget: _Budget | None = None) -> tuple[_Layer, int]:
    """Step 4 of the module docstring on one layer: (the best state found, rounds kept).

    Iterated local search on the re-plan's own measure (``_priced``: moves by link plus the cut over the
    horizon): each round starts from the best state so far, sends ``kick`` of its moved experts back to a
    GPU that holds them in the current plan (``_kick``), repairs the balance and runs step 2 again; the
    result replaces the best if it is no worse balanced on the window than ``st`` (steps 1 and 2's result:
    the polish trades no balance for its savings) and cheaper. The greedy steps stop at a local optimum
    that depends on the order of their choices; undoing a few of them and letting the greedy choose again
    escapes it. It stops after ``POLISH_PATIENCE`` rounds in a row without a better result.
    ``rounds`` / ``kick``: None reads ``POLISH_ROUNDS`` / ``POLISH_KICK``.

    ``budget``: a re-plan's move budget (what the layers before left of it). The layer may then move at most
    the slots it moves now plus what is left, every round's repair and step 2 run within that, and the
    budget is charged (or refunded) the difference. A layer the budget left above the balance target takes
    a better balanced result at any price (the repair's own order: balance first, then cost).
    """
    rounds = POLISH_ROUNDS if rounds is None else rounds
    kick = POLISH_KICK if kick is None else kick
    best, best_cost, best_ratio, kept = st, _priced(st, coact, cost, value_per_j), _ratio(st), 0
    limit = best_ratio + 1e-6  # no worse balanced on the window than the greedy result
    start = _slots_moved(st)
    allowed = None if budget is None or budget.moves is None else start + budget.moves
    idle = 0
    for _ in range(rounds):
        if not _slots_moved(best) or idle >= POLISH_PATIENCE:
            break
        cand = best.copy()
        _kick(cand, rng, kick)
        own = _Budget(None if allowed is None else allowed - _slots_moved(cand))
        _repair_balance(cand, imb, own, coact, cost, value_per_j)
        _improve_comm(cand, coact, cost, value_per_j, imb, own)
        c, r = _priced(cand, coact, cost, value_per_j), _ratio(cand)
        if allowed is not None and best_ratio > imb + 1e-6:  # held above the target by the budget
            better = r < best_ratio - 1e-9 or (r <= best_ratio + 1e-9 and c < best_cost - _TOL)
        else:
            better = r <= limit and c < best_cost - _TOL
        if better:
            best, best_cost, best_ratio, kept, idle = cand, c, r, kept + 1, 0
        else:
            idle += 1
    if budget is not None:
        budget.spend(_slots_moved(best) - start)
    return best, kept


def _steps(st: _Layer, coact: np.ndarray, imb: float, budget: _Budget, cost: np.ndarray,
           value_per_j: float, rng: np.random.Generator | None = None) -> tuple[_Layer, int, int, int]:
    """Steps 1, 2 and 4 on one layer: (the state reached, repairs, communication changes, polish rounds kept).

    Without a move budget, a layer with redundant slots is also re-planned from the current plan with
    its redundant slots first given out by the window's loads (``_reallocate_replicas``), where the
    repair alone stopped above the balance target or the layer is small (at most ``EXACT_MAX_ITEMS``
    slots: the second pass about doubles the layer's time). Of the two results the re-plan keeps the
    better balanced where the first is above the target; else the second only if it is within the
    target too and cheaper by the re-plan's own measure (``_priced``: moves by link plus the cut over
    the horizon). Then, in layers of at most ``POLISH_MAX_SLOTS`` slots without a budget, ``_polish`` with
    ``rng`` (None: no polish).
    """
    start = st.ex.copy()
    r = _repair_balance(st, imb, budget, coact, cost, value_per_j)
    c = _improve_comm(st, coact, cost, value_per_j, imb, budget)
    above = _ratio(st) > imb + 1e-6
    if budget.moves is None and len(st.ex) > st.hold.shape[0] and (len(st.ex) <= EXACT_MAX_ITEMS or above):
        alt = _Layer(ex=start, gpu=st.gpu, old=st.old, cnt=st.cnt, node=st.node, price=st.price)
        r2 = _reallocate_replicas(alt)
        r2 += _repair_balance(alt, imb, budget, coact, cost, value_per_j)
        c2 = _improve_comm(alt, coact, cost, value_per_j, imb, budget)
        if above:
            better = _ratio(alt) < _ratio(st) - 1e-9
        else:
            better = (_ratio(alt) <= imb + 1e-6
                      and _priced(alt, coact, cost, value_per_j) < _priced(st, coact, cost, value_per_j) - _TOL)
        if better:
            st, r, c = alt, r2, c2
    kept = 0
    if budget.moves is None and len(st.ex) <= POLISH_MAX_SLOTS and rng is not None:
        st, kept = _polish(st, coact, imb, cost, value_per_j, rng)
    return st, r, c, kept


def _whole_layers(states: list[_Layer], solved: list[_Layer], kept: np.ndarray, imb: float, budget: _Budget,
                  coacts: list[np.ndarray], cost: np.ndarray, value_per_j: float,
                  water: bool = False) -> tuple[int, set[int]]:
    """Step 3's other way to spend a budget (in place on ``states``; returns the repairs made after the whole layers,
    and which layers were taken whole): the layers of the
    unbudgeted re-plan ``solved`` taken whole, those that lower max/mean on the window the most per slot
    moved first, while they fit; what is left repairs the other layers above the target, worst first (a
    layer with redundant slots also from the window's replica counts, as step 1's second pass, where those
    fit: the better balanced result), or with ``water`` a change at a time to the layer worst balanced then."""
    offers = []
    for layer, (st, done) in enumerate(zip(states, solved)):
        moved, drop = _slots_moved(done), _ratio(st) - _ratio(done)
        if moved and drop > 1e-9:
            offers.append((-drop / moved, layer, moved))
    taken = set()
    for _, layer, moved in sorted(offers):
        if budget.allows(moved):
            states[layer] = solved[layer].copy()
            budget.spend(moved)
            taken.add(layer)
    repairs = 0
    ratio = np.array([_ratio(st) for st in states])
    if water:
        active = {layer for layer in range(len(states))
                  if layer not in taken and not kept[layer] and ratio[layer] > imb + 1e-6}
        while active and budget.moves >= 1:
            layer = max(active, key=lambda i: (_ratio(states[i]), -i))
            allowed = min(2.0, budget.moves)  # one change: a swap, or a replica or two
            step = _Budget(allowed)
            made = _repair_balance(states[layer], imb, step, coacts[layer], cost, value_per_j)
            budget.spend(allowed - step.moves)
            repairs += made
            if not made or _ratio(states[layer]) <= imb + 1e-6:
                active.discard(layer)
        return repairs, taken
    for layer in np.lexsort((np.arange(len(states)), -ratio)):
        if layer in taken or kept[layer] or ratio[layer] <= imb + 1e-6 or budget.moves < 1:
            continue
        start = states[layer]
        st, left = start.copy(), _Budget(budget.moves)
        r = _repair_balance(st, imb, left, coacts[layer], cost, value_per_j)
        if len(start.ex) > start.hold.shape[0]:  # redundant slots: from the window's replica counts too
            alt = start.copy()
            r2 = _reallocate_replicas(alt)
            if budget.allows(_slots_moved(alt)):
                left2 = _Budget(budget.moves - _slots_moved(alt))
                r2 += _repair_balance(alt, imb, left2, coacts[layer], cost, value_per_j)
                if _ratio(alt) < _ratio(st) - 1e-9:
                    st, left, r = alt, left2, r2
        states[layer] = st
        budget.moves = left.moves
        repairs += r
    return repairs, taken


def _layer_rng(seed: int, layer: int) -> np.random.Generator:
    """The polish's random draws of one layer: from the seed and the layer alone, so that a layer's result does not
    depend on the order (or the process) in which the layers are re-planned."""
    return np.random.default_rng([int(seed), int(layer)])


def _steps_in_processes(work: tuple, order: np.ndarray, workers: int) -> np.ndarray:
    """``_steps`` on every layer, the layers shared out among ``workers`` forked processes (``forked``); returns
    [L, 3] each layer's (repairs, swaps, polish rounds kept).

    Without a move budget the layers do not interact (the copies-per-cut rate is measured before), so
    each layer's result is the one the sequential loop gives, bit for bit; the processes inherit the
    layer states by forking and send back each layer's slot experts and loads; the holdings are derived
    here (the change tables are not refreshed: nothing reads them after step 4). Layers are handed out in
    the order of their balance, worst first, so that the slow layers start first.
    """
    states, coacts, imb, budget, cost, value_per_j, seed = work

    def one(layer: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
        with one_blas_thread():
            st, *counts = _steps(states[layer], coacts[layer], imb, budget, cost, value_per_j, _layer_rng(seed, layer))
        return st.ex, st.contrib, tuple(counts)

    layers = [int(x) for x in order]
    counts = np.zeros((len(states), 3), np.int64)
    for layer, (ex, contrib, cnt) in zip(layers, map_forked(one, layers, workers)):
        st = states[layer]
        st.ex, st.contrib = ex, contrib
        st.hold = np.zeros_like(st.hold)
        st.hold[ex, st.gpu] = True
        counts[layer] = cnt
    return counts


# ------------------------------------------------------------------------------------------------
# step 5: the move target
# ------------------------------------------------------------------------------------------------

#: a layer's moved one-replica experts are re-assigned by an exact solver (``_send_home``) only where there are at
#: most this many (the assignment has their number x the GPUs of variables); a DeepSeek-V3-sized layer that moves
#: 10% of its 288 slots has about 29
SEND_HOME_MAX_EXPERTS = 64
#: branch-and-bound nodes per solve: a bound, not a time limit, so that the result is the same on any machine
_SEND_HOME_NODES = 2000


def _send_home(st: _Layer, coact: np.ndarray, cost: np.ndarray, value_per_j: float) -> list[tuple[int, np.ndarray]]:
    """Step 5's options for one layer: [(slots given back, slot experts [S])], each moving fewer slots than ``st``.

    The layer's moved experts of one replica (on a GPU that did not hold them) are re-assigned among the slots
    they hold now, so that fewer of them move: every GPU keeps its number of such slots, and none takes more
    window load than the layer's most loaded GPU carries now (the layer's max/mean on the window does not rise).
    Replicated experts stay (their load depends on where all their replicas are). For each number of moves
    from one below the current down to the fewest, an exact solver (HiGHS branch and bound,
    ``scipy.optimize.milp``) finds the assignment of least link price plus co-activation cut over the horizon,
    the cut counted against the slots that stay (``_priced`` then measures each result exactly).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    reps = st.hold.sum(axis=1)
    slots = np.flatnonzero(~st.old[st.ex, st.gpu] & (reps[st.ex] == 1))
    n = len(slots)
    if n < 2 or n > SEND_HOME_MAX_EXPERTS:
        return []
    ex = st.ex[slots]
    gpus, per = np.unique(st.gpu[slots], return_counts=True)  # the GPUs with such slots, and how many each
    home = st.old[ex][:, gpus]  # [n, m]: expert i does not move if it is on GPU y
    if not home.any():
        return []  # none of them has a home among these GPUs
    g, m = st.hold.shape[1], len(gpus)
    w = st.cnt[:, ex].sum(axis=0)  # [n] window load of each (all of it follows the one replica)
    load = st.load
    cap = float(load.max())
    stay = np.ones(len(st.ex), bool)
    stay[slots] = False
    a = coact[np.ix_(ex, st.ex[stay])] / reps[st.ex[stay]][None, :]  # [n, staying slots]
    on_gpu = np.zeros((int(stay.sum()), g))
    on_gpu[np.arange(int(stay.sum())), st.gpu[stay]] = 1.0
    cut = ((a @ on_gpu) @ cost.T)[:, gpus]  # [n, m] cut of expert i on GPU y against the slots that stay
    price = (st.price[ex][:, gpus] + value_per_j * cut).ravel()
    # x[i, y] = 1: expert i takes one of GPU y's slots. Each expert one GPU, each GPU as many as it has slots; per
    # GPU, the load of the experts it takes at most the most loaded GPU's now, less what its other slots carry.
    one_each = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
    per_gpu = np.kron(w, np.eye(m))
    room = np.array([cap - (load[y] - w[st.gpu[slots] == y].sum()) for y in gpus]) + 1e-9 * max(cap, 1.0)
    moves = (~home).ravel().astype(np.float64)[None, :]
    fixed = [LinearConstraint(one_each, np.r_[np.ones(n), per], np.r_[np.ones(n), per]),
             LinearConstraint(per_gpu, -np.inf, room)]
    options, allowed = [], n - 1  # all n move now
    while allowed >= 0:
        res = milp(price, integrality=np.ones(n * m), bounds=Bounds(0.0, 1.0),
                   constraints=[*fixed, LinearConstraint(moves, -np.inf, allowed + 0.5)],
                   options={"node_limit": _SEND_HOME_NODES, "presolve": True})
        if res.x is None:
            break  # infeasible (fewer moves break the load limit), or no assignment found within the nodes
        x = np.rint(res.x).reshape(n, m).astype(bool)
        if not ((x.sum(axis=1) == 1).all() and (x.sum(axis=0) == per).all()):
            break
        to = gpus[x.argmax(axis=1)]  # [n] each expert's GPU
        new = st.ex.copy()
        for y in gpus:  # GPU y's slots take its experts, the ones already there in their own slots
            here = slots[st.gpu[slots] == y]
            mine = ex[to == y]
            keep = np.isin(st.ex[here], mine)
            new[here[~keep]] = np.setdiff1d(mine, st.ex[here])
        made = int((~home[x]).sum())
        options.append((n - made, new))
        allowed = made - 1
    return options


def _meet_move_target(states: list[_Layer], layers: np.ndarray, coacts: list[np.ndarray], cost: np.ndarray,
                      value_per_j: float, target: int, workers: int = 1) -> tuple[int, int]:
    """Step 5 (in place on ``states``): while the re-plan moves more than ``target`` slots over all layers, give
    moves back (``_send_home``) where they cost the least. Returns (slots given back, layers changed).

    Each layer offers its options (slots given back, and the rise of ``_priced``: link price plus the cut over
    the horizon); one option per layer is chosen so that the slots given back reach what the re-plan moves
    beyond the target (or the most the options allow) at the least total rise: a multiple-choice knapsack,
    solved exactly by dynamic programming over the slots given back. Balance on the window is not given up.
    The layers' options are found by ``workers`` forked processes (``forked``; the same result).
    """
    need = sum(_slots_moved(st) for st in states) - target
    if need <= 0:
        return 0, 0

    def options(layer: int) -> list[tuple[int, float, np.ndarray]]:
        st, coact = states[layer], coacts[layer]
        base = _priced(st, coact, cost, value_per_j)
        with one_blas_thread():
            return [(saved, _priced_slots(ex, st.gpu, st.price, coact, cost, value_per_j) - base, ex)
                    for saved, ex in _send_home(st, coact, cost, value_per_j)]

    todo = sorted(int(x) for x in layers if _slots_moved(states[int(x)]) >= 2)
    offers = [(layer, opts) for layer, opts in zip(todo, map_forked(options, todo, min(workers, max(len(todo), 1))))
              if opts]
    cap = min(need, sum(max(s for s, _, _ in opts) for _, opts in offers))
    if cap <= 0:
        return 0, 0
    # best[s]: least rise giving back s slots (s = cap: at least cap) with the layers so far; pick[k][s]: the option
    # of offer k on that path (-1: none)
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    pick = []
    for _, opts in offers:
        nxt, choice = best.copy(), np.full(cap + 1, -1)
        prev = np.full(cap + 1, -1)
        for o, (saved, rise, _) in enumerate(opts):
            for s in np.flatnonzero(np.isfinite(best)):
                t = min(int(s) + saved, cap)
                if best[s] + rise < nxt[t] - _TOL:
                    nxt[t], choice[t], prev[t] = best[s] + rise, o, s
        pick.append((choice, prev))
        best = nxt
    s, given, changed = cap, 0, 0
    for (layer, opts), (choice, prev) in zip(reversed(offers), reversed(pick)):
        if choice[s] < 0:
            continue  # this layer kept its result on the path to s
        saved, _, ex = opts[choice[s]]
        st = states[layer]
        states[layer] = _Layer(ex=ex, gpu=st.gpu, old=st.old, cnt=st.cnt, node=st.node, price=st.price)
        given, changed, s = given + saved, changed + 1, int(prev[s])
    return given, changed


def _window(spec: MoESpec, traces: Any) -> TraceSet:
    """The traffic window, checked once where it enters (``traces_for_spec``), with tokens."""
    ts = traces_for_spec(traces, spec)
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
    processes: int | None = None,
    move_target: float | None = DEFAULT_MOVE_TARGET,
) -> Plan:
    """A new plan for the traffic ``traces`` (a window), warm-started from ``current_plan``, moves priced.

    spec: the model's spec (a MoESpec, preset name, spec file or dict; checked against the plan's model);
        None: the plan's own. The cluster, slot count, balance target and seed are the current plan's (a
        note names the given spec's topology and placement fields that differ and are not applied).
    traces: a TraceSet (or what ``load_traces`` accepts) of the recent traffic, with tokens.
    max_moves / max_move_bytes: budget of slots / bytes moved over all layers (None: priced only).
    seed: seeds the polish's random draws (step 4 of the module docstring; default: the spec's
        placement.seed); recorded in the policy.
    max_imbalance: target max/mean GPU load on the window (default: the spec's placement.max_imbalance
        less WINDOW_MARGIN).
    horizon_tokens: tokens the new plan is expected to serve (default DEFAULT_HORIZON_TOKENS): a swap's
        dispatch + combine saving is counted over them against its move cost.
    processes: how many processes repair the layers of a re-plan without a move budget (same result);
        None: one per usable core on Linux where the re-plan is large enough to gain (``forked``), else 1.
        A caller that is itself one of several processes per host (a rank) passes 1.
    move_target: share of all the slots (0 to 1) the re-plan aims to move at most where no budget binds
        (default DEFAULT_MOVE_TARGET): above it, moved experts are sent home at no loss of balance on the
        window, where that costs the least co-activation saving (step 5 of the module docstring). None: no
        target. Unlike ``max_moves``, never met at the cost of balance: it can be exceeded.

    The Plan's ``policy["migration"]`` holds what moves (``Migration.summary``).
    """
    require_plan("current_plan", current_plan)
    spec_notes = []
    if spec is not None:
        given = load_spec(spec, source="spec")  # a MoESpec, preset name, spec file or dict, as ``plan`` takes
        check_model(given, current_plan)  # before the window: a plan of another model is the problem, not the traces
        note = _not_applied(given, current_plan)
        spec_notes = [note] if note else []
    spec = current_plan.spec
    max_moves, max_move_bytes, horizon_tokens, max_imbalance, seed, move_target = check_replan_args(
        max_moves=max_moves, max_move_bytes=max_move_bytes, horizon_tokens=horizon_tokens, max_imbalance=max_imbalance,
        seed=seed, move_target=move_target)
    if processes is not None and not is_integer(processes, 1):
        raise PlanInfeasible(f"processes is a count of processes (>= 1, or None for automatic), got {_shown(processes)}")
    check_budget_allows_a_move(current_plan, max_moves, max_move_bytes)
    nbytes = expert_bytes(spec)
    ts = _window(spec, traces)
    imb = max(1.0, spec.placement.max_imbalance - WINDOW_MARGIN) if max_imbalance is None else float(max_imbalance)
    horizon = DEFAULT_HORIZON_TOKENS if horizon_tokens is None else float(horizon_tokens)
    cl = current_plan.cluster
    g, e, spg = cl.num_gpus, spec.moe.experts.num_experts, current_plan.slots_per_gpu
    cost = _move_cost(cl)
    src = source_gpus(ts, g)
    k = ts.top_k
    tb = sum(copy_bytes(spec))  # bytes of one token's dispatch + combine copies (FP8 dispatch is smaller)
    limits = [x for x in (max_moves, None if max_move_bytes is None else max_move_bytes // nbytes) if x is not None]
    # a budget beyond every slot of every layer never binds: counted as that, it stays a float
    budget = _Budget(float(min(*limits, current_plan.num_layers * current_plan.num_slots)) if limits else None)
    states = []
    for layer in range(current_plan.num_layers):
        ids = np.asarray(ts.topk[layer], np.int64)
        cnt = np.bincount(np.repeat(src, k) * e + ids.ravel(), minlength=g * e).reshape(g, e).astype(np.float64)
        row = current_plan.physical_to_logical_map[layer]
        old = _holds(row, g, e).T.copy()  # [E, G]
        states.append(_Layer(ex=row.copy(), gpu=np.arange(len(row)) // spg, old=old, cnt=cnt, node=cl.node_of_gpu,
                             price=_prices(old, cost)))
    coacts = [coactivation(np.asarray(ts.topk[layer], np.int64), e) / max(ts.num_tokens, 1)
              for layer in range(current_plan.num_layers)]
    # Worst layers first, so that a budget goes where balance is worst.
    ratio = np.array([_ratio(s) for s in states])
    order = np.lexsort((np.arange(len(states)), -ratio))
    # Step 0: layers within the window's sampling noise of the target, or within the spec's own, keep their placement.
    floor = noise_floor(g, ts.num_tokens, k)
    trigger = max(imb + floor, spec.placement.max_imbalance if max_imbalance is None else imb)
    kept = ratio <= trigger
    # Expert-choice routing gives every expert the same number of tokens from every rank's batch (its capacity):
    # the load is balanced by construction, and its traces hold a top-k proxy of the scores, not the assignments
    # (``semantics``): balance is no reason to move a weight there, and the proxy no sound one.
    expert_choice = spec.moe.router.type == "expert_choice"
    if expert_choice:
        kept[:] = True
    order = order[~kept[order]]
    with one_blas_thread():  # many small products: BLAS threads cost more than they gain (``blas``)
        # A unit of J (the cut per token) over the horizon, dispatch + combine, in experts moved over the
        # fastest link: J measured in copies (``_copies_per_cut``), copies in token bytes.
        rate = _copies_per_cut(states, ts, cost, host_copy_weight(cl)) if horizon > 0 else 0.0
        # Capped where moves are already free beside any cut change: a horizon of 1e300 tokens would otherwise
        # overflow the costs to inf (and inf x 0 to NaN)
        value_per_j = min(horizon * tb / nbytes * rate, _MAX_VALUE_PER_J)
        seed = spec.placement.seed if seed is None else int(seed)
        workers = (fork_workers(len(states), len(states) * g * e, _PARALLEL_WORK) if processes is None
                   else int(processes))

        target = None if move_target is None else math.floor(move_target * len(states) * current_plan.num_slots + 1e-9)

        def unbudgeted(states: list[_Layer]) -> tuple[np.ndarray, tuple[int, int]]:
            """Steps 1-5 on ``states`` (in place) without a budget: ([L, 3] each layer's (repairs, swaps, polish
            rounds kept), step 5's (slots given back, layers changed))."""
            if workers > 1:
                work = (states, coacts, imb, _Budget(None), cost, value_per_j, seed)
                counts = _steps_in_processes(work, order, min(workers, len(states)))
            else:
                counts = np.zeros((len(states), 3), np.int64)
                for layer in order:
                    states[layer], *counts[layer] = _steps(states[layer], coacts[layer], imb, _Budget(None), cost,
                                                           value_per_j, _layer_rng(seed, layer))
            given = (0, 0) if target is None else _meet_move_target(states, order, coacts, cost, value_per_j, target,
                                                                      workers)
            return counts, given

        fits, allocation = None, None
        if budget.moves is not None:
            # A budget that the unbudgeted re-plan fits in does not bind: that plan, not another search's (the
            # budgeted steps share the budget out over the layers, and differ even when it is never reached)
            trial = [st.copy() for st in states]
            counts, given = unbudgeted(trial)
            if sum(_slots_moved(st) for st in trial) <= budget.moves + _TOL:
                fits = trial, counts, given
        budget_bound = budget.moves is not None and fits is None
        given = (0, 0)
        if budget.moves is None:
            counts, given = unbudgeted(states)
            repairs, swaps, polished = (int(x) for x in counts.sum(axis=0))
        elif fits is not None:
            states, (repairs, swaps, polished), given = fits[0], (int(x) for x in fits[1].sum(axis=0)), fits[2]
        else:
            shared, shared_budget = [st.copy() for st in states], _Budget(budget.moves)
            polished = 0
            repairs = sum(_repair_balance(shared[layer], imb, shared_budget, coacts[layer], cost, value_per_j)
                          for layer in order)
            swaps = sum(_improve_comm(shared[layer], coacts[layer], cost, value_per_j, imb, shared_budget)
                        for layer in order)
            for layer in order:  # step 4 within what the budget leaves, worst balanced layer first
                if len(shared[layer].ex) <= POLISH_MAX_SLOTS:
                    shared[layer], rounds = _polish(shared[layer], coacts[layer], imb, cost, value_per_j,
                                                    _layer_rng(seed, layer), budget=shared_budget)
                    polished += rounds
            # what step 2 and the polish gave back goes to the layers still above the target, worst first
            ratio = np.array([_ratio(s) for s in shared])
            for layer in np.lexsort((np.arange(len(shared)), -ratio)):
                if not kept[layer] and ratio[layer] > imb + 1e-6 and shared_budget.moves >= 1:
                    repairs += _repair_balance(shared[layer], imb, shared_budget, coacts[layer], cost, value_per_j)
            # or whole layers of the unbudgeted re-plan, the most balance per slot first: the better balanced
            best = (np.mean([_ratio(st) for st in shared]), shared, shared_budget, repairs, swaps, polished, "shared")
            for water in (False, True):  # the rest worst layer first, or a change at a time to the worst then
                whole, whole_budget = [st.copy() for st in states], _Budget(budget.moves)
                made, taken = _whole_layers(whole, trial, kept, imb, whole_budget, coacts, cost, value_per_j,
                                            water=water)
                mean = np.mean([_ratio(st) for st in whole])
                if mean < best[0] - 1e-9:
                    r, c, rounds = (int(x) for x in counts[sorted(taken)].sum(axis=0))  # the whole layers' own
                    best = (mean, whole, whole_budget, made + r, c, rounds, "whole layers, then a change at a time"
                            if water else "whole layers, then worst layer first")
            _, states, budget, repairs, swaps, polished, allocation = best
    rows = []
    for layer, st in enumerate(states):
        rows.append(_align_slots(st.ex, current_plan.physical_to_logical_map[layer], g))
    notes = [f"re-planned from the current plan ({current_plan.policy.get('name', 'unnamed')}) on {ts.name} "
             f"({ts.num_tokens} tokens)", *spec_notes]
    if expert_choice:
        notes.append("expert-choice routing balances the load by construction (every expert takes its capacity of "
                     "each batch's tokens) and its traces record a top-k proxy, not the assignments: every layer kept")
    elif kept.any() and trigger > imb + floor:
        notes.append(f"{int(kept.sum())} of {len(states)} layers kept as they are: within the spec's max_imbalance "
                     f"({trigger:.3f}) on the window")
    elif kept.any():
        notes.append(f"{int(kept.sum())} of {len(states)} layers kept as they are: within the window's sampling noise of "
                     f"the balance target (max/mean {trigger:.3f} or less on {ts.num_tokens} tokens; a longer window "
                     "resolves smaller imbalances)")
    after = np.array([_ratio(s) for s in states])
    above = (after > imb + 1e-6) & ~kept
    if above.any():
        why = "the move budget" if budget_bound else "the allowed changes"
        notes.append(f"{int(above.sum())} of {len(states)} layers stay above max/mean {imb:g} on the "
                     f"window (worst {after[above].max():.3f}) within {why}")
    moved = sum(_slots_moved(st) for st in states)
    if target is not None and not budget_bound and (given[0] or moved > target):
        total = len(states) * current_plan.num_slots
        head = f"move target {100 * move_target:.4g}% of the slots ({target:,} of {total:,})"
        done = (f"{given[0]:,} moved slots given back in {given[1]} layers, moved experts sent home at the same "
                "balance on the window for some co-activation saving" if given[0] else "no moved slot can be "
                "given back without giving up balance on the window")
        rest = "" if moved <= target else f"; {moved:,} slots still move: the balance needs them"
        notes.append(f"{head}: {done}{rest} (move_target=None / --move-target off: moves priced only)")
    policy = {
        "name": "incremental-replan",
        "why": "warm-started from the current plan (layers within the window's sampling noise of the target, or within "
               "the spec's max_imbalance, kept; every layer of expert-choice routing): "
               "priced balance repair (dispatch rule's expected loads on the "
               "window), then priced co-activation swaps and replica re-assignments; per layer with redundant slots, "
               "the same from the window's replica counts where that is cheaper or better balanced; then an iterated "
               "local search on the same measure (seeded; under a budget, within each layer's share, and the slots "
               "it frees repair the layers still above the target; or whole layers of the unbudgeted re-plan, "
               "the better balanced kept); moves cost their weight bytes over the "
               "topology's links",
        "seed": seed,
        "max_imbalance": imb,
        "noise_floor": round(floor, 6),
        "keep_at": round(trigger, 6),
        "layers_kept": int(kept.sum()),
        "horizon_tokens": horizon,
        "copies_per_cut": round(rate, 6),
        "max_moves": max_moves,
        "max_move_bytes": max_move_bytes,
        "move_target": move_target,
        "moves_given_back": int(given[0]),  # by the move target (step 5)
        "budget_allocation": allocation,  # how a binding budget was spent (step 3)
        "from_policy": current_plan.policy.get("name"),
        "traces": ts.name,
        "balance_changes": int(repairs),
        "comm_changes": int(swaps),
        "polish_rounds_kept": int(polished),
    }
    p = Plan(np.stack(rows), spec, policy=policy, notes=notes)
    p.policy["migration"] = migration(current_plan, p).summary()
    return p
