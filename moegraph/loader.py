"""Reading and writing spec files, preset lookup, and turning validation errors into Problems.

``load_spec`` accepts a path (YAML, JSON or TOML, chosen by extension), a preset name (a file in
``specs/`` without its extension) or a dict. A bad spec raises ``SpecError`` with one Problem per
thing wrong: the field path, what was wrong, and what to do (with a did-you-mean for unknown keys).
"""

from __future__ import annotations

import difflib
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import Problem, SpecError
from .resources import specs_dir
from .spec import MoESpec

__all__ = ["load_spec", "presets", "preset_path", "dump_spec", "read_spec_dict", "SPEC_SUFFIXES"]

SPEC_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}


def presets() -> dict[str, Path]:
    """Bundled preset specs by name (file name without extension), sorted."""
    out = {}
    for p in sorted(specs_dir().iterdir()):
        if p.suffix in SPEC_SUFFIXES and not p.name.startswith("_"):
            out[p.stem] = p
    return out


def preset_path(name: str) -> Path:
    found = presets()
    if name in found:
        return found[name]
    close = difflib.get_close_matches(name, list(found), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(found)}"
    raise SpecError([Problem("", f"no spec file or preset named {name!r}{hint}")], source=name)


def read_spec_dict(path: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a spec file into a plain dict. Returns (dict, source label)."""
    p = Path(path)
    if not p.exists():
        if p.suffix == "" and "/" not in str(path):
            p = preset_path(str(path))
        else:
            raise SpecError([Problem("", "file not found; check the path or use a preset name")], source=str(path))
    fmt = SPEC_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise SpecError(
            [Problem("", f"unknown spec file extension {p.suffix!r}; use .yaml, .yml, .json or .toml")],
            source=str(p),
        )
    try:
        text = p.read_text(encoding="utf-8")
        if fmt == "yaml":
            data = yaml.safe_load(text)
        elif fmt == "json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        msg = " ".join(str(exc).split())
        raise SpecError([Problem("", f"not valid {fmt.upper()}: {msg}")], source=str(p)) from None
    except OSError as exc:
        raise SpecError([Problem("", f"cannot read the file: {exc.strerror}")], source=str(p)) from None
    if not isinstance(data, dict):
        raise SpecError(
            [Problem("", f"the top level must be a mapping of sections (moe, model, ...), got {type(data).__name__}")],
            source=str(p),
        )
    return data, str(p)


def load_spec(spec: str | Path | Mapping[str, Any] | MoESpec, *, source: str | None = None) -> MoESpec:
    """Load and validate a spec from a path, a preset name, a dict, or pass a MoESpec through."""
    if isinstance(spec, MoESpec):
        return spec
    if isinstance(spec, Mapping):
        data, label = dict(spec), source or "<dict>"
    else:
        data, label = read_spec_dict(spec)
    try:
        return MoESpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc), source=label) from None


def dump_spec(spec: MoESpec, path: str | Path) -> Path:
    """Write a spec in the format chosen by the path's extension (all defaults spelled out)."""
    p = Path(path)
    fmt = SPEC_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise SpecError([Problem("", f"unknown extension {p.suffix!r}; use .yaml, .json or .toml")], source=str(p))
    data = _drop_none(spec.model_dump(mode="json"))
    if fmt == "yaml":
        text = yaml.safe_dump(data, sort_keys=False)
    elif fmt == "json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import tomli_w

        text = tomli_w.dumps(data)
    p.write_text(text, encoding="utf-8")
    return p


def _drop_none(obj: Any) -> Any:
    """TOML has no null: omit None values (they are the defaults of every optional field)."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Validation errors -> Problems
# ----------------------------------------------------------------------------------------------


def problems_from_validation(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        path = ".".join(str(x) for x in loc)
        msg = _message(err, loc)
        if (path, msg) not in seen:
            seen.add((path, msg))
            problems.append(Problem(path, msg))
    return problems


_TAGS = {"topk", "expert_choice", "hash", "uniform", "explicit", "mha", "mla"}


def _clean_loc(loc: tuple) -> tuple:
    """Drop union tags that pydantic inserts into locations (they are not keys the user wrote)."""
    return tuple(x for x in loc if not (isinstance(x, str) and (x in _TAGS or x.startswith("function-"))))


def _message(err: dict, loc: tuple) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(sorted(allowed))}"
        return f"unknown key '{key}'; {hint}"
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        return f"{err['msg'].lower()}, got {err.get('input')!r}"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    inp = err.get("input")
    shown = f" (got {inp!r})" if not isinstance(inp, (dict, list)) else ""
    return f"{err['msg']}{shown}"


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """BaseModel classes reachable in an annotation (through Optional, Union, Annotated, tuple)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if origin is typing.Annotated:
        return _models_in(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType, tuple, list):
        out: list[type[BaseModel]] = []
        for a in typing.get_args(tp):
            out += _models_in(a)
        return out
    return []


def _fields_at(loc: tuple) -> list[str]:
    models: list[type[BaseModel]] = [MoESpec]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for m in models:
            f = m.model_fields.get(str(part))
            if f is not None:
                nxt += _models_in(f.annotation)
        models = nxt or models
    names: set[str] = set()
    for m in models:
        names |= set(m.model_fields)
    return sorted(names)
