"""Bounded failure of ``moegraph run``: a frozen (SIGSTOP) or killed peer makes every other rank exit
with its DistributedError within the timeout plus a few seconds, and the command prints it."""

from __future__ import annotations

import functools
import time

import pytest

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def plan_for_two(tmp_path_factory):
    from moegraph.planner import plan

    return plan("deepseek-v3-tiny", nodes=1, gpus_per_node=2).save(tmp_path_factory.mktemp("plan") / "plan.json")


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_frozen_or_killed_peer_is_reported_within_the_timeout(how, plan_for_two, run_cli, tmp_path, monkeypatch):
    from moegraph.distributed import local

    note = tmp_path / "fault_at"
    monkeypatch.setattr(local, "run_local", functools.partial(
        local.run_local, fault={"rank": 1, "step": 1, "how": how, "note": str(note)}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    started = time.time()
    res = run_cli("run", "deepseek-v3-tiny", "--plan", plan_for_two, "--tokens", "8", "--steps", "3",
                  "--no-backward", "--timeout", str(TIMEOUT_S))
    ended = time.time()
    assert res.code == 2, res.out + res.err
    err = " ".join(res.err.split())
    assert "Traceback" not in res.err
    # The surviving rank's own error names the rank and the phase that failed.
    assert "DistributedError: DeepseekV3TinyMoE (MoE layer 0): rank 0 of 2:" in err, err
    assert "dispatch" in err or "combine" in err, err
    if how == "stop":
        assert "no answer from a peer rank within the timeout (2s)" in err
        assert "rank 1 failed too: hung" in err
    else:
        assert "rank 1 failed: exit: killed by SIGKILL" in err
    # The ranks generated their code where the command was told to ($XDG_CACHE_HOME), not in ~/.cache.
    assert list((tmp_path / "xdg" / "moegraph" / "generated").glob("moe_deepseek_v3_tiny_*.py"))
    fault_at = float(note.read_text())
    assert started < fault_at < ended
    # Every process is gone (the parent killed or reaped them all) soon after the fault.
    assert ended - fault_at < TIMEOUT_S + 5.0, f"took {ended - fault_at:.1f}s after the fault"


def test_rebalance_every_beyond_the_steps_is_refused_naming_both_flags(plan_for_two, run_cli):
    res = run_cli("run", "deepseek-v3-tiny", "--plan", plan_for_two, "--steps", "4", "--rebalance-every", "10")
    err = " ".join(res.err.split())
    assert res.code == 2 and "--rebalance-every 10 is more than --steps 4: no re-plan would run" in err, err


def test_a_plan_for_more_gpus_than_the_process_bound_starts_nothing(plan_for_two, run_cli, monkeypatch):
    """Without --nproc the plan's GPU count is the process count: it meets the same bound as --nproc."""
    from moegraph.distributed import local

    monkeypatch.setattr(local, "MAX_LOCAL_PROCESSES", 1)
    monkeypatch.setattr(local, "free_port", lambda: pytest.fail("would start processes"))
    res = run_cli("run", "deepseek-v3-tiny", "--plan", plan_for_two, "--tokens", "8", "--steps", "1")
    err = " ".join(res.err.split())
    assert res.code == 2 and "Traceback" not in res.err, res.out + res.err
    assert "the plan places experts on 2 GPUs" in err and "at most 1 (the --nproc limit)" in err, err
    assert "re-plan for fewer GPUs (moegraph plan SPEC --nodes 1 --gpus-per-node N" in err, err


def test_more_local_processes_than_the_memory_holds_are_refused_before_starting(plan_for_two, run_cli, monkeypatch):
    from moegraph.distributed import local

    monkeypatch.setattr(local, "available_memory", lambda address_space=True: 300 * 2**20)
    monkeypatch.setattr(local, "free_port", lambda: pytest.fail("would start processes"))
    res = run_cli("run", "deepseek-v3-tiny", "--plan", plan_for_two, "--tokens", "8", "--steps", "1")
    err = " ".join(res.err.split())
    assert res.code == 2 and "Traceback" not in res.err, res.out + res.err
    assert "starting 2 local processes (one per GPU of the plan" in err and "re-plan for fewer GPUs" in err, err
