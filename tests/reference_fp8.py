"""An FP8 reference written from DeepSeek-V3's description and transformers' quantizer, sharing no
code with ``moegraph.fp8``: one block or tile at a time, in loops."""

from __future__ import annotations

import torch

from reference_moe import activated

FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
DT = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def ref_quant_one(v: torch.Tensor, fmt: str, ue8m0: bool) -> tuple[torch.Tensor, float]:
    """(dequantized values, scale_inv) of one block or tile, by the rule in moegraph/fp8.py's docstring."""
    # float32 arithmetic, spelled as transformers' quantizer spells it: a Python number over a tensor is
    # torch's reciprocal-then-multiply, one float32 rounding more than a true division.
    amax = v.float().abs().max()
    scale = FP8_MAX[fmt] / amax if amax > 0 else torch.tensor(1.0)
    inv = 1.0 / scale
    if ue8m0:
        inv = torch.tensor(2.0) ** torch.ceil(torch.log2(inv))
        scale = 1.0 / inv
    q = (v.float() * scale).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(DT[fmt])
    return q.float() * inv, float(inv)


def ref_fake_quant_weight(w: torch.Tensor, block, fmt="fp8_e4m3", ue8m0=False) -> torch.Tensor:
    out = torch.empty_like(w, dtype=torch.float32)
    bo, bi = block
    for r in range(0, w.shape[0], bo):
        for c in range(0, w.shape[1], bi):
            out[r:r + bo, c:c + bi] = ref_quant_one(w[r:r + bo, c:c + bi], fmt, ue8m0)[0]
    return out


def ref_fake_quant_acts(x: torch.Tensor, tile, fmt="fp8_e4m3", ue8m0=False) -> torch.Tensor:
    """Straight-through in autograd: the value is FP8-rounded, the gradient passes unchanged."""
    out = torch.empty_like(x, dtype=torch.float32)
    with torch.no_grad():
        for r in range(x.shape[0]):
            for c in range(0, x.shape[1], tile):
                out[r, c:c + tile] = ref_quant_one(x[r, c:c + tile], fmt, ue8m0)[0]
    return x.float() + (out - x.float()).detach()


def fp8_expert(tile: int, fmt: str = "fp8_e4m3", ue8m0: bool = False):
    """An ``expert_fn`` for reference_moe.reference_forward: the input and the activation rounded through
    FP8 tiles, the (already dequantized) weights applied in float32."""

    def run(x_D, w_up, w_down, b_up, b_down, activation, gate_clamp=None, up_clamp=None):
        xq = ref_fake_quant_acts(x_D.unsqueeze(0), tile, fmt, ue8m0)[0]
        h = w_up.float() @ xq + (b_up if b_up is not None else 0)
        a = activated(h, activation, gate_clamp, up_clamp)
        aq = ref_fake_quant_acts(a.unsqueeze(0), tile, fmt, ue8m0)[0]
        return w_down.float() @ aq + (b_down if b_down is not None else 0)

    return run
