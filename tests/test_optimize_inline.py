"""moegraph.optimize on models whose MoE has no module of its own (written inline in a decoder layer's forward).

Gemma 4 and DiffusionGemma's decoder layers call router, norm, experts and norm in turn beside attention and a
dense MLP. optimize finds that chain by watching one forward, reads it as a block and swaps it: the whole model's
logits, greedy tokens and gradients must stay those of transformers' own model. Hosts whose chain the swap would
change (the router's output read elsewhere, the router called twice) are left alone, with the reason.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import moegraph
from moegraph.hf.inline import InlineChain, inline_hosts, watch
from moegraph.swap import InlineRouterAdapter

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*torch_dtype.*")

VOCAB = 64
GEMMA = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
             num_hidden_layers=2, intermediate_size=48, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _randomise(model: nn.Module) -> nn.Module:
    """Every weight random (HF starts norms and scales at constants that would hide a wrong norm or scale)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if "scale" in name else 0.0))
    return model.float().eval()


def gemma4_model() -> nn.Module:
    from transformers.models.gemma4 import configuration_gemma4 as cm, modeling_gemma4 as mm

    torch.manual_seed(0)
    return _randomise(mm.Gemma4ForCausalLM(cm.Gemma4TextConfig(**GEMMA, enable_moe_block=True)))


def diffusion_gemma_encoder() -> nn.Module:
    from transformers.models.diffusion_gemma import configuration_diffusion_gemma as cm
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as mm

    torch.manual_seed(0)
    return _randomise(mm.DiffusionGemmaEncoderTextModel(cm.DiffusionGemmaTextConfig(**GEMMA)))


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_gemma4_chain_is_read_from_the_forward() -> None:
    """The chain the hooks see is the one Gemma 4's decoder layer writes: router(x) -> (probs, weights, index),
    experts(pre_feedforward_layernorm_2(x), index, weights), then post_feedforward_layernorm_2."""
    model = gemma4_model()
    hosts = inline_hosts(model)
    assert [p for p, _ in hosts] == ["model.layers.0", "model.layers.1"]
    chains, ids, logits = watch(model, hosts)
    assert chains["model.layers.0"] == InlineChain("router", "experts", "pre_feedforward_layernorm_2",
                                                   "post_feedforward_layernorm_2", 3, (2, 1))
    with torch.no_grad():  # the watched logits are the model's own
        torch.testing.assert_close(_out(model, ids), logits, rtol=0, atol=0)


@pytest.mark.parametrize("make", [gemma4_model, diffusion_gemma_encoder], ids=["gemma4", "diffusion_gemma"])
def test_inline_moe_swapped_same_outputs_and_gradients(make) -> None:
    model = make()
    reference = copy.deepcopy(model)
    before = dict(model.named_parameters())  # the compiled layers share these Parameters where layouts agree
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    moegraph.optimize(model)
    report = model.moegraph_report
    prefix = "model." if make is gemma4_model else ""
    assert [(r.path, r.found_by, r.status) for r in report.records] == [
        (f"{prefix}layers.{i}", "inline", "swapped") for i in range(2)], str(report)
    assert all(r.rel_diff is not None and r.rel_diff < 1e-5 for r in report.records)
    adapters = [m for m in model.modules() if isinstance(m, InlineRouterAdapter)]
    assert len(adapters) == 2 and hasattr(adapters[0].moe, "PRE_EXPERT_NORM_OFFSET")
    with torch.no_grad():
        torch.testing.assert_close(_out(model, ids), _out(reference, ids), rtol=1e-4, atol=1e-5)
    # Training: the same gradients for every weight outside the MoE and for the experts' own (shared) weights.
    model.train()
    reference.train()
    _out(model, ids).square().mean().backward()
    _out(reference, ids).square().mean().backward()
    want = dict(reference.named_parameters())
    compared = []
    for name, p in before.items():
        if p.grad is None:  # a weight the compiled layer copied (a different layout); it is checked by value above
            assert ".router." in name or "layernorm_2" in name, name
            continue
        torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        compared.append(name)
    assert any(".experts.gate_up_proj" in n for n in compared) and any(".experts.down_proj" in n for n in compared)
    assert any("self_attn" in n for n in compared)


def test_gemma4_greedy_generation_unchanged() -> None:
    model = gemma4_model()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    moegraph.optimize(model)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)


# ----------------------------------------------------------------------------------------------
# Hosts written here, to reach the refusals: Qwen3-MoE's router and experts inside a toy decoder layer
# ----------------------------------------------------------------------------------------------


class ToyAttention(nn.Linear):
    """Stands for attention (the word in its class name is what marks a decoder layer)."""


class ToyLayer(nn.Module):
    def __init__(self, cfg, mode: str):
        from transformers.models.qwen3_moe import modeling_qwen3_moe as qm

        super().__init__()
        self.mode = mode
        self.config = cfg
        self.self_attn = ToyAttention(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.gate = qm.Qwen3MoeTopKRouter(cfg)
        self.experts = qm.Qwen3MoeExperts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x)
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, index = self.gate(flat)
        y = self.experts(flat, index, weights).reshape(x.shape)
        if self.mode == "leaky":  # the chosen experts are read again outside the MoE
            y = y + 0.01 * index.float().mean()
        if self.mode == "twice":  # the router is called a second time
            y = y + 0.0 * self.gate(flat)[0].sum()
        return x + y


class ToyModel(nn.Module):
    def __init__(self, mode: str):
        from transformers.models.qwen3_moe import configuration_qwen3_moe as qc

        super().__init__()
        cfg = qc.Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                norm_topk_prob=True, vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList([ToyLayer(cfg, mode) for _ in range(2)])
        self.head = nn.Linear(32, VOCAB, bias=False)
        _randomise(self)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_toy_host_without_norms_is_swapped() -> None:
    """No norm around the experts: the chain is router -> experts on the router's own input."""
    model = ToyModel("plain")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    moegraph.optimize(model)
    assert [r.status for r in model.moegraph_report.records] == ["swapped", "swapped"], str(model.moegraph_report)
    (slots,) = {(a.outputs, a.slot) for a in model.modules() if isinstance(a, InlineRouterAdapter)}
    assert slots == (3, 2)  # Qwen3-MoE's router returns (logits, weights, index); the experts take index first
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-5)


def test_host_reading_the_router_output_elsewhere_is_restored() -> None:
    """The host reads the chosen experts again outside the MoE: the swap would change its output, so the
    whole-model check undoes it and says why; the model is as it was."""
    model = ToyModel("leaky")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    moegraph.optimize(model)
    report = model.moegraph_report
    assert [r.status for r in report.records] == ["restored", "restored"], str(report)
    assert all("logits moved" in r.reason or "did not run" in r.reason for r in report.records)
    assert not any(isinstance(m, InlineRouterAdapter) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)


def test_router_called_twice_is_not_a_chain() -> None:
    model = ToyModel("twice")
    chains, _, _ = watch(model, inline_hosts(model))
    assert all(isinstance(c, str) and "called 2 times" in c for c in chains.values()), chains
    moegraph.optimize(model)
    assert not any(r.status == "swapped" for r in model.moegraph_report.records)
    assert all("called 2 times" in r.reason for r in model.moegraph_report.records), str(model.moegraph_report)
