"""Data never becomes code: every string field of a spec, with break-out payloads, and the guards
that make injection impossible by construction (the template finalizer, the module shape check,
score expressions compiled from their tree), plus the verified generated-code cache."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import moegraph
from moegraph import codegen
from moegraph.codegen_safe import Code, block_literal, check_module, comment_text, finalize, py_literal
from moegraph.errors import CodegenError, SpecError

TINY = {
    "name": "tiny",
    "moe": {"hidden_size": 8, "experts": {"num_experts": 4, "intermediate_size": 8},
            "router": {"type": "topk", "top_k": 2, "score": "sigmoid"}},
}


def _payloads(marker: Path) -> list[str]:
    """Strings that would create ``marker`` if pasted unescaped into a comment, docstring or literal."""
    run = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return [
        f"x\n{run}\n#",  # newline out of a comment
        f"x\r{run}\r#",  # CR
        f"x\x0c\n{run}\n#",  # form feed
        f"x\u2028{run}\u2028#",  # unicode line separator
        f'x"""\n{run}\n"""',  # out of the docstring
        f"x'''\n{run}\n'''",
        f'x"; {run}; "',  # out of a double-quoted literal
        f"x'; {run}; '",
        f"x\\\n{run}",  # backslash continuation
        f'x\\"""\n{run}\n"""',  # escaped quote then break-out
        f"x{{{{ {run} }}}}{{% raw %}}",  # template syntax is not re-rendered
        f"x\x00{run}",  # NUL
        f"x\n\t{run}",  # indented into the class body
    ]


def _set(d: dict, path: str, value) -> dict:
    d = json.loads(json.dumps(d))
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {}) if not k.isdigit() else cur[int(k)]
    if keys[-1].isdigit():
        cur[int(keys[-1])] = value
    else:
        cur[keys[-1]] = value
    return d


EXPLICIT_TOPO = {"kind": "explicit", "devices": [{"name": "g0", "node": "n0"}, {"name": "g1", "node": "n0"}],
                 "links": [{"a": "g0", "b": "g1", "bandwidth_gbps": 100.0}]}

#: every string field of a spec (path -> how to build a spec holding the payload there)
STRING_FIELDS = {
    "name": lambda v: _set(TINY, "name", v),
    "description": lambda v: _set(TINY, "description", v),
    "source": lambda v: _set(TINY, "source", v),
    "moe.router.score": lambda v: _set(TINY, "moe.router.score", v),
    "expert_choice.score": lambda v: _set(_set(TINY, "moe.router", {"type": "expert_choice"}), "moe.router.score", v),
    "placement.traces.0": lambda v: _set(TINY, "placement.traces", [v]),
    "topology.devices.0.name": lambda v: _set(
        _set(TINY, "topology", {**EXPLICIT_TOPO, "links": []}), "topology.devices.0.name", v),
    "topology.devices.0.node": lambda v: _set(_set(TINY, "topology", EXPLICIT_TOPO), "topology.devices.0.node", v),
    "topology.links.0.a": lambda v: _set(_set(TINY, "topology", EXPLICIT_TOPO), "topology.links.0.a", v),
}


@pytest.mark.parametrize("field", list(STRING_FIELDS))
def test_no_spec_string_field_runs_code(field, tmp_path):
    """Each payload either is refused by validation or compiles to a layer that holds it as data."""
    marker = tmp_path / "PWNED"
    out = tmp_path / "gen"
    accepted = 0
    for payload in _payloads(marker):
        data = STRING_FIELDS[field](payload)
        try:
            spec = moegraph.load_spec(data)
        except SpecError as exc:
            assert "Traceback" not in str(exc)
            continue
        accepted += 1
        cls, gen = codegen.layer_class(spec, out_dir=out)
        assert not marker.exists(), f"{field}: payload {payload!r} ran code"
        # The spec is data in the module: SPEC_JSON is valid JSON holding the same spec.
        assert json.loads(cls.SPEC_JSON) == spec.to_dict()
        assert json.loads(cls.SPEC_JSON)["name"] == spec.name
    assert not marker.exists()
    if field in ("description", "source", "placement.traces.0"):
        assert accepted == len(_payloads(marker)), f"free-text field {field} should accept any text"


def test_name_payloads_through_the_cli_and_compile(tmp_path, run_cli):
    """`moegraph validate`/`compile --smoke` and moegraph.compile on a spec file whose name breaks out of
    the docstring: the layer runs, the marker file never appears."""
    marker = tmp_path / "PWNED"
    run = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    name = f'evil"""; {run}; """ [/x] [red]'
    spec_file = tmp_path / "evil.json"
    spec_file.write_text(json.dumps(_set(TINY, "name", name)))
    r = run_cli("validate", spec_file)
    assert r.code == 0 and "[/x] [red]" in r.out
    r = run_cli("compile", spec_file, "-o", tmp_path / "out", "--smoke", "4")
    assert r.code == 0, r.err
    assert "smoke forward" in r.out
    layer = moegraph.compile(str(spec_file), out_dir=tmp_path / "out2")
    assert layer(torch.randn(1, 3, 8)).shape == (1, 3, 8)
    assert not marker.exists()
    (gen,) = (tmp_path / "out").glob("*.py")
    assert "touch()" in gen.read_text() and name not in gen.read_text()  # present only escaped


def test_names_with_line_breaks_are_refused_at_validate():
    for bad in ("a\nb", "a\rb", "a\x0cb", " padded", "a\u2028b"):
        with pytest.raises(SpecError, match="name: name .* line break"):
            moegraph.load_spec(_set(TINY, "name", bad))


# ------------------------------------------------------------------------------------------------
# Score expressions: validate refuses what codegen could not compile; code comes from the tree
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr, why", [
    ("sigmoid(x\n)", "line break"),
    ("x +\\\n1", "line break"),
    ("log(x)", "not finite at the logit"),
    ("x / 0", "not finite"),
    ("sqrt(x)", "not finite"),
    ("exp(exp(x))", "not finite"),
    ("x ** 0.5", "not finite"),
    ("x * 1e400", "too large"),
    ("x + 99999999999999999999999", "too large"),
    ("sigmoid + x", "must be called"),
    ("x if x else x", "IfExp is not allowed"),
    ("sigmoid(*x)", "exactly one argument"),
])
def test_bad_score_expressions_refused_at_validate(expr, why):
    with pytest.raises(SpecError, match="moe.router.score") as ei:
        moegraph.load_spec(_set(TINY, "moe.router.score", expr))
    assert why in str(ei.value)


def test_score_code_is_emitted_from_the_tree():
    spec = moegraph.load_spec(_set(TINY, "moe.router.score", "sqrt(softplus(x)) + 2 * tanh(-x)"))
    code = codegen.context(spec)["score_code"]
    assert isinstance(code, Code)
    assert code == ("torch.sqrt(torch.nn.functional.softplus(logits_TE)) + "
                    "(2.0 * torch.tanh((-logits_TE)))")
    # The emitted code computes what the expression means (reference: the expression by hand).
    x = torch.linspace(-5, 5, 11)
    got = eval(code, {"torch": torch, "logits_TE": x})  # noqa: S307 - the test's own check
    want = torch.sqrt(torch.log1p(torch.exp(x))) + 2 * torch.tanh(-x)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# The guards themselves
# ------------------------------------------------------------------------------------------------


def test_finalize_refuses_raw_strings_that_could_break_out():
    assert finalize("silu") == "silu" and finalize(3) == "3" and finalize(0.5) == "0.5" and finalize(None) == "None"
    for bad in ('a"b', "a'b", "a\nb", "a#b", "a\\b", "f(x)", "a;b"):
        with pytest.raises(CodegenError, match="raw string"):
            finalize(bad)
    with pytest.raises(CodegenError, match="non-finite"):
        finalize(float("inf"))
    assert finalize(Code("f(x)")) == "f(x)"


@pytest.mark.parametrize("value", ['a"""b', "a\nb\r\x0c\u2028c", "\\", "'\"", "\U0001f600", "x\x00y", ""])
def test_literal_filters_read_back(value):
    import ast

    assert ast.literal_eval(py_literal(value)) == value
    assert ast.literal_eval(block_literal(value)) == value
    text = comment_text(value)
    assert text.isprintable() and not any(c in text for c in "\"'\n\r")
    assert all(c == "\\" and text[i + 1] in "uU" for i, c in enumerate(text) if c == "\\")  # only our escapes
    # A comment holding the text ends where the line ends; a docstring holding it stays one docstring.
    src = f'"""{text}"""\n# {text}\nX = 1\n'
    tree = ast.parse(src)
    assert len(tree.body) == 2


@pytest.mark.parametrize("src, why", [
    ("import os\n", "import of 'os'"),
    ("X = print('hi')\n", "computed value"),
    ("print('hi')\n", "Expr statement"),
    ("class A(object, metaclass=M):\n    pass\n", "bases"),
    ("class A:\n    X = open('f')\n", "computed value"),
    ("@exec('x')\ndef f():\n    pass\n", None),
    ("def f(a=print()):\n    pass\n", "default argument"),
    ("if True:\n    X = 1\n", "If statement"),
    ("from . import x\n", "relative import"),
])
def test_module_shape_check(src, why):
    if why is None:  # a decorator call with literal arguments is static (triton.jit(...)): allowed shape
        check_module(src, "t")
        return
    with pytest.raises(CodegenError, match="unexpected shape") as ei:
        check_module(src, "t")
    assert why in str(ei.value)


def test_generated_presets_pass_the_shape_check():
    for name in moegraph.presets():
        check_module(codegen.render(moegraph.load_spec(name)), name)


def test_backend_refused_before_writing(tmp_path, run_cli):
    r = run_cli("compile", "switch-tiny", "-o", tmp_path / "out", "--backend", "cuda")
    assert r.code == 2 and "unknown backend 'cuda'" in r.err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# The cache verifies what it imports
# ------------------------------------------------------------------------------------------------


def _forward(layer) -> torch.Tensor:
    torch.manual_seed(0)
    return layer.eval()(torch.randn(2, 3, 8))


def test_stale_bytecode_never_changes_the_output(tmp_path):
    """A .pyc compiled from other source, placed where Python would pick it up, is ignored."""
    import importlib.util
    import py_compile

    spec = moegraph.load_spec(TINY)
    out = tmp_path / "gen"
    gen = codegen.write_source(spec, out)
    want = _forward(moegraph.compile(spec, out_dir=out))
    # Bytecode of an evil twin (every output zero), written under the real file's cache name.
    twin = tmp_path / "twin.py"
    twin.write_text(gen.source.replace("return y_TD.view(", "return 0 * y_TD.view("))
    pyc = Path(importlib.util.cache_from_source(str(gen.path)))
    pyc.parent.mkdir(parents=True, exist_ok=True)
    py_compile.compile(str(twin), cfile=str(pyc), dfile=str(gen.path))
    st = os.stat(gen.path)
    os.utime(twin, ns=(st.st_atime_ns, st.st_mtime_ns))
    codegen._MODULES.clear()
    got = _forward(moegraph.compile(spec, out_dir=out))
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("damage", [b"\xff\xfe not utf-8", b"", b"raise SystemExit(3)\n", b"\x00" * 10])
def test_corrupt_cached_files_are_rebuilt(tmp_path, damage):
    spec = moegraph.load_spec(TINY)
    out = tmp_path / "gen"
    gen = codegen.write_source(spec, out)
    gen.path.write_bytes(damage)
    pycache = gen.path.parent / "__pycache__"
    pycache.mkdir(exist_ok=True)
    (pycache / (gen.path.stem + ".cpython-311.pyc")).write_bytes(b"garbage" + damage)
    codegen._MODULES.clear()
    layer = moegraph.compile(spec, out_dir=out)
    assert _forward(layer).shape == (2, 3, 8)
    assert gen.path.read_text(encoding="utf-8") == gen.source  # rebuilt


def test_generated_files_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        gen = codegen.write_source(moegraph.load_spec(TINY), tmp_path / "gen")
    finally:
        os.umask(old)
    assert stat.S_IMODE(gen.path.stat().st_mode) == 0o644
    assert not list((tmp_path / "gen").glob(".tmp-*"))  # no temporary left behind


def test_cli_prints_brackets_verbatim(tmp_path, run_cli):
    """Error text and names are printed as text, never read as rich markup: nothing vanishes or crashes."""
    missing = tmp_path / "[/x]" / "[red]spec[/].yaml"
    r = run_cli("validate", missing)
    assert r.code == 2 and f"error: {missing}: <root>: file not found" in " ".join(r.err.split())
    plan = tmp_path / "[bold]plan.json"
    plan.write_text('{"format": "moegraph-plan", "version": 1}')
    r = run_cli("plan", "--evaluate", plan, "--trace", "esft-deepseek-v2-lite/law")
    assert r.code == 2 and f"{plan}: field 'spec' is missing" in " ".join(r.err.split()), r.err
    # Bracketed text inside a message survives (it once printed as "is not a  array of integers").
    plan.write_text(json.dumps({"format": "moegraph-plan", "version": 1, "spec": moegraph.load_spec(TINY).to_dict(),
                                "spec_hash": moegraph.load_spec(TINY).hash(), "physical_to_logical_map": "x"}))
    r = run_cli("plan", "--evaluate", plan, "--trace", "esft-deepseek-v2-lite/law")
    assert r.code == 2 and "is not a [layers][slots] array of integers" in r.err, r.err
    r = run_cli("show", "[red]x[/]")
    assert r.code == 2 and "error: [red]x[/]: <root>: file not found" in r.err, r.err


def test_plan_embedded_spec_payload_stays_data(tmp_path):
    """A plan file carries its spec: a break-out name in it compiles to data, through Plan.load."""
    from moegraph.planner import Plan, plan

    marker = tmp_path / "PWNED"
    name = f'p"""\\x0c; __import__("pathlib").Path({str(marker)!r}).touch(); """'
    spec = moegraph.load_spec(_set(TINY, "name", name))
    path = plan(spec, rounds=0).save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    layer = moegraph.compile(loaded.spec, plan=loaded, out_dir=tmp_path / "gen")
    assert layer(torch.randn(3, 8)).shape == (3, 8)
    assert json.loads(layer.SPEC_JSON)["name"] == name
    assert not marker.exists()
