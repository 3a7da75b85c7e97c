"""``moegraph::route_select``: the expert choice of a score-then-top-k router as one op.

The generated layer spells the choice as a dozen small torch steps (expert bias, group scores, the
kept groups' mask, top-k, gather: ``semantics.routing.select_experts``); at decode sizes each step
costs more in dispatch than in arithmetic. The op runs them as one call of the native kernel
(``moegraph.native.route_select``) on CPU float32 scores, and as those torch steps otherwise: on
other devices and dtypes, without a C compiler, for group sums of more than two experts, and for
any call where a token's choice hinges on equal values (then torch's own order among them decides,
as in the unfused graph). Either way the result is the torch steps' result, bit for bit: the kernel
computes only comparisons and the same single additions. ``fx_passes.FuseRouterSelect`` puts the op
into eval graphs.

The chosen experts' scores are differentiable in the scores (as the gather they replace); the
choice itself is piecewise constant.

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..oplib import opaque_op
from ..semantics.routing import TopKPolicy, select_experts

__all__ = ["route_select"]


@opaque_op("moegraph::route_select")
def route_select(scores_TE: Tensor, expert_bias_E: Tensor | None, top_k: int, num_groups: int, topk_groups: int,
                 group_score: str, top_n: int) -> tuple[Tensor, Tensor]:
    """The experts each token chooses and their scores.

    Args:
        scores_TE: [T, E] router scores (after the score function).
        expert_bias_E: optional [E] bias added to the scores for the choice only.
        top_k: experts per token.
        num_groups, topk_groups, group_score, top_n: the group limit (num_groups 0: none); see the spec's
            ``router.groups``.
    Returns:
        ids_TK [T, K] int64, best first; scores_TK [T, K]: scores_TE at those ids.
    """
    from .. import native

    with torch.no_grad():
        got = native.route_select(scores_TE, expert_bias_E, top_k, num_groups, topk_groups, group_score, top_n)
        if got is not None:
            return got
        policy = TopKPolicy(top_k, num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
                            top_n=top_n)
        return select_experts(scores_TE, policy, expert_bias_E)


@route_select.register_fake
def _(scores_TE, expert_bias_E, top_k, num_groups, topk_groups, group_score, top_n):
    T = scores_TE.shape[0]
    return scores_TE.new_empty(T, top_k, dtype=torch.int64), scores_TE.new_empty(T, top_k)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.scores_shape = inputs[0].shape


def _backward(ctx, grad_ids, grad_scores_TK):
    (ids_TK,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_scores_TK is not None:
        grad = grad_scores_TK.new_zeros(ctx.scores_shape).scatter_(1, ids_TK, grad_scores_TK)
    return (grad,) + (None,) * 6


route_select.register_autograd(_backward, setup_context=_setup)
