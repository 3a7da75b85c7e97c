"""Custom ops of the Triton backend: ``torch.ops.moegraph_triton.{expert_mlp, fp8_expert_mlp, route_topk}``.

``moegraph_triton::expert_mlp`` has exactly the signature and semantics of ``moegraph::expert_mlp``
(see ``moegraph.ops``); generated layers of backend "triton" call it. Like the torch op it is opaque
to FX and ``torch.compile`` (fake implementation) and differentiable: its backward recomputes the
torch reference with autograd, as ``moegraph.ops`` does.

``moegraph_triton::fp8_expert_mlp`` is ``moegraph::fp8_expert_mlp`` (same signature, fake and
backward) with the block-scaled FP8 kernels of ``moegraph.triton_backend.fp8`` for stored FP8 weights.

``moegraph_triton::route_topk`` is the router kernel of a top-k policy; its fallback (beyond the
kernel's sizes) is the torch reference of ``moegraph.semantics.routing``, the same steps as the
generated torch routing code. Its backward differentiates the weights of the chosen experts with
respect to the logits (the choice itself is piecewise constant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import fp8
from .. import ops as torch_ops
from ..oplib import opaque_op
from ..semantics import routing
from . import configs, kernels
from . import fp8 as triton_fp8

__all__ = ["expert_mlp", "fp8_expert_mlp", "route_topk", "route_topk_reference"]


#: Grouped expert MLP over assignments with Triton kernels; arguments and result as ``moegraph::expert_mlp``
#: (same fake implementation, and the same backward: recomputation of the torch reference).
expert_mlp = torch_ops.define_expert_op("moegraph_triton::expert_mlp", kernels.expert_mlp)


def _fp8_kernels(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, b_up_EH, b_down_ED, *rest):
    """The FP8 Triton kernels' result where they run (``triton_fp8.runs_kernels``), else None."""
    if not triton_fp8.runs_kernels(x_TD, s_up, s_down, b_up_EH, b_down_ED):
        return None
    return triton_fp8.expert_mlp_fp8(x_TD, tok_N, exp_N, weight_N, w_up_EHD, s_up, w_down_EDF, s_down, *rest,
                                     block_m=configs.current_row_block() or 16)


#: ``moegraph::fp8_expert_mlp`` with the block-scaled FP8 Triton kernels for stored FP8 weights.
fp8_expert_mlp = fp8.define_fp8_op("moegraph_triton::fp8_expert_mlp", _fp8_kernels)


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------


def route_topk_reference(logits_TE: Tensor, expert_bias_E: Tensor | None, *policy) -> tuple[Tensor, Tensor]:
    """Torch routing (``moegraph.semantics.routing``) for ``route_topk``'s positional policy arguments."""
    return routing.route_topk(logits_TE, routing.TopKPolicy(*policy), expert_bias_E)


@opaque_op("moegraph_triton::route_topk")
def route_topk(logits_TE: Tensor, expert_bias_E: Tensor | None, top_k: int, score: str, topk_then_score: bool,
               normalize: bool, scaling_factor: float, num_groups: int, topk_groups: int, group_score: str,
               top_n: int) -> tuple[Tensor, Tensor]:
    """Top-k routing in one kernel.

    Args:
        logits_TE: [T, E] router logits.
        expert_bias_E: optional [E] bias added to the scores for selection only.
        top_k, score, topk_then_score, normalize, scaling_factor: the router's policy (see the spec).
        num_groups, topk_groups, group_score, top_n: group limit (num_groups 0: none).
    Returns:
        ids_TK [T, K] int64, best first; weights_TK [T, K] in the logits' dtype.

    The experts are ``route_topk_reference``'s wherever the values deciding the choice are distinct; where
    equal values decide it, the kernel takes the lowest expert (and group) id, torch.topk an order of its
    own (which differs between CPU and CUDA). The weights are those of the experts chosen.
    """
    policy = routing.TopKPolicy(top_k, score, topk_then_score, normalize, scaling_factor, num_groups, topk_groups,
                                group_score, top_n)
    with torch.no_grad():
        if kernels.router_supported(logits_TE.shape[1], top_k, score) is not None:
            # Beyond the kernel (thousands of experts): the torch reference, same results.
            ids_TK, w_TK = routing.route_topk(logits_TE, policy, expert_bias_E)
            return ids_TK, w_TK.to(logits_TE.dtype)
        return kernels.route_topk(logits_TE, expert_bias_E, policy)


@route_topk.register_fake
def _(logits_TE, expert_bias_E, top_k, score, topk_then_score, normalize, scaling_factor, num_groups, topk_groups,
      group_score, top_n):
    T = logits_TE.shape[0]
    return logits_TE.new_empty(T, top_k, dtype=torch.int64), logits_TE.new_empty(T, top_k)


def _route_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])
    ctx.policy = routing.TopKPolicy(*inputs[2:])


def _route_backward(ctx, grad_ids, grad_w_TK):
    logits_TE, ids_TK = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_w_TK is not None:
        with torch.enable_grad():
            leaf = logits_TE.detach().requires_grad_(True)
            w_TK = routing.route_weights(leaf, ids_TK, ctx.policy)
            (grad_logits,) = torch.autograd.grad(w_TK, leaf, grad_w_TK)
    return (grad_logits,) + (None,) * 10


route_topk.register_autograd(_route_backward, setup_context=_route_setup)
