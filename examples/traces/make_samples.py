"""Write ``sglang-expert-distribution.pt`` from the bundled law trace (see README.md here)."""

from pathlib import Path

import numpy as np
import torch

import moegraph

if __name__ == "__main__":
    ts = moegraph.load_traces(["esft-deepseek-v2-lite/law"])
    counts = np.zeros((ts.num_layers + 1, ts.num_experts), np.int64)  # decoder layer 0 is dense
    counts[1:] = ts.counts
    out = Path(__file__).with_name("sglang-expert-distribution.pt")
    torch.save({"logical_count": torch.from_numpy(counts)}, out)
    print(f"wrote {out}: logical_count {tuple(counts.shape)}, {int(counts.sum())} assignments")
