"""How long `moegraph run` takes to report a frozen (SIGSTOP) or killed peer, measured from the fault.

Runs deepseek-v3-tiny expert-parallel in 2 local gloo processes with a collective timeout (default 2 s) and
injects the fault into rank 1 before its second measured step (``run_local(fault=...)``). Prints,
per fault, the seconds from the fault to ``run_local`` raising (every process is gone by then) and
the first line of the error. Target: at most timeout + 5 s.

    python benchmarks/ep_fault_timing.py [--timeout 2] [--faults stop kill stop kill]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from moegraph.argtypes import positive_float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=positive_float, default=2.0, help="collective timeout in seconds (default 2)")
    ap.add_argument("--faults", nargs="+", choices=["stop", "kill"], default=["stop", "kill", "stop", "kill"],
                    help="the faults injected, one run each, in order")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    from moegraph.distributed.local import run_local
    from moegraph.errors import DistributedError
    from moegraph.planner import plan

    p = plan("deepseek-v3-tiny", nodes=1, gpus_per_node=2)
    with tempfile.TemporaryDirectory(prefix="ep-fault-") as tmp:
        d = pathlib.Path(tmp)
        for how in args.faults:
            note = d / f"{how}.t"
            try:
                run_local(p, tokens=8, steps=3, backward=False, timeout=args.timeout,
                          fault={"rank": 1, "step": 1, "how": how, "note": str(note)})
            except DistributedError as exc:
                took = time.time() - float(note.read_text())
                print(f"{how:>4}: reported {took:.2f}s after the fault (timeout {args.timeout:g}s): "
                      f"{str(exc).splitlines()[0][:110]}")
            else:
                print(f"{how:>4}: the run did not fail")


if __name__ == "__main__":
    main()
