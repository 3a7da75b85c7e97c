"""Mixed-precision training: a float32 layer's training step under torch.autocast, against float32.

    python benchmarks/autocast_bench.py [--tokens 256 2048] [--rounds 7] [--dtype bfloat16]
                                        [--device cuda] [--backend triton]

A float32 layer in training mode under ``torch.autocast`` computes as the layer compiled in the autocast
dtype would (its weights rounded for the forward, the router in float32) and its float32 weights get the
gradients (``runtime.CompiledMoEBase._autocast_training_dtype``). Timed here, interleaved round by round
in one process (median of the rounds), on one layer (DeepSeek-V3-shaped, scaled to a small CPU: D 1024,
64 routed experts of 256, top-6 in 8 groups keeping 4, one shared expert), a forward and backward each:

- ``float32``: the layer without autocast;
- ``autocast``: the same layer under ``torch.autocast(device, dtype)``;
- ``made in dtype``: the layer compiled in that dtype (no float32 master weights, no casts).

It also prints the autocast output's relative error against float32 and checks that it equals the
layer made in the dtype, bit for bit. On a CPU without 16-bit matrix units autocast is slower (the
products run no faster and the casts are extra); the dtype's speed-up is the GPU's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from moegraph.argtypes import positive_int

import moegraph
from moegraph.bench import BENCH_SPEC

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[256, 2048])
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backend", choices=["torch", "triton"], default="torch")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda is not available here")
    torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    spec = moegraph.load_spec(BENCH_SPEC)
    passes = None
    if args.backend == "triton":
        from moegraph.triton_backend.passes import triton_passes

        passes = triton_passes(spec)
    layer = moegraph.compile(spec, dtype=torch.float32, seed=0, device=device, backend=args.backend,
                             passes=passes).train()
    made = moegraph.compile(spec, dtype=dtype, seed=None, device=device, backend=args.backend, passes=passes).train()
    made.load_state_dict(layer.state_dict())
    D = spec.moe.hidden_size
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"layer {spec.name}: D={D}, {spec.moe.experts.num_experts} experts of {spec.moe.experts.intermediate_size}, "
          f"top-{spec.moe.top_k}; backend {args.backend}; training step = forward + backward of sum(y^2); {where}; "
          f"torch {torch.__version__}; median of {args.rounds} interleaved rounds")
    print(f"{'tokens':>7} {'float32 ms':>11} {'autocast ms':>12} {'made ms':>9} {'f32/autocast':>13} "
          f"{'autocast/made':>14} {'rel.err vs f32':>15} {'= made':>7}")
    ok = True
    for T in args.tokens:
        x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T)).to(device)

        def f32():
            layer(x).square().sum().backward()

        def mixed():
            with torch.autocast(x.device.type, dtype=dtype):
                y = layer(x)
            y.float().square().sum().backward()

        def native():
            made(x.to(dtype)).float().square().sum().backward()

        fns = {"float32": f32, "autocast": mixed, "made": native}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():  # warm-up: graphs, workspaces
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                layer.zero_grad(set_to_none=True)
                made.zero_grad(set_to_none=True)
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        with torch.no_grad():
            ref = layer(x)
            with torch.autocast(x.device.type, dtype=dtype):
                got = layer(x)
            same = torch.equal(got, made(x.to(dtype)))
        ok &= same
        err = float((got.float() - ref).norm() / ref.norm())
        print(f"{T:>7} {med['float32']:>11.1f} {med['autocast']:>12.1f} {med['made']:>9.1f} "
              f"{med['float32'] / med['autocast']:>12.2f}x {med['autocast'] / med['made']:>13.2f}x {err:>15.2e} "
              f"{'yes' if same else 'NO':>7}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
