"""moegraph.optimize on whole models: transformers models of several families and a user's naive MoE.

Each model is small, random and float32: logits before and after the swap must match (rtol 1e-4),
greedy generation must produce the same tokens, and the report must say what was swapped and why
the rest was not.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import moegraph
from moegraph import hf
from moegraph.errors import UnsupportedBlock
from moegraph.swap import MoEBlockAdapter, OptimizeReport, read_structural

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*torch_dtype.*")

VOCAB = 64


def tiny_config(model_type: str, **kw):
    cfg = transformers.AutoConfig.for_model(model_type)
    n0 = cfg.num_hidden_layers
    base = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for k, v in {**base, **kw}.items():
        setattr(cfg, k, v)
    for k, v in list(vars(cfg).items()):  # per-layer lists follow the new layer count
        if isinstance(v, list) and len(v) == n0 and k != "mlp_only_layers":
            setattr(cfg, k, (v * cfg.num_hidden_layers)[: cfg.num_hidden_layers])
    return cfg


MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8)
MODELS = {
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                        first_k_dense_replace=1, **MLA),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, **MLA),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
    # Its decoder passes input_ids to every MoE block: the hash layer routes by them (token id -> experts table
    # shipped with the weights), the top-k layer ignores them.
    "deepseek_v4": dict(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, routed_scaling_factor=1.5,
                        mlp_layer_types=["hash_moe", "moe"], head_dim=8),
    # Routing weight on the expert input (expert(w * x)), sigmoid top-1, shared expert; returns [tokens, D].
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=16, intermediate_size_mlp=48,
                        head_dim=8, interleave_moe_layer_step=1),
    # Zero-computation (identity) experts among the router's choices.
    "longcat_flash": dict(n_routed_experts=8, zero_expert_num=4, num_experts_per_tok=3, expert_ffn_hidden_size=16,
                          ffn_hidden_size=48, routed_scaling_factor=2.0, qk_head_dim=16, **MLA),
    # Shared experts weighted by their own router rows, normalised with the chosen experts (shared_experts.gate: router).
    "inkling_text": dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=16,
                         route_scale=2.0, head_dim=8),
    # Phi-MoE's sparsemixer (router.sparsemixer), eps wide enough that its masks keep several experts.
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, head_dim=8, router_jitter_noise=0.3),
    # Selection bias on the logits (expert_bias.applies_to: logits), sigmoid weights normalised, shared expert.
    "kolibri1": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True, head_dim=8,
                     shared_expert_intermediate_size=24),
    # Softcapped router logits (router.logit_softcap), sigmoid scores + selection bias, routed output scaled.
    "laguna": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                   head_dim=8, moe_router_logit_softcapping=0.8, moe_routed_scaling_factor=2.0),
    # A router that is a small network passing its state to the next layer's router (router.mlp with a state step:
    # layer 0 only returns it), and a skip choice reported as (expert 0, weight 0): a zero expert.
    "zaya": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, router_hidden_size=16),
}
# Experts in two modules (input_linear / output_linear) and an output bias (test_jetmoe_...).
JETMOE = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, kv_channels=8, activation_function="silu")


def make_model(model_type: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **{**MODELS.get(model_type, {}), **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF initialises some routers and selection biases to zero: randomise them
        for name, t in model.named_buffers():
            if "bias" in name and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif "tid2eid" in name:  # DeepSeek-V4's token id -> experts table (zeros until a checkpoint loads)
                E = model.config.num_local_experts
                t.copy_(torch.rand(t.shape[0], E, generator=g).argsort(-1)[:, : t.shape[1]])
        for name, p in model.named_parameters():  # JetMoE's output bias starts at zero
            if name.endswith("mlp.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if hf.is_hf_moe_block(m):
                try:
                    anat = hf.inspect_block(m)
                except UnsupportedBlock:
                    continue
                w = hf.get_path(m, anat.router_weight_name)
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("model_type", list(MODELS))
def test_hf_model_logits_and_generation(model_type: str) -> None:
    model = make_model(model_type)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    gen_ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    n_blocks = sum(hf.is_hf_moe_block(m) for m in model.modules())
    assert n_blocks >= 1

    out_model = moegraph.optimize(model)
    assert out_model is model
    report = model.moegraph_report
    assert isinstance(report, OptimizeReport)
    assert len(report.swapped) == n_blocks and not report.not_swapped, str(report)
    assert sum(isinstance(m, MoEBlockAdapter) for m in model.modules()) == n_blocks
    assert not any(hf.is_hf_moe_block(m) for m in model.modules() if not isinstance(m, MoEBlockAdapter)
                   and not any(m is a.moe for a in model.modules() if isinstance(a, MoEBlockAdapter)))
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), gen_ref)
    # The report names what was swapped, with which spec.
    text = str(report)
    assert f"swapped {n_blocks} of {n_blocks}" in text and "hf-" in text


@pytest.mark.parametrize("model_type, zero", [("deepseek_v3", dict(n_shared_experts=0)),
                                              ("qwen2_moe", dict(shared_expert_intermediate_size=0))])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # the HF model's own init
def test_zero_width_shared_experts_read_as_none(model_type: str, zero: dict) -> None:
    """A config with zero-width shared experts builds a model whose shared MLP has [0, D] weights and adds nothing;
    the swap refused it (moe.shared_experts.intermediate_size: must be greater than 0). It now reads as no shared
    experts, says so, and the swapped model gives the original's logits and keeps its state dict."""
    model = make_model(model_type, **zero)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    state = model.state_dict()
    n_blocks = sum(hf.is_hf_moe_block(m) for m in model.modules())
    assert hf.spec_from_hf_config(model.config).moe.shared_experts.count == 0
    moegraph.optimize(model, verify=True)
    report = model.moegraph_report
    assert len(report.swapped) == n_blocks and not report.not_swapped, str(report)
    # (the empty weights have nothing to train: not listed among those training leaves as they are)
    assert all(any("width 0" in n for n in r.notes) and not any("_proj" in n for n in r.notes if "does not use" in n)
               for r in report.swapped), str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert sorted(after) == sorted(state) and all(after[k].shape == state[k].shape for k in state)


def test_layer_pattern_of_config_matches_model() -> None:
    """spec_from_hf_config's dense/MoE pattern is where optimize finds the blocks."""
    for model_type, extra in (("deepseek_v3", dict(num_hidden_layers=3)),
                              ("qwen2_moe", dict(num_hidden_layers=4, mlp_only_layers=[1], decoder_sparse_step=1))):
        model = make_model(model_type, **extra)
        spec = hf.spec_from_hf_config(model.config)
        moegraph.optimize(model)
        found = sorted(int(r.path.split(".")[2]) for r in model.moegraph_report.swapped)
        assert found == list(spec.model.moe_layer_indices), (model_type, found)


def test_shared_weights_and_training_step() -> None:
    """Swapped layers use the model's own expert Parameters: an optimizer made before still trains them."""
    model = make_model("mixtral")
    block = model.model.layers[0].mlp
    w = block.experts.gate_up_proj
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    moegraph.optimize(model)
    adapter = model.model.layers[0].mlp
    assert adapter.moe.experts.gate_up_proj is w
    model.train()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    before = w.detach().clone()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    opt.step()
    assert not torch.equal(before, w.detach())
    # And eval after the update still runs on the updated weights (no stale packed copies).
    model.eval()
    with torch.no_grad():
        y = adapter(torch.randn(1, 3, 32))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "llama4_text"])
def test_parameters_copied_rather_than_shared_are_reported(model_type: str) -> None:
    """share_weights=True shares what the layouts allow; the rest (Qwen2-MoE's shared gate and up, concatenated;
    Llama 4's transposed experts) are copies, which an optimizer built before the swap holds and no longer trains,
    and the report did not say so. Now each such block's note counts and names them: exactly the block's
    parameters the swapped model no longer holds (Mixtral: none, no note)."""
    model = make_model(model_type)
    blocks = {p: m for p, m in model.named_modules() if hf.is_hf_moe_block(m)}
    before = {p: list(m.named_parameters()) for p, m in blocks.items()}
    moegraph.optimize(model)
    held = {id(p) for p in model.parameters()}
    for rec in model.moegraph_report.swapped:
        gone = [n for n, p in before[rec.path] if id(p) not in held]
        notes = [n for n in rec.notes if "copied into the compiled layer" in n]
        if not gone:
            assert not notes, str(model.moegraph_report)
            continue
        assert len(notes) == 1, str(model.moegraph_report)
        assert notes[0].startswith(f"{len(gone)} trainable parameter(s)"), str(model.moegraph_report)
        assert all(n in notes[0] for n in gone[:3]) and "build it after" in notes[0]
    assert (model_type == "mixtral") == (not any("copied" in str(r.notes) for r in model.moegraph_report.records))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_swapped_model_runs_under_autocast(model_type: str) -> None:
    """A float32 model under torch.autocast(bfloat16): the swapped model's logits are within bfloat16 rounding of
    the original's under the same autocast (in eval mode its MoE layers compute in float32), and in training, where
    they compute in bfloat16 as the original's blocks do there, its loss is the original's within bfloat16
    rounding, and the float32 expert weights get gradients."""
    import copy

    model = make_model(model_type)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(ids).logits.float()
        original = copy.deepcopy(model).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_loss = float(original(ids, labels=ids).loss)
    moegraph.optimize(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids).logits.float()
    scale = float(exact.abs().max())
    assert float((got - exact).abs().max()) <= 2 * float((ref - exact).abs().max()) + 1e-3 * scale
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    assert abs(float(loss.detach()) - ref_loss) <= 1e-4 * abs(ref_loss), (float(loss.detach()), ref_loss)
    loss.backward()
    w = model.model.layers[-1].mlp.moe.experts.down_proj
    assert w.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all() and float(w.grad.abs().sum()) > 0


def test_verify_reports_and_keeps_swaps() -> None:
    model = make_model("qwen2_moe")
    moegraph.optimize(model, verify=True)
    for r in model.moegraph_report.swapped:
        assert r.rel_diff is not None and r.rel_diff < 1e-4


def test_verify_failure_restores_original(monkeypatch) -> None:
    model = make_model("mixtral")
    originals = [layer.mlp for layer in model.model.layers]
    real = hf.hf_weights

    def corrupted(block, anat):
        w = dict(real(block, anat))
        w["experts.down_proj"] = w["experts.down_proj"] * 1.5
        return w

    monkeypatch.setattr(hf, "hf_weights", corrupted)
    moegraph.optimize(model, verify=True)
    report = model.moegraph_report
    assert [r.status for r in report.records] == ["restored", "restored"]
    assert all("verification failed" in r.reason and r.rel_diff > 0.1 for r in report.records), str(report)
    assert [layer.mlp for layer in model.model.layers] == originals


def test_unsupported_family_reported() -> None:
    # NLLB-MoE's block hands its experts a 0/1 mask where expert ids belong (not the routing its router computes):
    # refused with the reason, the model untouched.
    cfg = transformers.NllbMoeConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, expert_capacity=8, encoder_sparse_step=2,
        decoder_sparse_step=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.NllbMoeForConditionalGeneration(cfg).eval()
    before = {n: type(m) for n, m in model.named_modules()}
    moegraph.optimize(model)
    report = model.moegraph_report
    assert len(report.records) == 2 and all(r.status == "refused" for r in report.records), str(report)
    assert "mask where expert ids belong" in report.records[0].reason
    assert report.records[0].block_class == "NllbMoeSparseMLP"
    assert {n: type(m) for n, m in model.named_modules()} == before


def _logits_and_router_states(model, ids):
    """The model's logits and the router state each decoder layer's MoE block returned."""
    states: list = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: states.append(o[1])) for layer in model.model.layers]
    try:
        with torch.no_grad():
            return model(ids).logits, states
    finally:
        for h in hooks:
            h.remove()


def test_zaya_router_state_and_skip_choices() -> None:
    # Zaya: each layer's router network adds the previous layer's router state and returns its own; its skip choice
    # (a zero expert) is taken by some tokens here (a selection bias towards it), which the block hands its experts
    # as (expert 0, weight 0).
    model = make_model("zaya", **MODELS["zaya"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.balancing_biases[-1] = 0.15
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    ref, states = _logits_and_router_states(model, ids)
    gen_ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    moegraph.optimize(model)
    assert len(model.moegraph_report.swapped) == 2, str(model.moegraph_report)
    layers = [layer.mlp.moe for layer in model.model.layers]
    assert [m.RECEIVES_ROUTER_STATE for m in layers] == [False, True] and all(m.ROUTER_STATE == 16 for m in layers)
    recs = [m.start_recording() for m in layers]
    out, got = _logits_and_router_states(model, ids)
    skips = [int((r.ids() == 4).sum()) for r in recs]  # router id 4 = the zero expert after the 4 MLP experts
    assert all(0 < n < 36 for n in skips), skips
    for a, b in zip(got, states):  # each layer's router state, as Zaya's block returns it
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for m in layers:
        m.stop_recording()
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), gen_ref)


def test_no_moe_blocks() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moegraph.optimize(model)
    report = model.moegraph_report
    assert report.records == [] and "no MoE blocks found; the model is unchanged" in str(report)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(moegraph.InputError, match="nn.Module"):
        moegraph.optimize("not a model")


def test_meta_device_model_refused() -> None:
    cfg = tiny_config("mixtral", **MODELS["mixtral"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    moegraph.optimize(model)
    records = model.moegraph_report.records
    assert len(records) == 2 and all(r.status == "refused" and "meta device" in r.reason for r in records)
    assert not any(isinstance(m, MoEBlockAdapter) for m in model.modules())


def test_dtensor_block_refused(tmp_path) -> None:
    import torch.distributed as dist

    try:
        from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor
    except ImportError:
        pytest.skip("torch.distributed.tensor unavailable")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = make_model("mixtral")
        mesh = DeviceMesh("cpu", [0])
        ex = model.model.layers[1].mlp.experts
        ex.down_proj = nn.Parameter(distribute_tensor(ex.down_proj.detach(), mesh, [Replicate()]))
        moegraph.optimize(model)
        rec = {r.path: r for r in model.moegraph_report.records}
        assert rec["model.layers.0.mlp"].status == "swapped"
        assert rec["model.layers.1.mlp"].status == "refused" and "DTensor" in rec["model.layers.1.mlp"].reason
    finally:
        dist.destroy_process_group()


def test_report_prints_with_rich() -> None:
    from rich.console import Console

    model = make_model("mixtral")
    moegraph.optimize(model)
    console = Console(record=True, width=120)
    console.print(model.moegraph_report)
    text = console.export_text()
    assert "swapped 2 of 2" in text and "model.layers.0.mlp" in text and "hf-mixtral" in text


# ----------------------------------------------------------------------------------------------
# A user's own MoE, matched by structure
# ----------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=bias)
        self.w3 = nn.Linear(d, f, bias=bias)
        self.w2 = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NaiveMoE(nn.Module):
    """The textbook loop: softmax router, top-k, renormalise, loop over the experts (FX-traceable)."""

    def __init__(self, d=32, f=48, e=6, k=2, expert=SwiGLU, shared=False, normalize=True, score="softmax"):
        super().__init__()
        self.k, self.normalize, self.score = k, normalize, score
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList([expert(d, f) for _ in range(e)])
        self.shared = expert(d, f) if shared else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        probs = logits.softmax(dim=-1) if self.score == "softmax" else torch.sigmoid(logits)
        w, idx = torch.topk(probs, self.k, dim=-1)
        if self.normalize:
            w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot].unsqueeze(-1))
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)


class LoopMoE(NaiveMoE):
    """The same with data-dependent control flow: not FX-traceable, identified by probing."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(dim=-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            mask = idx == e
            if not mask.any():
                continue
            tok, slot = mask.nonzero(as_tuple=True)
            out[tok] += self.experts[e](x[tok]) * w[tok, slot, None]
        return out.reshape(shape)


class ScaledInputMoE(NaiveMoE):
    """Scales the expert input by the router weight: not expressible (expert(w x) != w expert(x))."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = torch.topk(self.router(x).softmax(-1), self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out = out.index_add(0, tok, expert(x[tok] * w[tok, slot].unsqueeze(-1)))
        return out.reshape(shape)


class UserModel(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.proj(x)
        for b in self.blocks:
            x = x + b(x)
        return x


def _run(model, x):
    with torch.no_grad():
        return model(x)


def test_naive_moe_swapped_structurally() -> None:
    torch.manual_seed(0)
    model = UserModel([NaiveMoE(), NaiveMoE(expert=GeluMLP, shared=True, k=3), LoopMoE(),
                       NaiveMoE(score="sigmoid", normalize=False)]).eval()
    x = torch.randn(3, 7, 32)
    ref = _run(model, x)
    moegraph.optimize(model)
    report = model.moegraph_report
    assert [r.status for r in report.records] == ["swapped"] * 4, str(report)
    assert all(r.found_by == "structure" and r.rel_diff < 1e-5 for r in report.records)
    torch.testing.assert_close(_run(model, x), ref, rtol=1e-4, atol=1e-5)
    specs = [m.moe.hf_spec if hasattr(m.moe, "hf_spec") else None for m in model.blocks]
    assert all(isinstance(m, MoEBlockAdapter) for m in model.blocks) and specs
    routings = [r.routing for r in report.records]
    assert routings[0] == "top-2 softmax, normalised" and routings[3] == "top-2 sigmoid"
    assert "top-3" in routings[1]
    assert any("not traceable by torch.fx" in n for n in report.records[2].notes)
    # traced: the router reaches a top-k that selects the experts (the one note: the stacked experts are copies)
    assert [n for n in report.records[0].notes if "copied into the compiled layer" not in n] == []


def test_structural_read_details() -> None:
    torch.manual_seed(1)
    block = NaiveMoE(expert=GeluMLP, shared=True, k=3)
    sr = read_structural(block)
    e = sr.spec.moe.experts
    assert (e.num_experts, e.intermediate_size, e.activation, e.bias) == (6, 48, "gelu_tanh", True)
    assert sr.spec.moe.shared_experts.count == 1
    assert sr.weights["experts.up_proj"].shape == (6, 48, 32)


def test_unexplainable_user_block_left_alone() -> None:
    torch.manual_seed(0)
    model = UserModel([ScaledInputMoE(), NaiveMoE()]).eval()
    x = torch.randn(2, 5, 32)
    ref = _run(model, x)
    moegraph.optimize(model)
    recs = model.moegraph_report.records
    assert recs[0].status == "refused" and "transformed tokens" in recs[0].reason
    assert recs[1].status == "swapped"
    assert isinstance(model.blocks[0], ScaledInputMoE)
    torch.testing.assert_close(_run(model, x), ref, rtol=1e-4, atol=1e-5)


class NoisyMoE(NaiveMoE):
    """Noisy top-k gating (Shazeer et al.): noise on the router logits in training only."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        if self.training:
            logits = logits + torch.randn_like(logits)
        w, idx = torch.topk(logits.softmax(-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot].unsqueeze(-1))
        return out.reshape(shape)


class DropoutMLP(GeluMLP):
    def __init__(self, d: int, f: int):
        super().__init__(d, f)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class FunctionalDropoutMLP(GeluMLP):
    """Dropout called as a function: no module for the read to find."""

    def forward(self, x):
        return self.fc2(F.dropout(self.act(self.fc1(x)), p=0.3, training=self.training))


@pytest.mark.parametrize("block, words", [(NoisyMoE, "in train() mode the block routes or computes otherwise"),
                                          (lambda: NaiveMoE(expert=DropoutMLP), "dropout (p=0.5) in 6 module(s)"),
                                          (lambda: NaiveMoE(expert=FunctionalDropoutMLP),
                                           "the experts (experts.0 run) compute(s) otherwise in train() mode"),
                                          (NaiveMoE, None)])
def test_training_time_randomness_of_a_user_block_is_reported(block, words) -> None:
    """A user block with noise on its router logits in training, or dropout in its experts, was swapped as verified
    (the check runs in eval mode) although in train() mode the swapped block computes otherwise: the report now says
    so and a warning names the block, when the model trains (an inference user is not warned); eval outputs stay
    equal, and a block without either gets neither."""
    torch.manual_seed(0)
    model = UserModel([block()]).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 32)

    def said(run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        return [str(w.message) for w in caught if "train() mode" in str(w.message)]

    assert said(lambda: moegraph.optimize(model)) == []  # in eval() mode (inference): nothing to warn about yet
    rec = model.moegraph_report.records[0]
    assert rec.status == "swapped", str(model.moegraph_report)
    if words is None:
        assert not any("train() mode" in n for n in rec.notes), str(model.moegraph_report)
    else:
        assert any(words in n for n in rec.notes), str(model.moegraph_report)
    torch.testing.assert_close(_run(model, x), _run(ref, x), rtol=1e-4, atol=1e-5)
    first = said(model.train)  # the first switch to training warns, once
    assert said(lambda: model.eval().train()) == []
    if words is None:
        assert first == []
    else:
        assert len(first) == 1 and "blocks.0" in first[0] and words in first[0]
        assert "train() on moegraph.optimize" in first[0]
        trained = UserModel([block()]).train()  # a model optimized in train() mode warns at once
        assert len(said(lambda: moegraph.optimize(trained))) == 1 and said(trained.train) == []
    ref.train()  # the compiled layer computes the eval form in train() mode too
    torch.manual_seed(1)
    trained = _run(model, x)
    torch.testing.assert_close(trained, _run(ref.eval(), x), rtol=1e-4, atol=1e-5)
    if words is not None:  # where the original's training forward differs
        torch.manual_seed(1)
        assert not torch.allclose(_run(ref.train(), x), trained, rtol=1e-3, atol=1e-3)


def test_optimize_is_idempotent() -> None:
    model = UserModel([NaiveMoE()]).eval()
    moegraph.optimize(model)
    first = model.blocks[0]
    moegraph.optimize(model)
    assert model.blocks[0] is first and model.moegraph_report.records == []


class TupleMoE(NaiveMoE):
    """Returns (hidden, router_logits) as some transformers families do; its parent unpacks both."""

    def forward(self, x):
        return super().forward(x), self.router(x.reshape(-1, x.shape[-1]))


class TupleUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = TupleMoE()

    def forward(self, x):
        y, logits = self.moe(x)
        return y + logits.sum(-1, keepdim=True).reshape(*x.shape[:-1], 1)


def test_swapped_block_keeps_tuple_calling_convention() -> None:
    torch.manual_seed(3)
    model = TupleUser().eval()
    x = torch.randn(2, 5, 32)
    ref = _run(model, x)
    moegraph.optimize(model)
    assert model.moegraph_report.records[0].status == "swapped"
    assert model.moe.output_kind == ("tuple", "router_logits")
    torch.testing.assert_close(_run(model, x), ref, rtol=1e-4, atol=1e-5)


def test_adapter_takes_the_host_blocks_arguments() -> None:
    """Token ids given by the host are accepted (ignored by a top-k layer); an argument it cannot honour is refused."""
    model = make_model("deepseek_v4", **MODELS["deepseek_v4"])
    moegraph.optimize(model)
    assert model.model.layers[0].mlp.moe.NEEDS_TOKEN_IDS  # the hash layer routes by them
    adapter = model.model.layers[1].mlp
    assert isinstance(adapter, MoEBlockAdapter) and adapter.token_arg == "input_ids"
    x = torch.randn(2, 5, 32)
    ids = torch.randint(0, VOCAB, (2, 5))
    y = adapter(x)
    torch.testing.assert_close(adapter(x, input_ids=ids), y)
    torch.testing.assert_close(adapter(x, ids), y)  # positionally, as the original's signature allows
    with pytest.raises(moegraph.errors.InputError, match="padding_mask"):
        adapter(x, padding_mask=torch.ones(2, 5))


def test_dbrx_model_layout_read_into_the_same_layer() -> None:
    """DBRX keeps its experts as mlp.w1 / v1 / w2 ([E*F, D] each): optimize reads them into the usual layer."""
    cfg = transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=32, moe_num_experts=8, moe_top_k=2, ffn_hidden_size=16))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    gen_ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    moegraph.optimize(model)
    assert len(model.moegraph_report.swapped) == 2, str(model.moegraph_report)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), gen_ref)


def test_switch_transformers_seq2seq_logits_and_generation() -> None:
    """Switch Transformers (encoder-decoder): experts listed as E small MLPs, top-1 with an expert capacity
    counted per sequence (3 tokens, which the 9-token inputs exceed): same logits and greedy tokens."""
    cfg = tiny_config("switch_transformers", d_model=32, d_ff=48, num_experts=4, expert_capacity=3, d_kv=8,
                      num_heads=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                      num_sparse_decoder_layers=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # routers initialised near zero would tie: randomise them
        for name, p in model.named_parameters():
            if "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
    gen_ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    moegraph.optimize(model)
    report = model.moegraph_report
    assert len(report.swapped) == 2 and not report.not_swapped, str(report)
    assert "capacity 3 tokens per sequence" in str(report)
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), gen_ref)


def test_jetmoe_mlp_blocks_swapped_attention_experts_left_alone() -> None:
    """JetMoE: its MoE MLPs (experts in two modules, an output bias) are swapped, same logits and greedy tokens;
    its mixture-of-attention experts (JetMoeAttention) are not MoE MLPs and are left alone, with the reason."""
    MODELS["jetmoe"] = JETMOE
    try:
        model = make_model("jetmoe")
    finally:
        del MODELS["jetmoe"]
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    gen_ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    moegraph.optimize(model)
    report = model.moegraph_report
    assert sorted(r.path for r in report.swapped) == ["model.layers.0.mlp", "model.layers.1.mlp"], str(report)
    assert all(r.status == "skipped" and "self_attention" in r.path for r in report.records if r.status != "swapped")
    assert all(m.moe.output.bias.abs().max() > 0 for m in model.modules() if isinstance(m, MoEBlockAdapter))
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), gen_ref)


def test_muse_spark_logits_and_generation() -> None:
    """Muse Spark (a multimodal model; text only here): its MoE layer projects into the experts' own space, normalises
    there and normalises each expert's output (moe.expert_projection, experts.output_norm). optimize swaps it; the
    logits and greedy tokens stay the same, with every weight randomised (its norm weights start at zero)."""
    from transformers.models.muse_spark import configuration_muse_spark as cm, modeling_muse_spark as mm

    text = cm.MuseSparkTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=64, moe_intermediate_size=16, num_local_experts=8,
        num_experts_per_tok=2, moe_hidden_size=24, routed_scaling_factor=2.0, mlp_layer_types=["dense", "sparse"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=16)
    vision = cm.MuseSparkVisionConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    audio = cm.MuseSparkAudioConfig(hidden_sizes=(8,), depths=(1,), patch_sizes=(16,), num_hidden_layers=1,
                                    out_hidden_size=32)
    cfg = cm.MuseSparkConfig(text_config=text, vision_config=vision, audio_config=audio, out_hidden_size=16,
                             projector_hidden_size=16, image_token_id=60, video_token_id=61, audio_token_id=62)
    torch.manual_seed(0)
    model = mm.MuseSparkForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if ".mlp." in name and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.3 if t.dim() < 3 else 0.2))
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    gen_ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    moegraph.optimize(model)
    report = model.moegraph_report
    assert [r.path for r in report.swapped] == ["model.language_model.layers.1.mlp"], str(report)
    (adapter,) = [m for m in model.modules() if isinstance(m, MoEBlockAdapter)]
    assert adapter.moe.EXPERT_WIDTH == 24 and adapter.moe.EXPERT_OUTPUT_NORM_OFFSET == 1.0
    # The config alone (a model built on the meta device) reads as the same layer spec.
    import json

    swapped = moegraph.load_spec(json.loads(adapter.moe.SPEC_JSON)).moe
    assert hf.spec_from_hf_config(text).moe.model_dump() == swapped.model_dump()
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=4, do_sample=False), gen_ref)


def test_ernie_vl_modality_experts_flattened_output() -> None:
    """Ernie 4.5 VL: its modality-isolated MoE runs a text MoE on text tokens and a vision MoE on the others, each
    called on a 1-D selection of hidden states and returning its output and router logits flattened. optimize
    swaps both inner MoEs; the outer block's outputs and router logits, and the input gradient, stay the same on a
    mix of text and vision tokens."""
    from transformers.models.ernie4_5_vl_moe import configuration_ernie4_5_vl_moe as cm, modeling_ernie4_5_vl_moe as mm

    cfg = cm.Ernie4_5_VLMoeTextConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      num_key_value_heads=4, num_hidden_layers=2, vocab_size=VOCAB, num_experts=8,
                                      num_experts_per_tok=2, moe_intermediate_size=[16, 24], moe_num_shared_experts=1)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    block = mm.Ernie4_5_VLMoeMoeBlock(cfg).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, t in list(block.named_parameters()) + list(block.named_buffers()):
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    x = torch.randn(2, 7, 32, generator=g)
    types = (torch.rand(2, 7, generator=g) > 0.5).long()
    assert 0 < int(types.sum()) < types.numel()
    xr = x.clone().requires_grad_(True)
    ref, ref_logits = block(xr, types)
    ref.square().sum().backward()
    with torch.no_grad():
        ref_text = block(x)[0]  # text only: the outer block calls its text MoE on [B, S, D]
    moegraph.optimize(block)
    swapped = sorted(r.path for r in block.moegraph_report.swapped)
    assert swapped == ["text_moe", "vision_moe"], str(block.moegraph_report)
    assert all(m.flattened for m in block.modules() if isinstance(m, MoEBlockAdapter))
    xo = x.clone().requires_grad_(True)
    out, logits = block(xo, types)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    # (summation order differs: an absolute floor of 1e-5 of the largest entry, as tests/test_hf_parity.py)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-5 * float(xr.grad.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(block(x)[0], ref_text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "deepseek_v3", "olmoe"])
def test_router_logits_and_aux_loss_of_a_swapped_model(model_type: str):
    """transformers records router logits (its auxiliary loss reads them) by hooks on the blocks' router modules,
    which a swapped block does not run: the forward raised IndexError, so a model with the config flag was left
    unswapped. The adapter now adds its router's logits where the hook would: with the flag in the config or
    in the call, the swapped model gives the original's router logits, auxiliary loss and loss, and the
    auxiliary loss trains the swapped router."""
    import copy

    model = make_model(model_type, output_router_logits=True)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    swapped = moegraph.optimize(copy.deepcopy(model))
    report = swapped.moegraph_report
    assert report.swapped and all(r.status == "swapped" for r in report.records if r.found_by == "registry"), report
    with torch.no_grad():
        want, got = model(ids, labels=ids), swapped(ids, labels=ids)
    assert len(got.router_logits) == len(want.router_logits) > 0
    for a, b in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    swapped.config.output_router_logits = False  # the call-time flag
    with torch.no_grad():
        assert not swapped(ids).router_logits
        at_call = swapped(ids, output_router_logits=True)
    for a, b in zip(at_call.router_logits, want.router_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(at_call.aux_loss, want.aux_loss, rtol=1e-4, atol=1e-6)
    swapped.config.output_router_logits = True
    swapped.train()
    out = swapped(ids)  # DeepSeek-V3 has no auxiliary loss in transformers: a loss of its logits instead
    (out.aux_loss if out.aux_loss is not None else sum(x.square().sum() for x in out.router_logits)).backward()
    w = next(m for m in swapped.modules() if isinstance(m, MoEBlockAdapter)).moe.router.weight
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_switch_router_logits_keep_the_batch_shape():
    """Switch Transformers' router is called on [B, S, D] and records [B, S, E] logits, which its z-loss unpacks
    into three; the swapped block recorded [tokens, E] and the forward raised ValueError. Now it records the
    shape its router did: the same router logits, auxiliary and z losses and loss as the original, and the
    losses train the swapped router."""
    import copy

    cfg = tiny_config("switch_transformers", d_model=32, d_ff=48, num_experts=4, expert_capacity=3, d_kv=8,
                      num_heads=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                      num_sparse_decoder_layers=1, decoder_start_token_id=0, dropout_rate=0.0,
                      output_router_logits=True)  # (its forward reads the flag from the call only)
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    swapped = moegraph.optimize(copy.deepcopy(model))
    assert len(swapped.moegraph_report.swapped) == 2, str(swapped.moegraph_report)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = (m(input_ids=ids, labels=dec, output_router_logits=True) for m in (model, swapped))
    for side in ("encoder", "decoder"):
        a = [t for t in getattr(got, f"{side}_router_logits") if t is not None]
        b = [t for t in getattr(want, f"{side}_router_logits") if t is not None]
        assert len(a) == len(b) == 1 and a[0].shape == b[0].shape == (2, 9 if side == "encoder" else 6, 4)
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
        for loss in ("aux_loss", "z_loss"):
            torch.testing.assert_close(getattr(got, f"{side}_{loss}"), getattr(want, f"{side}_{loss}"),
                                       rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match=r"training-time jitter \(0\.01\) of the HF block is not reproduced"):
        swapped.train()
    swapped(input_ids=ids, labels=dec, output_router_logits=True).encoder_z_loss.backward()
    w = swapped.encoder.block[1].layer[1].mlp.moe.router.weight
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_router_logits_in_bfloat16_and_under_gradient_checkpointing():
    """A bfloat16 model's routers (whose logits the compiled float32 router gives within bfloat16 rounding) are
    swapped with the flag; and with gradient checkpointing (the usual fine-tuning setup) the recomputed forward
    saves what the first one did, so the backward runs and gives the original's gradients."""
    import copy

    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    half = make_model("qwen2_moe", output_router_logits=True).to(torch.bfloat16)
    swapped = moegraph.optimize(copy.deepcopy(half))
    assert len(swapped.moegraph_report.swapped) == 2, str(swapped.moegraph_report)
    with torch.no_grad():
        want, got = half(ids), swapped(ids)
    assert abs(float(got.aux_loss) - float(want.aux_loss)) <= 3e-2 * abs(float(want.aux_loss))
    model = make_model("mixtral", output_router_logits=True)
    swapped = moegraph.optimize(copy.deepcopy(model))
    grads = []
    for m in (model, swapped):
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        m.train()
        m(ids, labels=ids).loss.backward()
        grads.append(m.model.layers[0].mlp.experts.gate_up_proj.grad if m is model else
                     m.model.layers[0].mlp.moe.experts.gate_up_proj.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_router_logits_a_swapped_layer_cannot_give_are_refused(monkeypatch):
    """A block whose recorded router output is not the linear map the swapped layer computes (here: made so, in
    layer 0 only) stays in place when the config asks for router logits, with the reason; without the flag it is
    swapped, the report says the call-time flag would fail, and it does fail, naming the block and the reason,
    rather than hand the auxiliary loss the logits of fewer layers."""
    from moegraph.hf import router_record

    real = router_record.read_router_record

    def other_logits(model, path, block, hidden, weight, bias, dtype):
        return real(model, path, block, hidden, weight * 2 if path.endswith("layers.0.mlp") else weight, bias, dtype)

    monkeypatch.setattr("moegraph.swap.read_router_record", other_logits)
    report = moegraph.optimize(make_model("mixtral", output_router_logits=True)).moegraph_report
    assert [r.status for r in report.records] == ["refused", "swapped"], str(report)
    assert "output_router_logits is set" in report.records[0].reason and "linear map" in report.records[0].reason
    model = moegraph.optimize(make_model("mixtral"))
    report = model.moegraph_report
    assert [r.status for r in report.records] == ["swapped", "swapped"], str(report)
    assert any("output_router_logits=True) raises" in n for n in report.records[0].notes)
    assert not any("output_router_logits" in n for n in report.records[1].notes)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(moegraph.errors.InputError, match="replaced MixtralSparseMoeBlock cannot give its router logits"):
        model(ids, output_router_logits=True)
    assert model(ids).logits.shape == (2, 6, VOCAB)
