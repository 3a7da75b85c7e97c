"""Compiled moegraph layer vs HF transformers' DeepseekV3MoE (eager and grouped_mm), side by side.

    python benchmarks/layer_bench.py [--tokens 1 16 128 2048] [--rounds 7] [--threads N]

Runs every implementation interleaved in one process on the same input (forward, eval, float32) on
the issue's DeepSeek-V3-shaped CPU layer (hidden 1024, 64 experts of 256, top-6, 8 groups keep 4,
one shared expert) and prints times, the speed-up over the faster HF implementation, and the
distance to the machine's limit for each size (same FLOPs as one matmul, or reading the touched
expert weights, whichever takes longer). Outputs are checked against each other before timing.
"""

from __future__ import annotations

import argparse

import torch

from moegraph.bench import BENCH_SPEC, format_rows, run_layer_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 2048])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_layer_bench(BENCH_SPEC, tuple(args.tokens), rounds=args.rounds)
    names = list(rows[0].times)
    header = ["tokens", *[f"{n} ms" for n in names], "limit ms", "vs best HF", "vs limit"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, forward eval float32")
    print(" | ".join(f"{h:>14}" for h in header))
    for cells in format_rows(rows):
        print(" | ".join(f"{c:>14}" for c in cells))
    print("vs best HF = (faster HF time) / moegraph time; vs limit = moegraph time / limit")


if __name__ == "__main__":
    main()
