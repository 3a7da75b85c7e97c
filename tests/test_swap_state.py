"""A swapped model's state dict under the original names (``moegraph.hf.state_names``).

The reference is transformers itself: the state dict a model had before ``moegraph.optimize`` (names,
dtypes and values, exactly), its own ``from_pretrained`` reading what a swapped model saved (the logits
of the original modules on the trained weights), and a swapped model loading a checkpoint of the
original model. Every layout the readers know is covered: 3-D experts (plain, transposed, interleaved,
with rows left out), listed MLPs, DBRX's flat GLU, JetMoE's split experts, a user's block read by its
structure, an MoE written inline in its host layer, and FP8 experts with their block scales.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import moegraph  # noqa: E402
from moegraph.swap import MoEBlockAdapter  # noqa: E402
from test_optimize import JETMOE, MODELS, VOCAB, GeluMLP, NaiveMoE, UserModel, make_model, tiny_config  # noqa: E402
from test_optimize_inline import gemma4_model  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch_dtype.*")
transformers.logging.set_verbosity_error()

FAMILIES = [*MODELS, "jetmoe"]


def _model(family: str, seed: int = 0) -> nn.Module:
    return make_model(family, seed=seed, **(JETMOE if family == "jetmoe" else {}))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def _swapped(model: nn.Module, **kw) -> nn.Module:
    moegraph.optimize(model, **kw)
    rep = model.moegraph_report
    assert rep.swapped and all(r.status == "swapped" for r in rep.records if r.found_by != "name"), str(rep)
    return model


IDS = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def fp8_model(seed: int) -> nn.Module:
    """A tiny DeepSeek-V3 whose MoE block has transformers' FP8 experts and shared experts (tests/test_fp8_hf.py)."""
    from test_fp8_hf import _fp8_block, ds

    block, cfg = _fp8_block(seed=seed)
    cfg.dtype = torch.float32
    torch.manual_seed(0)
    model = ds.DeepseekV3ForCausalLM(cfg).eval()
    model.model.layers[1].mlp = block
    return model


def _logits(model: nn.Module, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **kw).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_the_original_models(family: str) -> None:
    """Every key, dtype and value the model's state dict had before the swap, and nothing else; and the
    original checkpoint loads strictly into a swapped model of other weights, which then computes what the
    original modules compute."""
    model = _model(family)
    before, ref = _snapshot(model), _logits(model)
    _assert_same_state(_swapped(model).state_dict(), before)
    with torch.inference_mode():  # the transpose runs autograd: under inference mode too
        _assert_same_state(model.state_dict(), before)
    other = _swapped(_model(family, seed=7))
    assert not torch.allclose(_logits(other), ref, rtol=1e-4, atol=1e-5)
    other.load_state_dict(before, strict=True)
    torch.testing.assert_close(_logits(other), ref, rtol=1e-4, atol=1e-5)
    _assert_same_state(other.state_dict(), before)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "jetmoe"])
def test_trained_swapped_model_saves_a_checkpoint_transformers_reads(family: str, tmp_path) -> None:
    """Train the swapped model a few steps, save_pretrained, from_pretrained: transformers' own modules on
    the saved weights give the swapped model's logits (and the weights did move, so stale ones would show)."""
    model = _swapped(_model(family))
    start = _snapshot(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()
    moved = [k for k, v in model.state_dict().items() if "mlp" in k and not torch.equal(v, start[k])]
    assert any(("input_linear" if family == "jetmoe" else "experts.") in k for k in moved), moved
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, MoEBlockAdapter) for m in back.modules())
    torch.testing.assert_close(_logits(back), _logits(model), rtol=1e-4, atol=1e-5)
    _assert_same_state(back.state_dict(), model.state_dict())


def test_partial_load_reports_what_is_missing() -> None:
    """A state dict missing one of a swapped block's tensors: strict loading names it, a lenient one loads
    the rest and keeps the missing tensor's current value."""
    model = _swapped(_model("qwen2_moe"))
    state = _snapshot(_model("qwen2_moe", seed=3))
    gone = "model.layers.0.mlp.shared_expert.up_proj.weight"
    kept = model.state_dict()[gone].clone()
    del state[gone]
    with pytest.raises(RuntimeError, match=gone.replace(".", r"\.")):
        model.load_state_dict(state, strict=True)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [gone] and not result.unexpected_keys
    now = model.state_dict()
    assert torch.equal(now[gone], kept)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    # a whole block missing: reported under the names the model's state dict shows, its weights unchanged
    block = [k for k in state if k.startswith("model.layers.1.mlp.")]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in block}, strict=False)
    assert sorted(result.missing_keys) == sorted([*block, gone]) and not result.unexpected_keys
    assert all(torch.equal(model.state_dict()[k], now[k]) for k in block)


def test_compiled_names_still_load() -> None:
    """A state dict in the compiled layer's names (as written before the original names) loads as before."""
    model = _swapped(_model("mixtral"))
    other = _swapped(_model("mixtral", seed=4))
    compiled = {f"moe.{k}": v.clone() for k, v in other.model.layers[0].mlp.moe.state_dict().items()}
    adapter = model.model.layers[0].mlp
    adapter.load_state_dict(compiled, strict=True)
    for k, v in other.model.layers[0].mlp.moe.state_dict().items():
        assert torch.equal(adapter.moe.state_dict()[k], v)


def test_listed_and_flat_layouts() -> None:
    """Switch Transformers (E small MLPs) and DBRX (flat w1 / v1 / w2): the original state dict, exactly."""
    cfg = tiny_config("switch_transformers", d_model=32, d_ff=48, num_experts=4, expert_capacity=3, d_kv=8,
                      num_heads=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                      num_sparse_decoder_layers=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    switch = transformers.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    dbrx = transformers.AutoModelForCausalLM.from_config(transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=32, moe_num_experts=8, moe_top_k=2, ffn_hidden_size=16))).eval()
    for model in (switch, dbrx):
        before = _snapshot(model)
        _assert_same_state(_swapped(model).state_dict(), before)


def test_structural_block_round_trip() -> None:
    """A user's own blocks (listed SwiGLU experts with a shared MLP; GELU experts with biases): the state dict
    is the user model's, and it loads into an unswapped copy that then computes the same."""
    torch.manual_seed(0)
    model = UserModel([NaiveMoE(shared=True), NaiveMoE(expert=GeluMLP)])
    torch.manual_seed(1)
    fresh = UserModel([NaiveMoE(shared=True), NaiveMoE(expert=GeluMLP)])
    before = _snapshot(model)
    _swapped(model)
    _assert_same_state(model.state_dict(), before)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-5)
    # and the other way: a checkpoint of the user's model (other weights) into the swapped one
    torch.manual_seed(3)
    other = UserModel([NaiveMoE(shared=True), NaiveMoE(expert=GeluMLP)])
    model.load_state_dict(other.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=1e-4, atol=1e-5)


def test_inline_moe_round_trip() -> None:
    """Gemma 4 (router, experts and norms children of the decoder layer): the state dict keeps the host's
    names for the children the swap replaced, and an original checkpoint loads into the swapped model."""
    model = gemma4_model()
    before, ref = _snapshot(model), _logits(model)
    _assert_same_state(_swapped(model).state_dict(), before)
    other = gemma4_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    _swapped(other)
    other.load_state_dict(before, strict=True)
    torch.testing.assert_close(_logits(other), ref, rtol=1e-4, atol=1e-5)


def test_fp8_experts_round_trip() -> None:
    """FP8 experts: their e4m3 bytes and block scales come back under transformers' names, exactly, and load
    into a swapped model of other weights."""
    model = fp8_model(2)
    before = _snapshot(model)
    _assert_same_state(_swapped(model).state_dict(), before)
    other = _swapped(fp8_model(3))
    other.load_state_dict(before, strict=True)
    _assert_same_state(other.state_dict(), before)
    layer = other.model.layers[1].mlp.moe
    assert torch.equal(layer.experts.gate_up_proj.view(torch.uint8),
                       before["model.layers.1.mlp.experts.gate_up_proj"].view(torch.uint8))


@pytest.mark.slow
def test_pickled_models_load_in_a_new_process(tmp_path) -> None:
    """torch.save of a whole swapped model (and of a compiled layer) loads in another process, where the
    generated layer module was never imported (it is generated again from the spec), with built graphs left
    behind; the loaded model computes the same logits and keeps the original state dict names."""
    import sys

    from subproc import run_script

    model, inline = _swapped(_model("deepseek_v3")), _swapped(gemma4_model())
    ref, inline_ref = _logits(model), _logits(inline)  # builds the eval graphs before pickling
    layer = moegraph.compile("mixtral-tiny", seed=0).eval()
    x = torch.randn(3, layer.HIDDEN, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    user = _swapped(UserModel([NaiveMoE(shared=True)]))
    with torch.no_grad():
        y, user_y = layer(x), user(x.view(1, 3, -1))
    torch.save({"model": model, "layer": layer, "inline": inline, "user": user}, tmp_path / "whole.pt")
    torch.save({"ids": IDS, "logits": ref, "inline_logits": inline_ref, "x": x, "y": y, "user_y": user_y,
                "keys": sorted(model.state_dict()), "inline_keys": sorted(inline.state_dict()),
                "user_keys": sorted(user.state_dict())}, tmp_path / "ref.pt")
    script = (
        f"import sys, torch\nsys.path.insert(0, {str(Path(__file__).parent)!r})  # the user model's classes\n"
        "assert not any(m.startswith('moegraph_generated_') for m in sys.modules)\n"
        f"d = torch.load({str(tmp_path / 'whole.pt')!r}, weights_only=False)\n"
        f"r = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad():\n"
        # (float32 rounding: the new process may time and choose another expert-op layout)
        "    torch.testing.assert_close(d['model'](r['ids']).logits, r['logits'], rtol=1e-5, atol=1e-6)\n"
        "    torch.testing.assert_close(d['layer'](r['x']), r['y'], rtol=1e-5, atol=1e-6)\n"
        "    torch.testing.assert_close(d['inline'](r['ids']).logits, r['inline_logits'], rtol=1e-5, atol=1e-6)\n"
        "    torch.testing.assert_close(d['user'](r['x'].view(1, 3, -1)), r['user_y'], rtol=1e-5, atol=1e-6)\n"
        "assert sorted(d['model'].state_dict()) == r['keys']\n"
        "assert sorted(d['inline'].state_dict()) == r['inline_keys']\n"
        "assert sorted(d['user'].state_dict()) == r['user_keys']\n"
        "print('loaded and equal')\n"
    )
    out = run_script([sys.executable, "-c", script], "loading the pickled model", timeout=300)
    assert "loaded and equal" in out


def test_a_block_whose_map_cannot_be_inverted_keeps_compiled_names(monkeypatch) -> None:
    """A weight map that copies an element twice has no transpose that undoes it: the swap stands, its state
    dict keeps the compiled names, and the report says so."""
    from moegraph import swap

    real = swap._registry_weights

    def doubled(block, *, anatomy):
        out = real(block, anatomy=anatomy)
        w = out["router.weight"]
        out["router.weight"] = torch.cat([w[:1], w[:-1]])  # router row 0 twice, the last row never
        return out

    monkeypatch.setattr(swap, "_registry_weights", doubled)
    model = _swapped(_model("mixtral"))
    assert any("moe.experts.down_proj" in k for k in model.state_dict())
    notes = [n for r in model.moegraph_report.swapped for n in r.notes]
    assert any("compiled layer's names" in n and "more than once" in n for n in notes), notes


@pytest.mark.parametrize("cast", ["bfloat16", "double"])
def test_state_dict_follows_casts_after_the_swap(cast: str) -> None:
    """A swapped model cast afterwards (``.to(torch.bfloat16)``, ``.double()``) writes what the original model cast
    the same way writes: its dtypes, and its values (a float64 model keeps what training wrote in float64)."""
    for family in ("qwen2_moe", "inkling_text", "longcat_flash"):
        original, model = _model(family), _swapped(_model(family))
        original, model = (original.to(torch.bfloat16), model.to(torch.bfloat16)) if cast == "bfloat16" else \
            (original.double(), model.double())
        if cast == "double":  # the same update in float64 on both (below float32's resolution)
            for m in (original, model):
                with torch.no_grad():
                    for name, p in m.named_parameters():
                        if name.endswith(".experts.down_proj") and "shared" not in name:
                            p.add_(1e-9)
        _assert_same_state(model.state_dict(), _snapshot(original))


def test_a_checkpoint_of_another_dtype_loads_and_saves_again() -> None:
    """A bfloat16 checkpoint loaded into a float32 swapped model (as into the original): the state dict is the
    float32 original's after the same load (LongCat's rows of zero-computation experts included)."""
    source = _model("longcat_flash", seed=3)
    checkpoint = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    original, model = _model("longcat_flash", seed=9), _swapped(_model("longcat_flash", seed=9))
    for m in (original, model):
        m.load_state_dict(checkpoint, strict=True)
    _assert_same_state(model.state_dict(), _snapshot(original))


def test_state_dict_reads_what_the_layer_holds_now() -> None:
    """FP8 bytes and integer tables come from the compiled layer as it is: after ``.to("meta")`` every entry is on
    the meta device, and a state dict loaded in the compiled names (FP8 shared experts included) shows."""
    for model in (_swapped(fp8_model(2)).to("meta"), _swapped(_model("deepseek_v4")).to("meta")):
        assert {str(v.device) for v in model.state_dict().values()} == {"meta"}
    model, other = _swapped(fp8_model(2)), _swapped(fp8_model(3))
    model.model.layers[1].mlp.load_state_dict({f"moe.{k}": v for k, v in other.model.layers[1].mlp.moe.state_dict().items()})
    got, want = model.state_dict(), other.state_dict()
    for k, v in want.items():
        if "layers.1.mlp" in k:
            assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype.itemsize == 1 else \
                torch.equal(got[k], v), k


def test_the_swapped_layer_trains_what_the_original_trained() -> None:
    """Weights the compiled layer makes up (zero expert biases beside a biased shared MLP) are frozen, so a trained
    model's state dict still computes what it computes; weights made of frozen originals stay frozen."""
    from test_optimize import SwiGLU

    class BiasedShared(NaiveMoE):
        def __init__(self):
            super().__init__(shared=True)
            self.shared = SwiGLU(32, 48, bias=True)

    torch.manual_seed(0)
    model = _swapped(UserModel([BiasedShared()]))
    layer = model.blocks[0].moe
    assert not layer.experts.gate_up_proj_bias.requires_grad and not layer.experts.down_proj_bias.requires_grad
    assert layer.experts.gate_up_proj.requires_grad and layer.shared_experts.gate_up_proj_bias.requires_grad
    x = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.manual_seed(1)
    fresh = UserModel([BiasedShared()])
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)
    frozen = _model("qwen2_moe").requires_grad_(False)
    _swapped(frozen)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_inkling_global_scale_trains_saves_and_loads_in_the_swapped_model(tmp_path) -> None:
    """Inkling's learned global_scale multiplies every routing weight (its shared experts' too): the swapped layer
    holds it as router.weight_scale, so on the same weights and batch its gradient is the original model's; a changed
    value saves under its own name and transformers' from_pretrained reads it back (same logits); and a checkpoint
    with another value loads into the swapped model, silently, which then computes what the original does."""
    key = "model.layers.0.mlp.gate.global_scale"
    original, model = _model("inkling_text"), _model("inkling_text")
    for m in (original, model):
        with torch.no_grad():
            m.model.layers[0].mlp.gate.global_scale.fill_(0.75)
    _swapped(model)
    notes = [n for r in model.moegraph_report.swapped for n in r.notes]
    assert not any("global_scale" in n for n in notes), notes
    scale = model.model.layers[0].mlp.moe.router.weight_scale
    assert scale.requires_grad and scale.item() == 0.75
    r = torch.randn(*IDS.shape, VOCAB, generator=torch.Generator().manual_seed(3))
    for m in (original, model):
        (m(IDS).logits * r).sum().backward()
    want = original.model.layers[0].mlp.gate.global_scale.grad
    assert want.abs().item() > 1e-5  # a gradient to compare (the tiny model's experts add little to the logits)
    torch.testing.assert_close(scale.grad, want, rtol=1e-4, atol=1e-4 * want.abs().item())

    with torch.no_grad():
        scale.fill_(1.25)
    assert model.state_dict()[key].item() == 1.25
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.model.layers[0].mlp.gate.global_scale.item() == 1.25
    torch.testing.assert_close(_logits(back), _logits(model), rtol=1e-4, atol=1e-5)

    state = _snapshot(original)
    state[key] = torch.full_like(state[key], 0.5)
    original.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(state)
    assert scale.item() == 0.5
    torch.testing.assert_close(_logits(model), _logits(original), rtol=1e-4, atol=1e-5)


def test_keep_vars_gives_the_parameters_the_layer_holds_as_they_are() -> None:
    """Mixtral's expert and router weights are the compiled layer's own Parameters (shared, same layout): with
    keep_vars=True the state dict gives those Parameters, as an unswapped model's does."""
    model = _swapped(_model("mixtral"))
    state = model.state_dict(keep_vars=True)
    layer = model.model.layers[0].mlp.moe
    assert state["model.layers.0.mlp.experts.gate_up_proj"] is layer.experts.gate_up_proj
    assert state["model.layers.0.mlp.gate.weight"] is layer.router.weight


def test_norm_weights_transformers_keeps_in_float32_stay_float32_in_a_bfloat16_model(tmp_path) -> None:
    """transformers keeps Ergo's norms in float32 in a bfloat16 model (``_keep_in_fp32_modules_strict``): the
    experts' per-expert output norm and the shared MLP's norm. The swapped layer keeps them float32 too (the block's
    own Parameters), so the state dict and ``save_pretrained`` give back their float32 values (a bfloat16 copy
    rounded them by up to 2e-3), and the logits are the original modules' within bfloat16's rounding."""
    if not hasattr(transformers, "ErgoConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Ergo")
    cfg = transformers.ErgoConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                  shared_intermediate_size=24, intermediate_size=48)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    before, ref = _snapshot(model), _logits(model)
    norms = [k for k in before if ".mlp." in k and "norm" in k]
    assert sorted(n.split(".mlp.")[1] for n in norms) == ["experts.post_expert_norm.weight",
                                                          "shared_experts.norm.weight"]
    assert all(before[k].dtype == torch.float32 for k in norms)
    assert before["model.layers.1.mlp.experts.down_proj"].dtype == torch.bfloat16
    _swapped(model)
    _assert_same_state(model.state_dict(), before)
    layer = model.model.layers[1].mlp.moe
    assert layer.experts.output_norm_weight.dtype == layer.shared_expert_norm.weight.dtype == torch.float32
    notes = [n for r in model.moegraph_report.swapped for n in r.notes]
    assert not any("post_expert_norm" in n for n in notes)  # shared with the block, not copied
    torch.testing.assert_close(_logits(model), ref, rtol=2e-2, atol=2e-2)
    model.save_pretrained(tmp_path / "swapped")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "swapped", dtype=torch.bfloat16).eval()
    _assert_same_state(back.state_dict(), before)
