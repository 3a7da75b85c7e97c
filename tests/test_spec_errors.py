"""Bad specs: each kind of mistake gives one Problem at the offending field with a message saying what
to do, and ``moegraph validate`` exits 2 without a traceback. Hypothesis checks that nothing but a
SpecError ever escapes ``load_spec``."""

from __future__ import annotations

import copy
import json
import re
import string
import warnings
from collections.abc import Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moegraph.errors import Problem, SpecError
from moegraph.loader import load_spec, preset_path, presets, read_spec_dict
from moegraph.spec import MAX_SCORE_EXPRESSION, MoESpec

BASE = {
    "name": "probe",
    "moe": {
        "hidden_size": 32,
        "experts": {"num_experts": 8, "intermediate_size": 16},
        "router": {"type": "topk", "top_k": 2},
    },
    "topology": {"nodes": 1, "gpus_per_node": 2},
}

EXPLICIT = {"kind": "explicit", "devices": [{"name": "g0", "node": "n0"}, {"name": "g1", "node": "n0"}]}


def _set(path: str, value) -> Callable[[dict], None]:
    """A mutation that sets the dotted ``path`` (creating sections on the way) to ``value``."""

    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value

    return apply


def _delete(path: str) -> Callable[[dict], None]:
    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]

    return apply


def _all(*fs: Callable[[dict], None]) -> Callable[[dict], None]:
    def apply(d: dict) -> None:
        for f in fs:
            f(d)

    return apply


# (id, mutation of BASE, expected Problem path, phrases the message must contain)
CASES: list[tuple[str, Callable[[dict], None], str, tuple[str, ...]]] = [
    ("unknown-key-did-you-mean", _set("moe.router.topk", 2), "moe.router.topk", ("unknown key 'topk'", "did you mean 'top_k'")),
    ("unknown-top-level-key", _set("modle", {}), "modle", ("did you mean 'model'",)),
    ("key-in-wrong-section", _set("moe.top_k", 2), "moe.top_k", ("belongs in moe.router",)),
    ("unknown-key-no-match", _set("moe.experts.zzz", 1), "moe.experts.zzz", ("allowed keys:", "num_experts")),
    ("missing-required-field", _delete("moe.experts.num_experts"), "moe.experts.num_experts", ("missing", "add it")),
    ("missing-moe-section", _delete("moe"), "moe", ("missing",)),
    ("top-k-exceeds-experts", _set("moe.router.top_k", 9), "moe.router.top_k", ("exceeds experts.num_experts (8)", "top_k <= 8")),
    ("groups-do-not-divide", _set("moe.router.groups", {"num_groups": 3, "topk_groups": 1}),
     "moe.router.groups.num_groups", ("must divide", "choose one of [1, 2, 4, 8]")),
    ("topk-groups-exceed-groups", _set("moe.router.groups", {"num_groups": 2, "topk_groups": 3}),
     "moe.router.groups.topk_groups", ("exceeds num_groups (2)", "keep at most")),
    ("top-n-exceeds-group", _set("moe.router.groups", {"num_groups": 4, "topk_groups": 2, "group_score": "sum_topn", "top_n": 3}),
     "moe.router.groups.top_n", ("2 experts per group", "top_n <= 2")),
    ("groups-keep-too-few", _set("moe.router.groups", {"num_groups": 8, "topk_groups": 1}),
     "moe.router.groups.topk_groups", ("fewer than top_k (2)", "raise topk_groups")),
    ("bad-score-name", _set("moe.router.score", "sigmod"), "moe.router.score", ("unknown score function", "did you mean 'sigmoid'")),
    ("score-import", _set("moe.router.score", "__import__('os')"), "moe.router.score", ("only calls of",)),
    ("score-attribute", _set("moe.router.score", "x.real"), "moe.router.score", ("Attribute is not allowed",)),
    ("score-unknown-name", _set("moe.router.score", "y + x"), "moe.router.score", ("unknown name 'y'", "use the logit 'x'")),
    ("score-without-x", _set("moe.router.score", "2 + 3"), "moe.router.score", ("does not use the router logit",)),
    ("score-constant-in-x", _set("moe.router.score", "x * 0 + 1"), "moe.router.score",
     ("does not depend on x", "every token would pick the same experts", "e.g. sigmoid(x)")),
    # normalize divides by a sum of scores that can cancel to near zero
    ("normalize-negative-score", _all(_set("moe.router.score", "tanh"), _set("moe.router.normalize", True)),
     "moe.router.normalize", ("score 'tanh' is negative for some logits", "drop normalize")),
    ("hash-normalize-negative-score", _set("moe.router", {"type": "hash", "top_k": 2, "method": "modulo",
                                                          "score": "identity", "normalize": True}),
     "moe.router.normalize", ("score 'identity' is negative", "use a non-negative score")),
    ("score-keyword-call", _set("moe.router.score", "sigmoid(x, out=x)"), "moe.router.score", ("positional arguments",)),
    ("score-too-long", _set("moe.router.score", "x" + "+x" * 200), "moe.router.score", (f"under {MAX_SCORE_EXPRESSION}",)),
    ("score-syntax", _set("moe.router.score", "x +* 2"), "moe.router.score", ("is not valid",)),
    ("topk-then-score-sigmoid", _set("moe.router", {"top_k": 2, "score": "sigmoid", "topk_order": "topk_then_score"}),
     "moe.router.topk_order", ("only differs", "use topk_order: score_then_topk")),
    ("duplicate-aux-loss", _set("moe.router.aux_losses", [{"kind": "z_loss", "coef": 0.1}, {"kind": "z_loss", "coef": 0.2}]),
     "moe.router.aux_losses.1.kind", ("listed more than once", "give each kind once")),
    ("expert-choice-balance-loss",
     _set("moe.router", {"type": "expert_choice", "aux_losses": [{"kind": "expert_balance", "coef": 0.01}]}),
     "moe.router.aux_losses.0.kind", ("balanced by construction", "only z_loss")),
    ("hash-random-without-vocab", _set("moe.router", {"type": "hash", "method": "random"}),
     "moe.router.vocab_size", ("needs vocab_size", "method: modulo")),
    ("gate-clamp-non-gated", _all(_set("moe.experts.activation", "relu"), _set("moe.experts.gate_clamp", 7.0)),
     "moe.experts.gate_clamp", ("gated activations only", "use a gated activation")),
    ("up-clamp-non-gated", _all(_set("moe.experts.activation", "gelu"), _set("moe.experts.up_clamp", 7.0)),
     "moe.experts.up_clamp", ("gated activations only",)),
    ("shared-gate-without-shared", _set("moe.shared_experts", {"gate": "sigmoid"}),
     "moe.shared_experts.gate", ("needs at least one shared expert", "set count >= 1")),
    ("shared-size-without-shared", _set("moe.shared_experts", {"intermediate_size": 64}),
     "moe.shared_experts.intermediate_size", ("count is 0", "set count >= 1")),
    ("negative-number", _set("moe.hidden_size", -1), "moe.hidden_size", ("must be greater than 0", "got -1")),
    ("zero-experts", _set("moe.experts.num_experts", 0), "moe.experts.num_experts", ("must be greater than 0",)),
    ("above-upper-bound", _set("moe.router.jitter", 1.5), "moe.router.jitter", ("must be less than 1",)),
    ("negative-coef", _set("moe.router.aux_losses", [{"kind": "z_loss", "coef": -1}]),
     "moe.router.aux_losses.0.coef", ("must be at least 0",)),
    ("wrong-type-int", _set("moe.hidden_size", "big"), "moe.hidden_size", ("expected an integer", "'big'")),
    ("wrong-type-bool", _set("moe.router.normalize", "maybe"), "moe.router.normalize", ("expected true or false",)),
    ("fractional-int", _set("moe.hidden_size", 32.5), "moe.hidden_size", ("whole number",)),
    ("bool-as-number", _set("moe.hidden_size", True), "moe.hidden_size", ("got the boolean true",)),
    ("nan-number", _set("moe.router.scaling_factor", float("nan")), "moe.router.scaling_factor", ("finite number",)),
    ("infinite-bandwidth", _set("topology.intra_node_bandwidth_gbps", float("inf")),
     "topology.intra_node_bandwidth_gbps", ("finite number",)),
    ("section-not-mapping", _set("moe.router", 5), "moe.router", ("expected a mapping", "'type' one of")),
    ("list-expected", _set("moe.router.aux_losses", "z_loss"), "moe.router.aux_losses", ("expected a list",)),
    ("list-item-not-mapping", _set("moe.router.aux_losses", ["z_loss"]), "moe.router.aux_losses.0", ("expected a mapping",)),
    ("activation-unknown-name", _set("moe.experts.activation", "silu(gate) * y"), "moe.experts.activation",
     ("unknown name 'y'", "'gate' and 'up'")),
    ("activation-arity", _set("moe.experts.activation", "min(gate) * up"), "moe.experts.activation",
     ("min takes exactly 2 arguments",)),
    ("activation-not-elementwise", _set("moe.experts.activation", "softmax(gate) * up"), "moe.experts.activation",
     ("unknown function 'softmax'", "one elementwise function")),
    ("activation-injection", _set("moe.experts.activation", "gate.__class__ * up"), "moe.experts.activation",
     ("Attribute is not allowed",)),
    ("activation-not-finite", _set("moe.experts.activation", "sqrt(gate) * up"), "moe.experts.activation",
     ("not finite at gate = -30", "sqrt(relu(x))")),
    ("activation-clamp-keyword", _set("moe.experts.activation", "clamp(gate, upper=7) * up"),
     "moe.experts.activation", ("upper as a keyword", "clamp(v, max=hi)")),
    ("bad-choice-did-you-mean", _set("moe.experts.activation", "swigl"), "moe.experts.activation",
     ("'swiglu'", "did you mean 'swiglu'")),
    # torch dtypes that are deliberately not spec dtypes say where they belong (not "did you mean 'float16'")
    ("dtype-float64-is-a-compile-argument", _set("moe.dtype", "float64"), "moe.dtype",
     ("'float64' is not a spec dtype", "dtype=torch.float64 to moegraph.compile")),
    ("router-dtype-fp8-is-a-storage-format", _set("moe.router_dtype", "float8_e4m3fn"), "moe.router_dtype",
     ("not a spec dtype", "add a moe.quantization section")),
    ("dtype-typo-did-you-mean", _set("moe.dtype", "bfloat61"), "moe.dtype", ("did you mean 'bfloat16'",)),
    ("unknown-router-type", _set("moe.router.type", "tokenchoice"), "moe.router.type",
     ("unknown type 'tokenchoice'", "'topk', 'expert_choice', 'hash'")),
    ("router-type-null", _set("moe.router.type", None), "moe.router.type", ("'type' must be one of",)),
    ("unknown-topology-kind", _set("topology", {"kind": "ring"}), "topology.kind", ("unknown kind 'ring'", "'explicit'")),
    ("unknown-attention-kind", _set("model", {"attention": {"kind": "gqa", "num_heads": 4}}), "model.attention.kind",
     ("unknown kind 'gqa'", "'mha', 'mla'")),
    # the parameter counts used hidden_size // num_heads: 0 wide heads and attention counted as no parameters
    ("heads-wider-than-hidden", _set("model", {"attention": {"kind": "mha", "num_heads": 64}}),
     "model.attention.num_heads", ("leave no width per head", "set model.attention.head_dim")),
    ("link-unknown-device",
     _set("topology", dict(EXPLICIT, links=[{"a": "g0", "b": "g9", "bandwidth_gbps": 100}])),
     "topology.links.0.b", ("unknown device 'g9'", "['g0', 'g1']")),
    ("duplicate-device-names",
     _set("topology", {"devices": [{"name": "g0", "node": "n0"}, {"name": "g0", "node": "n1"}]}),
     "topology.devices.1.name", ("'g0' is used by devices 0 and 1", "unique name")),
    ("self-link", _set("topology", dict(EXPLICIT, links=[{"a": "g1", "b": "g1", "bandwidth_gbps": 100}])),
     "topology.links.0.b", ("to itself", "drop it")),
    ("no-devices", _set("topology", {"kind": "explicit", "devices": []}), "topology.devices", ("at least 1",)),
    ("tie-to-device-count", _set("moe.router.groups", {"num_groups": 4, "topk_groups": 2, "tie_to": "device"}),
     "moe.router.groups.num_groups", ("device count (2)", "set tie_to: none")),
    ("tie-to-node-count", _set("moe.router.groups", {"num_groups": 2, "topk_groups": 1, "tie_to": "node"}),
     "moe.router.groups.num_groups", ("node count (1)",)),
    ("slots-not-divisible", _set("placement.redundant_slots", 1), "placement.redundant_slots",
     ("9 slots", "multiple of 2")),
    ("slots-more-per-gpu-than-experts", _set("placement.redundant_slots", 10), "placement.redundant_slots",
     ("9 per GPU but there are only 8 experts", "hold one expert twice", "at most 8", "more GPUs")),
    ("layer-types-length", _set("model", {"num_layers": 3, "layer_types": ["moe", "dense"]}), "model.layer_types",
     ("lists 2 layers but num_layers is 3", "make them agree")),
    ("layer-types-no-moe", _set("model", {"num_layers": 2, "layer_types": ["dense", "dense"]}), "model.layer_types",
     ("no 'moe' layer",)),
    ("layer-types-and-first-k", _set("model", {"num_layers": 2, "layer_types": ["dense", "moe"], "first_k_dense": 1}),
     "model.first_k_dense", ("would be ignored", "give either layer_types")),
    ("first-k-dense-too-large", _set("model", {"num_layers": 3, "first_k_dense": 3}), "model.first_k_dense",
     ("leaves no MoE layer", "lower it")),
    ("dense-size-missing", _set("model", {"num_layers": 2, "first_k_dense": 1, "vocab_size": 1000}),
     "model.dense_intermediate_size", ("no dense_intermediate_size", "set it")),
    ("non-string-key", _set("moe.experts", {"num_experts": 8, "intermediate_size": 16, 3: 1}), "moe.experts.3",
     ("keys must be strings",)),
    ("empty-name", _set("name", ""), "name", ("must not be empty",)),
    # FP8 experts (moe.quantization): BASE has hidden_size 32 and intermediate_size 16.
    ("fp8-block-does-not-divide", _set("moe.quantization", {"weight_block": [16, 12], "activation_tile": [1, 16]}),
     "moe.quantization.weight_block.1", ("weight block columns (12) must divide hidden_size (32), "
                                         "experts.intermediate_size (16)", "e.g. 16")),
    ("fp8-tile-does-not-divide", _set("moe.quantization", {"weight_block": [16, 16], "activation_tile": [1, 12]}),
     "moe.quantization.activation_tile.1", ("activation tile width (12) must divide hidden_size (32), "
                                            "experts.intermediate_size (16)", "e.g. 16")),
    ("fp8-tile-two-rows", _set("moe.quantization", {"weight_block": [16, 16], "activation_tile": [2, 16]}),
     "moe.quantization.activation_tile.0", ("one token tall", "activation_tile: [1, 16]")),
    ("fp8-shared-without-shared", _set("moe.quantization", {"weight_block": [16, 16], "activation_tile": [1, 16],
                                                            "shared_experts": True}),
     "moe.quantization.shared_experts", ("no shared expert", "set it false")),
    ("fp8-unknown-format", _set("moe.quantization", {"format": "fp8_e4m3fn"}), "moe.quantization.format",
     ("fp8_e4m3",)),
    # entries of a tuple of numbers are as strict as a number field: no quoted numbers, no booleans
    ("fp8-block-quoted", _set("moe.quantization", {"weight_block": ["16", 16], "activation_tile": [1, 16]}),
     "moe.quantization.weight_block.0", ("expected an integer, got the string '16'", "without quotes")),
    ("fp8-block-boolean", _set("moe.quantization", {"weight_block": [True, 16], "activation_tile": [1, 16]}),
     "moe.quantization.weight_block.0", ("got the boolean true", "write the number")),
    ("fp8-tile-quoted", _set("moe.quantization", {"weight_block": [16, 16], "activation_tile": [1, " 1_6 "]}),
     "moe.quantization.activation_tile.1", ("got the string ' 1_6 '",)),
    ("activation-folds-to-a-constant", _set("moe.experts.activation", "gate * 0 + 1"), "moe.experts.activation",
     ("does not depend on gate or up", "folds to a constant")),
    # gated (an up projection of 2F) but one half never read: F parameters per expert row for nothing
    ("activation-gated-without-up", _set("moe.experts.activation", "silu(gate)"), "moe.experts.activation",
     ("uses gate but not up", "write it in x ('silu(x)')")),
    ("activation-gated-without-gate", _set("moe.experts.activation", "clamp(up, max=7) * 2"), "moe.experts.activation",
     ("uses up but not gate", "'clamp(x, max=7) * 2'")),
    ("fp8-triton-tile", _all(_set("moe.quantization", {"weight_block": [16, 16], "activation_tile": [1, 8]}),
                             _set("codegen.backend", "triton")),
     "moe.quantization.activation_tile.1", ("Triton FP8 kernels", "activation_tile: [1, 16]")),
    ("fp8-triton-block-below-16", _all(_set("moe.quantization", {"weight_block": [8, 16], "activation_tile": [1, 16]}),
                                       _set("codegen.backend", "triton")),
     "moe.quantization.weight_block.0", ("power of two of 16 or more", "got 8", "use 16", "codegen.backend: torch")),
    ("fp8-triton-block-not-power-of-two",
     _all(_set("moe.hidden_size", 96), _set("moe.experts.intermediate_size", 48),
          _set("moe.quantization", {"weight_block": [16, 48], "activation_tile": [1, 48]}),
          _set("codegen.backend", "triton")),
     "moe.quantization.weight_block.1", ("power of two of 16 or more", "got 48", "use 16", "codegen.backend: torch")),
    ("fp8-triton-biases", _all(_set("moe.quantization", {"weight_block": [16, 16], "activation_tile": [1, 16]}),
                               _set("moe.experts.bias", True), _set("codegen.backend", "triton")),
     "moe.experts.bias", ("no expert biases", "codegen.backend: torch")),
    ("fp8-input-scaled-experts", _all(_set("moe.quantization", {"weight_block": [16, 16], "activation_tile": [1, 16]}),
                                      _set("moe.experts.routing_weight", "input")),
     "moe.experts.routing_weight", ("FP8 experts weight each expert's output", "set routing_weight: output")),
    # a wrong key in the only device: that problem alone (not also "devices: needs at least 1 entries, got 0")
    ("typo-in-the-only-device", _set("topology", {"devices": [{"name": "g0", "node": "n0", "memory_gb": 80}]}),
     "topology.devices.0.memory_gb", ("did you mean 'memory_gib'",)),
    ("huge-int-shortened", _set("moe.router.aux_losses", [{"kind": "z_loss", "coef": 10**400}]),
     "moe.router.aux_losses.0.coef", ("expected a number, got int <about 401 digits>",)),
    ("huge-int-bound-shortened", _set("moe.hidden_size", -10**400), "moe.hidden_size",
     ("must be greater than 0, got -<about 401 digits>",)),
]

assert len(CASES) >= 25
assert len({c[0] for c in CASES}) == len(CASES), "case ids must be unique"


def _bad(mutate: Callable[[dict], None]) -> dict:
    d = copy.deepcopy(BASE)
    mutate(d)
    return d


def test_base_is_valid():
    assert load_spec(BASE).moe.router.top_k == 2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_message(case):
    _, mutate, path, phrases = case
    with pytest.raises(SpecError) as info:
        load_spec(_bad(mutate), source="probe.yaml")
    problems = info.value.problems
    assert [p.path for p in problems] == [path], f"expected one problem at {path}, got {problems}"
    for phrase in phrases:
        assert phrase in problems[0].message
    assert str(info.value).startswith(f"probe.yaml: {path}: ")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_cli_exit_code(case, tmp_path, run_cli):
    _, mutate, path, phrases = case
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_bad(mutate)))
    res = run_cli("validate", f)
    assert res.code == 2
    assert f"{f}: {path}: " in res.err
    assert phrases[0] in res.err
    assert "Traceback" not in res.err + res.out
    assert "ok" not in res.out


def test_every_problem_reported_at_once():
    d = _bad(_all(_set("moe.hidden_size", -1), _set("moe.experts.num_experts", 0), _set("extra", 1)))
    with pytest.raises(SpecError) as info:
        load_spec(d)
    assert sorted(p.path for p in info.value.problems) == ["extra", "moe.experts.num_experts", "moe.hidden_size"]


def test_quoted_numbers_are_reported_beside_every_other_problem():
    """A quoted number or a boolean is one problem among the others of its section, not the only one shown
    (validate stopped at the first, hiding the next quoted number and the unknown keys beside it)."""
    d = _bad(_all(_set("moe.hidden_size", "16"), _set("moe.router.top_k", "4"), _set("moe.intermediate_sizee", 3),
                  _set("moe.experts.num_experts", True), _set("moe.experts.zzz", 1)))
    with pytest.raises(SpecError) as info:
        load_spec(d)
    got = {p.path: p.message for p in info.value.problems}
    assert sorted(got) == ["moe.experts.num_experts", "moe.experts.zzz", "moe.hidden_size", "moe.intermediate_sizee",
                           "moe.router.top_k"], got
    assert "got the string '16'; write the number without quotes" in got["moe.hidden_size"]
    assert "got the string '4'" in got["moe.router.top_k"] and "got the boolean true" in got["moe.experts.num_experts"]
    assert "unknown key 'intermediate_sizee'" in got["moe.intermediate_sizee"]
    # the other problems' messages are kept as written: a user's {error} is not read as a placeholder again
    d = _bad(_all(_set("moe.router.top_k", "2"), _set("moe.router.score", "{error}")))
    with pytest.raises(SpecError) as info:
        load_spec(d)
    assert [p.message for p in info.value.problems if p.path == "moe.router.score"] == [
        "score expression '{error}': Set is not allowed"]


def test_long_lists_and_many_problems_are_bounded():
    """A list longer than its field takes is one problem, found before its entries are validated; a report
    lists MAX_PROBLEMS problems and counts the rest; duplicate device names and link ends are checked in
    linear time (65,536 devices took minutes)."""
    import time

    from moegraph.errors import MAX_PROBLEMS

    for path, value, phrase in (("moe.router.aux_losses", [1] * 100_000, "lists 100000 entries, more than the 6"),
                                ("model.layer_types", ["moe"] * 10_001, "lists 10001 entries, more than the 10000")):
        with pytest.raises(SpecError) as info:
            load_spec(_bad(_set(path, value)))
        assert [(p.path, phrase in p.message) for p in info.value.problems] == [(path, True)]
    devices = [{"name": "g", "node": "n0", "memory_gb": 80} for _ in range(200)]
    with pytest.raises(SpecError) as info:  # 200 unknown keys
        load_spec(_bad(_set("topology", {"devices": devices})))
    problems = info.value.problems
    assert len(problems) == MAX_PROBLEMS + 1 and "and 150 more problem(s) not listed" in problems[-1].message
    with pytest.raises(SpecError) as info:  # 199 duplicate names (one cross-field rule)
        load_spec(_bad(_set("topology", {"devices": [{"name": "g", "node": "n0"}] * 200})))
    assert len(info.value.problems) == MAX_PROBLEMS + 1
    assert "and 149 more problem(s)" in info.value.problems[-1].message
    many = [{"name": f"d{i}", "node": f"n{i // 8}"} for i in range(65535)]
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(_bad(_all(_set("moe.experts.num_experts", 65536), _set("topology", {
            "devices": many + [{"name": "d3", "node": "n0"}],
            "links": [{"a": "d65534", "b": "d0", "bandwidth_gbps": 1}] * 1000 + [{"a": "d1", "b": "x", "bandwidth_gbps": 1}]}))))
    assert time.perf_counter() - start < 30
    assert [p.path for p in info.value.problems] == ["topology.devices.65535.name", "topology.links.1000.b"]
    assert "device name 'd3' is used by devices 3 and 65535" in info.value.problems[0].message
    assert "use one of the devices: ['d0', 'd1', 'd2', 'd3', 'd4', 'd5', 'd6', 'd7'] and 65527 more" in info.value.problems[1].message


def test_problem_render_names_source_and_root():
    assert Problem("moe.hidden_size", "bad").render("a.yaml") == "a.yaml: moe.hidden_size: bad"
    assert Problem("", "bad").render() == "<root>: bad"


# --------------------------------------------------------------------------------------------
# File-level errors (parsing, paths)
# --------------------------------------------------------------------------------------------

FILE_CASES = [
    ("bad-yaml-syntax", "bad.yaml", "moe: {hidden_size: 3\n", "not valid YAML"),
    ("bad-json-syntax", "bad.json", '{"moe": ', "not valid JSON"),
    ("bad-toml-syntax", "bad.toml", "[moe\nhidden_size = 3\n", "not valid TOML"),
    ("wrong-extension", "spec.txt", "moe: {}\n", "unknown spec file extension '.txt'"),
    ("top-level-list", "list.yaml", "- moe\n- model\n", "top level must be a mapping"),
    ("top-level-scalar", "scalar.json", "42", "top level must be a mapping"),
    ("empty-file", "empty.yaml", "", "the file is empty"),
    ("duplicate-yaml-key", "dup.yaml", "name: a\nname: b\nmoe: {}\n", "key 'name' appears twice"),
    ("duplicate-json-key", "dup.json", '{"name": "a", "name": "b"}', "key 'name' appears twice"),
    ("python-tag", "tag.yaml", "moe: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("not-utf8", "latin.yaml", b"name: \xe9\n", "not valid YAML"),
    ("yaml-bad-timestamp-tag", "ts.yaml", "name: !!timestamp 2001-13-45\nmoe: {}\n", "not valid YAML: month"),
    ("duplicate-yaml-key-in-merge", "mdup.yaml", "moe: {<<: {hidden_size: 3, hidden_size: 4}}\n",
     "key 'hidden_size' appears twice"),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file(case, tmp_path, run_cli):
    _, fname, content, phrase = case
    f = tmp_path / fname
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    with pytest.raises(SpecError, match=r"^" + str(f).replace("\\", "\\\\") + ": <root>: ") as info:
        load_spec(f)
    assert phrase in info.value.problems[0].message
    res = run_cli("validate", f)
    assert res.code == 2 and phrase in res.err and "Traceback" not in res.err


@pytest.mark.parametrize("content,path,phrase", [
    # YAML 1.1 reads these as octal 64 / base-60 64; moegraph follows YAML 1.2 or refuses
    ("moe: {hidden_size: 0100}\n", "moe.hidden_size", "0100 (line 1) has a leading zero"),
    ("moe: {hidden_size: 1:04}\n", "moe.hidden_size", "1:04 (line 1) is a base-60 number"),
    # YAML 1.1 booleans: 'name: yes' was read as True ("expected a string, got bool"), 'normalize: on' as true
    ("name: yes\nmoe: {}\n", "name",
     "yes (line 1) is a boolean in YAML 1.1 and text in YAML 1.2; write true or false, or quote it"),
    ("moe: {router: {normalize: On}}\n", "moe.router.normalize", "On (line 1) is a boolean"),
    ("moe:\n  router:\n    aux_losses:\n      - {kind: z_loss, coef: 0.01}\n      - {kind: z_loss, coef: 010}\n",
     "moe.router.aux_losses.1.coef", "010 (line 5) has a leading zero"),
])
def test_yaml_1_1_readings_are_refused_at_their_key_path(content, path, phrase, tmp_path, run_cli):
    """A value YAML 1.1 reads otherwise than 1.2 is refused naming its full key path (it named only the last key,
    at the file's <root>), in the file and in the CLI."""
    f = tmp_path / "ambiguous.yaml"
    f.write_text(content)
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert [p.path for p in info.value.problems] == [path]
    assert str(info.value).startswith(f"{f}: {path}: {phrase}"), str(info.value)
    res = run_cli("validate", f)
    assert res.code == 2 and phrase in " ".join(res.err.split()) and "Traceback" not in res.err


BINARY_SPEC = """\
name: probe
description: "!!binary is text when quoted"
moe:
  hidden_size: 32
  experts: &e {{num_experts: 8, intermediate_size: 16, activation: {activation}}}
  router:
    type: topk
    top_k: 2
    aux_losses:
      - {{kind: {kind}, coef: 0.01}}
{extra}"""


@pytest.mark.parametrize("where,fields,line", [
    ("source", {"extra": "source: !!binary aGVsbG8="}, 11),  # 'hello': it was read as the text hello
    ("moe.experts.activation", {"activation": "!!binary c2lsdQ=="}, 5),  # 'silu': refused as "got b'silu'"
    ("moe.router.aux_losses.0.kind", {"kind": "!!binary el9sb3Nz"}, 10),
    ("model.vocab_size", {"extra": "model: {<<: {vocab_size: !!binary MTAw}}"}, 11),  # merged into model
])
def test_yaml_binary_values_are_refused_with_their_key_path(where, fields, line, tmp_path, run_cli):
    """!!binary data (PyYAML: bytes) has no place in a spec; it is refused like the YAML 1.1 readings, naming the
    file, the key path, the line and the fix, instead of reaching the fields as bytes."""
    f = tmp_path / "binary.yaml"
    f.write_text(BINARY_SPEC.format(**{"activation": "silu", "kind": "z_loss", "extra": "", **fields}))
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert [p.path for p in info.value.problems] == [where]
    assert str(info.value) == (f"{f}: {where}: !!binary value (line {line}): a spec file is text and no field takes "
                               "binary data; write the value as plain text or a number (drop the !!binary tag)")
    res = run_cli("validate", f)
    assert res.code == 2 and "!!binary value" in res.err and "Traceback" not in res.err
    f.write_text(BINARY_SPEC.format(activation="silu", kind="z_loss", extra=""))
    assert load_spec(f).description == "!!binary is text when quoted"


def test_yaml_merge_keys_dates_and_numbers_as_yaml_1_2(tmp_path):
    """Merge keys are taken (the mapping's own keys win), a date is text, leading-zero numbers refused with the fix."""
    f = tmp_path / "merge.yaml"
    f.write_text("moe:\n  hidden_size: 32\n  experts: &e {num_experts: 8, intermediate_size: 48}\n"
                 "  shared_experts: {count: 1, intermediate_size: 16}\n"
                 "  router: {top_k: 2, <<: {top_k: 4, normalize: true}}\nname: 2001-13-45\n")
    spec = load_spec(f)
    assert (spec.moe.router.top_k, spec.moe.router.normalize, spec.name) == (2, True, "2001-13-45")
    # merges of merges keep one entry per key (no blow-up: 10**30 entries otherwise)
    lines = ["m0: &m0 {num_experts: 8, intermediate_size: 48}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}" for i in range(1, 31)]
    f.write_text("\n".join(lines) + "\n")
    data, _ = read_spec_dict(f)
    assert data["m30"] == {"num_experts": 8, "intermediate_size": 48}
    f.write_text("moe:\n  experts: {num_experts: 010}\n")
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert "num_experts: 010 (line 2) has a leading zero" in str(info.value)
    assert "YAML 1.2 as decimal (10); write the number in decimal" in str(info.value)


def test_yaml_text_that_yaml_1_1_reads_as_text_stays_text_and_round_trips(tmp_path):
    """Only what PyYAML reads as a number is refused as ambiguous: 08, 09:30, 0:30 and 00:00 are text in YAML 1.1
    (not octal, base 60 starts at 1-9) and were refused; a spec named so dumps unquoted and must load back."""
    from moegraph.loader import dump_spec

    for name in ("08", "09:30", "0:30", "00:00", "0089", "y", "n", "Y"):  # (y / n are text in PyYAML too)
        spec = load_spec({**BASE, "name": name})
        f = tmp_path / "named.yaml"
        f.write_text(f"name: {name}\n" + yaml.safe_dump({k: v for k, v in BASE.items() if k != "name"}))
        assert load_spec(f).name == name
        assert load_spec(dump_spec(spec, tmp_path / "dumped.yaml")) == spec
    for number in ("0100", "-017", "1:04", "1:04.5"):
        f.write_text(f"moe:\n  hidden_size: {number}\n")
        with pytest.raises(SpecError, match=re.escape(f"hidden_size: {number} (line 2)")):
            load_spec(f)


def test_yaml_dump_quotes_text_the_loader_reads_as_a_number(tmp_path):
    """The loader reads 1e3 as a number (YAML 1.2) where PyYAML's dumper writes the string '1e3' unquoted: the dump
    of a spec named so was refused on reload ("expected a string, got float"). It now quotes it, as the loader
    resolves; a date stays text either way."""
    from moegraph.loader import dump_spec

    for text in ("1e3", "2E-5", "+1e9", "-1.5e3", "0100", "2024-01-01", "on", "OFF", "yes", "True", "1_000"):
        spec = load_spec({**BASE, "name": text, "description": text, "source": text})
        assert load_spec(dump_spec(spec, tmp_path / "dumped.yaml")) == spec, text


def test_yaml_nesting_and_merges_cannot_crash_or_stall_the_loader(tmp_path, monkeypatch):
    """Flow collections nested 50,000 deep (60 KB) crashed the process in libyaml's recursive parser; such text is
    parsed by PyYAML's own parser, which stops at Python's recursion limit. Anchors merged several times per
    level were checked once per path (4^N): each mapping is now checked once."""
    f = tmp_path / "deep.yaml"
    f.write_text("moe: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(SpecError, match="nested too deeply to be a spec"):
        load_spec(f)
    from moegraph import loader

    calls = []
    real = loader._SpecYAML._check_unique
    monkeypatch.setattr(loader._SpecYAML, "_check_unique", lambda self, node, checked: calls.append(1) or
                        real(self, node, checked))
    lines = ["a0: &a0 {k0: 1}"] + [f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}], k{i}: 1}}"
                                   for i in range(1, 9)]
    f.write_text("\n".join(lines) + "\n")
    data, _ = read_spec_dict(f)
    assert data["a8"] == {f"k{i}": 1 for i in range(9)}
    assert len(calls) < 100  # 4^8 = 65,536 before: one call per path through the merges


_BOMB = "".join(f"b{i}: &b{i} [" + ", ".join(["x"] * 10 if i == 0 else [f"*b{i - 1}"] * 10) + "]\n" for i in range(9))


@pytest.mark.parametrize("place, field", [
    ("moe.experts.activation", "moe.experts.activation"),  # a Literal-like field (literal_error, did you mean)
    ("model.layer_types", "model.layer_types.0"),  # a list of Literals: ten entries, each a list
    ("moe.router.type", "moe.router.type"),  # a union's tag
    ("moe.dtype", "moe.dtype"),
    ("model.attention.kind", "model.attention.kind"),  # pydantic's own discriminator
    ("moe.router.aux_losses.0.coef", "moe.router.aux_losses.0.coef"),
])
def test_yaml_alias_bomb_is_reported_at_once_by_its_size(tmp_path, run_cli, place, field):
    """Nine levels of ten aliases each (1e9 entries through a few shared lists) where a string or number goes:
    the error came from formatting the whole expanded value (repr, or difflib over its str) and never
    ended; a list or mapping is now described by its kind and size."""
    import time

    spec = copy.deepcopy(BASE)
    spec.setdefault("model", {"num_layers": 4})
    if place.startswith("model.attention"):
        spec["model"]["attention"] = {"kind": "mha", "num_heads": 2}
    if place.startswith("moe.router.aux_losses"):
        spec["moe"]["router"]["aux_losses"] = [{"kind": "z_loss", "coef": 0.001}]
    *parents, last = place.split(".")
    d = spec
    for key in parents:
        d = d[int(key)] if key.isdigit() else d.setdefault(key, {})
    d[last] = "BOMB"
    text = yaml.safe_dump(spec).replace("BOMB", "*b8")
    f = tmp_path / "bomb.yaml"
    f.write_text(_BOMB + text)
    start = time.perf_counter()
    r = run_cli("validate", f)
    assert time.perf_counter() - start < 5  # (well under a second here; minutes and gigabytes before)
    assert r.code == 2 and "Traceback" not in r.err
    line = next(x for x in r.err.splitlines() if f": {field}: " in x)
    assert "a list" in line and "x'" not in line, line


def test_a_byte_order_mark_is_skipped(tmp_path, run_cli):
    """Windows editors start UTF-8 files with a BOM: JSON and TOML refused it ("decode using utf-8-sig")."""
    for suffix, text in ((".json", json.dumps(BASE)), (".yaml", yaml.safe_dump(BASE)),
                         (".toml", "name = 'probe'\n[moe]\nhidden_size = 32\n[moe.experts]\nnum_experts = 8\n"
                                   "intermediate_size = 16\n[moe.router]\ntype = 'topk'\ntop_k = 2\n")):
        f = tmp_path / f"bom{suffix}"
        f.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_spec(f).moe.router.top_k == 2
        r = run_cli("validate", f)
        assert r.code == 0 and "utf-8-sig" not in r.err, r.err


def test_missing_file_and_folder(tmp_path, run_cli):
    for target, phrase in ((tmp_path / "nope.yaml", "file not found"), (tmp_path, "is a folder")):
        with pytest.raises(SpecError, match=phrase):
            load_spec(target)
        res = run_cli("validate", target)
        assert res.code == 2 and phrase in res.err and "Traceback" not in res.err


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, run_cli, monkeypatch):
    # `moegraph compile mixtral-tiny -o mixtral-tiny` makes the folder; the same command again read the name as the
    # folder ("is a folder"). A bare name is the preset's; a path to the folder says how to get the preset.
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        res = run_cli("compile", "mixtral-tiny", "-o", "mixtral-tiny")
        assert res.code == 0, res.err
    (tmp_path / "switch-tiny").write_text("not a spec")  # an extensionless file of a preset's name: never a spec
    assert load_spec("mixtral-tiny") == load_spec(preset_path("mixtral-tiny")) and load_spec("switch-tiny").name
    for path in ("mixtral-tiny/", "./mixtral-tiny", tmp_path / "mixtral-tiny"):
        res = run_cli("validate", path)
        assert res.code == 2 and "is a folder" in res.err and "for the preset 'mixtral-tiny' write its name alone" \
            in " ".join(res.err.split()), res.err


def test_unknown_preset_suggests_close_names(run_cli):
    with pytest.raises(SpecError, match="did you mean .*deepseek-v3"):
        load_spec("deepseek-v33")
    with pytest.raises(SpecError, match="presets: .*mixtral-8x7b"):
        load_spec("qqqqqqqq")
    res = run_cli("validate", "deepseek-v33")
    assert res.code == 2 and "did you mean" in res.err


#: (mutation of BASE, Problem path, the name suggested): names a valid one only pads with whitespace
PADDED = [
    (_set("moe.experts.activation", " silu"), "moe.experts.activation", "silu"),
    (_set("moe.experts.activation", "swiglu\n"), "moe.experts.activation", "swiglu"),
    (_set("moe.router.score", "sigmoid "), "moe.router.score", "sigmoid"),
    (_set("moe.router.score", "\tsoftplus"), "moe.router.score", "softplus"),
    (_set("moe.router.type", "   hash    "), "moe.router.type", "hash"),  # more padding than difflib's cutoff allows
    (_set("moe.router.topk_order", "  topk_then_score  "), "moe.router.topk_order", "topk_then_score"),
    (_set("moe.router.      top_k      ", 2), "moe.router.      top_k      ", "top_k"),
    (_set("topology", {**EXPLICIT, "links": [{"a": "g0 ", "b": "g1", "bandwidth_gbps": 100}]}), "topology.links.0.a",
     "g0"),
]


@pytest.mark.parametrize("mutate,path,name", PADDED, ids=[f"{c[1]}={c[2]}" for c in PADDED])
def test_names_padded_with_whitespace_get_a_did_you_mean(mutate, path, name):
    with pytest.raises(SpecError) as info:
        load_spec(_bad(mutate))
    assert [p.path for p in info.value.problems] == [path], info.value.problems
    assert f"did you mean '{name}'?" in info.value.problems[0].message, info.value.problems[0].message


def test_a_padded_preset_name_gets_a_did_you_mean():
    with pytest.raises(SpecError, match="did you mean switch-tiny"):
        load_spec("   switch-tiny     ")


def test_validate_reports_every_file(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_bad(_set("moe.router.top_k", 9))))
    res = run_cli("validate", "mixtral-tiny", bad, tmp_path / "missing.json")
    assert res.code == 2
    assert "ok mixtral-tiny" in res.out
    assert "moe.router.top_k" in res.err and "file not found" in res.err
    assert "2 of 3 spec(s) invalid" in res.err


def test_console_script_exit_code(tmp_path):
    """The installed ``moegraph`` entry point (not only cli.main) exits 2 without a traceback."""
    import shutil
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_bad(_set("moe.router.top_k", 9))))
    exe = shutil.which("moegraph")
    cmd = [exe] if exe else [sys.executable, "-c", "from moegraph.cli import entry; entry()"]
    proc = subprocess.run([*cmd, "validate", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "moe.router.top_k" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Hypothesis: nothing but SpecError escapes, and every Problem points at a real field
# --------------------------------------------------------------------------------------------

SCHEMA = MoESpec.model_json_schema()


def _alternatives(node: dict):
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    yield node
    for key in ("anyOf", "oneOf", "allOf"):
        for alt in node.get(key, []):
            yield from _alternatives(alt)


def _schema_has_path(segments: list[str]) -> bool:
    """Whether the dotted path names a field (or list item) in the spec's JSON Schema."""
    nodes = [SCHEMA]
    for seg in segments:
        nxt = []
        for node in nodes:
            for alt in _alternatives(node):
                if seg.isdigit() and "items" in alt:
                    nxt.append(alt["items"])
                elif seg.isdigit() and int(seg) < len(alt.get("prefixItems", ())):  # fixed-length pairs
                    nxt.append(alt["prefixItems"][int(seg)])
                elif seg in alt.get("properties", {}):
                    nxt.append(alt["properties"][seg])
        if not nxt:
            return False
        nodes = nxt
    return True


def _all_field_names() -> list[str]:
    names = set(SCHEMA["properties"])
    for d in SCHEMA["$defs"].values():
        names |= set(d.get("properties", {}))
    return sorted(names)


WORDS = [
    "topk", "expert_choice", "hash", "uniform", "explicit", "mha", "mla", "softmax", "sigmoid", "swiglu", "relu",
    "sqrt(softplus(x))", "x.real", "__import__('os')", "device", "node", "none", "sum_topn", "max", "z_loss",
    "expert_balance", "random", "modulo", "topk_then_score", "bfloat16", "g0", "g1", "n0",
]
keys = st.one_of(
    st.sampled_from(_all_field_names()),
    st.text(alphabet=string.ascii_lowercase + "_", max_size=10),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 64),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=6
)

BASES = [json.loads(json.dumps(read_spec_dict(p)[0])) for p in presets().values()] + [BASE]


def _locations(obj, prefix=()):
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _locations(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _locations(v, (*prefix, i))


@st.composite
def mutated_specs(draw) -> dict:
    """A preset (or BASE) with 1-4 random edits: replace a value, delete it, add a key, nudge a number."""
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        locs = list(_locations(data))
        if not locs:
            break
        loc = draw(st.sampled_from(locs))
        parent = data
        for part in loc[:-1]:
            parent = parent[part]
        last = loc[-1]
        op = draw(st.sampled_from(["replace", "delete", "add", "nudge"]))
        if op == "replace":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        elif op == "nudge" and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
            parent[last] = parent[last] * draw(st.sampled_from([0, -1, 2, 3])) + draw(st.integers(-2, 2))
    return data


@st.composite
def built_specs(draw) -> dict:
    """Complete specs with small numbers: many valid, many breaking one cross-field rule."""
    small = st.integers(0, 9)
    e = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
    kind = draw(st.sampled_from(["topk", "topk", "expert_choice", "hash"]))
    router: dict = {"type": kind}
    aux = draw(st.lists(st.sampled_from(["expert_balance", "z_loss", "sequence_balance"]), max_size=2))
    if kind == "topk":
        router["top_k"] = draw(st.integers(1, 9))
        router["score"] = draw(st.sampled_from(["softmax", "sigmoid", "sqrt(softplus(x))", "x * 2", "sigmod"]))
        router["topk_order"] = draw(st.sampled_from(["score_then_topk", "topk_then_score"]))
        if draw(st.booleans()):
            router["groups"] = {
                "num_groups": draw(st.integers(1, 8)),
                "topk_groups": draw(st.integers(1, 8)),
                "group_score": draw(st.sampled_from(["max", "sum_topn"])),
                "top_n": draw(st.integers(1, 4)),
                "tie_to": draw(st.sampled_from(["none", "device", "node"])),
            }
        router["aux_losses"] = [{"kind": k, "coef": 0.01} for k in aux]
    elif kind == "expert_choice":
        router["capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        router["aux_losses"] = [{"kind": k, "coef": 0.01} for k in aux]
    else:
        router["top_k"] = draw(st.integers(1, 4))
        router["method"] = draw(st.sampled_from(["modulo", "random"]))
        if draw(st.booleans()):
            router["vocab_size"] = 100
    num_layers = draw(st.integers(1, 4))
    return {
        "moe": {
            "hidden_size": draw(st.integers(1, 64)),
            "experts": {
                "num_experts": e,
                "intermediate_size": draw(st.integers(1, 64)),
                "activation": draw(st.sampled_from(["swiglu", "gelu"])),
                **({"gate_clamp": 7.0} if draw(st.booleans()) else {}),
            },
            "shared_experts": {"count": draw(st.integers(0, 2)), "gate": draw(st.sampled_from(["none", "sigmoid"]))},
            "router": router,
        },
        "model": draw(
            st.one_of(
                st.fixed_dictionaries({"num_layers": st.just(num_layers), "first_k_dense": st.integers(0, num_layers)}),
                st.fixed_dictionaries(
                    {
                        "num_layers": st.just(num_layers),
                        "layer_types": st.lists(st.sampled_from(["dense", "moe"]), min_size=1, max_size=4),
                    }
                ),
            )
        ),
        "topology": {"nodes": draw(st.integers(1, 3)), "gpus_per_node": draw(st.integers(1, 4))},
        "placement": {"redundant_slots": draw(small)},
    }


def _check_outcome(data: dict) -> MoESpec | None:
    """load_spec returns a MoESpec or raises SpecError with well-formed Problems, nothing else."""
    try:
        spec = load_spec(data)
    except SpecError as exc:
        assert exc.problems, "a SpecError must carry at least one Problem"
        for p in exc.problems:
            assert isinstance(p.message, str) and p.message.strip()
            segments = p.path.split(".") if p.path else []
            if p.message.startswith(("unknown key", "keys must be strings")):
                segments = segments[:-1]  # the last segment is the user's unknown key
            assert _schema_has_path(segments), f"problem path {p.path!r} names no field: {p.message}"
        return None
    assert isinstance(spec, MoESpec)
    # A valid spec survives dump -> load unchanged.
    again = load_spec(spec.to_dict())
    assert again == spec and again.hash() == spec.hash()
    return spec


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(mutated_specs())
def test_random_edits_raise_only_spec_error(data):
    _check_outcome(data)


@FAST
@given(built_specs())
def test_built_specs_obey_rules_when_valid(data):
    spec = _check_outcome(data)
    if spec is None:
        return
    m = spec.moe
    e = m.experts.num_experts
    assert m.top_k <= e or m.router.type == "expert_choice"
    g = getattr(m.router, "groups", None)
    if g is not None:
        assert e % g.num_groups == 0 and g.topk_groups <= g.num_groups
        assert g.topk_groups * (e // g.num_groups) >= m.router.top_k
    assert (e + spec.placement.redundant_slots) % spec.topology.num_gpus == 0
    assert spec.model.num_moe_layers >= 1


@settings(FAST, max_examples=100)
@given(st.dictionaries(keys, values, max_size=4))
def test_random_top_level_dicts(data):
    _check_outcome(data)


def test_every_cross_field_problem_of_one_rule_set_reported(tmp_path, run_cli):
    # Three rules of the routing-vs-experts set broken at once (BASE has 8 experts): all three named.
    # Plus the slot rule of the whole spec (8 + 1 slots over 2 GPUs), checked although moe is invalid.
    d = _bad(_all(_set("moe.router", {"type": "topk", "top_k": 9, "score": "softmax",
                                      "groups": {"num_groups": 3, "topk_groups": 1, "group_score": "sum_topn",
                                                 "top_n": 5}}),
                  _set("placement", {"redundant_slots": 1})))
    with pytest.raises(SpecError) as info:
        load_spec(d)
    assert [p.path for p in info.value.problems] == [
        "moe.router.top_k", "moe.router.groups.num_groups", "moe.router.groups.top_n",
        "moe.router.groups.topk_groups", "placement.redundant_slots"]
    assert "choose top_k <= 8" in info.value.problems[0].message
    assert "9 slots do not split evenly over 2 GPUs" in info.value.problems[4].message
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(d))
    res = run_cli("validate", f)
    assert res.code == 2 and res.err.count(f"{f}: moe.router") == 4 and f"{f}: placement.redundant_slots" in res.err


def test_balance_losses_need_scores_that_are_not_negative():
    # tanh / identity scores made expert_balance range over -2.6 .. 1.1 in training (audit): no lower bound
    def spec(score, kind="expert_balance"):
        return {"name": "n", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
                "router": {"top_k": 2, "score": score, "aux_losses": [{"kind": "z_loss", "coef": 0.001},
                                                                      {"kind": kind, "coef": 0.01}]}}}
    for score, kind in (("tanh", "expert_balance"), ("identity", "sequence_balance"), ("x - 1", "global_balance")):
        with pytest.raises(SpecError, match=rf"moe.router.aux_losses.1.kind: aux loss '{kind}' shares each token .* "
                                            rf"score '{re.escape(score)}' is negative for some logits"):
            load_spec(spec(score, kind))
    for score in ("softmax", "sigmoid", "softplus", "relu(x)", "square(x)"):
        load_spec(spec(score))
    load_spec({**spec("tanh"), "moe": {**spec("tanh")["moe"], "router": {
        **spec("tanh")["moe"]["router"], "aux_losses": [{"kind": "z_loss", "coef": 0.001}]}}})  # z_loss: the logits



def test_a_score_negative_only_between_the_sample_logits_is_refused_too():
    # square(x - 0.1) - 0.001 is -0.001 at x = 0.1, between two of the logits a score is sampled at (0, 0.25)
    def spec(score, **router):
        return {"name": "n", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
                "router": {"top_k": 2, "score": score, **router}}}
    dip = "square(x - 0.1) - 0.001"
    with pytest.raises(SpecError, match=rf"moe.router.normalize: .* score '{re.escape(dip)}' is negative for some "
                                        r"logits \(-0.000\d+ at x = 0.1\d*\)"):
        load_spec(spec(dip, normalize=True))
    with pytest.raises(SpecError, match=rf"aux_losses.0.kind: .* score '{re.escape(dip)}' is negative for some"):
        load_spec(spec(dip, aux_losses=[{"kind": "expert_balance", "coef": 0.01}]))
    load_spec(spec("square(x - 0.1) + 0.001", normalize=True, aux_losses=[{"kind": "expert_balance", "coef": 0.01}]))
    with pytest.raises(SpecError, match=r"score 'abs\(x\) - x' cannot be shown to be >= 0 for every logit"):
        load_spec(spec("abs(x) - x", normalize=True))

def test_min_capacity_above_an_absolute_capacity_is_warned_about():
    # capacity: {tokens: 4, min_capacity: 9} validated and ran with a capacity of 4 without a word (audit); warned,
    # not refused, so that plan files embedding such a spec still load (review)
    def spec(capacity):
        return {"name": "c", "moe": {"hidden_size": 8, "experts": {"num_experts": 4, "intermediate_size": 8},
                                     "router": {"top_k": 2, "capacity": capacity}}}
    with pytest.warns(UserWarning, match="capacity.min_capacity 9 is ignored: the capacity is tokens: 4"):
        assert load_spec(spec({"tokens": 4, "min_capacity": 9})).moe.router.capacity.tokens == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ok in ({"tokens": 4}, {"tokens": 4, "min_capacity": 4}, {"factor": 1.0, "min_capacity": 9}):
            loaded = load_spec(spec(ok))
            assert load_spec(loaded.to_dict()) == loaded


def test_other_libraries_activation_names_point_to_ours():
    def spec(act):
        return {"name": "c", "moe": {"hidden_size": 8, "experts": {"num_experts": 4, "intermediate_size": 8,
                                                                   "activation": act}, "router": {"top_k": 2}}}
    with pytest.raises(SpecError, match=r"experts.activation: 'swish' is called 'silu' here \(gated, as experts "
                                        r"usually are: 'swiglu'\)"):
        load_spec(spec("swish"))
    with pytest.raises(SpecError, match="'gelu_pytorch_tanh' is called 'gelu_tanh' here .*'geglu_tanh'"):
        load_spec(spec("gelu_pytorch_tanh"))
    with pytest.raises(SpecError, match="'Swish' is called 'silu' here"):
        load_spec(spec("Swish"))
    with pytest.raises(SpecError, match="activation names are lower case here: 'swiglu'"):
        load_spec(spec("SwiGLU"))


def test_placement_objective_weights_are_warned_about_as_unread():
    # {communication: 0} or {communication: 1000, balance: 0.001} validated and gave the default plan without a word
    # (audit); warned, not refused: the spec's hash covers them, so refusing would orphan plan files (review)
    spec = load_spec("mixtral-tiny").to_dict()
    for objective in ({"communication": 0}, {"communication": 1000, "balance": 0.001}):
        spec["placement"]["objective"] = objective
        with pytest.warns(UserWarning, match=r"placement.objective.(communication|balance) = \S+ is ignored: .*max_imbalance"):
            load_spec(spec)
    spec["placement"]["objective"] = {"communication": 1.0, "balance": 1.0}  # as every dumped spec holds it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_spec(spec) == load_spec("mixtral-tiny")
