"""Hugging Face transformers interop: MoE blocks and model configs -> moegraph specs and layers.

    from_hf(block)              an HF MoE block (its config and weights) -> compiled layer, same weights
    spec_from_hf_config(config) an HF model config -> MoESpec (model section included)

How a block is read, for any family (no per-family table):

1. Anatomy, from the block's modules: the experts module (3-D ``gate_up_proj``/``up_proj`` and
   ``down_proj`` as transformers v5 stores them, with the layout flags of
   ``@use_experts_implementation``), the router weight (the one [E, D] tensor outside the experts),
   its bias, an expert-selection bias (``e_score_correction_bias``, ``expert_bias``: any other
   E-sized tensor), shared-expert MLPs and a [1, D] shared-expert gate.
2. Routing, from the config (``num_experts_per_tok``, ``scoring_func``, ``norm_topk_prob``,
   ``routed_scaling_factor``, ``n_group``/``topk_group``, ``topk_method``) checked against the
   block itself: a light copy of the block, with the experts and shared experts replaced by stubs
   that record their inputs, routes random tokens with random router weights. The routing the
   config declares must reproduce the recorded expert ids and weights exactly; where a family's
   code departs from its config (e.g. DeepSeek-V2 ignores ``norm_topk_prob``) the few variants
   the spec language offers are tried and the one that reproduces the block is kept, with a note.
   Nothing that fails this check is compiled.
3. The combine: the stubs return known tensors, so the block's output must equal routed +
   (gated) shared output; anything else (a norm after the experts, an input rescaled by the
   router) is refused with the reason.
4. ``from_hf`` then compiles the spec, copies (or shares) the weights and compares the compiled
   layer with the block on random tokens.

Families whose math the spec cannot express are refused with ``UnsupportedBlock`` naming the
feature (GPT-OSS's clamped ``(up + 1) * gate * sigmoid(alpha * gate)``, Phi-MoE's sparsemixer,
Llama 4's router-scaled expert input, ...).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import UnsupportedBlock
from .spec import MoESpec

__all__ = [
    "BlockAnatomy",
    "HFImport",
    "Routing",
    "from_hf",
    "inspect_block",
    "is_hf_moe_block",
    "load_hf_config",
    "spec_from_hf_config",
]

# Config attribute vocabulary across transformers families (first one present wins).
_NUM_EXPERTS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k")
_EXPERT_F = ("moe_intermediate_size", "expert_intermediate_size", "ffn_hidden_size")
_SHARED_COUNT = ("n_shared_experts", "moe_num_shared_experts", "num_shared_experts", "shared_expert_count")
_SHARED_F = ("shared_expert_intermediate_size", "shared_intermediate_size")
_SCALING = ("routed_scaling_factor", "router_scaling_factor", "moe_routed_scaling_factor", "route_scale")
_NORMALIZE = ("norm_topk_prob", "moe_renormalize", "normalize_topk_prob")
_SCORE = ("scoring_func", "score_func", "router_score_function", "moe_router_score_function")

# HF scoring_func spellings -> spec score names.
_HF_SCORES = {
    "softmax": "softmax",
    "sigmoid": "sigmoid",
    "softplus": "softplus",
    "sqrtsoftplus": "sqrt_softplus",
    "sqrt_softplus": "sqrt_softplus",
    "tanh": "tanh",
}

_SCORE_FNS = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "sqrt_softplus": lambda x: torch.sqrt(F.softplus(x)),
    "tanh": torch.tanh,
}

# Gated and plain activations of the spec, by the elementwise function applied.
_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}
_PLAIN = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu", "relu2": "relu2"}
_ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
}
_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp", "shared_experts_mlp")


def _attr(cfg: Any, names: tuple[str, ...], default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _text_config(cfg: Any) -> Any:
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return cfg


def _family(cfg: Any) -> str:
    return str(getattr(cfg, "model_type", None) or type(cfg).__name__)


# ----------------------------------------------------------------------------------------------
# Step 1: anatomy of a block
# ----------------------------------------------------------------------------------------------


@dataclass
class BlockAnatomy:
    """What a block is made of, found from its modules. Tensors are the block's own (not copies).

    Legend: E experts, D hidden, F expert hidden, S shared hidden (all shared experts together).
    """

    block_class: str
    experts_name: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    gated: bool
    transposed: bool  # expert weights stored [E, in, out] instead of [E, out, in]
    interleaved: bool  # gated rows stored gate0, up0, gate1, ... instead of all gate then all up
    expert_bias_terms: bool  # the routed expert projections carry biases
    activation_fn: str | None  # elementwise function of the experts (silu, gelu, ...); None = not found
    router_weight_name: str  # dotted path inside the block of the [E, D] router weight
    router_bias_name: str | None
    expert_bias_name: str | None  # E-sized selection bias (e_score_correction_bias, expert_bias)
    shared_names: tuple[str, ...] = ()
    shared_layout: str | None = None  # "gate_up_down", "fused_gate_up", "up_down"
    shared_intermediate: int = 0
    shared_bias_terms: bool = False
    shared_activation_fn: str | None = None
    shared_gate_name: str | None = None
    unexplained: tuple[str, ...] = ()  # parameters/buffers none of the above accounts for
    gate_clamp: float | None = None  # clamps of a clamped gated activation (a custom _apply_gate)
    up_clamp: float | None = None
    notes: list[str] = field(default_factory=list)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _named_tensors(mod: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from mod.named_parameters(remove_duplicate=False)
    yield from mod.named_buffers(remove_duplicate=False)


def _probe_activation(fn: Any) -> str | None:
    """The spec name of an elementwise activation module/function, found numerically."""
    if fn is None:
        return None
    x = torch.linspace(-5, 5, 201, dtype=torch.float32)
    try:
        y = fn(x)
    except Exception:  # noqa: BLE001 - an activation we cannot even call is simply unknown
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return None
    for name, ref in _ACT_FNS.items():
        if torch.allclose(y.float(), ref(x), rtol=1e-5, atol=1e-6):
            return name
    return None


def _read_gate_function(experts: nn.Module, interleaved: bool, cls: str) -> tuple[str, tuple[float | None, float | None]]:
    """Express an experts module's own ``_apply_gate`` as act(clamp(gate)) * clamp(up), found numerically.

    Candidate clamps come from the module's ``limit``/``swiglu_limit`` attribute. Anything else
    (GPT-OSS's (up + 1) * gate * sigmoid(alpha * gate), ...) is refused.
    """
    from .ops import apply_activation

    limit = getattr(experts, "limit", None) or getattr(experts, "swiglu_limit", None)
    limit = float(limit) if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0 else None
    Fh = 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 2 * Fh, generator=g) * (1.5 * limit if limit else 3.0)
    try:
        with torch.no_grad():
            ref = type(experts)._apply_gate(experts, h.clone())
    except Exception as exc:  # reported as the reason
        raise UnsupportedBlock(f"its experts' custom gate function {type(experts).__name__}._apply_gate could not be "
                               f"evaluated ({type(exc).__name__}: {exc})", cls) from exc
    # Our layout: all gate columns, then all up columns.
    ours = torch.cat([h[:, 0::2], h[:, 1::2]], 1) if interleaved else h
    clamp_options = [(None, None)] + ([(limit, limit), (limit, None), (None, limit)] if limit else [])
    for act in ("silu", "gelu", "gelu_tanh", "relu"):
        for gc, uc in clamp_options:
            if isinstance(ref, Tensor) and ref.shape == (64, Fh) and torch.allclose(
                ref, apply_activation(ours, act, True, gc, uc), rtol=1e-5, atol=1e-6
            ):
                return act, (gc, uc)
    attrs = ", ".join(f"{a}={getattr(experts, a)}" for a in ("limit", "alpha") if getattr(experts, a, None) is not None)
    raise UnsupportedBlock(
        f"its experts use a custom gate function {type(experts).__name__}._apply_gate"
        + (f" ({attrs})" if attrs else "")
        + " that is not act(gate) * up with optional clamps (the spec's gated activations)", cls,
    )


def _experts_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name, child in block.named_children():
        for w in ("gate_up_proj", "up_proj"):
            p = getattr(child, w, None)
            if isinstance(p, Tensor) and p.dim() == 3 and isinstance(getattr(child, "down_proj", None), Tensor):
                return name, child
    return None


def is_hf_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` looks like a transformers MoE block: a child holding 3-D expert weights."""
    return _experts_child(module) is not None and not isinstance(module, nn.ModuleList)


def inspect_block(block: nn.Module, config: Any = None) -> BlockAnatomy:
    """Read a transformers MoE block's structure (no computation). Raises UnsupportedBlock."""
    cls = type(block).__name__
    found = _experts_child(block)
    if found is None:
        raise UnsupportedBlock(
            "no experts module with 3-D gate_up_proj/up_proj and down_proj weights (the transformers v5 "
            "layout) was found among the block's children",
            cls,
        )
    ename, experts = found
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedBlock("its experts apply a norm after each expert (has_post_expert_norm); the spec has no "
                               "per-expert output norm", cls)
    gated = isinstance(getattr(experts, "gate_up_proj", None), Tensor)
    interleaved = gated and getattr(experts, "is_concatenated", True) is False
    clamps: tuple[float | None, float | None] = (None, None)
    custom_act = None
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if gated and apply_gate is not None:
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:  # pragma: no cover - older transformers
            _default_apply_gate = None
        if apply_gate is not _default_apply_gate:
            custom_act, clamps = _read_gate_function(experts, interleaved, cls)
    gated = isinstance(getattr(experts, "gate_up_proj", None), Tensor)
    up = experts.gate_up_proj if gated else experts.up_proj
    down = experts.down_proj
    E = up.shape[0]
    if down.shape[0] != E:
        raise UnsupportedBlock(
            f"its experts hold {E} up projections but {down.shape[0]} down projections (extra non-MLP experts, "
            "e.g. zero/identity experts, have no spec equivalent)", cls,
        )
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        # Undecorated experts: up [E, H, D] with down [E, D, F] is the usual [E, out, in] layout;
        # up [E, D, H] with down [E, F, D] is transposed.
        transposed = up.shape[1] == down.shape[2] and up.shape[2] != down.shape[1]
    if transposed:
        D, H = up.shape[1], up.shape[2]
        Fh = down.shape[1]
    else:
        H, D = up.shape[1], up.shape[2]
        Fh = down.shape[2]
    if H != (2 * Fh if gated else Fh) or (down.shape[2] if transposed else down.shape[1]) != D:
        raise UnsupportedBlock(
            f"expert weights {ename}.{'gate_up_proj' if gated else 'up_proj'} {tuple(up.shape)} and down_proj "
            f"{tuple(down.shape)} do not fit one [E, 2F or F, D] / [E, D, F] layout", cls,
        )
    has_bias = bool(getattr(experts, "has_bias", False)) or isinstance(getattr(experts, "down_proj_bias", None), Tensor)
    act = custom_act or _probe_activation(getattr(experts, "act_fn", None))
    if act is None and config is not None and getattr(config, "hidden_act", None):
        try:
            from transformers.activations import ACT2FN

            act = _probe_activation(ACT2FN[config.hidden_act])
        except (ImportError, KeyError):
            act = None

    anat_kwargs: dict[str, Any] = dict(
        block_class=cls, experts_name=ename, num_experts=E, hidden_size=D, intermediate_size=Fh, gated=gated,
        transposed=bool(transposed), interleaved=interleaved, expert_bias_terms=has_bias, activation_fn=act,
        gate_clamp=clamps[0], up_clamp=clamps[1],
    )

    # Shared experts and their gate: children holding Linear layers from D.
    claimed = {ename}
    shared_names: list[str] = []
    shared_gate = None
    for name, child in block.named_children():
        if name in claimed:
            continue
        if isinstance(child, nn.Linear) and child.in_features == D and child.out_features == 1:
            if child.bias is not None:
                raise UnsupportedBlock(f"its shared-expert gate {name} has a bias; the spec's sigmoid gate has none", cls)
            shared_gate = name
            claimed.add(name)
        elif name in _SHARED_NAMES or (_shared_layout(child, D) is not None and "mlp" in type(child).__name__.lower()):
            if _shared_layout(child, D) is None:
                raise UnsupportedBlock(
                    f"shared expert '{name}' ({type(child).__name__}) has no gate_proj/up_proj/down_proj Linear "
                    "layers to read", cls,
                )
            shared_names.append(name)
            claimed.add(name)
    if len(shared_names) > 1:
        raise UnsupportedBlock(f"it has several shared-expert modules {shared_names}; the spec has one shared MLP", cls)
    if shared_gate is not None and not shared_names:
        raise UnsupportedBlock(f"it has a shared-expert gate '{shared_gate}' but no shared expert", cls)
    if shared_names:
        sh = getattr(block, shared_names[0])
        layout = _shared_layout(sh, D)
        if layout == "fused_gate_up":
            S = sh.gate_up_proj.out_features // 2
        elif layout == "gate_up_down":
            S = sh.gate_proj.out_features
        else:
            S = (getattr(sh, "up_proj", None) or sh.fc1).out_features
        if (layout == "up_down") == gated:
            raise UnsupportedBlock(
                f"shared expert '{shared_names[0]}' is {'plain' if layout == 'up_down' else 'gated'} but the routed "
                f"experts are {'gated' if gated else 'plain'}; the spec uses one activation for both", cls,
            )
        anat_kwargs.update(
            shared_names=tuple(shared_names), shared_layout=layout, shared_intermediate=S,
            shared_bias_terms=any(isinstance(m, nn.Linear) and m.bias is not None for m in sh.modules()),
            shared_activation_fn=_probe_activation(getattr(sh, "act_fn", None) or getattr(sh, "activation_fn", None)),
            shared_gate_name=shared_gate,
        )

    # The router: the one [E, D] tensor outside the experts and shared experts.
    def outside(name: str) -> bool:
        return name.split(".")[0] not in claimed

    tensors = [(n, t) for n, t in _named_tensors(block) if outside(n)]
    routers = [n for n, t in tensors if t.dim() == 2 and tuple(t.shape) == (E, D)]
    if len(routers) != 1:
        raise UnsupportedBlock(
            f"expected exactly one router weight of shape [{E}, {D}] outside the experts, found "
            f"{routers or 'none'}", cls,
        )
    rw = routers[0]
    owner = rw.rsplit(".", 1)[0] if "." in rw else ""
    rb = f"{owner}.bias" if owner else "bias"
    rb_t = dict(tensors).get(rb)
    router_bias = rb if isinstance(rb_t, Tensor) and rb_t.numel() == E else None
    rest = [(n, t) for n, t in tensors if n not in (rw, router_bias)]
    ebias = [n for n, t in rest if t.is_floating_point() and t.numel() == E]
    if len(ebias) > 1:
        raise UnsupportedBlock(f"several E-sized tensors {ebias} could be the expert-selection bias", cls)
    unexplained = tuple(n for n, t in rest if n not in ebias and t.is_floating_point())
    return BlockAnatomy(
        router_weight_name=rw, router_bias_name=router_bias, expert_bias_name=ebias[0] if ebias else None,
        unexplained=unexplained, **anat_kwargs,
    )


def _shared_layout(mod: nn.Module, D: int) -> str | None:
    def lin(name: str) -> nn.Linear | None:
        m = getattr(mod, name, None)
        return m if isinstance(m, nn.Linear) else None

    if lin("gate_proj") and lin("up_proj") and lin("down_proj") and lin("gate_proj").in_features == D:
        return "gate_up_down"
    if lin("gate_up_proj") and lin("down_proj") and lin("gate_up_proj").in_features == D:
        return "fused_gate_up"
    up = lin("up_proj") or lin("fc1")
    down = lin("down_proj") or lin("fc2")
    if up is not None and down is not None and up.in_features == D and not lin("gate_proj"):
        return "up_down"
    return None


# ----------------------------------------------------------------------------------------------
# Step 2-3: routing semantics, checked on a light copy of the block
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """A top-k routing in the spec language's terms (see TopKRouter)."""

    top_k: int
    score: str = "softmax"
    topk_order: str = "score_then_topk"
    normalize: bool = False
    scaling_factor: float = 1.0
    groups: tuple[int, int, str, int] | None = None  # (num_groups, topk_groups, group_score, top_n)
    expert_bias: bool = False

    def describe(self) -> str:
        s = f"top-{self.top_k} {self.score}"
        if self.topk_order == "topk_then_score":
            s = f"top-{self.top_k} logits then softmax"
        if self.expert_bias:
            s += " + selection bias"
        if self.groups:
            g = self.groups
            s += f", groups {g[1]}/{g[0]} by {g[2] if g[2] == 'max' else f'sum of top-{g[3]}'}"
        if self.normalize:
            s += ", normalised"
        if self.scaling_factor != 1.0:
            s += f", x{self.scaling_factor:g}"
        return s

    def router_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "topk", "top_k": self.top_k, "score": self.score}
        if self.topk_order != "score_then_topk":
            d["topk_order"] = self.topk_order
        d["normalize"] = self.normalize
        if self.scaling_factor != 1.0:
            d["scaling_factor"] = self.scaling_factor
        if self.groups:
            G, M, how, n = self.groups
            d["groups"] = {"num_groups": G, "topk_groups": M, "group_score": how}
            if how == "sum_topn":
                d["groups"]["top_n"] = n
        return d


def route(logits_TE: Tensor, r: Routing, expert_bias_E: Tensor | None) -> tuple[Tensor, Tensor]:
    """(ids_TK, weights_TK) of a routing, the same steps as codegen_templates/moe_layer.py.j2."""
    bias = expert_bias_E if (r.expert_bias and expert_bias_E is not None) else None
    if r.topk_order == "topk_then_score":
        scores = logits_TE
    else:
        scores = _SCORE_FNS[r.score](logits_TE)
    choice = scores if bias is None else scores + bias
    if r.groups:
        G, M, how, n = r.groups
        c = choice.view(choice.shape[0], G, -1)
        g = c.amax(-1) if how == "max" else c.topk(n, dim=-1).values.sum(-1)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(M, dim=-1).indices, True)
        choice = c.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(choice.shape[0], -1)
    ids = torch.topk(choice, r.top_k, dim=-1).indices
    w = scores.gather(1, ids)
    if r.topk_order == "topk_then_score":
        w = torch.softmax(w, dim=-1)
    if r.normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * r.scaling_factor


class _Recorder(nn.Module):
    """Stands in for experts / shared experts in the probe copy: records inputs, returns a known tensor."""

    def __init__(self, out_TD: Tensor):
        super().__init__()
        self.out_TD = out_TD
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        x = args[0] if args else next(iter(kwargs.values()))
        if x.numel() != self.out_TD.numel():  # an unexpected call; the probe reports it afterwards
            return torch.zeros_like(x)
        return self.out_TD.to(x.dtype).reshape(*x.shape[:-1], self.out_TD.shape[-1])


@dataclass
class Probe:
    """What the light copy of a block did on random tokens."""

    x_TD: Tensor
    logits_TE: Tensor
    expert_bias_E: Tensor | None
    ids_TK: Tensor
    weights_TK: Tensor
    output_kind: tuple[str, ...]  # ("tensor",) or ("tuple", kind of each extra element, ...)


def _light_copy(block: nn.Module, heavy: tuple[str, ...]) -> nn.Module:
    """A deep copy of ``block`` without its heavy children (replaced by empty placeholders)."""
    saved = {n: block._modules[n] for n in heavy}
    try:
        for n in heavy:
            block._modules[n] = nn.Identity()
        light = copy.deepcopy(block)
    finally:
        for n, m in saved.items():
            block._modules[n] = m
    return light


def probe_block(block: nn.Module, anat: BlockAnatomy, tokens: int = 48, seed: int = 0) -> Probe:
    """Route random tokens through a light float32 copy of ``block`` with random router weights.

    Works on meta-device blocks too (only the small router tensors are materialised).
    """
    cls = anat.block_class
    D, E = anat.hidden_size, anat.num_experts
    heavy = (anat.experts_name, *anat.shared_names)
    light = _light_copy(block, heavy)
    g = torch.Generator().manual_seed(seed)
    if any(t.is_meta for _, t in _named_tensors(light)):
        light = light.to_empty(device="cpu")
    light = light.float().eval()
    with torch.no_grad():
        # Random routing parameters: ties become unlikely and every part of the routing shows.
        for name, t in _named_tensors(light):
            if not t.is_floating_point():
                continue
            if name == anat.router_weight_name:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(D))
            elif name == anat.expert_bias_name or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + 1.0)
        routed_out = torch.randn(tokens, D, generator=g)
        shared_out = torch.randn(tokens, D, generator=g)
        experts = _Recorder(routed_out)
        light._modules[anat.experts_name] = experts
        sharers = []
        for n in anat.shared_names:
            sharers.append(_Recorder(shared_out))
            light._modules[n] = sharers[-1]
        x = torch.randn(1, tokens, D, generator=g)
        try:
            out = light(x)
        except Exception as exc:  # reported as the reason the block cannot be read
            extra = _extra_forward_args(block)
            hint = (f" (its forward also takes {', '.join(extra)}: routing that depends on more than the hidden "
                    "states, e.g. token-id hash routing, is not read)") if extra else ""
            raise UnsupportedBlock(f"probing its routing failed: {type(exc).__name__}: {exc}{hint}", cls) from exc
        w_r = _get_path(light, anat.router_weight_name)
        b_r = _get_path(light, anat.router_bias_name) if anat.router_bias_name else None
        logits = F.linear(x.view(tokens, D), w_r.float(), None if b_r is None else b_r.float())
        eb = _get_path(light, anat.expert_bias_name).reshape(E).clone() if anat.expert_bias_name else None

    # The experts must have been called once with (tokens, ids [T, K], weights [T, K]).
    if len(experts.calls) != 1:
        raise UnsupportedBlock(f"its experts module was called {len(experts.calls)} times per forward; expected once "
                               "with (hidden_states, top_k_index, top_k_weights)", cls)
    args, kwargs = experts.calls[0]
    vals = list(args) + list(kwargs.values())
    if len(vals) == 1 and isinstance(vals[0], Tensor) and vals[0].shape[0] == E * tokens:
        raise UnsupportedBlock(
            "it feeds every expert all tokens scaled by their router scores (expert(score * x), as Llama 4 does); "
            "the spec applies routing weights to expert outputs (score * expert(x))", cls,
        )
    if len(vals) < 3 or not all(isinstance(v, Tensor) for v in vals[:3]):
        raise UnsupportedBlock(
            "its experts are not called as experts(hidden_states, top_k_index, top_k_weights)"
            + (f" (called with {len(vals)} argument(s))" if len(vals) < 3 else ""), cls,
        )
    h, ids, w = vals[:3]
    if ids.is_floating_point() and not w.is_floating_point():
        ids, w = w, ids
    if h.shape[-1] != D or h.numel() != tokens * D or not torch.equal(h.reshape(tokens, D), x.view(tokens, D)):
        raise UnsupportedBlock(
            "the tokens its experts receive are not the block input (the block rescales or transforms them "
            "before the experts, e.g. by the router score); the spec applies routing weights to expert outputs", cls,
        )
    if ids.dim() != 2 or ids.shape[0] != tokens or w.shape != ids.shape:
        raise UnsupportedBlock(f"its experts receive routing of shape {tuple(ids.shape)}/{tuple(w.shape)}; expected "
                               f"[{tokens}, K] ids and weights", cls)

    # The combine: output == routed + (sigmoid gate *) shared.
    y = out[0] if isinstance(out, tuple) else out
    expect = routed_out.clone()
    if anat.shared_names:
        for s in sharers:
            if len(s.calls) != 1 or not torch.equal(s.calls[0][0][0].reshape(tokens, D), x.view(tokens, D)):
                raise UnsupportedBlock("its shared expert does not run once on the block input", cls)
        scale = 1.0
        if anat.shared_gate_name:
            wg = _get_path(light, anat.shared_gate_name).weight
            scale = torch.sigmoid(F.linear(x.view(tokens, D), wg))
        expect = expect + scale * shared_out
    if not isinstance(y, Tensor) or y.numel() != tokens * D or not torch.allclose(
        y.reshape(tokens, D), expect, rtol=1e-5, atol=1e-6
    ):
        extra = f" (parameters not accounted for: {', '.join(anat.unexplained)})" if anat.unexplained else ""
        raise UnsupportedBlock(
            "its output is not routed experts + shared experts" + (" x sigmoid gate" if anat.shared_gate_name else "")
            + f"; it transforms or adds to them in a way the spec cannot express{extra}", cls,
        )
    kind: tuple[str, ...] = ("tensor",)
    if isinstance(out, tuple):
        extras = []
        for e in out[1:]:
            if isinstance(e, Tensor) and e.shape == logits.shape and torch.allclose(e.float(), logits, atol=1e-5):
                extras.append("router_logits")
            else:
                extras.append("unknown")
        kind = ("tuple", *extras)
    return Probe(x.view(tokens, D), logits, eb, ids.long(), w.float(), kind)


def _extra_forward_args(block: nn.Module) -> list[str]:
    import inspect

    try:
        params = list(inspect.signature(block.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _same_routing(ids_a: Tensor, w_a: Tensor, ids_b: Tensor, w_b: Tensor) -> tuple[bool, str]:
    sa, pa = ids_a.sort(-1)
    sb, pb = ids_b.sort(-1)
    if not torch.equal(sa, sb):
        bad = int((sa != sb).any(-1).nonzero()[0, 0])
        return False, f"token {bad}: experts {sa[bad].tolist()} vs {sb[bad].tolist()}"
    wa, wb = w_a.gather(1, pa), w_b.gather(1, pb)
    if not torch.allclose(wa, wb, rtol=1e-4, atol=1e-7):
        return False, f"weights differ by up to {float((wa - wb).abs().max()):.3g}"
    return True, ""


@dataclass
class Declared:
    """Routing as the config declares it (None where the config says nothing)."""

    top_k: int | None
    score: str | None
    normalize: bool | None
    scaling: float | None
    groups: tuple[int, int] | None
    group_method: str | None  # "max" / "sum_topn" when topk_method says, else None
    greedy: bool  # topk_method == "greedy": groups are configured but not used


def declared_routing(cfg: Any) -> Declared:
    k = _attr(cfg, _TOP_K)
    score = _attr(cfg, _SCORE)
    if isinstance(score, str):
        score = _HF_SCORES.get(score.lower().replace("-", "_"), score)
    norm = _attr(cfg, _NORMALIZE)
    scaling = _attr(cfg, _SCALING)
    G, M = getattr(cfg, "n_group", None), getattr(cfg, "topk_group", None)
    method = getattr(cfg, "topk_method", None)
    gm = {"group_limited_greedy": "max", "noaux_tc": "sum_topn"}.get(method or "")
    groups = (int(G), int(M)) if isinstance(G, int) and isinstance(M, int) and G > 1 else None
    return Declared(
        top_k=int(k) if isinstance(k, int) else None, score=score if isinstance(score, str) else None,
        normalize=bool(norm) if norm is not None else None,
        scaling=float(scaling) if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) else None,
        groups=groups, group_method=gm, greedy=method == "greedy",
    )


def _candidates(dec: Declared, K: int, E: int, has_bias: bool) -> Iterator[Routing]:
    """Routings in the spec language, the config's declaration first, then its nearest variants."""
    scores = [dec.score] if dec.score in _SCORE_FNS else []
    scores += [s for s in ("softmax", "sigmoid") if s not in scores]
    norms = [dec.normalize] if dec.normalize is not None else [False]
    norms += [n for n in (False, True) if n not in norms]
    groups: list[tuple[int, int, str, int] | None] = []
    if dec.groups and not dec.greedy and E % dec.groups[0] == 0:
        G, M = dec.groups
        per = E // G
        methods = [dec.group_method] if dec.group_method else ["sum_topn" if has_bias else "max"]
        methods += [m for m in ("max", "sum_topn") if m not in methods]
        for m in methods:
            if m == "sum_topn" and per < 2:
                continue
            if M * per >= K:
                groups.append((G, M, m, 2))  # sum_topn: the top-2 of each group, as DeepSeek-V3
    groups.append(None)
    biases = [True, False] if has_bias else [False]
    for eb in biases:
        for g in groups:
            for s in scores:
                for order in ("score_then_topk", "topk_then_score"):
                    if order == "topk_then_score" and s != "softmax":
                        continue
                    for n in norms:
                        yield Routing(top_k=K, score=s, topk_order=order, normalize=n, groups=g, expert_bias=eb)


def identify_routing(probe: Probe, cfg: Any, block_class: str) -> tuple[Routing, list[str]]:
    """The routing that reproduces the probe exactly, declared form first; notes on deviations."""
    dec = declared_routing(cfg) if cfg is not None else Declared(None, None, None, None, None, None, False)
    K = probe.ids_TK.shape[1]
    E = probe.logits_TE.shape[1]
    notes: list[str] = []
    if dec.top_k is not None and dec.top_k != K:
        notes.append(f"config says top-{dec.top_k} but the block routes to {K} experts; following the block")
    first_mismatch = None
    for cand in _candidates(dec, K, E, probe.expert_bias_E is not None):
        ids, w = route(probe.logits_TE, cand, probe.expert_bias_E)
        if not torch.equal(ids.sort(-1).values, probe.ids_TK.sort(-1).values):
            if first_mismatch is None:
                first_mismatch = (cand, _same_routing(ids, w, probe.ids_TK, probe.weights_TK)[1])
            continue
        # Same experts: the weights may differ by a constant factor (routed_scaling_factor).
        wa = w.gather(1, ids.sort(-1).indices)
        wb = probe.weights_TK.gather(1, probe.ids_TK.sort(-1).indices)
        ratio = wb / wa.clamp_min(1e-30)
        scale = float(ratio.mean())
        if not (scale > 0 and torch.allclose(ratio, torch.full_like(ratio, scale), rtol=1e-4, atol=0)):
            if first_mismatch is None:
                why = f"weights are not a constant multiple (ratio {float(ratio.min()):.4g}..{float(ratio.max()):.4g})"
                first_mismatch = (cand, why)
            continue
        if dec.scaling is not None and math.isclose(scale, dec.scaling, rel_tol=1e-4):
            scale = dec.scaling
        elif math.isclose(scale, 1.0, rel_tol=1e-5):
            scale = 1.0
        else:
            scale = float(f"{scale:.6g}")
            notes.append(f"routing weights are scaled by {scale:g} (found by probing; config says "
                         f"{dec.scaling if dec.scaling is not None else 'nothing'})")
        r = Routing(**{**cand.__dict__, "scaling_factor": scale})
        ok, why = _same_routing(*route(probe.logits_TE, r, probe.expert_bias_E), probe.ids_TK, probe.weights_TK)
        if not ok:
            continue
        notes += _deviation_notes(dec, r, probe.expert_bias_E is not None)
        return r, notes
    cand, why = first_mismatch if first_mismatch else (None, "")
    tried = f"; the config's reading ({cand.describe()}) gives {why}" if cand else ""
    raise UnsupportedBlock(
        "its routing is not one the spec language expresses: no top-k routing (softmax/sigmoid scores, "
        "optional selection bias, group limit, normalisation, scaling) reproduces the experts and weights "
        f"it chooses{tried}", block_class,
    )


def _deviation_notes(dec: Declared, r: Routing, has_bias: bool) -> list[str]:
    notes = []
    if dec.normalize is not None and dec.normalize != r.normalize:
        notes.append(f"config norm_topk_prob={dec.normalize} but the block {'does' if r.normalize else 'does not'} "
                     "normalise the top-k weights; following the block")
    if dec.score is not None and dec.score != r.score and r.topk_order == "score_then_topk":
        notes.append(f"config scoring_func={dec.score} but the block scores with {r.score}; following the block")
    if dec.groups and not dec.greedy and r.groups is None:
        notes.append(f"config n_group={dec.groups[0]}/topk_group={dec.groups[1]} but the block does not limit groups")
    if has_bias and not r.expert_bias:
        notes.append("the block holds an expert-selection bias but does not use it")
    return notes


# ----------------------------------------------------------------------------------------------
# Spec assembly
# ----------------------------------------------------------------------------------------------


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _spec_name(cfg: Any) -> str:
    return "hf-" + re.sub(r"[^0-9a-zA-Z]+", "-", _family(cfg)).strip("-").lower()


def _moe_section(anat: BlockAnatomy, routing: Routing, cfg: Any, dtype: str) -> dict[str, Any]:
    if anat.activation_fn is None:
        raise UnsupportedBlock("its expert activation function is not one the spec knows (silu, gelu, gelu_tanh, "
                               "relu, relu2)", anat.block_class)
    table = _GATED if anat.gated else _PLAIN
    if anat.activation_fn not in table:
        raise UnsupportedBlock(f"a {'gated' if anat.gated else 'plain'} {anat.activation_fn} expert MLP has no spec "
                               "activation", anat.block_class)
    experts: dict[str, Any] = {
        "num_experts": anat.num_experts,
        "intermediate_size": anat.intermediate_size,
        "activation": table[anat.activation_fn],
    }
    if anat.expert_bias_terms or anat.shared_bias_terms:
        experts["bias"] = True
    if anat.gate_clamp is not None:
        experts["gate_clamp"] = anat.gate_clamp
    if anat.up_clamp is not None:
        experts["up_clamp"] = anat.up_clamp
    moe: dict[str, Any] = {"hidden_size": anat.hidden_size, "experts": experts}
    if anat.shared_names:
        if anat.shared_activation_fn is not None and anat.shared_activation_fn != anat.activation_fn:
            raise UnsupportedBlock(f"its shared expert uses {anat.shared_activation_fn} but the routed experts use "
                                   f"{anat.activation_fn}; the spec uses one activation", anat.block_class)
        S = anat.shared_intermediate
        count = _attr(cfg, _SHARED_COUNT) if cfg is not None else None
        count = int(count) if isinstance(count, int) and count > 0 and S % count == 0 else 1
        shared: dict[str, Any] = {"count": count}
        if S // count != anat.intermediate_size:
            shared["intermediate_size"] = S // count
        if anat.shared_gate_name:
            shared["gate"] = "sigmoid"
        moe["shared_experts"] = shared
    router = routing.router_dict()
    if routing.expert_bias:
        router["expert_bias"] = {}
    if anat.router_bias_name:
        router["router_bias"] = True
    moe["router"] = router
    moe["dtype"] = dtype
    return moe


def _layer_types(cfg: Any) -> list[str] | None:
    """Dense/MoE per decoder layer from the config's own pattern attributes (None if unknown)."""
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        return None
    types = getattr(cfg, "mlp_layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        return ["moe" if str(t).lower() in ("sparse", "moe", "experts") else "dense" for t in types]
    num_experts = _attr(cfg, _NUM_EXPERTS)
    if isinstance(getattr(cfg, "decoder_sparse_step", None), int) or isinstance(getattr(cfg, "mlp_only_layers", None), list):
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        only = set(getattr(cfg, "mlp_only_layers", None) or [])
        return ["moe" if i not in only and (num_experts or 0) > 0 and (i + 1) % step == 0 else "dense" for i in range(n)]
    if isinstance(getattr(cfg, "expert_layer_period", None), int):
        p, o = cfg.expert_layer_period, getattr(cfg, "expert_layer_offset", 0) or 0
        return ["moe" if i % p == o else "dense" for i in range(n)]
    if isinstance(getattr(cfg, "moe_layer_interval", None), int):
        lo = getattr(cfg, "moe_layer_start_index", 0) or 0
        hi = getattr(cfg, "moe_layer_end_index", None)
        hi = n - 1 if hi is None or hi < 0 else hi
        iv = cfg.moe_layer_interval
        return ["moe" if (i + 1) % iv == 0 and lo <= i <= hi else "dense" for i in range(n)]
    if isinstance(getattr(cfg, "moe_layers", None), (list, tuple)):
        s = set(cfg.moe_layers)
        return ["moe" if i in s else "dense" for i in range(n)]
    k = _attr(cfg, ("first_k_dense_replace", "first_k_dense", "num_dense_layers"))
    freq = getattr(cfg, "moe_layer_freq", None)
    k = k if isinstance(k, int) else 0
    freq = freq if isinstance(freq, int) and freq > 0 else 1
    return ["moe" if i >= k and i % freq == 0 else "dense" for i in range(n)]


def _model_section(cfg: Any, notes: list[str]) -> dict[str, Any]:
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        return {}
    model: dict[str, Any] = {"num_layers": n}
    types = _layer_types(cfg) or ["moe"] * n
    if "moe" not in types:
        notes.append("the config's layer pattern has no MoE layer; every layer is marked moe")
        types = ["moe"] * n
    k = types.index("moe")
    if types == ["dense"] * k + ["moe"] * (n - k):
        if k:
            model["first_k_dense"] = k
    else:
        model["layer_types"] = types
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        model["vocab_size"] = vocab
        model["tie_word_embeddings"] = bool(getattr(cfg, "tie_word_embeddings", False))
    if "dense" in types:
        dense = _attr(cfg, ("dense_intermediate_size", "intermediate_size", "ffn_hidden_size"))
        if isinstance(dense, int) and dense > 0:
            model["dense_intermediate_size"] = dense
    att = _attention(cfg, notes)
    if att is not None:
        model["attention"] = att
    if "dense" in types and "dense_intermediate_size" not in model:
        model.pop("vocab_size", None)
        model.pop("tie_word_embeddings", None)
        model.pop("attention", None)
        notes.append("no dense FFN size in the config: non-MoE sizes left out")
    return model


def _attention(cfg: Any, notes: list[str]) -> dict[str, Any] | None:
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        return None
    lt = getattr(cfg, "layer_types", None)
    if isinstance(lt, (list, tuple)) and any(
        any(w in str(t).lower() for w in ("mamba", "linear", "conv", "ssm", "delta", "recurrent")) for t in lt
    ):
        notes.append("hybrid attention layers (linear/state-space): attention sizes left out")
        return None
    kv_lora = getattr(cfg, "kv_lora_rank", None)
    if isinstance(kv_lora, int) and kv_lora > 0:
        att = {"kind": "mla", "num_heads": heads, "kv_lora_rank": kv_lora}
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(cfg, key, None)
            if not isinstance(v, int) or v <= 0:
                return None
            att[key] = v
        q = getattr(cfg, "q_lora_rank", None)
        if isinstance(q, int) and q > 0:
            att["q_lora_rank"] = q
        return att
    att = {"kind": "mha", "num_heads": heads}
    kv = getattr(cfg, "num_key_value_heads", None)
    if isinstance(kv, int) and kv > 0 and kv != heads:
        att["num_kv_heads"] = kv
    hd = getattr(cfg, "head_dim", None)
    hidden = getattr(cfg, "hidden_size", None)
    if isinstance(hd, int) and hd > 0 and (not isinstance(hidden, int) or hd * heads != hidden):
        att["head_dim"] = hd
    if bool(getattr(cfg, "attention_bias", False) or getattr(cfg, "qkv_bias", False)):
        att["qkv_bias"] = True
    return att


def _dtype_name(cfg: Any, default: str = "float32") -> str:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        return _DTYPE_NAMES.get(d, default)
    if isinstance(d, str):
        return {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(d.replace("torch.", ""), default)
    return default


def _build_spec(anat: BlockAnatomy, routing: Routing, cfg: Any, dtype: str, notes: list[str],
                name: str | None, with_model: bool = True) -> MoESpec:
    from .loader import load_spec

    moe = _moe_section(anat, routing, cfg, dtype)
    d: dict[str, Any] = {
        "name": name or (_spec_name(cfg) if cfg is not None else "hf-" + anat.block_class.lower()),
        "description": f"{anat.block_class}: {routing.describe()}",
        "source": _source(cfg, anat),
        "moe": moe,
    }
    if with_model and cfg is not None:
        model = _model_section(cfg, notes)
        if model:
            d["model"] = model
    return load_spec(d, source=f"transformers {anat.block_class}")


def _source(cfg: Any, anat: BlockAnatomy | None) -> str:
    try:
        import transformers

        ver = transformers.__version__
    except ImportError:  # pragma: no cover
        ver = "?"
    what = _family(cfg) if cfg is not None else (anat.block_class if anat else "?")
    path = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return f"transformers {ver} {what}" + (f" ({path})" if path else "") + "; routing checked by probing the block"


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


@dataclass
class HFImport:
    """How a block was read: its anatomy, routing, the spec and notes (attached as ``layer.hf_import``)."""

    spec: MoESpec
    anatomy: BlockAnatomy
    routing: Routing
    output_kind: tuple[str, ...]
    notes: list[str]
    max_abs_diff: float | None = None


def _find_config(block: nn.Module) -> Any:
    for m in (block, *block.children()):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def _block_dtype(block: nn.Module, anat: BlockAnatomy) -> torch.dtype:
    experts = getattr(block, anat.experts_name)
    return experts.down_proj.dtype


def read_block(block: nn.Module, config: Any = None, *, name: str | None = None, with_model: bool = False
               ) -> HFImport:
    """Anatomy + probed routing + spec of an HF MoE block (no compilation, no weights copied)."""
    config = config if config is not None else _find_config(block)
    cfg = _text_config(config) if config is not None else None
    anat = inspect_block(block, cfg)
    probe = probe_block(block, anat)
    routing, notes = identify_routing(probe, cfg, anat.block_class)
    dtype = _DTYPE_NAMES.get(_block_dtype(block, anat))
    if dtype is None:
        raise UnsupportedBlock(f"its expert weights are {_block_dtype(block, anat)}; the spec supports float32, "
                               "float16 and bfloat16", anat.block_class)
    notes = list(anat.notes) + notes
    jitter = _attr(cfg, ("router_jitter_noise", "input_jitter_noise", "moe_jitter_eps")) if cfg is not None else None
    if isinstance(jitter, (int, float)) and jitter > 0:
        notes.append(f"training-time jitter ({jitter}) of the HF block is not reproduced (eval outputs are equal)")
    spec = _build_spec(anat, routing, cfg, dtype, notes, name, with_model=with_model)
    return HFImport(spec, anat, routing, probe.output_kind, notes)


def hf_weights(block: nn.Module, anat: BlockAnatomy) -> dict[str, Tensor]:
    """The block's weights in the compiled layer's state_dict layout (views where the layout agrees)."""
    ex = getattr(block, anat.experts_name)
    E, Fh = anat.num_experts, anat.intermediate_size
    out: dict[str, Tensor] = {"router.weight": _get_path(block, anat.router_weight_name)}
    if anat.router_bias_name:
        out["router.bias"] = _get_path(block, anat.router_bias_name)
    if anat.expert_bias_name:
        out["router.expert_bias"] = _get_path(block, anat.expert_bias_name).reshape(E)

    def fix_up(t: Tensor) -> Tensor:  # [E, H, D] with gate rows first
        if anat.transposed:
            t = t.transpose(1, 2)
        if anat.interleaved:
            t = torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)
        return t

    def fix_up_bias(t: Tensor) -> Tensor:
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1) if anat.interleaved else t

    up_name = "gate_up_proj" if anat.gated else "up_proj"
    out[f"experts.{up_name}"] = fix_up(getattr(ex, up_name))
    down = ex.down_proj
    out["experts.down_proj"] = down.transpose(1, 2) if anat.transposed else down
    if anat.expert_bias_terms:
        out[f"experts.{up_name}_bias"] = fix_up_bias(getattr(ex, f"{up_name}_bias"))
        out["experts.down_proj_bias"] = ex.down_proj_bias
    if anat.shared_names:
        sh = getattr(block, anat.shared_names[0])
        if anat.shared_layout == "gate_up_down":
            ups = [sh.gate_proj, sh.up_proj]
        elif anat.shared_layout == "fused_gate_up":
            ups = [sh.gate_up_proj]
        else:
            ups = [getattr(sh, "up_proj", None) or sh.fc1]
        dn = getattr(sh, "down_proj", None) or sh.fc2
        out[f"shared_experts.{up_name}"] = ups[0].weight if len(ups) == 1 else torch.cat([u.weight for u in ups], 0)
        out["shared_experts.down_proj"] = dn.weight
        if anat.expert_bias_terms or anat.shared_bias_terms:
            S = anat.shared_intermediate * (2 if anat.gated else 1)
            biases = [u.bias if u.bias is not None else u.weight.new_zeros(u.out_features) for u in ups]
            out[f"shared_experts.{up_name}_bias"] = biases[0] if len(biases) == 1 else torch.cat(biases, 0)
            out["shared_experts.down_proj_bias"] = dn.bias if dn.bias is not None else dn.weight.new_zeros(dn.out_features)
            assert out[f"shared_experts.{up_name}_bias"].numel() == S, "shared bias size mismatch"
        if anat.shared_gate_name:
            out["shared_expert_gate.weight"] = _get_path(block, anat.shared_gate_name).weight
    if anat.expert_bias_terms is False and anat.shared_bias_terms:
        out["experts.down_proj_bias"] = ex.down_proj.new_zeros(E, anat.hidden_size)
        out[f"experts.{up_name}_bias"] = ex.down_proj.new_zeros(E, Fh * (2 if anat.gated else 1))
    return out


def torch_dtype_of(weights: dict[str, Tensor]) -> torch.dtype:
    """The parameter dtype a layer for these weights should have (that of the expert weights)."""
    return weights["experts.down_proj"].dtype


def load_hf_weights(layer: nn.Module, weights: dict[str, Tensor], *, share: bool = False) -> None:
    """Put ``weights`` into ``layer``: the same Parameter objects where ``share`` and layouts agree, else copies."""
    own = dict(layer.named_parameters())
    own.update(dict(layer.named_buffers()))
    missing = [k for k in weights if k not in own]
    assert not missing, f"layer has no {missing}"
    with torch.no_grad():
        for name, src in weights.items():
            dst = own[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise UnsupportedBlock(f"weight {name} has shape {tuple(src.shape)}, the layer expects {tuple(dst.shape)}")
            mod_path, attr = name.rsplit(".", 1)
            mod = _get_path(layer, mod_path)
            if (share and isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter) and src.dtype == dst.dtype
                    and src.device == dst.device):
                setattr(mod, attr, src)
            elif share and attr in mod._buffers and src.dtype == dst.dtype and src.device == dst.device \
                    and src.is_contiguous() and not isinstance(src, nn.Parameter):
                mod._buffers[attr] = src
            else:
                dst.copy_(src)
    layer.__dict__["_graphs"] = {}  # graphs hold the tensors they were traced with


def compare(block: nn.Module, layer: nn.Module, *, tokens: int = 16, seed: int = 0) -> tuple[float, float]:
    """(max abs diff, max abs reference) of block vs layer outputs on random tokens, in eval mode."""
    p = next(layer.parameters())
    g = torch.Generator().manual_seed(seed)
    D = layer.HIDDEN
    x = torch.randn(1, tokens, D, generator=g).to(device=p.device, dtype=layer.experts.down_proj.dtype)
    modes = (block.training, layer.training)
    block.eval()
    layer.eval()
    try:
        with torch.no_grad():
            ref = block(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            y = layer(x.clone())
    finally:
        block.train(modes[0])
        layer.train(modes[1])
    return float((y.float() - ref.float()).abs().max()), float(ref.float().abs().max())


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a compiled-vs-HF comparison (to the output's scale)."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def from_hf(
    block: nn.Module,
    config: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str = "torch",
    out_dir: str | Path | None = None,
    share_weights: bool = False,
    check: bool = True,
    name: str | None = None,
) -> nn.Module:
    """Compile the moegraph equivalent of a transformers MoE block, with the block's weights.

    Args:
        block: an MoE block of a transformers model (e.g. ``model.model.layers[1].mlp``).
        config: the model config (default: the block's or its experts' ``config``).
        dtype, device: of the compiled layer (default: those of the block's expert weights).
        share_weights: use the block's own Parameter objects where the layouts agree (no copy;
            training one trains the other). Default: independent copies.
        check: compare the compiled layer with the block on random tokens; raise if they differ.
    Returns:
        The compiled layer; ``layer.hf_import`` (an ``HFImport``) says how the block was read.
    Raises:
        UnsupportedBlock: the block uses routing or experts the spec cannot express (with the reason).
    """
    from .compiler import compile as mg_compile

    if any(t.is_meta for _, t in _named_tensors(block)):
        raise UnsupportedBlock("its weights are on the meta device (not loaded); load the weights first",
                               type(block).__name__)
    _refuse_dtensor(block)
    info = read_block(block, config, name=name)
    anat = info.anatomy
    src_dtype = _block_dtype(block, anat)
    src_device = getattr(block, anat.experts_name).down_proj.device
    layer = mg_compile(info.spec, backend=backend, out_dir=out_dir, dtype=dtype or src_dtype,
                       device=device or src_device, seed=None)
    load_hf_weights(layer, hf_weights(block, anat), share=share_weights and dtype in (None, src_dtype)
                    and device in (None, src_device))
    layer.__dict__["hf_import"] = info
    if check:
        diff, scale = compare(block, layer)
        info.max_abs_diff = diff
        if not diff <= tolerance(layer.experts.down_proj.dtype) * max(scale, 1e-6):
            raise UnsupportedBlock(
                f"the compiled layer differs from the block by {diff:.3g} (output scale {scale:.3g}) although its "
                f"routing matched ({info.routing.describe()}); the expert MLPs compute something else"
                + (f" (parameters not accounted for: {', '.join(anat.unexplained)})" if anat.unexplained else ""),
                anat.block_class,
            )
    return layer


def _refuse_dtensor(block: nn.Module) -> None:
    for n, t in _named_tensors(block):
        if type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor":
            raise UnsupportedBlock(f"weight {n} is a sharded DTensor; gather the block onto one device first "
                                   "(moegraph's expert parallelism takes a plan instead)", type(block).__name__)


# ----------------------------------------------------------------------------------------------
# Config only
# ----------------------------------------------------------------------------------------------


def load_hf_config(path: str | Path) -> Any:
    """An HF config from a config.json file (or a folder holding one).

    Known model types become their transformers config class; unknown ones a plain namespace.
    """
    from .errors import InputError

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; pass an HF config.json or a folder holding one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: not a readable JSON config: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{p}: expected a JSON object, got {type(raw).__name__}")
    mt = raw.get("model_type")
    try:
        from transformers import AutoConfig

        if mt:
            kwargs = {k: v for k, v in raw.items() if k != "model_type"}
            if "torch_dtype" in kwargs:  # the older spelling, still common in config.json files
                kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
            cfg = AutoConfig.for_model(mt, **kwargs)
            cfg._name_or_path = str(p)
            return cfg
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds for a bad config
        if "Unrecognized" not in str(exc) and "model_type" not in str(exc):
            raise InputError(f"{p}: transformers cannot read this {mt} config: {exc}") from None
    from types import SimpleNamespace

    ns = SimpleNamespace(**raw)
    ns._name_or_path = str(p)
    return ns


def _meta_block(cfg: Any) -> tuple[nn.Module | None, str]:
    """The first MoE block of the model ``cfg`` describes, built on the meta device (no memory)."""
    try:
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError:
        return None, "transformers is not installed"
    if not hasattr(cfg, "to_dict"):
        return None, f"transformers does not know model type {_family(cfg)!r}"
    types = _layer_types(_text_config(cfg))
    first = types.index("moe") if types and "moe" in types else None
    attempts = []
    small = copy.deepcopy(cfg)
    tc = _text_config(small)
    n = getattr(tc, "num_hidden_layers", None)
    if first is not None and isinstance(n, int) and n > first + 1:
        tc.num_hidden_layers = first + 1
        for key, val in list(vars(tc).items()):
            if isinstance(val, list) and len(val) == n:
                setattr(tc, key, val[: first + 1])
        attempts.append(small)
    attempts.append(cfg)
    last = ""
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for c in attempts:
            for auto in (AutoModelForCausalLM, AutoModel):
                try:
                    with torch.device("meta"):
                        model = auto.from_config(c)
                except Exception as exc:  # noqa: BLE001 - try the next way of building it
                    last = f"building the model failed ({type(exc).__name__}: {exc})"
                    continue
                for _, m in model.named_modules():
                    if is_hf_moe_block(m):
                        return m, ""
                other = [type(m).__name__ for _, m in model.named_modules()
                         if any("expert" in n.lower() for n, _ in m.named_children())]
                last = (f"its MoE blocks ({other[0]}) do not hold experts in the transformers v5 layout (3-D "
                        "gate_up_proj/up_proj and down_proj)" if other else "the model it builds has no MoE block")
    finally:
        transformers.logging.set_verbosity(prev)
    return None, last


def _known_to_transformers(cfg: Any) -> bool:
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return False
    return hasattr(cfg, "to_dict") and getattr(cfg, "model_type", None) in CONFIG_MAPPING


def _declared_only(cfg: Any) -> tuple[BlockAnatomy, Routing, list[str]]:
    """Anatomy and routing from config attributes alone (when no block can be built to probe)."""
    fam = _family(cfg)
    E = _attr(cfg, _NUM_EXPERTS)
    K = _attr(cfg, _TOP_K)
    D = getattr(cfg, "hidden_size", None)
    Fh = _attr(cfg, _EXPERT_F) or getattr(cfg, "intermediate_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (E, K, D, Fh)):
        raise UnsupportedBlock("the config lacks the expert count, top-k, hidden or expert size (looked for "
                               f"{'/'.join(_NUM_EXPERTS)}, {'/'.join(_TOP_K)}, hidden_size, {'/'.join(_EXPERT_F)})", fam)
    act = getattr(cfg, "hidden_act", "silu")
    act = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
           "relu": "relu", "relu2": "relu2"}.get(act)
    shared_count = _attr(cfg, _SHARED_COUNT) or 0
    shared_f = _attr(cfg, _SHARED_F)
    S = 0
    if isinstance(shared_f, int) and shared_f > 0:
        S = shared_f
    elif isinstance(shared_count, int) and shared_count > 0:
        S = shared_count * Fh
    anat = BlockAnatomy(
        block_class=fam, experts_name="experts", num_experts=E, hidden_size=D, intermediate_size=Fh, gated=act != "relu2",
        transposed=False, interleaved=False, expert_bias_terms=False, activation_fn=act, router_weight_name="gate.weight",
        router_bias_name=None, expert_bias_name=None, shared_names=("shared_experts",) if S else (),
        shared_layout="gate_up_down" if S else None, shared_intermediate=S,
    )
    dec = declared_routing(cfg)
    score = dec.score or "softmax"
    if score not in _SCORE_FNS:
        raise UnsupportedBlock(f"scoring function {dec.score!r} is not one the spec knows", fam)
    groups = None
    if dec.groups and not dec.greedy and E % dec.groups[0] == 0:
        groups = (dec.groups[0], dec.groups[1], dec.group_method or "max", 2)
    r = Routing(top_k=K, score=score, normalize=bool(dec.normalize), scaling_factor=dec.scaling or 1.0, groups=groups)
    return anat, r, ["routing read from config attributes only (transformers could not build the block to check it)"]


def spec_from_hf_config(config: Any, *, name: str | None = None, probe: bool = True) -> MoESpec:
    """The spec of the model an HF config describes: MoE layer (checked on a meta-built block) + model section.

    With ``probe`` (default) the first MoE block is built on the meta device and read like
    ``from_hf`` reads a real block (only its router is materialised, with random weights), so the
    routing is the block's, not a guess from attribute names. Without transformers support for the
    model type, the config attributes alone are used (noted in the spec's description).
    """
    if isinstance(config, (str, Path)):
        config = load_hf_config(config)
    cfg = _text_config(config)
    notes: list[str] = []
    block, why = _meta_block(config) if probe else (None, "probing disabled")
    if block is not None:
        anat = inspect_block(block, cfg)
        routing, rnotes = identify_routing(probe_block(block, anat), cfg, anat.block_class)
        notes += rnotes
    elif probe and _known_to_transformers(config):
        # transformers implements this family, so its code (not its attribute names) is the
        # reference; a block we cannot build or read is refused rather than guessed from the config.
        raise UnsupportedBlock(f"transformers implements it but {why}; pass --no-probe to read the config "
                               "attributes alone (unchecked)", _family(cfg))
    else:
        anat, routing, dnotes = _declared_only(cfg)
        notes += dnotes + ([why] if why else [])
    spec = _build_spec(anat, routing, cfg, _dtype_name(cfg), notes, name)
    if notes:
        spec = spec.model_copy(update={"description": spec.description + "; notes: " + "; ".join(notes)})
    return spec
