"""Where the bundled data lives: ``specs/`` and ``codegen_templates/``.

In a wheel they are installed as ``moegraph/_data/<name>``; in a source checkout (or an editable
install) they are the top-level folders beside the package.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Path of a bundled folder, ``specs`` or ``codegen_templates``."""
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"moegraph's bundled folder '{name}' is missing (looked in {_PKG / '_data'} and {_PKG.parent}); "
        "reinstall moegraph"
    )


def specs_dir() -> Path:
    return data_dir("specs")


def templates_dir() -> Path:
    return data_dir("codegen_templates")
