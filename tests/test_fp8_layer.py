"""Compiled layers of FP8 specs: generated from the template, checked against the loop reference of
tests/reference_moe.py with an FP8 expert (tests/reference_fp8.py), trainable through master
weights, loadable from state dicts with ``*_scale_inv``, traceable by the FX passes."""

from __future__ import annotations

import copy
import types

import pytest
import yaml
import torch

import moegraph
from moegraph import fp8
from moegraph.errors import InputError
from moegraph.loader import load_spec
from moegraph.summary import summarize

from reference_fp8 import fp8_expert, ref_fake_quant_weight
from reference_moe import reference_forward

TINY = "deepseek-v3-fp8-tiny"


def _spec(**quant) -> dict:
    d = load_spec(TINY).to_dict()
    d["moe"]["quantization"].update(quant)
    return d


def _dequantized_view(layer) -> types.SimpleNamespace:
    """The layer's parameters with every FP8 weight dequantized by the reference quantizer's blocks."""
    block = (layer.FP8["block_out"], layer.FP8["block_in"])

    def deq(mod):
        out = types.SimpleNamespace()
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(mod, name)
            s = getattr(mod, name + "_scale_inv", None)
            if s is None:
                setattr(out, name, w)
                continue
            # Expand each block's scale over its block and multiply: no moegraph code involved.
            scale = s.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
            setattr(out, name, w.float() * scale)
        return out

    view = types.SimpleNamespace(router=layer.router, experts=deq(layer.experts))
    if layer.SHARED_INTERMEDIATE:
        view.shared_experts = deq(layer.shared_experts)
    return view


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("quant", [{}, {"shared_experts": False}, {"scale_format": "ue8m0"}, {"format": "fp8_e5m2"}],
                         ids=["preset", "shared-unquantized", "ue8m0", "e5m2"])
def test_layer_matches_fp8_reference(quant, tmp_path):
    spec = _spec(**quant)
    layer = moegraph.compile(spec, dtype=torch.float32, out_dir=tmp_path).eval()
    q = spec["moe"]["quantization"]
    assert layer.experts.gate_up_proj.dtype == fp8.FORMATS[q["format"]]
    assert (layer.shared_experts.down_proj.dtype == torch.float32) == (not q["shared_experts"])
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(0))
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    expert_fn = fp8_expert(128, q["format"], q["scale_format"] == "ue8m0")
    shared_plain = not q["shared_experts"]

    def mixed(x_D, w_up, w_down, *rest, **kw):  # the unquantized shared expert runs in plain float32
        if shared_plain and w_up is layer.shared_experts.gate_up_proj:
            from reference_moe import expert
            return expert(x_D, w_up, w_down, *rest, **kw)
        return expert_fn(x_D, w_up, w_down, *rest, **kw)

    ref = reference_forward(spec, _dequantized_view(layer), xr, expert_fn=mixed)
    layer.train()
    out = layer(xo)
    assert _rel(out, ref) <= 1e-5
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert _rel(xo.grad, xr.grad) <= 1e-5
    # The router is trained through the routing weights' gradient, as in the unquantized layer.
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_bf16_layer_and_error_against_the_unquantized_layer(tmp_path):
    layer = moegraph.compile(TINY, out_dir=tmp_path).eval()
    assert layer.compute_dtype == torch.bfloat16 and layer.experts.down_proj.dtype == torch.float8_e4m3fn
    d = load_spec(TINY).to_dict()
    d["moe"]["quantization"] = None
    plain = moegraph.compile(d, dtype=torch.float32, out_dir=tmp_path).eval()  # same seed: the master weights
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    u, _ = fp8.rounding_bound("fp8_e4m3")
    # The unquantized layer sees the same (bfloat16) input values, so both route alike and the
    # difference is the quantization's: a token whose near-tie the input rounding flips would route
    # to other experts, an error no rounding bound speaks of (x was unseeded and failed that way).
    assert _rel(y, plain(x.bfloat16().float())) <= 2 * u  # the documented bound (moegraph.fp8.rounding_bound)
    with pytest.raises(InputError, match=r"input has dtype torch.float32 but the layer computes in torch.bfloat16"):
        layer(x)
    # an FP8 input: cast the input; never "cast the layer to float8" (its weights already are; it computes in bf16)
    with pytest.raises(InputError, match=r"cast the input \(x.to\(torch.bfloat16\)\)$"):
        layer(x.to(torch.float8_e4m3fn))


def test_memory_is_half_of_bf16_and_matches_summary(tmp_path):
    layer = moegraph.compile(TINY, out_dir=tmp_path)
    d = load_spec(TINY).to_dict()
    d["moe"]["quantization"] = None
    plain = moegraph.compile(d, out_dir=tmp_path)

    def expert_bytes(m):
        return sum(t.nbytes for mod in (m.experts, m.shared_experts) for t in mod.parameters())

    s = summarize(load_spec(TINY))
    assert expert_bytes(layer) == s.expert_bytes_per_layer
    assert expert_bytes(plain) == s.expert_bytes_per_layer_dtype
    assert expert_bytes(layer) / expert_bytes(plain) <= 0.52


def test_master_weights_train_and_requantize(tmp_path):
    layer = moegraph.compile(TINY, dtype=torch.float32, out_dir=tmp_path).train()
    x = torch.randn(4, 256)
    before = layer(x).detach()
    fp8.use_master_weights(layer)
    assert layer.experts.gate_up_proj.dtype == torch.float32 and layer.experts.gate_up_proj.requires_grad
    assert layer.experts.gate_up_proj_scale_inv is None
    # The master weights are the dequantized FP8 ones, quantized again on every forward: same output.
    assert _rel(layer(x), before) <= 1e-6
    # Their gradient is the gradient at the FP8-rounded weights (the reference: dequantized leaves).
    def rounded(w):  # the reference quantizer, applied to each expert's master weight
        return torch.stack([ref_fake_quant_weight(e, (128, 128)) for e in w.detach().reshape(-1, *w.shape[-2:])]
                           ).reshape(w.shape)

    down = rounded(layer.experts.down_proj).requires_grad_()
    view = types.SimpleNamespace(
        router=layer.router,
        experts=types.SimpleNamespace(gate_up_proj=rounded(layer.experts.gate_up_proj), down_proj=down),
        shared_experts=types.SimpleNamespace(gate_up_proj=rounded(layer.shared_experts.gate_up_proj),
                                             down_proj=rounded(layer.shared_experts.down_proj)))
    spec = load_spec(TINY).to_dict()
    ref = reference_forward(spec, view, x, expert_fn=fp8_expert(128))
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (layer(x) * g).sum().backward()
    assert _rel(layer.experts.down_proj.grad, down.grad) <= 1e-5
    # A few SGD steps on the master weights lower a regression loss; requantizing gives FP8 again.
    target = torch.randn(4, 256)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    trained = layer(x).detach()
    fp8.requantize(layer)
    assert layer.experts.gate_up_proj.dtype == torch.float8_e4m3fn and not layer.experts.gate_up_proj.requires_grad
    assert _rel(layer(x), trained) <= 1e-5


def test_state_dict_round_trip_and_bad_scales(tmp_path):
    layer = moegraph.compile(TINY, out_dir=tmp_path).eval()
    sd = layer.state_dict()
    assert sd["experts.gate_up_proj_scale_inv"].shape == (16, 2, 2) and sd["experts.down_proj_scale_inv"].shape == (16, 2, 1)
    fresh = moegraph.compile(TINY, out_dir=tmp_path, seed=None).eval()
    fresh.load_state_dict(sd)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))
    bad = copy.deepcopy(sd)
    bad["experts.down_proj_scale_inv"][7, 1, 0] = float("nan")
    fresh.load_state_dict(bad)
    with pytest.raises(InputError, match=r"down_proj_scale_inv holds 1 non-finite .*first at \(7, 1, 0\)"):
        fresh(x)
    with pytest.raises(RuntimeError, match="size mismatch for experts.gate_up_proj_scale_inv"):
        fresh.load_state_dict({**sd, "experts.gate_up_proj_scale_inv": torch.ones(16, 2, 1)})


def test_to_keeps_fp8_and_fx_passes_run(tmp_path):
    layer = moegraph.compile(TINY, out_dir=tmp_path).eval()
    layer = layer.to(torch.float32)
    assert layer.compute_dtype == torch.float32
    assert layer.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert layer.experts.gate_up_proj_scale_inv.dtype == torch.float32
    x = torch.randn(7, 256)
    y = layer(x)
    gm = layer.graph()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "moegraph.fp8_expert_mlp" in targets  # one opaque node
    assert any("shared_mlp" in t for t in targets)
    assert "DropTrainingOutputs" in layer.pass_report["eval"].applied
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), y)


@pytest.mark.parametrize("master", [False, True])
def test_torch_compile_trains_an_fp8_layer_in_one_graph(tmp_path, master):
    """AOTAutograd traces the FP8 backward as one opaque op (it recomputed the forward's data-dependent loop
    over experts in Python, which AOTAutograd cannot trace: fullgraph failed, and without it every forward
    fell back). Gradients equal eager ones, stored FP8 weights' and master weights' alike."""
    import warnings

    layer = moegraph.compile(TINY, out_dir=tmp_path, dtype=torch.float32).train()
    if master:
        fp8.use_master_weights(layer)
    x = torch.randn(9, 256, requires_grad=True, generator=torch.Generator().manual_seed(0))
    g = torch.randn(9, 256, generator=torch.Generator().manual_seed(1))
    params = [p for p in layer.parameters() if p.requires_grad]
    assert any(p.dim() == 3 for p in params) == master  # the expert weights train only as master weights
    eager = torch.autograd.grad(layer(x), [x, *params], g)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.autograd.grad(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), [x, *params], g)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not [str(w.message) for w in caught if "Backward" in str(w.message)]
    layer.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), y)  # grad mode on


def test_fp8_the_triton_kernels_cannot_run_is_refused(tmp_path, run_cli):
    # The Triton FP8 kernels take one K step per weight block: a narrower activation tile is refused
    # by name when the backend is chosen at compile time, before anything is written.
    from moegraph.errors import CodegenError

    narrow = _spec(activation_tile=[1, 64])
    with pytest.raises(CodegenError, match=r"activation_tile \[1, 64\] as wide as the weight block's input size \(128\)"):
        moegraph.compile(narrow, backend="triton", out_dir=tmp_path)
    path = tmp_path / "narrow.yaml"
    path.write_text(yaml.safe_dump(narrow))
    res = run_cli("compile", path, "-o", tmp_path / "out", "--backend", "triton")
    assert res.code == 2 and "compile with backend='torch'" in res.err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    # Block sizes the kernels cannot tile (a power of two of 16 or more: tl.arange and tl.dot) are refused
    # the same way, each field by name: they passed and failed at the first forward, inside Triton.
    for block, fields in (([96, 96], ("weight_block.0", "weight_block.1")), ([48, 128], ("weight_block.0",)),
                          ([128, 96], ("weight_block.1",))):
        d = _spec(weight_block=block, activation_tile=[1, block[1]])
        d["moe"]["hidden_size"] = d["moe"]["experts"]["intermediate_size"] = 384  # every block divides them
        spec = moegraph.load_spec(d)
        with pytest.raises(CodegenError) as info:
            moegraph.compile(spec, backend="triton", out_dir=tmp_path / "blocks")
        message = str(info.value)
        named = [f for f in ("weight_block.0", "weight_block.1") if f"moe.quantization.{f}: " in message]
        assert tuple(named) == fields, (block, message)
        assert "power of two of 16 or more" in message and "compile with backend='torch'" in message
    assert not (tmp_path / "blocks").exists()


def test_training_on_no_tokens_gives_zero_gradients():
    # the backward recomputed the forward and differentiated an output with no graph: RuntimeError on 0 tokens
    # (an expert-parallel rank without tokens then failed its peers too; audit)
    layer = moegraph.compile(TINY, seed=0).train()
    x = torch.randn(0, layer.HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.shape == (0, layer.HIDDEN)
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)
