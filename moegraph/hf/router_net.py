"""A router that is a small network (Zaya's MLP router), read into the spec's ``router.mlp``.

Found by structure and checked numerically, with no class names: a child of the block (not the experts
or shared experts) holding a Linear from the block's width D and a last Linear to R >= E router
choices. Its layers are read in the order the child calls them (forward hooks on a copy, on random
tokens): a Linear is a ``linear`` layer, a module with one [width] weight and an epsilon an
``rms_norm``, a module without parameters whose function is a known plain activation an
``activation``. The last Linear is ``router.weight`` (its bias ``router.bias``). Where the child also
returns a router state (a [..., H] tensor equal to one layer's output) and the block's forward takes
more than the hidden states, that point is the network's ``state`` step; a [H] parameter the child
holds outside its layers is the scale of the previous layer's state added there (``receive``).
The network is then run on the same tokens from the spec's reading (``semantics.routing.router_network``)
and must give exactly what the child's last Linear saw; anything else is refused with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UnsupportedBlock
from ..semantics.routing import router_network
from .vocab import PLAIN_ACT


@dataclass(frozen=True)
class RouterNetwork:
    """A block's router network as the spec reads it. Paths are dotted, inside the block."""

    owner: str  # the block's child holding the network
    layers: tuple[dict[str, Any], ...]  # the spec's router.mlp
    params: tuple[tuple[str, str], ...]  # (name under the layer's router.mlp, e.g. "0.weight"; the block's path)
    weight_name: str  # the last Linear's weight: router.weight [R, H]
    bias_name: str | None
    state_returned: bool = False  # the block returns the router state beside its output


def _candidate(block: nn.Module, claimed: set[str], D: int, E: int) -> tuple[str, nn.Module] | None:
    for name, child in block.named_children():
        if name in claimed:
            continue
        lins = [m for m in child.modules() if isinstance(m, nn.Linear)]
        if any(m.in_features == D for m in lins) and any(m.out_features >= E and m.in_features != D for m in lins):
            return name, child
    return None


def read_router_network(block: nn.Module, claimed: set[str], D: int, E: int, cls: str,
                        tokens: int = 12) -> RouterNetwork | None:
    """The block's router network, or None when no child looks like one (see the module docstring)."""
    found = _candidate(block, claimed, D, E)
    if found is None:
        return None
    owner, child = found
    if any(t.is_meta for t in list(child.parameters()) + list(child.buffers())):
        raise UnsupportedBlock(f"its router {owner} is a small network, which can only be read from loaded weights "
                               "(not the meta device)", cls)
    net = copy.deepcopy(child).float().eval()
    names = {m: n for n, m in net.named_modules()}
    calls: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, a, o: calls.append((names[m], m, a[0], o)))
             for m in net.modules() if not list(m.children()) and m is not net]
    x = torch.randn(1, tokens, D, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as exc:  # reported as the reason
        raise UnsupportedBlock(f"its router {owner} looks like a small network but calling it on the hidden states "
                               f"failed ({type(exc).__name__}: {exc})", cls) from exc
    finally:
        for h in hooks:
            h.remove()
    if not calls or not isinstance(calls[-1][1], nn.Linear) or calls[-1][1].out_features < E:
        raise UnsupportedBlock(f"its router {owner} is a small network whose last step is not a Linear to the "
                               f"{E} experts' logits", cls)

    # Step 1: the layers in call order (the last Linear is router.weight).
    layers: list[dict[str, Any]] = []
    params: list[tuple[int, str, str]] = []  # (layer position, tensor name, path inside the child)
    from .anatomy import _norm_child, probe_activation  # (anatomy imports this module)

    for sub, mod, _, _ in calls[:-1]:
        weight = getattr(mod, "weight", None)
        eps = _norm_child(mod, weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 1 else None
        if isinstance(mod, nn.Linear):
            layers.append({"op": "linear", "size": mod.out_features, "bias": mod.bias is not None})
            params += [(len(layers) - 1, "weight", f"{sub}.weight")]
            params += [(len(layers) - 1, "bias", f"{sub}.bias")] if mod.bias is not None else []
        elif eps is not None:  # a norm module with one [width] weight, as the block reader takes one
            layers.append({"op": "rms_norm", "eps": eps})
            params.append((len(layers) - 1, "weight", f"{sub}.weight"))
        elif not list(mod.parameters(recurse=False)) and not list(mod.buffers()):
            fn = probe_activation(mod)
            if fn is None or fn not in PLAIN_ACT:
                raise UnsupportedBlock(f"its router network calls {sub} ({type(mod).__name__}), which is not a "
                                       "known activation (gelu, silu, relu, ...)", cls)
            layers.append({"op": "activation", "function": PLAIN_ACT[fn]})
        else:
            raise UnsupportedBlock(f"its router network calls {sub} ({type(mod).__name__}), which is neither a "
                                   "Linear, an RMS norm with one weight nor an activation", cls)

    # Step 2: a router state the child returns: equal to one step's output, which is where the state step goes.
    used = {p for _, _, p in params}
    extra = [o for o in (out[1:] if isinstance(out, tuple) else ()) if isinstance(o, Tensor) and o.dim() == 3
             and o.shape[-1] != calls[-1][1].out_features]
    state_after = None
    if extra:
        from .probe import forward_args

        hits = [i for i, (_, _, _, o) in enumerate(calls[:-1]) if o.shape == extra[0].shape
                and torch.allclose(o, extra[0], rtol=1e-6, atol=1e-7)]
        if not hits or not forward_args(block):
            raise UnsupportedBlock(f"its router {owner} returns a state {tuple(extra[0].shape)} that is "
                                   + ("no step's output" if not hits else "not passed back to the block")
                                   + "; the spec's router state is one step's output, passed between layers", cls)
        state_after = hits[0]
        width = extra[0].shape[-1]
        scales = [n for n, p in net.named_parameters() if n not in used and p.dim() == 1 and p.shape[0] == width
                  and not n.startswith(calls[-1][0] + ".")]
        if len(scales) > 1:
            raise UnsupportedBlock(f"its router holds several [{width}] parameters {scales} that could scale the "
                                   "previous layer's router state", cls)
        pos = state_after + 1
        layers.insert(pos, {"op": "state", "receive": bool(scales)})
        params = [(i + (i >= pos), t, p) for i, t, p in params] + ([(pos, "scale", scales[0])] if scales else [])

    # Step 3: the spec's reading must give what the last Linear saw.
    tensors = dict(net.named_parameters())
    per_layer: list[dict[str, Tensor]] = [{} for _ in layers]
    for i, t, p in params:
        per_layer[i][t] = tensors[p]
    with torch.no_grad():
        h, _ = router_network(x.view(tokens, D), layers, per_layer)
    seen = calls[-1][2].reshape(tokens, -1)
    if h.shape != seen.shape or not torch.allclose(h, seen, rtol=1e-5, atol=1e-6):
        raise UnsupportedBlock(f"its router {owner} is a small network ({', '.join(l['op'] for l in layers)}) that the "
                               "spec's router.mlp does not reproduce (a step between its modules, or a norm of "
                               "another form?)", cls)
    last = calls[-1][0]
    return RouterNetwork(
        owner=owner, layers=tuple(layers),
        params=tuple(sorted(((f"{i}.{t}", f"{owner}.{p}") for i, t, p in params))),
        weight_name=f"{owner}.{last}.weight", bias_name=f"{owner}.{last}.bias" if calls[-1][1].bias is not None else None,
        state_returned=state_after is not None,
    )


def network_params(root: nn.Module, net: RouterNetwork) -> list[dict[str, Tensor]]:
    """Each layer's tensors, taken from ``root`` (the block or a copy of it) by their paths."""
    from .anatomy import get_path

    per_layer: list[dict[str, Tensor]] = [{} for _ in net.layers]
    for ours, path in net.params:
        i, t = ours.split(".")
        per_layer[int(i)][t] = get_path(root, path)
    return per_layer
