"""A quick expert-parallel check on one machine: N local processes, random tokens, measured traffic.

``run_local(plan, nproc=N)`` spawns N processes (``torch.multiprocessing``, gloo on CPU or NCCL on
one GPU per process), compiles the plan's spec expert-parallel in each, runs forward (and backward)
passes on random tokens, and returns per rank: mean time per forward of dispatch, expert compute
and combine (and the backward's all-to-alls), and the bytes sent to every other rank, beside the
planner's prediction for the same routing (``predicted_copies``). ``moegraph run`` prints it.

Every process has a deadline; processes still running after it are killed.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codegen import default_cache_dir
from ..errors import DistributedError
from ..limits import MAX_LOCAL_PROCESSES, PROCESS_BYTES, address_space_room, available_memory, check_memory

__all__ = ["run_local", "LocalRun", "free_port", "stop_running"]


@dataclass
class LocalRun:
    """What ``run_local`` measured (per rank lists are in rank order)."""

    world_size: int
    layers: list[int]  # MoE layers of the plan that ran, in order (a residual stack)
    tokens: int
    steps: int
    row_bytes: int  # bytes of one dispatched token copy (the planner's copy_bytes: FP8 + scales with FP8 dispatch)
    ranks: list[list[dict[str, Any]]]  # [rank][layer] Traffic.summary(), totals over the measured steps
    predicted: np.ndarray  # [L, G, G] token copies src -> dst of one forward, planner's count
    measured: np.ndarray  # [L, G, G] token copies src -> dst of one forward, counted by the runtime
    trace_path: Path | None = None
    combine_row_bytes: int = 0  # bytes of one combined copy (0: row_bytes)
    drift: list[dict[str, Any]] | None = None  # with rebalance_every: per step, measured balance and re-plans

    @property
    def matches(self) -> bool:
        return bool(np.array_equal(self.predicted, self.measured))

    def per_forward_ms(self, rank: int) -> dict[str, float]:
        """Mean time per forward (backward for ``backward_comm``) of each phase, summed over layers."""
        out: dict[str, float] = {}
        for summary in self.ranks[rank]:
            for k, v in summary["seconds"].items():
                out[k] = out.get(k, 0.0) + 1e3 * v / max(self.steps, 1)
        return out

    def sent_bytes(self, rank: int, kind: str) -> int:
        """Bytes of ``kind`` one forward (backward, for ``grad``) of ``rank`` sent to other ranks, all layers."""
        return sum(int(sum(s["bytes"][kind])) for s in self.ranks[rank]) // max(self.steps, 1)


def free_port() -> int:
    """A TCP port free on localhost now (the rendezvous of spawned ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_running(procs: list) -> list[int]:
    """Kill (and reap) the spawned ranks still running; returns their ranks."""
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    return hung


def _inject_fault(cfg: dict, rank: int, step: int) -> None:
    """Test hook (``run_local(..., fault=...)``): stop or kill this rank at a measured step."""
    fault = cfg.get("fault")
    if fault and fault["rank"] == rank and fault["step"] == step:
        if fault.get("note"):  # when the fault happened, for the test's clock
            Path(fault["note"]).write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP if fault["how"] == "stop" else signal.SIGKILL)


def _write_result(out: Path, rank: int, result: dict) -> None:
    tmp = out / f".rank{rank}.pt.tmp"
    torch.save(result, tmp)
    os.replace(tmp, out / f"rank{rank}.pt")  # the parent never reads half a result


def _timed_run(cfg: dict, rank: int, world: int, plan, layers: list, device) -> dict:
    """The timing run of one rank (see ``run_local``): warm-up, measured steps, gathered trace."""
    import torch.distributed as dist

    from ..planner.cost import copy_bytes
    from .trace import gather_trace, predicted_copies

    for layer in layers:
        layer.sync_timing(True)
    first = layers[0]
    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    x = torch.randn(cfg["tokens"], first.HIDDEN, generator=g).to(device=device, dtype=first.compute_dtype)
    if cfg["backward"]:
        x.requires_grad_(True)
    vocab = first.HASH_VOCAB or 1 << 16  # hash routing picks experts by token id: random ids (modulo: any range)
    token_ids = torch.randint(0, vocab, (cfg["tokens"],), generator=g).to(device) if first.NEEDS_TOKEN_IDS else None

    def step() -> None:
        h = x
        for layer in layers:  # a residual stack, as in a model
            h = h + (layer(h) if token_ids is None else layer(h, token_ids=token_ids))
        if cfg["backward"]:
            h.float().square().mean().backward()
            for layer in layers:
                layer.zero_grad(set_to_none=True)

    recorders = []
    with torch.set_grad_enabled(cfg["backward"]):
        step()  # warm-up: graph tracing and first-call costs stay out of the timings
        for layer in layers:
            layer.reset_traffic()
            layer.start_recording()
        for i in range(cfg["steps"]):
            _inject_fault(cfg, rank, i)
            step()
            if i == 0:  # one forward's routing is the prediction's input
                recorders = [layer.stop_recording() for layer in layers]
    for layer, rec in zip(layers, recorders):
        layer.recorder = rec
    trace = gather_trace(layers)
    summaries: list[Any] = [None] * world
    dist.all_gather_object(summaries, [layer.traffic_summary() for layer in layers])
    if rank == 0:
        src = trace.src_rank
        predicted = np.stack([
            predicted_copies(plan, li, [trace.topk[j][src == r] for r in range(world)])
            for j, li in enumerate(cfg["layers"])])
        dispatch_bytes, combine_bytes = copy_bytes(plan.spec)
        result = {"ok": True, "ranks": summaries, "predicted": predicted,
                  "row_bytes": dispatch_bytes, "combine_row_bytes": combine_bytes}
        if cfg["record"]:
            result["trace_path"] = str(trace.save(cfg["record"]))
    else:
        result = {"ok": True}
    return result


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    out = Path(out_dir)
    result: dict[str, Any]
    try:
        import torch.distributed as dist

        from .. import codegen
        from ..compiler import compile as mg_compile

        codegen.set_cache_dir(cfg["cache_dir"])  # the parent's choice ($XDG_CACHE_HOME for the CLI)
        from ..planner import Plan

        cuda = cfg["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=cfg["timeout"]))
        plan = Plan.load(cfg["plan_path"])
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        layers = [mg_compile(plan.spec, plan=plan, layer_index=i, timeout=cfg["timeout"], seed=cfg["seed"] + i,
                             device=device) for i in cfg["layers"]]
        if cfg["checkpoint"]:
            layers[0].load_checkpoint(cfg["checkpoint"])
        if cfg.get("rebalance_every"):
            from .rebalance import drift_demo

            drift = drift_demo(layers, steps=cfg["steps"], every=cfg["rebalance_every"], tokens=cfg["tokens"],
                               seed=cfg["seed"])
            result = {"ok": True, "drift": drift if rank == 0 else None}
            dist.destroy_process_group()
        else:
            result = _timed_run(cfg, rank, world, plan, layers, device)
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        result = {"ok": False, "type": type(exc).__name__, "error": str(exc), "traceback": traceback.format_exc()}
    try:
        _write_result(out, rank, result)
    finally:
        # Exit now, skipping interpreter teardown: after a failed collective the process group's
        # destructor waits for work a stopped peer will never finish, so a normal exit would hang.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if result["ok"] else 1)


#: seconds the other ranks get to report after one rank failed, before they are killed
FAILURE_GRACE = 3.0


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code} without a result"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def _failed(proc, out: Path, rank: int) -> bool:
    """Whether a finished rank failed (non-zero exit, or no result file)."""
    return proc.exitcode != 0 or not (out / f"rank{rank}.pt").exists()


def _supervise(procs: list, out: Path, deadline: float) -> tuple[list[int], int | None]:
    """Wait for the ranks; returns (ranks killed because still running, first rank that failed).

    Waits until every rank ended, or ``deadline`` passed, or ``FAILURE_GRACE`` seconds after the
    first failure; a rank frozen by the OS (SIGSTOP) never ends by itself, so it is then killed.
    """
    end = time.monotonic() + deadline
    first_failure = None
    try:
        while True:
            alive = [p for p in procs if p.is_alive()]
            if first_failure is None:
                first_failure = next((r for r, p in enumerate(procs) if not p.is_alive() and _failed(p, out, r)),
                                     None)
                if first_failure is not None:
                    end = min(end, time.monotonic() + FAILURE_GRACE)
            if not alive or time.monotonic() >= end:
                break
            wait([p.sentinel for p in alive], timeout=max(0.0, min(end - time.monotonic(), 0.5)))
    finally:
        hung = stop_running(procs)
    return hung, first_failure


def run_local(plan, *, nproc: int | None = None, tokens: int = 256, steps: int = 3, backward: bool = True,
              layer_index: int | None = None, seed: int = 0, checkpoint: str | Path | None = None,
              timeout: float = 60.0, record: str | Path | None = None, device: str = "cpu",
              deadline: float = 600.0, rebalance_every: int | None = None, fault: dict | None = None,
              fork_server: bool = False) -> LocalRun:
    """Run the plan's MoE layers expert-parallel in ``nproc`` local processes and measure them.

    Args:
        plan: a ``Plan`` or plan file path (its embedded spec is compiled).
        nproc: processes (default and required value: the plan's GPU count).
        tokens: random tokens per rank per forward; steps: measured forward(+backward) passes.
        layer_index: run this MoE layer only (default: every MoE layer of the plan, as a residual
            stack; layer i is seeded with ``seed + i``).
        checkpoint: a single-process checkpoint of one layer (needs ``layer_index``).
        timeout: seconds a collective waits for peers.
        record: save the gathered trace here (every MoE layer must run: the planner needs them all).
        device: "cpu" (gloo) or "cuda" (NCCL, one GPU per process).
        rebalance_every: instead of timing, run ``steps`` inference forwards of a drifting synthetic
            stream with a ``Rebalancer(every=rebalance_every)`` (``rebalance.drift_demo``); the result's
            ``drift`` holds the measured balance per step and every re-plan.
        deadline: seconds after which ranks still running are killed.
        fork_server: start the ranks from a fork server that imports torch and moegraph once, instead of
            a fresh interpreter each (``spawn``), which imports them again: about 3 s of CPU per rank.
            The server lives as long as this process and its ranks see the environment it started with,
            so it suits one-shot callers (``moegraph run``); where there is none (Windows), spawn.
        fault: for tests of failure handling: ``{"rank": r, "step": i, "how": "stop" | "kill"}`` stops
            (SIGSTOP, a frozen peer) or kills rank r before its measured step i (writing the time to
            the file ``"note"`` if given).

    When a rank fails, the others get ``FAILURE_GRACE`` seconds to report (a collective waiting on
    the failed rank ends with its own error within ``timeout``; one that already failed reports
    at once), then any rank still running is killed, and the first rank's error is raised as a
    ``DistributedError`` with the others' errors after it.
    """
    import torch.multiprocessing as mp

    from ..planner import Plan

    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    world = plan.num_gpus if nproc is None else int(nproc)
    if world != plan.num_gpus:
        raise DistributedError(f"the plan places experts on {plan.num_gpus} GPUs; run it with --nproc {plan.num_gpus} "
                               f"(or re-plan for {world} GPUs)")
    fewer = ("re-plan for fewer GPUs (moegraph plan SPEC --nodes 1 --gpus-per-node N -o plan.json) and "
             "run that plan")
    if world > MAX_LOCAL_PROCESSES:
        raise DistributedError(f"the plan places experts on {world} GPUs and `moegraph run` starts one local process "
                               f"per GPU, at most {MAX_LOCAL_PROCESSES} (the --nproc limit); {fewer}")
    if device not in ("cpu", "cuda"):
        raise DistributedError(f"device must be 'cpu' (gloo) or 'cuda' (NCCL), got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world:
        raise DistributedError(f"--device cuda needs one GPU per process: {world} processes, "
                               f"{torch.cuda.device_count()} GPUs visible")
    if tokens < 0 or steps < 1:
        raise DistributedError("tokens must be >= 0 and steps >= 1")
    if layer_index is not None and not 0 <= layer_index < plan.num_layers:
        raise DistributedError(f"layer {layer_index} is outside the plan's {plan.num_layers} MoE layers")
    if checkpoint and layer_index is None:
        raise DistributedError("a checkpoint holds one layer's weights: pass the layer it belongs to (--layer)")
    if rebalance_every is not None and (rebalance_every < 1 or layer_index is not None or record or checkpoint):
        raise DistributedError("--rebalance-every N needs N >= 1 and every MoE layer (no --layer, --record or "
                               "--checkpoint): the re-plan reads every layer's traffic")
    if record and layer_index is not None:
        raise DistributedError("recording a trace for re-planning needs every MoE layer: drop --layer")
    if device == "cpu":  # each rank's tokens, routed copies, combine and backward: a lower bound of what runs
        moe = plan.spec.moe
        rank_bytes = tokens * moe.hidden_size * 4.0 * (2 * moe.top_k + 8)
        what = f"{world} ranks x {tokens} tokens of hidden size {moe.hidden_size}"
        check_memory(world * rank_bytes, what, "run fewer --tokens", available_memory(address_space=False))
        room = address_space_room()  # ulimit -v holds each rank on its own
        if room is not None:
            check_memory(rank_bytes, f"one rank of {what}", "run fewer --tokens (or raise ulimit -v)", room)
    check_memory(world * PROCESS_BYTES, f"starting {world} local processes (one per GPU of the plan, each a Python "
                 f"with torch)", fewer, available_memory(address_space=False))
    layers = list(range(plan.num_layers)) if layer_index is None else [layer_index]
    with tempfile.TemporaryDirectory(prefix="moegraph-run-") as tmp:
        plan_path = plan.save(Path(tmp) / "plan.json")
        cfg = {"plan_path": str(plan_path), "layers": layers, "tokens": tokens, "steps": steps,
               "backward": backward, "seed": seed, "checkpoint": str(checkpoint) if checkpoint else None,
               "timeout": timeout, "record": str(record) if record else None, "device": device,
               "rebalance_every": rebalance_every, "cache_dir": str(default_cache_dir()), "fault": fault}
        if fork_server and "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "moegraph.compiler", "moegraph.planner", "moegraph.distributed.local"])
        else:
            ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, tmp), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        hung, first_failure = _supervise(procs, Path(tmp), deadline)
        results = []
        for r in range(world):
            f = Path(tmp) / f"rank{r}.pt"
            if f.exists():
                results.append(torch.load(f, weights_only=False))
            elif r in hung:
                why = (f"still running {FAILURE_GRACE:g}s after rank {first_failure} failed; killed"
                       if first_failure is not None else f"still running after {deadline:g}s; killed")
                results.append({"ok": False, "type": "hung", "error": why})
            else:
                results.append({"ok": False, "type": "exit", "error": _exit_text(procs[r].exitcode)})
    failed = [(r, res) for r, res in enumerate(results) if not res["ok"]]
    if hung and first_failure is None:
        raise DistributedError(f"ranks {hung} were still running after {deadline:g}s and were killed")
    if failed:
        # A rank whose error is not a communication failure is the cause; the others are consequences.
        cause = next(((r, res) for r, res in failed if res["type"] not in ("DistributedError", "hung")), failed[0])
        r, res = cause
        lines = [f"rank {r} failed: {res['type']}: {_first_line(res['error'])}"]
        lines += [f"rank {q} failed too: {other['type']}: {_first_line(other['error'])}"
                  for q, other in failed if q != r]
        raise DistributedError("\n".join(lines))
    head = results[0]
    if rebalance_every is not None:
        return LocalRun(world_size=world, layers=layers, tokens=tokens, steps=steps, row_bytes=0, ranks=[],
                        predicted=np.zeros(0), measured=np.zeros(0), drift=head["drift"])
    measured = np.stack([np.stack([np.asarray(head["ranks"][r][j]["rows"]["dispatch"]) for r in range(world)])
                         for j in range(len(layers))]) // steps
    return LocalRun(world_size=world, layers=layers, tokens=tokens, steps=steps, row_bytes=head["row_bytes"],
                    ranks=head["ranks"], predicted=head["predicted"], measured=measured,
                    trace_path=Path(head["trace_path"]) if head.get("trace_path") else None,
                    combine_row_bytes=head["combine_row_bytes"])
