"""``moegraph plan --plot`` and the demo's picture: what the plan saves, over all layers and in one.

Top row, every MoE layer: remote GPU copies per token (what the all-to-all sends) and max/mean GPU
load, for the plan beside the load-only (EPLB-style) and contiguous baselines; the title states the
communication saved against load-only. Bottom row, one chosen layer: load per GPU, the co-activation
heat map with experts grouped by GPU, and the placement grid.

Needs matplotlib (``pip install 'moegraph[plot]'``); drawn with the Agg backend, written to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MoegraphError, require
from ..fileio import write_atomically

if TYPE_CHECKING:
    from ..traces import TraceSet
    from .planfile import Plan

__all__ = ["literal", "plot_plan", "saving_summary"]

# One colour per placement, the same in every panel.
COLORS = {"plan": "#1f77b4", "load_only": "#ff7f0e", "contiguous": "#7f7f7f"}
LABELS = {"plan": "plan", "load_only": "load-only (EPLB-style)", "contiguous": "contiguous"}


def literal(text: Any) -> str:
    """``text`` as matplotlib shows it verbatim: every ``$`` escaped, so that no part of it is read as mathtext
    (a spec, trace or policy name with one ``$`` failed the plot with mathtext's ValueError; a pair was typeset).
    Each string of the figure that holds user text passes through here."""
    return str(text).replace("$", r"\$")


def _metrics_for(plan: Plan, traces: TraceSet | None) -> dict[str, Any] | None:
    """The plan's own predicted metrics when they were made on ``traces``, else computed on them."""
    if traces is None:
        return plan.metrics or None
    if plan.metrics and plan.metrics.get("traces") == traces.name and "plan" in plan.metrics:
        return plan.metrics
    from .baselines import evaluate_plan

    return evaluate_plan(plan, traces)


def saving_summary(metrics: dict[str, Any] | None) -> str:
    """One line: remote GPU copies per token and balance of the plan against load-only and contiguous."""
    if not metrics or "remote_gpu" not in metrics.get("plan", {}).get("mean", {}):
        return "no token traces: communication not scored (load-only counts give balance only)"
    p, b, c = (metrics[k]["mean"]["remote_gpu"] for k in ("plan", "load_only", "contiguous"))
    lp, lb = (metrics[k]["mean"]["max_mean_load"] for k in ("plan", "load_only"))

    def rel(x, y):
        return f"{(x / y - 1) * 100:+.0f}%" if y > 0 else "n/a"

    return (f"remote GPU copies per token: {rel(p, b)} vs load-only ({p:.2f} vs {b:.2f}), {rel(p, c)} vs "
            f"contiguous ({c:.2f}); max/mean GPU load {lp:.3f} (load-only {lb:.3f})")


def plot_plan(plan: Plan, traces: TraceSet | None, path: str | Path, layer: int = 0,
              metrics: dict[str, Any] | None = None, baselines_from: TraceSet | None = None) -> Path:
    """Save the figure for ``plan`` (scored on ``traces``) to ``path``; ``layer`` is the MoE layer detailed.

    ``metrics``: the scores to draw (as ``evaluate_plan`` returns them), when the caller has them;
    ``baselines_from``: the traffic the baselines are planned from (default ``traces``), as for them.
    """
    require("matplotlib", "plot", "--plot").use("Agg")
    import matplotlib.pyplot as plt

    from ..traces import coactivation
    from .baselines import baseline_plans
    from .cost import expected_gpu_load
    from .dispatch import choose_replicas, source_gpus

    if not 0 <= layer < plan.num_layers:
        raise MoegraphError(f"--layer {layer} is outside the plan's MoE layers 0..{plan.num_layers - 1}")
    g, e = plan.num_gpus, plan.num_experts
    base = baseline_plans(plan.spec, baselines_from if baselines_from is not None else traces)["load_only"]
    metrics = metrics or _metrics_for(plan, traces)

    def gpu_load(p):
        if traces is None:
            return expected_gpu_load(p, layer, np.ones(e))
        if traces.load_only:
            return expected_gpu_load(p, layer, traces.counts[layer].astype(float))
        src = source_gpus(traces, g)
        slots = choose_replicas(p, layer, traces.topk[layer], src)
        return np.bincount((slots // p.slots_per_gpu).ravel(), minlength=g).astype(float)

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10})
    fig = plt.figure(figsize=(18, 10.5))
    grid = fig.add_gridspec(2, 6, height_ratios=[1, 1.15], hspace=0.42, wspace=0.9)
    ax_copies, ax_bal = fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:])
    ax_load, ax_co, ax_place = (fig.add_subplot(grid[1, 2 * i:2 * i + 2]) for i in range(3))

    # Row 1: every layer, the three placements.
    layers = np.arange(plan.num_layers)
    per = {k: metrics[k]["per_layer"] for k in ("plan", "load_only", "contiguous")} if metrics and "load_only" in metrics else None
    if per and "remote_gpu" in per["plan"]:
        for k in ("contiguous", "load_only", "plan"):
            ax_copies.plot(layers, per[k]["remote_gpu"], marker="o", ms=3.5, lw=1.8 if k == "plan" else 1.3,
                           color=COLORS[k], label=f"{LABELS[k].split(' (')[0]}: mean {np.mean(per[k]['remote_gpu']):.2f}")
        ax_copies.set_ylim(0, max(max(per[k]["remote_gpu"]) for k in per) * 1.15)
        ax_copies.legend(loc="lower center", ncol=3, frameon=True)
    else:
        ax_copies.text(0.5, 0.5, "no token traces:\ncommunication not scored", ha="center", va="center",
                       transform=ax_copies.transAxes)
    ax_copies.set_xlabel("MoE layer")
    ax_copies.set_ylabel("remote GPU copies per token")
    ax_copies.set_title("communication per layer (lower is better)")
    if per:
        for k in ("contiguous", "load_only", "plan"):
            ax_bal.plot(layers, per[k]["max_mean_load"], marker="o", ms=3.5, lw=1.8 if k == "plan" else 1.3,
                        color=COLORS[k], label=LABELS[k])
        top = max(max(per[k]["max_mean_load"]) for k in per)
        ax_bal.set_ylim(1.0, 1.0 + (top - 1.0) * 1.5 + 0.01)
        ax_bal.legend(loc="upper center", ncol=3, frameon=True)
    for ax in (ax_copies, ax_bal):
        ax.axvline(layer, color="k", ls=":", lw=0.8)
        ax.grid(alpha=0.3)
    ax_bal.set_xlabel(f"MoE layer (dotted: layer {layer}, detailed below)")
    ax_bal.set_ylabel("max / mean GPU load")
    ax_bal.set_title("balance per layer (1.0 = perfectly even)")

    # Row 2, panel 1: load per GPU in the chosen layer, plan beside load-only.
    lp, lb = gpu_load(plan), gpu_load(base)
    x = np.arange(g)
    rp, rb = lp / max(lp.mean(), 1e-12), lb / max(lb.mean(), 1e-12)
    ax_load.bar(x - 0.2, rp, 0.4, color=COLORS["plan"], label=f"plan (max/mean {rp.max():.3f})")
    ax_load.bar(x + 0.2, rb, 0.4, color=COLORS["load_only"], label=f"load-only (max/mean {rb.max():.3f})")
    ax_load.axhline(1.0, color="k", lw=0.8)
    ax_load.set_ylim(0, max(rp.max(), rb.max()) * 1.3)
    ax_load.set_xticks(x)
    ax_load.set_xlabel("GPU")
    ax_load.set_ylabel("load / mean")
    ax_load.set_title(f"layer {layer}: load per GPU")
    ax_load.legend(loc="upper center", ncol=1, frameon=False)

    # Row 2, panel 2: co-activation, experts ordered by the GPU that holds their first replica.
    first_gpu = np.full(e, g)
    for p_slot, ex in enumerate(plan.physical_to_logical_map[layer]):
        first_gpu[ex] = min(first_gpu[ex], p_slot // plan.slots_per_gpu)
    order = np.lexsort((np.arange(e), first_gpu))
    if traces is not None and not traces.load_only:
        w = coactivation(traces.topk[layer], e) / max(traces.num_tokens, 1)
        im = ax_co.imshow(w[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax_co, fraction=0.046, label="tokens choosing both / token")
        for b in np.flatnonzero(np.diff(first_gpu[order])) + 0.5:
            ax_co.axhline(b, color="w", lw=0.6)
            ax_co.axvline(b, color="w", lw=0.6)
        ax_co.set_xlabel("expert (grouped by GPU)")
        ax_co.set_ylabel("expert (grouped by GPU)")
        ax_co.set_title(f"layer {layer}: co-activation (white lines: GPUs)")
    else:
        ax_co.text(0.5, 0.5, "no co-activation\n(load-only or no traces)", ha="center", va="center")
        ax_co.set_axis_off()

    # Row 2, panel 3: placement grid: GPU x slot, expert id, shaded by its load.
    spg = plan.slots_per_gpu
    cells = plan.physical_to_logical_map[layer].reshape(g, spg)
    load_e = traces.counts[layer] / max(traces.counts[layer].mean(), 1e-12) if traces is not None else np.ones(e)
    reps = np.bincount(plan.physical_to_logical_map[layer], minlength=e)
    shade = (load_e / reps)[cells]
    im = ax_place.imshow(shade, cmap="magma_r", aspect="auto")
    fig.colorbar(im, ax=ax_place, fraction=0.046, label="replica load / mean expert load")
    dark = shade > 0.6 * shade.max()
    fs = float(np.clip(90 / max(spg, g), 5, 10))
    for gi in range(g):
        for si in range(spg):
            ex = cells[gi, si]
            ax_place.text(si, gi, f"{ex}{'*' if reps[ex] > 1 else ''}", ha="center", va="center", fontsize=fs,
                          color="w" if dark[gi, si] else "k")
    ax_place.set_xlabel("slot on GPU")
    ax_place.set_ylabel("GPU")
    ax_place.set_title(f"layer {layer}: placement (expert id, * = replicated)")

    scored = f"scored on {traces.name}" + (f" ({traces.num_tokens:,} tokens)" if not traces.load_only else "") \
        if traces is not None else "no traces"
    fig.suptitle(literal(f"{plan.spec.name} on {g} GPUs, {plan.num_slots} slots: {saving_summary(metrics)}\n"
                         f"{scored}; policy {plan.policy.get('name', '?')}"), fontsize=13)
    out = Path(path)
    # written whole or not at all (a full disk left half a picture); the format named, as the temporary file's
    # name ends in .tmp.png and the like
    fmt = out.suffix.lower().lstrip(".") or plt.rcParams["savefig.format"]
    try:
        write_atomically(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=100, bbox_inches="tight"), "plot",
                         MoegraphError)
    finally:
        plt.close(fig)
    return out
