"""Every expert-compute strategy on the edge inputs real runs hand it, against the token-by-token loop.

The tuner picks a strategy by timing, so which one runs depends on the machine and its load: a
strategy that is wrong on a rare input shows up only on some machines (an expert-parallel rank that
received no routed rows once ran its shared experts' input through routed expert 0 in the native
kernel, and a rank with no tokens had its shared experts' call refused). Here every strategy, for the
expert op and the FP8 op, runs generated inputs: no tokens, no assignments, every assignment
dropped, ids on both sides of [0, E), one token, experts with no rows,
shared experts with and without a per-token scale, biases.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moegraph import fp8, native, semantics, strategies
from moegraph.ops.args import ExpertArgs

import reference_fp8
import reference_moe

EDGES = settings(max_examples=25, deadline=None, derandomize=True, database=None)

D, F = 32, 16


@pytest.fixture(scope="module", autouse=True)
def kernel_dir(tmp_path_factory):
    """The native kernel builds into a private folder (where there is no compiler, ``native`` runs
    its documented fallback, which is checked the same way)."""
    native.set_cache_dir(tmp_path_factory.mktemp("native"))
    yield
    native.set_cache_dir(None)


@st.composite
def calls(draw):
    T = draw(st.integers(0, 18))  # 0: a rank with no tokens still calls the op (its shared experts)
    E = draw(st.integers(1, 5))
    n = draw(st.sampled_from([0, 1, T, 2 * T, 3 * T])) if T else 0
    ids = st.integers(-1, E)  # -1 and E are dropped assignments
    return dict(T=T, E=E, tok=draw(st.lists(st.integers(0, max(T - 1, 0)), min_size=n, max_size=n)),
                exp=draw(st.lists(ids, min_size=n, max_size=n)),
                activation=draw(st.sampled_from(["swiglu", "gelu", "relu2"])),
                bias=draw(st.booleans()), shared=draw(st.sampled_from(["none", "plain", "scaled"])),
                seed=draw(st.integers(0, 2**16)))


def _tensors(c, D=D, F=F):
    g = torch.Generator().manual_seed(c["seed"])
    act = semantics.activation(c["activation"])
    H = (2 if act.gated else 1) * F
    T, E = c["T"], c["E"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    n = len(c["tok"])
    return dict(act=act, x=rnd(T, D), tok=torch.tensor(c["tok"], dtype=torch.int64),
                exp=torch.tensor(c["exp"], dtype=torch.int64), wgt=torch.rand(n, generator=g),
                w_up=rnd(E, H, D), w_down=rnd(E, D, F),
                b_up=rnd(E, H) if c["bias"] else None, b_down=rnd(E, D) if c["bias"] else None,
                s_up=rnd(H, D) if c["shared"] != "none" else None,
                s_down=rnd(D, F) if c["shared"] != "none" else None,
                s_scale=torch.rand(T, generator=g) if c["shared"] == "scaled" else None)


def _loop(t, w_up, w_down, clamps=(None, None)):
    """The op's meaning, one assignment at a time (tests/reference_moe.py's expert, float32)."""
    name, f = t["act"].name, (lambda v: None if v is None else v.float())
    x = t["x"].float()
    y = torch.zeros(x.shape)
    for tok, e, w in zip(t["tok"].tolist(), t["exp"].tolist(), t["wgt"].tolist()):
        if 0 <= e < w_up.shape[0]:
            y[tok] += w * reference_moe.expert(x[tok], f(w_up[e]), f(w_down[e]),
                                               None if t["b_up"] is None else f(t["b_up"][e]),
                                               None if t["b_down"] is None else f(t["b_down"][e]), name, *clamps)
    if t["s_up"] is not None:
        for tok in range(y.shape[0]):
            s = 1.0 if t["s_scale"] is None else float(t["s_scale"][tok])
            y[tok] += s * reference_moe.expert(x[tok], f(t["s_up"]), f(t["s_down"]), None, None, name, *clamps)
    return y


# The two calls an expert-parallel rank makes that single-process layers never do, always tried.
NO_ROWS = dict(T=3, E=2, tok=[], exp=[], activation="swiglu", bias=False, shared="plain", seed=0)
NO_TOKENS = dict(T=0, E=2, tok=[], exp=[], activation="swiglu", bias=False, shared="scaled", seed=0)


@EDGES
@given(c=calls())
@example(c=NO_ROWS)
@example(c=NO_TOKENS)
def test_every_strategy_equals_the_loop_on_edge_inputs(c):
    t = _tensors(c)
    args = ExpertArgs(t["x"], t["tok"], t["exp"], t["wgt"], t["w_up"], t["w_down"], t["b_up"], t["b_down"],
                      t["act"].name, t["act"].gated, None, None, t["s_up"], t["s_down"], t["s_scale"])
    want = _loop(t, t["w_up"], t["w_down"])
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    for name in strategies.STRATEGIES:
        with torch.no_grad():
            got = strategies.run_strategy(name, args)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=f"strategy {name} on {c}")


@EDGES
@given(c=calls().filter(lambda c: c["shared"] == "none"))
@example(c={**NO_ROWS, "shared": "none"})
@example(c={**NO_TOKENS, "shared": "none"})
def test_fp8_paths_equal_the_fp8_loop_on_edge_inputs(c):
    """The FP8 op's torch loop and its native decode path (what ``fp8._decode_path`` chooses between)."""
    t = _tensors(c)
    block, tile = (16, 16), 16
    q_up, sc_up = fp8.quantize_blocks(t["w_up"], block)
    q_down, sc_down = fp8.quantize_blocks(t["w_down"], block)
    args = (t["x"], t["tok"], t["exp"], t["wgt"], q_up, sc_up, q_down, sc_down, t["b_up"], t["b_down"],
            t["act"].name, t["act"].gated, None, None, *block, tile, "fp8_e4m3", "float32")
    run = reference_fp8.fp8_expert(tile)
    want = torch.zeros(t["x"].shape)
    for tok, e, w in zip(t["tok"].tolist(), t["exp"].tolist(), t["wgt"].tolist()):
        if 0 <= e < c["E"]:
            want[tok] += w * run(t["x"][tok], fp8.dequantize_blocks(q_up[e], sc_up[e], block),
                                 fp8.dequantize_blocks(q_down[e], sc_down[e], block),
                                 None if t["b_up"] is None else t["b_up"][e],
                                 None if t["b_down"] is None else t["b_down"][e], t["act"].name)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    for name in ("per_expert", "native"):
        with torch.no_grad(), strategies.pinned(name):
            got = torch.ops.moegraph.fp8_expert_mlp(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=f"FP8 path {name} on {c}")


@st.composite
def bf16_calls(draw):
    """Calls the bfloat16 kernel reads (D and F multiples of 32): experts with 0 to a dozen rows, so
    every remainder of its four-row blocks, clamps and bias dtypes."""
    c = draw(calls())
    T = c["T"]
    n = draw(st.sampled_from([0, 1, T, 3 * T, 6 * T])) if T else 0
    ids = st.integers(-1, c["E"])
    return dict(c, tok=draw(st.lists(st.integers(0, max(T - 1, 0)), min_size=n, max_size=n)),
                exp=draw(st.lists(ids, min_size=n, max_size=n)),
                bias_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                clamps=draw(st.sampled_from([(None, None), (0.5, 0.7)])))


@EDGES
@given(c=bf16_calls())
@example(c={**NO_ROWS, "bias_dtype": "float32", "clamps": (None, None)})
@example(c={**NO_TOKENS, "bias_dtype": "float32", "clamps": (None, None)})
def test_native_bf16_equals_the_loop_on_edge_inputs(c):
    """The bfloat16 kernel strategy (``native_bf16``) on bfloat16 inputs it reads itself, against the
    loop in float32 on the same bfloat16 values; where this CPU has AVX512-BF16 the kernel must have
    run (elsewhere the strategy's documented fallback is what is checked)."""
    t = _tensors(c, D=64, F=32)
    bf = torch.bfloat16
    for k in ("x", "w_up", "w_down", "s_up", "s_down"):
        t[k] = None if t[k] is None else t[k].to(bf)
    for k in ("b_up", "b_down"):
        t[k] = None if t[k] is None else t[k].to(getattr(torch, c["bias_dtype"]))
    act = t["act"]
    clamps = c["clamps"] if act.gated else (None, None)
    args = ExpertArgs(t["x"], t["tok"], t["exp"], t["wgt"], t["w_up"], t["w_down"], t["b_up"], t["b_down"], act.name,
                      act.gated, *clamps, t["s_up"], t["s_down"], t["s_scale"])
    kernel_calls = []
    run = native.run_bf16_rows
    with torch.no_grad(), mock.patch.object(native, "run_bf16_rows", lambda *a: kernel_calls.append(1) or run(*a)):
        got = strategies.run_strategy("native_bf16", args)
    want = _loop(t, t["w_up"], t["w_down"], clamps)
    assert got.dtype == bf and got.shape == want.shape
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * scale, msg=f"native_bf16 on {c}")
    kept = sum(0 <= e < c["E"] for e in c["exp"])
    if native.bf16_kernel(act) is not None:
        assert len(kernel_calls) == (1 if kept else 0), c
    # The decode kernel on the same bfloat16 inputs: one call for the shared and routed experts, whose
    # rows met by one token go through bfloat16 dot products where the CPU has them.
    fused_calls = []
    fused = native._call_fused
    for name in ("native", "native_1t"):
        with torch.no_grad(), mock.patch.object(native, "_call_fused", lambda *a: fused_calls.append(1) or fused(*a)):
            got = strategies.run_strategy(name, args)
        assert got.dtype == bf and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * scale, msg=f"{name} on {c}")
    if native.kernel(act) is not None and c["T"] > 0:
        assert len(fused_calls) == 2, c


@EDGES
@given(c=calls(), threads=st.integers(2, 5))
@example(c=NO_ROWS, threads=2)
def test_per_expert_split_across_threads_equals_the_loop(c, threads):
    """The per-expert path with its experts shared out among worker threads (``expert_threads`` on a
    machine with that many intra-op threads), whatever this machine has: every kept row in exactly
    one run, each run a contiguous range of experts, and the result the loop's."""
    from moegraph import ops
    from moegraph.ops import forward

    t = _tensors(c)
    args = ExpertArgs(t["x"], t["tok"], t["exp"], t["wgt"], t["w_up"], t["w_down"], t["b_up"], t["b_down"],
                      t["act"].name, t["act"].gated, None, None, t["s_up"], t["s_down"], t["s_scale"])
    runs = []
    split = forward.run_split
    record = lambda fn, parts: runs.append(parts) or split(fn, parts)  # noqa: E731
    with torch.no_grad(), mock.patch.object(forward, "run_split", record):
        got = ops._expert_mlp_fast(args, None, grouped=False, threads=threads)
    want = _loop(t, t["w_up"], t["w_down"])
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=f"{threads} threads on {c}")
    kept = [e for e in c["exp"] if 0 <= e < c["E"]]
    if not kept:
        assert runs == []
        return
    (parts,) = runs
    assert 1 <= len(parts) <= threads
    assert [e for p in parts for e in p.exp_sorted.tolist()] == sorted(kept)
    for p in parts:
        assert len(p.counts) == c["E"] and sum(p.counts) == p.x_ND.shape[0] > 0
        assert p.counts == [p.exp_sorted.tolist().count(e) for e in range(c["E"])]


def test_worker_threads_leave_the_thread_counts_as_they_were():
    """The workers run one intra-op thread each; the caller's count, and the count a thread started
    afterwards sets itself up with, are what they were."""
    import threading

    from moegraph.ops import threads

    before = torch.get_num_threads()
    seen = threads.run_split(lambda _: torch.get_num_threads(), [0, 1, 2])
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
    later = []
    th = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert later == [before]
