"""FP8 expert compute the DeepSeek-V3 way: block-scaled weights, tile-scaled activations.

Storage (the layout of DeepSeek-V3's released checkpoints): a weight [..., O, I] is cut into
[bo, bi] blocks; each block is stored in FP8 together with one float32 ``scale_inv`` [..., O/bo,
I/bi], the factor that turns the stored FP8 values back into the weight (w = q * scale_inv). The
"ue8m0" scale format rounds every scale up to a power of two (stored as float32 all the same).

Activations entering an expert GEMM are quantized on the fly per token and per ``tile`` input columns
(1 x 128 in DeepSeek-V3), with the same rule. The GEMMs accumulate in float32: the torch path
dequantizes the FP8 operands with their scales and multiplies them in float32, exactly the block-scaled
product (every FP8 value and every scale is exact in float32); for decode (few tokens) the native kernel
(``native``) may instead multiply FP8 by FP8 in bfloat16 dot products where the CPU has them.

Quantization rule (for weights and activations alike; the one transformers' fine-grained FP8
quantizer applies, so a layer quantized here holds the bytes a transformers checkpoint would):
``scale = FP8_MAX / amax`` over the block or tile (1 for an all-zero block), ``scale_inv = 1 / scale``;
``ue8m0`` rounds ``scale_inv`` up to a power of two and takes ``scale = 1 / scale_inv``; then
``q = fp8(clamp(x * scale, -FP8_MAX, FP8_MAX))``. DeepSeek-V3's reference kernels quantize activations
with ``s = amax / FP8_MAX; q = x / s`` instead: the same rule in exact arithmetic, and in float32 the two
round differently now and then (one float32 ulp in a fraction of the tile scales; the FP8 bytes of
about 0.1% of bfloat16 inputs), so activations here are not bit-identical to DeepSeek's kernel, at the
same accuracy. The torch path, the native kernel and the Triton kernels all apply the rule above.

``moegraph::fp8_expert_mlp`` is the grouped expert op with FP8 weights (registered through
``moegraph.oplib`` like ``moegraph::expert_mlp``). Its backward, for training with FP8 forwards:

- the forward quantizes x per tile, the expert weights per block (or uses the stored FP8 ones), and
  the activated hidden state per tile before the down projection, as DeepSeek-V3's Fprop does;
- the input gradient (Dgrad) multiplies the output gradient with the same dequantized FP8 weights;
- the weight gradient (Wgrad) multiplies it with the same FP8-quantized activations, and reaches the
  higher-precision master weights straight through the quantizer (when the op is given master
  weights and no scales); stored FP8 weights get no gradient;
- output gradients stay in float32 (DeepSeek-V3 also quantizes them to FP8 tiles; we do not), and
  the routing weights get their exact gradient.

Legend: T tokens, D model dim, F expert hidden dim, H = 2F (gated) or F, E experts, N assignments.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.fx
from torch import Tensor, nn

from .errors import InputError
from .oplib import opaque_op
from .ops import _sort_by_expert, apply_activation, once_differentiable

__all__ = [
    "FORMATS",
    "fp8_dtype",
    "quantize_blocks",
    "dequantize_blocks",
    "quantize_tiles",
    "dequantize_tiles",
    "check_scales",
    "fp8_expert_mlp",
    "define_fp8_op",
    "AMAX_FLOOR",
    "rounding_bound",
]

#: spec format name -> torch dtype of the stored values
FORMATS: dict[str, torch.dtype] = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

#: amax below which a block is scaled as if it held this value (keeps the scale finite)
AMAX_FLOOR = 1e-30


def fp8_dtype(fmt: str) -> torch.dtype:
    if fmt not in FORMATS:
        raise InputError(f"unknown FP8 format {fmt!r}; use one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _scales(amax: Tensor, fmt: str, scale_format: str) -> tuple[Tensor, Tensor]:
    """(scale, scale_inv), float32, of blocks or tiles with absolute maximum ``amax``."""
    amax = amax.float()
    scale = torch.where(amax > 0, torch.finfo(fp8_dtype(fmt)).max / amax.clamp(min=AMAX_FLOOR), 1.0)
    inv = 1.0 / scale
    if scale_format == "ue8m0":
        inv = torch.exp2(torch.ceil(torch.log2(inv)))
        scale = 1.0 / inv
    elif scale_format != "float32":
        raise InputError(f"unknown scale format {scale_format!r}; use 'float32' or 'ue8m0'")
    return scale, inv


def _to_fp8(v: Tensor, fmt: str) -> Tensor:
    m = torch.finfo(fp8_dtype(fmt)).max
    return v.clamp(-m, m).to(fp8_dtype(fmt))


def _blocked(w: Tensor, block: tuple[int, int]) -> Tensor:
    """[..., O, I] -> [..., O/bo, bo, I/bi, bi] (a view)."""
    *lead, o, i = w.shape
    bo, bi = block
    if o % bo or i % bi:
        raise InputError(f"weight of shape {tuple(w.shape)} does not split into {bo}x{bi} blocks; use a block "
                         "size dividing both dims (moe.quantization.weight_block)")
    return w.reshape(*lead, o // bo, bo, i // bi, bi)


def quantize_blocks(w: Tensor, block: tuple[int, int], fmt: str = "fp8_e4m3",
                    scale_format: str = "float32") -> tuple[Tensor, Tensor]:
    """FP8 values [..., O, I] and float32 scale_inv [..., O/bo, I/bi] of a weight [..., O, I]."""
    wb = _blocked(w.detach().float(), block)
    scale, inv = _scales(wb.abs().amax(dim=(-3, -1)), fmt, scale_format)
    q = _to_fp8(wb * scale.unsqueeze(-1).unsqueeze(-3), fmt)
    return q.reshape(w.shape), inv


def dequantize_blocks(q: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight [..., O, I] (in ``dtype``) that FP8 blocks and their scale_inv stand for."""
    qb = _blocked(q, block).to(torch.float32)
    return (qb * scale_inv.unsqueeze(-1).unsqueeze(-3)).reshape(q.shape).to(dtype)


def quantize_tiles(x_RI: Tensor, tile: int, fmt: str = "fp8_e4m3", scale_format: str = "float32") -> tuple[Tensor, Tensor]:
    """FP8 values [R, I] and float32 scale_inv [R, I/tile] of activations, one scale per 1 x tile."""
    R, I = x_RI.shape
    if I % tile:
        raise InputError(f"activations of width {I} do not split into tiles of {tile}; use a tile width dividing it "
                         "(moe.quantization.activation_tile)")
    xt = x_RI.detach().float().reshape(R, I // tile, tile)
    scale, inv = _scales(xt.abs().amax(dim=-1), fmt, scale_format)
    return _to_fp8(xt * scale.unsqueeze(-1), fmt).reshape(R, I), inv


def dequantize_tiles(q_RI: Tensor, scale_inv: Tensor, tile: int) -> Tensor:
    R, I = q_RI.shape
    return (q_RI.to(torch.float32).reshape(R, I // tile, tile) * scale_inv.unsqueeze(-1)).reshape(R, I)


def fake_quant_tiles(x_RI: Tensor, tile: int, fmt: str, scale_format: str) -> Tensor:
    """x rounded through FP8 tiles, in float32 (what an FP8 GEMM sees of it)."""
    return dequantize_tiles(*quantize_tiles(x_RI, tile, fmt, scale_format), tile)


def check_scales(name: str, q: Tensor, scale_inv: Tensor | None, block: tuple[int, int]) -> None:
    """Refuse FP8 weights whose scales are missing, shaped for other blocks, or not finite and positive."""
    if scale_inv is None:
        raise InputError(f"{name} is stored in {q.dtype} but has no scale_inv; load its '{name}_scale_inv' "
                         "(the checkpoint's weight_scale_inv) with it")
    want = (*q.shape[:-2], q.shape[-2] // block[0], q.shape[-1] // block[1])
    if q.shape[-2] % block[0] or q.shape[-1] % block[1] or tuple(scale_inv.shape) != want:
        raise InputError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)} but {name} {tuple(q.shape)} in "
                         f"{block[0]}x{block[1]} blocks needs {want}; load the scales that belong to these weights or "
                         "set moe.quantization.weight_block to the checkpoint's weight_block_size")
    if scale_inv.dtype != torch.float32:
        raise InputError(f"{name}_scale_inv has dtype {scale_inv.dtype}; scales are float32 "
                         "(convert with .float(): ue8m0 scales are powers of two in float32)")
    if _checked_before(scale_inv):
        return
    bad = ~torch.isfinite(scale_inv) | (scale_inv <= 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"{name}_scale_inv holds {int(bad.sum())} non-finite or non-positive scale(s) (first at "
                         f"{idx}: {float(scale_inv[idx])}); the checkpoint is corrupt or the scales were not meant "
                         "for these weights")
    _remember_checked(scale_inv)


# Scales already found finite and positive, so that every forward of a layer does not scan them again
# (at decode sizes the scan cost about as much as the FP8 expert compute): id of the tensor owning the
# memory -> (weak reference to it, the region checked, its version counter then). An in-place write
# bumps the version counter (which every view of the tensor shares), and a replaced tensor is another
# object: either way the scales are checked again. Inference tensors keep no version counter and are
# checked on every call. A write through ``.data`` (or another alias that shares no version counter: shared
# memory, DLPack) bumps nothing and is not seen: after editing scales that way, reload them
# (``load_state_dict`` replaces the tensors) or call ``check_scales`` on them.
_SCALES_OK: dict[int, tuple] = {}


def _owner_and_region(t: Tensor) -> tuple[Tensor, tuple]:
    base = t if t._base is None else t._base
    return base, (t.data_ptr(), tuple(t.shape), t.stride(), t._version)


def _checked_before(t: Tensor) -> bool:
    if t.is_inference():
        return False
    base, region = _owner_and_region(t)
    hit = _SCALES_OK.get(id(base))
    return hit is not None and hit[0]() is base and hit[1] == region


def _remember_checked(t: Tensor) -> None:
    if t.is_inference():
        return
    base, region = _owner_and_region(t)
    if id(base) not in _SCALES_OK:
        weakref.finalize(base, _SCALES_OK.pop, id(base), None)  # the entry goes with the tensor
    _SCALES_OK[id(base)] = (weakref.ref(base), region)


class _StraightThrough(torch.autograd.Function):
    """Forward: the FP8-rounded value; backward: the gradient passes unchanged (to the master copy)."""

    @staticmethod
    def forward(ctx, x, rounded):
        return rounded

    @staticmethod
    def backward(ctx, g):
        return g, None


def _weight(w: Tensor, s: Tensor | None, block, fmt, scale_format) -> Tensor:
    """The float32 weight the GEMM uses: stored FP8 dequantized, or a master weight rounded through FP8."""
    if s is not None:
        return dequantize_blocks(w, s, block)
    rounded = dequantize_blocks(*quantize_blocks(w, block, fmt, scale_format), block)
    return _StraightThrough.apply(w.float(), rounded) if w.requires_grad else rounded


def _acts(x: Tensor, tile, fmt, scale_format) -> Tensor:
    rounded = fake_quant_tiles(x, tile, fmt, scale_format)
    return _StraightThrough.apply(x.float(), rounded) if x.requires_grad else rounded


def _forward(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED,
             activation, gated, gate_clamp, up_clamp, block, tile, fmt, scale_format) -> Tensor:
    """The op's math in differentiable torch (float32 throughout, result in x's dtype)."""
    T, D = x_TD.shape
    E = w_up_EHD.shape[0]
    y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    if exp_N.numel() == 0:
        return y_TD.to(x_TD.dtype)
    order_N, _, counts = _sort_by_expert(exp_N, E)
    if len(order_N) == 0:
        return y_TD.to(x_TD.dtype)
    tok_sorted = tok_N.index_select(0, order_N)
    w_sorted = weight_N.index_select(0, order_N).float()
    # Step 1: quantize every token once per 1 x tile (a token routed to K experts shares its tiles).
    xq_ND = _acts(x_TD, tile, fmt, scale_format).index_select(0, tok_sorted)
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        # Step 2: up GEMM with the expert's FP8 blocks, float32 accumulation.
        h = xq_ND[start:start + n] @ _weight(w_up_EHD[e], None if s_up is None else s_up[e], block, fmt, scale_format).t()
        if b_up_EH is not None:
            h = h + b_up_EH[e].float()
        # Step 3: activation in float32, then requantized per tile for the down GEMM.
        a = _acts(apply_activation(h, activation, gated, gate_clamp, up_clamp), tile, fmt, scale_format)
        o = a @ _weight(w_down_EDF[e], None if s_down is None else s_down[e], block, fmt, scale_format).t()
        if b_down_ED is not None:
            o = o + b_down_ED[e].float()
        outs.append(o)
        start += n
    o_ND = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    # Step 4: weight and combine per token in float32; one cast to the layer dtype at the end.
    return y_TD.index_add(0, tok_sorted, o_ND * w_sorted.unsqueeze(-1)).to(x_TD.dtype)


def _check_op_args(w_up_EHD, s_up, w_down_EDF, s_down, block) -> None:
    for name, w, s in (("gate_up_proj", w_up_EHD, s_up), ("down_proj", w_down_EDF, s_down)):
        if w.dtype in FORMATS.values():
            check_scales(name, w, s, block)
        elif s is not None:
            raise InputError(f"{name} is {w.dtype} but comes with scales; pass FP8 weights with their scale_inv, or "
                             "master weights without scales (they are quantized on the fly)")


def define_fp8_op(name: str, kernel=None):
    """Register an op with ``fp8_expert_mlp``'s signature, meaning, fake and backward (as
    ``ops.define_expert_op`` does for the expert op).

    ``kernel(*args)`` (the op's positional arguments, checked) runs another backend's kernels and
    returns [T, D], or None where they do not run; the torch forward (or its native decode path) runs
    then. The backward recomputes the torch forward either way.
    """

    def op(
        x_TD: Tensor,
        tok_N: Tensor,
        exp_N: Tensor,
        weight_N: Tensor,
        w_up_EHD: Tensor,
        s_up: Tensor | None,
        w_down_EDF: Tensor,
        s_down: Tensor | None,
        b_up_EH: Tensor | None,
        b_down_ED: Tensor | None,
        activation: str,
        gated: bool,
        gate_clamp: float | None,
        up_clamp: float | None,
        block_out: int,
        block_in: int,
        tile: int,
        fmt: str,
        scale_format: str,
    ) -> Tensor:
        _check_op_args(w_up_EHD, s_up, w_down_EDF, s_down, (block_out, block_in))
        with torch.no_grad():
            if kernel is not None:
                y_TD = kernel(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED,
                              activation, gated, gate_clamp, up_clamp, block_out, block_in, tile, fmt, scale_format)
                if y_TD is not None:
                    return y_TD
            args = (x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED, activation,
                    gated, gate_clamp, up_clamp, (block_out, block_in), tile, fmt, scale_format)
            from . import strategies

            path = _decode_path(args)
            strategies._ran(path)  # what a benchmark reports as run (``strategies.last_ran``)
            if path == "native":  # (which checked that the kernel reads these arguments)
                from . import native

                return native.run_fp8_supported(*args)
            return _forward(*args)

    op.__name__ = name.split("::")[1]
    op.__doc__ = """Grouped FP8 expert MLPs of N (token, expert, weight) assignments, summed per token.

    ``w_up_EHD`` [E, H, D] and ``w_down_EDF`` [E, D, F] are FP8 with float32 scale_inv ``s_up``
    [E, H/bo, D/bi] and ``s_down`` [E, D/bo, F/bi], or higher-precision master weights with no scales
    (quantized per block on the fly). Returns [T, D] in x's dtype.
    """
    registered = opaque_op(name, op)
    registered.register_fake(_fake)
    registered.register_autograd(_backward, setup_context=_setup_context, check_versions=True)
    return registered


def _decode_path(args: tuple) -> str:
    """``per_expert`` (the torch loop of ``_forward``) or ``native`` (``moegraph.native``'s C kernel) for
    this call: the kernel is a candidate for decode-sized batches on stored FP8 weights where it
    builds; a pinned strategy (``native`` or any other) decides, else the tuner measures both."""
    from . import strategies, tuning

    x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED = args[:10]
    activation, gated, gate_clamp, up_clamp, block, tile, fmt, scale_format = args[10:]
    if x_TD.shape[0] > strategies.DECODE_MAX_TOKENS or s_up is None or s_down is None:
        return "per_expert"
    pin, tuner = strategies.current_pin(), tuning.active_tuner()
    if (pin is None and tuner is None) or (pin is not None and pin != "native"):
        return "per_expert"
    from . import native, semantics

    act = semantics.activation(activation, gated)
    if native.fp8_supports(*args[:10], act.gated, block, tile) is not None or native.kernel(act) is None:
        return "per_expert"
    if pin == "native":
        return "native"
    E, H, D = w_up_EHD.shape
    K = max(1, round(exp_N.numel() / max(1, x_TD.shape[0])))
    key = (f"fp8,{fmt},{scale_format},{str(x_TD.dtype).replace('torch.', '')},E={E},D={D},F={w_down_EDF.shape[2]},"
           f"K={K},act={act.name},b={int(b_up_EH is not None)},T<={tuning.token_bucket(x_TD.shape[0])}")
    return tuner.choose_among(key, {"per_expert": lambda: _forward(*args[:14], block, tile, fmt, scale_format),
                                    "native": lambda: native.run_fp8_supported(*args)})


def _fake(x_TD, *args):
    return x_TD.new_empty(x_TD.shape)


# The arguments that may carry a gradient: x, routing weights, master weights, biases.
_GRAD_ARGS = (0, 3, 4, 6, 8, 9)


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs


def _backward(ctx, grad_TD):
    once_differentiable(grad_TD)
    inputs = ctx.inputs
    need = [i in _GRAD_ARGS and isinstance(inputs[i], Tensor) and inputs[i].is_floating_point()
            and inputs[i].dtype not in FORMATS.values() and ctx.needs_input_grad[i] for i in range(len(inputs))]
    if not any(need):
        return (None,) * len(inputs)
    grads = fp8_expert_mlp_backward(grad_TD.contiguous(), *inputs, need)
    return tuple(g if n else None for g, n in zip(grads, need))


@opaque_op("moegraph::fp8_expert_mlp_backward")
def fp8_expert_mlp_backward(
    grad_TD: Tensor,
    x_TD: Tensor,
    tok_N: Tensor,
    exp_N: Tensor,
    weight_N: Tensor,
    w_up_EHD: Tensor,
    s_up: Tensor | None,
    w_down_EDF: Tensor,
    s_down: Tensor | None,
    b_up_EH: Tensor | None,
    b_down_ED: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
    block_out: int,
    block_in: int,
    tile: int,
    fmt: str,
    scale_format: str,
    need: list[bool],
) -> list[Tensor]:
    """Gradients of ``fp8_expert_mlp`` for each of its 19 arguments (an empty tensor where not needed).

    It recomputes the torch forward with autograd (the same FP8 rounding) and differentiates it. One opaque
    op, as ``expert_mlp_backward`` is for the expert op: under ``torch.compile`` with an AOTAutograd backend
    the backward is traced as this call, not through the forward's data-dependent loop over experts.
    """
    inputs = [x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED, activation,
              gated, gate_clamp, up_clamp, block_out, block_in, tile, fmt, scale_format]
    want = [i for i, n in enumerate(need) if n]
    got: list[Tensor | None] = [None] * len(want)
    with torch.enable_grad():
        leaves = {i: inputs[i].detach().requires_grad_(True) for i in want}
        args = [leaves.get(i, a) for i, a in enumerate(inputs)]
        y = _forward(*args[:14], (args[14], args[15]), *args[16:])
        # (no token, or none routed: the output holds no graph, and every gradient is zero)
        if want and y.requires_grad:
            got = list(torch.autograd.grad(y, [leaves[i] for i in want], grad_TD.to(y.dtype), allow_unused=True))
    grads = {i: torch.zeros_like(inputs[i]) if g is None else g.to(inputs[i].dtype) for i, g in zip(want, got)}
    return [grads[i] if i in grads else x_TD.new_empty(0) for i in range(len(inputs))]


@fp8_expert_mlp_backward.register_fake
def _(grad_TD, x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED, activation,
      gated, gate_clamp, up_clamp, block_out, block_in, tile, fmt, scale_format, need):
    inputs = (x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED)
    return [torch.empty_like(t) if (n and isinstance(t, Tensor)) else x_TD.new_empty(0)
            for t, n in zip((*inputs, *(None,) * 9), need)]


#: the grouped expert op with FP8 weights (torch forward; see ``define_fp8_op``)
fp8_expert_mlp = define_fp8_op("moegraph::fp8_expert_mlp")


def rounding_bound(fmt: str) -> tuple[float, float]:
    """(u, eps): one FP8 rounding of a value v whose block or tile has scale_inv s errs by at most
    ``u * |v| + eps * s``: u = 2^-(m+1) for m mantissa bits (half an ulp of a normal number, relative),
    eps = half the subnormal step (for values too small for a normal FP8 number).

    What follows for the layer: one FP8 GEMM errs per output element by at most
    ``sum_k (dx_k |w_k| + |x_k| dw_k + dx_k dw_k)`` with dx, dw bounded as above (tested); a whole expert
    MLP rounds four operands (x, W_up, the activation, W_down), and on non-adversarial data its output's
    relative error (Frobenius norm, against the unquantized layer) stays below ``2 u`` (tested:
    e4m3 2^-3, e5m2 2^-2).
    """
    mantissa, subnormal_step = {"fp8_e4m3": (3, 2.0 ** -9), "fp8_e5m2": (2, 2.0 ** -16)}[fmt]
    return math.ldexp(1.0, -(mantissa + 1)), subnormal_step / 2


# ------------------------------------------------------------------------------------------------
# FP8 parameters of a compiled layer (called by ``runtime.CompiledMoEBase`` when its class has FP8)
# ------------------------------------------------------------------------------------------------


def _fp8_weights(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every quantized weight: the routed experts, and the shared ones if asked."""
    up = layer.up_proj_name
    mods = [layer.experts] + ([layer.shared_experts] if layer.FP8["shared"] and layer.SHARED_INTERMEDIATE else [])
    return [(m, n) for m in mods for n in (up, "down_proj")]


def _block(layer: nn.Module) -> tuple[int, int]:
    return layer.FP8["block_out"], layer.FP8["block_in"]


def make_parameters(layer: nn.Module) -> None:
    """Replace the layer's expert weights by empty FP8 ones with float32 ``<name>_scale_inv`` beside them
    (transformers' names for fused experts; filled by ``reset_parameters`` or a checkpoint)."""
    bo, bi = _block(layer)
    dtype = fp8_dtype(layer.FP8["format"])
    for mod, name in _fp8_weights(layer):
        w = getattr(mod, name)
        *lead, o, i = w.shape
        mod.register_parameter(name, nn.Parameter(torch.empty(w.shape, dtype=dtype, device=w.device), requires_grad=False))
        mod.register_parameter(name + "_scale_inv", nn.Parameter(
            torch.ones(*lead, o // bo, i // bi, dtype=torch.float32, device=w.device), requires_grad=False))


def is_fp8(t: Tensor) -> bool:
    return t.dtype in FORMATS.values()


def store(layer: nn.Module, name: str, w: Tensor) -> None:
    """Quantize ``w`` per block into the FP8 parameter ``name`` (a dotted path) and its scales."""
    q, s = quantize_blocks(w, _block(layer), layer.FP8["format"], layer.FP8["scale_format"])
    layer.get_parameter(name).copy_(q)
    layer.get_parameter(name + "_scale_inv").copy_(s)


def kept_by_apply(layer: nn.Module) -> set[int]:
    """ids of the tensors ``.to(dtype)`` must not cast: FP8 weights and their float32 scales."""
    kept = set()
    for mod, name in _fp8_weights(layer):
        for n in (name, name + "_scale_inv"):
            t = getattr(mod, n)
            if t is not None and (is_fp8(t) or n.endswith("_scale_inv")):
                kept.add(id(t))
    return kept


def use_master_weights(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Turn the FP8 weights into trainable master weights in ``dtype`` (their dequantized values).

    The layer then quantizes them per block on every forward (FP8 Fprop, as DeepSeek-V3 trains) and
    their gradient arrives straight through the quantizer. ``requantize`` turns them back into FP8.
    """
    for mod, name in _fp8_weights(layer):
        w, s = getattr(mod, name), getattr(mod, name + "_scale_inv")
        if s is None:
            continue
        mod.register_parameter(name, nn.Parameter(dequantize_blocks(w, s, _block(layer), dtype)))
        mod.register_parameter(name + "_scale_inv", None)
    layer.invalidate_graphs()
    return layer


def requantize(layer: nn.Module) -> nn.Module:
    """Store master weights (after ``use_master_weights``) as FP8 blocks and scales again."""
    bo, bi = _block(layer)
    for mod, name in _fp8_weights(layer):
        w = getattr(mod, name)
        if getattr(mod, name + "_scale_inv") is not None:
            continue
        q, s = quantize_blocks(w, (bo, bi), layer.FP8["format"], layer.FP8["scale_format"])
        mod.register_parameter(name, nn.Parameter(q, requires_grad=False))
        mod.register_parameter(name + "_scale_inv", nn.Parameter(s, requires_grad=False))
    layer.invalidate_graphs()
    return layer


@torch.fx.wrap
def shared_mlp(x_TD: Tensor, w_up_HD: Tensor, s_up: Tensor | None, w_down_DS: Tensor, s_down: Tensor | None,
               b_up_H: Tensor | None, b_down_D: Tensor | None, scale_T: Tensor | None, activation: str, gated: bool,
               gate_clamp: float | None, up_clamp: float | None, block_out: int, block_in: int, tile: int, fmt: str,
               scale_format: str) -> Tensor:
    """The shared experts in FP8: the grouped op with one expert that every token uses (weight 1, or the
    shared gate's per-token scale)."""
    T = x_TD.shape[0]
    tok_N = torch.arange(T, device=x_TD.device)
    w_N = torch.ones(T, dtype=x_TD.dtype, device=x_TD.device) if scale_T is None else scale_T.to(x_TD.dtype)

    def one(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.unsqueeze(0)

    return torch.ops.moegraph.fp8_expert_mlp(
        x_TD, tok_N, torch.zeros_like(tok_N), w_N, one(w_up_HD), one(s_up), one(w_down_DS), one(s_down), one(b_up_H),
        one(b_down_D), activation, gated, gate_clamp, up_clamp, block_out, block_in, tile, fmt, scale_format)
