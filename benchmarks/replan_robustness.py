"""How robust are the re-plan's target margins on switches it was not tuned on?

    python benchmarks/replan_robustness.py [--quick] [--cache DIR] [--log FILE]

``benchmarks/replan_bench.py`` checks the issue's re-plan targets on two switches (plan on one ESFT
task, re-plan from the first half of the other, score on its second half). The team will run the
same checks on tasks we do not have, so a margin measured on two switches says little. This script
simulates many switches from what we may use (the bundled ``intent`` and ``law`` traces and
``moegraph.traces.synthetic_traces``) and reports, per check and per cluster config, how many pass
and the minimum / median margin (positive: met with that much to spare):

- task switches intent -> law and law -> intent, with the new task split into the traffic the
  re-plan sees (fit) and the traffic it is scored on (score) in several ways: by sequence halves
  (the bench's split), the same reversed, by token halves, by alternating chunks of sequences, and
  by random halves of the tokens (two seeds);
- mixes as old and new traffic: 70/30 intent/law -> 30/70 and back (whole sequences; the new mix
  split by alternating sequences), and a plan made on half of a task (first half of intent's
  sequences) meeting the other task;
- synthetic switches: the current plan made on one synthetic workload, the re-plan on another of
  other popularity and topics (several skews and coherences), split by sequence halves.

For each switch and config (1x8 and 2x4 GPUs, 64 and 72 slots): the current plan is
``moegraph.planner.plan`` on the old traffic; the re-plan is ``replan`` from the fit part with its
defaults; LO is the load-only re-plan from scratch on the fit part; the checks are the bench's
(``replan_bench.after_switch`` and ``replan_bench.CHECKS``):

- moves: slots moved <= 15% of the slots (margin 15% - moved);
- balance: max/mean on the score part <= LO's + 0.03 (margin 0.03 - diff) and <= 1.15;
- remote GPU copies on the score part >= 10% below LO's (margin -10% - change);
- relabelling: LO relabelled moves >= 25% fewer slots than LO raw (margin: fewer - 25%).

The current plans do not depend on the re-plan; ``--cache DIR`` keeps them between runs (keyed by
switch and config) so that re-plan variants can be compared quickly. The exit status is 0 either
way: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replan_bench import (  # noqa: E402
    CHECKS,
    after_switch,
    halves,
    layers_above,
    lite_spec,
    mix,
    one_source,
)

from moegraph.planner import Plan, plan  # noqa: E402
from moegraph.planner.forked import cpu_seconds  # noqa: E402
from moegraph.planner.replan import replan  # noqa: E402
from moegraph.traces import TraceSet, load_traces, synthetic_traces  # noqa: E402

CONFIGS = ((1, 8, 64), (1, 8, 72), (2, 4, 64), (2, 4, 72))


@dataclass
class Switch:
    """Old traffic (the current plan is made on it) and the new traffic split into fit and score parts."""

    name: str
    old_key: str  # the current plan depends on the old traffic only: plans are shared (and cached) by this key
    old: TraceSet
    fit: TraceSet
    score: TraceSet
    real: bool  # built from the ESFT traces (else synthetic)


def _by_samples(ts: TraceSet, keep_first) -> tuple[TraceSet, TraceSet]:
    s = np.unique(ts.sample_ids)
    m = np.asarray([keep_first(i, len(s)) for i in range(len(s))], bool)
    return ts.select_samples(s[m], name=f"{ts.name} fit"), ts.select_samples(s[~m], name=f"{ts.name} score")


def splits(ts: TraceSet) -> dict[str, tuple[TraceSet, TraceSet]]:
    """Ways to split the new traffic into (fit, score)."""
    h1, h2 = halves(ts)
    t = ts.num_tokens
    first = np.arange(t) < t // 2
    out = {
        "seq halves": (h1, h2),
        "seq halves reversed": (h2, h1),
        "token halves": (ts.select_tokens(first), ts.select_tokens(~first)),
        "alternating 4-seq chunks": _by_samples(ts, lambda i, n: (i // 4) % 2 == 0),
    }
    for seed in (0, 1):
        m = np.zeros(t, bool)
        m[np.random.default_rng(seed).permutation(t)[: t // 2]] = True
        out[f"random tokens s{seed}"] = (ts.select_tokens(m), ts.select_tokens(~m))
    return out


def switches(quick: bool) -> list[Switch]:
    intent, law = load_traces("esft-deepseek-v2-lite").split_sources()
    out: list[Switch] = []
    for a_name, a, b_name, b in (("intent", intent, "law", law), ("law", law, "intent", intent)):
        for how, (fit, score) in splits(b).items():
            if quick and how not in ("seq halves", "random tokens s0"):
                continue
            out.append(Switch(f"{a_name}->{b_name} {how}", a_name, one_source(a, a_name), one_source(fit, "fit"),
                              one_source(score, "score"), True))
    # Mixes: old traffic 70/30, new 30/70 of the other sequences (whole sequences of each task).
    ih1, ih2 = halves(intent)
    lh1, lh2 = halves(law)
    for share_old, share_new in ((0.3, 0.7), (0.7, 0.3)):
        old = mix(ih1, lh1, share_old, f"mix law {share_old:.0%}")
        new = mix(ih2, lh2, share_new, f"mix law {share_new:.0%}")
        fit, score = _by_samples(new, lambda i, n: i % 2 == 0)
        out.append(Switch(f"mix law {share_old:.0%} -> {share_new:.0%}", f"mixold{share_old}", old,
                          one_source(fit, "fit"), one_source(score, "score"), True))
    # A plan made on half a task meets the other task.
    for a_name, a, b_name, b in (("intent 1st half", ih1, "law", law), ("law 1st half", lh1, "intent", intent)):
        fit, score = halves(b)
        out.append(Switch(f"{a_name}->{b_name} seq halves", a_name, one_source(a, a_name), one_source(fit, "fit"),
                          one_source(score, "score"), True))
    # Synthetic switches: another workload's popularity and topics.
    params = [(1.0, 3.0), (0.7, 2.0), (1.3, 4.0), (1.0, 1.0)]
    for i, (skew, coh) in enumerate(params[:1] if quick else params):
        old = synthetic_traces(26, 64, 6, 8192, tokens_per_sample=128, skew=skew, coherence=coh, seed=100 + i,
                               name=f"synthetic old {i}")
        new = synthetic_traces(26, 64, 6, 8192, tokens_per_sample=128, skew=skew, coherence=coh, seed=200 + i,
                               name=f"synthetic new {i}")
        fit, score = halves(new)
        out.append(Switch(f"synthetic skew {skew} coherence {coh}", f"syn{i}", old, fit, score, False))
    return out


def current_plan(spec, sw: Switch, config: tuple, cache: Path | None) -> Plan:
    if cache is None:
        return plan(spec, sw.old)
    path = cache / f"{sw.old_key.replace(' ', '_')}-{config[0]}x{config[1]}-{config[2]}.json"
    if path.exists():
        return Plan.load(path)
    p = plan(spec, sw.old)
    cache.mkdir(parents=True, exist_ok=True)
    p.save(path)
    return p


def measure(sw: Switch, config: tuple, cur: Plan, replan_fn: Callable = replan) -> dict:
    """The bench's quantities for one switch and config (``replan_bench.after_switch``), with the re-plan's CPU
    seconds and how many layers it left above its window target."""
    c0 = cpu_seconds()
    new = replan_fn(None, cur, sw.fit)
    cpu = cpu_seconds() - c0
    return {"switch": sw.name, "config": "{}x{} {}".format(*config), "real": sw.real,
            **after_switch(cur, new, sw.fit, sw.score), "cpu": cpu, "stuck": layers_above(new)}


def run(quick: bool, cache: Path | None, replan_fn: Callable = replan, configs=CONFIGS, out=print) -> list[dict]:
    rows = []
    sws = switches(quick)
    for config in configs:
        spec = lite_spec(*config)
        for sw in sws:
            cur = current_plan(spec, sw, config, cache)
            r = measure(sw, config, cur, replan_fn)
            rows.append(r)
            out(f"{r['config']:9} {r['switch']:38} moved {r['moved']:6.1%} | max/mean {r['bal']:.3f} LO {r['lo_bal']:.3f} "
                f"{r['bal'] - r['lo_bal']:+.3f} | remote GPU vs LO {r['rgpu'] / r['lo_rgpu'] - 1:+6.1%} | relabel "
                f"{1 - r['lor_moved'] / r['lo_changed']:5.1%} fewer | {r['stuck']:2} layers above target | {r['cpu']:.2f}s CPU")
    return rows


def summary(rows: list[dict], out=print) -> None:
    """Per check and config (and over all): passes, min and median margin, and the switch at the minimum."""
    out(f"\n{'check':28} {'config':9} {'traffic':9} {'pass':>7} {'min margin':>11} {'median':>8}  worst switch")
    configs = sorted({r["config"] for r in rows})
    groups = [(c, k) for k in ("ESFT", "synthetic") for c in configs] + [("all", "ESFT"), ("all", "synthetic")]
    for check, margin in CHECKS.items():
        for cfg, kind in groups:
            sel = [r for r in rows if cfg in ("all", r["config"]) and r["real"] == (kind == "ESFT")]
            if not sel:
                continue
            mg = np.array([margin(r) for r in sel])
            w = sel[int(np.argmin(mg))]
            scale = 1.0 if check.startswith("max/mean") else 100.0  # points for percentages
            unit = "" if scale == 1.0 else " pt"
            out(f"{check:28} {cfg:9} {kind:9} {int((mg >= 0).sum()):3}/{len(mg):<3} {mg.min() * scale:+9.3f}{unit:3} "
                f"{np.median(mg) * scale:+7.3f}  {w['switch']} ({w['config']})")


def compare(before: list[dict], after: list[dict], out=print) -> None:
    """Per check and traffic kind: passes and min / median margin before -> after, and the cases that changed."""
    key = {(r["switch"], r["config"]): r for r in before}
    pairs = [(key[(r["switch"], r["config"])], r) for r in after if (r["switch"], r["config"]) in key]
    out(f"\ncompared with an earlier run on {len(pairs)} cases: passes, min margin, median margin (before -> after)")
    for check, margin in CHECKS.items():
        scale = 1.0 if check.startswith("max/mean") else 100.0
        for kind in ("ESFT", "synthetic"):
            sel = [(b, a) for b, a in pairs if a["real"] == (kind == "ESFT")]
            if not sel:
                continue
            mb = np.array([margin(b) for b, _ in sel]) * scale
            ma = np.array([margin(a) for _, a in sel]) * scale
            out(f"{check:28} {kind:9} {int((mb >= 0).sum()):3} -> {int((ma >= 0).sum()):3} of {len(sel):<3} "
                f"min {mb.min():+8.3f} -> {ma.min():+8.3f}  median {np.median(mb):+8.3f} -> {np.median(ma):+8.3f}  "
                f"better in {int((ma > mb + 1e-9).sum())}, worse in {int((ma < mb - 1e-9).sum())}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer switches (two splits per task, one synthetic)")
    ap.add_argument("--cache", type=Path, default=None, help="folder keeping the current plans between runs")
    ap.add_argument("--log", type=Path, default=None, help="also write the printed table here")
    ap.add_argument("--rows", type=Path, default=None, help="write the measured rows here (JSON)")
    ap.add_argument("--compare", type=Path, default=None,
                    help="rows of an earlier run (--rows): print each check's passes and margins beside theirs")
    args = ap.parse_args(argv)
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    t0 = time.perf_counter()
    rows = run(args.quick, args.cache, out=out)
    summary(rows, out=out)
    if args.compare is not None:
        compare(json.loads(args.compare.read_text()), rows, out=out)
    if args.rows is not None:
        args.rows.write_text(json.dumps(rows, indent=0))
    out(f"\n{len(rows)} switch x config cases in {time.perf_counter() - t0:.0f}s")
    if args.log is not None:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
