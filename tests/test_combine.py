"""``shared_experts.combine``: the shared output joined to the routed one by an expression, against the
loop reference with the combination written by hand (outputs and every gradient, float32), and the
refusals of expressions that cannot be one."""

from __future__ import annotations

import math

import pytest
import torch

import moegraph
from moegraph.errors import SpecError

from reference_moe import reference_forward

D, F_, E = 16, 8, 6

# spec expression -> the same combination written by hand, on one token's [D] outputs
COMBINES = {
    "0.5 * (routed + shared)": lambda r, s: (r + s) / 2,
    "routed + 0.25 * shared": lambda r, s: r + s / 4,
    "routed + sigmoid(shared) * shared": lambda r, s: r + s * (1 / (1 + torch.exp(-s))),
    "clamp(routed + shared, -0.3, 0.3)": lambda r, s: torch.where((r + s).abs() <= 0.3, r + s, 0.3 * torch.sign(r + s)),
    # bounds that are expressions of constants (a clamp, as numbers are: torch.maximum takes no Python number)
    "clamp(routed + shared, -sigmoid(0) / 2, exp(0) / 4)":
        lambda r, s: torch.where((r + s).abs() <= 0.25, r + s, 0.25 * torch.sign(r + s)),
}

SHARED = {
    "plain": {"count": 1},
    "sigmoid_gate": {"count": 2, "gate": "sigmoid"},
    "routed": {"count": 2, "gate": "router"},
}


def _spec(combine: str, shared: str, identity: int = 0) -> dict:
    return {"name": "combine", "moe": {
        "hidden_size": D,
        "experts": {"num_experts": E, "intermediate_size": F_, "activation": "swiglu", "identity_experts": identity},
        "shared_experts": {**SHARED[shared], "combine": combine},
        "router": {"top_k": 2, "score": "softmax", "normalize": True}}}


def _layer(spec, tmp_path):
    layer = moegraph.compile(spec, out_dir=tmp_path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return layer


@pytest.mark.parametrize("shared", list(SHARED))
@pytest.mark.parametrize("combine", list(COMBINES))
def test_layer_equals_the_loop_with_the_combination_by_hand(combine, shared, tmp_path):
    spec = _spec(combine, shared, identity=1 if shared == "plain" else 0)
    layer = _layer(spec, tmp_path).train()
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    gy = torch.randn(9, D, generator=torch.Generator().manual_seed(2))
    params = list(layer.parameters())
    y = layer(x)
    want = reference_forward(spec, layer, x, combine=COMBINES[combine])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y, [x, *params], gy)
    ref = torch.autograd.grad(want, [x, *params], gy, allow_unused=True)
    for (n, _), a, b in zip([("x", None), *layer.named_parameters()], got, ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-5, atol=1e-5, msg=n)
    with torch.no_grad():  # the eval graph (FX passes, inference strategies) agrees too
        torch.testing.assert_close(layer.eval()(x), want, rtol=1e-5, atol=1e-5)


def test_the_sum_written_out_is_the_spec_without_the_field():
    base = _spec("routed + shared", "plain")
    written = moegraph.load_spec(base)
    del base["moe"]["shared_experts"]["combine"]
    assert written.hash() == moegraph.load_spec(base).hash()
    assert "combine" not in written.model_dump(mode="json")["moe"]["shared_experts"]
    assert moegraph.load_spec(_spec("0.5 * (routed + shared)", "plain")).hash() != written.hash()


@pytest.mark.parametrize("combine,words", [
    ("routed + shred", "unknown name 'shred'"),
    ("routed", "does not use 'shared'"),
    ("2 * shared", "does not use 'routed'"),
    ("routed + log(shared)", "not finite"),
    ("__import__('os').system('true') + routed + shared", "__import__"),
    ("routed.sum() + shared", "are allowed"),
    ("routed + shared\nimport os", "line break"),
])
def test_bad_combinations_are_refused_by_field(combine, words):
    with pytest.raises(SpecError) as err:
        moegraph.load_spec(_spec(combine, "plain"))
    msg = str(err.value)
    assert "shared_experts.combine" in msg and words in msg, msg


def test_a_combination_without_shared_experts_is_refused():
    spec = _spec("0.5 * (routed + shared)", "plain")
    spec["moe"]["shared_experts"] = {"count": 0, "combine": "0.5 * (routed + shared)"}
    with pytest.raises(SpecError, match=r"shared_experts.combine.*count is 0"):
        moegraph.load_spec(spec)
