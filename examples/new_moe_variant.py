"""A new MoE variant from a spec file alone: compile it, check it against a plain reference, time it.

    python examples/new_moe_variant.py [--spec examples/specs/sqrt-softplus-geglu.yaml] [--tokens 512]

The reference below is written plainly from the spec's definition (per-expert loop, no moegraph
code); the compiled layer must match it to 1e-5 (outputs and gradients), then both are timed side by
side in eval mode.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moegraph
from moegraph.argtypes import positive_int

HERE = Path(__file__).resolve().parent


def reference(layer, spec, x_TD: torch.Tensor) -> torch.Tensor:
    """sqrt-softplus group-limited top-k, capacity by weight, clamped tanh-GeGLU, gated shared expert."""
    r, ex = spec.moe.router, spec.moe.experts
    E, K, G = ex.num_experts, r.top_k, r.groups.num_groups
    T = x_TD.shape[0]
    logits = x_TD @ layer.router.weight.T
    scores = torch.sqrt(F.softplus(logits))
    per_group = scores.view(T, G, E // G)
    group_score = per_group.topk(r.groups.top_n, dim=-1).values.sum(-1)
    keep = torch.zeros(T, G, dtype=torch.bool).scatter_(1, group_score.topk(r.groups.topk_groups, -1).indices, True)
    masked = per_group.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, E)
    ids = masked.topk(K, dim=-1).indices
    w = scores.gather(1, ids)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * r.scaling_factor
    # Capacity: each expert keeps its highest-weight assignments.
    cap = max(r.capacity.min_capacity, math.ceil(r.capacity.factor * T * K / E))
    keep_TK = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        t_idx, k_idx = (ids == e).nonzero(as_tuple=True)
        best = w[t_idx, k_idx].argsort(descending=True, stable=True)[:cap]
        keep_TK[t_idx[best], k_idx[best]] = True
    y = torch.zeros_like(x_TD)
    F_ = ex.intermediate_size
    for e in range(E):
        t_idx, k_idx = ((ids == e) & keep_TK).nonzero(as_tuple=True)
        if len(t_idx) == 0:
            continue
        h = x_TD[t_idx] @ layer.experts.gate_up_proj[e].T
        gate = h[:, :F_].clamp(max=ex.gate_clamp)
        out = (F.gelu(gate, approximate="tanh") * h[:, F_:]) @ layer.experts.down_proj[e].T
        y = y.index_add(0, t_idx, out * w[t_idx, k_idx].unsqueeze(-1))
    S = spec.moe.shared_intermediate_size
    hs = x_TD @ layer.shared_experts.gate_up_proj.T
    shared = (F.gelu(hs[:, :S].clamp(max=ex.gate_clamp), approximate="tanh") * hs[:, S:]) @ layer.shared_experts.down_proj.T
    return y + torch.sigmoid(x_TD @ layer.shared_expert_gate.weight.T) * shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(HERE / "specs" / "sqrt-softplus-geglu.yaml"))
    ap.add_argument("--tokens", type=positive_int, default=512)
    ap.add_argument("--rounds", type=positive_int, default=7)
    args = ap.parse_args()

    try:
        spec = moegraph.load_spec(args.spec)
    except moegraph.MoegraphError as exc:
        ap.error(f"argument --spec: {exc}")
    layer = moegraph.compile(spec, dtype=torch.float32, seed=0)
    print(f"{spec.name} (hash {spec.short_hash}): {spec.description}")

    # Step 1: outputs and gradients against the plain reference.
    x = torch.randn(args.tokens, spec.moe.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer.train()
    y = layer(x)
    y_ref = reference(layer, spec, x)
    g = torch.randn_like(y)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], g, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-5, atol=1e-5)
    print(f"matches the plain reference: outputs and {len(grads)} gradients within 1e-5 ({args.tokens} tokens)")

    # Step 2: time both in eval mode, interleaved.
    layer.eval()
    xe = x.detach()
    fns = {"moegraph": lambda: layer(xe), "reference": lambda: reference(layer, spec, xe)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"eval forward, {args.tokens} tokens: moegraph {med['moegraph']:.2f} ms, plain reference "
          f"{med['reference']:.2f} ms, speed-up {med['reference'] / med['moegraph']:.2f}x")


if __name__ == "__main__":
    main()
