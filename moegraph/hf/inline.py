"""An MoE written inline in its host layer's forward (Gemma 4): found by watching one forward, read as a block.

Most families keep their MoE in a module of its own, which ``moegraph.optimize`` swaps. Some do not:
Gemma 4's decoder layer calls a router, a norm, the experts and another norm one after another in its
own forward, beside attention and a dense MLP, and adds the result to the dense MLP's. There is no
module to swap, and the host's forward cannot be read without running it (attention needs position
embeddings, a cache, masks). So the MoE is read from what the host's children do in one real forward:

1. Hooks on every direct child of each host record one forward of the whole model on a few tokens:
   what each child was called with and what it returned (tensors by identity and storage).
2. The MoE is the chain the record shows (``InlineChain``): a router child called with ``x`` that
   returns a tuple; an experts child called with the hidden states and two of the router's outputs
   (the chosen experts and their weights); optionally a norm child whose input is ``x`` and whose
   output the experts receive (else they receive ``x``); optionally a norm child whose input is the
   experts' output. Each is called exactly once per host forward, so no other part of the host can
   depend on them.
3. That chain, as a module of its own (``InlineMoE``: the host's own children, called as the host
   called them), is read like any block by ``from_hf`` (routing probed, compared numerically).

The swap (``moegraph.swap``) then computes the whole chain at the place the host calls the router, and
hands the result through the slot of the router's output that the experts receive; the pre-norm and
post-norm become identities and the experts return what they were handed. The host's forward is
unchanged, and the whole model is compared before and after (logits on the watched tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .anatomy import _experts_child, _norm_child


@dataclass(frozen=True)
class InlineChain:
    """Where the MoE sits in its host: child names and how the router's outputs reach the experts.

    ``expert_args``: the experts' positional arguments after the hidden states, each the index of the
    router output it is (the chosen experts and their weights, in the order the host passes them).
    """

    router: str  # the child whose returned tuple the experts receive (part of)
    experts: str
    pre_norm: str | None
    post_norm: str | None
    router_outputs: int  # the length of the router's returned tuple
    expert_args: tuple[int, ...]


class InlineMoE(nn.Module):
    """The MoE of a host layer as a block of its own: the host's children, called as the host calls them."""

    def __init__(self, host: nn.Module, chain: InlineChain):
        super().__init__()
        self.chain = chain
        self.router = getattr(host, chain.router)
        self.experts = getattr(host, chain.experts)
        if chain.pre_norm:
            self.pre_norm = getattr(host, chain.pre_norm)
        if chain.post_norm:
            self.post_norm = getattr(host, chain.post_norm)
        self.config = getattr(host, "config", None)

    def forward(self, hidden_states: Tensor) -> Tensor:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        routed = self.router(x_TD)
        h_TD = self.pre_norm(x_TD) if self.chain.pre_norm else x_TD
        y_TD = self.experts(h_TD, *(routed[i] for i in self.chain.expert_args))
        if self.chain.post_norm:
            y_TD = self.post_norm(y_TD)
        return y_TD.reshape(hidden_states.shape)


def inline_hosts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` whose own children are the experts and attention: decoder layers that may hold an
    MoE inline (Gemma 4), candidates to watch."""
    out = []
    for path, m in model.named_modules():
        found = _experts_child(m)
        if found is None or isinstance(m, nn.ModuleList) or found[0] not in dict(m.named_children()):
            continue
        if any("attention" in type(c).__name__.lower() for c in m.children()):
            out.append((path, m))
    return out


@dataclass
class _Call:
    args: tuple[Any, ...]
    output: Any


def _same(a: Any, b: Any) -> bool:
    """The same tensor, or a view of the same storage with as many elements (a reshape)."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return False
    return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype)


def _chain(host: nn.Module, calls: dict[str, list[_Call]], experts: str) -> InlineChain | str:
    """The chain the record of one host forward shows, or why there is none."""
    if len(calls.get(experts, [])) != 1:
        return f"its {experts} was called {len(calls.get(experts, []))} times in one forward (once expected)"
    e = calls[experts][0]
    if len(e.args) < 3:
        return (f"its {experts} is not called with the hidden states and the router's choices as positional "
                "arguments")
    router = next((n for n, c in calls.items() if n != experts and isinstance(c[0].output, tuple) and c[0].args
                   and all(any(o is a for o in c[0].output) for a in e.args[1:])), None)
    if router is None:
        return f"none of its children returns the chosen experts and weights its {experts} receive"
    if len(calls[router]) != 1:
        return f"its {router} was called {len(calls[router])} times in one forward (once expected)"
    once = [n for n, c in calls.items() if len(c) == 1 and n not in (router, experts)]
    r = calls[router][0]
    x = r.args[0]
    expert_args = tuple(next(i for i, o in enumerate(r.output) if o is a) for a in e.args[1:])
    h, y = e.args[0], e.output
    pre = None
    if not _same(h, x):
        pre = next((n for n in once if _same(calls[n][0].output, h) and calls[n][0].args
                    and _same(calls[n][0].args[0], x)), None)
        if pre is None:
            return f"its {experts} receive neither the {router}'s input nor a norm of it"
    post = next((n for n in once if n != pre and calls[n][0].args and _same(calls[n][0].args[0], y)), None)
    # A norm here is what the block reader takes for one (``anatomy._norm_child``: one [D] weight and an epsilon).
    D = x.shape[-1]
    if post is not None and _norm_child(getattr(host, post), D) is None:
        post = None  # the experts' output goes on to something else: the chain ends at the experts
    if pre is not None and _norm_child(getattr(host, pre), D) is None:
        return f"the experts' input comes from {pre}, which is not a norm"
    return InlineChain(router, experts, pre, post, len(r.output), expert_args)


def watch(model: nn.Module, hosts: list[tuple[str, nn.Module]], tokens: int = 8
          ) -> tuple[dict[str, InlineChain | str], Tensor | None, Tensor | None]:
    """Run ``model`` once on ``tokens`` random token ids with every host's children hooked.

    Returns each host's chain (or the reason there is none), the token ids and the logits (for the
    comparison after the swap; None where the model could not run).
    """
    vocab = _vocab(model)
    if vocab is None:
        return {p: "the model has no input embeddings to feed token ids through, so its forward cannot be watched"
                for p, _ in hosts}, None, None
    records: dict[str, dict[str, list[_Call]]] = {p: {} for p, _ in hosts}
    handles = []
    for path, host in hosts:
        for name, child in host.named_children():
            def hook(mod, args, output, *, _rec=records[path], _name=name):
                _rec.setdefault(_name, []).append(_Call(tuple(args), output))
            handles.append(child.register_forward_hook(hook))
    ids = torch.randint(3, max(vocab, 4), (1, tokens), generator=torch.Generator().manual_seed(7))
    ids = ids.to(_device(model))
    try:
        logits = run_seeded(model, ids)
    except Exception as exc:  # noqa: BLE001 - reported as the reason; nothing is swapped
        why = f"running the model to watch its MoE failed: {type(exc).__name__}: {exc}"
        return {p: why for p, _ in hosts}, None, None
    finally:
        for h in handles:
            h.remove()
    result: dict[str, InlineChain | str] = {}
    for path, host in hosts:
        ename = _experts_child(host)[0]
        result[path] = _chain(host, records[path], ename)
    return result, ids, logits


def run_seeded(model: nn.Module, ids: Tensor) -> Tensor:
    """The model's output on ``ids`` in eval mode, without gradients, with the random generators seeded the
    same on every call (a diffusion model draws noise in its forward) and the caller's generators untouched."""
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(0)
            return model_output(model(input_ids=ids))
    finally:
        model.train(was)


def model_output(out: Any) -> Tensor:
    """The tensor a model returns: its logits, else its first output (a base model's last hidden state)."""
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, Tensor) else (out if isinstance(out, Tensor) else out[0])


def _vocab(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
