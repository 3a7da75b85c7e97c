"""Expert parallelism over gloo against the single-process layer, in spawned processes.

Each suite runs in one group of spawned processes (world size 2 or 4) that runs several scenarios
and saves what it saw (outputs, gradients, traffic counters, error messages) per rank; the tests
compare that against the single-process layer computed here, in the parent. Every launch has a
deadline after which its processes are killed, and every collective a timeout, so nothing hangs.

Placements: world size 2 on one host (one hop), world size 4 on two hosts of two GPUs (dispatch
through a landing GPU, then forwarded inside the host) and on one host of four.
"""

from __future__ import annotations

import datetime
import math
import os
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moegraph
from moegraph import strategies
from moegraph.errors import DistributedError, PlanFileError
from subproc import free_port, join_ranks, rank_context

pytestmark = [pytest.mark.distributed]

DECODE_STEPS = 6  # one-token forwards per rank at the end of every scenario
TIMEOUT_S = 60.0  # per collective inside the suites (a bug shows up as DistributedError, not a hang)
DEADLINE_S = 240.0  # per launch, then every process is killed


# ------------------------------------------------------------------------------------------------
# Deterministic inputs shared by the workers and the parent
# ------------------------------------------------------------------------------------------------


def _spec(kind: str, nodes: int, gpus_per_node: int, **placement):
    small = {"num_experts": 8, "intermediate_size": 8, "activation": "swiglu"}
    if kind == "dsv3":
        d = moegraph.load_spec("deepseek-v3-tiny").model_dump(mode="json")
    elif kind == "skew":  # top-1, so that one expert can take every token
        d = {"name": "skew", "moe": {"hidden_size": 16, "experts": small,
                                     "router": {"top_k": 1, "score": "sigmoid", "expert_bias": {"update_rate": 0.001}}},
             "placement": {"redundant_slots": 0}}
    elif kind == "capacity":  # over-full experts drop assignments (expert id E in the op's input)
        d = {"name": "cap", "moe": {"hidden_size": 16, "experts": small,
                                    "router": {"top_k": 2, "capacity": {"factor": 0.5, "drop_policy": "probs"}}},
             "placement": {"redundant_slots": 2}}
    elif kind == "hash":  # experts fixed by token id: the layer takes token ids beside the hidden states
        d = {"name": "hash", "moe": {"hidden_size": 16, "experts": small,
                                     "router": {"type": "hash", "top_k": 2, "method": "random", "vocab_size": 50}},
             "placement": {"redundant_slots": 2}}
    elif kind == "identity":  # LongCat-Flash: router choices past the experts return the input (or nothing)
        d = {"name": "identity", "moe": {"hidden_size": 16,
                                         "experts": {**small, "identity_experts": 2, "zero_experts": 1},
                                         "shared_experts": {"count": 1},
                                         "router": {"top_k": 3, "score": "softmax", "normalize": True}},
             "placement": {"redundant_slots": 2}}
    elif kind == "input_scaled":  # Llama 4: expert(w * x), the routing weight on the expert's input
        d = {"name": "input_scaled", "moe": {"hidden_size": 16, "experts": {**small, "routing_weight": "input"},
                                             "router": {"top_k": 2, "score": "sigmoid"}},
             "placement": {"redundant_slots": 2}}
    elif kind == "hash_table":  # DeepSeek-V4 hash layers: a token id -> experts table, weights from scores
        d = {"name": "hash_table", "moe": {"hidden_size": 16, "experts": small,
                                           "router": {"type": "hash", "top_k": 2, "method": "table", "vocab_size": 50,
                                                      "score": "sqrt_softplus", "normalize": True,
                                                      "scaling_factor": 1.5}},
             "placement": {"redundant_slots": 2}}
    elif kind == "transforms":  # router logit transforms (Gemma 4, Kolibri1, Laguna) and JetMoE's output bias
        d = {"name": "transforms", "moe": {"hidden_size": 16, "experts": small, "output_bias": True,
                                           "router": {"top_k": 2, "score": "softmax", "normalize": True,
                                                      "input_norm": {"kind": "rms", "weight": True, "multiplier": 0.25},
                                                      "learned_logit_scale": True, "logit_softcap": 3.0,
                                                      "per_expert_scale": True,
                                                      "expert_bias": {"update_rate": 0.0, "applies_to": "logits"}}},
             "placement": {"redundant_slots": 2}}
    elif kind == "routed_shared":  # Inkling: shared experts in the routing normalisation, combined by an
        # expression; Switch: capacity per sequence
        d = {"name": "routed_shared", "moe": {"hidden_size": 16, "experts": small,
                                              "shared_experts": {"count": 2, "gate": "router",
                                                                 "combine": "routed + 0.5 * shared"},
                                              "router": {"top_k": 2, "score": "softmax", "normalize": True,
                                                         "capacity": {"factor": 0.75, "per": "sequence"}}},
             "placement": {"redundant_slots": 2}}
    elif kind == "all_transforms":  # all of them in one layer, sigmoid scores, capacity in tokens
        d = {"name": "all_transforms", "moe": {
            "hidden_size": 16, "experts": small, "shared_experts": {"count": 2, "gate": "router"},
            "output_bias": True,
            "router": {"top_k": 2, "score": "sigmoid", "normalize": True, "logit_softcap": 1.5,
                       "learned_logit_scale": True, "per_expert_scale": True, "learned_weight_scale": True,
                       "input_norm": {"kind": "rms", "weight": True, "multiplier": 0.5},
                       "capacity": {"tokens": 2, "per": "sequence", "drop_policy": "position"}}},
             "placement": {"redundant_slots": 2}}
    elif kind == "expert_space":  # Muse Spark: experts in a projected space, each expert's output normalised
        d = {"name": "expert_space", "moe": {
            "hidden_size": 16, "experts": {**small, "output_norm": {"eps": 1e-6, "weight_offset": 1, "scale": "before"},
                                           "input_norm": {"weight_offset": 1}},
            "expert_projection": {"size": 12},
            "router": {"top_k": 2, "score": "sigmoid", "normalize": True, "expert_bias": {"update_rate": 0.001}}},
             "placement": {"redundant_slots": 2}}
    elif kind == "ergo":  # Ergo: each expert's output normalised with that expert's own weight (an expert tensor,
        # which lives in the expert's slots and is applied where it computes), a normalised shared expert
        norm = {"eps": 1e-6}
        d = {"name": "ergo", "moe": {
            "hidden_size": 16, "experts": {**small, "activation": "relu2", "output_norm": {**norm, "per_expert": True}},
            "shared_experts": {"count": 1, "output_norm": norm},
            "router": {"top_k": 2, "score": "sigmoid", "normalize": True, "scaling_factor": 2.0,
                       "expert_bias": {"update_rate": 0.001}}},
             "placement": {"redundant_slots": 4}}
    elif kind == "router_net":  # a router that is a small network (router.mlp): its layers are replicated
        # on every rank like the router's weight, and their gradients summed over ranks
        d = {"name": "router_net", "moe": {"hidden_size": 16, "experts": small, "shared_experts": {"count": 1},
                                           "router": {"top_k": 3, "score": "sigmoid", "normalize": True,
                                                      "router_bias": True, "input_norm": {"kind": "rms", "eps": 1e-6},
                                                      "mlp": [{"op": "linear", "size": 10},
                                                              {"op": "rms_norm", "eps": 1e-5},
                                                              {"op": "activation", "function": "x * sigmoid(x)"},
                                                              {"op": "linear", "size": 6, "bias": True}]}},
             "placement": {"redundant_slots": 2}}
    elif kind == "router_state":  # Zaya: the router network passes a state to the next layer (added to its own),
        # and a skip choice is a zero expert
        d = {"name": "router_state", "moe": {"hidden_size": 16, "experts": {**small, "zero_experts": 1},
                                             "router": {"top_k": 2, "expert_bias": {"update_rate": 0.0},
                                                        "mlp": [{"op": "linear", "size": 12, "bias": True},
                                                                {"op": "state"}, {"op": "rms_norm", "eps": 1e-5},
                                                                {"op": "linear", "size": 12, "bias": True},
                                                                {"op": "activation", "function": "gelu"}]}},
             "placement": {"redundant_slots": 2}}
    else:  # expert choice: assignments are expert-major, not [tokens, k]
        d = {"name": "ec", "moe": {"hidden_size": 16, "experts": small,
                                   "router": {"type": "expert_choice", "capacity_factor": 2.0}},
             "placement": {"redundant_slots": 2}}
    d["topology"] = {"kind": "uniform", "nodes": nodes, "gpus_per_node": gpus_per_node}
    d.setdefault("placement", {}).update(placement)
    return moegraph.load_spec(d)


# Hand-made placements with replicas (slot order shuffled inside GPUs on purpose).
ROWS = {
    # 2 GPUs x 10 slots: experts 3, 5, 9, 12 on both GPUs.
    "replicas2": [5, 0, 9, 1, 2, 3, 4, 6, 7, 12, 8, 10, 11, 12, 13, 14, 15, 5, 9, 3],
    # 4 GPUs x 5 slots on hosts {0,1}, {2,3}: 12 on GPU 0 and 3, 14 on 1 and 3, 4 on 1 and 2, and 8 on
    # GPUs 2 and 3 of the other host (tokens from host 0 take them round-robin).
    # 2 GPUs x 5 slots for the 8-expert specs: experts 3 and 5 on both GPUs.
    "replicas2e8": [3, 0, 1, 2, 5, 4, 5, 6, 7, 3],
    "replicas4": [12, 3, 0, 2, 1, 4, 5, 6, 7, 14, 8, 9, 10, 11, 4, 12, 13, 14, 15, 8],
}


def _plan(spec, kind: str):
    from moegraph.planner import Plan
    from moegraph.planner.baselines import contiguous

    E = spec.moe.experts.num_experts
    S = E + spec.placement.redundant_slots
    L = spec.model.num_moe_layers
    if kind == "contiguous":
        row = contiguous(E, S)
    else:
        row = np.array(ROWS[kind])
    rows = [np.roll(row, 0)] + [contiguous(E, S) for _ in range(L - 1)]
    if kind.startswith("replicas") and L > 1:
        rows[1] = row  # layer 1 uses the same placement, to exercise layer_index
    return Plan(np.stack(rows), spec)


def _full_state(spec, seed: int = 1) -> dict:
    """A single-process layer's state dict with weights far from the default init, and an expert bias."""
    layer = moegraph.compile(spec, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        if hasattr(layer.router, "expert_bias"):
            layer.router.expert_bias.copy_(torch.randn(layer.router.expert_bias.shape, generator=g) * 0.1)
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _inputs(D: int, shapes: list[tuple[int, int]], seed: int = 0):
    xs, gs = [], []
    for r, (b, s) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed * 100 + r)
        xs.append(torch.randn(b, s, D, generator=g))
        gs.append(torch.randn(b, s, D, generator=g))
    return xs, gs


# Scenario table: name -> (spec args, plan kind, per-rank input shapes, layer index, expert-bias override)
SCENARIOS = {
    2: {
        "replicas": (("dsv3", 1, 2), "replicas2", [(2, 5), (3, 3)], 0, None),
        "contiguous": (("dsv3", 1, 2), "contiguous", [(1, 7), (2, 4)], 0, None),
        "layer1": (("dsv3", 1, 2), "replicas2", [(1, 6), (1, 6)], 1, None),
        # Every token to expert 2 (GPU 0): rank 1 receives nothing, experts other than 2 get nothing.
        "one_expert": (("skew", 1, 2), "contiguous", [(1, 9), (2, 3)], 0, 2),
        # Rank 1 has no tokens at all.
        "empty_rank": (("skew", 1, 2), "contiguous", [(2, 4), (1, 0)], 0, None),
        "capacity": (("capacity", 1, 2), "contiguous", [(2, 6), (1, 5)], 0, None),
        "expert_choice": (("expert_choice", 1, 2), "contiguous", [(1, 6), (2, 5)], 0, None),
        "hash": (("hash", 1, 2), "replicas2e8", [(2, 5), (1, 7)], 0, None),
        # Constructs of the HF families: identity/zero experts stay home (no expert, no dispatch),
        # input-scaled experts, a shipped hash table with scored weights.
        "identity": (("identity", 1, 2), "replicas2e8", [(2, 5), (1, 6)], 0, None),
        "input_scaled": (("input_scaled", 1, 2), "replicas2e8", [(1, 7), (2, 3)], 0, None),
        "hash_table": (("hash_table", 1, 2), "replicas2e8", [(2, 4), (1, 6)], 0, None),
        # Router transforms with learned parameters (their gradients are summed over ranks like the
        # router's), an output bias, shared experts routed with the experts, per-sequence capacity.
        "transforms": (("transforms", 1, 2), "replicas2e8", [(2, 5), (1, 6)], 0, None),
        "routed_shared": (("routed_shared", 1, 2), "replicas2e8", [(3, 4), (1, 7)], 0, None),
        # Router transforms with learned scales (replicated, gradients summed), routed shared experts, a capacity
        # per sequence (each rank counts its own sequences, as the single-process layer does on them) and an
        # output bias; and the experts' own space (Muse Spark: projections, norms, one row per assignment).
        "all_transforms": (("all_transforms", 1, 2), "replicas2e8", [(2, 6), (1, 7)], 0, None),
        "expert_space": (("expert_space", 1, 2), "replicas2e8", [(2, 5), (1, 6)], 0, 6),
        "router_net": (("router_net", 1, 2), "replicas2e8", [(2, 5), (1, 6)], 0, None),
        "ergo": (("ergo", 1, 2), "contiguous", [(2, 5), (1, 7)], 0, None),
        "router_state": (("router_state", 1, 2), "replicas2e8", [(1, 6), (2, 4)], 0, None),
    },
    4: {
        "two_hosts": (("dsv3", 2, 2), "replicas4", [(2, 5), (1, 3), (1, 8), (2, 2)], 0, None),
        "two_hosts_contiguous": (("dsv3", 2, 2), "contiguous", [(1, 4), (1, 6), (2, 2), (1, 5)], 0, None),
        "one_host": (("dsv3", 1, 4), "replicas4", [(1, 6), (2, 2), (1, 5), (1, 1)], 0, None),
        "one_expert4": (("skew", 2, 2), "contiguous", [(1, 5), (1, 4), (1, 0), (2, 2)], 0, 6),
        # A weight per expert on rows forwarded inside the far host (second hop): applied where they compute.
        "ergo_two_hosts": (("ergo", 2, 2), "contiguous", [(2, 4), (1, 6), (1, 5), (2, 3)], 0, None),
    },
}


def _token_ids(world: int, name: str) -> list[torch.Tensor | None]:
    """Per rank, the token ids a hash-routed scenario feeds the layer (None for the others)."""
    spec_args, _, shapes, _, _ = SCENARIOS[world][name]
    if not spec_args[0].startswith("hash"):
        return [None] * len(shapes)
    return [torch.randint(0, 50, (b, s), generator=torch.Generator().manual_seed(7 + r)) for r, (b, s) in enumerate(shapes)]


def _state_width(spec) -> int:
    """Width of the router state a layer returns (0: none), i.e. the router network's width at its state step."""
    router = spec.moe.router
    width = 0
    for step in getattr(router, "mlp", ()):
        if step.op == "linear":
            width = step.size
        elif step.op == "state":
            return width or spec.moe.hidden_size
    return 0


def _setup(world: int, name: str):
    spec_args, plan_kind, shapes, layer_index, hot = SCENARIOS[world][name]
    spec = _spec(*spec_args)
    plan = _plan(spec, plan_kind)
    state = _full_state(spec)
    if hot is not None:
        bias = torch.zeros(spec.moe.experts.num_experts)
        bias[hot] = 50.0
        state["router.expert_bias"] = bias
    if getattr(spec.moe.router, "mlp", ()):
        # A norm and GELU layers of weights ~1/sqrt(fan-in) give every token nearly the same logits: larger
        # weights make tokens route apart (and some choose the skip, a zero expert) like a trained router.
        state["router.weight"] = state["router.weight"] * 10
        for k in [k for k, v in state.items() if k.startswith("router.mlp.") and v.dim() == 2]:
            state[k] = state[k] * 8
    H = _state_width(spec)
    # A layer with a router state returns it beside its output: the scenario's "output" is both, side by side
    # (so outputs and gradients through the state are compared like the rest), and it adds an incoming state.
    xs, gs = _inputs(spec.moe.hidden_size + H, shapes)
    if H:
        D = spec.moe.hidden_size
        xs = [(x[..., :D].contiguous(), x[..., D:].contiguous()) for x in xs]
    return spec, plan, state, xs, gs, layer_index


def _forward(layer, x, tid):
    """The layer on a scenario's input: hidden states, or (hidden states, incoming router state)."""
    if not isinstance(x, tuple):
        return layer(x, tid)
    y, state = layer(x[0], tid, router_state=x[1])
    return torch.cat([y, state], -1)


def _grad_input(x):
    """A copy of a scenario input whose gradient is wanted (every part of it)."""
    if isinstance(x, tuple):
        return tuple(_grad_input(part) for part in x)
    return x.clone().requires_grad_(True)


def _grad_of(x) -> torch.Tensor:
    """The gradient of a scenario input (the parts side by side, like the output)."""
    if isinstance(x, tuple):
        return torch.cat([_grad_of(part) for part in x], -1)
    return x.grad if x.grad is not None else torch.zeros_like(x)


def _tokens(x, start: int, stop: int):
    """Tokens ``start:stop`` of a scenario input, flattened to [tokens, ...]."""
    if isinstance(x, tuple):
        return tuple(_tokens(part, start, stop) for part in x)
    return x.reshape(-1, x.shape[-1])[start:stop]


# ------------------------------------------------------------------------------------------------
# Worker side (runs in the spawned processes)
# ------------------------------------------------------------------------------------------------


def _run_scenario(rank: int, world: int, name: str, out_dir: Path) -> dict:
    spec, plan, state, xs, gs, layer_index = _setup(world, name)
    tid = _token_ids(world, name)[rank]
    layer = moegraph.compile(spec, plan=plan, seed=None, layer_index=layer_index, timeout=TIMEOUT_S)
    layer.load_state_dict(state)
    layer.start_recording()
    x = _grad_input(xs[rank])
    layer.reset_traffic()
    y = _forward(layer, x, tid)
    rows = {k: v.copy() for k, v in layer.traffic.rows.items()}
    sent = {k: v.copy() for k, v in layer.traffic.bytes.items()}
    (y * gs[rank]).sum().backward()
    layer.sync_grads()
    ids = layer.recorder.ids().clone()
    if spec.moe.experts.identity_experts or spec.moe.experts.zero_experts:
        # Choices of identity/zero experts hold no weights to place: gathering a trace is refused by name.
        err = _timed_error(lambda: moegraph.distributed.gather_trace(layer))
        trace = {"refused": err[:2]}
    else:
        trace = moegraph.distributed.gather_trace(layer)
        trace = {"topk": trace.topk, "src_rank": trace.src_rank, "sample_ids": trace.sample_ids,
                 "num_ranks": trace.num_ranks}
    bias = None
    if layer.EXPERT_BIAS_RATE is not None:
        layer.update_expert_bias()  # loads summed over ranks: every rank's router moves the same way
        bias = layer.router.expert_bias.clone()
    layer.eval()
    with torch.inference_mode():
        y_eval = _forward(layer, xs[rank], tid)
        # Every expert strategy, not only the one this rank's tuner timed fastest.
        y_eval_by = {}
        for s_name in strategies.STRATEGIES:
            with strategies.pinned(s_name):
                y_eval_by[s_name] = _forward(layer, xs[rank], tid)
    # Decoding: DECODE_STEPS forwards of one token per rank (none once a rank runs out), recorded.
    layer.start_recording()
    layer.reset_traffic()
    tid_t = None if tid is None else tid.reshape(-1)
    with torch.inference_mode():
        for j in range(DECODE_STEPS):
            _forward(layer, _tokens(xs[rank], j, j + 1), None if tid_t is None else tid_t[j:j + 1])
    decode = {"ids": layer.recorder.ids().clone(), "rows": layer.traffic.rows["dispatch"].copy()}
    return {
        "y": y.detach(), "y_eval": y_eval.clone(), "y_eval_by": y_eval_by, "x_grad": _grad_of(x), "expert_bias": bias,
        "grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
        "slot_experts": list(layer.slot_experts), "rows": rows, "bytes": sent, "ids": ids,
        "trace": trace,
        "summary": layer.traffic_summary(),
        "decode": decode,
    }


def _timed_error(fn) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects type and message
        return type(exc).__name__, str(exc), time.perf_counter() - t0
    return "none", "", time.perf_counter() - t0


def _run_weights(rank: int, world: int, out_dir: Path) -> dict:
    from moegraph.distributed import MissingExpertWeights  # noqa: F401  (name checked by the test)

    spec, plan, state, _, _, _ = _setup(world, "replicas")
    res: dict = {}
    # Same seed -> the single-process init, restricted to this rank's slots.
    full0 = moegraph.compile(spec, seed=0)
    ep0 = moegraph.compile(spec, plan=plan, seed=0, timeout=TIMEOUT_S)
    idx = torch.tensor(ep0.slot_experts)
    ref = dict(full0.named_parameters())
    res["seed_diff"] = max((p - (ref[n][idx] if n.startswith("experts.") else ref[n])).abs().max().item()
                           for n, p in ep0.named_parameters())
    # In-memory single-process state dict.
    ep = moegraph.compile(spec, plan=plan, seed=None, timeout=TIMEOUT_S)
    ep.load_state_dict(state)
    res["loaded_diff"] = max((ep.experts.gate_up_proj - state["experts.gate_up_proj"][idx]).abs().max().item(),
                             (ep.experts.down_proj - state["experts.down_proj"][idx]).abs().max().item(),
                             (ep.router.weight - state["router.weight"]).abs().max().item())
    local = ep.state_dict()
    res["local_keys"] = sorted(local)
    # A rank-local state dict loads back into the same placement.
    ep2 = moegraph.compile(spec, plan=plan, seed=0, timeout=TIMEOUT_S)
    ep2.load_state_dict(local)
    res["local_roundtrip_diff"] = (ep2.experts.down_proj - ep.experts.down_proj).abs().max().item()
    # A safetensors file, read lazily.
    path = out_dir / "full.safetensors"
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.distributed.barrier()
    ep3 = moegraph.compile(spec, plan=plan, seed=0, timeout=TIMEOUT_S).load_checkpoint(path)
    res["safetensors_diff"] = max((p - q).abs().max().item() for p, q in zip(ep3.parameters(), ep.parameters()))
    # Gather back the single-process checkpoint.
    full = ep.full_state_dict()
    res["full_keys_match"] = list(full) == list(state)
    res["full_diff"] = max((full[k].float() - state[k].float()).abs().max().item() for k in state)
    # Missing and malformed expert weights: errors on this rank alone, before any communication.
    mine = ep.slot_experts[0]
    per_expert = {k: v for k, v in state.items() if not k.startswith("experts.")}
    for e in range(spec.moe.experts.num_experts):
        if e != mine:
            per_expert[f"experts.{e}.gate_up_proj"] = state["experts.gate_up_proj"][e]
            per_expert[f"experts.{e}.down_proj"] = state["experts.down_proj"][e]
    res["missing_expert"] = mine
    res["missing"] = _timed_error(lambda: ep.load_state_dict(per_expert))
    # strict=False lists the missing expert's keys and loads the rest (it raised as strict=True did)
    before = ep.experts.down_proj.detach().clone()
    loose = ep.load_state_dict({k: v * 2 if k.startswith("experts.") else v for k, v in per_expert.items()},
                               strict=False)
    res["loose_missing"] = sorted(loose.missing_keys)
    res["loose_changed"] = [bool((ep.experts.down_proj[i] != before[i]).any()) for i in range(len(ep.slot_experts))]
    res["loose_want"] = [e != mine for e in ep.slot_experts]
    # inside a larger module torch checks strictness itself: it names the keys, a warning says why
    parent = torch.nn.Module()
    parent.moe = ep
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res["nested"] = _timed_error(lambda: parent.load_state_dict({"moe." + k: v for k, v in per_expert.items()}))
    res["nested_warned"] = [str(w.message) for w in seen if "which the plan places on rank" in str(w.message)]
    ep.load_state_dict(state)
    short = dict(state)
    short["experts.down_proj"] = state["experts.down_proj"][:-1]
    res["short"] = _timed_error(lambda: ep.load_state_dict(short))
    return res


def _run_bad_inputs(rank: int, world: int, out_dir: Path) -> dict:
    """Bad plans fail on rank 0 alone (rank 1 waits at a barrier): proof that no collective ran."""
    res: dict = {}
    if rank == 0:
        spec = _spec("dsv3", 1, 2)
        other = _spec("dsv3", 1, 2, seed=1)  # same shapes, different hash
        res["hash"] = _timed_error(lambda: moegraph.compile(spec, plan=_plan(other, "contiguous"), timeout=5))
        path = _plan(other, "contiguous").save(out_dir / "other.json")
        res["hash_file"] = _timed_error(lambda: moegraph.compile(spec, plan=str(path), timeout=5))
        four = _spec("dsv3", 2, 2)
        res["world"] = _timed_error(lambda: moegraph.compile(four, plan=_plan(four, "contiguous"), timeout=5))
        res["layer"] = _timed_error(
            lambda: moegraph.compile(spec, plan=_plan(spec, "contiguous"), layer_index=7, timeout=5))
    torch.distributed.barrier()
    return res


def _run_data_parallel(rank: int, world: int, out_dir: Path) -> dict:
    """Single-process layers under plain data parallelism (DDP, its default broadcast_buffers=True).

    ``bias``: two micro-batches accumulated without ``no_sync`` (two synced forwards), then the documented step:
    all-reduce the counted loads and ``update_expert_bias``; a recorder counts the same routing on its own. (The
    counts were a buffer, which DDP overwrote with rank 0's before every synced forward.)
    ``global_balance``: the summed balance loss where one rank has no tokens (it returned before the
    all-reduces its peers waited in, and the next collective paired with them)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    layer = moegraph.compile("deepseek-v3-tiny", seed=0).train()
    model = DDP(layer)
    rec = layer.start_recording()
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(2):
        model(torch.randn(2, 8 + 4 * rank, 64, generator=g)).sum().backward()
    true = rec.counts(layer.router_choices).float()
    torch.distributed.all_reduce(true)
    torch.distributed.all_reduce(layer._bias_load_E)
    res = {"true_loads": true, "used_loads": layer.update_expert_bias().clone(),
           "bias": layer.router.expert_bias.clone()}
    spec = {"name": "gb", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
            "router": {"top_k": 2, "aux_losses": [{"kind": "global_balance", "coef": 0.1}]}}}
    gb = moegraph.compile(spec, seed=0).train()
    x = torch.randn(2, 0 if rank == 1 else 4, 16, generator=torch.Generator().manual_seed(3))
    _, aux = gb(x, return_aux=True)
    after = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(after)  # the step's next collective pairs with its peer's again
    res |= {"global_balance": float(aux["global_balance"]), "after": float(after)}
    return res


def _run_autocast(rank: int, world: int, out_dir: Path) -> dict:
    """A training step under torch.autocast(bfloat16) of the float32 expert-parallel layer."""
    spec, plan, state, xs, gs, layer_index = _setup(world, "replicas")
    layer = moegraph.compile(spec, plan=plan, seed=None, layer_index=layer_index, timeout=TIMEOUT_S).train()
    layer.load_state_dict(state)
    x = _grad_input(xs[rank])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * gs[rank]).sum().backward()
    layer.sync_grads()
    return {"y": y.detach(), "x_grad": _grad_of(x), "slot_experts": list(layer.slot_experts),
            "grads": {n: (p.dtype, p.grad.clone()) for n, p in layer.named_parameters()}}


def _run_stall(rank: int, world: int, out_dir: Path) -> dict:
    spec, plan, _, xs, _, _ = _setup(world, "replicas")
    layer = moegraph.compile(spec, plan=plan, seed=0, timeout=2.0)
    layer(xs[rank])  # a healthy step first
    if rank == 1:
        time.sleep(6.0)  # past the 2 s timeout of rank 0
    error = _timed_error(lambda: layer(xs[rank]))
    # The next forward starts no collective on the group: its ranks may stand at different ones now
    return {"error": error, "next": _timed_error(lambda: layer(xs[rank]))}


def _run_oom(rank: int, world: int, out_dir: Path) -> dict:
    """Rank 1 runs out of memory in its experts (between dispatch and combine) and retries the forward, as a
    training loop catching an out-of-memory error may; rank 0 waits in the combine."""
    spec, plan, _, xs, _, _ = _setup(world, "replicas")
    layer = moegraph.compile(spec, plan=plan, seed=0, timeout=2.0)
    layer(xs[rank])
    if rank == 1:
        def no_memory(*args, **kwargs):
            raise MemoryError("simulated: no memory for the expert step")

        layer.ep_dispatch._compute = no_memory
    error = _timed_error(lambda: layer(xs[rank]))
    return {"error": error, "next": _timed_error(lambda: layer(xs[rank]))}


def _run_die(rank: int, world: int, out_dir: Path) -> dict:
    spec, plan, _, xs, _, _ = _setup(world, "replicas")
    layer = moegraph.compile(spec, plan=plan, seed=0, timeout=30.0)
    layer(xs[rank])
    if rank == 1:
        os._exit(17)  # dies without a word
    return {"error": _timed_error(lambda: layer(xs[rank]))}


SUITES = {
    "main2": lambda r, w, d: {n: _run_scenario(r, w, n, d) for n in SCENARIOS[2]}
    | {"weights": _run_weights(r, w, d), "bad": _run_bad_inputs(r, w, d), "ddp": _run_data_parallel(r, w, d),
       "autocast": _run_autocast(r, w, d)},
    "main4": lambda r, w, d: {n: _run_scenario(r, w, n, d) for n in SCENARIOS[4]},
    "stall": lambda r, w, d: _run_stall(r, w, d),
    "die": lambda r, w, d: _run_die(r, w, d),
    "oom": lambda r, w, d: _run_oom(r, w, d),
}


def _entry(rank: int, world: int, port: int, suite: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    result: dict
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=60))
        result = {"ok": SUITES[suite](rank, world, out)}
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = {"crash": traceback.format_exc()}
    torch.save(result, out / f"rank{rank}.pt")
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - peers may be gone already
        pass


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------


class Launch:
    """``world`` spawned processes running one suite; ``results()`` waits (bounded) and kills leftovers."""

    def __init__(self, world: int, suite: str, out_dir: Path):
        self.world, self.suite, self.out_dir = world, suite, out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx = rank_context()
        port = free_port()
        self.procs = [ctx.Process(target=_entry, args=(r, world, port, suite, str(out_dir)), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def results(self, deadline_s: float = DEADLINE_S) -> list[dict]:
        return join_ranks(self.procs, self.out_dir, time.monotonic() + deadline_s, f"suite {self.suite}")


def _ok(results: list[dict]) -> list[dict]:
    failed = [f"rank {r} failed:\n{res.get('crash', res)}" for r, res in enumerate(results) if "ok" not in res]
    assert not failed, "\n".join(failed)
    return [res["ok"] for res in results]


def _shared_suites(tmp_path_factory, suites: dict[str, int]) -> dict[str, list[dict]]:
    """Run suites concurrently, once per test session even under pytest-xdist (results shared on disk)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the session's directory
    key = "-".join(suites)
    with FileLock(str(root / f"ep-{key}.lock")):
        done = root / f"ep-{key}.pt"
        if not done.exists():
            launches = {name: Launch(world, name, root / f"ep-{name}") for name, world in suites.items()}
            torch.save({name: launch.results() for name, launch in launches.items()}, done)
        return torch.load(done, weights_only=False)


@pytest.fixture(scope="module")
def main2(tmp_path_factory):
    return _ok(_shared_suites(tmp_path_factory, {"main2": 2})["main2"])


@pytest.fixture(scope="module")
def main4(tmp_path_factory):
    return _ok(_shared_suites(tmp_path_factory, {"main4": 4})["main4"])


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """A stalled rank, a dead rank and one out of memory, in groups of two processes running side by side."""
    return _shared_suites(tmp_path_factory, {"stall": 2, "die": 2, "oom": 2})


def _reference(world: int, name: str) -> dict:
    """The single-process layer with the same weights on every rank's tokens; loss summed over ranks."""
    spec, plan, state, xs, gs, _ = _setup(world, name)
    tids = _token_ids(world, name)
    layer = moegraph.compile(spec, seed=0)
    layer.load_state_dict(state)
    xr = [_grad_input(x) for x in xs]
    ys = []
    for x, tid in zip(xr, tids):
        if (x[0] if isinstance(x, tuple) else x).numel():
            ys.append(_forward(layer, x, tid))
        else:  # the single-process op cannot backpropagate through zero tokens; nothing to learn there
            with torch.no_grad():
                ys.append(_forward(layer, x, tid))
    sum((y * g).sum() for y, g in zip(ys, gs) if y.requires_grad).backward()
    if layer.EXPERT_BIAS_RATE is not None:
        layer.update_expert_bias()  # the loads of every rank's tokens
    layer.eval()
    with torch.no_grad():
        y_eval = [_forward(layer, x, tid) for x, tid in zip(xs, tids)]
    return {"y": [y.detach() for y in ys], "y_eval": y_eval, "x_grad": [_grad_of(x) for x in xr],
            "grads": {n: p.grad for n, p in layer.named_parameters()}, "plan": plan,
            "expert_bias": getattr(layer.router, "expert_bias", None)}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()), msg=what)


def _check_against_reference(results: list[dict], world: int, name: str) -> None:
    ref = _reference(world, name)
    for r, all_res in enumerate(results):
        res = all_res[name]
        _close(res["y"], ref["y"][r], f"{name} rank {r} output")
        _close(res["y_eval"], ref["y_eval"][r], f"{name} rank {r} eval output")
        for s_name, y in res["y_eval_by"].items():
            _close(y, ref["y_eval"][r], f"{name} rank {r} eval output with strategy {s_name}")
        _close(res["x_grad"], ref["x_grad"][r], f"{name} rank {r} input gradient")
        if ref["expert_bias"] is not None:
            _close(res["expert_bias"], ref["expert_bias"], f"{name} rank {r} expert bias after update_expert_bias")
        idx = torch.tensor(res["slot_experts"])
        for n, g in res["grads"].items():
            want = ref["grads"][n][idx] if n.startswith("experts.") else ref["grads"][n]
            _close(g, want, f"{name} rank {r} gradient of {n}")


@pytest.mark.parametrize("name", list(SCENARIOS[2]))
def test_world2_matches_single_process(main2, name):
    _check_against_reference(main2, 2, name)


@pytest.mark.parametrize("name", list(SCENARIOS[4]))
def test_world4_matches_single_process(main4, name):
    _check_against_reference(main4, 4, name)


def test_world2_trains_under_autocast_as_the_single_process_layer(main2):
    """Mixed precision across ranks: under torch.autocast(bfloat16) the float32 expert-parallel layer computes in
    bfloat16 as the one-process layer does there (outputs within bfloat16 rounding: the ranks sum in another
    order), and its float32 weights get the same gradients (after sync_grads)."""
    spec, plan, state, xs, gs, _ = _setup(2, "replicas")
    ref = moegraph.compile(spec, seed=None).train()
    ref.load_state_dict(state)
    xr = [_grad_input(x) for x in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = [ref(x) for x in xr]
    sum((y.float() * g).sum() for y, g in zip(ys, gs)).backward()

    def near(a, b, what):
        assert a.shape == b.shape, what
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()),
                                   msg=what)

    for r, all_res in enumerate(main2):
        res = all_res["autocast"]
        assert res["y"].dtype == ys[r].dtype == torch.bfloat16
        near(res["y"], ys[r].detach(), f"rank {r} output")
        near(res["x_grad"], _grad_of(xr[r]), f"rank {r} input gradient")
        idx = torch.tensor(res["slot_experts"])
        for n, (dtype, g) in res["grads"].items():
            want = dict(ref.named_parameters())[n].grad
            assert dtype == torch.float32 and g.dtype == torch.float32, n
            near(g, want[idx] if n.startswith("experts.") else want, f"rank {r} gradient of {n}")


@pytest.mark.parametrize("world,name", [(2, "replicas"), (2, "hash"), (2, "expert_space"), (4, "two_hosts"), (4, "one_host")])
def test_decoding_copies_match_the_plans_prediction(main2, main4, world, name):
    """One token per rank per forward: the rule applied to the recorded trace (its tokens in forward
    order) predicts what the runtime sent, because the inference round-robin count runs on across forwards."""
    from moegraph.distributed import predicted_copies

    results = main2 if world == 2 else main4
    _, plan, _, _, _, layer_index = _setup(world, name)
    ids = [res[name]["decode"]["ids"] for res in results]
    measured = np.stack([np.asarray(res[name]["decode"]["rows"]) for res in results])
    np.testing.assert_array_equal(measured, predicted_copies(plan, layer_index, ids), err_msg=name)


def test_decoding_spreads_tied_replicas():
    """Expert 8 has two replicas on the other host of GPUs 0 and 1 (slots 10 and 19): successive
    one-token forwards take them in turn instead of always the first."""
    from moegraph.planner.dispatch import choose_replicas

    _, plan, *_ = _setup(4, "two_hosts")
    ids = torch.tensor([[8, 0, 1, 2]] * 4)  # four one-token forwards on GPU 0, all choosing expert 8
    slots = choose_replicas(plan, 0, ids, torch.zeros(4, dtype=torch.long))[:, 0]
    assert slots.tolist() == [10, 19, 10, 19]


def test_uneven_cases_are_what_they_claim(main2, main4):
    # one_expert: rank 1 received no token rows; only expert 2 computed anything.
    r1 = main2[1]["one_expert"]
    assert int(main2[0]["one_expert"]["rows"]["dispatch"][1]) == 0
    assert (main2[0]["one_expert"]["ids"] == 2).all() and (r1["ids"] == 2).all()
    assert int(r1["rows"]["dispatch"][0]) == r1["ids"].shape[0]  # every token of rank 1 went to rank 0
    # empty_rank: rank 1 had no tokens and still took part in every collective.
    assert main2[1]["empty_rank"]["y"].numel() == 0
    # router_state: tokens route apart through the network, and some choose the skip (the zero expert, id 8).
    ids = torch.cat([res["router_state"]["ids"].reshape(-1) for res in main2])
    assert (ids == 8).any() and len(set(ids.tolist()) - {8}) >= 4
    # With four ranks, rank 2 has no tokens and expert 6 (GPU 3) takes everything.
    assert all((res["one_expert4"]["ids"] == 6).all() for res in main4)


def _measured(results: list[dict], name: str, kind: str) -> np.ndarray:
    return np.stack([np.asarray(res[name]["rows"][kind]) for res in results])


@pytest.mark.parametrize("world,name", [(2, "replicas"), (2, "contiguous"), (2, "one_expert"), (2, "hash"), (2, "identity"),
                                        (2, "input_scaled"), (2, "hash_table"), (2, "transforms"),
                                        (2, "expert_space"), (2, "router_net"), (2, "ergo"), (4, "two_hosts"),
                                        (4, "two_hosts_contiguous"), (4, "one_host"), (4, "one_expert4"),
                                        (4, "ergo_two_hosts")])
def test_bytes_sent_match_the_plans_prediction(main2, main4, world, name):
    """Not here: layers with a capacity (the trace records the router's choices, the runtime sends the
    kept ones). The experts' own space sends M-wide rows, one per assignment (each expert's output is
    normalised before its weight), and the byte model counts them so."""
    from moegraph.distributed import predicted_copies

    results = main2 if world == 2 else main4
    spec, plan, _, _, _, layer_index = _setup(world, name)
    predicted = predicted_copies(plan, layer_index, [res[name]["ids"] for res in results])
    dispatch = _measured(results, name, "dispatch")
    np.testing.assert_array_equal(dispatch, predicted, err_msg=f"{name}: token copies per (src, dst)")
    np.testing.assert_array_equal(_measured(results, name, "combine"), predicted.T,
                                  err_msg=f"{name}: the combine must send the same copies back")
    assert predicted.sum() > 0 or name == "one_expert4"
    # Bytes are those copies times the row size (float32 rows as wide as the experts' input).
    width = spec.moe.expert_projection.size if spec.moe.expert_projection else spec.moe.hidden_size
    for r, res in enumerate(results):
        np.testing.assert_array_equal(res[name]["bytes"]["dispatch"], dispatch[r] * width * 4)


def test_two_host_plan_forwards_inside_the_host(main4):
    # Host 0 = GPUs {0, 1}: GPU 0 never sends straight to GPU 3 (it lands on GPU 2, rail-aligned).
    dispatch = _measured(main4, "two_hosts", "dispatch")
    assert dispatch[0, 3] == 0 and dispatch[1, 2] == 0 and dispatch[2, 1] == 0 and dispatch[3, 0] == 0
    assert dispatch[0, 2] > 0 and dispatch[2, 3] + dispatch[3, 2] > 0


def test_identity_expert_layers_refuse_a_trace_on_every_rank(main2):
    for res in main2:
        kind, msg = res["identity"]["trace"]["refused"]
        assert kind == "TraceError" and "identity or zero experts" in msg and "gather_trace (layer 0)" in msg, msg


def test_gathered_trace_is_every_ranks_routing(main2, main4):
    for results in (main2, main4):
        name = next(iter(results[0]))
        trace = results[0][name]["trace"]
        ids = [res[name]["ids"] for res in results]
        np.testing.assert_array_equal(trace["topk"][0], torch.cat(ids).numpy())
        np.testing.assert_array_equal(trace["src_rank"], np.repeat(np.arange(len(ids)), [len(i) for i in ids]))
        assert trace["num_ranks"] == len(results)
        # Sequences of different ranks never share a sample id.
        owners = {}
        for s, r in zip(trace["sample_ids"].tolist(), trace["src_rank"].tolist()):
            assert owners.setdefault(s, r) == r
        for res in results[1:]:  # every rank got the same trace
            np.testing.assert_array_equal(res[name]["trace"]["topk"], trace["topk"])


def test_weights_load_into_any_placement(main2):
    spec = _spec("dsv3", 1, 2)
    E = spec.moe.experts.num_experts
    for r, res in enumerate(main2):
        w = res["weights"]
        assert w["seed_diff"] == 0.0, "seed init must equal the single-process init on the rank's slots"
        assert w["loaded_diff"] == 0.0 and w["local_roundtrip_diff"] == 0.0 and w["safetensors_diff"] == 0.0
        assert "experts.slots.gate_up_proj" in w["local_keys"] and "experts.slots.logical_ids" in w["local_keys"]
        assert "experts.gate_up_proj" not in w["local_keys"]
        assert w["full_keys_match"] and w["full_diff"] == 0.0
        kind, msg, took = w["missing"]
        assert kind == "MissingExpertWeights", msg
        assert f"expert(s) [{w['missing_expert']}]" in msg and f"rank {r}" in msg and took < 2.0
        mine = w["missing_expert"]
        assert w["loose_missing"] == [f"experts.{mine}.down_proj", f"experts.{mine}.gate_up_proj"]
        assert w["loose_changed"] == w["loose_want"] and not all(w["loose_want"])  # the others loaded, it kept its own
        kind, msg, _ = w["nested"]
        assert kind == "RuntimeError" and f'"moe.experts.{mine}.gate_up_proj"' in msg, msg
        assert w["nested_warned"] and f"expert(s) [{mine}]" in w["nested_warned"][0]
        kind, msg, _ = w["short"]
        assert kind == "MissingExpertWeights" and f"{E} rows" in msg


def test_bad_plans_fail_before_any_communication(main2):
    bad = main2[0]["bad"]
    for key, kind, words in [("hash", "PlanFileError", "re-plan"), ("hash_file", "PlanFileError", "hash"),
                             ("world", "DistributedError", "but the process group has 2 ranks; launch 4 processes"),
                             ("layer", "DistributedError", "layer_index 7")]:
        got, msg, took = bad[key]
        assert got == kind and words in msg, (key, got, msg)
        assert took < 3.0, f"{key}: took {took:.1f}s; a collective must not have started"


def test_plain_data_parallel_counts_each_ranks_loads_and_sums_the_balance_loss(main2):
    """Under DDP the aux-loss-free step uses the true global loads (summed over the ranks and both accumulated
    micro-batches; every rank takes the same step), and the summed balance loss with a rank of no tokens is
    rank 0's own loss (its tokens are all there are) while the step's next collective still pairs up."""
    ddp = [res["ddp"] for res in main2]
    for res in ddp:
        torch.testing.assert_close(res["used_loads"], res["true_loads"], rtol=0, atol=0)
        assert float(res["true_loads"].sum()) == 2 * (16 + 24) * 4  # 2 micro-batches x tokens x top-4, both ranks
        assert res["after"] == 3.0
    rate = moegraph.load_spec("deepseek-v3-tiny").moe.router.expert_bias.update_rate
    loads = ddp[0]["true_loads"]
    torch.testing.assert_close(ddp[0]["bias"], rate * torch.sign(loads.mean() - loads))
    torch.testing.assert_close(ddp[1]["bias"], ddp[0]["bias"], rtol=0, atol=0)
    spec = {"name": "gb", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
            "router": {"top_k": 2, "aux_losses": [{"kind": "global_balance", "coef": 0.1}]}}}
    alone = moegraph.compile(spec, seed=0).train()  # no process group: this process's tokens only
    _, aux = alone(torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3)), return_aux=True)
    assert ddp[0]["global_balance"] == pytest.approx(float(aux["global_balance"].detach()), rel=1e-6)
    assert ddp[1]["global_balance"] == 0.0


def test_a_stalled_rank_makes_the_others_fail_within_the_timeout(failures):
    ok = _ok(failures["stall"])
    kind, msg, took = ok[0]["error"]
    assert kind == "DistributedError", msg
    assert "rank 0 of 2" in msg and "timeout (2s)" in msg and took < 5.0, (msg, took)
    # The stalled rank, once awake, finds its peer gone and fails too, instead of hanging.
    assert ok[1]["error"][0] == "DistributedError", ok[1]["error"]
    # Then neither starts another collective on the group (a late peer's next one would pair with the wrong one):
    # refused at once, naming the first failure and the way out.
    for r in (0, 1):
        kind, msg, took = ok[r]["next"]
        assert kind == "DistributedError" and took < 1.0, (msg, took)
        assert f"rank {r} of 2" in msg and "not started: an earlier collective on this process group failed" in msg
        assert "destroy_process_group" in msg, msg
    assert "on rank 0 after" in ok[0]["next"][1] and "timeout" in ok[0]["next"][1], ok[0]["next"][1]


def test_a_rank_failing_mid_forward_retries_nothing_on_the_group(failures):
    """A local error between the dispatch and the combine (out of memory, say) leaves the peer waiting in the
    combine: a forward retried on that rank would send its count exchange into the peer's combine. It is refused."""
    ok = _ok(failures["oom"])
    kind, msg, _ = ok[1]["error"]
    assert kind == "MemoryError" and "simulated" in msg, msg
    kind, msg, took = ok[1]["next"]
    assert kind == "DistributedError" and took < 1.0, (msg, took)
    assert "not started: an earlier collective on this process group failed (rank 1 left a forward midway " \
           "(MemoryError))" in msg, msg
    kind, msg, took = ok[0]["error"]
    assert kind == "DistributedError" and "rank 0 of 2" in msg and "combine" in msg and took < 5.0, (msg, took)
    assert ok[0]["next"][0] == "DistributedError" and "not started" in ok[0]["next"][1], ok[0]["next"]


def test_a_dead_rank_makes_the_others_fail(failures):
    res = failures["die"]
    assert res[1] == {"exitcode": 17}
    kind, msg, took = _ok(res[:1])[0]["error"]
    assert kind == "DistributedError", msg
    assert "rank 0 of 2" in msg and took < 30.0


# ------------------------------------------------------------------------------------------------
# In-process checks (no process group needed)
# ------------------------------------------------------------------------------------------------


def test_replica_choice_is_the_planners_rule():
    from moegraph.distributed.dispatch import choose_slots
    from moegraph.planner.dispatch import choose_replicas

    spec = _spec("dsv3", 2, 2)
    plan = _plan(spec, "replicas4")
    cand, n = plan.replica_table(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (37, 4), generator=g)
    for src in range(4):
        want = choose_replicas(plan, 0, ids, torch.full((37,), src))
        tok = torch.arange(37).repeat_interleave(4)
        got = choose_slots(torch.as_tensor(cand), torch.as_tensor(np.maximum(n, 1)), src, tok, ids.reshape(-1))
        assert torch.equal(got.view(37, 4), torch.as_tensor(want))


def test_create_without_a_process_group_says_so():
    from moegraph.codegen import layer_class
    from moegraph.distributed import ExpertParallelMoE

    spec = _spec("dsv3", 1, 2)
    cls, _ = layer_class(spec, "torch", None)
    with pytest.raises(DistributedError, match="init_process_group"):
        ExpertParallelMoE.create(cls, spec, _plan(spec, "contiguous"))
    with pytest.raises(PlanFileError, match="differ in placement.seed: 0 in the given spec, 3 in the plan; re-plan"):
        ExpertParallelMoE.create(cls, spec, _plan(_spec("dsv3", 1, 2, seed=3), "contiguous"))
