"""Routing traces: which experts each token chose, in every MoE layer, and where tokens came from.

(Not to be confused with an FX trace of a module: here a "trace" is recorded or imported routing
traffic.) The package has three parts:

- ``trace_set``: the ``TraceSet`` type (arrays, construction, selection, the spec check, saving);
- ``formats``: the native ``.npz`` format, the ESFT and SGLang importers, bundled sets by name, and
  ``load_traces`` / ``traces_for_spec``, the entry points that validate what they load;
- ``stats``: co-activation counts, ``trace_stats`` and ``synthetic_traces``.

Every public name is importable from ``moegraph.traces`` directly.
"""

from __future__ import annotations

from .formats import bundled_traces, is_esft_folder, load_traces, read_esft, read_native, read_sglang, traces_for_spec
from .stats import TraceStats, coactivation, synthetic_traces, trace_stats
from .trace_set import FORMAT, VERSION, TraceSet

__all__ = [
    "TraceSet",
    "TraceStats",
    "load_traces",
    "traces_for_spec",
    "read_esft",
    "read_sglang",
    "read_native",
    "is_esft_folder",
    "bundled_traces",
    "trace_stats",
    "coactivation",
    "synthetic_traces",
    "FORMAT",
    "VERSION",
]
