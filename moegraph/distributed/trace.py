"""Record routing on every rank, gather it into one trace, and predict the traffic of a plan.

``gather_trace(layers)`` all-gathers what each layer's ``RoutingRecorder`` saw on each rank into one
``TraceSet`` (tokens in rank order, ``src_rank`` set, sample ids made unique across ranks), on every
rank. That trace feeds ``moegraph plan`` (or ``moegraph.planner.plan``) to re-plan from the
cluster's own traffic.

``predicted_copies(plan, layer_index, topk_by_rank)`` is the planner's count of the token copies
(``dispatch_counts(...).link_copies``) for the routing each rank did in one forward: the same rule,
with token indices counted per rank as the runtime counts them, so it must equal the measured
``Traffic.rows["dispatch"]`` of every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import TraceError
from ..runtime import check_recorded_ids

__all__ = ["gather_trace", "predicted_copies"]


def gather_trace(layers, *, name: str = "recorded", clear: bool = False):
    """One ``TraceSet`` of every rank's recorded routing (collective; returns it on every rank).

    layers: one expert-parallel layer or a list (one per MoE layer, in model order), each with a
    recorder started (``layer.start_recording()``) and fed the same tokens.
    """
    from ..traces import TraceSet

    layers = list(layers) if isinstance(layers, Sequence) else [layers]
    if not layers:
        raise TraceError("gather_trace: no layers given")
    comm = layers[0].comm
    device = layers[0].experts.down_proj.device
    per_layer = []
    samples = None
    for i, layer in enumerate(layers):
        rec = layer.recorder
        if rec is None:
            raise TraceError(f"gather_trace: layer {i} is not recording; call layer.start_recording() before the "
                             "forward passes to record")
        ids = rec.ids()
        if ids.numel() == 0:
            ids = torch.empty(0, layer.TOP_K, dtype=torch.int32)
        got = comm.all_gather_rows(ids.to(device), f"gather_trace (layer {i} ids)")
        per_layer.append(torch.cat(got).cpu())
        # On the gathered ids: every rank sees the same and refuses alike (no rank left in a collective).
        check_recorded_ids(per_layer[-1], layer.NUM_EXPERTS, f"gather_trace (layer {i})")
        if samples is None:
            s = rec.samples().to(device)
            n = torch.tensor([rec._next_sample], dtype=torch.int64, device=device)
            n_by_rank = [int(x) for x in torch.cat(comm.all_gather(n, "gather_trace (sample counts)")).tolist()]
            parts = comm.all_gather_rows(s, "gather_trace (sample ids)")
            offset = np.concatenate([[0], np.cumsum(n_by_rank)[:-1]])
            samples = torch.cat([p.cpu() + int(o) for p, o in zip(parts, offset)])
            src = torch.cat([torch.full((len(p),), r, dtype=torch.int64) for r, p in enumerate(parts)])
        if clear:
            rec.clear()
    if len({t.shape[0] for t in per_layer}) != 1:
        raise TraceError("gather_trace: layers recorded different numbers of tokens; record every layer of one "
                         "model over the same forward passes")
    return TraceSet.from_topk(
        per_layer, sample_ids=samples, num_experts=layers[0].NUM_EXPERTS, src_rank=src,
        num_ranks=comm.world_size, layer_ids=[_decoder_layer(layer) for layer in layers], source=name,
    )


def _decoder_layer(layer) -> int:
    """The decoder layer index of an expert-parallel layer's MoE layer (its ``layer_index``-th MoE layer)."""
    return int(list(layer.plan.spec.model.moe_layer_indices)[layer.layer_index])


def predicted_copies(plan, layer_index: int, topk_by_rank: Sequence) -> np.ndarray:
    """[G, G] token copies sent src -> dst (forwarding hops included) for one forward of one layer.

    topk_by_rank: per rank, its [T_r, K] logical expert ids of that forward (token order as routed).
    """
    from ..planner.dispatch import dispatch_counts

    g = plan.num_gpus
    total = np.zeros((g, g), np.int64)
    for r, ids in enumerate(topk_by_rank):
        ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, np.int64)
        if ids.size == 0:
            continue
        total += dispatch_counts(plan, layer_index, ids, np.full(ids.shape[0], r)).link_copies
    return total
