"""Block sizes for the grouped expert MLP kernels.

A config holds the row block ``BLOCK_M`` (shared by both GEMMs, since the alignment pads every
expert's rows to it) and per-GEMM tiles. Tuned tables are JSON files named like vLLM's::

    E={experts},N={expert hidden F},device_name={torch.cuda.get_device_name, spaces -> _},dtype={dtype}.json

mapping a token count (as a string) to a config; the entry with the nearest token count is used.
``benchmarks/tune_triton.py`` writes them on a GPU. Without a table, ``default_config`` picks tiles
from the expected rows per expert. Tables are looked up in this package's ``tuned/`` folder and in
folders added with ``add_search_dir``; nothing here reads environment variables.

A spec's ``codegen.block_m`` fixes ``BLOCK_M`` over whatever table or default chose it: the generated
layer runs its forward within ``row_block(block_m)`` (``current_row_block`` reads it where the kernels
are launched; thread-local, as the expert strategy's pin).
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import is_integer

__all__ = ["GemmConfig", "MoEConfig", "default_config", "get_config", "table_path", "add_search_dir", "fit",
           "fit_gemm", "has_table", "row_block", "current_row_block"]

_SEARCH_DIRS: list[Path] = [Path(__file__).resolve().parent / "tuned"]


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    BLOCK_M: int
    gate_up: GemmConfig
    down: GemmConfig

    def to_json(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "gate_up": asdict(self.gate_up), "down": asdict(self.down)}

    @classmethod
    def from_json(cls, d: dict) -> MoEConfig:
        return cls(int(d["BLOCK_M"]), GemmConfig(**d["gate_up"]), GemmConfig(**d["down"]))


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def table_name(E: int, F: int, device_name: str, dtype) -> str:
    dev = re.sub(r"[^0-9A-Za-z_.-]+", "_", device_name.strip())
    return f"E={E},N={F},device_name={dev},dtype={dtype_name(dtype)}.json"


def table_path(E: int, F: int, device_name: str, dtype, directory: str | Path | None = None) -> Path:
    """Where a tuned table for this problem lives (in ``directory``, default the bundled ``tuned/``)."""
    return Path(directory or _SEARCH_DIRS[0]) / table_name(E, F, device_name, dtype)


def add_search_dir(directory: str | Path) -> None:
    """Look for tuned tables in ``directory`` too (searched before the bundled ones)."""
    p = Path(directory).resolve()
    if p not in _SEARCH_DIRS:
        _SEARCH_DIRS.insert(0, p)
        _load_table.cache_clear()


#: what a tuned table's numbers may be: (smallest, largest, power of two); block sides are powers of two
#: (``tl.arange``) of at least 16 (``tl.dot``)
_BOUNDS = {"BLOCK_M": (16, 256, True), "BLOCK_N": (16, 1024, True), "BLOCK_K": (16, 1024, True),
           "GROUP_M": (1, 1 << 16, False), "num_warps": (1, 32, True), "num_stages": (1, 16, False)}


def _table_entry(tokens: Any, cfg: Any) -> tuple[int, MoEConfig]:
    """One entry of a tuned table, checked (ValueError naming what is wrong)."""
    if not (isinstance(tokens, str) and tokens.isdigit() and 0 < int(tokens) < 1 << 40):
        raise ValueError(f"key {tokens!r} is not a token count")
    gemms = ("gate_up", "down")
    if not isinstance(cfg, dict) or set(cfg) != {"BLOCK_M", *gemms} or any(not isinstance(cfg[g], dict) for g in gemms):
        raise ValueError(f"entry {tokens}: expected {{BLOCK_M, gate_up: {{...}}, down: {{...}}}}")
    fields = [("BLOCK_M", cfg["BLOCK_M"])] + [(f"{g}.{k}", v) for g in gemms for k, v in cfg[g].items()]
    for where, value in fields:
        key = where.rsplit(".", 1)[-1]
        if key not in _BOUNDS:
            raise ValueError(f"entry {tokens}: unknown field {where!r}")
        lo, hi, pow2 = _BOUNDS[key]
        if not is_integer(value, lo, hi) or (pow2 and value & (value - 1)):
            raise ValueError(f"entry {tokens}: {where} = {value!r}, expected an integer in [{lo}, {hi}]"
                             + (", a power of two" if pow2 else ""))
    try:
        return int(tokens), MoEConfig.from_json(cfg)
    except TypeError as exc:  # a GEMM's tiles missing
        raise ValueError(f"entry {tokens}: {exc}") from None


@lru_cache(maxsize=None)
def _load_table(name: str) -> dict[int, MoEConfig] | None:
    """The first table of this name in the search folders, checked; one that cannot be used is left out with a
    warning naming it (the kernels then take ``default_config``)."""
    for d in _SEARCH_DIRS:
        path = d / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(raw, dict) or not raw:
                    raise ValueError("expected an object mapping token counts to configs")
                return dict(_table_entry(m, c) for m, c in raw.items())
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                warnings.warn(f"{path}: not a usable tuned Triton table ({exc}); the default block sizes are used. "
                              "Tune it again (benchmarks/tune_triton.py) or remove the file", stacklevel=2)
                return None
    return None


def default_config(rows_per_expert: float, dtype) -> MoEConfig:
    """Tiles by the expected rows per expert: small rows stream weights, large rows are GEMM-bound."""
    if dtype_name(dtype) == "float32":  # twice the bytes per tile: smaller tiles, fewer stages
        bm = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64
        g = GemmConfig(BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
        return MoEConfig(bm, g, g)
    if rows_per_expert <= 16:  # decode: memory-bound on expert weights, many narrow tiles
        g = GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        return MoEConfig(16, g, g)
    if rows_per_expert <= 64:
        g = GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)
        return MoEConfig(32, g, g)
    if rows_per_expert <= 256:
        return MoEConfig(64, GemmConfig(128, 64, 8, 4, 4), GemmConfig(128, 64, 8, 4, 4))
    return MoEConfig(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 3))


def _pow2_at_least(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def fit_gemm(g: GemmConfig, n: int, k: int) -> GemmConfig:
    """Shrink a GEMM's tiles to its output width ``n`` and reduction length ``k`` (at least 16)."""
    return GemmConfig(min(g.BLOCK_N, _pow2_at_least(n)), min(g.BLOCK_K, _pow2_at_least(k)), g.GROUP_M, g.num_warps,
                      g.num_stages)


def fit(cfg: MoEConfig, D: int, F: int) -> MoEConfig:
    """Shrink tiles that exceed the problem (tiny test shapes); tl.dot needs every tile side >= 16."""
    return MoEConfig(cfg.BLOCK_M, fit_gemm(cfg.gate_up, F, D), fit_gemm(cfg.down, D, F))


def has_table(E: int, F: int, device_name: str | None, dtype) -> bool:
    """Whether a tuned table exists for this problem and device."""
    return bool(device_name) and _load_table(table_name(E, F, device_name, dtype)) is not None


_ROW_BLOCK = threading.local()


@contextmanager
def row_block(block_m: int | None) -> Iterator[None]:
    """Within the block, the grouped expert kernels use ``block_m`` rows per block (None: as chosen)."""
    prev = current_row_block()
    _ROW_BLOCK.value = block_m
    try:
        yield
    finally:
        _ROW_BLOCK.value = prev


def current_row_block() -> int | None:
    """The ``BLOCK_M`` fixed by ``row_block`` here, or None."""
    return getattr(_ROW_BLOCK, "value", None)


def get_config(E: int, F: int, tokens: int, rows_per_expert: float, dtype, device_name: str | None) -> MoEConfig:
    """The tuned config for the nearest token count if a table exists, else ``default_config``; its
    ``BLOCK_M`` replaced by the one ``row_block`` fixes, if any."""
    table = _load_table(table_name(E, F, device_name, dtype)) if device_name else None
    cfg = table[min(table, key=lambda m: (abs(m - tokens), m))] if table else default_config(rows_per_expert, dtype)
    fixed = current_row_block()
    return cfg if fixed is None else replace(cfg, BLOCK_M=fixed)
