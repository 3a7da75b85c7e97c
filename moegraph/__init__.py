"""moegraph: a declarative compiler for Mixture-of-Experts layers.

    spec file --load_spec--> MoESpec --plan--> Plan --compile--> nn.Module
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    CodegenError,
    DistributedError,
    InputError,
    MissingDependency,
    MoegraphError,
    OptimizeError,
    PlanFileError,
    PlanInfeasible,
    SpecError,
    TraceError,
    UnsupportedBlock,
)
from .loader import dump_spec, load_spec, presets  # noqa: F401
from .spec import MoESpec  # noqa: F401
from .summary import summarize  # noqa: F401


def __getattr__(name: str):
    # Later stages are imported lazily so that `import moegraph` stays light (no torch import).
    lazy = {
        "compile": ("moegraph.compiler", "compile"),
        "plan": ("moegraph.planner", "plan"),
        "from_hf": ("moegraph.hf", "from_hf"),
        "optimize": ("moegraph.swap", "optimize"),
        "load_traces": ("moegraph.traces", "load_traces"),
        "optimize_pretrained": ("moegraph.pretrained", "optimize_pretrained"),
    }
    # Submodules a user reaches as attributes (``moegraph.codegen.set_cache_dir``) without importing them.
    submodules = {"codegen", "compiler", "planner", "traces", "topology", "ops", "hf", "swap", "distributed"}
    if name in lazy:
        import importlib

        mod, attr = lazy[name]
        return getattr(importlib.import_module(mod), attr)
    if name in submodules:
        import importlib

        return importlib.import_module(f"moegraph.{name}")
    raise AttributeError(f"module 'moegraph' has no attribute {name!r}")
