"""Spec assembly: anatomy + routing (+ config) -> MoESpec."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import UnsupportedBlock
from ..semantics.activations import is_inline
from ..spec import MoESpec
from .anatomy import BlockAnatomy
from .model_section import _model_section
from .routing import Routing
from .vocab import _SHARED_COUNT, DTYPE_NAMES, GATED_ACT, PLAIN_ACT, _attr, _family


def _spec_name(cfg: Any) -> str:
    return "hf-" + re.sub(r"[^0-9a-zA-Z]+", "-", _family(cfg)).strip("-").lower()


def _moe_section(anat: BlockAnatomy, routing: Routing, cfg: Any, dtype: str) -> dict[str, Any]:
    if anat.activation_fn is None:
        raise UnsupportedBlock("its expert activation function is not one the spec knows (silu, gelu, gelu_tanh, "
                               "relu, relu2)", anat.block_class)
    table = GATED_ACT if anat.gated else PLAIN_ACT
    if anat.gated and is_inline(anat.activation_fn):  # an expression of gate and up, read from the block
        table = {anat.activation_fn: anat.activation_fn}
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
    if routing.on_input:
        experts["routing_weight"] = "input"
    if anat.identity_experts:
        experts["identity_experts"] = anat.identity_experts
    if anat.zero_experts:
        experts["zero_experts"] = anat.zero_experts
    if anat.pre_norm is not None:
        experts["input_norm"] = dict(anat.pre_norm)
    if anat.expert_norm is not None:
        experts["output_norm"] = dict(anat.expert_norm)
    moe: dict[str, Any] = {"hidden_size": anat.hidden_size, "experts": experts}
    if anat.expert_width:
        moe["expert_projection"] = {"size": anat.expert_width}
    if anat.shared_names:
        if anat.shared_activation_fn is not None and anat.shared_activation_fn != anat.activation_fn:
            raise UnsupportedBlock(f"its shared expert uses {anat.shared_activation_fn} but the routed experts use "
                                   f"{anat.activation_fn}; the spec uses one activation", anat.block_class)
        S = anat.shared_intermediate
        count = anat.shared_count or (_attr(cfg, _SHARED_COUNT) if cfg is not None else None)
        count = int(count) if isinstance(count, int) and count > 0 and S % count == 0 else 1
        shared: dict[str, Any] = {"count": count}
        if S // count != anat.intermediate_size:
            shared["intermediate_size"] = S // count
        if anat.shared_gate_name:
            shared["gate"] = "sigmoid"
        if anat.shared_routed:
            shared["gate"] = "router"
        if anat.shared_norm is not None:
            shared["output_norm"] = dict(anat.shared_norm)
        moe["shared_experts"] = shared
    router = routing.router_dict()
    if routing.expert_bias:
        router["expert_bias"] = {"applies_to": "logits"} if routing.bias_on_logits else {}
    if anat.router_bias_name:
        router["router_bias"] = True
    if anat.router_network is not None:
        router["mlp"] = [dict(layer) for layer in anat.router_network.layers]
    moe["router"] = router
    if anat.output_norm_name:
        moe["output_norm"] = {"kind": "rms", "eps": anat.output_norm_eps}
    if anat.output_bias_name:
        moe["output_bias"] = True
    moe["dtype"] = dtype
    return moe


def _dtype_name(cfg: Any, default: str = "float32") -> str:
    # transformers >= 5 calls it ``dtype``; reading the old ``torch_dtype`` property prints a deprecation
    # warning, so look for the older spelling only where an old config object stored it itself.
    d = getattr(cfg, "dtype", None) or vars(cfg).get("torch_dtype")
    if isinstance(d, torch.dtype):
        return DTYPE_NAMES.get(d, default)
    if isinstance(d, str):
        return {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(d.replace("torch.", ""), default)
    return default


def build_spec(anat: BlockAnatomy, routing: Routing, cfg: Any, dtype: str, notes: list[str],
               name: str | None, with_model: bool = True, *, description: str | None = None,
               source: str | None = None, quantization: dict[str, Any] | None = None) -> MoESpec:
    """The spec of a block from its anatomy and routing (+ the model config, for the model section).

    Both sources of anatomy end here: registry blocks (``block``, ``config``) and a user's own
    blocks read from their structure (``structural``, which names its own description and source).
    """
    from ..loader import load_spec

    moe = _moe_section(anat, routing, cfg, dtype)
    if quantization is not None:  # FP8 experts (hf/quant.py)
        moe["quantization"] = quantization
    d: dict[str, Any] = {
        "name": name or (_spec_name(cfg) if cfg is not None else "hf-" + anat.block_class.lower()),
        "description": description or f"{anat.block_class}: {routing.describe()}",
        "source": source or _source(cfg, anat),
        "moe": moe,
    }
    if with_model and cfg is not None:
        model = _model_section(cfg, notes)
        if model:
            d["model"] = model
    return load_spec(d, source=f"transformers {anat.block_class}" if source is None else f"structural {anat.block_class}")



def _source(cfg: Any, anat: BlockAnatomy | None) -> str:
    try:
        import transformers

        ver = transformers.__version__
    except ImportError:  # pragma: no cover
        ver = "?"
    what = _family(cfg) if cfg is not None else (anat.block_class if anat else "?")
    path = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return f"transformers {ver} {what}" + (f" ({path})" if path else "") + "; routing checked by probing the block"
