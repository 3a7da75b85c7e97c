"""A cluster plan for DeepSeek-V3 (58 MoE layers x 256 experts, 4 nodes x 8 GPUs, 288 slots) from traces.

    python examples/plan_deepseek_v3.py [--trace FILE_OR_FOLDER ...] [-o plan.json]

Real DeepSeek-V3 routing traces are not bundled; without --trace the example plans from synthetic
skewed, topic-clustered traces (``moegraph.traces.synthetic_traces``) and says so. With a recorded
trace (e.g. an SGLang dump imported with ``moegraph trace import``) the same code plans for real.
"""

from __future__ import annotations

import argparse
import time

import moegraph
from moegraph.traces import load_traces, synthetic_traces
from moegraph.argtypes import positive_int


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="append", help="trace file, folder or bundled name (repeatable)")
    ap.add_argument("-o", "--output", default="plan-deepseek-v3.json")
    ap.add_argument("--tokens", type=positive_int, default=8192, help="synthetic tokens per layer when no --trace")
    args = ap.parse_args()

    spec = moegraph.load_spec("deepseek-v3")
    if args.trace:
        try:
            traces = load_traces(args.trace, spec=spec)
        except moegraph.MoegraphError as exc:
            ap.error(f"argument --trace: {exc}")
        print(f"traces: {traces.name} ({traces.num_tokens} tokens)")
    else:
        traces = synthetic_traces(spec.model.num_moe_layers, spec.moe.experts.num_experts, spec.moe.top_k,
                                  args.tokens, tokens_per_sample=32, seed=0, name="synthetic-deepseek-v3")
        print(f"traces: synthetic (not real data): {traces.num_tokens} tokens x top-{spec.moe.top_k}, "
              f"{traces.num_layers} layers")
    t0 = time.perf_counter()
    plan = moegraph.plan(spec, traces)
    took = time.perf_counter() - t0
    plan.save(args.output)
    print(f"planned {plan.num_layers} layers x {plan.num_experts} experts onto {plan.num_gpus} GPUs "
          f"({plan.slots_per_gpu} slots each) in {took:.1f}s -> {args.output}")
    print(f"policy: {plan.policy['name']}")
    means = {k: plan.metrics[k]["mean"] for k in ("plan", "load_only", "contiguous")}
    print(f"{'':>12} {'max/mean load':>14} {'remote GPU copies/token':>24} {'remote node copies/token':>25}")
    for name, m in means.items():
        print(f"{name:>12} {m['max_mean_load']:>14.3f} {m['remote_gpu']:>24.3f} {m['remote_node']:>25.3f}")


if __name__ == "__main__":
    main()
