"""The expert op's backward: the explicit opaque op against backward by autograd recomputation.

    python benchmarks/backward_bench.py [--tokens 1024] [--rounds 9]

The op's backward used to re-run the differentiable torch reference under autograd and
differentiate it (exact, but opaque to torch.compile's backward tracing and slow). Both backward
functions are timed here on one layer (D 512, 32 experts of 256, top-4, one shared expert, float32,
2 threads), interleaved round by round, and their gradients compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from moegraph.argtypes import positive_int

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moegraph
from moegraph import ops


def recompute_backward(ctx, grad_TD):
    """The previous backward: rerun the differentiable reference with autograd and differentiate it."""
    inputs = list(ctx.inputs)
    need = [i for i in ops._TENSOR_ARGS if isinstance(inputs[i], torch.Tensor) and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        leaves = {}
        for i in need:
            leaves[i] = inputs[i].detach().requires_grad_(True)
            inputs[i] = leaves[i]
        y = ops._expert_mlp_impl(*inputs)
        grads = torch.autograd.grad(y, [leaves[i] for i in need], grad_TD, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * 15
    for i, g in zip(need, grads):
        out[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=positive_int, default=1024)
    ap.add_argument("--rounds", type=positive_int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(2)
    d = moegraph.load_spec("deepseek-v3-tiny").to_dict()
    d["moe"]["hidden_size"] = 512
    d["moe"]["experts"].update(num_experts=32, intermediate_size=256)
    layer = moegraph.compile(moegraph.load_spec(d), dtype=torch.float32, seed=0).train()
    x = torch.randn(args.tokens, 512, requires_grad=True)
    variants = {"explicit op": ops._backward, "autograd recompute": recompute_backward}

    def run(fn):
        ops.expert_mlp.register_autograd(fn, setup_context=ops._setup_context)
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        t0 = time.perf_counter()
        y.sum().backward()
        return time.perf_counter() - t0, [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()
                                                              if p.grad is not None]

    try:
        times = {k: [] for k in variants}
        grads = {}
        for r in range(args.rounds + 2):
            for name, fn in variants.items():
                dt, grads[name] = run(fn)
                if r >= 2:  # two warm-up rounds
                    times[name].append(dt)
    finally:
        ops.expert_mlp.register_autograd(ops._backward, setup_context=ops._setup_context)
    for name, ts in times.items():
        print(f"{name:20s} backward median {statistics.median(ts) * 1e3:7.1f} ms")
    ratio = statistics.median(times["autograd recompute"]) / statistics.median(times["explicit op"])
    diff = max((a - b).abs().max().item() for a, b in zip(grads["explicit op"], grads["autograd recompute"]))
    print(f"explicit op is {ratio:.2f}x faster; largest gradient difference {diff:.2e} "
          f"over {len(grads['explicit op'])} tensors")


if __name__ == "__main__":
    main()
