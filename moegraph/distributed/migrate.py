"""Live migration: move running expert-parallel layers to a new plan, sending only the slots that change.

    layer.apply_plan(new_plan, optimizer=opt)              # one layer: on every rank, between steps
    moegraph.distributed.apply_plan(layers, new_plan, opt) # every MoE layer of a model, all or none

What moves is ``moegraph.planner.replan.migration(current, new)``, computed identically on every rank:
each slot whose GPU did not hold its new expert receives that expert's weights from one slot of the
current plan (the nearest holder by link cost); a slot whose expert its GPU already holds elsewhere
is a local copy. So the bytes sent are the planner's prediction: one expert's weights per moved slot
(in the layer's dtype; the planner counts the spec's). With an optimizer, the moved experts' state
rows travel with them (``torch.optim.AdamW`` / ``Adam``: ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; ``SGD``: ``momentum_buffer``; the shared ``step`` stays); any other optimizer is
refused before anything moves. FP8 weights travel as their bytes (``comm``).

Phases, each a collective with the layers' timeout; several layers go through them together, so that
a model moves to the new plan whole or not at all:

1. ``checks``, on this rank alone: the new plan is for this spec, world size and layer count; the
   optimizer's state can move and holds the experts; no expert gradient is pending (a gradient
   accumulated under the old placement has no slot to follow: call it between optimizer steps, after
   ``zero_grad``);
2. ``handshake``: one all-gather of every rank's check result and a fingerprint of what it would move
   (the plan's rows of these layers, and which optimizer state tensors): a rank whose checks failed
   raises its own error, the others name it; nothing has moved;
3. ``prepare``: for the slots that change only, new rows are staged beside the parameters (local
   copies filled in), then a vote: any rank that failed makes every rank stop here;
4. ``transfer``: one all-to-all per layer and tensor kind (weights, then each optimizer state) with
   uneven splits, rows in destination-slot order on both sides, into the staged rows;
5. ``commit``: a second vote; only when every rank holds every row of every layer are the staged rows
   written into the parameters (and optimizer state), the dispatch tables rebuilt and the plans swapped.

A rank that fails or dies anywhere before the commit vote leaves every rank and every layer on the old
plan: the others raise ``DistributedError`` naming their rank and the phase (the collective's timeout
bounds the wait; after a timeout the process group itself may be unusable, as with any collective).
Running backwards see the change: the expert ops check that their weights did not change between
forward and backward (``oplib.OpaqueOp.register_autograd(check_versions=True)``), so a migration between
the two fails loudly.

Legend: S slots per rank, W ranks, P elements of one slot's tensor.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DistributedError, PlanFileError
from .comm import fp8_as_bytes
from .layer import _fingerprint as plan_fingerprint

__all__ = ["apply_plan", "movable_optimizer", "MOVABLE_STATE"]

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
    if new_plan.spec_hash != old.spec_hash:
        raise PlanFileError(
            f"rank {layer.rank}: the new plan was made for spec {new_plan.spec.name!r} (hash {new_plan.spec_hash[:12]}) "
            f"but this layer runs spec {old.spec.name!r} (hash {old.spec_hash[:12]}); they differ in "
            f"{new_plan.spec.differences_shown(old.spec, labels=('in the new plan', 'in the running one'))}; re-plan "
            "with --from the running plan so that both share the spec")
    if new_plan.num_layers != old.num_layers or new_plan.num_slots != old.num_slots:
        raise DistributedError(
            f"rank {layer.rank}: the new plan has {new_plan.num_layers} MoE layers x {new_plan.num_slots} slots but "
            f"the running plan has {old.num_layers} x {old.num_slots}; re-plan from the running plan "
            "(moegraph plan SPEC --from CURRENT_PLAN.json)")
    return new_plan


def _optimizer_rows(layer, optimizer) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """{expert parameter name: [(state key, state tensor)]} of the rows that move with the experts."""
    if optimizer is None:
        return {}
    optimizer, keys = movable_optimizer(optimizer, layer.rank)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = [(name, p) for name, p in layer.experts.named_parameters() if p.requires_grad]
    if trained and not any(id(p) in held for _, p in trained):
        raise DistributedError(
            f"rank {layer.rank}: the optimizer given to apply_plan does not hold the expert parameters of MoE layer "
            f"{layer.layer_index} ({', '.join(n for n, _ in trained)}); pass the optimizer that trains them (or None)")
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in layer.experts.named_parameters():
        st = optimizer.state.get(p, {})
        out[name] = [(k, st[k]) for k in keys if isinstance(st.get(k), torch.Tensor) and st[k].shape == p.shape]
    return out


def _no_pending_grads(layer) -> None:
    """Refuse while an expert gradient holds values: it was accumulated slot by slot under the old placement,
    and a replicated expert's parts live in several slots, so no row of it can follow its expert."""
    for name, p in layer.experts.named_parameters():
        if p.grad is not None and bool(p.grad.ne(0).any()):
            raise DistributedError(
                f"rank {layer.rank}: MoE layer {layer.layer_index}'s expert gradient {name!r} holds values accumulated "
                "under the running plan; apply the new plan between optimizer steps (after optimizer.step() and "
                "zero_grad()), not in the middle of gradient accumulation")


@dataclass
class _Move:
    """One layer's migration on this rank: what it sends and receives, and the staged rows of its changed slots."""

    layer: Any
    new_plan: Any
    tensors: list[tuple[str, torch.Tensor, str | None]]  # (parameter name, tensor, optimizer state key or None)
    new_experts: list[int] = field(default_factory=list)
    send: np.ndarray | None = None  # [n, 5] migration rows this rank sends (destination rank, then slot order)
    recv: np.ndarray | None = None  # [m, 5] migration rows this rank receives
    changed: torch.Tensor | None = None  # [C] local slots whose expert changes
    staged: dict[tuple[str, str | None], torch.Tensor] = field(default_factory=dict)  # [C, ...] new rows
    weight_bytes: np.ndarray | None = None  # [W] sent per destination
    state_bytes: np.ndarray | None = None
    predicted_layer_slots: int = 0


def _fingerprints(spec_hash: str, moves: list[_Move]) -> tuple[int, int]:
    """What this rank would do, which ranks must agree on: (the new plan's rows of these layers (the layer's own
    plan fingerprint), which tensors travel: weights and optimizer state)."""
    plan, tensors = hashlib.sha256(), hashlib.sha256()
    for m in moves:
        plan.update(np.int64(plan_fingerprint(spec_hash, m.new_plan, m.layer.layer_index)).tobytes())
        tensors.update(repr([(name, key, tuple(t.shape[1:]), str(t.dtype)) for name, t, key in m.tensors]).encode())
    return int.from_bytes(plan.digest()[:7], "little"), int.from_bytes(tensors.digest()[:7], "little")


def movable_optimizer(optimizer: Any, rank: int | str) -> tuple[Any, tuple[str, ...]]:
    """(the optimizer whose state moves with the experts, its per-parameter state keys that move), looking through
    a wrapper (accelerate's, in a Hugging Face Trainer); a ``DistributedError`` for one whose state cannot move."""
    if type(optimizer) not in MOVABLE_STATE and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    keys = next((v for k, v in MOVABLE_STATE.items() if type(optimizer) is k), None)
    if keys is None:
        raise DistributedError(
            f"rank {rank}: the state of optimizer {type(optimizer).__name__} cannot be moved with the experts "
            f"(supported: {', '.join(k.__name__ for k in MOVABLE_STATE)}); use one of those, or pass optimizer=None "
            "and re-create the optimizer after apply_plan (its state is then lost)")
    return optimizer, keys


def _gather_flags(layer, values: list[int], what: str) -> list[list[int]]:
    """Every rank's small integer vector, in rank order."""
    t = torch.tensor(values, dtype=torch.int64, device=layer.experts.down_proj.device)
    return [[int(x) for x in row.tolist()] for row in layer.comm.all_gather(t, what)]


def _retable(dispatch, plan) -> None:
    """Rebuild the dispatch module's replica tables for ``plan`` (same slots per rank)."""
    cand, n = plan.replica_table(dispatch.layer_index)
    dev = dispatch.cand_GER.device
    dispatch.cand_GER = torch.as_tensor(cand, dtype=torch.int64, device=dev)
    dispatch.n_GE = torch.as_tensor(np.maximum(n, 1), dtype=torch.int64, device=dev)


def _prepare(m: _Move, migrations: dict) -> None:
    """Phase 3 for one layer: which rows it sends and receives, and its changed slots' rows staged (local copies)."""
    from ..planner.replan import migration

    layer, plan = m.layer, m.new_plan
    me, S, li = layer.rank, plan.slots_per_gpu, layer.layer_index
    pair = (id(layer.plan), id(plan))
    if pair not in migrations:  # the layers of one model share their plans: one migration for all
        migrations[pair] = migration(layer.plan, plan)
    mig = migrations[pair]
    moves = mig.moves[mig.moves[:, 0] == li]  # (layer, dst slot, expert, src GPU, src slot)
    m.predicted_layer_slots = len(moves)
    m.recv = moves[moves[:, 1] // S == me]
    send = moves[moves[:, 3] == me]
    m.send = send[np.lexsort((send[:, 1], send[:, 1] // S))]  # by destination rank, then slot
    m.new_experts = [int(e) for e in plan.physical_to_logical_map[li, me * S:(me + 1) * S]]
    old_local = {e: j for j, e in enumerate(layer.slot_experts)}
    arriving = set((m.recv[:, 1] - me * S).tolist())
    changed = [j for j, e in enumerate(m.new_experts) if e != layer.slot_experts[j]]
    for j in changed:
        assert j in arriving or m.new_experts[j] in old_local, f"internal: slot {j} has no source"
    m.changed = torch.as_tensor(changed, dtype=torch.int64)
    local = [(k, old_local[m.new_experts[j]]) for k, j in enumerate(changed) if j not in arriving]
    dst, src = (torch.as_tensor(x, dtype=torch.int64) for x in zip(*local)) if local else (None, None)
    for name, t, key in m.tensors:
        raw = fp8_as_bytes(t.detach())
        buf = raw.new_zeros((len(changed), *raw.shape[1:]))
        if dst is not None:
            buf[dst.to(t.device)] = raw[src.to(t.device)]
        m.staged[(name, key)] = buf


def _transfer(m: _Move) -> None:
    """Phase 4 for one layer: one all-to-all per tensor, the received rows written into the staged ones."""
    layer = m.layer
    me, W, S = layer.rank, layer.world_size, m.new_plan.slots_per_gpu
    send_W = np.bincount(m.send[:, 1] // S, minlength=W).tolist()
    recv_W = np.bincount(m.recv[:, 3], minlength=W).tolist()
    # Received rows arrive grouped by source rank (rank order), each group in destination-slot order.
    recv_slots = m.recv[np.lexsort((m.recv[:, 1], m.recv[:, 3])), 1] - me * S
    where = {int(j): k for k, j in enumerate(m.changed.tolist())}
    recv_rows = torch.as_tensor([where[int(j)] for j in recv_slots], dtype=torch.int64)
    src_rows = torch.as_tensor((m.send[:, 4] - me * S).astype(np.int64))
    m.weight_bytes, m.state_bytes = np.zeros(W, np.int64), np.zeros(W, np.int64)
    for name, t, key in m.tensors:
        rows = fp8_as_bytes(t.detach())[src_rows.to(t.device)]
        what = f"apply_plan transfer (MoE layer {layer.layer_index} {name}{'' if key is None else ' ' + key})"
        got = layer.comm.all_to_all(rows, send_W, recv_W, what)
        if len(recv_rows):
            m.staged[(name, key)][recv_rows.to(t.device)] = got
        nbytes = np.asarray(send_W, np.int64) * t.element_size() * int(np.prod(t.shape[1:], dtype=np.int64))
        nbytes[me] = 0
        (m.weight_bytes if key is None else m.state_bytes)[:] += nbytes


def _commit(m: _Move) -> None:
    """Phase 5 for one layer: the staged rows into the parameters and optimizer state; tables and plan swapped."""
    layer = m.layer
    with torch.no_grad():
        for name, t, key in m.tensors:
            if len(m.changed):
                fp8_as_bytes(t.detach())[m.changed.to(t.device)] = m.staged[(name, key)]
    _retable(layer.ep_dispatch, m.new_plan)
    layer.experts.slot_experts = list(m.new_experts)
    layer.__dict__.update(plan=m.new_plan, slot_experts=list(m.new_experts))


def apply_plan(layers, new_plan, optimizer: Any = None) -> Any:
    """Move ``layers`` (an ``ExpertParallelMoE``, or several of one model) to ``new_plan``; see the module
    docstring. Collective: every rank calls it with the same layers and plan.

    Returns this rank's report (a list of them for a sequence of layers): ``slots_received``, ``slots_sent``,
    ``weight_bytes_sent`` / ``state_bytes_sent`` [W] per destination, ``predicted_weight_bytes`` (the
    planner's migration in the layer's dtype, this rank's share; ``predicted_layer_weight_bytes``: all
    ranks') and ``seconds`` per phase (of the whole call).
    """
    one = not isinstance(layers, Sequence)
    layers = [layers] if one else list(layers)
    if not layers:
        raise DistributedError("apply_plan: no layers given")
    first = layers[0]
    me, W = first.rank, first.world_size
    label = f"rank {me} of {W}: apply_plan"
    seconds: dict[str, float] = {}
    # Phase 1: local checks only; their outcome goes to every rank in the handshake.
    t0 = time.perf_counter()
    error: BaseException | None = None
    moves: list[_Move] = []
    try:
        indices = [int(layer.layer_index) for layer in layers]
        if len(set(indices)) != len(indices):
            raise DistributedError(f"rank {me}: apply_plan got MoE layer(s) "
                                   f"{sorted({i for i in indices if indices.count(i) > 1})} more than once")
        checked = None
        for layer in layers:
            plan = _check_plan(layer, new_plan if checked is None else checked)
            checked = plan
            _no_pending_grads(layer)
            rows = _optimizer_rows(layer, optimizer)
            tensors = [(name, p, None) for name, p in layer.experts.named_parameters()]
            tensors += [(name, t, key) for name, got in rows.items() for key, t in got]
            moves.append(_Move(layer=layer, new_plan=plan, tensors=tensors))
        plan_print, tensor_print = _fingerprints(checked.spec_hash, moves)
    except Exception as exc:  # noqa: BLE001 - shared with every rank by the handshake, then raised here
        error, plan_print, tensor_print = exc, 0, 0
    # Phase 2: the handshake; nothing has moved yet.
    got = _gather_flags(first, [0 if error else 1, plan_print, tensor_print], "apply_plan handshake")
    if error is not None:
        raise error
    refused = [r for r, (ok, _, _) in enumerate(got) if not ok]
    if refused:
        raise DistributedError(f"{label}: ranks {refused} refused the new plan in their checks (their errors say "
                               "why); every rank stays on the old plan")
    differ = [r for r, (_, f, _) in enumerate(got) if f != plan_print]
    if differ:
        raise DistributedError(f"{label}: ranks {differ} apply a different new plan to these layers; every rank must "
                               "apply the same plan (nothing was moved)")
    differ = [r for r, (_, _, f) in enumerate(got) if f != tensor_print]
    if differ:
        here = "no optimizer" if optimizer is None else f"optimizer {type(optimizer).__name__}"
        raise DistributedError(f"{label}: ranks {differ} would move other optimizer state than this rank ({here}, "
                               f"{sum(len(m.tensors) for m in moves)} tensors with the weights); every rank must pass "
                               "the same kind of optimizer (or every rank None), with state for the same expert "
                               "parameters (nothing was moved)")
    seconds["handshake"] = time.perf_counter() - t0
    # Phase 3: what moves (the same on every rank), the changed slots' rows staged beside the old ones.
    t0 = time.perf_counter()
    try:
        migrations: dict = {}
        for m in moves:
            _prepare(m, migrations)
    except Exception as exc:  # noqa: BLE001 - reported to every rank by the vote, then re-raised here
        error = exc
    votes = _gather_flags(first, [0 if error else 1], "apply_plan prepare vote")
    if error is not None:
        raise DistributedError(f"{label}: preparing the new slots failed ({error}); every rank stays on the old "
                               "plan") from error
    if min(v for v, in votes) == 0:
        raise DistributedError(f"{label}: ranks {[r for r, (v,) in enumerate(votes) if not v]} failed to prepare "
                               "the migration; every rank stays on the old plan")
    seconds["prepare"] = time.perf_counter() - t0
    if optimizer is None and any(len(m.changed) and m.layer.training and
                                 any(p.requires_grad for p in m.layer.experts.parameters()) for m in moves):
        warnings.warn(
            f"{label}: moving experts of MoE layers in training mode without an optimizer: if an optimizer trains "
            "them, its state (momenta) of the moved experts stays in the old slots and then belongs to other experts; "
            "pass optimizer=... (Rebalancer(optimizer=...)), or call layer.eval() when the layers only serve",
            stacklevel=2)
    # Phase 4: every layer's rows, into the staged buffers.
    t0 = time.perf_counter()
    try:
        for m in moves:
            _transfer(m)
    except DistributedError:
        raise  # a collective's failure, already naming rank and phase
    except Exception as exc:  # a local failure (memory, say): this rank leaves the transfer, its peers' collectives fail
        first.comm.mark_broken(f"rank {me} left the apply_plan transfer midway ({type(exc).__name__})")
        raise DistributedError(f"{label}: the transfer failed on this rank ({type(exc).__name__}: {exc}); every rank "
                               "stays on the old plan") from exc
    seconds["transfer"] = time.perf_counter() - t0
    # Phase 5: commit only when every rank holds every row of every layer.
    t0 = time.perf_counter()
    votes = _gather_flags(first, [1], "apply_plan commit vote")
    assert min(v for v, in votes) == 1, "internal: a rank voted against the commit without raising"
    for m in moves:
        _commit(m)
    seconds["commit"] = time.perf_counter() - t0
    reports = []
    for m in moves:
        per_slot = sum(p.element_size() * p[0].numel() for p in m.layer.experts.parameters())
        reports.append({
            "rank": me,
            "layer_index": m.layer.layer_index,
            "slots_received": int(len(m.recv)),
            "slots_sent": int(len(m.send)),
            "weight_bytes_sent": m.weight_bytes.tolist(),
            "state_bytes_sent": m.state_bytes.tolist(),
            "predicted_weight_bytes": int(len(m.send)) * per_slot,
            "predicted_layer_weight_bytes": m.predicted_layer_slots * per_slot,
            "seconds": dict(seconds),
        })
    return reports[0] if one else reports
