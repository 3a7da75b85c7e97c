"""The expert activation inside the op: the table's form (``moegraph.semantics``), the hand-fused
in-place forms of the hot built-ins, and the saved derivatives the backward uses.

Legend: rows R, F expert hidden dim, H up-projection width (2F if gated, else F), D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import semantics
from ..semantics import torch_forms

__all__ = ["apply_activation", "mlp_forward", "FAST_INPLACE"]


def apply_activation(h: Tensor, activation: str, gated: bool, gate_clamp: float | None, up_clamp: float | None) -> Tensor:
    """The expert nonlinearity on the up projection ``h`` ([rows, 2F] if gated else [rows, F]).

    ``activation`` names an entry of ``moegraph.semantics.ACTIVATIONS`` (or, with ``gated``, its
    elementwise function: ``("silu", True)`` is swiglu); the form is the entry's expression.
    """
    return torch_forms.activate(h, semantics.activation(activation, gated), gated, gate_clamp, up_clamp)


def mlp_forward(
    x_RD: Tensor,
    w_up_HD: Tensor,
    w_down_DF: Tensor,
    b_up_H: Tensor | None,
    b_down_D: Tensor | None,
    activation: str,
    gated: bool,
    gate_clamp: float | None,
    up_clamp: float | None,
) -> Tensor:
    """One expert MLP on R rows: act(x W_up^T + b_up) W_down^T + b_down (H = 2F if gated else F)."""
    h = F.linear(x_RD, w_up_HD, b_up_H)
    a = apply_activation(h, activation, gated, gate_clamp, up_clamp)
    return F.linear(a, w_down_DF, b_down_D)



def _silu_(t: Tensor) -> Tensor:
    return F.silu(t, inplace=True)


def _relu2_(t: Tensor) -> Tensor:
    return torch.square(F.relu_(t), out=t)


#: Hand-fused in-place forms of the hot built-in activations (the table marks them ``fast``; a test
#: checks each against the entry's expression): the elementwise function applied in place to the
#: gate half (gated) or the whole row (plain). Every other entry runs its expression.
FAST_INPLACE = {"swiglu": _silu_, "reglu": F.relu_, "silu": _silu_, "relu": F.relu_, "relu2": _relu2_}


def _activate_(h: Tensor, activation: str, gated: bool, gate_clamp: float | None, up_clamp: float | None,
               out: Tensor | None = None) -> Tensor:
    """In-place version of apply_activation on a scratch buffer; returns the activated view.

    For gated MLPs, ``out`` (a contiguous [rows, F] buffer) receives act(gate, up) instead of the
    gate half of ``h``, so the next GEMM reads dense rows.
    """
    act = semantics.activation(activation, gated)
    fast = FAST_INPLACE.get(act.name)
    if not act.gated:
        return fast(h) if fast is not None else h.copy_(torch_forms.activate(h, act))
    f = h.shape[-1] // 2
    gate, up = h[:, :f], h[:, f:]
    if gate_clamp is not None:
        gate.clamp_(max=gate_clamp)
    if up_clamp is not None:
        up.clamp_(min=-up_clamp, max=up_clamp)
    if fast is None:  # the entry's expression on the clamped halves
        a = torch_forms.activate(h, act)
        return gate.copy_(a) if out is None else out.copy_(a)
    fast(gate)
    return gate.mul_(up) if out is None else torch.mul(gate, up, out=out)



def _act_saved(h: Tensor, activation: str, gated: bool, gate_clamp: float | None, up_clamp: float | None):
    """The activation of ``h`` [rows, H] and its derivatives (from the table entry's expression):
    returns (a [rows, F], saved)."""
    return torch_forms.activate_saved(h, semantics.activation(activation, gated), gate_clamp, up_clamp)


def _act_backward(ga: Tensor, saved: tuple, activation: str, gated: bool, gate_clamp: float | None,
                  up_clamp: float | None) -> Tensor:
    """d loss / d h [rows, H] from d loss / d a [rows, F] and ``_act_saved``'s saved derivatives."""
    return torch_forms.activate_backward(ga, saved)

