"""Opaque custom ops for the data-dependent steps of an MoE layer.

``moegraph::expert_mlp`` takes a flat list of (token, expert, weight) assignments, sorts them by
expert, runs every expert's MLP on its rows (one GEMM pair per expert that received tokens) and sums
the weighted outputs per token. It is an opaque custom op (``moegraph.oplib``) with a fake implementation, so
``torch.fx`` sees one node and ``torch.compile`` can trace around it.

How the expert GEMMs are laid out (per expert, grouped, padded batch, decode) is chosen per call by
``moegraph.strategies`` (pinned, tuned on this machine, or by the fixed rule ``_small_experts``).

Assignments cover every routing policy with one format: token choice (N = T*K), expert choice
(N = E*C), hash routing, and dropped assignments (expert id outside [0, E) is skipped).

Memory the op keeps between calls: in inference its scratch buffers (per thread, dtype, device and
inference mode; at most WORKSPACE_LIMIT_BYTES each, freed by ``clear_workspace()``), and in eval
graphs a oneDNN-packed copy of the expert weights (``packed_experts``, released with the weights).

Legend: T tokens, D model dim, F expert hidden dim, E experts, N assignments, S shared hidden dim.

The package: ``args`` (``ExpertArgs``, ``RoutedRows``: the arguments objects everything past the op
schema takes), ``activation`` (the activation forms inside the op), ``forward`` (reference and fast
paths), ``workspace`` (scratch buffers, oneDNN packing), ``threads`` (worker
threads for one call's experts), ``backward`` (the explicit backward op);
this module registers the ops (the one place with the positional form) and holds the op's settings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ..oplib import opaque_op
from .args import ExpertArgs, RoutedRows, SavedForward
from .activation import FAST_INPLACE, _act_backward, _act_saved, _activate_, apply_activation, mlp_forward
from .backward import (
    _mlp_grads,
    _zero_untouched,
    expert_mlp_backward,
    is_training_call,
    stash_forward,
    take_forward,
    using_forward,
)
from .forward import _expert_mlp_fast, _expert_mlp_impl, _small_experts, _sort_by_expert, shared_into_output
from .workspace import (
    _linear,
    _PackedExperts,
    _workspace,
    clear_workspace,
    empty_huge,
    packed_experts,
    prepack_supported,
)

__all__ = ["expert_mlp", "expert_mlp_packed", "expert_mlp_backward", "apply_activation", "mlp_forward", "clear_workspace",
           "define_expert_op", "ExpertArgs", "RoutedRows", "empty_huge", "packed_experts", "prepack_supported", "FAST_INPLACE", "WORKSPACE_LIMIT_BYTES",
           "SMALL_EXPERT_WEIGHTS", "_act_backward", "_act_saved", "_activate_", "_expert_mlp_fast", "_expert_mlp_impl",
           "_linear", "_mlp_grads", "_PackedExperts", "_small_experts", "_sort_by_expert", "once_differentiable",
           "_workspace", "_zero_untouched", "shared_into_output", "is_training_call", "SavedForward", "stash_forward", "take_forward", "using_forward"]

#: bytes of scratch buffers one workspace (thread x dtype x device x inference mode) keeps between
#: calls; a buffer that would take it past this is allocated for the call only. 1 GiB holds the
#: buffers of a DeepSeek-V3-shaped layer (D 7168, F 2048, top-8) at about 4k tokens in float32.
WORKSPACE_LIMIT_BYTES = 1 << 30

#: Experts with at most this many weights per projection run as one grouped GEMM (torch._grouped_mm):
#: below it the per-expert loop's per-call overhead costs more than its faster GEMMs gain.
SMALL_EXPERT_WEIGHTS = 1 << 16


def define_expert_op(name: str, forward=None):
    """Register a grouped expert op with ``expert_mlp``'s signature, fake and autograd.

    ``forward(args)`` computes the result from an ``ExpertArgs`` under no_grad (default: the inference path;
    ``"packed"``: the same with oneDNN-packed weights). Every variant shares the backward, the opaque
    op ``expert_mlp_backward`` (the Triton backend registers its op here too).
    """

    def op(
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
    ) -> Tensor:
        # The positional form ends here: everything below takes the arguments object.
        args = ExpertArgs(x_TD, tok_N, exp_N, weight_N, w_up_EHD, w_down_EDF, b_up_EH, b_down_ED,
                          activation, gated, gate_clamp, up_clamp, shared_w_up_HD, shared_w_down_DF, shared_scale_T)
        with torch.no_grad():
            if callable(forward):
                return forward(args)
            packed = packed_experts(w_up_EHD, w_down_EDF, shared_w_up_HD, shared_w_down_DF) if forward == "packed" else None
            from .. import strategies  # the strategy (pinned, tuned or by rule) runs the experts

            return strategies.run(args, packed)

    op.__name__ = name.split("::")[1]
    registered = opaque_op(name, op)

    @registered.register_fake
    def _(x_TD, *args):
        return x_TD.new_empty(x_TD.shape)

    registered.register_autograd(_backward, setup_context=_setup_context, check_versions=True)
    return registered


# The differentiable tensor arguments of expert_mlp, by position.
_TENSOR_ARGS = (0, 3, 4, 5, 6, 7, 12, 13, 14)


def _setup_context(ctx, inputs, output):
    from .. import strategies

    ctx.inputs = inputs
    # A layer's pinned strategy holds around its forward only; the backward runs later, under the same pin.
    ctx.pin = strategies.current_pin()
    ctx.saved_forward = take_forward(output)  # sorted rows and up projection, where the forward kept them


def once_differentiable(grad_TD: Tensor) -> None:
    """Refuse a backward asked to build a graph of itself (``create_graph=True`` with a gradient that needs one):
    the expert ops' backwards are opaque ops with the first derivatives written out, which autograd cannot
    differentiate again (torch failed deep inside with "mm(): functions with out=... arguments don't support
    automatic differentiation"; the FP8 op's would have given no second-order term at all)."""
    if torch.is_grad_enabled() and grad_TD.requires_grad:
        raise InputError("the MoE layer's expert op is differentiable once: a gradient taken with create_graph=True "
                         "(double backward, a gradient penalty, Hessian-vector products) cannot pass through it; "
                         "take such terms without the MoE layer, or detach its output there")


def _backward(ctx, grad_TD):
    from .. import strategies

    once_differentiable(grad_TD)
    inputs = ctx.inputs
    need = [i in _TENSOR_ARGS and isinstance(inputs[i], Tensor) and ctx.needs_input_grad[i] for i in range(15)]
    with strategies.pinned(ctx.pin), using_forward(ctx.saved_forward):
        grads = expert_mlp_backward(grad_TD.contiguous(), *inputs, need)
    return tuple(g if n else None for g, n in zip(grads, need))



#: Grouped expert MLP over assignments; see the module docstring. Arguments:
#:   x_TD [T, D] token activations; tok_N [N] int64 token of each assignment; exp_N [N] int64 expert
#:   (ids outside [0, E) are dropped); weight_N [N] routing weight; w_up_EHD [E, H, D] up projection
#:   (gated: gate rows then up rows, H = 2F); w_down_EDF [E, D, F]; b_up_EH, b_down_ED optional
#:   biases; activation, gated, gate_clamp, up_clamp as in the spec; shared_w_up_HD,
#:   shared_w_down_DF optional shared experts folded into the op; shared_scale_T optional [T] scale
#:   of the shared output (Qwen2-MoE's sigmoid gate).
#: Returns [T, D]: the sum over assignments of weight * expert(x[token]) (+ shared experts).
expert_mlp = define_expert_op("moegraph::expert_mlp")
#: The same op for inference with oneDNN-packed expert weights (used by fx_passes.UsePrepackedExperts).
expert_mlp_packed = define_expert_op("moegraph::expert_mlp_packed", "packed")
