"""Statistics of routing traces (co-activation, skew, cross-layer affinity) and synthetic traffic.

``coactivation`` counts pairs of experts chosen by the same token (the planner's placement graph is
built from it); ``trace_stats`` summarises a TraceSet for ``moegraph trace stats``;
``synthetic_traces`` makes skewed, clustered traffic for scale tests and demos (not real data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..limits import check_memory
from .trace_set import TraceSet

__all__ = ["coactivation", "TraceStats", "trace_stats", "synthetic_traces"]


def coactivation(topk_TK: np.ndarray, num_experts: int, weights_T: np.ndarray | None = None) -> np.ndarray:
    """[E, E] co-activation counts: W[a, b] = tokens that chose both a and b (a != b); zero diagonal.

    topk_TK: [T, K] expert ids of one layer; weights_T: optional [T] weight per token.
    """
    # Two [E, E] float64 tables at once (the counts and the result).
    check_memory(16.0 * num_experts * num_experts, f"co-activation counts of {num_experts} experts",
                 "use a trace of fewer experts, or plan load-only (counts) traces")
    k = topk_TK.shape[1]
    ids = np.ascontiguousarray(topk_TK, dtype=np.int64)
    pair = (ids[:, :, None] * num_experts + ids[:, None, :]).ravel()
    w = None if weights_T is None else np.repeat(np.asarray(weights_T, np.float64), k * k)
    w_pairs = np.bincount(pair, weights=w, minlength=num_experts * num_experts)
    out = w_pairs.reshape(num_experts, num_experts).astype(np.float64)
    np.fill_diagonal(out, 0.0)
    return out


@dataclass
class TraceStats:
    """Summary of a TraceSet: loads, skew, co-activation and cross-layer affinity per layer."""

    loads: np.ndarray  # [L, E] tokens per expert
    skew: np.ndarray  # [L] max/mean expert load
    cv: np.ndarray  # [L] coefficient of variation of expert load
    top_pairs: list[list[tuple[int, int, float, float]]]  # per layer: (a, b, tokens, lift) of the top pairs
    pair_concentration: np.ndarray  # [L] share of co-activation mass in the top 10% of expert pairs
    affinity: np.ndarray | None  # [L-1] normalised mutual information of consecutive layers' choices
    notes: list[str]


def trace_stats(ts: TraceSet, top: int = 5) -> TraceStats:
    """Loads, skew, co-activation summary and cross-layer affinity of a TraceSet."""
    loads = ts.counts.astype(np.float64)
    mean = loads.mean(axis=1)
    skew = loads.max(axis=1) / np.maximum(mean, 1e-12)
    cv = loads.std(axis=1) / np.maximum(mean, 1e-12)
    notes = list(ts.notes)
    e = ts.num_experts
    pairs, conc = [], np.zeros(ts.num_layers)
    affinity = None
    if ts.topk is not None:
        t, k = ts.topk.shape[1], ts.topk.shape[2]
        iu = np.triu_indices(e, 1)
        for layer in range(ts.num_layers):
            w = coactivation(ts.topk[layer], e)
            p = loads[layer] / max(t, 1)  # probability a token picks each expert
            expected = np.outer(p, p) * t * (k - 1) / k  # independence baseline (approximate)
            vals = w[iu]
            order = np.argsort(-vals, kind="stable")
            n_top = max(1, len(vals) // 10)
            conc[layer] = vals[order[:n_top]].sum() / max(vals.sum(), 1e-12)
            pairs.append([
                (int(iu[0][i]), int(iu[1][i]), float(vals[i]), float(vals[i] / max(expected[iu[0][i], iu[1][i]], 1e-12)))
                for i in order[:top]
            ])
        if ts.num_layers > 1:
            affinity = np.zeros(ts.num_layers - 1)
            for layer in range(ts.num_layers - 1):
                affinity[layer] = _layer_affinity(ts.topk[layer], ts.topk[layer + 1], e)
    else:
        notes.append("load-only trace: no co-activation or cross-layer affinity")
    return TraceStats(loads=loads, skew=skew, cv=cv, top_pairs=pairs, pair_concentration=conc,
                      affinity=affinity, notes=notes)


def _layer_affinity(a_TK: np.ndarray, b_TK: np.ndarray, e: int) -> float:
    """Normalised mutual information I(A;B)/H(B) between an expert chosen in one layer and the next."""
    k = a_TK.shape[1]
    a = np.repeat(a_TK.astype(np.int64), k, axis=1).ravel()
    b = np.tile(b_TK.astype(np.int64), (1, k)).ravel()
    joint = np.bincount(a * e + b, minlength=e * e).reshape(e, e).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return mi / hb if hb > 0 else 0.0


def synthetic_traces(
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_tokens: int = 4096,
    *,
    tokens_per_sample: int = 256,
    topics: int = 32,
    skew: float = 1.0,
    coherence: float = 3.0,
    seed: int = 0,
    name: str = "synthetic",
) -> TraceSet:
    """Skewed, clustered routing traces for scale tests and demos (not real data).

    Every expert has a Zipf-like popularity (exponent ``skew``, shuffled per layer); ``topics``
    groups of experts are preferred together (their logits raised by ``coherence`` for a sequence's
    main topic, half of it for its second topic); each sequence of ``tokens_per_sample`` tokens mixes
    two topics; each token draws ``top_k`` distinct experts (Gumbel top-k) from its sequence's mix.
    """
    rng = np.random.default_rng(seed)
    e, k = num_experts, top_k
    n_samples = -(-num_tokens // tokens_per_sample)
    sample_ids = np.repeat(np.arange(n_samples), tokens_per_sample)[:num_tokens]
    layers = []
    for _ in range(num_layers):
        pop = 1.0 / np.arange(1, e + 1) ** skew
        pop = pop[rng.permutation(e)]
        topic_of = rng.integers(0, topics, size=e)
        mix = rng.integers(0, topics, size=(n_samples, 2))
        logit = np.log(pop)[None, :] + np.zeros((n_samples, e))
        boost = (topic_of[None, :] == mix[:, :1]) * coherence + (topic_of[None, :] == mix[:, 1:]) * (coherence / 2)
        logit = (logit + boost)[sample_ids]
        gumbel = -np.log(-np.log(rng.random((num_tokens, e))))
        layers.append(np.argpartition(-(logit + gumbel), k - 1, axis=1)[:, :k])
    return TraceSet.from_topk(layers, sample_ids, num_experts=e, source=name)
