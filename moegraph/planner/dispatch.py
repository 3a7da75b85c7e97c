"""THE dispatch rule: which replica of an expert serves a token, and which copies that sends.

Shared by the cost model, the plan report and the expert-parallel runtime, so that what the plan
predicts is what the runtime does.

Rule (``choose_replicas``): a token on GPU ``src`` that chose expert ``e`` uses

1. the replica of ``e`` on ``src`` itself, if there is one; else
2. a replica on ``src``'s host (node); else
3. any replica;

and when a tier holds several replicas, token ``t`` takes the ``t % n``-th of the ``n`` replicas in
slot order, ``t`` counting the tokens that start on ``src`` only: ties spread evenly, round-robin by
token index. The runtime counts the same way: in inference its count runs on across forwards (since
the layer was built or started recording), so a routing trace recorded there, its tokens in forward order,
gives the runtime's choices; in training it restarts with every forward (a recomputed forward must
choose the same replicas), which a trace of one forward per rank matches.

Copies (``dispatch_counts``): a token is sent once to every distinct remote GPU of its host that
serves it; across hosts it is sent once per distinct remote host, to the GPU with the same local
index there (rail-aligned), which forwards it to the other GPUs of that host that serve it. The
combine sends the same copies back. Layers whose experts take one row per assignment
(``MoELayerSpec.rows_per_assignment``: the routing weight on the experts' input, or a norm of each
expert's output) send each assignment as a copy of its own, keyed ``t * K + k``.

Where tokens start: a recorded source rank when the routing trace was
recorded on as many ranks as the plan has GPUs, else sequences spread round-robin, ``sample % G``.

Legend: T tokens, K experts per token, E experts, G GPUs, N hosts, S physical slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..traces import TraceSet
    from .planfile import Plan

__all__ = ["RULE", "replica_table", "choose_replicas", "dispatch_counts", "DispatchCounts", "source_gpus"]

#: The rule as recorded in plan files.
RULE = {
    "name": "local-gpu>local-node>any",
    "tie_break": "round-robin by token index: token t takes the (t % n)-th of n candidate slots in slot order, "
    "t counted among the tokens that start on the same GPU (in inference across forwards, in training per forward)",
    "source": "recorded source rank when recorded on num_gpus ranks, else sample_id % num_gpus",
    "copies": "one per distinct remote GPU in the host; one per distinct remote host (to the GPU with the "
    "same local index), forwarded inside that host; combine mirrors dispatch",
}


def replica_table(p2l_S: np.ndarray, num_experts: int, slots_per_gpu: int, node_of_gpu: np.ndarray):
    """Candidate slots per (source GPU, expert) under the rule.

    p2l_S: [S] logical expert of each physical slot of one layer.
    Returns (cand_GER [G, E, R] slot ids padded with -1 in slot order, n_GE [G, E] candidates per pair).
    """
    p2l_S = np.asarray(p2l_S, np.int64)
    g, n_slots = len(node_of_gpu), len(p2l_S)
    node_of_gpu = np.asarray(node_of_gpu)
    gpu_S = np.arange(n_slots) // slots_per_gpu
    # Tier of every (source GPU, slot): 0 own GPU, 1 own host, 2 elsewhere; an expert's candidates are
    # its slots in its best tier.
    tier = np.where(gpu_S[None, :] == np.arange(g)[:, None], 0,
                    np.where(node_of_gpu[gpu_S][None, :] == node_of_gpu[:, None], 1, 2))  # [G, S]
    best = np.full((g, num_experts), 3)
    np.minimum.at(best, (np.repeat(np.arange(g), n_slots), np.tile(p2l_S, g)), tier.ravel())
    is_cand = tier == best[:, p2l_S]  # [G, S]
    # Rank of each candidate among its expert's candidates in slot order.
    order = np.lexsort((np.arange(n_slots), p2l_S))  # slots grouped by expert, slot order inside
    src, pos = np.nonzero(is_cand[:, order])
    slot = order[pos]
    ex = p2l_S[slot]
    key = src * num_experts + ex
    first = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    rank = np.arange(len(key)) - np.repeat(first, np.diff(np.r_[first, len(key)]))
    n = np.zeros((g, num_experts), np.int64)
    np.add.at(n, (src, ex), 1)
    cand = np.full((g, num_experts, max(int(n.max(initial=1)), 1)), -1, np.int64)
    cand[src, ex, rank] = slot
    return cand, n


def choose_replicas(plan: Plan, layer: int, topk_ids: Any, src_gpu: Any):
    """Physical slot serving each (token, choice): [T, K], same type (numpy or torch) as ``topk_ids``.

    topk_ids: [T, K] logical expert ids of one MoE layer (numpy array or torch tensor).
    src_gpu: [T] GPU each token starts on; a token's round-robin index counts the tokens before it
        with the same source (on one GPU's batch, its row).
    """
    cand, n = plan.replica_table(layer)
    if hasattr(topk_ids, "device") and not isinstance(topk_ids, np.ndarray):  # torch, no import needed
        import torch

        dev = topk_ids.device
        cand_t, n_t = plan.replica_table_torch(layer, dev)
        ids = topk_ids.long()
        src_T = torch.as_tensor(src_gpu, device=dev).long()
        order = torch.sort(src_T, stable=True).indices
        s = src_T[order]
        counts = torch.bincount(s, minlength=len(n_t))
        tok = torch.empty_like(src_T)
        tok[order] = torch.arange(len(s), device=dev) - (torch.cumsum(counts, 0) - counts)[s]
        tok = tok[:, None]
        src = src_T[:, None].expand_as(ids)
        return cand_t[src, ids, tok % n_t[src, ids]]
    ids = np.asarray(topk_ids, np.int64)
    src = np.asarray(src_gpu, np.int64)
    tok = _index_per_source(src)[:, None]
    src = src[:, None]
    return cand[src, ids, tok % n[src, ids]]


def _index_per_source(src_T: np.ndarray) -> np.ndarray:
    """[T] how many earlier tokens start on the same GPU as each token."""
    order = np.argsort(src_T, kind="stable")
    s = src_T[order]
    counts = np.bincount(s, minlength=1)
    out = np.empty(len(src_T), np.int64)
    out[order] = np.arange(len(s)) - (np.cumsum(counts) - counts)[s]
    return out


@dataclass
class DispatchCounts:
    """What one layer's dispatch sends and computes (the combine sends the same copies back)."""

    num_tokens: int
    gpu_load: np.ndarray  # [G] (token, expert) pairs computed on each GPU
    link_copies: np.ndarray  # [G, G] token copies on each link src -> dst, forwarding hops included
    inter_copies: np.ndarray  # [G, G] the part of link_copies that crosses hosts
    distinct_gpus: int  # sum over tokens of the distinct GPUs that serve the token
    remote_gpu_copies: int  # sum over tokens of the distinct GPUs other than its own that serve it
    remote_node_copies: int  # sum over tokens of the distinct hosts other than its own that serve it


def dispatch_counts(plan: Plan, layer: int, topk_ids: Any, src_gpu: Any) -> DispatchCounts:
    """Count the copies and work of one layer's dispatch under THE rule (see the module docstring).

    topk_ids: [T, K] logical expert ids (numpy or torch); src_gpu: [T] GPU each token starts on.
    """
    ids = np.asarray(topk_ids.cpu() if hasattr(topk_ids, "cpu") else topk_ids, np.int64)
    src = np.asarray(src_gpu.cpu() if hasattr(src_gpu, "cpu") else src_gpu, np.int64)
    if plan.spec.moe.rows_per_assignment and ids.ndim == 2:
        # The experts take one row per assignment (routing weight on their input, or a norm of each
        # expert's output): each is a copy of its own, keyed by its assignment index t * K + k.
        src = np.repeat(src, ids.shape[1])
        ids = ids.reshape(-1, 1)
    placed = (ids >= 0) & (ids < plan.num_experts)
    if placed.all():
        return counts_from_slots(choose_replicas(plan, layer, ids, src) // plan.slots_per_gpu, src, plan.cluster)
    # Choices of no placed expert (identity / zero experts) stay on the token's GPU, as the runtime
    # keeps them: no copy, no expert work.
    dst = choose_replicas(plan, layer, np.where(placed, ids, 0), src) // plan.slots_per_gpu
    return counts_from_slots(np.where(placed, dst, src[:, None]), src, plan.cluster, placed)


def counts_from_slots(dst_TK: np.ndarray, src_T: np.ndarray, cluster, work_TK: np.ndarray | None = None
                      ) -> DispatchCounts:
    """DispatchCounts from the serving GPU of every (token, choice) [T, K] and token sources [T].

    work_TK: which choices are expert work (default all); the others count toward no GPU's load.
    """
    g = cluster.num_gpus
    node = cluster.node_of_gpu
    n_nodes = cluster.num_nodes
    t = len(src_T)
    load = np.bincount(dst_TK.ravel() if work_TK is None else dst_TK[work_TK], minlength=g)
    hit = np.zeros((t, g), bool)  # hit[t, d]: GPU d serves token t
    hit[np.arange(t)[:, None], dst_TK] = True
    distinct = int(hit.sum())
    remote = hit.copy()
    remote[np.arange(t), src_T] = False
    same_node = node[None, :] == node[src_T][:, None]  # [T, G]
    link = np.zeros((g, g), np.int64)
    # Step 1: direct copies inside the source's host.
    rows, cols = np.nonzero(remote & same_node)
    link += np.bincount(src_T[rows] * g + cols, minlength=g * g).reshape(g, g)
    inter = np.zeros((g, g), np.int64)
    remote_nodes = 0
    # Step 2: one copy per remote host to the rail-aligned GPU there, then forwards inside that host.
    for m in range(n_nodes):
        on_m = node == m
        tok = np.flatnonzero(hit[:, on_m].any(axis=1) & (node[src_T] != m))
        if len(tok) == 0:
            continue
        remote_nodes += len(tok)
        land = cluster.landing_gpu(src_T[tok], np.full(len(tok), m))
        inter += np.bincount(src_T[tok] * g + land, minlength=g * g).reshape(g, g)
        gpus_m = np.flatnonzero(on_m)
        fwd = hit[tok][:, gpus_m]  # forwards go to the other GPUs of host m that serve the token
        fwd[np.arange(len(tok)), np.searchsorted(gpus_m, land)] = False
        r, c = np.nonzero(fwd)
        link += np.bincount(land[r] * g + gpus_m[c], minlength=g * g).reshape(g, g)
    link += inter
    return DispatchCounts(
        num_tokens=t, gpu_load=load, link_copies=link, inter_copies=inter, distinct_gpus=distinct,
        remote_gpu_copies=int(remote.sum()), remote_node_copies=remote_nodes,
    )


def source_gpus(traces: TraceSet, num_gpus: int) -> np.ndarray:
    """[T] the GPU each token starts on: the recorded rank if recorded on ``num_gpus`` ranks, else sample % G."""
    if traces.src_rank is not None and traces.num_ranks == num_gpus:
        return traces.src_rank.astype(np.int64)
    return (traces.sample_ids % num_gpus).astype(np.int64)
