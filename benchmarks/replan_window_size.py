"""How many tokens should a re-plan read? Re-planning every n tokens from the last n, on a task switch.

    python benchmarks/replan_window_size.py [--windows 8 32 128 512 1024] [--block 2048] [--horizon 256]

DeepSeek-V2-Lite ESFT traces (bundled), 1 node x 8 GPUs, 64 slots. The stream is ``--block`` tokens of
intent, then ``--block`` of law, then ``--block`` more of intent; the first plan is made on other intent
tokens. For each window size n the plan is re-planned (``replan`` with its defaults, what ``Rebalancer(every=)``
runs) after every n tokens from those n tokens, and each plan is scored on the ``--horizon`` tokens that
follow its window, beside the first plan never re-planned ("static") on the same tokens. Printed per n:
re-plans, slots moved (of 26 x 64 per re-plan), and the mean max/mean GPU load over the scored horizons.

What it shows (``benchmarks/results/replan_window_size.log``): windows of 8-32 tokens re-plan after sampling
noise: each re-plan moves 120-135 slots to fit tokens the next ones do not resemble, and the plans balance
worse than never re-planning (max/mean +0.12 and +0.05 over the static plan); windows of 128-512 tokens
follow the switch (-0.02 to -0.03, 70-95 slots per re-plan); 1,024 tokens re-plan too seldom to gain on
this stream. With ``Rebalancer(every=N)``, choose N so that a window holds a few hundred tokens, or use
``threshold=``, which waits until the counts can tell an imbalance from noise. A measurement, not a test:
exit status 0 either way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moegraph.argtypes import positive_int  # noqa: E402
from replan_bench import lite_spec, one_source  # noqa: E402

from moegraph.planner import evaluate, plan  # noqa: E402
from moegraph.planner.replan import migration, replan  # noqa: E402
from moegraph.traces import TraceSet, load_traces  # noqa: E402


def tokens(ts: TraceSet, start: int, stop: int) -> TraceSet:
    """Tokens [start, stop) of ``ts`` in order."""
    i = np.arange(ts.num_tokens)
    return ts.select_tokens((i >= start) & (i < stop))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=positive_int, nargs="+", default=[8, 32, 128, 512, 1024])
    ap.add_argument("--block", type=positive_int, default=2048, help="tokens of each part of the stream")
    ap.add_argument("--horizon", type=positive_int, default=256,
                    help="tokens each plan is scored on, after its window")
    args = ap.parse_args(argv)
    intent, law = load_traces("esft-deepseek-v2-lite").split_sources()
    b, h = args.block, args.horizon
    most = min(intent.num_tokens // 4, law.num_tokens)  # intent[0:2b] streamed, intent[2b:4b] the first plan's
    if b > most:
        ap.error(f"argument --block: at most {most} (the traces' intent tokens hold four blocks), got {b}")
    if h >= 3 * b:
        ap.error(f"argument --horizon: must be shorter than the {3 * b}-token stream (3 x --block), got {h}")
    if max(args.windows) + h > 3 * b:
        ap.error(f"argument --windows: a window plus the --horizon ({h}) must fit in the {3 * b}-token stream "
                 f"(3 x --block): at most {3 * b - h}, got {max(args.windows)}")
    stream = one_source(TraceSet.concat([tokens(intent, 0, b), tokens(law, 0, b), tokens(intent, b, 2 * b)]),
                        "intent -> law -> intent")
    spec = lite_spec(1, 8, 64)
    first = plan(spec, tokens(intent, 2 * b, 4 * b))
    total = stream.num_tokens
    print(f"stream: intent[0:{b}] law[0:{b}] intent[{b}:{2 * b}] ({total} tokens), 1x8 GPUs 64 slots, first plan on "
          f"intent[{2 * b}:{4 * b}]; re-planned every n tokens from the last n, each plan scored on the {h} "
          "tokens after its window")
    print(f"{'n':>5} | {'re-plans':>8} {'slots moved':>11} {'per re-plan':>11} | {'max/mean':>8} {'static':>7} "
          f"{'diff':>7} | {'CPU s':>6}")
    for n in args.windows:
        current, moved, scores, static = first, 0, [], []
        c0 = time.process_time()
        starts = range(0, total - n - h + 1, n)
        for s in starts:
            new = replan(None, current, tokens(stream, s, s + n))
            moved += migration(current, new).slots_moved
            current = new
            after = tokens(stream, s + n, s + n + h)
            scores.append(evaluate(current, after)["mean"]["max_mean_load"])
            static.append(evaluate(first, after)["mean"]["max_mean_load"])
        m, st = float(np.mean(scores)), float(np.mean(static))
        print(f"{n:>5} | {len(starts):>8} {moved:>11} {moved / max(len(starts), 1):>11.1f} | {m:>8.3f} {st:>7.3f} "
              f"{m - st:>+7.3f} | {time.process_time() - c0:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
