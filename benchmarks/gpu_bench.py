"""The Triton layer on the real DeepSeek-V3 MoE layer shape, on one GPU, in one run.

    python benchmarks/gpu_bench.py [--tokens 1 16 128 1024 8192] [--iters 10] [--no-cuda-graphs] [--no-hf]
                                   [--peak-tflops X --peak-tbps Y]
    python benchmarks/gpu_bench.py --dry-run     # tiny shapes on CPU under TRITON_INTERPRET=1

Shape: hidden 7168, 256 routed experts of 2048 (SwiGLU), top-8 with sigmoid scores, 8 groups keep 4
(sum of the top-2 per group), expert bias, normalise and scale 2.5, one shared expert; bfloat16
weights (22.5 GiB, shared by all implementations: no copies), float32 router.

For every token count it
1. checks the Triton layer (router kernel + align + grouped GEMMs + combine) against the torch
   backend layer with the same weights (relative Frobenius error, max error, routing agreement),
   and HF transformers' DeepseekV3MoE with ``grouped_mm`` against the same reference;
2. times, interleaved round by round with CUDA events, every call from a synchronised start (so its
   host time counts, as it does for a caller that waits for the result): moegraph triton, moegraph
   torch backend, HF grouped_mm, and the Triton expert op alone (routing precomputed), eager and (unless
   --no-cuda-graphs) replayed from CUDA graphs, beside the same expert FLOPs as two dense cuBLAS
   GEMMs (the reachable peak under the same clocks and heat);
3. prints achieved TFLOP/s and memory bandwidth against the device's peak, both the spec-sheet
   figure and what cuBLAS / a device copy reach here.
It ends with the verdicts of the targets: faster than HF grouped_mm at every size (a speed-up within
3% of 1.00x is a tie, not a win), and at least 50% of peak bfloat16 matmul throughput at 8192 tokens.
Exit status 1 if a correctness check fails.

FLOPs per token: 2 * (K + shared) * 3 * D * F for the experts plus 2 * D * E for the router.
Bytes: the weights of the experts the batch touches (each read once) + shared expert + router
weight + input and output activations; the minimum traffic, so GB/s is a lower bound.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time

from moegraph.argtypes import nonnegative_int, positive_float, positive_int

# Spec-sheet dense bfloat16 tensor-core TFLOP/s and HBM TB/s, matched in this order against
# torch.cuda.get_device_name (the first key contained in the name wins).
PEAKS = [
    ("GH200", 989.0, 4.0),
    ("H200", 989.0, 4.8),
    ("H100 NVL", 835.0, 3.9),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),
    ("H800", 989.0, 3.35),
    ("H20", 148.0, 4.0),
    ("B200", 2250.0, 8.0),
    ("B100", 1750.0, 8.0),
    ("A100-SXM4-80GB", 312.0, 2.039),
    ("A100 80GB PCIe", 312.0, 1.935),
    ("A100", 312.0, 1.555),
    ("L40S", 362.0, 0.864),
    ("A10G", 70.0, 0.6),
]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 16, 128, 1024, 8192])
    ap.add_argument("--iters", type=positive_int, default=10, help="timed rounds per size (median reported)")
    ap.add_argument("--warmup", type=nonnegative_int, default=3)
    ap.add_argument("--tol", type=positive_float, default=2e-2,
                    help="max relative Frobenius error vs the torch backend")
    ap.add_argument("--isolated", action="store_true",
                    help="time each implementation in its own block of rounds instead of interleaving them")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="time eager execution only")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers' DeepseekV3MoE")
    ap.add_argument("--peak-tflops", type=positive_float, default=None, help="override the spec-sheet bf16 TFLOP/s")
    ap.add_argument("--peak-tbps", type=positive_float, default=None, help="override the spec-sheet memory TB/s")
    ap.add_argument("--dry-run", action="store_true", help="deepseek-v3-tiny on CPU under Triton's interpreter")
    return ap.parse_args()


# ----------------------------------------------------------------------------------------------
# Layers sharing one set of weights
# ----------------------------------------------------------------------------------------------


def torch_twin(spec, layer, dtype, device):
    """The torch-backend layer of ``spec`` holding ``layer``'s tensors (assigned, not copied)."""
    import torch

    import moegraph

    ref = moegraph.compile(spec, backend="torch", dtype=dtype, device="meta", seed=None)
    ref.load_state_dict(layer.state_dict(), assign=True)
    for name, buf in list(ref.named_buffers()):
        if buf.is_meta:  # non-persistent training-only buffers
            owner = ref.get_submodule(name.rpartition(".")[0]) if "." in name else ref
            owner.register_buffer(name.rpartition(".")[2], torch.zeros(buf.shape, dtype=buf.dtype, device=device),
                                  persistent=False)
    return ref


def build(spec, device, dtype, with_hf: bool):
    import torch

    import moegraph
    from moegraph.triton_backend.passes import triton_passes

    m, r = spec.moe, spec.moe.router
    tri = moegraph.compile(spec, backend="triton", dtype=dtype, device=device, seed=None, passes=triton_passes(spec))
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in tri.parameters():  # initialised on the device: 11 B parameters do not go through the CPU
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
        tri.router.expert_bias.normal_(0.0, 0.01, generator=g)
    ref = torch_twin(spec, tri, dtype, device)
    impls = {"triton": tri.eval(), "torch": ref.eval()}
    if with_hf:
        from torch import nn
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        cfg = DeepseekV3Config(
            hidden_size=m.hidden_size, moe_intermediate_size=m.experts.intermediate_size,
            n_routed_experts=m.experts.num_experts, num_experts_per_tok=r.top_k,
            n_shared_experts=m.shared_experts.count, n_group=r.groups.num_groups, topk_group=r.groups.topk_groups,
            norm_topk_prob=r.normalize, routed_scaling_factor=r.scaling_factor, hidden_act="silu",
        )
        cfg._experts_implementation = "grouped_mm"
        with torch.device("meta"):
            hf = DeepseekV3MoE(cfg)
        S = m.shared_experts.count * m.shared_intermediate_size
        share = {
            "experts.gate_up_proj": tri.experts.gate_up_proj,
            "experts.down_proj": tri.experts.down_proj,
            "gate.weight": tri.router.weight,
            "shared_experts.gate_proj.weight": tri.shared_experts.gate_up_proj[:S],
            "shared_experts.up_proj.weight": tri.shared_experts.gate_up_proj[S:],
            "shared_experts.down_proj.weight": tri.shared_experts.down_proj,
        }
        for name, t in share.items():
            owner, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(owner), attr, nn.Parameter(t, requires_grad=False))
        hf.gate.e_score_correction_bias = tri.router.expert_bias
        left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
        assert not left, f"HF DeepseekV3MoE tensors not shared: {left}"
        impls["hf_grouped_mm"] = hf.eval()
    return impls


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


# Speed ratios within this fraction of 1.0 are a tie (run-to-run noise of these timings), not a win.
TIE = 0.03


def speed_verdict(ratios: list[tuple[int, float]], tie: float = TIE) -> str:
    """'YES' when every (tokens, speed-up) is a win by more than ``tie``, else the sizes tied and lost."""
    slow = [T for T, r in ratios if r < 1.0 - tie]
    ties = [T for T, r in ratios if T not in slow and not r > 1.0 + tie]
    if not ties and not slow:
        return "YES"
    return "NO: " + "; ".join(f"{what} at {sizes}" for what, sizes in (("a tie", ties), ("slower", slow)) if sizes)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, iters: int, warmup: int, device) -> dict[str, float]:
    """Median milliseconds per call, the implementations interleaved round by round.

    Each call is timed from a synchronised start: on CUDA the device is synchronised before every start
    event (and the end events are read after a final synchronisation), so a call's events cover its host
    time (Python, launches, any sync of its own) as well as its GPU work. Without that, a call's host time
    would overlap the work the call before it had queued and the events would measure GPU time only,
    flattering an implementation that never syncs against one that does.
    """
    import torch

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                synchronize(device)  # nothing queued: the start event runs at once, host time counts
                start.record()
                fn()
                end.record()
                samples[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    if device.type == "cuda":
        return {k: statistics.median(s.elapsed_time(e) for s, e in v) for k, v in samples.items()}
    return {k: statistics.median(v) for k, v in samples.items()}


def time_isolated(fns: dict, iters: int, warmup: int, device) -> dict[str, float]:
    """Median milliseconds per call, each implementation timed alone (all its rounds back to back)."""
    return {name: time_interleaved({name: fn}, iters, warmup, device)[name] for name, fn in fns.items()}


def dense_equivalent(rows: int, experts, dtype, device, g):
    """The expert MLP's FLOPs as two plain cuBLAS GEMMs: ``rows`` rows through one expert's weights.

    No gather, no padding, one weight matrix: what the grouped kernels would run at if routing cost
    nothing. Timed interleaved with the layers, it is a peak measured under the same clocks and
    heat as they are (a short burst of square products, as ``measured_peaks`` runs, reads higher).
    """
    import torch
    import torch.nn.functional as F

    a = torch.randn(rows, experts.gate_up_proj.shape[-1], generator=g, device=device, dtype=torch.float32).to(dtype)
    w_up, w_down = experts.gate_up_proj[0], experts.down_proj[0]
    half = w_up.shape[0] // 2

    def run():
        h = F.linear(a, w_up)
        return F.linear(F.silu(h[:, :half]) * h[:, half:], w_down)

    return run


def cuda_graphed(fn, device):
    """fn replayed from a CUDA graph (None when it cannot be captured, e.g. it syncs with the host)."""
    import torch

    if device.type != "cuda":
        return None
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as exc:  # report and go on without the graphed timing
        print(f"  (cannot capture a CUDA graph: {type(exc).__name__}: {str(exc)[:120]})", flush=True)
        torch.cuda.synchronize(device)
        return None


def measured_peaks(device, dtype) -> tuple[float | None, float | None]:
    """TFLOP/s of one large cuBLAS matmul and TB/s of a large device-to-device copy, here and now."""
    import torch

    if device.type != "cuda":
        return None, None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"mm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, iters=10, warmup=3, device=device)
    return 2 * n**3 / t["mm"] / 1e9, 2 * (2 << 30) / t["copy"] / 1e9


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def choose_device(args, script: str, preset: str, dry_preset: str, dry_tokens: list[int], dry_iters: int,
                  dry_warmup: int):
    """(spec, device, dtype, tokens, device name) for a run: the tiny preset on the CPU under the Triton
    interpreter with ``--dry-run`` (``args.iters``/``args.warmup`` set for it), else the full preset on
    the CUDA GPU in bfloat16; None (after saying why) when there is no GPU."""
    import torch

    import moegraph

    if args.dry_run:
        args.iters, args.warmup = dry_iters, dry_warmup
        return (moegraph.load_spec(dry_preset), torch.device("cpu"), torch.float32, dry_tokens,
                "CPU (Triton interpreter, dry run: times are meaningless)")
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU (or --dry-run for a CPU smoke test)", file=sys.stderr)
        return None
    device = torch.device("cuda")
    return moegraph.load_spec(preset), device, torch.bfloat16, args.tokens, torch.cuda.get_device_name(device)


def main() -> int:
    args = parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch
    import triton

    from moegraph.triton_backend import configs
    from moegraph.triton_backend.passes import router_args

    chosen = choose_device(args, "gpu_bench.py", "deepseek-v3", "deepseek-v3-tiny", [1, 7, 33], 1, 0)
    if chosen is None:
        return 2
    spec, device, dtype, tokens, device_name = chosen
    m = spec.moe
    D, F, E, K = m.hidden_size, m.experts.intermediate_size, m.experts.num_experts, m.top_k
    S = m.shared_experts.count * m.shared_intermediate_size
    SH = S // F
    spec_peak = next(((tf, bw) for key, tf, bw in PEAKS if key in device_name), (None, None))
    peak_tf = args.peak_tflops or spec_peak[0]
    peak_bw = args.peak_tbps or spec_peak[1]
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
        args.no_hf = True
    print(f"device: {device_name}; torch {torch.__version__}, triton {triton.__version__}, transformers {hf_version}")
    print(f"layer: {spec.name}: D={D}, {E} experts of F={F} (swiglu), top-{K}, "
          f"{m.router.groups.num_groups} groups keep {m.router.groups.topk_groups}, {m.shared_experts.count} shared; "
          f"{str(dtype).replace('torch.', '')} weights, float32 router")
    meas_tf, meas_bw = measured_peaks(device, dtype)
    fmt = lambda v, u: "n/a" if v is None else f"{v:.0f} {u}"  # noqa: E731
    print(f"peak: spec sheet {fmt(peak_tf, 'TFLOP/s')} bf16 dense, {fmt(peak_bw and peak_bw * 1e3, 'GB/s')}; "
          f"measured here: cuBLAS {fmt(meas_tf, 'TFLOP/s')}, copy {fmt(meas_bw and meas_bw * 1e3, 'GB/s')}",
          flush=True)

    t0 = time.time()
    try:
        impls = build(spec, device, dtype, with_hf=not args.no_hf)
    except Exception as exc:  # e.g. another transformers version: still check and time our own layers
        if args.no_hf:
            raise
        print(f"HF DeepseekV3MoE could not be built ({type(exc).__name__}: {str(exc)[:200]}); "
              "going on without it", flush=True)
        impls = build(spec, device, dtype, with_hf=False)
    tri, ref = impls["triton"], impls["torch"]
    print(f"built layers in {time.time() - t0:.1f}s (one copy of the weights, shared)", flush=True)
    rargs = router_args(spec)
    ok = True
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    for T in tokens:
        x = torch.randn(1, T, D, generator=g, device=device, dtype=torch.float32).to(dtype)
        # Routing precomputed once, for the op-only timing and the traffic model.
        with torch.inference_mode():
            logits = torch.nn.functional.linear(x.view(T, D).float(), tri.router.weight)
            ids_TK, w_TK = torch.ops.moegraph_triton.route_topk(logits, tri.router.expert_bias, *rargs)
            tok_N = torch.arange(T, device=device).repeat_interleave(K)
            exp_N, w_N = ids_TK.reshape(-1), w_TK.reshape(-1).to(dtype)
            ex, sh = tri.experts, tri.shared_experts
            op = functools.partial(
                torch.ops.moegraph_triton.expert_mlp, x.view(T, D), tok_N, exp_N, w_N, ex.gate_up_proj, ex.down_proj,
                None, None, "silu", True, None, None, sh.gate_up_proj, sh.down_proj, None)
            # Step 1: correctness against the torch backend.
            y_ref = ref(x).float()
            scale = y_ref.norm().item()
            errs = {}
            for name in [n for n in impls if n != "torch"]:
                y = impls[name](x).float()
                errs[name] = ((y - y_ref).norm().item() / scale,
                              (y - y_ref).abs().max().item() / y_ref.abs().max().item())
            errs["op"] = ((op().float().view_as(y_ref) - y_ref).norm().item() / scale, float("nan"))
            ids_tri = tri.graph()(x, None)[2].reshape(T, K).sort(-1).values
            ids_ref = ref.graph()(x, None)[2].reshape(T, K).sort(-1).values
            agree = (ids_tri == ids_ref).all(-1).float().mean().item()
            passed = errs["triton"][0] <= args.tol and errs["op"][0] <= args.tol
            ok &= passed
            print(f"\n[{T} tokens] check vs torch backend: triton rel.err {errs['triton'][0]:.2e} "
                  f"(max {errs['triton'][1]:.2e}), op alone {errs['op'][0]:.2e}, routing agreement {agree:.2%}"
                  + (f"; HF grouped_mm rel.err {errs['hf_grouped_mm'][0]:.2e}" if "hf_grouped_mm" in errs else "")
                  + f" -> {'PASS' if passed else 'FAIL'} (tol {args.tol:g})", flush=True)
            rpe = (T * K + SH * T) / (E + SH)
            cfg = configs.fit(configs.get_config(E, F, T, rpe, dtype, device_name if device.type == "cuda" else None),
                              D, F)
            tuned = device.type == "cuda" and configs.has_table(E, F, device_name, dtype)
            print(f"  kernel config ({'tuned table' if tuned else 'default'}): BLOCK_M={cfg.BLOCK_M} "
                  f"gate_up={cfg.gate_up} down={cfg.down}")
            # Step 2: timing, eager and from CUDA graphs.
            fns = {name: functools.partial(mod, x) for name, mod in impls.items()}
            fns["op"] = op
            fns["dense_equiv"] = dense_equivalent(T * (K + SH), ex, dtype, device, g)
            if not args.no_cuda_graphs:
                for name in ("triton", "hf_grouped_mm", "op"):
                    if name in fns:
                        replay = cuda_graphed(fns[name], device)
                        if replay is not None:
                            fns[name + "+graph"] = replay
            iters = args.iters if T < 4096 else max(3, args.iters // 2)
            times = (time_isolated if args.isolated else time_interleaved)(fns, iters, args.warmup, device)
        touched = torch.unique(ids_TK).numel()
        flops = 2 * T * (K + SH) * 3 * D * F + 2 * T * D * E
        elem = torch.tensor([], dtype=dtype).element_size()
        nbytes = (touched + SH) * 3 * D * F * elem + E * D * 4 + 2 * T * D * elem
        rows.append((T, times, flops, nbytes, touched))

    # Step 3: the table.
    names = list(rows[0][1])
    print(f"\nmedian ms per forward ({args.iters} rounds, {'each alone' if args.isolated else 'interleaved'}, "
          "every call from a synchronised start); '+graph' = replayed CUDA graph; "
          "'op' = Triton expert op with routing precomputed; 'dense_equiv' = the same expert FLOPs as two plain "
          "cuBLAS GEMMs (no gather, no padding: a peak under the same conditions)")
    print(f"{'tokens':>7} " + " ".join(f"{n:>16}" for n in names) + f" {'experts hit':>11}")
    for T, times, _, _, touched in rows:
        print(f"{T:>7} " + " ".join(f"{times.get(n, float('nan')):>16.3f}" for n in names) + f" {touched:>11}")
    print("\nachieved by the Triton layer (eager / op alone / best graphed):")
    print(f"{'tokens':>7} {'TFLOP/s':>22} {'% peak bf16':>18} {'GB/s':>24} {'% peak BW':>18} {'vs HF grouped_mm':>17}")
    verdict_speed, verdict_peak = [], None
    for T, times, flops, nbytes, _ in rows:
        tr = times["triton"]
        best = min(v for k, v in times.items() if k.startswith("triton"))
        cols = [tr, times["op"], best]
        tf = [flops / t / 1e9 for t in cols]
        bw = [nbytes / t / 1e6 for t in cols]
        pct = lambda v, p: "n/a" if p is None else f"{100 * v / p:.0f}%"  # noqa: E731
        hf = times.get("hf_grouped_mm")
        hf_best = min((v for k, v in times.items() if k.startswith("hf_grouped_mm")), default=None)
        speed = "n/a" if hf is None else f"{hf / tr:.2f}x"
        if hf is not None:
            verdict_speed.append((T, hf / tr, hf_best / best))
        print(f"{T:>7} {' / '.join(f'{v:.0f}' for v in tf):>22} "
              f"{' / '.join(pct(v, peak_tf) for v in tf):>18} {' / '.join(f'{v:.0f}' for v in bw):>24} "
              f"{' / '.join(pct(v, peak_bw and peak_bw * 1e3) for v in bw):>18} {speed:>17}")
        if T == max(r[0] for r in rows):  # the target is set at 8192 tokens, the default largest size
            verdict_peak = (T, tf[0], tf[1], flops / times["dense_equiv"] / 1e9)
    print("\nverdicts:")
    print(f"  correctness (rel. Frobenius error <= {args.tol:g} vs torch backend at every size): "
          f"{'PASS' if ok else 'FAIL'}")
    if verdict_speed:
        verdict = speed_verdict([(T, r) for T, r, _ in verdict_speed])
        print(f"  faster than HF grouped_mm at every size (eager, by more than {TIE:.0%}): {verdict}; speed-ups "
              + ", ".join(f"{T}: {r:.2f}x (graphed {rg:.2f}x)" for T, r, rg in verdict_speed))
    if verdict_peak is not None:
        T, layer_tf, op_tf, dense_tf = verdict_peak
        for label, peak in (("spec sheet", peak_tf), ("measured cuBLAS", meas_tf),
                            ("the same FLOPs as dense cuBLAS GEMMs, timed alongside", dense_tf)):
            if peak:
                frac = layer_tf / peak
                print(f"  {T} tokens, {label} peak {peak:.0f} TFLOP/s: layer {100 * frac:.0f}%, op alone "
                      f"{100 * op_tf / peak:.0f}% -> target >= 50%: {'PASS' if frac >= 0.5 else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
