"""How long `moegraph run` takes to report a frozen (SIGSTOP) or killed peer, measured from the fault.

Runs deepseek-v3-tiny expert-parallel in 2 local gloo processes with a 2 s collective timeout and
injects the fault into rank 1 before its second measured step (``run_local(fault=...)``). Prints,
per fault, the seconds from the fault to ``run_local`` raising (every process is gone by then) and
the first line of the error. Target: at most timeout + 5 s.

    python benchmarks/ep_fault_timing.py
"""

from __future__ import annotations

import pathlib
import tempfile
import time

TIMEOUT_S = 2.0


def main() -> None:
    from moegraph.distributed.local import run_local
    from moegraph.errors import DistributedError
    from moegraph.planner import plan

    d = pathlib.Path(tempfile.mkdtemp(prefix="ep-fault-"))
    p = plan("deepseek-v3-tiny", nodes=1, gpus_per_node=2)
    for how in ("stop", "kill", "stop", "kill"):
        note = d / f"{how}.t"
        try:
            run_local(p, tokens=8, steps=3, backward=False, timeout=TIMEOUT_S,
                      fault={"rank": 1, "step": 1, "how": how, "note": str(note)})
        except DistributedError as exc:
            took = time.time() - float(note.read_text())
            print(f"{how:>4}: reported {took:.2f}s after the fault (timeout {TIMEOUT_S:g}s): "
                  f"{str(exc).splitlines()[0][:110]}")
        else:
            print(f"{how:>4}: the run did not fail")


if __name__ == "__main__":
    main()
