"""A swapped model's state under the original block's names, both ways.

``moegraph.optimize`` puts a compiled layer where an MoE block was; the layer holds the block's weights in
its own layout (``experts.gate_up_proj`` stacked gate-then-up, routers renamed, listed MLPs stacked, ...).
Without more, ``model.state_dict()`` and ``save_pretrained`` would write the compiled names, so the
checkpoint would not load back into the original model (transformers re-initialises what it does not find),
and an original checkpoint would not load into the swapped model. ``OriginalNames`` keeps both directions:

- **to the original names** (``state_dict``): every weight of the compiled layer is a copy of original
  elements, one to one (a transpose, a slice, a concatenation, a stack; ``hf_weights`` builds it). Such a
  map is linear with a 0/1 matrix, so its transpose takes the compiled weights back to the original ones:
  the vector-Jacobian product of the weight map, evaluated on a skeleton of the block whose tensors are
  zeros (never materialised: stride-0 expansions), with the compiled weights as the cotangents. One
  mechanism serves every layout the readers know, with no inverse written per family.
- **from the original names** (``load_state_dict``): the forward map itself, ``hf_weights`` run on the
  skeleton filled with the loaded tensors.

FP8 bytes, which autograd does not carry, go through float32 leaves (which hold them exactly) wherever
the map does not tell FP8 experts by their dtype (a state dict then costs float32 copies of those bytes
for the time it is built, one block at a time); an integer table, or FP8 experts the map recognises by
their dtype, are read from the compiled layer where it holds them unchanged (shared weights). What is
left is kept from the block as it was: whole tensors the compiled layer has no use for (a statistic a
router keeps), and the values of elements a map leaves out (LongCat's rows of zero-computation experts).
A state dict follows the model's casts since the swap (``.to(dtype)``, ``.half()``) and its device.
Weights the compiled layer makes up (zero biases beside biased shared experts) have no original place:
they are left out of the state dict and frozen (``register``), so the model trains what the original
would. A map that copies one element twice cannot be inverted; the swap then keeps the compiled names
and says so (``Unmappable``).

What the original names cannot be: a swapped block's entries of ``state_dict(keep_vars=True)`` are
tensors built from the layer's weights, not its Parameters (except where the layer holds an original
tensor as it is: then the Parameter), and its keys are not those of ``named_parameters()``. Tools that
map state-dict keys to live Parameters (``torch.distributed.checkpoint``) should read the compiled
layer's own state dict.

The hooks: ``register`` adds a state-dict post-hook and a load pre-hook to the module that owns the
compiled layer (the block's adapter, or the host layer of an inline MoE), so the keys change at that
module's prefix, wherever the model sits in a larger one. A load without any of a block's tensors keeps
its weights and reports the original names missing.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..runtime import KEPT_FLOAT32

__all__ = ["OriginalNames", "Unmappable", "WeightMap"]

WeightMap = Callable[[nn.Module], dict[str, Tensor]]

#: dtypes autograd carries (others, FP8 bytes and integer tables, are kept: see the module docstring)
_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Unmappable(Exception):
    """The block's weight map is not a one-to-one copy of its elements (see the module docstring)."""


def _skeleton(block: nn.Module, names: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``block`` whose state-dict tensors are on the meta device (no storage is copied)."""
    memo: dict[int, Any] = {}
    for t in names.values():
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(block, memo)


def _leaves_reached(t: Tensor) -> list[Tensor]:
    """The autograd leaves ``t`` is computed from (``t`` itself if it is one)."""
    if t.grad_fn is None:
        return [t] if t.requires_grad else []
    found, seen, todo = [], set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            found.append(node.variable)
        todo.extend(n for n, _ in node.next_functions)
    return found


class OriginalNames:
    """Converts a compiled layer's state to the original block's names and back (module docstring).

    ``block``: the original block, before the swap (its tensors are read once, for what the map leaves
    out); ``weights_of``: the map from a block to the compiled layer's weights (``hf_weights`` and the FP8
    scales, or the structural reader's); ``layer_prefix``: the compiled layer's key prefix under the owner
    (``"moe."`` for an adapter); ``rename``: the original block's first name part -> the owner's child name
    (an inline MoE's router, experts and norms sit in their host under the host's names).
    """

    def __init__(self, block: nn.Module, weights_of: WeightMap, layer_prefix: str,
                 rename: Mapping[str, str] | None = None):
        self.weights_of = weights_of
        self.layer_prefix = layer_prefix
        self.rename = dict(rename or {})
        state = block.state_dict(keep_vars=True)
        self.skeleton = _skeleton(block, state)
        self.spec = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
        self.trainable = {n: bool(t.requires_grad) for n, t in state.items()}
        self.empty = {n for n, t in state.items() if t.numel() == 0}  # (a zero-width shared MLP's: nothing to train)
        #: original tensors the map takes no gradient through (integer tables, FP8 bytes, statistics it does not
        #: use), as they were; None where the compiled layer holds one unchanged (``passthrough``: read from it)
        self.kept: dict[str, Tensor | None] = {n: t.detach() for n, t in state.items() if t.dtype not in _GRAD_DTYPES}
        self.passthrough: dict[str, str] = {}  # kept original name -> the compiled name holding it as it is
        self.identity: dict[str, str] = {}  # original name -> the compiled weight that is it, element for element
        self.sources: dict[str, list[str]] = {}  # compiled name -> the original names it copies elements of
        #: original name -> (flat positions, values) of elements no compiled weight holds
        self.holes: dict[str, tuple[Tensor, Tensor]] = {}
        self.carried: set[str] = set()  # FP8 bytes the map copies whatever their dtype: through float32 leaves
        self.unread: set[str] = set()  # float tensors no compiled weight is made of (constants of the spec, unused)
        inputs, outs = self._traced()
        held = {n for n, t in self.kept.items() if any(out is t for out in outs.values())}  # taken as they are
        self.carried = {n for n, t in state.items() if t.is_floating_point() and t.dtype not in _GRAD_DTYPES} - held
        if self.carried:
            kept, self.kept = self.kept, {n: t for n, t in self.kept.items() if n not in self.carried}
            try:
                carried = self._traced()
                same = set(carried[1]) == set(outs)  # else the map told FP8 by their dtype
            except (RuntimeError, TypeError):  # an operation that needs their own dtype
                same = False
            if same:
                inputs, outs = carried
            else:
                self.kept, self.carried = kept, set()
        self.compiled = sorted(outs)
        self._find_coverage(state, inputs, outs)
        self.layer_dtypes: dict[str, torch.dtype] = {}  # the compiled layer's, when hooked (``register``)

    # -- the map on the skeleton ---------------------------------------------------------------------

    def _map(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``weights_of`` on the skeleton holding ``tensors`` (restored to meta afterwards)."""
        slots = []
        try:
            for name, t in tensors.items():
                mod_path, _, attr = name.rpartition(".")
                mod = self.skeleton.get_submodule(mod_path)
                table = mod._parameters if attr in mod._parameters else mod._buffers
                slots.append((table, attr, table[attr]))
                table[attr] = t
            return self.weights_of(self.skeleton)
        finally:
            for table, attr, old in slots:
                table[attr] = old

    def _inputs(self, compiled: Mapping[str, Tensor], device: torch.device,
                dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, Tensor]:
        """The map's inputs: zero leaves for the gradient map (stride 0: no storage; ``dtypes``, else the
        original's), and the kept tensors (those the compiled layer holds as they are, from ``compiled``)."""
        out = {}
        for name, (shape, dtype) in self.spec.items():
            if name in self.passthrough:  # (stride-0 zeros where only the shape matters)
                zeros = torch.zeros((), dtype=dtype, device=device).expand(shape)
                out[name] = compiled.get(self.passthrough[name], zeros)
            elif name in self.kept:
                out[name] = self.kept[name].to(device)
            else:
                dt = torch.float32 if name in self.carried else (dtypes or {}).get(name, dtype)
                out[name] = torch.zeros((), dtype=dt, device=device).expand(shape).requires_grad_()
        return out

    def _transpose(self, cotangents: Mapping[str, Tensor], device: torch.device,
                   dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, Tensor | None]:
        """The weight map's transpose applied to ``cotangents`` (compiled name -> tensor): original name ->
        tensor, None where no compiled weight reaches the original."""
        with torch.inference_mode(False), torch.enable_grad():  # a state dict taken under either still works
            inputs = self._inputs(cotangents, device, dtypes)
            leaves = {n: t for n, t in inputs.items() if n not in self.kept}
            outs = self._map(inputs)
            pairs = [(outs[k], cotangents[k]) for k in self.compiled if k in cotangents and outs[k].requires_grad]
            if not pairs or not leaves:
                return dict.fromkeys(leaves)
            grads = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), allow_unused=True,
                                        grad_outputs=[c.detach().to(o.dtype).reshape(o.shape) for o, c in pairs])
        return dict(zip(leaves, grads))

    def _traced(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The map's inputs (zero leaves, kept tensors) and its outputs, with their autograd graph, on the CPU."""
        with torch.inference_mode(False), torch.enable_grad():
            inputs = self._inputs({}, torch.device("cpu"))
            return inputs, self._map(inputs)

    def _find_coverage(self, state: Mapping[str, Tensor], inputs: Mapping[str, Tensor],
                       outs: Mapping[str, Tensor]) -> None:
        """How many times the map (``inputs`` -> ``outs``, ``_traced``) copies each original element: once
        everywhere, else kept (module docstring). A tensor the layer takes as it is (the usual case with shared
        weights) is counted from the graph alone; the others by the transpose of a map of ones (memory traffic of
        one copy of them, once per swap)."""
        leaves = {n: t for n, t in inputs.items() if n not in self.kept}
        name_of = {id(t): n for n, t in leaves.items()}
        users: dict[str, list[str]] = {n: [] for n in leaves}
        for k, out in outs.items():
            for leaf in _leaves_reached(out):
                if id(leaf) in name_of:
                    users[name_of[id(leaf)]].append(k)
                    self.sources.setdefault(k, []).append(name_of[id(leaf)])
            held = next((n for n, t in self.kept.items() if out is t), None)
            if held is not None:  # the compiled layer holds it unchanged: read from there, never stale
                self.passthrough[held] = k
        for name in self.passthrough:
            self.kept[name] = None
        counted = []
        for name, ks in users.items():
            if not ks:
                self.kept[name] = state[name].detach()
                self.unread.add(name)
            elif len(ks) > 1 or outs[ks[0]] is not leaves[name]:
                counted.append(name)
            else:
                self.identity[name] = ks[0]
        if not counted:
            return
        ones = {k: torch.ones((), dtype=outs[k].dtype).expand(outs[k].shape) for n in counted for k in users[n]}
        counts = self._transpose(ones, torch.device("cpu"))
        for name in counted:
            count = counts[name]
            if bool((count > 1).any()):
                raise Unmappable(f"the compiled layer holds elements of {name} more than once")
            left_out = (count == 0).reshape(-1)
            if bool(left_out.any()):
                where = left_out.nonzero().squeeze(1)
                self.holes[name] = (where, state[name].detach().reshape(-1)[where.to(state[name].device)].clone())

    # -- both directions -------------------------------------------------------------------------------

    @property
    def untrained(self) -> list[str]:
        """Trainable original tensors the compiled layer does not use (kept as they were): training the swapped
        model leaves them where they are."""
        return [n for n in sorted(self.unread) if self.trainable[n] and n not in self.empty]

    def _dtypes_now(self, compiled: Mapping[str, Tensor]) -> dict[str, torch.dtype]:
        """Each original tensor's dtype now: its own, unless the model was cast since the swap (``.to(dtype)``,
        ``.half()``): then that of the compiled weights it went into (kept floats, and those that went into the layer's
        float32 balancing state, ``KEPT_FLOAT32``, follow the experts' weights)."""
        cast = {k: t.dtype for k, t in compiled.items() if k in self.layer_dtypes and t.dtype != self.layer_dtypes[k]}
        into: dict[str, str] = {}
        for k, names in self.sources.items():
            for n in names:
                into.setdefault(n, k)
        experts = cast.get("experts.down_proj")
        out = {}
        for name, (_, dtype) in self.spec.items():
            if name in self.carried:  # FP8 bytes stay FP8 (a compiled FP8 layer keeps them so under .to(dtype))
                out[name] = dtype
            elif name in into and into[name] not in KEPT_FLOAT32:
                out[name] = cast.get(into[name], dtype)
            elif experts is not None and dtype.is_floating_point and dtype.itemsize > 1 and experts.itemsize > 1:
                out[name] = experts
            else:
                out[name] = dtype
        return out

    def to_original(self, compiled: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The compiled layer's weights (by its state-dict names) -> the original block's state (by its names)."""
        device = next(iter(compiled.values())).device if compiled else torch.device("cpu")
        dtypes = self._dtypes_now(compiled)
        back = self._transpose(compiled, device, dtypes)
        out: dict[str, Tensor] = {}
        for name in self.spec:
            if name in self.passthrough and self.passthrough[name] in compiled:
                out[name] = compiled[self.passthrough[name]]
            elif name in self.identity and self.identity[name] in compiled:  # (with keep_vars: the Parameter)
                out[name] = compiled[self.identity[name]].to(dtypes[name])
            elif name in self.kept:
                out[name] = self.kept[name].to(device=device, dtype=dtypes[name])
            else:  # (a slice's gradient is a strided view of the cotangent: contiguous, as safetensors writes them)
                out[name] = back[name].detach().to(dtypes[name]).contiguous()
            if name in self.holes:
                where, values = self.holes[name]
                out[name] = out[name].clone()
                out[name].view(-1)[where.to(device)] = values.to(device=device, dtype=out[name].dtype)
        return out

    def to_compiled(self, original: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The original block's state (by its names, every entry) -> the compiled layer's weights."""
        with torch.no_grad():
            return {k: v for k, v in self._map(original).items() if k in self.compiled}

    # -- hooks -----------------------------------------------------------------------------------------

    def _owner_name(self, name: str) -> str:
        head, dot, rest = name.partition(".")
        return self.rename.get(head, head) + dot + rest

    def _layer(self, owner: nn.Module) -> nn.Module:
        """The compiled layer ``owner`` holds at ``layer_prefix``."""
        return owner.get_submodule(self.layer_prefix.rstrip("."))

    def register(self, owner: nn.Module) -> None:
        """Hook ``owner`` (the module holding the compiled layer at ``layer_prefix``): its state dict uses the
        original names, and its load accepts them (the compiled names too). The layer's weights train as the
        original's did: those made of frozen tensors, or of none (zero biases it makes up), are frozen."""
        layer = self._layer(owner)
        state = layer.state_dict(keep_vars=True)
        self.layer_dtypes = {k: state[k].dtype for k in self.compiled if k in state}
        for name, p in layer.named_parameters():
            if name in self.compiled and p.is_floating_point():
                p.requires_grad_(any(self.trainable[n] for n in self.sources.get(name, ())))
        # (partials: the public registration marks the hook object, which a bound method cannot take)
        owner.register_state_dict_post_hook(partial(OriginalNames._state_dict_hook, self))
        owner.register_load_state_dict_pre_hook(partial(OriginalNames._load_hook, self))

    def _state_dict_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        head = prefix + self.layer_prefix
        compiled = {k: state_dict.pop(head + k) for k in self.compiled if head + k in state_dict}
        if compiled:  # else a state dict of a part of the model without the layer
            for name, t in self.to_original(compiled).items():
                state_dict[prefix + self._owner_name(name)] = t

    def _load_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                   strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        keys = {name: prefix + self._owner_name(name) for name in self.spec}
        given = {name: state_dict[key] for name, key in keys.items() if key in state_dict}
        head = prefix + self.layer_prefix
        if not given:
            if not any(head + k in state_dict for k in self.compiled):
                # Nothing of this block: it keeps its weights, and the keys reported missing are the original
                # names (the ones the model's state dict shows), not the compiled layer's.
                current = self._layer(module).state_dict()
                missing_keys.extend(keys.values())
                state_dict.update({head + k: current[k] for k in self.compiled if k in current})
            return  # else compiled names: loaded as they are
        if len(given) < len(keys):  # the rest from the layer's current weights
            current = module.state_dict(prefix="")  # through _state_dict_hook: original names
            missing_keys.extend(key for name, key in keys.items() if name not in given)
            given = {name: given.get(name, current[self._owner_name(name)]) for name in self.spec}
        for key in keys.values():
            state_dict.pop(key, None)
        changed = [n for n, t in self.kept.items() if n in self.unread and not torch.equal(
            given[n].detach().to(device=t.device, dtype=t.dtype), t)]
        if changed:
            warnings.warn(f"loading {', '.join(prefix + self._owner_name(n) for n in changed)}: the swapped layer does "
                          "not read it (a value the swap took as a constant of its spec, or one the block keeps "
                          "unused), and the checkpoint's differs from the one at the swap; if the block computes with "
                          "it, run moegraph.optimize on the model after loading", stacklevel=3)
        with torch.no_grad():  # in place, in the dtype and on the device they have
            for name, t in self.kept.items():
                if t is not None:
                    t.copy_(given[name])
            for name, (where, values) in self.holes.items():
                self.holes[name] = (where, given[name].detach().reshape(-1)[where.to(given[name].device)].to(values))
        for k, v in self.to_compiled(given).items():
            state_dict[head + k] = v
