"""FP8 experts on one GPU: the Triton FP8 layer beside the bf16 Triton layer and transformers' FP8 experts.

    python benchmarks/gpu_fp8_bench.py [--tokens 1 16 128 1024 8192] [--iters 10] [--no-hf] [--peak-fp8-tflops X]
    python benchmarks/gpu_fp8_bench.py --dry-run     # tiny shapes on CPU under TRITON_INTERPRET=1

Shape: the ``deepseek-v3-fp8`` preset (hidden 7168, 256 routed experts of 2048 with SwiGLU, top-8 of 8
groups keep 4, one shared expert; e4m3 weights in 128x128 blocks with float32 scales, activations in
1x128 tiles). Every implementation reads the same weights:
- ``fp8``: the moegraph layer compiled with backend "triton" (``moegraph_triton::fp8_expert_mlp``);
- ``bf16``: the same layer without the quantization section, its weights the FP8 ones dequantized
  (the same values in bfloat16), Triton backend;
- ``hf_fp8``: transformers' DeepseekV3MoE with ``FP8Experts`` and ``FP8Linear`` shared experts holding
  the same FP8 tensors and scales (its own kernels).

For every token count it checks ``fp8`` against the torch-backend FP8 layer (the same math: they may
differ by the float32 accumulation order and one bf16 rounding), ``bf16`` against ``fp8`` (the FP8
format's error, about 2u with u = 2^-4) and ``hf_fp8`` against ``fp8``; then times all of them
interleaved with CUDA events, every call from a synchronised start (gpu_bench.time_interleaved). It
prints the FP8 / bf16 speed-up, the FP8 layer against HF's, and the share of the spec-sheet dense FP8
peak reached at the largest size. Verdicts: issue 14's targets (FP8 faster than bf16 at 1024 and 8192
tokens, by more than 3%: within that it is a tie). Exit status 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from moegraph.argtypes import nonnegative_int, positive_float, positive_int

# Spec-sheet dense FP8 tensor-core TFLOP/s, matched in order against torch.cuda.get_device_name.
FP8_PEAKS = [("GH200", 1979.0), ("H200", 1979.0), ("H100 NVL", 1671.0), ("H100 PCIe", 1513.0), ("H100", 1979.0),
             ("H800", 1979.0), ("H20", 296.0), ("B200", 4500.0), ("B100", 3500.0), ("L40S", 733.0), ("L4", 242.0)]


def _gpu_bench():
    """benchmarks/gpu_bench.py as a module: its timing and synchronisation helpers are shared."""
    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).with_name("gpu_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 16, 128, 1024, 8192])
    ap.add_argument("--iters", type=positive_int, default=10)
    ap.add_argument("--warmup", type=nonnegative_int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' FP8 experts")
    ap.add_argument("--peak-fp8-tflops", type=positive_float, default=None, help="override the spec-sheet FP8 peak")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    return ap.parse_args()


def _fill_fp8(layer, spec_q, g, device) -> None:
    """Random weights quantized per block, expert by expert (the bf16 copy of all experts never exists)."""
    import math

    import torch

    from moegraph import fp8

    block = tuple(spec_q.weight_block)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dtype in fp8.FORMATS.values():
                scale = getattr(layer.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2] + "_scale_inv")
                rows = p if p.dim() == 3 else p.unsqueeze(0)
                srows = scale if p.dim() == 3 else scale.unsqueeze(0)
                for e in range(rows.shape[0]):
                    w = torch.randn(rows.shape[1:], generator=g, device=device) / math.sqrt(rows.shape[-1])
                    q, s = fp8.quantize_blocks(w, block, spec_q.format, spec_q.scale_format)
                    rows[e].copy_(q)
                    srows[e].copy_(s)
            elif not name.endswith("_scale_inv"):
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
        layer.router.expert_bias.normal_(0.0, 0.01, generator=g)


def build(spec, device, dtype, with_hf: bool):
    import torch

    import moegraph
    from moegraph import fp8

    g = torch.Generator(device=device).manual_seed(0)
    q8 = moegraph.compile(spec, backend="triton", dtype=dtype, device=device, seed=None)
    _fill_fp8(q8, spec.moe.quantization, g, device)
    ref = _gpu_bench().torch_twin(spec, q8, dtype, device)  # the torch-backend FP8 layer, same tensors
    # The bf16 layer: the same spec without FP8, weights dequantized block by block.
    plain = spec.to_dict()
    plain["moe"].pop("quantization")
    b16 = moegraph.compile(plain, backend="triton", dtype=dtype, device=device, seed=None)
    block = tuple(spec.moe.quantization.weight_block)
    state = q8.state_dict()
    with torch.no_grad():
        for name, p in b16.named_parameters():
            src = state[name]
            if src.dtype in fp8.FORMATS.values():
                s = state[name + "_scale_inv"]
                for e in range(p.shape[0] if p.dim() == 3 else 1):
                    dst, q, sc = (p[e], src[e], s[e]) if p.dim() == 3 else (p, src, s)
                    dst.copy_(fp8.dequantize_blocks(q, sc, block, torch.float32))
            else:
                p.copy_(src)
        b16.router.expert_bias.copy_(q8.router.expert_bias)
    impls = {"fp8": q8.eval(), "bf16": b16.eval(), "torch_fp8": ref.eval()}
    if with_hf:
        impls["hf_fp8"] = hf_block(spec, q8, block)
    return impls


def hf_block(spec, q8, block):
    """transformers' DeepseekV3MoE with its FP8 expert modules holding the layer's FP8 tensors."""
    import torch
    from torch import nn
    from transformers import DeepseekV3Config
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    m, r = spec.moe, spec.moe.router
    cfg = DeepseekV3Config(
        hidden_size=m.hidden_size, moe_intermediate_size=m.experts.intermediate_size,
        n_routed_experts=m.experts.num_experts, num_experts_per_tok=r.top_k, n_shared_experts=m.shared_experts.count,
        n_group=r.groups.num_groups, topk_group=r.groups.topk_groups, norm_topk_prob=r.normalize,
        routed_scaling_factor=r.scaling_factor, hidden_act="silu")
    with torch.device("meta"):
        hf = DeepseekV3MoE(cfg)
        hf.experts = FP8Experts(cfg, block_size=block)
        S = m.shared_experts.count * m.shared_intermediate_size
        for n, (i, o) in {"gate_proj": (m.hidden_size, S), "up_proj": (m.hidden_size, S),
                          "down_proj": (S, m.hidden_size)}.items():
            setattr(hf.shared_experts, n, FP8Linear(i, o, block_size=block))
    ex, sh = q8.experts, q8.shared_experts
    bo = block[0]
    share = {
        "experts.gate_up_proj": ex.gate_up_proj, "experts.gate_up_proj_scale_inv": ex.gate_up_proj_scale_inv,
        "experts.down_proj": ex.down_proj, "experts.down_proj_scale_inv": ex.down_proj_scale_inv,
        "gate.weight": q8.router.weight,
        "shared_experts.gate_proj.weight": sh.gate_up_proj[:S],
        "shared_experts.gate_proj.weight_scale_inv": sh.gate_up_proj_scale_inv[:S // bo],
        "shared_experts.up_proj.weight": sh.gate_up_proj[S:],
        "shared_experts.up_proj.weight_scale_inv": sh.gate_up_proj_scale_inv[S // bo:],
        "shared_experts.down_proj.weight": sh.down_proj,
        "shared_experts.down_proj.weight_scale_inv": sh.down_proj_scale_inv,
    }
    for name, t in share.items():
        owner, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(owner), attr, nn.Parameter(t, requires_grad=False))
    hf.gate.e_score_correction_bias = q8.router.expert_bias
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HF tensors not shared: {left}")
    return hf.eval()


def main() -> int:
    args = parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    from moegraph import fp8

    gb = _gpu_bench()
    chosen = gb.choose_device(args, "gpu_fp8_bench.py", "deepseek-v3-fp8", "deepseek-v3-fp8-tiny", [1, 7], 1, 0)
    if chosen is None:
        return 2
    spec, device, dtype, tokens, device_name = chosen
    if args.dry_run:
        args.no_hf = True
    m = spec.moe
    D, F, E, K = m.hidden_size, m.experts.intermediate_size, m.experts.num_experts, m.top_k
    SH = m.shared_experts.count * m.shared_intermediate_size // F
    peak = args.peak_fp8_tflops or next((tf for key, tf in FP8_PEAKS if key in device_name), None)
    print(f"device: {device_name}; torch {torch.__version__}")
    print(f"layer: {spec.name}: D={D}, {E} experts of F={F}, top-{K}, {m.shared_experts.count} shared; "
          f"{m.quantization.format} {tuple(m.quantization.weight_block)} blocks, 1x{m.quantization.activation_tile[1]} "
          f"tiles; layer dtype {str(dtype).replace('torch.', '')}", flush=True)
    t0 = time.time()
    try:
        impls = build(spec, device, dtype, with_hf=not args.no_hf)
    except Exception as exc:  # e.g. another transformers version: still check and time our own layers
        if args.no_hf:
            raise
        print(f"HF FP8 experts could not be built ({type(exc).__name__}: {str(exc)[:200]}); going on without them")
        impls = build(spec, device, dtype, with_hf=False)
    print(f"built layers in {time.time() - t0:.1f}s", flush=True)
    ok, rows = True, []
    g = torch.Generator(device=device).manual_seed(1)
    for T in tokens:
        x = torch.randn(1, T, D, generator=g, device=device, dtype=torch.float32).to(dtype)
        with torch.inference_mode():
            ys = {}
            for name, mod in list(impls.items()):
                try:
                    ys[name] = mod(x).float()
                except Exception as exc:  # HF's kernels may not run here: report, time the others
                    if name != "hf_fp8":
                        raise
                    print(f"  {name} failed at {T} tokens ({type(exc).__name__}: {str(exc)[:160]}); dropped")
                    impls.pop(name)
            ref = ys["torch_fp8"]
            rel = {n: ((y - ref).norm() / ref.norm()).item() for n, y in ys.items() if n != "torch_fp8"}
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            bound = 2 * fp8.rounding_bound(m.quantization.format)[0]  # the format's error: 2u (see fp8.rounding_bound)
            passed = rel["fp8"] <= tol and rel["bf16"] <= bound
            ok &= passed
            print(f"[{T} tokens] check: fp8 vs torch-backend fp8 {rel['fp8']:.2e} (tol {tol:g}); bf16 vs fp8 layer "
                  f"{rel['bf16']:.2e} (format error, bound {bound:.3f})"
                  + (f"; HF FP8 {rel['hf_fp8']:.2e}" if "hf_fp8" in rel else "")
                  + f" -> {'PASS' if passed else 'FAIL'}", flush=True)
            fns = {n: (lambda mod=mod: mod(x)) for n, mod in impls.items() if n != "torch_fp8"}
            iters = args.iters if T < 4096 else max(3, args.iters // 2)
            times = gb.time_interleaved(fns, iters, args.warmup, device)
        rows.append((T, times, 2 * T * (K + SH) * 3 * D * F))
    names = list(dict.fromkeys(n for _, times, _ in rows for n in times))  # HF's may be missing at later sizes
    print(f"\nmedian ms per forward ({args.iters} rounds, interleaved, every call from a synchronised start)")
    print(f"{'tokens':>7} " + " ".join(f"{n:>10}" for n in names) + f" {'fp8 vs bf16':>12} {'fp8 vs HF':>10} "
          f"{'fp8 TFLOP/s':>12} {'% FP8 peak':>11}")
    for T, times, flops in rows:
        tf = flops / times["fp8"] / 1e9
        vs_hf = f"{times['hf_fp8'] / times['fp8']:.2f}x" if "hf_fp8" in times else "n/a"
        print(f"{T:>7} " + " ".join(f"{times[n]:>10.3f}" if n in times else f"{'n/a':>10}" for n in names)
              + f" {times['bf16'] / times['fp8']:>11.2f}x {vs_hf:>10} {tf:>12.0f} "
              + (f"{100 * tf / peak:>10.0f}%" if peak else f"{'n/a':>11}"))
    print("\nverdicts:")
    print(f"  correctness (FP8 layer equal to the torch-backend FP8 layer, bf16 within the format's error): "
          f"{'PASS' if ok else 'FAIL'}")
    for T, times, _ in rows:
        if T in (1024, 8192):
            r = times["bf16"] / times["fp8"]
            verdict = "PASS" if r > 1.0 + gb.TIE else "FAIL" + (" (a tie)" if r >= 1.0 - gb.TIE else "")
            print(f"  {T} tokens: FP8 layer {r:.2f}x the bf16 layer -> target faster (by more than {gb.TIE:.0%}): "
                  f"{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
