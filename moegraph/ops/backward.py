"""The expert op's backward: one opaque op (``moegraph::expert_mlp_backward``) that takes (or
recomputes) what the forward computed and writes the derivatives out (the activation's from the semantics table), so
``torch.compile`` traces training through the layer without an eager autograd graph inside.

Legend: T tokens, D model dim, F expert hidden dim, H up-projection width, E experts, N assignments,
R rows of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import contextlib
import threading

from ..oplib import opaque_op
from .activation import _act_backward, _act_saved
from .args import RoutedRows, SavedForward
from .forward import _sort_by_expert

# ----------------------------------------------------------------------------------------------
# The forward's saved state travels beside the op schemas (the ops take and return plain tensors):
# a training forward leaves it in this thread's slot with the output it belongs to, the op's
# setup_context takes it (only for that output, so nothing stale is ever used), and the backward
# op reads it while the autograd backward holds it. Under torch.compile the slot stays empty and the
# backward recomputes what it needs.
# ----------------------------------------------------------------------------------------------

_SAVED = threading.local()


def is_training_call(*tensors: Tensor | None) -> bool:
    """Inside the op's autograd forward, with a differentiable input: its backward will run.

    An autograd.Function's forward runs with forward-mode AD off, which a plain no_grad call leaves
    on; inference mode turns it off too, so it is excluded by name.
    """
    return (not torch._C._is_fwd_grad_enabled() and not torch.is_inference_mode_enabled()
            and any(t is not None and t.requires_grad for t in tensors))


def stash_forward(y_TD: Tensor, state: SavedForward) -> None:
    """Keep ``state`` for the backward of the call that returned ``y_TD`` (one slot per thread)."""
    _SAVED.slot = (y_TD, state)


def take_forward(output: Tensor) -> SavedForward | None:
    """The state stashed with ``output`` (emptying the slot); None if the slot holds another call's."""
    slot = getattr(_SAVED, "slot", None)
    _SAVED.slot = None
    if slot is None or slot[0] is not output:
        return None
    return slot[1]


@contextlib.contextmanager
def using_forward(state: SavedForward | None):
    """Within the block, the backward op reads ``state`` (the autograd backward enters this)."""
    prev = getattr(_SAVED, "backward", None)
    _SAVED.backward = state
    try:
        yield
    finally:
        _SAVED.backward = prev


def _mlp_grads(x_RD, w_up_HD, w_down_DF, b_up_H, b_down_D, gy_RD, scale_R1, activation, gated, gate_clamp,
               up_clamp, want_scale: bool, want_x: bool = True):
    """Gradients of one expert MLP whose output rows are scaled by ``scale_R1`` ([R, 1] or None).

    ``gy_RD`` is the gradient of the scaled output. Returns (gx_RD or None if not ``want_x``,
    gw_up_HD, gw_down_DF, gb_up_H, gb_down_D, g_scale_R or None). The up projection is recomputed
    from the saved inputs; the down projection's output is not: the gradient of a row's scale is
    gy . (a W_down^T + b_down), which is (gy W_down) . a + gy . b_down, and gy W_down is the product
    the input gradient needs anyway (scaled by the row's scale). The row scale goes onto the F-wide
    side, never the D-wide one.
    """
    h = F.linear(x_RD, w_up_HD, b_up_H)
    a, saved = _act_saved(h, activation, gated, gate_clamp, up_clamp)
    gyw_RF = gy_RD @ w_down_DF
    g_scale = None
    if want_scale:
        g_scale = (gyw_RF * a).sum(-1)
        if b_down_D is not None:
            g_scale += gy_RD @ b_down_D
    if scale_R1 is None:
        ga, a_scaled, gb_down = gyw_RF, a, (gy_RD.sum(0) if b_down_D is not None else None)
    else:
        ga, a_scaled = gyw_RF.mul_(scale_R1), a * scale_R1
        gb_down = (scale_R1.t() @ gy_RD).squeeze(0) if b_down_D is not None else None
    gw_down = gy_RD.t() @ a_scaled
    gh = _act_backward(ga, saved, activation, gated, gate_clamp, up_clamp)
    gw_up = gh.t() @ x_RD
    gb_up = gh.sum(0) if b_up_H is not None else None
    gx = gh @ w_up_HD if want_x else None
    return gx, gw_up, gw_down, gb_up, gb_down, g_scale


def _zero_untouched(grads: dict, counts: list[int]) -> None:
    """Experts that received no rows get zero weight (and bias) gradients."""
    for e, n in enumerate(counts):
        if n == 0:
            for name in ("gw_up", "gw_down", "gb_up", "gb_down"):
                if grads.get(name) is not None:
                    grads[name][e].zero_()


@opaque_op("moegraph::expert_mlp_backward")
def expert_mlp_backward(
    grad_TD: Tensor,
    x_TD: Tensor,
    tok_N: Tensor,
    exp_N: Tensor,
    weight_N: Tensor,
    w_up_EHD: Tensor,
    w_down_EDF: Tensor,
    b_up_EH: Tensor | None,
    b_down_ED: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
    shared_w_up_HD: Tensor | None,
    shared_w_down_DF: Tensor | None,
    shared_scale_T: Tensor | None,
    need: list[bool],
) -> list[Tensor]:
    """Gradients of ``expert_mlp`` for each of its 15 arguments (an empty tensor where not needed).

    One opaque op, so that ``torch.compile`` traces training through the MoE layer without running a
    recomputed autograd graph eagerly inside the backward.
    """
    E = w_up_EHD.shape[0]
    grad_TD = grad_TD.to(x_TD.dtype)
    gx = torch.zeros_like(x_TD) if need[0] else None
    # The routed strategy makes the expert weight gradients (no zero fill of [E, H, D] first: at
    # training sizes that fill costs as much as a GEMM); zeros only where nothing writes them.
    gw_up = gw_down = None
    gb_up = torch.empty_like(b_up_EH) if b_up_EH is not None else None
    gb_down = torch.empty_like(b_down_ED) if b_down_ED is not None else None
    g_weight = torch.zeros_like(weight_N)
    g_sh_up = g_sh_down = g_scale = None  # computed below where the arguments exist
    # Step 1: shared experts (output scaled per token by shared_scale_T when given).
    if shared_w_up_HD is not None:
        scale = None if shared_scale_T is None else shared_scale_T.to(grad_TD.dtype).unsqueeze(-1)
        gxs, g_sh_up, g_sh_down, _, _, gs = _mlp_grads(x_TD, shared_w_up_HD, shared_w_down_DF, None, None, grad_TD,
                                                       scale, activation, gated, gate_clamp, up_clamp,
                                                       want_scale=shared_scale_T is not None, want_x=need[0])
        if need[0]:
            gx += gxs
        if shared_scale_T is not None:
            g_scale = gs.to(shared_scale_T.dtype)
    # Step 2: routed experts, sorted by expert as in the forward; dropped assignments get no gradient.
    saved = getattr(_SAVED, "backward", None)
    if saved is not None:
        order_N, exp_sorted, counts = saved.order_N, saved.exp_sorted, saved.counts
    else:
        order_N, exp_sorted, counts = _sort_by_expert(exp_N, E)
    n_valid = len(order_N)
    if n_valid:
        tok_sorted = tok_N.index_select(0, order_N) if saved is None else saved.tok_sorted
        w_sorted = weight_N.index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
        x_ND = x_TD.index_select(0, tok_sorted) if saved is None else saved.x_ND
        gy_ND = grad_TD.index_select(0, tok_sorted)
        grads = {"gw_up": gw_up, "gw_down": gw_down, "gb_up": gb_up, "gb_down": gb_down,
                 "gw_sorted": torch.empty(n_valid, dtype=x_TD.dtype, device=x_TD.device)}
        from .. import strategies  # per-expert loop or grouped GEMMs, chosen as the forward's strategy

        gx_ND = strategies.run_backward(
            RoutedRows(x_ND, gy_ND, w_sorted, exp_sorted, counts, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation,
                       gated, gate_clamp, up_clamp, need[3], None if saved is None else saved.h_ND, need[0]), grads)
        gw_sorted, gw_up, gw_down, gb_up, gb_down = (grads[k] for k in ("gw_sorted", "gw_up", "gw_down", "gb_up",
                                                                         "gb_down"))
        if need[0]:
            gx.index_add_(0, tok_sorted, gx_ND)
        if need[3]:
            g_weight[order_N] = gw_sorted.to(weight_N.dtype)
    else:
        gw_up, gw_down = torch.zeros_like(w_up_EHD), torch.zeros_like(w_down_EDF)
        _zero_untouched({"gb_up": gb_up, "gb_down": gb_down}, [0] * E)
    grads = [gx, None, None, g_weight, gw_up, gw_down, gb_up, gb_down, None, None, None, None, g_sh_up, g_sh_down,
             g_scale]
    return [g if (n and g is not None) else x_TD.new_empty(0) for g, n in zip(grads, need)]


@expert_mlp_backward.register_fake
def _(grad_TD, x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, activation, gated,
      gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF, shared_scale_T, need):
    inputs = (x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED, None, None, None, None,
              shared_w_up_HD, shared_w_down_DF, shared_scale_T)
    return [torch.empty_like(t) if (n and isinstance(t, Tensor)) else x_TD.new_empty(0) for t, n in zip(inputs, need)]

