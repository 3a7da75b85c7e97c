"""Every import is declared: the main command's path runs with nothing but what `.[plot]` installs.

The README's main command failed on a fresh machine because the CLI imported click, which only a
test dependency happened to bring in. Here a fresh interpreter is denied every installed package
that the declared core + plot requirements (and their own requirements) do not bring, and runs the
commands on the main command's path (validate, plan with a plot, compile and run a layer).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Import names that differ from their distribution's name.
DIST_OF = {"yaml": "pyyaml", "tomli_w": "tomli-w", "pydantic_core": "pydantic"}


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _closure(reqs: list[str]) -> set[str]:
    """Distributions that installing ``reqs`` brings (their requirements, recursively, no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(reqs)
    while todo:
        r = Requirement(todo.pop())
        name = r.name.lower().replace("_", "-")
        if name in seen or (r.marker is not None and not r.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += md.requires(name) or []
        except md.PackageNotFoundError:
            pass
    return seen


def test_every_third_party_import_is_declared():
    declared = {_name(r) for r in PYPROJECT["dependencies"]}
    for reqs in PYPROJECT["optional-dependencies"].values():
        declared |= {_name(r) for r in reqs}
    undeclared = {}
    for path in (ROOT / "moegraph").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top == "moegraph":
                    continue
                if DIST_OF.get(top, top).lower().replace("_", "-") not in declared:
                    undeclared.setdefault(top, str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


@pytest.mark.slow
def test_main_command_path_needs_only_core_and_plot(tmp_path):
    allowed = _closure(PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["plot"])
    denied = sorted({mod for mod, dists in md.packages_distributions().items()
                     if mod.isidentifier() and not any(d.lower().replace("_", "-") in allowed for d in dists)})
    assert "pytest" in denied, "the test must deny what .[plot] does not bring (pytest, for one)"
    code = f"""
import importlib.abc, sys
DENIED = set({denied!r})
class Deny(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in DENIED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed by .[plot])", name=name)
sys.meta_path.insert(0, Deny())
from moegraph.cli import main
out = sys.argv[1]
for args in (["validate", "examples/specs/my-spec.yaml"],
             ["plan", "deepseek-v3-tiny", "-o", out + "/plan.json", "--plot", out + "/plan.png"],
             ["compile", "deepseek-v3-tiny", "-o", out + "/gen", "--smoke", "8"]):
    rc = main(args)
    assert rc == 0, (args, rc)
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
    assert (tmp_path / "plan.png").stat().st_size > 10_000


def test_heavy_libraries_load_only_when_used():
    # Every `moegraph` command and every rank a run starts imports these packages; scipy.optimize alone
    # (relabelling's assignment solver) took longer to import than the planner around it.
    code = ("import sys, moegraph, moegraph.cli, moegraph.planner, moegraph.compiler, moegraph.distributed.layer, "
            "moegraph.hf; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'scipy', 'matplotlib', 'transformers', 'triton', 'safetensors', 'hypothesis'}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", f"imported at module level, load them where they are used: {r.stdout}"


@pytest.mark.parametrize("args", [
    ["presets"], ["validate", "examples/specs/my-spec.yaml"], ["show", "deepseek-v3"],
    ["schema", "-o", "{tmp}/schema.json"], ["plan", "deepseek-v3-tiny", "-o", "{tmp}/p.json"],
    ["export", "--format", "sglang", "{tmp}/p.json", "-o", "{tmp}/e.json"],
])
def test_commands_that_build_no_layer_do_not_import_torch(args, tmp_path):
    # torch is 2 of the 3 seconds a command took to start; these commands read specs and plans only.
    if args[0] == "export":
        from moegraph.planner import plan

        plan("deepseek-v3-tiny").save(tmp_path / "p.json")
    argv = [a.format(tmp=tmp_path) for a in args]
    code = ("import sys; from moegraph.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "False", f"moegraph {args[0]} imported torch"


def test_triton_bound_has_the_knobs_the_backend_reads():
    # The Triton backend reads `triton.knobs` (triton_backend/render.interpreting), which first shipped in
    # triton 3.4 (renamed from the short-lived triton.config after 3.3 branched): an older triton that the
    # bound allowed failed with ImportError at the first kernel.
    from packaging.requirements import Requirement

    for extra in ("triton", "test"):
        (req,) = [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra] if _name(r) == "triton"]
        assert not req.specifier.contains("3.3.1") and req.specifier.contains("3.4.0"), (extra, str(req))
    assert any("from triton import knobs" in line for line in
               (ROOT / "moegraph" / "triton_backend" / "render.py").read_text().splitlines())
