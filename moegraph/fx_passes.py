"""The FX stage: trace a generated layer's ``core``, then run passes over it.

``Pipeline`` is that stage as one object. The compiler makes it (default passes, the user's
``passes=``, and stages it adds itself such as the expert-parallel rewrite) and attaches it to the
layer, whose ``graph()`` calls ``pipeline.build(layer, training)`` lazily per mode (the runtime
knows only the ``runtime.GraphPipeline`` interface). The pipeline keeps torch.fx's pass-manager
contract: each pass takes a GraphModule and returns a ``PassResult`` with a ``modified`` flag; the
pipeline lints and recompiles a modified graph centrally, names a failing pass in a
``CodegenError``, and reports which passes applied and which were skipped (``PassReport``).

Passes:
- ``DropTrainingOutputs`` (eval graphs): remove the auxiliary losses from the output and let dead
  code elimination delete the work that only fed them.
- ``UsePrepackedExperts`` (eval graphs, CPU float32 or bfloat16): switch the expert op to its variant with
  oneDNN-packed weights (see ``moegraph.ops._PackedExperts``).
- ``FoldSharedExperts``: ``expert_mlp(...) + shared_mlp(x)`` becomes one ``expert_mlp`` call that runs
  the shared experts inside the same op, accumulating into the routed output buffer (no separate
  output tensor and add). Skipped when the shared experts carry biases (the op has no shared bias).
- ``FuseRouterSelect`` (eval graphs, CPU): the router's expert choice (expert bias, group limit, top-k,
  gather of the chosen scores: a dozen small steps) becomes one ``runtime.route_select`` call, the
  native kernel where the choice is unique and the same torch steps where equal values decide it;
  bit for bit the graph's result, checked on the region itself before the swap.

``region_between``, ``region_module`` and ``swap_region`` are the pieces of such a swap (the Triton
backend's ``FuseRouter`` uses them too): find the nodes between an input and the anchors, run them
as a function of their own, replace them by one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import operator
from typing import Any
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import runtime
from .errors import CodegenError, MoegraphError
from .semantics.routing import TopKPolicy

__all__ = ["build_graph", "DropTrainingOutputs", "FoldSharedExperts", "FuseRouterSelect", "Pipeline", "PassReport",
           "UsePrepackedExperts", "default_passes", "region_between", "region_module", "swap_region", "trace_core"]


#: the grouped expert ops of every backend (``expert_mlp``'s signature)
EXPERT_OPS = frozenset({"moegraph::expert_mlp", "moegraph::expert_mlp_packed", "moegraph_triton::expert_mlp"})
#: the FP8 expert ops of every backend (``fp8.fp8_expert_mlp``'s signature: the routing weights are
#: the fourth argument and the up-projection weight the fifth, as for ``expert_mlp``)
FP8_EXPERT_OPS = frozenset({"moegraph::fp8_expert_mlp", "moegraph_triton::fp8_expert_mlp"})


def _op_name(node: fx.Node) -> str | None:
    """The qualified name (``namespace::op``) of a custom-op call, None for anything else."""
    if node.op != "call_function":
        return None
    t = node.target
    return getattr(t, "_qualified_op_name", None) or getattr(getattr(t, "_schema", None), "name", None)


def _is_expert_op(node: fx.Node) -> bool:
    return _op_name(node) in EXPERT_OPS


def _is_fp8_op(node: fx.Node) -> bool:
    return _op_name(node) in FP8_EXPERT_OPS


class DropTrainingOutputs(PassBase):
    """Eval graphs return no auxiliary losses; the nodes computing them become dead and go."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        y, aux, ids, *state = out.args[0]  # (a layer passing on router state returns it last)
        if not isinstance(aux, dict) or not aux:
            return PassResult(gm, False)
        out.args = ((y, {}, ids, *state),)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


class FoldSharedExperts(PassBase):
    """Run the shared experts inside the routed expert op (see module docstring)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for add in list(gm.graph.nodes):
            if add.op != "call_function" or add.target not in (torch.add, __import__("operator").add):
                continue
            if len(add.args) != 2 or add.kwargs:
                continue
            a, b = add.args
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            routed, shared = (a, b) if _is_expert_op(a) else (b, a)
            if not _is_expert_op(routed) or shared.op != "call_function" or shared.target is not runtime.shared_mlp:
                continue
            if len(routed.users) != 1 or len(shared.users) != 1:
                continue
            x, w_up, w_down, b_up, b_down, scale, act, gated, gclamp, uclamp = shared.args
            r_args = list(routed.args)
            if x is not r_args[0] or b_up is not None or b_down is not None:
                continue
            if act != r_args[8] or gated != r_args[9] or gclamp != r_args[10] or uclamp != r_args[11]:
                continue
            r_args[12:15] = [w_up, w_down, scale]
            with gm.graph.inserting_after(add):
                fused = gm.graph.call_function(routed.target, tuple(r_args))
            add.replace_all_uses_with(fused)
            gm.graph.erase_node(add)
            gm.graph.erase_node(routed)
            gm.graph.erase_node(shared)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


class UsePrepackedExperts(PassBase):
    """Eval graphs on CPU: run the expert op variant that keeps oneDNN-packed expert weights.

    A lowering by target substitution (``moegraph::expert_mlp`` -> ``moegraph::expert_mlp_packed``):
    same arguments, same result, faster small-row GEMMs, at the cost of a packed copy of the
    expert weights. Only CPU weights oneDNN can pack qualify (float32, and bfloat16 on CPUs with
    bfloat16 kernels); others are left alone.
    """

    def __init__(self, weights_supported: bool):
        super().__init__()
        self.weights_supported = weights_supported

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.weights_supported:
            return PassResult(gm, False)
        modified = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.ops.moegraph.expert_mlp,
                                                               torch.ops.moegraph.expert_mlp.default):
                node.target = torch.ops.moegraph.expert_mlp_packed.default
                modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def region_between(starts: Sequence[fx.Node], stop: fx.Node,
                   bias_target: str = "router.expert_bias") -> tuple[set[fx.Node], fx.Node | None, str | None]:
    """The nodes that compute ``starts`` from ``stop``: (region, the ``bias_target`` get_attr read or
    None, None), or (region so far, bias, why not) when the region reads anything else (another input,
    parameter or placeholder): a routing region must be a function of the scores (or logits) and bias."""
    region: set[fx.Node] = set()
    bias = None
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n is stop or n in region:
            continue
        if n.op == "get_attr" and n.target == bias_target:
            bias = n
            continue
        if n.op not in ("call_function", "call_method"):
            return region, bias, f"routing reads {n.op} {n.target}, not only {stop.name} and the expert bias"
        region.add(n)
        stack.extend(n.all_input_nodes)
    return region, bias, None


def region_module(owner: fx.GraphModule, region: set[fx.Node], inputs: Sequence[fx.Node],
                  outputs: Sequence[fx.Node]) -> fx.GraphModule:
    """``region`` copied into a graph of its own: a module taking ``inputs`` and returning ``outputs``
    (to run it beside a reference before a pass swaps it out)."""
    order = {n: i for i, n in enumerate(owner.graph.nodes)}
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: sub.placeholder(n.name) for n in inputs}
    for n in sorted(region, key=order.__getitem__):
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(owner, sub)


def swap_region(gm: fx.GraphModule, region: set[fx.Node], after: Sequence[fx.Node], target: Any, args: tuple,
                replaced: Sequence[fx.Node]) -> None:
    """Call ``target(*args)`` right after the last of ``after``; element i of its result takes over the
    uses of ``replaced[i]`` outside ``region``; then the region's nodes no one reads any more go."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_after(max(after, key=order.__getitem__)):
        call = graph.call_function(target, args)
    last = call
    for i, old in enumerate(replaced):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (call, i))
        old.replace_all_uses_with(last, delete_user_cb=lambda u: u not in region)
    for n in sorted(region, key=order.__getitem__, reverse=True):  # (in-place ops on fresh tensors too)
        if not n.users:
            graph.erase_node(n)


def _method_arg(n: Any, method: str) -> fx.Node | None:
    """``n.args[0]`` when ``n`` is a call of ``method``."""
    if isinstance(n, fx.Node) and n.op == "call_method" and n.target == method:
        return n.args[0]
    return None


class FuseRouterSelect(PassBase):
    """Eval graphs: the router's expert choice (expert bias, group limit, top-k, gather of the chosen
    scores) as one ``runtime.route_select`` call, the native kernel on CPU.
    What the choice is made on is whatever the gather reads: the scores, or with ``topk_then_score``
    the logits (the softmax over the chosen ones stays a torch step after the call).

    Anchors: the routing ids are what the graph returns as ids (a ``topk``'s indices); the chosen
    scores are their ``gather`` from the scores; the region between may read only the scores and
    ``router.expert_bias``. Before the swap the region runs beside the call's torch steps
    (``semantics.routing.select_experts``) on random scores and on scores full of equal values, and
    must agree exactly: the call falls back to those steps on ties, so the graph's result never
    changes. Otherwise (another routing, a region in another form) the pass leaves the graph alone
    and says why in ``refused``.
    """

    def __init__(self, policy: TopKPolicy | None, num_experts: int, verify_tokens: int = 64):
        super().__init__()
        self.policy = policy
        self.num_experts = num_experts
        self.verify_tokens = verify_tokens
        self.refused: str | None = None

    @classmethod
    def of_layer(cls, layer: nn.Module) -> FuseRouterSelect:
        """The pass for a generated layer, from its spec's router."""
        import json

        from .loader import load_spec

        with warnings.catch_warnings():  # the spec's warnings were given when it was loaded for the layer
            warnings.simplefilter("ignore")
            m = load_spec(json.loads(layer.SPEC_JSON)).moe
        # the choice is over every routing choice: the experts and any identity / zero experts beyond them
        return cls(TopKPolicy.of_router(m.router) if m.router.type == "topk" else None, m.experts.router_choices)

    def _refuse(self, gm: fx.GraphModule, why: str) -> PassResult:
        self.refused = why
        return PassResult(gm, False)

    def call(self, gm: fx.GraphModule) -> PassResult:
        from . import native

        self.refused = None
        p = self.policy
        if p is None:
            return self._refuse(gm, "the router is not a top-k router")
        if not native.select_supported(p.num_groups, p.group_score, p.top_n):
            return self._refuse(gm, f"groups scored by the sum of their top {p.top_n}: the kernel sums at most two")
        out = next(n for n in gm.graph.nodes if n.op == "output")
        ids_n = _method_arg(out.args[0][2], "view")
        gathers = [u for u in (ids_n.users if ids_n is not None else ()) if _method_arg(u, "gather") is not None
                   and u.args[1:] == (1, ids_n)]
        if len(gathers) != 1:
            return self._refuse(gm, "routing ids and the gather of their scores not in the generated form")
        gather_n = gathers[0]
        scores_n = gather_n.args[0]
        region, bias_n, why = region_between([ids_n, gather_n], scores_n)
        if why:
            return self._refuse(gm, why)
        inputs = [scores_n] + ([bias_n] if bias_n is not None else [])
        why = self._verify(region_module(gm, region, inputs, [ids_n, gather_n]), bias_n is not None, len(region))
        if why:
            return self._refuse(gm, why)
        swap_region(gm, region, inputs, runtime.route_select,
                    (scores_n, bias_n, p.top_k, p.num_groups, p.topk_groups, p.group_score, p.top_n), [ids_n, gather_n])
        return PassResult(gm, True)

    def _verify(self, fn: fx.GraphModule, has_bias: bool, size: int) -> str | None:
        """The region against ``select_experts`` on random scores and on scores with many equal values."""
        from .semantics.routing import select_experts

        g = torch.Generator().manual_seed(0)
        E = self.num_experts
        try:
            for quantized in (False, True):
                scores = torch.rand(self.verify_tokens, E, generator=g)
                if quantized:
                    scores = (scores * 4).round() / 4
                bias = (torch.rand(E, generator=g) * 0.25).round(decimals=1) if has_bias else None
                ids, chosen = fn(scores, bias) if has_bias else fn(scores)
                ref_ids, ref_chosen = select_experts(scores, self.policy, bias)
                if not (torch.equal(ids, ref_ids) and torch.equal(chosen, ref_chosen)):
                    return (f"the routing region ({size} nodes) chooses differently from the policy's steps"
                            + (" where scores are equal" if quantized else ""))
        except Exception as exc:  # a region that cannot run on the policy's shapes is not this policy's
            return f"the routing region does not run as the policy's steps ({type(exc).__name__}: {exc})"
        return None


def default_passes(training: bool, owner: nn.Module | None = None) -> list[PassBase]:
    passes: list[PassBase] = [] if training else [DropTrainingOutputs()]
    passes.append(FoldSharedExperts())
    if not training and owner is not None:
        from .ops import prepack_supported

        passes.append(UsePrepackedExperts(prepack_supported(owner.experts.down_proj)))
        if owner.experts.down_proj.device.type == "cpu" and hasattr(owner, "SPEC_JSON"):
            passes.append(FuseRouterSelect.of_layer(owner))
    return passes


class _Core(nn.Module):
    """Adapter whose forward is the owner's ``core``, sharing the owner's submodules."""

    def __init__(self, owner: nn.Module, training: bool):
        super().__init__()
        for name, child in owner.named_children():
            self.add_module(name, child)
        for name, buf in owner.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=False)
        self._core = type(owner).core
        self.router_state = bool(getattr(owner, "ROUTER_STATE", 0))
        self.train(training)

    def forward(self, x_BSD, token_ids_BS=None, router_state_BSH=None):
        if self.router_state:  # the core of a layer passing on router state takes the previous layer's
            return self._core(self, x_BSD, token_ids_BS, router_state_BSH)
        return self._core(self, x_BSD, token_ids_BS)


def trace_core(owner: nn.Module, training: bool) -> fx.GraphModule:
    """Symbolically trace the generated ``core`` of ``owner`` in the given mode."""
    adapter = _Core(owner, training)
    concrete: dict[str, Any] = {} if getattr(owner, "NEEDS_TOKEN_IDS", False) else {"token_ids_BS": None}
    if not getattr(owner, "RECEIVES_ROUTER_STATE", False):
        concrete["router_state_BSH"] = None
    graph = fx.Tracer().trace(adapter, concrete_args=concrete)
    gm = fx.GraphModule(adapter, graph, class_name=f"{type(owner).__name__}Graph")
    # GraphModule copies the tensors its get_attr nodes read into modules of its own: a parameter replaced by
    # another object afterwards (load_state_dict(assign=True), torch.func.functional_call, parametrize, plain
    # assignment) would go unseen, its output and gradient both. The graph reads the layer's own submodules.
    for name, child in owner.named_children():
        gm.add_module(name, child)
    gm.train(training)
    return gm


@dataclass
class PassReport:
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0


#: Makes a pass for one layer and mode (for passes that need the layer, e.g. its expert dispatch).
PassFactory = Callable[[nn.Module, bool], PassBase]


class Pipeline:
    """Trace, then run passes: the FX stage the compiler attaches to a layer (``runtime.GraphPipeline``).

    Args:
        passes: the passes to run instead of ``default_passes(training, layer)`` (both modes).
        late: factories of passes that run after those, made per layer and mode (``then``).
    """

    def __init__(self, passes: Sequence[PassBase] | None = None, late: Sequence[PassFactory] = ()):
        self.passes = list(passes) if passes is not None else None
        self.late = tuple(late)

    def then(self, factory: PassFactory) -> Pipeline:
        """This pipeline with one more pass at the end, made by ``factory(layer, training)``."""
        return Pipeline(self.passes, (*self.late, factory))

    def passes_for(self, layer: nn.Module, training: bool) -> list[PassBase]:
        base = self.passes if self.passes is not None else default_passes(training, layer)
        return [*base, *(make(layer, training) for make in self.late)]

    def build(self, layer: nn.Module, training: bool) -> tuple[fx.GraphModule, PassReport]:
        """Trace ``layer.core`` in the mode and run the passes; returns the graph and what each pass did."""
        return run_passes(trace_core(layer, training), self.passes_for(layer, training))


def run_passes(gm: fx.GraphModule, passes: Sequence[PassBase]) -> tuple[fx.GraphModule, PassReport]:
    """Run ``passes`` in order (torch.fx's PassManager contract, with a per-pass report)."""
    report = PassReport(nodes_before=len(gm.graph.nodes))
    for p in passes:
        name = type(p).__name__
        try:
            res = p(gm)
            if res is None or not isinstance(getattr(res, "graph_module", None), fx.GraphModule):
                raise TypeError(f"it returned {type(res).__name__}, not a PassResult holding a GraphModule")
            if res.modified:
                res.graph_module.graph.lint()
                res.graph_module.recompile()
        except MoegraphError:
            raise  # already says what went wrong and how to fix it
        except Exception as exc:
            raise CodegenError(f"FX pass {name} failed on {type(gm).__name__} after passes {report.applied}: "
                               f"{type(exc).__name__}: {exc}; drop or fix the pass (compile(..., passes=[...]))") from exc
        gm = res.graph_module
        (report.applied if res.modified else report.skipped).append(name)
    report.nodes_after = len(gm.graph.nodes)
    return gm, report


def build_graph(owner: nn.Module, training: bool, passes: list[PassBase] | None = None) -> tuple[fx.GraphModule, PassReport]:
    """Trace ``owner.core`` and run the pass pipeline; returns the graph and what each pass did."""
    return Pipeline(passes).build(owner, training)
