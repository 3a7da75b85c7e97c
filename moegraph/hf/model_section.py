"""The spec's model section (layer pattern, dense FFN, vocabulary, attention) from an HF config."""

from __future__ import annotations

from typing import Any

from .vocab import _NUM_EXPERTS, _attr


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
