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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import runtime
from .errors import CodegenError, MoegraphError

__all__ = ["build_graph", "DropTrainingOutputs", "FoldSharedExperts", "Pipeline", "PassReport", "UsePrepackedExperts",
           "default_passes", "trace_core"]


def _is_expert_op(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    t = node.target
    names = {"moegraph::expert_mlp", "moegraph::expert_mlp_packed", "moegraph_triton::expert_mlp"}
    name = getattr(t, "_qualified_op_name", None) or getattr(getattr(t, "_schema", None), "name", None)
    return name in names


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


def default_passes(training: bool, owner: nn.Module | None = None) -> list[PassBase]:
    passes: list[PassBase] = [] if training else [DropTrainingOutputs()]
    passes.append(FoldSharedExperts())
    if not training and owner is not None:
        from .ops import prepack_supported

        passes.append(UsePrepackedExperts(prepack_supported(owner.experts.down_proj)))
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
