"""Code generation: golden files, byte-identical output, write-only-on-change, cache repair, errors."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest
import torch

import moegraph
from moegraph import codegen
from moegraph.errors import CodegenError

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_PRESETS = ["deepseek-v3-tiny", "qwen2-moe-tiny", "switch-tiny"]
UPDATE = os.environ.get("MOEGRAPH_UPDATE_GOLDEN") == "1"  # refresh only on explicit request


@pytest.mark.parametrize("preset", GOLDEN_PRESETS)
def test_golden_generated_source(preset):
    """Generated code for a few presets is reviewed and frozen; refresh with MOEGRAPH_UPDATE_GOLDEN=1."""
    source = codegen.render(moegraph.load_spec(preset))
    path = GOLDEN / f"{preset}.py.txt"
    if UPDATE:
        path.write_text(source)
    assert path.exists(), f"missing golden file {path}; run with MOEGRAPH_UPDATE_GOLDEN=1 and review it"
    assert source == path.read_text(), f"generated code for {preset} changed; review, then refresh the golden file"


def test_same_spec_same_bytes_and_header():
    spec = moegraph.load_spec("deepseek-v3-tiny")
    a, b = codegen.render(spec), codegen.render(moegraph.load_spec("deepseek-v3-tiny"))
    assert a == b
    assert f"spec sha256: {spec.hash()}" in a
    assert f"moegraph {moegraph.__version__}" in a
    compile(a, "<generated>", "exec")  # valid Python


def test_negative_zero_is_zero_in_the_generated_source():
    # -0.0 and 0.0 specs are equal with one hash, so one file name: their sources must not differ.
    def spec(z: float):
        d = moegraph.load_spec("mixtral-tiny").model_dump(mode="json")
        d["moe"]["router"].update(aux_losses=[{"kind": "z_loss", "coef": z}], expert_bias={"update_rate": z})
        d["moe"]["experts"]["output_norm"] = {"weight_offset": z}
        return moegraph.load_spec(d)

    a, b = spec(0.0), spec(-0.0)
    assert a == b and a.hash() == b.hash()
    assert codegen.render(a) == codegen.render(b) and "-0.0" not in codegen.render(b)
    assert math.copysign(1.0, b.moe.router.expert_bias.update_rate) == 1.0


def test_only_selected_policy_is_emitted():
    src = codegen.render(moegraph.load_spec("mixtral-tiny"))
    body = src.split("def core", 1)[1]
    assert "masked_fill" not in body and "sigmoid" not in body and "apply_capacity" not in body
    body_v3 = codegen.render(moegraph.load_spec("deepseek-v3-tiny")).split("def core", 1)[1]
    assert 'float("-inf")' in body_v3 and "expert_bias" in body_v3


def test_hash_constants_only_in_hash_routed_layers(tmp_path):
    """HASH_VOCAB / HASH_SEED / HASH_METHOD mean something to hash routing only: top-k classes do not carry them,
    and hash layers still route by them (the modulo formula, a seeded table) as written out here."""
    hash_names = {"HASH_VOCAB", "HASH_SEED", "HASH_METHOD", "HASH_SCORED"}
    for preset in ("mixtral-tiny", "deepseek-v3-tiny"):
        layer = moegraph.compile(moegraph.load_spec(preset), out_dir=tmp_path)
        assert not hash_names & set(vars(type(layer))), preset
        assert not layer.NEEDS_TOKEN_IDS
    d = moegraph.load_spec("hash-tiny").to_dict()
    d["moe"]["router"].update(top_k=2, seed=7)
    tables = []
    for method in ("random", "random", "modulo"):
        d["moe"]["router"]["method"] = method
        layer = moegraph.compile(d, out_dir=tmp_path).eval()
        assert {"HASH_VOCAB": 1000, "HASH_SEED": 7, "HASH_METHOD": method}.items() <= vars(type(layer)).items()
        tid = torch.randint(0, 1000, (11,), generator=torch.Generator().manual_seed(0))
        rec = layer.start_recording()
        with torch.no_grad():
            layer(torch.randn(11, layer.HIDDEN), token_ids=tid)
        ids = rec.ids().long()
        if method == "modulo":
            E = layer.NUM_EXPERTS
            assert ids.tolist() == [[(t + k * (E // 2)) % E for k in range(2)] for t in tid.tolist()]
        else:
            assert torch.equal(ids, layer.router.hash_table[tid].long())
            tables.append(layer.router.hash_table)
    assert torch.equal(tables[0], tables[1])  # seeded by HASH_SEED: the same table each time


def test_write_only_when_changed(tmp_path):
    spec = moegraph.load_spec("mixtral-tiny")
    g1 = codegen.write_source(spec, tmp_path)
    mtime = g1.path.stat().st_mtime_ns
    g2 = codegen.write_source(spec, tmp_path)
    assert g1.written and not g2.written
    assert g2.path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [g1.path.name]  # no temp files left


def test_corrupted_cache_entry_is_rebuilt(tmp_path):
    spec = moegraph.load_spec("qwen2-moe-tiny")
    g = codegen.write_source(spec, tmp_path)
    g.path.write_text("this is not python (\n")
    g2 = codegen.write_source(spec, tmp_path)
    assert g2.written and g2.path.read_text() == g.source
    layer = moegraph.compile(spec, out_dir=tmp_path, dtype=torch.float32)
    assert layer(torch.randn(3, layer.HIDDEN)).shape == (3, layer.HIDDEN)


def test_unwritable_out_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a file in the way instead
            target = tmp_path / "file"
            target.write_text("x")
            locked = target / "sub"
        with pytest.raises(CodegenError, match="could not write the generated code.*writable directory with -o/out_dir"):
            moegraph.compile("mixtral-tiny", out_dir=locked)
    finally:
        (tmp_path / "locked").chmod(stat.S_IRWXU)


def test_unknown_backend():
    with pytest.raises(CodegenError, match="unknown backend"):
        moegraph.compile("mixtral-tiny", backend="cuda-magic")


def test_cli_compile_writes_source(tmp_path):
    from moegraph.cli import main

    assert main(["compile", "deepseek-v3-tiny", "-o", str(tmp_path)]) == 0
    files = list(tmp_path.glob("moe_deepseek_v3_tiny_*_torch.py"))
    assert len(files) == 1
    assert main(["compile", "nope-not-a-spec", "-o", str(tmp_path)]) == 2


@pytest.mark.parametrize("receive", [False, True])
def test_cli_compile_smoke_with_router_state(receive, tmp_path, run_cli):
    # A router network with a state step returns (y, state) and, receiving, takes the previous layer's state.
    spec = tmp_path / "rstate.yaml"
    spec.write_text("name: rstate\nmoe:\n  hidden_size: 16\n  experts: {num_experts: 8, intermediate_size: 8}\n"
                    "  router:\n    top_k: 2\n    mlp: [{op: linear, size: 8}, {op: state, receive: %s}]\n"
                    % str(receive).lower())
    res = run_cli("compile", spec, "-o", tmp_path / "out", "--smoke", "4")
    assert res.code == 0, res.err
    assert "smoke forward: (4, 16) -> (4, 16) + (4, 8), finite=True" in " ".join(res.out.split())


def test_cache_dir_is_set_by_the_cli_from_xdg_not_read_by_the_library(tmp_path, monkeypatch):
    from moegraph.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(codegen, "_cache_dir", None)
    assert codegen.default_cache_dir() == Path.home() / ".cache" / "moegraph" / "generated"
    assert main(["compile", "--help"]) == 0  # a command that generates code (spec and plan commands configure nothing)
    target = tmp_path / "xdg" / "moegraph" / "generated"
    assert codegen.default_cache_dir() == target
    moegraph.compile("mixtral-tiny")
    assert len(list(target.glob("moe_mixtral_tiny_*_torch.py"))) == 1
