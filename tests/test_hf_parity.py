"""Compiled layers against the transformers MoE blocks they were read from (weights copied by from_hf).

Every block is built from a small seeded float32 config, all its weights (router included: HF
initialises some routers to zero, which would make every score tie) and selection biases are
randomised, and the compiled layer must match the block's eager experts implementation (and
grouped_mm where it runs) in output, input gradient and weight gradients.
"""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moegraph
from moegraph.errors import UnsupportedBlock
from moegraph.hf import from_hf, hf_weights, spec_from_hf_config

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*torch_dtype.*")

D = 32

# family -> (block class, config overrides). Sizes tiny; every routing feature of the family on.
FAMILIES: dict[str, tuple[str, dict]] = {
    "deepseek_v2": ("DeepseekV2Moe", dict(
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0)),
    "deepseek_v2_lite": ("DeepseekV2Moe", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3MoE", dict(
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, n_shared_experts=1, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "mixtral": ("MixtralSparseMoeBlock", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    "qwen2_moe": ("Qwen2MoeSparseMoeBlock", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=40,
        norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)),
    "qwen3_next": ("Qwen3NextSparseMoeBlock", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        norm_topk_prob=True)),
    "olmoe": ("OlmoeSparseMoeBlock", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "granitemoe": ("GraniteMoeMoE", dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=16)),
    "jamba": ("JambaSparseMoeBlock", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=16)),
    "minimax_m2": ("MiniMaxM2SparseMoeBlock", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "glm4_moe": ("Glm4MoeMoE", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=2,
        topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True)),
    "dots1": ("Dots1MoE", dict(
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=2, n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False)),
    "ernie4_5_moe": ("Ernie4_5_MoeSparseMoeBlock", dict(
        moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Moe", dict(num_experts=8, moe_topk=2, intermediate_size=24)),
    "lfm2_moe": ("Lfm2MoeSparseMoeBlock", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        routed_scaling_factor=1.5, use_expert_bias=True)),
    # Experts stored transposed ([E, D, 2F], is_transposed=True), shared experts.
    "aria": ("AriaTextMoELayer", dict(
        moe_num_experts=8, moe_topk=2, moe_intermediate_size=16, moe_num_shared_experts=1)),
    # Plain (non-gated) relu2 experts, sigmoid + selection bias + groups, latent projection off.
    "nemotron_h": ("NemotronHMoE", dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2, topk_group=1,
        moe_shared_expert_intermediate_size=24, norm_topk_prob=True, routed_scaling_factor=2.0,
        mlp_hidden_act="relu2", moe_latent_size=None)),
    # Clamped SwiGLU (its own _apply_gate, read numerically), sqrt(softplus) scores + selection bias.
    "deepseek_v4": ("DeepseekV4SparseMoeBlock", dict(
        num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, routed_scaling_factor=1.5,
        mlp_layer_types=["moe", "moe"])),
    # Hash layers: experts from the token id -> experts table (tid2eid, in the checkpoint), weighted by the
    # router's sqrt(softplus) scores, normalised and scaled.
    "deepseek_v4_hash": ("DeepseekV4SparseMoeBlock", dict(
        num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, routed_scaling_factor=1.5,
        mlp_layer_types=["hash_moe"] * 2)),
    # The routing weight scales the expert input, expert(w * x) (every expert sees every token, zero-weighted
    # where not chosen); sigmoid of the top-1 logit; a shared expert; experts stored [E, D, 2F].
    "llama4": ("Llama4TextMoe", dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=16)),
    # Zero-computation (identity) experts after the MLP experts: router over 8 + 4 choices, softmax, selection bias.
    "longcat_flash": ("LongcatFlashMoE", dict(
        n_routed_experts=8, zero_expert_num=4, num_experts_per_tok=3, expert_ffn_hidden_size=16,
        routed_scaling_factor=2.0)),
    # The block scales the routed experts' sum itself (after the experts): folded into the routing scale.
    # Experts stored as DBRX does (mlp.w1 / v1 / w2, each [E*F, D]), read into the same layer; L1-normalised top-k.
    "dbrx": ("DbrxFFN", dict(ffn_config=dict(hidden_size=D, moe_num_experts=8, moe_top_k=2, ffn_hidden_size=16,
                                             moe_normalize_expert_weights=1.0))),
    "beam": ("BeamMoE", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2, topk_group=1,
                             routed_scaling_factor=2.5, head_dim=8)),
    # Its own _apply_gate, (clamp(up) + 1) * g * sigmoid(alpha * g) with g = clamp(gate), identified numerically
    # as an inline expression; gate/up rows interleaved; router and expert biases; softmax over the top-k logits.
    "gpt_oss": ("GptOssMLP", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16)),
    # The same with a limit and alpha the test weights reach (the clamps active for some rows).
    "gpt_oss_tight_limit": ("GptOssMLP", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
                                              swiglu_limit=0.5, swiglu_alpha=1.25)),
    # GPT-OSS's gate with concatenated (not interleaved) gate/up rows, a limit the test weights reach.
    "openai_privacy_filter": ("OpenAIPrivacyFilterMLP", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            intermediate_size=16, swiglu_limit=0.6)),
    # Softcapped SwiGLU: c_g tanh(gate / c_g) sigmoid(gate) * c_u tanh(up / c_u), the caps in the activation module.
    "inkling2": ("Inkling2SparseMoeBlock", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                mlp_gate_softcap=0.7, mlp_up_softcap=1.1)),
    # GPT-OSS's gate (alpha from swiglu_alpha), concatenated rows, sigmoid scores with a selection bias.
    "minimax_m3_vl": ("MiniMaxM3VLSparseMoeBlock", dict(num_local_experts=8, num_experts_per_tok=2,
                                                        intermediate_size=16, swiglu_limit=0.5)),
    # DeepSeek-V3's block with an RMS norm of routed + shared experts (post_mlp_layernorm): moe.output_norm.
    "axk1": ("AXK1MoE", dict(
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, n_shared_experts=1, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5)),
    # Shared experts with their own router rows ([8 + 2, D] router), stored [n, F, D]: their sigmoid scores are
    # normalised together with the chosen experts' (shared_experts.gate: router), times route_scale and a learned
    # scalar global_scale (read as a constant).
    "inkling": ("InklingMoE", dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                   moe_intermediate_size=16, route_scale=2.0)),
    # Experts as a ModuleDict of E small relu MLPs (wi, wo), called with a one-hot dispatch mask; top-1 softmax;
    # an expert capacity of 2 tokens per sequence (the earliest kept), which the test's 5-token sequences exceed.
    "switch_transformers": ("SwitchTransformersSparseMLP", dict(num_experts=4, expert_capacity=2, d_model=D, d_ff=16,
                                                                dense_act_fn="relu")),
    # Experts in two modules (input_linear [E, 2F, D], output_linear [E, D, F]) called on rows sorted by expert,
    # softmax over the top-k logits, and a learned bias on the output (moe.output_bias).
    "jetmoe": ("JetMoeMoE", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
                                 activation_function="silu")),
    # Phi-MoE's sparsemixer (inference form; eps from router_jitter_noise, wide enough here that the softmax
    # masks keep several experts): router.sparsemixer.
    "phimoe": ("PhimoeSparseMoeBlock", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16,
                                            router_jitter_noise=0.3)),
    # The selection bias is added to the logits, the weights are the sigmoid of the chosen logits, normalised;
    # a shared expert: expert_bias.applies_to: logits.
    "kolibri1": ("Kolibri1SparseMoeBlock", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                norm_topk_prob=True, shared_expert_intermediate_size=24)),
    # Router logits softcapped, c * tanh(logits / c), before sigmoid scores and a selection bias; the block scales
    # the routed output (folded into the routing scale): router.logit_softcap.
    "laguna_softcap": ("LagunaSparseMoeBlock", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                    shared_expert_intermediate_size=24, moe_router_logit_softcapping=0.8,
                                                    moe_routed_scaling_factor=2.0)),
    # The experts in a space of their own: the block input projected 32 -> 24 and normalised ((1 + w) after the
    # norm), each expert's output normalised ((1 + w) before the norm) before its weight, the weighted sum projected
    # back; logits times a constant of a bias-free router: moe.expert_projection, experts.output_norm.
    "muse_spark": ("MuseSparkMoE", dict(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                        moe_hidden_size=24, routed_scaling_factor=2.0)),
    # Non-gated relu2 experts stored transposed, each route's expert output RMS-normalised with its expert's own
    # [D] row of post_expert_norm.weight [E, D] before its weight (experts.output_norm.per_expert); a shared MLP
    # followed by its own RMS norm (shared_experts.output_norm); sigmoid + selection bias, normalised and scaled.
    "ergo": ("ErgoMoE", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_intermediate_size=24, moe_routed_scaling_factor=2.0, rms_norm_eps=1e-6)),
}
# family -> (transformers module, config model_type) where they differ from the family name
MODULE = {"deepseek_v2_lite": "deepseek_v2", "deepseek_v4_hash": "deepseek_v4", "gpt_oss_tight_limit": "gpt_oss",
          "laguna_softcap": "laguna"}
CONFIG_TYPE = {"deepseek_v2_lite": "deepseek_v2", "deepseek_v4_hash": "deepseek_v4", "gpt_oss_tight_limit": "gpt_oss",
               "laguna_softcap": "laguna",
               "aria": "aria_text", "llama4": "llama4_text", "inkling2": "inkling2_text", "inkling": "inkling_text",
               "minimax_m3_vl": "minimax_m3_vl_text", "muse_spark": "muse_spark_text"}

# family -> words the refusal must contain
REFUSED: dict[str, tuple[str, dict, str]] = {
    # A mixture of attention heads, driven through map/reduce by its attention: no block call to replace.
    "jetmoe": ("JetMoeMoA", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, kv_channels=8),
               "raises NotImplementedError"),
}

# Zaya: a router network (D -> 16 with bias, + the previous layer's state x scale, RMS norm, two GELU layers, -> 5)
# whose fifth choice is a skip (a zero expert), passed to the experts as (expert 0, weight 0).
ZAYA = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, router_hidden_size=16)


def _config(family: str, overrides: dict):
    cfg = transformers.AutoConfig.for_model(CONFIG_TYPE.get(family, family))
    base = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=64,
                hidden_act="silu", intermediate_size=48, first_k_dense_replace=1)
    n0 = cfg.num_hidden_layers
    for k, v in {**base, **overrides}.items():
        if isinstance(v, dict) and hasattr(getattr(cfg, k, None), "to_dict"):  # a sub-config (DBRX's ffn_config)
            for sk, sv in v.items():
                setattr(getattr(cfg, k), sk, sv)
        else:
            setattr(cfg, k, v)
    for k, v in list(vars(cfg).items()):  # per-layer lists follow the new layer count
        if isinstance(v, list) and len(v) == n0 and k != "mlp_only_layers":
            setattr(cfg, k, (v * cfg.num_hidden_layers)[: cfg.num_hidden_layers])
    cfg._experts_implementation = "eager"
    return cfg


# LongCat's softmax over 12 choices gives scores near 0.08: a selection bias of 0.3 would decide every choice alone.
SELECTION_BIAS_SCALE = {"longcat_flash": 0.02}


def make_block(family: str, overrides: dict, cls_name: str, seed: int = 0) -> torch.nn.Module:
    model_type = MODULE.get(family, family)
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    cfg = _config(family, overrides)
    torch.manual_seed(seed)
    cls = getattr(mod, cls_name)
    try:
        block = cls(cfg)
    except TypeError:
        block = cls(cfg, layer_idx=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            if t.is_floating_point():
                scale = 0.3 if "bias" in name and t.dim() <= 2 and t.numel() <= 64 else 0.2
                scale = SELECTION_BIAS_SCALE.get(family, scale) if "correction_bias" in name else scale
                t.copy_(torch.randn(t.shape, generator=g) * scale)
                if t.numel() == 1 and "bias" not in name:  # a learned scalar scale (Inkling's global_scale): near 1
                    t.add_(1.0)
            elif t.dim() == 2 and t.dtype != torch.bool:  # a token id -> experts table: distinct experts per row
                E = cfg.num_local_experts
                t.copy_(torch.rand(t.shape[0], E, generator=g).argsort(-1)[:, : t.shape[1]])
    return block.float().eval()


def _grads_in_layer_layout(block, anat) -> dict[str, torch.Tensor]:
    """The block's parameter gradients, mapped into the compiled layer's layout by from_hf's own mapping."""
    params = [p for p in block.parameters() if p.requires_grad]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        return {k: v.detach().clone() for k, v in hf_weights(block, anat).items()}
    finally:
        for p, d in zip(params, saved):
            p.data = d


# Gradients are compared to 1e-5 relative with an absolute floor of 1e-5 of the tensor's largest
# entry (summation order differs between the implementations). LFM2-MoE normalises the top-k weights
# by (sum + 1e-6) where the spec uses (sum + 1e-20): its router gradient gets a looser floor.
GRAD_ATOL = {"lfm2_moe": 1e-4}


def _close(a: torch.Tensor, ref: torch.Tensor, floor: float, what: str) -> None:
    atol = max(1e-7, floor * float(ref.abs().max()))
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_parity(block, layer, impl: str = "eager", grad_atol: float = 1e-5) -> None:
    if hasattr(getattr(block, "experts", None), "config"):  # Llama 4's experts have one implementation only
        block.experts.config._experts_implementation = impl
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, D, generator=g)
    r = torch.randn(2, 5, D, generator=g)
    x_ref = x.clone().requires_grad_(True)
    x_mg = x.clone().requires_grad_(True)
    arg = layer.hf_import.token_arg
    ids = torch.randint(0, 64, (2, 5), generator=g) if arg else None  # the configs' vocab_size
    out = block(x_ref, **({arg: ids} if arg else {}))
    y_ref = out[0] if isinstance(out, tuple) else out
    if layer.hf_import.flat_output:  # Llama 4 returns [tokens, D]
        y_ref = y_ref.view(x.shape)
    y = layer(x_mg, ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    (y_ref * r).sum().backward()
    (y * r).sum().backward()
    _close(x_mg.grad, x_ref.grad, 1e-5, "input gradient")
    hf_grads = _grads_in_layer_layout(block, layer.hf_import.anatomy)
    own = dict(layer.named_parameters())
    checked = 0
    for name, g_ref in hf_grads.items():
        p = own.get(name)
        if p is None or not p.requires_grad or name == "router.expert_bias":
            continue
        assert p.grad is not None, f"{name} got no gradient"
        _close(p.grad, g_ref, grad_atol, f"gradient of {name}")
        checked += 1
    assert checked >= 3, f"only {checked} weight gradients compared"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_eager(family: str) -> None:
    cls_name, overrides = FAMILIES[family]
    block = make_block(family, overrides, cls_name)
    layer = from_hf(block)
    info = layer.hf_import
    assert info.max_abs_diff is not None and info.max_abs_diff < 1e-5
    _check_parity(block, layer, "eager", grad_atol=GRAD_ATOL.get(family, 1e-5))


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "mixtral"])
def test_parity_grouped_mm(family: str) -> None:
    cls_name, overrides = FAMILIES[family]
    block = make_block(family, overrides, cls_name)
    layer = from_hf(block)
    try:
        _check_parity(block, layer, "grouped_mm")
    except (RuntimeError, NotImplementedError) as exc:  # grouped_mm kernel absent on this build
        if "grouped" in str(exc).lower():
            pytest.skip(f"grouped_mm unavailable: {exc}")
        raise


def test_routing_read_from_each_family() -> None:
    """The routing found for each family is the one its HF code implements (read from modeling_*.py)."""
    expected = {
        "deepseek_v2": dict(score="softmax", normalize=False, scaling_factor=2.0,
                            groups=dict(num_groups=4, topk_groups=2, group_score="max")),
        "deepseek_v2_lite": dict(score="softmax", normalize=False, groups=None),
        "deepseek_v3": dict(score="sigmoid", normalize=True, scaling_factor=2.5,
                            groups=dict(num_groups=4, topk_groups=2, group_score="sum_topn", top_n=2)),
        "granitemoe": dict(score="softmax"),
        "jamba": dict(score="softmax", normalize=False),
        "lfm2_moe": dict(score="sigmoid", normalize=True, scaling_factor=1.5),
        "deepseek_v4": dict(score="sqrt_softplus", normalize=True, scaling_factor=1.5),
        "minimax_m2": dict(score="sigmoid", normalize=True),
        "qwen2_moe": dict(score="softmax", normalize=False),
        "phimoe": dict(score="softmax", sparsemixer=dict(jitter_eps=0.3), normalize=False, expert_bias=None),
        "kolibri1": dict(score="sigmoid", normalize=True, expert_bias=dict(update_rate=0.001, applies_to="logits")),
        "laguna_softcap": dict(score="sigmoid", normalize=True, logit_softcap=0.8, scaling_factor=2.0,
                               expert_bias=dict(update_rate=0.001)),
        "muse_spark": dict(score="sigmoid", normalize=True, scaling_factor=2.0, expert_bias=dict(update_rate=0.001),
                           input_norm=dict(kind="none", eps=1e-6, weight=False, multiplier=0.1767766952966369)),
        "ergo": dict(score="sigmoid", normalize=True, scaling_factor=2.0, expert_bias=dict(update_rate=0.001)),
    }
    for family, want in expected.items():
        cls_name, overrides = FAMILIES[family]
        r = from_hf(make_block(family, overrides, cls_name), check=False).hf_import.spec.moe.router
        got = r.model_dump(mode="json")
        for key, value in want.items():
            if isinstance(value, dict):
                assert {k: got[key][k] for k in value} == value, (family, key, got[key])
            else:
                assert got[key] == value, (family, key, got[key])
    # DeepSeek-V4's own gate function is read as a clamped SwiGLU (limit from the experts module).
    cls_name, overrides = FAMILIES["deepseek_v4"]
    e = from_hf(make_block("deepseek_v4", overrides, cls_name), check=False).hf_import.spec.moe.experts
    assert (e.activation, e.gate_clamp, e.up_clamp) == ("swiglu", 10.0, 10.0)
    # GPT-OSS's gate function is read as an inline expression with its limit and alpha.
    cls_name, overrides = FAMILIES["gpt_oss"]
    e = from_hf(make_block("gpt_oss", overrides, cls_name), check=False).hf_import.spec.moe.experts
    assert e.activation == "(clamp(up, -7.0, 7.0) + 1) * clamp(gate, max=7.0) * sigmoid(1.702 * clamp(gate, max=7.0))"
    assert (e.gate_clamp, e.up_clamp, e.bias) == (None, None, True)
    # Selection biases are found wherever the family keeps them (router, block, router statics).
    for family in ("deepseek_v3", "minimax_m2", "ernie4_5_moe", "lfm2_moe"):
        cls_name, overrides = FAMILIES[family]
        spec = from_hf(make_block(family, overrides, cls_name), check=False).hf_import.spec
        assert spec.moe.router.expert_bias is not None, family


class GemmaMoEHalf(torch.nn.Module):
    """The MoE half of a Gemma 4 decoder layer, with the family's own router, experts and norm modules called as the
    layer calls them: the router normalises and scales its input (RMS norm, a learned [D] scale, hidden_size ** -0.5)
    and scales each chosen expert's weight by a learned per-expert scale; the experts see a separately normalised
    input (pre_feedforward_layernorm_2), and an RMS norm follows them.

    (The decoder layer itself also holds attention and a dense MLP beside the experts; that layer is not read here.)
    """

    def __init__(self, family: str, cfg):
        super().__init__()
        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        prefix = {"gemma4": "Gemma4", "diffusion_gemma": "DiffusionGemma"}[family]
        self.router = getattr(mod, f"{prefix}TextRouter")(cfg)
        self.experts = getattr(mod, f"{prefix}TextExperts")(cfg)
        self.post_feedforward_layernorm_2 = getattr(mod, f"{prefix}RMSNorm")(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_feedforward_layernorm_2 = getattr(mod, f"{prefix}RMSNorm")(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, top_k_weights, top_k_index = self.router(flat)
        out = self.experts(self.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights).reshape(hidden_states.shape)
        return self.post_feedforward_layernorm_2(out)


@pytest.mark.parametrize("family", ["gemma4", "diffusion_gemma"])
def test_gemma_router_transforms(family: str) -> None:
    """Gemma 4's router (input norm with a learned scale and a constant, per-expert scales) read by probing into
    router.input_norm and router.per_expert_scale; outputs, input and weight gradients (the router's scales
    included) match the family's own modules."""
    cmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    cfg_cls = {"gemma4": "Gemma4TextConfig", "diffusion_gemma": "DiffusionGemmaTextConfig"}[family]
    kw = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_hidden_layers=2,
              vocab_size=64, intermediate_size=48, num_experts=8, top_k_experts=2, moe_intermediate_size=16)
    if family == "gemma4":
        kw["enable_moe_block"] = True
    cfg = getattr(cmod, cfg_cls)(**kw)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    block = GemmaMoEHalf(family, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # scales around one (HF starts them at one), the rest around zero
        for name, t in block.named_parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if "scale" in name else 0.0))
    block = block.float().eval()
    layer = from_hf(block)
    r = layer.hf_import.spec.moe.router
    assert r.per_expert_scale and r.expert_bias is None and r.normalize and r.score == "softmax"
    assert r.input_norm.model_dump() == {"kind": "rms", "eps": cfg.rms_norm_eps, "weight": True, "multiplier": D ** -0.5}
    assert layer.hf_import.spec.moe.output_norm is not None
    assert layer.hf_import.spec.moe.experts.input_norm.model_dump() == {
        "kind": "rms", "eps": cfg.rms_norm_eps, "weight_offset": 0.0, "scale": "after"}
    assert layer.hf_import.anatomy.pre_norm_name == "pre_feedforward_layernorm_2"
    assert layer.hf_import.anatomy.unexplained == ()
    _check_parity(block, layer)
    grads = dict(layer.named_parameters())  # the router's own scales and both norms were compared (and got gradients)
    for name in ("router.per_expert_scale", "router.input_norm.weight", "pre_expert_norm.weight", "output_norm.weight"):
        assert grads[name].grad.abs().max() > 0, name


def test_inkling_global_scale_reads_as_a_learned_weight_scale() -> None:
    """Inkling's router multiplies its weights (the shared experts' included) by route_scale and the learned
    global_scale: the constant reads as scaling_factor (route_scale, 2.0 in FAMILIES), the learned one as
    router.weight_scale with its value. Outputs and every gradient match the block's (_check_parity); the scale's
    gradient is d loss / d global_scale, non-zero, and another value in the block moves the layer read from it."""
    cls_name, overrides = FAMILIES["inkling"]
    block = make_block("inkling", overrides, cls_name)
    value = block.gate.global_scale.item()
    assert abs(value - 1.0) > 0.05  # (make_block puts it near one, not at one, or scaling_factor could hide it)
    layer = from_hf(block)
    r = layer.hf_import.spec.moe.router
    assert r.learned_weight_scale and r.scaling_factor == overrides["route_scale"]
    assert layer.hf_import.anatomy.weight_scale_name == "gate.global_scale"
    assert not any("global_scale" in n for n in layer.hf_import.notes), layer.hf_import.notes
    assert layer.router.weight_scale.item() == value
    _check_parity(block, layer)
    assert block.gate.global_scale.grad.abs().item() > 1e-4
    torch.testing.assert_close(layer.router.weight_scale.grad, block.gate.global_scale.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        block.gate.global_scale.fill_(1.5)
    other = from_hf(block)
    assert other.hf_import.spec.hash() == layer.hf_import.spec.hash() and other.router.weight_scale.item() == 1.5


def test_ergo_norms_read_per_expert_and_after_the_shared_mlp() -> None:
    """Ergo's post_expert_norm (one [E, D] weight, a row per expert, that no has_post_expert_norm declares) reads as
    experts.output_norm with per_expert, its shared expert's own norm as shared_experts.output_norm, both found by
    structure and their forms numerically; the rows are the block's, in expert order (the parity tests compare)."""
    cls_name, overrides = FAMILIES["ergo"]
    block = make_block("ergo", overrides, cls_name)
    layer = from_hf(block)
    m = layer.hf_import.spec.moe
    form = {"kind": "rms", "eps": 1e-6, "weight_offset": 0.0, "scale": "after"}
    assert m.experts.output_norm.model_dump() == {**form, "per_expert": True}
    assert m.shared_experts.output_norm.model_dump() == form and not m.shared_experts.output_norm.per_expert
    assert (m.experts.activation, m.shared_experts.count, m.shared_experts.intermediate_size) == ("relu2", 1, 24)
    assert torch.equal(layer.experts.output_norm_weight, block.experts.post_expert_norm.weight)
    assert torch.equal(layer.shared_expert_norm.weight, block.shared_experts.norm.weight)
    assert layer.hf_import.anatomy.unexplained == ()


def test_deepseek_v2_ignores_norm_topk_prob_and_says_so() -> None:
    cls_name, overrides = FAMILIES["deepseek_v2"]
    block = make_block("deepseek_v2", {**overrides, "norm_topk_prob": True}, cls_name)
    layer = from_hf(block)
    assert layer.hf_import.spec.moe.router.normalize is False
    assert any("norm_topk_prob" in n for n in layer.hf_import.notes)
    _check_parity(block, layer)



def test_topk_then_softmax_is_read_once_without_normalize() -> None:
    """A router that takes the top-k of its biased logits, then a softmax over the chosen (unbiased) logits: its
    weights sum to 1 whether or not the spec says normalize, so the reader tries that order once, without it (the
    simpler reading, whatever norm_topk_prob says), and notes no deviation from norm_topk_prob."""
    from types import SimpleNamespace

    from moegraph.hf.probe import Probe
    from moegraph.hf.routing import Declared, _candidates, identify_routing, route

    g = torch.Generator().manual_seed(3)
    T, E, K = 64, 8, 2
    logits = torch.randn(T, E, generator=g) * 2
    bias = torch.randn(E, generator=g)  # selection only: it makes score-then-top-k choose other experts
    ids = torch.topk(logits + bias, K, dim=-1).indices
    chosen = logits.gather(1, ids)
    weights = chosen.exp() / chosen.exp().sum(-1, keepdim=True)  # the block's softmax, written out
    probe = Probe(x_TD=torch.zeros(T, D), logits_TE=logits, expert_bias_E=bias, ids_TK=ids, weights_TK=weights,
                  output_kind=("tensor",))
    for declared in (True, False):
        cfg = SimpleNamespace(num_experts_per_tok=K, norm_topk_prob=declared)
        r, notes = identify_routing(probe, cfg, "TopKThenSoftmaxBlock")
        assert (r.topk_order, r.score, r.expert_bias, r.normalize) == ("topk_then_score", "softmax", True, False)
        assert r.router_dict()["normalize"] is False and not any("norm_topk_prob" in n for n in notes), notes
        got_ids, got_w = route(logits, r, bias)
        assert torch.equal(got_ids, ids)
        torch.testing.assert_close(got_w, weights, rtol=1e-6, atol=1e-7)
        dec = Declared(K, None, declared, None, None, None, False)
        assert not [c for c in _candidates(dec, K, E, True, {"softcap": [0.8]}) if c.topk_order == "topk_then_score"
                    and c.normalize]

def test_shared_weights_are_the_blocks_own() -> None:
    cls_name, overrides = FAMILIES["deepseek_v3"]
    block = make_block("deepseek_v3", overrides, cls_name)
    layer = from_hf(block, share_weights=True)
    assert layer.experts.gate_up_proj is block.experts.gate_up_proj
    assert layer.experts.down_proj is block.experts.down_proj
    copied = from_hf(block)
    assert copied.experts.gate_up_proj is not block.experts.gate_up_proj
    assert copied.experts.gate_up_proj.data_ptr() != block.experts.gate_up_proj.data_ptr()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float32)])
def test_layer_of_another_dtype_than_the_block(dtypes) -> None:
    """from_hf(block, dtype=...) with a dtype other than the block's: the default check fed the block the layer's
    dtype and raised RuntimeError (m1 and m2 of different dtypes). Each side now gets the tokens in its own dtype,
    compared in float32 within the tolerance of the lower precision; the layer computes in the dtype asked for."""
    block_dtype, layer_dtype = dtypes
    cls_name, overrides = FAMILIES["mixtral"]
    block = make_block("mixtral", overrides, cls_name).to(block_dtype)
    layer = from_hf(block, dtype=layer_dtype)
    assert layer.compute_dtype == layer_dtype and layer.experts.gate_up_proj.dtype == layer_dtype
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = block(x.to(block_dtype))
        y = layer.eval()(x.to(layer_dtype))
    ref = (ref[0] if isinstance(ref, tuple) else ref).float()
    assert y.dtype == layer_dtype
    assert float((y.float() - ref).abs().max()) <= 3e-2 * float(ref.abs().max())


@pytest.mark.parametrize("family", ["switch_transformers", "mixtral"])
def test_dropout_in_the_experts_is_reported(family: str) -> None:
    """Switch Transformers' experts drop hidden units in training (dropout_rate 0.1 by default), which the compiled
    layer does not: the read said nothing (its check runs in eval mode). Now hf_import.training names the dropout
    modules and from_hf warns (at once for a block in train() mode, else when the layer is set to train() mode);
    Mixtral (no dropout, no jitter) gets neither. The block in train() mode differs from
    its eval output, the layer in train() mode gives the eval output."""
    cls_name, overrides = FAMILIES[family]
    block = make_block(family, overrides, cls_name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = from_hf(block.train())  # a block in train() mode: warned at once
    said = [str(w.message) for w in caught if "moegraph.from_hf" in str(w.message)]
    training = layer.hf_import.training
    if family == "mixtral":
        assert not training and not said
        return
    assert any("dropout (p=0.1) in 4 module(s)" in n and "experts.expert_0" in n for n in training), training
    assert any("jitter (0.01)" in n for n in training) and all(n in layer.hf_import.notes for n in training)
    assert len(said) == len(training) and all(cls_name in w for w in said) and layer.training
    with warnings.catch_warnings(record=True) as caught:  # a block in eval() mode: warned when the layer trains
        warnings.simplefilter("always")
        served = from_hf(block.eval())
        assert not served.training and not caught
        served.train()
        served.eval().train()
    assert len(caught) == len(training) and all("train() on a layer made by moegraph.from_hf" in str(w.message)
                                                and w.filename == __file__ for w in caught)  # the user's line
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    def out(y):
        return y[0] if isinstance(y, tuple) else y

    with torch.no_grad():
        want = out(block.eval()(x))
        torch.manual_seed(0)
        # (a clone: Switch's router jitter multiplies its float32 input in place)
        assert not torch.allclose(out(block.train()(x.clone())), want, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(layer.train()(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(REFUSED))
def test_refused_with_reason(family: str) -> None:
    cls_name, overrides, words = REFUSED[family]
    block = make_block(family, overrides, cls_name)
    with pytest.raises(UnsupportedBlock, match=words) as info:
        from_hf(block)
    assert cls_name in str(info.value)


def test_meta_block_refused_by_from_hf() -> None:
    _, overrides = FAMILIES["mixtral"]
    with torch.device("meta"):
        block = importlib.import_module("transformers.models.mixtral.modeling_mixtral").MixtralSparseMoeBlock(
            _config("mixtral", overrides))
    with pytest.raises(UnsupportedBlock, match="meta device"):
        from_hf(block)


def test_not_an_moe_block() -> None:
    with pytest.raises(UnsupportedBlock, match="no experts module"):
        from_hf(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "deepseek_v2", "ergo"])
def test_config_spec_agrees_with_block_spec(family: str) -> None:
    """spec_from_hf_config (block built on the meta device) == what from_hf reads from a real block."""
    cls_name, overrides = FAMILIES[family]
    cfg = _config(family, overrides)
    from_config = spec_from_hf_config(cfg)
    from_block = from_hf(make_block(family, overrides, cls_name), cfg, check=False).hf_import.spec
    assert from_config.moe == from_block.moe
    assert from_config.model.num_layers == 2


def test_import_hf_cli(tmp_path, run_cli) -> None:
    cfg = _config("deepseek_v3", {**FAMILIES["deepseek_v3"][1], "num_hidden_layers": 4, "first_k_dense_replace": 1})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "spec.yaml"
    res = run_cli("import-hf", str(path), "-o", str(out))
    assert res.code == 0, res.err
    assert "moe layers=3" in res.err
    spec = moegraph.load_spec(out)
    assert spec.model.first_k_dense == 1 and spec.model.num_layers == 4
    assert spec.model.attention.kind == "mla"
    r = spec.moe.router
    assert (r.score, r.top_k, r.normalize, r.scaling_factor) == ("sigmoid", 4, True, 2.5)
    assert r.groups.group_score == "sum_topn" and r.expert_bias is not None
    assert spec.moe.shared_experts.count == 1
    # The written spec compiles.
    layer = moegraph.compile(spec.model_copy(update={"model": spec.model}), seed=0)
    assert layer(torch.randn(3, D)).shape == (3, D)


def test_import_hf_layer_patterns(tmp_path, run_cli) -> None:
    cfg = _config("qwen2_moe", {**FAMILIES["qwen2_moe"][1], "num_hidden_layers": 4, "mlp_only_layers": [0],
                                "decoder_sparse_step": 1})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    res = run_cli("import-hf", str(path))
    assert res.code == 0, res.err
    assert "first_k_dense: 1" in res.out and "gate: sigmoid" in res.out
    cfg.mlp_only_layers = [2]
    spec = spec_from_hf_config(cfg)
    assert spec.model.resolved_layer_types() == ("moe", "moe", "dense", "moe")


def test_import_hf_bad_inputs(tmp_path, run_cli) -> None:
    res = run_cli("import-hf", str(tmp_path / "missing.json"))
    assert res.code == 2 and "no such file" in res.err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = run_cli("import-hf", str(bad))
    assert res.code == 2 and "not a readable JSON" in res.err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "my_own_moe", "hidden_size": 64, "num_experts": 8,
                                   "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_hidden_layers": 2,
                                   "norm_topk_prob": True}))
    res = run_cli("import-hf", str(unknown), "-o", str(tmp_path / "unknown.yaml"))
    assert res.code == 0, res.err
    spec = moegraph.load_spec(tmp_path / "unknown.yaml")
    assert "config attributes only" in spec.description and spec.moe.router.normalize is True
    inconsistent = tmp_path / "inconsistent.json"
    inconsistent.write_text(json.dumps({"model_type": "qwen2_moe", "num_hidden_layers": 2, "layer_types": ["x"] * 5}))
    res = run_cli("import-hf", str(inconsistent))
    assert res.code == 2 and "transformers cannot read this qwen2_moe config" in res.err


def test_config_of_unreadable_family_refused() -> None:
    """A family transformers implements in another experts layout is refused, not read from attribute names."""
    cfg = transformers.AutoConfig.for_model("jetmoe", hidden_size=32, num_local_experts=4, num_experts_per_tok=2,
                                            intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                            kv_channels=8)
    # (the first block with experts it meets is JetMoE's mixture-of-attention module, which is no MoE MLP)
    with pytest.raises(UnsupportedBlock, match="JetMoeMoA") as info:
        spec_from_hf_config(cfg)
    assert "its forward raises NotImplementedError" in str(info.value)


def test_switch_transformers_config_read_with_its_capacity() -> None:
    """Switch Transformers' config reads (its experts listed as E MLPs) with the expert capacity the probe found on
    the block: an absolute count per sequence, the earliest tokens kept."""
    cfg = transformers.AutoConfig.for_model("switch_transformers", num_layers=4, num_decoder_layers=4, d_model=32,
                                            d_ff=64, num_experts=4, num_heads=2, d_kv=8, num_sparse_encoder_layers=2,
                                            num_sparse_decoder_layers=2, expert_capacity=5)
    m = spec_from_hf_config(cfg).moe
    assert (m.experts.num_experts, m.experts.intermediate_size, m.experts.activation, m.router.top_k) == (4, 64, "relu", 1)
    c = m.router.capacity
    assert (c.tokens, c.per, c.drop_policy, c.factor) == (5, "sequence", "position", None)


def test_longcat_identity_experts_are_chosen() -> None:
    """The LongCat parity check means something only if tokens pick the identity experts."""
    cls_name, overrides = FAMILIES["longcat_flash"]
    layer = from_hf(make_block("longcat_flash", overrides, cls_name))
    assert (layer.hf_import.spec.moe.experts.identity_experts, layer.hf_import.spec.moe.experts.zero_experts) == (4, 0)
    layer.start_recording()
    layer(torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1)))
    ids = layer.stop_recording().ids()
    assert (ids >= 8).any() and (ids < 8).any(), ids


class _ExtraChoicesExperts(torch.nn.Module):
    """Experts in the transformers v5 layout [E, ., .]. With ``extra`` = (identity, zero) they also handle those
    router choices after the E MLP experts (LongCat's up to transformers 5.24); without, an id >= E is an error."""

    def __init__(self, E: int, F: int, extra: tuple[int, int] | None):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * F, D, generator=g) * 0.2)
        self.down_proj = torch.nn.Parameter(torch.randn(E, D, F, generator=g) * 0.2)
        self.act_fn = torch.nn.SiLU()
        self.num_experts, self.extra = E, extra

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        if self.extra is None and bool((ids >= E).any()):
            raise IndexError(f"expert id {int(ids.max())} of {E} experts")
        out = torch.zeros_like(x)
        for e in range(E + (sum(self.extra) if self.extra else 0)):
            tok, pos = torch.where(ids == e)
            if e >= E:  # an identity, then a zero expert
                h = x[tok] if e < E + self.extra[0] else torch.zeros_like(x[tok])
            else:
                gate, up = torch.nn.functional.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
                h = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, tok, h * w[tok, pos, None])
        return out


class _ExtraChoicesBlock(torch.nn.Module):
    """A softmax top-3 router over 6 MLP experts, then ``identity`` identity and ``zero`` zero experts (a selection
    bias, weights x2). ``beside``: the block handles those choices itself, handing them to its experts as weight-0
    choices and adding x times their weight (LongCat since transformers 5.25); else its experts do."""

    def __init__(self, identity: int, zero: int, beside: bool, zero_first: bool = False):
        super().__init__()
        self.E, self.identity, self.zero, self.beside, self.zero_first = 6, identity, zero, beside, zero_first
        self.experts = _ExtraChoicesExperts(self.E, 8, None if beside else (identity, zero))
        self.router = torch.nn.Linear(D, self.E + identity + zero, bias=False)
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=g) * 0.5)
        self.e_score_correction_bias = torch.nn.Buffer(torch.randn(self.E + identity + zero, generator=g) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        scores = self.router(x).softmax(-1)
        ids = (scores + self.e_score_correction_bias).topk(3, dim=-1).indices
        w = scores.gather(1, ids) * 2.0
        if not self.beside:
            return self.experts(x, ids, w).reshape(shape)
        E, n_id = self.E, self.identity
        extra = ids >= E
        ident = extra & ((ids >= E + self.zero) if self.zero_first else (ids < E + n_id))
        beside = x * w.masked_fill(~ident, 0.0).sum(-1, keepdim=True)
        ids, w = torch.where(extra, ids % E, ids), w.masked_fill(extra, 0.0)
        return (self.experts(x, ids, w) + beside).reshape(shape)


@pytest.mark.parametrize("beside", [False, True])
def test_identity_and_zero_experts_in_the_experts_or_beside_them(beside: bool) -> None:
    """Choices beyond the MLP experts read the same whether the experts module handles them (transformers <= 5.24's
    LongCat) or the block does around it (>= 5.25): 3 identity and 2 zero experts, the layer equal to the block."""
    block = _ExtraChoicesBlock(3, 2, beside).eval()
    layer = from_hf(block)
    ex = layer.hf_import.spec.moe.experts
    assert (ex.num_experts, ex.identity_experts, ex.zero_experts) == (6, 3, 2)
    x = torch.randn(4, 8, D, generator=torch.Generator().manual_seed(2))
    layer.start_recording()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-6)
    ids = layer.stop_recording().ids()
    assert (ids >= 9).any() and ((ids >= 6) & (ids < 9)).any(), ids  # tokens chose identity and zero experts


def test_zero_experts_before_identity_ones_beside_the_experts_refused() -> None:
    with pytest.raises(UnsupportedBlock, match=r"the weights of identity choices \(then zero choices\)"):
        from_hf(_ExtraChoicesBlock(3, 2, True, zero_first=True).eval())


class _OwnGateExperts(torch.nn.Module):
    """A user's experts module with its own gate function and constants it does not expose."""

    def __init__(self, fn, limit=None):
        super().__init__()
        self.fn = fn
        if limit is not None:
            self.limit = limit

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.fn(gate, up)


def test_gate_function_identified_numerically_or_refused() -> None:
    from moegraph.hf.anatomy import _read_gate_function
    from moegraph.semantics import torch_forms

    # alpha is not an attribute: fitted from the function's values, then checked against it.
    experts = _OwnGateExperts(lambda g, u: (u.clamp(-2, 2) + 1) * g.clamp(max=2) * torch.sigmoid(1.5 * g.clamp(max=2)),
                              limit=2.0)
    act, clamps = _read_gate_function(experts, False, "Own")
    assert act == "(clamp(up, -2.0, 2.0) + 1) * clamp(gate, max=2.0) * sigmoid(1.5 * clamp(gate, max=2.0))"
    assert clamps == (None, None)
    # The clamp after the activation (Step-3.7's form).
    experts = _OwnGateExperts(lambda g, u: torch.nn.functional.silu(g).clamp(max=3.0) * u.clamp(-3, 3), limit=3.0)
    act, _ = _read_gate_function(experts, False, "Own")
    h = torch.randn(50, 8) * 6
    torch.testing.assert_close(torch_forms.activate(h, act), experts._apply_gate(h))
    # A form none of the candidates is: refused, saying what was tried.
    experts = _OwnGateExperts(lambda g, u: torch.sigmoid(g) * u * u, limit=3.0)
    with pytest.raises(UnsupportedBlock, match=r"\(limit=3.0\) that is none of the forms the importer tries"):
        _read_gate_function(experts, False, "Own")


def test_per_layer_specs_of_a_config_with_two_layer_kinds() -> None:
    """DeepSeek-V4 with a hash layer and a top-k layer: spec_from_hf_config refuses (one spec describes one kind),
    naming both; layer_specs_from_hf_config gives one spec per kind, each the one from_hf reads off that layer."""
    from moegraph.hf import layer_specs_from_hf_config, read_block

    cls_name, overrides = FAMILIES["deepseek_v4"]
    cfg = _config("deepseek_v4", {**overrides, "mlp_layer_types": ["hash_moe", "moe"]})
    with pytest.raises(UnsupportedBlock, match=r"2 kinds.*token id table.*layer_specs_from_hf_config"):
        spec_from_hf_config(cfg)
    kinds = layer_specs_from_hf_config(cfg)
    assert [paths for paths, _ in kinds] == [["model.layers.0.mlp"], ["model.layers.1.mlp"]]
    assert [s.moe.router.type for _, s in kinds] == ["hash", "topk"]
    assert kinds[1][1].name == kinds[0][1].name + "-kind1"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    for paths, spec in kinds:
        block = model.get_submodule(paths[0])
        assert read_block(block, cfg).spec.moe == spec.moe, paths
    # One kind: the same spec as before.
    one = _config("deepseek_v4", {**overrides, "mlp_layer_types": ["moe", "moe"]})
    assert [p for p, _ in layer_specs_from_hf_config(one)] == [["model.layers.0.mlp", "model.layers.1.mlp"]]
    assert spec_from_hf_config(one).moe == layer_specs_from_hf_config(one)[0][1].moe


@pytest.mark.parametrize("layer_idx", [1, 0])
def test_zaya_router_network_state_and_skip(layer_idx: int) -> None:
    mod = importlib.import_module("transformers.models.zaya.modeling_zaya")
    block = make_block("zaya", ZAYA, "ZayaSparseMoeBlock")
    if layer_idx == 0:  # the first layer: no state comes in, its own goes out
        torch.manual_seed(0)
        block = mod.ZayaSparseMoeBlock(_config("zaya", ZAYA), layer_idx=0).float().eval()
        with torch.no_grad():
            for _, t in block.named_parameters():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())) * 0.2)
    with torch.no_grad():
        block.gate.balancing_biases.zero_()
        block.gate.balancing_biases[-1] = 0.15  # some tokens choose the skip
    layer = from_hf(block)
    router = layer.hf_import.spec.moe.router
    assert [m.op for m in router.mlp] == ["linear", "state", "rms_norm", "linear", "activation", "linear", "activation"]
    assert router.mlp[1].receive == (layer_idx == 1) and router.mlp[4].function == "gelu"
    assert layer.hf_import.spec.moe.experts.zero_experts == 1 and router.expert_bias is not None
    assert layer.hf_import.output_kind == ("tuple", "router_state")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, D, generator=g)
    s_in = torch.randn(2, 5, 16, generator=g)
    r_y, r_s = torch.randn(2, 5, D, generator=g), torch.randn(2, 5, 16, generator=g)
    x_ref, x_mg = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    s_ref, s_mg = s_in.clone().requires_grad_(True), s_in.clone().requires_grad_(True)
    y_ref, st_ref = block(x_ref, s_ref)
    layer.start_recording()
    y, st = layer(x_mg, router_state=s_mg)
    skips = int((layer.stop_recording().ids() == 4).sum())
    assert 0 < skips < 20, skips  # (router id 4: the zero expert after the 4 MLP experts)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st, st_ref, rtol=1e-5, atol=1e-6)
    ((y_ref * r_y).sum() + (st_ref * r_s).sum()).backward()
    ((y * r_y).sum() + (st * r_s).sum()).backward()
    _close(x_mg.grad, x_ref.grad, 1e-5, "input gradient")
    if layer_idx == 1:
        _close(s_mg.grad, s_ref.grad, 1e-5, "router state gradient")
    else:  # the first layer ignores a state handed to it, as Zaya's does
        assert s_ref.grad is None and s_mg.grad is None
    hf_grads = _grads_in_layer_layout(block, layer.hf_import.anatomy)
    own = dict(layer.named_parameters())
    names = [n for n in hf_grads if n in own and n != "router.expert_bias"]
    assert {"router.mlp.0.weight", "router.mlp.2.weight", "router.mlp.5.bias", "router.weight"} <= set(names)
    assert ("router.mlp.1.scale" in names) == (layer_idx == 1)
    for name in names:
        _close(own[name].grad, hf_grads[name], 1e-5, f"gradient of {name}")
