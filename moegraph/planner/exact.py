"""Exact refinement: swap experts by the change of copies on the wire, not of the pairwise proxy.

The search (``search``) minimises a pairwise cut: a token whose K experts sit on m GPUs costs the
pairs of its experts that are split across GPUs. What dispatch sends is one copy per distinct
remote GPU (and one per distinct remote host), so once the pairwise descent stops, this step keeps
swapping unreplicated experts while a swap lowers the exact expected copies per token on the
planning traffic, under the same balance and covariance constraints as the search.

Objective. Tokens start on every GPU equally (the round-robin spread of sequences; fitting the
trace's own sequence-to-GPU assignment would only learn where a few sequences happened to land), so
a token served by D distinct GPUs on H distinct hosts sends, in expectation,

    (1 - 1/G) * D  +  host_weight * (1 - 1/N) * H

copies (the own GPU's and own host's copies are free). A replicated expert does not move here; a
token's copy to it is taken to go to each of its r replicas with probability 1/r. With one host and
sources spread evenly that is exactly the rule's marginal per GPU (1/G from tokens on the replica's
own GPU plus (G - r)/G x 1/r from the others); what it ignores is that the local choice correlates
with the token's own GPU, and, across hosts, that the rule prefers a replica in the token's host.

Gains in closed form, per level (GPUs, then hosts). Let c[t, g] count the unreplicated experts of
token t at location g, q[t, g] the probability that none of its replicated experts is served there,
and w[t] the token's weight. Moving expert i from a to b changes the token's expected distinct
count by -U[t, a] + Z[t, b] with U = w [c == 1] q and Z = w [c == 0] q. For a swap of i (on a) and j
(on b) the two moves add up, except for tokens holding both i and j, whose count does not change:
those get +U[t, a] + U[t, b] back. All of it is a few bincounts over the (token, expert) incidences
and the (token, expert, expert) pairs: a few milliseconds per step for a 64-expert layer and 8k
tokens.

Replicated items move only in the search's final balance repair, which prices a few candidate swaps
each (``swap_delta``): the same expectation written as 1 - prod over a token's experts of (1 - the
expert's share of replicas at the location), updated on the two experts' tokens only.

Legend: T tokens, K experts per token, R items (replicas) of the search, G GPUs, N hosts.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np

__all__ = ["ExactCopies", "refine"]

_TOL = 1e-12


class _SearchState(Protocol):
    experts: np.ndarray  # [R] expert of each item
    gpu: np.ndarray  # [R] GPU of each item

    def allowed(self, cap_S: np.ndarray, cap_var: float, rows: np.ndarray | None = None) -> np.ndarray: ...

    def allowed_pairs(self, cap_S: np.ndarray, cap_var: float, i: np.ndarray, j: np.ndarray) -> np.ndarray: ...

    def swap(self, i: int, j: int) -> None: ...


class ExactCopies:
    """Expected remote copies per token of the planning traffic, and every swap's exact change of it.

    topk_TK: [T, K] experts each token chose (all sources stacked); weight_T: [T] each token's weight
    (1 / tokens of its source / sources, so that sources weigh equally); experts_R: [R] expert of each
    search item; node_of_gpu: [G]; host_weight: weight of a host copy relative to a GPU copy.
    """

    def __init__(self, topk_TK: np.ndarray, weight_T: np.ndarray, experts_R: np.ndarray, node_of_gpu: np.ndarray,
                 host_weight: float = 1.0):
        topk_TK = np.asarray(topk_TK, np.int64)
        t, k = topk_TK.shape
        e = int(max(experts_R.max(), topk_TK.max(initial=0))) + 1
        self.node = np.asarray(node_of_gpu, np.int64)
        self.g, self.n = len(self.node), int(self.node.max()) + 1
        self.w = np.asarray(weight_T, np.float64)
        self.experts = np.asarray(experts_R, np.int64)
        self.reps = np.bincount(self.experts, minlength=e)
        r = len(self.experts)
        #: items that may move here: the only replica of their expert
        self.movable = np.flatnonzero(self.reps[self.experts] == 1)
        item_of = np.full(e, -1, np.int64)
        item_of[self.experts[self.movable]] = self.movable
        single = self.reps[topk_TK] == 1  # [T, K]
        tok = np.repeat(np.arange(t), k).reshape(t, k)
        # (token, item) incidences of unreplicated experts; (token, replicated expert) ones for q.
        self.inc_t, self.inc_i = tok[single], item_of[topk_TK[single]]
        # Incidences grouped by item, for per-item sums of per-token rows (np.add.reduceat).
        by_item = _stable_order(self.inc_i, r)
        self.inc_t, self.inc_i = self.inc_t[by_item], self.inc_i[by_item]
        self.seg_items, self.seg_start = np.unique(self.inc_i, return_index=True)
        self.rep_t, self.rep_e = tok[~single], topk_TK[~single]
        # (token, item, item) for every pair of unreplicated experts one token chose.
        a, b = np.triu_indices(k, 1)
        both = single[:, a] & single[:, b]
        self.pair_t = np.broadcast_to(np.arange(t)[:, None], both.shape)[both]
        self.pair_i = item_of[topk_TK[:, a][both]]
        self.pair_j = item_of[topk_TK[:, b][both]]
        self.r, self.t = r, t
        self.levels = [(1.0 - 1.0 / self.g, self.g, lambda gpu: gpu)]
        if self.n > 1 and host_weight > 0:
            self.levels.append((host_weight * (1.0 - 1.0 / self.n), self.n, lambda gpu: self.node[gpu]))
        self._q_for: bytes | None = None
        self._factors_for: bytes | None = None
        self.topk = topk_TK

    def _q(self, gpu_R: np.ndarray) -> list[np.ndarray]:
        """Per level, [T, locations] probability that none of a token's replicated experts is served there."""
        key = gpu_R[self.reps[self.experts] > 1].tobytes()
        if self._q_for != key:
            out = []
            for _, nl, loc_of in self.levels:
                logq = np.zeros(self.t * nl)
                for ex in np.flatnonzero(self.reps > 1):
                    share = np.bincount(loc_of(gpu_R[self.experts == ex]), minlength=nl) / self.reps[ex]
                    toks = self.rep_t[self.rep_e == ex]
                    with np.errstate(divide="ignore"):
                        f = np.log1p(-share)
                    for loc in np.flatnonzero(share):
                        np.add.at(logq, toks * nl + loc, f[loc])
                out.append(np.exp(logq).reshape(self.t, nl))
            self._q_for, self._q_cache = key, out
        return self._q_cache

    def value(self, gpu_R: np.ndarray) -> float:
        """Expected remote copies per token (GPU copies + host_weight x host copies) of the placement."""
        total = 0.0
        for (fac, nl, loc_of), q in zip(self.levels, self._q(gpu_R)):
            c = np.bincount(self.inc_t * nl + loc_of(gpu_R)[self.inc_i], minlength=self.t * nl).reshape(self.t, nl)
            served = np.where(c > 0, 1.0, 1.0 - q)
            total += fac * float(self.w @ served.sum(axis=1))
        return total

    @functools.cached_property
    def _chose(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ``swap_delta`` only (built on its first call): which tokens chose which expert, as a dense
        [E, T] matrix and as token lists by expert (tokens, [E + 1] offsets)."""
        t, k = self.topk.shape
        e = len(self.reps)
        flat = self.topk.ravel()
        chose = np.zeros((e, t))
        chose[flat, np.repeat(np.arange(t), k)] = 1.0
        return chose, _stable_order(flat, e) // k, np.r_[0, np.cumsum(np.bincount(flat, minlength=e))]

    def _factors(self, gpu_R: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per level: F [E, L] = 1 - fraction of each expert's replicas at each location, and per
        location and token the number of the token's experts with F == 0 and the sum of log F over the
        others ([L, T] each)."""
        key = gpu_R.tobytes()
        if self._factors_for != key:
            out = []
            for _, nl, loc_of in self.levels:
                f = 1.0 - np.bincount(loc_of(gpu_R) * len(self.reps) + self.experts,
                                      minlength=nl * len(self.reps)).reshape(nl, -1) / np.maximum(self.reps, 1)
                zero = f <= _TOL  # [L, E]
                with np.errstate(divide="ignore"):
                    logf = np.where(zero, 0.0, np.log(f))
                # Sums over each token's experts as products with the [E, T] choice matrix (exact for
                # the counts, which are small integers).
                chose = self._chose[0]
                out.append((f.T.copy(), np.rint(zero @ chose), logf @ chose))
            self._factors_for, self._factors_cache = key, out
        return self._factors_cache

    def swap_delta(self, gpu_R: np.ndarray, i: int, j: int) -> float:
        """Exact change of ``value`` when items i and j trade GPUs, replicated items included.

        With F[e, loc] = 1 - (fraction of expert e's replicas at loc), a token is served at loc with
        probability 1 - prod over its experts of F[e, loc] (``value`` in one formula). Only the tokens
        that chose either expert and only the two locations involved change; each token's product is
        kept as (count of zero factors, sum of log of the others), so a swap updates two factors.
        Cost: O(tokens of the two experts) after an O(T K) preparation per placement (``_factors``).
        """
        ei, ej = int(self.experts[i]), int(self.experts[j])
        if ei == ej or gpu_R[i] == gpu_R[j]:
            return 0.0
        _, tok_of, tok_ptr = self._chose
        ti = tok_of[tok_ptr[ei]:tok_ptr[ei + 1]]
        tj = tok_of[tok_ptr[ej]:tok_ptr[ej + 1]]
        i_has_j = (self.topk[ti] == ej).any(axis=1)
        tj = tj[~(self.topk[tj] == ei).any(axis=1)]  # tokens with both experts are among ti
        toks = np.concatenate([ti, tj])
        has = ((np.r_[np.ones(len(ti)), np.zeros(len(tj))], ei), (np.r_[i_has_j, np.ones(len(tj))], ej))
        total = 0.0
        for (fac, _, loc_of), (f, zeros, logs) in zip(self.levels, self._factors(gpu_R)):
            la, lb = (int(x) for x in loc_of(gpu_R[[i, j]]))
            if la == lb:
                continue
            # i leaves la for lb: its expert's factor rises by 1 / r at la and falls at lb; j the reverse.
            for loc, sign in ((la, 1.0), (lb, -1.0)):
                z, lg = zeros[loc, toks], logs[loc, toks]
                before = np.where(z == 0, np.exp(lg), 0.0)
                for (h, ex), step in zip(has, (sign, -sign)):
                    old = f[ex, loc]
                    new = old + step / self.reps[ex]
                    z = z + h * (float(new <= _TOL) - float(old <= _TOL))
                    lg = lg + h * ((np.log(new) if new > _TOL else 0.0) - (np.log(old) if old > _TOL else 0.0))
                after = np.where(z == 0, np.exp(lg), 0.0)
                total += fac * float(self.w[toks] @ (before - after))
        return total

    def swap_gains(self, gpu_R: np.ndarray) -> np.ndarray:
        """[R, R] exact change of ``value`` when items i and j trade GPUs (0 where either may not move)."""
        r = self.r
        out = np.zeros((r, r))
        for (fac, nl, loc_of), q in zip(self.levels, self._q(gpu_R)):
            loc = loc_of(gpu_R)
            c = np.bincount(self.inc_t * nl + loc[self.inc_i], minlength=self.t * nl).reshape(self.t, nl)
            wq = self.w[:, None] * q
            u = np.where(c == 1, wq, 0.0)
            z = np.where(c == 0, wq, 0.0)
            # move[i, g]: change if item i alone moved to g
            into = np.zeros((r, nl))
            if len(self.inc_t):
                into[self.seg_items] = np.add.reduceat(z[self.inc_t], self.seg_start, axis=0)
            away = np.bincount(self.inc_i, weights=u.ravel()[self.inc_t * nl + loc[self.inc_i]], minlength=r)
            move = into - away[:, None]
            d = move[:, loc] + move[:, loc].T
            uf = u.ravel()
            base = self.pair_t * nl
            back = uf[base + loc[self.pair_i]] + uf[base + loc[self.pair_j]]
            corr = np.bincount(self.pair_i * r + self.pair_j, weights=back, minlength=r * r).reshape(r, r)
            d += corr + corr.T
            d[loc[:, None] == loc[None, :]] = 0.0
            out += fac * d
        fixed = np.ones(r, bool)
        fixed[self.movable] = False
        out[fixed] = 0.0
        out[:, fixed] = 0.0
        return out


def refine(st: _SearchState, model: ExactCopies, cap_S: np.ndarray, cap_var: float, min_gain: float = 0.0,
           max_steps: int = 10000) -> int:
    """Swap unreplicated items by exact gain until no allowed swap lowers the expected copies.

    Allowed: what ``st.allowed`` (``allowed_pairs``) allows under the search's balance caps and covariance bound.
    Each step applies the best swaps on pairwise disjoint GPUs together (their balance and covariance
    checks are then independent) if together they lower the copies, else the single best one; swaps
    gaining less than ``min_gain`` are not taken. Returns the number of swaps made.
    """
    rows = model.movable
    if len(rows) < 2:
        return 0
    swaps = 0
    for _ in range(max_steps):
        gain = model.swap_gains(st.gpu)[rows][:, rows]
        mi, mj = np.nonzero(np.triu(gain < -max(min_gain, _TOL), 1))
        ok = st.allowed_pairs(cap_S, cap_var, rows[mi], rows[mj])  # the constraints, on the improving swaps only
        mi, mj = mi[ok], mj[ok]
        if len(mi) == 0:
            break
        order = np.lexsort((mj, mi, gain[mi, mj]))  # best first; ties by index
        used: set[int] = set()
        batch = []
        for k in order:
            i, j = int(rows[mi[k]]), int(rows[mj[k]])
            a, b = int(st.gpu[i]), int(st.gpu[j])
            if a not in used and b not in used:
                used.update((a, b))
                batch.append((i, j))
        before = model.value(st.gpu) if len(batch) > 1 else 0.0
        for i, j in batch:
            st.swap(i, j)
        if len(batch) > 1 and model.value(st.gpu) >= before - _TOL:
            # Swaps on disjoint GPUs still share tokens; together they did not help: keep the best one.
            for i, j in reversed(batch[1:]):
                st.swap(i, j)
            batch = batch[:1]
        swaps += len(batch)
    return swaps


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """np.argsort(keys, kind="stable") for keys in [0, bound): on 16-bit keys numpy sorts by radix, much
    faster for the (token, expert) incidences of a layer than on 64-bit ones."""
    return np.argsort(keys.astype(np.int16) if bound < 2**15 else keys, kind="stable")

