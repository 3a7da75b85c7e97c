"""The block-scaled FP8 variant of the grouped expert MLP kernels (``triton_expert_mlp.py.j2`` with
``fp8``), launched with the arguments of ``moegraph::fp8_expert_mlp``.

Activations are quantized per 1 x BLOCK_K tile in torch (``moegraph.fp8.quantize_tiles``, the op's
own rule) before each GEMM kernel: x before gate/up, the activated hidden state before down. The
kernels multiply FP8 tiles into float32 and apply the row's tile scale and the weight block's scale
per K step, so BLOCK_K equals the weight block's input size and the activation tile width, and
BLOCK_N divides the weight block's output size. Layers of backend "triton" with a quantization
section call ``moegraph_triton::fp8_expert_mlp`` (``moegraph.triton_backend.ops``), which launches these
kernels for stored FP8 weights and runs the torch op for master weights (training: the backward
recomputes the torch op either way). Tested under the interpreter against the torch op.

Legend: T tokens, D model dim, F expert hidden dim, H = 2F (gated) or F, E experts, N assignments.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from .. import fp8
from ..errors import InputError
from .kernels import COMBINE_BLOCK_D, _pow2, align, check_device, mlp_context, token_csr, triton_cdiv
from .render import interpreting, render_to_module

__all__ = ["expert_mlp_fp8", "runs_kernels"]


@lru_cache(maxsize=64)
def _module_for(act: str, gated: bool, gate_clamp: float | None, up_clamp: float | None, interpret: bool) -> ModuleType:
    ctx = mlp_context(act, gated, gate_clamp, up_clamp, False, False, False, torch.float8_e4m3fn, fp8=True)
    return render_to_module("triton_expert_mlp.py.j2", ctx)


def runs_kernels(x_TD: Tensor, s_up: Tensor | None, s_down: Tensor | None, b_up_EH: Tensor | None,
                 b_down_ED: Tensor | None) -> bool:
    """Whether ``moegraph_triton::fp8_expert_mlp`` launches the kernels for these arguments.

    Master weights (no scales: the op quantizes them on the fly, in training) run the torch op; stored
    FP8 weights run the kernels on CUDA devices with FP8 tensor cores, or under the interpreter. A
    device that cannot run them, or biases (the spec refuses both for this backend), is an error.
    """
    if s_up is None or s_down is None:
        return False
    if b_up_EH is not None or b_down_ED is not None:
        raise InputError("the Triton FP8 kernels have no expert biases; compile with backend='torch'")
    if x_TD.is_cuda and torch.cuda.get_device_capability(x_TD.device) < (8, 9):
        name = torch.cuda.get_device_name(x_TD.device)
        raise InputError(f"the Triton FP8 kernels need FP8 tensor cores (sm_89 or newer); {name} has none. Compile "
                         "with backend='torch' on this GPU")
    if not x_TD.is_cuda and not interpreting():
        check_device(x_TD)  # the backend's error for CPU tensors (x is quantized in torch: any float dtype runs)
    return True


def expert_mlp_fp8(x_TD: Tensor, tok_N: Tensor, exp_N: Tensor, weight_N: Tensor, w_up_EHD: Tensor, s_up: Tensor,
                   w_down_EDF: Tensor, s_down: Tensor, activation: str, gated: bool, gate_clamp: float | None,
                   up_clamp: float | None, block_out: int, block_in: int, tile: int, fmt: str, scale_format: str,
                   block_m: int = 16, block_n: int | None = None) -> Tensor:
    """``fp8_expert_mlp`` (no biases, no folded shared experts) with Triton kernels; [T, D] in x's dtype."""
    if block_in != tile:
        raise InputError(f"the Triton FP8 kernels need the activation tile ({tile}) equal to the weight block's input "
                         f"size ({block_in}): both are one K step")
    for name, w, s in (("gate_up_proj", w_up_EHD, s_up), ("down_proj", w_down_EDF, s_down)):
        fp8.check_scales(name, w, s, (block_out, block_in))
    bn = block_n or min(block_out, 64)
    if block_out % bn:
        raise InputError(f"BLOCK_N ({bn}) must divide the weight block's output size ({block_out})")
    T, D = x_TD.shape
    E, _, F = w_down_EDF.shape
    N = tok_N.numel()
    if T == 0 or N == 0:
        return x_TD.new_zeros(T, D)
    mod = _module_for(activation, gated, gate_clamp, up_clamp, interpreting())
    sorted_R, block_expert_B, B = align(exp_N.contiguous(), T, E, 0, block_m)
    xq, xs = fp8.quantize_tiles(x_TD, tile, fmt, scale_format)
    h_NF = torch.empty(N, F, dtype=torch.float32, device=x_TD.device)
    tok, wN = tok_N.contiguous(), weight_N.contiguous().float()
    mod.gate_up_kernel[(B * triton_cdiv(F, bn),)](
        xq, tok, w_up_EHD.contiguous(), None, None, sorted_R, block_expert_B, h_NF,
        N, N, T, D, F, 0, E, B, xs.contiguous(), s_up.contiguous(), BLOCK_OUT=block_out,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=block_in, GROUP_M=8, EVEN_K=True)
    # Rows of dropped assignments were never written: zero them before they are quantized.
    h_NF[(exp_N < 0) | (exp_N >= E)] = 0.0
    hq, hs = fp8.quantize_tiles(h_NF, tile, fmt, scale_format)
    o_ND = torch.empty(N, D, dtype=torch.float32, device=x_TD.device)
    mod.down_kernel[(B * triton_cdiv(D, bn),)](
        hq, w_down_EDF.contiguous(), None, None, wN, None, sorted_R, block_expert_B, o_ND,
        N, N, T, D, F, 0, E, B, hs.contiguous(), s_down.contiguous(), BLOCK_OUT=block_out,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=block_in, GROUP_M=8, EVEN_K=True)
    order_N, start_T1 = token_csr(tok, T)
    y_TD = torch.empty(T, D, dtype=torch.float32, device=x_TD.device)
    block_d = min(COMBINE_BLOCK_D, _pow2(D))
    mod.combine_kernel[(T, triton_cdiv(D, block_d))](o_ND, order_N, start_T1, exp_N.contiguous(), y_TD, N, T, D, E, 0,
                                                     BLOCK_D=block_d)
    return y_TD.to(x_TD.dtype)
