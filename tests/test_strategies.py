"""Expert-compute strategies: each exact against the dense loop reference (outputs and gradients,
float32 and bfloat16), and the choice mechanism (pin, measurement with a fake timer, the table file)."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import moegraph
from moegraph import ops, semantics, strategies, tuning
from moegraph.errors import InputError

from reference_moe import reference_forward

D, F_, E = 16, 8, 8

SPEC = {"name": "strat", "moe": {
    "hidden_size": D, "experts": {"num_experts": E, "intermediate_size": F_, "activation": "swiglu"},
    "shared_experts": {"count": 1},
    "router": {"top_k": 3, "score": "sigmoid", "normalize": True, "scaling_factor": 2.5,
               "groups": {"num_groups": 4, "topk_groups": 2, "group_score": "sum_topn", "top_n": 2},
               "expert_bias": {"update_rate": 0.01}}}}


def _layer(strategy: str, dtype=torch.float32, spec=SPEC, tmp_path=None):
    """A compiled layer in ``dtype`` (router in float32) with seeded random weights."""
    layer = moegraph.compile(spec, dtype=dtype, out_dir=tmp_path, expert_strategy=strategy)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        if hasattr(layer.router, "expert_bias"):
            layer.router.expert_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return layer


def _float_copy(layer, spec=SPEC, tmp_path=None):
    """The same layer in float32 (the bfloat16 weights widened exactly), for the reference."""
    ref = moegraph.compile(spec, dtype=torch.float32, out_dir=tmp_path, expert_strategy="per_expert")
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    return ref


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", list(strategies.STRATEGIES))
@pytest.mark.parametrize("T", [1, 3, 40])
def test_strategy_matches_loop_reference(strategy, dtype, T, tmp_path):
    layer = _layer(strategy, dtype, tmp_path=tmp_path)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(dtype)
    ref = reference_forward(SPEC, _float_copy(layer, tmp_path=tmp_path), x.float())
    for mode in ("eval", "train"):
        getattr(layer, mode)()
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, **TOL[dtype])


@pytest.mark.skipif(not ops.prepack_supported(torch.empty(1, dtype=torch.bfloat16)),
                    reason="oneDNN has no bfloat16 kernels on this CPU")
@pytest.mark.parametrize("T", [1, 3, 40])
def test_bfloat16_eval_runs_packed_weights(T, tmp_path):
    """bfloat16 eval graphs run the oneDNN-packed op (one row included) and agree with the float32
    reference and with the same strategy on unpacked weights."""
    layer = _layer("per_expert", torch.bfloat16, tmp_path=tmp_path).eval()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        gm = layer.graph()
        assert any(n.target is torch.ops.moegraph.expert_mlp_packed.default for n in gm.graph.nodes)
        y_plain = layer.train()(x)  # the train graph runs the op without packed weights
    ref = reference_forward(SPEC, _float_copy(layer, tmp_path=tmp_path), x.float())
    torch.testing.assert_close(y.float(), ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(y, y_plain, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("strategy", list(strategies.STRATEGIES))
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu2", False), ("geglu", True)])
def test_strategy_activations_biases_and_dropped(strategy, activation, bias, tmp_path):
    spec = {"name": "strat2", "moe": {
        "hidden_size": D, "experts": {"num_experts": E, "intermediate_size": F_, "activation": activation,
                                      "bias": bias},
        "router": {"top_k": 2, "capacity": {"factor": 0.5, "drop_policy": "probs"}}}}
    layer = _layer(strategy, spec=spec, tmp_path=tmp_path).eval()
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_forward(spec, layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", list(strategies.STRATEGIES))
def test_strategy_gradients_match_reference(strategy, dtype, tmp_path):
    layer = _layer(strategy, dtype, tmp_path=tmp_path).train()
    # 16 tokens x top-3: 48 rows, aligned for the grouped backward's 2-D grouped GEMMs in both dtypes.
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref_layer = _float_copy(layer, tmp_path=tmp_path)
    xr = x.float().clone().requires_grad_(True)
    reference_forward(SPEC, ref_layer, xr).square().sum().backward()
    xs = x.clone().requires_grad_(True)
    layer(xs).float().square().sum().backward()
    if dtype == torch.float32:
        close = lambda a, b, name: torch.testing.assert_close(a, b, **TOL[dtype], msg=name)  # noqa: E731
    else:  # bfloat16 rounding compounds through forward and backward: compare by relative norm
        def close(a, b, name):
            err = ((a.float() - b).norm() / b.norm()).item()
            assert err < 2e-2, f"{name}: relative error {err:.3g}"
    close(xs.grad.float(), xr.grad, "x")
    for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        if q.grad is not None:
            close(p.grad.float(), q.grad, name)


def test_native_bf16_training_forward_and_gradients_match_reference(tmp_path):
    """The bfloat16 kernel as a training forward (pinned): it keeps the up projection for the backward,
    and output and every gradient match the float32 loop reference; where the CPU has AVX512-BF16 the
    kernel ran and wrote that up projection (elsewhere the per-expert form's result is checked)."""
    from moegraph import native

    spec = copy.deepcopy(SPEC)
    spec["moe"]["hidden_size"], spec["moe"]["experts"]["intermediate_size"] = 64, 32  # the kernel's multiples
    layer = _layer("native_bf16", torch.bfloat16, spec=spec, tmp_path=tmp_path).train()
    ref_layer = _float_copy(layer, spec=spec, tmp_path=tmp_path)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    xr = x.float().clone().requires_grad_(True)
    yr = reference_forward(spec, ref_layer, xr)
    yr.square().sum().backward()
    kept, run = [], native.run_bf16_rows
    with mock.patch.object(native, "run_bf16_rows", lambda *a, **k: kept.append(k.get("h_out_NH")) or run(*a, **k)):
        xs = x.clone().requires_grad_(True)
        ys = layer(xs)
        ys.float().square().sum().backward()
    if native.bf16_kernel(semantics.activation("swiglu")) is not None:
        assert len(kept) == 1 and kept[0] is not None and kept[0].dtype == torch.bfloat16

    def close(a, b, name):  # bfloat16 rounding compounds through forward and backward: relative norm
        err = ((a.float() - b).norm() / b.norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"

    close(ys.detach(), yr.detach(), "y")
    close(xs.grad, xr.grad, "x")
    for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        if q.grad is not None:
            close(p.grad, q.grad, name)


@pytest.mark.parametrize("strategy", ["per_expert", "grouped_mm"])
@pytest.mark.parametrize("activation,bias,shared_gate,drops", [("gelu", True, "none", False),
                                                               ("swiglu", False, "sigmoid", False),
                                                               ("geglu", True, "sigmoid", True)])
def test_backward_biases_drops_and_shared_gate(strategy, activation, bias, shared_gate, drops, monkeypatch,
                                               tmp_path):
    """Both backward forms against the reference's autograd: expert biases, experts without rows
    (their gradients must be zero), capacity drops and a sigmoid-gated shared expert."""
    router = {"top_k": 2, **({"capacity": {"factor": 0.5, "drop_policy": "probs"}} if drops else {})}
    spec = {"name": "strat3", "moe": {
        "hidden_size": D, "experts": {"num_experts": E, "intermediate_size": F_, "activation": activation,
                                      "bias": bias},
        "shared_experts": {"count": 1, "gate": shared_gate}, "router": router}}
    ran = []
    for name, fn in list(strategies.BACKWARD_STRATEGIES.items()):
        monkeypatch.setitem(strategies.BACKWARD_STRATEGIES, name, lambda r, g, n=name, f=fn: ran.append(n) or f(r, g))
    layer = _layer(strategy, spec=spec, tmp_path=tmp_path).train()
    ref_layer = _float_copy(layer, spec=spec, tmp_path=tmp_path)
    # Without drops: 2 tokens x top-2 = 4 rows (aligned for the 2-D grouped GEMMs) on 8 experts, so at
    # least 4 experts get none. With drops the row count is whatever survives (the grouped form then
    # hands over to the per-expert one, which is what runs for unaligned counts).
    x = torch.randn(8 if drops else 2, D, generator=torch.Generator().manual_seed(7))
    xr, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    reference_forward(spec, ref_layer, xr).square().sum().backward()
    layer(xs).square().sum().backward()
    assert ran and (ran[0] == strategy or drops)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5)
    zero_experts = 0
    for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
            if name.endswith("down_proj") and p.dim() == 3:
                zero_experts += int((q.grad.flatten(1).abs().sum(1) == 0).sum())
    assert zero_experts > 0  # the case of experts without rows was exercised


@pytest.mark.parametrize("strategy", ["per_expert", "grouped_mm"])
def test_backward_without_the_saved_forward(strategy, monkeypatch, tmp_path):
    """Where the forward's rows and up projection are not at hand (torch.compile, a direct call of
    the backward op), the backward recomputes them: same gradients as the reference."""
    taken = []
    monkeypatch.setattr(ops, "take_forward", lambda out: taken.append(out) and None)
    layer = _layer(strategy, tmp_path=tmp_path).train()
    ref_layer = _float_copy(layer, tmp_path=tmp_path)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(5))
    xr, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    reference_forward(SPEC, ref_layer, xr).square().sum().backward()
    layer(xs).square().sum().backward()
    assert taken  # the op's setup_context asked, and got nothing
    torch.testing.assert_close(xs.grad, xr.grad, **TOL[torch.float32])
    for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("strategy", ["per_expert", "grouped_mm"])
def test_backward_with_an_input_that_needs_no_gradient(strategy, tmp_path):
    """A layer input without requires_grad (the first layer, a frozen embedding): the input gradient is
    skipped and the parameters' gradients still match the reference."""
    layer = _layer(strategy, tmp_path=tmp_path).train()
    ref_layer = _float_copy(layer, tmp_path=tmp_path)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(5))
    reference_forward(SPEC, ref_layer, x).square().sum().backward()
    layer(x).square().sum().backward()
    for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=name)


def test_forward_state_kept_only_for_a_backward(monkeypatch, tmp_path):
    """Only a forward whose backward will run keeps its rows and up projection: not under no_grad or
    inference mode (with parameters that require grad)."""
    from moegraph.ops import backward as ops_backward

    layer = _layer("grouped_mm", tmp_path=tmp_path).train()
    x = torch.randn(16, D)
    for ctx in (torch.no_grad, torch.inference_mode):
        ops_backward._SAVED.slot = None
        with ctx():
            layer(x)
        assert ops_backward._SAVED.slot is None, ctx.__name__
    taken = []
    monkeypatch.setattr(ops, "take_forward", lambda out, f=ops.take_forward: taken.append(f(out)) or taken[-1])
    layer(x)  # with grad: the state is kept and handed to the op's autograd at once
    assert ops_backward._SAVED.slot is None
    assert len(taken) == 1 and taken[0].h_ND.shape == (16 * 3, 2 * F_)


def test_pin_runs_the_pinned_strategy(monkeypatch, tmp_path):
    ran = []
    for name in list(strategies.STRATEGIES):
        fn = strategies.STRATEGIES[name]
        monkeypatch.setitem(strategies.STRATEGIES, name, lambda a, p, n=name, f=fn: ran.append(n) or f(a, p))
    layer = _layer("padded_bmm", tmp_path=tmp_path).eval()
    with torch.no_grad():
        layer(torch.randn(4, D))
    assert ran == ["padded_bmm"]
    assert strategies.current_pin() is None  # the pin ends with the forward


def test_unknown_strategy_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="expert_strategy 'fastest'.*per_expert"):
        moegraph.compile(SPEC, out_dir=tmp_path, expert_strategy="fastest")
    with pytest.raises(InputError, match="unknown expert strategy"):
        with strategies.pinned("nope"):
            pass


def _args(T=6, E_=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    tok = torch.arange(T).repeat_interleave(2)
    exp = torch.randint(0, E_, (2 * T,), generator=g)
    return (x, tok, exp, torch.rand(2 * T, generator=g), torch.randn(E_, 2 * F_, D, generator=g),
            torch.randn(E_, D, F_, generator=g), None, None, "silu", True, None, None, None, None, None)


def test_padded_bmm_is_no_candidate_where_padding_multiplies_long_gemms():
    """Many rows per expert and one expert with most of them: padding every expert to it would multiply
    the GEMM work by more than PADDED_MAX_WASTE, so padded_bmm is not timed; even rows, or few rows
    per expert (where calls, not GEMMs, take the time), keep it."""
    E_, T = 4, strategies.THREADS_MIN_ROWS * 4
    for exp, want in [(torch.arange(2 * T) % E_, True),  # even: no padding at all
                      (torch.where(torch.arange(2 * T) < T, 0, torch.arange(2 * T) % E_), False),  # expert 0: 5/8
                      (torch.where(torch.arange(2 * T) < 8, 0, torch.arange(2 * T) % E_)[: 2 * T], True)]:
        a = list(_args(T=T, E_=E_))
        a[2] = exp
        args = ops.ExpertArgs.of(tuple(a))
        assert ("padded_bmm" in strategies.candidates(args.x_TD, args.w_up_EHD, args)) == want
    short = list(_args(T=8, E_=E_))  # 16 assignments on 4 experts: few rows, padded_bmm stays
    short[2] = torch.zeros(16, dtype=torch.int64)
    args = ops.ExpertArgs.of(tuple(short))
    assert "padded_bmm" in strategies.candidates(args.x_TD, args.w_up_EHD, args)


def test_expert_threads_is_a_candidate_from_its_rows_per_expert_on_several_threads():
    """Whole experts per worker thread is timed only where there are several intra-op threads and
    the experts get THREADS_MIN_ROWS rows or more on average (fewer: each GEMM is too short)."""
    before = torch.get_num_threads()
    n_min = strategies.THREADS_MIN_ROWS * 4 // 2  # _args: two assignments per token, four experts
    try:
        for threads, T, want in [(2, n_min, True), (2, n_min - 1, False), (1, n_min, False)]:
            torch.set_num_threads(threads)
            args = ops.ExpertArgs.of(_args(T=T))
            assert ("expert_threads" in strategies.candidates(args.x_TD, args.w_up_EHD, args)) == want, (threads, T)
    finally:
        torch.set_num_threads(before)


class FakeTimer:
    """Times from a table instead of the clock: which strategy 'wins' is decided by the test."""

    def __init__(self, times: dict[str, float]):
        self.times, self.calls = times, []

    def __call__(self, fn):
        name = fn.__defaults__[0]  # the candidate's name, bound by Tuner.measure
        self.calls.append(name)
        fn()
        return self.times[name]


@pytest.mark.parametrize("winner", ["per_expert", "padded_bmm", "decode"])
def test_tuner_picks_the_fastest_by_its_timer_and_caches(winner, tmp_path):
    times = {n: 1.0 for n in strategies.STRATEGIES}
    times[winner] = 0.1
    timer = FakeTimer(times)
    # The budget is wall time; a fake timer's times are not, so a loaded machine must not cut the reps short.
    tuner = tuning.Tuner(tmp_path, timer=timer, reps=2, budget_s=1e9)
    args = _args()
    assert tuner.choose(args) == winner
    assert set(timer.calls) == set(strategies.candidates(args[0], args[4], ops.ExpertArgs.of(args)))
    # The losers were 10x slower on their warm-up call: pruned, never timed again; and the one left
    # is not timed again either (nothing to compare it with).
    assert timer.calls == list(strategies.candidates(args[0], args[4], ops.ExpertArgs.of(args)))
    n_calls = len(timer.calls)
    assert tuner.choose(args) == winner and len(timer.calls) == n_calls  # cached: no more timing
    # A fresh tuner on the same folder reads the table instead of measuring.
    timer2 = FakeTimer({n: 1.0 for n in strategies.STRATEGIES})
    assert tuning.Tuner(tmp_path, timer=timer2).choose(args) == winner and timer2.calls == []
    raw = json.loads(tuner.path.read_text())
    assert raw["identity"]["torch"] == torch.__version__ and raw["identity"]["device"]
    assert [v["strategy"] for v in raw["entries"].values()] == [winner]


class SequenceTimer(FakeTimer):
    """Each call of a candidate takes the next of its times (the last one repeats)."""

    def __call__(self, fn):
        name = fn.__defaults__[0]
        self.calls.append(name)
        fn()
        seq = self.times[name]
        return seq[min(self.calls.count(name), len(seq)) - 1]


def test_timed_rounds_drop_the_clearly_slower_and_stop_when_one_is_left(tmp_path):
    """Warm-ups within PRUNE of each other all get a timed call; after it, a candidate more than DROP
    times slower than the leader is out; the rounds go on (alternating order) between the close ones
    until one is DROP ahead, and the fastest best time wins."""
    args = _args()
    names = strategies.candidates(args[0], args[4], ops.ExpertArgs.of(args))
    assert names[:3] == ["per_expert", "grouped_mm", "padded_bmm"]
    slow = 1.0
    times = {n: [slow] for n in names}
    times["per_expert"] = [0.5, 0.30, 0.24]
    times["grouped_mm"] = [0.5, 0.32, 0.22, 0.18]  # one slow timed call, then close, then DROP ahead
    times["padded_bmm"] = [0.5, 0.45]  # 1.5x the leader after the first timed round
    timer = SequenceTimer(times)
    tuner = tuning.Tuner(None, timer=timer, reps=5, budget_s=1e9)
    assert tuning.PRUNE * 0.5 > slow > tuning.DROP * 0.32  # the others are timed once, then dropped
    assert tuner.choose(args) == "grouped_mm"
    n = len(names)
    assert timer.calls[:n] == names  # warm-ups
    assert timer.calls[n:2 * n] == names  # round 1: everyone was within PRUNE
    assert timer.calls[2 * n:] == ["grouped_mm", "per_expert", "per_expert", "grouped_mm"]  # rounds 2, 3
    us = tuner.table[tuner.last_key]["us"]
    assert us["grouped_mm"] == 0.18e6 and us["per_expert"] == 0.24e6 and us["padded_bmm"] == 0.45e6


def test_a_key_with_one_candidate_is_not_timed(tmp_path):
    timer = FakeTimer({n: 1.0 for n in strategies.STRATEGIES})
    tuner = tuning.Tuner(tmp_path, timer=timer)
    ran = []
    assert tuner.choose_among("k", {"per_expert": lambda: ran.append(1)}) == "per_expert"
    assert timer.calls == [] and ran == [] and tuner.table["k"] == {"strategy": "per_expert", "us": {}}
    assert tuner.tuning_seconds == 0 and not (tuner.path and tuner.path.exists())  # nothing written


def test_a_checked_key_is_answered_without_building_the_candidates(monkeypatch):
    """Once a key's entry was checked against its candidates, later calls of that key read the table
    without building the candidate list (per decode call, that list was a noticeable cost); a
    thread-count change checks again."""
    tuner = tuning.Tuner(None, timer=FakeTimer({**{n: 1.0 for n in strategies.STRATEGIES}, "padded_bmm": 0.1}))
    built, real = [], strategies.candidates
    monkeypatch.setattr(strategies, "candidates", lambda *a: built.append(1) or real(*a))
    assert tuner.choose(_args(T=6)) == "padded_bmm" and len(built) == 1
    assert tuner.choose(_args(T=6)) == "padded_bmm" and tuner.choose(_args(T=5)) == "padded_bmm"  # one bucket
    assert len(built) == 1
    tuner.table[tuner.last_key] = {"strategy": "grouped_mm", "us": {}}  # the table stays what answers
    assert tuner.choose(_args(T=6)) == "grouped_mm" and len(built) == 1
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    tuner.choose(_args(T=6))
    assert len(built) == 2


def test_tuner_keys_by_token_bucket(tmp_path):
    tuner = tuning.Tuner(None, timer=FakeTimer({n: 1.0 for n in strategies.STRATEGIES}))
    tuner.choose(_args(T=3))
    tuner.choose(_args(T=4))  # same power-of-two bucket as 3
    tuner.choose(_args(T=40))
    assert len(tuner.table) == 2 and sorted(k.rsplit("T<=", 1)[1] for k in tuner.table) == ["4", "64"]
    assert "decode" not in tuner.table[tuning.problem_key(_args(T=40), None)]["us"]  # too many tokens


def test_table_belongs_to_its_thread_count(tmp_path):
    """A table measured at 2 threads is not read at 1 thread: neither by a fresh tuner nor by the one
    that measured it once the thread count changes (and going back reads the 2-thread table again)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tuner = tuning.Tuner(tmp_path, timer=FakeTimer({**{n: 1.0 for n in strategies.STRATEGIES}, "padded_bmm": 0.1}))
        assert tuner.choose(_args()) == "padded_bmm"
        torch.set_num_threads(1)
        timer1 = FakeTimer({n: 1.0 for n in strategies.STRATEGIES})
        assert tuning.Tuner(tmp_path, timer=timer1).choose(_args()) == "per_expert" and timer1.calls
        tuner.timer = timer1
        assert tuner.choose(_args()) == "per_expert" and tuner.identity["threads"] == 1
        assert len(list(tmp_path.glob("cpu-experts-*.json"))) == 2
        torch.set_num_threads(2)
        assert tuner.choose(_args()) == "padded_bmm"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 1, "identity": {"device": "other"},
                                                                 "entries": {}}),
                                     "[1, 2]", json.dumps({"version": 1, "identity": None, "entries": []})])
def test_corrupt_or_foreign_table_is_rebuilt_with_a_warning(content, tmp_path):
    path = tuning.Tuner(tmp_path).path
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="unreadable.*rebuilt"):
        tuner = tuning.Tuner(tmp_path, timer=FakeTimer({n: 1.0 for n in strategies.STRATEGIES}))
    assert tuner.choose(_args()) == "per_expert"  # ties go to the first candidate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.Tuner(tmp_path).choices() == tuner.choices()  # the rebuilt file reads cleanly
    assert not list(tmp_path.glob("*tmp*"))  # no staging file left (fileio names them .<name>.<random>.tmp.json)


def test_a_table_that_cannot_be_written_warns_once_and_keeps_the_choice(tmp_path):
    """The table is a cache: where its folder cannot be written (under a regular file here, as tests may run
    as root), the first save warns once, naming the file and how to move it, and every call still runs
    with the measured choice, kept in memory."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    timer = FakeTimer({**{n: 1.0 for n in strategies.STRATEGIES}, "padded_bmm": 0.1})
    tuner = tuning.Tuner(blocker / "tuned", timer=timer, budget_s=1e9)
    with pytest.warns(RuntimeWarning, match="not_a_folder/tuned/cpu-experts-.*could not write.*kept in memory.*"
                                            "enable_tuning.*XDG_CACHE_HOME"):
        assert tuner.choose(_args(T=6)) == "padded_bmm"
    calls = len(timer.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert tuner.choose(_args(T=6)) == "padded_bmm" and len(timer.calls) == calls  # kept: not measured again
        assert tuner.choose(_args(T=40)) in strategies.STRATEGIES  # a new key: measured, no second warning
    assert len(tuner.table) == 2


def test_hand_edited_entries_are_ignored_with_a_warning(tmp_path):
    """An entry without its times, with times that are not numbers, or not an object at all is treated as
    absent (measured again), with a warning naming the file and the key; the good entries are kept."""
    timer = FakeTimer({n: 1.0 for n in strategies.STRATEGIES})
    tuner = tuning.Tuner(tmp_path, timer=timer)
    keys = []
    for T in (1, 3, 40):
        tuner.choose(_args(T=T))
        keys.append(tuner.last_key)
    raw = json.loads(tuner.path.read_text())
    raw["entries"][keys[0]] = {"strategy": "per_expert"}
    raw["entries"][keys[1]] = {"strategy": "per_expert", "us": "fast"}
    raw["entries"]["x"] = "per_expert"
    tuner.path.write_text(json.dumps(raw))
    with pytest.warns(RuntimeWarning, match="entries.*T<=1.*no \"us\".*T<=4.*'x' is not an object.*ignored"):
        again = tuning.Tuner(tmp_path, timer=timer)
    assert set(again.table) == {keys[2]}
    assert again.choose(_args(T=1)) == "per_expert" and again.tuned_now == [keys[0]]  # measured again


def test_tuners_sharing_a_table_keep_each_others_entries(tmp_path):
    """Two processes (here two tuners) that read the table before either wrote: each save adds to the
    file instead of replacing it with the writer's own entries, and the file stays readable."""
    def fns():
        return {"per_expert": lambda: None, "grouped_mm": lambda: None}

    a = tuning.Tuner(tmp_path, timer=lambda fn: 1.0)
    b = tuning.Tuner(tmp_path, timer=lambda fn: 1.0)
    a.choose_among("keyA", fns())
    b.choose_among("keyB", fns())
    a.choose_among("keyC", fns())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(tuning.Tuner(tmp_path).table) == ["keyA", "keyB", "keyC"]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".json"] == [a.path.name]


def test_processes_saving_one_table_at_once_lose_no_entry(tmp_path):
    """Processes that save to one table at the same moment: the re-read and the write of each save happen
    under the lock, so every key of every process ends up in the file."""
    import subprocess
    import sys
    import time

    # (the processes use this one's torch threads: a table is kept per thread count)
    code = (f"import sys, time, torch; torch.set_num_threads({torch.get_num_threads()}); from moegraph import tuning; "
            "t = tuning.Tuner(sys.argv[1], timer=lambda fn: 1.0); "
            "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
            "for i in range(25): t.choose_among(f'{sys.argv[2]}{i}', {'per_expert': None, 'grouped_mm': None})")
    start = time.time() + 6  # both have imported torch by then
    root = Path(__file__).parents[1]  # (the repository's moegraph, first on the path)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name, str(start)], cwd=root,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert len(tuning.Tuner(tmp_path).table) == 50


def test_float64_layers_run_under_the_tuner_in_every_mode(tmp_path):
    """torch._grouped_mm multiplies float32 / bfloat16 / float16 only (on some CPUs it refuses float64, on others it
    falls back): grouped GEMMs are no candidate for float64, whatever the timer would say of them."""
    x, w = torch.randn(8, D, dtype=torch.float64), torch.randn(E, 2 * F_, D, dtype=torch.float64)
    assert not strategies.grouped_mm_fits(x, w) and "grouped_mm" not in strategies.candidates(x, w)
    assert strategies.grouped_mm_fits(x.float(), w.float())
    timer = FakeTimer({**{n: 1.0 for n in strategies.STRATEGIES}, "grouped_mm": 0.01})
    tuning.enable_tuning(tmp_path / "tuned", timer=timer)
    try:
        layer = _layer("auto", torch.float64, tmp_path=tmp_path)
        ref = reference_forward(SPEC, _float_copy(layer, tmp_path=tmp_path), x.float())  # float32 reference
        xg = x.clone().requires_grad_(True)
        y = layer.train()(xg)
        y.sum().backward()
        assert y.dtype == torch.float64 and xg.grad is not None and torch.isfinite(xg.grad).all()
        torch.testing.assert_close(y.float(), ref, **TOL[torch.float32])
        with torch.no_grad():
            torch.testing.assert_close(layer.eval()(x).float(), ref, **TOL[torch.float32])
    finally:
        tuning.disable_tuning()


def test_layer_uses_the_active_tuner_and_pin_overrides_it(tmp_path):
    timer = FakeTimer({**{n: 1.0 for n in strategies.STRATEGIES}, "grouped_mm": 0.01})
    tuner = tuning.enable_tuning(tmp_path / "tuned", timer=timer)
    try:
        layer = _layer("auto", tmp_path=tmp_path).eval()
        with torch.no_grad():
            layer(torch.randn(5, D))
        assert list(tuner.choices().values()) == ["grouped_mm"]
        pinned_layer = _layer("decode", tmp_path=tmp_path).eval()
        calls = len(timer.calls)
        with torch.no_grad():
            pinned_layer(torch.randn(700, D))  # a new bucket, but pinned: nothing is timed
        assert len(timer.calls) == calls
    finally:
        tuning.disable_tuning()


def test_tune_command_writes_the_table_and_reports_choices(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec_file = tmp_path / "s.json"
    spec_file.write_text(json.dumps(SPEC))
    r = run_cli("tune", spec_file, "-t", "2", "-t", "30", "--dtype", "float32", "--budget", "0.05")
    assert r.code == 0, r.err
    tables = list((tmp_path / "moegraph" / "tuned").glob("cpu-experts-*.json"))
    assert len(tables) == 1
    entries = json.loads(tables[0].read_text())["entries"]
    assert sorted(k.rsplit("T<=", 1)[1] for k in entries) == ["2", "32"]
    for e in entries.values():
        assert e["strategy"] in r.out and e["strategy"] == min(e["us"], key=e["us"].get)
    r2 = run_cli("tune", spec_file, "-t", "2", "--dtype", "float32")  # second run: read from the table
    assert r2.code == 0 and "no (table)" in r2.out
    raw = json.loads(tables[0].read_text())  # hand-edited: an entry without its times is measured again
    raw["entries"] = {k: {"strategy": v["strategy"]} for k, v in raw["entries"].items()}
    tables[0].write_text(json.dumps(raw))
    r2 = run_cli("tune", spec_file, "-t", "2", "--dtype", "float32")
    assert r2.code == 0 and "yes" in r2.out and "no (table)" not in r2.out, r2.err
    assert r2.err.count("warning:") == 1 and tables[0].name in r2.err.replace("\n", "") and "T<=2" in r2.err
    r3 = run_cli("tune", spec_file, "-t", "8", "--dtype", "float32", "--train")  # 24 rows: grouped fits
    assert r3.code == 0, r3.err
    assert "backward" in r3.out and "(only candidate)" in r3.out and "grouped_mm" in r3.out
    bad = run_cli("tune", spec_file, "--dtype", "float8")
    assert bad.code == 2 and "float32 or bfloat16" in bad.err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_per_expert_and_grouped_training_forms_are_the_same_gemms(bias, dtype, tmp_path):
    """On a CPU, torch._grouped_mm is one mm per group: the per-expert training forward and backward
    give the grouped forms' results bit for bit (why ``strategies.gemm_form`` times only one of them).
    Should a torch version bring a real grouped kernel, this fails and the rule needs revisiting."""
    spec = {"name": "bwd", "moe": {
        "hidden_size": D, "experts": {"num_experts": E, "intermediate_size": F_, "activation": "swiglu",
                                      "bias": bias}, "router": {"top_k": 2}}}
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(2)).to(dtype)  # 16 rows: grouped fits
    out = {}
    for name in ("per_expert", "grouped_mm"):
        layer = _layer(name, dtype=dtype, spec=spec, tmp_path=tmp_path).train()
        xs = x.clone().requires_grad_(True)
        y = layer(xs)
        y.float().square().sum().backward()
        out[name] = [y, xs.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    assert len(out["grouped_mm"]) == len(out["per_expert"]) >= 5
    for a, b in zip(*out.values()):
        assert torch.equal(a, b)


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``addr`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="the kernel has no transparent huge pages to advise")
def test_weight_gradients_are_advised_onto_huge_pages(monkeypatch, tmp_path):
    """ops.empty_huge marks a large buffer's pages for huge pages ("hg" in its mapping's flags), and
    the backward's weight gradients, made that way, still match the reference in both GEMM forms."""
    big = ops.empty_huge((3, 1 << 20, 3), torch.float32, torch.device("cpu"))
    assert big.shape == (3, 1 << 20, 3) and big.dtype == torch.float32
    assert "hg" in _vm_flags(big.data_ptr() + big.numel() * 2)
    from moegraph.ops import workspace

    advised = []
    real = workspace.empty_huge
    monkeypatch.setattr(workspace, "HUGE_PAGE_MIN_BYTES", 0)  # advise the small test buffers too
    monkeypatch.setattr(ops, "empty_huge", lambda *a: advised.append(a[0]) or real(*a))
    for name in ("grouped_mm", "per_expert"):
        layer = _layer(name, tmp_path=tmp_path).train()
        ref_layer = _float_copy(layer, tmp_path=tmp_path)
        x = torch.randn(8, D, generator=torch.Generator().manual_seed(4))
        advised.clear()
        layer(x).square().sum().backward()
        reference_forward(SPEC, ref_layer, x).square().sum().backward()
        assert sorted(advised) == [(E, D, F_), (E, 2 * F_, D)]  # gw_down and gw_up
        for (pname, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=f"{name} {pname}")


def test_the_backward_runs_its_one_gemm_form_untimed(monkeypatch, tmp_path):
    """The backward has one form worth running (grouped where its strides fit, per-expert where
    not): the tuner records it without timing anything, and the gradients match the reference."""
    spec = {"name": "bwd", "moe": {
        "hidden_size": D, "experts": {"num_experts": E, "intermediate_size": F_, "activation": "swiglu"},
        "router": {"top_k": 2}}}
    ran = []
    for name in list(strategies.BACKWARD_STRATEGIES):
        fn = strategies.BACKWARD_STRATEGIES[name]
        monkeypatch.setitem(strategies.BACKWARD_STRATEGIES, name, lambda b, g, n=name, f=fn: ran.append(n) or f(b, g))
    timer = FakeTimer({n: 1.0 for n in strategies.STRATEGIES})
    tuner = tuning.enable_tuning(None, timer=timer)
    try:
        for T, form in ((8, "grouped_mm"), (7, "per_expert")):  # 16 rows fit the grouped strides, 14 do not
            layer = _layer("auto", spec=spec, tmp_path=tmp_path).train()
            ref_layer = _float_copy(layer, spec=spec, tmp_path=tmp_path)
            x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
            xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ran.clear()
            layer(xs).square().sum().backward()
            reference_forward(spec, ref_layer, xr).square().sum().backward()
            assert ran == [form] and tuner.table[tuner.last_key] == {"strategy": form, "us": {}}
            assert tuner.last_key.startswith("bwd,")
            torch.testing.assert_close(xs.grad, xr.grad, **TOL[torch.float32])
            for (pname, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
                if q.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=pname)
        assert timer.calls == []  # float32 at D=16: neither the training forward nor the backward is timed
    finally:
        tuning.disable_tuning()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_command_reports_machine_and_strategy(dtype, run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec_file = tmp_path / "s.json"
    spec_file.write_text(json.dumps(SPEC))
    r = run_cli("bench", spec_file, "--no-hf", "-t", "3", "--rounds", "1", "--dtype", dtype, "--strategy", "padded_bmm")
    assert r.code == 0, r.err
    assert tuning.cpu_model() in r.out and dtype in r.out and "padded_bmm" in r.out
    r = run_cli("bench", spec_file, "--no-hf", "-t", "2", "--rounds", "1", "--train")
    assert r.code == 0, r.err
    assert "training step" in r.out
    assert any(s in r.out for s in strategies.STRATEGIES)  # the tuned choice is named


def _bundled_presets() -> list[str]:
    from moegraph.loader import presets

    return sorted(presets())


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One $XDG_CACHE_HOME for the bench runs (the native kernels built once, not once per preset)."""
    return tmp_path_factory.mktemp("xdg")


@pytest.mark.parametrize("preset", _bundled_presets())
def test_bench_command_runs_on_every_bundled_preset(preset, bench_cache, run_cli, monkeypatch, tmp_path):
    """`moegraph bench PRESET` at its quickest (one size, one round, no HF) on every preset in specs/: gated
    or not (switch, expert choice), FP8 weights, hash routing (the command makes up token ids). On a machine
    of 1 GiB (so the test costs the same everywhere) a full-size preset is refused in one line; the same
    preset scaled down to a few MB (its router, activation, shared experts and format kept) then runs."""
    import yaml
    from moegraph.loader import presets

    monkeypatch.setenv("XDG_CACHE_HOME", str(bench_cache))
    monkeypatch.setattr("moegraph.limits.available_memory", lambda *a, **k: 1 << 30)
    args = ("--no-hf", "-t", "1", "--rounds", "1")
    r = run_cli("bench", preset, *args)
    if not preset.endswith("-tiny"):
        assert r.code == 2 and "more than the memory available" in r.err and "Traceback" not in r.err, r.err
        raw = yaml.safe_load(presets()[preset].read_text())
        moe = raw["moe"]
        moe["hidden_size"] = 128
        moe["experts"].update(num_experts=min(moe["experts"]["num_experts"], 128), intermediate_size=128)
        if "intermediate_size" in moe.get("shared_experts", {}):
            moe["shared_experts"]["intermediate_size"] = 128
        spec_file = tmp_path / f"{preset}-scaled.json"
        spec_file.write_text(json.dumps(raw))
        r = run_cli("bench", spec_file, *args)
    assert r.code == 0, r.err
    row = next(line for line in r.out.splitlines() if line.split("│")[1:2] == [" " * 6 + "1 "])
    assert any(name in row for name in strategies.STRATEGIES), r.out


def test_bench_memory_refusal_names_the_command_options(run_cli, monkeypatch):
    """`moegraph bench` on a layer too big for the machine says what to change in its own options (--dtype,
    --no-hf, a -tiny preset), before building anything; compile's own refusal named Python's dtype= and plan=."""
    monkeypatch.setattr("moegraph.limits.available_memory", lambda *a, **k: 1 << 30)
    r = run_cli("bench", "deepseek-v3", "-t", "1", "--rounds", "1")
    err = " ".join(r.err.split())
    assert r.code == 2 and "Traceback" not in err and "benchmarking spec 'deepseek-v3'" in err, err
    assert "more than the memory available (1.0 GiB)" in err and "two float32 copies for the Hugging Face" in err
    assert "the preset deepseek-v3-tiny" in err and "--dtype bfloat16" in err and "--no-hf" in err
    assert "dtype=" not in err and "plan=" not in err
    # Only the options that would help: bfloat16 and no HF copies already chosen leave the smaller spec.
    r = run_cli("bench", "deepseek-v3", "--no-hf", "--dtype", "bfloat16", "-t", "1", "--rounds", "1")
    err = " ".join(r.err.split())
    assert r.code == 2 and "(bfloat16 weights)" in err
    assert "use a smaller spec (e.g. the preset deepseek-v3-tiny)" in err
    assert "--dtype" not in err and "--no-hf" not in err and "dtype=" not in err, err


def test_tune_memory_refusal_names_the_command_options(run_cli, monkeypatch, tmp_path):
    """`moegraph tune` refuses the same way, sized by the widest --dtype asked for, with its own options."""
    monkeypatch.setattr("moegraph.limits.available_memory", lambda *a, **k: 1 << 30)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = run_cli("tune", "deepseek-v3", "-t", "1", "--dtype", "bfloat16", "--dtype", "float32")
    err = " ".join(r.err.split())
    assert r.code == 2 and "Traceback" not in err and "tuning spec 'deepseek-v3' (float32 weights)" in err, err
    assert "the preset deepseek-v3-tiny" in err and "--dtype bfloat16" in err
    assert "dtype=" not in err and "plan=" not in err and "--no-hf" not in err
    assert not list(tmp_path.rglob("*.json"))  # refused before tuning anything


def test_bench_reports_the_strategy_that_ran_where_a_pin_falls_back(run_cli, monkeypatch, tmp_path):
    """A pin that does not run here (native_bf16 in float32 runs per_expert) is reported with the strategy
    that ran in its place; one that runs is reported as it is."""
    from moegraph.bench import _strategy_used

    fallback, runs = _layer("native_bf16", tmp_path=tmp_path).eval(), _layer("padded_bmm", tmp_path=tmp_path).eval()
    with torch.inference_mode():
        assert _strategy_used(fallback, torch.randn(1, 3, D)) == "per_expert (pinned native_bf16 fell back)"
        assert _strategy_used(runs, torch.randn(1, 3, D)) == "padded_bmm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec_file = tmp_path / "s.json"
    spec_file.write_text(json.dumps(SPEC))
    r = run_cli("bench", spec_file, "--no-hf", "-t", "3", "--rounds", "1", "--strategy", "native_bf16")
    assert r.code == 0, r.err
    row = next(line for line in r.out.splitlines() if line.split("│")[1:2] == [" " * 6 + "3 "])
    assert "per_expert" in row and "native_bf16" in r.out and "fell back" in r.out, r.out


def test_bfloat16_strategies_differ_by_about_a_rounding_step_and_the_readme_says_so():
    """What the README says of the strategies' numerics: not "the same result" but, in bfloat16, up to about
    one bfloat16 rounding step of the output apart (per_expert and grouped_mm bit for bit alike on a CPU),
    and a pin (or disable_tuning) for bit-reproducible runs, since a process tunes by timing."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "strategies with the same result" not in readme
    assert "rounding step" in readme and "bit-reproducible" in readme
    assert 'expert_strategy="per_expert"' in readme and "disable_tuning()" in readme
    g = torch.Generator().manual_seed(1)
    T, E_, Dm, F = 8, 16, 256, 128
    x = torch.randn(T, Dm, generator=g).bfloat16()
    tok = torch.arange(T).repeat_interleave(6)
    exp = torch.stack([torch.randperm(E_, generator=g)[:6] for _ in range(T)]).reshape(-1)
    w_up = (torch.randn(E_, 2 * F, Dm, generator=g) / Dm ** 0.5).bfloat16()
    w_down = (torch.randn(E_, Dm, F, generator=g) / F ** 0.5).bfloat16()
    s_up = (torch.randn(2 * F, Dm, generator=g) / Dm ** 0.5).bfloat16()
    s_down = (torch.randn(Dm, F, generator=g) / F ** 0.5).bfloat16()
    args = ops.ExpertArgs(x, tok, exp, torch.rand(T * 6, generator=g), w_up, w_down, None, None, "swiglu", True,
                          None, None, s_up, s_down)
    out = {n: strategies.run_strategy(n, args) for n in strategies.STRATEGIES}
    assert torch.equal(out["per_expert"], out["grouped_mm"])
    top = out["per_expert"].float().abs().max().item()
    step = 2.0 ** (math.floor(math.log2(top)) - 7)  # one bfloat16 rounding step at the output's largest value
    for n, y in out.items():
        assert (y.float() - out["per_expert"].float()).abs().max().item() <= 2 * step, n


def test_training_forward_is_decided_among_the_training_forms(monkeypatch, tmp_path):
    """A call whose backward will run is decided among the training forms under its own key (not the
    inference forms' winner): in float32 that is the one GEMM form, grouped (not timed); it runs that
    form, and its output and gradients match the reference."""
    forms = []
    real = strategies._train_forward
    monkeypatch.setattr(strategies, "_train_forward", lambda a, grouped: forms.append(grouped) or real(a, grouped))
    # The inference forms' table says padded_bmm; the training forms have one candidate.
    timer = FakeTimer({**{n: 1.0 for n in strategies.STRATEGIES}, "padded_bmm": 0.01})
    tuner = tuning.enable_tuning(None, timer=timer)
    try:
        layer = _layer("auto", tmp_path=tmp_path).train()
        ref_layer = _float_copy(layer, tmp_path=tmp_path)
        x = torch.randn(16, D, generator=torch.Generator().manual_seed(5))
        xr, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yr = reference_forward(SPEC, ref_layer, xr)
        forms.clear()
        ys = layer(xs)
        train_keys = [k for k in tuner.table if k.startswith("train,")]
        assert len(train_keys) == 1 and tuner.table[train_keys[0]] == {"strategy": "grouped_mm", "us": {}}
        assert not [k for k in tuner.table if not k.startswith(("train,", "bwd,"))]  # no inference form timed
        assert forms[-1] is True and timer.calls == []  # the call itself ran the grouped form, untimed
        torch.testing.assert_close(ys, yr, **TOL[torch.float32])
        yr.square().sum().backward()
        ys.square().sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, **TOL[torch.float32])
        for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float32], msg=name)
        # Inference calls of the same layer are tuned under the inference key, among the inference forms.
        with torch.no_grad():
            layer.eval()(x)
        assert [v for k, v in tuner.choices().items() if not k.startswith(("train,", "bwd,"))] == ["padded_bmm"]
    finally:
        tuning.disable_tuning()


def _loop_expected(x, tok, exp, wgt, w_up, w_down, b_up, b_down, activation, s_up, s_down, s_scale):
    """The op's result by reference_moe's per-token expert loop, in float32."""
    from reference_moe import expert

    x, w_up, w_down = x.float(), w_up.float(), w_down.float()
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        if s_up is not None:
            y[t] += expert(x[t], s_up.float(), s_down.float(), None, None, activation) * float(s_scale[t])
    for i in range(len(exp)):
        e = int(exp[i])
        if 0 <= e < w_up.shape[0]:
            t = int(tok[i])
            y[t] += float(wgt[i]) * expert(x[t], w_up[e], w_down[e], None if b_up is None else b_up[e].float(),
                                           None if b_down is None else b_down[e].float(), activation)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("strategy", list(strategies.STRATEGIES))
def test_strategies_on_uneven_loads_empty_and_dropped(strategy, packed, dtype):
    """Every strategy on one call whose experts get 0, 1 and many rows (with biases, dropped ids and a
    scaled shared expert), on oneDNN-packed weights where this CPU has them, and on calls with no
    assignments or only dropped ones: against reference_moe's loop."""
    g = torch.Generator().manual_seed(11)
    T, E_ = 7, 6
    x = torch.randn(T, D, generator=g).to(dtype)
    w_up = (torch.randn(E_, 2 * F_, D, generator=g) / 4).to(dtype)
    w_down = (torch.randn(E_, D, F_, generator=g) / 3).to(dtype)
    b_up, b_down = torch.randn(E_, 2 * F_, generator=g).to(dtype), torch.randn(E_, D, generator=g).to(dtype)
    s_up, s_down = (torch.randn(2 * F_, D, generator=g) / 4).to(dtype), (torch.randn(D, F_, generator=g) / 3).to(dtype)
    s_scale = torch.rand(T, generator=g).to(dtype)
    # expert 0: none; 1: one row; 2: five rows; 3: two; 4: one; 5: none; -1 and 6: dropped
    exp = torch.tensor([2, 1, 2, 3, 2, -1, 2, 4, 3, 6, 2])
    tok = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 6, 6, 6])
    wgt = torch.rand(len(exp), generator=g)
    calls = [(tok, exp, wgt), (tok[:0], exp[:0], wgt[:0]), (tok[5:10:4], exp[5:10:4], wgt[5:10:4])]
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    pk = ops.packed_experts(w_up, w_down, s_up, s_down) if packed else None
    if packed and pk is None:
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    for tok_N, exp_N, wgt_N in calls:
        args = ops.ExpertArgs(x, tok_N, exp_N, wgt_N, w_up, w_down, b_up, b_down, "swiglu", True, None, None,
                              s_up, s_down, s_scale)
        with torch.no_grad():
            y = strategies.run_strategy(strategy, args, pk)
        want = _loop_expected(x, tok_N, exp_N, wgt_N, w_up, w_down, b_up, b_down, "swiglu", s_up, s_down, s_scale)
        assert y.dtype == dtype and y.shape == x.shape
        torch.testing.assert_close(y.float(), want, **tol, msg=f"{strategy}, {len(exp_N)} assignments")
