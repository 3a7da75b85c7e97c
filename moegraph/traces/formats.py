"""Routing-trace files: the native format, the importers, bundled sets and the one loading entry point.

Native format (``TraceSet.save`` / ``load_traces("x.npz")``): a compressed ``.npz`` with

- ``meta``: a JSON string ``{"format": "moegraph-trace", "version": 1, "num_experts", "top_k",
  "num_layers", "num_tokens", "layer_ids", "sources", "num_ranks", "name"}``;
- ``topk`` [L, T, K] uint8 (E <= 256), uint16 or int32; absent for load-only traces;
- ``sample_ids`` [T] int32, ``source_ids`` [T] int16, ``src_rank`` [T] int16 (optional);
- ``counts_by_source`` [S, L, E] int64 (load-only traces only; otherwise derived).

Importers: the ESFT text format (``expert_weights_<layer>.txt``, one line per sample: the K ids of
every token, an empty field, then the K gate scores of every token; scores are checked and dropped),
SGLang expert-distribution dumps (``torch.save`` dicts: ``logical_count`` [..., layers, experts]
from the "stat" recorder, or ``records[*].topk_ids_of_layer`` from the "per_token" recorder), and
bundled trace sets by name (``esft-deepseek-v2-lite``, ``esft-deepseek-v2-lite/law``).

Every reader validates the whole input before returning: a truncated or corrupt file raises
``TraceError`` naming the file (and line), never a partly filled TraceSet. The bounds on layers, layer ids,
ranks and counts (``trace_set.MAX_*``) are the same for the reader, the importers and ``TraceSet``'s
constructors: what an import writes reads back. ``traces_for_spec`` is
the boundary where the planner and the re-plan take traces: checked against the spec there, once.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ResourceError, TraceError, close_names, describe, is_integer, short_repr
from ..fileio import DuplicateKey, check_input, unique_json_object
from ..limits import check_memory
from ..spec import MAX_EXPERTS, MoESpec
from .trace_set import (FORMAT, MAX_LAYER_ID, MAX_LAYERS, MAX_RANKS, MAX_TOKENS, VERSION, TraceSet, _check_topk,
                        _id_dtype, _to_numpy, counts_problem, layers_problem, ranks_problem)

__all__ = [
    "read_native",
    "read_esft",
    "read_sglang",
    "is_esft_folder",
    "bundled_traces",
    "load_traces",
    "traces_for_spec",
]

_BUNDLED = Path(__file__).resolve().parent.parent / "data" / "traces"


# ---------------------------------------------------------------------------------------------
# Native reader
# ---------------------------------------------------------------------------------------------


def read_native(path: str | Path) -> TraceSet:
    """Read a native ``.npz`` trace file, validating every array before returning."""
    p = Path(path)
    check_input(p, "trace file (.npz)", TraceError)
    try:
        with zipfile.ZipFile(p) as zf:  # sizes from the zip directory: refuse a bomb before inflating it
            size = sum(i.file_size for i in zf.infolist())
        check_memory(2.0 * size, f"{p} ({size / 2**20:.0f} MiB uncompressed)", "split the trace into smaller files")
        with np.load(p, allow_pickle=False) as z:
            files = set(z.files)
            if "meta" not in files:
                raise TraceError(f"{p}: not a moegraph trace file (no 'meta' entry); convert it with "
                                 "`moegraph trace import`")
            meta = json.loads(str(z["meta"]), object_pairs_hook=unique_json_object)
            arrays = {k: z[k] for k in files if k != "meta"}  # reads (and CRC-checks) every member now
    except TraceError:
        raise
    except DuplicateKey as exc:  # json keeps the last silently; spec and plan files refuse the same
        raise TraceError(f"{p}: meta: {exc}; the file was edited or is corrupt, re-import the trace") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise TraceError(f"{p}: truncated or corrupt trace file ({' '.join(str(exc).split()) or type(exc).__name__})"
                         "; re-create it with `moegraph trace import`") from None
    except RecursionError:
        raise TraceError(f"{p}: its meta is nested too deeply to be a trace's; re-create it with `moegraph trace "
                         "import`") from None
    try:
        return _native_traceset(p, meta, arrays)
    except TraceError:  # already names the file and the fix (TraceError is a ValueError: never wrap it)
        raise
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as exc:
        raise TraceError(f"{p}: a field has the wrong type or value ({' '.join(str(exc).split())[:160]}); the file is "
                         "corrupt, re-import the trace") from None


def _native_traceset(p: Path, meta: Any, arrays: dict[str, np.ndarray]) -> TraceSet:
    """Check a native file's meta and arrays (read by ``read_native``) and build its TraceSet."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        given = meta.get("format") if isinstance(meta, dict) else meta
        raise TraceError(f"{p}: not a moegraph trace file (meta.format is {short_repr(given)})")
    if meta.get("version") != VERSION:
        raise TraceError(f"{p}: trace format version {meta.get('version')} is not supported (this moegraph reads "
                         f"version {VERSION}); re-import the trace")
    def whole(key: str, value: Any, lo: int, hi: int) -> int:
        # Strict: the writer stores JSON integers; "16", 16.5 or true mean a hand-edited or foreign file.
        if not is_integer(value, lo, hi):
            raise ValueError(f"meta.{key} is {json.dumps(value)[:40]}, expected an integer in {lo}..{hi}")
        return value

    try:
        e = whole("num_experts", meta["num_experts"], 1, MAX_EXPERTS)
        n_layers = whole("num_layers", meta["num_layers"], 1, MAX_LAYERS)
        if not isinstance(meta["sources"], list) or not all(isinstance(x, str) for x in meta["sources"]):
            raise ValueError("meta.sources is not a list of names")
        sources = tuple(meta["sources"])
        layer_ids = (tuple(whole("layer_ids", i, 0, MAX_LAYER_ID) for i in meta["layer_ids"])
                     if meta.get("layer_ids") is not None else None)
        name = str(meta.get("name") or p.stem)
        notes = meta.get("notes") or []
        if not isinstance(notes, list) or not all(isinstance(x, str) for x in notes):
            raise ValueError("meta.notes is not a list of strings")
        notes = tuple(notes)
        num_ranks = whole("num_ranks", meta["num_ranks"], 1, MAX_RANKS) if meta.get("num_ranks") is not None else None
        if meta.get("num_tokens") is not None:
            whole("num_tokens", meta["num_tokens"], 0, MAX_TOKENS)
        if meta.get("top_k") is not None:  # equal to topk's width (checked below; 0 is said there)
            whole("top_k", meta["top_k"], 0, MAX_EXPERTS)
    except (KeyError, TypeError, ValueError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise TraceError(f"{p}: meta is incomplete or wrong ({what}); re-import the trace") from None

    def bad(msg: str) -> TraceError:
        return TraceError(f"{p}: {msg}; the file is corrupt, re-import the trace")

    problem = layers_problem(n_layers, layer_ids, "meta.layer_ids")
    if problem is not None:
        raise bad(problem)
    if "topk" not in arrays:
        c = arrays.get("counts_by_source")
        if not sources:
            raise bad("meta.sources is empty: a load-only trace has one source or more")
        if c is None or c.shape != (len(sources), n_layers, e) or not np.issubdtype(c.dtype, np.integer):
            raise bad(f"counts_by_source missing or not [{len(sources)}, {n_layers}, {e}] non-negative integers")
        problem = counts_problem(c)
        if problem is not None:
            raise bad(f"counts_by_source: {problem}")
        return TraceSet(num_experts=e, counts_by_source=c.astype(np.int64), sources=sources, layer_ids=layer_ids,
                        name=name, notes=notes)
    topk = arrays["topk"]
    if not sources and not (topk.ndim == 3 and topk.shape[1] == 0):  # no sources: only a window of 0 tokens
        raise bad("meta.sources is empty but the file holds tokens")
    if topk.ndim != 3 or topk.shape[0] != n_layers or not np.issubdtype(topk.dtype, np.integer):
        raise bad(f"topk has shape {topk.shape} ({topk.dtype}), expected [{n_layers}, tokens, top_k] integers")
    if meta.get("num_tokens") is not None and topk.shape[1] != int(meta["num_tokens"]):
        raise bad(f"topk holds {topk.shape[1]} tokens but meta says {meta['num_tokens']}")
    if topk.shape[2] == 0:
        raise bad("topk lists no expert per token (top_k 0)")
    if meta.get("top_k") is not None and topk.shape[2] != int(meta["top_k"]):
        raise bad(f"topk lists {topk.shape[2]} experts per token but meta.top_k says {meta['top_k']}")
    if topk.size and (int(topk.max()) >= e or int(topk.min()) < 0):
        raise bad(f"expert ids outside 0..{e - 1}")
    _check_topk(topk, e, str(p))
    t = topk.shape[1]
    sample_ids, source_ids = arrays.get("sample_ids"), arrays.get("source_ids")
    for nm, arr in (("sample_ids", sample_ids), ("source_ids", source_ids)):
        if arr is None or arr.shape != (t,) or not np.issubdtype(arr.dtype, np.integer):
            raise bad(f"{nm} missing or not [{t}] integers")
    if t and (source_ids.min() < 0 or source_ids.max() >= len(sources)):
        raise bad("source_ids outside the sources listed in meta")
    rank = arrays.get("src_rank")
    if rank is not None:
        if rank.shape != (t,):
            raise bad(f"src_rank has shape {rank.shape}, expected [{t}]")
        problem = ranks_problem(rank, num_ranks, "meta.num_ranks")
        if problem is not None:
            raise bad(problem)
    return TraceSet._from_arrays(
        topk.astype(_id_dtype(e)), sample_ids.astype(np.int64), source_ids.astype(np.int64), sources, e,
        None if rank is None else rank.astype(np.int64), num_ranks if rank is not None else None, layer_ids, name,
        notes,
    )


# ---------------------------------------------------------------------------------------------
# ESFT text format
# ---------------------------------------------------------------------------------------------

_ESFT_FILE = re.compile(r"^expert_weights_(\d+)\.txt$")


def _esft_layer_files(folder: Path) -> dict[int, Path]:
    return {
        int(m.group(1)): f for f in folder.iterdir() if f.is_file() and (m := _ESFT_FILE.match(f.name))
    }


def is_esft_folder(folder: Path) -> bool:
    """A folder of ``expert_weights_<layer>.txt`` files, or of task folders holding them."""
    if not folder.is_dir():
        return False
    if _esft_layer_files(folder):
        return True
    return any(d.is_dir() and _esft_layer_files(d) for d in folder.iterdir())


def read_esft(
    folder: str | Path, *, top_k: int | None = None, num_experts: int | None = None, name: str | None = None
) -> TraceSet:
    """Read ESFT ``expert_scores`` traces: one task folder, or a folder of task folders (one source each).

    top_k: experts per token; inferred when None (the largest divisor of every line's id count that
    makes each token's ids distinct). num_experts: defaults to the largest id seen + 1.
    """
    root = Path(folder)
    if not root.is_dir():
        raise TraceError(f"{root}: not a folder; the ESFT format is a folder of expert_weights_<layer>.txt files")
    if _esft_layer_files(root):
        tasks = [root]
    else:
        tasks = sorted(d for d in root.iterdir() if d.is_dir() and _esft_layer_files(d))
        if not tasks:
            raise TraceError(f"{root}: no expert_weights_<layer>.txt files here or in its sub-folders")
    parts = [_read_esft_task(d, top_k, num_experts) for d in tasks]
    e = num_experts or max(p[0].max(initial=0) for p in parts) + 1
    for (topk, _, _), d in zip(parts, tasks):
        _check_topk(topk, int(e), str(d), distinct=True)
    sets = [
        TraceSet._from_arrays(topk.astype(_id_dtype(e)), sids, np.zeros(len(sids), np.int64), (d.name,), int(e),
                              None, None, layer_ids, d.name)
        for (topk, sids, layer_ids), d in zip(parts, tasks)
    ]
    ts = TraceSet.concat(sets, name=name or root.name)
    return ts.with_experts(int(e)) if ts.num_experts != e else ts


def _read_esft_task(folder: Path, top_k: int | None, num_experts: int | None):
    files = _esft_layer_files(folder)
    layers = sorted(files)
    problem = layers_problem(len(layers), layers, "the <layer> of expert_weights_<layer>.txt")
    if problem is not None:  # before reading them: what the native reader would refuse is never written
        raise TraceError(f"{folder}: {problem}; the files are numbered by decoder layer, is this an ESFT folder?")
    expected = list(range(layers[0], layers[0] + len(layers)))
    if layers != expected:
        missing = sorted(set(expected) - set(layers))
        raise TraceError(f"{folder}: layer files are not contiguous, missing expert_weights_{missing[0]}.txt "
                         f"(have {layers[0]}..{layers[-1]}); copy the whole folder")
    per_layer: list[list[np.ndarray]] = []
    for layer in layers:
        per_layer.append(_parse_esft_file(files[layer], num_experts))
    # Token i of a sample is the same token in every layer file: lengths must agree.
    ref_path, ref = files[layers[0]], [len(a) for a in per_layer[0]]
    for layer, rows in zip(layers, per_layer):
        lens = [len(a) for a in rows]
        if len(lens) != len(ref):
            raise TraceError(f"{files[layer]}: {len(lens)} samples but {ref_path.name} has {len(ref)}; "
                             "the file is truncated or from another recording")
        if lens != ref:
            i = next(i for i, (a, b) in enumerate(zip(lens, ref)) if a != b)
            raise TraceError(f"{files[layer]}: line {i + 1} holds {lens[i]} ids but line {i + 1} of "
                             f"{ref_path.name} holds {ref[i]}; the file is truncated or corrupt")
    k = top_k or _infer_top_k(per_layer[0], files[layers[0]])
    for layer, rows in zip(layers, per_layer):
        for i, ids in enumerate(rows):
            if len(ids) % k:
                raise TraceError(f"{files[layer]}: line {i + 1} holds {len(ids)} ids, not a multiple of top_k={k}")
    topk = np.stack([np.concatenate(rows).reshape(-1, k) for rows in per_layer])
    sids = np.repeat(np.arange(len(ref), dtype=np.int64), [n // k for n in ref])
    return topk, sids, tuple(layers)


def _parse_esft_file(path: Path, num_experts: int | None) -> list[np.ndarray]:
    check_input(path, "ESFT routing text", TraceError)
    try:
        # The text, its split lines and the parsed ids: a few times the file's size at once.
        check_memory(4.0 * path.stat().st_size, f"{path} ({path.stat().st_size / 2**20:.0f} MiB)",
                     "split the ESFT folder into smaller task folders")
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read as ESFT text ({exc})") from None
    rows = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise TraceError(f"{path}: empty file")
    for i, line in enumerate(lines):
        parts = line.rstrip("\r").split("\t\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TraceError(f"{path}: line {i + 1} is not '<ids>\\t\\t<scores>' (truncated or corrupt)")
        id_fields, score_fields = parts[0].split("\t"), parts[1].split("\t")
        if len(id_fields) != len(score_fields):
            raise TraceError(f"{path}: line {i + 1} has {len(id_fields)} expert ids but {len(score_fields)} "
                             "scores; the file is truncated or corrupt")
        try:
            ids = np.array(id_fields, dtype=np.int64)
            scores = np.array(score_fields, dtype=np.float64)
        except ValueError:
            raise TraceError(f"{path}: line {i + 1} holds a field that is not a number") from None
        except OverflowError:  # a whole number beyond int64
            raise TraceError(f"{path}: line {i + 1} has an expert id beyond any model's (0..{MAX_EXPERTS - 1}); the "
                             "file is corrupt") from None
        if ids.min() < 0 or (num_experts is not None and ids.max() >= num_experts):
            raise TraceError(f"{path}: line {i + 1} has expert id {int(ids.max() if ids.min() >= 0 else ids.min())} "
                             f"outside 0..{(num_experts or 0) - 1}")
        if not np.isfinite(scores).all():
            raise TraceError(f"{path}: line {i + 1} has a non-finite gate score")
        rows.append(ids)
    return rows


def _infer_top_k(rows: list[np.ndarray], path: Path) -> int:
    g = 0
    for r in rows:
        g = math.gcd(g, len(r))
    for k in sorted((d for d in range(1, g + 1) if g % d == 0), reverse=True):
        if all(len(np.unique(tok)) == k for r in rows for tok in r.reshape(-1, k)[:64]):
            return k
    raise TraceError(f"{path}: cannot infer top_k; pass it explicitly")  # pragma: no cover - k=1 always fits


# ---------------------------------------------------------------------------------------------
# SGLang expert-distribution dumps
# ---------------------------------------------------------------------------------------------


def read_sglang(
    paths: str | Path | Sequence[str | Path], *, spec: MoESpec | None = None, name: str | None = None
) -> TraceSet:
    """Read SGLang ``expert_distribution_recorder_*.pt`` dumps (several files are summed / joined).

    "stat" dumps hold ``logical_count`` [steps?, layers, experts]: a load-only trace. "per_token"
    dumps hold ``records`` with ``topk_ids_of_layer`` [layers, tokens, K] (-1 padded) and
    ``extend_seq_lens``: a token trace, one sample per sequence, ``rank`` as source rank.
    SGLang counts every decoder layer; with a spec, dense layers are dropped.
    """
    import torch  # SGLang dumps are torch.save files

    ps = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    counts_total, topk_parts, sample_parts, rank_parts, offset = None, [], [], [], 0
    for p in ps:
        check_input(p, "SGLang routing dump (.pt)", TraceError)
        try:
            check_memory(2.0 * p.stat().st_size, f"{p} ({p.stat().st_size / 2**20:.0f} MiB)",
                         "import the dumps one at a time")
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise TraceError(f"{p}: file not found") from None
        except ResourceError:
            raise
        except IsADirectoryError:
            raise TraceError(f"{p}: is a folder; give the SGLang dump files (expert_distribution_recorder_*.pt) "
                             "themselves, e.g. with a shell glob") from None
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a truncated zip or pickle
            why = " ".join(str(exc).split())[:200] or type(exc).__name__
            if os.path.isfile(p) and os.path.getsize(p) == 0:
                why = "the file is empty"
            raise TraceError(f"{p}: not a readable SGLang dump (truncated or corrupt: {why}); dump it again with "
                             "SGLang's expert distribution recorder, or check that this is the right file") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{p}: expected a dict from SGLang's expert distribution recorder, got {type(obj).__name__}")
        try:
            counts_total, offset = _read_sglang_dump(p, obj, counts_total, topk_parts, sample_parts, rank_parts,
                                                     offset)
        except TraceError:  # already names the file and the fix (TraceError is a ValueError: never wrap it)
            raise
        except (TypeError, ValueError, OverflowError, KeyError, AttributeError, RuntimeError) as exc:
            raise TraceError(f"{p}: a field of the dump has the wrong type or shape ({' '.join(str(exc).split())[:160]}); "
                             "the dump is corrupt or not from SGLang's expert distribution recorder") from None
    return _sglang_traceset(ps, name, spec, counts_total, topk_parts, sample_parts, rank_parts)


def _sglang_int_ids(a: Any, what: str, shape: str, p: Path) -> np.ndarray:
    arr = _to_numpy(a, f"{p}: {what}", shape)
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise TraceError(f"{p}: {what} holds {arr.dtype} values; expert ids and counts must be integers")
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:  # would wrap to -1, padding
        raise TraceError(f"{p}: {what} holds {int(arr.max())}, beyond any expert id or count; the dump is corrupt")
    return arr.astype(np.int64)


def _read_sglang_dump(p, obj, counts_total, topk_parts, sample_parts, rank_parts, offset):
    """Add one dump's counts or records to the running lists; returns (counts_total, offset)."""
    if "logical_count" in obj:
        c = _sglang_int_ids(obj["logical_count"], "logical_count", "[..., layers, experts]", p)
        if c.ndim < 2 or not 1 <= c.shape[-1] <= MAX_EXPERTS:
            raise TraceError(f"{p}: logical_count has shape {c.shape}; expected [..., layers, experts]")
        c = c.reshape(-1, *c.shape[-2:])
        for counts in (c, c.sum(axis=0, dtype=np.float64)):  # every step's counts, then their sum (no wrap in floats)
            problem = counts_problem(counts)
            if problem is not None:
                raise TraceError(f"{p}: logical_count{' summed over its steps' if counts is not c else ''}: {problem}; "
                                 "the dump is corrupt")
        c = c.sum(axis=0)
        if counts_total is not None and counts_total.shape != c.shape:
            raise TraceError(f"{p}: logical_count shape {c.shape} differs from the other dumps' {counts_total.shape}")
        counts_total = c if counts_total is None else counts_total + c
    elif "records" in obj:
        records = obj["records"]
        if not isinstance(records, (list, tuple)):
            raise TraceError(f"{p}: records is a {type(records).__name__}, expected a list of per-step dicts")
        for j, rec in enumerate(records):
            if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
                raise TraceError(f"{p}: records[{j}] has no topk_ids_of_layer")
            ids = _sglang_int_ids(rec["topk_ids_of_layer"], f"records[{j}].topk_ids_of_layer", "[layers, tokens, K]", p)
            if ids.ndim != 3:
                raise TraceError(f"{p}: records[{j}].topk_ids_of_layer has shape {ids.shape}; expected [layers, tokens, K]")
            ids = ids[:, :, (ids >= 0).any(axis=(0, 1))]  # drop padding columns (recorder K > model K)
            lens = [int(n) for n in (rec.get("extend_seq_lens") or [ids.shape[1]])]
            if sum(lens) != ids.shape[1] or min(lens) < 0:
                lens = [ids.shape[1]]
            topk_parts.append(ids)
            sample_parts.append(np.repeat(np.arange(len(lens)) + offset, lens))
            offset += len(lens)
            rank_parts.append(np.full(ids.shape[1], int(rec.get("rank", 0)), np.int64))
    else:
        raise TraceError(f"{p}: neither 'logical_count' (stat mode) nor 'records' (per_token mode) in the dump; "
                         f"keys: {sorted(map(str, obj))[:10]}")
    return counts_total, offset


def _sglang_traceset(ps, name, spec, counts_total, topk_parts, sample_parts, rank_parts) -> TraceSet:
    label = name or (ps[0].stem if len(ps) == 1 else f"sglang[{len(ps)} files]")
    where = ", ".join(str(p) for p in ps)  # errors name the files
    if counts_total is None and not topk_parts:
        raise TraceError(f"{where}: the dump holds no records; record some traffic first")
    if counts_total is not None and topk_parts:
        raise TraceError(f"{where}: mixes stat and per_token dumps; import them separately")
    if counts_total is not None:
        layer_ids = None
        if spec is not None and counts_total.shape[0] == spec.model.num_layers != spec.model.num_moe_layers:
            layer_ids = spec.model.moe_layer_indices
            counts_total = counts_total[list(layer_ids)]
        return _named(where, label, lambda: TraceSet.from_counts(counts_total, source=label, layer_ids=layer_ids,
                                                                 name=label))
    shapes = sorted({(t.shape[0], t.shape[2]) for t in topk_parts})
    if len(shapes) != 1:
        raise TraceError(f"{where}: records disagree on (layers, top-k): {shapes}")
    topk = np.concatenate(topk_parts, axis=1)
    if spec is not None and topk.shape[0] == spec.model.num_layers != spec.model.num_moe_layers:
        layer_ids = tuple(spec.model.moe_layer_indices)
    else:  # dense layers record -1 for every token: keep the layers that routed something
        layer_ids = tuple(int(i) for i in np.flatnonzero((topk >= 0).any(axis=(1, 2))))
    topk = topk[list(layer_ids)]
    bad = (topk < 0).any(axis=(0, 2))
    if bad.any():  # tokens with a padded slot in some MoE layer carry no full top-k: drop them
        topk = topk[:, ~bad]
    ranks = np.concatenate(rank_parts)[~bad]
    if topk.shape[0] == 0 or topk.shape[1] == 0:
        raise TraceError(f"{where}: no token has a full top-k in any layer; the dump holds no usable routing")
    num_ranks = int(ranks.max()) + 1 if len(ranks) else 1
    problem = ranks_problem(ranks, num_ranks)
    if problem is not None:  # a negative rank, or one the native reader would refuse
        raise TraceError(f"{where}: a record's rank is not a recorder's ({problem}); the dump is corrupt")
    return _named(where, label, lambda: TraceSet.from_topk(
        list(topk), np.concatenate(sample_parts)[~bad],
        num_experts=spec.moe.experts.num_experts if spec is not None else None,
        src_rank=ranks, num_ranks=num_ranks, layer_ids=layer_ids, source=label,
        distinct=True,
    ))


def _named(where: str, label: str, build):
    """Run a TraceSet constructor whose errors start with ``label``; name the files instead."""
    try:
        return build()
    except TraceError as exc:
        text = str(exc)
        raise TraceError(where + text[len(label):] if text.startswith(label) else f"{where}: {text}") from None


# ---------------------------------------------------------------------------------------------
# Bundled traces and the one entry point
# ---------------------------------------------------------------------------------------------


def bundled_traces() -> dict[str, list[str]]:
    """Bundled trace sets by name -> their sources (tasks)."""
    out = {}
    if _BUNDLED.is_dir():
        for d in sorted(_BUNDLED.iterdir()):
            if d.is_dir():
                out[d.name] = sorted(f.stem for f in d.glob("*.npz"))
    return out


def _resolve_one(item: str | Path | TraceSet, spec: MoESpec | None) -> TraceSet:
    if isinstance(item, TraceSet):
        return item
    text = str(item)
    p = Path(text)
    check_input(p, "trace", TraceError)
    if p.exists():
        if p.is_dir():
            if is_esft_folder(p):
                top_k = getattr(spec.moe.router, "top_k", None) if spec is not None else None
                e = spec.moe.experts.num_experts if spec is not None else None
                return read_esft(p, top_k=top_k, num_experts=e)
            npz = sorted(p.glob("*.npz"))
            if npz:
                return TraceSet.concat([read_native(f) for f in npz], name=p.name)
            raise TraceError(f"{p}: no .npz trace files and no ESFT expert_weights_<layer>.txt files in this folder")
        if p.suffix == ".npz":
            return read_native(p)
        if p.suffix == ".pt":
            return read_sglang(p, spec=spec)
        raise TraceError(f"{p}: unknown trace file type {p.suffix!r}; use .npz (native), .pt (SGLang) or an ESFT folder")
    bundled = bundled_traces()
    name, _, task = text.partition("/")
    if name in bundled and "/" not in task:
        tasks = bundled[name]
        if task and task not in tasks:
            raise TraceError(f"bundled trace set {name!r} has no task {task!r}; tasks: {', '.join(tasks)}")
        chosen = [task] if task else tasks
        return TraceSet.concat([read_native(_BUNDLED / name / f"{t}.npz") for t in chosen], name=text)
    names = list(bundled) + [f"{n}/{t}" for n, ts in bundled.items() for t in ts]
    close = close_names(text, names, n=2)
    hint = f"did you mean {' or '.join(close)}?" if close else f"bundled: {', '.join(names) or 'none'}"
    raise TraceError(f"{text}: no such trace file or folder, and no bundled trace set of that name; {hint}")


def load_traces(paths_or_names: Any, spec: MoESpec | None = None) -> TraceSet:
    """Load routing traces from paths and bundled names (one or a list) as one TraceSet.

    Each item is a bundled name ("esft-deepseek-v2-lite", "esft-deepseek-v2-lite/law"), a native
    ``.npz`` file, a folder of ``.npz`` files, an ESFT folder, an SGLang ``.pt`` dump, or a TraceSet.
    Sources (tasks, files) stay distinguishable (``TraceSet.split_sources``). With a spec (a MoESpec, preset
    name or spec file), the traces are checked against its experts, MoE layers and top-k (TraceError says what
    to change).
    """
    if spec is not None and not isinstance(spec, MoESpec):
        from ..loader import load_spec

        spec = load_spec(spec, source="spec")  # a preset name or spec file, as plan and Plan.load take
    if isinstance(paths_or_names, (str, bytes, os.PathLike, TraceSet)):  # bytes: one (refused) item, not its ints
        items = [paths_or_names]
    elif isinstance(paths_or_names, Iterable) and not isinstance(paths_or_names, (np.ndarray, Mapping)):
        items = list(paths_or_names)
    else:
        items = [paths_or_names]
    for item in items:
        if not isinstance(item, (str, os.PathLike, TraceSet)):
            hint = (" (ids per token: build a TraceSet with TraceSet.from_topk)" if isinstance(item, np.ndarray) else
                    " (a path as bytes: decode it to a str)" if isinstance(item, bytes) else "")
            raise TraceError(f"traces: expected a trace file, folder or bundled name, a TraceSet, or a list of them; "
                             f"got {describe(item)}{hint}")
    sets = [_resolve_one(i, spec) for i in items]
    for s, i in zip(sets, items):
        if (s.num_tokens == 0) if not s.load_only else not s.counts.any():
            raise TraceError(f"{i}: the trace holds no routed tokens; record or import some traffic")
    if spec is not None:
        e = spec.moe.experts.num_experts
        sets = [s.check_spec(spec, label=str(i)).with_experts(e) for s, i in zip(sets, items)]
    return TraceSet.concat(sets)


def traces_for_spec(traces: Any, spec: MoESpec) -> TraceSet:
    """The one boundary where the planner and the re-plan take routing traces: checked against ``spec``
    and declared over its experts, once, so that the stages after it need not check again.

    traces: a TraceSet, a non-empty list of TraceSets (one per source; concatenated), or what
    ``load_traces`` accepts (which checks each item against the spec as it loads it).
    """
    if isinstance(traces, TraceSet):
        ts = traces
    elif isinstance(traces, (list, tuple)) and traces and all(isinstance(t, TraceSet) for t in traces):
        ts = TraceSet.concat(list(traces))
    else:
        return load_traces(traces, spec=spec)
    ts.check_spec(spec)
    return ts.with_experts(spec.moe.experts.num_experts)
