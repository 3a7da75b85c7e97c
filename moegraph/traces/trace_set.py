"""The routing-trace type: which experts each token chose, in every MoE layer, and where tokens came from.

A ``TraceSet`` holds, for L MoE layers and T tokens (the same tokens in every layer):

- ``topk`` [L, T, K]: the K expert ids each token chose in each layer (None for load-only traces);
- ``sample_ids`` [T]: the sequence each token belongs to (tokens of one sequence start on one GPU);
- ``source_ids`` [T] and ``sources``: which input (task, file) each token came from;
- ``src_rank`` [T] (optional) and ``num_ranks``: the rank a recorder saw the token on;
- ``counts_by_source`` [S, L, E]: tokens per expert, per source (derived from ``topk`` when present;
  the only content of a load-only trace such as an SGLang ``logical_count`` dump).

Construction (``from_topk``, ``from_counts``) validates its input; selection, concatenation and the
spec check (``check_spec``) live here too. The native file format is written by ``TraceSet.save``
and read by ``formats.read_native`` (layout in the ``formats`` docstring).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import TraceError, is_integer
from ..fileio import write_atomically
from ..spec import MAX_EXPERTS, MAX_LAYERS

if TYPE_CHECKING:
    from ..spec import MoESpec

__all__ = ["TraceSet", "FORMAT", "VERSION", "MAX_LAYERS", "MAX_LAYER_ID", "MAX_RANKS", "MAX_TOKENS"]

FORMAT = "moegraph-trace"
VERSION = 1

# What a trace may hold, one definition for the native reader, the importers and the constructors (so that what an
# importer writes, the reader reads back); a number beyond these means a corrupt file, not a larger model. The MoE
# layers of one trace are at most the spec's MAX_LAYERS (decoder layers of a model).
MAX_LAYER_ID = 10**6  # the decoder layer a trace names for one of its MoE layers (layer_ids)
MAX_RANKS = 1 << 20  # ranks a recorder saw tokens on (num_ranks)
MAX_TOKENS = 1 << 40  # tokens in one trace, so also the tokens one expert of one layer received (a count)


def _id_dtype(num_experts: int) -> np.dtype:
    """The smallest unsigned dtype that holds expert ids 0..E-1."""
    if num_experts <= 256:
        return np.dtype(np.uint8)
    if num_experts <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass(frozen=True, eq=False)
class TraceSet:
    """Per-layer routing decisions of a set of tokens (see the module docstring for the fields)."""

    num_experts: int
    counts_by_source: np.ndarray  # [S, L, E] int64
    topk: np.ndarray | None = None  # [L, T, K] expert ids
    sample_ids: np.ndarray | None = None  # [T] int64
    source_ids: np.ndarray | None = None  # [T] int64 index into sources
    sources: tuple[str, ...] = ("trace",)
    src_rank: np.ndarray | None = None  # [T] int64
    num_ranks: int | None = None
    layer_ids: tuple[int, ...] | None = None  # decoder layer index of each MoE layer, when known
    name: str = "trace"
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        c = self.counts_by_source
        assert c.ndim == 3 and c.shape[0] == len(self.sources) and c.shape[2] == self.num_experts, (
            f"counts_by_source shape {c.shape} does not match {len(self.sources)} sources x L x {self.num_experts}"
        )
        if self.topk is not None:
            t = self.topk.shape[1]
            assert self.topk.ndim == 3 and self.topk.shape[0] == c.shape[1], f"topk shape {self.topk.shape}"
            for name in ("sample_ids", "source_ids"):
                arr = getattr(self, name)
                assert arr is not None and arr.shape == (t,), f"{name} must have shape [{t}]"
            if self.src_rank is not None:
                assert self.src_rank.shape == (t,), f"src_rank must have shape [{t}]"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_topk(
        cls,
        layers: Sequence[Any],
        sample_ids: Any = None,
        *,
        num_experts: int | None = None,
        src_rank: Any = None,
        num_ranks: int | None = None,
        layer_ids: Sequence[int] | None = None,
        source: str = "trace",
        name: str | None = None,
        distinct: bool = False,
    ) -> TraceSet:
        """Build a TraceSet from per-layer top-k ids, as a recorder sees them.

        layers: one array per MoE layer, [T, K] expert ids (numpy or torch), the same T tokens in each.
        sample_ids: [T] sequence id of each token; default: every token its own sequence.
        src_rank: [T] rank each token was on when recorded (optional), with ``num_ranks`` ranks.
        distinct: refuse a token that lists one expert twice (ids from a token-choice router).
        """
        arrs = [_to_numpy(a, f"{source}: layer {i}", "[tokens, top_k]") for i, a in enumerate(layers)]
        if not arrs:
            raise TraceError(f"{source}: no layers given; pass one [tokens, top_k] array per MoE layer")
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1 or arrs[0].ndim != 2:
            raise TraceError(
                f"{source}: every layer must be a [tokens, top_k] array of the same shape, got {sorted(shapes)}"
            )
        topk = np.stack(arrs)
        if not np.issubdtype(topk.dtype, np.integer):
            raise TraceError(f"{source}: expert ids must be integers, got dtype {topk.dtype}")
        if topk.size and topk.min() < 0:
            raise TraceError(f"{source}: negative expert id {int(topk.min())}; drop padded (-1) entries first")
        e = int(num_experts) if num_experts is not None else int(topk.max()) + 1 if topk.size else 1
        if topk.size and topk.max() >= e:
            raise TraceError(f"{source}: expert id {int(topk.max())} >= num_experts ({e})")
        _check_topk(topk, e, source, distinct=distinct)
        problem = layers_problem(topk.shape[0], layer_ids)
        if problem is not None:
            raise TraceError(f"{source}: {problem}; pass one [tokens, top_k] array per MoE layer and its decoder layer")
        t = topk.shape[1]
        sids = (np.arange(t, dtype=np.int64) if sample_ids is None
                else _to_numpy(sample_ids, f"{source}: sample_ids", "[tokens]"))
        if sids.shape != (t,):
            raise TraceError(f"{source}: sample_ids has shape {sids.shape}, expected [{t}]")
        if not np.issubdtype(sids.dtype, np.integer):
            raise TraceError(f"{source}: sample_ids holds {sids.dtype} values; give each token's sequence as an integer")
        rank = None if src_rank is None else _to_numpy(src_rank, f"{source}: src_rank", "[tokens]")
        if rank is not None:
            if rank.shape != (t,):
                raise TraceError(f"{source}: src_rank has shape {rank.shape}, expected [{t}]")
            if num_ranks is None and np.issubdtype(rank.dtype, np.integer):
                num_ranks = int(rank.max()) + 1 if t else 1
            problem = ranks_problem(rank, num_ranks)
            if problem is not None:
                raise TraceError(f"{source}: {problem}; give each token's rank as an integer in 0..num_ranks-1")
            rank, num_ranks = rank.astype(np.int64), int(num_ranks)
        return cls._from_arrays(
            topk.astype(_id_dtype(e)), sids.astype(np.int64), np.zeros(t, np.int64), (source,), e, rank,
            num_ranks if rank is not None else None,
            tuple(int(i) for i in layer_ids) if layer_ids is not None else None, name or source,
        )

    @classmethod
    def from_counts(
        cls, counts: Any, *, source: str = "counts", layer_ids: Sequence[int] | None = None, name: str | None = None
    ) -> TraceSet:
        """A load-only TraceSet from token counts [L, E] per layer and expert (no co-activation)."""
        c = _to_numpy(counts, f"{source}: counts", "[layers, experts]")
        if c.ndim != 2 or not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
            raise TraceError(f"{source}: counts must be a numeric [layers, experts] array, got shape {c.shape}")
        problem = counts_problem(c)
        if problem is not None:
            raise TraceError(f"{source}: {problem}; pass token counts")
        problem = layers_problem(c.shape[0], layer_ids)
        if problem is not None:
            raise TraceError(f"{source}: {problem}; pass one row of counts per MoE layer and its decoder layer")
        return cls(
            num_experts=c.shape[1],
            counts_by_source=c.astype(np.int64)[None],
            sources=(source,),
            layer_ids=tuple(int(i) for i in layer_ids) if layer_ids is not None else None,
            name=name or source,
            notes=("load-only trace (token counts, no co-activation): communication is not optimised",),
        )

    @classmethod
    def _from_arrays(cls, topk, sample_ids, source_ids, sources, e, src_rank, num_ranks, layer_ids, name, notes=()):
        counts = np.zeros((len(sources), topk.shape[0], e), np.int64)
        for s in range(len(sources)):
            sel = topk[:, source_ids == s, :]
            for layer in range(topk.shape[0]):
                counts[s, layer] = np.bincount(sel[layer].ravel(), minlength=e)
        return cls(
            num_experts=e, counts_by_source=counts, topk=topk, sample_ids=sample_ids, source_ids=source_ids,
            sources=tuple(sources), src_rank=src_rank, num_ranks=num_ranks, layer_ids=layer_ids, name=name,
            notes=tuple(notes),
        )

    # ------------------------------------------------------------------ shape

    @property
    def load_only(self) -> bool:
        return self.topk is None

    @property
    def num_layers(self) -> int:
        return self.counts_by_source.shape[1]

    @property
    def num_tokens(self) -> int:
        """Tokens per layer (for load-only traces: routed choices / top_k is unknown, so choices)."""
        if self.topk is not None:
            return self.topk.shape[1]
        return int(self.counts_by_source.sum(axis=(0, 2)).max(initial=0))

    @property
    def top_k(self) -> int | None:
        return None if self.topk is None else self.topk.shape[2]

    @property
    def counts(self) -> np.ndarray:
        """[L, E] tokens routed to each expert, all sources together."""
        return self.counts_by_source.sum(axis=0)

    @property
    def num_samples(self) -> int:
        return 0 if self.sample_ids is None else len(np.unique(self.sample_ids))

    def __repr__(self) -> str:
        kind = "load-only" if self.load_only else f"{self.num_tokens} tokens x top-{self.top_k}"
        return (
            f"TraceSet({self.name!r}: {self.num_layers} layers, {self.num_experts} experts, {kind}, "
            f"sources={list(self.sources)})"
        )

    # ------------------------------------------------------------------ selection

    def select_tokens(self, mask: np.ndarray, name: str | None = None) -> TraceSet:
        """The tokens where ``mask`` [T] is true (sources with no token left are dropped)."""
        if self.topk is None:
            raise TraceError(f"{self.name}: a load-only trace has no tokens to select")
        mask = np.asarray(mask, bool)
        used = sorted(set(np.unique(self.source_ids[mask]).tolist()))
        remap = np.full(len(self.sources), -1, np.int64)
        remap[used] = np.arange(len(used))
        return TraceSet._from_arrays(
            np.ascontiguousarray(self.topk[:, mask, :]), self.sample_ids[mask], remap[self.source_ids[mask]],
            tuple(self.sources[i] for i in used), self.num_experts,
            None if self.src_rank is None else self.src_rank[mask], self.num_ranks, self.layer_ids,
            name or self.name, self.notes,
        )

    def select_samples(self, keep: Any, name: str | None = None) -> TraceSet:
        """The tokens whose sample id is in ``keep`` (any iterable of ids)."""
        return self.select_tokens(np.isin(self.sample_ids, np.asarray(list(keep))), name)

    def split_sources(self) -> list[TraceSet]:
        """One TraceSet per source (task or file), in order."""
        if self.topk is None:
            return [
                TraceSet(num_experts=self.num_experts, counts_by_source=self.counts_by_source[i : i + 1],
                         sources=(s,), layer_ids=self.layer_ids, name=s, notes=self.notes)
                for i, s in enumerate(self.sources)
            ]
        return [self.select_tokens(self.source_ids == i, name=s) for i, s in enumerate(self.sources)]

    def source(self, name: str) -> TraceSet:
        """The tokens of one source by name."""
        if name not in self.sources:
            raise TraceError(f"{self.name}: no source {name!r}; sources: {list(self.sources)}")
        return self.split_sources()[self.sources.index(name)]

    @staticmethod
    def concat(sets: Sequence[TraceSet], name: str | None = None) -> TraceSet:
        """Several trace sets as one (sources kept apart, sample ids made unique)."""
        sets = list(sets)
        if not sets:
            raise TraceError("no traces given; pass at least one trace file, folder or bundled name")
        if len(sets) == 1:
            return sets[0] if name is None else replace(sets[0], name=name)
        first = sets[0]
        for s in sets[1:]:
            if s.num_layers != first.num_layers or s.num_experts != first.num_experts:
                raise TraceError(
                    f"traces {first.name!r} ({first.num_layers} layers, {first.num_experts} experts) and "
                    f"{s.name!r} ({s.num_layers} layers, {s.num_experts} experts) do not describe the same model"
                )
        kinds = {s.load_only for s in sets}
        if len(kinds) > 1:
            raise TraceError(
                "cannot combine load-only traces (counts only) with token traces: "
                + ", ".join(f"{s.name} ({'load-only' if s.load_only else 'tokens'})" for s in sets)
                + "; plan from one kind"
            )
        sources = _unique_names([src for s in sets for src in s.sources])
        name = name or "+".join(s.name for s in sets)
        notes = tuple(dict.fromkeys(n for s in sets for n in s.notes))
        layer_ids = first.layer_ids if all(s.layer_ids == first.layer_ids for s in sets) else None
        if first.load_only:
            return TraceSet(num_experts=first.num_experts,
                            counts_by_source=np.concatenate([s.counts_by_source for s in sets]),
                            sources=tuple(sources), layer_ids=layer_ids, name=name, notes=notes)
        ks = {s.top_k for s in sets}
        if len(ks) > 1:
            raise TraceError(f"traces have different top-k {sorted(ks)}; they cannot come from the same model")
        sample_ids, source_ids, offset, src0 = [], [], 0, 0
        for s in sets:
            sample_ids.append(s.sample_ids - s.sample_ids.min(initial=0) + offset)
            offset = int(sample_ids[-1].max(initial=offset - 1)) + 1
            source_ids.append(s.source_ids + src0)
            src0 += len(s.sources)
        ranks = None
        if all(s.src_rank is not None for s in sets) and len({s.num_ranks for s in sets}) == 1:
            ranks = np.concatenate([s.src_rank for s in sets])
        return TraceSet._from_arrays(
            np.concatenate([s.topk for s in sets], axis=1).astype(_id_dtype(first.num_experts)),
            np.concatenate(sample_ids), np.concatenate(source_ids), tuple(sources), first.num_experts, ranks,
            first.num_ranks if ranks is not None else None, layer_ids, name, notes,
        )

    # ------------------------------------------------------------------ checks

    def check_spec(self, spec: MoESpec, label: str | None = None) -> TraceSet:
        """Raise TraceError unless these traces fit the spec's layers, experts and top-k; return self."""
        label = label or self.name
        e = spec.moe.experts.num_experts
        n_moe = spec.model.num_moe_layers
        if self.topk is not None and self.topk.size:
            hi = int(self.topk.max())
            if hi >= e:
                layer = int(np.argwhere(self.topk == hi)[0][0])
                raise TraceError(
                    f"{label}: expert id {hi} (MoE layer {layer}) exceeds the spec's {e} experts "
                    f"(moe.experts.num_experts); use traces recorded from this model or fix the spec"
                )
        elif self.num_experts > e and self.counts[:, e:].any():
            raise TraceError(
                f"{label}: counts for {self.num_experts} experts but the spec has {e} "
                f"(moe.experts.num_experts); use traces recorded from this model"
            )
        if self.num_layers != n_moe:
            raise TraceError(
                f"{label}: {self.num_layers} MoE layers in the trace but the spec has {n_moe} "
                f"(model.num_layers / first_k_dense / moe_layer_freq); use traces of this model or fix model.*"
            )
        want = tuple(spec.model.moe_layer_indices)
        if self.layer_ids is not None and tuple(self.layer_ids) != want:
            # the trace names the decoder layer of each of its MoE layers: the same count in another order or of
            # other layers would put one layer's traffic on another's placement
            shown = lambda ids: f"{list(ids)[:8]}{' ...' if len(ids) > 8 else ''}"  # noqa: E731
            raise TraceError(
                f"{label}: layer_ids {shown(self.layer_ids)} (the decoder layers the trace was recorded at) are not "
                f"the spec's MoE layers {shown(want)} (model.num_layers / first_k_dense / moe_layer_freq); use "
                "traces of this model in its layer order, or fix model.*"
            )
        k = getattr(spec.moe.router, "top_k", None)
        if self.top_k is not None and spec.moe.router.type == "topk" and k != self.top_k:
            raise TraceError(
                f"{label}: tokens choose {self.top_k} experts but the spec's moe.router.top_k is {k}; "
                "use traces of this model or fix top_k"
            )
        return self

    def with_experts(self, num_experts: int) -> TraceSet:
        """The same traces declared over ``num_experts`` >= the ids seen (pads counts with zeros)."""
        if num_experts == self.num_experts:
            return self
        if num_experts < self.num_experts and self.counts[:, num_experts:].any():
            raise TraceError(f"{self.name}: ids up to {self.num_experts - 1} do not fit {num_experts} experts")
        c = np.zeros((*self.counts_by_source.shape[:2], num_experts), np.int64)
        k = min(num_experts, self.num_experts)
        c[..., :k] = self.counts_by_source[..., :k]
        topk = None if self.topk is None else self.topk.astype(_id_dtype(num_experts))
        return replace(self, num_experts=num_experts, counts_by_source=c, topk=topk)

    # ------------------------------------------------------------------ native format

    def save(self, path: str | Path) -> Path:
        """Write the native compressed ``.npz`` format (see the module docstring)."""
        p = Path(path)
        if p.suffix != ".npz":
            raise TraceError(f"{p}: native trace files end in .npz")
        meta = {
            "format": FORMAT, "version": VERSION, "num_experts": self.num_experts, "top_k": self.top_k,
            "num_layers": self.num_layers, "num_tokens": self.num_tokens if self.topk is not None else None,
            "layer_ids": list(self.layer_ids) if self.layer_ids is not None else None,
            "sources": list(self.sources), "num_ranks": self.num_ranks, "name": self.name, "notes": list(self.notes),
        }
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        if self.topk is None:
            arrays["counts_by_source"] = self.counts_by_source
        else:
            arrays["topk"] = self.topk.astype(_id_dtype(self.num_experts))
            arrays["sample_ids"] = self.sample_ids.astype(np.int32)
            arrays["source_ids"] = self.source_ids.astype(np.int16)
            if self.src_rank is not None:
                arrays["src_rank"] = self.src_rank.astype(np.int16)
        # nothing half-written is left; a symbolic link is written through, a device or pipe refused
        return write_atomically(p, lambda tmp: np.savez_compressed(tmp, **arrays), "trace", TraceError)


def _unique_names(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}#{seen[n]}"
        else:
            seen[n] = 0
        out.append(n)
    return out


def counts_problem(c: np.ndarray) -> str | None:
    """Why ``c`` (numbers of any dtype and shape) cannot be token counts, or None: each count is a whole number
    of tokens in 0..MAX_TOKENS. Checked before a count is converted to int64 (a larger one would wrap negative)."""
    if not c.size:
        return None
    bad = ~np.isfinite(c) | (c < 0) | (c > MAX_TOKENS)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        return (f"count {c[at].item()} at {list(at)} is not a number of tokens (counts are finite, non-negative and at "
                f"most 2^40 = {MAX_TOKENS})")
    if np.issubdtype(c.dtype, np.floating) and (c != np.floor(c)).any():
        # Rounded, loads given as shares (0.012 of the tokens) would all read as 0 tokens, silently.
        at = tuple(int(i) for i in np.argwhere(c != np.floor(c))[0])
        return (f"count {c[at].item()} at {list(at)} is not a whole number of tokens (loads given as shares or "
                "averages: scale them to token counts first, e.g. np.rint(shares * tokens))")
    return None


def layers_problem(num_layers: int, layer_ids: Sequence[Any] | None, field: str = "layer_ids") -> str | None:
    """Why ``num_layers`` MoE layers recorded at the decoder layers ``layer_ids`` (the field ``field``; None: not
    known) are not what a trace file holds, or None."""
    if not 1 <= num_layers <= MAX_LAYERS:
        return f"{num_layers} MoE layers, outside 1..{MAX_LAYERS}"
    if layer_ids is None:
        return None
    if len(layer_ids) != num_layers:
        return f"{field} has {len(layer_ids)} entries for {num_layers} layers"
    for i in layer_ids:
        if not is_integer(i, 0, MAX_LAYER_ID):
            return f"{field}: {i!r} is not a decoder layer index in 0..{MAX_LAYER_ID}"
    return None


def ranks_problem(src_rank: np.ndarray, num_ranks: Any, ranks_field: str = "num_ranks") -> str | None:
    """Why ``src_rank`` (the rank each token was recorded on) on ``num_ranks`` ranks (the field ``ranks_field``) is
    not a recorder's, or None."""
    if not np.issubdtype(src_rank.dtype, np.integer):
        return f"src_rank holds {src_rank.dtype} values, not rank numbers (integers)"
    lo, hi = (int(src_rank.min()), int(src_rank.max())) if src_rank.size else (0, 0)
    if lo < 0 or hi >= MAX_RANKS:
        return f"src_rank holds rank {lo if lo < 0 else hi}, outside 0..{MAX_RANKS - 1}"
    if not is_integer(num_ranks, 1, MAX_RANKS):
        given = "missing" if num_ranks is None else repr(num_ranks)
        return f"{ranks_field} is {given}, expected an integer in 1..{MAX_RANKS}"
    if hi >= num_ranks:
        return f"src_rank holds rank {hi}, not below {ranks_field} ({num_ranks})"
    return None


def _check_topk(topk: np.ndarray, e: int, source: str, distinct: bool = False) -> None:
    """Checks of [L, T, K] expert ids from a reader, before anything is sized by them.

    ``distinct``: the ids come from a token-choice router (ESFT, SGLang), which never picks an expert
    twice for one token; a repeat means a corrupt file or a wrong top_k. (moegraph's own recordings
    may repeat: a hash router's random table can map a token to one expert twice.)
    """
    if not 1 <= e <= MAX_EXPERTS:
        raise TraceError(f"{source}: {e} experts (largest id + 1, or the recorded count) is outside 1..{MAX_EXPERTS}; "
                         "the ids are corrupt, or the trace is not of an MoE router")
    if distinct and topk.ndim == 3 and topk.shape[2] > 1 and topk.size:
        s = np.sort(topk, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]).any(axis=-1)
        if dup.any():
            layer, token = (int(i) for i in np.argwhere(dup)[0])
            raise TraceError(f"{source}: token {token} of layer {layer} lists expert {int(s[layer, token][np.flatnonzero(np.diff(s[layer, token]) == 0)[0]])} "
                             "twice in its top-k; a router picks distinct experts (is top_k right?)")


def _to_numpy(a: Any, where: str, shape: str) -> np.ndarray:
    """``a`` (a numpy array, torch tensor or nested lists) as a numpy array; TraceError naming ``where`` (the input
    and its field) when it cannot be one, e.g. lists of different lengths (``shape``: what it should be)."""
    if hasattr(a, "detach"):  # torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except (ValueError, TypeError):  # numpy: "setting an array element with a sequence ... inhomogeneous shape"
        raise TraceError(f"{where} is not an array (lists of different lengths?); give a {shape} array of "
                         "numbers") from None
