"""FP8 experts expert-parallel over gloo (2 ranks on one host, 4 ranks on two hosts): outputs and input
gradients equal the single-process FP8 layer; token rows travel as FP8 + tile scales, in exactly the
copies and bytes the planner predicts, at <= 0.55x the bytes of a bfloat16 dispatch. The Triton backend's
FP8 layer (kernels under the interpreter) runs expert-parallel too and equals the torch backend's."""

from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import moegraph
from moegraph.planner.cost import copy_bytes
from subproc import free_port, join_ranks, rank_context

pytestmark = [pytest.mark.distributed]

DEADLINE_S = 240.0


def _spec(world: int, dispatch: str = "fp8"):
    d = moegraph.load_spec("deepseek-v3-fp8-tiny").to_dict()
    d["moe"]["quantization"]["dispatch"] = dispatch
    d["topology"] = {"kind": "uniform", "nodes": 1 if world == 2 else 2, "gpus_per_node": 2}
    return moegraph.load_spec(d)


def _plan(spec):
    from moegraph.planner import Plan
    from moegraph.planner.baselines import contiguous

    E, S = spec.moe.experts.num_experts, spec.moe.experts.num_experts + spec.placement.redundant_slots
    rows = np.stack([contiguous(E, S) for _ in range(spec.model.num_moe_layers)])
    return Plan(rows, spec)


def _inputs(world: int, dtype):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1, 6 + r, 256, generator=g).to(dtype) for r in range(world)]
    gs = [torch.randn(1, 6 + r, 256, generator=g).to(dtype) for r in range(world)]
    return xs, gs


def _state(spec, dtype):
    return moegraph.compile(spec, dtype=dtype, seed=0).state_dict()


CASES = {"fp8_f32": ("fp8", torch.float32), "fp8_bf16": ("fp8", torch.bfloat16), "dtype_bf16": ("dtype", torch.bfloat16)}


def _run_case(rank: int, world: int, case: str) -> dict:
    dispatch, dtype = CASES[case]
    spec = _spec(world, dispatch)
    plan = _plan(spec)
    layer = moegraph.compile(spec, plan=plan, seed=None, dtype=dtype, timeout=60)
    layer.load_state_dict(_state(spec, dtype))
    xs, gs = _inputs(world, dtype)
    x = xs[rank].clone().requires_grad_(True)
    layer.start_recording()
    layer.reset_traffic()
    y = layer(x)
    rows = {k: v.copy() for k, v in layer.traffic.rows.items()}
    sent = {k: v.copy() for k, v in layer.traffic.bytes.items()}
    (y * gs[rank]).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "rows": rows, "bytes": sent, "ids": layer.recorder.ids().clone()}


def _in_group(rank: int, world: int, port: int, out_dir: str, body) -> None:
    """Run ``body()`` as one rank of a gloo group; save {"ok": its result} or {"crash": the traceback}."""
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=60))
        result = {"ok": body()}
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = {"crash": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - peers may be gone already
        pass


def _entry(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    _in_group(rank, world, port, out_dir, lambda: {case: _run_case(rank, world, case) for case in CASES})


def _launch(world: int, out_dir: Path, entry=_entry, start: str | None = None) -> list[dict]:
    """Start ``world`` ranks running ``entry`` (from the tests' fork server, or with the start method
    ``start``) and return what each reported."""
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = rank_context() if start is None else mp.get_context(start)
    procs = [ctx.Process(target=entry, args=(r, world, port, str(out_dir)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results = join_ranks(procs, out_dir, time.monotonic() + DEADLINE_S, f"{world} ranks")
    failed = [f"rank {r}:\n{res['crash']}" for r, res in enumerate(results) if "crash" in res]
    assert not failed, "\n".join(failed)
    return [res["ok"] for res in results]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4-two-hosts"])
def run(request, tmp_path_factory):
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"fp8-ep{world}"))


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_outputs_and_input_gradients_equal_the_single_process_layer(run):
    world, results = run
    spec = _spec(world)
    ref = moegraph.compile(spec, dtype=torch.float32, seed=None).train()
    ref.load_state_dict(_state(spec, torch.float32))
    xs, gs = _inputs(world, torch.float32)
    for r, res in enumerate(results):
        x = xs[r].clone().requires_grad_(True)
        y = ref(x)
        (y * gs[r]).sum().backward()
        assert _rel(res["fp8_f32"]["y"], y) <= 1e-5, f"rank {r}"
        assert _rel(res["fp8_f32"]["x_grad"], x.grad) <= 1e-5, f"rank {r}"


def test_fp8_dispatch_bytes_are_the_planners_and_half_of_bf16(run):
    from moegraph.distributed import predicted_copies

    world, results = run
    spec = _spec(world)
    plan = _plan(spec)
    disp, back = copy_bytes(spec)
    D = spec.moe.hidden_size
    assert (disp, back) == (D + 4 * D // 128, 2 * D)  # bf16 layer: FP8 values + one float32 scale per 1x128 tile
    for case in ("fp8_f32", "fp8_bf16"):
        predicted = predicted_copies(plan, 0, [res[case]["ids"] for res in results])
        rows = np.stack([res[case]["rows"]["dispatch"] for res in results])
        np.testing.assert_array_equal(rows, predicted, err_msg=case)
        for r, res in enumerate(results):
            np.testing.assert_array_equal(res[case]["bytes"]["dispatch"], rows[r] * disp, err_msg=f"{case} rank {r}")
    # bf16 layer, same routing: the FP8 dispatch sends 0.52x the bytes per token of the bf16 dispatch.
    fp8_rows = np.stack([res["fp8_bf16"]["rows"]["dispatch"] for res in results])
    bf16_rows = np.stack([res["dtype_bf16"]["rows"]["dispatch"] for res in results])
    np.testing.assert_array_equal(fp8_rows, bf16_rows)
    assert fp8_rows.sum() > 0
    fp8_bytes = sum(int(res["fp8_bf16"]["bytes"]["dispatch"].sum()) for res in results)
    bf16_bytes = sum(int(res["dtype_bf16"]["bytes"]["dispatch"].sum()) for res in results)
    assert bf16_bytes == bf16_rows.sum() * copy_bytes(_spec(world, "dtype"))[0] == bf16_rows.sum() * 2 * D
    assert fp8_bytes / bf16_bytes <= 0.55
    # The combine returns results in the layer's dtype, the copies the dispatch sent.
    for res in results:
        assert int(res["fp8_bf16"]["bytes"]["combine"].sum()) == int(res["fp8_bf16"]["rows"]["combine"].sum()) * 2 * D


def _triton_entry(rank: int, world: int, port: int, out_dir: str) -> None:
    """A rank of the Triton backend (its FP8 kernels under the interpreter: the parent set TRITON_INTERPRET)."""
    from moegraph import codegen
    from moegraph.triton_backend import fp8 as triton_fp8

    torch.set_num_threads(1)
    codegen.set_cache_dir(Path(out_dir) / "generated")
    launches = []
    kernels = triton_fp8.expert_mlp_fp8
    triton_fp8.expert_mlp_fp8 = lambda *a, **kw: launches.append(1) or kernels(*a, **kw)

    def body() -> dict:
        spec = _spec(world)
        layer = moegraph.compile(spec, plan=_plan(spec), backend="triton", seed=None, dtype=torch.float32, timeout=60)
        layer.load_state_dict(_state(spec, torch.float32))
        layer.eval()
        with torch.no_grad():
            y = layer(_inputs(world, torch.float32)[0][rank])
        return {"y": y, "op": str(layer.ep_dispatch.expert_op), "launches": len(launches)}

    _in_group(rank, world, port, out_dir, body)


@pytest.mark.triton
def test_triton_backend_runs_expert_parallel_and_equals_the_torch_backend(tmp_path, monkeypatch):
    # The expert-parallel pass must find the Triton backend's FP8 op (moegraph_triton::fp8_expert_mlp) as
    # it finds the torch one, and the ranks' Triton FP8 kernels then give the single-process torch layer.
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks, which import triton afresh
    results = _launch(2, tmp_path, _triton_entry, start="spawn")
    spec = _spec(2)
    ref = moegraph.compile(spec, backend="torch", dtype=torch.float32, seed=None).eval()
    ref.load_state_dict(_state(spec, torch.float32))
    for r, (res, x) in enumerate(zip(results, _inputs(2, torch.float32)[0])):
        assert res["op"] == "moegraph_triton.fp8_expert_mlp" and res["launches"] >= 1, (r, res["op"])
        with torch.no_grad():
            assert _rel(res["y"], ref(x)) <= 1e-5, f"rank {r}"
