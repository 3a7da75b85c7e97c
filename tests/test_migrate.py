"""Live migration (``ExpertParallelMoE.apply_plan``) on 2 and 4 gloo ranks against the single-process layer.

One launch of 2 ranks and one of 4 run the scenarios side by side and save what each rank saw; the
parent compares against the single-process layer (which has no placement, so it is the reference for
every plan before and after a migration), and against the planner's migration for the bytes. A third
launch kills a rank in the middle of the transfer.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moegraph
from moegraph.planner import Plan
from moegraph.planner.replan import migration
from subproc import free_port, join_ranks, rank_context

pytestmark = [pytest.mark.distributed]

TIMEOUT_S = 30.0
DEADLINE_S = 180.0
STEPS = 4  # training steps; the migration happens after STEPS // 2

# Placements with replicas: A is where the layer starts, B where it moves.
ROWS = {
    2: {"A": [5, 0, 9, 1, 2, 3, 4, 6, 7, 12, 8, 10, 11, 12, 13, 14, 15, 5, 9, 3],
        "B": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 9, 0, 2, 5]},
    4: {"A": [12, 3, 0, 2, 1, 4, 5, 6, 7, 14, 8, 9, 10, 11, 4, 12, 13, 14, 15, 8],
        "B": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 3, 0, 1, 2]},
}


def _spec(world: int, dtype: str = "float32"):
    d = moegraph.load_spec("deepseek-v3-tiny").model_dump(mode="json")
    d["model"]["num_layers"] = d["model"]["first_k_dense"] + 1
    d["moe"]["dtype"] = dtype
    d["topology"] = {"kind": "uniform", "nodes": 1 if world == 2 else 2, "gpus_per_node": 2}
    d["placement"]["redundant_slots"] = 4
    return moegraph.load_spec(d)


def _plan(spec, world: int, which: str) -> Plan:
    return Plan(np.array([ROWS[world][which]]), spec)


def _state(spec) -> dict:
    layer = moegraph.compile(spec, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _batch(world: int, rank: int, step: int, d: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 3 + rank, d, generator=g), torch.randn(2, 3 + rank, d, generator=g)


# ------------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------------


def _error(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        return type(exc).__name__, str(exc)
    return "none", ""


def _run_main(rank: int, world: int) -> dict:
    spec = _spec(world)
    state = _state(spec)
    a, b = _plan(spec, world, "A"), _plan(spec, world, "B")
    d = spec.moe.hidden_size
    res: dict = {}
    # Inference: move, then forward and backward on the new placement.
    layer = moegraph.compile(spec, plan=a, seed=None, timeout=TIMEOUT_S)
    layer.load_state_dict(state)
    bad_spec = _spec(world, dtype="bfloat16")
    res["bad_spec"] = _error(lambda: layer.apply_plan(Plan(np.array([ROWS[world]["B"]]), bad_spec)))
    res["bad_world"] = _error(lambda: layer.apply_plan(_plan(_spec(4 if world == 2 else 2), 4 if world == 2 else 2,
                                                             "B")))
    adagrad = torch.optim.Adagrad(layer.parameters())
    res["bad_optimizer"] = _error(lambda: layer.apply_plan(b, optimizer=adagrad))
    res["slots_before"] = list(layer.slot_experts)
    res["report"] = layer.apply_plan(b)
    res["slots_after"] = list(layer.slot_experts)
    x, gy = _batch(world, rank, 0, d)
    x.requires_grad_(True)
    y = layer(x)
    (y * gy).sum().backward()
    layer.sync_grads()
    res["y"], res["x_grad"] = y.detach(), x.grad
    res["grads"] = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.eval()
    with torch.inference_mode():
        res["y_eval"] = layer(x.detach())
        # Every expert strategy, not only the one this process's tuner timed fastest: a rank can get
        # calls no single-process test makes (no routed rows at all, only shared experts).
        from moegraph import strategies

        for name in strategies.STRATEGIES:
            with strategies.pinned(name):
                res[f"y_eval_{name}"] = layer(x.detach())
    res["full"] = layer.full_state_dict()
    # Training with AdamW: STEPS // 2 steps on A, migrate with the optimizer, the rest on B.
    layer = moegraph.compile(spec, plan=a, seed=None, timeout=TIMEOUT_S)
    layer.load_state_dict(state)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(STEPS):
        if step == STEPS // 2:
            res["train_report"] = layer.apply_plan(b, optimizer=opt)
        x, gy = _batch(world, rank, step + 1, d)
        (layer(x) * gy).sum().backward()
        layer.sync_grads()
        opt.step()
        opt.zero_grad()
    res["trained"] = layer.full_state_dict()
    # Rebalancer on a drifting stream: re-plans at steps 3 and 6, each applied on every rank.
    from moegraph.distributed.rebalance import drift_demo

    layer = moegraph.compile(spec, plan=a, seed=None, timeout=TIMEOUT_S)
    layer.load_state_dict(state)
    plans = [layer.plan.physical_to_logical_map.copy()]
    from moegraph.distributed import migrate

    orig = migrate.apply_plan

    def spy(layers, new_plan, optimizer=None):
        out = orig(layers, new_plan, optimizer=optimizer)
        plans.append(new_plan.physical_to_logical_map.copy())
        return out

    migrate.apply_plan = spy  # what the Rebalancer calls (this worker process only)
    res["drift"] = drift_demo([layer], steps=6, every=3, tokens=24, seed=1)
    migrate.apply_plan = orig
    res["drift_plans"] = plans
    res["drift_full"] = layer.full_state_dict()
    # Threshold trigger: tokens pulled towards experts 0-3 (on few GPUs under A) overload them.
    from moegraph.distributed.rebalance import Rebalancer

    layer = moegraph.compile(spec, plan=a, seed=None, timeout=TIMEOUT_S)
    layer.load_state_dict(state)
    rb = Rebalancer([layer], threshold=1.3, check_every=2, window_tokens=64)
    pull = torch.zeros(spec.moe.experts.num_experts)
    pull[:4] = 1.0
    g = torch.Generator().manual_seed(50 + rank)
    seen = []
    with torch.inference_mode():
        for _ in range(4):
            x = torch.randn(32, d, generator=g) + 12.0 * (pull @ layer.router.weight.detach())
            layer(x)
            seen.append(rb.step())
    res["threshold_events"] = seen
    return res


def _run_die(rank: int, world: int, how: str = "exit") -> dict:
    """Rank 1 dies in the middle of the transfer (``how="exit"``), or fails there with a local error (``"raise"``,
    at its second all-to-all); rank 0 must fail within its timeout on the old plan, rank 1 (when it lives) too."""
    spec = _spec(world)
    state = _state(spec)
    a, b = _plan(spec, world, "A"), _plan(spec, world, "B")
    layer = moegraph.compile(spec, plan=a, seed=None, timeout=3.0)
    layer.load_state_dict(state)
    before = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    if rank == 1:
        real = layer.comm.all_to_all
        calls = []

        def die(*args, **kwargs):
            calls.append(1)
            if how == "exit":
                os._exit(17)  # dies without a word, after the handshake and prepare vote
            if len(calls) == 2:
                raise MemoryError("simulated: no memory for the received rows")
            return real(*args, **kwargs)

        layer.comm.all_to_all = die
    t0 = time.perf_counter()
    err = _error(lambda: layer.apply_plan(b))
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = _error(lambda: layer(torch.randn(3, spec.moe.hidden_size)))  # refused at once: the group is out of step
    return {"error": err, "seconds": seconds, "next": (*after, time.perf_counter() - t0), "slots": list(layer.slot_experts),
            "same_weights": all(torch.equal(before[n], p) for n, p in layer.experts.named_parameters()),
            "same_tables": bool(torch.equal(layer.ep_dispatch.cand_GER,
                                            torch.as_tensor(a.replica_table(0)[0])))}


def _fp8_spec(world: int):
    d = moegraph.load_spec("deepseek-v3-fp8-tiny").model_dump(mode="json")
    d["model"]["num_layers"] = d["model"]["first_k_dense"] + 1
    d["topology"] = {"kind": "uniform", "nodes": 1, "gpus_per_node": world}
    d["placement"]["redundant_slots"] = 4
    return moegraph.load_spec(d)


def _two_layer_spec(world: int):
    d = _spec(world).model_dump(mode="json")
    d["model"]["num_layers"] = d["model"]["first_k_dense"] + 2
    return moegraph.load_spec(d)


def _ergo_spec(world: int):
    """Ergo's norms on the main suite's layer: a weight per expert in each expert's output norm, and a normalised
    shared expert."""
    d = _spec(world).model_dump(mode="json")
    d["moe"]["experts"]["output_norm"] = {"eps": 1e-6, "per_expert": True}
    d["moe"]["shared_experts"]["output_norm"] = {"eps": 1e-6}
    return moegraph.load_spec(d)


def _run_edges(rank: int, world: int) -> dict:
    """What the main suite does not reach: FP8 weights, a weight per expert in the experts' output norm, a model's
    layers moving together, gradients."""
    from moegraph.distributed import apply_plan, migrate
    from moegraph.distributed.rebalance import Rebalancer, drift_demo

    res: dict = {}
    # FP8 experts (float8 weights + float32 block scales) migrate as bytes.
    spec = _fp8_spec(world)
    layer = moegraph.compile(spec, plan=_plan(spec, world, "A"), seed=0, timeout=TIMEOUT_S)
    x = _batch(world, rank, 0, spec.moe.hidden_size)[0].to(torch.bfloat16)
    with torch.no_grad():
        res["fp8_y_before"] = layer(x)
    res["fp8_report"] = layer.apply_plan(_plan(spec, world, "B"))
    res["fp8_slots"] = list(layer.slot_experts)
    res["fp8_local"] = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("experts.slots.")}
    with torch.no_grad():
        res["fp8_y_after"] = layer(x)
    res["fp8_full"] = layer.full_state_dict()
    # The drifting-stream demo (``moegraph run --rebalance-every``) feeds an FP8 layer its compute dtype
    res["fp8_drift"] = drift_demo([layer], steps=2, every=1, tokens=8, seed=3)
    # A weight per expert in the experts' output norm moves with its expert: outputs and gradients after the move.
    spec = _ergo_spec(world)
    layer = moegraph.compile(spec, plan=_plan(spec, world, "A"), seed=None, timeout=TIMEOUT_S)
    layer.load_state_dict(_state(spec))
    res["ergo_report"] = layer.apply_plan(_plan(spec, world, "B"))
    res["ergo_slots"] = list(layer.slot_experts)
    x, gy = _batch(world, rank, 0, spec.moe.hidden_size)
    y = layer(x)
    (y * gy).sum().backward()
    layer.sync_grads()
    res["ergo_y"], res["ergo_norm_grad"] = y.detach(), layer.experts.output_norm_weight.grad.clone()
    res["ergo_full"] = layer.full_state_dict()
    # Two MoE layers move together: a failure in one leaves both on the old plan.
    spec = _two_layer_spec(world)
    a2 = Plan(np.array([ROWS[world]["A"], ROWS[world]["B"]]), spec)
    b2 = Plan(np.array([ROWS[world]["B"], ROWS[world]["A"]]), spec)
    layers = [moegraph.compile(spec, plan=a2, layer_index=i, seed=0, timeout=TIMEOUT_S) for i in range(2)]
    before = [{n: p.detach().clone() for n, p in lay.experts.named_parameters()} for lay in layers]
    real = migrate._prepare

    def fail_on_layer_1(m, migrations):
        if rank == 1 and m.layer.layer_index == 1:
            raise MemoryError("no memory for the staged rows (simulated)")
        return real(m, migrations)

    migrate._prepare = fail_on_layer_1
    res["two_fail"] = _error(lambda: apply_plan(layers, b2))
    migrate._prepare = real
    res["two_after_fail"] = [(list(lay.slot_experts), all(torch.equal(before[i][n], p) for n, p in
                                                         lay.experts.named_parameters()))
                             for i, lay in enumerate(layers)]
    res["two_reports"] = apply_plan(layers, b2)
    res["two_slots"] = [list(lay.slot_experts) for lay in layers]
    # One layer migrated alone: the layers run different placements, which a Rebalancer refuses (it re-plans
    # and saves one plan for every layer); moving every layer to one plan mends it.
    layers[0].apply_plan(a2)
    res["mixed_refused"] = _error(lambda: Rebalancer(layers, every=1, window_tokens=64))
    apply_plan(layers, a2)
    res["mended"] = Rebalancer(layers, every=1, window_tokens=64).plan.physical_to_logical_map.tolist()
    # Expert gradients pending (rank 0 only): refused on rank 0, named by the others; nothing moves.
    spec = _spec(world)
    layer = moegraph.compile(spec, plan=_plan(spec, world, "A"), seed=0, timeout=TIMEOUT_S)
    x, gy = _batch(world, rank, 0, spec.moe.hidden_size)
    (layer(x) * gy).sum().backward()
    if rank != 0:
        layer.zero_grad()
    res["pending"] = _error(lambda: layer.apply_plan(_plan(spec, world, "B")))
    res["pending_slots"] = list(layer.slot_experts)
    # A migration between a forward and its backward: the backward refuses the changed weights.
    layer.zero_grad()
    y = layer(x)
    layer.apply_plan(_plan(spec, world, "B"))
    res["stale_backward"] = _error(lambda: (y * gy).sum().backward())
    # In a Hugging Face Trainer: the callback steps the Rebalancer at on_step_end with the Trainer's optimizer.
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

    layer = moegraph.compile(spec, plan=_plan(spec, world, "A"), seed=0, timeout=TIMEOUT_S)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01)
    (layer(x) * gy).sum().backward()
    layer.sync_grads()
    opt.step()
    opt.zero_grad()

    class Wrapped:  # as accelerate wraps the optimizer a Trainer passes to its callbacks
        def __init__(self, optimizer):
            self.optimizer = optimizer

    layer.start_recording()  # a recording the Rebalancer replaces: it says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rb = Rebalancer([layer], every=1, window_tokens=64)
    res["recorder_warnings"] = [str(w.message) for w in caught]
    pull = torch.zeros(spec.moe.experts.num_experts)
    pull[:4] = 1.0  # tokens pulled towards experts 0-3, on few GPUs under A: an imbalance well above the noise
    g = torch.Generator().manual_seed(70 + rank)
    with torch.no_grad():
        layer(torch.randn(32, spec.moe.hidden_size, generator=g) + 12.0 * (pull @ layer.router.weight.detach()))
    # expert-parallel over several processes: refused (a multi-process Trainer's DDP would overwrite the experts);
    # the callback's mechanics are exercised here on the same layers through its builder
    res["trainer_ddp"] = _error(rb.as_trainer_callback)
    handler = CallbackHandler([rb._trainer_callback()], layer, None, Wrapped(opt), None)
    replan_module = sys.modules["moegraph.planner.replan"]
    real_replan, calls = replan_module.replan, []
    replan_module.replan = lambda *a, **k: calls.append(1) or real_replan(*a, **k)
    handler.on_step_end(None, TrainerState(), TrainerControl())
    replan_module.replan = real_replan
    res["trainer_replans_here"] = len(calls)
    res["trainer_plan"] = layer.plan.physical_to_logical_map.copy()
    res["trainer_events"] = rb.events
    res["trainer_optimizer"] = rb.optimizer is not None
    # on_save writes the running plan and the Rebalancer's counters into the checkpoint folder; a Rebalancer of
    # layers compiled with that plan continues from them, one of layers on another plan is refused.
    import tempfile
    from types import SimpleNamespace

    box = [tempfile.mkdtemp(prefix="moegraph-ckpt-") if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    ckpt = Path(box[0]) / "checkpoint-7"
    ckpt.mkdir(parents=True, exist_ok=True)  # as the Trainer made it (one host: every rank sees it)
    saved_at = TrainerState()
    saved_at.global_step = 7
    handler.on_save(SimpleNamespace(output_dir=box[0]), saved_at, TrainerControl())
    torch.distributed.barrier()
    resumed = moegraph.compile(spec, plan=Plan.load(ckpt / "moegraph_plan.json"), seed=0, timeout=TIMEOUT_S)
    rb2 = Rebalancer([resumed], every=1, window_tokens=64)
    rb2.load_state(ckpt)
    res["resumed"] = [(r.steps, r._last_replan, r.events) for r in (rb, rb2)]
    res["resumed_same_plan"] = bool(np.array_equal(resumed.plan.physical_to_logical_map,
                                                   layer.plan.physical_to_logical_map))
    original = moegraph.compile(spec, plan=_plan(spec, world, "A"), seed=0, timeout=TIMEOUT_S)
    res["resumed_on_another_plan"] = _error(lambda: Rebalancer([original], every=1).load_state(ckpt))
    # Resumed at step 6 of every=4 (last re-plan at 4): the next re-plan, at 8, prices moves over every=4 steps
    # of the tokens per step seen since the resume (32 per rank), not over the steps since the last re-plan.
    if rank == 0:
        (ckpt / "moegraph_rebalancer.json").write_text(json.dumps(
            {"format": "moegraph-rebalancer", "version": 1, "steps": 6, "last_replan": 4, "events": []}))
    torch.distributed.barrier()
    rb3 = Rebalancer([resumed], every=4, window_tokens=64)
    rb3.load_state(ckpt)
    for _ in range(2):
        with torch.no_grad():
            resumed(torch.randn(32, spec.moe.hidden_size, generator=g))
        ev = rb3.step()
    res["resumed_horizon"] = (rb3.steps, None if ev is None else ev["horizon_tokens"])
    # State files that cannot be resumed from are refused, naming the file, and leave the counters alone.
    bad = {"missing": None, "corrupt": "{", "not_a_state": "[1]",
           "newer": json.dumps({"format": "moegraph-rebalancer", "version": 2, "steps": 6, "last_replan": 4,
                                "events": []})}
    if rank == 0:
        for name, text in bad.items():
            (Path(box[0]) / name).mkdir()
            shutil.copy(ckpt / "moegraph_plan.json", Path(box[0]) / name)
            if text is not None:
                (Path(box[0]) / name / "moegraph_rebalancer.json").write_text(text)
    torch.distributed.barrier()
    rb4 = Rebalancer([resumed], every=4, window_tokens=64)
    res["bad_states"] = {name: _error(lambda name=name: rb4.load_state(Path(box[0]) / name)) for name in bad}
    res["bad_states_left"] = (rb4.steps, rb4._last_replan, rb4.events)
    # The windows travel with the state: saved mid-interval, a resumed Rebalancer holds the same tokens (its own
    # window's most recent ones where it keeps fewer), counts the interval from the same step, and a window file
    # that cannot be read leaves the windows empty with a warning.
    rb5 = Rebalancer([resumed], every=100, window_tokens=64)
    rb5.load_state(ckpt)  # steps 6 (the state rewritten above)
    with torch.no_grad():
        resumed(torch.randn(24, spec.moe.hidden_size, generator=g))
    rb5.steps += 1
    with_windows = Path(box[0]) / "with-windows"
    if rank == 0:
        with_windows.mkdir()
    torch.distributed.barrier()
    rb5.save_state(with_windows)
    torch.distributed.barrier()
    rb6, rb7 = Rebalancer([resumed], every=100, window_tokens=64), Rebalancer([resumed], every=100, window_tokens=16)
    for r in (rb6, rb7):
        r.load_state(with_windows)
    res["windows"] = [(r._recorders[0].ids().tolist(), r._recorders[0].samples().tolist(), r._recorders[0].seen,
                       r._window_start) for r in (rb5, rb6, rb7)]
    windows_file = with_windows / f"moegraph_windows.rank{rank}-of-{world}.npz"

    def resume_warnings() -> tuple[list[str], int, int]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rb8 = Rebalancer([resumed], every=100, window_tokens=64)
            rb8.load_state(with_windows)
        return [str(w.message) for w in caught], rb8._recorders[0].seen, rb8.steps

    windows_file.write_bytes(b"not an npz")
    res["windows_corrupt"] = resume_warnings()
    windows_file.unlink()
    res["windows_missing"] = resume_warnings()
    torch.distributed.barrier()
    if rank == 0:  # as if saved by another number of ranks
        state = json.loads((with_windows / "moegraph_rebalancer.json").read_text())
        state["windows"]["world_size"] = world + 1
        (with_windows / "moegraph_rebalancer.json").write_text(json.dumps(state))
    torch.distributed.barrier()
    res["windows_other_world"] = resume_warnings()
    # An optimizer whose state cannot move, handed over by the Trainer: refused before the first step, with
    # advice that applies in a Trainer.
    handler3 = CallbackHandler([Rebalancer([resumed], every=1)._trainer_callback()], resumed, None,
                               torch.optim.RMSprop(resumed.parameters()), None)
    res["trainer_rmsprop"] = _error(lambda: handler3.on_train_begin(None, TrainerState(), TrainerControl()))
    # A later Trainer's optimizer is adopted at its train, by a new callback of the same Rebalancer too; an
    # evaluation before its first step (eval_on_start) is not recorded.
    opt2 = torch.optim.AdamW(layer.parameters(), lr=0.01)
    handler2 = CallbackHandler([rb._trainer_callback()], layer, None, Wrapped(opt2), None)
    handler.on_step_begin(None, TrainerState(), TrainerControl())  # recording, as after a step of the first run
    handler2.on_train_begin(SimpleNamespace(world_size=1), TrainerState(), TrainerControl())
    with torch.no_grad():
        layer.eval()(torch.randn(32, spec.moe.hidden_size, generator=g))
    res["trainer_adopted"] = (rb.optimizer is opt2, rb.optimizer is not opt)
    res["window_after_eval_on_start"] = int(layer.recorder.ids().shape[0])
    # The evaluation a Trainer runs after on_step_end is not recorded; the next step's forwards are.
    with torch.no_grad():
        layer.eval()(torch.randn(32, spec.moe.hidden_size, generator=g))
        res["window_after_eval"] = int(layer.recorder.ids().shape[0])
        handler.on_step_begin(None, TrainerState(), TrainerControl())
        layer.train()(torch.randn(32, spec.moe.hidden_size, generator=g))
        res["window_after_train_step"] = int(layer.recorder.ids().shape[0])
    # Optimizers: a migration of training-mode layers without one warns (its state would stay behind), in eval
    # mode it does not; one whose state cannot move is refused by the Rebalancer at once; ranks that pass
    # different kinds are told it was the optimizer.
    layer = moegraph.compile(spec, plan=_plan(spec, world, "A"), seed=0, timeout=TIMEOUT_S)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.apply_plan(_plan(spec, world, "B"))
        layer.eval().apply_plan(_plan(spec, world, "A"))
    res["no_optimizer_warnings"] = [str(w.message) for w in caught]
    layer.train()
    res["rmsprop"] = _error(lambda: Rebalancer([layer], every=2, optimizer=torch.optim.RMSprop(layer.parameters())))
    sgd = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    (layer(x) * gy).sum().backward()
    layer.sync_grads()
    sgd.step()
    sgd.zero_grad()
    res["mixed_optimizers"] = _error(lambda: layer.apply_plan(_plan(spec, world, "B"),
                                                              optimizer=sgd if rank == 0 else None))
    res.update(_rebalancer_bookkeeping(spec, world, rank, pull))
    return res


def _rebalancer_bookkeeping(spec, world: int, rank: int, pull) -> dict:
    """The Rebalancer's own state across what a training or serving loop does around it."""
    from moegraph.distributed.rebalance import Rebalancer, WindowRecorder, _max_mean

    res: dict = {}
    g = torch.Generator().manual_seed(90 + rank)

    def fresh():
        return moegraph.compile(spec, plan=_plan(spec, world, "A"), seed=0, timeout=TIMEOUT_S)

    def pulled(layer):  # tokens towards experts 0-3, on few GPUs under A
        return torch.randn(32, spec.moe.hidden_size, generator=g) + 12.0 * (pull @ layer.router.weight.detach())

    layer = fresh()
    res["bad_args"] = [_error(lambda kw=kw: Rebalancer([layer], every=2, **kw))
                       for kw in ({"max_moves": -1}, {"seed": 1.5}, {"horizon_tokens": -5.0}, {"window_tokens": 0},
                                  {"move_target": 1.5}, {"max_moves": 0}, {"max_move_bytes": 1.0})]
    res["not_ep"] = _error(lambda: Rebalancer([moegraph.compile(spec, seed=0)], every=2))
    # A loop that logs the measured balance and resets the layer's traffic counters every step: the threshold
    # check still judges the step's traffic.
    rb = Rebalancer([layer], threshold=1.3, window_tokens=64)
    with torch.no_grad():
        layer(pulled(layer))
    res["logged"] = rb.measured_imbalance()
    layer.reset_traffic()
    res["logged_then_step"] = rb.step()
    # Forwards while paused (an evaluation between training steps) stay out of the threshold's counts, as out of
    # the windows: the figure the check judges is the same before the pause, during it and after it.
    layer = fresh()
    rb = Rebalancer([layer], threshold=1.3, window_tokens=64)
    with torch.no_grad():
        layer(torch.randn(32, spec.moe.hidden_size, generator=g))
        figures = [rb.measured_imbalance()]
        rb.pause()
        layer(pulled(layer))
        figures.append(rb.measured_imbalance())
        rb.resume()
        figures.append(rb.measured_imbalance())
        layer(pulled(layer))  # recorded again: counted
        figures.append(rb.measured_imbalance())
    res["paused_figures"], res["paused_seen"] = figures, layer.recorder.seen
    # ``every`` counts from the last re-plan, whatever triggered it: a threshold re-plan at step 1, then every=3
    # re-plans at step 4, not 3.
    layer = fresh()
    rb = Rebalancer([layer], every=3, threshold=1.3, window_tokens=64)
    steps = []
    for step in range(1, 5):
        if step == 2:
            rb.threshold = None
        with torch.no_grad():
            layer(pulled(layer))
        steps.append(step if rb.step() is not None else None)
    res["replanned_at"] = [s for s in steps if s is not None]
    # A migration refused (expert gradients pending on rank 0) keeps the window and says so; once the gradients
    # are gone the next step re-plans from it, its tokens included.
    layer = fresh()
    rb = Rebalancer([layer], every=1, window_tokens=256)
    x = pulled(layer)
    layer(x).sum().backward()  # a collective: every rank
    if rank != 0:
        layer.zero_grad()
    res["failed_apply"] = _error(rb.step)
    res["failed_event"] = rb.events[-1]
    res["window_after_failure"] = int(layer.recorder.ids().shape[0])
    layer.zero_grad()
    with torch.no_grad():
        layer(pulled(layer))
    res["after_failure"] = rb.step()
    # A recording started over the Rebalancer's window: the window comes back, with a warning.
    layer.start_recording()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            layer(pulled(layer))
        rb.step()
    res["replaced_warnings"] = [str(w.message) for w in caught]
    res["recorder_back"] = isinstance(layer.recorder, WindowRecorder) and layer.recorder is rb._recorders[0]
    # The threshold judged against sampling noise: balanced (unpulled) traffic in batches of 2 tokens per rank,
    # a threshold just above 1. Per step: the figure the check judges (read first: reading moves nothing), its
    # noise floor, whether the step re-planned and whether the check's baseline moved.
    layer = fresh()
    rb = Rebalancer([layer], threshold=1.000001, window_tokens=64)
    g = torch.Generator().manual_seed(90 + rank)
    checks = []
    for _ in range(5):
        with torch.no_grad():
            layer(torch.randn(2, spec.moe.hidden_size, generator=g))
        counts = rb._gather()[0]
        measured, floor = _max_mean(counts), rb._check.floor(counts)
        before = rb._checked.copy()
        ev = rb.step()
        checks.append((measured, floor, ev is not None, not np.array_equal(before, rb._checked)))
    res["noise_checks"] = checks
    return res


SUITES = {"main": _run_main, "die": _run_die, "fail": lambda rank, world: _run_die(rank, world, how="raise"),
          "edges": _run_edges}


def _entry(rank: int, world: int, port: int, suite: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=60))
        result = {"ok": SUITES[suite](rank, world)}
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = {"crash": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - peers may be gone
        pass


# ------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------


def _launch_all(root: Path, runs: dict[str, tuple[int, str]]) -> dict[str, list[dict]]:
    """Start every run (name -> (world, suite)) at once; wait (bounded) and collect each rank's result."""
    ctx = rank_context()
    procs = {}
    for name, (world, suite) in runs.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        procs[name] = [ctx.Process(target=_entry, args=(r, world, port, suite, str(out)), daemon=True)
                       for r in range(world)]
        for p in procs[name]:
            p.start()
    end = time.monotonic() + DEADLINE_S
    return {name: join_ranks(ps, root / name, end, name) for name, ps in procs.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _launch_all(tmp_path_factory.mktemp("migrate"), {"w2": (2, "main"), "w4": (4, "main"), "die": (2, "die"),
                                                           "fail": (2, "fail"), "edges": (2, "edges")})


def _ok(results: list[dict]) -> list[dict]:
    bad = [f"rank {r}: {res.get('crash', res)}" for r, res in enumerate(results) if "ok" not in res]
    assert not bad, "\n".join(bad)
    return [res["ok"] for res in results]


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())), msg=what)


@pytest.mark.parametrize("world", [2, 4])
def test_outputs_and_gradients_after_apply_plan_equal_the_single_process_layer(runs, world):
    res = _ok(runs[f"w{world}"])
    spec = _spec(world)
    state = _state(spec)
    ref = moegraph.compile(spec, seed=0)
    ref.load_state_dict(state)
    xs = [_batch(world, r, 0, spec.moe.hidden_size) for r in range(world)]
    xr = [x.clone().requires_grad_(True) for x, _ in xs]
    ys = [ref(x) for x in xr]
    sum((y * g).sum() for y, (_, g) in zip(ys, xs)).backward()
    b = ROWS[world]["B"]
    s = len(b) // world
    for r, out in enumerate(res):
        assert out["slots_before"] == ROWS[world]["A"][r * s:(r + 1) * s]
        assert out["slots_after"] == b[r * s:(r + 1) * s]
        _close(out["y"], ys[r].detach(), f"rank {r} output")
        _close(out["x_grad"], xr[r].grad, f"rank {r} input gradient")
        idx = torch.tensor(out["slots_after"])
        for n, g in out["grads"].items():
            want = ref.get_parameter(n).grad
            _close(g, want[idx] if n.startswith("experts.") else want, f"rank {r} gradient of {n}")
        with torch.no_grad():
            want = ref.eval()(xs[r][0])
        for key in [k for k in out if k.startswith("y_eval")]:
            _close(out[key], want, f"rank {r} eval output ({key})")
        ref.train()
        # the weights travelled intact: the gathered single-process state is the one loaded
        for k, v in state.items():
            _close(out["full"][k], v, f"rank {r} full_state_dict {k}")


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_sent_equal_the_planners_migration(runs, world):
    res = _ok(runs[f"w{world}"])
    spec = _spec(world)
    mig = migration(_plan(spec, world, "A"), _plan(spec, world, "B"))
    assert mig.slots_moved > 0
    sent = np.array([o["report"]["weight_bytes_sent"] for o in res])  # [src, dst]
    # float32 layer, float32 spec: the planner's bytes are the runtime's
    assert int(sent.sum()) == mig.bytes
    np.testing.assert_array_equal(sent, mig.link_bytes)
    assert sum(o["report"]["slots_received"] for o in res) == mig.slots_moved
    # AdamW moves two state tensors of each moved slot's parameters alongside (same shape, float32)
    state_sent = sum(sum(o["train_report"]["state_bytes_sent"]) for o in res)
    assert state_sent == 2 * mig.bytes


@pytest.mark.parametrize("world", [2, 4])
def test_training_that_migrates_midway_matches_training_that_never_does(runs, world):
    res = _ok(runs[f"w{world}"])
    spec = _spec(world)
    ref = moegraph.compile(spec, seed=0)
    ref.load_state_dict(_state(spec))
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(STEPS):
        loss = 0
        for r in range(world):
            x, gy = _batch(world, r, step + 1, spec.moe.hidden_size)
            loss = loss + (ref(x) * gy).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    # Adam divides by the root of the gradient's running square: where a gradient is near zero, the last bits
    # of its sum (another order on each rank) move the step by ~1e-5 of the weights. A wrong migration of the
    # optimizer state (state left behind, or given to another expert) moves them by a step, lr = 0.05.
    for r, out in enumerate(res):
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(out["trained"][k], v, rtol=1e-5, atol=1e-4, msg=f"rank {r} trained {k}")


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_is_refused_before_anything_moves(runs, world):
    res = _ok(runs[f"w{world}"])
    for out in res:
        kind, msg = out["bad_spec"]
        assert kind == "PlanFileError" and "re-plan" in msg, msg
        kind, msg = out["bad_world"]
        assert kind == "DistributedError" and "GPUs but this layer runs on" in msg, msg
        kind, msg = out["bad_optimizer"]
        assert kind == "DistributedError" and "Adagrad cannot be moved" in msg and "AdamW" in msg, msg
        # and nothing moved: the layer was still on A when apply_plan(B) ran
        r, s = out["report"]["rank"], len(ROWS[world]["A"]) // world
        assert out["slots_before"] == ROWS[world]["A"][r * s:(r + 1) * s]


def test_a_rank_dying_mid_transfer_leaves_the_others_on_the_old_plan(runs):
    res = runs["die"]
    assert res[1].get("exitcode") == 17
    out = res[0]["ok"]
    kind, msg = out["error"]
    assert kind == "DistributedError", msg
    assert "rank 0 of 2" in msg and "apply_plan transfer" in msg, msg
    assert out["seconds"] < 20.0
    assert out["slots"] == ROWS[2]["A"][:10] and out["same_weights"] and out["same_tables"]
    kind, msg, took = out["next"]
    assert kind == "DistributedError" and took < 1.0, (msg, took)
    assert "an earlier collective on this process group failed (apply_plan transfer" in msg, msg


def test_a_rank_failing_mid_transfer_names_itself_and_leaves_every_rank_on_the_old_plan(runs):
    res = _ok(runs["fail"])
    for r, out in enumerate(res):
        kind, msg = out["error"]
        assert kind == "DistributedError", msg
        assert f"rank {r} of 2" in msg and ("apply_plan transfer" in msg if r == 0 else
                                            "the transfer failed on this rank (MemoryError: simulated" in msg), msg
        assert out["seconds"] < 20.0
        s = len(ROWS[2]["A"]) // 2
        assert out["slots"] == ROWS[2]["A"][r * s:(r + 1) * s] and out["same_weights"] and out["same_tables"]
        # the rank that left the transfer midway and the one whose collective failed both refuse the next forward
        kind, msg, took = out["next"]
        assert kind == "DistributedError" and took < 1.0, (msg, took)
        assert "not started: an earlier collective on this process group failed" in msg, msg
        assert ("rank 1 left the apply_plan transfer midway (MemoryError)" if r == 1 else "apply_plan transfer") in msg


@pytest.mark.parametrize("world", [2, 4])
def test_rebalancer_replans_and_migrates_on_every_rank(runs, world):
    res = _ok(runs[f"w{world}"])
    spec = _spec(world)
    events = [[row["event"] for row in out["drift"] if row["event"] is not None] for out in res]
    assert all([e["step"] for e in ev] == [3, 6] for ev in events)
    plans = res[0]["drift_plans"]
    assert len(plans) == 3  # the start plan and two re-plans, the same on every rank
    for out in res[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(out["drift_plans"], plans))
    for k, ev in enumerate(events[0]):
        mig = migration(Plan(plans[k], spec), Plan(plans[k + 1], spec))
        assert ev["slots_moved"] == mig.slots_moved and ev["bytes_moved"] == mig.bytes  # float32 both
        assert ev["predicted_bytes_moved"] == mig.bytes and ev["state_bytes_moved"] == 0  # inference: no optimizer
        assert all(other[k]["bytes_moved"] == ev["bytes_moved"] for other in events)
    assert events[0][0]["slots_moved"] > 0
    # the horizon is the interval the plan serves: 24 tokens per rank and step x every=3 steps, all ranks
    assert all(e["horizon_tokens"] == 24 * world * 3 for ev in events for e in ev)
    # the weights are intact after the migrations
    for k, v in _state(spec).items():
        _close(res[0]["drift_full"][k], v, f"weights after rebalancing: {k}")


def test_window_recorder_keeps_the_latest_tokens_only():
    from moegraph.distributed.rebalance import WindowRecorder

    rec = WindowRecorder(max_tokens=10)
    for i in range(5):  # forwards of 2 sequences x 2 tokens, top-3 ids all equal to i
        rec.add(torch.full((2, 2, 3), i))
    # 20 tokens seen, the last 10 kept, oldest first: the last sequence of forward 2, then forwards 3 and 4 whole
    assert rec.ids()[:, 0].tolist() == [2] * 2 + [3] * 4 + [4] * 4
    assert rec.seen == 20  # the overwritten tokens count as routed
    assert rec.samples().tolist() == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    rec.add(torch.zeros(0, 4, 3, dtype=torch.long))  # an idle rank's forward: nothing held, nothing counted
    rec.add(torch.zeros(3, 0, 3, dtype=torch.long))
    assert rec.seen == 20 and rec.samples().tolist()[-1] == 9
    # One forward larger than the window keeps tokens spread over all of it (token t has ids t): every sequence
    rec.add(torch.arange(25).reshape(5, 5, 1).expand(5, 5, 3))
    assert rec.ids()[:, 0].tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22]
    assert sorted(set(rec.samples().tolist())) == [10, 11, 12, 13, 14]
    assert rec.seen == 45 and rec.ids().dtype == torch.int32
    held = rec.ids()
    rec.add(torch.full((1, 3, 3), 50))  # what was read is a copy: later forwards do not change it
    assert held[:, 0].tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22]
    rec.clear()
    assert rec.ids().numel() == 0 and rec.samples().numel() == 0 and rec.max_tokens == 10 and rec.seen == 0
    rec.add(torch.full((1, 4, 3), 1))  # a ring not yet full, read, then overwritten
    partial = rec.ids()
    rec.add(torch.full((1, 10, 3), 2))
    assert partial[:, 0].tolist() == [1] * 4 and rec.ids()[:, 0].tolist() == [2] * 10


def test_threshold_check_answers_a_drift_within_a_window_after_a_stretch_just_above_the_threshold():
    # The threshold check on counts written out: 4 ranks, 2 layers, 10 tokens per rank and step, a window of 100
    # (10 steps). 1,000 steps at max/mean 1.1005 against a threshold of 1.10 (within the sampling noise of every
    # span: the counts accumulate), then a drift to 1.13. Judged over every count since the baseline alone, the
    # drift must outweigh the 1,000 steps before it (the 18th step shows it); the last window's counts show it
    # within the window. A stretch long enough for its own excess to show fires there, as it should.
    from moegraph.distributed.rebalance import _LoadCheck

    def first_fired(window, before=1000, after=40):
        check = _LoadCheck(1.10, window, 4, 2)
        counts, seen, remembered = np.zeros((4, 2), np.int64), np.zeros(4, np.int64), 0
        for step in range(before + after):
            counts += np.array((2201, 2000, 2000, 1799) if step < before else (2260, 2000, 2000, 1740))[:, None]
            seen += 10
            measured, due, moved = check.decide(counts, seen)
            remembered = max(remembered, len(check._checks))
            assert not moved and measured > 1.10
            if due:
                return step - before, remembered
        return None, remembered

    fired, remembered = first_fired(100)
    assert 0 <= fired < 10 and remembered <= 12, (fired, remembered)  # the baseline and the window's checks
    fired, remembered = first_fired(10**9)  # a window that holds every count: the old rule
    assert fired == 17 and remembered <= _LoadCheck._KEEP
    assert first_fired(100, before=5000, after=0)[0] is not None  # 1.1005 > 1.10 shows on enough counts
    # balanced counts move the baseline at every check and never fire
    check = _LoadCheck(1.10, 100, 4, 2)
    assert all(check.decide(np.full((4, 2), 2000 * (i + 1)), np.full(4, 10 * (i + 1)))[1:] == (False, True)
               for i in range(50))


def test_window_recorder_memory_stays_bounded_whatever_the_forwards():
    from moegraph.distributed.rebalance import WindowRecorder

    rec = WindowRecorder(max_tokens=64)
    with torch.inference_mode():  # the buffer made here must take later forwards in any mode
        rec.add(torch.randint(0, 8, (1, 3, 2)))
    for step in range(2000):  # decode-like forwards of one token, and idle ones
        rec.add(torch.full((1, 1, 2), step % 8))
        rec.add(torch.zeros(0, 1, 2, dtype=torch.long))
    with torch.no_grad():
        rec.add(torch.full((1, 1, 2), 99))
    # nothing accumulates per forward: the base class's lists stay empty and the window holds 64 tokens
    assert rec.topk_ids == [] and rec.sample_ids == []
    assert rec.ids().shape == (64, 2) and rec.seen == 3 + 2001
    assert rec.ids()[-1].tolist() == [99, 99] and rec.ids()[-2].tolist() == [(1999 % 8)] * 2


def test_fp8_experts_migrate_as_bytes(runs):
    res = _ok(runs["edges"])
    spec = _fp8_spec(2)
    ref = moegraph.compile(spec, seed=0).state_dict()
    s = len(ROWS[2]["B"]) // 2
    for r, out in enumerate(res):
        assert out["fp8_slots"] == ROWS[2]["B"][r * s:(r + 1) * s]
        assert out["fp8_report"]["slots_received"] > 0
        ids = torch.tensor(out["fp8_slots"])
        names = [k[len("experts.slots."):] for k in out["fp8_local"] if k[len("experts.slots."):] in
                 ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")]
        assert len(names) == 4, sorted(out["fp8_local"])
        assert any(out["fp8_local"]["experts.slots." + n].dtype.itemsize == 1 for n in names)  # FP8 weights moved
        for n in names:  # every slot holds its expert's rows of the single-process layer, bit for bit
            got, want = out["fp8_local"]["experts.slots." + n], ref["experts." + n][ids]
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) if got.dtype.itemsize == 1 else \
                torch.equal(got, want), n
        for k, v in ref.items():
            got = out["fp8_full"][k]
            assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if v.dtype.itemsize == 1 else \
                torch.equal(got, v), f"rank {r} full_state_dict {k}"
        torch.testing.assert_close(out["fp8_y_after"].float(), out["fp8_y_before"].float(), rtol=2e-2, atol=2e-2)
        events = [row["event"] for row in out["fp8_drift"]]
        assert all(ev is not None and ev["tokens"] == 8 * len(res) and "failed" not in ev for ev in events), events


def test_a_weight_per_expert_in_the_output_norm_moves_with_its_expert(runs):
    """experts.output_norm_weight is an expert tensor: apply_plan sends its rows with the expert's other weights
    (the planner's bytes per slot count it), and after the move outputs and its gradient are the single-process
    layer's on every rank's tokens."""
    res = _ok(runs["edges"])
    spec = _ergo_spec(2)
    state = _state(spec)
    ref = moegraph.compile(spec, seed=0)
    ref.load_state_dict(state)
    xs = [_batch(2, r, 0, spec.moe.hidden_size) for r in range(2)]
    sum((ref(x) * g).sum() for x, g in xs).backward()
    mig = migration(_plan(spec, 2, "A"), _plan(spec, 2, "B"))
    assert sum(int(np.sum(o["ergo_report"]["weight_bytes_sent"])) for o in res) == mig.bytes
    s = len(ROWS[2]["B"]) // 2
    for r, out in enumerate(res):
        assert out["ergo_slots"] == ROWS[2]["B"][r * s:(r + 1) * s]
        with torch.no_grad():
            _close(out["ergo_y"], ref(xs[r][0]), f"rank {r} output")
        _close(out["ergo_norm_grad"], ref.experts.output_norm_weight.grad[torch.tensor(out["ergo_slots"])],
               f"rank {r} gradient of experts.output_norm_weight")
        for k, v in state.items():
            _close(out["ergo_full"][k], v, f"rank {r} full_state_dict {k}")


def test_a_models_layers_move_together_or_not_at_all(runs):
    res = _ok(runs["edges"])
    s = len(ROWS[2]["A"]) // 2
    for r, out in enumerate(res):
        kind, msg = out["two_fail"]
        assert kind == "DistributedError" and "stays on the old plan" in msg, msg
        assert ("ranks [1] failed to prepare" in msg) if r == 0 else ("no memory for the staged rows" in msg), msg
        # layer 0 prepared fine on every rank, yet neither layer moved
        assert out["two_after_fail"] == [(ROWS[2]["A"][r * s:(r + 1) * s], True), (ROWS[2]["B"][r * s:(r + 1) * s], True)]
        assert out["two_slots"] == [ROWS[2]["B"][r * s:(r + 1) * s], ROWS[2]["A"][r * s:(r + 1) * s]]
        assert [rep["layer_index"] for rep in out["two_reports"]] == [0, 1]
        assert out["mixed_refused"][0] == "DistributedError"
        assert "MoE layer 1 runs another placement" in out["mixed_refused"][1]
        assert "moegraph.distributed.apply_plan(layers, plan" in out["mixed_refused"][1]
        assert out["mended"] == [ROWS[2]["A"], ROWS[2]["B"]]
    spec = _two_layer_spec(2)
    mig = migration(Plan(np.array([ROWS[2]["A"], ROWS[2]["B"]]), spec), Plan(np.array([ROWS[2]["B"], ROWS[2]["A"]]), spec))
    assert sum(sum(rep["weight_bytes_sent"]) for out in res for rep in out["two_reports"]) == mig.bytes


def test_pending_expert_gradients_are_refused_and_a_stale_backward_fails(runs):
    res = _ok(runs["edges"])
    s = len(ROWS[2]["A"]) // 2
    kind, msg = res[0]["pending"]
    assert kind == "DistributedError" and "gradient" in msg and "between optimizer steps" in msg, msg
    kind, msg = res[1]["pending"]
    assert kind == "DistributedError" and "ranks [0] refused the new plan" in msg, msg
    for r, out in enumerate(res):
        assert out["pending_slots"] == ROWS[2]["A"][r * s:(r + 1) * s]
        kind, msg = out["stale_backward"]
        assert kind == "RuntimeError" and "modified in place between the forward and its backward" in msg, msg


def test_rebalancer_as_a_hugging_face_trainer_callback(runs):
    res = _ok(runs["edges"])
    for out in res:
        (ev,) = out["trainer_events"]
        assert ev["step"] == 1 and "skipped" not in ev and ev["tokens"] > 0
        assert out["trainer_optimizer"]  # taken from the event's (wrapped) optimizer
        assert out["window_after_eval"] == 0 and out["window_after_train_step"] == 32
        assert out["window_after_eval_on_start"] == 0 and out["trainer_adopted"] == (True, True)
        kind, msg = out["trainer_ddp"]
        assert kind == "DistributedError" and "expert-parallel over 2 processes" in msg and "DistributedDataParallel" in msg
        assert any("replaces that recorder" in w for w in out["recorder_warnings"]), out["recorder_warnings"]
    assert res[0]["trainer_events"][0]["slots_moved"] == res[1]["trainer_events"][0]["slots_moved"] > 0
    # rank 0 re-planned, the other rank took its plan
    assert [out["trainer_replans_here"] for out in res] == [1, 0]
    np.testing.assert_array_equal(res[0]["trainer_plan"], res[1]["trainer_plan"])


def test_a_trainer_checkpoint_keeps_the_running_plan_and_resumes_only_under_it(runs):
    for out in _ok(runs["edges"]):
        (steps, last, events), (steps2, last2, events2) = out["resumed"]
        assert steps == 1 and events[0]["slots_moved"] > 0  # the checkpoint came after a migration
        timeless = lambda evs: [{k: v for k, v in e.items() if k != "seconds"} for e in evs]  # noqa: E731 (per rank)
        assert (steps2, last2) == (steps, last) and timeless(events2) == timeless(events) and out["resumed_same_plan"]
        kind, msg = out["resumed_on_another_plan"]
        assert kind == "DistributedError" and "saved under another placement" in msg and "plan=Plan.load(" in msg, msg
        assert out["resumed_horizon"] == (8, 32 * len(_ok(runs["edges"])) * 4)
        for name, what in (("missing", "not found"), ("corrupt", "truncated or corrupt"),
                           ("not_a_state", "not a Rebalancer state"), ("newer", "version 2 is not supported")):
            kind, msg = out["bad_states"][name]
            assert kind == "DistributedError" and f"{name}/moegraph_rebalancer.json" in msg and what in msg, msg
        assert out["bad_states_left"] == (0, 0, [])
        (ids5, samples5, seen5, start5), (ids6, samples6, seen6, start6), (ids7, samples7, seen7, start7) = out["windows"]
        assert len(ids5) == 24 and seen5 == 24 and start5 == 6
        assert (ids6, samples6, seen6, start6) == (ids5, samples5, seen5, start5)
        assert (ids7, samples7, seen7, start7) == (ids5[-16:], samples5[-16:], seen5, start5)
        for key, why in (("windows_corrupt", "truncated or corrupt"), ("windows_missing", "is missing"),
                         ("windows_other_world", f"saved by {len(_ok(runs['edges'])) + 1} ranks")):
            warned, seen8, steps8 = out[key]
            assert len(warned) == 1 and "windows are not restored" in warned[0] and why in warned[0], (key, warned)
            assert (seen8, steps8) == (0, 7), key
        kind, msg = out["trainer_rmsprop"]
        assert kind == "DistributedError" and "RMSprop cannot be moved" in msg and "optim='adamw_torch'" in msg, msg


def test_rebalancer_state_is_written_as_plain_json():
    from moegraph.distributed.rebalance import _plain

    events = [{"step": np.int64(3), "x": np.arange(3), "y": float("nan"), "z": torch.tensor(2.5), "w": Path("p"),
               "t": (1, np.float32(0.5))}]
    assert json.loads(json.dumps(_plain(events), allow_nan=False)) == [
        {"step": 3, "x": [0, 1, 2], "y": None, "z": 2.5, "w": "p", "t": [1, 0.5]}]


def test_optimizers_are_checked_before_anything_moves(runs):
    for r, out in enumerate(_ok(runs["edges"])):
        warned = out["no_optimizer_warnings"]
        assert len(warned) == 1 and "in training mode without an optimizer" in warned[0], warned  # eval: none
        kind, msg = out["rmsprop"]
        assert kind == "DistributedError" and "optimizer RMSprop cannot be moved" in msg, msg
        kind, msg = out["mixed_optimizers"]
        assert kind == "DistributedError" and f"ranks [{1 - r}] would move other optimizer state" in msg, msg
        assert ("optimizer SGD" if r == 0 else "no optimizer") in msg, msg


def test_rebalancer_bookkeeping_survives_the_loop_around_it(runs):
    res = _ok(runs["edges"])
    for r, out in enumerate(res):
        assert [m for _, m in out["bad_args"]] == [
            "Rebalancer: max_moves must be an integer >= 0, got -1",
            "seed must be an integer in [0, 2**63) (it seeds the re-plan's polish), got 1.5".join(["Rebalancer: ", ""]),
            "Rebalancer: horizon_tokens must be a finite number >= 0 (tokens the new plan will serve), got -5.0",
            "Rebalancer window_tokens (tokens per rank each layer's window keeps) must be an integer >= 1, got 0",
            "Rebalancer: move_target is a share of the slots, 0 to 1 (0.15: 15%), or None for no target; got 1.5"] + \
            [m for _, m in out["bad_args"][5:]]
        # budgets that allow no move would skip every re-plan: refused at once
        assert all(m.startswith("Rebalancer: the move budget max_move") and "allows no change" in m
                   for _, m in out["bad_args"][5:]), out["bad_args"]
        assert {k for k, _ in out["bad_args"]} == {"DistributedError"}
        kind, msg = out["not_ep"]
        assert kind == "DistributedError" and "is not an expert-parallel MoE layer" in msg and "plan=PLAN" in msg, msg
        assert out["logged"] > 1.3
        ev = out["logged_then_step"]
        assert ev is not None and ev["measured_max_mean"] == pytest.approx(out["logged"]) and ev["slots_moved"] > 0
        first, during, after, pulled = out["paused_figures"]
        assert first == during == after and pulled > first + 0.3 and out["paused_seen"] == 2 * 32, out["paused_figures"]
        assert out["replanned_at"] == [1, 4]
        kind, msg = out["failed_apply"]
        assert kind == "DistributedError" and ("gradient" in msg if r == 0 else "refused the new plan" in msg), msg
        assert out["failed_event"]["failed"].startswith("DistributedError") and out["failed_event"]["slots_moved"] == 0
        assert out["window_after_failure"] == 32  # this rank's tokens of the failed step, kept
        ev = out["after_failure"]
        assert ev is not None and "failed" not in ev and "skipped" not in ev and ev["tokens"] == 2 * 32 * 2
        assert any("recorder was replaced" in w for w in out["replaced_warnings"]), out["replaced_warnings"]
        assert out["recorder_back"]
        # A check re-plans only beyond the threshold's sampling noise; within it the counts accumulate (the baseline
        # stays), below the threshold they start afresh. Tiny batches put the figure within the noise at least once.
        thr = 1.000001
        for measured, floor, replanned, moved in out["noise_checks"]:
            assert replanned == (measured > thr + floor), (measured, floor)
            assert moved == (replanned or measured <= thr), (measured, floor, moved)
        assert any(thr < m <= thr + f for m, f, _, _ in out["noise_checks"]), out["noise_checks"]


@pytest.mark.parametrize("method", ["random", "modulo"])
def test_run_feeds_token_ids_to_hash_routed_layers_timed_and_drifting(method):
    # Hash routing picks experts by token id: `moegraph run` draws ids for it (it failed asking for token_ids), and
    # the drifting stream draws the ids the preference favours (it failed reading a router weight hash routing lacks).
    from moegraph.distributed.local import run_local
    from moegraph.planner import plan as make_plan

    d = moegraph.load_spec("hash-tiny").model_dump(mode="json")
    d["topology"] = {"kind": "uniform", "nodes": 1, "gpus_per_node": 2}
    d["placement"]["redundant_slots"] = 2
    d["moe"]["router"]["method"] = method  # a table over the vocab, or a formula of the id
    plan = make_plan(moegraph.load_spec(d))
    timed = run_local(plan, tokens=16, steps=2, timeout=TIMEOUT_S)
    assert timed.matches and timed.measured.sum() > 0
    drift = run_local(plan, tokens=32, steps=6, rebalance_every=2, timeout=TIMEOUT_S).drift
    events = [row["event"] for row in drift if row["event"] is not None]
    assert [e["step"] for e in events] == [2, 4, 6] and not any("failed" in e or "skipped" in e for e in events)
    assert all(e["tokens"] == 2 * 2 * 32 for e in events) and sum(e["slots_moved"] for e in events) > 0


def test_rebalancer_and_run_refuse_bad_arguments_before_starting_anything():
    from moegraph.distributed.local import run_local
    from moegraph.distributed.rebalance import Rebalancer
    from moegraph.errors import DistributedError

    with pytest.raises(DistributedError, match="needs a trigger"):
        Rebalancer([], every=None, threshold=None)
    with pytest.raises(DistributedError, match="threshold is a max/mean load"):
        Rebalancer([], threshold=0.5)
    for kwargs, name in [({"every": float("nan")}, "every"), ({"every": 2.5}, "every"), ({"every": True}, "every"),
                         ({"every": "3"}, "every"), ({"every": 2, "check_every": 1.5}, "check_every"),
                         ({"threshold": "1.2"}, "threshold"), ({"threshold": float("inf")}, "threshold"),
                         ({"threshold": float("nan")}, "threshold")]:
        with pytest.raises(DistributedError, match=rf"Rebalancer {name} .*got {re.escape(repr(kwargs[name]))}"):
            Rebalancer([], **kwargs)
    with pytest.raises(DistributedError, match="no layers given"):
        Rebalancer([], every=3)
    plan = _plan(_spec(2), 2, "A")
    with pytest.raises(DistributedError, match="--rebalance-every N needs"):
        run_local(plan, rebalance_every=2, layer_index=0)
    with pytest.raises(DistributedError, match="--rebalance-every N needs"):
        run_local(plan, rebalance_every=0)


@pytest.mark.parametrize("world", [2, 4])
def test_rebalancer_threshold_triggers_on_measured_imbalance(runs, world):
    res = _ok(runs[f"w{world}"])
    for out in res:
        ev = out["threshold_events"]
        assert ev[0] is None  # no check at step 1 (check_every=2)
        assert ev[1] is not None and ev[1]["step"] == 2 and ev[1]["measured_max_mean"] > 1.3
        assert ev[1]["slots_moved"] > 0 and ev[1]["predicted_max_mean_after"] < ev[1]["predicted_max_mean_before"]
        # threshold only: the interval is the steps since the start (2) x 32 tokens per rank and step
        assert ev[1]["horizon_tokens"] == 2 * 32 * world
    assert len({o["threshold_events"][1]["bytes_moved"] for o in res}) == 1  # one total, on every rank
