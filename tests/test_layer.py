"""The compiled layer against a plain loop reference, for every routing policy and activation."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch

import moegraph
import moegraph.ops
import moegraph.strategies
from moegraph.errors import InputError

from reference_moe import reference_forward

D, F_, E = 16, 8, 8


def make_spec(router: dict, *, experts: dict | None = None, shared: dict | None = None, name: str = "t") -> dict:
    ex = {"num_experts": E, "intermediate_size": F_, "activation": "swiglu"}
    ex.update(experts or {})
    spec = {"name": name, "moe": {"hidden_size": D, "experts": ex, "router": router}}
    if shared:
        spec["moe"]["shared_experts"] = shared
    return spec


ROUTERS = {
    "softmax_top2": {"top_k": 2},
    "softmax_top2_norm": {"top_k": 2, "normalize": True},
    "topk_then_softmax": {"top_k": 3, "topk_order": "topk_then_score"},
    "sigmoid_groups_bias": {"top_k": 3, "score": "sigmoid", "normalize": True, "scaling_factor": 2.5,
                            "groups": {"num_groups": 4, "topk_groups": 2, "group_score": "sum_topn", "top_n": 2},
                            "expert_bias": {"update_rate": 0.01}},
    "softmax_groups_max": {"top_k": 2, "scaling_factor": 16.0, "groups": {"num_groups": 4, "topk_groups": 1}},
    "sqrt_softplus": {"top_k": 2, "score": "sqrt_softplus", "normalize": True},
    "custom_expression": {"top_k": 2, "score": "sqrt(softplus(x)) + 0.5 * tanh(x)"},
    "custom_constants": {"top_k": 2, "score": "sqrt(softplus(x - sigmoid(0))) + 0.5 * tanh(x * sqrt(4))"},
    "router_bias": {"top_k": 2, "router_bias": True},
    "capacity_probs": {"top_k": 2, "capacity": {"factor": 0.5, "drop_policy": "probs"}},
    "capacity_position": {"top_k": 1, "capacity": {"factor": 1.0, "drop_policy": "position"}},
    "expert_choice": {"type": "expert_choice", "capacity_factor": 2.0},
    "hash_random": {"type": "hash", "top_k": 2, "method": "random", "vocab_size": 50},
    "hash_modulo": {"type": "hash", "top_k": 2, "method": "modulo"},
    "hash_table_scored": {"type": "hash", "top_k": 2, "method": "table", "vocab_size": 50, "score": "sqrt_softplus",
                          "normalize": True, "scaling_factor": 1.5, "router_bias": True},
}


def _randomise(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "bias" in name else 1.0) / math.sqrt(p.shape[-1]))
        if hasattr(layer.router, "expert_bias"):
            layer.router.expert_bias.copy_(torch.randn(layer.router.expert_bias.shape, generator=g) * 0.3)


def _compile(spec, tmp_path=None):
    layer = moegraph.compile(spec, dtype=torch.float32, out_dir=tmp_path)
    _randomise(layer)
    return layer


@pytest.fixture(params=["grouped", "per_expert"])
def expert_path(request, monkeypatch):
    """Run a test through both inference paths of the expert op: one grouped GEMM per projection
    (small experts) and one GEMM pair per expert (oneDNN-packed in eval)."""
    if request.param == "per_expert":
        monkeypatch.setattr(moegraph.ops, "SMALL_EXPERT_WEIGHTS", 0)
    return request.param


@pytest.mark.parametrize("name", list(ROUTERS))
def test_matches_loop_reference(name, tmp_path, expert_path):
    spec = make_spec(dict(ROUTERS[name]))
    layer = _compile(spec, tmp_path).eval()
    x = torch.randn(13, D, generator=torch.Generator().manual_seed(2))
    tid = torch.randint(0, 50, (13,), generator=torch.Generator().manual_seed(3)) if "hash" in name else None
    y = layer(x, tid)
    ref = reference_forward(spec, layer, x, tid)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu_tanh", "reglu", "silu", "gelu", "gelu_tanh", "relu", "relu2"])
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_bias(activation, bias, tmp_path, expert_path):
    spec = make_spec({"top_k": 2}, experts={"activation": activation, "bias": bias}, shared={"count": 1})
    layer = _compile(spec, tmp_path).eval()
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layer(x), reference_forward(spec, layer, x), rtol=1e-5, atol=1e-5)


def test_clamped_swiglu(tmp_path, expert_path):
    spec = make_spec({"top_k": 2}, experts={"gate_clamp": 0.1, "up_clamp": 0.2})
    layer = _compile(spec, tmp_path).eval()
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(5)) * 4
    torch.testing.assert_close(layer(x), reference_forward(spec, layer, x), rtol=1e-5, atol=1e-5)
    # The clamps must bite at this input scale, or this test would not test them.
    unclamped = make_spec({"top_k": 2})
    other = _compile(unclamped, tmp_path).eval()
    other.load_state_dict(layer.state_dict())
    assert (other(x) - layer(x)).abs().max() > 1e-3


@pytest.mark.parametrize("shared", [{"count": 2}, {"count": 1, "intermediate_size": 24, "gate": "sigmoid"}])
def test_shared_experts(shared, tmp_path, expert_path):
    spec = make_spec({"top_k": 2, "normalize": True}, shared=shared)
    layer = _compile(spec, tmp_path)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(6))
    for mode in (True, False):  # train graph keeps aux work, eval graph folds/drops: both exact
        layer.train(mode)
        torch.testing.assert_close(layer(x).reshape(-1, D), reference_forward(spec, layer, x.reshape(-1, D)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["softmax_top2_norm", "sigmoid_groups_bias", "capacity_probs", "expert_choice",
                                  "hash_table_scored"])
def test_gradients_match_reference(name, tmp_path):
    spec = make_spec(dict(ROUTERS[name]), shared={"count": 1, "gate": "sigmoid"})
    layer = _compile(spec, tmp_path).train()
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(7), requires_grad=True)
    g = torch.randn(11, D, generator=torch.Generator().manual_seed(8))
    tid = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(9)) if "hash" in name else None
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(layer(x, tid), [x, *params], g)
    ref = torch.autograd.grad(reference_forward(spec, layer, x, tid), [x, *params], g, allow_unused=True)
    for a, b, in zip(got, ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-5, atol=1e-5)


def test_expert_choice_with_a_factor_above_the_expert_count_gives_every_expert_every_token(tmp_path):
    # capacity_factor 6 over 4 experts: the recorded top-k proxy asked torch.topk for 6 of 4 experts (audit)
    spec = make_spec({"type": "expert_choice", "capacity_factor": 6.0}, experts={"num_experts": 4})
    assert moegraph.load_spec(spec).moe.top_k == moegraph.load_spec(spec).moe.experts.num_experts
    layer = _compile(spec, tmp_path)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(3))
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), reference_forward(spec, layer, x), rtol=1e-5, atol=1e-5)


def test_one_expert_top1_is_dense_ffn(tmp_path):
    spec = {"name": "dense", "moe": {"hidden_size": D, "experts": {"num_experts": 1, "intermediate_size": F_},
                                       "router": {"top_k": 1}}}
    layer = _compile(spec, tmp_path).eval()
    x = torch.randn(7, D)
    w = layer.experts.gate_up_proj[0]
    dense = torch.nn.functional.linear(
        torch.nn.functional.silu(x @ w[:F_].T) * (x @ w[F_:].T), layer.experts.down_proj[0])
    torch.testing.assert_close(layer(x), dense, rtol=1e-6, atol=1e-6)


# -- edge cases -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["softmax_top2", "sigmoid_groups_bias", "capacity_probs", "expert_choice", "hash_modulo"])
@pytest.mark.parametrize("T", [0, 1])
def test_zero_and_one_token(name, T, tmp_path, expert_path):
    spec = make_spec(dict(ROUTERS[name]), shared={"count": 1})
    layer = _compile(spec, tmp_path).eval()
    x = torch.randn(T, D)
    tid = torch.zeros(T, dtype=torch.long) if "hash" in name else None
    y = layer(x, tid)
    assert y.shape == (T, D)
    torch.testing.assert_close(y, reference_forward(spec, layer, x, tid), rtol=1e-5, atol=1e-5)


def test_every_token_to_one_expert_and_idle_experts(tmp_path):
    spec = make_spec({"top_k": 1})
    layer = _compile(spec, tmp_path).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[5] = 1.0  # a positive input sum sends every token to expert 5
    x = torch.rand(20, D) + 0.1
    rec = layer.start_recording()
    y = layer(x)
    assert set(rec.ids().flatten().tolist()) == {5}
    torch.testing.assert_close(y, reference_forward(spec, layer, x), rtol=1e-5, atol=1e-5)


def test_capacity_drops_tokens(tmp_path):
    spec = make_spec({"top_k": 1, "capacity": {"factor": 1.0, "drop_policy": "position"}})
    layer = _compile(spec, tmp_path).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(16, D) + 0.1  # all 16 want expert 2; capacity = ceil(16 * 1 / 8) = 2
    y = layer(x)
    kept = (y.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert kept == [0, 1], "position policy keeps the earliest tokens"
    torch.testing.assert_close(y, reference_forward(spec, layer, x), rtol=1e-5, atol=1e-5)


def test_nan_input_stays_in_its_token(tmp_path):
    layer = _compile(make_spec({"top_k": 2}), tmp_path).eval()
    x = torch.randn(6, D)
    x[3, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[3]).any()
    assert torch.isfinite(y[[0, 1, 2, 4, 5]]).all()


# -- training-side features --------------------------------------------------------------------------

def test_aux_losses_match_formulas(tmp_path):
    router = {"top_k": 2, "aux_losses": [{"kind": "expert_balance", "coef": 0.1}, {"kind": "z_loss", "coef": 0.01},
                                         {"kind": "sequence_balance", "coef": 0.5}]}
    layer = _compile(make_spec(router), tmp_path).train()
    x = torch.randn(3, 7, D)
    _, aux = layer(x, return_aux=True)
    logits = x.reshape(-1, D) @ layer.router.weight.T
    p = torch.softmax(logits, -1)
    ids = p.topk(2, -1).indices
    T = logits.shape[0]
    counts = torch.bincount(ids.flatten(), minlength=E).float()
    expected = 0.1 * (E / (2 * T) * counts * p.mean(0)).sum()
    torch.testing.assert_close(aux["expert_balance"], expected)
    torch.testing.assert_close(aux["z_loss"], 0.01 * torch.logsumexp(logits, -1).pow(2).mean())
    seq = []
    for b in range(3):
        pb, ib = p.view(3, 7, E)[b], ids.view(3, 7, 2)[b]
        cb = torch.bincount(ib.flatten(), minlength=E).float()
        seq.append((E / (2 * 7) * cb * pb.mean(0)).sum())
    torch.testing.assert_close(aux["sequence_balance"], 0.5 * torch.stack(seq).mean())
    # A perfectly balanced router gives expert_balance == coef (documented normalisation).
    assert layer.aux_losses.keys() == aux.keys()
    layer.eval()
    _, aux_eval = layer(x, return_aux=True)
    assert aux_eval == {}


def test_expert_bias_update_moves_load(tmp_path):
    router = dict(ROUTERS["sigmoid_groups_bias"])
    layer = _compile(make_spec(router), tmp_path).train()
    with torch.no_grad():
        layer.router.expert_bias.zero_()
    layer(torch.randn(64, D))
    load = layer.update_expert_bias()
    assert load.sum() == 64 * 3
    over = load > load.mean()
    under = load < load.mean()
    assert torch.allclose(layer.router.expert_bias[over], torch.full((int(over.sum()),), -0.01))
    assert torch.allclose(layer.router.expert_bias[under], torch.full((int(under.sum()),), 0.01))
    assert layer._bias_load_E.sum() == 0


def test_negative_bias_cannot_escape_groups(tmp_path):
    """Masked groups use -inf: a huge negative bias on allowed experts must not pull in others."""
    router = {"top_k": 2, "score": "sigmoid", "groups": {"num_groups": 4, "topk_groups": 1, "group_score": "max"},
              "expert_bias": {"update_rate": 0.0}}
    layer = _compile(make_spec(router), tmp_path).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0:2] = 1.0  # group 0 wins on raw score...
        layer.router.expert_bias.copy_(torch.tensor([5.0, 5.0, -1e3, -1e3, -9, -9, -9, -9]))
    x = torch.rand(4, D) + 0.1
    rec = layer.start_recording()
    layer(x)
    assert set(rec.ids().flatten().tolist()) <= {0, 1}
    with torch.no_grad():  # ...and when group 1 wins, a -1e3 bias still keeps the choice inside it
        layer.router.expert_bias.copy_(torch.tensor([-50.0, -50.0, 0, 0, -60, -60, -60, -60]))
    rec = layer.start_recording()
    layer(x)
    assert set(rec.ids().flatten().tolist()) <= {2, 3}


def test_recorder_counts(tmp_path):
    layer = _compile(make_spec({"top_k": 2}), tmp_path).eval()
    rec = layer.start_recording()
    layer(torch.randn(2, 5, D))
    layer(torch.randn(3, D))
    assert rec.ids().shape == (13, 2)
    assert rec.samples().tolist() == [0] * 5 + [1] * 5 + [2] * 3
    assert int(rec.counts(E).sum()) == 26
    assert layer.stop_recording() is rec and layer.recorder is None


# -- bad input -----------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(tmp_path):
    layer = _compile(make_spec({"top_k": 2}), tmp_path)
    with pytest.raises(InputError, match=r"expected \[tokens, 16\]"):
        layer(torch.randn(4, D + 1))
    with pytest.raises(InputError, match="floating-point"):
        layer(torch.ones(4, D, dtype=torch.long))
    with pytest.raises(InputError, match="shape"):
        layer(torch.randn(D))
    hashed = _compile(make_spec(dict(ROUTERS["hash_random"])), tmp_path)
    with pytest.raises(InputError, match="pass token_ids"):
        hashed(torch.randn(3, D))
    with pytest.raises(InputError, match="token_ids has shape"):
        hashed(torch.randn(3, D), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[0, 50\)"):
        hashed(torch.randn(3, D), torch.tensor([1, 2, 99]))


def test_state_dict_round_trip(tmp_path):
    spec = make_spec(dict(ROUTERS["sigmoid_groups_bias"]), shared={"count": 1, "gate": "sigmoid"})
    a = _compile(spec, tmp_path)
    b = moegraph.compile(spec, dtype=torch.float32, out_dir=tmp_path, seed=123)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, D)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    assert set(a.state_dict()) == {
        "router.weight", "router.expert_bias", "experts.gate_up_proj", "experts.down_proj",
        "shared_experts.gate_up_proj", "shared_experts.down_proj", "shared_expert_gate.weight"}


def test_torch_compile_runs(tmp_path):
    layer = _compile(make_spec(dict(ROUTERS["sigmoid_groups_bias"]), shared={"count": 1}), tmp_path).eval()
    x = torch.randn(9, D)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), layer(x))


def test_torch_compile_fullgraph_on_a_layer_that_never_ran(tmp_path):
    """The FX graph is built in Python, which Dynamo cannot trace: a layer fresh from moegraph.compile, switched to
    another mode, cast with .to(), or unpickled must already hold its graph (fullgraph failed with "Unexpected type
    in sourceless builder" until an eager forward had built it)."""
    import pickle

    layer = _compile(make_spec(dict(ROUTERS["sigmoid_groups_bias"]), shared={"count": 1}), tmp_path)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(3))
    for step in ("fresh", "eval", ".to", "unpickled"):
        if step == "eval":
            layer.eval()
        elif step == ".to":
            layer = layer.to(torch.float64)
            x = x.double()
        elif step == "unpickled":
            layer = pickle.loads(pickle.dumps(layer))
        torch._dynamo.reset()
        got = torch.compile(layer, backend="eager", fullgraph=True)(x)
        with torch.no_grad():
            torch.testing.assert_close(got, layer(x), msg=step)


def test_replaced_parameters_are_the_ones_the_layer_runs(tmp_path):
    """The graph reads the layer's own submodules: a parameter replaced by another object (assign=True, functional_call,
    plain assignment) is what the output and the gradients use (GraphModule's copies kept the traced ones: audit)."""
    from reference_moe import reference_forward

    spec = make_spec(dict(ROUTERS["softmax_top2"]))
    layer = _compile(spec, tmp_path).train()
    other = {k: torch.randn_like(v, generator=torch.Generator().manual_seed(i)) * 0.1 if v.is_floating_point() else v
             for i, (k, v) in enumerate(layer.state_dict().items())}
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(9))
    ref_layer = _compile(spec, tmp_path)
    ref_layer.load_state_dict(other)
    want = reference_forward(spec, ref_layer, x)
    got = torch.func.functional_call(layer, other, (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer.load_state_dict(other, assign=True)
    y = layer(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


def test_second_order_gradients_are_refused_by_name(tmp_path):
    layer = moegraph.compile(make_spec(dict(ROUTERS["softmax_top2"])), dtype=torch.float64, out_dir=tmp_path).train()
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x)  # first order as ever
    assert torch.isfinite(g).all()
    with pytest.raises(InputError, match="differentiable once.*create_graph=True"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_export_with_a_dynamic_token_count_and_hash_routing_in_one_graph(tmp_path):
    """No guard on the token count (the decode index cache compared T * K first) and no Python branch on token id
    values (hash routing checked them with int()) under torch.export / torch.compile(fullgraph=True)."""
    layer = _compile(make_spec(dict(ROUTERS["softmax_top2"])), tmp_path).eval()
    x = torch.randn(1, 20, D)
    T = torch.export.Dim("T", max=4096)
    ep = torch.export.export(layer, (x,), dynamic_shapes=({1: T},))
    for n in (3, 20, 300):
        xi = torch.randn(1, n, D)
        torch.testing.assert_close(ep.module()(xi), layer(xi))
    hashed = moegraph.compile("hash-tiny", dtype=torch.float32, out_dir=tmp_path).eval()
    xh = torch.randn(2, 6, hashed.HIDDEN)
    tid = torch.randint(0, hashed.HASH_VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(hashed, backend="eager", fullgraph=True)(xh, tid), hashed(xh, tid))
    with pytest.raises(InputError, match="token_ids must lie in"):
        hashed(xh, tid + hashed.HASH_VOCAB)


def test_invalidate_graphs_drops_the_packed_weights_after_a_data_write(tmp_path):
    layer = moegraph.compile(make_spec(dict(ROUTERS["softmax_top2"])), dtype=torch.float32, out_dir=tmp_path,
                             expert_strategy="per_expert")  # a strategy of the packed (oneDNN) weights
    _randomise(layer)
    layer.eval()
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
        layer(x)
        layer.experts.down_proj.data.mul_(2)  # bumps no version counter
        layer.invalidate_graphs()
        torch.testing.assert_close(layer(x), 2 * y, rtol=1e-5, atol=1e-5)  # the down projection is linear


def test_a_float64_layer_computes_its_aux_losses_in_float64(tmp_path):
    """compile(dtype=float64) is float64 throughout, the auxiliary losses too (they were float32, so gradcheck of a
    loss failed)."""
    router = {"top_k": 2, "aux_losses": [{"kind": "expert_balance", "coef": 0.1}, {"kind": "z_loss", "coef": 0.01},
                                         {"kind": "sequence_balance", "coef": 0.1}]}
    layer = moegraph.compile(make_spec(router), dtype=torch.float64, out_dir=tmp_path).train()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(4))
    _, aux = layer(x, return_aux=True)
    assert aux and all(v.dtype == torch.float64 for v in aux.values()), {k: v.dtype for k, v in aux.items()}
    assert torch.autograd.gradcheck(lambda t: sum(layer(t, return_aux=True)[1].values()), [x], eps=1e-6, atol=1e-6)


def test_presets_compile_and_run_tiny(tmp_path):
    for name in [n for n in moegraph.presets() if "tiny" in n]:
        layer = moegraph.compile(name, dtype=torch.float32, out_dir=tmp_path).eval()
        x = torch.randn(4, layer.HIDDEN)
        tid = torch.zeros(4, dtype=torch.long) if layer.NEEDS_TOKEN_IDS else None
        assert torch.isfinite(layer(x, tid)).all(), name


def test_spec_copy_is_not_mutated():
    spec = make_spec(dict(ROUTERS["softmax_top2"]))
    before = copy.deepcopy(spec)
    moegraph.compile(spec, dtype=torch.float32)
    assert spec == before


def test_device_comm_global_balance_and_jitter(tmp_path):
    router = {"top_k": 2, "jitter": 0.2, "aux_losses": [
        {"kind": "device_balance", "coef": 1.0}, {"kind": "comm_balance", "coef": 1.0},
        {"kind": "global_balance", "coef": 1.0}, {"kind": "expert_balance", "coef": 1.0}]}
    spec = make_spec(router)
    spec["topology"] = {"nodes": 1, "gpus_per_node": 4}
    layer = _compile(spec, tmp_path).train()
    x = torch.randn(40, D)
    torch.manual_seed(0)
    y1, aux = layer(x, return_aux=True)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.allclose(y1, y2), "jitter perturbs the router input in training"
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))  # no jitter in eval
    # Recompute from the recorded routing of the same jittered forward.
    layer.train()
    rec = layer.start_recording()
    torch.manual_seed(0)
    _, aux = layer(x, return_aux=True)
    ids = rec.ids().long()
    torch.manual_seed(0)
    noise = torch.empty(40, D).uniform_(0.8, 1.2)
    logits = (x * noise) @ layer.router.weight.T
    assert torch.equal(logits.softmax(-1).topk(2, -1).indices.sort(-1).values, ids.sort(-1).values)
    p = logits.softmax(-1)
    f = torch.bincount(ids.flatten(), minlength=E).float() * E / (2 * 40)
    P = p.mean(0)
    torch.testing.assert_close(aux["global_balance"], aux["expert_balance"])  # one process
    torch.testing.assert_close(aux["expert_balance"], (f * P).sum())
    f_dev = f.view(4, 2).mean(-1)
    P_dev = P.view(4, 2).sum(-1)
    torch.testing.assert_close(aux["device_balance"], (f_dev * P_dev).sum())
    sent = torch.zeros(4)
    for t in range(40):
        for d in set((ids[t] // 2).tolist()):
            sent[d] += 1
    torch.testing.assert_close(aux["comm_balance"], (sent * 4 / (2 * 40) * P_dev).sum())


def test_recorded_trace_feeds_the_planner_format(tmp_path):
    layers = [_compile(make_spec({"top_k": 2}), tmp_path).eval() for _ in range(2)]
    for layer in layers:
        layer.start_recording()
    x = torch.randn(3, 4, D)
    for layer in layers:
        x = layer(x)
    trace = moegraph.runtime.trace_from_layers(layers)
    assert trace.num_layers == 2 and trace.num_tokens == 12 and trace.num_experts == E
    assert trace.topk.shape == (2, 12, 2)
    assert trace.sample_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert trace.counts_by_source.sum() == 2 * 12 * 2


def test_backward_with_nothing_routed(tmp_path):
    layer = _compile(make_spec({"top_k": 2}), tmp_path).train()
    x = torch.zeros(0, D, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == (0, D)
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


def test_inference_mode_then_normal_mode(tmp_path):
    """Scratch buffers made under inference_mode must not leak into normal forwards (and back)."""
    layer = _compile(make_spec({"top_k": 2}), tmp_path).eval()
    x = torch.randn(12, D)
    with torch.inference_mode():
        a = layer(x)
    b = layer(x)
    with torch.inference_mode():
        c = layer(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, c)


def test_scratch_buffers_kept_between_calls_stay_under_the_limit(tmp_path, monkeypatch):
    layer = _compile(make_spec({"top_k": 2}), tmp_path).eval()
    x = torch.randn(64, D)
    moegraph.ops.clear_workspace()
    with torch.inference_mode():
        want = layer(x).clone()
        kept = moegraph.ops._workspace(x.dtype, x.device)
        assert kept.buffers and 0 < kept.kept_bytes() <= moegraph.ops.WORKSPACE_LIMIT_BYTES
        # A limit below one buffer: nothing is kept, and the result is the same.
        monkeypatch.setattr(moegraph.ops, "WORKSPACE_LIMIT_BYTES", 64)
        moegraph.ops.clear_workspace()
        got = layer(x)
        assert moegraph.ops._workspace(x.dtype, x.device).kept_bytes() <= 64
    torch.testing.assert_close(got, want)
    moegraph.ops.clear_workspace()


@pytest.mark.parametrize("activation,gated,clamps", [
    ("silu", True, (None, None)), ("silu", True, (0.3, 0.5)), ("gelu", True, (None, None)),
    ("gelu_tanh", True, (0.2, None)), ("relu", True, (None, 0.4)), ("silu", False, (None, None)),
    ("gelu", False, (None, None)), ("gelu_tanh", False, (None, None)), ("relu", False, (None, None)),
    ("relu2", False, (None, None)),
])
@pytest.mark.parametrize("extras", ["plain", "bias+shared+scale"])
def test_expert_op_backward_matches_finite_differences(activation, gated, clamps, extras):
    """The explicit backward op against torch.autograd.gradcheck's finite differences (float64)."""
    g = torch.Generator().manual_seed(0)
    T, Dm, F_, E = 5, 6, 4, 3
    H = 2 * F_ if gated else F_
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    tok = torch.tensor([0, 0, 1, 2, 3, 3, 4, 4, 1])
    exp = torch.tensor([0, 2, 2, 1, 0, 9, 1, 2, 0])  # 9: a dropped assignment; no expert left empty
    with_extras = extras != "plain"
    args = [r(T, Dm), tok, exp, r(9).abs(), r(E, H, Dm) / 2, r(E, Dm, F_) / 2,
            r(E, H) if with_extras else None, r(E, Dm) if with_extras else None, activation, gated, *clamps,
            r(H, Dm) / 2 if with_extras else None, r(Dm, F_) / 2 if with_extras else None,
            torch.rand(T, generator=g, dtype=torch.float64) if with_extras else None]
    diff = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for i in diff:
        args[i].requires_grad_(True)

    def f(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return moegraph.ops.expert_mlp(*full)

    assert torch.autograd.gradcheck(f, [args[i] for i in diff], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torch_compile_training_matches_eager(tmp_path):
    """Training through torch.compile (AOTAutograd traces the backward) gives the eager gradients."""
    layer = _compile(make_spec(dict(ROUTERS["sigmoid_groups_bias"]), shared={"count": 1}), tmp_path).train()
    x = torch.randn(9, D, requires_grad=True)
    g = torch.randn(9, D)
    params = list(layer.parameters())
    eager = torch.autograd.grad(layer(x), [x, *params], g)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.autograd.grad(compiled(x), [x, *params], g)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The backward is an opaque op too: AOTAutograd traces it without falling back (a recomputing
    # backward used to warn "Error detected in ...expert_mlp...Backward") and nothing breaks the graph.
    assert not [str(w.message) for w in caught if "expert_mlp" in str(w.message)]
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_hash_table_loads_with_the_weights_and_is_checked(tmp_path):
    """A 'table' hash router's token id -> experts table is part of the state dict; a table that does not fit
    the spec (rows != vocab_size, columns != top_k, ids outside the experts) is refused naming the field."""
    spec = make_spec(dict(ROUTERS["hash_table_scored"]))
    layer = _compile(spec, tmp_path).eval()
    sd = layer.state_dict()
    assert "router.hash_table" in sd and tuple(sd["router.hash_table"].shape) == (50, 2)
    table = torch.rand(50, E, generator=torch.Generator().manual_seed(4)).argsort(-1)[:, :2]
    layer.load_state_dict({**sd, "router.hash_table": table})
    assert torch.equal(layer.router.hash_table, table)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    tid = torch.arange(7) * 7
    torch.testing.assert_close(layer(x, tid), reference_forward(spec, layer, x, tid), rtol=1e-5, atol=1e-5)
    bad_tables = {
        "vocab_size": torch.zeros(49, 2, dtype=torch.long),
        "top_k": torch.zeros(50, 3, dtype=torch.long),
        "num_experts": torch.full((50, 2), E),
        "integer": torch.zeros(50, 2),
    }
    for field, bad in bad_tables.items():
        with pytest.raises(InputError, match=rf"router\.hash_table.*{field}"):
            layer.load_state_dict({**sd, "router.hash_table": bad})
    assert torch.equal(layer.router.hash_table, table)  # nothing half-loaded


@pytest.mark.parametrize("router", ["sigmoid_groups_bias", "softmax_top2", "hash_table_scored"])
def test_routing_weight_on_the_expert_input(router, tmp_path, expert_path):
    """experts.routing_weight: input (Llama 4): expert(w * x) summed over the chosen experts, outputs and gradients
    against the loop reference; it differs from w * expert(x), or this test would not test it."""
    spec = make_spec(dict(ROUTERS[router]), experts={"routing_weight": "input"}, shared={"count": 1})
    layer = _compile(spec, tmp_path).train()
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(11), requires_grad=True)
    g = torch.randn(9, D, generator=torch.Generator().manual_seed(12))
    tid = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(13)) if "hash" in router else None
    params = list(layer.parameters())
    y = layer(x, tid)
    ref = reference_forward(spec, layer, x, tid)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y, [x, *params], g)
    want = torch.autograd.grad(ref, [x, *params], g, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-5, atol=1e-5)
    on_output = _compile(make_spec(dict(ROUTERS[router]), shared={"count": 1}), tmp_path)
    on_output.load_state_dict(layer.state_dict())
    assert (on_output.eval()(x, tid) - layer.eval()(x, tid)).abs().max() > 1e-3


def _assert_matches_reference(spec, layer, x, g, tol: float = 1e-5) -> None:
    """Output, input gradient and every parameter gradient against the loop reference, ``tol`` (1e-5)."""
    params = list(layer.parameters())
    y = layer(x)
    ref = reference_forward(spec, layer, x)
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    got = torch.autograd.grad(y, [x, *params], g)
    want = torch.autograd.grad(ref, [x, *params], g, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=tol, atol=tol)


@pytest.mark.parametrize("router", ["softmax_top2", "sigmoid_groups_bias", "router_bias"])
def test_identity_and_zero_experts(router, tmp_path, expert_path):
    """experts.identity_experts / zero_experts (LongCat-Flash): extra router choices returning the input or nothing,
    outputs and gradients against the loop reference; tokens do pick them, or this test would not test them."""
    r = dict(ROUTERS[router])  # 12 router choices: groups of 3
    spec = make_spec(r, experts={"identity_experts": 3, "zero_experts": 1}, shared={"count": 1})
    layer = _compile(spec, tmp_path).train()
    assert tuple(layer.router.weight.shape) == (E + 4, D) and layer.experts.down_proj.shape[0] == E
    x = torch.randn(23, D, generator=torch.Generator().manual_seed(14), requires_grad=True)
    g = torch.randn(23, D, generator=torch.Generator().manual_seed(15))
    _assert_matches_reference(spec, layer, x, g)
    layer.start_recording()
    layer.eval()(x)
    ids = layer.stop_recording().ids()
    assert ((ids >= E) & (ids < E + 3)).any() and (ids == E + 3).any(), "no token chose an identity or zero expert"
    # Those choices hold no weights to place: a routing trace of the layer is refused by name.
    from moegraph.runtime import trace_from_layers

    layer.start_recording()
    layer(x)
    with pytest.raises(moegraph.errors.TraceError, match=r"identity or zero experts \(router ids >= 8\)"):
        trace_from_layers([layer])


@pytest.mark.parametrize("router", ["softmax_top2", "sigmoid_groups_bias"])
def test_output_norm(router, tmp_path, expert_path):
    """moe.output_norm (AXK1): an RMS norm of routed + shared experts with a learned weight; outputs and gradients
    (the norm weight's too) against the loop reference; the norm changes the output, or this would not test it."""
    spec = make_spec(dict(ROUTERS[router]), shared={"count": 1})
    spec["moe"]["output_norm"] = {"kind": "rms", "eps": 1e-5}
    assert torch.equal(moegraph.compile(spec, out_dir=tmp_path).output_norm.weight, torch.ones(D))  # init: ones
    layer = _compile(spec, tmp_path).train()  # every parameter random, the norm weight too
    x = torch.randn(13, D, generator=torch.Generator().manual_seed(16), requires_grad=True)
    g = torch.randn(13, D, generator=torch.Generator().manual_seed(17))
    _assert_matches_reference(spec, layer, x, g)
    plain = dict(spec, moe={k: v for k, v in spec["moe"].items() if k != "output_norm"})
    off = dict(spec, moe={**plain["moe"], "output_norm": None})
    assert moegraph.load_spec(off).hash() == moegraph.load_spec(plain).hash()  # older specs keep their hash
    unnormed = _compile(plain, tmp_path)
    unnormed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("output_norm")})
    assert (unnormed.eval()(x) - layer.eval()(x)).abs().max() > 1e-3


def test_output_norm_bad_values():
    for bad, field in (({"kind": "layer"}, "kind"), ({"eps": 0}, "eps"), ({"eps": -1e-6}, "eps")):
        spec = make_spec(dict(ROUTERS["softmax_top2"]))
        spec["moe"]["output_norm"] = bad
        with pytest.raises(moegraph.errors.SpecError, match=rf"output_norm.*{field}|{field}.*output_norm"):
            moegraph.load_spec(spec)


def test_identity_experts_need_a_dropless_topk_router():
    with pytest.raises(moegraph.errors.SpecError, match="identity_experts"):
        moegraph.load_spec(make_spec(dict(ROUTERS["expert_choice"]), experts={"identity_experts": 2}))
    with pytest.raises(moegraph.errors.SpecError, match="capacity"):
        moegraph.load_spec(make_spec(dict(ROUTERS["capacity_probs"]), experts={"zero_experts": 2}))


@pytest.mark.parametrize("router", ["softmax_top2_norm", "sigmoid_groups_bias", "topk_then_softmax", "router_bias"])
def test_shared_experts_weighted_by_the_router(router, tmp_path, expert_path):
    """shared_experts.gate: router (Inkling): each shared expert has a router row after the routed ones, its score
    joins the chosen experts' weights (normalised and scaled together) and weighs its output; shared weights are
    [count, ., .]. Outputs and every gradient against the loop reference; the shared rows do change the routed
    weights where the router normalises, or this would not test the joint normalisation."""
    spec = make_spec(dict(ROUTERS[router]), shared={"count": 2, "intermediate_size": 4, "gate": "router"})
    layer = _compile(spec, tmp_path).train()
    assert tuple(layer.router.weight.shape) == (E + 2, D)
    assert tuple(layer.shared_experts.gate_up_proj.shape) == (2, 8, D)
    assert tuple(layer.shared_experts.down_proj.shape) == (2, D, 4)
    x = torch.randn(19, D, generator=torch.Generator().manual_seed(18), requires_grad=True)
    g = torch.randn(19, D, generator=torch.Generator().manual_seed(19))
    _assert_matches_reference(spec, layer, x, g)
    # The shared rows take part: moving them moves the output.
    y = layer.eval()(x)
    with torch.no_grad():
        layer.router.weight[E:] += 1.0
    layer.invalidate_graphs()
    assert (layer(x) - y).abs().max() > 1e-3


@pytest.mark.parametrize("router", ["sigmoid_groups_bias", "topk_then_softmax"])
def test_learned_weight_scale_with_router_gated_shared_experts(router, tmp_path):
    """router.learned_weight_scale (Inkling's global_scale): one learned scalar on every routing weight, the
    router-gated shared experts' too. At 1.7: outputs and every gradient (the scale's own included) against the loop
    reference; the scale's gradient is d loss / d scale, which the output's derivative gives by hand: the layer
    output is linear in the scale (it multiplies every weight), so y(s) = s * y(1) and dL/ds = <g, y(1)>."""
    spec = make_spec({**ROUTERS[router], "learned_weight_scale": True},
                     shared={"count": 2, "intermediate_size": 4, "gate": "router"})
    assert torch.equal(moegraph.compile(spec, out_dir=tmp_path).router.weight_scale, torch.ones(1))
    layer = _compile(spec, tmp_path).train()
    with torch.no_grad():
        layer.router.weight_scale.fill_(1.7)
    x = torch.randn(19, D, generator=torch.Generator().manual_seed(18), requires_grad=True)
    g = torch.randn(19, D, generator=torch.Generator().manual_seed(19))
    _assert_matches_reference(spec, layer, x, g)
    y = layer(x)
    (grad,) = torch.autograd.grad((y * g).sum(), [layer.router.weight_scale])
    with torch.no_grad():
        layer.router.weight_scale.fill_(1.0)
        y1 = layer(x)
    torch.testing.assert_close(y, 1.7 * y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, (g * y1).sum().reshape(1), rtol=1e-5, atol=1e-5)


def test_shared_experts_router_gate_bad_specs():
    for router, shared, experts, field in (
        (dict(ROUTERS["expert_choice"]), {"count": 1, "gate": "router"}, None, "shared_experts.gate"),
        (dict(ROUTERS["hash_modulo"]), {"count": 1, "gate": "router"}, None, "shared_experts.gate"),
        (dict(ROUTERS["softmax_top2"]), {"count": 1, "gate": "router"}, {"identity_experts": 1}, "shared_experts.gate"),
        (dict(ROUTERS["softmax_top2"]), {"count": 0, "gate": "router"}, None, "gate"),
    ):
        with pytest.raises(moegraph.errors.SpecError, match=field):
            moegraph.load_spec(make_spec(router, shared=shared, experts=experts))


@pytest.mark.parametrize("capacity", [
    {"tokens": 2, "per": "sequence", "drop_policy": "position"},  # Switch Transformers: expert_capacity per sequence
    {"tokens": 3, "drop_policy": "probs"},
    {"factor": 0.5, "per": "sequence", "drop_policy": "probs"},
    {"tokens": 2, "drop_policy": "choice_then_position"},  # GShard: first choices fill the experts first
    {"factor": 0.5, "per": "sequence", "drop_policy": "choice_then_position"},
])
def test_capacity_in_tokens_or_per_sequence(capacity, tmp_path, expert_path):
    """router.capacity.tokens (an absolute count) and per: sequence (each sequence of [B, S, D] counted alone):
    outputs and gradients against the loop reference; tokens are dropped, and per sequence differs from per batch,
    or this would not test them."""
    for k in (1, 2):
        spec = make_spec({"top_k": k, "capacity": capacity})
        layer = _compile(spec, tmp_path).train()
        x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(20), requires_grad=True)
        g = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(21))
        params = list(layer.parameters())
        y = layer(x)
        ref = reference_forward(spec, layer, x.reshape(-1, D), sequences=3).view(3, 7, D)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(ref, [x, *params], g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        dropless = _compile(make_spec({"top_k": k}), tmp_path)
        dropless.load_state_dict(layer.state_dict())
        assert (dropless.eval()(x) - layer.eval()(x)).abs().amax(-1).gt(1e-6).any(), "no token was dropped"
        if capacity.get("per") == "sequence":
            batch = _compile(make_spec({"top_k": k, "capacity": {**capacity, "per": "batch"}}), tmp_path)
            batch.load_state_dict(layer.state_dict())
            assert (batch.eval()(x) - layer(x)).abs().max() > 1e-6


def test_capacity_bad_values():
    for cap, field in (({"factor": 1.0, "tokens": 4}, "factor"), ({"drop_policy": "probs"}, "factor"),
                       ({"tokens": 0}, "tokens"), ({"tokens": 4, "per": "token"}, "per")):
        with pytest.raises(moegraph.errors.SpecError, match=field):
            moegraph.load_spec(make_spec({"top_k": 2, "capacity": cap}))
    old = make_spec({"top_k": 2, "capacity": {"factor": 1.0}})
    new = make_spec({"top_k": 2, "capacity": {"factor": 1.0, "tokens": None, "per": "batch"}})
    assert moegraph.load_spec(old).hash() == moegraph.load_spec(new).hash()  # older specs keep their hash


def test_output_bias(tmp_path, expert_path):
    """moe.output_bias (JetMoE): a learned [D] bias on the layer output, after the output norm; outputs and every
    gradient (the bias's too) against the loop reference; older specs keep their hash."""
    spec = make_spec(dict(ROUTERS["topk_then_softmax"]), shared={"count": 1})
    spec["moe"]["output_bias"] = True
    spec["moe"]["output_norm"] = {"eps": 1e-5}
    assert torch.equal(moegraph.compile(spec, out_dir=tmp_path).output.bias, torch.zeros(D))  # init: zeros
    layer = _compile(spec, tmp_path).train()
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(22), requires_grad=True)
    g = torch.randn(11, D, generator=torch.Generator().manual_seed(23))
    _assert_matches_reference(spec, layer, x, g)
    assert layer.output.bias.abs().max() > 0  # randomised, so the reference had a bias to add
    plain = make_spec(dict(ROUTERS["topk_then_softmax"]))
    assert moegraph.load_spec({**plain, "moe": {**plain["moe"], "output_bias": False}}).hash() == \
        moegraph.load_spec(plain).hash()


#: router transforms (moe.router): input norm, learned logit scale, softcap, per-expert scales, a selection bias on
#: the logits, and Phi-MoE's sparsemixer
ROUTER_TRANSFORMS = {
    "gemma4": {"top_k": 2, "normalize": True, "per_expert_scale": True,
               "input_norm": {"kind": "rms", "eps": 1e-6, "weight": True, "multiplier": D ** -0.5}},
    "softcap_sigmoid_bias": {"top_k": 3, "score": "sigmoid", "normalize": True, "logit_softcap": 0.7,
                             "expert_bias": {"update_rate": 0.01}},
    "scaled_input_temperature": {"top_k": 2, "router_bias": True, "learned_logit_scale": True, "logit_softcap": 0.05,
                                 "input_norm": {"kind": "none", "weight": True}},
    "kolibri_bias_on_logits": {"top_k": 2, "score": "sigmoid", "normalize": True,
                               "expert_bias": {"update_rate": 0.01, "applies_to": "logits"}},
    "grouped_bias_on_logits": {"top_k": 3, "score": "sigmoid", "per_expert_scale": True,
                               "groups": {"num_groups": 4, "topk_groups": 2, "group_score": "sum_topn"},
                               "expert_bias": {"update_rate": 0.01, "applies_to": "logits"}},
    "sparsemixer": {"top_k": 2, "sparsemixer": {"jitter_eps": 0.3}},
    "sparsemixer_top3_scaled": {"top_k": 3, "sparsemixer": {"jitter_eps": 0.1}, "scaling_factor": 1.5,
                                "per_expert_scale": True, "logit_softcap": 1.5},
    "weight_scale": {"top_k": 2, "score": "sigmoid", "normalize": True, "scaling_factor": 2.0,
                     "learned_weight_scale": True},
    "sparsemixer_weight_scale": {"top_k": 2, "sparsemixer": {"jitter_eps": 0.2}, "learned_weight_scale": True},
}


@pytest.mark.parametrize("router", list(ROUTER_TRANSFORMS))
def test_router_transforms_match_the_loop_reference(router, tmp_path, expert_path):
    """Each router transform: outputs, the input gradient and every parameter gradient (the transforms' own learned
    scales included) against the loop reference, 1e-5; and each changes the output, or this would not test it."""
    r = ROUTER_TRANSFORMS[router]
    spec = make_spec(dict(r), shared={"count": 1})
    fresh = moegraph.compile(spec, out_dir=tmp_path)
    for name in ("router.input_norm.weight", "router.logit_scale", "router.per_expert_scale", "router.weight_scale"):
        if name in dict(fresh.named_parameters()):  # learned scales start at one
            assert torch.equal(dict(fresh.named_parameters())[name], torch.ones_like(dict(fresh.named_parameters())[name]))
    layer = _compile(spec, tmp_path).train()
    if "expert_bias" in r:
        layer.router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.5)
    x = torch.randn(29, D, generator=torch.Generator().manual_seed(18), requires_grad=True)
    g = torch.randn(29, D, generator=torch.Generator().manual_seed(19))
    _assert_matches_reference(spec, layer, x, g)
    for key in ("input_norm", "learned_logit_scale", "logit_softcap", "per_expert_scale", "sparsemixer",
                "learned_weight_scale"):
        if key not in r:
            continue
        plain = make_spec({k: v for k, v in r.items() if k != key}, shared={"count": 1})
        other = _compile(plain, tmp_path)
        other.load_state_dict({k: v for k, v in layer.state_dict().items() if k in other.state_dict()})
        assert (other.eval()(x) - layer.eval()(x)).abs().max() > 1e-4, key
    if r.get("expert_bias", {}).get("applies_to") == "logits":  # a bias on the logits selects otherwise
        on_scores = make_spec({**r, "expert_bias": {"update_rate": 0.01}}, shared={"count": 1})
        other = _compile(on_scores, tmp_path)
        other.load_state_dict(layer.state_dict())
        assert (other.eval()(x) - layer.eval()(x)).abs().max() > 1e-4


def test_router_transforms_keep_old_spec_hashes():
    """Specs that leave the router transforms off dump and hash as before the fields existed."""
    plain = make_spec({"top_k": 2, "expert_bias": {"update_rate": 0.01}})
    off = make_spec({"top_k": 2, "expert_bias": {"update_rate": 0.01, "applies_to": "scores"}, "input_norm": None,
                     "learned_logit_scale": False, "logit_softcap": None, "sparsemixer": None,
                     "per_expert_scale": False, "learned_weight_scale": False})
    dumped = moegraph.load_spec(off).model_dump(mode="json")["moe"]["router"]
    assert set(dumped) == set(moegraph.load_spec(plain).model_dump(mode="json")["moe"]["router"])
    assert "applies_to" not in dumped["expert_bias"] and "logit_softcap" not in dumped
    assert moegraph.load_spec(off).hash() == moegraph.load_spec(plain).hash()


@pytest.mark.parametrize("router, field", [
    ({"top_k": 2, "logit_softcap": 0}, "logit_softcap"),
    ({"top_k": 2, "logit_softcap": -3.0}, "logit_softcap"),
    ({"top_k": 2, "input_norm": {"kind": "none"}}, "input_norm.kind"),
    ({"top_k": 2, "input_norm": {"kind": "layer"}}, "input_norm.kind"),
    ({"top_k": 2, "input_norm": {"multiplier": 0}}, "input_norm.multiplier"),
    ({"top_k": 2, "expert_bias": {"applies_to": "weights"}}, "expert_bias.applies_to"),
    ({"top_k": 2, "sparsemixer": {"jitter_eps": 0}}, "sparsemixer.jitter_eps"),
    ({"top_k": 2, "sparsemixer": {}}, "sparsemixer.jitter_eps"),
    ({"top_k": 2, "score": "sigmoid", "sparsemixer": {"jitter_eps": 0.01}}, "score"),
    ({"top_k": 2, "normalize": True, "sparsemixer": {"jitter_eps": 0.01}}, "normalize"),
    ({"top_k": 2, "expert_bias": {}, "sparsemixer": {"jitter_eps": 0.01}}, "expert_bias"),
    ({"type": "expert_choice", "logit_softcap": 2.0}, "logit_softcap"),
    ({"type": "expert_choice", "learned_weight_scale": True}, "learned_weight_scale: unknown key"),
    ({"type": "hash", "top_k": 2, "method": "modulo", "learned_weight_scale": True},
     "learned_weight_scale: unknown key"),
])
def test_router_transform_errors_name_the_field(router, field):
    with pytest.raises(moegraph.errors.SpecError, match=re.escape(field)):
        moegraph.load_spec(make_spec(router))


#: the experts' space (moe.expert_projection) and a norm of each expert's output (moe.experts.output_norm)
EXPERT_SPACE = {
    "output_norm": ({"top_k": 2}, {"output_norm": {"eps": 1e-5}}, None),
    "output_norm_scaled_before_capacity": ({"top_k": 2, "capacity": {"factor": 0.5, "drop_policy": "probs"}},
                                           {"output_norm": {"eps": 1e-6, "weight_offset": 1, "scale": "before"},
                                            "bias": True}, None),
    "projection": ({"top_k": 3, "score": "sigmoid", "normalize": True}, {}, {"size": 12}),
    "muse_spark": ({"top_k": 2, "score": "sigmoid", "normalize": True, "scaling_factor": 2.0,
                    "expert_bias": {"update_rate": 0.01}},
                   {"output_norm": {"eps": 1e-5, "weight_offset": 1, "scale": "before"},
                    "input_norm": {"eps": 1e-6, "weight_offset": 1}},
                   {"size": 24}),
    "projection_norm_after_hash": ({"type": "hash", "top_k": 2, "method": "modulo"},
                                   {"output_norm": {"eps": 1e-6}, "input_norm": {"scale": "before"}}, {"size": 8}),
    # Ergo: a weight per expert (experts.output_norm_weight [E, M]); with a capacity, dropped assignments keep theirs
    "output_norm_per_expert": ({"top_k": 2, "score": "sigmoid", "normalize": True, "scaling_factor": 2.0,
                                "expert_bias": {"update_rate": 0.01}},
                               {"output_norm": {"eps": 1e-5, "per_expert": True}}, None),
    "output_norm_per_expert_projected_capacity": (
        {"top_k": 2, "capacity": {"factor": 0.5, "drop_policy": "probs"}},
        {"output_norm": {"eps": 1e-6, "weight_offset": 1, "scale": "before", "per_expert": True}}, {"size": 12}),
    # Gemma 4's MoE half: the router sees the input (normalised its own way), the experts a separately normalised one
    "gemma4_input_norm": ({"top_k": 2, "normalize": True, "per_expert_scale": True,
                           "input_norm": {"kind": "rms", "eps": 1e-6, "weight": True, "multiplier": D ** -0.5}},
                          {"input_norm": {"eps": 1e-6}}, None),
}


def _expert_space_spec(case: str) -> dict:
    router, experts, proj = EXPERT_SPACE[case]
    spec = make_spec(dict(router), experts=dict(experts))
    if proj is not None:
        spec["moe"]["expert_projection"] = proj
    return spec


@pytest.mark.parametrize("case", list(EXPERT_SPACE))
def test_expert_space_matches_the_loop_reference(case, tmp_path, expert_path):
    """moe.expert_projection, moe.experts.input_norm and output_norm (Muse Spark, Gemma 4): outputs, the input
    gradient and every parameter gradient (projections and norm weights included) against the loop reference, 1e-5;
    each norm changes the output."""
    spec = _expert_space_spec(case)
    fresh = moegraph.compile(spec, out_dir=tmp_path)
    _, experts, proj = EXPERT_SPACE[case]
    M = proj["size"] if proj else D
    assert fresh.experts.down_proj.shape[1] == M
    out_norm = experts.get("output_norm")
    per_expert = bool(out_norm and out_norm.get("per_expert"))
    out_weight = fresh.experts.output_norm_weight if per_expert else getattr(fresh, "expert_output_norm", None)
    for weight, norm in ((out_weight, out_norm), (getattr(fresh, "pre_expert_norm", None), experts.get("input_norm"))):
        if norm is not None:  # the norm's scale (offset + weight) starts at one; [E, M] with a weight per expert
            if isinstance(weight, torch.nn.Module):
                weight = weight.weight
            torch.testing.assert_close(weight + norm.get("weight_offset", 0.0),
                                       torch.ones((E, M) if norm is out_norm and per_expert else (M,)))
    assert hasattr(fresh, "expert_output_norm") == (out_norm is not None and not per_expert)
    layer = _compile(spec, tmp_path).train()
    hashed = "hash" in EXPERT_SPACE[case][0].get("type", "")
    tid = torch.randint(0, 50, (19,), generator=torch.Generator().manual_seed(33)) if hashed else None
    x = torch.randn(19, D, generator=torch.Generator().manual_seed(31), requires_grad=True)
    g = torch.randn(19, D, generator=torch.Generator().manual_seed(32))
    if hashed:
        params = list(layer.parameters())
        y, ref = layer(x, tid), reference_forward(spec, layer, x, tid)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(ref, [x, *params], g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        _assert_matches_reference(spec, layer, x, g)
    for part in ("output_norm", "input_norm"):  # without the norm (same other weights), the output differs
        plain = copy.deepcopy(spec)
        if part not in experts:
            continue
        del plain["moe"]["experts"][part]
        other = _compile(plain, tmp_path)
        other.load_state_dict({k: v for k, v in layer.state_dict().items() if k in other.state_dict()})
        assert (other.eval()(x, tid) - layer.eval()(x, tid)).abs().max() > 1e-4, part


@pytest.mark.parametrize("shared", [{"count": 1}, {"count": 2, "intermediate_size": 6}])
def test_shared_expert_output_norm_matches_the_loop_reference(shared, tmp_path, expert_path):
    """shared_experts.output_norm (Ergo: the shared MLP, then an RMS norm with its own [D] weight), beside a norm
    per routed expert: outputs, the input gradient and every parameter gradient against the loop reference, 1e-5;
    the weight starts at one and changes the output."""
    router = {"top_k": 2, "score": "sigmoid", "normalize": True, "scaling_factor": 2.0}
    norm = {"eps": 1e-5}
    spec = make_spec(router, experts={"activation": "relu2", "output_norm": {**norm, "per_expert": True}},
                     shared={**shared, "output_norm": norm})
    assert torch.equal(moegraph.compile(spec, out_dir=tmp_path).shared_expert_norm.weight, torch.ones(D))
    layer = _compile(spec, tmp_path).train()
    x = torch.randn(17, D, generator=torch.Generator().manual_seed(41), requires_grad=True)
    g = torch.randn(17, D, generator=torch.Generator().manual_seed(42))
    # Each norm divides by the RMS of a float32 sum and the reference sums in another order: gradients differ by a
    # few float32 ulps past 1e-5.
    _assert_matches_reference(spec, layer, x, g, tol=5e-5)
    plain = copy.deepcopy(spec)
    del plain["moe"]["shared_experts"]["output_norm"]
    other = _compile(plain, tmp_path)
    other.load_state_dict({k: v for k, v in layer.state_dict().items() if k in other.state_dict()})
    assert (other.eval()(x) - layer.eval()(x)).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["muse_spark", "output_norm_per_expert"])
@pytest.mark.parametrize("strategy", list(moegraph.strategies.STRATEGIES))
@pytest.mark.parametrize("T", [1, 3, 17])
def test_expert_space_every_strategy(strategy, T, case, tmp_path):
    """Every expert-compute strategy the tuner may pick is exact on the expert-space layer, eval and train."""
    spec = _expert_space_spec(case)
    layer = moegraph.compile(spec, dtype=torch.float32, out_dir=tmp_path, expert_strategy=strategy)
    _randomise(layer)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    ref = reference_forward(spec, layer, x)
    for mode in ("eval", "train"):
        with torch.no_grad():
            torch.testing.assert_close(getattr(layer, mode)()(x), ref, rtol=1e-5, atol=1e-5)


def test_expert_space_keeps_old_hashes_and_names_bad_fields():
    """Older specs dump and hash as before the fields existed; combinations that are not defined are refused by
    the field to change."""
    plain = make_spec({"top_k": 2})
    off = make_spec({"top_k": 2}, experts={"output_norm": None, "input_norm": None})
    off["moe"]["expert_projection"] = None
    off["moe"]["shared_experts"] = {"output_norm": None}
    assert moegraph.load_spec(off).hash() == moegraph.load_spec(plain).hash()
    normed = make_spec({"top_k": 2}, experts={"output_norm": {"eps": 1e-5}})
    assert moegraph.load_spec(normed).hash() == moegraph.load_spec(
        make_spec({"top_k": 2}, experts={"output_norm": {"eps": 1e-5, "per_expert": False}})).hash()
    bad = [
        ({"experts": {"output_norm": {"eps": 0}}}, "output_norm.eps"),
        ({"experts": {"output_norm": {"weight_offset": 2}}}, "output_norm.weight_offset"),
        ({"experts": {"output_norm": {"scale": "middle"}}}, "output_norm.scale"),
        ({"experts": {"output_norm": {}, "routing_weight": "input"}}, "experts.output_norm"),
        ({"expert_projection": {"size": 0}}, "expert_projection.size"),
        ({"expert_projection": {"size": 8}, "shared": {"count": 1}}, "shared_experts.count"),
        ({"expert_projection": {"size": 8}, "experts": {"identity_experts": 2}}, "experts.identity_experts"),
        ({"expert_projection": {"size": 8}, "experts": {"routing_weight": "input"}}, "experts.routing_weight"),
        ({"experts": {"input_norm": {"kind": "layer"}}}, "input_norm.kind"),
        ({"expert_projection": {"size": 8, "input_norm": {}}}, "input_norm"),
        ({"experts": {"input_norm": {}}, "shared": {"count": 1}}, "shared_experts.count"),
        ({"experts": {"input_norm": {}, "zero_experts": 1}}, "experts.identity_experts"),
        # (the field, then the start of the reason: an unknown field would be refused by its name too)
        ({"experts": {"input_norm": {"per_expert": True}}},
         "experts.input_norm.per_expert: experts.input_norm.per_expert gives each routed expert its own weight"),
        ({"experts": {"output_norm": {"per_expert": True}, "routing_weight": "input"}},
         "experts.output_norm: an expert output norm with routing_weight: input"),
        ({"shared": {"count": 1, "output_norm": {"per_expert": True}}},
         "shared_experts.output_norm.per_expert: shared_experts.output_norm.per_expert gives each routed expert"),
        ({"shared": {"count": 1, "gate": "sigmoid", "output_norm": {}}},
         "shared_experts.output_norm: a shared-expert output norm with gate 'sigmoid' is not defined"),
        ({"shared": {"count": 0, "output_norm": {}}}, "shared_experts.output_norm: output_norm normalises the shared"),
    ]
    for change, field in bad:
        spec = make_spec({"top_k": 2}, experts=change.get("experts"), shared=change.get("shared"))
        if "expert_projection" in change:
            spec["moe"]["expert_projection"] = change["expert_projection"]
        with pytest.raises(moegraph.errors.SpecError, match=re.escape(field)):
            moegraph.load_spec(spec)


#: routers that are small networks (router.mlp): Zaya's (state passed between layers, a skip choice as a zero expert,
#: a selection bias), one without state, one whose state is its input (a first layer, no linear before it), and one
#: with clamps and two-argument min / max (torch.clamp against a constant)
ROUTER_NETWORKS = {
    "zaya": ({"top_k": 2, "expert_bias": {"update_rate": 0.0},
              "mlp": [{"op": "linear", "size": 12, "bias": True}, {"op": "state"}, {"op": "rms_norm", "eps": 1e-5},
                      {"op": "linear", "size": 12, "bias": True}, {"op": "activation", "function": "gelu"},
                      {"op": "linear", "size": 12, "bias": True}, {"op": "activation", "function": "gelu"}]},
             {"zero_experts": 1}),
    "no_state": ({"top_k": 3, "score": "sigmoid", "normalize": True, "router_bias": True,
                  "input_norm": {"kind": "rms", "eps": 1e-6},
                  "mlp": [{"op": "linear", "size": 10}, {"op": "activation", "function": "x * sigmoid(x)"},
                          {"op": "linear", "size": 6, "bias": True}]}, {}),
    "state_first": ({"top_k": 2, "mlp": [{"op": "state", "receive": False}, {"op": "linear", "size": 8},
                                         {"op": "activation", "function": "relu"}]}, {"identity_experts": 1}),
    "clamped": ({"top_k": 2, "mlp": [{"op": "linear", "size": 10}, {"op": "activation", "function": "clamp(x, -1, 1)"},
                                     {"op": "linear", "size": 8},
                                     {"op": "activation", "function": "max(x, 0.1 * x) + min(x, 0.5)"}]}, {}),
    # bounds written as expressions of constants: clamps as numbers are (torch.maximum takes no Python number)
    "constant_bounds": ({"top_k": 2, "mlp": [{"op": "linear", "size": 10},
                                             {"op": "activation", "function": "clamp(x, min=-1 + 0.5, max=exp(1) / 4)"},
                                             {"op": "linear", "size": 8},
                                             {"op": "activation", "function": "max(x, -sigmoid(1)) + x * sigmoid(0)"}]},
                        {}),
}


def _network_case(case):
    router, experts = ROUTER_NETWORKS[case]
    spec = make_spec(copy.deepcopy(router), experts=dict(experts))
    layers = router["mlp"]
    widths = [D]
    for s in layers:
        widths.append(s["size"] if s["op"] == "linear" else widths[-1])
    state_at = next((i for i, s in enumerate(layers) if s["op"] == "state"), None)
    return spec, (None if state_at is None else widths[state_at + 1])


def _sharpened(layer):
    """Larger router weights and a selection bias towards the choices beyond the experts: tokens then route apart
    (a norm and two GELU layers of small random weights give every token nearly the same logits)."""
    with torch.no_grad():
        layer.router.weight.mul_(6.0)
        for m in layer.router.mlp:
            if getattr(m, "weight", None) is not None and m.weight.dim() == 2:
                m.weight.mul_(3.0)
        if hasattr(layer.router, "expert_bias"):
            layer.router.expert_bias[E:] += 0.1
    return layer


@pytest.mark.parametrize("case", list(ROUTER_NETWORKS))
def test_router_network_matches_the_loop_reference(case, tmp_path, expert_path):
    """router.mlp (a router that is a small network) and its router state: outputs, returned state, input, incoming
    state and every parameter gradient against the loop reference (1e-5; gradients 1e-4 relative); the skip (zero
    expert) is chosen."""
    spec, H = _network_case(case)
    router = ROUTER_NETWORKS[case][0]
    fresh = moegraph.compile(spec, out_dir=tmp_path)
    for i, step in enumerate(router["mlp"]):  # a norm's weight and a state's scale start at one
        if step["op"] == "rms_norm" or (step["op"] == "state" and step.get("receive", True)):
            assert torch.equal(next(fresh.router.mlp[i].parameters()), torch.ones(H or D))
    layer = _sharpened(_compile(spec, tmp_path)).train()
    T = 19
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(41), requires_grad=True)
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(42))
    receive = H is not None and next(s for s in router["mlp"] if s["op"] == "state").get("receive", True)
    s_in = torch.randn(T, H, generator=torch.Generator().manual_seed(43), requires_grad=True) if receive else None
    params = list(layer.parameters())
    states: list = []
    ref = reference_forward(spec, layer, x, router_state=s_in, states_out=states)
    if H is None:
        y = layer(x)
        outs, refs, grads = [y], [ref], [g]
    else:
        y, st = layer(x, router_state=s_in)
        ref_st = torch.stack(states)
        assert st.shape == (T, H)
        g_st = torch.randn(T, H, generator=torch.Generator().manual_seed(44))
        outs, refs, grads = [y, st], [ref, ref_st], [g, g_st]
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    wrt = [x, *([s_in] if receive else []), *params]
    got = torch.autograd.grad(outs, wrt, grads)
    want = torch.autograd.grad(refs, wrt, grads, allow_unused=True)
    # float32 gradients summed over the tokens in another order (batched here, per token in the reference), through
    # the sharpened network: a few parts in 1e5 on the largest entries on some CPUs; a wrong gradient is off by O(1).
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-4, atol=1e-5)
    if ROUTER_NETWORKS[case][1]:  # tokens do choose the choices beyond the experts
        layer.start_recording()
        layer.eval()(x, router_state=s_in) if H else layer.eval()(x)
        ids = layer.stop_recording().ids().reshape(T, -1)
        assert (ids >= E).any() and not (ids >= E).all() and len({tuple(r) for r in ids.tolist()}) > 3


@pytest.mark.parametrize("strategy", list(moegraph.strategies.STRATEGIES))
@pytest.mark.parametrize("T", [1, 3, 17])
def test_router_network_every_strategy(strategy, T, tmp_path):
    """Every expert-compute strategy is exact on Zaya's layer (router network, state, a zero expert), eval and train."""
    spec, H = _network_case("zaya")
    layer = moegraph.compile(spec, dtype=torch.float32, out_dir=tmp_path, expert_strategy=strategy)
    _sharpened(_randomise(layer) or layer)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    s_in = torch.randn(T, H, generator=torch.Generator().manual_seed(T + 1))
    states: list = []
    ref = reference_forward(spec, layer, x, router_state=s_in, states_out=states)
    for mode in ("eval", "train"):
        with torch.no_grad():
            y, st = getattr(layer, mode)()(x, router_state=s_in)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st, torch.stack(states), rtol=1e-5, atol=1e-5)


def test_router_network_keeps_old_hashes_and_names_bad_fields(tmp_path):
    """Older specs hash as before; a bad router network or router state is refused naming the field or input."""
    plain = make_spec({"top_k": 2})
    assert moegraph.load_spec(make_spec({"top_k": 2, "mlp": []})).hash() == moegraph.load_spec(plain).hash()
    lin = {"op": "linear", "size": 8}
    bad = [
        ([lin, {"op": "state"}, {"op": "state"}], "router.mlp.2.op", "one router state"),
        ([lin, {"op": "activation", "function": "swiglu"}], "router.mlp.1", "gated"),
        ([lin, {"op": "activation", "function": "nosuch"}], "router.mlp.1", "nosuch"),
        ([lin, {"op": "activation", "function": "__import__('os')"}], "router.mlp.1", "function"),
        ([{"op": "rms_norm"}, {"op": "activation", "function": "gelu"}], "router.mlp.0.op", "input_norm"),
        ([{"op": "linear", "size": 0}], "router.mlp.0.size", ""),
        ([{"op": "conv"}], "router.mlp.0", ""),
    ]
    for mlp, field, words in bad:
        with pytest.raises(moegraph.errors.SpecError, match=re.escape(field)) as info:
            moegraph.load_spec(make_spec({"top_k": 2, "mlp": mlp}))
        assert words in str(info.value)
    with pytest.raises(moegraph.errors.SpecError, match="router.mlp"):  # a field of top-k routers only
        moegraph.load_spec(make_spec({"type": "hash", "top_k": 2, "method": "modulo", "mlp": [lin]}))
    spec, H = _network_case("zaya")
    layer = moegraph.compile(spec, out_dir=tmp_path)
    x = torch.randn(2, 3, D)
    for state, words in ((torch.randn(2, 3, H + 1), "router_state has shape"), ("no", "router_state has shape"),
                         (torch.zeros(2, 3, H, dtype=torch.long), "float")):
        with pytest.raises(moegraph.errors.InputError, match=words):
            layer(x, router_state=state)
    y, st = layer(x)  # no incoming state: adds nothing (as a first layer's missing one)
    assert y.shape == x.shape and st.shape == (2, 3, H)


@pytest.mark.parametrize("preset", ["deepseek-v3-tiny", "mixtral-tiny", "qwen2-moe-tiny", "hash-tiny"])
def test_a_compiled_layer_runs_after_moving_to_another_dtype(preset):
    # .to(dtype) / .half() convert the router weight; the generated code cast the router input to the dtype it was
    # compiled with, so the forward raised (m1 and m2 dtypes differ). It now follows the router weight.
    import copy

    spec = moegraph.load_spec(preset)
    layer = moegraph.compile(spec, seed=0).eval()
    x = torch.randn(7, spec.moe.hidden_size, generator=torch.Generator().manual_seed(0))
    kw = {"token_ids": torch.arange(7)} if layer.NEEDS_TOKEN_IDS else {}
    with torch.no_grad():
        ref = layer(x, **kw).double()
        wide = copy.deepcopy(layer).to(torch.float64)(x.double(), **kw)
        half = copy.deepcopy(layer).to(torch.bfloat16)(x.bfloat16(), **kw)
    assert wide.dtype == torch.float64 and half.dtype == torch.bfloat16
    torch.testing.assert_close(wide, ref, rtol=1e-5, atol=1e-5)  # float32 rounding of the reference
    assert (half.double() - ref).abs().max() <= 3e-2 * ref.abs().max()  # bfloat16's 8 bits of mantissa


@pytest.mark.parametrize("preset", ["deepseek-v3-tiny", "mixtral-tiny", "qwen2-moe-tiny"])
def test_a_compiled_layer_keeps_its_precision_under_autocast_in_eval_mode(preset):
    """Under torch.autocast (float32 weights, bfloat16 matmuls) an eval-mode layer computes in its own dtype: the
    same outputs and input gradients as without autocast (it raised: index_add_ of mixed dtypes)."""
    spec = moegraph.load_spec(preset)
    layer = moegraph.compile(spec, seed=0).eval()
    x = torch.randn(2, 5, spec.moe.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = layer(x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)  # backward outside the region, as torch.amp says
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)

    # After an autocast op the input is bfloat16 (an nn.Linear under autocast gives it): the layer takes it as
    # autocast's float32 ops do, cast to float32 (it was refused: "input has dtype torch.bfloat16"), and the
    # gradient reaches the op before it.
    proj = torch.nn.Linear(spec.moe.hidden_size, spec.moe.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    torch.testing.assert_close(y, layer(h.detach().float()), rtol=0, atol=0)
    y.sum().backward()
    assert proj.weight.grad is not None and float(proj.weight.grad.abs().sum()) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(InputError, match="float64"):
        layer(x.double())  # autocast leaves float64 alone, and so does the layer


@pytest.mark.parametrize("preset", ["deepseek-v3-tiny", "mixtral-tiny", "qwen2-moe-tiny", "switch-tiny",
                                    "expert-choice-tiny", "hash-tiny"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_layer_trains_under_autocast_as_the_layer_made_in_its_dtype(preset, dtype):
    """Mixed-precision training: a float32 layer in training mode under torch.autocast computes as the layer
    compiled in the autocast dtype with the same weights (router in float32) would, bit for bit (outputs, aux
    losses), and its float32 weights get that layer's gradients (autocast's casts are differentiable); before,
    it ran every product in float32 inside the region, the user's 16-bit matmuls ignored."""
    spec = moegraph.load_spec(preset)
    layer = moegraph.compile(spec, seed=0).train()
    made = moegraph.compile(spec, dtype=dtype, seed=None).train()
    made.load_state_dict(layer.state_dict())
    assert made.experts.down_proj.dtype == dtype and all(p.dtype == torch.float32 for p in made.router.parameters())
    x = torch.randn(2, 5, spec.moe.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    kw = {"token_ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))} \
        if layer.NEEDS_TOKEN_IDS else {}
    with torch.autocast("cpu", dtype=dtype):
        y, aux = layer(x, return_aux=True, **kw)
        proj = torch.nn.functional.linear(x, torch.eye(spec.moe.hidden_size))  # an autocast op before the layer
        assert layer(proj, **kw).dtype == dtype
    x16 = x.detach().to(dtype).requires_grad_()
    want, want_aux = made(x16, return_aux=True, **kw)
    assert y.dtype == dtype and torch.equal(y, want)
    assert aux.keys() == want_aux.keys() and all(torch.equal(aux[k], want_aux[k]) for k in aux)
    loss = lambda out, losses: out.float().square().sum() + sum(v.float() for v in losses.values())  # noqa: E731
    loss(y, aux).backward()
    loss(want, want_aux).backward()
    assert torch.equal(x.grad, x16.grad.float())
    mine, theirs = dict(layer.named_parameters()), dict(made.named_parameters())
    for name, p in mine.items():
        assert p.dtype == torch.float32  # the weights the optimizer steps stay float32
        if theirs[name].grad is None:
            assert p.grad is None, name
        else:
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, theirs[name].grad.float()), name
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in mine.items() if n.startswith("experts."))
    # Without autocast, and in eval mode under it, the float32 layer is float32 again
    assert layer(x.detach(), **kw).dtype == torch.float32
    layer.eval()
    with torch.autocast("cpu", dtype=dtype):
        assert layer(x.detach(), **kw).dtype == torch.float32


def test_a_layer_deep_copies_after_a_training_forward(tmp_path, monkeypatch):
    """copy.deepcopy after a training forward (its aux losses hold the autograd graph) copies the layer, without
    the last forward's losses and graphs, reusing the class this process loaded (nothing generated or written
    again); the copy computes what the layer does."""
    import copy

    from moegraph import codegen

    layer = moegraph.compile("deepseek-v3-tiny", seed=0, out_dir=tmp_path).train()
    monkeypatch.setattr(codegen, "write_source", lambda *a, **k: pytest.fail("deepcopy generated the code again"))
    x = torch.randn(2, 5, layer.HIDDEN, generator=torch.Generator().manual_seed(0))
    layer(x)
    assert layer.aux_losses
    twin = copy.deepcopy(layer)
    assert twin.aux_losses == {} and layer.aux_losses
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), layer.eval()(x), rtol=0, atol=0)


def test_update_expert_bias_checks_the_loads_it_is_given():
    """A scalar was broadcast to every expert (a step of zero, silently); a wrong length gave a bare torch error.
    The counted loads are not a buffer: DistributedDataParallel broadcasts buffers from rank 0 (test_distributed
    checks the loads under DDP)."""
    layer = moegraph.compile("deepseek-v3-tiny", seed=0).train()
    E = layer.router.expert_bias.shape[0]
    for bad, words in [(torch.tensor(3.0), r"shape \(\)"), (torch.ones(E + 1), rf"shape \({E + 1},\)"),
                       ([1.0] * E, "is list"), (torch.full((E,), float("nan")), "non-finite"),
                       (-torch.ones(E), "negative")]:
        with pytest.raises(InputError, match=words):
            layer.update_expert_bias(bad)
    assert float(layer.router.expert_bias.abs().sum()) == 0.0
    assert "_bias_load_E" not in dict(layer.named_buffers())


def test_a_cast_keeps_the_balancing_state_in_float32():
    # bfloat16 counted loads in steps of 16 past 256 assignments and lost a 0.001 bias step around 0.5 (audit)
    spec = {"name": "b", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
            "router": {"top_k": 2, "score": "sigmoid", "expert_bias": {"update_rate": 0.001}}}}
    layer = moegraph.compile(spec, seed=0).to(torch.bfloat16).train()
    assert layer.experts.down_proj.dtype == torch.bfloat16
    for _ in range(3):
        layer(torch.randn(4096, 16, dtype=torch.bfloat16))
    assert layer._bias_load_E.dtype == torch.float32 and layer._bias_load_E.sum().item() == 3 * 4096 * 2
    with torch.no_grad():
        layer.router.expert_bias.fill_(0.5)
    for _ in range(10):
        layer.update_expert_bias(torch.tensor([0.0] * 4 + [10.0] * 4))
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([0.51] * 4 + [0.49] * 4))
    assert layer.half().router.expert_bias.dtype == torch.float32 and layer.float().experts.down_proj.dtype == torch.float32
    # only casts skip it: a layer built on the meta device materialises (to_empty), and shares its memory whole
    # (both failed or skipped the balancing state while every kept tensor was only moved; review)
    with torch.device("meta"):
        meta = moegraph.compile(spec, seed=None)
    meta.to_empty(device="cpu")
    assert meta.router.expert_bias.device.type == "cpu" and meta._bias_load_E.dtype == torch.float32
    layer.share_memory()
    assert layer.router.expert_bias.is_shared() and layer._bias_load_E.is_shared() and layer.router.weight.is_shared()


def test_a_float64_layer_routes_in_float64():
    # compile(dtype=float64), as the spec error for router_dtype float64 advises, left the router in float32:
    # gradcheck of the input failed until layer.double() (audit)
    spec = {"name": "f", "moe": {"hidden_size": 8, "experts": {"num_experts": 4, "intermediate_size": 8},
                                 "router": {"top_k": 2}}}
    layer = moegraph.compile(spec, dtype=torch.float64, seed=0).train()
    assert layer.router.weight.dtype == torch.float64
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)
    assert moegraph.compile(spec, dtype=torch.bfloat16, seed=0).router.weight.dtype == torch.float32


def test_a_random_hash_table_names_distinct_experts_per_token():
    # method random with top_k 2 gave 139 of 1,000 token ids the same expert twice (audit)
    def table(k, experts=8):
        spec = {"name": "h", "moe": {"hidden_size": 8, "experts": {"num_experts": experts, "intermediate_size": 8},
                                     "router": {"type": "hash", "method": "random", "top_k": k, "vocab_size": 20000}}}
        return moegraph.compile(spec, seed=0).router.hash_table

    for k in (2, 4, 8):
        t = table(k)
        assert t.shape == (20000, k) and int(t.min()) >= 0 and int(t.max()) < 8
        assert (t.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts in every row
        counts = torch.bincount(t.reshape(-1), minlength=8).float()
        assert (counts / counts.mean() - 1).abs().max() < 0.05  # every expert as often (uniform draws)
    assert (t.sort(dim=1).values == torch.arange(8)).all()  # top_k = E: every expert once, in random order
    # top-1 tables are torch.randint's, as before
    torch.testing.assert_close(table(1)[:, 0], torch.randint(0, 8, (20000,), generator=torch.Generator().manual_seed(0)))


def test_gshard_drop_order_keeps_first_choices_before_second_ones():
    # capacity 1: token 0's second choice (expert 1) must not take the place of token 1's first choice (audit's case)
    from moegraph.runtime import apply_capacity

    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    dropped = 3
    kept = {p: apply_capacity(ids, w, 3, None, 1, p, tokens=1).tolist() for p in ("position", "choice_then_position")}
    assert kept["position"] == [[0, 1], [dropped, 2], [dropped, dropped]]
    assert kept["choice_then_position"] == [[0, dropped], [1, dropped], [2, dropped]]
    assert moegraph.load_spec("gshard-top2").moe.router.capacity.drop_policy == "choice_then_position"


def test_gshard_preset_capacity_is_the_papers_two_tokens_over_experts():
    # GShard's algorithm gives each expert 2N/E of a group's N tokens; fairseq's and DeepSpeed's top-2 gates compute
    # 2 * ceil(N / E). Every token's first choice on expert 0: exactly that many stay with it.
    from moegraph.runtime import apply_capacity

    cap = moegraph.load_spec("gshard-top2").moe.router.capacity
    E, T = 2048, 6144
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.arange(1, T + 1) % E], dim=1)
    kept = apply_capacity(ids, torch.full((T, 2), 0.5), E, cap.factor, cap.min_capacity, cap.drop_policy)
    assert int((kept[:, 0] == 0).sum()) == 2 * math.ceil(T / E)
