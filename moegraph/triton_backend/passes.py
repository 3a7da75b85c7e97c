"""FX passes of the Triton backend.

``FuseRouter(spec)`` replaces the torch routing subgraph of a generated top-k layer (score function,
expert bias, group limit, top-k, normalise, scale) with one ``moegraph_triton::route_topk`` call.

How the subgraph is found, and why the swap is explained rather than guessed:
- anchors: the router logits are the ``linear`` on ``router.weight``; the weights are what
  ``expert_mlp``'s weight argument reshapes (or, for input-scaled experts, what it takes ones of);
  the ids are what the graph returns as routing ids;
- the region is every node between the logits and those two anchors; it may read nothing but the
  logits and ``router.expert_bias`` (no other inputs, parameters or placeholders);
- the region is copied into a small graph and run on random logits (and bias) next to the router
  kernel's torch reference for the spec's policy; ids and weights must agree exactly (ids) and to
  rounding (weights). Otherwise the pass refuses and says why in ``refused``.
Nodes of the region still used elsewhere (the scores feeding auxiliary losses in training) stay.

``EvalOnly(pass)`` runs a pass on eval graphs only; ``triton_passes(spec)`` is the pass list for a
Triton layer: ``moegraph.compile(spec, backend="triton", passes=triton_passes(spec))``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..fx_passes import (
    DropTrainingOutputs,
    FoldSharedExperts,
    _is_expert_op,
    _is_fp8_op,
    _method_arg,
    region_between,
    region_module,
    swap_region,
)
from ..loader import load_spec
from ..semantics.routing import TopKPolicy, route_topk
from ..spec import MoESpec
from . import ops as triton_ops  # noqa: F401  (registers torch.ops.moegraph_triton)
from .kernels import router_supported

__all__ = ["FuseRouter", "EvalOnly", "triton_passes", "router_args"]


def router_args(spec: MoESpec) -> tuple[Any, ...] | None:
    """The policy arguments of ``route_topk`` for a spec (after logits and bias), None if not top-k."""
    r = spec.moe.router
    return TopKPolicy.of_router(r).positional() if r.type == "topk" else None


def _is_routed_op(n: fx.Node) -> bool:
    """An op that takes the routing weights as its fourth argument: ``expert_mlp`` or its FP8 form (the
    router's anchors are the same, but FP8 ops have another signature: FoldSharedExperts leaves them alone)."""
    return _is_expert_op(n) or _is_fp8_op(n)


#: TopKRouter fields (with their off value) the router kernel has no step for: such routing stays torch code
TORCH_ONLY_ROUTER_FIELDS = {"input_norm": None, "learned_logit_scale": False, "logit_softcap": None,
                            "sparsemixer": None, "per_expert_scale": False, "mlp": (), "learned_weight_scale": False}


def torch_only_routing(spec: MoESpec) -> list[str]:
    """The spec's router settings the router kernel does not run (the layer keeps its torch routing for them)."""
    r = spec.moe.router
    on = [k for k, off in TORCH_ONLY_ROUTER_FIELDS.items() if getattr(r, k, off) != off]
    if getattr(getattr(r, "expert_bias", None), "applies_to", "scores") == "logits":
        on.append("expert_bias.applies_to: logits")
    return on


def _is_linear(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (torch._C._nn.linear, torch.nn.functional.linear)


class EvalOnly(PassBase):
    """Run the wrapped pass on eval graphs only (training graphs pass through unchanged)."""

    def __init__(self, inner: PassBase):
        super().__init__()
        self.inner = inner

    def call(self, gm: fx.GraphModule) -> PassResult:
        if gm.training:
            return PassResult(gm, False)
        return self.inner(gm)


class FuseRouter(PassBase):
    """Swap the torch top-k routing for the router kernel (see module docstring)."""

    def __init__(self, spec: MoESpec, verify_tokens: int = 64):
        super().__init__()
        self.spec = spec
        self.args = router_args(spec)
        self.verify_tokens = verify_tokens
        self.refused: str | None = None

    @classmethod
    def for_layer(cls, layer: torch.nn.Module, **kwargs: Any) -> FuseRouter:
        """The pass for a compiled layer, from the spec it was generated from."""
        import json

        return cls(load_spec(json.loads(layer.SPEC_JSON)), **kwargs)

    def _refuse(self, gm: fx.GraphModule, why: str) -> PassResult:
        self.refused = why
        return PassResult(gm, False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.refused = None
        if self.args is None:
            return self._refuse(gm, f"router type '{self.spec.moe.router.type}' is not top-k")
        if self.spec.moe.shared_experts.gate == "router":  # the routing stays torch code in the layer
            return self._refuse(gm, "the shared experts' router rows join the chosen experts' weights "
                                    "(shared_experts.gate: router), which the router kernel does not compute")
        torch_only = torch_only_routing(self.spec)
        if torch_only:
            return self._refuse(gm, f"the router kernel has no step for router {', '.join(torch_only)}; the layer's "
                                    "torch routing runs instead")
        E = self.spec.moe.experts.num_experts
        why = router_supported(E, self.args[0], self.args[1])
        if why:
            return self._refuse(gm, why)
        graph = gm.graph
        # Step 1: anchors.
        expert = [n for n in graph.nodes if _is_routed_op(n)]
        logits = [n for n in graph.nodes if _is_linear(n) and isinstance(n.args[1], fx.Node)
                  and n.args[1].op == "get_attr" and n.args[1].target == "router.weight"]
        if len(expert) != 1 or len(logits) != 1:
            return self._refuse(gm, "expected one expert op and one router linear")
        logits_n = logits[0]
        w_arg = expert[0].args[3]
        if isinstance(w_arg, fx.Node) and w_arg.op == "call_function" and w_arg.target is torch.ones_like:
            w_arg = w_arg.args[0]  # input-scaled experts: the op gets ones, the weights scale its input rows
        weights_n = _method_arg(_method_arg(w_arg, "to"), "reshape")
        out = next(n for n in graph.nodes if n.op == "output")
        ids_n = _method_arg(out.args[0][2], "view")
        if weights_n is None or ids_n is None:
            return self._refuse(gm, "routing weights or ids not in the generated form")
        # Step 2: the region between the logits and the anchors, and what it reads.
        region, bias_n, why = region_between([weights_n, ids_n], logits_n)
        if why:
            return self._refuse(gm, why)
        if (bias_n is not None) != (self.spec.moe.router.expert_bias is not None):
            return self._refuse(gm, "expert bias use in the graph does not match the spec")
        # Step 3: check the region computes the spec's policy.
        inputs = [logits_n] + ([bias_n] if bias_n is not None else [])
        mismatch = self._verify(region_module(gm, region, inputs, [ids_n, weights_n]), bias_n is not None)
        if mismatch:
            return self._refuse(gm, mismatch)
        # Step 4: one route_topk call right after its inputs; outside users move to it, and what no one
        # reads any more goes.
        swap_region(gm, region, inputs, torch.ops.moegraph_triton.route_topk.default, (logits_n, bias_n, *self.args),
                    [ids_n, weights_n])
        return PassResult(gm, True)

    def _verify(self, fn: fx.GraphModule, has_bias: bool) -> str | None:
        """Run the region on random logits next to the torch reference of the spec's policy."""
        E = self.spec.moe.experts.num_experts
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(self.verify_tokens, E, generator=g, dtype=torch.float64) * 2
        bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.5 if has_bias else None
        ids, w = fn(logits, bias) if has_bias else fn(logits)
        ref_ids, ref_w = route_topk(logits, TopKPolicy(*self.args), bias)
        if not torch.equal(ids, ref_ids):
            return "the routing subgraph picks other experts than the spec's policy"
        if not torch.allclose(w, ref_w, rtol=1e-9, atol=1e-12):
            return "the routing subgraph weighs experts differently from the spec's policy"
        return None


def triton_passes(spec: MoESpec) -> list[PassBase]:
    """The default passes plus ``FuseRouter``, for ``moegraph.compile(..., passes=...)``."""
    return [EvalOnly(DropTrainingOutputs()), FoldSharedExperts(), FuseRouter(spec)]
