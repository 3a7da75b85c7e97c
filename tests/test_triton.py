"""The Triton backend against the torch backend, on CPU under Triton's interpreter.

Each kernel (alignment, grouped expert MLP with combine, router) is compared with its torch
reference, and whole layers of backend "triton" with backend "torch" holding the same weights, for
several routing policies, float32 and float16, token counts that are not multiples of the block
size, experts without tokens, dropped assignments and shared experts. A last test cross-compiles the
kernels for sm_90 (no GPU needed) so that code the interpreter accepts but the compiler rejects is
caught here too.

Triton's interpreter must be on (TRITON_INTERPRET=1) before triton is first imported: the library's
own @jit helpers (the combine functions of tl.cumsum, tl.argmax, ...) are decorated at that import.
This module therefore sets the variable before importing anything that imports triton. If another
test module in the same process imported triton first, the tests here are skipped in-process and
run instead by one test that starts a fresh pytest on this file.
"""

from __future__ import annotations

import os
import sys

_TRITON_PREIMPORTED = "triton" in sys.modules
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import moegraph  # noqa: E402
from moegraph.errors import CodegenError, InputError  # noqa: E402
from moegraph.ops import _expert_mlp_impl  # noqa: E402
from moegraph.semantics import routing  # noqa: E402
from moegraph.triton_backend import configs, kernels  # noqa: E402
from moegraph.triton_backend import ops as tops  # noqa: E402
from moegraph.triton_backend.passes import FuseRouter, triton_passes  # noqa: E402
from moegraph.triton_backend.render import render, render_to_module  # noqa: E402


def _interpreter_ready() -> bool:
    """Whether triton's library @jit functions were created for the interpreter."""
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    fns = [v for v in vars(std).values() if isinstance(v, (InterpretedFunction, JITFunction))]
    return bool(fns) and all(isinstance(v, InterpretedFunction) for v in fns)


IN_PROCESS = not _TRITON_PREIMPORTED or _interpreter_ready()

pytestmark = pytest.mark.triton

D, F_, E = 32, 16, 8
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(autouse=True)
def _in_process_or_skip(request):
    if not IN_PROCESS and request.node.originalname != "test_module_in_a_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET was set; test_module_in_a_fresh_process runs this")


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    # Rendered kernels go to a per-session folder, not the user's cache.
    from moegraph import codegen

    monkeypatch.setattr(codegen, "_cache_dir", tmp_path_factory.getbasetemp() / "generated")


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,E_,SH,T,block_m", [(1, 8, 0, 1, 16), (66, 8, 0, 33, 16), (300, 5, 1, 100, 32),
                                               (40, 64, 2, 20, 16), (0, 8, 1, 7, 16), (500, 1500, 1, 60, 16)])
def test_align_sorts_pads_and_labels_blocks(N, E_, SH, T, block_m):
    g = torch.Generator().manual_seed(N)
    exp = torch.randint(-1, E_ + 1, (N,), generator=g)  # includes dropped ids -1 and E
    sorted_R, block_expert_B, B = kernels.align(exp, T, E_, SH, block_m)
    N_ext = N + SH * T
    # Expected: stable order by expert, runs padded with the sentinel N_ext.
    ext = torch.cat([exp, torch.arange(SH).repeat_interleave(T) + E_]).tolist()
    by_expert: dict[int, list[int]] = {}
    for n, e in enumerate(ext):
        if n >= N or 0 <= e < E_:
            by_expert.setdefault(e, []).append(n)
    expect_rows, expect_blocks = [], []
    for e in range(E_ + SH):
        ids = by_expert.get(e, [])
        if not ids:
            continue
        pad = -len(ids) % block_m
        expect_rows += ids + [N_ext] * pad
        expect_blocks += [e] * ((len(ids) + pad) // block_m)
    assert B == kernels.max_blocks(N_ext, E_ + SH, block_m) >= len(expect_blocks)
    assert sorted_R[: len(expect_rows)].tolist() == expect_rows
    assert (sorted_R[len(expect_rows):] == N_ext).all()
    assert block_expert_B.tolist() == expect_blocks + [-1] * (B - len(expect_blocks))


def test_align_bound_is_tight_enough_and_safe():
    # The worst case: every expert gets one row (most padding) or all rows go to one expert.
    for N, E_, bm in [(8, 256, 16), (65536, 256, 64), (100, 3, 32), (5, 5, 16)]:
        B = kernels.max_blocks(N, E_, bm)
        spread = sum(math.ceil(c / bm) for c in [N // E_ + (i < N % E_) for i in range(E_)])
        assert spread <= B and math.ceil(N / bm) <= B <= N


# ----------------------------------------------------------------------------------------------
# Grouped expert MLP (+ combine)
# ----------------------------------------------------------------------------------------------


def _assignments(T, K, g, *, drop=False, empty=(3,)):
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    for e in empty:  # experts that receive no tokens
        ids[ids == e] = (e + 1) % E if (e + 1) % E not in empty else (e + 2) % E
    if drop and T > 1:
        ids[0, 0], ids[1, K - 1] = -1, E  # dropped assignments
    return torch.arange(T).repeat_interleave(K), ids.reshape(-1)


def _weights(g, dt, *, gated=True, bias=False, shared=None):
    H = 2 * F_ if gated else F_
    w = {
        "w_up": torch.randn(E, H, D, generator=g) / D**0.5,
        "w_down": torch.randn(E, D, F_, generator=g) / F_**0.5,
        "b_up": torch.randn(E, H, generator=g) * 0.3 if bias else None,
        "b_down": torch.randn(E, D, generator=g) * 0.3 if bias else None,
        "sw_up": None, "sw_down": None,
    }
    if shared:
        w["sw_up"] = torch.randn((2 if gated else 1) * shared, D, generator=g) / D**0.5
        w["sw_down"] = torch.randn(D, shared, generator=g) / shared**0.5
    return {k: None if v is None else v.to(dt) for k, v in w.items()}


MLP_CASES = {
    # name: (activation, gated, gate_clamp, up_clamp, bias, shared hidden, shared scale, drop)
    "swiglu": ("silu", True, None, None, False, None, False, True),
    "swiglu_shared": ("silu", True, None, None, False, F_, False, False),
    "swiglu_shared_2F_scaled": ("silu", True, None, None, False, 2 * F_, True, True),
    "swiglu_shared_not_multiple": ("silu", True, None, None, False, 24, True, False),
    "geglu_bias_clamps": ("gelu", True, 0.5, 0.7, True, None, False, False),
    "gelu_tanh_bias_shared": ("gelu_tanh", True, None, None, True, F_, False, False),
    "relu2_plain": ("relu2", False, None, None, False, None, False, True),
    "gelu_plain_bias": ("gelu", False, None, None, True, None, False, False),
}


@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_expert_mlp_matches_reference(case, dt):
    act, gated, gclamp, uclamp, bias, shared, scaled, drop = MLP_CASES[case]
    g = torch.Generator().manual_seed(len(case))
    w = _weights(g, dt, gated=gated, bias=bias, shared=shared)
    for T, K in [(1, 2), (7, 3), (33, 2)]:
        x = torch.randn(T, D, generator=g).to(dt)
        tok, exp = _assignments(T, K, g, drop=drop)
        wt = torch.rand(T * K, generator=g).to(dt)
        scale = torch.rand(T, generator=g).to(dt) if scaled else None
        args = (x, tok, exp, wt, w["w_up"], w["w_down"], w["b_up"], w["b_down"], act, gated, gclamp, uclamp,
                w["sw_up"], w["sw_down"], scale)
        y = torch.ops.moegraph_triton.expert_mlp(*args)
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        ref = _expert_mlp_impl(*up)
        assert y.dtype == dt and y.shape == (T, D)
        torch.testing.assert_close(y.float(), ref, **TOL[dt], msg=f"{case} T={T}")


def test_expert_mlp_all_dropped_and_no_tokens():
    g = torch.Generator().manual_seed(0)
    w = _weights(g, torch.float32, shared=F_)
    x = torch.randn(5, D, generator=g)
    tok = torch.arange(5).repeat_interleave(2)
    exp = torch.full((10,), E)  # every assignment dropped: only the shared expert contributes
    for sw in [(None, None), (w["sw_up"], w["sw_down"])]:
        args = (x, tok, exp, torch.ones(10), w["w_up"], w["w_down"], None, None, "silu", True, None, None, *sw, None)
        torch.testing.assert_close(kernels.expert_mlp(*args), _expert_mlp_impl(*args), **TOL[torch.float32])
    empty = (x[:0], tok[:0], exp[:0], torch.ones(0), w["w_up"], w["w_down"], None, None, "silu", True, None, None,
             None, None, None)
    assert kernels.expert_mlp(*empty).shape == (0, D)


def test_expert_mlp_is_deterministic_and_config_independent():
    g = torch.Generator().manual_seed(3)
    w = _weights(g, torch.float32, shared=F_)
    x = torch.randn(33, D, generator=g)
    tok, exp = _assignments(33, 2, g, drop=True)
    wt = torch.rand(66, generator=g)
    args = (x, tok, exp, wt, w["w_up"], w["w_down"], None, None, "silu", True, None, None, w["sw_up"], w["sw_down"], None)
    outs = []
    for bm in (16, 32, 64):
        gemm = configs.GemmConfig(BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
        outs.append(kernels.expert_mlp(*args, config=configs.MoEConfig(bm, gemm, gemm)))
    assert torch.equal(outs[0], kernels.expert_mlp(*args, config=configs.MoEConfig(16, gemm, gemm)))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **TOL[torch.float32])


def test_expert_mlp_backward_matches_torch_op():
    g = torch.Generator().manual_seed(4)
    w = _weights(g, torch.float32, bias=True, shared=F_)
    x = torch.randn(7, D, generator=g)
    tok, exp = _assignments(7, 2, g)
    wt = torch.rand(14, generator=g)
    grads = []
    for op in (torch.ops.moegraph.expert_mlp, torch.ops.moegraph_triton.expert_mlp):
        leaves = [t.clone().requires_grad_(True) for t in (x, wt, w["w_up"], w["w_down"], w["sw_up"])]
        y = op(leaves[0], tok, exp, leaves[1], leaves[2], leaves[3], w["b_up"], w["b_down"], "silu", True, None, None,
               leaves[4], w["sw_down"], None)
        y.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_expert_mlp_fake_and_opcheck():
    g = torch.Generator().manual_seed(5)
    w = _weights(g, torch.float32)
    tok, exp = _assignments(4, 2, g)
    args = (torch.randn(4, D, generator=g), tok, exp, torch.rand(8, generator=g), w["w_up"], w["w_down"], None,
            None, "silu", True, None, None, None, None, None)
    torch.library.opcheck(torch.ops.moegraph_triton.expert_mlp.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_new_table_entries_reach_the_kernels(monkeypatch):
    """An activation and a score added to moegraph.semantics' tables run in the kernels with no other edit."""
    from moegraph.semantics import ACTIVATIONS, SCORE_FUNCTIONS
    from moegraph.semantics.activations import Activation

    monkeypatch.setitem(ACTIVATIONS, "swiglu_oai", Activation("swiglu_oai", "gate * sigmoid(1.702 * gate) * (up + 1)",
                                                              gated=True))
    monkeypatch.setitem(SCORE_FUNCTIONS, "sqrt_sigmoid", "sqrt(sigmoid(x))")
    g = torch.Generator().manual_seed(11)
    w = _weights(g, torch.float32, bias=True)
    T, K = 9, 2
    x = torch.randn(T, D, generator=g)
    tok, exp = _assignments(T, K, g, drop=True)
    wt = torch.rand(T * K, generator=g)
    y = torch.ops.moegraph_triton.expert_mlp(x, tok, exp, wt, w["w_up"], w["w_down"], w["b_up"], w["b_down"],
                                             "swiglu_oai", True, 0.8, 0.9, None, None, None)
    ref = torch.zeros(T, D)
    for n in range(T * K):  # a loop over assignments, the activation written out in torch
        e, t = int(exp[n]), int(tok[n])
        if 0 <= e < E:
            h = w["w_up"][e] @ x[t] + w["b_up"][e]
            gate, up = h[:F_].clamp(max=0.8), h[F_:].clamp(-0.9, 0.9)
            ref[t] += wt[n] * (w["w_down"][e] @ (gate * torch.sigmoid(1.702 * gate) * (up + 1)) + w["b_down"][e])
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    logits = torch.randn(T, E, generator=g)
    ids, wts = torch.ops.moegraph_triton.route_topk(logits, None, 2, "sqrt_sigmoid", False, True, 1.0, 0, 0, "max", 0)
    s = torch.sqrt(torch.sigmoid(logits))
    want_w, want_ids = torch.topk(s, 2, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(wts, want_w / want_w.sum(-1, keepdim=True), **TOL[torch.float32])


def test_inline_activation_expression_runs_in_the_kernels():
    """A spec's inline gate expression (GPT-OSS's clamped form) in the kernel, forward and backward."""
    expression = "(clamp(up, -0.9, 0.9) + 1) * clamp(gate, max=0.8) * sigmoid(1.702 * clamp(gate, max=0.8))"
    g = torch.Generator().manual_seed(12)
    w = _weights(g, torch.float32, bias=True)
    T, K = 9, 2
    x = torch.randn(T, D, generator=g) * 2
    tok, exp = _assignments(T, K, g, drop=True)
    wt = torch.rand(T * K, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (x, wt, w["w_up"], w["w_down"])]
    y = torch.ops.moegraph_triton.expert_mlp(leaves[0], tok, exp, leaves[1], leaves[2], leaves[3], w["b_up"],
                                             w["b_down"], expression, True, None, None, None, None, None)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, wt, w["w_up"], w["w_down"])]
    xr, wtr, upr, downr = ref_leaves
    ref = torch.zeros(T, D)
    for n in range(T * K):  # a loop over assignments, the activation written out in torch
        e, t = int(exp[n]), int(tok[n])
        if 0 <= e < E:
            h = upr[e] @ xr[t] + w["b_up"][e]
            gate, up = h[:F_].clamp(max=0.8), h[F_:].clamp(-0.9, 0.9)
            ref = ref.index_add(0, torch.tensor([t]), (wtr[n] * (downr[e] @ (
                (up + 1) * gate * torch.sigmoid(1.702 * gate)) + w["b_down"][e])).unsqueeze(0))
    h_all = torch.stack([w["w_up"][int(e)] @ x[int(t)] + w["b_up"][int(e)] for e, t in zip(exp, tok) if 0 <= e < E])
    assert (h_all[:, :F_] > 0.8).any() and (h_all[:, F_:].abs() > 0.9).any()  # the clamps are active somewhere
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    gy = torch.randn(T, D, generator=g)
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(ref, ref_leaves, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def _kernel_on_random_tokens(expression: str, gated: bool, seed: int):
    """The kernel's output on 9 tokens routed to 2 experts each, with float32 weights without biases (all seeded),
    and (x, token ids, expert ids, weights, expert weights) for the reference."""
    g = torch.Generator().manual_seed(seed)
    w = _weights(g, torch.float32, gated=gated)
    T, K = 9, 2
    x = torch.randn(T, D, generator=g) * 2
    tok, exp = _assignments(T, K, g)
    wt = torch.rand(T * K, generator=g)
    y = torch.ops.moegraph_triton.expert_mlp(x, tok, exp, wt, w["w_up"], w["w_down"], None, None, expression, gated,
                                             None, None, None, None, None)
    return y, (x, tok, exp, wt, w)


def test_constant_expression_bounds_reach_the_kernel_as_numbers():
    """Clamp bounds written as expressions of constants are the numbers they are in the kernel's body (it computes
    no function of a constant), and the kernel clamps there: against a loop with the clamps written in torch."""
    expression = "clamp(gate, min=-sqrt(4) / 4, max=exp(1) / 4) * up"
    lines, _ = kernels.activation_source(moegraph.semantics.activation(expression))
    body = [line.split(" = ", 1)[1] for line in lines]
    assert len(body) == 3 and body[0] == "tl.maximum(gate, -0.5)" and body[1].endswith(f", {math.e / 4!r})"), lines
    y, (x, tok, exp, wt, w) = _kernel_on_random_tokens(expression, True, seed=14)
    ref = torch.zeros(x.shape)
    for n in range(tok.numel()):  # a loop over assignments, the activation written out in torch
        e, t = int(exp[n]), int(tok[n])
        h = w["w_up"][e] @ x[t]
        assert (h[:F_] < -0.5).any() and (h[:F_] > math.e / 4).any()  # both clamps are active
        ref[t] += wt[n] * (w["w_down"][e] @ (h[:F_].clamp(-0.5, math.e / 4) * h[F_:]))
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


INTEGER_POWERS = {
    # activation expression: (gated, the same function in torch)
    "x ** 9 / 100": (False, lambda h: h ** 9 / 100),
    "x ** (1 + 2) - x ** 17 / 1e5": (False, lambda h: h ** 3 - h ** 17 / 1e5),  # folded; beyond the multiplied out
    "(x - 8) ** -3 * 100": (False, lambda h: (h - 8) ** -3 * 100),
    "(gate / 3) ** 9 * up": (True, lambda h: (h[..., :F_] / 3) ** 9 * h[..., F_:]),
}


@pytest.mark.parametrize("expression", list(INTEGER_POWERS))
def test_integer_powers_of_negative_values_are_torch_powers(expression):
    # Triton has no pow: exp(c * log(base)) is NaN for a negative base, where torch gives a real power for
    # an integer exponent (any constant one, negative or folded from an expression).
    gated, act = INTEGER_POWERS[expression]
    y, (x, tok, exp, wt, w) = _kernel_on_random_tokens(expression, gated, seed=13)
    ref = torch.zeros(x.shape, dtype=torch.float64)
    size = torch.zeros(x.shape, dtype=torch.float64)  # the sum of the terms' magnitudes behind each output
    for n in range(tok.numel()):  # a loop over assignments in float64, the activation as torch writes it
        e, t = int(exp[n]), int(tok[n])
        if 0 <= e < E:
            h = w["w_up"][e].double() @ x[t].double()
            assert (h < 0).any()
            ref[t] += wt[n].double() * (w["w_down"][e].double() @ act(h))
            size[t] += wt[n].double() * (w["w_down"][e].double().abs() @ act(h).abs())
    assert torch.isfinite(y).all()
    # High powers make terms of 1e4-1e7 that cancel to outputs near 1, so float32 rounding is relative to the
    # terms, not to the output: allowed is the usual tolerance plus 64 float32 epsilons of the terms' size
    # (measured: at most about 17; the summation order, which Triton releases change, decides where in that).
    err = (y.double() - ref).abs()
    tol = TOL[torch.float32]
    allowed = tol["atol"] + tol["rtol"] * ref.abs() + 64 * torch.finfo(torch.float32).eps * size
    assert (err <= allowed).all(), f"worst error {float((err / allowed).max()):.2f}x the allowed"


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------

ROUTERS = {
    # name: (E, K, score, topk_then_score, bias, normalize, scale, (G, keep, group_score, top_n))
    "softmax_top2": (8, 2, "softmax", False, False, False, 1.0, (0, 0, "max", 0)),
    "softmax_top2_norm": (8, 2, "softmax", False, False, True, 1.0, (0, 0, "max", 0)),
    "topk_then_softmax": (8, 3, "softmax", True, True, False, 1.0, (0, 0, "max", 0)),
    "topk_then_softmax_norm": (8, 3, "softmax", True, False, True, 1.5, (0, 0, "max", 0)),  # no division left
    "deepseek_v3": (16, 4, "sigmoid", False, True, True, 2.5, (4, 2, "sum_topn", 2)),
    "deepseek_v3_shape": (256, 8, "sigmoid", False, True, True, 2.5, (8, 4, "sum_topn", 2)),
    "softmax_groups_max": (12, 2, "softmax", False, False, False, 16.0, (3, 1, "max", 0)),
    "sqrt_softplus": (10, 3, "sqrt_softplus", False, False, True, 1.0, (0, 0, "max", 0)),
    "expression": (8, 2, "sqrt(softplus(x)) + 0.5 * tanh(x) - x ** 2 / 8 + log1p(abs(x))", False, True, False, 1.0,
                   (2, 1, "sum_topn", 3)),
    "powers": (8, 2, "2 ** (x / 4) - x ** 3 / 50 + relu(x)", False, False, True, 1.0, (0, 0, "max", 0)),
    # integer powers of negative values: a folded exponent, a negative one, one beyond those multiplied out
    "integer_powers": (8, 2, "x ** (1 + 1) / 9 + (x - 40) ** -2 * 100 - (x - 1) ** 17 / 1e12", False, False, False, 1.0,
                       (0, 0, "max", 0)),
}


def test_score_expressions_fold_constants():
    assert kernels.score_to_triton("sigmoid(0) * x + sqrt(4)") == "((0.5 * x) + 2.0)"
    assert kernels.score_to_triton("x ** 2") == "((x) * (x))"
    assert kernels.score_to_triton("x ** (1 + 1)") == "((x) * (x))"
    assert kernels.score_to_triton("(x - 40) ** -2") == "(1.0 / (((x - 40.0)) * ((x - 40.0))))"
    assert kernels.score_to_triton("2 ** x") == f"tl.exp((x) * {math.log(2)!r})"  # the constant base's log folded
    # The kernel is spelled from the validated tree: what the spec refuses never reaches it.
    with pytest.raises(InputError, match="constant part 'log\\(0 - 1\\)' is undefined"):
        kernels.score_to_triton("log(0 - 1) * x")
    with pytest.raises(InputError, match="not finite at the logit x = 1"):
        kernels.score_to_triton("(x - 1) ** -2")


@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_kernel_matches_torch_routing(name, dt):
    E_, K, score, then, bias, norm, scale, (G, keep, gscore, top_n) = ROUTERS[name]
    g = torch.Generator().manual_seed(E_ + K)
    T = 33
    logits = (torch.randn(T, E_, generator=g) * 2).to(dt)
    b = (torch.randn(E_, generator=g) * 0.5) if bias else None
    args = (K, score, then, norm, scale, G, keep, gscore, top_n)
    ids, w = torch.ops.moegraph_triton.route_topk(logits, b, *args)
    # The reference in float64 on the same (rounded) logits: the kernel computes in float32.
    ref_ids, ref_w = tops.route_topk_reference(logits.double(), None if b is None else b.double(), *args)
    assert ids.dtype == torch.int64 and w.dtype == dt
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, **TOL[dt])


def test_router_falls_back_to_torch_beyond_the_kernel():
    logits = torch.randn(5, 2048, generator=torch.Generator().manual_seed(0))
    args = (4, "softmax", False, True, 1.0, 0, 0, "max", 0)
    assert "2048 experts" in kernels.router_supported(2048, 4, "softmax")
    ids, w = torch.ops.moegraph_triton.route_topk(logits, None, *args)
    ref_ids, ref_w = tops.route_topk_reference(logits, None, *args)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)


def test_router_group_mask_uses_minus_inf():
    # One group kept per token; a huge negative bias on every kept-group expert must not let the
    # top-2 escape to another group (masking with 0.0 instead of -inf would).
    logits = torch.tensor([[5.0, 4.0, -3.0, -4.0]])
    bias = torch.tensor([-100.0, -100.0, 0.0, 0.0])
    ids, _ = torch.ops.moegraph_triton.route_topk(logits, bias, 2, "identity", False, False, 1.0, 2, 1, "max", 0)
    ref, _ = tops.route_topk_reference(logits, bias, 2, "identity", False, False, 1.0, 2, 1, "max", 0)
    assert torch.equal(ids, ref) and set(ids[0].tolist()) == {2, 3}


def test_router_ties_go_to_the_lowest_expert_id_with_torchs_weights():
    # Where equal values decide a choice, torch.topk's order among them is its own (and differs between CPU
    # and CUDA); the kernel's is the lowest expert (and group) id, and its weights are those of the experts it
    # chose. Without an expert bias, tied experts have equal scores: the weights are torch's either way.
    cases = [
        # logits, bias, policy (top_k, score, topk_then_score, normalize, scale, groups), ids the kernel takes
        ([[0.0] * 8], None, (2, "softmax", False, False, 1.0, 0, 0, "max", 0), [[0, 1]]),  # a zeroed router
        ([[-5.0, 30.0, 2.0, 40.0, 35.0, 1.0]], None, (2, "sigmoid", False, True, 1.0, 0, 0, "max", 0), [[1, 3]]),
        ([[1.0, 3.0, 0.0, 3.0, 2.0, 3.0]], None, (3, "identity", False, False, 1.0, 0, 0, "max", 0), [[1, 3, 5]]),
        # groups of two with equal maxima: the lower group is kept; then a tie inside it
        ([[1.0, 1.0, 0.0, 1.0, 0.5, 0.2]], None, (2, "identity", False, False, 1.0, 3, 1, "max", 0), [[0, 1]]),
        # equal only after the bias: still the lowest id
        ([[1.0, 2.0, 3.0, 0.0]], [1.0, 0.0, -1.0, 0.0], (1, "identity", False, False, 1.0, 0, 0, "max", 0), [[0]]),
    ]
    for logits, bias, args, want in cases:
        logits_TE = torch.tensor(logits)
        bias_E = None if bias is None else torch.tensor(bias)
        ids, w = torch.ops.moegraph_triton.route_topk(logits_TE, bias_E, *args)
        assert ids.tolist() == want, (logits, args, ids.tolist())
        torch.testing.assert_close(w, routing.route_weights(logits_TE, ids, routing.TopKPolicy(*args)),
                                   **TOL[torch.float32])
        if bias is None:  # whichever of the tied experts torch took
            torch.testing.assert_close(w, tops.route_topk_reference(logits_TE, None, *args)[1], **TOL[torch.float32])


def test_router_backward_matches_torch_routing():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(7, 16, generator=g)
    bias = torch.randn(16, generator=g) * 0.3
    args = (4, "sigmoid", False, True, 2.5, 4, 2, "sum_topn", 2)
    a = logits.clone().requires_grad_(True)
    _, w = torch.ops.moegraph_triton.route_topk(a, bias, *args)
    (w * torch.arange(4.0)).sum().backward()
    b = logits.clone().requires_grad_(True)
    _, wr = tops.route_topk_reference(b, bias, *args)
    (wr * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------------------------
# Whole layers: backend "triton" against backend "torch" with the same weights
# ----------------------------------------------------------------------------------------------


def _spec(name, router, *, shared=None, experts=None, moe=None):
    ex = {"num_experts": E, "intermediate_size": F_, "activation": "swiglu"}
    ex.update(experts or {})
    spec = {"name": name, "moe": {"hidden_size": D, "experts": ex, "router": {"type": "topk", **router}, **(moe or {})}}
    if shared:
        spec["moe"]["shared_experts"] = shared
    return spec


LAYERS = {
    "softmax_top2": _spec("t-softmax-top2", {"top_k": 2, "normalize": True}),
    "deepseek_v3_style": _spec("t-dsv3", {"top_k": 3, "score": "sigmoid", "normalize": True, "scaling_factor": 2.5,
                                          "groups": {"num_groups": 4, "topk_groups": 2, "group_score": "sum_topn",
                                                     "top_n": 2},
                                          "expert_bias": {"update_rate": 0.01}}, shared={"count": 1}),
    "qwen2_gated_shared": _spec("t-qwen2", {"top_k": 4}, shared={"count": 1, "intermediate_size": 2 * F_,
                                                                  "gate": "sigmoid"}),
    "geglu_bias_capacity": _spec("t-geglu-cap", {"top_k": 2, "capacity": {"factor": 0.5}},
                                 experts={"activation": "geglu", "bias": True}),
    # moe.output_norm (AXK1): torch code after the experts in the generated layer, the same on both backends.
    "output_norm_shared": _spec("t-output-norm", {"top_k": 2}, shared={"count": 1},
                                moe={"output_norm": {"kind": "rms", "eps": 1e-5}}),
    # LongCat-Flash's identity and zero experts (router ids past E: torch code beside the expert op).
    "identity_zero_experts": _spec("t-identity", {"top_k": 3, "normalize": True}, shared={"count": 1},
                                   experts={"identity_experts": 2, "zero_experts": 1}),
    # Llama 4's expert(w * x): the op gets the weighted rows, one per assignment.
    "input_scaled": _spec("t-input-scaled", {"top_k": 2, "score": "sigmoid"}, experts={"routing_weight": "input"}),
    # Ergo: the op's rows one per assignment, each normalised with its expert's own weight and the shared MLP's
    # output with its own (torch code around the Triton expert op).
    "ergo_norms": _spec("t-ergo", {"top_k": 2, "score": "sigmoid", "normalize": True, "scaling_factor": 2.0},
                        shared={"count": 1, "output_norm": {"eps": 1e-6}},
                        experts={"activation": "relu2", "output_norm": {"eps": 1e-6, "per_expert": True}}),
}


def _randomise(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "bias" in name else 1.0) / math.sqrt(p.shape[-1]))
        if hasattr(layer.router, "expert_bias"):
            # Experts 0 and 5 are never chosen: experts without tokens.
            bias = torch.randn(layer.router.expert_bias.shape[0], generator=g) * 0.3  # (zero experts after E)
            bias[[0, 5]] = -1e4
            layer.router.expert_bias.copy_(bias)


@pytest.mark.parametrize("fuse_router", [False, True], ids=["torch_router", "router_kernel"])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_torch_backend(name, dt, fuse_router, tmp_path):
    spec = moegraph.load_spec(LAYERS[name])
    ref = moegraph.compile(spec, backend="torch", dtype=dt, out_dir=tmp_path)
    _randomise(ref)
    passes = triton_passes(spec) if fuse_router else None
    tri = moegraph.compile(spec, backend="triton", dtype=dt, out_dir=tmp_path, passes=passes)
    tri.load_state_dict(ref.state_dict())
    ref.eval()
    tri.eval()
    g = torch.Generator().manual_seed(2)
    for shape in [(1, D), (7, D), (3, 11, D)]:  # 1, 7 and 33 tokens
        x = torch.randn(*shape, generator=g).to(dt)
        y = tri(x)
        assert y.dtype == dt and y.shape == x.shape
        torch.testing.assert_close(y.float(), ref(x).float(), **TOL[dt], msg=f"{name} {shape}")
    code = tri.graph().code
    assert "moegraph_triton.expert_mlp" in code and "torch.ops.moegraph.expert_mlp" not in code
    if fuse_router:
        assert "moegraph_triton.route_topk" in code and "topk(" not in code.replace("route_topk", "")
        assert tri.pass_report["eval"].applied[-1] == "FuseRouter"
    m = spec.moe
    if m.shared_experts.count and not (m.rows_per_assignment or m.shared_experts.output_norm):
        assert "shared_mlp" not in code  # folded into the expert op (unless a norm of either output comes between)


@pytest.mark.parametrize("dt", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_shared_experts_weighted_by_the_router(dt, tmp_path):
    """shared_experts.gate: router on the Triton backend: the routed and shared experts run the Triton expert op,
    the routing stays torch code (the router kernel has no shared rows: the pass refuses and says so)."""
    spec = moegraph.load_spec(_spec("t-shared-routed", {"top_k": 2, "score": "sigmoid", "normalize": True,
                                                        "scaling_factor": 1.5}, shared={"count": 2, "gate": "router"}))
    ref = moegraph.compile(spec, backend="torch", dtype=dt, out_dir=tmp_path)
    _randomise(ref)
    passes = triton_passes(spec)
    tri = moegraph.compile(spec, backend="triton", dtype=dt, out_dir=tmp_path, passes=passes)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(4)).to(dt)
    torch.testing.assert_close(tri.eval()(x).float(), ref.eval()(x).float(), **TOL[dt])
    code = tri.graph().code
    assert code.count("moegraph_triton.expert_mlp") == 2 and "torch.ops.moegraph.expert_mlp" not in code
    assert "route_topk" not in code and "router rows" in passes[-1].refused


def test_capacity_per_sequence_and_output_bias(tmp_path):
    """router.capacity {tokens, per: sequence} and moe.output_bias on the Triton backend: the same torch code in
    the generated layer around the Triton expert op, equal to the torch backend (tokens are dropped)."""
    spec = moegraph.load_spec(_spec("t-capacity-bias", {"top_k": 1, "capacity": {"tokens": 2, "per": "sequence",
                                                                                 "drop_policy": "position"}},
                                    moe={"output_bias": True}))
    ref = moegraph.compile(spec, backend="torch", dtype=torch.float32, out_dir=tmp_path)
    _randomise(ref)
    tri = moegraph.compile(spec, backend="triton", dtype=torch.float32, out_dir=tmp_path)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 9, D, generator=torch.Generator().manual_seed(5))
    y = tri.eval()(x)
    torch.testing.assert_close(y, ref.eval()(x), **TOL[torch.float32])
    assert ((y - ref.output.bias).abs().amax(-1) < 1e-6).any(), "no token was dropped"
    assert "moegraph_triton.expert_mlp" in tri.graph().code


def test_expert_space_runs_torch_code_around_the_triton_expert_op(tmp_path):
    """moe.expert_projection and moe.experts.output_norm (Muse Spark) on the Triton backend: the projections and
    norms stay torch code in the generated layer, the expert op is Triton's (on M-wide rows, one per assignment)
    and the router kernel still takes the routing; equal to the torch backend."""
    spec = moegraph.load_spec(_spec("t-expert-space", {"top_k": 2, "score": "sigmoid", "normalize": True},
                                    experts={"output_norm": {"eps": 1e-5, "weight_offset": 1, "scale": "before"},
                                             "input_norm": {"weight_offset": 1}},
                                    moe={"expert_projection": {"size": 24}}))
    ref = moegraph.compile(spec, backend="torch", dtype=torch.float32, out_dir=tmp_path)
    _randomise(ref)
    tri = moegraph.compile(spec, backend="triton", dtype=torch.float32, out_dir=tmp_path, passes=triton_passes(spec))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(tri.eval()(x), ref.eval()(x), **TOL[torch.float32])
    code = tri.graph().code
    assert "moegraph_triton.expert_mlp" in code and "torch.ops.moegraph.expert_mlp" not in code
    assert "moegraph_triton.route_topk" in code


def test_forward_after_the_first_renders_and_parses_nothing(tmp_path, monkeypatch):
    """Kernel modules are looked up once per variant: later forwards never render a template, hash a
    source or parse a score expression (that host path was ~0.2 ms of every layer call)."""
    from moegraph.triton_backend import render as render_mod

    spec = moegraph.load_spec(LAYERS["deepseek_v3_style"])
    tri = moegraph.compile(spec, backend="triton", out_dir=tmp_path, passes=triton_passes(spec)).eval()
    _randomise(tri)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(3))
    want = tri(x)

    def forbidden(*args, **kwargs):
        raise AssertionError("a template was rendered or a score parsed on a repeated forward")

    monkeypatch.setattr(render_mod, "render", forbidden)
    monkeypatch.setattr(kernels, "render_to_module", forbidden)
    monkeypatch.setattr(kernels, "score_to_triton", forbidden)
    monkeypatch.setattr(kernels, "router_context", forbidden)
    monkeypatch.setattr(kernels, "mlp_context", forbidden)
    torch.testing.assert_close(tri(x), want, rtol=0, atol=0)
    assert "moegraph_triton.route_topk" in tri.graph().code  # the router kernel ran too


@pytest.mark.parametrize("router", [{"type": "expert_choice", "capacity_factor": 1.5},
                                    {"type": "hash", "top_k": 2, "method": "modulo"},
                                    {"type": "hash", "top_k": 2, "method": "table", "vocab_size": 100,
                                     "score": "sqrt_softplus", "normalize": True, "scaling_factor": 1.5}],
                         ids=["expert_choice", "hash", "hash_table_scored"])
def test_other_routers_match_torch_backend(router, tmp_path):
    # Hash routing (a table included) runs as torch code in the generated layer on the Triton backend too.
    # Expert choice hands the op assignments grouped by expert, not by token: the combine must regroup.
    spec = moegraph.load_spec({"name": f"t-{router['type']}", "moe": {
        "hidden_size": D, "experts": {"num_experts": E, "intermediate_size": F_}, "router": router}})
    ref = moegraph.compile(spec, backend="torch", out_dir=tmp_path)
    _randomise(ref)
    tri = moegraph.compile(spec, backend="triton", out_dir=tmp_path)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(6))
    tid = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(7)) if tri.NEEDS_TOKEN_IDS else None
    torch.testing.assert_close(tri.eval()(x, tid), ref.eval()(x, tid), **TOL[torch.float32])


@pytest.mark.parametrize("block_m", [None, 32, 64])
def test_spec_block_m_fixes_the_kernels_row_block(block_m, tmp_path, monkeypatch):
    """codegen.block_m is the row block the grouped kernels launch with (over the default's choice, 16 for
    these few rows per expert in float32); the result is the torch backend's whatever the block."""
    d = LAYERS["softmax_top2"] | {"name": f"t-block-m-{block_m}", "codegen": {"block_m": block_m}}
    spec = moegraph.load_spec(d)
    ref = moegraph.compile(spec, backend="torch", out_dir=tmp_path)
    _randomise(ref)
    tri = moegraph.compile(spec, backend="triton", out_dir=tmp_path)
    tri.load_state_dict(ref.state_dict())
    launched = []
    real_align = kernels.align
    monkeypatch.setattr(kernels, "align", lambda *a: launched.append(a[-1]) or real_align(*a))
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(tri.eval()(x), ref.eval()(x), **TOL[torch.float32])
    assert launched == [block_m or 16]
    assert configs.current_row_block() is None  # only within the forward
    # under torch.compile too (traced alone, the setting was made once while tracing: the compiled forward ran
    # with the default block)
    launched.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(tri, backend="eager")(x), ref(x), **TOL[torch.float32])
    assert launched == [block_m or 16]


def test_spec_block_m_must_be_a_power_of_two_kernels_can_launch():
    for bad, why in [(24, "power of two"), (8, "must be at least 16, got 8"), (512, "at most 256")]:
        with pytest.raises(moegraph.SpecError, match=why):
            moegraph.load_spec(LAYERS["softmax_top2"] | {"codegen": {"block_m": bad}})


def test_layer_training_step_matches_torch_backend(tmp_path):
    spec = moegraph.load_spec(LAYERS["deepseek_v3_style"])
    ref = moegraph.compile(spec, backend="torch", out_dir=tmp_path)
    _randomise(ref)
    tri = moegraph.compile(spec, backend="triton", out_dir=tmp_path, passes=triton_passes(spec))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(3))
    results = []
    for layer in (ref, tri):
        layer.train()
        layer.zero_grad()
        y, aux = layer(x, return_aux=True)
        (y.square().mean() + sum(aux.values())).backward()
        results.append((y, aux, {n: p.grad for n, p in layer.named_parameters()}))
    (y0, aux0, g0), (y1, aux1, g1) = results
    torch.testing.assert_close(y1, y0, **TOL[torch.float32])
    assert aux0.keys() == aux1.keys()
    for k in aux0:
        torch.testing.assert_close(aux1[k], aux0[k])
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **TOL[torch.float32], msg=n)


def test_a_float32_layer_trains_under_autocast_as_the_layer_made_in_float16(tmp_path):
    """Mixed precision on the Triton backend (float16: the interpreter has no bfloat16): a float32 layer in training
    under torch.autocast runs its kernels as the layer compiled in float16 does, bit for bit, and its float32
    weights get that layer's gradients."""
    spec = moegraph.load_spec(LAYERS["deepseek_v3_style"])
    tri = moegraph.compile(spec, backend="triton", out_dir=tmp_path, passes=triton_passes(spec)).train()
    _randomise(tri)
    made = moegraph.compile(spec, backend="triton", dtype=torch.float16, out_dir=tmp_path, seed=None,
                            passes=triton_passes(spec)).train()
    made.load_state_dict(tri.state_dict())
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.float16):
        y, aux = tri(x, return_aux=True)
    want, want_aux = made(x.half(), return_aux=True)
    assert y.dtype == torch.float16 and torch.equal(y, want)
    assert all(torch.equal(aux[k], want_aux[k]) for k in want_aux)
    for out, losses in ((y, aux), (want, want_aux)):
        (out.float().square().mean() + sum(v.float() for v in losses.values())).backward()
    theirs = dict(made.named_parameters())
    for n, p in tri.named_parameters():
        assert p.dtype == torch.float32 and (p.grad is None) == (theirs[n].grad is None), n
        assert p.grad is None or torch.equal(p.grad, theirs[n].grad.float()), n


def test_torch_compile_sees_one_graph_with_opaque_ops(tmp_path):
    from torch._dynamo.testing import CompileCounterWithBackend

    spec = moegraph.load_spec(LAYERS["deepseek_v3_style"])
    layer = moegraph.compile(spec, backend="triton", out_dir=tmp_path, passes=triton_passes(spec)).eval()
    _randomise(layer)
    x = torch.randn(1, 9, D, generator=torch.Generator().manual_seed(4))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer.graph(), backend=counter, fullgraph=True)
    with torch.no_grad():
        y = compiled(x, None)[0]
    torch.testing.assert_close(y, layer(x))
    assert counter.frame_count == 1
    ops = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("moegraph_triton" in o for o in ops) == 2 and not any("topk" in o and "route" not in o for o in ops)


def test_fuse_router_refuses_a_graph_it_cannot_explain(tmp_path):
    spec = moegraph.load_spec(LAYERS["softmax_top2"])
    other = moegraph.load_spec(_spec("t-other", {"top_k": 2, "normalize": False}))  # a different policy
    fuse = FuseRouter(other)
    layer = moegraph.compile(spec, backend="triton", out_dir=tmp_path, passes=[fuse])
    layer.eval()
    code = layer.graph().code
    assert fuse.refused and "weighs experts differently" in fuse.refused
    assert "route_topk" not in code
    ec = moegraph.load_spec({"name": "t-ec", "moe": {"hidden_size": D, "experts": {"num_experts": E, "intermediate_size": F_},
                                                   "router": {"type": "expert_choice"}}})
    fuse = FuseRouter(ec)
    moegraph.compile(ec, backend="triton", out_dir=tmp_path, passes=[fuse]).eval().graph()
    assert "not top-k" in fuse.refused
    assert FuseRouter.for_layer(layer).spec == spec


@pytest.mark.parametrize("router, fields", [
    ({"top_k": 2, "normalize": True, "per_expert_scale": True, "logit_softcap": 0.3,
      "input_norm": {"kind": "rms", "weight": True, "multiplier": D ** -0.5}},
     "input_norm, logit_softcap, per_expert_scale"),
    ({"top_k": 2, "sparsemixer": {"jitter_eps": 0.2}, "learned_logit_scale": True}, "learned_logit_scale, sparsemixer"),
    ({"top_k": 2, "score": "sigmoid", "expert_bias": {"applies_to": "logits"}}, "expert_bias.applies_to: logits"),
    ({"top_k": 2, "score": "sigmoid", "normalize": True, "learned_weight_scale": True}, "learned_weight_scale"),
    ({"top_k": 2, "mlp": [{"op": "linear", "size": 12, "bias": True}, {"op": "activation", "function": "gelu"}]},
     "mlp"),
])
def test_router_transforms_run_as_torch_routing(router, fields, tmp_path):
    """Router transforms have no step in the router kernel: FuseRouter refuses and names them, the layer keeps its
    torch routing around the Triton expert op, and matches the torch backend."""
    spec = moegraph.load_spec(_spec("t-transforms", router, shared={"count": 1}))
    ref = moegraph.compile(spec, backend="torch", out_dir=tmp_path)
    _randomise(ref)
    fuse = FuseRouter(spec)
    tri = moegraph.compile(spec, backend="triton", out_dir=tmp_path, passes=[fuse])
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(tri.eval()(x), ref.eval()(x), **TOL[torch.float32])
    assert fuse.refused and f"router {fields};" in fuse.refused
    code = tri.graph().code
    assert "moegraph_triton.expert_mlp" in code and "route_topk" not in code


def test_router_state_runs_as_torch_routing(tmp_path):
    """A router network passing router state between layers with a zero expert (Zaya) on the Triton backend: its
    torch routing around the Triton expert op, output and returned state equal to the torch backend."""
    mlp = [{"op": "linear", "size": 12, "bias": True}, {"op": "state"}, {"op": "rms_norm"},
           {"op": "linear", "size": 12, "bias": True}, {"op": "activation", "function": "gelu"}]
    spec = moegraph.load_spec(_spec("t-state", {"top_k": 2, "mlp": mlp, "expert_bias": {}},
                                    experts={"zero_experts": 1}))
    ref = moegraph.compile(spec, backend="torch", out_dir=tmp_path)
    _randomise(ref)
    tri = moegraph.compile(spec, backend="triton", out_dir=tmp_path, passes=triton_passes(spec))
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(4))
    s_in = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(5))
    for a, b in zip(tri.eval()(x, router_state=s_in), ref.eval()(x, router_state=s_in)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    code = tri.graph().code
    assert "moegraph_triton.expert_mlp" in code and "route_topk" not in code


# ----------------------------------------------------------------------------------------------
# Errors, rendering, configs
# ----------------------------------------------------------------------------------------------


def test_unsupported_devices_and_dtypes_say_what_to_do(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = _weights(g, torch.bfloat16)
    args = (torch.randn(2, D).bfloat16(), torch.arange(2), torch.zeros(2, dtype=torch.long), torch.ones(2).bfloat16(),
            w["w_up"], w["w_down"], None, None, "silu", True, None, None, None, None, None)
    with pytest.raises(InputError, match="no bfloat16"):
        kernels.expert_mlp(*args)
    # float64 ran through the float32 accumulators into zeros, inf or NaN: refused, at compile() too
    w64 = _weights(g, torch.float64)
    args64 = (torch.randn(2, D, dtype=torch.float64), *args[1:3], torch.ones(2, dtype=torch.float64), w64["w_up"],
              w64["w_down"], *args[6:])
    with pytest.raises(InputError, match="float32, float16 or bfloat16, not torch.float64; compile with backend='torch'"):
        kernels.expert_mlp(*args64)
    with pytest.raises(InputError, match="not torch.float64"):
        kernels.route_topk(torch.randn(2, 8, dtype=torch.float64), None, 2, "softmax", False, False, 1.0, 0, 0, "max", 0)
    with pytest.raises(InputError, match="not torch.float64"):
        moegraph.compile("mixtral-tiny", backend="triton", dtype=torch.float64)
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        kernels.route_topk(torch.randn(2, 8), None, 2, "softmax", False, False, 1.0, 0, 0, "max", 0)


_LATE_INTERPRETER = textwrap.dedent("""
    import os, sys
    import torch, triton  # triton imported first, with TRITON_INTERPRET as the parent set it
    import moegraph
    from moegraph import codegen
    from moegraph.errors import InputError

    codegen.set_cache_dir(sys.argv[1])
    if sys.argv[2] == "set":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        del os.environ["TRITON_INTERPRET"]
    layer = moegraph.compile("mixtral-tiny", backend="triton", dtype=torch.float32).eval()
    try:
        layer(torch.randn(3, 32))
    except InputError as exc:
        print("refused:", exc)
""")


@pytest.mark.parametrize("change", ["set", "cleared"])
def test_interpreter_switched_after_triton_was_imported_is_refused(change, tmp_path):
    # Triton builds its own library functions for the interpreter or the compiler when it is imported; the
    # variable set afterwards (here, as after `import torch._dynamo`) failed inside Triton with "Cannot call
    # @triton.jit'd outside of the scope of a kernel". The backend names the fix instead.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if change == "cleared":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _LATE_INTERPRETER, str(tmp_path), change], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()[-1]
    if change == "set":
        assert out.startswith("refused: TRITON_INTERPRET=1 was set after triton was imported"), out
        assert "set TRITON_INTERPRET=1 before anything imports triton or torch._dynamo" in out
    else:
        assert out.startswith("refused: TRITON_INTERPRET was cleared after triton was imported with it"), out


def test_render_is_strict_cached_and_written_once(tmp_path):
    with pytest.raises(CodegenError, match="has_shared"):
        render("triton_align.py.j2", {})
    ctx = kernels.mlp_context("silu", True, None, 7.0, True, True, True, torch.float16)
    src = render("triton_expert_mlp.py.j2", ctx)
    assert "tl.minimum(tl.maximum(acc_u, -7.0), 7.0)" in src and "is_shared" in src
    assert "input_precision" not in src and "within +-7.0" in src and "ieee_fp32=False" in src
    m1 = render_to_module("triton_expert_mlp.py.j2", ctx, cache_dir=tmp_path)
    files = list(tmp_path.glob("triton_expert_mlp_*.py"))
    assert len(files) == 1 and files[0].read_text() == src
    mtime = files[0].stat().st_mtime_ns
    assert render_to_module("triton_expert_mlp.py.j2", ctx, cache_dir=tmp_path) is m1
    assert files[0].stat().st_mtime_ns == mtime
    # The router is emitted only for the spec's policy: no group code without groups.
    plain = render("triton_router.py.j2", kernels.router_context(8, 2, "softmax", False, False, True, 1.0, 0, 0, "max", 0))
    grouped = render("triton_router.py.j2", kernels.router_context(16, 4, "sigmoid", False, True, True, 2.5, 4, 2,
                                                                   "sum_topn", 2))
    assert "group_score" not in plain and "expert_bias" not in plain and "group_score" in grouped
    assert "tl.sigmoid(x)" in grouped and "w * 2.5" in grouped


def test_configs_table_lookup_and_defaults(tmp_path):
    small, large = configs.default_config(2, torch.bfloat16), configs.default_config(1000, torch.bfloat16)
    assert small.BLOCK_M == 16 and large.BLOCK_M >= 64
    fitted = configs.fit(large, D=32, F=16)
    assert fitted.gate_up.BLOCK_N == 16 and fitted.gate_up.BLOCK_K == 32 and fitted.down.BLOCK_N == 32
    table = {"1": small.to_json(), "1024": large.to_json()}
    path = configs.table_path(E, F_, "NVIDIA Test GPU", torch.float16, tmp_path)
    assert path.name == "E=8,N=16,device_name=NVIDIA_Test_GPU,dtype=float16.json"
    path.write_text(json.dumps(table))
    configs.add_search_dir(tmp_path)
    assert configs.get_config(E, F_, 900, 1.0, torch.float16, "NVIDIA Test GPU") == large
    assert configs.get_config(E, F_, 3, 1.0, torch.float16, "NVIDIA Test GPU") == small
    assert configs.get_config(E, F_, 3, 300.0, torch.float16, None) == configs.default_config(300.0, torch.float16)


def test_a_tuned_table_that_cannot_be_used_is_named_and_left_out(tmp_path, monkeypatch):
    """A hand-edited or truncated table warns, naming the file and what is wrong, and the kernels take the
    default blocks (they raised KeyError / JSONDecodeError, or launched BLOCK_M=-16)."""
    monkeypatch.setattr(configs, "_SEARCH_DIRS", list(configs._SEARCH_DIRS))
    configs.add_search_dir(tmp_path)
    good = configs.default_config(2, torch.float16).to_json()
    cases = {
        "{": "Expecting property name",
        "[]": "expected an object",
        json.dumps({"1": {**good, "BLOCK_M": -16}}): "BLOCK_M = -16, expected an integer in [16, 256], a power of two",
        json.dumps({"1": {**good, "BLOCK_M": 24}}): "BLOCK_M = 24",
        json.dumps({"1": {**good, "down": {**good["down"], "num_warps": "4"}}}): "down.num_warps = '4'",
        json.dumps({"1": {**good, "gate_up": {"BLOCK_N": 64}}}): "entry 1: ",
        json.dumps({"x": good}): "key 'x' is not a token count",
        json.dumps({"1": {"BLOCK_M": 16}}): "expected {BLOCK_M, gate_up",
    }
    for i, (text, why) in enumerate(cases.items()):
        device = f"Bad GPU {i}"
        path = configs.table_path(E, F_, device, torch.float16, tmp_path)
        path.write_text(text)
        with pytest.warns(UserWarning, match=re.escape(why)) as caught:
            cfg = configs.get_config(E, F_, 3, 2.0, torch.float16, device)
        assert cfg == configs.default_config(2.0, torch.float16)
        assert str(path) in str(caught[0].message) and "tune_triton.py" in str(caught[0].message)


_CROSS_COMPILE = textwrap.dedent("""
    import sys, torch
    from moegraph.triton_backend import configs, kernels
    from moegraph import codegen
    from moegraph.triton_backend.render import render_to_module

    codegen.set_cache_dir(sys.argv[1])  # not the user's cache
    sys.path.insert(0, sys.argv[2])
    from sm90 import compile_sm90

    bf, i32, i64 = torch.bfloat16, torch.int32, torch.int64
    T, D, F, E = 8192, 7168, 2048, 256
    mod = render_to_module("triton_expert_mlp.py.j2", kernels.mlp_context("silu", True, None, None, False, True, False, bf))
    out = {}
    for rows in (300,):  # prefill tiles; the decode tiles are compiled below with T = 1
        cfg = configs.default_config(rows, bf)
        gu, dn = cfg.gate_up, cfg.down
        k = compile_sm90(mod.gate_up_kernel, [bf, i64, bf, bf, None, i32, i32, bf, 65536, 73728, T, D, F, F, E, 1400],
                         dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=gu.BLOCK_N, BLOCK_K=gu.BLOCK_K, GROUP_M=gu.GROUP_M, EVEN_K=True),
                         gu.num_warps, gu.num_stages)
        out[f"gate_up_{rows}"] = (k.metadata.shared, "async_copy" in k.asm["ttgir"], "wgmma" in k.asm["ptx"])
        k = compile_sm90(mod.down_kernel, [bf, bf, bf, None, bf, None, i32, i32, bf, 65536, 73728, T, D, F, F, E, 1400],
                         dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=dn.BLOCK_N, BLOCK_K=dn.BLOCK_K, GROUP_M=dn.GROUP_M, EVEN_K=True),
                         dn.num_warps, dn.num_stages)
        out[f"down_{rows}"] = (k.metadata.shared, "async_copy" in k.asm["ttgir"], "wgmma" in k.asm["ptx"])
    compile_sm90(mod.combine_kernel, [bf, i64, i64, i64, bf, 65536, T, D, E, 1], dict(BLOCK_D=1024))
    al = render_to_module("triton_align.py.j2", {"has_shared": True})
    compile_sm90(al.align_count, [i64, i32, i32, 65536, 73728, T, E, E + 1, 90112], dict(CHUNK=128, NB=512))
    compile_sm90(al.align_scan, [i32, i32, 576], dict(NB=512, EB=64, PB=32))
    compile_sm90(al.align_offsets, [i32, i32, i32, E + 1, 1400], dict(BLOCK_M=64, NB=512, BB=64))
    compile_sm90(al.align_scatter, [i64, i32, i32, i32, 65536, 73728, T, E, E + 1], dict(CHUNK=128, NB=512))
    ctx = kernels.router_context(E, 8, "sigmoid", False, True, True, 2.5, 8, 4, "sum_topn", 2)
    router = render_to_module("triton_router.py.j2", ctx).route_topk_kernel
    compile_sm90(router, [torch.float32, torch.float32, i64, torch.float32, T, E, 1], dict(BLOCK_T=16))
    # One token (decode): T, SH, P and friends equal 1 and are specialised into constants.
    cfg = configs.default_config(1, bf)
    gu, dn = cfg.gate_up, cfg.down
    k = compile_sm90(mod.gate_up_kernel, [bf, i64, bf, bf, None, i32, i32, bf, 8, 9, 1, D, F, F, E, 9],
                     dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=gu.BLOCK_N, BLOCK_K=gu.BLOCK_K, GROUP_M=gu.GROUP_M, EVEN_K=True),
                     gu.num_warps, gu.num_stages)
    out["gate_up_1"] = (k.metadata.shared, "async_copy" in k.asm["ttgir"], "wgmma" in k.asm["ptx"])
    k = compile_sm90(mod.down_kernel, [bf, bf, bf, None, bf, None, i32, i32, bf, 8, 9, 1, D, F, F, E, 9],
                     dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=dn.BLOCK_N, BLOCK_K=dn.BLOCK_K, GROUP_M=dn.GROUP_M, EVEN_K=True),
                     dn.num_warps, dn.num_stages)
    out["down_1"] = (k.metadata.shared, "async_copy" in k.asm["ttgir"], "wgmma" in k.asm["ptx"])
    compile_sm90(mod.combine_kernel, [bf, i64, i64, i64, bf, 8, 1, D, E, 1], dict(BLOCK_D=1024))
    compile_sm90(al.align_count, [i64, i32, i32, 8, 9, 1, E, E + 1, 144], dict(CHUNK=128, NB=512))
    compile_sm90(al.align_scan, [i32, i32, 1], dict(NB=512, EB=64, PB=32))
    compile_sm90(al.align_offsets, [i32, i32, i32, E + 1, 9], dict(BLOCK_M=16, NB=512, BB=64))
    compile_sm90(al.align_scatter, [i64, i32, i32, i32, 8, 9, 1, E, E + 1], dict(CHUNK=128, NB=512))
    compile_sm90(router, [torch.float32, torch.float32, i64, torch.float32, 1, E, 1], dict(BLOCK_T=16))
    print(repr(out))
""")


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    """Code the interpreter runs must also compile for sm_90, with pipelined loads and wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _CROSS_COMPILE, str(tmp_path / "generated"),
                           os.path.dirname(os.path.abspath(__file__))],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode and ("ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower()):
        pytest.skip("Triton's CUDA toolchain (ptxas) is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = eval(proc.stdout.strip().splitlines()[-1])  # a dict literal printed by the script
    for name, (smem, pipelined, wgmma) in out.items():
        assert smem <= 227 * 1024 and pipelined, (name, smem, pipelined)
    assert out["gate_up_300"][2] and out["down_300"][2]  # large tiles use Hopper's wgmma


@pytest.mark.slow
@pytest.mark.skipif(IN_PROCESS, reason="runs only when triton was imported without the interpreter")
def test_module_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
