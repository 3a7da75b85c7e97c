"""FP8 experts vs the bfloat16 layer on the CPU, decode-sized batches, side by side.

    python benchmarks/fp8_bench.py [--tokens 1 2 4 8 16] [--rounds 15] [--threads N]

The DeepSeek-V3-shaped CPU layer of ``moegraph bench`` (hidden 1024, 64 experts of 256, top-6, one
shared expert) compiled twice from the same seed: experts in bfloat16, and in FP8 (e4m3, 128x128
blocks, 1x128 activation tiles, shared expert quantized too). Both run in eval mode on the same
bfloat16 input, interleaved round by round in ABBA order; the script prints the median time per
forward of each, their ratio (FP8 / bf16: below 1 means FP8 is faster), the expert bytes each layer
holds, the relative difference of the outputs (what FP8 rounding costs), the path each layer's
experts took (tuned on the size's first, untimed call: ``native`` is the C decode kernel of
``moegraph.native``) and the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import moegraph
from moegraph import tuning
from moegraph.bench import BENCH_SPEC, machine_line


def _layers():
    fp8 = copy.deepcopy(BENCH_SPEC)
    fp8["name"] = "deepseek-v3-bench-fp8"
    fp8["moe"]["quantization"] = {"format": "fp8_e4m3", "shared_experts": True}
    return (moegraph.compile(BENCH_SPEC, dtype=torch.bfloat16).eval(),
            moegraph.compile(fp8, dtype=torch.bfloat16).eval())


def _expert_bytes(layer) -> int:
    return sum(t.nbytes for mod in (layer.experts, layer.shared_experts) for t in mod.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuner = tuning.active_tuner() or tuning.enable_tuning(None)
    bf16, fp8 = _layers()
    print(machine_line(torch.bfloat16, train=False))
    print(f"expert bytes: bf16 {_expert_bytes(bf16) / 2**20:.1f} MiB, FP8 + scales {_expert_bytes(fp8) / 2**20:.1f} MiB "
          f"({_expert_bytes(fp8) / _expert_bytes(bf16):.3f}x)")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'tokens':>6} {'bf16 ms':>9} {'fp8 ms':>9} {'fp8/bf16':>9} {'rel. diff':>10}  paths (bf16 | fp8)")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for T in args.tokens:
            x = torch.randn(T, BENCH_SPEC["moe"]["hidden_size"], generator=g).bfloat16()
            ref = bf16(x)  # first calls (graph building, tuning) stay out of the timings
            paths_bf16 = _paths(tuner, T)
            out = fp8(x)
            paths_fp8 = _paths(tuner, T, "fp8,")
            diff = float((out.float() - ref.float()).norm() / ref.float().norm())
            times: dict[str, list[float]] = {"bf16": [], "fp8": []}
            for r in range(args.rounds):
                pair = [("bf16", bf16), ("fp8", fp8)]
                for name, layer in (pair if r % 2 == 0 else pair[::-1]):  # ABBA
                    t0 = time.perf_counter()
                    layer(x)
                    times[name].append(time.perf_counter() - t0)
            b, f = (statistics.median(times[k]) * 1e3 for k in ("bf16", "fp8"))
            print(f"{T:>6} {b:>9.2f} {f:>9.2f} {f / b:>9.2f} {diff:>10.4f}  {paths_bf16} | {paths_fp8}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _paths(tuner, T: int, prefix: str = "") -> str:
    """The tuned choices for this size's bucket (routed and shared experts), as 'a/b'."""
    bucket = f"T<={tuning.token_bucket(T)}"
    return "/".join(sorted({v for k, v in tuner.choices().items() if k.endswith(bucket)
                            and k.startswith("fp8,") == (prefix == "fp8,")})) or "-"


if __name__ == "__main__":
    main()
