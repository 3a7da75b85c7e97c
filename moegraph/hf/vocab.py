"""Config attribute vocabulary across transformers families, and the spec's score/activation names."""

from __future__ import annotations

from typing import Any

from ..semantics import ACTIVATIONS, DTYPES, torch_dtype
from ..semantics import torch_forms

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

# The spec's score names the importer tries, as functions of the logits (from semantics.scores).
_SCORE_FNS = {name: (lambda x, name=name: torch_forms.scores(x, name))
              for name in ("softmax", "sigmoid", "softplus", "sqrt_softplus", "tanh")}

# The spec's gated and plain activation names, by the elementwise function an HF expert applies
# (from the activation table's ``elementwise`` names).
GATED_ACT = {a.elementwise: n for n, a in ACTIVATIONS.items() if a.gated and a.elementwise}
PLAIN_ACT = {a.elementwise: n for n, a in ACTIVATIONS.items() if not a.gated and a.elementwise}
_ACT_FNS = {fn: (lambda x, n=n: torch_forms.activate(x, ACTIVATIONS[n])) for fn, n in PLAIN_ACT.items()}
#: forward arguments of a block that carry the token ids of its hidden states (DeepSeek-V4's decoder passes
#: ``input_ids`` to every MoE block, hash-routed or not)
TOKEN_ID_ARGS = ("input_ids", "token_ids")
_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp", "shared_experts_mlp")


DTYPE_NAMES = {torch_dtype(n): n for n in DTYPES}


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
