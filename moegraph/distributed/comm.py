"""The collectives the expert-parallel layer uses, over one torch.distributed process group.

Everything goes through ``torch.distributed`` (gloo on CPU, NCCL on GPU): ``all_to_all_single``
with uneven splits for tokens, ``all_reduce`` / ``all_gather`` for gradients and traces. ``Comm``
adds what the layer needs around them:

- a timeout per collective (``work.wait(timeout)``; default: the process group's own), so that a
  peer that stalled or died makes this rank fail with a ``DistributedError`` naming the phase,
  instead of hanging;
- once a collective has failed on a process group (timed out, a peer gone, a rank that left a
  forward or a transfer midway), every later one of ours on that group is refused at once with a
  ``DistributedError`` naming the first failure: the ranks may then stand at different
  collectives (a late peer still runs the rest of its forward), so the next ones could pair with
  the wrong ones, and all-to-alls of equal sizes would exchange the wrong data without an error;
- byte accounting per destination rank (``Traffic``), so measured traffic can be set beside the
  plan's prediction;
- ``AllToAll``, an autograd function whose backward is the reverse all-to-all (splits swapped).

Legend: W ranks, R rows sent, M rows received, D row width.
"""

from __future__ import annotations

import datetime
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DistributedError

__all__ = ["Comm", "Traffic", "AllToAll"]

#: process group -> the first failure of one of our collectives on it (see the module docstring); an entry goes
#: with its group (destroyed and garbage-collected), so a group initialised again starts clean
_BROKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Traffic:
    """Per-rank counters of one expert-parallel layer (reset with ``reset()``).

    ``bytes[kind]`` and ``rows[kind]`` are [W] arrays: what this rank sent to each rank, self
    excluded (a self-send is a local copy). Kinds: ``dispatch`` (token hidden states, first hop and
    intra-host forwarding), ``combine`` (expert outputs sent back), ``meta`` (counts, routing
    weights, slot ids), ``grad`` (the backward's all-to-alls). ``seconds`` holds wall time per
    phase: ``dispatch``, ``compute``, ``combine`` (forward) and ``backward_comm``. ``computed``
    counts the (token, expert) assignments this rank's experts ran (the plan's GPU load);
    ``computed_total`` the same since the layer was made, never reset (what a monitor takes differences of).
    """

    world_size: int
    rank: int
    calls: int = 0
    tokens: int = 0
    computed: int = 0  # (token, expert) assignments this rank's experts computed
    computed_total: int = 0  # the same, not reset
    bytes: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    KINDS = ("dispatch", "combine", "meta", "grad")
    PHASES = ("dispatch", "compute", "combine", "backward_comm")

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.tokens = 0
        self.computed = 0
        self.bytes = {k: np.zeros(self.world_size, np.int64) for k in self.KINDS}
        self.rows = {k: np.zeros(self.world_size, np.int64) for k in self.KINDS}
        self.seconds = {p: 0.0 for p in self.PHASES}

    def add(self, kind: str, rows_W: list[int], row_bytes: int) -> None:
        r = np.asarray(rows_W, np.int64)
        r[self.rank] = 0
        self.rows[kind] += r
        self.bytes[kind] += r * row_bytes

    def summary(self) -> dict:
        """Plain-Python totals (JSON-friendly)."""
        return {
            "rank": self.rank,
            "calls": self.calls,
            "tokens": self.tokens,
            "computed": self.computed,
            "seconds": dict(self.seconds),
            "bytes": {k: v.tolist() for k, v in self.bytes.items()},
            "rows": {k: v.tolist() for k, v in self.rows.items()},
        }


class Comm:
    """One process group as the expert-parallel layer uses it (see the module docstring).

    Args:
        group: the process group (None: the default group).
        timeout: seconds any one collective may wait for peers (None: the group's own timeout).
        label: names the layer in error messages.
    """

    def __init__(self, group=None, timeout: float | None = None, label: str = "expert-parallel layer"):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = timeout
        self.label = label
        # Passed to every AllToAll so that, with grad enabled, each one is an autograd node on every
        # rank, whether or not this rank's inputs require grad: a backward all-to-all that runs on
        # some ranks only would leave the others waiting.
        self.anchor = torch.zeros(0, requires_grad=True)

    # ------------------------------------------------------------------ a group that failed stays failed

    def _group_object(self):
        """The process group the collectives run on (the default group's current object for None)."""
        return self.group if self.group is not None else dist.group.WORLD

    def mark_broken(self, reason: str) -> None:
        """Refuse every later collective of ours on this process group (the first reason is kept)."""
        try:
            _BROKEN.setdefault(self._group_object(), reason)
        except TypeError:  # a group object without weak references (torch 2.13's take them): not remembered
            pass

    def _refuse_if_broken(self, what: str) -> None:
        try:
            reason = _BROKEN.get(self._group_object())
        except TypeError:
            return
        if reason is not None:
            raise DistributedError(
                f"{self.label}: rank {self.rank} of {self.world_size}: {what} not started: an earlier collective on "
                f"this process group failed ({reason}). After such a failure the ranks may stand at different "
                "collectives, so the next ones could pair with the wrong ones: destroy the process group "
                "(torch.distributed.destroy_process_group()) and initialise a new one, or restart the job")

    # ------------------------------------------------------------------ waiting with a clear error

    def _wait(self, work, what: str, started: float) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=self.timeout))
        except Exception as exc:  # gloo/NCCL raise RuntimeError (or DistBackendError) with transport text
            raise self.failure(what, started, exc) from exc

    def failure(self, what: str, started: float, exc: BaseException) -> DistributedError:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        low = text.lower()
        if "timed out" in low or "timeout" in low:
            why = (f"no answer from a peer rank within the timeout ({self._timeout_text()}): a rank stalled, "
                   "crashed before this collective, or is far behind")
        elif "closed" in low or "reset" in low or "broken pipe" in low or "refused" in low:
            why = "a peer rank failed or died (its connection closed)"
        else:
            why = "the collective failed"
        waited = time.perf_counter() - started
        self.mark_broken(f"{what} on rank {self.rank} after {waited:.1f}s: {why}")
        return DistributedError(
            f"{self.label}: rank {self.rank} of {self.world_size}: {what} failed after {waited:.1f}s: {why}. "
            f"Check the other ranks' output; raise the timeout with ExpertParallelMoE.create(timeout=...) "
            f"or compile(..., timeout=...) if ranks are merely slow. ({self.backend}: {text})"
        )

    def _timeout_text(self) -> str:
        if self.timeout is not None:
            return f"{self.timeout:g}s"
        return "the process group's timeout"

    # ------------------------------------------------------------------ collectives

    def _run(self, what: str, start_collective) -> None:
        """Start an async collective and wait for it; any failure becomes a DistributedError (and so does starting
        one on a group where one of ours failed before)."""
        self._refuse_if_broken(what)
        started = time.perf_counter()
        try:
            work = start_collective()
        except Exception as exc:
            raise self.failure(what, started, exc) from exc
        self._wait(work, what, started)

    def all_to_all(self, x: Tensor, send_W: list[int], recv_W: list[int], what: str) -> Tensor:
        """Rows ``x[sum(send_W[:d]) : ...]`` go to rank d; returns the [sum(recv_W), ...] rows received."""
        wire = fp8_as_bytes(x.contiguous())
        out = wire.new_empty((sum(recv_W), *wire.shape[1:]))
        self._run(what, lambda: dist.all_to_all_single(out, wire, output_split_sizes=list(recv_W),
                                                       input_split_sizes=list(send_W), group=self.group,
                                                       async_op=True))
        return out.view(x.dtype)

    def exchange_counts(self, counts_WC: Tensor, what: str) -> Tensor:
        """[W, C] integers for each rank -> [W, C] integers from each rank (one equal-split all-to-all)."""
        counts_WC = counts_WC.contiguous()
        out = torch.empty_like(counts_WC)
        self._run(what, lambda: dist.all_to_all_single(out, counts_WC, group=self.group, async_op=True))
        return out

    def all_reduce(self, t: Tensor, what: str) -> Tensor:
        """In-place sum over ranks; returns ``t``."""
        self._run(what, lambda: dist.all_reduce(t, group=self.group, async_op=True))
        return t

    def all_gather(self, t: Tensor, what: str) -> list[Tensor]:
        """Equal-shaped tensors from every rank, in rank order."""
        wire = fp8_as_bytes(t.contiguous())
        outs = [torch.empty_like(wire) for _ in range(self.world_size)]
        self._run(what, lambda: dist.all_gather(outs, wire, group=self.group, async_op=True))
        return [o.view(t.dtype) for o in outs]

    def broadcast(self, t: Tensor, src: int, what: str) -> Tensor:
        """``t`` as rank ``src`` of the group has it, on every rank (in place); returns ``t``."""
        wire = fp8_as_bytes(t)
        self._run(what, lambda: dist.broadcast(wire, group=self.group, group_src=src, async_op=True))
        return t

    def all_gather_rows(self, t: Tensor, what: str) -> list[Tensor]:
        """Tensors whose first dimension differs per rank: gather sizes, pad, gather, unpad."""
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [int(s) for s in torch.cat(self.all_gather(n, what + " (sizes)")).tolist()]
        pad = t.new_zeros((max(sizes, default=0), *t.shape[1:]))
        pad[: t.shape[0]] = t
        return [g[:s] for g, s in zip(self.all_gather(pad, what), sizes)]


def fp8_as_bytes(x: Tensor) -> Tensor:
    """``x``, an FP8 tensor viewed as its bytes (uint8, same shape; others as they are): what the collectives
    carry (gloo and NCCL have no FP8 types: weights that migrate and token rows of an FP8 dispatch travel so
    and are reinterpreted on arrival), and what CPU indexing takes (its kernels do not cover FP8)."""
    return x.view(torch.uint8) if x.is_floating_point() and x.element_size() == 1 else x


def _row_bytes(x: Tensor) -> int:
    return x.element_size() * int(np.prod(x.shape[1:], dtype=np.int64))


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all of rows: backward sends the gradients back along the same splits.

    ``AllToAll.apply(x, comm.anchor, send_W, recv_W, comm, traffic, kind, what)``; the forward's
    bytes are counted under ``kind``, the backward's under ``grad`` (time under ``backward_comm``).
    ``comm.anchor`` (an empty tensor that requires grad) makes the output differentiable whenever
    grad is enabled, so that every rank runs the backward all-to-all.
    """

    @staticmethod
    def forward(ctx, x, anchor, send_W, recv_W, comm, traffic, kind, what):
        ctx.send_W, ctx.recv_W, ctx.comm, ctx.traffic, ctx.what = send_W, recv_W, comm, traffic, what
        row_bytes = _row_bytes(x)
        if traffic is not None:
            traffic.add(kind, send_W, row_bytes)
        return comm.all_to_all(x, send_W, recv_W, what)

    @staticmethod
    def backward(ctx, grad):
        t0 = time.perf_counter()
        g = ctx.comm.all_to_all(grad, ctx.recv_W, ctx.send_W, f"backward of {ctx.what}")
        if ctx.traffic is not None:
            row_bytes = _row_bytes(grad)
            ctx.traffic.add("grad", ctx.recv_W, row_bytes)
            ctx.traffic.seconds["backward_comm"] += time.perf_counter() - t0
        return g, None, None, None, None, None, None, None
