"""``moegraph validate``, ``show``, ``schema`` and ``presets`` (run in-process through cli.main)."""

from __future__ import annotations

import json
import re

import pytest

from moegraph.loader import load_spec, presets
from moegraph.spec import MoESpec
from moegraph.summary import human, summarize


def test_validate_all_presets(run_cli):
    names = sorted(presets())
    res = run_cli("validate", *names)
    assert res.code == 0, res.err
    for name in names:
        assert f"ok {name}: {name} (hash {load_spec(name).short_hash})" in res.out
    assert res.err == ""


def test_validate_spec_file(tmp_path, run_cli):
    f = tmp_path / "mine.toml"
    f.write_text('[moe]\nhidden_size = 8\n[moe.experts]\nnum_experts = 2\nintermediate_size = 4\n[moe.router]\ntop_k = 1\n')
    res = run_cli("validate", f)
    assert res.code == 0 and f"ok {f}: unnamed" in res.out


def _table_row(out: str, label: str) -> list[str]:
    """The cells of the first table row starting with ``label``."""
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{out}")


@pytest.mark.parametrize("name", ["deepseek-v3", "mixtral-8x7b", "deepseek-v2-lite"])
def test_show_prints_expert_and_model_parameters(name, run_cli):
    res = run_cli("show", name)
    assert res.code == 0, res.err
    s = summarize(load_spec(name))
    n = s.num_moe_layers
    assert _table_row(res.out, f"routed experts, {n} layers")[1:] == [
        human(n * s.layer.routed_total), human(n * s.layer.routed_active)
    ]
    assert _table_row(res.out, f"all {n} MoE layers")[1:] == [human(s.moe_total), human(s.moe_active)]
    assert _table_row(res.out, "whole model")[1:] == [human(s.model_total), human(s.model_active)]
    assert f"hash {load_spec(name).short_hash}" in res.out
    assert "source: " in res.out


def test_show_deepseek_v3_figures(run_cli):
    # The printed whole-model figures themselves (the published 671B / 37B are checked in test_summary).
    out = run_cli("show", "deepseek-v3").out
    assert _table_row(out, "whole model")[1:] == ["671.03B", "36.63B"]
    assert _table_row(out, "one routed expert")[1] == "44.04M"  # 3 * 7168 * 2048
    flat = " ".join(out.split())  # rich wraps long lines at the console width
    assert re.search(r"routing: topk k=8 score=sigmoid .*groups=8 keep=4 \(sum_topn\) \+expert-bias", flat)
    layers = [line for line in out.splitlines() if re.search(r"│\s+(0-2|3-60)\s+│", line)]
    assert len(layers) == 2, "the 61 layers collapse into a dense run and an MoE run"


def test_show_without_model_sizes_says_what_is_missing(run_cli):
    res = run_cli("show", "mixtral-tiny")
    assert res.code == 0
    assert "whole model" not in res.out
    assert "whole-model totals need model.attention and model.vocab_size" in res.out


@pytest.mark.parametrize("name", ["expert-choice-tiny", "hash-tiny", "switch-tiny"])
def test_show_other_routers(name, run_cli):
    res = run_cli("show", name)
    assert res.code == 0, res.err
    kind = load_spec(name).moe.router.type
    assert f"routing: {kind}" in res.out


def test_show_bad_spec_exits_2(tmp_path, run_cli):
    f = tmp_path / "bad.yaml"
    f.write_text("moe: {hidden_size: 0}\n")
    res = run_cli("show", f)
    assert res.code == 2
    assert "moe.hidden_size: must be greater than 0" in res.err
    assert "moe.experts: required field is missing" in res.err
    assert "Traceback" not in res.err


def test_schema_is_json_schema(run_cli):
    res = run_cli("schema")
    assert res.code == 0
    schema = json.loads(res.out)
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"name", "description", "source", "model", "moe", "topology", "placement", "codegen"}
    assert schema["required"] == ["moe"]
    assert schema["additionalProperties"] is False
    assert {"TopKRouter", "ExpertChoiceRouter", "HashRouter", "MoELayerSpec"} <= set(schema["$defs"])
    assert schema == json.loads(json.dumps(MoESpec.model_json_schema()))
    # Every $ref resolves.
    refs = re.findall(r'"\$ref": "#/\$defs/(\w+)"', res.out)
    assert refs and all(r in schema["$defs"] for r in refs)


def test_schema_validates_presets():
    import jsonschema
    validator_cls = jsonschema.validators.validator_for(MoESpec.model_json_schema())
    validator = validator_cls(MoESpec.model_json_schema())
    for name in presets():
        validator.validate(load_spec(name).to_dict())
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"moe": {"hidden_size": 0}})


def test_schema_agrees_with_validation_on_tagged_unions():
    # A router without type is a top-k router (valid); a mapping lacking a tag validation requires (router.mlp
    # items' op, model.attention's kind, type of a non-top-k router's fields) is refused by both.
    import copy

    import jsonschema
    import yaml

    from moegraph.errors import SpecError

    schema = MoESpec.model_json_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    for path in presets().values():  # the files as written (tags left out where they default)
        validator.validate(yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else
                           json.loads(path.read_text()))
    base = {"name": "t", "moe": {"hidden_size": 16, "experts": {"num_experts": 8, "intermediate_size": 8},
                                 "router": {"type": "topk", "top_k": 2}}}
    lin = {"op": "linear", "size": 8}
    routers = [({"top_k": 2}, True), ({"top_k": 2, "normalize": True, "score": "sigmoid"}, True),
               ({"top_k": 2, "groups": {"num_groups": 2, "topk_groups": 1}}, True),
               ({"type": "hash", "top_k": 2, "method": "modulo"}, True),
               ({"type": "expert_choice", "capacity_factor": 2.0}, True),
               ({"capacity_factor": 2.0}, False), ({"top_k": 2, "method": "modulo"}, False)]
    routers += [({"top_k": 2, "mlp": mlp}, valid) for mlp, valid in [
        ([lin, {"op": "activation", "function": "gelu"}, {"op": "state"}], True), ([{"size": 8}], False),
        ([lin, {"eps": 1e-5}], False), ([lin, {"function": "gelu"}], False), ([lin, {"receive": False}], False)]]
    cases = [({**base, "moe": {**base["moe"], "router": router}}, valid) for router, valid in routers]
    cases += [({**base, "model": {"num_layers": 2, "attention": {"num_heads": 8, **kind}}}, valid)
              for kind, valid in (({}, False), ({"kind": "mha"}, True))]
    for d, valid in cases:
        try:
            load_spec(copy.deepcopy(d))
            loads = True
        except SpecError:
            loads = False
        assert loads == valid, d
        assert validator.is_valid(d) == valid, (d, [e.message for e in validator.iter_errors(d)])


def test_schema_to_file(tmp_path, run_cli):
    out = tmp_path / "schema.json"
    res = run_cli("schema", "-o", out)
    assert res.code == 0 and "wrote" in res.out
    assert json.loads(out.read_text())["title"] == "MoESpec"


def test_a_failed_schema_write_leaves_the_old_file_and_no_part_of_the_new(tmp_path, run_cli, monkeypatch):
    """A full disk (here: half the text lands, then ENOSPC) left a truncated schema.json behind."""
    import errno
    import os
    import pathlib

    out = tmp_path / "schema.json"
    out.write_text("the previous schema")

    def full_disk(self, text, *args, **kwargs):
        with open(self, "w") as fh:
            fh.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    res = run_cli("schema", "-o", out)
    monkeypatch.undo()
    assert res.code == 2 and "Traceback" not in res.err
    said = " ".join(res.err.split())
    assert f"{out}: could not write the schema (No space left on device); nothing was written" in said
    assert out.read_text() == "the previous schema" and [p.name for p in tmp_path.iterdir()] == ["schema.json"]


def test_presets_lists_every_preset(run_cli):
    res = run_cli("presets")
    assert res.code == 0
    for name in presets():
        assert name in res.out


def _show(run_cli, path, text: str):
    """`show` of a spec file with ``text``: its output, and the output on one line."""
    path.write_text(text)
    res = run_cli("show", path)
    assert res.code == 0, res.err
    return res.out, " ".join(res.out.split())


def test_show_experts_own_space(tmp_path, run_cli):
    """`show` says where the experts work and which norms they have; their parameters are counted at width M."""
    out, flat = _show(run_cli, tmp_path / "muse.yaml",
                      "name: muse-tiny\nmoe:\n  hidden_size: 32\n  expert_projection: {size: 24}\n"
                      "  experts: {num_experts: 8, intermediate_size: 16, input_norm: {weight_offset: 1},\n"
                      "            output_norm: {eps: 1.0e-5, weight_offset: 1, scale: before}}\n"
                      "  router: {top_k: 2, score: sigmoid}\n")
    assert "experts: projected D -> 24 -> D, input norm (rms eps=1e-06 w+1), output norm per expert " \
           "(rms eps=1e-05 w+1 scale-first)" in flat
    assert _table_row(out, "one routed expert")[1] == "1.15K"  # 3 * 24 * 16


def test_show_expert_norms_of_ergo(tmp_path, run_cli):
    """`show` says that each expert's output norm has a weight per expert, counted in one routed expert, and that
    the shared experts' output is normalised."""
    out, flat = _show(run_cli, tmp_path / "ergo.yaml",
                      "name: ergo-tiny\nmoe:\n  hidden_size: 32\n"
                      "  experts: {num_experts: 8, intermediate_size: 16, activation: relu2,\n"
                      "            output_norm: {eps: 1.0e-6, per_expert: true}}\n"
                      "  shared_experts: {count: 1, output_norm: {eps: 1.0e-6}}\n"
                      "  router: {top_k: 2, score: sigmoid}\n")
    assert "experts: output norm per expert (rms eps=1e-06 weight per expert)" in flat
    assert "shared experts: output norm (rms eps=1e-06)" in flat
    assert _table_row(out, "one routed expert")[1] == "1.06K"  # 2 * 32 * 16 + 32


def test_ctrl_c_says_aborted_and_exits_130(run_cli, monkeypatch):
    """typer turns KeyboardInterrupt into Exit(130) and returns the code: the command ended silently."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moegraph.cli.spec_cmds.load_spec", interrupted)
    res = run_cli("validate", "deepseek-v3-tiny")
    assert res.code == 130 and res.err.strip() == "aborted" and "Traceback" not in res.err, res
    monkeypatch.undo()
    monkeypatch.setattr("moegraph.cli._configure_from_environment", interrupted)  # before typer starts (imports)
    res = run_cli("validate", "deepseek-v3-tiny")
    assert res.code == 130 and res.err.strip() == "aborted" and "Traceback" not in res.err, res
