"""The semantics package: the expression language, its symbolic derivatives, the activation and score
tables, and a new entry reaching every torch backend (the Triton kernels: tests/test_triton.py)."""

from __future__ import annotations

import ast
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

import moegraph
from moegraph import ops, semantics
from moegraph.errors import SpecError
from moegraph.semantics import ACTIVATIONS, SCORE_FUNCTIONS, expr, torch_forms
from moegraph.semantics.activations import Activation
from moegraph.spec import MoESpec

# A clamped SwiGLU variant with a shifted up branch (GPT-OSS's form) and a new score: the entries the
# tests below add, each with a plain torch spelling written here for the references.
NEW_ACT = ("swiglu_oai", "gate * sigmoid(1.702 * gate) * (up + 1)")
NEW_SCORE = ("sqrt_sigmoid", "sqrt(sigmoid(x))")


def new_act_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return g * torch.sigmoid(1.702 * g) * (u + 1)


@pytest.fixture
def new_entries(monkeypatch):
    monkeypatch.setitem(ACTIVATIONS, NEW_ACT[0], Activation(NEW_ACT[0], NEW_ACT[1], gated=True))
    monkeypatch.setitem(SCORE_FUNCTIONS, *NEW_SCORE)


class _ActFn(torch.autograd.Function):
    """The activation with the table's derivative as its backward (what the expert op's backward uses)."""

    @staticmethod
    def forward(ctx, h, act, gate_clamp, up_clamp):
        a, saved = torch_forms.activate_saved(h, act, gate_clamp, up_clamp)
        ctx.saved = saved
        return a

    @staticmethod
    def backward(ctx, ga):
        return torch_forms.activate_backward(ga, ctx.saved), None, None, None


CASES = [(n, False) for n in [*ACTIVATIONS, NEW_ACT[0]]] + [(n, True) for n, a in ACTIVATIONS.items() if a.gated] + [
    (NEW_ACT[0], True)]


@pytest.mark.parametrize("name,clamped", CASES)
def test_symbolic_derivatives_pass_gradcheck(name, clamped, new_entries):
    act = ACTIVATIONS[name]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2
    # Keep finite differences away from the kinks (relu at 0, the clamps).
    h = torch.where(h.abs() < 1e-3, h + 0.01, h)
    gc, uc = (0.9, 1.1) if clamped else (None, None)
    if clamped:
        h = torch.where((h - 0.9).abs() < 1e-3, h + 0.01, h)
        h = torch.where((h.abs() - 1.1).abs() < 1e-3, h + 0.01, h)
    h.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _ActFn.apply(t, act, gc, uc), (h,), eps=1e-6, atol=1e-6, rtol=1e-5)
    # The forward is the expression: against torch's own functions.
    ref = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
           "relu2": lambda t: F.relu(t) ** 2}
    hd = h.detach()
    got = torch_forms.activate(hd, act, None, gc, uc)
    if act.gated:
        gate, up = hd[:, :4], hd[:, 4:]
        if clamped:
            gate, up = gate.clamp(max=gc), up.clamp(-uc, uc)
        want = new_act_reference(gate, up) if name == NEW_ACT[0] else ref[act.elementwise](gate) * up
    else:
        want = ref[act.elementwise](hd)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_derivatives_are_derived_from_the_tree():
    lang = dataclasses.replace(semantics.activations.ACTIVATION_LANGUAGE, probe=())
    d = lambda e, v: ast.unparse(expr.derivative(expr.parse(e, lang), v))  # noqa: E731
    assert d("silu(gate) * up", "up") == "silu(gate)"
    assert d("relu(x) ** 2", "x") == "2.0 * relu(x) * step(x)"
    assert d("x * x + 3 * x", "x") == "x + x + 3.0"
    assert d("exp(2 * x) / x", "x") == "(exp(2 * x) * 2.0 * x - exp(2 * x)) / x ** 2.0"
    assert d("-tanh(x)", "x") == "-(1 - square(tanh(x)))"
    # One program computes the value and both derivatives, silu(gate) once.
    prog = ACTIVATIONS["swiglu"].backward_program
    assert sum(1 for s in prog.steps if s[:2] == ("call", "silu")) == 1
    assert sum(1 for s in prog.steps if s[:2] == ("call", "sigmoid")) == 1
    env = {"gate": 0.7, "up": -1.3}
    a, dg, du = prog.run(env, lambda f, v: expr.FUNCTIONS[f].math(v), lambda o, x, y: eval(f"x {o} y"))
    s = 1 / (1 + math.exp(-0.7))
    assert a == pytest.approx(0.7 * s * -1.3) and du == pytest.approx(0.7 * s)
    assert dg == pytest.approx(-1.3 * s * (1 + 0.7 * (1 - s)))


def test_fast_forms_are_the_tables_expressions():
    assert set(ops.FAST_INPLACE) == {n for n, a in ACTIVATIONS.items() if a.fast}
    g = torch.Generator().manual_seed(2)
    for name in ops.FAST_INPLACE:
        act = ACTIVATIONS[name]
        h = torch.randn(5, 12, generator=g) * 3
        for clamps in ([(None, None), (0.5, 0.8)] if act.gated else [(None, None)]):
            want = torch_forms.activate(h, act, None, *clamps)
            got = ops._activate_(h.clone(), name, act.gated, *clamps)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
            out = torch.empty(5, 6)
            if act.gated:
                ops._activate_(h.clone(), name, True, *clamps, out=out)
                torch.testing.assert_close(out, want, rtol=0, atol=1e-6, msg=name)


def test_register_and_refuse(monkeypatch):
    monkeypatch.setattr(semantics.activations, "ACTIVATIONS", dict(ACTIVATIONS))
    table = semantics.activations.ACTIVATIONS
    entry = semantics.register_activation("mish_glu", "gate * tanh(softplus(gate)) * up")
    assert entry.gated and table["mish_glu"] is entry
    assert semantics.register_activation("mish_glu", "gate * tanh(softplus(gate)) * up") is entry
    with pytest.raises(ValueError, match="already defined"):
        semantics.register_activation("mish_glu", "gate * up")
    with pytest.raises(ValueError, match="mixes 'x'"):
        semantics.register_activation("bad", "x * up")
    with pytest.raises(ValueError, match="unknown name 'os'"):
        semantics.register_activation("bad", "os * gate")
    with pytest.raises(ValueError, match="not finite"):
        semantics.register_activation("bad", "log(x)")
    assert semantics.activation("silu", gated=True).name == "swiglu"  # the op's older calling form
    assert semantics.activation("relu2", gated=False).name == "relu2"


def test_spec_accepts_only_table_entries(new_entries):
    base = moegraph.load_spec("mixtral-tiny").model_dump(mode="json")
    base["moe"]["experts"]["activation"] = NEW_ACT[0]
    base["moe"]["router"]["score"] = NEW_SCORE[0]
    spec = MoESpec.model_validate(base)
    assert spec.moe.experts.gated and NEW_ACT[0] in MoESpec.model_json_schema()["$defs"]["ExpertsSpec"][
        "properties"]["activation"]["anyOf"][0]["enum"]
    base["moe"]["experts"]["activation"] = "swiglu_oa"
    with pytest.raises(SpecError, match="did you mean 'swiglu_oai'"):
        moegraph.load_spec(base)


def _loop_reference(layer, x_TD: torch.Tensor, gc: float, uc: float) -> torch.Tensor:
    """Top-2 of sqrt(sigmoid(logits)), renormalised; the new activation; one token at a time."""
    out = []
    for t in range(x_TD.shape[0]):
        s = torch.sqrt(torch.sigmoid(layer.router.weight @ x_TD[t].to(layer.router.weight.dtype)))
        ids = sorted(range(s.shape[0]), key=lambda e: -float(s[e].detach()))[:2]
        w = torch.stack([s[e] for e in ids])
        w = (w / (w.sum() + 1e-20)).to(x_TD.dtype)
        y = 0
        for e, we in zip(ids, w):
            h = layer.experts.gate_up_proj[e] @ x_TD[t]
            F_ = h.shape[0] // 2
            a = new_act_reference(h[:F_].clamp(max=gc), h[F_:].clamp(-uc, uc))
            y = y + we * (layer.experts.down_proj[e] @ a)
        out.append(y)
    return torch.stack(out)


def test_new_entries_reach_the_generated_torch_layer(new_entries, tmp_path):
    d = moegraph.load_spec("mixtral-tiny").model_dump(mode="json")
    d["name"] = "oai-sqrt-sigmoid"
    d["moe"]["experts"].update(activation=NEW_ACT[0], gate_clamp=0.7, up_clamp=0.9)
    d["moe"]["router"]["score"] = NEW_SCORE[0]
    layer = moegraph.compile(d, out_dir=tmp_path, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 7, 32, generator=g, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    want = _loop_reference(layer, x[0], 0.7, 0.9)
    # A float64 layer routes in float64 too, over all tokens in the layer and one token at a time here.
    torch.testing.assert_close(y[0], want, rtol=1e-6, atol=1e-8)
    # Backward: the op's explicit backward (from the symbolic derivatives) against autograd on the loop.
    params = [x, layer.experts.gate_up_proj, layer.experts.down_proj, layer.router.weight]
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, params, gy)
    ref = torch.autograd.grad(_loop_reference(layer, x[0], 0.7, 0.9), params, gy[0])
    for a, b, n in zip(got, ref, ["x", "gate_up_proj", "down_proj", "router"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    # The torch reference routing follows the same score entry.
    assert "torch.sqrt(torch.sigmoid(logits_TE))" in (tmp_path / next(p.name for p in tmp_path.glob("*.py"))).read_text()


ROUTINGS = {
    "softmax_norm": {"top_k": 2, "score": "softmax", "normalize": True},
    "grouped_sigmoid_bias": {"top_k": 3, "score": "sigmoid", "normalize": True, "scaling_factor": 2.5,
                             "expert_bias": {"update_rate": 0.001},
                             "groups": {"num_groups": 4, "topk_groups": 2, "group_score": "sum_topn", "top_n": 2}},
    "topk_then_softmax_bias": {"top_k": 2, "topk_order": "topk_then_score", "expert_bias": {"update_rate": 0.001}},
    "expression_groups_max": {"top_k": 2, "score": "sqrt(softplus(x)) + 0.5 * tanh(x)",
                              "groups": {"num_groups": 2, "topk_groups": 1, "group_score": "max"}},
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_generated_routing_is_the_reference(name, tmp_path):
    """The generated layer's routing (spelled out per spec) equals semantics.routing for the same policy."""
    from moegraph.semantics.routing import TopKPolicy, route_topk

    spec = {"name": f"route-{name}", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
                                             "router": {"type": "topk", **ROUTINGS[name]}}}
    layer = moegraph.compile(spec, out_dir=tmp_path)
    g = torch.Generator().manual_seed(4)
    bias = getattr(layer.router, "expert_bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.copy_(torch.randn(8, generator=g) * 0.3)
    x = torch.randn(1, 12, 16, generator=g)
    with torch.no_grad():
        y, _, ids = layer.core(x)
        policy = TopKPolicy.of_router(MoESpec.model_validate(spec).moe.router)
        ref_ids, ref_w = route_topk(x[0] @ layer.router.weight.t(), policy, bias)
        T, K = ref_ids.shape
        ref_y = ops.expert_mlp(x[0], torch.arange(T).repeat_interleave(K), ref_ids.reshape(-1), ref_w.reshape(-1),
                               layer.experts.gate_up_proj, layer.experts.down_proj, None, None, "swiglu", True, None,
                               None, None, None, None)
    assert torch.equal(ids[0], ref_ids)
    torch.testing.assert_close(y[0], ref_y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("group_score", ["max", "sum_topn"])
def test_a_group_limit_keeping_every_group_is_no_step_and_routes_the_same(group_score, tmp_path, monkeypatch):
    """topk_groups == num_groups keeps every group, so the generated layer has no group step; its routing and
    output are bit for bit those of the layer that spells the (no-op) masking out."""
    from moegraph import codegen

    spec = {"name": "all-groups", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
            "router": {"type": "topk", "top_k": 3, "score": "sigmoid", "normalize": True,
                       "expert_bias": {"update_rate": 0.001},
                       "groups": {"num_groups": 4, "topk_groups": 4, "group_score": group_score}}}}
    body = codegen.render(moegraph.load_spec(spec)).split("def core", 1)[1]
    assert "keep_TG" not in body and "masked_fill" not in body and "choice_TGX" not in body
    layer = moegraph.compile(spec, out_dir=tmp_path / "elided").eval()
    # The un-optimised path: the same spec generated with its group step spelled out.
    with monkeypatch.context() as m:
        m.setattr(codegen._routing, "limits_groups", lambda groups: groups is not None)
        assert "keep_TG" in codegen.render(moegraph.load_spec(spec))
        masked = moegraph.compile(spec, out_dir=tmp_path / "masked").eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.router.expert_bias.copy_((torch.randn(8, generator=g) * 0.3).round(decimals=1))
        masked.load_state_dict(layer.state_dict())
        x = torch.randn(2, 9, 16, generator=g)
        x[0, :4] = 0.0  # equal scores everywhere: ties decided as before
        y, _, ids = layer.core(x)
        y_ref, _, ids_ref = masked.core(x)
    assert torch.equal(ids, ids_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("extra", [{}, {"scaling_factor": 2.5, "expert_bias": {"update_rate": 0.001}}])
def test_topk_then_softmax_is_not_divided_by_its_sum_again(extra, tmp_path, monkeypatch):
    """topk_then_score's softmax over the chosen logits sums to 1, so normalize emits no division; the weights are
    still those of softmax then divide by the sum (plain torch here), and still sum to 1 (times the scale)."""
    from moegraph import codegen

    spec = {"name": "tts-norm", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
            "router": {"type": "topk", "top_k": 3, "topk_order": "topk_then_score", "normalize": True, **extra}}}
    body = codegen.render(moegraph.load_spec(spec)).split("def core", 1)[1]
    assert "weights_TK.sum(" not in body
    layer = moegraph.compile(spec, out_dir=tmp_path).eval()
    g = torch.Generator().manual_seed(6)
    bias = getattr(layer.router, "expert_bias", None)
    with torch.no_grad():
        if bias is not None:
            bias.copy_(torch.randn(8, generator=g) * 0.3)
        layer.router.weight.mul_(4.0)  # logits far apart and close together
    x = torch.randn(1, 40, 16, generator=g)
    seen = []
    expert_mlp = torch.ops.moegraph.expert_mlp
    monkeypatch.setattr(torch.ops.moegraph, "expert_mlp", lambda *a: seen.append(a[3]) or expert_mlp(*a))
    with torch.no_grad():
        _, _, ids = layer.core(x)
        logits = x[0] @ layer.router.weight.t()
        ref_ids = torch.topk(logits if bias is None else logits + bias, 3, dim=-1).indices
        w = torch.softmax(logits.gather(1, ref_ids), dim=-1)
        w = w / w.sum(dim=-1, keepdim=True) * extra.get("scaling_factor", 1.0)
    (w_N,) = seen
    assert torch.equal(ids[0], ref_ids)
    torch.testing.assert_close(w_N.view(-1, 3), w, rtol=1e-6, atol=1e-7)
    scale = torch.full((40,), extra.get("scaling_factor", 1.0))
    torch.testing.assert_close(w_N.view(-1, 3).sum(dim=-1), scale, rtol=1e-6, atol=1e-6)



#: score -> its least value over the logits in [-30, 30], hand-derived (None: it is negative at a sample logit
#: already); each but the last dips below 0 only between two sample logits (SCORE_PROBE_X is a grid of step 0.25)
_DIPS = {
    "square(x - 0.1) - 0.001": -0.001,  # at x = 0.1
    "square(tanh(16 * (x - 0.1))) - 0.1": -0.1,  # at x = 0.1
    # relu(...) is 0 for x in [0.115, 0.135], where the square is least at x = 0.115
    "relu(abs(x - 0.125) - 0.01) - 0.005 + 0.0001 * square(x)": -0.005 + 0.0001 * 0.115 ** 2,
    "x * x - 0.0001": -0.0001,  # at x = 0, a sample logit
}

#: scores >= 0 for every logit: the common ones, and ones whose least value lies between sample logits
_NOT_NEGATIVE = ["softmax", "sigmoid", "softplus", "sqrt_softplus", "relu(x)", "exp(x)", "exp(x - 3) + sigmoid(x)",
                 "sqrt(relu(x))", "relu(x) ** 2", "square(relu(x - 1))", "square(x)", "x * x", "x ** 2", "abs(x)",
                 "2 ** x", "log1p(exp(x))", "1 / (1 + exp(-x))", "softplus(x) * sigmoid(x)", "exp(-square(x))",
                 "square(x - 0.1)", "square(x - 0.1) + 0.001", "relu(abs(x - 0.125) - 0.01) + 0.0001 * square(x)"]


def test_negative_scores_are_found_between_the_sample_logits():
    from moegraph.semantics.scores import SCORE_PROBE_X, negative_score_words, score_can_be_negative, score_tree

    xs = torch.linspace(-30, 30, 600_001, dtype=torch.float64)  # step 1e-4: the dips' least values are on it
    for score, least in _DIPS.items():
        fn = eval(f"lambda x: {score}", {"square": torch.square, "tanh": torch.tanh, "relu": torch.relu,
                                           "abs": torch.abs})
        assert float(fn(xs).min()) == pytest.approx(least, abs=1e-12), score  # the hand-derived least value
        on_grid = min(semantics.scores.score_value(score_tree(score), x) for x in SCORE_PROBE_X)
        assert (on_grid < 0) == (score == "x * x - 0.0001"), (score, on_grid)
        assert score_can_be_negative(score), score
        words = negative_score_words(score)
        got, at = re.fullmatch(r"is negative for some logits \((\S+) at x = (\S+)\)", words).groups()
        there = float(fn(torch.tensor(float(at), dtype=torch.float64)))  # (the words round to 3 and 6 digits)
        assert least <= there < 0 and float(got) == pytest.approx(there, rel=1e-2), words
    for score in _NOT_NEGATIVE:
        assert not score_can_be_negative(score), score


def test_named_scores_keep_their_sign():
    from moegraph.semantics.scores import score_can_be_negative

    # softmax, sigmoid, softplus, sqrt(softplus) are >= 0 everywhere; tanh and identity are negative for x < 0
    want = {"softmax": False, "sigmoid": False, "softplus": False, "sqrt_softplus": False, "tanh": True,
            "identity": True}
    assert {name: score_can_be_negative(name) for name in SCORE_FUNCTIONS} == want


def test_a_score_whose_sign_bounds_cannot_settle_counts_as_negative():
    # abs(x) - x is 0 for x >= 0, but interval bounds see abs(x) and x apart and never prove it; the callers then
    # refuse normalize and the balance losses, with words that say why (and 2 * relu(-x), the same score, passes)
    from moegraph.semantics.scores import negative_score_words, score_can_be_negative

    assert score_can_be_negative("abs(x) - x")
    assert negative_score_words("abs(x) - x").startswith("cannot be shown to be >= 0 for every logit in [-30, 30]")
    assert not score_can_be_negative("2 * relu(-x)")


# ----------------------------------------------------------------------------------------------
# Inline activation expressions (clamps, softcaps, constants) in the spec
# ----------------------------------------------------------------------------------------------

#: inline expression -> the same function written in plain torch here (gate, up halves)
INLINE = {
    "(clamp(up, -7, 7) + 1) * clamp(gate, max=7) * sigmoid(1.702 * clamp(gate, max=7))":
        lambda g, u: (u.clamp(-7, 7) + 1) * g.clamp(max=7) * torch.sigmoid(1.702 * g.clamp(max=7)),
    "clamp(silu(gate), max=0.8) * clamp(up, min=-1.5)":  # clamp after the activation, one-sided clamps
        lambda g, u: F.silu(g).clamp(max=0.8) * u.clamp(min=-1.5),
    "3 * tanh(silu(gate) * up / 3)":  # a softcapped SwiGLU
        lambda g, u: 3 * torch.tanh(F.silu(g) * u / 3),
    "max(gate, up) * min(gelu(gate), 2 * up) + clamp(up, -0.5, 0.5) ** 2":  # two-argument min/max of tensors
        lambda g, u: torch.maximum(g, u) * torch.minimum(F.gelu(g), 2 * u) + u.clamp(-0.5, 0.5) ** 2,
}


@pytest.mark.parametrize("expression", list(INLINE))
def test_inline_expressions_pass_gradcheck(expression):
    act = semantics.activation(expression)
    assert act.gated and act.name.isidentifier() and act.expression == expression
    g = torch.Generator().manual_seed(7)
    h = torch.randn(6, 8, generator=g, dtype=torch.float64) * 3
    gate, up = h[:, :4], h[:, 4:]
    # Keep finite differences away from the kinks (every clamp bound, and gate == up, gelu(gate) == 2 up).
    for k in (7.0, -7.0, 0.8, -1.5, 0.5, -0.5):
        h = torch.where((h - k).abs() < 1e-2, h + 0.05, h)
    gate, up = h[:, :4], h[:, 4:]
    assert (gate - up).abs().min() > 1e-3 and (F.gelu(gate) - 2 * up).abs().min() > 1e-3
    assert (F.silu(gate) - 0.8).abs().min() > 1e-3
    h.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _ActFn.apply(t, act, None, None), (h,), eps=1e-6, atol=1e-6, rtol=1e-5)
    hd = h.detach()
    torch.testing.assert_close(torch_forms.activate(hd, act), INLINE[expression](hd[:, :4], hd[:, 4:]),
                               rtol=1e-12, atol=1e-12)


def test_clamp_derivative_follows_torch_at_the_bound():
    # At a tie the clamped input keeps its gradient, as torch.clamp's does.
    act = semantics.activation("clamp(gate, -1, 2) * up")
    h = torch.tensor([[-1.0, 2.0, 3.0, 0.5, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    _, (dg, du) = torch_forms.activate_saved(h.detach(), act, None, None)
    want = torch.autograd.grad((h[:, :4].clamp(-1, 2) * h[:, 4:]).sum(), h)[0]
    torch.testing.assert_close(torch.cat([dg, du], -1), want)


#: min/max expressions -> the same in torch ops (two tensors: torch.minimum / maximum; a constant bound: a clamp)
_TIES = {
    "max(gate, up)": lambda g, u: torch.maximum(g, u),
    "min(gate, up) * up": lambda g, u: torch.minimum(g, u) * u,
    "max(gate, -gate) + min(silu(gate), up)": lambda g, u: torch.maximum(g, -g) + torch.minimum(F.silu(g), u),
    "min(2, up) * max(gate, 0.5)": lambda g, u: u.clamp(max=2) * g.clamp(min=0.5),  # bounds on either side
    "max(x, -x)": lambda x: torch.maximum(x, -x),
    "min(x, 3 * x) + max(1, x)": lambda x: torch.minimum(x, 3 * x) + x.clamp(min=1),
}


@pytest.mark.parametrize("expression", list(_TIES))
def test_min_max_derivatives_at_ties_follow_torch(expression):
    """At a tie of two tensors torch.minimum / maximum give each half the gradient; at a clamp's bound the input
    keeps all of it. The symbolic derivatives (the expert op's backward) against autograd on those torch ops."""
    act = semantics.activation(expression)
    if act.gated:  # gate == up, gate == -gate (0), silu(gate) == up, up == 2, gate == 0.5: all tied somewhere
        gate = torch.tensor([1.5, -0.0, 0.0, 0.5, 2.0, 1.0, -0.7], dtype=torch.float64)
        up = torch.tensor([1.5, 0.0, 0.0, 2.0, 2.0, 0.0, 0.3], dtype=torch.float64)
        up[5] = F.silu(gate[5])
        h = torch.cat([gate, up]).unsqueeze(0).requires_grad_(True)
        ref = _TIES[expression](h[:, :7], h[:, 7:])
    else:  # x == -x, x == 3x at 0; x == 1 at the bound
        h = torch.tensor([[0.0, 1.0, -1.0, 2.0, -0.0]], dtype=torch.float64, requires_grad=True)
        ref = _TIES[expression](h)
    want = torch.autograd.grad(ref.sum(), h)[0]
    _, saved = torch_forms.activate_saved(h.detach(), act, None, None)
    got = torch_forms.activate_backward(torch.ones_like(ref), saved)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # (a tie wrongly split is off by 0.5)


#: activations whose min / max bound is an expression of constants rather than a number -> the same in torch ops
_CONSTANT_BOUNDS = {
    "max(x, sigmoid(0))": lambda x: x.clamp(min=0.5),
    "min(x, 2 * 3)": lambda x: x.clamp(max=6.0),
    "max(x, -1 + 0.5)": lambda x: x.clamp(min=-0.5),
    "x * sigmoid(0) + min(2 ** 3 / 4, x)": lambda x: x / 2 + x.clamp(max=2.0),
    "clamp(gate, min=-sqrt(4), max=exp(1)) * up": lambda g, u: g.clamp(-2.0, math.e) * u,
}


@pytest.mark.parametrize("expression", list(_CONSTANT_BOUNDS))
def test_a_constant_expression_bound_is_a_clamp_on_every_path(expression):
    """A bound written as an expression of constants is a clamp like a number is: in the generated torch code
    (torch.clamp; torch.maximum takes no Python number), in the torch forms, and in the symbolic derivative (all of
    the gradient to the input at the bound, as torch.clamp's). Against autograd on the same function in torch ops,
    at the bounds and on either side of them."""
    act = semantics.activation(expression)
    points = torch.tensor([-3.0, -2.0, -0.5, 0.0, 0.5, 1.0, 2.0, math.e, 6.0, 7.5], dtype=torch.float64)
    h = torch.cat([points, points.flip(0)]).unsqueeze(0) if act.gated else points.unsqueeze(0)
    h.requires_grad_(True)
    halves = (h[:, :10], h[:, 10:]) if act.gated else (h,)
    ref = _CONSTANT_BOUNDS[expression](*halves)
    names = {v: f"h{i}" for i, v in enumerate(act.variables)}
    code = expr.emit(act.tree, names, expr.torch_call)
    assert "torch.clamp(" in code and "torch.maximum" not in code and "torch.minimum" not in code, code
    generated = eval(code, {"torch": torch, **{f"h{i}": t.detach() for i, t in enumerate(halves)}})
    torch.testing.assert_close(generated, ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(torch_forms.activate(h.detach(), act), ref.detach(), rtol=0, atol=0)
    ga = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    (want,) = torch.autograd.grad(ref, h, ga)
    _, saved = torch_forms.activate_saved(h.detach(), act, None, None)
    torch.testing.assert_close(torch_forms.activate_backward(ga, saved), want, rtol=1e-12, atol=1e-12)


#: activations whose derivative has an infinite factor where the inner one is 0 (sqrt / fractional or negative
#: powers / log / division of a relu or clamp); the expert op's backward must match autograd on the same
#: expression in torch ops where that is finite, and be finite everywhere
_KINKED = ["sqrt(relu(x))", "relu(x) ** 0.5", "sqrt(relu(gate)) * up", "relu(gate) ** 0.5 * up ** 2", "sqrt(abs(x))",
           "(x * x) ** 0.25", "sqrt(sqrt(relu(x)))", "x * sqrt(relu(x))", "1 / sqrt(relu(x) + 1)",
           "(relu(x) + 1) ** -0.5", "log(relu(x) + 1)", "log1p(relu(x))", "x / (1 + sqrt(relu(x)))",
           "relu(x) ** sigmoid(x)", "sigmoid(x) ** relu(x)", "clamp(sqrt(relu(x)), max=2)", "sqrt(min(relu(x), 3))",
           "sqrt(relu(gate)) * sqrt(relu(up))"]


@pytest.mark.parametrize("expression", _KINKED)
def test_derivative_is_finite_and_autograds_where_the_slope_blows_up(expression):
    act = semantics.activation(expression)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 12 if act.gated else 6, generator=g, dtype=torch.float64) * 3
    h[0], h[1], h[2, ::2] = 0.0, -1.0, 0.0  # at the kink and on the flat side
    hh = h.clone().requires_grad_(True)
    a = torch_forms.activate(hh, act)  # torch ops: autograd's derivative
    ga = torch.randn(a.shape, generator=g, dtype=torch.float64)
    (ref,) = torch.autograd.grad(a, hh, ga)
    _, saved = torch_forms.activate_saved(h, act, None, None)
    got = torch_forms.activate_backward(ga, saved)
    assert torch.isfinite(got).all()
    ok = torch.isfinite(ref)  # autograd's sqrt(abs(x)) is NaN at 0 (abs multiplies by sign); ours 0 there
    torch.testing.assert_close(got[ok], ref[ok], rtol=1e-12, atol=1e-12)


def test_derivative_infinite_at_ordinary_input_is_refused(tmp_path):
    # torch.clamp passes the gradient at its bound: the slope of sqrt(clamp(x, min=0)) at x = 0 is infinite.
    for bad in ["sqrt(clamp(x, min=0))", "sqrt(max(x, 0))", "relu(x) * sqrt(clamp(x, min=0))"]:
        with pytest.raises(ValueError, match=r"no finite derivative d/dx at x = 0 .* sqrt\(relu\(x\)\)"):
            semantics.activation(bad)
    with pytest.raises(ValueError, match="unknown function '_masked_mul'"):
        semantics.activation("_masked_mul(x, x)")
    # The hint of the forward probe is right: sqrt(relu(x)) trains (the training step's gradients are finite).
    d = moegraph.load_spec("mixtral-tiny").model_dump(mode="json")
    d["moe"]["experts"]["activation"] = "sqrt(relu(gate)) * up"
    layer = moegraph.compile(moegraph.load_spec(d), out_dir=tmp_path, dtype=torch.float32).train()
    x = torch.randn(1, 8, d["moe"]["hidden_size"], requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters()
                                                 if p.grad is not None)


def test_clamp_spellings_and_refusals():
    same = ["clamp(gate, -2, 3) * up", "clamp(gate, min=-2, max=3) * up", "clamp(gate, -2, max=3) * up",
            "min(max(gate, -2), 3) * up"]
    trees = [ast.dump(semantics.activation(s).tree) for s in same]
    assert len(set(trees)) == 1
    for bad, words in [("clamp(gate) * up", "without a bound"), ("clamp(gate, low=1) * up", "low as a keyword"),
                       ("clamp(gate, 1, max=2, min=0) * up", "min twice"), ("clamp(gate, 1, 2, 3) * up", "up to two"),
                       ("min(gate) * up", "min takes exactly 2 arguments"),
                       ("sigmoid(gate, up)", "sigmoid takes exactly one argument, got 2"),
                       ("softmax(gate) * up", "unknown function 'softmax'"), ("gate.sum() * up", "only calls of"),
                       ("gate[0] * up", "Subscript is not allowed"), ("gate if up else 1", "IfExp is not allowed"),
                       ("__import__('os').system('true')", "only calls of"),
                       ("log(gate) * up", "not finite at gate = -30")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            semantics.activation(bad)
    # A constant part is folded to the number it is: one beyond float32 would be inf or NaN on every backend.
    for bad in ["max(gate, -exp(100)) * up", "x + log(0 - 1)"]:
        with pytest.raises(ValueError, match=r"constant part '(-exp\(100\)|log\(0 - 1\))' is undefined or beyond "
                                             "float32's range"):
            semantics.activation(bad)


def _inline_loop_reference(layer, x_TD: torch.Tensor, fn) -> torch.Tensor:
    """Top-2 of softmax(logits), renormalised; the activation ``fn`` written in torch; one token at a time."""
    out = []
    for t in range(x_TD.shape[0]):
        s = torch.softmax(layer.router.weight @ x_TD[t].to(layer.router.weight.dtype), -1)
        ids = sorted(range(s.shape[0]), key=lambda e: -float(s[e].detach()))[:2]
        w = torch.stack([s[e] for e in ids])
        w = (w / w.sum()).to(x_TD.dtype)
        y = 0
        for e, we in zip(ids, w):
            h = layer.experts.gate_up_proj[e] @ x_TD[t]
            F_ = h.shape[0] // 2
            y = y + we * (layer.experts.down_proj[e] @ fn(h[:F_], h[F_:]))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("expression", list(INLINE)[:3])
def test_inline_expression_spec_runs_the_generated_torch_layer(expression, tmp_path):
    d = moegraph.load_spec("mixtral-tiny").model_dump(mode="json")
    d["name"] = "inline-gate"
    d["moe"]["experts"]["activation"] = expression
    spec = moegraph.load_spec(d)
    assert spec.moe.experts.gated and spec.moe.experts.activation == expression
    assert MoESpec.model_validate_json(spec.model_dump_json()) == spec  # round-trips through a file
    layer = moegraph.compile(spec, out_dir=tmp_path, dtype=torch.float64)
    with torch.no_grad():  # weights large enough that the clamps are active for some rows
        layer.experts.gate_up_proj.mul_(8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 9, 32, generator=g, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    want = _inline_loop_reference(layer, x[0], INLINE[expression])
    # The routing weights are float32 (router_dtype), computed over all tokens in the layer and per token here:
    # their rounding (a few times 6e-8, relative) times expert outputs up to twice the largest output (two
    # experts of weights scaled by 8 partly cancel) bounds the difference of any element, small ones included.
    torch.testing.assert_close(y[0], want, rtol=1e-5, atol=4e-7 * float(want.detach().abs().max()))
    params = [x, layer.experts.gate_up_proj, layer.experts.down_proj, layer.router.weight]
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, params, gy)
    ref = torch.autograd.grad(_inline_loop_reference(layer, x[0], INLINE[expression]), params, gy[0])
    for a, b, n in zip(got, ref, ["x", "gate_up_proj", "down_proj", "router"]):
        # atol: the router runs in float32 (router_dtype), the experts in float64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=lambda m: f"{n}: {m}")


def test_the_generated_modulo_hash_router_is_the_semantics_formula(tmp_path):
    # The generated layer spells the modulo hash step out; semantics.routing.modulo_hash_experts is the one Python
    # definition the rest of the package uses (the Rebalancer's drifting stream): both give the same experts.
    from moegraph.semantics.routing import modulo_hash_experts

    d = moegraph.load_spec("hash-tiny").to_dict()
    d["moe"]["router"]["method"] = "modulo"
    d["moe"]["router"].pop("vocab_size", None)
    layer = moegraph.compile(d, seed=0, out_dir=tmp_path).eval()
    ids = torch.randint(0, 1000, (13,), generator=torch.Generator().manual_seed(0))
    rec = layer.start_recording()
    with torch.no_grad():
        layer(torch.randn(13, layer.HIDDEN), token_ids=ids)
    got = rec.ids()
    assert torch.equal(got.long(), modulo_hash_experts(ids, layer.NUM_EXPERTS, layer.TOP_K))
