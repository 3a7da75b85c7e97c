"""``moegraph.compile``: spec (+ plan) -> generated, FX-optimised, executable MoE layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .codegen import BACKENDS, check_backend, layer_class
from .errors import InputError, is_integer, is_number, short_repr
from .fx_passes import Pipeline
from .limits import check_memory
from .loader import load_spec
from .runtime import CompiledMoEBase, torch_dtype
from .semantics import DTYPES
from .semantics.dtypes import not_a_spec_dtype
from .spec import MoESpec

__all__ = ["compile", "BACKENDS"]


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
        dtype: parameter dtype (default: the spec's ``moe.dtype``); float64 (for reference checks) makes the router
            float64 too.
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

    if not isinstance(expert_strategy, str) or (expert_strategy != "auto" and expert_strategy not in STRATEGIES):
        raise InputError(f"unknown expert_strategy {expert_strategy!r}; choose 'auto' or one of "
                         f"{', '.join(STRATEGIES)}")
    pin = None if expert_strategy == "auto" else expert_strategy  # None: the tuner (or the fixed rule) chooses
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise InputError(f"out_dir is the folder for the generated source (a str or Path), got {type(out_dir).__name__}")
    if plan is not None:
        from .planner import Plan

        if not isinstance(plan, (Plan, str, os.PathLike)):
            raise InputError(f"plan is a placement Plan or a plan file's path, got {type(plan).__name__}; make one "
                             "with moegraph.planner.plan(spec) or `moegraph plan SPEC -o plan.json`")
    backend = backend or spec.codegen.backend
    check_backend(backend)
    dtype, device = _check_arguments(dtype, device, seed, timeout, layer_index)
    if backend == "triton":
        from . import triton_backend  # noqa: F401  (fails with a clear message if triton is missing)
        from .triton_backend.kernels import check_dtype

        if dtype is not None:
            check_dtype(dtype)

        if passes is None:  # the default passes plus FuseRouter (the router kernel)
            from .triton_backend.passes import triton_passes

            passes = triton_passes(spec)
    cls, _ = layer_class(spec, backend, out_dir)
    # The FX stage: traced and run lazily per mode by the layer (graphs depend on train/eval).
    pipeline = Pipeline(passes)
    # A float64 layer (reference checks) is float64 throughout: its router too, so that gradcheck sees one precision.
    router_dtype = torch.float64 if dtype == torch.float64 else torch_dtype(spec.moe.router_dtype)
    kwargs = dict(dtype=dtype or torch_dtype(spec.moe.dtype), router_dtype=router_dtype, device=device, seed=seed)
    if plan is not None:
        import torch.distributed as dist

        if (dist.is_available() and dist.is_initialized()) or process_group is not None:
            from .distributed import ExpertParallelMoE, ExpertParallelPass

            layer = ExpertParallelMoE.create(cls, spec, plan, process_group=process_group, layer_index=layer_index,
                                             timeout=timeout, pipeline=pipeline.then(ExpertParallelPass.of), **kwargs)
            layer.__dict__["expert_strategy"] = pin
            return layer
        from .planner import Plan
        from .planner.planfile import check_made_for

        if not isinstance(plan, Plan):
            plan = Plan.load(plan, spec=spec)
        else:
            check_made_for(plan.spec, spec, "plan")
    device_type = device.type if device is not None else "cpu"
    if device_type == "cpu":
        check_memory(layer_bytes(spec, kwargs["dtype"], seeded=seed is not None),
                     f"the layer of spec {spec.name!r} ({kwargs['dtype']})",
                     "use a smaller spec (e.g. a -tiny preset), "
                     + ("a 16-bit dtype (dtype=torch.bfloat16), " if kwargs["dtype"].itemsize > 2 else "")
                     + "or run it expert-parallel with a plan (plan=, in processes of torch.distributed)")
    layer = cls(pipeline=pipeline, **kwargs)
    layer.__dict__["plan"] = plan
    layer.__dict__["expert_strategy"] = pin
    layer.graph()  # built now: torch.compile cannot build it while tracing the forward
    return layer


def _check_arguments(dtype: Any, device: Any, seed: Any, timeout: Any, layer_index: Any) -> tuple[Any, Any]:
    """Type and range of compile's arguments, checked before anything is generated or allocated."""

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            where = not_a_spec_dtype(dtype)
            if where and dtype in ("float64", "double"):
                where = "a float64 layer, for reference checks on the torch backend, is dtype=torch.float64"
            raise InputError(f"dtype {dtype!r} is not known; use one of {', '.join(DTYPES)}"
                             + (f" ({where})" if where else ""))
        dtype = torch_dtype(dtype)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputError(f"dtype {dtype!r} is not a floating-point torch dtype; use e.g. torch.float32 or 'bfloat16'")
    if dtype is not None and dtype.itemsize == 1:
        raise InputError(f"dtype {dtype} is a storage format, not a compute dtype: FP8 expert weights come from the "
                         "spec's moe.quantization section (e.g. preset deepseek-v3-fp8-tiny); compile with dtype "
                         "torch.bfloat16 or torch.float32")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"device {device!r} is not a torch device ({exc})") from None
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise InputError(f"device {device} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if seed is not None and not is_integer(seed, 0, 2**63 - 1):
        raise InputError(f"seed {short_repr(seed)} must be an integer in [0, 2**63) or None")
    if timeout is not None and not (is_number(timeout) and timeout > 0):
        raise InputError(f"timeout {short_repr(timeout)} must be a finite number of seconds above 0 (or None)")
    if not is_integer(layer_index, 0):
        raise InputError(f"layer_index {short_repr(layer_index)} must be a non-negative integer")
    return dtype, device


def layer_bytes(spec: MoESpec, dtype: torch.dtype, seeded: bool = False) -> int:
    """Bytes ``compile`` allocates for one single-process layer: its parameters in ``dtype``, plus
    (``seeded``) the float32 temporaries of the seeded init of the largest weight."""
    from .summary import summarize

    c = summarize(spec).layer
    e = spec.moe.experts
    largest = e.num_experts * (2 if e.gated else 1) * e.intermediate_size * spec.moe.expert_width
    return (c.routed_total + c.shared + c.router) * torch.empty(0, dtype=dtype).element_size() + (
        2 * 4 * largest if seeded else 0)


def smoke_bytes(spec: MoESpec, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a first eval forward on ``tokens`` tokens needs: the parameters, the eval graph's packed
    copy of the expert weights, and the routed activations (T x K rows of D and 2F)."""
    m = spec.moe
    size = torch.empty(0, dtype=dtype).element_size()
    acts = tokens * (m.top_k * (m.hidden_size + 3 * m.experts.intermediate_size) + 4 * m.hidden_size
                     + 2 * m.experts.num_experts) * size
    return 2 * layer_bytes(spec, dtype) + acts + layer_bytes(spec, dtype, seeded=True) - layer_bytes(spec, dtype)
