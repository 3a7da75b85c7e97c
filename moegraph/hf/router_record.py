"""Router logits for transformers' output recording, from a swapped block.

transformers collects ``router_logits`` (the auxiliary load-balancing loss reads them with
``output_router_logits=True``, from the config or the call) by forward hooks on the modules its model
class names in ``_can_record_outputs``: the router inside each MoE block (``MixtralTopKRouter``, index 0 of
its output), or the block itself (Ernie 4.5 VL, index 1). A swapped block runs neither, so the loss found
no logits and the forward failed. Here a block's recorded module is found and compared, on random inputs,
with the logits the swapped layer can give (its router's linear map of the hidden states, or the block's
own output position, which the adapter reproduces), and the shape they are recorded in ([tokens, E], or
[B, S, E] where the block hands its router [B, S, D], as Switch Transformers does) is read by running the
block once (only for a router that keeps its input's shape); where they agree the adapter appends them to
the active collection itself, where transformers' hook would have, in the same order. The collection is
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
    #: the recorded logits keep the block input's leading dims ([B, S, E]: Switch Transformers' router, called on
    #: [B, S, D], and its z-loss unpacks three), rather than [tokens, E]
    keep_shape: bool = False


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
    try:
        got = _run(module, x, index)
    except Exception as exc:  # noqa: BLE001 - the reason is reported
        return RouterRecord("refused", reason=f"its router module {name} did not run on hidden states alone "
                                              f"({type(exc).__name__}: {exc})")
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
    keep = _keeps_shape(block, module, index, x[:6].reshape(2, 3, hidden), name)
    if isinstance(keep, str):
        return RouterRecord("refused", reason=keep)
    return RouterRecord("router", keep_shape=keep)


def _run(module: nn.Module, x: Tensor, index: int, **kwargs: Any) -> Any:
    """``module(x)`` in eval mode (a router's training noise is not what it computes), output ``index``."""
    mode = module.training
    try:
        module.eval()
        with torch.no_grad():
            got = module(x, **kwargs)
    finally:
        module.train(mode)
    return got[index] if isinstance(got, (tuple, list)) and index < len(got) else got


def _keeps_shape(block: nn.Module, module: nn.Module, index: int, x_BSD: Tensor, name: str) -> bool | str:
    """Whether the logits ``module`` records for a [B, S, D] block input are [B, S, E] (True) or [tokens, E];
    a string says why that could not be told. A router that flattens what it is given records [tokens, E]; one
    that keeps its input's shape records what the block hands it ([B, S, D] in Switch Transformers, rows in
    Llama 4), seen by a hook while the block runs."""
    try:
        if _run(module, x_BSD, index).dim() == 2:
            return False
    except Exception:  # noqa: BLE001 - a router of rows only: it records rows
        return False
    from .probe import token_id_arg, token_vocab

    seen: list[int] = []

    def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
        out = out[index] if isinstance(out, (tuple, list)) and index < len(out) else out
        seen.append(out.dim() if isinstance(out, Tensor) else -1)

    arg = token_id_arg(block)
    g = torch.Generator().manual_seed(0)  # (never the global generator: optimize draws no numbers of the user's)
    kwargs = {}
    if arg:
        kwargs[arg] = torch.randint(0, token_vocab(block), x_BSD.shape[:-1], generator=g).to(x_BSD.device)
    handle = module.register_forward_hook(hook)
    try:
        _run(block, x_BSD, 0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the reason is reported
        return (f"its router module {name} keeps the shape of its input, and the block did not run on [B, S, D] "
                f"hidden states to show which it hands it ({type(exc).__name__}: {exc})")
    finally:
        handle.remove()
    if seen not in ([2], [3]):
        return f"its router module {name} was called {len(seen)} times per block call, not once with hidden states"
    return seen[0] == 3


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
