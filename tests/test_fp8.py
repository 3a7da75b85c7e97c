"""FP8 quantization and the FP8 expert op (``moegraph.fp8``).

References written here, not taken from the code under test: a block-by-block quantizer spelled out
with loops, a dense loop over (token, expert) pairs that dequantizes with the same blocks and tiles
and multiplies in float32, transformers' own fine-grained FP8 quantizer and dequantizer (which run on
the CPU), and the unquantized expert MLP for the error bound.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from moegraph import fp8
from moegraph.errors import InputError

from reference_fp8 import DT, ref_fake_quant_acts, ref_fake_quant_weight

def ref_layer(x, ids_TK, w_TK, w_up_deq, w_down_deq, tile, fmt="fp8_e4m3", ue8m0=False):
    """Dense loop over (token, choice): FP8-rounded x tile, float32 GEMMs with the dequantized weights,
    SwiGLU, FP8-rounded activation tile, down GEMM, weighted sum in float32."""
    T, K = ids_TK.shape
    rows = []
    for t in range(T):
        xq = ref_fake_quant_acts(x[t:t + 1], tile, fmt, ue8m0)
        acc = torch.zeros(1, x.shape[1])
        for k in range(K):
            e = int(ids_TK[t, k])
            h = xq @ w_up_deq[e].t()
            f = h.shape[1] // 2
            a = F.silu(h[:, :f]) * h[:, f:]
            acc = acc + w_TK[t, k].float() * (ref_fake_quant_acts(a, tile, fmt, ue8m0) @ w_down_deq[e].t())
        rows.append(acc)
    return torch.cat(rows).to(x.dtype)


def _setup(E=4, D=256, Fh=128, T=6, K=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w_up = torch.randn(E, 2 * Fh, D, generator=g) / D ** 0.5
    w_down = torch.randn(E, D, Fh, generator=g) / Fh ** 0.5
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w_TK = torch.rand(T, K, generator=g).to(dtype)
    return w_up, w_down, x, ids, w_TK


def _op(x, ids, w_TK, w_up, s_up, w_down, s_down, block=(128, 128), tile=128, fmt="fp8_e4m3", scale_format="float32"):
    T, K = ids.shape
    tok = torch.arange(T).repeat_interleave(K)
    return torch.ops.moegraph.fp8_expert_mlp(x, tok, ids.reshape(-1), w_TK.reshape(-1), w_up, s_up, w_down, s_down,
                                             None, None, "silu", True, None, None, block[0], block[1], tile, fmt,
                                             scale_format)


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


# ------------------------------------------------------------------------------------------------
# Quantizers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
def test_block_quantizer_matches_reference(fmt, scale_format):
    w = torch.randn(256, 384) * torch.logspace(-3, 1, 384)  # blocks with very different ranges
    w[:128, :128] = 0.0  # an all-zero block
    q, s = fp8.quantize_blocks(w, (128, 128), fmt, scale_format)
    assert q.dtype == DT[fmt] and s.dtype == torch.float32 and s.shape == (2, 3)
    deq = fp8.dequantize_blocks(q, s, (128, 128))
    ref = ref_fake_quant_weight(w, (128, 128), fmt, scale_format == "ue8m0")
    assert torch.equal(deq, ref)
    assert float(s[0, 0]) == 1.0 and not deq[:128, :128].any()
    if scale_format == "ue8m0":
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_rounding_bound_holds(fmt):
    u, eps = fp8.rounding_bound(fmt)
    x = torch.randn(64, 256) * torch.logspace(-6, 2, 256)
    q, s = fp8.quantize_tiles(x, 128, fmt)
    err = (fp8.dequantize_tiles(q, s, 128) - x).abs()
    bound = u * x.abs() + eps * s.repeat_interleave(128, dim=1)
    assert (err <= bound * (1 + 1e-6)).all()
    assert float((err / bound).max()) > 0.5  # the bound is reached, not loose by orders of magnitude


def test_quantizer_matches_transformers():
    """transformers' fine-grained FP8 quantizer (CPU) and ours store the same bytes and scales; its
    dequantizer reads ours back to our weights."""
    tf = pytest.importorskip("transformers.integrations.finegrained_fp8")
    w = torch.randn(4, 256, 384, dtype=torch.bfloat16)
    for fmt_name in ("float32", "ue8m0"):
        hq = types.SimpleNamespace(quantization_config=types.SimpleNamespace(weight_block_size=[128, 128],
                                                                            scale_fmt=fmt_name))
        out = tf.Fp8Quantize(hq).convert({"experts.gate_up_proj": w})
        q, s = fp8.quantize_blocks(w, (128, 128), "fp8_e4m3", fmt_name)
        assert torch.equal(out["experts.gate_up_proj"].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(out["experts.gate_up_proj_scale_inv"].float(), s)
    theirs = tf._dequantize_fp8_weight(q, s, [128, 128], torch.float32)
    assert torch.equal(theirs, fp8.dequantize_blocks(q, s, (128, 128)))


# ------------------------------------------------------------------------------------------------
# The op against the dense reference (outputs and gradients, 1e-5 relative)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,scale_format", [("fp8_e4m3", "float32"), ("fp8_e4m3", "ue8m0"), ("fp8_e5m2", "float32")])
def test_op_matches_dense_reference(fmt, scale_format):
    w_up, w_down, x, ids, w_TK = _setup()
    q_up, s_up = fp8.quantize_blocks(w_up, (128, 128), fmt, scale_format)
    q_dn, s_dn = fp8.quantize_blocks(w_down, (128, 128), fmt, scale_format)
    up_deq = torch.stack([ref_fake_quant_weight(w, (128, 128), fmt, scale_format == "ue8m0") for w in w_up])
    dn_deq = torch.stack([ref_fake_quant_weight(w, (128, 128), fmt, scale_format == "ue8m0") for w in w_down])
    xr, wr = x.clone().requires_grad_(), w_TK.clone().requires_grad_()
    xo, wo = x.clone().requires_grad_(), w_TK.clone().requires_grad_()
    ref = ref_layer(xr, ids, wr, up_deq, dn_deq, 128, fmt, scale_format == "ue8m0")
    out = _op(xo, ids, wo, q_up, s_up, q_dn, s_dn, fmt=fmt, scale_format=scale_format)
    assert _rel(out, ref) <= 1e-5
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert _rel(xo.grad, xr.grad) <= 1e-5  # Dgrad through the same FP8 weights
    assert _rel(wo.grad, wr.grad) <= 1e-5  # routing weights


def test_master_weight_gradients_are_fp8_wgrad():
    """Given master weights (no scales), the op quantizes them per block on the fly; their gradient is
    the gradient at the dequantized FP8 weights (straight through the quantizer), taken with the FP8
    activations."""
    w_up, w_down, x, ids, w_TK = _setup(seed=1)
    up_deq = torch.stack([ref_fake_quant_weight(w, (128, 128)) for w in w_up]).requires_grad_()
    dn_deq = torch.stack([ref_fake_quant_weight(w, (128, 128)) for w in w_down]).requires_grad_()
    ref = ref_layer(x, ids, w_TK, up_deq, dn_deq, 128)
    mu, md = w_up.clone().requires_grad_(), w_down.clone().requires_grad_()
    out = _op(x, ids, w_TK, mu, None, md, None)
    assert _rel(out, ref) <= 1e-5
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert _rel(mu.grad, up_deq.grad) <= 1e-5 and _rel(md.grad, dn_deq.grad) <= 1e-5
    # Stored FP8 weights are not trainable: the op returns no gradient for them.
    q, s = fp8.quantize_blocks(w_up, (128, 128))
    xo = x.clone().requires_grad_()
    _op(xo, ids, w_TK, q, s, md.detach(), None).sum().backward()
    assert xo.grad is not None and torch.isfinite(xo.grad).all()


def test_bf16_input_accumulates_in_float32():
    w_up, w_down, x, ids, w_TK = _setup(dtype=torch.bfloat16, seed=2)
    q_up, s_up = fp8.quantize_blocks(w_up, (128, 128))
    q_dn, s_dn = fp8.quantize_blocks(w_down, (128, 128))
    ref = ref_layer(x, ids, w_TK, fp8.dequantize_blocks(q_up, s_up, (128, 128)),
                    fp8.dequantize_blocks(q_dn, s_dn, (128, 128)), 128)
    out = _op(x, ids, w_TK, q_up, s_up, q_dn, s_dn)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)  # one cast of the same float32 sum


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_error_against_unquantized_layer(fmt):
    """The documented bound (moegraph.fp8.rounding_bound): relative Frobenius error below 2u."""
    w_up, w_down, x, ids, w_TK = _setup(T=32, seed=3)
    q_up, s_up = fp8.quantize_blocks(w_up, (128, 128), fmt)
    q_dn, s_dn = fp8.quantize_blocks(w_down, (128, 128), fmt)
    exact = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = x[t] @ w_up[e].t()
            exact[t] += w_TK[t, k] * ((F.silu(h[:128]) * h[128:]) @ w_down[e].t())
    rel = _rel(_op(x, ids, w_TK, q_up, s_up, q_dn, s_dn, fmt=fmt), exact)
    u, _ = fp8.rounding_bound(fmt)
    assert u / 8 < rel <= 2 * u, rel


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_one_gemm_elementwise_bound(fmt):
    u, eps = fp8.rounding_bound(fmt)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 256, generator=g)
    w = torch.randn(128, 256, generator=g)
    qx, sx = fp8.quantize_tiles(x, 128, fmt)
    qw, sw = fp8.quantize_blocks(w, (128, 128), fmt)
    got = fp8.dequantize_tiles(qx, sx, 128) @ fp8.dequantize_blocks(qw, sw, (128, 128)).t()
    dx = u * x.abs() + eps * sx.repeat_interleave(128, 1)
    dw = u * w.abs() + eps * sw.repeat_interleave(128, 0).repeat_interleave(128, 1)
    bound = dx @ w.abs().t() + x.abs() @ dw.t() + dx @ dw.t()
    assert ((got - x @ w.t()).abs() <= bound * (1 + 1e-5) + 1e-6).all()


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_scales_are_refused():
    w_up, w_down, x, ids, w_TK = _setup()
    q_up, s_up = fp8.quantize_blocks(w_up, (128, 128))
    q_dn, s_dn = fp8.quantize_blocks(w_down, (128, 128))
    with pytest.raises(InputError, match="gate_up_proj is stored in torch.float8_e4m3fn but has no scale_inv"):
        _op(x, ids, w_TK, q_up, None, q_dn, s_dn)
    with pytest.raises(InputError, match=r"down_proj_scale_inv has shape \(4, 1, 2\) but down_proj \(4, 256, 128\) "
                                         r"in 128x128 blocks needs \(4, 2, 1\)"):
        _op(x, ids, w_TK, q_up, s_up, q_dn, s_dn.transpose(1, 2).contiguous())
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        s = s_up.clone()
        s[2, 1, 0] = bad
        with pytest.raises(InputError, match=r"gate_up_proj_scale_inv holds 1 non-finite or non-positive scale\(s\) "
                                             r"\(first at \(2, 1, 0\)"):
            _op(x, ids, w_TK, q_up, s, q_dn, s_dn)
    with pytest.raises(InputError, match="scales are float32"):
        _op(x, ids, w_TK, q_up, s_up.double(), q_dn, s_dn)
    # Scales are scanned once per tensor and version: a value written in place after a call that accepted
    # them is refused on the next call, read whole or through a view (the shared experts' scales are
    # views), with and without inference mode (whose own tensors carry no version and are always scanned).
    for mode in (torch.no_grad, torch.inference_mode):
        s = torch.nn.Parameter(s_up.clone(), requires_grad=False)
        with mode():
            _op(x, ids, w_TK, q_up, s, q_dn, s_dn)
            _op(x, ids[:, :1], w_TK[:, :1], q_up[:1], s[:1], q_dn[:1], s_dn[:1])
            with torch.no_grad():
                s[0, 1, 1] = float("inf")
            for w, sv, d, sd, k in ((q_up, s, q_dn, s_dn, 2), (q_up[:1], s[:1], q_dn[:1], s_dn[:1], 1)):
                with pytest.raises(InputError, match=r"gate_up_proj_scale_inv holds 1 non-finite .*\(first at \(0, 1, 1\)"):
                    _op(x, ids[:, :k], w_TK[:, :k], w, sv, d, sd)
    with torch.inference_mode():
        s = s_up.clone()  # an inference tensor
        _op(x, ids, w_TK, q_up, s, q_dn, s_dn)
        s[1, 0, 0] = -2.0
        with pytest.raises(InputError, match=r"first at \(1, 0, 0\)"):
            _op(x, ids, w_TK, q_up, s, q_dn, s_dn)
    with pytest.raises(InputError, match="master weights without scales"):
        _op(x, ids, w_TK, w_up, s_up, q_dn, s_dn)
    with pytest.raises(InputError, match="weight_block"):
        fp8.quantize_blocks(w_up, (96, 128))
    with pytest.raises(InputError, match="activation_tile"):
        fp8.quantize_tiles(x, 96)
