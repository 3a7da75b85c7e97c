"""Every command and snippet in the README runs as written, from a fresh copy of the repository root.

The README's fenced ``bash`` and ``python`` blocks are extracted and run section by section (a
section's blocks in order, in one directory, as a reader would), in a temporary directory that
holds links to the repository's top-level entries, so outputs never land in the repository. Not
run here, each for the reason asserted below: the two install commands at the top (the main one
runs in a fresh virtual environment in CI: ``.ci/readme_main``; the test command is this suite).
A few commands run at a smaller size; each such substitution is listed and must match the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# The install commands at the top, and why this test does not run them.
NOT_RUN = {
    'pip install torch==2.13.0 && pip install -e ".[plot]" && moegraph demo':
        "installs into the environment; .ci/readme_main runs it in a fresh venv",
    'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -n 2':
        "installs into the environment and runs this very suite",
}
# Commands run at a smaller size here (same command and code path, fewer tokens or rounds).
SMALLER = {
    "moegraph bench -t 1 -t 128 --rounds 3": "moegraph bench -t 1 --rounds 1",
    "torchrun --nproc-per-node 2 examples/replan_loop.py":
        "torchrun --nproc-per-node 2 examples/replan_loop.py --tokens 16 --batches 2",
    "moegraph run deepseek-v3-tiny --plan tiny-plan.json --steps 12 --rebalance-every 3":
        "moegraph run deepseek-v3-tiny --plan tiny-plan.json --steps 6 --rebalance-every 3 --tokens 32",
    "python benchmarks/replan_bench.py":
        "python benchmarks/replan_bench.py --quick --skip-scale --skip-streams --plot replan.png",
}
# What each section's commands must leave behind (beyond exiting 0).
OUTPUTS = {
    "Quick start (60 seconds)": ["moegraph.schema.json", "plan.json", "plan.png", "out"],
    "Placement planning": ["v2lite.npz", "counts.npz", "plan.json", "plan.png", "expert_location.json"],
    "Expert parallelism": ["plan.json"],
    "Hugging Face models": ["tiny-qwen2-moe/config.json", "spec.yaml"],
    "Re-planning while running": ["plan.json", "new.json", "capped.json"],
}


def _sections() -> dict[str, list[tuple[str, str]]]:
    """README section title -> its fenced (language, body) blocks, in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for part in re.split(r"^## ", README, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        out[title.strip()] = re.findall(r"^```(\w+)\n(.*?)^```", body, flags=re.S | re.M)
    return out


def _commands(script: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    cmds = []
    for line in script.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            cmds.append(re.sub(r"\s+", " ", line))
    return cmds


SECTIONS = _sections()
RUN_SECTIONS = [t for t, blocks in SECTIONS.items() if any(lang in ("bash", "python") for lang, _ in blocks)
                and t != "The two commands"]


def test_only_the_install_commands_are_left_out():
    top = [c for lang, b in SECTIONS["The two commands"] if lang == "bash" for c in _commands(b)]
    assert top == list(NOT_RUN), "the README's top commands changed: update NOT_RUN and .ci/readme_main"
    for cmd, why in NOT_RUN.items():
        assert cmd.startswith("pip install torch==2.13.0 && pip install -e"), why
    ci = (ROOT / ".ci" / "run").read_text() + (ROOT / ".ci" / "readme_main").read_text()
    assert ".ci/readme_main" in ci and "Main job" in ci, "CI must run the README's main command"
    every = [c for blocks in SECTIONS.values() for lang, b in blocks if lang == "bash" for c in _commands(b)]
    for cmd in SMALLER:
        assert cmd in every, f"README no longer has {cmd!r}: update SMALLER"
    assert set(OUTPUTS) <= set(RUN_SECTIONS)


def test_the_spec_file_section_is_the_shipped_example():
    (lang, body), = [blk for blk in SECTIONS["A spec file"] if blk[0] == "yaml"]
    assert "`examples/specs/my-spec.yaml`" in README
    assert body == (ROOT / "examples" / "specs" / "my-spec.yaml").read_text()


@pytest.fixture
def fresh_root(tmp_path):
    """A directory that looks like the repository root (links) where outputs can be written."""
    root = tmp_path / "repo"
    root.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "moegraph-out", "out"} and not entry.name.startswith((".pytest", ".hyp")):
            (root / entry.name).symlink_to(entry)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XDG_CACHE_HOME=str(tmp_path / "cache"), MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)
    return root, env


def _run(cmd: list[str] | str, root: Path, env: dict, what: str) -> str:
    r = subprocess.run(cmd, cwd=root, env=env, shell=isinstance(cmd, str), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README {what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("section", RUN_SECTIONS)
def test_readme_section_runs_as_written(section, fresh_root):
    root, env = fresh_root
    ran = []
    for lang, body in SECTIONS[section]:
        if lang == "python":
            _run([sys.executable, "-c", body], root, env, f"python snippet in {section!r}")
            ran.append("python snippet")
        elif lang == "bash":
            for cmd in _commands(body):
                out = _run(SMALLER.get(cmd, cmd), root, env, f"command {cmd!r}")
                if cmd.startswith("moegraph validate"):
                    assert out.startswith("ok ") and "my-spec" in out, out
                if cmd.startswith("moegraph export"):
                    assert "--init-expert-location expert_location.json" in out, out
                ran.append(cmd)
    assert ran, f"nothing to run in {section!r}"
    for rel in OUTPUTS.get(section, []):
        assert (root / rel).exists(), f"{section!r}: the README's commands should have written {rel}"
