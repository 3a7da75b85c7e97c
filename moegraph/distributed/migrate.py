"""Live migration: move a running expert-parallel layer to a new plan, sending only the slots that change.

    layer.apply_plan(new_plan, optimizer=opt)   # on every rank, between forwards (a collective)

What moves is ``moegraph.planner.replan.migration(current, new)``, computed identically on every rank:
each slot whose GPU did not hold its new expert receives that expert's weights from one slot of the
current plan (the nearest holder by link cost); a slot whose expert its GPU already holds elsewhere
is a local copy. So the bytes sent are the planner's prediction: one expert's weights per moved slot
(in the layer's dtype). With an optimizer, the moved experts' state rows travel with them
(``torch.optim.AdamW`` / ``Adam``: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``SGD``:
``momentum_buffer``; the shared ``step`` stays); any other optimizer is refused before anything moves.

Phases, each a collective with the layer's timeout:

1. checks, on this rank alone: the new plan is for this spec, world size and layer count, and the
   optimizer's state can move; nothing is sent before they pass;
2. ``handshake``: every rank applies the same new plan (a fingerprint all-gather);
3. ``prepare``: the new slot tensors are built beside the old ones (kept rows copied locally), then a
   vote: any rank that failed makes every rank stop here;
4. ``transfer``: one all-to-all per tensor kind (weights, then each optimizer state) with uneven
   splits, rows in destination-slot order on both sides;
5. ``commit``: a second vote; only when every rank has every row are the new rows copied into the
   parameters (and optimizer state), the dispatch tables rebuilt and the plan swapped.

A rank that fails or dies anywhere before the commit vote leaves every rank on the old plan: the
others raise ``DistributedError`` naming their rank and the phase (the collective's timeout bounds
the wait). Gradients of expert parameters are dropped (``grad = None``): call it between steps.

Legend: S slots per rank, W ranks, P elements of one slot's tensor.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from ..errors import DistributedError, PlanFileError

__all__ = ["apply_plan", "MOVABLE_STATE"]

#: optimizer class -> per-parameter state entries shaped like the parameter (moved with their slots)
MOVABLE_STATE: dict[type, tuple[str, ...]] = {
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.SGD: ("momentum_buffer",),
}


def _check_plan(layer, new_plan):
    """The new Plan, checked against the running layer on this rank alone (no communication)."""
    from ..planner import Plan

    old = layer.plan
    if isinstance(new_plan, str) or hasattr(new_plan, "__fspath__"):
        new_plan = Plan.load(new_plan)
    if not isinstance(new_plan, Plan):
        raise PlanFileError(f"apply_plan takes a moegraph Plan or plan file path, got {type(new_plan).__name__}")
    if new_plan.num_gpus != layer.world_size:
        raise DistributedError(
            f"rank {layer.rank}: the new plan is for {new_plan.num_gpus} GPUs but this layer runs on {layer.world_size} "
            f"ranks; re-plan for this cluster (moegraph plan SPEC --from CURRENT_PLAN.json keeps it)")
    if new_plan.num_layers != old.num_layers or new_plan.num_slots != old.num_slots:
        raise DistributedError(
            f"rank {layer.rank}: the new plan has {new_plan.num_layers} MoE layers x {new_plan.num_slots} slots but "
            f"the running plan has {old.num_layers} x {old.num_slots}; re-plan from the running plan "
            "(moegraph plan SPEC --from CURRENT_PLAN.json)")
    if new_plan.spec_hash != old.spec_hash:
        raise PlanFileError(
            f"rank {layer.rank}: the new plan was made for spec {new_plan.spec.name!r} (hash {new_plan.spec_hash[:12]}) "
            f"but this layer runs spec {old.spec.name!r} (hash {old.spec_hash[:12]}); re-plan with --from the running "
            "plan so that both share the spec")
    return new_plan


def _optimizer_rows(layer, optimizer) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """{expert parameter name: [(state key, state tensor)]} of the rows that move with the experts."""
    if optimizer is None:
        return {}
    keys = next((v for k, v in MOVABLE_STATE.items() if type(optimizer) is k), None)
    if keys is None:
        raise DistributedError(
            f"rank {layer.rank}: the state of optimizer {type(optimizer).__name__} cannot be moved with the experts "
            f"(supported: {', '.join(k.__name__ for k in MOVABLE_STATE)}); use one of those, or pass optimizer=None "
            "and re-create the optimizer after apply_plan (its state is then lost)")
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in layer.experts.named_parameters():
        st = optimizer.state.get(p, {})
        rows = [(k, st[k]) for k in keys if isinstance(st.get(k), torch.Tensor) and st[k].shape == p.shape]
        out[name] = rows
    return out


def _fingerprint(plan, layer_index: int) -> int:
    h = hashlib.sha256(plan.spec_hash.encode())
    h.update(np.ascontiguousarray(plan.physical_to_logical_map[layer_index], np.int64).tobytes())
    return int.from_bytes(h.digest()[:7], "little")


def _vote(layer, ok: bool, what: str) -> list[int]:
    """All ranks' flags (1 ok, 0 failed), in rank order."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=layer.experts.down_proj.device)
    return [int(x) for x in torch.cat(layer.comm.all_gather(t, what)).tolist()]


def _retable(dispatch, plan) -> None:
    """Rebuild the dispatch module's replica tables for ``plan`` (same slots per rank)."""
    cand, n = plan.replica_table(dispatch.layer_index)
    dev = dispatch.cand_GER.device
    dispatch.cand_GER = torch.as_tensor(cand, dtype=torch.int64, device=dev)
    dispatch.n_GE = torch.as_tensor(np.maximum(n, 1), dtype=torch.int64, device=dev)


def apply_plan(layer, new_plan, optimizer: Any = None) -> dict[str, Any]:
    """Move ``layer`` (an ``ExpertParallelMoE``) to ``new_plan``; see the module docstring. Collective.

    Returns this rank's report: ``slots_received``, ``slots_sent``, ``weight_bytes_sent`` /
    ``state_bytes_sent`` [W] per destination, ``predicted_weight_bytes`` (the planner's migration in
    the layer's dtype, this rank's share) and ``seconds`` per phase.
    """
    from ..planner.replan import migration

    # Step 1: local checks only, so that a bad input fails before anything is sent.
    new_plan = _check_plan(layer, new_plan)
    state_rows = _optimizer_rows(layer, optimizer)
    me, W, S, li, comm = layer.rank, layer.world_size, new_plan.slots_per_gpu, layer.layer_index, layer.comm
    label = f"rank {me} of {W}: apply_plan"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    # Step 2: every rank moves to the same plan.
    got = [int(x) for x in torch.cat(comm.all_gather(
        torch.tensor([_fingerprint(new_plan, li)], dtype=torch.int64, device=layer.experts.down_proj.device),
        "apply_plan handshake")).tolist()]
    if len(set(got)) != 1:
        differ = [r for r, f in enumerate(got) if f != got[me]]
        raise DistributedError(f"{label}: ranks {differ} apply a different new plan for this layer; every rank must "
                               "apply the same plan (nothing was moved)")
    seconds["handshake"] = time.perf_counter() - t0
    # Step 3: what moves (the same on every rank), and the new rows built beside the old ones.
    t0 = time.perf_counter()
    ok, error = True, None
    try:
        mig = migration(layer.plan, new_plan)
        moves = mig.moves[mig.moves[:, 0] == li]  # (layer, dst slot, expert, src GPU, src slot)
        dst_gpu = moves[:, 1] // S
        recv = moves[dst_gpu == me]
        send = moves[(moves[:, 3] == me)]
        send = send[np.lexsort((send[:, 1], send[:, 1] // S))]  # by destination rank, then slot
        new_experts = new_plan.physical_to_logical_map[li, me * S:(me + 1) * S].tolist()
        old_local = {e: j for j, e in enumerate(layer.slot_experts)}
        arriving = {int(d) - me * S: k for k, d in enumerate(recv[:, 1])}
        for j, e in enumerate(new_experts):
            assert j in arriving or e in old_local, f"internal: slot {j} (expert {e}) has no source"
        keep_src = [old_local.get(e, 0) for e in new_experts]
        # every tensor that moves: (parameter, optimizer state tensor or None)
        tensors = [(name, p, None) for name, p in layer.experts.named_parameters()]
        tensors += [(name, t, key) for name, rows in state_rows.items() for key, t in rows]
        new_rows = {}
        for name, t, key in tensors:
            buf = t.detach()[torch.as_tensor(keep_src, device=t.device)].clone()
            new_rows[(name, key)] = buf
    except Exception as exc:  # noqa: BLE001 - reported to every rank by the vote, then re-raised here
        ok, error = False, exc
    votes = _vote(layer, ok, "apply_plan prepare vote")
    if error is not None:
        raise DistributedError(f"{label}: preparing the new slots failed ({error}); every rank stays on the old "
                               "plan") from error
    if min(votes) == 0:
        raise DistributedError(f"{label}: ranks {[r for r, v in enumerate(votes) if not v]} failed to prepare the "
                               "migration; every rank stays on the old plan")
    seconds["prepare"] = time.perf_counter() - t0
    # Step 4: one all-to-all per tensor kind, rows in destination-slot order.
    t0 = time.perf_counter()
    send_W = np.bincount(send[:, 1] // S, minlength=W).tolist()
    recv_W = np.bincount(recv[:, 3], minlength=W).tolist()
    # Received rows arrive grouped by source rank (rank order), each group in destination-slot order.
    recv_order = np.lexsort((recv[:, 1], recv[:, 3]))
    recv_slots = torch.as_tensor((recv[recv_order, 1] - me * S).astype(np.int64))
    src_rows = torch.as_tensor((send[:, 4] - me * S).astype(np.int64))
    weight_bytes = np.zeros(W, np.int64)
    state_bytes = np.zeros(W, np.int64)
    for name, t, key in tensors:
        rows = t.detach()[src_rows.to(t.device)]
        got_rows = comm.all_to_all(rows, send_W, recv_W, f"apply_plan transfer ({name}{'' if key is None else ' ' + key})")
        if len(recv_slots):
            new_rows[(name, key)][recv_slots.to(t.device)] = got_rows
        nbytes = np.asarray(send_W, np.int64) * t.element_size() * int(np.prod(t.shape[1:], dtype=np.int64))
        nbytes[me] = 0
        (weight_bytes if key is None else state_bytes)[:] += nbytes
    seconds["transfer"] = time.perf_counter() - t0
    # Step 5: commit only when every rank holds every row.
    t0 = time.perf_counter()
    votes = _vote(layer, True, "apply_plan commit vote")
    assert min(votes) == 1, "internal: a rank voted against the commit without raising"
    with torch.no_grad():
        for (name, key), buf in new_rows.items():
            target = dict(layer.experts.named_parameters())[name] if key is None else dict(state_rows[name])[key]
            target.copy_(buf)
        for p in layer.experts.parameters():
            p.grad = None
    _retable(layer.ep_dispatch, new_plan)
    layer.experts.slot_experts = list(new_experts)
    layer.__dict__.update(plan=new_plan, slot_experts=list(new_experts))
    seconds["commit"] = time.perf_counter() - t0
    per_slot = sum(p.element_size() * p[0].numel() for p in layer.experts.parameters())
    return {
        "rank": me,
        "slots_received": int(len(recv)),
        "slots_sent": int(len(send)),
        "weight_bytes_sent": weight_bytes.tolist(),
        "state_bytes_sent": state_bytes.tolist(),
        "predicted_weight_bytes": int(len(send)) * per_slot,
        "predicted_layer_weight_bytes": int(len(moves)) * per_slot,
        "seconds": seconds,
    }
