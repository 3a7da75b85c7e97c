"""The spec language: presets, defaults, round trips through every file format, the canonical hash."""

from __future__ import annotations

import json
import pathlib
import random
import re

import pydantic
import pytest
import yaml

import moegraph
from moegraph.errors import SpecError
from moegraph.loader import SPEC_SUFFIXES, dump_spec, load_spec, preset_path, presets, read_spec_dict
from moegraph.spec import (
    SCORE_FUNCTIONS,
    ExplicitTopology,
    ExpertChoiceRouter,
    HashRouter,
    MoESpec,
    TopKRouter,
    UniformTopology,
    score_expression,
)

PRESETS = sorted(presets())

TINY = {
    "moe": {
        "hidden_size": 16,
        "experts": {"num_experts": 4, "intermediate_size": 8},
        "router": {"top_k": 2},
    }
}


def _shuffled(obj, rng: random.Random):
    """The same mapping with keys in a random order, at every level."""
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_shuffled(v, rng) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def test_presets_found():
    # The published models that the summary tests compare against must be bundled.
    for name in ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "mixtral-8x7b"):
        assert name in PRESETS
    assert PRESETS == list(presets()), "presets() should be sorted by name"
    assert all(p.suffix in SPEC_SUFFIXES for p in presets().values())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates(name):
    spec = load_spec(name)
    assert isinstance(spec, MoESpec)
    assert spec.name == name, "a preset's name field should match its file name"
    assert re.fullmatch(r"[0-9a-f]{64}", spec.hash())
    assert load_spec(preset_path(name)) == spec


@pytest.mark.parametrize("name", PRESETS)
def test_preset_states_source(name):
    text = preset_path(name).read_text()
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    source_lines = [c for c in comments if re.search(r"\bsource:", c, re.IGNORECASE)]
    assert source_lines, f"{name}: no '# Source: ...' comment"
    cited = " ".join(comments)
    # Either a paper / config reference, or "scaled from <another preset>.yaml".
    scaled = re.findall(r"scaled (?:down )?from ([\w.-]+)\.yaml", cited)
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", cited) or scaled, f"{name}: the source comment cites nothing"
    for parent in scaled:
        assert parent in PRESETS, f"{name} says it is scaled from {parent}.yaml, which is not a preset"
    assert load_spec(name).source.strip(), f"{name}: the 'source' field is empty"


# --------------------------------------------------------------------------------------------
# Round trips and the hash
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_every_format(name, tmp_path):
    spec = load_spec(name)
    current = spec
    # YAML -> JSON -> TOML -> YAML: each hop dumps the previous load.
    for i, ext in enumerate(["yaml", "json", "toml", "yml"]):
        path = dump_spec(current, tmp_path / f"hop{i}.{ext}")
        current = load_spec(path)
        assert current.hash() == spec.hash(), f"hash changed after the .{ext} hop"
        assert current == spec
    # Each file parses as its own format.
    assert yaml.safe_load((tmp_path / "hop0.yaml").read_text())["name"] == name
    assert json.loads((tmp_path / "hop1.json").read_text())["name"] == name


@pytest.mark.parametrize("ext", ["yaml", "json", "toml"])
def test_round_trip_non_preset_features(ext, tmp_path):
    """Features no preset uses: explicit topology, layer_types, custom score, clamps, capacity, hash router."""
    d = json.loads(json.dumps(TINY))
    d["model"] = {"num_layers": 3, "layer_types": ["dense", "moe", "moe"], "dense_intermediate_size": 8}
    d["moe"]["experts"].update(gate_clamp=7.0, up_clamp=7.0)
    d["moe"]["router"].update(score="sqrt(softplus(x))", capacity={"factor": 1.25}, groups={"num_groups": 2,
                              "topk_groups": 1, "tie_to": "node"})
    d["topology"] = {
        "devices": [{"name": f"g{i}", "node": f"n{i // 2}"} for i in range(4)],
        "links": [{"a": "g0", "b": "g2", "bandwidth_gbps": 50.0, "latency_us": 3.0}],
    }
    hashed = json.loads(json.dumps(TINY))
    hashed["moe"]["router"] = {"type": "hash", "method": "random", "vocab_size": 50, "seed": 3}
    for data in (d, hashed):
        spec = load_spec(data)
        again = load_spec(dump_spec(spec, tmp_path / f"s.{ext}"))
        assert again == spec and again.hash() == spec.hash()


def test_dump_spec_writes_whole_or_names_the_path(tmp_path, monkeypatch):
    from moegraph.errors import MoegraphError

    spec = load_spec(TINY)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(MoegraphError, match=r"folder\.yaml"):  # IsADirectoryError before
        dump_spec(spec, tmp_path / "folder.yaml")
    out = dump_spec(spec, tmp_path / "s.yaml")
    monkeypatch.setattr(pathlib.Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(MoegraphError, match="nothing was written"):
        dump_spec(spec, out)
    assert load_spec(out) == spec and sorted(p.name for p in tmp_path.iterdir()) == ["folder.yaml", "s.yaml"]


@pytest.mark.parametrize("name", PRESETS)
def test_hash_stable_across_key_order(name):
    data, _ = read_spec_dict(preset_path(name))
    h = load_spec(data).hash()
    for seed in range(3):
        assert load_spec(_shuffled(data, random.Random(seed))).hash() == h


def test_hash_is_canonical_json_sha256():
    import hashlib

    spec = load_spec(TINY)
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert spec.hash() == hashlib.sha256(blob.encode()).hexdigest()
    assert spec.short_hash == spec.hash()[:12]


def test_hash_changes_with_any_value():
    base = load_spec(TINY).hash()
    changed = json.loads(json.dumps(TINY))
    changed["moe"]["router"]["top_k"] = 3
    assert load_spec(changed).hash() != base
    named = dict(TINY, name="other")
    assert load_spec(named).hash() != base


def test_negative_zero_hashes_and_generates_as_zero():
    """-0.0 equals 0.0: the spec compares equal, so its hash, dump and generated layer (the codegen cache key)
    are the same; a plan made for one matches the other."""
    from moegraph.codegen import render

    zero, negzero = json.loads(json.dumps(TINY)), json.loads(json.dumps(TINY))
    zero["moe"]["router"]["jitter"], negzero["moe"]["router"]["jitter"] = 0.0, -0.0
    negzero["topology"] = {"nodes": 1, "gpus_per_node": 1, "intra_node_latency_us": -0.0}
    zero["topology"] = {"nodes": 1, "gpus_per_node": 1, "intra_node_latency_us": 0.0}
    a, b = load_spec(zero), load_spec(negzero)
    assert a == b and a.differences_shown(b) == "nothing"
    assert a.hash() == b.hash() and "-0.0" not in json.dumps(b.to_dict())
    assert render(a) == render(b)


def test_differences_name_every_field_the_hash_sees():
    base = load_spec(TINY)
    assert base.differences(load_spec(json.loads(json.dumps(TINY)))) == [] and base.differences_shown(base) == "nothing"
    changed = json.loads(json.dumps(TINY))
    changed["moe"]["router"]["top_k"] = 3
    changed["name"] = "other"
    other = load_spec(changed)
    assert other.hash() != base.hash()
    top_k = ("moe.router.top_k", str(base.moe.router.top_k), "3")
    assert base.differences(other) == [("name", json.dumps(base.name), '"other"'), top_k]
    assert base.differences(other, ("moe",)) == [top_k] and base.differences(other, ("model", "topology")) == []
    assert base.differences_shown(other, ("moe",), labels=("here", "there")) == f"moe.router.top_k: {top_k[1]} here, 3 there"
    assert base.differences_shown(other, limit=1) == f'name: {json.dumps(base.name)} vs "other" (and 1 more)'


def test_defaults_spelled_out_equal_defaults_omitted():
    # Writing a default explicitly must not change the spec or its hash.
    explicit = json.loads(json.dumps(TINY))
    explicit["moe"]["router"].update(type="topk", score="softmax", normalize=False)
    explicit["topology"] = {"kind": "uniform", "nodes": 1, "gpus_per_node": 1}
    assert load_spec(explicit).hash() == load_spec(TINY).hash()


def test_all_presets_have_distinct_hashes():
    hashes = {load_spec(n).hash() for n in PRESETS}
    assert len(hashes) == len(PRESETS)


# --------------------------------------------------------------------------------------------
# Models: defaults, discriminators, derived values
# --------------------------------------------------------------------------------------------


def test_router_type_defaults_to_topk_and_discriminates():
    assert isinstance(load_spec(TINY).moe.router, TopKRouter)
    ec = json.loads(json.dumps(TINY))
    ec["moe"]["router"] = {"type": "expert_choice", "capacity_factor": 1.5}
    spec = load_spec(ec)
    assert isinstance(spec.moe.router, ExpertChoiceRouter)
    assert spec.moe.top_k == 2  # round(1.5) experts per token on average
    hashed = json.loads(json.dumps(TINY))
    hashed["moe"]["router"] = {"type": "hash", "method": "modulo", "top_k": 2}
    assert isinstance(load_spec(hashed).moe.router, HashRouter)


def test_topology_kind_inferred_from_devices():
    d = json.loads(json.dumps(TINY))
    d["topology"] = {"devices": [{"name": f"g{i}", "node": f"n{i // 2}"} for i in range(4)]}
    spec = load_spec(d)
    assert isinstance(spec.topology, ExplicitTopology)
    assert spec.topology.num_gpus == 4
    assert isinstance(load_spec(TINY).topology, UniformTopology)


def test_group_tie_to_node_counts_explicit_nodes():
    d = json.loads(json.dumps(TINY))
    d["moe"]["router"]["groups"] = {"num_groups": 2, "topk_groups": 1, "tie_to": "node"}
    d["topology"] = {"devices": [{"name": f"g{i}", "node": f"n{i // 2}"} for i in range(4)]}
    assert load_spec(d).moe.router.groups.num_groups == 2


def test_layer_pattern():
    v3 = load_spec("deepseek-v3").model
    types = v3.resolved_layer_types()
    assert types[:3] == ("dense",) * 3 and set(types[3:]) == {"moe"} and len(types) == 61
    assert v3.num_moe_layers == 58
    sw = load_spec("switch-base-128").model  # first_k_dense 1, every other layer
    assert sw.moe_layer_indices == (1, 3, 5, 7, 9, 11)
    d = json.loads(json.dumps(TINY))
    d["model"] = {"num_layers": 3, "layer_types": ["moe", "dense", "moe"], "dense_intermediate_size": 8}
    assert load_spec(d).model.moe_layer_indices == (0, 2)


def test_shared_intermediate_size_defaults_to_routed():
    d = json.loads(json.dumps(TINY))
    d["moe"]["shared_experts"] = {"count": 1}
    assert load_spec(d).moe.shared_intermediate_size == 8
    d["moe"]["shared_experts"] = {"count": 1, "intermediate_size": 24}
    assert load_spec(d).moe.shared_intermediate_size == 24


@pytest.mark.parametrize("expr", ["sqrt(softplus(x))", "x * 2 + 1", "-x", "x ** 2 / 3.5", "exp(-abs(x))"])
def test_custom_score_expressions_accepted(expr):
    d = json.loads(json.dumps(TINY))
    d["moe"]["router"]["score"] = expr
    spec = load_spec(d)
    assert spec.moe.router.score == expr  # kept verbatim, never rewritten
    assert score_expression(expr) == expr


def test_named_scores():
    assert score_expression("sigmoid") == "sigmoid(x)"
    assert score_expression("softmax") == "softmax"
    for name in SCORE_FUNCTIONS:
        d = json.loads(json.dumps(TINY))
        d["moe"]["router"]["score"] = name
        assert load_spec(d).moe.router.score == name


def test_spec_is_frozen():
    spec = load_spec(TINY)
    with pytest.raises(pydantic.ValidationError):
        spec.moe.hidden_size = 3  # type: ignore[misc]


def test_load_spec_passes_spec_through_and_accepts_mappings():
    spec = load_spec(TINY)
    assert load_spec(spec) is spec
    assert moegraph.load_spec is load_spec
    with pytest.raises(SpecError, match="expected a spec file path"):
        load_spec(42)  # type: ignore[arg-type]


def test_numbers_are_not_rewritten():
    # Values come back exactly as written; float fields keep their value, ints stay ints.
    d = json.loads(json.dumps(TINY))
    d["moe"]["router"]["scaling_factor"] = 2.5
    spec = load_spec(d)
    dumped = spec.to_dict()
    assert dumped["moe"]["router"]["scaling_factor"] == 2.5
    assert dumped["moe"]["experts"]["num_experts"] == 4 and isinstance(dumped["moe"]["experts"]["num_experts"], int)
