"""Fuzzing every input kind moegraph reads: spec files, trace files (native .npz, ESFT text, SGLang
dumps), plan files, command-line flags and layer inputs (Hypothesis plus hand-written cases).

Every case must end in one of two ways: accepted (exit 0, or a working result), or rejected with exit
code 2 and ``error:`` lines that name the input, with no traceback, no half-written file, and no code
executed (string fields carry a payload that would create a marker file). Commands run in-process
through ``moegraph.cli.main`` at tiny sizes so that the whole suite stays fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moegraph
from moegraph import codegen
from moegraph.cli import main
from moegraph.errors import InputError, ResourceError
from moegraph.traces import TraceSet

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
FUZZ_MORE = settings(FUZZ, max_examples=200)  # input kinds with one test each get more cases
#: every case run, by input kind (reported by the last test of the module)
CASES: dict[str, int] = {}


def run(argv: list) -> tuple[int, str, str]:
    """``moegraph ARGV`` in-process; any exception other than a clean exit is a failure of the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_outcome(kind: str, code: int, err: str, names: str | None, folder: Path | None = None) -> None:
    """Accepted (0) or rejected cleanly (2): no traceback, every line says what, the input is named."""
    CASES[kind] = CASES.get(kind, 0) + 1
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines, "rejected without a message"
        if lines[0].startswith("error:"):
            if names is not None:
                assert names in " ".join(err.split()), (names, err)
        else:  # a usage error from the option parser names the option
            assert "Invalid value" in err or "Usage:" in err or "No such option" in err, err
    if folder is not None:
        left = [p.name for p in folder.rglob("*") if ".tmp" in p.name]
        assert not left, f"half-written files left behind: {left}"


# ------------------------------------------------------------------------------------------------
# Spec files
# ------------------------------------------------------------------------------------------------

def _base_spec() -> dict:
    return moegraph.load_spec("deepseek-v3-tiny").to_dict()


def _leaf_paths(obj, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaf_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _leaf_paths(v, prefix + (i,))
    return out


def _payload(marker: Path) -> str:
    return f'x"""\n__import__("pathlib").Path({str(marker)!r}).touch()\n"""[/x]'


def _values(marker: Path):
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, 1, 2**31, 2**63, 10**400, 65537]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["16", "1e3", "nan", "", "[/x]", "[red]x", "\n", "sigmoid(x\n)", "log(x)", "x / 0",
                         "__import__('os')", _payload(marker)]),
        st.text(max_size=12),
        st.booleans(),
        st.none(),
        st.lists(st.integers(-3, 3), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )


def _set_path(d, path, value):
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value


def _write_spec(folder: Path, data, fmt: str) -> Path:
    path = folder / f"spec.{fmt}"
    if fmt == "json":
        text = json.dumps(data, allow_nan=True)
    elif fmt == "yaml":
        text = yaml.safe_dump(data)
    else:
        import tomli_w

        try:
            text = tomli_w.dumps(data)
        except (TypeError, ValueError):  # TOML has no null / non-string keys: write JSON instead
            path, text = folder / "spec.json", json.dumps(data, allow_nan=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.data())
def test_fuzz_spec_files(fuzz_dir, data):
    """A valid spec with one field replaced, one key added or removed, in JSON, YAML or TOML."""
    marker = fuzz_dir / "PWNED"
    spec = _base_spec()
    paths = _leaf_paths(spec)
    action = data.draw(st.sampled_from(["replace", "replace", "add", "drop"]))
    path = data.draw(st.sampled_from(paths))
    if action == "replace":
        _set_path(spec, path, data.draw(_values(marker)))
    elif action == "add":
        parent = path[:-1]
        target = spec
        for k in parent:
            target = target[k]
        if isinstance(target, dict):
            target[data.draw(st.sampled_from(["extra", "top_kk", "hidden_size", "name"]))] = data.draw(_values(marker))
    elif isinstance(path[-1], str):
        target = spec
        for k in path[:-1]:
            target = target[k]
        del target[path[-1]]
    f = _write_spec(fuzz_dir, spec, data.draw(st.sampled_from(["json", "yaml", "toml"])))
    code, _, err = run(["validate", f])
    assert_outcome("spec", code, err, str(f))
    if code == 0:  # accepted: compile must accept it too, and the payload must stay data
        accepted = moegraph.load_spec(f)
        try:
            layer = moegraph.compile(accepted, out_dir=fuzz_dir / "gen", seed=None)  # uninitialised: no work
        except ResourceError:  # a valid spec too large for this machine is refused with the figure
            layer = None
        cls = type(layer) if layer is not None else codegen.layer_class(accepted, out_dir=fuzz_dir / "gen")[0]
        assert json.loads(cls.SPEC_JSON) == accepted.to_dict()
    assert not marker.exists()


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200)), fmt=st.sampled_from(["json", "yaml", "toml"]))
def test_fuzz_spec_bytes(fuzz_dir, raw, fmt):
    """Arbitrary bytes or text as a spec file."""
    f = fuzz_dir / f"raw.{fmt}"
    f.write_bytes(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    code, _, err = run(["validate", f])
    assert_outcome("spec", code, err, str(f))
    assert code == 2


@pytest.mark.parametrize("fmt, text", [
    ("json", '{"moe": ' * 3000 + "1" + "}" * 3000),
    ("yaml", "moe: " + "[" * 3000 + "]" * 3000),
    ("toml", "moe = " + "[" * 3000 + "]" * 3000),
    ("json", '{"moe": {"hidden_size": ' + "9" * 5000 + "}}"),
    ("yaml", "moe: {hidden_size: " + "9" * 5000 + "}"),
    ("toml", "[moe]\nhidden_size = " + "9" * 5000),
    ("json", '{"moe": {"hidden_size": 1e999}}'),
    ("yaml", "moe: {hidden_size: .inf}"),
    ("yaml", "moe: {hidden_size: '16'}"),
    ("yaml", "name: !!python/object/apply:os.system ['touch PWNED']\nmoe: {}"),
    ("yaml", "a: &a [*a]"),
    ("json", "\ufeff{}"),
], ids=["json-deep", "yaml-deep", "toml-deep", "json-long-int", "yaml-long-int", "toml-long-int", "json-1e999",
        "yaml-inf", "yaml-quoted-number", "yaml-python-tag", "yaml-self-alias", "json-bom"])
def test_hand_written_spec_files(fuzz_dir, fmt, text):
    f = fuzz_dir / f"hand.{fmt}"
    f.write_text(text, encoding="utf-8")
    code, _, err = run(["validate", f])
    assert_outcome("spec", code, err, str(f))
    assert code == 2
    assert not (Path.cwd() / "PWNED").exists()


def test_quoted_numbers_are_refused_and_yaml_exponents_are_numbers(fuzz_dir):
    spec = _base_spec()
    spec["moe"]["hidden_size"] = "64"
    f = _write_spec(fuzz_dir, spec, "yaml")
    code, _, err = run(["validate", f])
    assert code == 2 and "moe.hidden_size: expected an integer, got the string '64'" in " ".join(err.split())
    f.write_text(f.read_text().replace("hidden_size: '64'", "hidden_size: 64").replace("coef: 0.0001", "coef: 1e-4"))
    assert "1e-4" in f.read_text()
    code, out, err = run(["validate", f])
    assert code == 0, err
    assert moegraph.load_spec(f).moe.router.aux_losses[0].coef == 1e-4


# ------------------------------------------------------------------------------------------------
# Trace files
# ------------------------------------------------------------------------------------------------


def _tiny_trace(e: int = 8, k: int = 2, t: int = 12, layers: int = 2) -> TraceSet:
    rng = np.random.default_rng(0)
    topk = [np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) for _ in range(layers)]
    return TraceSet.from_topk(topk, np.arange(t) // 3, num_experts=e, source="tiny")


def _npz_members(ts: TraceSet, folder: Path) -> dict:
    p = ts.save(folder / "base.npz")
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def _arrays():
    dtypes = st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.float64, np.bool_, np.int8])
    return st.builds(
        lambda shape, dt, fill: np.full(shape, fill).astype(dt) if not math.isnan(fill) else np.full(shape, fill),
        st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple), dtypes,
        st.one_of(st.integers(-3, 70000).map(float), st.just(float("nan"))),
    )


@FUZZ
@given(data=st.data())
def test_fuzz_native_trace_files(fuzz_dir, data):
    members = _npz_members(_tiny_trace(), fuzz_dir)
    meta = json.loads(str(members["meta"]))
    what = data.draw(st.sampled_from(["meta", "meta", "array", "drop", "truncate", "duplicate", "float_ids"]))
    if what == "meta":
        key = data.draw(st.sampled_from(sorted(meta) + ["extra"]))
        meta[key] = data.draw(_values(fuzz_dir / "PWNED"))
        members["meta"] = np.array(json.dumps(meta))
    elif what == "array":
        key = data.draw(st.sampled_from(["topk", "sample_ids", "source_ids"]))
        members[key] = data.draw(_arrays())
    elif what == "drop":
        del members[data.draw(st.sampled_from(sorted(members)))]
    elif what == "duplicate":
        members["topk"] = members["topk"].copy()
        members["topk"][0, data.draw(st.integers(0, 11)), 1] = members["topk"][0, data.draw(st.integers(0, 11)), 0]
    elif what == "float_ids":
        members["topk"] = members["topk"].astype(np.float64) + 0.5
    f = fuzz_dir / "fuzz.npz"
    np.savez(f, **members)
    if what == "truncate":
        raw = f.read_bytes()
        f.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    code, _, err = run(["trace", "stats", f])
    assert_outcome("trace-npz", code, err, str(f))
    if what in ("float_ids", "truncate"):
        assert code == 2


@pytest.mark.parametrize("key, value, phrase", [
    ("num_experts", "8", 'meta.num_experts is "8", expected an integer'),
    ("num_experts", 8.5, "meta.num_experts is 8.5"),
    ("num_experts", 10**9, "expected an integer in 1..65536"),
    ("num_layers", True, "meta.num_layers is true"),
    ("sources", "tiny", "meta.sources is not a list"),
    ("top_k", "2", 'meta.top_k is "2", expected an integer'),  # was read through int(), while num_tokens "200" is refused
    ("top_k", 2.5, "meta.top_k is 2.5, expected an integer"),
])
def test_native_meta_numbers_are_strict(fuzz_dir, key, value, phrase):
    members = _npz_members(_tiny_trace(), fuzz_dir)
    meta = json.loads(str(members["meta"]))
    meta[key] = value
    members["meta"] = np.array(json.dumps(meta))
    f = fuzz_dir / "strict.npz"
    np.savez(f, **members)
    code, _, err = run(["trace", "stats", f])
    assert code == 2 and phrase in " ".join(err.split()) and str(f) in err, err


def test_a_key_twice_in_native_meta_is_refused(fuzz_dir):
    """JSON keeps the last of two keys silently; spec and plan files refuse a key given twice, so does trace meta."""
    members = _npz_members(_tiny_trace(), fuzz_dir)
    text = str(members["meta"])
    members["meta"] = np.array(text.replace('"num_experts": 8', '"num_experts": 8, "num_experts": 64', 1))
    assert members["meta"] != text
    f = fuzz_dir / "twice.npz"
    np.savez(f, **members)
    code, _, err = run(["trace", "stats", f])
    assert code == 2 and (f"{f}: meta: key 'num_experts' appears twice in one object" in " ".join(err.split())
                          and "re-import the trace" in err), err


def test_duplicate_ids_in_a_token_are_refused(fuzz_dir):
    """ESFT and SGLang traces come from token-choice routers: an expert twice in one top-k is corruption."""
    folder = fuzz_dir / "esft_dup"
    folder.mkdir()
    (folder / "expert_weights_0.txt").write_text("1\t2\t3\t3\t\t0.1\t0.2\t0.3\t0.4\n")
    code, _, err = run(["trace", "import", "--format", "esft", folder, "--top-k", "2", "-o", fuzz_dir / "d.npz"])
    assert code == 2 and "token 1 of layer 0 lists expert 3 twice in its top-k" in " ".join(err.split()), err
    dump = fuzz_dir / "dup.pt"
    torch.save({"records": [{"topk_ids_of_layer": torch.tensor([[[1, 2], [4, 4]]])}]}, dump)
    code, _, err = run(["trace", "import", "--format", "sglang", dump, "-o", fuzz_dir / "d.npz"])
    assert code == 2 and f"{dump}: token 1 of layer 0 lists expert 4 twice" in " ".join(err.split()), err
    assert not (fuzz_dir / "d.npz").exists()


def test_importers_refuse_what_the_native_reader_would(fuzz_dir):
    """An import that succeeded wrote a file `trace stats` then refused (a rank or layer beyond the reader's bounds),
    or ended in an OverflowError traceback (an id beyond int64): refused at import, nothing written."""
    out = fuzz_dir / "imported_bounds.npz"
    ids = torch.tensor([[[0, 1], [2, 3], [1, 2]]])
    dump = fuzz_dir / "rank_huge.pt"
    torch.save({"records": [{"topk_ids_of_layer": ids, "rank": 10**15}]}, dump)
    big_layer = fuzz_dir / "esft_big_layer"
    big_layer.mkdir()
    (big_layer / "expert_weights_2000000.txt").write_text("1\t2\t\t0.5\t0.5\n")
    huge_id = fuzz_dir / "esft_huge_id"
    huge_id.mkdir()
    (huge_id / "expert_weights_0.txt").write_text(f"1\t{10**20}\t\t0.5\t0.5\n")
    for fmt, src, phrase in (
        ("sglang", dump, f"{dump}: a record's rank is not a recorder's (src_rank holds rank 1000000000000000, outside "
                         "0..1048575); the dump is corrupt"),
        ("esft", big_layer, f"{big_layer}: the <layer> of expert_weights_<layer>.txt: 2000000 is not a decoder layer "
                            "index in 0..1000000"),
        ("esft", huge_id, f"{huge_id / 'expert_weights_0.txt'}: line 1 has an expert id beyond any model's (0..65535)"),
    ):
        code, _, err = run(["trace", "import", "--format", fmt, src, "-o", out])
        assert_outcome("trace-import", code, err, str(src), fuzz_dir)
        assert code == 2 and phrase in " ".join(err.split()), err
        assert not out.exists()


def _esft_line(draw) -> str:
    ids = draw(st.lists(st.one_of(st.integers(-2, 70), st.sampled_from(["1.5", "x", "", "1e3", str(10**30)])),
                        min_size=0, max_size=6))
    scores = draw(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just("x")),
                           min_size=0, max_size=6))
    sep = draw(st.sampled_from(["\t\t", "\t", " ", "\t\t\t"]))
    return "\t".join(map(str, ids)) + sep + "\t".join(map(str, scores))


ESFT_LINE = st.composite(_esft_line)()


@FUZZ
@given(data=st.data())
def test_fuzz_esft_folders(fuzz_dir, data):
    folder = fuzz_dir / "esft"
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    folder.mkdir(exist_ok=True)
    for layer in data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)):
        good = ["1\t2\t\t0.5\t0.5", "3\t4\t\t0.1\t0.9"]
        lines = good + [data.draw(ESFT_LINE) for _ in range(data.draw(st.integers(0, 2)))]
        (folder / f"expert_weights_{layer}.txt").write_text("\n".join(lines) + "\n")
    code, _, err = run(["trace", "stats", folder])
    assert_outcome("trace-esft", code, err, str(folder))


def _sglang_obj(draw):
    ids = st.one_of(
        st.builds(lambda s, v: torch.full(s, v), st.lists(st.integers(0, 3), max_size=4).map(tuple),
                  st.one_of(st.integers(-2, 70000), st.floats(-2, 9))),
        st.builds(lambda s: torch.zeros(s, dtype=torch.bool), st.lists(st.integers(0, 3), max_size=3).map(tuple)),
        st.sampled_from(["x", None, 3, [1, 2], {"a": 1}]),
    )
    if draw(st.booleans()):
        return {"logical_count": draw(ids)}
    rec = {"topk_ids_of_layer": draw(ids)}
    if draw(st.booleans()):
        rec["extend_seq_lens"] = draw(st.one_of(st.lists(st.integers(-3, 5), max_size=3), st.just("ab"),
                                                st.just(torch.tensor([1, 2]))))
    if draw(st.booleans()):
        rec["rank"] = draw(st.one_of(st.integers(-2, 3), st.just("r"), st.just(None)))
    return {"records": draw(st.one_of(st.just([rec]), st.just(rec), st.just("x"), st.just([rec, 5])))}


@FUZZ
@given(obj=st.one_of(st.composite(_sglang_obj)(), st.sampled_from([[], 5, "x", {}])))
def test_fuzz_sglang_dumps(fuzz_dir, obj):
    f = fuzz_dir / "dump.pt"
    torch.save(obj, f)
    out = fuzz_dir / "imported.npz"
    out.unlink(missing_ok=True)
    code, _, err = run(["trace", "import", "--format", "sglang", f, "-o", out])
    assert_outcome("trace-sglang", code, err, str(f), fuzz_dir)
    if code == 2:
        assert not out.exists()
    else:
        moegraph.traces.read_native(out)  # what was written reads back


def test_truncated_zip_and_pickle_payloads(fuzz_dir):
    marker = fuzz_dir / "PWNED_PICKLE"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    f = fuzz_dir / "evil.pt"
    torch.save({"records": Evil()}, f)
    code, _, err = run(["trace", "import", "--format", "sglang", f, "-o", fuzz_dir / "e.npz"])
    assert code == 2 and not marker.exists()
    g = fuzz_dir / "evil.npz"
    with zipfile.ZipFile(g, "w") as z:
        z.writestr("meta.npy", b"\x93NUMPY garbage")
    code, _, err = run(["trace", "stats", g])
    assert_outcome("trace-npz", code, err, str(g))
    assert code == 2


# ------------------------------------------------------------------------------------------------
# Plan files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_files(tmp_path_factory):
    from moegraph.planner import plan

    d = tmp_path_factory.mktemp("plans")
    spec = moegraph.load_spec("deepseek-v3-tiny")
    p = plan(spec, _tiny_trace(e=16, k=4, layers=spec.model.num_moe_layers), rounds=0).save(d / "plan.json")
    trace = _tiny_trace(e=16, k=4, layers=spec.model.num_moe_layers).save(d / "t.npz")
    return d, json.loads(p.read_text()), trace


@FUZZ_MORE
@given(data=st.data())
def test_fuzz_plan_files(plan_files, data):
    d, base, trace = plan_files
    plan = json.loads(json.dumps(base))
    path = data.draw(st.sampled_from([p for p in _leaf_paths(plan) if p[0] not in ("metrics", "policy", "spec")
                                      or len(p) <= 2]))
    if data.draw(st.booleans()):
        _set_path(plan, path, data.draw(_values(d / "PWNED")))
    elif isinstance(path[-1], str):
        cur = plan
        for k in path[:-1]:
            cur = cur[k]
        del cur[path[-1]]
    f = d / "fuzz_plan.json"
    f.write_text(json.dumps(plan, allow_nan=True))
    code, _, err = run(["plan", "--evaluate", f, "--trace", trace])
    assert_outcome("plan", code, err, str(f), d)
    assert not (d / "PWNED").exists()


@pytest.mark.parametrize("edit, phrase", [
    (lambda p: p["gpu_experts"][0][0].reverse(), "gpu_experts"),
    (lambda p: p.__setitem__("node_of_gpu", [1] * len(p["node_of_gpu"])), "node_of_gpu"),
    (lambda p: p.__setitem__("num_slots", float(p["num_slots"])), "num_slots"),
    (lambda p: p.__setitem__("metrics", [1]), "metrics"),
])
def test_hand_edited_derived_plan_fields_are_refused(plan_files, edit, phrase):
    d, base, trace = plan_files
    plan = json.loads(json.dumps(base))
    edit(plan)
    f = d / "edited.json"
    f.write_text(json.dumps(plan))
    code, _, err = run(["plan", "--evaluate", f, "--trace", trace])
    assert code == 2 and phrase in err and str(f) in " ".join(err.split()), err


def test_deep_or_huge_plan_files(plan_files):
    d, _, trace = plan_files
    for text in ('{"a": ' * 3000 + "1" + "}" * 3000, '{"format": ' + "1" * 5000 + "}", "[" * 100000):
        f = d / "deep.json"
        f.write_text(text)
        code, _, err = run(["plan", "--evaluate", f, "--trace", trace])
        assert_outcome("plan", code, err, str(f))
        assert code == 2


# ------------------------------------------------------------------------------------------------
# Command-line flags
# ------------------------------------------------------------------------------------------------

_FLAG_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "-5", "nan", "inf", "-inf", "1e400", str(10**30), "abc", "", "[/x]", "[red]",
                     "2.5", "99999999999"]),
    st.integers(-(10**12), 10**12).map(str),
)


@FUZZ_MORE
@given(data=st.data())
def test_fuzz_cli_flags(fuzz_dir, data):
    out = fuzz_dir / "cli"
    out.mkdir(exist_ok=True)
    cmd = data.draw(st.sampled_from(["plan", "compile", "import", "run", "bench"]))
    v = data.draw(_FLAG_VALUES)
    if cmd == "plan":
        flag = data.draw(st.sampled_from(["--nodes", "--gpus-per-node", "--slots", "--seed", "--max-imbalance",
                                          "--rounds", "--layer"]))
        # Another flag is always out of range, so that no case plans (the parser checks every flag).
        argv = ["plan", "switch-tiny", flag, v, "--layer" if flag != "--layer" else "--rounds", "-1"]
    elif cmd == "compile":
        flag = data.draw(st.sampled_from(["--smoke", "--backend", "-o"]))
        # As for plan, another setting always refuses, so that no case compiles.
        other = ["--smoke", "-1"] if flag == "--backend" else [] if flag == "-o" else ["--backend", "cuda"]
        if flag == "-o":
            v = str(out / "a_file")
            Path(v).write_text("x")
        argv = ["compile", "switch-tiny", "-o", out / "gen", flag, v, *other]
    elif cmd == "import":
        flag = data.draw(st.sampled_from(["--top-k", "--format", "-o"]))
        argv = ["trace", "import", "--format", "esft", out / "missing", "-o", out / "t.npz", flag, v]
    elif cmd == "run":
        flag = data.draw(st.sampled_from(["--nproc", "--tokens", "--steps", "--timeout", "--seed", "--layer"]))
        argv = ["run", "switch-tiny", "--plan", out / "missing.json", flag, v]
    else:
        flag = data.draw(st.sampled_from(["--tokens", "--rounds"]))
        argv = ["bench", "switch-tiny", "--no-hf", flag, v if not (v.isdigit() and 0 < int(v) < 10**7) else "-" + v]
    code, _, err = run(argv)
    assert_outcome("cli-flags", code, err, None, out)
    assert code == 2, (argv, err)


@pytest.mark.parametrize("argv, phrase", [
    (["plan", "switch-tiny", "--nodes", "0"], "--nodes"),
    (["plan", "switch-tiny", "--seed", "-1"], "--seed"),
    (["plan", "switch-tiny", "--max-imbalance", "nan"], "not a finite number"),
    (["compile", "switch-tiny", "--smoke", "-3"], "--smoke"),
    (["trace", "import", "--format", "esft", "x", "-o", "t.npz", "--top-k", "-2"], "--top-k"),
    (["plan", "switch-tiny", "--plot", "PLOT.foo"], "cannot write a plot with extension '.foo'"),
    (["compile", "deepseek-v3", "--smoke", "8"], "needs about"),
])
def test_hand_written_flags(fuzz_dir, argv, phrase, monkeypatch):
    monkeypatch.chdir(fuzz_dir)
    monkeypatch.setattr("moegraph.limits.available_memory", lambda: 8 << 30)  # a laptop, on any machine
    code, _, err = run(argv)
    assert_outcome("cli-flags", code, err, None, fuzz_dir)
    assert code == 2 and phrase in " ".join(err.split()), err


def test_memory_estimates_refuse_before_allocating(fuzz_dir, monkeypatch):
    """With 1 MiB available: traces, planning and compiling refuse with the figure, allocating nothing."""
    monkeypatch.setattr("moegraph.limits.available_memory", lambda: 1 << 20)
    for argv, phrase in [
        (["trace", "stats", "esft-deepseek-v2-lite/law"], "law.npz (1 MiB uncompressed) needs about"),
        (["plan", "deepseek-v3", "--rounds", "0"], "planning 256 experts in"),
        (["compile", "mixtral-tiny", "-o", fuzz_dir / "mem", "--smoke", "4096"], "--smoke 4096 on spec 'mixtral-tiny'"),
    ]:
        code, _, err = run(argv)
        text = " ".join(err.split())
        assert code == 2 and phrase in text and "more than the memory available (1.0 MiB)" in text, err
    assert not (fuzz_dir / "mem").exists()


def test_compile_too_large_for_memory_is_refused_before_the_source_is_written(fuzz_dir, monkeypatch):
    """`moegraph compile deepseek-v3` on a laptop wrote the source, then refused the layer with advice the command
    cannot follow (it is bfloat16 already; compile has no --plan). The Python API's advice stays its own."""
    import torch

    import moegraph

    monkeypatch.setattr("moegraph.limits.available_memory", lambda: 8 << 30)
    for extra in ([], ["--smoke", "2"]):
        code, _, err = run(["compile", "deepseek-v3", "-o", fuzz_dir / "big", *extra])
        text = " ".join(err.split())
        assert code == 2 and "compiling the layer of spec 'deepseek-v3' (bfloat16 weights" in text, err
        assert "the preset deepseek-v3-tiny" in text and "nothing was written" in text, err
        assert "16-bit" not in text and "plan" not in text and "without --smoke" not in text, err
    assert not (fuzz_dir / "big").exists()
    monkeypatch.setattr("moegraph.limits.available_memory", lambda: 1 << 10)
    for dtype, advice in ((torch.float32, True), (torch.bfloat16, False)):
        with pytest.raises(ResourceError) as info:
            moegraph.compile("deepseek-v3-tiny", dtype=dtype)
        assert ("a 16-bit dtype (dtype=torch.bfloat16)" in str(info.value)) is advice, str(info.value)
        assert "expert-parallel with a plan (plan=" in str(info.value)


def test_output_paths(fuzz_dir):
    folder = fuzz_dir / "a_folder"
    folder.mkdir(exist_ok=True)
    code, _, err = run(["plan", "switch-tiny", "-o", folder])
    assert code == 2 and "is a folder" in err
    code, _, err = run(["trace", "import", "--format", "esft", folder, "-o", folder])
    assert code == 2 and "is a folder" in err
    code, _, err = run(["schema", "-o", folder])
    assert code == 2 and "is a folder" in err
    a_file = fuzz_dir / "a_file.txt"
    a_file.write_text("x")
    code, _, err = run(["demo", "-o", a_file])
    assert code == 2 and "is a file; -o names the folder" in err
    # moegraph run checks its paths before starting any process (the plan is not even needed).
    for extra, phrase in ((["--record", folder], "is a folder"), (["--record", a_file], "extension '.txt'"),
                          (["--layer", "0", "--checkpoint", folder / "none.safetensors"], "checkpoint file not found")):
        code, _, err = run(["run", "switch-tiny", "--plan", fuzz_dir / "no-plan.json", *extra])
        assert code == 2 and phrase in " ".join(err.split()), err


@pytest.mark.parametrize("kwargs, phrase", [
    ({"seed": -1}, "seed -1 must be an integer"),
    ({"seed": 2**70}, "must be an integer in [0, 2**63)"),
    ({"seed": 1.5}, "seed 1.5"),
    ({"dtype": "float8"}, "dtype 'float8' is not known"),
    ({"dtype": "float64"}, "is dtype=torch.float64"),
    ({"dtype": "float8_e5m2"}, "add a moe.quantization section"),
    ({"dtype": torch.int64}, "not a floating-point torch dtype"),
    ({"dtype": torch.float8_e4m3fn}, "is a storage format, not a compute dtype"),
    ({"dtype": torch.float8_e5m2}, "moe.quantization section"),
    ({"device": "bogus"}, "is not a torch device"),
    ({"timeout": float("nan")}, "timeout nan must be a finite number"),
    ({"layer_index": -1}, "layer_index -1"),
])
def test_compile_arguments(fuzz_dir, kwargs, phrase):
    with pytest.raises(InputError) as ei:
        moegraph.compile("switch-tiny", out_dir=fuzz_dir / "args", **kwargs)
    assert phrase in str(ei.value)


# ------------------------------------------------------------------------------------------------
# Layer inputs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers")
    return {n: moegraph.compile(n, out_dir=out, dtype=torch.float32).eval() for n in ("switch-tiny", "hash-tiny")}


def _tensor_or_junk():
    shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
    dts = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                           torch.uint8, torch.bool, torch.int8])
    return st.one_of(
        st.builds(lambda s, dt: torch.zeros(s, dtype=dt), shapes, dts),
        st.builds(lambda s: torch.zeros(s + (32,)), st.lists(st.integers(0, 4), min_size=1, max_size=2).map(tuple)),
        st.sampled_from([None, [1, 2], "x", 3, np.zeros((2, 32), np.float32)]),
    )


@FUZZ_MORE
@given(name=st.sampled_from(["switch-tiny", "hash-tiny"]), x=_tensor_or_junk(), tid=_tensor_or_junk())
def test_fuzz_layer_inputs(layers, name, x, tid):
    layer = layers[name]
    CASES["layer"] = CASES.get("layer", 0) + 1
    if isinstance(tid, torch.Tensor) and tid.dtype in (torch.int64, torch.int32) and tid.numel():
        tid = tid.clamp(0, 7)
    try:
        with torch.inference_mode():
            y = layer(x, tid)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(x, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype


def test_layer_inputs_named_cases(layers):
    lay, hsh = layers["switch-tiny"], layers["hash-tiny"]
    with pytest.raises(InputError, match="dtype torch.float64 but the layer computes in torch.float32"):
        lay(torch.zeros(2, 32, dtype=torch.float64))
    for bad in (torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.uint8)):
        with pytest.raises(InputError, match="int64"):
            hsh(torch.zeros(2, hsh.HIDDEN), bad)
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        hsh(torch.zeros(2, hsh.HIDDEN), [1, 2])


@pytest.fixture(scope="module", autouse=True)
def _report_size():
    yield
    print("\nfuzz cases by input kind:", json.dumps(CASES, sort_keys=True))
