"""Host time of one Triton-backend layer call, kernel launches stubbed out, on any machine.

    python benchmarks/host_overhead.py [--spec deepseek-v3-tiny] [--tokens 1] [--iters 300]

At one token the GPU work of a layer call is a fraction of a millisecond, so the Python between the
launches decides the eager latency (an H200 run timed a 1-token DeepSeek-V3 forward at 0.92 ms alone
and 0.28 ms from a CUDA graph: results/h200_run3_isolated.log). This script runs the layer under
Triton's interpreter with every kernel launch replaced by a no-op, so what it times is moegraph's
own host path: the FX graph, the custom-op dispatch, argument checks, allocations, the alignment/CSR
bookkeeping and the kernel lookups. It times, interleaved round by round (the order alternating), three variants:
- ``shipped``: the layer as shipped;
- ``lookups uncached``: the per-variant kernel lookup caches cleared before every call, with the
  generated-source safety check (``codegen_safe.check_module``, an ``ast.parse`` of each rendered
  kernel module, added after the caches) stubbed out: what every call cost before the caches existed
  (render the templates, hash them, find the imported modules);
- ``uncached + check``: the caches cleared and the safety check run, what every call would cost now
  without the caches (the parse dominates it);
and prints them and their ratios to ``shipped``, then the top of a profile of the shipped path.
Triton's own launch cost on a GPU is not included. Wall-clock: on a shared machine run it when idle,
or compare only the ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

from moegraph.argtypes import positive_int

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="deepseek-v3-tiny")
    ap.add_argument("--tokens", type=positive_int, default=1)
    ap.add_argument("--iters", type=positive_int, default=300)
    args = ap.parse_args()
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported
    import torch
    from triton.runtime import interpreter

    import moegraph
    from moegraph.triton_backend import kernels, render
    from moegraph.triton_backend.passes import triton_passes

    interpreter.InterpretedFunction.run = lambda self, *a, **k: None  # every launch: a no-op

    def clear_lookup_caches() -> None:
        for fn in (kernels._mlp_module_for, kernels._router_module_for, kernels._align_module_for,
                   kernels.router_supported):
            fn.cache_clear()

    try:
        spec = moegraph.load_spec(args.spec)
    except moegraph.MoegraphError as exc:
        ap.error(f"argument --spec: {exc}")
    layer = moegraph.compile(spec, backend="triton", dtype=torch.float32, device="cpu",
                             passes=triton_passes(spec)).eval()
    x = torch.randn(1, args.tokens, spec.moe.hidden_size)
    checked = render.check_module

    def uncached(check: bool):
        clear_lookup_caches()
        render.check_module = checked if check else (lambda source, what: None)
        try:
            return layer(x)
        finally:
            render.check_module = checked

    variants = {"shipped": lambda: layer(x), "lookups uncached": lambda: uncached(False),
                "uncached + check": lambda: uncached(True)}
    samples = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(20):
                fn()
        for i in range(args.iters):
            for name, fn in (list(variants.items()) if i % 2 == 0 else reversed(variants.items())):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e6)
        med = {k: statistics.median(v) for k, v in samples.items()}
        print(f"{spec.name}, {args.tokens} token(s), launches stubbed; median host µs per layer call "
              f"({args.iters} interleaved rounds, {torch.get_num_threads()} threads):")
        for name, us in med.items():
            print(f"  {name:>17}: {us:7.0f} µs")
        print(f"  uncached / shipped: {med['lookups uncached'] / med['shipped']:.2f}x (safety check stubbed; "
              f"with it {med['uncached + check'] / med['shipped']:.2f}x)")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            layer(x)
        prof.disable()
    print("\nshipped path, top of the profile (100 calls):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
