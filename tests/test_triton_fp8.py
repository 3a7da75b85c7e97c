"""The block-scaled FP8 variant of the Triton expert kernels (``moegraph.triton_backend.fp8``).

Run in fresh processes: under Triton's interpreter (TRITON_INTERPRET=1, which must be set before
triton is imported) against the torch op ``moegraph::fp8_expert_mlp`` (1e-5 relative), and
cross-compiled for sm_90 (FP8 wgmma) without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

_INTERPRETED = textwrap.dedent("""
    import os, sys, json
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from moegraph import codegen, fp8
    from moegraph.errors import InputError
    from moegraph.triton_backend.fp8 import expert_mlp_fp8

    codegen.set_cache_dir(sys.argv[1])
    out = {}
    for name, act, gated, fmt, sf, dtype, block_n in [
        ("swiglu_e4m3", "silu", True, "fp8_e4m3", "float32", torch.float32, 64),
        ("swiglu_ue8m0_bn32", "silu", True, "fp8_e4m3", "ue8m0", torch.float32, 32),
        ("swiglu_e5m2", "silu", True, "fp8_e5m2", "float32", torch.float32, 64),
        ("relu_bf16", "relu", False, "fp8_e4m3", "float32", torch.bfloat16, 128),
    ]:
        g = torch.Generator().manual_seed(len(out))
        E, D, Fh, T, K = 4, 256, 128, 10, 2
        H = 2 * Fh if gated else Fh
        qu, su = fp8.quantize_blocks(torch.randn(E, H, D, generator=g) / 16, (128, 128), fmt, sf)
        qd, sd = fp8.quantize_blocks(torch.randn(E, D, Fh, generator=g) / 11, (128, 128), fmt, sf)
        x = torch.randn(T, D, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        tok, exp = torch.arange(T).repeat_interleave(K), ids.reshape(-1).clone()
        exp[3] = E  # a dropped assignment
        exp[4:6] = 1  # an expert with several rows, and expert ids left without rows
        w = torch.rand(T * K, generator=g).to(dtype)
        ref = torch.ops.moegraph.fp8_expert_mlp(x, tok, exp, w, qu, su, qd, sd, None, None, act, gated, None, None,
                                                128, 128, 128, fmt, sf)
        got = expert_mlp_fp8(x, tok, exp, w, qu, su, qd, sd, act, gated, None, None, 128, 128, 128, fmt, sf,
                             block_m=16, block_n=block_n)
        out[name] = [float((got.float() - ref.float()).norm() / ref.float().norm()), str(got.dtype)]
    try:
        expert_mlp_fp8(x, tok, exp, w, qu, su, qd, sd, "relu", False, None, None, 128, 128, 64, "fp8_e4m3", "float32")
    except InputError as exc:
        out["tile_mismatch"] = str(exc)
    print(json.dumps(out))
""")


def _run(script: str, tmp_path, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base.update(env)
    tests = os.path.dirname(os.path.abspath(__file__))  # for the scripts' `from sm90 import compile_sm90`
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "generated"), tests], env=base,
                          capture_output=True, text=True, timeout=900)
    return proc


def test_fp8_kernels_match_the_torch_op_under_the_interpreter(tmp_path):
    proc = _run(_INTERPRETED, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("swiglu_e4m3", "swiglu_ue8m0_bn32", "swiglu_e5m2", "relu_bf16"):
        rel, dtype = out[name]
        assert rel <= 1e-5 if dtype == "torch.float32" else rel <= 8e-3, (name, rel)  # bf16: one output rounding
    assert out["relu_bf16"][1] == "torch.bfloat16"
    assert "activation tile (64) equal to the weight block's input size (128)" in out["tile_mismatch"]


#: a fresh process under the interpreter, counting the FP8 kernel's launches (argv[1]: the generated-code folder)
_PRELUDE = textwrap.dedent("""
    import os, sys, json
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import moegraph
    from moegraph import codegen
    from moegraph.triton_backend import fp8 as tfp8

    codegen.set_cache_dir(sys.argv[1])
    launches = []
    kernel = tfp8.expert_mlp_fp8
    tfp8.expert_mlp_fp8 = lambda *a, **k: launches.append(1) or kernel(*a, **k)
""")

_COMPILED_LAYER = _PRELUDE + textwrap.dedent("""
    spec = moegraph.load_spec("deepseek-v3-fp8-tiny")
    ref = moegraph.compile(spec, backend="torch", dtype=torch.float32, seed=3)
    tri = moegraph.compile(spec, backend="triton", dtype=torch.float32, seed=4)
    tri.load_state_dict(ref.state_dict())
    out = {"ops": sorted({str(n.target) for n in tri.graph(training=False).graph.nodes if "fp8" in str(n.target)})}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 256, generator=g)
    for mode in ("eval", "train"):
        ref.train(mode == "train"); tri.train(mode == "train")
        xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yr, yt = ref(xr), tri(xt)
        gy = torch.randn(yr.shape, generator=g)
        (yr * gy).sum().backward(); (yt * gy).sum().backward()
        out[mode] = [float((yt - yr).norm() / yr.norm()), float((xt.grad - xr.grad).norm() / xr.grad.norm())]
    out["launches"] = len(launches)
    out["applied"] = list(tri.pass_report["eval"].applied)
    print(json.dumps(out))
""")


def test_compiled_fp8_layer_runs_the_kernels(tmp_path):
    # An FP8 spec compiled with backend "triton" calls moegraph_triton::fp8_expert_mlp, which launches
    # the FP8 kernels (eval and train: the stored weights are FP8) and equals the torch-backend layer
    # with the same weights, outputs and input gradients (its backward is the torch op's).
    proc = _run(_COMPILED_LAYER, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ops"] == ["moegraph_triton.fp8_expert_mlp"], out["ops"]
    assert out["launches"] >= 2, out
    assert "FuseRouter" in out["applied"], out["applied"]  # the router kernel finds the FP8 op's weights
    for mode in ("eval", "train"):
        assert out[mode][0] <= 1e-5 and out[mode][1] <= 1e-5, (mode, out[mode])


_CROSS_COMPILE = textwrap.dedent("""
    import sys, torch
    from moegraph import codegen
    from moegraph.triton_backend import fp8 as tfp8

    codegen.set_cache_dir(sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from sm90 import compile_sm90

    mod = tfp8._module_for("silu", True, None, None, False)
    T, D, F, E, B = 8192, 7168, 2048, 256, 1400
    f8, f32, i32, i64 = torch.float8_e4m3fn, torch.float32, torch.int32, torch.int64

    c = dict(BLOCK_OUT=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, EVEN_K=True)
    out = {}
    k = compile_sm90(mod.gate_up_kernel, [f8, i64, f8, None, None, i32, i32, f32, 65536, 65536, T, D, F,
                                          0, E, B, f32, f32], c)
    out["gate_up"] = "wgmma" in k.asm["ptx"]
    k = compile_sm90(mod.down_kernel, [f8, f8, None, None, f32, None, i32, i32, f32, 65536, 65536, T, D,
                                       F, 0, E, B, f32, f32], c)
    out["down"] = "wgmma" in k.asm["ptx"]
    print(repr(out))
""")


@pytest.mark.slow
def test_fp8_kernels_compile_for_hopper(tmp_path):
    proc = _run(_CROSS_COMPILE, tmp_path, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    if proc.returncode and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("Triton's CUDA toolchain (ptxas) is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = eval(proc.stdout.strip().splitlines()[-1])  # a dict literal printed by the script
    assert out == {"gate_up": True, "down": True}  # FP8 tiles on Hopper's wgmma


_SMALL_BLOCKS = _PRELUDE + textwrap.dedent("""
    out = {}
    for block in ([16, 16], [16, 32], [32, 16]):
        spec = moegraph.load_spec({"name": "small-blocks", "codegen": {"backend": "triton"}, "moe": {
            "hidden_size": 64, "dtype": "float32", "experts": {"num_experts": 4, "intermediate_size": 32},
            "quantization": {"weight_block": block, "activation_tile": [1, block[1]]},
            "router": {"type": "topk", "top_k": 2}}})
        ref = moegraph.compile(spec, backend="torch", dtype=torch.float32, seed=3).eval()
        tri = moegraph.compile(spec, dtype=torch.float32, seed=4).eval()
        tri.load_state_dict(ref.state_dict())
        x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
        y = ref(x)
        out[str(block)] = float((tri(x) - y).norm() / y.norm())
    out["launches"] = len(launches)
    print(json.dumps(out))
""")


def test_the_smallest_blocks_validation_accepts_run_the_kernels(tmp_path):
    # Weight blocks are powers of two of 16 or more for backend triton (the spec refuses others, see
    # test_spec_errors); the smallest of them run the FP8 kernels and equal the torch backend.
    proc = _run(_SMALL_BLOCKS, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("launches") == 3, out
    for block, rel in out.items():
        assert rel <= 1e-5, (block, rel)
