"""Runtime pieces shared by every generated MoE layer.

The generated module (see ``codegen_templates/moe_layer.py.j2``) subclasses ``CompiledMoEBase``,
which owns the parameters, checks inputs, records routing, updates the expert bias, and runs the
FX-optimised graph of the generated ``core`` method (one graph for training, one for eval).

The graphs are built lazily per mode (they depend on it) by the layer's ``GraphPipeline``: an
object the compiler stage attaches (``moegraph.fx_passes.Pipeline``: trace, then run the passes).
The runtime only knows the interface below, so it never imports the FX stage above it.

Auxiliary losses (returned with ``return_aux=True`` and kept in ``layer.aux_losses`` in training).
With T tokens, K experts per token, E experts, s_{t,e} the router score, P_e = mean_t p_{t,e} where
p is the softmax probability (for non-softmax scores, s normalised over experts per token), and
count_e the number of (token, choice) pairs routed to e over all K choices:

- ``expert_balance`` (Switch, GShard, DeepSeek-V2 eq. 12): coef * sum_e f_e P_e, f_e = E/(K T) count_e.
  f counts all K choices (GShard counts only the first; Megatron multiplies by K instead of dividing
  f: these differ by a factor K, ours equals 1.0 at perfect balance).
- ``sequence_balance`` (DeepSeek-V3 eq. 17-20): the same per sequence (rows of a [B, S, D] input),
  averaged over sequences.
- ``global_balance``: expert_balance with count_e summed over the data-parallel group (all-reduce)
  when torch.distributed is initialised; equal to expert_balance in one process.
- ``device_balance`` (DeepSeek-V2 eq. 14-15): experts in ND contiguous device groups (ND = GPUs of
  the topology); coef * sum_d f'_d P'_d with f'_d = mean of f over the group, P'_d = sum of P.
- ``comm_balance`` (DeepSeek-V2 eq. 16-17): coef * sum_d f''_d P'_d with
  f''_d = ND/(M T) * #tokens sending to device d, M = devices a token may reach (groups kept, or K).
- ``z_loss`` (ST-MoE): coef * mean_t logsumexp(logits_t)^2.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Protocol

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import fp8, native, ops  # noqa: F401  (fp8, ops: register torch.ops.moegraph)
from . import semantics
from .semantics import routing as _routing
from .semantics import torch_forms as _torch_forms
from .errors import InputError



class GraphPipeline(Protocol):
    """What a layer needs to get its graph for a mode: ``build(layer, training) -> (graph, report)``.

    The report is kept in ``layer.pass_report[mode]`` (``moegraph.fx_passes.PassReport``).
    """

    def build(self, layer: nn.Module, training: bool) -> tuple[torch.fx.GraphModule, Any]: ...


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec dtype name (the table: ``moegraph.semantics.dtypes``)."""
    return semantics.torch_dtype(name)


# ----------------------------------------------------------------------------------------------
# Routing helpers called from generated code. Those whose shapes depend on the token count are
# FX leaves (torch.fx.wrap): the traced graph shows them as one call.
# ----------------------------------------------------------------------------------------------


@torch.fx.wrap
def apply_capacity(ids_TK: Tensor, weights_TK: Tensor, num_experts: int, factor: float | None, min_capacity: int,
                   policy: str, tokens: int | None = None, sequences: int = 1) -> Tensor:
    """Drop assignments beyond each expert's capacity; dropped ids become ``num_experts``.

    Capacity = max(min_capacity, ceil(factor * T * K / E)), or ``tokens``. Which assignments an expert keeps
    (``policy``, the spec's ``drop_policy``): ``"probs"`` its highest-weight ones; ``"position"`` its earliest
    tokens, whichever choice of theirs it is (Megatron's policy); ``"choice_then_position"`` every token's first
    choice before any second choice, each in token order (GShard's, as DeepSpeed and fairseq implement it).
    ``sequences``: the T tokens are that many sequences of T / sequences, each with its own capacity (T the
    sequence length in the formula).
    """
    T, K = ids_TK.shape
    if T == 0:
        return ids_TK
    cap = tokens if tokens is not None else max(min_capacity, math.ceil(factor * (T // sequences) * K / num_experts))
    ids_N = ids_TK.reshape(-1)
    N = ids_N.numel()
    if sequences > 1:  # one count per (sequence, expert): rank by that pair, then map back to expert ids
        seq_N = torch.arange(N, device=ids_N.device) // ((T // sequences) * K)
        kept = _capacity_rank(ids_N + seq_N * (num_experts + 1), weights_TK, (num_experts + 1) * sequences,
                              policy) < cap
        return torch.where(kept & (ids_N < num_experts), ids_N, torch.full_like(ids_N, num_experts)).view(T, K)
    return torch.where(_capacity_rank(ids_N, weights_TK, num_experts + 1, policy) < cap, ids_N,
                       torch.full_like(ids_N, num_experts)).view(T, K)


def _capacity_rank(ids_N: Tensor, weights_TK: Tensor, buckets: int, policy: str) -> Tensor:
    """[N] rank of each assignment among those of its bucket (expert), in the order of the drop ``policy``."""
    N = ids_N.numel()
    if policy == "probs":
        pre = torch.argsort(-weights_TK.reshape(-1).float(), stable=True)
    elif policy == "position":
        pre = torch.arange(N, device=ids_N.device)
    elif policy == "choice_then_position":  # (token, choice) pairs are token-major: visit them choice-major
        pre = torch.arange(N, device=ids_N.device).view(weights_TK.shape).t().reshape(-1)
    else:
        raise ValueError(f"unknown drop policy {policy!r}")
    sorted_ids, order = torch.sort(ids_N[pre], stable=True)
    order = pre[order]
    counts = torch.zeros(buckets, dtype=torch.long, device=ids_N.device)
    counts.scatter_add_(0, sorted_ids, torch.ones_like(sorted_ids))
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(N, device=ids_N.device) - starts[sorted_ids]
    return torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)


@torch.fx.wrap
def expert_choice_route(scores_TE: Tensor, capacity_factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each expert takes its top-C tokens by score, C = min(T, ceil(factor * T / E)).

    Returns assignments (tok_N, exp_N, weight_N) with N = E * C, expert-major.
    """
    T, E = scores_TE.shape
    C = min(T, math.ceil(capacity_factor * T / E))
    w_EC, tok_EC = torch.topk(scores_TE.t(), C, dim=1)
    exp_EC = torch.arange(E, device=scores_TE.device).unsqueeze(1).expand(E, C)
    return tok_EC.reshape(-1), exp_EC.reshape(-1), w_EC.reshape(-1)


@torch.fx.wrap
def sparsemixer_route(logits_TE: Tensor, top_k: int, jitter_eps: float) -> tuple[Tensor, Tensor]:
    """Phi-MoE's sparsemixer at inference (``semantics.routing.sparsemixer_route``), one call in the graph."""
    return _routing.sparsemixer_route(logits_TE, top_k, jitter_eps)


#: the router input of ``moe.router.input_norm`` (traced through: plain torch ops)
router_input = _routing.router_input
#: the norms of the experts' space (``moe.expert_projection.input_norm``, ``moe.experts.output_norm``; traced through)
rms_norm = _torch_forms.rms_norm


@torch.fx.wrap
def per_expert_norm(ye_NM: Tensor, exp_N: Tensor, weight_EM: Tensor, eps: float, offset: float,
                    before: bool) -> Tensor:
    """``experts.output_norm`` with ``per_expert``: each assignment's expert output (one row per assignment)
    normalised with its own expert's weight, row ``exp_N`` of ``weight_EM``. One call in the graph, so that
    the expert-parallel pass can move it beside the expert op, onto the rank that holds those weights
    (``distributed.layer.ExpertParallelPass``). A dropped assignment's id (``num_experts``, past the last
    row) reads the last row: its expert output is zero, and so is its norm, whatever the weight."""
    return rms_norm(ye_NM, eps, weight_EM[exp_N.clamp(0, weight_EM.shape[0] - 1)], offset, before)


@torch.fx.wrap
def route_select(scores_TE: Tensor, expert_bias_E: Tensor | None, top_k: int, num_groups: int, topk_groups: int,
                 group_score: str, top_n: int) -> tuple[Tensor, Tensor]:
    """The router's expert choice in one call: ids_TK [T, K] (best first) and the chosen experts' scores
    (``semantics.routing.select_experts``, what ``fx_passes.FuseRouterSelect`` puts here in eval graphs).

    At decode sizes the dozen torch steps of the choice (expert bias, group scores, the kept groups'
    mask, top-k, gather) cost more in dispatch than in arithmetic: on CPU float32 scores the native
    kernel (``native.route_select``) makes the choice in one call. It computes only comparisons and
    the same single additions, and declines any call where a token's choice hinges on equal values
    (torch's order among them decides); then, and on other devices and dtypes, without a C compiler,
    where the scores need a gradient and under ``torch.compile``, the torch steps run. Either way the
    result is the torch steps' result, bit for bit. A plain function rather than a custom op: the
    dispatcher's cost per call is what this saves.
    """
    if not (scores_TE.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling():
        got = native.route_select(scores_TE, expert_bias_E, top_k, num_groups, topk_groups, group_score, top_n)
        if got is not None:
            return got
    policy = _routing.TopKPolicy(top_k, num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
                                 top_n=top_n)
    return _routing.select_experts(scores_TE, policy, expert_bias_E)


@torch.fx.wrap
def token_index(T_like: Tensor, K: int) -> Tensor:
    """[T*K] token index of each (token, choice) pair of a [T, K] routing.

    Decode-sized indices come from a small cache (two op launches cost more than the rest of a
    one-token router step); callers only read them."""
    T = T_like.shape[0]
    if not torch.compiler.is_compiling() and T * K <= _TOKEN_INDEX_CACHED:  # (compiling: no guard on T)
        return _token_index(T, K, T_like.device)
    return torch.arange(T, device=T_like.device).repeat_interleave(K)


#: token_index results of at most this many entries are cached (per size and device)
_TOKEN_INDEX_CACHED = 256


@functools.lru_cache(maxsize=256)
def _token_index(T: int, K: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a plain tensor: usable in and outside inference mode
        return torch.arange(T, device=device).repeat_interleave(K)


@torch.fx.wrap
def every_expert(T_like: Tensor, S: int) -> Tensor:
    """[T*S] expert index 0..S-1 for each token in turn: every token on each of S experts (with ``token_index``)."""
    return torch.arange(S, device=T_like.device).repeat(T_like.shape[0])


@torch.fx.wrap
def shared_mlp(x_TD: Tensor, w_up_HD: Tensor, w_down_DS: Tensor, b_up_H: Tensor | None, b_down_D: Tensor | None,
               scale_T: Tensor | None, activation: str, gated: bool, gate_clamp: float | None,
               up_clamp: float | None) -> Tensor:
    """The shared experts (one MLP of the summed hidden size), optionally scaled per token."""
    h = F.linear(x_TD, w_up_HD, b_up_H)
    a = ops.apply_activation(h, activation, gated, gate_clamp, up_clamp)
    if scale_T is not None:
        out = F.linear(a, w_down_DS) * scale_T.to(a.dtype).unsqueeze(-1)
        return out if b_down_D is None else out + b_down_D * scale_T.to(a.dtype).unsqueeze(-1)
    return F.linear(a, w_down_DS, b_down_D)


# ----------------------------------------------------------------------------------------------
# Auxiliary losses (formulas in the module docstring)
# ----------------------------------------------------------------------------------------------


def _wide(t: Tensor) -> Tensor:
    """t in float32 at least (the auxiliary losses' precision; a float64 layer keeps float64, for gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def _probs(logits_TE: Tensor, scores_TE: Tensor, softmax: bool) -> Tensor:
    if softmax:
        return torch.softmax(_wide(logits_TE), dim=-1)
    s = _wide(scores_TE)
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def _random_hash_table(vocab: int, E: int, K: int, g: torch.Generator) -> Tensor:
    """[vocab, K] expert ids, each row K distinct experts drawn uniformly (without replacement: a token's K hash
    functions name K experts, not one twice). Column k draws among the E - k experts not yet taken, counted up
    past the taken ones in increasing order. The first column is ``torch.randint``'s, so a top-1 table is as
    before."""
    table = torch.empty(vocab, K, dtype=torch.int64)
    table[:, 0] = torch.randint(0, E, (vocab,), generator=g)
    for k in range(1, K):
        pick = torch.randint(0, E - k, (vocab,), generator=g)
        for taken in torch.sort(table[:, :k], dim=1).values.unbind(1):
            pick += pick >= taken
        table[:, k] = pick
    return table


#: the dtypes autocast casts between (it leaves float64 alone)
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _counts(ids_TK: Tensor, E: int) -> Tensor:
    flat = ids_TK.reshape(-1)
    c = torch.zeros(E + 1, dtype=torch.float32, device=flat.device)
    c.scatter_add_(0, flat.clamp(0, E), torch.ones_like(flat, dtype=torch.float32))
    return c[:E]


@torch.fx.wrap
def expert_balance_loss(logits_TE: Tensor, scores_TE: Tensor, ids_TK: Tensor, softmax: bool,
                        global_batch: bool = False) -> Tensor:
    T, E = logits_TE.shape
    K = ids_TK.shape[-1]
    summed = global_batch and torch.distributed.is_available() and torch.distributed.is_initialized()
    if T == 0 and not summed:
        return logits_TE.new_zeros(())
    counts = _counts(ids_TK, E)
    n_tok = torch.tensor(float(T), device=counts.device)
    if summed:  # on every rank, one with no tokens too: its peers' all-reduces wait for its part
        counts = counts.clone()
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(n_tok)
    if T == 0:
        return logits_TE.new_zeros(())
    P = _probs(logits_TE, scores_TE, softmax).mean(0)
    f = counts * (E / (K * n_tok))
    return (f * P).sum()


@torch.fx.wrap
def sequence_balance_loss(logits_BSE: Tensor, scores_BSE: Tensor, ids_BSK: Tensor, softmax: bool) -> Tensor:
    B, S, E = logits_BSE.shape
    K = ids_BSK.shape[-1]
    if B * S == 0:
        return logits_BSE.new_zeros(())
    P = _probs(logits_BSE, scores_BSE, softmax).mean(1)  # [B, E]
    flat = ids_BSK.reshape(B, -1).clamp(0, E)
    c = torch.zeros(B, E + 1, dtype=torch.float32, device=flat.device)
    c.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    f = c[:, :E] * (E / (K * S))
    return (f * P).sum(-1).mean()


@torch.fx.wrap
def device_balance_loss(logits_TE: Tensor, scores_TE: Tensor, ids_TK: Tensor, softmax: bool, devices: int) -> Tensor:
    T, E = logits_TE.shape
    K = ids_TK.shape[-1]
    if T == 0:
        return logits_TE.new_zeros(())
    P = _probs(logits_TE, scores_TE, softmax).mean(0).view(devices, -1).sum(-1)
    f = (_counts(ids_TK, E) * (E / (K * T))).view(devices, -1).mean(-1)
    return (f * P).sum()


@torch.fx.wrap
def comm_balance_loss(logits_TE: Tensor, scores_TE: Tensor, ids_TK: Tensor, softmax: bool, devices: int,
                      reach: int) -> Tensor:
    T, E = logits_TE.shape
    if T == 0:
        return logits_TE.new_zeros(())
    P = _probs(logits_TE, scores_TE, softmax).mean(0).view(devices, -1).sum(-1)
    dev_TK = ids_TK.clamp(0, E - 1) // (E // devices)
    hit_TD = torch.zeros(T, devices, device=ids_TK.device).scatter_(1, dev_TK, 1.0)
    f = hit_TD.sum(0) * (devices / (reach * T))
    return (f * P).sum()


@torch.fx.wrap
def z_loss(logits_TE: Tensor) -> Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(_wide(logits_TE), dim=-1).square().mean()


# ----------------------------------------------------------------------------------------------
# The base class of generated layers
# ----------------------------------------------------------------------------------------------


class RoutingRecorder:
    """Collects the top-k expert ids a layer routed, for the placement planner (opt-in, cheap)."""

    def __init__(self) -> None:
        self.topk_ids: list[Tensor] = []
        self.sample_ids: list[Tensor] = []
        self._next_sample = 0

    def add(self, ids_BSK: Tensor) -> None:
        B, S, K = ids_BSK.shape
        self.topk_ids.append(ids_BSK.detach().reshape(-1, K).to("cpu", torch.int32))
        samples = torch.arange(self._next_sample, self._next_sample + B, dtype=torch.int64).repeat_interleave(S)
        self.sample_ids.append(samples)
        self._next_sample += B

    def ids(self) -> Tensor:
        return torch.cat(self.topk_ids) if self.topk_ids else torch.empty(0, 0, dtype=torch.int32)

    def samples(self) -> Tensor:
        return torch.cat(self.sample_ids) if self.sample_ids else torch.empty(0, dtype=torch.int64)

    def counts(self, num_experts: int) -> Tensor:
        ids = self.ids().reshape(-1).long()
        return torch.bincount(ids[(ids >= 0) & (ids < num_experts)], minlength=num_experts)

    def clear(self) -> None:
        self.__init__()


def check_recorded_ids(ids: Tensor, num_experts: int, name: str) -> None:
    """Refuse recorded choices past the experts (identity / zero experts, ids >= E) before they reach a trace.

    Such choices have no weights to place, and a routing trace holds K placed experts per token, so
    a trace of these layers would misstate every load; refused by name rather than guessed.
    """
    from .errors import TraceError

    if ids.numel() and int(ids.max()) >= num_experts:
        raise TraceError(f"{name}: tokens chose identity or zero experts (router ids >= {num_experts}), which hold "
                         "no weights to place; routing traces (and re-planning) of layers with "
                         "moe.experts.identity_experts / zero_experts are not supported yet: record a layer "
                         "without them")


def trace_from_layers(layers, *, name: str = "recorded", num_experts: int | None = None):
    """One TraceSet (the planner's input) from the recorders of a model's MoE layers, in order.

    Every layer must have recorded the same tokens (a model's forward passes them through all
    layers). Recording is opt-in: ``layer.start_recording()`` before the forwards.
    """
    from .errors import TraceError
    from .traces import TraceSet

    recs = [getattr(layer, "recorder", None) for layer in layers]
    if not recs or any(r is None for r in recs):
        raise TraceError(f"{name}: every layer must be recording; call layer.start_recording() first")
    ids = [r.ids() for r in recs]
    if len({tuple(i.shape) for i in ids}) != 1:
        raise TraceError(f"{name}: layers recorded different token counts {[tuple(i.shape) for i in ids]}; "
                         "record the same forwards on every layer")
    e = num_experts if num_experts is not None else getattr(layers[0], "NUM_EXPERTS", None)
    if e is not None:
        for i in ids:
            check_recorded_ids(i, e, name)
    return TraceSet.from_topk([i.numpy() for i in ids], sample_ids=recs[0].samples().numpy(), num_experts=e,
                              source=name, name=name)


#: the layer's tensors that stay float32 when it is cast (``.to(torch.bfloat16)``, ``.half()``): the aux-loss-free
#: balancing state, whose updates are smaller than a bfloat16 step (its load counter, not in the state dict, too)
KEPT_FLOAT32 = ("router.expert_bias",)
#: the layer's norm weights (``spec.ExpertNorm``, ``moe.output_norm``): applied in float32 whatever their dtype
#: (``semantics.torch_forms.rms_norm``), so a swap keeps one a block holds in a wider dtype (``hf.load_hf_weights``)
NORM_WEIGHTS = frozenset({"pre_expert_norm.weight", "expert_output_norm.weight", "experts.output_norm_weight",
                          "shared_expert_norm.weight", "output_norm.weight"})
#: parameters that are scales and start at one in ``reset_parameters`` (the rest: uniform or zero biases)
ONES_AT_INIT = ("output_norm.weight", "router.input_norm.weight", "router.logit_scale", "router.per_expert_scale",
                "router.weight_scale")


def init_value(layer: CompiledMoEBase, name: str) -> float | None:
    """The constant a parameter starts at in ``reset_parameters`` (None: uniform, or zero for a bias): one for a
    scale, and for the weights of the experts' norms whatever makes their scale (offset + weight) one."""
    if name in ONES_AT_INIT:
        return 1.0
    if name.startswith("router.mlp.") and layer.ROUTER_MLP[int(name.split(".")[2])][0] in ("rms_norm", "state"):
        return 1.0  # a router network's norm weight or state scale
    offset = {"pre_expert_norm.weight": layer.PRE_EXPERT_NORM_OFFSET,
              "expert_output_norm.weight": layer.EXPERT_OUTPUT_NORM_OFFSET,
              "experts.output_norm_weight": layer.EXPERT_OUTPUT_NORM_OFFSET,
              "shared_expert_norm.weight": layer.SHARED_NORM_OFFSET}.get(name)
    return None if offset is None else 1.0 - offset


def router_mlp(layers: tuple, dtype: torch.dtype, device: Any) -> nn.ModuleList:
    """The parameters of a router network (``router.mlp``), one module per layer so that their names follow the
    spec's layer numbers: a linear's weight [out, in] (and bias [out]), a norm's weight [width], a receiving
    state step's scale [width]; activations and a first layer's state step hold none."""
    mods = nn.ModuleList()
    for op, w_in, w_out, flag in layers:
        m = nn.Module()
        if op == "linear":
            m.weight = nn.Parameter(torch.empty(w_out, w_in, dtype=dtype, device=device))
            if flag:
                m.bias = nn.Parameter(torch.zeros(w_out, dtype=dtype, device=device))
        elif op == "rms_norm":
            m.weight = nn.Parameter(torch.ones(w_out, dtype=dtype, device=device))
        elif op == "state" and flag:
            m.scale = nn.Parameter(torch.ones(w_out, dtype=dtype, device=device))
        mods.append(m)
    return mods


#: the generated layer classes this process has loaded, by (spec hash, backend): what unpickling and deepcopy reuse
_GENERATED: dict[tuple[str, str], type] = {}


def _generated_instance(spec_json: str, backend: str, spec_hash: str = "") -> CompiledMoEBase:
    """An empty instance of the generated layer class of a spec (unpickling and deepcopy:
    ``CompiledMoEBase.__reduce_ex__``): the class this process already loaded, else the class generated again
    (written to the cache directory, as ``compile`` without ``out_dir`` does)."""
    cls = _GENERATED.get((spec_hash, backend))
    if cls is None:
        import json

        from .codegen import layer_class
        from .loader import load_spec

        cls, _ = layer_class(load_spec(json.loads(spec_json)), backend)
        if spec_hash and cls.SPEC_HASH != spec_hash:
            raise InputError(f"the pickled layer is of spec hash {spec_hash[:12]}, but this moegraph generates "
                             f"{cls.SPEC_HASH[:12]} from its spec; load it with the moegraph version that saved it")
    return cls.__new__(cls)


class CompiledMoEBase(nn.Module):
    """Parameters, input checks and graph management shared by all generated layers.

    Subclasses (generated) define class constants and the traceable ``core`` method:
    ``core(x_BSD, token_ids_BS) -> (y_BSD, aux: dict[str, Tensor], topk_ids_BSK)``.
    """

    # Set by the generated subclass.
    SPEC_JSON: str = ""
    SPEC_HASH: str = ""
    BACKEND: str = "torch"
    TRITON_BLOCK_M: int | None = None  # the spec's codegen.block_m (backend "triton")
    HIDDEN: int = 0
    NUM_EXPERTS: int = 0
    ROUTER_CHOICES: int | None = None  # router outputs when identity/zero experts follow the MLP ones
    INTERMEDIATE: int = 0
    TOP_K: int = 1
    GATED: bool = True
    EXPERT_BIAS_TERMS: bool = False
    SHARED_INTERMEDIATE: int = 0
    SHARED_GATE: bool = False
    SHARED_ROUTED: int = 0  # shared experts weighted by their own router rows (stored [count, ., .]); 0 = none
    ROUTER: str = "topk"
    ROUTER_BIAS: bool = False
    EXPERT_BIAS_RATE: float | None = None
    HASH_VOCAB: int = 0
    HASH_SEED: int = 0
    HASH_METHOD: str = "random"
    NEEDS_TOKEN_IDS: bool = False
    #: FP8 experts (``moe.quantization``): block_out, block_in, tile, format, scale_format, shared; None = off
    FP8: dict | None = None
    HASH_SCORED: bool = False  # a hash router whose chosen experts are weighted by a learned router's scores
    OUTPUT_NORM_EPS: float | None = None  # an RMS norm of the layer output (``moe.output_norm``); None = none
    OUTPUT_BIAS: bool = False  # a learned [D] bias added to the layer output (``moe.output_bias``)
    ROUTER_INPUT_WEIGHT: bool = False  # a learned [D] weight on the router input (``router.input_norm.weight``)
    LOGIT_SCALE: bool = False  # a learned scalar on the router logits (``router.learned_logit_scale``)
    PER_EXPERT_SCALE: bool = False  # a learned [E] scale on the chosen experts' weights (``router.per_expert_scale``)
    WEIGHT_SCALE: bool = False  # a learned scalar on the routing weights (``router.learned_weight_scale``)
    #: the experts' own width M (``moe.expert_projection.size``): pre_expert_proj [M, D] and post_expert_proj [D, M]
    #: around them; 0 = they see the layer input (M = D)
    EXPERT_WIDTH: int = 0
    PRE_EXPERT_NORM_OFFSET: float | None = None  # a norm of the projected input (pre_expert_norm.weight [M]); its offset
    EXPERT_OUTPUT_NORM_OFFSET: float | None = None  # a norm of each expert's output (``experts.output_norm``)
    #: that norm's weight is one per expert (``per_expert``): ``experts.output_norm_weight`` [E, M], an expert tensor
    EXPERT_OUTPUT_NORM_PER_EXPERT: bool = False
    SHARED_NORM_OFFSET: float | None = None  # a norm of the shared experts' output (``shared_experts.output_norm``)
    #: the router as a small network (``router.mlp``): one (op, width in, width out, flag) per layer, flag = bias
    #: (linear) or receive (state); () = one linear
    ROUTER_MLP: tuple = ()
    #: width of the router state the layer returns (``router.mlp`` state step); 0 = none. RECEIVES_ROUTER_STATE:
    #: the layer adds the previous layer's state
    ROUTER_STATE: int = 0
    RECEIVES_ROUTER_STATE: bool = False

    def __init__(self, *, dtype: torch.dtype = torch.float32, router_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, pipeline: GraphPipeline | None = None,
                 seed: int | None = 0):
        super().__init__()
        D, E, Fh = self.HIDDEN, self.NUM_EXPERTS, self.INTERMEDIATE
        R = self.router_choices
        H = 2 * Fh if self.GATED else Fh
        kw = {"dtype": dtype, "device": device}
        self.router = nn.Module()
        if self.ROUTER_MLP:
            self.router.mlp = router_mlp(self.ROUTER_MLP, router_dtype, device)
        if self.ROUTER != "hash" or self.HASH_SCORED:
            rows = R + self.SHARED_ROUTED  # routed shared experts have the last router rows
            width = self.ROUTER_MLP[-1][2] if self.ROUTER_MLP else D  # what router.weight maps to the logits
            self.router.weight = nn.Parameter(torch.empty(rows, width, dtype=router_dtype, device=device))
            if self.ROUTER_BIAS:
                self.router.bias = nn.Parameter(torch.zeros(rows, dtype=router_dtype, device=device))
        # Learned router transforms (``moe.router``): scales, so they start at one (see ONES_AT_INIT).
        if self.ROUTER_INPUT_WEIGHT:
            self.router.input_norm = nn.Module()
            self.router.input_norm.weight = nn.Parameter(torch.ones(D, dtype=router_dtype, device=device))
        if self.LOGIT_SCALE:
            self.router.logit_scale = nn.Parameter(torch.ones(1, dtype=router_dtype, device=device))
        if self.PER_EXPERT_SCALE:
            self.router.per_expert_scale = nn.Parameter(torch.ones(R, dtype=router_dtype, device=device))
        if self.WEIGHT_SCALE:
            self.router.weight_scale = nn.Parameter(torch.ones(1, dtype=router_dtype, device=device))
        if self.EXPERT_BIAS_RATE is not None:
            self.router.register_buffer("expert_bias", torch.zeros(R, dtype=torch.float32, device=device))
            # This process's loads since the last update: a plain tensor, not a buffer, since DistributedDataParallel
            # broadcasts every buffer from rank 0 before each synced forward (with accumulation, or updates every N
            # steps, each rank's counts were rank 0's); ``_apply`` moves it with the layer.
            self._bias_load_E = torch.zeros(R, dtype=torch.float32, device=device)
        if self.ROUTER == "hash" and self.HASH_METHOD in ("random", "table"):
            # 'table' ships with the weights (persistent; checked when loaded), seeded until then.
            g = torch.Generator().manual_seed(self.HASH_SEED)
            table = _random_hash_table(self.HASH_VOCAB, E, self.TOP_K, g)
            self.router.register_buffer("hash_table", table.to(device), persistent=self.HASH_METHOD == "table")
            if self.HASH_METHOD == "table":
                self._register_load_state_dict_pre_hook(self._check_loaded_hash_table)
        self.experts = nn.Module()
        up_name = "gate_up_proj" if self.GATED else "up_proj"
        R = self._expert_rows()
        M = self.EXPERT_WIDTH or D  # the experts' input and output width
        self.experts.register_parameter(up_name, nn.Parameter(torch.empty(R, H, M, **kw)))
        self.experts.down_proj = nn.Parameter(torch.empty(R, M, Fh, **kw))
        if self.EXPERT_BIAS_TERMS:
            self.experts.register_parameter(up_name + "_bias", nn.Parameter(torch.zeros(R, H, **kw)))
            self.experts.down_proj_bias = nn.Parameter(torch.zeros(R, M, **kw))
        if self.EXPERT_OUTPUT_NORM_PER_EXPERT:  # an expert tensor: rows follow the experts (slots when parallel)
            self.experts.output_norm_weight = nn.Parameter(torch.full((R, M), 1.0 - self.EXPERT_OUTPUT_NORM_OFFSET,
                                                                      **kw))
        # The experts' own space (``moe.expert_projection``) and its norms; top-level modules, replicated on
        # expert-parallel ranks like the router.
        if self.EXPERT_WIDTH:
            self.pre_expert_proj = nn.Module()
            self.pre_expert_proj.weight = nn.Parameter(torch.empty(M, D, **kw))
            self.post_expert_proj = nn.Module()
            self.post_expert_proj.weight = nn.Parameter(torch.empty(D, M, **kw))
        # experts.output_norm's one weight for every expert (a weight per expert is an expert tensor, above)
        one_weight = None if self.EXPERT_OUTPUT_NORM_PER_EXPERT else self.EXPERT_OUTPUT_NORM_OFFSET
        for name, offset, width in (("pre_expert_norm", self.PRE_EXPERT_NORM_OFFSET, M),
                                    ("expert_output_norm", one_weight, M),
                                    ("shared_expert_norm", self.SHARED_NORM_OFFSET, D)):
            if offset is not None:
                setattr(self, name, nn.Module())
                getattr(self, name).weight = nn.Parameter(torch.full((width,), 1.0 - offset, **kw))
        if self.SHARED_INTERMEDIATE:
            # One MLP of width S, or (shared_experts.gate: router) one by one as the routed experts:
            # [count, H, D] / [count, D, F].
            n = self.SHARED_ROUTED
            lead, Fs = ((n,), self.SHARED_INTERMEDIATE // n) if n else ((), self.SHARED_INTERMEDIATE)
            Hs = 2 * Fs if self.GATED else Fs
            self.shared_experts = nn.Module()
            self.shared_experts.register_parameter(up_name, nn.Parameter(torch.empty(*lead, Hs, D, **kw)))
            self.shared_experts.down_proj = nn.Parameter(torch.empty(*lead, D, Fs, **kw))
            if self.EXPERT_BIAS_TERMS:
                self.shared_experts.register_parameter(up_name + "_bias", nn.Parameter(torch.zeros(*lead, Hs, **kw)))
                self.shared_experts.down_proj_bias = nn.Parameter(torch.zeros(*lead, D, **kw))
            if self.SHARED_GATE:
                self.shared_expert_gate = nn.Linear(D, 1, bias=False, **kw)
        if self.OUTPUT_NORM_EPS is not None:
            self.output_norm = nn.Module()
            self.output_norm.weight = nn.Parameter(torch.ones(D, **kw))
        if self.OUTPUT_BIAS:
            self.output = nn.Module()  # (parameters live in submodules, which the traced core shares)
            self.output.bias = nn.Parameter(torch.zeros(D, **kw))
        if self.FP8 is not None:  # FP8 expert weights + float32 block scales; activations stay in dtype
            fp8.make_parameters(self)
            self.__dict__["compute_dtype"] = dtype
        self.recorder: RoutingRecorder | None = None
        self.aux_losses: dict[str, Tensor] = {}
        self.__dict__["_graphs"] = {}
        self.__dict__["pipeline"] = pipeline
        self.__dict__["pass_report"] = {}
        if seed is not None:
            self.reset_parameters(seed)

    # -- parameters ------------------------------------------------------------------------------

    def check_hash_table(self, table: Tensor, what: str = "router.hash_table") -> None:
        """Refuse a token id -> experts table that does not fit the spec: [vocab_size, top_k] integer
        expert ids in [0, num_experts)."""
        want = (self.HASH_VOCAB, self.TOP_K)
        if not isinstance(table, Tensor) or tuple(table.shape) != want:
            shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
            raise InputError(f"{what} has shape {shape}; the spec's moe.router.vocab_size ({want[0]}) and top_k "
                             f"({want[1]}) need [{want[0]}, {want[1]}]; fix the table or the spec")
        if table.is_floating_point() or table.dtype == torch.bool or table.is_complex():
            raise InputError(f"{what} has dtype {table.dtype}; a table of expert ids is an integer tensor")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= self.NUM_EXPERTS):
            raise InputError(f"{what} holds expert ids in [{int(table.min())}, {int(table.max())}]; the spec's "
                             f"moe.experts.num_experts ({self.NUM_EXPERTS}) allows [0, {self.NUM_EXPERTS - 1}]")

    def _check_loaded_hash_table(self, state_dict, prefix, *args) -> None:
        key = prefix + "router.hash_table"
        if key in state_dict:
            self.check_hash_table(state_dict[key], key)

    @property
    def router_choices(self) -> int:
        """Router outputs: the MLP experts, then any identity and zero experts of the spec."""
        return self.ROUTER_CHOICES or self.NUM_EXPERTS

    def _expert_rows(self) -> int:
        """Rows of the routed expert weights: every expert here; an expert-parallel layer
        (``moegraph.distributed``) holds only its rank's plan slots and overrides this."""
        return self.NUM_EXPERTS

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of inputs, outputs and unquantized weights (FP8 layers store expert weights in FP8)."""
        return self.__dict__.get("compute_dtype") or self.experts.down_proj.dtype

    @property
    def up_proj_name(self) -> str:
        return "gate_up_proj" if self.GATED else "up_proj"

    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic init: uniform(+-1/sqrt(fan_in)) like nn.Linear, for every projection."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                    continue
                if name.endswith("_scale_inv"):  # set with its FP8 weight
                    continue
                start = init_value(self, name)
                if start is not None:  # a norm's or a router's scale starts at one, as nn.RMSNorm's does
                    p.fill_(start)
                    continue
                fan_in = p.shape[-1]
                bound = 1.0 / math.sqrt(fan_in)
                w = (torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
                if fp8.is_fp8(p):
                    fp8.store(self, name, w)
                else:
                    p.copy_(w)

    def __reduce_ex__(self, protocol):
        """Pickled (and deep-copied) by its spec: the class is generated code, a module that another process cannot
        import by name, so unpickling generates it again from ``SPEC_JSON`` (the same source, the same class) and
        sets the state; the built graphs and the last forward's auxiliary losses are left out (the current mode's
        graph is built again as the state is set, the losses by the next training forward). A layer with stored FP8
        weights does not go through ``pickle`` itself: torch 2.13 cannot pickle float8 tensors (a bare one fails
        alike, ``UntypedStorage has no attribute 'dtype'``); ``torch.save`` / ``torch.load`` and ``deepcopy`` work."""
        if not type(self).__module__.startswith("moegraph_generated_"):  # a subclass (expert-parallel): as it is
            return super().__reduce_ex__(protocol)
        state = self.__dict__.copy()
        state["_graphs"] = {}
        state["aux_losses"] = {}  # the last training forward's, tied to its autograd graph
        return _generated_instance, (self.SPEC_JSON, self.BACKEND, self.SPEC_HASH), state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.__dict__.get("pipeline") is not None:  # unpickled or deep-copied: ready for torch.compile too
            self.graph()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("moegraph_generated_"):
            _GENERATED[cls.SPEC_HASH, cls.BACKEND] = cls

    def _apply(self, fn, recurse=True):  # .to()/.half(): rebuild graphs against the new tensors
        had = self._forget_graphs()
        out = self._apply_keeping(fn, recurse)
        if had:
            self.graph()
        return out

    def _apply_keeping(self, fn, recurse):
        """``nn.Module._apply`` with the float32 balancing state (and FP8 storage) kept through casts."""
        # The balancing state stays float32 through a cast: in bfloat16 the load counter rounds past 256
        # assignments and a bias step of 0.001 vanishes (DeepSeek-V3's update needs both exact). FP8 weights and
        # their float32 scales likewise only change device; the FP8 layer's compute dtype follows the cast.
        kept = set()
        for name in KEPT_FLOAT32:  # (the load counts are no buffer: moved below)
            owner, _, attr = name.rpartition(".")
            t = getattr(self.get_submodule(owner) if owner else self, attr, None)
            if t is not None:
                kept.add(id(t))
        if self.FP8 is not None:
            kept |= fp8.kept_by_apply(self)
            probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.experts.down_proj.device))
            self.__dict__["compute_dtype"] = probe.dtype
        if not kept:
            return super()._apply(fn, recurse)

        def keep(t: Tensor) -> Tensor:
            # A cast (what changes a scalar of the tensor's dtype) only moves it to the device the cast goes to;
            # anything else (to_empty, share_memory, a device move) applies as to every tensor.
            probe = fn(t.new_zeros((), dtype=t.dtype))
            return t.to(probe.device) if probe.dtype != t.dtype else fn(t)

        out = super()._apply(lambda t: keep(t) if id(t) in kept else fn(t), recurse)
        if isinstance(self.__dict__.get("_bias_load_E"), Tensor):  # not a buffer (see __init__)
            self._bias_load_E = keep(self._bias_load_E)
        return out

    # -- graphs ----------------------------------------------------------------------------------

    def invalidate_graphs(self) -> None:
        """Forget the built graphs: they read the layer's submodules, but hold its own buffers and whatever a
        pass derived from the weights as they were when traced, so whoever replaces parameters or buffers
        (``load_hf_weights``, ``.to()``) calls this. A layer that had a graph builds
        the current mode's again at once (``torch.compile`` cannot build one: see ``train``). It also drops the
        eval graphs' packed copies of the expert weights: call it after writing weights through ``.data``, which
        bumps no version counter (in-place writes on the parameters themselves are seen)."""
        from .ops.workspace import forget_packed

        forget_packed(list(self.parameters()))
        if self._forget_graphs():
            self.graph()

    def _forget_graphs(self) -> bool:
        """Drop the built graphs; returns whether there were any."""
        had = bool(self.__dict__.get("_graphs"))
        self.__dict__["_graphs"] = {}
        return had

    def train(self, mode: bool = True):
        """``nn.Module.train``, and the graph of the mode switched to is built now if the layer has built one
        before (``moegraph.compile`` builds the first). The graph is traced and its passes run in Python, which
        ``torch.compile`` cannot trace: a compiled forward must find the graph already built (it failed on
        ``fullgraph=True`` and fell back to eager otherwise when the layer had not run that mode eagerly). A layer
        swapped in for an HF block with dropout or training-time noise warns here, the first time it trains
        (``hf.train_mode``)."""
        super().train(mode)
        if self.__dict__.get("_graphs") and ("train" if mode else "eval") not in self._graphs:
            self.graph()
        pending = self.__dict__.get("_training_warning")  # a swapped HF block's training-only behaviour
        if mode and pending is not None:
            pending.fire()
        return self

    def graph(self, training: bool | None = None) -> torch.fx.GraphModule:
        """The FX graph run in the given (default: current) mode, built by the pipeline on first use (the
        current mode's is built when the layer is made, switched to, or given new tensors: see ``train``)."""
        mode = "train" if (self.training if training is None else training) else "eval"
        gm = self._graphs.get(mode)
        if gm is None:
            if self.pipeline is None:
                raise InputError(f"{type(self).__name__} has no pass pipeline to build its graph; make layers with "
                                 "moegraph.compile (or pass pipeline=moegraph.fx_passes.Pipeline())")
            gm, report = self.pipeline.build(self, training=(mode == "train"))
            self._graphs[mode] = gm
            self.pass_report[mode] = report
        return gm

    # -- forward ---------------------------------------------------------------------------------

    def _autocast_training_dtype(self, x: Tensor) -> torch.dtype | None:
        """The 16-bit dtype a training forward under ``torch.autocast`` computes in, or None (its own dtype).

        Mixed-precision training keeps float32 weights for the optimizer and runs the products in 16 bits; a
        float32 layer in training mode inside a bfloat16 / float16 autocast region therefore computes as the
        layer made in that dtype would (``moegraph.compile(spec, dtype=...)``: its expert, shared-expert and
        projection weights rounded to it for the forward, the router in its own dtype), and the gradients reach
        the float32 weights through the casts, as autocast's own casts do. In eval mode the layer keeps its dtype
        (cast it for 16-bit inference: no float32 copy is needed there, and casting every expert's weights on
        every call would cost more than the products save at decode sizes). In one process or expert-parallel
        (the rows cross the ranks in that dtype), on either backend; not for FP8 experts."""
        if not (self.training and self.FP8 is None and isinstance(x, Tensor) and x.dtype in _AUTOCAST_DTYPES
                and self.compute_dtype == torch.float32 and torch.is_autocast_enabled(x.device.type)):
            return None
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if dtype in (torch.float16, torch.bfloat16) else None

    def _graph_in(self, dtype: torch.dtype):
        """The current mode's graph, run on the weights the layer made in ``dtype`` holds: its float32 parameters
        outside the router cast (differentiably) to ``dtype`` for the call. The graph reads the layer's own
        submodules, so ``torch.func.functional_call`` puts the casts in their place while it runs."""
        graph = self.graph()
        weights = {name: p.to(dtype) for name, p in self.named_parameters()
                   if p.dtype == torch.float32 and not name.startswith("router.")}
        return lambda *args: torch.func.functional_call(graph, weights, args)

    def _autocast_input(self, x: Tensor) -> Tensor:
        """Inside a ``torch.autocast`` region the layer is one op of its own dtype: as autocast does for its ops, a
        float16 / bfloat16 / float32 input (what the autocast op before it gave) is cast to it (a float32 layer
        after an ``nn.Linear`` under bfloat16 autocast was handed bfloat16 and refused it)."""
        if (isinstance(x, Tensor) and x.dtype != self.compute_dtype and x.dtype in _AUTOCAST_DTYPES
                and self.compute_dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(x.device.type)):
            return x.to(self.compute_dtype)
        return x

    def _check_input(self, x: Tensor, token_ids: Tensor | None, dtype: torch.dtype | None = None) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"MoE layer input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.HIDDEN:
            raise InputError(
                f"MoE layer input has shape {tuple(x.shape)}; expected [tokens, {self.HIDDEN}] or "
                f"[batch, seq, {self.HIDDEN}] (hidden size {self.HIDDEN} from the spec)"
            )
        if not x.is_floating_point():
            raise InputError(f"MoE layer input has dtype {x.dtype}; pass a floating-point tensor")
        p = self.experts.down_proj
        if x.device != p.device:
            raise InputError(f"MoE layer input is on {x.device} but the layer's weights are on {p.device}; "
                             f"move one of them (layer.to(device))")
        dtype = dtype or self.compute_dtype
        if x.dtype != dtype:
            # an FP8 (1-byte) input is not a compute dtype: the layer is never cast to it
            layer_too = f" or the layer (layer.to({x.dtype}))" if x.dtype.itemsize > 1 else ""
            raise InputError(f"MoE layer input has dtype {x.dtype} but the layer computes in {dtype}; cast the "
                             f"input (x.to({dtype})){layer_too}")
        if token_ids is not None and not isinstance(token_ids, Tensor):
            raise InputError(f"token_ids must be a torch.Tensor of integer ids, got {type(token_ids).__name__}")
        if self.NEEDS_TOKEN_IDS:
            if token_ids is None:
                raise InputError("this layer uses hash routing: pass token_ids (same leading shape as the input)")
            # int32/int64 only: a bool or uint8 tensor would index as a mask, not as ids.
            if tuple(token_ids.shape) != tuple(x.shape[:-1]) or token_ids.dtype not in (torch.int32, torch.int64):
                raise InputError(
                    f"token_ids has shape {tuple(token_ids.shape)} and dtype {token_ids.dtype}; expected an "
                    f"int64 (or int32) tensor of shape {tuple(x.shape[:-1])}"
                )
            where = f"token_ids must lie in [0, {self.HASH_VOCAB}) (vocab_size of the hash router)"
            if torch.compiler.is_compiling():  # a traced forward cannot branch on values: checked as the graph runs
                if token_ids.numel():
                    ok = token_ids.min() >= 0
                    torch._assert_async(ok & (token_ids.max() < self.HASH_VOCAB) if self.HASH_VOCAB else ok, where)
            elif token_ids.numel() and (int(token_ids.min()) < 0
                                        or (self.HASH_VOCAB and int(token_ids.max()) >= self.HASH_VOCAB)):
                raise InputError(where)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, *, router_state: Tensor | None = None,
                return_aux: bool = False):
        """Run the layer on x: [T, D] or [B, S, D] (rows of a 3-D input are sequences).

        Returns y of the same shape, or (y, aux_losses) with ``return_aux=True``. A layer whose router
        network has a state step (``router.mlp``) returns ``(y, state)`` (and ``(y, state, aux_losses)``):
        its router state [..., H] for the next layer; with ``receive`` it adds ``router_state`` (the previous
        layer's, same leading shape as x; None adds nothing). NaN or inf in a
        token's input makes that token's output non-finite; other tokens are unaffected (with
        token-choice routing and no capacity limit). The loads of aux-loss-free balancing and a recorder count
        every forward: under reentrant activation checkpointing (``use_reentrant=True``, which runs the forward
        again in the backward) they count each token twice; ``use_reentrant=False`` counts it once.
        """
        mixed = self._autocast_training_dtype(x)
        x = x.to(mixed) if mixed is not None else self._autocast_input(x)
        self._check_input(x, token_ids, mixed)
        x_BSD = x if x.dim() == 3 else x.unsqueeze(0)
        tid = None
        if token_ids is not None and self.NEEDS_TOKEN_IDS:  # a layer whose routing ignores token ids drops them
            tid = token_ids if token_ids.dim() == 2 else token_ids.unsqueeze(0)
        args = (x_BSD, tid) if not self.RECEIVES_ROUTER_STATE else (x_BSD, tid, self._router_state(x, router_state))
        pin = self.__dict__.get("expert_strategy")
        # Under torch.autocast the layer computes in one dtype, not a mix of both: its own, or in a training forward
        # that of the layer made in the autocast dtype (``_autocast_training_dtype``).
        own_precision = (torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type)
                         else contextlib.nullcontext())
        gm = self.graph() if mixed is None else self._graph_in(mixed)
        with own_precision, self._row_block():
            if pin is None:
                y, aux, ids, *state = gm(*args)
            else:
                from .strategies import pinned

                with pinned(pin):
                    y, aux, ids, *state = gm(*args)
        if self.training:
            self.aux_losses = aux
            if self.EXPERT_BIAS_RATE is not None:
                with torch.no_grad():
                    self._bias_load_E += _counts(ids.reshape(-1, ids.shape[-1]), self.router_choices)
        if self.recorder is not None:
            self.recorder.add(ids)
        y = y if x.dim() == 3 else y.squeeze(0)
        if self.ROUTER_STATE:
            out = (y, state[0] if x.dim() == 3 else state[0].squeeze(0))
            return (*out, aux) if return_aux else out
        if return_aux:
            return y, aux
        return y

    def _row_block(self) -> contextlib.AbstractContextManager:
        """The spec's ``codegen.block_m`` for the Triton kernels this forward launches (nothing to fix without it).
        It is a setting of the thread the kernels launch on, so under torch.compile the forward breaks the graph
        here: the setting is made in Python and holds where the rest of the forward runs (traced alone, the
        setting would be made once, while tracing, and the compiled forward would launch without it)."""
        if self.TRITON_BLOCK_M is None:
            return contextlib.nullcontext()
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break()
        from .triton_backend.configs import row_block

        return row_block(self.TRITON_BLOCK_M)

    def _router_state(self, x: Tensor, state: Tensor | None) -> Tensor:
        """The previous layer's router state as [B, S, H] (zeros, which add nothing, when there is none)."""
        H = self.ROUTER_STATE
        if state is None:
            return x.new_zeros((*(x.shape[:-1] if x.dim() == 3 else (1, x.shape[0])), H),
                               dtype=self.router.weight.dtype)
        if not isinstance(state, Tensor) or tuple(state.shape) != (*x.shape[:-1], H) or not state.is_floating_point():
            shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise InputError(f"router_state has shape {shape}; this layer adds the previous layer's router state, "
                             f"a float tensor of shape {(*x.shape[:-1], H)} (the state step of router.mlp is {H} wide)")
        return state if state.dim() == 3 else state.unsqueeze(0)

    # -- balancing and recording -----------------------------------------------------------------

    @torch.no_grad()
    def update_expert_bias(self, counts_E: Tensor | None = None) -> Tensor:
        """Auxiliary-loss-free balancing step (DeepSeek-V3): bias_e += rate * sign(mean load - load_e).

        Uses ``counts_E`` if given, else the loads accumulated by training forwards since the last
        update (then reset). Returns the loads used. The accumulated loads are this process's: under data
        parallelism (DDP) all-reduce them first and pass the sum, so that every replica takes the same step
        (``dist.all_reduce(layer._bias_load_E)`` before the call does it; the expert-parallel layer sums over
        its ranks itself).
        """
        if self.EXPERT_BIAS_RATE is None:
            raise InputError("this layer's spec has no router.expert_bias; add it to use update_expert_bias")
        self._check_counts(counts_E)
        load = self._bias_load_E.clone() if counts_E is None else counts_E.to(self._bias_load_E)
        if counts_E is None:
            self._bias_load_E.zero_()
        self.router.expert_bias += self.EXPERT_BIAS_RATE * torch.sign(load.mean() - load)
        return load

    def _check_counts(self, counts_E: Any) -> None:
        """``update_expert_bias``'s loads: None or one finite, non-negative number per routed expert (a scalar was
        broadcast to every expert, a step of zero)."""
        if counts_E is None:
            return
        n = self._bias_load_E.shape[0]
        if not isinstance(counts_E, Tensor) or tuple(counts_E.shape) != (n,) or counts_E.is_complex():
            got = f"shape {tuple(counts_E.shape)}" if isinstance(counts_E, Tensor) else type(counts_E).__name__
            raise InputError(f"update_expert_bias: counts_E is {got}; pass the loads as a real tensor of shape ({n},), "
                             f"one per routed expert (or nothing, for the loads counted since the last update)")
        if not bool(torch.isfinite(counts_E).all()) or bool((counts_E < 0).any()):
            raise InputError("update_expert_bias: counts_E holds negative or non-finite loads; pass token counts")

    def start_recording(self) -> RoutingRecorder:
        self.recorder = RoutingRecorder()
        return self.recorder

    def stop_recording(self) -> RoutingRecorder | None:
        rec, self.recorder = self.recorder, None
        return rec

    def extra_repr(self) -> str:
        return (f"spec={self.SPEC_HASH[:12]}, D={self.HIDDEN}, E={self.NUM_EXPERTS}, F={self.INTERMEDIATE}, "
                f"K={self.TOP_K}, router={self.ROUTER}")
