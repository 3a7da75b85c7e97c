"""The wheel carries the presets and the codegen templates, and an installed copy finds them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _checkout_files() -> list[str]:
    """Files a fresh clone of this working tree would have: tracked plus untracked-but-not-ignored."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built with hatchling from a clean copy of the checkout (no build outputs, no ignored files)."""
    pytest.importorskip("hatchling")
    from hatchling.builders.wheel import WheelBuilder

    src = tmp_path_factory.mktemp("checkout")
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    out = tmp_path_factory.mktemp("dist")
    (path,) = WheelBuilder(str(src)).build(directory=str(out), versions=["standard"])
    return Path(path)


def test_wheel_holds_presets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "specs").glob("*.yaml"))
    assert presets
    for p in presets:
        assert f"moegraph/_data/specs/{p}" in names


def test_wheel_holds_codegen_templates(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = [f for f in _checkout_files() if f.startswith("codegen_templates/")]
    assert templates, "codegen_templates/ holds no files, so a fresh clone lacks it and the wheel build fails"
    for t in templates:
        assert "moegraph/_data/" + t in names


def test_wheel_metadata(wheel):
    zf = zipfile.ZipFile(wheel)
    entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "moegraph = moegraph.cli:entry" in zf.read(entry_points).decode()
    assert not [n for n in zf.namelist() if n.startswith("tests/")], "tests must not ship in the wheel"


def test_installed_wheel_finds_bundled_data(wheel, tmp_path):
    """Unpacked like site-packages, moegraph reads presets and templates from moegraph/_data."""
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import moegraph, moegraph.resources as r\n"
        "print(moegraph.__file__)\n"
        "print(r.specs_dir())\n"
        "print(r.templates_dir())\n"
        "print(len(moegraph.presets()))\n"
        "print(moegraph.load_spec('deepseek-v3').short_hash)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    module, specs, templates, count, short_hash = proc.stdout.split()
    assert Path(module).is_relative_to(tmp_path)
    assert Path(specs) == tmp_path / "moegraph" / "_data" / "specs"
    assert Path(templates) == tmp_path / "moegraph" / "_data" / "codegen_templates"
    assert int(count) == len(list((ROOT / "specs").glob("*.yaml")))

    from moegraph.loader import load_spec

    assert short_hash == load_spec("deepseek-v3").short_hash
