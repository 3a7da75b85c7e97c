"""Compile a Triton kernel for sm_90 (Hopper) without a GPU: what the cross-compile tests share.

Imported by the scripts that tests/test_triton.py and tests/test_triton_fp8.py run in fresh
processes (their first argument after the cache folder is this folder, put on ``sys.path``).
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

#: pointer arguments are given as the torch dtype they point to
PTR = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64",
       torch.float8_e4m3fn: "*fp8e4nv"}


def compile_sm90(fn, args, consts, num_warps=4, num_stages=3):
    """``fn`` compiled for sm_90 with ``args`` (torch dtypes for pointers, ints, None) and ``consts``.

    Mirrors Triton's launch-time specialisation: ints equal to 1 become constants, pointers and
    multiples of 16 carry the divisibility hint that enables vectorised, pipelined loads.
    """
    sig, cx, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        v = consts.get(name, args[i] if i < len(args) else None)
        if name in consts or v is None or (isinstance(v, int) and v == 1):
            sig[name], cx[name] = "constexpr", v
        elif isinstance(v, torch.dtype):
            sig[name], attrs[(i,)] = PTR[v], [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
