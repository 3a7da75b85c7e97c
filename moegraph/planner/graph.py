"""The placement graph of one MoE layer, built from routing traces.

Experts are nodes weighted by load; an edge between two experts carries how many tokens chose both
(co-activation, per token of the traffic). ``placement_graph`` returns it as a ``networkx.Graph``
(nodes: ``load`` mean 1 over experts, ``load_by_source``; edges: ``coact``, ``risk``). The search
works on the same quantities as dense arrays (``layer_arrays``), which is what a 256-expert layer
needs to be fast: ``nx.to_numpy_array(graph, weight="coact")`` equals ``arrays.coact``.

``risk`` is the covariance of expert load across windows of ``WINDOW`` consecutive tokens of a
sequence, scaled so that its mean diagonal is 1: experts that rise and fall together within the
traffic, the sign that a task focused on them would overload the GPU that holds them together.
With several trace sources each source counts equally (loads, co-activation and risk are
averaged per token), so a large trace does not drown a small one.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from ..traces import TraceSet, coactivation
from .dispatch import source_gpus

__all__ = ["WINDOW", "LayerArrays", "layer_arrays", "placement_graph", "window_ids"]

#: tokens per window for the load covariance (``risk``)
WINDOW = 16


@dataclass
class LayerArrays:
    loads: np.ndarray  # [Sc, E] tokens per expert per source, each scaled to mean 1
    coact: np.ndarray  # [E, E] co-activation per token, mean over sources (zero diagonal)
    risk: np.ndarray  # [E, E] window covariance of expert load, mean over sources, mean diagonal 1
    src_counts: np.ndarray | None  # [Sc, G, E] tokens per (source GPU, expert)
    topk: np.ndarray | None = None  # [T, K] experts each token chose, all sources stacked
    token_weight: np.ndarray | None = None  # [T] 1 / (tokens of the token's source x sources)


def window_ids(sample_ids: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """[T] dense id (0..) of the window of ``window`` consecutive tokens of one sequence each token falls in."""
    t = len(sample_ids)
    if t == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(sample_ids)) + 1]
    pos = np.arange(t) - np.repeat(starts, np.diff(np.r_[starts, t]))
    seq = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, t]))
    return np.unique(seq * (t + 1) + pos // window, return_inverse=True)[1].astype(np.int64)


def _window_cov(topk_TK: np.ndarray, inv: np.ndarray, e: int) -> np.ndarray:
    k = topk_TK.shape[1]
    cnt = np.bincount(np.repeat(inv, k) * e + topk_TK.ravel().astype(np.int64), minlength=(inv.max() + 1) * e)
    cnt = cnt.reshape(-1, e).astype(np.float64)
    tok = cnt.sum(axis=1)
    prof = cnt / tok[:, None] * e  # load profile of each window, mean 1 over experts
    w = tok / tok.sum()
    dev = prof - w @ prof
    cov = (dev * w[:, None]).T @ dev
    scale = float(np.mean(np.diag(cov)))
    return cov / scale if scale > 0 else cov


def layer_arrays(sources: list[TraceSet], layer: int, num_gpus: int, windows: list[np.ndarray] | None = None) -> LayerArrays:
    """The placement graph of ``layer`` as arrays, from one TraceSet per source (task, file)."""
    e = sources[0].num_experts
    loads = np.stack([s.counts[layer] / max(s.counts[layer].mean(), 1e-12) for s in sources])
    if sources[0].load_only:
        return LayerArrays(loads, np.zeros((e, e)), np.zeros((e, e)), None)
    coact = np.zeros((e, e))
    risk = np.zeros((e, e))
    src = np.zeros((len(sources), num_gpus, e))
    for i, s in enumerate(sources):
        ids = s.topk[layer]
        coact += coactivation(ids, e) / max(s.num_tokens, 1)
        win = windows[i] if windows is not None else window_ids(s.sample_ids)
        risk += _window_cov(ids, win, e)
        g = source_gpus(s, num_gpus)
        k = ids.shape[1]
        src[i] = np.bincount(np.repeat(g, k) * e + ids.ravel().astype(np.int64), minlength=num_gpus * e).reshape(num_gpus, e)
    n = len(sources)
    topk = np.concatenate([np.asarray(s.topk[layer], np.int64) for s in sources])
    weight = np.concatenate([np.full(s.num_tokens, 1.0 / max(s.num_tokens, 1) / n) for s in sources])
    return LayerArrays(loads, coact / n, risk / n, src, topk, weight)


def placement_graph(sources: list[TraceSet] | TraceSet, layer: int, num_gpus: int = 1) -> nx.Graph:
    """One layer's placement graph: experts weighted by load, edges weighted by co-activation (and risk)."""
    if isinstance(sources, TraceSet):
        sources = sources.split_sources()
    arr = layer_arrays(list(sources), layer, num_gpus)
    e = arr.loads.shape[1]
    g = nx.Graph(layer=layer)
    mean = arr.loads.mean(axis=0)
    for x in range(e):
        g.add_node(x, load=float(mean[x]), load_by_source=arr.loads[:, x].tolist())
    a, b = np.nonzero(np.triu((arr.coact != 0) | (arr.risk != 0), 1))
    for x, y in zip(a.tolist(), b.tolist()):
        g.add_edge(x, y, coact=float(arr.coact[x, y]), risk=float(arr.risk[x, y]))
    return g
