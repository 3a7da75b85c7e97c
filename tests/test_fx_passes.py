"""FX passes, tested in torch.fx's style: module, pass, compare outputs before and after."""

from __future__ import annotations

import pytest
import torch

import moegraph
from moegraph import fx_passes


def _layer(spec_name, seed=0):
    layer = moegraph.compile(spec_name, dtype=torch.float32, seed=seed)
    return layer


def _count(gm, pred):
    return sum(1 for n in gm.graph.nodes if pred(n))


def test_trace_is_one_clean_graph():
    layer = _layer("deepseek-v3-tiny")
    gm = fx_passes.trace_core(layer, training=True)
    assert _count(gm, fx_passes._is_expert_op) == 1
    gm.graph.lint()


def test_drop_training_outputs():
    layer = _layer("switch-tiny")
    gm = fx_passes.trace_core(layer, training=False)
    x = torch.randn(2, 6, layer.HIDDEN)
    y0, aux0, ids0 = gm(x)
    assert set(aux0) == {"expert_balance", "z_loss"}
    before = len(gm.graph.nodes)
    res = fx_passes.DropTrainingOutputs()(gm)
    assert res.modified
    y1, aux1, ids1 = res.graph_module(x)
    assert aux1 == {} and len(res.graph_module.graph.nodes) < before
    torch.testing.assert_close(y1, y0)
    assert torch.equal(ids1, ids0)
    assert not any("z_loss" in str(n.target) for n in res.graph_module.graph.nodes)
    assert not fx_passes.DropTrainingOutputs()(res.graph_module).modified  # idempotent


def test_fold_shared_experts():
    for name in ("deepseek-v3-tiny", "qwen2-moe-tiny"):
        layer = _layer(name)
        gm = fx_passes.trace_core(layer, training=False)
        x = torch.randn(3, 5, layer.HIDDEN)
        y0 = gm(x)[0]
        res = fx_passes.FoldSharedExperts()(gm)
        assert res.modified, name
        g = res.graph_module
        assert _count(g, lambda n: n.target is moegraph.runtime.shared_mlp) == 0
        (op,) = [n for n in g.graph.nodes if fx_passes._is_expert_op(n)]
        assert op.args[12] is not None  # shared weights now inside the expert op
        torch.testing.assert_close(g(x)[0], y0, rtol=1e-5, atol=1e-6)


def test_fold_shared_experts_gradients():
    layer = _layer("deepseek-v3-tiny")
    x = torch.randn(7, layer.HIDDEN, requires_grad=True)
    plain = fx_passes.trace_core(layer, training=True)
    folded = fx_passes.FoldSharedExperts()(fx_passes.trace_core(layer, training=True)).graph_module
    g = torch.randn(1, 7, layer.HIDDEN)
    params = list(layer.parameters())
    a = torch.autograd.grad(plain(x.unsqueeze(0))[0], [x, *params], g, allow_unused=True)
    b = torch.autograd.grad(folded(x.unsqueeze(0))[0], [x, *params], g, allow_unused=True)
    for u, v in zip(a, b):
        if u is None:
            assert v is None
        else:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_fold_is_a_no_op_without_shared_experts():
    layer = _layer("mixtral-tiny")
    res = fx_passes.FoldSharedExperts()(fx_passes.trace_core(layer, training=False))
    assert not res.modified


def test_layer_reports_applied_passes():
    layer = _layer("deepseek-v3-tiny").eval()
    layer(torch.randn(2, layer.HIDDEN))
    rep = layer.pass_report["eval"]
    assert rep.applied == ["DropTrainingOutputs", "FoldSharedExperts", "UsePrepackedExperts", "FuseRouterSelect"]
    assert rep.nodes_after < rep.nodes_before


def test_use_prepacked_experts_same_result():
    layer = _layer("deepseek-v3-tiny")
    gm = fx_passes.FoldSharedExperts()(fx_passes.trace_core(layer, training=False)).graph_module
    x = torch.randn(1, 40, layer.HIDDEN)
    y0 = gm(x)[0]
    res = fx_passes.UsePrepackedExperts(True)(gm)
    assert res.modified
    assert any(n.target is torch.ops.moegraph.expert_mlp_packed.default for n in res.graph_module.graph.nodes)
    torch.testing.assert_close(res.graph_module(x)[0], y0, rtol=1e-5, atol=1e-5)
    assert not fx_passes.UsePrepackedExperts(False)(fx_passes.trace_core(layer, training=False)).modified


def test_prepacked_weights_follow_weight_updates():
    """The packed copy is keyed by the weights' versions: in-place updates are never served stale."""
    a, b = _layer("mixtral-tiny", seed=0).eval(), _layer("mixtral-tiny", seed=1).eval()
    x = torch.randn(30, a.HIDDEN)
    ya = a(x)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    assert (a(x) - ya).abs().max() > 1e-3
    with torch.no_grad():
        a.experts.down_proj.mul_(2)
    torch.testing.assert_close(a(x), 2 * b(x), rtol=1e-5, atol=1e-5)


def test_eval_graph_still_differentiable():
    layer = _layer("deepseek-v3-tiny").eval()
    x = torch.randn(5, layer.HIDDEN, requires_grad=True)
    g = torch.autograd.grad(layer(x).sum(), x)[0]
    gt = torch.autograd.grad(layer.train()(x).sum(), x)[0]
    torch.testing.assert_close(g, gt, rtol=1e-5, atol=1e-5)


def test_pipeline_names_a_failing_pass_and_reports_the_rest():
    from torch.fx.passes.infra.pass_base import PassBase

    from moegraph.errors import CodegenError

    class Broken(PassBase):
        def call(self, gm):
            raise ValueError("boom")

    # The graph is built as the layer is made (torch.compile cannot build it later), so compile names the pass.
    with pytest.raises(CodegenError, match="Broken.*boom"):
        moegraph.compile("mixtral-tiny", passes=[fx_passes.FoldSharedExperts(), Broken()])
    layer = moegraph.compile("mixtral-tiny")
    gm, rep = fx_passes.Pipeline([fx_passes.FoldSharedExperts()]).build(layer, training=True)
    assert rep.skipped == ["FoldSharedExperts"] and rep.applied == []


def test_invalidate_graphs_makes_the_next_forward_rebuild():
    layer = _layer("qwen2-moe-tiny").eval()
    x = torch.randn(3, layer.HIDDEN)
    first = layer.graph()
    assert layer.graph() is first
    layer.invalidate_graphs()
    assert layer.graph() is not first
    torch.testing.assert_close(layer(x), first(x.unsqueeze(0))[0].squeeze(0))
