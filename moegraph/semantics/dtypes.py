"""The dtype table: spec names <-> torch dtypes <-> bytes per element.

Every stage reads this one table (the spec's choices, the runtime's parameters, the HF importer's
names, the planner's and the summary's byte counts). A new dtype (float8 variants, say) is one
entry here. Torch is imported only when a torch dtype is asked for, so the spec stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DTypeInfo", "DTYPES", "DTYPE_BYTES", "torch_dtype", "dtype_name", "not_a_spec_dtype"]


@dataclass(frozen=True)
class DTypeInfo:
    """One dtype: its spec name, bytes per element and the ``torch`` attribute naming it."""

    name: str
    bytes: int
    torch_name: str


#: spec dtype name -> its entry
DTYPES: dict[str, DTypeInfo] = {
    "float32": DTypeInfo("float32", 4, "float32"),
    "float16": DTypeInfo("float16", 2, "float16"),
    "bfloat16": DTypeInfo("bfloat16", 2, "bfloat16"),
}

#: spec dtype name -> bytes per element
DTYPE_BYTES: dict[str, int] = {n: d.bytes for n, d in DTYPES.items()}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a spec dtype name (KeyError for an unknown name)."""
    import torch

    return getattr(torch, DTYPES[name].torch_name)


def dtype_name(dtype: Any, default: str | None = None) -> str | None:
    """The spec name of a torch dtype (``default`` where the table has none)."""
    for d in DTYPES.values():
        if str(dtype) == f"torch.{d.torch_name}":
            return d.name
    return default


#: torch dtype names a user may reach for that are deliberately not spec dtypes, with where they belong
_ELSEWHERE: dict[str, str] = {
    "float64": "a float64 layer is for reference checks on the torch backend: keep the spec's dtype and pass "
               "dtype=torch.float64 to moegraph.compile",
    "float8_e4m3fn": "FP8 is a storage format for expert weights: add a moe.quantization section (e.g. quantization: "
                     "{weight_block: [128, 128]}, as preset deepseek-v3-fp8-tiny does) and keep dtype bfloat16 or "
                     "float32",
}
_ELSEWHERE["double"] = _ELSEWHERE["float64"]
for _name in ("float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "fp8"):
    _ELSEWHERE[_name] = _ELSEWHERE["float8_e4m3fn"]


def not_a_spec_dtype(name: Any) -> str | None:
    """Why ``name`` (a torch dtype a user may write) is not a spec dtype and what to do instead; None if not one."""
    key = str(name).removeprefix("torch.")
    return _ELSEWHERE.get(key)
