"""Router logits for transformers' output recording, from a swapped block.

transformers collects ``router_logits`` (the auxiliary load-balancing loss reads them with
``output_router_logits=True``, from the config or the call) by forward hooks on the modules its model
class names in ``_can_record_outputs``: the router inside each MoE block (``MixtralTopKRouter``, index 0 of
its output), or the block itself (Ernie 4.5 VL, index 1). A swapped block runs neither, so the loss found
no logits and the forward failed. Here a block's recorded module is found and compared, on random inputs,
with the logits the swapped layer can give (its router's linear map of the hidden states, or the block's
own output position, which the adapter reproduces); where they agree the adapter appends them to the
active collection itself, where transformers' hook would have, in the same order. The collection is
transformers' own context variable (``utils.output_capturing``); a transformers without it records nothing,
and the swap says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RouterRecord", "active_collection", "append", "read_router_record", "recorded_targets"]

KEY = "router_logits"


@dataclass(frozen=True)
class RouterRecord:
    """What the adapter appends: ``"router"`` (its router's logits of the hidden states) or ``"output"`` (its own
    output, position ``index`` of the tuple it returns)."""

    source: str
    index: int = 0


def active_collection() -> dict[str, list] | None:
    """The outputs transformers is collecting in this context (None when it is not, or cannot say)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector.get()


def recorded_targets(model: nn.Module) -> list[tuple[type | None, str | None, int, str | None]]:
    """(class, class-name suffix, index, layer name) of every module kind the model records router logits from."""
    out = []
    for m in model.modules():
        specs = (getattr(type(m), "_can_record_outputs", None) or {}).get(KEY)
        if specs is None:
            continue
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            if isinstance(spec, type):
                out.append((spec, None, 0, None))
            elif isinstance(spec, str):
                out.append((None, spec, 0, None))
            else:  # an OutputRecorder
                out.append((getattr(spec, "target_class", None), getattr(spec, "class_name", None),
                            int(getattr(spec, "index", 0) or 0), getattr(spec, "layer_name", None)))
    return list(dict.fromkeys(out))  # a model and its base model often name the same


def _matches(name: str, module: nn.Module, target: tuple[type | None, str | None, int, str | None]) -> bool:
    cls, suffix, _, layer = target
    if not ((cls is not None and isinstance(module, cls)) or (suffix is not None and name.endswith(suffix))):
        return False
    return layer is None or f".{layer.strip('.')}." in f".{name}."


def read_router_record(model: nn.Module, path: str, block: nn.Module, router_weight: Tensor,
                       router_bias: Tensor | None, dtype: torch.dtype) -> tuple[RouterRecord | None, str]:
    """How the swapped block at ``path`` gives transformers its router logits: (record, "") where it can, (None,
    "") where the block records none, (None, reason) where it records logits the swapped layer cannot give."""
    targets = recorded_targets(model)
    found = list({id(m): (name, m, t) for t in targets for name, m in block.named_modules()
                  if _matches(f"{path}.{name}" if name else path, m, t)}.values())
    if not found:
        return None, ""
    if len(found) > 1:
        return None, f"it records router logits from {len(found)} of its modules"
    name, module, (_, _, index, _) = found[0]
    if module is block:
        return RouterRecord("output", index), ""
    try:
        from transformers.utils.output_capturing import _active_collector  # noqa: F401
    except ImportError:
        return None, "this transformers has no output collection to add router logits to"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, router_weight.shape[-1], generator=g).to(device=router_weight.device, dtype=dtype)
    try:
        with torch.no_grad():
            got = module(x)
    except Exception as exc:  # noqa: BLE001 - the reason is reported
        return None, f"its router module {name} did not run on hidden states alone ({type(exc).__name__}: {exc})"
    got = got[index] if isinstance(got, (tuple, list)) else got
    with torch.no_grad():
        want = F.linear(x.to(router_weight.dtype), router_weight, router_bias)
    # to the logits' scale, at the precision of the block's own (a bfloat16 router's differ from the compiled
    # float32 router's by bfloat16 rounding)
    tol = 1e-4 if not isinstance(got, Tensor) or got.dtype in (torch.float32, torch.float64) else 3e-2
    if not isinstance(got, Tensor) or got.shape != want.shape or \
            float((got.float() - want.float()).abs().max()) > tol * max(float(want.abs().max()), 1e-6):
        return None, (f"its router module {name} records logits other than a linear map of the hidden states "
                      "(a norm, scale or network before it), which the swapped layer does not compute")
    return RouterRecord("router"), ""


def append(record: RouterRecord, logits: Any, output: Any) -> None:
    """Add the block's router logits to transformers' active collection, if it is collecting them. With autograd
    on they are computed either way, as the block's router computes them on every call: a forward recomputed
    under gradient checkpointing (no collection then) must save what the first one saved."""
    collection = active_collection()
    collecting = collection is not None and KEY in collection
    if record.source == "router":
        value = logits() if collecting or torch.is_grad_enabled() else None
    else:
        value = output[record.index] if isinstance(output, tuple) else output
    if collecting and value is not None:
        collection[KEY].append(value)
