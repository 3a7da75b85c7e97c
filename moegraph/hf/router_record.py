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

from ..errors import InputError

__all__ = ["RouterRecord", "active_collection", "read_router_record", "record_router_logits", "recorded_targets"]

KEY = "router_logits"


@dataclass(frozen=True)
class RouterRecord:
    """What the adapter gives transformers' collection: ``"router"`` (its router's logits of the hidden states),
    ``"output"`` (its own output, position ``index`` of the tuple it returns), or ``"refused"``: logits it cannot
    give (``reason``), so that a call collecting them raises rather than hand the loss fewer layers' logits."""

    source: str
    index: int = 0
    reason: str = ""


def _collector():
    """transformers' context variable of the outputs being collected (None for a transformers without one)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector


def active_collection() -> dict[str, list] | None:
    """The outputs transformers is collecting in this context (None when it is not, or cannot say)."""
    collector = _collector()
    return None if collector is None else collector.get()


def recorded_targets(model: nn.Module) -> list[tuple[type | None, str | None, int, str | None]]:
    """(class, class-name suffix, index, layer name) of every module kind the model records router logits from."""
    out = []
    for m in model.modules():
        specs = (getattr(type(m), "_can_record_outputs", None) or {}).get(KEY)
        if specs is None:
            continue
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            if isinstance(spec, type):  # transformers' default index for a bare class or name: 1 (0: hidden states)
                out.append((spec, None, 1, None))
            elif isinstance(spec, str):
                out.append((None, spec, 1, None))
            else:  # an OutputRecorder
                out.append((getattr(spec, "target_class", None), getattr(spec, "class_name", None),
                            int(getattr(spec, "index", 0) or 0), getattr(spec, "layer_name", None)))
    return list(dict.fromkeys(out))  # a model and its base model often name the same


def _matches(name: str, module: nn.Module, target: tuple[type | None, str | None, int, str | None]) -> bool:
    cls, suffix, _, layer = target
    if not ((cls is not None and isinstance(module, cls)) or (suffix is not None and name.endswith(suffix))):
        return False
    return layer is None or f".{layer.strip('.')}." in f".{name}."


def read_router_record(model: nn.Module, path: str, block: nn.Module, hidden: int, router_weight: Tensor,
                       router_bias: Tensor | None, dtype: torch.dtype) -> RouterRecord | None:
    """How the swapped block at ``path`` (hidden size ``hidden``, inputs of ``dtype``; the compiled router's
    ``router_weight`` and ``router_bias``) gives transformers its router logits: None where the block records
    none, else a ``RouterRecord`` (``"refused"`` with the reason where it records logits the layer cannot give)."""
    found = list({id(m): (name, m, t) for t in recorded_targets(model) for name, m in block.named_modules()
                  if _matches(f"{path}.{name}" if name else path, m, t)}.values())
    if not found:
        return None
    if len(found) > 1:
        return RouterRecord("refused", reason=f"it records router logits from {len(found)} of its modules")
    name, module, (_, _, index, _) = found[0]
    if module is block:
        return RouterRecord("output", index)
    if _collector() is None:
        return RouterRecord("refused", reason="this transformers has no output collection to add router logits to")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, hidden, generator=g).to(device=router_weight.device, dtype=dtype)
    mode = module.training
    try:
        module.eval()  # (a router's training noise is not what it computes)
        with torch.no_grad():
            got = module(x)
        got = got[index] if isinstance(got, (tuple, list)) and index < len(got) else got
    except Exception as exc:  # noqa: BLE001 - the reason is reported
        return RouterRecord("refused", reason=f"its router module {name} did not run on hidden states alone "
                                              f"({type(exc).__name__}: {exc})")
    finally:
        module.train(mode)
    with torch.no_grad():
        want = F.linear(x.to(router_weight.dtype), router_weight, router_bias)
    # to the logits' scale, at the precision of the block's own (a bfloat16 router's differ from the compiled
    # float32 router's by bfloat16 rounding)
    tol = 1e-4 if not isinstance(got, Tensor) or got.dtype in (torch.float32, torch.float64) else 3e-2
    if not isinstance(got, Tensor) or got.shape != want.shape or \
            float((got.float() - want.float()).abs().max()) > tol * max(float(want.abs().max()), 1e-6):
        return RouterRecord("refused", reason=f"its router module {name} records logits other than a linear map of "
                                              "the hidden states (a norm, scale or network before it), which the "
                                              "swapped layer does not compute")
    return RouterRecord("router")


def record_router_logits(record: RouterRecord, logits: Any, output: Any, block: str) -> None:
    """Add the router logits of the swapped ``block`` (its class name) to transformers' active collection, if it
    is collecting them: ``logits()`` or the block's ``output``. With autograd on, ``logits()`` is computed either
    way, as the block's router computes them on every call: a forward recomputed under gradient checkpointing (no
    collection then) must save what the first one saved. A ``"refused"`` record raises while collecting."""
    collection = active_collection()
    collecting = collection is not None and KEY in collection
    if record.source == "refused":
        if collecting:
            raise InputError(f"output_router_logits=True: the moegraph layer that replaced {block} cannot give its "
                             f"router logits ({record.reason}); call without it, or optimize the model with its "
                             "config.output_router_logits set (such blocks are then left in place)")
        return
    if record.source == "router":
        value = logits() if collecting or torch.is_grad_enabled() else None
    else:
        value = output[record.index] if isinstance(output, tuple) else output
    if collecting and value is not None:
        collection[KEY].append(value)
