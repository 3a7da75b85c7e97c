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
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DistributedError

__all__ = ["run_local", "LocalRun"]


@dataclass
class LocalRun:
    """What ``run_local`` measured (per rank lists are in rank order)."""

    world_size: int
    layer_index: int
    tokens: int
    steps: int
    row_bytes: int  # bytes of one token's hidden state
    ranks: list[dict[str, Any]]  # Traffic.summary() of each rank, totals over the measured steps
    predicted: np.ndarray  # [G, G] token copies src -> dst of one forward, planner's count
    measured: np.ndarray  # [G, G] token copies src -> dst of one forward, counted by the runtime
    trace_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return bool(np.array_equal(self.predicted, self.measured))

    def per_forward_ms(self, rank: int) -> dict[str, float]:
        s = self.ranks[rank]["seconds"]
        return {k: 1e3 * v / max(self.steps, 1) for k, v in s.items()}

    def sent_bytes(self, rank: int, kind: str) -> int:
        """Bytes of ``kind`` one forward (or backward, for ``grad``) of ``rank`` sent to other ranks."""
        return int(sum(self.ranks[rank]["bytes"][kind])) // max(self.steps, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    out = Path(out_dir)
    result: dict[str, Any]
    try:
        import torch.distributed as dist

        from ..compiler import compile as mg_compile
        from ..planner import Plan
        from .trace import gather_trace, predicted_copies

        cuda = cfg["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=cfg["timeout"]))
        plan = Plan.load(cfg["plan_path"])
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        layer = mg_compile(plan.spec, plan=plan, layer_index=cfg["layer_index"], timeout=cfg["timeout"],
                           seed=cfg["seed"], device=device)
        if cfg["checkpoint"]:
            layer.load_checkpoint(cfg["checkpoint"])
        layer.sync_timing(True)
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
        x = torch.randn(cfg["tokens"], layer.HIDDEN, generator=g).to(device=device, dtype=layer.experts.down_proj.dtype)
        if cfg["backward"]:
            x.requires_grad_(True)

        def step() -> None:
            y = layer(x)
            if cfg["backward"]:
                y.float().square().mean().backward()
                layer.zero_grad(set_to_none=True)

        with torch.set_grad_enabled(cfg["backward"]):
            step()  # warm-up: graph tracing and first-call costs stay out of the timings
            layer.reset_traffic()
            layer.start_recording()
            for i in range(cfg["steps"]):
                step()
                if i == 0:
                    recorder = layer.stop_recording()  # one forward's routing is the prediction's input
        layer.recorder = recorder
        trace = gather_trace(layer)
        summaries: list[Any] = [None] * world
        dist.all_gather_object(summaries, layer.traffic_summary())
        if rank == 0:
            src = trace.src_rank
            ids = [trace.topk[0][src == r] for r in range(world)]
            result = {"ok": True, "ranks": summaries, "predicted": predicted_copies(plan, cfg["layer_index"], ids),
                      "row_bytes": layer.HIDDEN * layer.experts.down_proj.element_size()}
            if cfg["record"]:
                result["trace_path"] = str(trace.save(cfg["record"]))
        else:
            result = {"ok": True}
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        result = {"ok": False, "type": type(exc).__name__, "error": str(exc), "traceback": traceback.format_exc()}
    torch.save(result, out / f"rank{rank}.pt")


def run_local(plan, *, nproc: int | None = None, tokens: int = 256, steps: int = 3, backward: bool = True,
              layer_index: int = 0, seed: int = 0, checkpoint: str | Path | None = None, timeout: float = 60.0,
              record: str | Path | None = None, device: str = "cpu", deadline: float = 600.0) -> LocalRun:
    """Run the plan's layer expert-parallel in ``nproc`` local processes and measure it (module docstring).

    Args:
        plan: a ``Plan`` or plan file path (its embedded spec is compiled).
        nproc: processes (default and required value: the plan's GPU count).
        tokens: random tokens per rank per forward; steps: measured forward(+backward) passes.
        checkpoint: a single-process checkpoint to load (default: seeded random weights).
        timeout: seconds a collective waits for peers; record: save the gathered trace here.
        device: "cpu" (gloo) or "cuda" (NCCL, one GPU per process).
    """
    import torch.multiprocessing as mp

    from ..planner import Plan

    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    world = plan.num_gpus if nproc is None else int(nproc)
    if world != plan.num_gpus:
        raise DistributedError(f"the plan places experts on {plan.num_gpus} GPUs; run it with --nproc {plan.num_gpus} "
                               f"(or re-plan for {world} GPUs)")
    if device not in ("cpu", "cuda"):
        raise DistributedError(f"device must be 'cpu' (gloo) or 'cuda' (NCCL), got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world:
        raise DistributedError(f"--device cuda needs one GPU per process: {world} processes, "
                               f"{torch.cuda.device_count()} GPUs visible")
    if tokens < 0 or steps < 1:
        raise DistributedError("tokens must be >= 0 and steps >= 1")
    with tempfile.TemporaryDirectory(prefix="moegraph-run-") as tmp:
        plan_path = plan.save(Path(tmp) / "plan.json")
        cfg = {"plan_path": str(plan_path), "layer_index": layer_index, "tokens": tokens, "steps": steps,
               "backward": backward, "seed": seed, "checkpoint": str(checkpoint) if checkpoint else None,
               "timeout": timeout, "record": str(record) if record else None, "device": device}
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, tmp), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        try:
            for p in procs:
                p.join(max(0.0, end - time.monotonic()))
        finally:
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = []
        for r in range(world):
            f = Path(tmp) / f"rank{r}.pt"
            results.append(torch.load(f, weights_only=False) if f.exists() else
                           {"ok": False, "type": "exit", "error": f"exited with code {procs[r].exitcode}"})
    if hung:
        raise DistributedError(f"ranks {hung} were still running after {deadline:g}s and were killed")
    failed = [(r, res) for r, res in enumerate(results) if not res["ok"]]
    if failed:
        # A rank whose error is not a communication failure is the cause; the others are consequences.
        cause = next(((r, res) for r, res in failed if res["type"] != "DistributedError"), failed[0])
        r, res = cause
        others = ", ".join(str(q) for q, _ in failed if q != r)
        raise DistributedError(f"rank {r} failed: {res['type']}: {res['error']}"
                               + (f" (ranks {others} failed too)" if others else ""))
    head = results[0]
    measured = np.stack([np.asarray(s["rows"]["dispatch"]) for s in head["ranks"]]) // steps
    return LocalRun(world_size=world, layer_index=layer_index, tokens=tokens, steps=steps,
                    row_bytes=head["row_bytes"], ranks=head["ranks"], predicted=head["predicted"], measured=measured,
                    trace_path=Path(head["trace_path"]) if head.get("trace_path") else None)
