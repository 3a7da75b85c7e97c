"""``moegraph.compile``: spec (+ plan) -> generated, FX-optimised, executable MoE layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .codegen import layer_class
from .errors import CodegenError
from .loader import load_spec
from .runtime import CompiledMoEBase, torch_dtype
from .spec import MoESpec

__all__ = ["compile", "BACKENDS"]

BACKENDS = ("torch", "triton")


def compile(  # noqa: A001 - the public name mirrors torch.compile on purpose
    spec: MoESpec | str | Path | dict,
    plan: Any = None,
    backend: str | None = None,
    out_dir: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    seed: int | None = 0,
    passes: list | None = None,
    process_group: Any = None,
    layer_index: int = 0,
    timeout: float | None = None,
    expert_strategy: str = "auto",
) -> CompiledMoEBase:
    """Compile a spec into an ``nn.Module`` implementing its MoE layer.

    Args:
        spec: a MoESpec, a spec file path, a preset name or a dict.
        plan: a placement ``Plan`` (or plan file path). With an initialised torch.distributed
            process group the layer is expert-parallel and holds only this rank's experts.
        backend: "torch" (any machine) or "triton" (GPU kernels; CPU under TRITON_INTERPRET=1).
            Defaults to the spec's ``codegen.backend``.
        out_dir: where generated source is written (default: the user cache directory).
        dtype: parameter dtype (default: the spec's ``moe.dtype``).
        seed: deterministic parameter init; None leaves parameters uninitialised.
        passes: FX passes to run instead of the defaults.
        process_group, layer_index, timeout: expert-parallel only (see
            ``moegraph.distributed.ExpertParallelMoE.create``): the group (default: the default
            group), which MoE layer of the plan this layer is, and the seconds a collective waits for
            peers before raising ``DistributedError``.
        expert_strategy: how the expert op lays out its GEMMs (``moegraph.strategies``): "auto"
            chooses by measurement on this machine (``moegraph.tuning``), a strategy name pins it.
            A compile() argument rather than a spec field: the best layout is a property of the
            machine, not of the layer, and the spec hash must not change between machines.
    """
    spec = load_spec(spec)
    from .strategies import STRATEGIES

    if expert_strategy != "auto" and expert_strategy not in STRATEGIES:
        raise CodegenError(f"unknown expert_strategy {expert_strategy!r}; choose 'auto' or one of "
                           f"{', '.join(STRATEGIES)}")
    backend = backend or spec.codegen.backend
    if backend not in BACKENDS:
        raise CodegenError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        from . import triton_backend  # noqa: F401  (fails with a clear message if triton is missing)

        if passes is None:  # the default passes plus FuseRouter (the router kernel)
            from .triton_backend.passes import triton_passes

            passes = triton_passes(spec)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    cls, _ = layer_class(spec, backend, out_dir)
    kwargs = dict(dtype=dtype or torch_dtype(spec.moe.dtype), router_dtype=torch_dtype(spec.moe.router_dtype),
                  device=device, passes=passes, seed=seed)
    if plan is not None:
        import torch.distributed as dist

        if (dist.is_available() and dist.is_initialized()) or process_group is not None:
            from .distributed import ExpertParallelMoE

            layer = ExpertParallelMoE.create(cls, spec, plan, process_group=process_group, layer_index=layer_index,
                                             timeout=timeout, **kwargs)
            layer.__dict__["expert_strategy"] = None if expert_strategy == "auto" else expert_strategy
            return layer
        from .planner import Plan

        if not isinstance(plan, Plan):
            plan = Plan.load(plan, spec=spec)
        elif plan.spec_hash != spec.hash():
            from .errors import PlanFileError

            raise PlanFileError(
                f"plan was made for spec hash {plan.spec_hash[:12]} but spec '{spec.name}' has hash "
                f"{spec.short_hash}; re-plan with `moegraph plan {spec.name}`"
            )
    layer = cls(**kwargs)
    layer.__dict__["plan"] = plan
    layer.__dict__["expert_strategy"] = None if expert_strategy == "auto" else expert_strategy
    return layer
