"""Layers in forked processes (``moegraph.planner.forked``): the plan of one process, bit for bit, sooner."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import numpy as np
import pytest

from moegraph import load_spec
from moegraph.errors import PlanInfeasible
from moegraph.planner import baseline_plans, forked, plan
from moegraph.planner.cost import evaluate, evaluate_plans
from moegraph.planner.driver import PARALLEL_WORK
from moegraph.traces import TraceSet, load_traces

needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                                reason="no fork on this platform: everything runs in one process here")


def _spec(nodes: int, gpus: int, slots: int, layers: int):
    d = load_spec("deepseek-v2-lite-tiny").to_dict()
    d["model"]["num_layers"] = layers + 1  # the first layer is dense
    d["placement"]["traces"] = []
    d["placement"]["redundant_slots"] = slots - 64
    d["topology"].update(nodes=nodes, gpus_per_node=gpus)
    return load_spec(d)


def _traffic(layers: int) -> list[TraceSet]:
    out = []
    for task in ("intent", "law"):
        t = load_traces(f"esft-deepseek-v2-lite/{task}")
        out.append(TraceSet.from_topk(list(t.topk[:layers]), t.sample_ids, num_experts=64, source=task))
    return out


@needs_fork
@pytest.mark.parametrize("nodes,gpus,slots", [(1, 8, 72), (2, 4, 64)])
def test_a_plan_made_in_processes_is_the_plan_of_one_process(nodes, gpus, slots):
    spec, traffic = _spec(nodes, gpus, slots, layers=3), _traffic(3)
    seen: dict[int, list[tuple[int, int]]] = {1: [], 2: []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fork", lambda: pytest.fail("plan(processes=1) forked"))
        one = plan(spec, traffic, processes=1, progress=lambda d, t: seen[1].append((d, t)))
    two = plan(spec, traffic, processes=2, progress=lambda d, t: seen[2].append((d, t)))
    assert np.array_equal(one.physical_to_logical_map, two.physical_to_logical_map)
    assert one.policy == two.policy and one.notes == two.notes
    assert one.metrics == two.metrics  # floats included: the same per-layer results, summed in layer order
    assert seen[1] == seen[2] == [(1, 3), (2, 3), (3, 3)]
    assert one.policy["swaps"] > 0 and one.policy["refine_swaps"] > 0  # the search did run in every process


def test_processes_default_to_the_usable_cores_for_large_token_plans_only(monkeypatch):
    monkeypatch.setattr(forked, "usable_cores", lambda: 6)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["fork", "spawn"])
    v2_lite = 26 * 64 * 8  # layers x slots x GPUs
    assert v2_lite >= PARALLEL_WORK
    assert forked.fork_workers(26, v2_lite, PARALLEL_WORK) == 6
    assert forked.fork_workers(4, v2_lite, PARALLEL_WORK) == 4  # never more processes than layers
    assert forked.fork_workers(3, 3 * 20 * 4, PARALLEL_WORK) == 1  # a tiny spec: milliseconds a layer
    assert forked.fork_workers(1, v2_lite, PARALLEL_WORK) == 1
    monkeypatch.setattr(sys, "platform", "darwin")
    assert forked.fork_workers(26, v2_lite, PARALLEL_WORK) == 1  # fork exists there, but is not safe
    monkeypatch.setattr(sys, "platform", "linux")
    assert forked.fork_workers(26, v2_lite, PARALLEL_WORK) == 6
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    assert forked.fork_workers(26, v2_lite, PARALLEL_WORK) == 1  # no fork: spawning would import everything again


@needs_fork
def test_metrics_measured_in_processes_are_those_of_one_process():
    spec, (intent, law) = _spec(2, 4, 72, layers=3), _traffic(3)
    plans = {"plan": plan(spec, intent, processes=1), **baseline_plans(spec, intent)}
    counts = TraceSet.from_counts(law.counts)
    for traffic in (law, counts):
        one, two = evaluate_plans(plans, traffic, processes=1), evaluate_plans(plans, traffic, processes=2)
        assert one == two and list(one) == ["plan", "contiguous", "load_only"]
        assert one["plan"] == evaluate(plans["plan"], traffic)
        assert len(one["plan"]["per_layer"]["max_mean_load"]) == 3
    assert set(evaluate_plans(plans, law)["plan"]["mean"]) >= {"max_mean_load", "remote_gpu", "a2a_us"}
    assert set(evaluate_plans(plans, counts)["plan"]["mean"]) == {"max_mean_load"}


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_a_process_count_that_is_not_one_or_more_is_refused(bad):
    with pytest.raises(PlanInfeasible, match=r"processes is a count of processes \(>= 1"):
        plan("deepseek-v3-tiny", processes=bad)


@needs_fork
def test_map_forked_runs_a_closure_in_children_and_keeps_the_task_order():
    offset = 1000  # a closure: nothing is pickled on the way in
    done = []
    got = forked.map_forked(lambda t: (t + offset, os.getpid()), list(range(7)), 3, done.append)
    assert [v for v, _ in got] == [1000 + t for t in range(7)]
    assert os.getpid() not in {pid for _, pid in got}  # computed in the children
    assert done == list(range(1, 8))
    # One process: here, in order.
    assert forked.map_forked(lambda t: (t, os.getpid()), [5, 6], 1) == [(5, os.getpid()), (6, os.getpid())]


@needs_fork
def test_an_error_raised_by_the_task_is_raised_here():
    def fn(t: int) -> int:
        if t == 2:
            raise PlanInfeasible(f"layer {t}: no placement")
        return t

    with pytest.raises(PlanInfeasible, match="layer 2: no placement"):
        forked.map_forked(fn, list(range(5)), 2)
    assert forked._FN is None  # the next call starts clean
    assert forked.map_forked(lambda t: -t, [1, 2], 2) == [-1, -2]


@needs_fork
def test_tasks_of_a_child_that_died_are_computed_here():
    parent = os.getpid()

    def fn(t: int) -> tuple[int, int]:
        if t == 1 and os.getpid() != parent:
            os._exit(3)  # a child killed mid-task (out of memory, a signal)
        return t * t, os.getpid()

    got = forked.map_forked(fn, list(range(4)), 2)
    assert [v for v, _ in got] == [0, 1, 4, 9]
    assert got[1][1] == parent  # the dead child's task, computed here


@needs_fork
def test_a_forked_task_runs_its_own_tasks_in_its_own_process():
    def fn(t: int) -> list[int]:
        inner = forked.map_forked(lambda u: os.getpid(), [0, 1, 2], 2)
        assert forked.fork_workers(5, 1e9, 1) == 1
        return inner + [os.getpid()]

    for pids in forked.map_forked(fn, [0, 1], 2):
        assert len(set(pids)) == 1 and pids[0] != os.getpid()


def _in_a_pool_worker(_: int) -> list[int]:
    """In a daemonic ``multiprocessing.Pool`` worker: the tasks' pids, asked for in two processes."""
    assert forked.fork_workers(5, 1e9, 1) == 1
    return forked.map_forked(lambda t: os.getpid(), [0, 1, 2], 2)


@needs_fork
def test_a_pool_worker_runs_its_tasks_itself():
    """A user sweeping plans with ``multiprocessing.Pool`` calls ``plan`` in daemonic workers, which Python does not
    let start children (an AssertionError, which the planner raised): their layers run in the worker itself."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        (pids,) = pool.map(_in_a_pool_worker, [0])
    assert len(set(pids)) == 1 and pids[0] != os.getpid()


def test_one_blas_thread_holds_one_thread_in_the_block_and_in_forked_children():
    """The searches' BLAS setting: one thread inside the block (here and in a forked child, which inherits
    it), the previous count restored after it, an error included; the library is looked up once."""
    from moegraph.planner import blas

    found = blas._thread_functions()
    if found is None:  # another BLAS than the OpenBLAS numpy's wheels bundle: the helper is documented a no-op
        with blas.one_blas_thread():
            pass
        return
    setter, getter = found
    before = int(getter())
    setter(2)
    try:
        with blas.one_blas_thread():
            assert int(getter()) == 1
            inside = forked.map_forked(lambda _: int(getter()), [0, 1], workers=2)
        assert inside == [1, 1]
        assert int(getter()) == 2
        with pytest.raises(ValueError), blas.one_blas_thread():
            raise ValueError("boom")
        assert int(getter()) == 2
        assert blas._thread_functions() is found
    finally:
        setter(before)


@needs_fork
def test_cpu_seconds_counts_the_forked_childrens_time():
    """The benchmarks' CPU figure of a plan includes its forked layers: work done only in children shows."""
    def spin(_):
        t = time.process_time()
        while time.process_time() - t < 0.3:
            pass
        return os.getpid()

    c0, own0 = forked.cpu_seconds(), time.process_time()
    pids = forked.map_forked(spin, [0, 1], workers=2)
    assert os.getpid() not in pids  # the work ran in children only
    assert time.process_time() - own0 < 0.3
    assert forked.cpu_seconds() - c0 >= 0.55
