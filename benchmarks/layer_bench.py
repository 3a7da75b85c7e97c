"""Compiled moegraph layer vs HF transformers' DeepseekV3MoE (eager and grouped_mm), side by side.

    python benchmarks/layer_bench.py [--tokens 1 16 64 128 2048] [--rounds 7] [--threads N]
                                     [--dtype float32 bfloat16] [--train] [--strategy auto|NAME]
                                     [--tune-cache DIR]

Runs every implementation interleaved in one process on the same input on the issue's
DeepSeek-V3-shaped CPU layer (hidden 1024, 64 experts of 256, top-6, 8 groups keep 4, one shared
expert), in each requested dtype (HF in the same dtype, its router in float32 as in transformers),
and prints the CPU model, thread count, times, the speed-up over the faster HF implementation, the
distance to the machine's limit for each size (same FLOPs as one matmul, or reading the touched
expert weights, whichever takes longer) and the expert strategy moegraph ran. ``--train`` times a
training step (forward + backward in train mode) instead of an eval forward. Outputs are checked
against each other before timing. Strategies are tuned on each size's first (untimed) call; with
``--tune-cache`` the choices are kept in (and read from) that folder.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from moegraph.argtypes import nonnegative_int, positive_int

from moegraph import strategies, tuning
from moegraph.bench import BENCH_SPEC, format_rows, machine_line, run_layer_bench
from moegraph.runtime import torch_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 16, 64, 128, 2048])
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--threads", type=nonnegative_int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--train", action="store_true", help="time training steps (forward + backward)")
    ap.add_argument("--strategy", default="auto", choices=["auto", *strategies.STRATEGIES],
                    help="pin moegraph's expert strategy (default auto: tuned)")
    ap.add_argument("--tune-cache", default=None, help="folder of the tuned strategy table (default: memory)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuner = tuning.enable_tuning(args.tune_cache)
    for name in args.dtype:
        dtype = torch_dtype(name)
        t0 = time.perf_counter()
        rows = run_layer_bench(BENCH_SPEC, tuple(args.tokens), rounds=args.rounds, dtype=dtype, train=args.train,
                               expert_strategy=args.strategy,
                               progress=lambda m, n=name: print(f"[{n}] {m}", file=sys.stderr, flush=True))
        names = list(rows[0].times)
        header = ["tokens", *[f"{n} ms" for n in names], "limit ms", "vs best HF", "vs limit", "strategy"]
        print(machine_line(dtype, args.train))
        print(" | ".join(f"{h:>14}" for h in header))
        for cells in format_rows(rows):
            print(" | ".join(f"{c:>14}" for c in cells))
        print(f"({time.perf_counter() - t0:.0f} s for this table, of which tuning "
              f"{tuner.tuning_seconds:.1f} s so far in all)")
    print("vs best HF = (faster HF time) / moegraph time; vs limit = moegraph time / limit")


if __name__ == "__main__":
    main()
