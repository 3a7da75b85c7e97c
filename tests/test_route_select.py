"""``runtime.route_select`` (the router's expert choice in one call, native kernel on CPU) and the
``FuseRouterSelect`` pass, against the torch steps they replace (``semantics.routing``, and the
unfused graph of each spec): same ids, same scores, same layer output, bit for bit."""

from __future__ import annotations

import pytest
import torch

import moegraph
from moegraph import fx_passes, native, runtime
from moegraph.errors import InputError
from moegraph.semantics.routing import TopKPolicy, select_experts

pytestmark = pytest.mark.skipif(native.router_kernel() is None, reason="no C compiler with OpenMP here")

# (experts, groups, kept groups, group score, top_n, top_k)
POLICIES = [
    (64, 8, 4, "sum_topn", 2, 6),  # DeepSeek-V3
    (64, 8, 3, "max", 2, 6),  # DeepSeek-V2
    (160, 8, 3, "sum_topn", 1, 6),
    (8, 0, 0, "max", 2, 2),  # Mixtral
    (128, 0, 0, "max", 2, 1),  # Switch
    (16, 4, 4, "sum_topn", 2, 16),  # every group kept, every expert chosen
]


def _policy(E, G, KG, gs, tn, K):
    return TopKPolicy(K, num_groups=G, topk_groups=KG, group_score=gs, top_n=tn)


@pytest.mark.parametrize("E,G,KG,gs,tn,K", POLICIES)
@pytest.mark.parametrize("T", [0, 1, 5, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_chooses_as_the_torch_steps(E, G, KG, gs, tn, K, T, with_bias):
    g = torch.Generator().manual_seed(E * 1000 + T)
    scores = torch.sigmoid(torch.randn(T, E, generator=g) * 3)
    bias = torch.randn(E, generator=g) * 0.1 if with_bias else None
    got = native.route_select(scores, bias, K, G, KG, gs, tn)
    assert got is not None  # continuous random scores: no equal values decide anything
    ids, chosen = select_experts(scores, _policy(E, G, KG, gs, tn, K), bias)
    assert torch.equal(got[0], ids) and torch.equal(got[1], chosen)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.float32


def _tied(kind: str, T: int = 9, E: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "all equal":  # a zero-initialised router: every score 0.5
        return torch.full((T, E), 0.5)
    if kind == "quantized":  # few distinct values: ties inside and at the boundary of the choice
        return (torch.rand(T, E, generator=g) * 4).round() / 4
    scores = torch.rand(T, E, generator=g)
    scores[3, 5] = float("nan")
    return scores


@pytest.mark.parametrize("kind", ["all equal", "quantized", "nan"])
@pytest.mark.parametrize("E,G,KG,gs,tn,K", POLICIES[:4])
def test_ties_leave_the_choice_to_torch(kind, E, G, KG, gs, tn, K):
    scores = _tied(kind, E=E)
    assert native.route_select(scores, None, K, G, KG, gs, tn) is None  # the kernel declines the call
    ids, chosen = runtime.route_select(scores, None, K, G, KG, gs, tn)
    ref_ids, ref_chosen = select_experts(scores, _policy(E, G, KG, gs, tn, K))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(chosen, ref_chosen, equal_nan=True, rtol=0, atol=0)


def test_a_tie_outside_the_choice_is_no_tie():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.1, 0.7]])  # equal values only below the top 3 and its boundary
    got = native.route_select(scores, None, 3, 0, 0, "max", 2)
    assert got is not None and got[0].tolist() == [[0, 1, 5]]
    assert native.route_select(scores, None, 4, 0, 0, "max", 2) is None  # the 4th is one of three equal values


def test_other_inputs_run_the_torch_steps():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(6, 64, generator=g, dtype=torch.float64)
    assert native.route_select(scores, None, 6, 8, 4, "sum_topn", 2) is None  # float64: not the kernel's
    assert native.route_select(scores.float(), None, 6, 8, 4, "sum_topn", 3) is None  # a sum of three
    assert native.route_select(scores.float().t().contiguous().t(), None, 6, 8, 4, "max", 2) is None  # strided
    for s, tn in ((scores, 2), (scores.float(), 3)):
        ids, chosen = runtime.route_select(s, None, 6, 8, 4, "sum_topn", tn)
        ref = select_experts(s, _policy(64, 8, 4, "sum_topn", tn, 6))
        assert torch.equal(ids, ref[0]) and torch.equal(chosen, ref[1])


def test_without_the_kernel_the_op_runs_the_torch_steps(monkeypatch):
    scores = torch.rand(4, 64)
    monkeypatch.setattr(native, "router_kernel", lambda: None)
    ids, chosen = runtime.route_select(scores, None, 6, 8, 4, "sum_topn", 2)
    ref = select_experts(scores, _policy(64, 8, 4, "sum_topn", 2, 6))
    assert torch.equal(ids, ref[0]) and torch.equal(chosen, ref[1])


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(InputError, match="top_k 70"):
        native.route_select(torch.rand(2, 64), None, 70, 0, 0, "max", 2)


def test_gradients_run_the_torch_steps():
    """Where the scores need a gradient the torch steps run (differentiable); same choice and scores."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 64, generator=g, requires_grad=True)
    up = torch.randn(5, 6, generator=g)
    ids, chosen = runtime.route_select(torch.sigmoid(logits), None, 6, 8, 4, "sum_topn", 2)
    (grad,) = torch.autograd.grad((chosen * up).sum(), logits)
    ref_ids, ref = select_experts(torch.sigmoid(logits), _policy(64, 8, 4, "sum_topn", 2, 6))
    (ref_grad,) = torch.autograd.grad((ref * up).sum(), logits)
    assert torch.equal(ids, ref_ids) and torch.equal(grad, ref_grad)
    with torch.no_grad():
        ids2, chosen2 = runtime.route_select(torch.sigmoid(logits), None, 6, 8, 4, "sum_topn", 2)
    assert torch.equal(ids2, ids) and torch.equal(chosen2, chosen.detach())


def test_an_eval_layer_with_gradients_matches_the_unfused_one():
    fused = moegraph.compile("deepseek-v3-tiny", dtype=torch.float32, seed=0).eval()
    plain = moegraph.compile("deepseek-v3-tiny", dtype=torch.float32, seed=0, passes=_unfused(fused)).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(1, 9, fused.HIDDEN, generator=torch.Generator().manual_seed(5))
    grads = []
    for layer in (fused, plain):
        xx = x.clone().requires_grad_(True)
        layer(xx).square().sum().backward()
        grads.append((xx.grad, layer.router.weight.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _unfused(layer):
    return [p for p in fx_passes.default_passes(False, layer) if not isinstance(p, fx_passes.FuseRouterSelect)]


@pytest.mark.parametrize("spec", ["deepseek-v3-tiny", "deepseek-v2-lite-tiny", "mixtral-tiny", "qwen2-moe-tiny",
                                  "switch-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_equal_the_unfused_graph(spec, dtype, monkeypatch):
    kernel_calls = []
    real = native.route_select
    monkeypatch.setattr(native, "route_select", lambda *a: kernel_calls.append(real(*a)) or kernel_calls[-1])
    fused = moegraph.compile(spec, dtype=dtype, seed=0).eval()
    plain = moegraph.compile(spec, dtype=dtype, seed=0, passes=_unfused(fused)).eval()
    plain.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for T in (1, 7, 100):
            x = torch.randn(1, T, fused.HIDDEN, generator=g).to(dtype)
            y, _, ids = fused.graph()(x, None)[:3]
            y0, _, ids0 = plain.graph()(x, None)[:3]
            assert torch.equal(ids, ids0) and torch.equal(y, y0), (spec, T)
            assert torch.equal(fused(x), y)
    assert "FuseRouterSelect" in fused.pass_report["eval"].applied
    assert len(kernel_calls) == 6 and all(c is not None for c in kernel_calls)  # the kernel chose, every call
    assert any(n.target is runtime.route_select for n in fused.graph().graph.nodes)
    assert not any(n.target is runtime.route_select for n in plain.graph().graph.nodes)


@pytest.mark.parametrize("top_k,groups", [(2, {"num_groups": 3, "topk_groups": 2}), (7, None)])
def test_identity_and_zero_experts_are_routing_choices_of_the_fused_select(top_k, groups, capfd):
    # The choice is over 6 experts + 2 identity (+ 1 zero) experts: the pass checked its region on 6 columns, which
    # failed with an FX traceback on stderr (index 7 out of bounds, or top_k beyond 6) and left the graph unfused.
    d = {"name": "ident", "moe": {"hidden_size": 16, "experts": {"num_experts": 6, "intermediate_size": 8,
                                                                 "identity_experts": 2, "zero_experts": 1},
                                  "router": {"top_k": top_k, "score": "sigmoid",
                                             **({"groups": groups} if groups else {})}}}
    fused = moegraph.compile(d, dtype=torch.float32, seed=0).eval()
    plain = moegraph.compile(d, dtype=torch.float32, seed=0, passes=_unfused(fused)).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(1, 50, 16, generator=torch.Generator().manual_seed(2))
    capfd.readouterr()
    with torch.inference_mode():
        y, _, ids = fused.graph()(x, None)[:3]
        y0, _, ids0 = plain.graph()(x, None)[:3]
    assert "FuseRouterSelect" in fused.pass_report["eval"].applied and capfd.readouterr().err == ""
    assert torch.equal(ids, ids0) and torch.equal(y, y0) and (ids >= 6).any()


def test_pass_refusals_say_why():
    for spec, why in (("expert-choice-tiny", "not a top-k router"),):
        layer = moegraph.compile(spec, dtype=torch.float32, seed=0)
        p = fx_passes.FuseRouterSelect.of_layer(layer)
        assert not p(fx_passes.trace_core(layer, training=False)).modified
        assert why in p.refused
    spec = moegraph.loader.load_spec("deepseek-v3-tiny").model_dump()
    spec["moe"]["router"]["groups"]["top_n"] = 3
    layer = moegraph.compile(spec, dtype=torch.float32, seed=0).eval()
    p = fx_passes.FuseRouterSelect.of_layer(layer)
    assert not p(fx_passes.trace_core(layer, training=False)).modified
    assert "sum of their top 3" in p.refused
    layer(torch.randn(2, layer.HIDDEN))
    assert "FuseRouterSelect" in layer.pass_report["eval"].skipped


def test_a_region_of_another_policy_is_left_alone():
    """The pass checks the region it swaps: told a different policy than the graph's, it refuses."""
    layer = moegraph.compile("deepseek-v3-tiny", dtype=torch.float32, seed=0)
    p = fx_passes.FuseRouterSelect(TopKPolicy(4, "sigmoid", num_groups=4, topk_groups=3, group_score="sum_topn",
                                              top_n=2), num_experts=16)
    assert not p(fx_passes.trace_core(layer, training=False)).modified
    assert "chooses differently" in p.refused


def test_token_index_cache_serves_inference_and_training():
    ids = torch.zeros(3, 4, dtype=torch.int64)
    with torch.inference_mode():
        a = runtime.token_index(ids, 4)
    assert not a.is_inference()  # usable by autograd later
    assert a.tolist() == torch.arange(3).repeat_interleave(4).tolist()
    b = runtime.token_index(ids, 4)
    assert b is a
    x = torch.randn(3, 2, requires_grad=True)
    x[b].sum().backward()  # indexing saves the index for backward
    assert x.grad.tolist() == [[4.0, 4.0]] * 3
    big = torch.zeros(300, 2, dtype=torch.int64)
    assert runtime.token_index(big, 2).tolist() == torch.arange(300).repeat_interleave(2).tolist()


def test_torch_compile_traces_the_fused_choice_without_breaks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = moegraph.compile("deepseek-v3-tiny", dtype=torch.float32, seed=0).eval()
    x = torch.randn(1, 5, layer.HIDDEN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = layer(x)
        yc = torch.compile(layer, backend="eager", fullgraph=True)(x)
    assert torch.equal(y, yc)
    assert "FuseRouterSelect" in layer.pass_report["eval"].applied
