"""The native decode kernel (moegraph/native.py): against the loop references, in layers (eval and the
gradients of a training step, which stay torch's), its fallback without a compiler, its on-disk cache,
and its refusal of inputs it cannot read.

Every test here that needs the kernel skips where this machine has no working C compiler (the
fallback test runs everywhere)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import moegraph
from moegraph import fp8, native, semantics, strategies, tuning
from moegraph.errors import InputError
from moegraph.ops.args import ExpertArgs
from moegraph.semantics.expr import C_SPELLINGS, FUNCTIONS

import reference_fp8
import reference_moe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    native.set_cache_dir(d)
    if not native.available("swiglu"):
        native.set_cache_dir(None)
        pytest.skip("no working C compiler here (the fallback is tested below)")
    yield d
    native.set_cache_dir(None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _assignments(T, E, K, g, drop=True):
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.randint(0, E, (T * K,), generator=g)
    if drop:
        exp[1] = E  # an assignment the op drops (expert id outside [0, E))
    return tok, exp, torch.rand(T * K, generator=g)


def _dense_reference(x, tok, exp, wgt, w_up, w_down, b_up, b_down, activation, clamps=(None, None), shared=None):
    """The op's meaning, token by token, from tests/reference_moe.py's expert (float32)."""
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t, e, w in zip(tok.tolist(), exp.tolist(), wgt.tolist()):
        if 0 <= e < w_up.shape[0]:
            y[t] += w * reference_moe.expert(x[t].float(), w_up[e].float(), w_down[e].float(),
                                             None if b_up is None else b_up[e].float(),
                                             None if b_down is None else b_down[e].float(), activation, *clamps)
    if shared is not None:
        for t in range(x.shape[0]):
            y[t] += reference_moe.expert(x[t].float(), shared[0].float(), shared[1].float(), None, None, activation,
                                         *clamps)
    return y


def test_every_expression_function_has_a_c_spelling():
    assert set(C_SPELLINGS) == set(FUNCTIONS)
    for name, spelling in C_SPELLINGS.items():
        args = [f"a{i}" for i in range(FUNCTIONS[name].arity)]
        assert all(a in spelling.format(*args) for a in args), name


@pytest.mark.parametrize("activation,clamps", [("swiglu", (None, None)), ("geglu_tanh", (7.0, 5.0)),
                                                ("relu2", (None, None))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_op_matches_the_loop_reference(kernel_dir, activation, clamps, dtype):
    g = torch.Generator().manual_seed(1)
    gated = reference_moe.ACT[activation][1]
    T, D, F, E, K = 5, 48, 40, 6, 3
    H = (2 if gated else 1) * F
    x = torch.randn(T, D, generator=g).to(dtype)
    w_up, w_down = (torch.randn(E, H, D, generator=g) / 4).to(dtype), (torch.randn(E, D, F, generator=g) / 4).to(dtype)
    b_up, b_down = torch.randn(E, H, generator=g).to(dtype), torch.randn(E, D, generator=g).to(dtype)
    s_up, s_down = (torch.randn(H, D, generator=g) / 4).to(dtype), (torch.randn(D, F, generator=g) / 4).to(dtype)
    tok, exp, wgt = _assignments(T, E, K, g)
    act = semantics.activation(activation)
    args = ExpertArgs(x, tok, exp, wgt, w_up, w_down, b_up, b_down, act.name, act.gated, *clamps, s_up, s_down)
    out = native.run_experts(args)
    assert out.dtype == dtype and out.shape == (T, D)
    ref = _dense_reference(x, tok, exp, wgt, w_up, w_down, b_up, b_down, activation, clamps, shared=(s_up, s_down))
    # float32: summation order only; bfloat16: the output's one rounding (the kernel accumulates in float32)
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 8e-3)


def test_inline_expression_spelled_in_c(kernel_dir):
    expr = ("gelu_tanh(gate) * softplus(up) + erf(gate) * tanh(up) - abs(gate) * sign(up) + sqrt(relu(up)) * "
            "log1p(abs(gate)) + exp(-square(gate)) * step(up) + max(gate, up) - min(gate, 0.5) + sigmoid(up) ** 3 "
            "+ log(1 + abs(up)) / 2 + silu(gate) * gelu(up)")
    g = torch.Generator().manual_seed(2)
    T, D, F, E = 3, 32, 16, 4
    x = torch.randn(T, D, generator=g)
    w_up, w_down = torch.randn(E, 2 * F, D, generator=g) / 4, torch.randn(E, D, F, generator=g) / 4
    tok, exp, wgt = _assignments(T, E, 2, g)
    args = ExpertArgs(x, tok, exp, wgt, w_up, w_down, None, None, expr, True)
    from moegraph.ops import _expert_mlp_impl

    assert _rel(native.run_experts(args), _expert_mlp_impl(args)) < 1e-5


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
@pytest.mark.parametrize("block,tile", [((128, 128), 128), ((32, 16), 16)])
def test_fp8_matches_the_fp8_loop_reference_and_the_torch_op(kernel_dir, fmt, scale_format, block, tile):
    g = torch.Generator().manual_seed(3)
    T, D, F, E, K = 4, 256, 128, 5, 3
    x = torch.randn(T, D, generator=g)
    w_up, s_up = fp8.quantize_blocks(torch.randn(E, 2 * F, D, generator=g) / 8, block, fmt, scale_format)
    w_down, s_down = fp8.quantize_blocks(torch.randn(E, D, F, generator=g) / 6, block, fmt, scale_format)
    b_up, b_down = torch.randn(E, 2 * F, generator=g), torch.randn(E, D, generator=g)
    tok, exp, wgt = _assignments(T, E, K, g)
    args = (x, tok, exp, wgt, w_up, s_up, w_down, s_down, b_up, b_down, "swiglu", True, None, None)
    out = native.run_fp8(*args, block, tile, fmt, scale_format)
    # the op's torch path, and the loop reference written from DeepSeek-V3's description
    assert _rel(out, fp8._forward(*args, block, tile, fmt, scale_format)) < 1e-5
    run = reference_fp8.fp8_expert(tile, fmt, scale_format == "ue8m0")
    ref = torch.zeros(T, D)
    for t, e, w in zip(tok.tolist(), exp.tolist(), wgt.tolist()):
        if e < E:
            ref[t] += w * run(x[t], fp8.dequantize_blocks(w_up[e], s_up[e], block),
                              fp8.dequantize_blocks(w_down[e], s_down[e], block), b_up[e], b_down[e], "swiglu")
    assert _rel(out, ref) < 1e-5


def test_fp8_nan_weight_stays_nan(kernel_dir):
    E, D, F = 1, 128, 128
    w_up, s_up = fp8.quantize_blocks(torch.randn(E, 2 * F, D) / 8, (128, 128))
    w_down, s_down = fp8.quantize_blocks(torch.randn(E, D, F) / 8, (128, 128))
    w_down.view(torch.uint8)[0, 3, 5] = 0x7F  # e4m3fn NaN
    x, tok, exp, wgt = torch.randn(1, D), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), torch.ones(1)
    out = native.run_fp8(x, tok, exp, wgt, w_up, s_up, w_down, s_down, None, None, "swiglu", True, None, None,
                         (128, 128), 128, "fp8_e4m3", "float32")
    assert torch.isnan(out[0, 3]) and torch.isfinite(out[0, :3]).all()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_fp8_dot_products_are_built_where_the_cpu_has_them(kernel_dir):
    """FP8 x FP8 in bfloat16 dot products needs AVX512-BF16 and AVX512-VBMI (vdpbf16ps, vpermi2b); the
    kernel built with -march=native uses them exactly where the CPU has both (so that the FP8 tests above
    exercise that path on such a machine), and claims nothing elsewhere."""
    lib = native.kernel(semantics.activation("swiglu"))
    flags = _cpu_flags()
    if not flags:
        return  # no /proc/cpuinfo to compare with (not Linux): the portable tests below still run
    assert lib.mg_fp8_dot() == int({"avx512_bf16", "avx512vbmi", "avx512bw"} <= flags)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("block,tile", [((128, 128), 128), ((128, 64), 64), ((64, 128), 128)])
def test_fp8_many_tokens_per_expert_subnormals_and_biases(kernel_dir, fmt, block, tile):
    """Experts receiving 1 to 16 tokens (one token: four weight rows at a time; several: up to four
    tokens per pass over a weight row, in column slices when their activations exceed the L1 budget),
    FP8 subnormal weight bytes, activation tiles holding values 1e5 times below their largest (whose
    FP8 values are subnormal), biases: against the FP8 loop reference and the op's torch path."""
    g = torch.Generator().manual_seed(11)
    T, D, F, E = 16, 1024, 256, 4
    x = torch.randn(T, D, generator=g)
    x[:, ::7] *= 1e-5
    w_up, s_up = fp8.quantize_blocks(torch.randn(E, 2 * F, D, generator=g) / 8, block, fmt)
    w_down, s_down = fp8.quantize_blocks(torch.randn(E, D, F, generator=g) / 6, block, fmt)
    sub = torch.tensor([0x01, 0x03, 0x07, 0x81, 0x85], dtype=torch.uint8)  # subnormal in both formats
    w_up.view(torch.uint8)[:, ::5, ::3] = sub[torch.randint(0, 5, w_up[:, ::5, ::3].shape, generator=g)]
    w_down.view(torch.uint8)[:, ::3, ::5] = sub[torch.randint(0, 5, w_down[:, ::3, ::5].shape, generator=g)]
    b_up, b_down = torch.randn(E, 2 * F, generator=g), torch.randn(E, D, generator=g)
    # expert 0: every token (16 per pass: a column-sliced expert), 1: tokens 0-4 (a group of 4, then 1),
    # 2: one token, 3: none
    tok = torch.cat([torch.arange(T), torch.arange(5), torch.tensor([9])])
    exp = torch.cat([torch.zeros(T, dtype=torch.int64), torch.ones(5, dtype=torch.int64), torch.tensor([2])])
    wgt = torch.rand(tok.numel(), generator=g)
    args = (x, tok, exp, wgt, w_up, s_up, w_down, s_down, b_up, b_down, "swiglu", True, None, None)
    out = native.run_fp8(*args, block, tile, fmt, "float32")
    assert _rel(out, fp8._forward(*args, block, tile, fmt, "float32")) < 1e-5
    assert _rel(out, _fp8_loop_reference(*args[:10], block, tile, fmt)) < 1e-5


def _fp8_loop_reference(x, tok, exp, wgt, w_up, s_up, w_down, s_down, b_up, b_down, block, tile, fmt):
    """The FP8 op's meaning token by token: tests/reference_fp8.py's expert on the dequantized blocks."""
    run = reference_fp8.fp8_expert(tile, fmt, False)
    ref = torch.zeros(x.shape)
    for e in sorted(set(exp.tolist())):
        w_up_e = fp8.dequantize_blocks(w_up[e], s_up[e], block)
        w_down_e = fp8.dequantize_blocks(w_down[e], s_down[e], block)
        for t, ee, w in zip(tok.tolist(), exp.tolist(), wgt.tolist()):
            if ee == e:
                ref[t] += w * run(x[t], w_up_e, w_down_e, None if b_up is None else b_up[e],
                                  None if b_down is None else b_down[e], "swiglu")
    return ref


def _subnormal_bytes(w: torch.Tensor, g: torch.Generator) -> None:
    """Every third weight byte of every fifth row made an FP8 subnormal (in both formats)."""
    sub = torch.tensor([0x01, 0x03, 0x07, 0x81, 0x85], dtype=torch.uint8)
    w.view(torch.uint8)[:, ::5, ::3] = sub[torch.randint(0, 5, w[:, ::5, ::3].shape, generator=g)]


@pytest.mark.parametrize("threads", [1, 5])
@pytest.mark.parametrize("fmt,block", [("fp8_e4m3", (128, 128)), ("fp8_e5m2", (64, 128))])
def test_fp8_token_groups_of_every_size(kernel_dir, threads, fmt, block):
    """Experts receiving 16, 9, 7, 6, 3 and 2 tokens: the groups of activation rows (8 + 8, 8 + 1, 4 + 3,
    4 + 2, 3, 2) and the weight rows each meets at once (1, 2, 4 or 8, and the rows left over where a
    batch ends at a row block or a thread's share); 5 threads cut the rows at odd places (1536 up rows,
    384 down rows). Against the FP8 loop reference and the op's torch path."""
    g = torch.Generator().manual_seed(5)
    T, D, F = 16, 384, 128
    counts = [16, 9, 7, 6, 3, 2]
    E = len(counts) + 1  # the last expert gets nothing
    x = torch.randn(T, D, generator=g)
    w_up, s_up = fp8.quantize_blocks(torch.randn(E, 2 * F, D, generator=g) / 8, block, fmt)
    w_down, s_down = fp8.quantize_blocks(torch.randn(E, D, F, generator=g) / 6, block, fmt)
    _subnormal_bytes(w_up, g)
    b_up, b_down = torch.randn(E, 2 * F, generator=g), torch.randn(E, D, generator=g)
    tok = torch.cat([torch.randperm(T, generator=g)[:c] for c in counts])
    exp = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    wgt = torch.rand(tok.numel(), generator=g)
    args = (x, tok, exp, wgt, w_up, s_up, w_down, s_down, b_up, b_down, "swiglu", True, None, None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = native.run_fp8(*args, block, 128, fmt, "float32")
    finally:
        torch.set_num_threads(before)
    assert _rel(out, fp8._forward(*args, block, 128, fmt, "float32")) < 1e-5
    assert _rel(out, _fp8_loop_reference(*args[:10], block, 128, fmt)) < 1e-5


def test_fp8_column_slices_and_extreme_scales(kernel_dir):
    """16 tokens whose activations exceed the kernel's budget (D = 8448: the columns are cut in
    slices, partial sums added); and weight block scales so small that their product with an activation
    tile's scale is a float32 subnormal, where applying one product per chunk would lose bits that the
    two scales applied in turn keep (the reference keeps them too)."""
    g = torch.Generator().manual_seed(8)
    block, tile, fmt = (128, 128), 128, "fp8_e4m3"
    T, D, F = 16, 8448, 128
    x = torch.randn(T, D, generator=g)
    w_up, s_up = fp8.quantize_blocks(torch.randn(1, 2 * F, D, generator=g) / 8, block, fmt)
    w_down, s_down = fp8.quantize_blocks(torch.randn(1, D, F, generator=g) / 6, block, fmt)
    _subnormal_bytes(w_down, g)
    tok, exp, wgt = torch.arange(T), torch.zeros(T, dtype=torch.int64), torch.rand(T, generator=g)
    args = (x, tok, exp, wgt, w_up, s_up, w_down, s_down, None, None, "swiglu", True, None, None)
    out = native.run_fp8(*args, block, tile, fmt, "float32")
    assert _rel(out, _fp8_loop_reference(*args[:10], block, tile, fmt)) < 1e-5
    # extreme scales: hidden activations of about 0.05-0.16 (tile scales 1e-4 to 4e-4) meet down-projection
    # block scales of 2e-38 (still normal): their products, about 1e-42, are float32 subnormals with
    # bits to spare only for a few significant digits
    x = torch.randn(8, 256, generator=g) * 0.1
    w_up, s_up = fp8.quantize_blocks(torch.randn(1, 2 * F, 256, generator=g) / 8, block, fmt)
    w_down, s_down = fp8.quantize_blocks(torch.randn(1, 256, F, generator=g) / 6, block, fmt)
    s_down *= 2e-38 / float(s_down.max())
    assert float(s_down.min()) > torch.finfo(torch.float32).tiny
    args = (x, tok[:8], exp[:8], wgt[:8], w_up, s_up, w_down, s_down, None, None, "swiglu", True, None, None)
    out = native.run_fp8(*args, block, tile, fmt, "float32")
    ref = _fp8_loop_reference(*args[:10], block, tile, fmt)
    assert 0 < ref.abs().max() < 1e-30
    assert _rel(out, ref) < 1e-5


def _small_spec(fp8_on: bool) -> dict:
    from moegraph.bench import BENCH_SPEC

    spec = copy.deepcopy(BENCH_SPEC)
    spec["moe"].update(hidden_size=256)
    spec["moe"]["experts"].update(intermediate_size=128, num_experts=16)
    if fp8_on:
        spec["moe"]["quantization"] = {"format": "fp8_e4m3", "shared_experts": True}
    return spec


@pytest.mark.parametrize("fp8_on", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_pinned_native_matches_the_torch_paths(kernel_dir, fp8_on, dtype):
    spec = _small_spec(fp8_on)
    torch.manual_seed(0)
    ref = moegraph.compile(spec, dtype=dtype).eval()
    nat = moegraph.compile(spec, dtype=dtype, expert_strategy="native").eval()
    nat.load_state_dict(ref.state_dict())
    x = torch.randn(1, 7, 256).to(dtype)
    with torch.inference_mode():
        a, b = ref(x), nat(x)
    assert _rel(b, a) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_training_gradients_are_torchs(kernel_dir):
    """A layer pinned to the native strategy trains like the default one: the kernel only runs forwards,
    the backward is the op's torch backward."""
    spec = _small_spec(False)
    torch.manual_seed(0)
    ref = moegraph.compile(spec).train()
    nat = moegraph.compile(spec, expert_strategy="native").train()
    nat.load_state_dict(ref.state_dict())
    x = torch.randn(1, 4, 256)
    grads = []
    for layer in (ref, nat):
        xx = x.clone().requires_grad_(True)
        layer(xx).square().sum().backward()
        grads.append((xx.grad, layer.experts.gate_up_proj.grad))
    assert _rel(grads[1][0], grads[0][0]) < 1e-5 and _rel(grads[1][1], grads[0][1]) < 1e-5


def test_the_tuner_times_native_and_records_its_choice(kernel_dir, monkeypatch):
    """With a timer that says the kernel is fastest, the tuner picks ``native`` for the expert op and
    for both FP8 op calls (routed and shared experts), and records the timings of every candidate."""
    kernel_calls = [0]

    def counting(real):
        def call(*a, **kw):
            kernel_calls[0] += 1
            return real(*a, **kw)
        return call

    # the kernel's two entry points: mg_decode (FP8, mixed dtypes) and mg_decode_fused (one dtype)
    monkeypatch.setattr(native, "_call", counting(native._call))
    monkeypatch.setattr(native, "_call_fused", counting(native._call_fused))

    def timer(fn) -> float:
        before = kernel_calls[0]
        fn()
        return 1e-6 if kernel_calls[0] > before else 1e-3

    for fp8_on in (False, True):
        layer = moegraph.compile(_small_spec(fp8_on)).eval()
        tuner = tuning.enable_tuning(None, timer=timer)
        with torch.inference_mode():
            layer(torch.randn(1, 2, 256))
        assert len(tuner.table) == (2 if fp8_on else 1), tuner.table
        for key, entry in tuner.table.items():
            assert entry["strategy"] == "native" and len(entry["us"]) >= 2, (key, entry)
        tuning.disable_tuning()


def test_native_bf16_and_one_thread_candidates(kernel_dir, monkeypatch):
    """``native_bf16`` is timed for bfloat16 calls it reads (where the CPU has AVX512-BF16), not for
    float32 ones, nor past NATIVE_BF16_MAX_ROWS rows per expert; ``native_1t`` beside ``native``
    only where torch runs more than one thread (else it is the same call)."""
    g = torch.Generator().manual_seed(0)
    E, D, F = 4, 64, 32

    def args_for(T, dtype, K=2):
        x = torch.randn(T, D, generator=g).to(dtype)
        return ExpertArgs(x, torch.arange(T).repeat_interleave(K), torch.randint(0, E, (T * K,), generator=g),
                          torch.rand(T * K, generator=g), torch.randn(E, 2 * F, D, generator=g).to(dtype),
                          torch.randn(E, D, F, generator=g).to(dtype))

    bf_ok = native.bf16_kernel(semantics.activation("swiglu")) is not None
    a = args_for(40, torch.bfloat16)
    assert ("native_bf16" in strategies.candidates(a.x_TD, a.w_up_EHD, a)) == bf_ok
    a = args_for(40, torch.float32)
    assert "native_bf16" not in strategies.candidates(a.x_TD, a.w_up_EHD, a)
    T_many = strategies.NATIVE_BF16_MAX_ROWS * E // 2 + 1  # top-2: just past the rows-per-expert bound
    a = args_for(T_many, torch.bfloat16)
    assert "native_bf16" not in strategies.candidates(a.x_TD, a.w_up_EHD, a)
    a = args_for(2, torch.float32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert {"native", "native_1t"} <= set(strategies.candidates(a.x_TD, a.w_up_EHD, a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert "native_1t" not in strategies.candidates(a.x_TD, a.w_up_EHD, a)


def test_without_a_compiler_everything_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "_WARNED", set())
    before = native._cache_dir
    native.set_cache_dir(tmp_path)
    try:
        with pytest.warns(RuntimeWarning, match="native decode kernel is unavailable"):
            assert not native.available("swiglu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: not again
            assert not native.available("swiglu")
        act = semantics.activation("swiglu")
        x = torch.randn(2, 32)
        args = ExpertArgs(x, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.ones(2), torch.randn(2, 32, 32),
                          torch.randn(2, 32, 16), None, None, act.name, True)
        assert "native" not in strategies.candidates(x, args.w_up_EHD, args)
        from moegraph.ops import _expert_mlp_impl

        assert _rel(strategies.run_strategy("native", args), _expert_mlp_impl(args)) < 1e-5  # ran 'decode'
        with pytest.raises(native.NativeUnavailable):
            native.run_experts(args)
        spec = _small_spec(True)
        ref = moegraph.compile(spec).eval()
        pinned = moegraph.compile(spec, expert_strategy="native").eval()
        pinned.load_state_dict(ref.state_dict())
        xx = torch.randn(1, 3, 256)
        with torch.inference_mode(), pytest.warns(RuntimeWarning, match="native router kernel is unavailable"):
            assert torch.equal(pinned(xx), ref(xx))  # the router falls back to torch steps, and says so once
    finally:
        native.set_cache_dir(before)
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.parametrize("strategy", ["auto", "per_expert"])
def test_a_cache_folder_that_cannot_be_written_falls_back(monkeypatch, tmp_path, strategy):
    """A read-only ~/.cache: no kernel, one warning naming the folder and the fix, and the layer runs on
    its torch paths (pinned or not: the fused router builds a kernel too). Under a regular file stands
    for an unwritable folder (tests may run as root, where permissions do not stop a write)."""
    monkeypatch.setattr(native, "_WARNED", set())
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    before = native._cache_dir
    native.set_cache_dir(blocker / "native")
    try:
        spec = _small_spec(False)
        ref = moegraph.compile(spec, expert_strategy="per_expert").eval()
        layer = moegraph.compile(spec, expert_strategy=strategy).eval()
        layer.load_state_dict(ref.state_dict())
        x = torch.randn(1, 3, 256)
        with torch.inference_mode(), pytest.warns(RuntimeWarning, match="unavailable") as rec:
            y = layer(x)
        try:
            native._compiler_version(tuple(native.compiler()))
        except native.NativeUnavailable:
            pass  # no compiler here: that is what the warning says
        else:
            msgs = [str(w.message) for w in rec]
            assert any("cannot be written" in m and "set_cache_dir" in m for m in msgs), msgs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the pinned layer had not asked for the decode kernel yet)
            assert not native.available("swiglu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: not again
            with torch.inference_mode():
                torch.testing.assert_close(layer(x), y)
        with torch.inference_mode():
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
    finally:
        native.set_cache_dir(before)


def test_compile_smoke_runs_where_the_cache_cannot_be_written(run_cli, monkeypatch, tmp_path):
    """`moegraph compile --smoke` with $XDG_CACHE_HOME unwritable (under a regular file): the native kernels
    and the tuned table warn, and the command succeeds."""
    from moegraph import codegen

    monkeypatch.setattr(native, "_cache_dir", None)  # (the CLI's: under $XDG_CACHE_HOME)
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(codegen, "_cache_dir", codegen._cache_dir)  # restored after the CLI set it
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    r = run_cli("compile", "deepseek-v3-tiny", "-o", tmp_path / "out", "--smoke", "8")
    assert r.code == 0, r.err
    assert "finite=True" in r.out and "Traceback" not in r.err
    assert "cannot be written" in r.err or "could not write" in r.err


def test_the_cached_library_is_keyed_by_every_cpu_flag_and_the_native_target(monkeypatch):
    """Two machines that share a cache folder and report one model name (a VM's "Common KVM processor")
    but differ in a flag the build uses (avx512vbmi: the FP8 dot products), or in what -march=native
    means to the compiler, never load each other's library (it could die of an illegal instruction)."""
    try:
        native._compiler_version(tuple(native.compiler()))
    except native.NativeUnavailable:
        pytest.skip("no C compiler here")
    src = native.source(semantics.activation("swiglu"))
    real = Path("/proc/cpuinfo")

    def name(flags: str, target: str | None = None) -> str:
        text = f"model name\t: Common KVM processor\nflags\t\t: {flags}\n"

        class FakePath(type(real)):
            def read_text(self, *a, **kw):
                return text if str(self) == str(real) else super().read_text(*a, **kw)

        monkeypatch.setattr(tuning, "Path", FakePath)
        if target is not None:
            monkeypatch.setattr(native, "_native_target", lambda cc: target)
        tuning._cpuinfo.cache_clear()
        try:
            return native._library_path(src, native.compiler(), "decode").name
        finally:
            tuning._cpuinfo.cache_clear()

    base = "fpu sse2 avx2 fma avx512f avx512bw avx512_bf16"
    assert name(base) == name(base)
    assert name(base + " avx512vbmi") != name(base)
    assert name(base + " gfni") != name(base)
    assert name(base, "-march=icelake-server -mavx512vbmi") != name(base, "-march=icelake-server -mno-avx512vbmi")


def test_a_cached_kernel_is_not_compiled_again(kernel_dir):
    before = list(native.compiled_paths)
    code = ("import moegraph.native as n, sys; n.set_cache_dir(sys.argv[1]); ok = n.available('swiglu'); "
            "print(ok, len(n.compiled_paths))")
    out = subprocess.run([sys.executable, "-c", code, str(kernel_dir)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0"]
    # A damaged cached library is rebuilt, not loaded.
    libs = sorted(kernel_dir.glob("decode-*.so"))
    assert libs
    lib = next(p for p in libs if p in native.compiled_paths) if any(p in native.compiled_paths for p in libs) else libs[0]
    # Replaced, not written in place: this process has the library mapped, and truncating a mapped file
    # under it would kill it with SIGBUS on the next call (as any process using a cache must not be).
    damaged = lib.with_suffix(".damaged")
    damaged.write_bytes(b"not a library")
    os.replace(damaged, lib)
    out = subprocess.run([sys.executable, "-c", code, str(kernel_dir)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "True"
    assert native.compiled_paths[: len(before)] == before


def test_bad_inputs_are_refused_by_name(kernel_dir):
    g = torch.Generator().manual_seed(4)
    T, D, F, E = 2, 32, 16, 3
    x = torch.randn(T, D, generator=g)
    w_up, w_down = torch.randn(E, 2 * F, D, generator=g), torch.randn(E, D, F, generator=g)
    tok, exp, wgt = torch.tensor([0, 1]), torch.tensor([2, 0]), torch.ones(2)

    def args(**kw):
        base = dict(x_TD=x, tok_N=tok, exp_N=exp, weight_N=wgt, w_up_EHD=w_up, w_down_EDF=w_down)
        base.update(kw)
        return ExpertArgs(**base)

    cases = {
        "x_TD": args(x_TD=x.half()),
        "w_down_EDF": args(w_down_EDF=torch.randn(E, D + 1, F)),
        "w_up_EHD is not contiguous": args(w_up_EHD=torch.randn(E, D, 2 * F).transpose(1, 2)),
        "tok_N": args(tok_N=tok.int()),
        "b_up_EH": args(b_up_EH=torch.randn(E, 3)),
    }
    for name, a in cases.items():
        with pytest.raises(InputError, match=name):
            native.run_experts(a)
    with pytest.raises(InputError, match="token index"):
        native.run_experts(args(tok_N=torch.tensor([0, 5])))
    # A non-contiguous x (or assignment tensors) is read through a contiguous copy, never by strides.
    xt = torch.randn(D, T, generator=g).t()
    from moegraph.ops import _expert_mlp_impl

    assert _rel(native.run_experts(args(x_TD=xt)), _expert_mlp_impl(args(x_TD=xt.contiguous()))) < 1e-5
    # FP8: scales missing or of the wrong shape
    q_up, s_up = fp8.quantize_blocks(torch.randn(E, 256, 128), (128, 128))
    q_down, s_down = fp8.quantize_blocks(torch.randn(E, 128, 128), (128, 128))
    xx = torch.randn(T, 128)
    base = (xx, tok, exp, wgt, q_up, s_up, q_down, s_down, None, None, "swiglu", True, None, None)
    for i, bad, name in ((5, None, "s_up"), (7, s_down[:, :, :0], "s_down"), (4, q_up.float(), "w_up_EHD")):
        a = list(base)
        a[i] = bad
        with pytest.raises(InputError, match=name):
            native.run_fp8(*a, (128, 128), 128, "fp8_e4m3", "float32")


@pytest.mark.parametrize("flags,simd", [("-mno-avx512f", 1), ("-mno-avx512bf16", None)])
def test_the_portable_c_path_agrees(kernel_dir, monkeypatch, tmp_path, flags, simd):
    """Built without AVX-512 (as on other CPUs): the kernel's plain C loops; without AVX512-BF16 (as on
    AVX-512 CPUs before it): FP8 widened to float32. Both give the same results."""
    monkeypatch.setenv("CC", f"cc {flags}")
    native.set_cache_dir(tmp_path)
    try:
        lib = native.kernel(semantics.activation("swiglu"))
        assert lib is not None and lib.mg_fp8_dot() == 0
        assert simd is None or lib.mg_simd_width() == simd
        g = torch.Generator().manual_seed(5)
        T, D, F, E = 3, 256, 128, 4
        x = torch.randn(T, D, generator=g)
        tok, exp, wgt = _assignments(T, E, 2, g)
        for fmt in ("fp8_e4m3", "fp8_e5m2"):
            w_up, s_up = fp8.quantize_blocks(torch.randn(E, 2 * F, D, generator=g) / 8, (128, 128), fmt)
            w_down, s_down = fp8.quantize_blocks(torch.randn(E, D, F, generator=g) / 8, (128, 128), fmt)
            args = (x, tok, exp, wgt, w_up, s_up, w_down, s_down, None, None, "swiglu", True, None, None)
            out = native.run_fp8(*args, (128, 128), 128, fmt, "float32")
            assert _rel(out, fp8._forward(*args, (128, 128), 128, fmt, "float32")) < 1e-5
        w_up, w_down = torch.randn(E, 2 * F, D, generator=g).bfloat16(), torch.randn(E, D, F, generator=g).bfloat16()
        args = ExpertArgs(x.bfloat16(), tok, exp, wgt, w_up, w_down, None, None, "swiglu", True)
        ref = _dense_reference(x.bfloat16(), tok, exp, wgt, w_up, w_down, None, None, "swiglu")
        assert _rel(native.run_experts(args), ref) < 8e-3
    finally:
        native.set_cache_dir(kernel_dir)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("fp8_on", [False, True])
def test_a_call_without_assignments_adds_only_the_shared_experts(kernel_dir, shared, fp8_on):
    """An expert-parallel rank can receive no routed rows at all: the routed part must add nothing
    (an empty tensor's data pointer is NULL, which the kernel reads as "every token")."""
    g = torch.Generator().manual_seed(4)
    T, D, F, E = 3, 32, 32, 4
    x = torch.randn(T, D, generator=g)
    tok, exp, wgt = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0)
    w_up, w_down = torch.randn(E, 2 * F, D, generator=g) / 4, torch.randn(E, D, F, generator=g) / 4
    if fp8_on:
        s_up, s_down = torch.ones(E, 2 * F // 16, D // 16), torch.ones(E, D // 16, F // 16)
        out = native.run_fp8(x, tok, exp, wgt, w_up.to(torch.float8_e4m3fn), s_up, w_down.to(torch.float8_e4m3fn),
                             s_down, None, None, "silu", True, None, None, (16, 16), 16, "fp8_e4m3", "float32")
        assert torch.equal(out, torch.zeros(T, D))
        return
    sh = (torch.randn(2 * F, D, generator=g) / 4, torch.randn(D, F, generator=g) / 4) if shared else (None, None)
    args = ExpertArgs(x, tok, exp, wgt, w_up, w_down, None, None, "silu", True, None, None, *sh)
    want = strategies.run_strategy("decode", args)
    torch.testing.assert_close(native.run_experts(args), want, rtol=1e-5, atol=1e-6)
    assert bool(want.abs().max() > 0) == shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_one_call_with_a_shared_expert_of_another_width(kernel_dir, dtype, threads):
    """The one-call kernel (``mg_decode_fused``) with a shared expert wider than the routed ones (S = 3F,
    as two or more shared experts make it), bfloat16 sizes its dot products read (multiples of 32), one
    token and a few, against the token loop; the kernel must have been the one that ran."""
    g = torch.Generator().manual_seed(3)
    D, F, S, E, K = 64, 32, 96, 5, 2
    w_up = (torch.randn(E, 2 * F, D, generator=g) / 4).to(dtype)
    w_down = (torch.randn(E, D, F, generator=g) / 4).to(dtype)
    s_up, s_down = (torch.randn(2 * S, D, generator=g) / 4).to(dtype), (torch.randn(D, S, generator=g) / 4).to(dtype)
    calls = []
    real = native._call_fused
    for T in (1, 4):
        x = torch.randn(T, D, generator=g).to(dtype)
        tok, exp, wgt = _assignments(T, E, K, g, drop=T > 1)
        args = ExpertArgs(x, tok, exp, wgt, w_up, w_down, None, None, "swiglu", True, None, None, s_up, s_down)
        lib = native.kernel(args.act)
        if lib is None:
            pytest.skip("no C compiler here")
        with mock.patch.object(native, "_call_fused", lambda *a: calls.append(1) or real(*a)):
            out = native.run_supported(args, lib, threads)
        ref = _dense_reference(x, tok, exp, wgt, w_up, w_down, None, None, "swiglu", shared=(s_up, s_down))
        # bfloat16: the activations are rounded to bfloat16 once and the output once
        assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2), T
    assert len(calls) == 2


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), subprocess.TimeoutExpired("cc", 120), OSError("no room")])
def test_an_interrupted_build_leaves_no_temporary_file_in_the_cache(tmp_path, monkeypatch, stop):
    """A build stopped by ^C, the compile timeout or an OS error removes the part it wrote (only a failing
    compiler's was removed)."""

    def compiler_that_stops(cmd, **kwargs):
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"\x7fELF partial")  # the compiler had begun writing
        raise stop

    monkeypatch.setattr(native.subprocess, "run", compiler_that_stops)
    expected = KeyboardInterrupt if isinstance(stop, KeyboardInterrupt) else native.NativeUnavailable
    with pytest.raises(expected):
        native._compile("int x;", ["cc"], tmp_path / "cache" / "decode-0.so")
    assert list((tmp_path / "cache").iterdir()) == []
