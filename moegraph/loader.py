"""Reading and writing spec files, preset lookup, and turning validation errors into Problems.

``load_spec`` accepts a path (YAML, JSON or TOML, chosen by extension), a preset name (a file in
``specs/`` without its extension) or a dict. A bad spec raises ``SpecError`` with one Problem per
thing wrong: the field path, what was wrong, and what to do (with a did-you-mean for unknown keys).
"""

from __future__ import annotations

import functools
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from .errors import MAX_PROBLEMS, Problem, SpecError, close_names, more_problems, short_repr
from .fileio import DuplicateKey, input_problem, unique_json_object, write_atomically
from .resources import specs_dir
from .spec import MoESpec

__all__ = ["load_spec", "presets", "preset_path", "dump_spec", "read_spec_dict", "SPEC_SUFFIXES"]

SPEC_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}


def presets() -> dict[str, Path]:
    """Bundled preset specs by name (file name without extension), sorted."""
    out = {}
    for p in specs_dir().iterdir():
        if p.suffix in SPEC_SUFFIXES and not p.name.startswith("_"):
            out[p.stem] = p
    return dict(sorted(out.items()))


def preset_path(name: str) -> Path:
    found = presets()
    if name in found:
        return found[name]
    close = close_names(name, found, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(found)}"
    raise SpecError([Problem("", f"no spec file or preset named {name!r}{hint}")], source=name)


#: the largest spec file read (a spec is a few kilobytes; a bigger file is not one, or a device)
MAX_SPEC_BYTES = 16 << 20


def read_spec_dict(path: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a spec file into a plain dict. Returns (dict, source label)."""
    p = Path(path)
    # A bare name (no folder, no extension) is a preset's when one has it: a file or folder of that name here (the
    # output folder of `moegraph compile mixtral-tiny -o mixtral-tiny`) is never a spec file, which has an extension.
    bare = p.suffix == "" and "/" not in str(path)
    if bare and str(path) in presets():
        p = preset_path(str(path))
    problem = input_problem(p, "spec", MAX_SPEC_BYTES)
    if problem is not None:
        raise SpecError([Problem("", problem)], source=str(p))
    if not p.exists():
        if bare:
            p = preset_path(str(path))
        else:
            raise SpecError([Problem("", "file not found; check the path or use a preset name")], source=str(path))
    if p.is_dir():
        preset = f"; for the preset {p.name!r} write its name alone" if p.name in presets() else ""
        raise SpecError([Problem("", f"is a folder; give a spec file (.yaml, .yml, .json or .toml){preset}")],
                        source=str(path))
    fmt = SPEC_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise SpecError(
            [Problem("", f"unknown spec file extension {p.suffix!r}; use .yaml, .yml, .json or .toml")],
            source=str(p),
        )
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) skipped
        if fmt == "yaml":
            data = yaml.load(text, Loader=_yaml_loader(text))
        elif fmt == "json":
            data = json.loads(text, object_pairs_hook=unique_json_object)
        else:
            data = tomllib.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        msg = " ".join(str(exc).split())
        raise SpecError([Problem("", f"not valid {fmt.upper()}: {msg}")], source=str(p)) from None
    except RecursionError:
        raise SpecError([Problem("", "nested too deeply to be a spec; a spec is a few levels of sections")],
                        source=str(p)) from None
    except (_DuplicateKey, _RefusedScalar) as exc:
        raise SpecError([Problem(getattr(exc, "path", ""), str(exc))], source=str(p)) from None
    except ValueError as exc:  # Python's limit on the digits of an integer (int_max_str_digits), a bad !!timestamp
        if "digits" in str(exc):
            msg = "holds an integer with thousands of digits; no spec field takes such a number"
        else:
            msg = f"not valid {fmt.upper()}: {' '.join(str(exc).split())[:200]}"
        raise SpecError([Problem("", msg)], source=str(p)) from None
    except OSError as exc:
        raise SpecError([Problem("", f"cannot read the file: {exc.strerror}")], source=str(p)) from None
    if data is None:
        raise SpecError([Problem("", "the file is empty; a spec needs at least a 'moe' section")], source=str(p))
    if not isinstance(data, dict):
        raise SpecError(
            [Problem("", f"the top level must be a mapping of sections (moe, model, ...), got {type(data).__name__}")],
            source=str(p),
        )
    return data, str(p)


_DuplicateKey = DuplicateKey  # a key given twice in one mapping of a spec file


class _RefusedScalar(Exception):
    """A YAML value the loader refuses: one whose meaning differs between YAML 1.1 and 1.2 (it does not guess), or
    binary data. ``path``: the dotted key path of the value where known ('' otherwise)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


_MERGE = "tag:yaml.org,2002:merge"
#: base64 data (``!!binary``): PyYAML makes bytes of it, which a spec never takes (pydantic reads bytes as text)
_BINARY = "tag:yaml.org,2002:binary"
#: numbers YAML 1.1 (PyYAML's resolver) reads otherwise than YAML 1.2, JSON and TOML do: an octal integer (a
#: leading zero) and base 60 (``1:04``); forms PyYAML reads as text (``08``, ``09:30``) stay text
_AMBIGUOUS = "tag:moegraph,2024:ambiguous-number"
_AMBIGUOUS_RE = re.compile(r"^[-+]?(?:0[0-7_]+|[1-9][0-9_]*(?::[0-5]?[0-9])+|[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*)$")
#: words YAML 1.1 (PyYAML's resolver) reads as booleans and YAML 1.2 as text; YAML 1.2's booleans are true / false
_AMBIGUOUS_BOOL = "tag:moegraph,2024:ambiguous-bool"
_AMBIGUOUS_BOOL_RE = re.compile(r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$")
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
#: deeper flow nesting ([ or {) than this is parsed by PyYAML's own parser, which stops at Python's recursion limit
#: (libyaml's recursion in C crashes the process on some 30,000 levels)
_FAST_MAX_DEPTH = 1000


def _resolvers() -> dict:
    """PyYAML's implicit resolvers as YAML 1.2 reads a spec: no timestamps (a date is text), ``1e-3`` a float,
    and the numbers YAML 1.1 reads otherwise (``_AMBIGUOUS``) ahead of the int and float resolvers, refused, as
    are the words YAML 1.1 reads as booleans (``yes``, ``off``: ``_AMBIGUOUS_BOOL``); true / false are booleans."""
    dropped = ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")
    out = {k: [(tag, rx) for tag, rx in v if tag not in dropped]
           for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in "tTfF":
        out.setdefault(first, []).append(("tag:yaml.org,2002:bool", _BOOL_RE))
    for first in "yYnNoO":
        out.setdefault(first, []).append((_AMBIGUOUS_BOOL, _AMBIGUOUS_BOOL_RE))
    exponent = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    for first in "-+0123456789":
        out.setdefault(first, []).insert(0, (_AMBIGUOUS, _AMBIGUOUS_RE))
        out[first].append(("tag:yaml.org,2002:float", exponent))
    return out


class _SpecYAML:
    """What the spec loaders add to a yaml SafeLoader: duplicate keys refused instead of keeping the last one, and
    scalars read as YAML 1.2 does where YAML 1.1 (which PyYAML follows) would read them otherwise.

    Merge keys (``<<: *base``) are taken, the mapping's own keys winning over merged ones; a key written
    twice in one mapping is refused. ``1e-3`` (exponent, no dot) is a number, as in YAML 1.2, JSON and TOML
    (YAML 1.1: the string '1e-3'). A date is text (YAML 1.2 has no timestamps). A number with a leading zero
    (``0100``: YAML 1.1 octal 64, YAML 1.2 decimal 100) or in base 60 (``1:04``: YAML 1.1 64) is refused
    with the fix, since a spec takes no number as a string and the two readings differ. ``!!binary`` data is
    refused too (no spec field takes bytes); each refusal names the value's key path.
    """

    def _check_unique(self, node: yaml.MappingNode, checked: set[int]) -> None:
        """Refuse a key given twice among ``node``'s own keys (and those of mappings merged into it); each node is
        checked once (``checked``: ids), so mappings merged many times over cost no more than once."""
        if id(node) in checked:
            return
        checked.add(id(node))
        seen: set = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                for sub in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    if isinstance(sub, yaml.MappingNode):
                        self._check_unique(sub, checked)
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                return
            if dup:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"key {key!r} appears twice in one mapping (line {line}); give it once")

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_scalars(node)
        return super().construct_document(node)

    @staticmethod
    def _refuse_scalars(root: yaml.Node) -> None:
        """Refuse the first refused value in the document, naming its key path: ``!!binary`` data (a spec file is
        text, and binary data would reach the fields as bytes, read as text or refused as 'got b'...'') and the
        numbers and booleans YAML 1.1 reads otherwise than YAML 1.2 (``_refuse_ambiguous``)."""
        stack, seen = [(root, "")], set()
        while stack:
            node, path = stack.pop()
            if id(node) in seen:  # (an anchor's node is walked once, however often it is aliased)
                continue
            seen.add(id(node))
            if node.tag == _BINARY:
                raise _RefusedScalar(f"!!binary value (line {node.start_mark.line + 1}): a spec file is text and no "
                                     "field takes binary data; write the value as plain text or a number (drop the "
                                     "!!binary tag)", path)
            if node.tag in (_AMBIGUOUS, _AMBIGUOUS_BOOL):
                raise _ambiguous(node, path)
            children = []
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    key = key_node.value if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE else ""
                    children += [(key_node, path), (value_node, ".".join(filter(None, (path, key))))]
            elif isinstance(node, yaml.SequenceNode):
                children = [(item, ".".join(filter(None, (path, str(i))))) for i, item in enumerate(node.value)]
            stack += reversed(children)  # (the first in the file is the one reported)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Keep one entry per key (the last, which wins): merges of merges cannot multiply the entries.
        merges = any(k.tag == _MERGE for k, _ in node.value)
        super().flatten_mapping(node)
        if not merges:
            return
        last = {(k.tag, k.value) if isinstance(k, yaml.ScalarNode) else id(k): (k, v) for k, v in node.value}
        node.value = list(last.values())

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self._check_unique(node, self.__dict__.setdefault("_unique_checked", set()))
        return super().construct_mapping(node, deep=deep)

    def _refuse_ambiguous(self, node: yaml.ScalarNode) -> None:
        """The ambiguous tags' constructor: a value the document walk (``_refuse_scalars``) did not reach."""
        raise _ambiguous(node, "")


def _ambiguous(node: yaml.ScalarNode, path: str) -> _RefusedScalar:
    """The refusal of a number or boolean YAML 1.1 reads otherwise than YAML 1.2, at key path ``path``."""
    text, line = node.value, node.start_mark.line + 1
    if node.tag == _AMBIGUOUS_BOOL:
        return _RefusedScalar(f"{text} (line {line}) is a boolean in YAML 1.1 and text in YAML 1.2; write true or "
                              "false, or quote it if it is text", path)
    if ":" in text:
        why = "is a base-60 number in YAML 1.1 and text in YAML 1.2"
    else:
        decimal = text.lstrip("+-").lstrip("0_") or "0"
        why = (f"has a leading zero, which YAML 1.1 reads as octal and YAML 1.2 as decimal "
               f"({text[0] if text[0] in '+-' else ''}{decimal})")
    return _RefusedScalar(f"{text} (line {line}) {why}; write the number in decimal without leading zeros, or "
                          "quote it if it is text", path)


class _UniqueKeyLoader(_SpecYAML, yaml.SafeLoader):
    """The spec loader on PyYAML's own parser (``_SpecYAML``)."""

    yaml_implicit_resolvers = _resolvers()


class _FastUniqueKeyLoader(_SpecYAML, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """The same on libyaml's parser where PyYAML has it (ten times faster on a large file), for files whose flow
    nesting is at most ``_FAST_MAX_DEPTH``."""

    yaml_implicit_resolvers = _resolvers()


for _loader in (_UniqueKeyLoader, _FastUniqueKeyLoader):
    _loader.add_constructor(_AMBIGUOUS, _SpecYAML._refuse_ambiguous)
    _loader.add_constructor(_AMBIGUOUS_BOOL, _SpecYAML._refuse_ambiguous)


def _yaml_loader(text: str) -> type:
    """The loader for ``text``: libyaml's parser unless its flow collections nest deeper than ``_FAST_MAX_DEPTH``
    (counted over the raw text, quotes and comments included: an overcount only picks the careful parser)."""
    raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
    step = np.zeros(256, np.int8)
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    depth = np.cumsum(step[raw], dtype=np.int32)  # at most 16 MiB of text: no overflow
    return _UniqueKeyLoader if depth.size and int(depth.max()) > _FAST_MAX_DEPTH else _FastUniqueKeyLoader


def load_spec(spec: str | Path | Mapping[str, Any] | MoESpec, *, source: str | None = None) -> MoESpec:
    """Load and validate a spec from a path, a preset name, a dict, or pass a MoESpec through."""
    if isinstance(spec, MoESpec):
        return spec
    if isinstance(spec, Mapping):
        data, label = dict(spec), source or "<dict>"
    elif isinstance(spec, (str, os.PathLike)):
        data, label = read_spec_dict(spec)
    else:
        raise SpecError(
            [Problem("", f"expected a spec file path, preset name or mapping, got {type(spec).__name__}")],
            source=source or "<argument>",
        )
    try:
        return MoESpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc), source=label) from None


def placement_traces(spec: MoESpec, spec_file: str | Path | None = None) -> list[str]:
    """The spec's ``placement.traces``, each relative entry read from the folder of ``spec_file`` (the file the
    spec was loaded from) where it names a file or folder there, as a path names what sits beside the file that
    writes it; other entries as written (from the working directory, else a bundled trace name)."""
    entries = list(spec.placement.traces)
    where = Path(spec_file) if spec_file is not None else None
    if where is None or not where.is_file():  # a preset name, a dict
        return entries
    base = where.resolve().parent
    return [str(base / e) if not Path(e).is_absolute() and (base / e).exists() else e for e in entries]


def dump_spec(spec: MoESpec, path: str | Path) -> Path:
    """Write a spec in the format chosen by the path's extension (all defaults spelled out), whole or not at all
    (``fileio.write_atomically``)."""
    p = Path(path)
    fmt = SPEC_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise SpecError([Problem("", f"unknown extension {p.suffix!r}; use .yaml, .json or .toml")], source=str(p))
    data = _drop_none(spec.model_dump(mode="json"))
    if fmt == "yaml":
        text = yaml.dump(data, Dumper=_SpecDumper, sort_keys=False)
    elif fmt == "json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import tomli_w

        text = tomli_w.dumps(data)
    return write_atomically(p, lambda tmp: tmp.write_text(text, encoding="utf-8"), "spec")


class _SpecDumper(yaml.SafeDumper):
    """A SafeDumper that quotes a string wherever the spec loader would read it as something else (``1e3``, a
    float in YAML 1.2; ``0100``, refused): it resolves plain scalars as the loader does."""

    yaml_implicit_resolvers = _resolvers()


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
    """One Problem per pydantic error: a dotted path the user wrote, and a message saying what to do."""
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    errors = []
    more = 0  # problems counted, not listed
    for err in exc.errors(include_url=False):
        if (err["type"] == "too_short" and isinstance(err.get("input"), (list, tuple))
                and len(err["input"]) >= err.get("ctx", {}).get("min_length", 0)):
            continue  # short only because entries failed, which are reported themselves
        if err["type"] == "spec_fields":  # several cross-field problems of one rule set: one Problem each
            more += err["ctx"].get("more", 0)
            errors += [{**err, "type": "spec_field", "ctx": {"field": f, "message": m}} for f, m in err["ctx"]["problems"]]
        else:
            errors.append(err)
    for n, err in enumerate(errors):
        if len(problems) == MAX_PROBLEMS:  # a report of a million lines helps nobody: count the rest
            more += len(errors) - n
            break
        loc, models = _walk(err["loc"])
        if err["type"] == "spec_field":
            # A cross-field rule names the field to change, relative to the model that raised it.
            loc += tuple(int(x) if x.isdigit() else x for x in err["ctx"]["field"].split("."))
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found") and isinstance(err.get("input"), dict):
            key = _union_key(models)
            if key in err["input"]:
                loc += (key,)
        path = ".".join(str(x) for x in loc)
        msg = _message(err, err["loc"], models)
        if (path, msg) not in seen:
            seen.add((path, msg))
            problems.append(Problem(path, msg))
    if more:
        problems.append(Problem("", more_problems(more)))
    return problems


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


def _union_key(models: list[type[BaseModel]]) -> str:
    """The discriminator key of a tagged union of models: 'type' (routers), 'op' (router network layers) or 'kind'."""
    return next((k for k in ("type", "op") if any(k in m.model_fields for m in models)), "kind")


def _union_tags(models: list[type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Tag -> model for a tagged union: the single Literal value of each model's discriminator field."""
    key = _union_key(models)
    out = {}
    for m in models:
        f = m.model_fields.get(key)
        if f is not None and typing.get_origin(f.annotation) is typing.Literal:
            out[typing.get_args(f.annotation)[0]] = m
    return out


def _walk(loc: tuple) -> tuple[tuple, list[type[BaseModel]]]:
    """Follow a pydantic error location through the spec models.

    Returns the location as the user wrote it (pydantic inserts the tag of a discriminated union
    after the union field, e.g. ``moe.router.topk.top_k``; those tags are dropped) and the models
    that the location ends in (several for an unresolved union, none for a leaf value).
    """
    models: list[type[BaseModel]] = [MoESpec]
    clean: list = []
    i = 0
    while i < len(loc):
        part = loc[i]
        i += 1
        if isinstance(part, str) and part.startswith("function-"):
            continue
        clean.append(part)
        if not isinstance(part, int):  # (an index into a tuple of models: same models)
            nxt: list[type[BaseModel]] = []
            for m in models:
                f = m.model_fields.get(str(part))
                if f is not None:
                    nxt += _models_in(f.annotation)
            models = nxt
        if len(models) > 1 and i < len(loc):
            tags = _union_tags(models)
            if loc[i] in tags:
                models = [tags[loc[i]]]
                i += 1
    return tuple(clean), models


@functools.cache
def _field_homes() -> dict[str, list[str]]:
    """Field name -> dotted paths of the sections that accept it (for keys written in the wrong section)."""
    homes: dict[str, list[str]] = {}

    def visit(model: type[BaseModel], prefix: str, depth: int) -> None:
        for name, f in model.model_fields.items():
            homes.setdefault(name, [])
            if prefix not in homes[name]:
                homes[name].append(prefix)
            if depth < 6:
                for sub in _models_in(f.annotation):
                    visit(sub, f"{prefix}.{name}" if prefix else name, depth + 1)

    visit(MoESpec, "", 0)
    return homes


def _got(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    if value is None:
        return "null"
    return f"{type(value).__name__} {short_repr(value)}"


def _shown(value: Any) -> str:
    """An input value as a message echoes it: a list or mapping by its kind and size, never its repr (a YAML
    alias bomb expands to billions of entries through a few shared objects; formatting it would never end)."""
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key(s)"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a list of {len(value)} entries"
    return short_repr(value)


def _close(word: Any, choices: list[str]) -> str:
    """"; did you mean ...?" for a string input close to one of ``choices`` (nothing for any other input)."""
    if not isinstance(word, str) or len(word) > 200:
        return ""
    close = close_names(word, choices)
    return f"; did you mean '{close[0]}'?" if close else ""


def _message(err: dict, raw_loc: tuple, models: list[type[BaseModel]]) -> str:
    kind, ctx, inp = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        key = str(raw_loc[-1]) if raw_loc else "?"
        _, parents = _walk(raw_loc[:-1])
        allowed = sorted({name for m in parents for name in m.model_fields})
        close = close_names(key, allowed, cutoff=0.5)
        if close:
            return f"unknown key '{key}'; did you mean '{close[0]}'?"
        here = ".".join(str(x) for x in _walk(raw_loc[:-1])[0])
        elsewhere = [h or "the top level" for h in _field_homes().get(key, []) if h != here]
        if elsewhere:
            return f"unknown key '{key}' here; it belongs in {' or '.join(elsewhere)}"
        return f"unknown key '{key}'; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "spec_field":
        return str(ctx.get("message", err["msg"]))
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"{err['msg'].lower()}, got {_shown(inp)}{_close(inp, expected)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = list(_union_tags(models))
        key = _union_key(models)
        shown = ", ".join(repr(t) for t in tags)
        if kind == "union_tag_invalid":
            return f"unknown {key} {_shown(ctx.get('tag'))}; expected one of {shown}{_close(ctx.get('tag'), tags)}"
        if isinstance(inp, dict):
            return f"'{key}' must be one of {shown}, got {_got(inp.get(key))}"
        return f"expected a mapping (with '{key}' one of {shown}), got {_got(inp)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of keys, got {_got(inp)}"
    if kind in ("tuple_type", "list_type"):
        return f"expected a list, got {_got(inp)}"
    bounds = {
        "greater_than": ("gt", "greater than"),
        "greater_than_equal": ("ge", "at least"),
        "less_than": ("lt", "less than"),
        "less_than_equal": ("le", "at most"),
    }
    if kind in bounds:
        bound, words = bounds[kind]
        return f"must be {words} {ctx.get(bound)}, got {_shown(inp)}"
    if kind == "finite_number":
        return f"must be a finite number, got {_shown(inp)}"
    if kind == "int_from_float":
        return f"expected a whole number, got {_shown(inp)}"
    if kind in ("int_type", "int_parsing"):
        return f"expected an integer, got {_got(inp)}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {_got(inp)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_got(inp)}"
    if kind == "string_type":
        return f"expected a string, got {_got(inp)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} entries, got {ctx.get('actual_length')}"
    if kind == "invalid_key":
        return f"keys must be strings, got {_got(inp)}"
    shown = f" (got {short_repr(inp)})" if not isinstance(inp, (dict, list, tuple, set, frozenset)) else ""
    return f"{err['msg']}{shown}"
