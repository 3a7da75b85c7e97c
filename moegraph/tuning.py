"""Choose the expert-compute strategy by measurement, and remember the choice per device.

On the first call for a problem key (device, dtype, shape, activation, token-count bucket), the
tuner times each candidate strategy of ``moegraph.strategies`` a few times on the call's own inputs
(bounded by ``budget_s`` per key), keeps the fastest, and writes it to a JSON table for this device.
The table is to CPUs what ``triton_backend/configs.py``'s tuned tables are to GPUs; its file name
is a hash of the device identity (CPU model, core count, ISA flags) and library versions, so a
table never carries to another machine or torch build.

Where the table lives is the caller's decision (``enable_tuning(cache_dir=...)``; the CLI points it
at the user cache directory). Nothing here reads environment variables. A corrupt or foreign table
file is rebuilt with a warning, and a malformed entry (hand-edited) is ignored, with a warning, and
measured again. The table is a cache: where it cannot be written, one warning says so and the
choices stay in memory. Several processes may share one file: a save re-reads it under a lock and
adds its entries to those on disk (written whole, by an atomic rename), so none undoes another's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from . import semantics, strategies
from .errors import MoegraphError
from .fileio import input_problem, write_atomically
from .ops.args import ExpertArgs, RoutedRows

__all__ = ["Tuner", "device_identity", "enable_tuning", "disable_tuning", "active_tuner", "problem_key",
           "TABLE_VERSION"]

TABLE_VERSION = 1
#: the largest table read (one entry per problem size measured: kilobytes)
MAX_TABLE_BYTES = 64 << 20

#: A candidate whose warm-up call takes more than this many times the fastest warm-up is dropped
#: before the timed calls (it cannot plausibly win; timing it again would only cost time). Loose,
#: because a warm-up also pays one-time costs (oneDNN primitives for new row counts, buffers grown).
PRUNE = 3.0

#: After each timed round, a candidate whose best time is more than this many times the leader's is
#: dropped (successive elimination): timed calls hold no one-time costs, so a gap this wide is not
#: noise on an idle machine, and the rounds left go to the candidates still close to each other.
DROP = 1.25

#: ISA flags from /proc/cpuinfo that change which GEMM kernels a library runs.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
              "amx_tile", "amx_int8", "asimd", "sve", "sve2")


@lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The CPU model, its flags of ``_ISA_FLAGS`` and every flag it reports (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), None
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, (), ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
    flags = flags or set()
    return model, tuple(sorted(flags & set(_ISA_FLAGS))), tuple(sorted(flags))


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one)."""
    return _cpuinfo()[0]


def device_identity(device: torch.device | str = "cpu") -> dict:
    """What a tuned choice depends on besides the problem: the device and the library versions."""
    device = torch.device(device)
    ident = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        ident.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        model, flags, _ = _cpuinfo()
        ident.update(device=model, cores=os.cpu_count(), isa=list(flags),
                     mkldnn=torch.backends.mkldnn.is_available())
    return ident


def _identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def token_bucket(T: int) -> int:
    """Token counts share a choice within a power-of-two bucket (1, 2, 4, ...)."""
    b = 1
    while b < T:
        b *= 2
    return b


def problem_key(args: ExpertArgs | tuple, packed) -> str:
    """The table key of an expert-op call: dtype, shapes, activation, extras and token bucket."""
    args = ExpertArgs.of(args)
    x_TD, w_up_EHD, w_down_EDF = args.x_TD, args.w_up_EHD, args.w_down_EDF
    E, H, D = w_up_EHD.shape
    F = w_down_EDF.shape[2]
    K = max(1, round(args.exp_N.numel() / max(1, x_TD.shape[0])))
    extras = "".join(f for f, on in (("b", args.b_up_EH is not None), ("s", args.shared_w_up_HD is not None),
                                     ("p", packed is not None)) if on)
    act = args.act.name  # one key per table entry, however it was named
    return (f"{str(x_TD.dtype).replace('torch.', '')},E={E},D={D},F={F},K={K},act={act}"
            f",x={extras or '-'},T<={token_bucket(x_TD.shape[0])}")


def _entry_problem(entry) -> str | None:
    """Why a table entry cannot be used (None when it can): {"strategy": known name, "us": {name: time}}."""
    if not isinstance(entry, dict):
        return "is not an object"
    if entry.get("strategy") not in strategies.STRATEGIES:  # (backward strategies are a subset of the forward names)
        return "names no known strategy"
    us = entry.get("us")
    if not isinstance(us, dict) or not all(type(t) in (int, float) and math.isfinite(t) for t in us.values()):
        return 'has no "us" object of times in microseconds'
    return None


def _read_entries(path: Path, identity: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """The usable entries of the table file at ``path`` and the problems of the others (key -> why);
    ValueError (or an OSError) where the file as a whole cannot be used."""
    problem = input_problem(path, "expert-strategy table", MAX_TABLE_BYTES)
    if problem is not None:
        raise ValueError(problem)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or raw.get("version") != TABLE_VERSION or raw.get("identity") != identity:
        raise ValueError("it was written for another device, library version or table version")
    entries = raw.get("entries")
    if not isinstance(entries, dict):
        raise ValueError('it has no "entries" object')
    bad = {k: why for k, v in entries.items() if (why := _entry_problem(v)) is not None}
    return {k: v for k, v in entries.items() if k not in bad}, bad


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``<path>.lock`` (where the system has ``fcntl``), so that one process at a
    time reads and rewrites the table."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the atomic rename still keeps the file whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


#: what a table that cannot be written says
_UNWRITABLE_FIX = ("the tuned choices are kept in memory for this process only; to keep them, point "
                   "moegraph.tuning.enable_tuning(cache_dir=...) (the moegraph command: $XDG_CACHE_HOME) at a "
                   "writable folder")
#: tables this process could not write (warned once each)
_UNWRITABLE: set[Path] = set()


def _wall_timer(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Tuner:
    """Times candidate strategies per problem key and keeps the winners (in memory and on disk).

    Args:
        cache_dir: folder of the per-device JSON tables (None: in memory only).
        budget_s: time after which no further round of timed calls starts for one key (each
            candidate gets one warm-up, and one timed call at least unless the warm-ups already
            left a single one). A key with one candidate is not timed at all.
        reps: most rounds of timed calls (fewer when the budget runs out or one candidate is left;
            each candidate's minimum is kept).
        timer: ``timer(fn) -> seconds`` for one call of ``fn`` (tests pass a fake one).
    """

    def __init__(self, cache_dir: str | Path | None = None, *, budget_s: float = 0.5, reps: int = 3,
                 timer: Callable[[Callable[[], object]], float] | None = None, device: str = "cpu"):
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.budget_s, self.reps = budget_s, reps
        self.timer = timer or _wall_timer
        self.device = device
        self.identity = device_identity(device)
        self.table: dict[str, dict] = {}
        self.tuned_now: list[str] = []  # keys measured in this process (not read from the file)
        self.last_key: str | None = None
        self.tuning_seconds = 0.0  # wall time spent measuring in this process
        self._checked: set[str] = set()  # forward keys whose entry is one of their candidates here
        self._load()

    # -- the table file ----------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"cpu-experts-{_identity_hash(self.identity)}.json"

    def _load(self) -> None:
        path = self.path
        try:
            if path is None or not path.exists():
                return
            self.table, bad = _read_entries(path, self.identity)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            warnings.warn(f"expert-strategy table {path} is unreadable ({exc}); it will be rebuilt by measurement",
                          RuntimeWarning, stacklevel=2)
            self.table = {}
            return
        if bad:
            shown = "; ".join(f"{k!r} {why}" for k, why in list(bad.items())[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            warnings.warn(f"expert-strategy table {path}: {'entry' if len(bad) == 1 else 'entries'} {shown}{more}; "
                          "ignored, measured again when used",
                          RuntimeWarning, stacklevel=2)

    def _save(self) -> None:
        """Add this process's entries to the table file. Another process's entries written since this one
        read the file survive (re-read under a lock; this process's own win where both have a key). A
        table that cannot be written warns once: the choices stay in memory (it is only a cache)."""
        path = self.path
        if path is None:
            return
        try:
            with _locked(path):
                try:
                    on_disk = _read_entries(path, self.identity)[0] if path.exists() else {}
                except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                    on_disk = {}  # unreadable: replaced
                body = json.dumps({"version": TABLE_VERSION, "identity": self.identity,
                                   "entries": {**on_disk, **self.table}}, indent=1, sort_keys=True)
                # written whole or not at all (``fileio``), with the user's usual permissions
                write_atomically(path, lambda tmp: tmp.write_text(body, encoding="utf-8"), "expert-strategy table",
                                 fix=_UNWRITABLE_FIX)
        except (OSError, MoegraphError) as exc:
            if path not in _UNWRITABLE:
                _UNWRITABLE.add(path)
                why = str(exc) if isinstance(exc, MoegraphError) else (
                    f"{path}: could not write the expert-strategy table ({exc.strerror or exc}): {_UNWRITABLE_FIX}")
                warnings.warn(why, RuntimeWarning, stacklevel=2)

    # -- choosing ----------------------------------------------------------------------------

    def choose(self, args: tuple, packed=None) -> str:
        """The forward strategy for this call: from the table, else measured now (and recorded).

        A key whose entry was checked against its candidates in this process is answered from the
        table without building the candidate list again (a noticeable part of a one-token forward);
        every strategy runs every input, so an entry is never wrong, only maybe slower."""
        args = ExpertArgs.of(args)
        key = problem_key(args, packed)
        entry = self.table.get(key) if key in self._checked else None
        if entry is not None and torch.get_num_threads() == self.identity.get("threads"):
            self.last_key = key
            return entry["strategy"]
        fns = {n: (lambda n=n: strategies.run_strategy(n, args, packed))
               for n in strategies.candidates(args.x_TD, args.w_up_EHD, args)}
        name = self._choose(key, fns)
        self._checked.add(key)
        return name

    def choose_train(self, args: ExpertArgs) -> str:
        """The form of a training forward (one whose backward will run) for this call, under its own
        key: the training forms keep the sorted rows and the up projection, so they rank differently
        from the inference forms. The backward is chosen under its own key (``choose_backward``)."""
        args = ExpertArgs.of(args)
        fns = {n: (lambda n=n: strategies.run_train_strategy(n, args)) for n in strategies.train_candidates(args)}
        return self._choose("train," + problem_key(args, None), fns)

    def choose_among(self, key: str, fns: dict[str, Callable[[], object]]) -> str:
        """The fastest of ``fns`` (strategy name -> call) for ``key``: from the table, else measured now."""
        return self._choose(key, fns)

    def choose_backward(self, rows: RoutedRows, grads: dict) -> str:
        """The backward strategy for the routed experts (``strategies.run_backward``'s arguments)."""
        x_ND, w_up_EHD, w_down_EDF = rows.x_ND, rows.w_up_EHD, rows.w_down_EDF
        E, H, D = w_up_EHD.shape
        extras = "".join(f for f, on in (("b", rows.b_up_EH is not None), ("w", rows.want_out)) if on)
        key = (f"bwd,{str(x_ND.dtype).replace('torch.', '')},E={E},D={D},F={w_down_EDF.shape[2]},"
               f"act={semantics.activation(rows.activation, rows.gated).name},x={extras or '-'},"
               f"N<={token_bucket(x_ND.shape[0])}")
        fns = {n: (lambda n=n: strategies.run_backward_strategy(n, rows, grads))
               for n in strategies.backward_candidates(rows)}
        return self._choose(key, fns)

    def _choose(self, key: str, fns: dict[str, Callable[[], object]]) -> str:
        self.last_key = key
        if torch.get_num_threads() != self.identity.get("threads"):
            # The thread count changed since this table was read: choices belong to their thread count,
            # so switch to that count's table (another file) instead of reusing these.
            self.identity, self.table = device_identity(self.device), {}
            self._checked.clear()
            self._load()
        entry = self.table.get(key)
        if len(fns) == 1 and (entry is None or entry["strategy"] not in fns):
            # One candidate: nothing to measure, so no save of its own (a later save writes it along).
            entry = self.table[key] = {"strategy": next(iter(fns)), "us": {}}
            self.tuned_now.append(key)
        elif entry is None or entry["strategy"] not in fns:
            t0 = time.perf_counter()
            entry = self.measure(fns)
            self.tuning_seconds += time.perf_counter() - t0
            self.table[key] = entry
            self.tuned_now.append(key)
            self._save()
        return entry["strategy"]

    def measure(self, fns: dict[str, Callable[[], object]]) -> dict:
        """Time each candidate call; returns {"strategy": fastest, "us": {name: best time}}.

        One warm-up call each (timed too: a candidate PRUNE times slower than the best warm-up is out),
        then rounds of one timed call per remaining candidate, in alternating order, until one is
        left (the others DROP times slower than it), ``reps`` rounds ran, or the budget is spent."""
        names = list(fns)
        with torch.no_grad():
            best = {n: self.timer(fn) for n, fn in fns.items()}
            alive = [n for n in names if best[n] <= PRUNE * min(best.values())]
            deadline = time.perf_counter() + self.budget_s
            for r in range(self.reps):  # at least one timed call each, while more than one is left
                if len(alive) == 1:
                    break
                for n in alive if r % 2 == 0 else alive[::-1]:
                    best[n] = min(best[n], self.timer(fns[n]))
                lead = min(best[n] for n in alive)
                alive = [n for n in alive if best[n] <= DROP * lead]
                if time.perf_counter() > deadline:
                    break
        winner = min(alive, key=lambda n: (best[n], names.index(n)))
        return {"strategy": winner, "us": {n: round(t * 1e6, 1) for n, t in best.items()}}

    def choices(self) -> dict[str, str]:
        return {k: v["strategy"] for k, v in self.table.items()}


_ACTIVE: list[Tuner | None] = [None]
_ENABLED: list[bool] = [True]


def enable_tuning(cache_dir: str | Path | None = None, **kwargs) -> Tuner:
    """Choose strategies by measurement from now on, with the table in ``cache_dir`` (None: memory)."""
    _ACTIVE[0] = Tuner(cache_dir, **kwargs)
    _ENABLED[0] = True
    return _ACTIVE[0]


def disable_tuning() -> None:
    """Use the fixed heuristic of ``moegraph.ops`` instead of measuring (a pin still wins)."""
    _ACTIVE[0] = None
    _ENABLED[0] = False


def active_tuner() -> Tuner | None:
    """The tuner in use: by default an in-memory one made on first use; None after disable_tuning()."""
    if _ACTIVE[0] is None and _ENABLED[0]:
        _ACTIVE[0] = Tuner(None)
    return _ACTIVE[0]

