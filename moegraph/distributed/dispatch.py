"""Dispatch, local expert compute and combine of one expert-parallel MoE layer.

``ExpertDispatch`` replaces the ``expert_mlp`` call of the generated layer's graph (see
``ExpertParallelPass``) and takes the same arguments: assignments (token, logical expert, weight)
routed by this rank's data-parallel router, and this rank's slot weights. It runs:

1. Replica choice: every assignment goes to a physical slot under the plan's dispatch rule
   (``planner.dispatch``: a replica on this GPU, else on this host, else any; ties round-robin by
   token index, counted on across forwards in inference), read from the plan's own ``replica_table``.
2. Dispatch, first hop: one row per (token, GPU) for GPUs of this host, and one row per (token,
   remote host) to that host's rail-aligned landing GPU. Counts go first (one all-to-all of
   [rows, assignments] per rank), then the token rows (autograd), the routing weights (autograd)
   and the (row, slot) ids of the assignments riding on each row.
3. Dispatch, second hop (plans spanning several hosts only): a landing GPU forwards each row once
   to every other GPU of its host that serves it.
4. Compute: the same grouped op as one process (``torch.ops.moegraph.expert_mlp``, or
   ``fp8_expert_mlp`` for FP8 experts) over all rows received, with each row's local assignments;
   its output is one weighted sum per row.
5. Combine: results go back along the second hop (summed on the landing GPU) and the first hop,
   and are summed per token. The combine sends exactly the copies the dispatch sent.

These are the copies ``planner.dispatch.dispatch_counts`` predicts (``link_copies``). Shared experts
run here on this rank's tokens (data-parallel).

FP8 dispatch (``moe.quantization.dispatch: fp8``): token rows are quantized per activation tile
before each dispatch hop and sent as FP8 bytes with their float32 tile scales (counted as
``dispatch``); the receiver dequantizes them to float32, which the FP8 expert op quantizes again: to
the same FP8 bytes, with tile scales equal up to one float32 ulp (so outputs may differ from a
single process in the last bit of the layer's dtype). The combine returns results in the layer's
dtype. In the backward, the row gradients travel back in the layer's dtype (straight through the
quantizer).

Legend: T tokens on this rank, D hidden, A assignments, W ranks, G = W GPUs, E experts,
S slots per GPU, M rows received, R rows sent.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .. import fp8
from ..errors import DistributedError
from ..runtime import per_expert_norm
from .comm import AllToAll, Comm, Traffic, _row_bytes

__all__ = ["ExpertDispatch", "choose_slots"]


def choose_slots(cand_GER: Tensor, n_GE: Tensor, src: int, tok_A: Tensor, exp_A: Tensor) -> Tensor:
    """[A] physical slot of each assignment under the plan's rule (``planner.dispatch.choose_replicas``).

    cand_GER, n_GE: the plan's ``replica_table`` (candidate slots per source GPU and expert in slot
    order, and how many); src: this GPU; tok_A: [A] token index (the round-robin key); exp_A: [A] expert.
    """
    return cand_GER[src, exp_A, tok_A % n_GE[src, exp_A]]


def _group_rows(tok_A: Tensor, dst_A: Tensor, T: int, W: int):
    """One row per distinct (destination, token), destinations in rank order, tokens ascending.

    tok_A: [A] token (row of the source tensor) of each assignment; dst_A: [A] destination rank.
    Returns order_A (assignments sorted by destination, then token), row_tok_R [R] (source row of
    each row sent), rows_W / asg_W [W] (rows / assignments per destination) and arow_A [A] (row of
    each sorted assignment, counted from the start of its destination's block).
    """
    key_A = dst_A * max(T, 1) + tok_A
    key_sorted, order_A = torch.sort(key_A, stable=True)
    uniq_R, row_of_A = torch.unique_consecutive(key_sorted, return_inverse=True)
    row_dst_R = torch.div(uniq_R, max(T, 1), rounding_mode="floor")
    row_tok_R = uniq_R - row_dst_R * max(T, 1)
    rows_W = torch.bincount(row_dst_R, minlength=W)
    asg_W = torch.bincount(dst_A, minlength=W)
    start_W = torch.cumsum(rows_W, 0) - rows_W
    arow_A = row_of_A - start_W[torch.div(key_sorted, max(T, 1), rounding_mode="floor")]
    return order_A, row_tok_R, rows_W, asg_W, arow_A


class _Join(torch.autograd.Function):
    """``out`` unchanged, with zero gradients for ``deps``: keeps tensors received by an all-to-all
    reachable from the loss on a rank that computes nothing, so that its backward all-to-all runs."""

    @staticmethod
    def forward(ctx, out, *deps):
        ctx.deps = [(d.shape, d.dtype, d.device) for d in deps]
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=t, device=d) for s, t, d in ctx.deps))


class _FP8AllToAll(torch.autograd.Function):
    """Rows quantized per tile, sent as FP8 bytes + float32 tile scales, dequantized (float32) on arrival.

    ``_FP8AllToAll.apply(x, anchor, send_W, recv_W, comm, traffic, quant, what)`` with quant =
    (tile, format, scale_format); the backward sends the gradient rows back in x's dtype (``grad``).
    """

    @staticmethod
    def forward(ctx, x, anchor, send_W, recv_W, comm, traffic, quant, what):
        ctx.send_W, ctx.recv_W, ctx.comm, ctx.traffic, ctx.what, ctx.dtype = send_W, recv_W, comm, traffic, what, x.dtype
        tile, fmt, scale_format = quant
        q_RD, s_RT = fp8.quantize_tiles(x, tile, fmt, scale_format)
        if traffic is not None:  # one copy per row: its FP8 bytes and its tile scales
            traffic.add("dispatch", send_W, _row_bytes(q_RD) + _row_bytes(s_RT))
        q_MD = comm.all_to_all(q_RD, send_W, recv_W, what)  # as bytes on the wire (``comm.fp8_as_bytes``)
        s_MT = comm.all_to_all(s_RT, send_W, recv_W, what + " (tile scales)")
        return fp8.dequantize_tiles(q_MD, s_MT, tile)

    @staticmethod
    def backward(ctx, grad):
        g = AllToAll.backward(ctx, grad.to(ctx.dtype))[0]
        return g, None, None, None, None, None, None, None


class _Hop:
    """What a combine needs to send one hop's results back: source rows and split sizes."""

    def __init__(self, row_tok_R: Tensor, send_W: list[int], recv_W: list[int]):
        self.row_tok_R, self.send_W, self.recv_W = row_tok_R, send_W, recv_W


class ExpertDispatch(nn.Module):
    """The expert-parallel replacement of ``expert_mlp`` for one MoE layer (module docstring).

    Args:
        plan: the placement ``Plan``; layer_index: which of its MoE layers this is.
        comm: the process group wrapper; traffic: the counters this module adds to.
    Buffers (non-persistent, moved by ``.to()``): ``cand_GER`` [G, E, R] candidate slots per (source
    GPU, expert) in slot order, ``n_GE`` [G, E] candidates per pair, ``node_G`` [G] host of each GPU,
    ``landing_GN`` [G, N] GPU of host n that receives copies from GPU g.
    """

    def __init__(self, plan, layer_index: int, comm: Comm, traffic: Traffic, device=None):
        super().__init__()
        cand, n = plan.replica_table(layer_index)
        cluster = plan.cluster
        node = np.asarray(cluster.node_of_gpu, np.int64)
        num_nodes = int(node.max()) + 1
        g = len(node)
        landing = np.stack([np.asarray(cluster.landing_gpu(np.full(num_nodes, src), np.arange(num_nodes)), np.int64)
                            for src in range(g)])
        kw = {"device": device}
        self.register_buffer("cand_GER", torch.as_tensor(cand, dtype=torch.int64, **kw), persistent=False)
        self.register_buffer("n_GE", torch.as_tensor(np.maximum(n, 1), dtype=torch.int64, **kw), persistent=False)
        self.register_buffer("node_G", torch.as_tensor(node, **kw), persistent=False)
        self.register_buffer("landing_GN", torch.as_tensor(landing, **kw), persistent=False)
        # Tokens this rank dispatched in inference since the last reset: the round-robin key runs on
        # across forwards there (see forward).
        self.register_buffer("rr_base", torch.zeros((), dtype=torch.int64, **kw), persistent=False)
        self.comm = comm
        self.traffic = traffic
        self.rank = comm.rank
        self.world_size = comm.world_size
        self.slots_per_gpu = plan.slots_per_gpu
        self.num_experts = plan.num_experts
        self.layer_index = layer_index
        self.two_hop = num_nodes > 1  # a second (intra-host forwarding) hop exists only across hosts
        self.expert_op = torch.ops.moegraph.expert_mlp  # set to the graph's own op by ExpertParallelPass
        self.sync_timing = False  # CUDA: synchronise at phase boundaries so that timings are honest
        q = plan.spec.moe.quantization
        # (tile, format, scale_format) when token rows travel in FP8; None: in the layer's dtype
        self.fp8_dispatch = (q.activation_tile[1], q.format, q.scale_format) if q and q.dispatch == "fp8" else None
        self.fp8_args: tuple | None = None  # the FP8 op's trailing arguments, set by forward_fp8
        #: (eps, offset, before) of a norm with a weight per expert on the op's rows (experts.output_norm.per_expert),
        #: which ExpertParallelPass moves in here; its weight comes with each call (norm_weight_SM)
        self.output_norm: tuple | None = None

    def reset_round_robin(self) -> None:
        """Start the inference round-robin count at 0 again (as a recorded trace's first token does)."""
        self.rr_base.zero_()

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, layer={self.layer_index}, slots={self.slots_per_gpu}, "
                f"two_hop={self.two_hop}")

    def _now(self, x: Tensor) -> float:
        if self.sync_timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ one hop

    def _send(self, x_TD: Tensor, tok_A: Tensor, dst_A: Tensor, w_A: Tensor, phys_A: Tensor, hop: str):
        """Send rows of ``x_TD`` with their assignments to ``dst_A``; returns what this rank received.

        Returns (X_MD rows received, w_B weights, arow_B row in X_MD, phys_B slot of each received
        assignment, the _Hop to send results back).
        """
        W, comm, tr = self.world_size, self.comm, self.traffic
        order_A, row_tok_R, rows_W, asg_W, arow_A = _group_rows(tok_A, dst_A, x_TD.shape[0], W)
        recv_W2 = comm.exchange_counts(torch.stack([rows_W, asg_W], 1), f"{hop}: count exchange")
        tr.add("meta", [2] * W, 8)
        send_rows, send_asg = rows_W.tolist(), asg_W.tolist()
        recv_rows, recv_asg = recv_W2[:, 0].tolist(), recv_W2[:, 1].tolist()
        if self.fp8_dispatch is not None:
            X_MD = _FP8AllToAll.apply(x_TD.index_select(0, row_tok_R), comm.anchor, send_rows, recv_rows, comm, tr,
                                      self.fp8_dispatch, f"{hop}: FP8 token all-to-all")
        else:
            X_MD = AllToAll.apply(x_TD.index_select(0, row_tok_R), comm.anchor, send_rows, recv_rows, comm, tr,
                                  "dispatch", f"{hop}: token all-to-all")
        w_B = AllToAll.apply(w_A.index_select(0, order_A), comm.anchor, send_asg, recv_asg, comm, tr, "meta",
                             f"{hop}: routing-weight all-to-all")
        ids_A2 = torch.stack([arow_A, phys_A.index_select(0, order_A)], 1).to(torch.int32)
        ids_B2 = comm.all_to_all(ids_A2, send_asg, recv_asg, f"{hop}: slot-id all-to-all")
        tr.add("meta", send_asg, 8)
        # A received assignment's row: its sender's block start plus the row within that block.
        recv_rows_t = recv_W2[:, 0]
        start_W = torch.cumsum(recv_rows_t, 0) - recv_rows_t
        sender_B = torch.repeat_interleave(torch.arange(W, device=recv_W2.device), recv_W2[:, 1])
        arow_B = ids_B2[:, 0].long() + start_W[sender_B]
        return X_MD, w_B, arow_B, ids_B2[:, 1].long(), _Hop(row_tok_R, send_rows, recv_rows)

    # ------------------------------------------------------------------ the layer's expert step

    def forward_fp8(self, x_TD: Tensor, tok_N: Tensor, exp_N: Tensor, w_N: Tensor, w_up_SHD: Tensor,
                    s_up: Tensor | None, w_down_SDF: Tensor, s_down: Tensor | None, b_up_SH: Tensor | None,
                    b_down_SD: Tensor | None, activation: str, gated: bool, gate_clamp: float | None,
                    up_clamp: float | None, block_out: int, block_in: int, tile: int, fmt: str,
                    scale_format: str) -> Tensor:
        """Same contract as ``fp8_expert_mlp`` with the slot weights (FP8, or master weights) of this rank."""
        self.fp8_args = (s_up, s_down, block_out, block_in, tile, fmt, scale_format)
        try:
            return self.forward(x_TD, tok_N, exp_N, w_N, w_up_SHD, w_down_SDF, b_up_SH, b_down_SD, activation, gated,
                                gate_clamp, up_clamp)
        finally:
            self.fp8_args = None

    def _compute(self, X_MD, row_B, slot_B, w_B, w_up_SHD, w_down_SDF, b_up_SH, b_down_SD, activation, gated,
                 gate_clamp, up_clamp) -> Tensor:
        if self.fp8_args is None:
            return self.expert_op(X_MD, row_B, slot_B, w_B.to(X_MD.dtype), w_up_SHD, w_down_SDF, b_up_SH, b_down_SD,
                                  activation, gated, gate_clamp, up_clamp, None, None, None)
        s_up, s_down, bo, bi, tile, fmt, sf = self.fp8_args
        return self.expert_op(X_MD, row_B, slot_B, w_B.to(X_MD.dtype), w_up_SHD, s_up, w_down_SDF, s_down, b_up_SH,
                              b_down_SD, activation, gated, gate_clamp, up_clamp, bo, bi, tile, fmt, sf)

    def forward(self, x_TD: Tensor, tok_N: Tensor, exp_N: Tensor, w_N: Tensor, w_up_SHD: Tensor, w_down_SDF: Tensor,
                b_up_SH: Tensor | None, b_down_SD: Tensor | None, activation: str, gated: bool,
                gate_clamp: float | None, up_clamp: float | None, shared_w_up_HD: Tensor | None = None,
                shared_w_down_DF: Tensor | None = None, shared_scale_T: Tensor | None = None,
                norm_weight_SM: Tensor | None = None) -> Tensor:
        """Same contract as ``expert_mlp`` with the slot weights of this rank: returns [T, D]. With
        ``norm_weight_SM`` (this rank's slots of ``experts.output_norm_weight``) each row's expert output is
        normalised with its slot's weight where it is computed (``runtime.per_expert_norm``): the rows are then one
        per assignment, as the layer sends them for that norm."""
        try:
            return self._forward(x_TD, tok_N, exp_N, w_N, w_up_SHD, w_down_SDF, b_up_SH, b_down_SD, activation,
                                 gated, gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF, shared_scale_T,
                                 norm_weight_SM)
        except DistributedError:
            raise  # a collective's failure: its group is marked already
        except BaseException as exc:
            # A local failure between collectives (out of memory, say, or Ctrl-C): the peers go on to the next
            # collective of this forward without this rank, so a forward retried here would pair with theirs.
            self.comm.mark_broken(f"rank {self.rank} left a forward midway ({type(exc).__name__})")
            raise

    def _forward(self, x_TD, tok_N, exp_N, w_N, w_up_SHD, w_down_SDF, b_up_SH, b_down_SD, activation, gated,
                 gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF, shared_scale_T, norm_weight_SM) -> Tensor:
        T, D = x_TD.shape
        me, S, E, tr, comm = self.rank, self.slots_per_gpu, self.num_experts, self.traffic, self.comm
        t0 = self._now(x_TD)
        # Step 1: the plan's replica of every assignment; dropped ones (id outside [0, E)) stay home.
        keep_N = (exp_N >= 0) & (exp_N < E)
        tok_A, exp_A, w_A = tok_N[keep_N], exp_N[keep_N].long(), w_N[keep_N]
        # The round-robin key is the token's index among this rank's tokens. In inference it counts on
        # across forwards: decoding sends one token per forward, and restarting at 0 would send every
        # tie to the first replica. In training it restarts each forward, so that recomputing a forward
        # (activation checkpointing) chooses the same replicas.
        key_A = tok_A if self.training else tok_A + self.rr_base
        phys_A = choose_slots(self.cand_GER, self.n_GE, me, key_A, exp_A)
        if not self.training:
            self.rr_base += T
        gpu_A = torch.div(phys_A, S, rounding_mode="floor")
        # Step 2: first hop: GPUs of this host directly, other hosts through their landing GPU.
        if self.two_hop:
            node_A = self.node_G[gpu_A]
            hop_A = torch.where(node_A == self.node_G[me], gpu_A, self.landing_GN[me, node_A])
        else:
            hop_A = gpu_A
        X1, w1, arow1, phys1, hop1 = self._send(x_TD, tok_A, hop_A, w_A, phys_A, "dispatch")
        here1 = torch.div(phys1, S, rounding_mode="floor") == me
        M1 = X1.shape[0]
        # Step 3: second hop: a landing GPU forwards rows to the GPUs of its host that serve them.
        if self.two_hop:
            fwd = ~here1
            X2, w2, arow2, phys2, hop2 = self._send(
                X1, arow1[fwd], torch.div(phys1[fwd], S, rounding_mode="floor"), w1[fwd], phys1[fwd],
                "dispatch forward")
            X_MD = torch.cat([X1, X2])
            row_B = torch.cat([arow1[here1], arow2 + M1])
            slot_B = torch.cat([phys1[here1], phys2]) - me * S
            w_B = torch.cat([w1[here1], w2])
        else:
            assert bool(here1.all()), "internal: a one-host plan sent an assignment to a GPU without its slot"
            X_MD, row_B, slot_B, w_B = X1, arow1, phys1 - me * S, w1
        t1 = self._now(x_TD)
        # Step 4: this rank's experts, with the grouped op the single-process layer uses.
        if row_B.numel():
            # FP8 rows arrive as float32; the results go back in the layer's dtype.
            out_MD = self._compute(X_MD, row_B, slot_B, w_B, w_up_SHD, w_down_SDF, b_up_SH, b_down_SD, activation,
                                   gated, gate_clamp, up_clamp).to(x_TD.dtype)
            if norm_weight_SM is not None:
                # One assignment per row at most: a row only forwarded from here (second hop) computed nothing,
                # and its zero output stays zero whatever slot's weight it reads.
                slot_M = torch.zeros(X_MD.shape[0], dtype=torch.long, device=X_MD.device).index_copy(0, row_B, slot_B)
                out_MD = per_expert_norm(out_MD, slot_M, norm_weight_SM, *self.output_norm)
        else:  # nothing to compute here; keep the received tensors in the graph (see _Join)
            out_MD = _Join.apply(x_TD.new_zeros(X_MD.shape), X_MD, w_B)
        shared_TD = None
        if shared_w_up_HD is not None:
            # Shared experts are data-parallel: this rank's tokens, the same op with no assignments.
            none_N = tok_N[:0]
            shared_TD = self.expert_op(x_TD, none_N, none_N, w_N[:0], w_up_SHD, w_down_SDF, b_up_SH, b_down_SD,
                                       activation, gated, gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF,
                                       shared_scale_T)
        t2 = self._now(x_TD)
        # Step 5: combine, mirroring the dispatch hop by hop; sums per row, then per token.
        if self.two_hop:
            back2 = AllToAll.apply(out_MD[M1:], comm.anchor, hop2.recv_W, hop2.send_W, comm, tr, "combine",
                                   "combine forward")
            res1 = out_MD[:M1].index_add(0, hop2.row_tok_R, back2)
        else:
            res1 = out_MD
        back1 = AllToAll.apply(res1, comm.anchor, hop1.recv_W, hop1.send_W, comm, tr, "combine", "combine")
        y_TD = x_TD.new_zeros(T, D).index_add(0, hop1.row_tok_R, back1.to(x_TD.dtype))
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        t3 = self._now(x_TD)
        tr.calls += 1
        tr.tokens += T
        tr.computed += int(row_B.numel())
        tr.computed_total += int(row_B.numel())
        tr.seconds["dispatch"] += t1 - t0
        tr.seconds["compute"] += t2 - t1
        tr.seconds["combine"] += t3 - t2
        return y_TD
