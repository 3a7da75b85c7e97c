"""The Rebalancer's threshold trigger on a drifting stream: judged against its sampling noise, or not.

    python benchmarks/rebalance_threshold.py [--ranks 4] [--steps 60] [--thresholds 1.08 1.15]
                                             [--tokens 8 64]

Each run is ``--ranks`` gloo processes (``torch.distributed.run``) serving deepseek-v3-tiny (3 MoE layers,
16 experts, top-4) for ``--steps`` inference steps of ``--tokens`` tokens per rank, with a
``Rebalancer(threshold=T)`` and a 4,096-token window. The traffic is ``drift_demo``'s topic switch: tokens
pulled towards one half of the experts for the first third of the steps, sliding to the other half
over the next sixth (``rebalance.drift_stream``). Two rules per (threshold, tokens):

- ``noise``: the Rebalancer as shipped: a check re-plans when the measured max/mean exceeds the
  threshold by more than ``replan.noise_floor`` of the assignments it counted (else the counts
  accumulate);
- ``raw``: the same with that floor set to 0 (a check re-plans whenever the figure exceeds the
  threshold), the rule before session 16.

Printed per run: re-plans, slots moved, mean window tokens per re-plan, and the max/mean of the counts
summed over the first and the last third of the steps ("pooled": sampling adds about
sqrt((G - 1) / n) to it for n assignments). A measurement, not a test: exit status 0 either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from moegraph.argtypes import positive_float, positive_int

WORKER = r'''
import json, sys
import torch, torch.distributed as dist
import moegraph
from moegraph.planner import plan as make_plan
from moegraph.distributed.rebalance import Rebalancer, drift_stream

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
tokens, steps, threshold, rule, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
d = moegraph.load_spec("deepseek-v3-tiny").model_dump(mode="json")
d["topology"] = {"kind": "uniform", "nodes": 1, "gpus_per_node": world}
spec = moegraph.load_spec(d)
p = make_plan(spec, nodes=1, gpus_per_node=world)
layers = [moegraph.compile(spec, plan=p, layer_index=i, seed=0) for i in range(p.num_layers)]
rb = Rebalancer(layers, threshold=threshold, window_tokens=4096)
if rule == "raw":  # the threshold without its sampling floor
    rb._check.floor = lambda span: 0.0
counts = [rb._counts()]
for _ in drift_stream(rb.layers, steps=steps, tokens=tokens, seed=0):
    counts.append(rb._counts())
    rb.step()

def pooled(first, last):  # max/mean over ranks of the assignments counted between two steps, mean over layers
    delta = torch.as_tensor(counts[last] - counts[first], dtype=torch.int64)
    per_rank = torch.stack(rb.layers[0].comm.all_gather(delta, "pooled")).double()
    return float((per_rank.max(0).values / per_rank.mean(0)).mean())


third = steps // 3
first, last = pooled(0, third), pooled(steps - third, steps)
if rank == 0:
    ev = rb.events
    json.dump({"replans": len(ev), "moved": sum(x.get("slots_moved", 0) for x in ev),
               "window": sum(x["tokens"] for x in ev) / max(len(ev), 1), "first": first, "last": last}, open(out, "w"))
dist.destroy_process_group()
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=positive_int, default=4)
    ap.add_argument("--steps", type=positive_int, default=60)
    ap.add_argument("--thresholds", type=positive_float, nargs="+", default=[1.08, 1.15])
    ap.add_argument("--tokens", type=positive_int, nargs="+", default=[8, 64])
    args = ap.parse_args()
    import moegraph

    m = moegraph.load_spec("deepseek-v3-tiny")
    slots = m.moe.experts.num_experts + m.placement.redundant_slots
    fits = [w for w in range(2, slots + 1) if slots % w == 0]  # the plan spreads every slot, one copy per GPU
    if args.ranks not in fits:
        ap.error(f"argument --ranks: deepseek-v3-tiny's {slots} expert slots split evenly over "
                 f"{', '.join(map(str, fits))} ranks, got {args.ranks}")
    if args.steps < 3:
        ap.error(f"argument --steps: at least 3 (the first and last thirds are compared), got {args.steps}")
    print(f"{args.ranks} gloo ranks, deepseek-v3-tiny, {args.steps} steps of a topic switch, window 4,096 tokens")
    print(f"{'threshold':>9} {'tokens':>6} {'rule':>5} | {'re-plans':>8} {'slots moved':>11} {'window':>7} | "
          f"{'pooled max/mean first third':>27} {'last third':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        for threshold in args.thresholds:
            for tokens in args.tokens:
                for rule in ("raw", "noise"):
                    out = Path(tmp) / "out.json"
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={args.ranks}", str(worker), str(tokens), str(args.steps), str(threshold),
                           rule, str(out)]
                    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                    if run.returncode != 0:
                        print(f"{threshold:>9} {tokens:>6} {rule:>5} | failed: {run.stderr.strip()[-300:]}")
                        continue
                    r = json.loads(out.read_text())
                    print(f"{threshold:>9} {tokens:>6} {rule:>5} | {r['replans']:>8} {r['moved']:>11} "
                          f"{r['window']:>7.0f} | {r['first']:>27.3f} {r['last']:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
