"""The one escaping path from data to generated source, and the check of what was generated.

Specs, traces and plans are shared like data files, so nothing in them may become code. Every value
a template prints goes through ``finalize`` (installed as the Jinja environment's ``finalize``):

- numbers and booleans print as Python literals (a non-finite float is refused: ``inf`` would be a
  name, not a number);
- ``Code`` (a str subclass) is source decided by moegraph itself: fixed spellings, and score
  expressions emitted node by node from their parsed tree;
- any other string prints only if it is a plain word list (letters, digits, ``_ . , + - * / = < > :
  [ ]`` and spaces): no quote, backslash, ``#``, parenthesis or line break can reach the file.
  Anything else must go through a filter:

  - ``|py``: a Python literal (JSON-style double-quoted strings, else ``repr``; checked to read
    back as the same value);
  - ``|text``: text for a comment or docstring: one line, printable, without quotes or
    backslashes (those are written as ``\\uXXXX``), so it can end neither the comment nor the
    docstring;
  - ``|block``: a multi-line str literal (raw triple-quoted when that reads back exactly, else
    ``repr``), for the canonical spec JSON.

A template that prints a raw string with other characters fails to render (``CodegenError``)
instead of producing code. Before a generated module is written, ``check_module`` parses it and
refuses anything but the expected top-level shape: a docstring, imports of known packages,
assignments of literals, class and function definitions (decorators and bases plain names,
attributes or calls of them with literal arguments).
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from .errors import CodegenError

__all__ = ["Code", "finalize", "py_literal", "comment_text", "block_literal", "check_module", "FILTERS"]


class Code(str):
    """Source text decided by moegraph (never a string copied from a spec, trace or plan)."""


#: what a plain string may hold to print unfiltered: words, numbers and arithmetic, nothing that
#: opens or closes a literal, a comment or a call
_PLAIN = re.compile(r"[A-Za-z0-9_ .,+\-*/=<>:\[\]]*")


def _number(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise CodegenError(f"generated code would hold the non-finite number {value!r}; this is a moegraph bug "
                           "if the spec validated")
    return repr(value)


def finalize(value: Any) -> str:
    """How every ``{{ ... }}`` of a template prints (see the module docstring)."""
    if isinstance(value, Code):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return _number(value) if isinstance(value, float) else repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value):
            return value
        raise CodegenError(
            f"template printed the raw string {value[:60]!r}; pass data through |py, |text or |block (a moegraph bug)"
        )
    raise CodegenError(f"template printed a {type(value).__name__} value; pass it through |py (a moegraph bug)")


def _literal_ok(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (str, bool, int, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_literal_ok(v) for v in value)
    if isinstance(value, dict):
        return all(_literal_ok(k) and _literal_ok(v) for k, v in value.items())
    return False


def py_literal(value: Any) -> Code:
    """A Python literal that reads back (``ast.literal_eval``) as ``value``."""
    if not _literal_ok(value):
        raise CodegenError(f"cannot write {type(value).__name__} value {str(value)[:60]!r} as a Python literal")
    if isinstance(value, str):
        # Double-quoted like hand-written code where JSON's escaping reads back the same in Python.
        text = json.dumps(value)
        try:
            if ast.literal_eval(text) == value:
                return Code(text)
        except (SyntaxError, ValueError):
            pass
    text = repr(value)
    assert ast.literal_eval(text) == value, f"repr of {value!r} does not read back"
    return Code(text)


def comment_text(value: Any) -> Code:
    """``value`` as one printable line without quotes or backslashes, safe in a comment or docstring."""
    out = []
    for ch in str(value):
        if ch.isprintable() and ch not in "\\\"'":
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return Code("".join(out))


def block_literal(text: str) -> Code:
    """A str literal for multi-line text: raw triple-quoted when that reads back exactly, else repr."""
    if not isinstance(text, str):
        raise CodegenError(f"block literal needs a str, got {type(text).__name__}")
    raw = 'r"""' + text + '"""'
    safe = text.isascii() and '"""' not in text and not text.endswith(('"', "\\")) and all(
        ch.isprintable() or ch == "\n" for ch in text)
    if safe:
        try:
            if ast.literal_eval(raw) == text:
                return Code(raw)
        except (SyntaxError, ValueError):
            pass
    return py_literal(text)


FILTERS = {"py": py_literal, "text": comment_text, "block": block_literal}

# ------------------------------------------------------------------------------------------------
# The shape of a generated module
# ------------------------------------------------------------------------------------------------

#: packages a generated module may import
_IMPORTABLE = ("torch", "triton", "moegraph", "math", "__future__")


def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _reference(node: ast.AST) -> bool:
    """A name or a dotted attribute of a name (``torch``, ``runtime.CompiledMoEBase``)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _static_call(node: ast.AST) -> bool:
    """A reference, or a call of one whose arguments are literals, references or static calls."""
    if _reference(node) or _literal(node):
        return True
    if isinstance(node, (ast.List, ast.Tuple)):
        return all(_static_call(e) for e in node.elts)
    if isinstance(node, ast.Call):
        return (_reference(node.func) and all(_static_call(a) for a in node.args)
                and all(k.arg is not None and _static_call(k.value) for k in node.keywords))
    return False


def _check_body(body: list[ast.stmt], where: str, top: bool) -> str | None:
    """Why a module or class body is not of the expected shape (None when it is)."""
    for i, stmt in enumerate(body):
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            continue  # docstring
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) and top:
            names = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
            if isinstance(stmt, ast.ImportFrom) and stmt.level:
                return f"line {stmt.lineno}: relative import"
            bad = [n for n in names if n.split(".")[0] not in _IMPORTABLE]
            if bad:
                return f"line {stmt.lineno}: import of {bad[0]!r}"
            continue
        if isinstance(stmt, ast.Assign):
            if not all(isinstance(t, ast.Name) for t in stmt.targets):
                return f"line {stmt.lineno}: assignment to something other than a name"
            if not (_literal(stmt.value) or _reference(stmt.value)):
                return f"line {stmt.lineno}: assignment of a computed value"
            continue
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            if not all(_static_call(d) for d in stmt.decorator_list):
                return f"line {stmt.lineno}: decorator of {stmt.name!r} is not a plain reference"
            if isinstance(stmt, ast.ClassDef):
                if not all(_reference(b) for b in stmt.bases) or stmt.keywords:
                    return f"line {stmt.lineno}: bases of class {stmt.name!r}"
                why = _check_body(stmt.body, f"class {stmt.name}", top=False)
                if why:
                    return why
            else:
                a = stmt.args
                defaults = [*a.defaults, *(d for d in a.kw_defaults if d is not None)]
                if not all(_literal(d) for d in defaults):
                    return f"line {stmt.lineno}: default argument of {stmt.name!r} is not a literal"
            continue
        return f"line {stmt.lineno}: {type(stmt).__name__} statement in {where}"
    return None


def check_module(source: str, what: str) -> None:
    """Refuse generated source that does not parse or is not of the expected top-level shape."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CodegenError(f"{what}: generated source does not parse ({exc}); refusing to write it") from None
    why = _check_body(tree.body, "the module", top=True)
    if why:
        raise CodegenError(f"{what}: generated source has an unexpected shape ({why}); refusing to write it")
