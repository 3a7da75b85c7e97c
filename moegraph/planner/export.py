"""Plan files in the forms serving engines read.

SGLang (``--init-expert-location FILE.json``): a JSON object whose only key is
``physical_to_logical_map`` [decoder layers][physical experts]. SGLang passes the object's keys as
keyword arguments to its mapping constructor, so no other key may be present, and it counts every
decoder layer (``num_hidden_layers``), dense ones included; physical experts are the logical ones
plus ``--ep-num-redundant-experts``, split evenly over ``--ep-size`` GPUs (slot p on GPU
p // slots_per_gpu, as in moegraph's plans). Dense layers get the identity placement
(slot p holds expert p % E), which is what SGLang itself uses when given no file.

vLLM has no file for an initial placement (its EPLB starts from a fixed linear or round-robin
placement and re-balances online), so there is no vLLM form.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import write_atomically
from .planfile import Plan

__all__ = ["FORMATS", "sglang_expert_location", "export_plan"]

FORMATS = ("sglang",)


def sglang_expert_location(plan: Plan) -> dict:
    """``{"physical_to_logical_map": [[...] per decoder layer]}`` for SGLang's --init-expert-location."""
    model = plan.spec.model
    moe_layers = model.moe_layer_indices
    assert len(moe_layers) == plan.num_layers, "a plan holds one row per MoE layer of its spec"
    identity = (np.arange(plan.num_slots) % plan.num_experts).tolist()
    rows = [identity] * model.num_layers
    for row, layer in zip(plan.physical_to_logical_map, moe_layers):
        rows[layer] = row.tolist()
    return {"physical_to_logical_map": rows}


def export_plan(plan: Plan, fmt: str, path: str | Path) -> Path:
    """Write ``plan`` in format ``fmt`` to ``path`` (``fileio.write_atomically``: nothing half-written is left)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: unknown; choose one of {', '.join(FORMATS)} "
                         "(vLLM reads no initial placement file)")
    text = json.dumps(sglang_expert_location(plan)) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text), f"{fmt} placement file", InputError)
