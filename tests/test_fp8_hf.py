"""FP8 models from Hugging Face: transformers' fine-grained FP8 experts read by ``from_hf`` without
dequantizing, FP8 configs read by ``import-hf``, DeepSeek-V3-layout checkpoints loaded by
``moegraph.hf.quant.load_checkpoint``. The FP8 bytes are produced by transformers' own quantizer."""

from __future__ import annotations

import types

import pytest
import torch

import moegraph
import moegraph.hf.block
from moegraph import fp8
from moegraph.errors import InputError, UnsupportedBlock
from moegraph.hf import quant
from moegraph.hf.config import spec_from_hf_config
from moegraph.loader import load_spec

from reference_fp8 import fp8_expert
from reference_moe import reference_forward

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config  # noqa: E402
from transformers.integrations.finegrained_fp8 import (  # noqa: E402
    FP8Experts,
    FP8Linear,
    Fp8Quantize,
    _dequantize_fp8_weight,
)
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds  # noqa: E402

BLOCK = [128, 128]
QCONFIG = {"quant_method": "fp8", "weight_block_size": BLOCK, "activation_scheme": "dynamic", "fmt": "e4m3"}


def _config(**extra):
    return DeepseekV3Config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                            n_group=2, topk_group=1, n_shared_experts=1, intermediate_size=512, num_hidden_layers=2,
                            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                            kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, **extra)


def _tf_quantize(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own fine-grained FP8 quantizer (what save_pretrained of an FP8 model writes)."""
    hq = types.SimpleNamespace(quantization_config=types.SimpleNamespace(weight_block_size=BLOCK, scale_fmt="float"))
    out = Fp8Quantize(hq).convert({name: w})
    return out[name], out[name.rsplit(".", 1)[0] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"]


def _fp8_block(seed: int = 0):
    """A DeepseekV3MoE whose routed and shared experts are transformers' FP8 modules."""
    cfg = _config()
    torch.manual_seed(seed)
    block = ds.DeepseekV3MoE(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.06)
        block.gate.e_score_correction_bias.normal_(std=0.1)
    experts = FP8Experts(cfg, block_size=tuple(BLOCK))
    for n in ("gate_up_proj", "down_proj"):
        q, s = _tf_quantize(f"experts.{n}", getattr(block.experts, n).detach())
        getattr(experts, n).data.copy_(q)
        getattr(experts, n + "_scale_inv").data.copy_(s)
    block.experts = experts
    for n in ("gate_proj", "up_proj", "down_proj"):
        old = getattr(block.shared_experts, n)
        lin = FP8Linear(old.in_features, old.out_features, block_size=tuple(BLOCK))
        q, s = _tf_quantize("w.weight", old.weight.detach())
        lin.weight.data.copy_(q)
        lin.weight_scale_inv.data.copy_(s)
        setattr(block.shared_experts, n, lin)
    cfg.quantization_config = dict(QCONFIG)
    return block, cfg


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_from_hf_reads_fp8_experts_without_dequantizing(tmp_path):
    block, cfg = _fp8_block()
    cfg.dtype = torch.float32  # the model's compute dtype; the experts are FP8
    layer = moegraph.from_hf(block, cfg, out_dir=tmp_path, share_weights=True)
    assert layer.compute_dtype == torch.float32
    q = layer.hf_import.spec.moe.quantization
    assert (q.format, q.weight_block, q.shared_experts) == ("fp8_e4m3", (128, 128), True)
    # The FP8 bytes and scales are the block's own (shared: the very same storage).
    assert layer.experts.gate_up_proj.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert torch.equal(layer.experts.down_proj_scale_inv, block.experts.down_proj_scale_inv)
    assert torch.equal(layer.shared_experts.gate_up_proj.view(torch.uint8),
                       torch.cat([block.shared_experts.gate_proj.weight, block.shared_experts.up_proj.weight]).view(torch.uint8))
    assert layer.hf_import.max_abs_diff is not None  # the check against transformers' dequantized block ran
    # Exact against the FP8 reference with transformers' own dequantization of the same bytes.
    deq = {n: _dequantize_fp8_weight(getattr(block.experts, n), getattr(block.experts, n + "_scale_inv"), BLOCK,
                                     torch.float32) for n in ("gate_up_proj", "down_proj")}
    sh = {n: _dequantize_fp8_weight(getattr(block.shared_experts, n).weight,
                                    getattr(block.shared_experts, n).weight_scale_inv, BLOCK, torch.float32)
          for n in ("gate_proj", "up_proj", "down_proj")}
    view = types.SimpleNamespace(
        router=layer.router, experts=types.SimpleNamespace(**deq),
        shared_experts=types.SimpleNamespace(gate_up_proj=torch.cat([sh["gate_proj"], sh["up_proj"]]),
                                             down_proj=sh["down_proj"]))
    x = torch.randn(5, 256)
    ref = reference_forward(layer.hf_import.spec.to_dict(), view, x, expert_fn=fp8_expert(128))
    assert _rel(layer(x), ref) <= 1e-5


def test_from_hf_check_catches_a_misread_layout(tmp_path, monkeypatch):
    """The check runs the block as transformers dequantizes it: scales read for the wrong rows fail it."""
    block, cfg = _fp8_block(seed=1)
    right = quant.fp8_block_weights

    def misread(block, anat):
        w = right(block, anat)
        w["experts.gate_up_proj_scale_inv"] = w["experts.gate_up_proj_scale_inv"].roll(1, dims=0) * 50  # other experts'
        return w

    monkeypatch.setattr(moegraph.hf.block, "block_scales", misread)
    with pytest.raises(UnsupportedBlock, match="differs from the block"):
        moegraph.from_hf(block, cfg, dtype=torch.float32, out_dir=tmp_path)


def test_import_hf_config_reads_fp8_section(tmp_path, run_cli):
    cfg = _config(quantization_config=dict(QCONFIG, scale_fmt="ue8m0"))
    cfg.save_pretrained(tmp_path / "m")
    out = tmp_path / "spec.yaml"
    res = run_cli("import-hf", tmp_path / "m", "-o", out)
    assert res.code == 0, res.err
    q = load_spec(out).moe.quantization
    assert (q.format, q.weight_block, q.activation_tile, q.scale_format, q.shared_experts) == (
        "fp8_e4m3", (128, 128), (1, 128), "ue8m0", True)
    skip = spec_from_hf_config(_config(quantization_config=dict(QCONFIG, modules_to_not_convert=["shared_experts"])))
    assert skip.moe.quantization.shared_experts is False
    with pytest.raises(UnsupportedBlock, match="static activation scales"):
        spec_from_hf_config(_config(quantization_config=dict(QCONFIG, activation_scheme="static")))
    with pytest.raises(UnsupportedBlock, match="per-tensor weight scales"):
        spec_from_hf_config(_config(quantization_config=dict(QCONFIG, weight_block_size=None)))
    for field in ("quant_method", "fmt", "expert_dtype"):  # a long value is echoed short
        with pytest.raises(UnsupportedBlock, match=r"'xxxx.*\.\.\.") as exc:
            spec_from_hf_config(_config(quantization_config=dict(QCONFIG, **{field: "x" * 100_000})))
        assert len(str(exc.value)) < 600, field


def _deepseek_checkpoint(layer_spec, prefix="model.layers.1.mlp."):
    """A state dict in DeepSeek-V3's released layout, quantized by transformers' quantizer."""
    g = torch.Generator().manual_seed(3)
    D, Fh, E = 256, 128, 16
    sd = {f"{prefix}gate.weight": torch.randn(E, D, generator=g) * 0.05,
          f"{prefix}gate.e_score_correction_bias": torch.randn(E, generator=g) * 0.1}
    shapes = {"gate_proj": (Fh, D), "up_proj": (Fh, D), "down_proj": (D, Fh)}
    for e in range(E):
        for n, shape in shapes.items():
            w, s = _tf_quantize(f"{prefix}experts.{e}.{n}.weight", torch.randn(*shape, generator=g) * 0.06)
            sd[f"{prefix}experts.{e}.{n}.weight"], sd[f"{prefix}experts.{e}.{n}.weight_scale_inv"] = w, s
    for n, shape in shapes.items():
        w, s = _tf_quantize(f"{prefix}shared_experts.{n}.weight", torch.randn(*shape, generator=g) * 0.06)
        sd[f"{prefix}shared_experts.{n}.weight"], sd[f"{prefix}shared_experts.{n}.weight_scale_inv"] = w, s
    return sd


def test_deepseek_checkpoint_loads_without_conversion(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    prefix = "model.layers.1.mlp."
    sd = _deepseek_checkpoint("deepseek-v3-fp8-tiny", prefix)
    safetensors.save_file(sd, tmp_path / "model.safetensors")
    loaded = safetensors.load_file(tmp_path / "model.safetensors")
    layer = moegraph.compile("deepseek-v3-fp8-tiny", dtype=torch.float32, out_dir=tmp_path, seed=None).eval()
    quant.load_checkpoint(layer, loaded, prefix)
    assert torch.equal(layer.experts.gate_up_proj[5, :128].view(torch.uint8), sd[f"{prefix}experts.5.gate_proj.weight"].view(torch.uint8))
    assert torch.equal(layer.experts.gate_up_proj_scale_inv[5, 1], sd[f"{prefix}experts.5.up_proj.weight_scale_inv"][0])
    assert torch.equal(layer.experts.down_proj[9].view(torch.uint8), sd[f"{prefix}experts.9.down_proj.weight"].view(torch.uint8))
    # Against the loop reference over the checkpoint's own per-expert tensors, dequantized by transformers.
    def deq(key):
        return _dequantize_fp8_weight(sd[key + ".weight"], sd[key + ".weight_scale_inv"], BLOCK, torch.float32)

    view = types.SimpleNamespace(
        router=types.SimpleNamespace(weight=sd[f"{prefix}gate.weight"], expert_bias=sd[f"{prefix}gate.e_score_correction_bias"]),
        experts=types.SimpleNamespace(
            gate_up_proj=torch.stack([torch.cat([deq(f"{prefix}experts.{e}.gate_proj"), deq(f"{prefix}experts.{e}.up_proj")])
                                      for e in range(16)]),
            down_proj=torch.stack([deq(f"{prefix}experts.{e}.down_proj") for e in range(16)])),
        shared_experts=types.SimpleNamespace(
            gate_up_proj=torch.cat([deq(f"{prefix}shared_experts.gate_proj"), deq(f"{prefix}shared_experts.up_proj")]),
            down_proj=deq(f"{prefix}shared_experts.down_proj")))
    x = torch.randn(6, 256)
    ref = reference_forward(load_spec("deepseek-v3-fp8-tiny").to_dict(), view, x, expert_fn=fp8_expert(128))
    assert _rel(layer(x), ref) <= 1e-5
    # transformers' fused layout (what an FP8Experts state dict holds) loads to the same layer.
    fused = {"experts.gate_up_proj": layer.experts.gate_up_proj.clone(), "experts.down_proj": layer.experts.down_proj.clone(),
             "experts.gate_up_proj_scale_inv": layer.experts.gate_up_proj_scale_inv.clone(),
             "experts.down_proj_scale_inv": layer.experts.down_proj_scale_inv.clone()}
    fused.update({k[len(prefix):]: v for k, v in sd.items() if "shared" in k or "gate." in k})
    other = moegraph.compile("deepseek-v3-fp8-tiny", dtype=torch.float32, out_dir=tmp_path, seed=None).eval()
    quant.load_checkpoint(other, fused)
    assert torch.equal(other(x), layer(x))


def test_bad_checkpoints_are_refused(tmp_path):
    prefix = "mlp."
    sd = _deepseek_checkpoint("deepseek-v3-fp8-tiny", prefix)
    layer = moegraph.compile("deepseek-v3-fp8-tiny", dtype=torch.float32, out_dir=tmp_path, seed=None)
    before = layer.experts.gate_up_proj.clone()

    def bad(**edits):
        d = dict(sd)
        for k, v in edits.items():
            if v is None:
                del d[prefix + k]
            else:
                d[prefix + k] = v
        return d

    with pytest.raises(InputError, match=r"has FP8 'experts.3.up_proj.weight' but no 'experts.3.up_proj.weight_scale_inv'"):
        quant.load_checkpoint(layer, bad(**{"experts.3.up_proj.weight_scale_inv": None}), prefix)
    with pytest.raises(InputError, match=r"checkpoint has no 'experts.15.down_proj.weight'"):
        quant.load_checkpoint(layer, bad(**{"experts.15.down_proj.weight": None}), prefix)
    with pytest.raises(InputError, match=r"checkpoint gives experts.down_proj_scale_inv of shape \(16, 1, 2\) but the layer has \(16, 2, 1\)"):
        quant.load_checkpoint(layer, bad(**{f"experts.{e}.down_proj.weight_scale_inv": torch.ones(1, 2) for e in range(16)}),
                              prefix)
    nan = sd[prefix + "experts.2.gate_proj.weight_scale_inv"].clone()
    nan[0, 1] = float("inf")
    with pytest.raises(InputError, match=r"experts.gate_up_proj_scale_inv holds 1 non-finite .*first at \(2, 0, 1\)"):
        quant.load_checkpoint(layer, bad(**{"experts.2.gate_proj.weight_scale_inv": nan}), prefix)
    with pytest.raises(InputError, match=r"'experts.0.gate_proj.weight' is torch.bfloat16, not FP8"):
        quant.load_checkpoint(layer, bad(**{"experts.0.gate_proj.weight": torch.zeros(128, 256, dtype=torch.bfloat16)}),
                              prefix)
    assert torch.equal(layer.experts.gate_up_proj.view(torch.uint8), before.view(torch.uint8))  # nothing half-written
    plain = moegraph.compile("deepseek-v3-tiny", out_dir=tmp_path)
    with pytest.raises(InputError, match="no moe.quantization"):
        quant.load_checkpoint(plain, sd, prefix)


def test_optimize_swaps_an_fp8_block_and_verifies_it(tmp_path):
    """moegraph.optimize on a model whose MoE block has transformers' FP8 experts: the swapped-in layer
    holds the block's FP8 bytes and scales (none left at their initial value) and passes the check."""
    block, cfg = _fp8_block(seed=2)
    cfg.dtype = torch.float32
    model = ds.DeepseekV3ForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    # transformers' FP8 experts do not run on the CPU: the model's output with the block dequantized
    # by transformers' own dequantizer is the reference.
    model.model.layers[1].mlp = quant.reference_block(block, moegraph.hf.block.inspect_block(block, cfg), torch.float32)
    with torch.no_grad():
        before = model(ids).logits
    model.model.layers[1].mlp = block
    model = moegraph.optimize(model, verify=True, out_dir=tmp_path)
    (rec,) = model.moegraph_report.records
    assert rec.status == "swapped", rec.reason
    assert rec.rel_diff is not None and rec.rel_diff <= 4 * 2.0 ** -4
    layer = model.model.layers[1].mlp.moe
    assert torch.equal(layer.experts.gate_up_proj_scale_inv, block.experts.gate_up_proj_scale_inv)
    assert torch.equal(layer.shared_experts.down_proj_scale_inv, block.shared_experts.down_proj.weight_scale_inv)
    with torch.no_grad():
        after = model(ids).logits
    assert _rel(after, before) < 0.1  # the dequantized-block model vs the FP8 one (FP8 activations)


def _fp8_checkpoint(folder) -> dict:
    """A tiny DeepSeek-V3 causal LM saved as a fine-grained FP8 checkpoint, as DeepSeek ships it: every
    linear of the decoder layers (attention, dense MLP, per-expert and shared expert projections) in e4m3
    with its 128x128 ``weight_scale_inv`` from transformers' own quantizer; router, norms, embeddings and
    the LM head in float32. Returns the state dict written."""
    from safetensors.torch import load_file, save_file

    # Attention sizes are multiples of the 128 block (transformers' quantizer has no ragged edge).
    cfg = DeepseekV3Config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=2, topk_group=1, n_shared_experts=1, intermediate_size=512, num_hidden_layers=2,
                           first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                           kv_lora_rank=128, qk_rope_head_dim=128, qk_nope_head_dim=32, v_head_dim=32, vocab_size=300)
    torch.manual_seed(5)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    model.save_pretrained(folder / "plain")
    state = {}
    for k, v in load_file(folder / "plain" / "model.safetensors").items():
        if k.startswith("model.layers.") and v.dim() == 2 and "norm" not in k and not k.endswith("mlp.gate.weight"):
            state[k], state[k[:-len("weight")] + "weight_scale_inv"] = _tf_quantize(k, v)
        else:
            state[k] = v
    (folder / "fp8").mkdir()
    save_file(state, folder / "fp8" / "model.safetensors", metadata={"format": "pt"})
    cfg.quantization_config = dict(QCONFIG)
    cfg.save_pretrained(folder / "fp8")
    return state


def test_optimize_pretrained_keeps_an_fp8_checkpoint_in_fp8_on_cpu(tmp_path):
    """Without a GPU transformers would dequantize the whole checkpoint while loading; optimize_pretrained
    loads it in FP8, swaps the MoE block with the FP8 experts' bytes as they are, and dequantizes only
    the FP8 linears outside it. Logits and greedy tokens match the checkpoint run by transformers with
    its own dequantizer (the swapped layer also quantizes activations per tile: a small difference)."""
    from moegraph.pretrained import load_pretrained
    from moegraph.runtime import CompiledMoEBase

    state = _fp8_checkpoint(tmp_path)
    model = moegraph.optimize_pretrained(tmp_path / "fp8")
    rep = model.moegraph_report
    assert [r.status for r in rep.records] == ["swapped"], str(rep)
    (layer,) = [m for m in model.modules() if isinstance(m, CompiledMoEBase)]
    ex = layer.experts
    assert ex.gate_up_proj.dtype == torch.float8_e4m3fn and ex.down_proj.dtype == torch.float8_e4m3fn
    p = "model.layers.1.mlp."
    for e in range(8):  # the checkpoint's bytes and scales, per expert, untouched
        want = torch.cat([state[f"{p}experts.{e}.gate_proj.weight"], state[f"{p}experts.{e}.up_proj.weight"]])
        assert torch.equal(ex.gate_up_proj[e].view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(ex.down_proj_scale_inv[e], state[f"{p}experts.{e}.down_proj.weight_scale_inv"])
    outside = [n for n, t in model.named_parameters() if fp8.is_fp8(t) and ".moe." not in n]
    # Dequantized: 4 attention linears per layer and layer 0's 3 dense MLP linears; not the swapped experts.
    assert outside == [] and model.moegraph_dequantized == 11
    ref = quant.dequantize_modules(load_pretrained(tmp_path / "fp8", keep_fp8=True), torch.float32)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))
