"""Parameter, FLOP and memory accounting for a spec (what ``moegraph show`` prints).

Counts are exact for the layer as the spec describes it. Whole-model totals need the optional
non-MoE sizes in ``model`` (attention, vocab, dense FFN size); without them only MoE figures are given.
Norm weights are counted (two RMSNorms per layer, the final norm, MLA's latent norms).

Memory: with ``moe.quantization`` the quantized experts take one byte per weight plus one float32
scale per weight block (biases stay in the layer dtype); the bytes in the layer dtype are reported
beside them so the saving can be read off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .semantics import DTYPE_BYTES
from .spec import MHAttention, MLAttention, MoESpec, QuantizationSpec

#: bytes of one stored FP8 value and of one block scale (float32, also for ue8m0 powers of two)
FP8_BYTES, SCALE_BYTES = 1, 4


def mlp_params(d: int, f: int, gated: bool, bias: bool) -> int:
    """Parameters of one D -> F -> D MLP (gated MLPs have a gate and an up projection)."""
    n_in = 2 if gated else 1
    p = n_in * d * f + f * d
    if bias:
        p += n_in * f + d
    return p


def mlp_bytes(d: int, f: int, gated: bool, bias: bool, dtype: str, quant: QuantizationSpec | None) -> int:
    """Bytes of one D -> F -> D MLP: in ``dtype``, or FP8 weights + block scales (+ biases in dtype)."""
    if quant is None:
        return mlp_params(d, f, gated, bias) * DTYPE_BYTES[dtype]
    n_in = 2 if gated else 1
    bo, bi = quant.weight_block
    weights = (n_in * f * d + d * f) * FP8_BYTES
    scales = (n_in * f // bo * (d // bi) + d // bo * (f // bi)) * SCALE_BYTES
    biases = (n_in * f + d) * DTYPE_BYTES[dtype] if bias else 0
    return weights + scales + biases


def attention_params(spec: MoESpec) -> int | None:
    a, d = spec.model.attention, spec.moe.hidden_size
    if a is None:
        return None
    if isinstance(a, MHAttention):
        hd = a.head_dim or d // a.num_heads
        kv = a.num_kv_heads or a.num_heads
        p = d * a.num_heads * hd + 2 * d * kv * hd + a.num_heads * hd * d
        if a.qkv_bias:
            p += a.num_heads * hd + 2 * kv * hd
        return p
    assert isinstance(a, MLAttention), f"unknown attention kind {type(a)}"
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank is None:
        q = d * a.num_heads * qk
    else:
        q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
    o = a.num_heads * a.v_head_dim * d
    return q + kv + o


@dataclass
class LayerCounts:
    routed_expert: int  # one routed expert
    shared: int  # all shared experts of one layer (and their gate)
    router: int  # the router, and the always-active weights around the experts (expert projections and norms)
    routed_total: int  # all routed experts of one layer
    routed_active: int  # the K experts one token uses


@dataclass
class Summary:
    spec: MoESpec
    layer: LayerCounts
    num_moe_layers: int
    num_dense_layers: int
    moe_total: int  # every MoE layer, all experts + shared + router
    moe_active: int  # every MoE layer, per token
    model_total: int | None = None
    model_active: int | None = None
    flops_per_token_moe: int = 0  # 2 * active MoE params (multiply-adds) over all MoE layers
    flops_per_token_model: int | None = None
    expert_bytes_per_layer: int = 0  # routed + shared experts of one layer, as stored (FP8 + scales if quantized)
    expert_bytes_per_layer_dtype: int = 0  # the same in the layer dtype (equal when not quantized)
    routed_expert_bytes: int = 0  # one routed expert, as stored
    shared_bytes: int = 0  # the shared experts of one layer, as stored
    expert_bytes_per_gpu: int = 0  # all MoE layers: the GPU's routed slots + one copy of the shared experts
    rows: list[tuple[int, str, int, int]] = field(default_factory=list)  # (layer, kind, total, active)


def summarize(spec: MoESpec) -> Summary:
    m, d = spec.moe, spec.moe.hidden_size
    gated, bias = m.experts.gated, m.experts.bias
    # A weight per expert in its output norm is one of the expert's own tensors (it moves with the expert).
    own_norm = m.expert_width if m.experts.output_norm is not None and m.experts.output_norm.per_expert else 0
    routed_one = mlp_params(m.expert_width, m.experts.intermediate_size, gated, bias) + own_norm
    shared = m.shared_experts.count * mlp_params(d, m.shared_intermediate_size, gated, bias)
    shared_extra = (d if m.shared_experts.gate == "sigmoid" else 0) + (d if m.shared_experts.output_norm else 0)
    shared += shared_extra
    e = m.experts.num_experts
    unscored_hash = m.router.type == "hash" and m.router.score is None  # no router weights at all
    rows = m.router_rows  # the router's outputs: experts, identity/zero experts, routed shared experts
    router = 0 if unscored_hash else rows * d + (rows if getattr(m.router, "router_bias", False) else 0)
    norm = getattr(m.router, "input_norm", None)  # the router's learned scales (router transforms)
    router += (d if norm is not None and norm.weight else 0) + (1 if getattr(m.router, "learned_logit_scale", False)
                                                                else 0) + (e if getattr(m.router, "per_expert_scale", False) else 0)
    router += 1 if getattr(m.router, "learned_weight_scale", False) else 0
    mlp = getattr(m.router, "mlp", ())
    if mlp:  # a router network: its layers, and router.weight maps its output (not the input) to the logits
        width = d
        for layer_ in mlp:
            if layer_.op == "linear":
                router += layer_.size * width + (layer_.size if layer_.bias else 0)
                width = layer_.size
            elif layer_.op == "rms_norm" or (layer_.op == "state" and layer_.receive):
                router += width  # a norm's weight, a state's scale
        router += rows * (width - d)
    proj = m.expert_projection  # the projections around the experts and the norms in their space: always active
    if proj is not None:
        router += 2 * d * proj.size
    one_output_weight = m.experts.output_norm is not None and not own_norm  # one weight for every expert
    router += m.expert_width * ((m.experts.input_norm is not None) + one_output_weight)
    k = m.top_k
    layer = LayerCounts(routed_one, shared, router, routed_one * e, routed_one * k)

    types = spec.model.resolved_layer_types()
    n_moe, n_dense = types.count("moe"), types.count("dense")
    moe_total = n_moe * (layer.routed_total + shared + router)
    moe_active = n_moe * (layer.routed_active + shared + router)
    s = Summary(spec, layer, n_moe, n_dense, moe_total, moe_active)
    s.flops_per_token_moe = 2 * moe_active
    q = m.quantization
    s.routed_expert_bytes = (mlp_bytes(m.expert_width, m.experts.intermediate_size, gated, bias, m.dtype, q)
                             + own_norm * DTYPE_BYTES[m.dtype])
    s.shared_bytes = shared * DTYPE_BYTES[m.dtype]
    if q is not None and q.shared_experts and m.shared_experts.count:
        s.shared_bytes = (mlp_bytes(d, m.shared_experts.count * m.shared_intermediate_size, gated, bias, m.dtype, q)
                          + shared_extra * DTYPE_BYTES[m.dtype])
    s.expert_bytes_per_layer = s.routed_expert_bytes * e + s.shared_bytes
    s.expert_bytes_per_layer_dtype = (layer.routed_total + shared) * DTYPE_BYTES[m.dtype]
    slots_per_gpu = -(-(e + spec.placement.redundant_slots) // spec.topology.num_gpus)
    s.expert_bytes_per_gpu = n_moe * (slots_per_gpu * s.routed_expert_bytes + s.shared_bytes)

    attn = attention_params(spec)
    mdl = spec.model
    dense_ffn = mlp_params(d, mdl.dense_intermediate_size, gated, bias) if mdl.dense_intermediate_size else 0
    norms = 2 * d
    for i, t in enumerate(types):
        a = (attn or 0) + norms
        if t == "moe":
            s.rows.append((i, t, a + layer.routed_total + shared + router, a + layer.routed_active + shared + router))
        else:
            s.rows.append((i, t, a + dense_ffn, a + dense_ffn))
    if attn is not None and mdl.vocab_size is not None:
        emb = mdl.vocab_size * d * (1 if mdl.tie_word_embeddings else 2)
        body_total = sum(r[2] for r in s.rows)
        body_active = sum(r[3] for r in s.rows)
        s.model_total = body_total + emb + d
        # Active = weights a token's forward multiplies with: the input embedding is a lookup, so
        # only the output projection (lm_head, tied or not) counts.
        s.model_active = body_active + mdl.vocab_size * d + d
        # Forward FLOPs per token: 2 per multiply-add of every weight touched (attention scores excluded).
        s.flops_per_token_model = 2 * (body_active + mdl.vocab_size * d)
    return s


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for scale, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"
