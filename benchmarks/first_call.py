"""Time a newcomer's first call in a fresh process: import torch, import moegraph, load a spec,
compile it, first forward, second forward.

    python benchmarks/first_call.py [--spec deepseek-v3-tiny] [--runs 3] [--threads N]

Each run is a new Python process (nothing cached in memory; the generated-code cache on disk is
whatever it is). Prints every stage per run and the median, then "compile + first forward", the
figure the README quotes. The last stage, ``import torch._dynamo``, is what the first forward used
to pay when the ops were ``torch.library.custom_op`` (whose kernels import Dynamo on first call);
it runs after the forwards, so it does not affect them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from moegraph.argtypes import nonnegative_int, positive_int

CHILD = r"""
import json, sys, time
stages = []
t = time.perf_counter()
def stage(name):
    global t
    now = time.perf_counter()
    stages.append((name, now - t))
    t = now
import torch
if int(sys.argv[2]):
    torch.set_num_threads(int(sys.argv[2]))
stage("import torch")
import moegraph
stage("import moegraph")
try:
    spec = moegraph.load_spec(sys.argv[1])
except moegraph.MoegraphError as exc:  # a bad --spec: the error alone, no traceback
    sys.exit(f"error: {exc}")
stage("load spec")
layer = moegraph.compile(spec, dtype=torch.float32, seed=0)
stage("compile")
x = torch.randn(4, 16, spec.moe.hidden_size)
y = layer(x)
stage("first forward")
y = layer(x)
stage("second forward")
dynamo_loaded = "torch._dynamo" in sys.modules
import torch._dynamo
stage("import torch._dynamo")
print(json.dumps({"stages": stages, "dynamo_loaded_by_forward": dynamo_loaded}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="deepseek-v3-tiny")
    ap.add_argument("--runs", type=positive_int, default=3)
    ap.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: torch's default); 1 keeps "
                    "OpenMP waits out of the figures on a busy machine")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, args.spec, str(args.threads)], capture_output=True,
                             text=True)
        if out.returncode != 0:  # the child's own error (its last lines), not this script's traceback
            tail = "\n".join(out.stderr.strip().splitlines()[-15:])
            sys.exit(f"first_call.py: run {i + 1} failed (exit status {out.returncode}):\n{tail}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(dict(res["stages"]))
        cells = ", ".join(f"{k} {v:.3f}" for k, v in res["stages"])
        print(f"run {i + 1}: {cells} (s); torch._dynamo loaded by the forwards: {res['dynamo_loaded_by_forward']}")
    names = list(runs[0])
    med = {k: statistics.median(r[k] for r in runs) for k in names}
    print(f"\nmedian of {args.runs} fresh processes, {args.spec}:")
    for k in names:
        print(f"  {k:<22} {med[k]:7.3f} s")
    first = med["compile"] + med["first forward"]
    print(f"  compile + first forward {first:6.3f} s (target <= 0.3 s); with import moegraph and load spec "
          f"{first + med['import moegraph'] + med['load spec']:.3f} s")
    print(f"  first forward / second forward: {med['first forward'] / max(med['second forward'], 1e-9):.1f}x")


if __name__ == "__main__":
    main()
