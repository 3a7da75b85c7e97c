"""``moegraph plan --plot``: one figure with load per GPU, the co-activation heat map and the placement.

Needs matplotlib (``pip install moegraph[plot]``); drawn with the Agg backend, written to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MoegraphError

if TYPE_CHECKING:
    from ..traces import TraceSet
    from .planfile import Plan

__all__ = ["plot_plan"]


def plot_plan(plan: Plan, traces: TraceSet | None, path: str | Path, layer: int = 0) -> Path:
    """Save a 3-panel figure for one MoE layer of ``plan`` (traffic from ``traces``) to ``path``."""
    from ..errors import require

    require("matplotlib", "plot", "--plot").use("Agg")
    import matplotlib.pyplot as plt
    from ..traces import coactivation
    from . import baseline_plans
    from .cost import expected_gpu_load
    from .dispatch import choose_replicas, source_gpus

    if not 0 <= layer < plan.num_layers:
        raise MoegraphError(f"--layer {layer} is outside the plan's MoE layers 0..{plan.num_layers - 1}")
    g, e = plan.num_gpus, plan.num_experts
    base = baseline_plans(plan.spec, traces)["load_only"]

    def gpu_load(p):
        if traces is None:
            return expected_gpu_load(p, layer, np.ones(e))
        if traces.load_only:
            return expected_gpu_load(p, layer, traces.counts[layer].astype(float))
        src = source_gpus(traces, g)
        slots = choose_replicas(p, layer, traces.topk[layer], src)
        return np.bincount((slots // p.slots_per_gpu).ravel(), minlength=g).astype(float)

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.1, 1.2, 1.2]})
    # Panel 1: load per GPU, plan beside the load-only baseline.
    ax = axes[0]
    lp, lb = gpu_load(plan), gpu_load(base)
    x = np.arange(g)
    ax.bar(x - 0.2, lp / max(lp.mean(), 1e-12), 0.4, label=f"plan (max/mean {lp.max() / max(lp.mean(), 1e-12):.3f})")
    ax.bar(x + 0.2, lb / max(lb.mean(), 1e-12), 0.4, label=f"load-only (max/mean {lb.max() / max(lb.mean(), 1e-12):.3f})")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("GPU")
    ax.set_ylabel("load / mean")
    ax.set_title(f"MoE layer {layer}: load per GPU")
    ax.legend(fontsize=8)
    # Panel 2: co-activation, experts ordered by the GPU that holds their first replica.
    ax = axes[1]
    first_gpu = np.full(e, g)
    for p_slot, ex in enumerate(plan.physical_to_logical_map[layer]):
        first_gpu[ex] = min(first_gpu[ex], p_slot // plan.slots_per_gpu)
    order = np.lexsort((np.arange(e), first_gpu))
    if traces is not None and not traces.load_only:
        w = coactivation(traces.topk[layer], e) / max(traces.num_tokens, 1)
        im = ax.imshow(w[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, label="tokens choosing both / token")
        bounds = np.flatnonzero(np.diff(first_gpu[order])) + 0.5
        for b in bounds:
            ax.axhline(b, color="w", lw=0.6)
            ax.axvline(b, color="w", lw=0.6)
        ax.set_title("co-activation, experts grouped by GPU")
    else:
        ax.text(0.5, 0.5, "no co-activation\n(load-only or no traces)", ha="center", va="center")
        ax.set_axis_off()
    # Panel 3: placement grid: GPU x slot, expert id, shaded by its load.
    ax = axes[2]
    spg = plan.slots_per_gpu
    grid = plan.physical_to_logical_map[layer].reshape(g, spg)
    load_e = traces.counts[layer] / max(traces.counts[layer].mean(), 1e-12) if traces is not None else np.ones(e)
    reps = np.bincount(plan.physical_to_logical_map[layer], minlength=e)
    shade = (load_e / reps)[grid]
    im = ax.imshow(shade, cmap="magma_r", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, label="replica load / mean expert load")
    dark = shade > 0.6 * shade.max()
    for gi in range(g):
        for si in range(spg):
            ex = grid[gi, si]
            ax.text(si, gi, f"{ex}{'*' if reps[ex] > 1 else ''}", ha="center", va="center", fontsize=6,
                    color="w" if dark[gi, si] else "k")
    ax.set_xlabel("slot on GPU")
    ax.set_ylabel("GPU")
    ax.set_title("placement (* = replicated)")
    fig.suptitle(f"{plan.spec.name}: {plan.num_gpus} GPUs, {plan.num_slots} slots, policy {plan.policy.get('name', '?')}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
