"""``ExpertParallelMoE``: the compiled layer with its routed experts spread over ranks by a plan.

``ExpertParallelMoE.create(layer_cls, spec, plan, ...)`` (what ``moegraph.compile(spec, plan=...)``
calls on an initialised process group) builds a subclass of the generated single-process class
that

- allocates only this rank's plan slots (``experts.*`` are [slots_per_gpu, ...], replicas included);
- runs the generated ``core`` unchanged up to the expert step; an FX pass (``ExpertParallelPass``,
  which the compiler adds at the end of the layer's pass pipeline) swaps its ``expert_mlp`` call for
  ``ExpertDispatch`` (dispatch -> local grouped op -> combine);
- keeps the router and shared experts data-parallel (every rank holds them, for its own tokens).

Every check that can fail for a bad input (plan for another spec, plan for another world size,
layer index out of range, wrong device for the backend) runs before any communication. Then one
handshake (an all-gather of a plan fingerprint) makes sure every rank runs the same placement.

Collective methods (every rank must call them, in the same order): ``forward`` and ``backward``,
``sync_grads``, ``update_expert_bias``, ``full_state_dict``, ``apply_plan`` (live migration to a new
plan, ``migrate``), ``moegraph.distributed.gather_trace``.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import fp8
from ..errors import DistributedError, PlanFileError, is_number, short_repr
from ..fx_passes import Pipeline, _is_expert_op, _is_fp8_op
from ..runtime import CompiledMoEBase, init_value, per_expert_norm
from .comm import Comm, Traffic
from .dispatch import ExpertDispatch
from .weights import SlotExperts, load_checkpoint

__all__ = ["ExpertParallelMoE", "ExpertParallelPass"]


class ExpertParallelPass(PassBase):
    """Replace the graph's ``expert_mlp`` call by the layer's ``ExpertDispatch`` (same arguments)."""

    def __init__(self, dispatch: ExpertDispatch):
        super().__init__()
        self.dispatch = dispatch

    @classmethod
    def of(cls, layer: ExpertParallelMoE, training: bool) -> ExpertParallelPass:
        """The pass for ``layer`` (a ``fx_passes.Pipeline`` factory): it swaps in the layer's own dispatch."""
        return cls(layer.ep_dispatch)

    def call(self, gm: fx.GraphModule) -> PassResult:
        # The routed experts' call: the one whose weights are the ``experts.*`` parameters. Another
        # expert-op call (shared experts routed with them, ``shared_experts.gate: router``) runs the
        # data-parallel shared weights and stays local.
        nodes = [n for n in gm.graph.nodes if (_is_expert_op(n) or _is_fp8_op(n)) and _reads_routed_experts(n)]
        if len(nodes) != 1:
            raise DistributedError(
                f"expert parallelism needs exactly one expert_mlp call on the routed experts in the layer graph, "
                f"found {len(nodes)}; a custom FX pass removed or duplicated it"
            )
        node = nodes[0]
        self.dispatch.expert_op = node.target
        gm.add_submodule("ep_dispatch", self.dispatch)
        # A norm with a weight per expert (experts.output_norm.per_expert) of the op's rows: it runs inside the
        # dispatch, on the rank that holds each expert's slot of the weight, before the combine.
        norms = [u for u in node.users if u.op == "call_function" and u.target is per_expert_norm]
        kwargs = dict(node.kwargs)
        if norms:
            norm = norms[0]
            if len(node.users) != 1 or norm.args[0] is not node or norm.args[1] is not node.args[2]:
                raise DistributedError("expert parallelism runs the norm per expert inside the dispatch, but in the "
                                       "layer graph it does not take the routed expert op's rows and expert ids "
                                       "alone; a custom FX pass changed them")
            kwargs["norm_weight_SM"] = norm.args[2]
            self.dispatch.output_norm = tuple(norm.args[3:6])
        with gm.graph.inserting_after(norms[0] if norms else node):
            if _is_fp8_op(node):  # FP8 experts: the dispatch's FP8 entry (same arguments as the op)
                gm.add_submodule("ep_dispatch_fp8", _FP8Entry(self.dispatch))
                new = gm.graph.call_module("ep_dispatch_fp8", node.args, node.kwargs)
            else:
                new = gm.graph.call_module("ep_dispatch", node.args, kwargs)
        for old in (*norms, node):
            old.replace_all_uses_with(new)
            gm.graph.erase_node(old)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


class _FP8Entry(torch.nn.Module):
    """Calls ``ExpertDispatch.forward_fp8`` (the dispatch stays registered once, as ``ep_dispatch``)."""

    def __init__(self, dispatch: ExpertDispatch):
        super().__init__()
        self.__dict__["dispatch"] = dispatch

    def forward(self, *args):
        return self.dispatch.forward_fp8(*args)


def _reads_routed_experts(node: fx.Node) -> bool:
    """Whether the op's up-projection weight (argument 4 of both expert ops) comes from ``experts.*``."""
    todo, seen = [node.args[4]] if len(node.args) > 4 else [], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            if str(n.target).startswith("experts."):
                return True
            continue
        todo.extend(n.all_input_nodes)  # a cast or view of the parameter
    return False


def _fingerprint(spec_hash: str, plan, layer_index: int) -> int:
    h = hashlib.sha256()
    h.update(spec_hash.encode())
    h.update(str(layer_index).encode())
    h.update(np.ascontiguousarray(plan.physical_to_logical_map[layer_index], np.int64).tobytes())
    return int.from_bytes(h.digest()[:7], "little")


def _load_plan(plan, spec):
    from ..planner import Plan
    from ..planner.planfile import check_made_for

    if isinstance(plan, (str, Path)):
        return Plan.load(plan, spec=spec)
    if not isinstance(plan, Plan):
        raise PlanFileError(f"plan must be a moegraph Plan or a plan file path, got {type(plan).__name__}")
    check_made_for(plan.spec, spec, "plan")
    return plan


class ExpertParallelMoE(CompiledMoEBase):
    """Base of expert-parallel layers; build one with ``create`` (or ``moegraph.compile(spec, plan=...)``).

    Attributes: ``plan``, ``layer_index``, ``rank``, ``world_size``, ``slot_experts`` (logical expert
    of each local slot), ``traffic`` (a ``Traffic``: bytes per destination and time per phase).
    State-dict keys are documented in ``moegraph.distributed.weights``.
    """

    _classes: ClassVar[dict[type, type]] = {}  # generated class -> its expert-parallel subclass

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, layer_cls: type, spec, plan, *, process_group=None, layer_index: int = 0,
               timeout: float | None = None, dtype: torch.dtype = torch.float32,
               router_dtype: torch.dtype = torch.float32, device=None, passes=None,
               seed: int | None = 0, pipeline: Pipeline | None = None) -> ExpertParallelMoE:
        """The expert-parallel layer of ``spec`` for this rank under ``plan`` (see the module docstring).

        Args:
            layer_cls: the generated single-process class (``codegen.layer_class``).
            plan: a ``Plan`` or plan file path made for ``spec``; its GPUs are the group's ranks.
            process_group: default: the default group.
            layer_index: which MoE layer of the plan this layer is (0-based among MoE layers).
            timeout: seconds a collective waits for peers before raising ``DistributedError``
                (default: the process group's timeout).
            seed: deterministic init equal to the single-process layer's with the same seed
                (generates one expert at a time); None leaves weights uninitialised (load a checkpoint).
            passes, pipeline: the FX passes (default: the usual ones), or the whole pipeline to
                build graphs with; it must end with ``ExpertParallelPass`` (``compile`` makes it so).
        """
        # Step 1: checks on local inputs only, so that a bad input fails before any communication.
        plan = _load_plan(plan, spec)
        if layer_cls.SPEC_HASH != spec.hash():
            raise PlanFileError(f"layer class was generated for spec hash {layer_cls.SPEC_HASH[:12]}, not "
                                f"{spec.short_hash}; regenerate it")
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("expert parallelism needs an initialised torch.distributed process group: call "
                                   "torch.distributed.init_process_group (torchrun sets its environment up)")
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        if rank < 0:
            raise DistributedError("this process is not a member of the given process_group")
        if plan.num_gpus != world:
            raise DistributedError(
                f"plan is for {plan.num_gpus} GPUs (topology of spec '{spec.name}') but the process group has {world} "
                f"ranks; launch {plan.num_gpus} processes (torchrun --nproc-per-node {plan.num_gpus}) or re-plan for "
                f"{world} GPUs (set the spec's topology)"
            )
        if not 0 <= layer_index < plan.num_layers:
            raise DistributedError(f"layer_index {layer_index} is outside the plan's {plan.num_layers} MoE layers "
                                   f"(0..{plan.num_layers - 1})")
        backend = str(dist.get_backend(process_group))
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        device = torch.device(device)
        if backend == "nccl" and device.type != "cuda":
            raise DistributedError(f"the NCCL backend moves CUDA tensors only, but device is {device}; pass "
                                   "device='cuda:<local rank>' or use the gloo backend on CPU")
        if timeout is not None and not (is_number(timeout) and timeout > 0):
            raise DistributedError(f"timeout must be a positive number of seconds, got {short_repr(timeout)}")
        ep_cls = cls._classes.get(layer_cls)
        if ep_cls is None:
            ep_cls = type(f"{layer_cls.__name__}ExpertParallel", (cls, layer_cls), {"__module__": cls.__module__})
            cls._classes[layer_cls] = ep_cls
        comm = Comm(process_group, timeout, label=f"{layer_cls.__name__} (MoE layer {layer_index})")
        if pipeline is None:
            pipeline = Pipeline(passes).then(ExpertParallelPass.of)
        layer = ep_cls(plan=plan, layer_index=layer_index, comm=comm, dtype=dtype, router_dtype=router_dtype,
                       device=device, pipeline=pipeline, seed=seed)
        # Step 2: every rank must run the same placement.
        layer._handshake(_fingerprint(spec.hash(), plan, layer_index))
        layer.graph()  # built now: torch.compile cannot build it while tracing the forward
        return layer

    def __init__(self, *, plan, layer_index: int, comm: Comm, dtype, router_dtype, device, pipeline, seed):
        S = plan.slots_per_gpu
        self.__dict__["_ep_rows"] = S  # read by _expert_rows() inside the base __init__
        super().__init__(dtype=dtype, router_dtype=router_dtype, device=device, pipeline=pipeline, seed=None)
        rank = comm.rank
        slot_experts = plan.physical_to_logical_map[layer_index, rank * S : (rank + 1) * S].tolist()
        self.experts = SlotExperts.adopt(self.experts, slot_experts, rank * S, self.NUM_EXPERTS, rank)
        self.__dict__.update(plan=plan, layer_index=layer_index, rank=rank, world_size=comm.world_size, comm=comm,
                             slot_experts=slot_experts, traffic=Traffic(comm.world_size, rank))
        self.ep_dispatch = ExpertDispatch(plan, layer_index, comm, self.traffic, device)
        if seed is not None:
            self.reset_parameters(seed)

    def _expert_rows(self) -> int:
        return self.__dict__["_ep_rows"]

    def _handshake(self, fingerprint: int) -> None:
        t = torch.tensor([fingerprint], dtype=torch.int64, device=self.experts.down_proj.device)
        got = [int(x) for x in torch.cat(self.comm.all_gather(t, "plan handshake")).tolist()]
        if len(set(got)) != 1:
            differ = [r for r, f in enumerate(got) if f != got[self.rank]]
            raise DistributedError(
                f"rank {self.rank}: ranks {differ} run a different plan, spec or layer_index for this layer; every "
                "rank must load the same plan file and spec"
            )

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}/{self.world_size}, layer_index={self.layer_index}, "
                f"slot_experts={self.slot_experts}")

    # ------------------------------------------------------------------ parameters

    def reset_parameters(self, seed: int = 0) -> None:
        """The single-process init (same seed, same values) restricted to this rank's slots.

        Expert tensors are generated one expert at a time, so memory stays at one expert.
        """
        g = torch.Generator().manual_seed(seed)
        E = self.NUM_EXPERTS
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                    continue
                if name.endswith("_scale_inv"):  # set with its FP8 weight (runtime.reset_parameters)
                    continue
                start = init_value(self, name)
                if start is not None:  # as runtime.reset_parameters
                    p.fill_(start)
                    continue
                bound = 1.0 / math.sqrt(p.shape[-1])
                store = (lambda w, name=name: fp8.store(self, name, w)) if fp8.is_fp8(p) else p.copy_
                if not name.startswith("experts."):
                    store((torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound)
                    continue
                rows = {}
                wanted = set(self.slot_experts)
                for e in range(E):
                    r = (torch.rand(p.shape[1:], generator=g, dtype=torch.float32) * 2 - 1) * bound
                    if e in wanted:
                        rows[e] = r
                store(torch.stack([rows[e] for e in self.slot_experts]))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; with ``strict=True`` a missing expert raises ``MissingExpertWeights``
        naming it and the checkpoint forms read, with ``strict=False`` its keys are listed in ``missing_keys``."""
        self.experts.strict_load = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self.experts.strict_load = None

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> ExpertParallelMoE:
        """Load a single-process checkpoint file (``.safetensors`` read lazily: own experts only)."""
        return load_checkpoint(self, path, strict=strict)

    def full_state_dict(self) -> OrderedDict:
        """The single-process state dict (fused expert tensors), gathered from every rank. Collective.

        A replicated expert is taken from its first replica (replicas stay equal when gradients go
        through ``sync_grads``).
        """
        S = self.plan.slots_per_gpu
        first = [slots[0] for slots in self.plan.logical_to_physical_map[self.layer_index]]
        out: OrderedDict = OrderedDict()
        for k, v in self.state_dict().items():
            if not k.startswith("experts.slots."):
                out[k] = v
                continue
            name = k[len("experts.slots."):]
            if name not in self.experts._parameters:
                continue
            phys = torch.cat(self.comm.all_gather(v, f"full_state_dict ({name})"))
            assert phys.shape[0] == S * self.world_size, "internal: gathered slots do not cover the plan"
            out["experts." + name] = phys[torch.as_tensor(first, device=phys.device)].clone()
        return out

    @torch.no_grad()
    def sync_grads(self, average: bool = False) -> None:
        """Make every rank's gradients those of the single-process layer on all ranks' tokens. Collective.

        Router and shared-expert gradients are summed over ranks (data-parallel); a replicated
        expert's slots get the sum over its replicas, so that replicas stay equal after an optimizer
        step. ``average=True`` divides everything by the world size (for per-rank mean losses).
        """
        scale = 1.0 / self.world_size if average else 1.0
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if name.startswith("experts."):
                continue
            self.comm.all_reduce(p.grad, f"sync_grads ({name})")
            if average:
                p.grad.mul_(scale)
        counts = np.bincount(self.plan.physical_to_logical_map[self.layer_index], minlength=self.NUM_EXPERTS)
        shared = np.flatnonzero(counts > 1)
        index = {int(e): i for i, e in enumerate(shared)}
        mine = [(s, index[e]) for s, e in enumerate(self.slot_experts) if e in index]
        for name, p in self.experts.named_parameters():
            if not p.requires_grad:
                continue
            if len(shared):
                buf = p.grad.new_zeros((len(shared), *p.shape[1:]))
                for s, i in mine:
                    buf[i] += p.grad[s]
                self.comm.all_reduce(buf, f"sync_grads (replicas of experts.{name})")
                for s, i in mine:
                    p.grad[s] = buf[i]
            if average:
                p.grad.mul_(scale)

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor | None = None) -> torch.Tensor:
        """The base update with loads summed over ranks, so that every rank's router stays equal. Collective."""
        if self.EXPERT_BIAS_RATE is None:
            return super().update_expert_bias(counts_E)
        self._check_counts(counts_E)
        load = self._bias_load_E.clone() if counts_E is None else counts_E.to(self._bias_load_E).clone()
        if counts_E is None:
            self._bias_load_E.zero_()
        self.comm.all_reduce(load, "update_expert_bias")
        return super().update_expert_bias(load)

    def apply_plan(self, new_plan, optimizer=None) -> dict[str, Any]:
        """Move to ``new_plan`` between optimizer steps, sending only the changed slots' weights (and ``optimizer``'s
        state of them); every rank stays on the old plan if any fails. Collective. See ``migrate`` (and
        ``moegraph.distributed.apply_plan`` for every MoE layer of a model at once)."""
        from .migrate import apply_plan

        return apply_plan(self, new_plan, optimizer=optimizer)

    # ------------------------------------------------------------------ traffic

    def traffic_summary(self) -> dict[str, Any]:
        """This rank's counters as plain Python (bytes per destination, seconds per phase)."""
        return self.traffic.summary()

    def reset_traffic(self) -> None:
        self.traffic.reset()

    def reset_round_robin(self) -> None:
        """Restart the dispatch rule's inference token count (ties between replicas go round-robin by it)."""
        self.ep_dispatch.reset_round_robin()

    def start_recording(self):
        """Record routing from here on; the round-robin count restarts too, so that the rule applied to
        the recorded trace (``moegraph.plan --evaluate``, ``predicted_copies``) picks the replicas this
        rank picked in inference."""
        self.reset_round_robin()
        return super().start_recording()

    def sync_timing(self, enabled: bool = True) -> None:
        """On CUDA, synchronise at phase boundaries so that per-phase times are honest (costs overlap)."""
        self.ep_dispatch.sync_timing = enabled
