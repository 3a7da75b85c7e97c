"""FP8 experts vs the bfloat16 layer on the CPU, decode-sized batches, side by side.

    python benchmarks/fp8_bench.py [--tokens 1 2 4 8 16] [--rounds 15] [--threads N] [--layer bench|v3-experts]
                                   [--fresh] [--clock wall|cpu]

Two layers compiled from the same spec and seed: experts in bfloat16, and in FP8 (e4m3, 128x128
blocks, 1x128 activation tiles, shared expert quantized too). ``--layer bench`` (the default) is the
DeepSeek-V3-shaped CPU layer of ``moegraph bench`` (hidden 1024, 64 experts of 256, top-6, one shared
expert); ``--layer v3-experts`` has DeepSeek-V3's own expert shapes (hidden 7168, experts of 2048)
with 8 routed experts, top-2, and one shared expert, so that it fits a small machine's memory (0.8 GB
of bf16 experts), and every forward reads its experts' weights from memory, not from the CPU's cache.

Both run in eval mode on the same bfloat16 input, interleaved round by round in ABBA order; with
``--fresh`` every round draws new tokens (as decoding does: each step routes to other experts, so
the touched weights are less often still in cache), else the same tokens every round. The script
prints the median time per forward of each, their ratio (FP8 / bf16: below 1 means FP8 is faster),
the ratio of the best times too (less sensitive to other programs on a shared machine; ``--clock
cpu`` times this process's CPU time instead of wall time, for the same reason), the expert
bytes each layer holds, the relative difference of the outputs (what FP8 rounding costs), the path
each layer's experts took (tuned on the size's first, untimed call: ``native`` is the C decode kernel
of ``moegraph.native``) and the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from moegraph.argtypes import nonnegative_int, positive_int

import moegraph
from moegraph import tuning
from moegraph.bench import BENCH_SPEC, machine_line


def _spec(layer: str) -> dict:
    spec = copy.deepcopy(BENCH_SPEC)
    if layer == "v3-experts":
        spec["name"] = "deepseek-v3-experts-8"
        spec["description"] = "DeepSeek-V3 expert shapes (hidden 7168, experts of 2048), 8 routed experts, top-2"
        spec["moe"]["hidden_size"] = 7168
        spec["moe"]["experts"].update(num_experts=8, intermediate_size=2048)
        spec["moe"]["router"].update(top_k=2)
        del spec["moe"]["router"]["groups"]
    return spec


def _layers(layer: str):
    bf16 = _spec(layer)
    fp8 = copy.deepcopy(bf16)
    fp8["name"] += "-fp8"
    fp8["moe"]["quantization"] = {"format": "fp8_e4m3", "shared_experts": True}
    return moegraph.compile(bf16, dtype=torch.bfloat16).eval(), moegraph.compile(fp8, dtype=torch.bfloat16).eval()


def _expert_bytes(layer) -> int:
    return sum(t.nbytes for mod in (layer.experts, layer.shared_experts) for t in mod.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=positive_int, default=15)
    ap.add_argument("--threads", type=nonnegative_int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--layer", choices=["bench", "v3-experts"], default="bench")
    ap.add_argument("--fresh", action="store_true", help="new tokens every round (else the same tokens)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (all its threads; on a shared machine other "
                         "programs inflate it far less: use it with --threads 1, as idle threads spin in CPU time)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuner = tuning.active_tuner() or tuning.enable_tuning(None)
    bf16, fp8 = _layers(args.layer)
    spec = _spec(args.layer)
    D = spec["moe"]["hidden_size"]
    print(machine_line(torch.bfloat16, train=False))
    print(f"layer: {spec['description']}; {'new' if args.fresh else 'the same'} tokens every round; "
          f"{args.clock} time")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"expert bytes: bf16 {_expert_bytes(bf16) / 2**20:.1f} MiB, FP8 + scales {_expert_bytes(fp8) / 2**20:.1f} MiB "
          f"({_expert_bytes(fp8) / _expert_bytes(bf16):.3f}x)")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'tokens':>6} {'bf16 ms':>9} {'fp8 ms':>9} {'fp8/bf16':>9} {'best/best':>9} {'rel. diff':>10}  "
          "paths (bf16 | fp8)")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for T in args.tokens:
            xs = [torch.randn(T, D, generator=g).bfloat16() for _ in range(args.rounds if args.fresh else 1)]
            ref = bf16(xs[0])  # first calls (graph building, tuning) stay out of the timings
            paths_bf16 = _paths(tuner, T)
            out = fp8(xs[0])
            paths_fp8 = _paths(tuner, T, "fp8,")
            diff = float((out.float() - ref.float()).norm() / ref.float().norm())
            times: dict[str, list[float]] = {"bf16": [], "fp8": []}
            for r in range(args.rounds):
                x = xs[r % len(xs)]
                pair = [("bf16", bf16), ("fp8", fp8)]
                for name, layer in (pair if r % 2 == 0 else pair[::-1]):  # ABBA
                    t0 = clock()
                    layer(x)
                    times[name].append(clock() - t0)
            b, f = (statistics.median(times[k]) * 1e3 for k in ("bf16", "fp8"))
            best = min(times["fp8"]) / min(times["bf16"])
            print(f"{T:>6} {b:>9.2f} {f:>9.2f} {f / b:>9.2f} {best:>9.2f} {diff:>10.4f}  {paths_bf16} | {paths_fp8}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _paths(tuner, T: int, prefix: str = "") -> str:
    """The tuned choices for this size's bucket (routed and shared experts), as 'a/b'."""
    bucket = f"T<={tuning.token_bucket(T)}"
    return "/".join(sorted({v for k, v in tuner.choices().items() if k.endswith(bucket)
                            and k.startswith("fp8,") == (prefix == "fp8,")})) or "-"


if __name__ == "__main__":
    main()
