"""The re-plan robustness harness (benchmarks/replan_robustness.py): its splits and margins, at small size."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import replan_robustness as rr  # noqa: E402

from moegraph.traces import TraceSet, load_traces  # noqa: E402


@pytest.fixture(scope="module")
def law():
    t = load_traces("esft-deepseek-v2-lite/law")
    return TraceSet.from_topk(list(t.topk[:2]), t.sample_ids, num_experts=64, source="law")


def _token_keys(ts: TraceSet) -> list[tuple]:
    """Each token as (sample id, its experts in every layer): identifies it across selections."""
    return sorted(zip(ts.sample_ids.tolist(), *(map(tuple, np.asarray(ts.topk[i])) for i in range(ts.num_layers))))


def test_every_split_partitions_the_new_traffic_into_fit_and_score(law):
    everything = _token_keys(law)
    out = rr.splits(law)
    assert set(out) == {"seq halves", "seq halves reversed", "token halves", "alternating 4-seq chunks",
                        "random tokens s0", "random tokens s1"}
    for how, (fit, score) in out.items():
        assert fit.num_tokens > 0.25 * law.num_tokens and score.num_tokens > 0.25 * law.num_tokens, how
        assert sorted(_token_keys(fit) + _token_keys(score)) == everything, how  # disjoint and complete
    # splits by sequence keep sequences whole; the bench's split is the first half of the sequences
    fit, score = out["alternating 4-seq chunks"]
    assert not set(fit.sample_ids.tolist()) & set(score.sample_ids.tolist())
    ids = np.unique(law.sample_ids)
    assert set(out["seq halves"][0].sample_ids.tolist()) == set(ids[: len(ids) // 2].tolist())
    assert set(fit.sample_ids.tolist()) == {int(s) for i, s in enumerate(ids) if (i // 4) % 2 == 0}


def test_margins_are_the_bench_targets_less_the_measured_values(capsys):
    row = {"switch": "x", "config": "2x4 72", "real": True, "moved": 0.12, "lo_changed": 0.95, "lor_moved": 0.70,
           "bal": 1.09, "lo_bal": 1.07, "rgpu": 3.6, "lo_rgpu": 4.0, "cpu": 0.1, "stuck": 0}
    m = {name: f(row) for name, f in rr.CHECKS.items()}
    assert m["moves <= 15%"] == pytest.approx(0.03)
    assert m["max/mean <= LO + 0.03"] == pytest.approx(0.01)
    assert m["max/mean <= 1.15"] == pytest.approx(0.06)
    assert m["remote GPU >= 10% below LO"] == pytest.approx(0.0)  # exactly 10% below: met with nothing to spare
    assert m["relabel >= 25% fewer"] == pytest.approx(1 - 0.70 / 0.95 - 0.25)
    worse = dict(row, moved=0.16)
    rr.compare([row], [worse], out=print)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("moves <= 15%"))
    assert "1 ->   0 of 1" in line and "better in 0, worse in 1" in line
