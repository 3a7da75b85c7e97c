"""A user's own naive MoE (a Python loop over an nn.ModuleList of experts), recognised and swapped.

    python examples/naive_moe_swap.py            # 4 MoE blocks, 64 experts, 512 tokens
    python examples/naive_moe_swap.py --small    # CI size

``moegraph.optimize`` has no table entry for this class: it matches the structure (a router
``nn.Linear`` with one output per expert of an ``nn.ModuleList`` of identical MLPs), traces the
block with torch.fx to confirm that the router's output reaches the top-k that selects the experts,
probes it with stand-in experts to read the routing exactly (softmax, top-k, renormalised), reads
each expert MLP from its own FX graph, and checks the compiled replacement numerically before
swapping it in. The outputs stay the same; the speed-up is measured side by side in this process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import moegraph
from moegraph.argtypes import nonnegative_int, positive_int


class SwiGLU(nn.Module):
    """One expert: w2(silu(w1 x) * w3 x), the Llama/Mixtral MLP."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class NaiveMoE(nn.Module):
    """Top-k softmax routing, renormalised, and a loop over every expert."""

    def __init__(self, d: int, f: int, num_experts: int, k: int):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLU(d, f) for _ in range(num_experts)])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).softmax(dim=-1)
        weights, chosen = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot].unsqueeze(-1))
        return out.reshape(shape)


class TinyModel(nn.Module):
    """Residual stack of norm -> naive MoE blocks."""

    def __init__(self, d: int, f: int, num_experts: int, k: int, layers: int):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])
        self.moes = nn.ModuleList([NaiveMoE(d, f, num_experts, k) for _ in range(layers)])

    def forward(self, h):
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return h


def median_time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = {"hidden": (256, 32), "expert_size": (256, 32), "experts": (64, 8), "top_k": (4, 2), "layers": (4, 2),
             "tokens": (512, 64), "repeats": (7, 3)}  # option: (default, default with --small)
    for name, (full, small) in sizes.items():
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, default=None,
                       help=f"default {full} ({small} with --small)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--small", action="store_true", help="tiny sizes for CI (sizes given explicitly are kept)")
    args = p.parse_args()
    for name, (full, small) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    if args.top_k > args.experts:
        p.error(f"argument --top-k: at most --experts ({args.experts}), got {args.top_k}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console

    console = Console()
    torch.manual_seed(0)
    model = TinyModel(args.hidden, args.expert_size, args.experts, args.top_k, args.layers).eval()
    baseline = copy.deepcopy(model)
    x = torch.randn(1, args.tokens, args.hidden)

    moegraph.optimize(model)
    console.print(model.moegraph_report)
    swapped = len(model.moegraph_report.swapped)
    print(f"swapped {swapped} of {args.layers} naive MoE blocks")
    if swapped != args.layers:
        raise SystemExit("not every block was swapped; see the reasons above")

    with torch.no_grad():
        ref, out = baseline(x), model(x)
    diff = float((out - ref).abs().max())
    print(f"max |output diff| = {diff:.2e}")
    if diff > 1e-4 * max(1.0, float(ref.abs().max())):
        raise SystemExit("outputs differ")

    with torch.no_grad():
        for m in (baseline, model):
            m(x)  # warm up
        t_naive, t_mg = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            t_naive.append(median_time(lambda: baseline(x), 1))
            t_mg.append(median_time(lambda: model(x), 1))
    naive, mg = statistics.median(t_naive), statistics.median(t_mg)
    print(f"naive loop: {naive * 1e3:.1f} ms   moegraph: {mg * 1e3:.1f} ms   "
          f"({args.layers} layers, {args.tokens} tokens, {args.experts} experts, top-{args.top_k}, "
          f"{torch.get_num_threads()} threads)")
    print(f"speed-up: {naive / mg:.2f}x")


if __name__ == "__main__":
    main()
